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
final class MetadataLock: Sendable {
    private let lock = Lock()

    func run<R>(_ body: () throws -> R) rethrows -> R {
        try lock.run(body)
    }

    /// For lookups on the read path: see `Lock.lookup`.
    func lookup<R>(_ body: () throws -> R) throws -> R {
        try lock.lookup(body)
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
