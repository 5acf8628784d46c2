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
