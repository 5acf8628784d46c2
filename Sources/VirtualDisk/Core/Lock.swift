#if canImport(Glibc)
import Glibc
#endif

/// A plain mutex for classes whose state spans several stored properties. Every class
/// that uses one says which properties it guards.
final class Lock: @unchecked Sendable {
    // Safe: the pthread mutex lives at a stable heap address for the object's life.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>

    init() {
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    func run<R>(_ body: () throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }
}

/// The lock of a format layer's metadata (its header fields and, through the cache, its
/// tables). Lookups that only read it (`read`: `map`, finding where an in-place write
/// goes) share it, so a lookup whose table page must come from disk holds up no other
/// lookup; anything that changes metadata holds it alone (`run`). A waiting change
/// holds off new lookups, so a stream of reads cannot starve an allocation.
///
/// Not re-entrant in either mode: a `read` inside a `read` can deadlock behind a
/// waiting `run`.
final class MetadataLock: Sendable {
    private let lock = RWLock(preferWriters: true)

    /// Hold the lock alone: for anything that changes the layer's state.
    func run<R>(_ body: () throws -> R) rethrows -> R {
        try lock.exclusive(body)
    }

    /// Share the lock with other lookups: `body` must change nothing (cache pages it
    /// loads are the cache's business, which is thread-safe).
    func read<R>(_ body: () throws -> R) rethrows -> R {
        try lock.shared(body)
    }

    /// The flush every format layer shares. With metadata to write (`dirty`, checked
    /// under the lock), `locked` writes it back alone under the lock, in the order the
    /// format needs, syncs included. Without, only data written in place waits for
    /// stable storage: `sync` runs outside the lock, so lookups (and reads) go on while
    /// the disk takes its time.
    func flush(dirty: () -> Bool, locked: () throws -> Void, sync: () throws -> Void) throws {
        let done = try run { () throws -> Bool in
            guard dirty() else { return false }
            try locked()
            return true
        }
        if !done { try sync() }
    }
}
