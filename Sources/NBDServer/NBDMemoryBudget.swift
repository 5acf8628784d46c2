import Synchronization

/// One byte budget shared by every connection of a server: write payloads held and
/// read buffers allocated count against it from the moment they exist until their
/// reply has been written.
///
/// Nothing is ever refused: memory a connection already holds (a write payload it has
/// received) is charged whatever the balance, and a connection that finds the budget
/// spent stops reading its socket, or keeps a read queued, until others release. A
/// holder is told to look again through the `wake` it registered with `acquire` or
/// `hasRoom` — every waiter on each release, since each wants a different amount.
///
/// A connection that holds nothing may always take one request, so one request larger
/// than the whole budget still runs, and a client that stops reading its replies can
/// slow the others but never lock them out. The budget can therefore be exceeded by
/// at most one request (and one socket read) per connection.
final class NBDMemoryBudget: Sendable {
    /// Called (on any thread) when bytes have been released.
    typealias Wake = @Sendable () -> Void

    private struct State {
        var used = 0
        var peak = 0
        var waiters: [ObjectIdentifier: Wake] = [:]
    }

    let limit: Int
    private let state = Mutex(State())

    init(limit: Int) {
        self.limit = max(1, limit)
    }

    /// Bytes held now.
    var used: Int { state.withLock { $0.used } }
    /// The most ever held at once.
    var peak: Int { state.withLock { $0.peak } }
    /// Holders waiting for a release.
    var waiterCount: Int { state.withLock { $0.waiters.count } }

    /// Charge memory that is already in use (a received payload). Always succeeds.
    func charge(_ bytes: Int) {
        state.withLock { s in
            s.used += bytes
            s.peak = max(s.peak, s.used)
        }
    }

    /// Take `bytes` for a new buffer if they fit, or if the caller holds nothing
    /// (`holdsNothing`: one request always runs). Otherwise register `wake` under `id`
    /// and return false: `wake` is called after the next release.
    func acquire(_ bytes: Int, holdsNothing: Bool, id: ObjectIdentifier, wake: @escaping Wake) -> Bool {
        state.withLock { s in
            if s.used + bytes <= limit || holdsNothing {
                s.used += bytes
                s.peak = max(s.peak, s.used)
                return true
            }
            s.waiters[id] = wake
            return false
        }
    }

    /// Whether the budget has room left; if not, register `wake` under `id` for the
    /// next release.
    func hasRoom(id: ObjectIdentifier, wake: @escaping Wake) -> Bool {
        state.withLock { s in
            if s.used < limit { return true }
            s.waiters[id] = wake
            return false
        }
    }

    /// Give bytes back and wake every waiter.
    func release(_ bytes: Int) {
        guard bytes > 0 else { return }
        let woken: [Wake] = state.withLock { s in
            assert(s.used >= bytes, "memory budget released more than was taken")
            s.used = max(0, s.used - bytes)
            guard !s.waiters.isEmpty else { return [] }
            let all = Array(s.waiters.values)
            s.waiters.removeAll(keepingCapacity: true)
            return all
        }
        for wake in woken { wake() }
    }

    /// Forget a waiter (its connection has closed).
    func cancelWait(id: ObjectIdentifier) {
        _ = state.withLock { $0.waiters.removeValue(forKey: id) }
    }
}
