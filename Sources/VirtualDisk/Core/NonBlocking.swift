import CVloop

/// Running a request only as far as it goes without waiting, so that a caller with
/// better things to do than block (an event loop) can serve what is already in
/// memory itself and hand the rest to threads that may block.
///
/// Inside `attempt`, on the calling thread only:
/// - file reads take what the page cache holds (`preadv2` with RWF_NOWAIT) and give
///   up where the disk would be needed; files in memory (tmpfs, ramfs) read as usual;
///   a file system that cannot tell gives up at once;
/// - the locks a lookup takes are tried, not waited for, when their holder is busy
///   for long (it may be loading metadata or writing it back);
/// - nothing may be written: a write gives up.
///
/// Giving up throws `WouldBlock` out of whatever was under way; `attempt` returns nil
/// and the caller runs the request again where it may block. Only reads are
/// attempted, so nothing was changed by the attempt.
public enum NonBlocking {
    struct WouldBlock: Error {}

    /// The result of `body`, or nil if it would have had to wait.
    public static func attempt<R>(_ body: () throws -> R) throws -> R? {
        let outer = vl_nowait_get()
        vl_nowait_set(1)
        defer { vl_nowait_set(outer) }
        do {
            return try body()
        } catch is WouldBlock {
            return nil
        }
    }

    /// The calling thread is inside `attempt`.
    static var active: Bool { vl_nowait_get() != 0 }

    /// Take a lock on the read path: as usual outside `attempt`; inside, tried a few
    /// hundred times (a few microseconds, longer than a lookup holds a lock), then
    /// given up on.
    static func acquire(trying: () -> Bool, waiting: () -> Void) throws {
        guard active else { return waiting() }
        for _ in 0..<200 where trying() { return }
        throw WouldBlock()
    }

    /// Give up if inside `attempt` (before anything that may wait or change).
    static func check() throws {
        if active { throw WouldBlock() }
    }
}
