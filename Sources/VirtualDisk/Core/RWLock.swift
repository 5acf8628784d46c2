#if canImport(Glibc)
import Glibc
#endif

/// A reader-writer lock (pthread). Data I/O holds it shared; operations that free space
/// an in-flight request might still be using hold it exclusively.
final class RWLock: @unchecked Sendable {
    // Safe: the pthread_rwlock_t lives at a stable heap address for the object's life
    // and pthread makes it thread-safe.
    private let lock: UnsafeMutablePointer<pthread_rwlock_t>

    init() {
        lock = .allocate(capacity: 1)
        pthread_rwlock_init(lock, nil)
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

    /// As `shared`, but inside `NonBlocking.attempt` an exclusive holder (which may be
    /// doing I/O) is not waited for.
    func sharedLookup<R>(_ body: () throws -> R) throws -> R {
        try NonBlocking.acquire(trying: { pthread_rwlock_tryrdlock(lock) == 0 }, waiting: { pthread_rwlock_rdlock(lock) })
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }

    func exclusive<R>(_ body: () throws -> R) rethrows -> R {
        pthread_rwlock_wrlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }
}
