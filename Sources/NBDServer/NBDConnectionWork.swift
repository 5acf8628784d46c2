import NIOCore
import NIOPosix
import Synchronization
import CVloop

/// One connection's requests on their way between its event loop and the I/O pool.
///
/// The event loop hands over requests (`submit`); a pool task (a drainer) takes them in
/// order and runs them one after another, without going back to the pool's queue for
/// each. Finished replies collect in `done`, and the event loop is woken once for
/// however many have collected (`takeDone`), so under load it writes and flushes them
/// together. Per request there is then no thread wake-up on either side, only the
/// work's lock taken three times (submit, take, finish).
///
/// One drainer is fastest while requests are served from memory (the page cache, the
/// metadata cache): more would only take turns on the cores. Another drainer starts,
/// up to `maxDrainers`, while requests wait and the running ones block: when a request
/// slept (a disk read, a lock) as it ran (checked on every `sampleEvery`th request
/// run while others wait: the check costs two system calls), or when no request has finished for
/// `stuckAfter` (a flush on a slow disk, a long read), which a watch on the event loop
/// checks for as long as requests wait. So a disk sees the connection's requests in
/// parallel and one slow request does not hold up the rest. Drainers end when the
/// queue is empty.
///
/// Fairness: a drainer that has run `turn` requests goes to the back of the pool's
/// queue, so a busy connection shares the pool with the others.
///
/// Once the connection is gone (`detach`), replies have nowhere to go: what finishes
/// later gives its memory back to the server's budget at once.
final class NBDConnectionWork: Sendable {
    struct Job: Sendable {
        let request: NBDRequest
        /// What the request counts against its connection (`NBDCommands.cost`).
        let cost: Int
        /// Bytes it holds of the server's memory budget.
        let held: Int
    }

    struct Done: Sendable {
        let job: Job
        /// Nil when the pool stopped before running it (server shutdown).
        let reply: ByteBuffer?
    }

    private struct State {
        var pending = CircularBuffer<Job>()
        var done: [Done] = []
        var drainers = 0
        /// The event loop has been woken for `done` and has not taken it yet.
        var wakeScheduled = false
        /// Runs on the event loop to take `done`; nil once detached.
        var wake: (@Sendable () -> Void)?
        /// Requests run so far (the watch's sign of progress).
        var completed: UInt64 = 0
        /// A watch is scheduled.
        var watching = false
    }

    private let state: Mutex<State>
    private let session: NBDSession
    private let pool: NIOThreadPool
    private let buffers: NBDBufferPool
    private let budget: NBDMemoryBudget
    private let maxDrainers: Int
    private let turn = 32
    private let sampleEvery = 4
    private let loop: EventLoop
    private let stuckAfter = TimeAmount.milliseconds(2)

    init(session: NBDSession, core: NBDServerCore, loop: EventLoop, wake: @escaping @Sendable () -> Void) {
        self.state = Mutex(State(wake: wake))
        self.loop = loop
        self.session = session
        self.pool = core.threadPool
        self.buffers = core.bufferPool
        self.budget = core.budget
        self.maxDrainers = max(1, core.configuration.maxRunningPerConnection)
    }

    /// Queue a request to run (event loop).
    func submit(_ job: Job) {
        let (start, watchFrom) = state.withLock { s -> (Bool, UInt64?) in
            s.pending.append(job)
            if s.drainers == 0 {
                s.drainers = 1
                return (true, nil)
            }
            // Requests wait behind busy drainers: see that they make progress.
            guard !s.watching, s.drainers < maxDrainers else { return (false, nil) }
            s.watching = true
            return (false, s.completed)
        }
        if start { startDrainer() }
        if let watchFrom { watch(since: watchFrom) }
    }

    /// In `stuckAfter`: if requests still wait and none has finished since `seen`, the
    /// drainers are stuck in slow requests; start another. Watches on while any wait.
    private func watch(since seen: UInt64) {
        loop.scheduleTask(in: stuckAfter) { [self] in
            let (start, next) = state.withLock { s -> (Bool, UInt64?) in
                // Nothing waits, or no more drainers may start: stop watching.
                guard !s.pending.isEmpty, s.wake != nil, s.drainers < maxDrainers else {
                    s.watching = false
                    return (false, nil)
                }
                if s.completed == seen {
                    s.drainers += 1
                    return (true, s.completed)
                }
                return (false, s.completed)
            }
            if start { startDrainer() }
            if let next { watch(since: next) }
        }
    }

    /// Replies finished since the last call (event loop, when woken).
    func takeDone() -> [Done] {
        state.withLock { s in
            s.wakeScheduled = false
            let done = s.done
            s.done = []
            return done
        }
    }

    /// The connection is gone: requests not started never will be; what is finished,
    /// or finishes later, only gives back its memory. Returns the jobs it dropped, for
    /// the caller to release.
    func detach() -> [Job] {
        let (dropped, replies) = state.withLock { s in
            s.wake = nil
            var dropped = s.done.map(\.job)
            let replies = s.done.compactMap { $0.job.request.type == NBD.cmdRead ? $0.reply : nil }
            s.done = []
            while let j = s.pending.popFirst() { dropped.append(j) }
            return (dropped, replies)
        }
        for r in replies { buffers.recycle(r) }
        return dropped
    }

    /// The request just run blocked while others waited: another drainer, if allowed.
    private func grow() {
        let start = state.withLock { s -> Bool in
            guard s.drainers < maxDrainers, !s.pending.isEmpty else { return false }
            s.drainers += 1
            return true
        }
        if start { startDrainer() }
    }

    /// Put a drainer (already counted in `drainers`) on the pool.
    private func startDrainer() {
        pool.submit { self.drain($0) }
    }

    private func drain(_ itemState: NIOThreadPool.WorkItemState) {
        var ran = 0
        while true {
            let next: (job: Job, mayGrow: Bool)? = state.withLock { s in
                guard let j = s.pending.popFirst() else {
                    s.drainers -= 1
                    return nil
                }
                return (j, !s.pending.isEmpty && s.drainers < maxDrainers)
            }
            guard let (job, mayGrow) = next else { return }
            let sample = mayGrow && ran % sampleEvery == 0
            let reply: ByteBuffer?
            if case .active = itemState {
                let switches = sample ? vl_thread_voluntary_switches() : 0
                reply = NBDCommands.execute(job.request, session: session, pool: buffers)
                if sample, vl_thread_voluntary_switches() != switches { grow() }
            } else {
                reply = nil
            }
            enum Outcome { case queued, wake(@Sendable () -> Void), detached }
            let outcome: Outcome = state.withLock { s in
                s.completed &+= 1
                guard let wake = s.wake else { return .detached }
                s.done.append(Done(job: job, reply: reply))
                if s.wakeScheduled { return .queued }
                s.wakeScheduled = true
                return .wake(wake)
            }
            switch outcome {
            case .queued:
                break
            case .wake(let wake):
                wake()
            case .detached:
                if let reply, job.request.type == NBD.cmdRead { buffers.recycle(reply) }
                if job.held > 0 { budget.release(job.held) }
            }
            ran += 1
            if ran == turn, case .active = itemState {
                // Let other connections' work in; this drainer stays counted.
                startDrainer()
                return
            }
        }
    }
}

