import CVloop
#if canImport(Glibc)
import Glibc
#endif

/// A plain mutex for classes whose state spans several stored properties. Every class
/// that uses one says which properties it guards.
final class Lock: @unchecked Sendable {
    // Safe: the pthread mutex lives at a stable heap address for the object's life.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>

    /// `spinning`: spin briefly before sleeping, for locks held for a few instructions
    /// by many threads at once.
    init(spinning: Bool = false) {
        mutex = .allocate(capacity: 1)
        if spinning {
            vl_mutex_init_adaptive(mutex)
        } else {
            pthread_mutex_init(mutex, nil)
        }
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

    /// For `MetadataLock.loadUnlocked` only: let go of, and take back, a lock held by
    /// `run` or `lookup` on this thread.
    func unlock() { pthread_mutex_unlock(mutex) }
    func relock() { pthread_mutex_lock(mutex) }

    /// As `run`, but inside `NonBlocking.attempt` a lock its holder keeps is not
    /// waited for: the holder may be doing I/O.
    func lookup<R>(_ body: () throws -> R) throws -> R {
        try NonBlocking.acquire(trying: { pthread_mutex_trylock(mutex) == 0 }, waiting: { pthread_mutex_lock(mutex) })
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }
}

/// State guarded by a spinning pthread mutex. For hot locks held for a few instructions
/// by many threads: with the metadata cache behind a `Synchronization.Mutex`, concurrent
/// lookups through `vloop attach` ran several times slower (8.6k against 63k random
/// reads per second on vmdk) than with this lock.
final class Guarded<State>: @unchecked Sendable {
    // Safe: `value` is only touched inside `withLock`, under `lock`.
    private var value: State
    private let lock = Lock(spinning: true)

    init(_ value: State) { self.value = value }

    func withLock<R>(_ body: (inout State) throws -> R) rethrows -> R {
        try lock.run { try body(&value) }
    }
}

/// The lock of a format layer's metadata (its header fields and, through the cache, its
/// tables): lookups and changes hold it alone. On 2 cores, letting lookups share a
/// reader-writer lock cost a third to a half of in-memory random-read IOPS in
/// contention (measured with fio on `vloop attach`), so it is a plain mutex.
///
/// A lookup (`lookup`: read-only, and restartable from its start) does not keep the
/// lock while a page it needs is read from the file: `MetadataCache.withPage` lets go
/// of it for the read (`loadUnlocked`), so lookups elsewhere in the image, and changes,
/// go on meanwhile. Every section that may change metadata (`run`) counts itself in
/// `changes`; if one ran while the page was read, what the lookup had seen before may
/// be stale, and it starts again.
final class MetadataLock: @unchecked Sendable {
    // Safe: `changes` is only read and written under `lock`.
    private let lock = Lock()
    private var changes: UInt64 = 0

    struct Restart: Error {}

    func run<R>(_ body: () throws -> R) rethrows -> R {
        try lock.run {
            changes &+= 1
            // Pages loaded in here keep the lock: a change is not restartable.
            let outer = vl_lookup_current()
            vl_lookup_set_current(nil)
            defer { vl_lookup_set_current(outer) }
            return try body()
        }
    }

    /// A lookup that has started again this many times loads its pages with the lock
    /// held, as a change does: under a steady stream of changes it would otherwise
    /// never finish.
    static let maxRestarts = 8

    /// For lookups on the read path: see the type's comment, and `Lock.lookup` for
    /// how it behaves inside `NonBlocking.attempt`.
    func lookup<R>(_ body: () throws -> R) throws -> R {
        let me = Unmanaged.passUnretained(self).toOpaque()
        var restarts = 0
        while true {
            do {
                return try lock.lookup {
                    let outer = vl_lookup_current()
                    vl_lookup_set_current(restarts < Self.maxRestarts ? me : nil)
                    defer { vl_lookup_set_current(outer) }
                    return try body()
                }
            } catch is Restart {
                restarts += 1
            }
        }
    }

    /// On a cache miss: the lookup section this thread is in, if the page is its own
    /// to load (not inside a change, nor a lookup that has restarted too often).
    /// `MetadataCache.withPage` gives up on a miss inside `NonBlocking.attempt` before
    /// it asks.
    static var currentLookup: MetadataLock? {
        guard let p = vl_lookup_current() else { return nil }
        return Unmanaged<MetadataLock>.fromOpaque(p).takeUnretainedValue()
    }

    /// Read a page with the lock let go; called with it held, returns with it held.
    /// Throws `Restart` if a change ran meanwhile.
    /// A page `load` needs in turn (a VMDK grain table's load reads its directory
    /// entry) is read there and then: the lock is already let go, and whatever the load
    /// saw is checked by the restart test below.
    func loadUnlocked<T>(_ load: () throws -> T) throws -> T {
        let seen = changes
        lock.unlock()
        let bytes: T
        let me = vl_lookup_current()
        vl_lookup_set_current(nil)
        do {
            bytes = try load()
        } catch {
            vl_lookup_set_current(me)
            lock.relock()
            throw error
        }
        vl_lookup_set_current(me)
        lock.relock()
        if changes != seen { throw Restart() }
        return bytes
    }

    /// The flush every format layer shares. With metadata to write (`dirty`, checked
    /// under the lock), `locked` writes it back under the lock, in the order the format
    /// needs, syncs included. Without, only data written in place waits for stable
    /// storage: `sync` runs outside the lock, so lookups (and reads) go on while the
    /// disk takes its time.
    func flush(dirty: () -> Bool, locked: () throws -> Void, sync: () throws -> Void) throws {
        let done = try run { () throws -> Bool in
            guard dirty() else { return false }
            try locked()
            return true
        }
        if !done { try sync() }
    }
}
