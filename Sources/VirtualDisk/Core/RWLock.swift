import CVloop
#if canImport(Glibc)
import Glibc
#endif

/// A reader-writer lock (pthread). Data I/O holds it shared; operations that free space
/// an in-flight request might still be using hold it exclusively.
final class RWLock: @unchecked Sendable {
    // Safe: the pthread_rwlock_t lives at a stable heap address for the object's life
    // and pthread makes it thread-safe.
    private let lock: UnsafeMutablePointer<pthread_rwlock_t>

    /// With `preferWriters`, a waiting writer holds off new readers (so readers must
    /// not nest: a second `shared` on one thread can deadlock behind a waiting writer).
    init(preferWriters: Bool = false) {
        lock = .allocate(capacity: 1)
        if preferWriters {
            vl_rwlock_init_prefer_writer(lock)
        } else {
            pthread_rwlock_init(lock, nil)
        }
    }

    deinit {
        pthread_rwlock_destroy(lock)
        lock.deallocate()
    }

    func shared<R>(_ body: () throws -> R) rethrows -> R {
        pthread_rwlock_rdlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }

    func exclusive<R>(_ body: () throws -> R) rethrows -> R {
        pthread_rwlock_wrlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }
}
