import NIOCore
import NIOPosix
import NIOSSL

/// Sent down a connection's pipeline when the server stops.
struct NBDServerShutdownEvent {}

/// One client connection, on its event loop: runs the handshake, then answers reads
/// that memory can serve at once and hands other requests to the I/O pool, writing
/// replies as they complete (in any order, as the protocol allows).
///
/// Back-pressure: a request counts against the connection from the moment it is
/// decoded until its reply has been written. Past `maxRequestsInFlight` requests or
/// `maxBytesInFlight` bytes (write payloads, read buffers), or while the socket's send
/// buffer is full, the handler stops asking the channel to read, so a client that
/// floods requests or does not read its replies only slows itself; what was already
/// read when the limit was reached is bounded by one read.
///
/// Server-wide, write payloads and read buffers also count against the one
/// `NBDMemoryBudget` of the server: a write's payload from decoding, a read's buffer
/// from when it starts. While the budget is spent, a connection that holds part of it
/// stops reading and keeps its reads queued until a release wakes it.
///
/// TLS: after NBD_REP_ACK to NBD_OPT_STARTTLS has been written in plain text, a
/// NIOSSL server handler goes in at the front of the pipeline (ahead of the decoder)
/// and the handshake continues inside TLS.
///
/// Requests run through `NBDConnectionWork`: at most `maxRunningPerConnection` pool
/// tasks per connection drain its requests in order, and finished replies are written
/// in batches, so one busy client neither fills the pool's queue ahead of everyone
/// else nor costs a thread wake-up per request.
final class NBDConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = NBDClientMessage
    typealias OutboundIn = Never
    typealias OutboundOut = ByteBuffer

    enum Phase {
        case handshake(NBDNegotiation)
        case transmission(NBDSession)
        /// NBD_CMD_DISC, a shutdown, or a hard error: finish what is in flight, then close.
        case draining
        case closed
    }

    private let core: NBDServerCore
    private var phase: Phase
    private var context: ChannelHandlerContext?
    private var handshakeTimer: Scheduled<Void>?

    /// Decoded requests not yet handed to the pool (waiting for the server's memory
    /// budget), with what they hold of the connection's share (`cost`) and of the
    /// server's budget (`held`).
    private var queued = CircularBuffer<(request: NBDRequest, cost: Int, held: Int)>()
    /// Where requests go to run, from the transmission phase on.
    private var work: NBDConnectionWork?
    /// Requests decoded and not yet answered, and the bytes they hold.
    private var inFlightCount = 0
    private var inFlightBytes = 0
    /// Bytes this connection holds of the server's memory budget.
    private var heldBudget = 0
    /// Handed to the budget when this connection waits for it; runs `budgetReleased`
    /// on this connection's event loop.
    private var budgetWake: NBDMemoryBudget.Wake?
    /// A read() from the pipeline that we held back; passed on when there is room.
    private var readHeld = false
    /// The session that in-flight and pending requests run under (kept while draining).
    private var session: NBDSession?
    /// Between channelRead and channelReadComplete, which flushes what was written.
    private var inReadBatch = false
    /// Bytes read inline since this connection last let its event loop go round. After
    /// `NBDCommands.inlineBytesPerTurn` of them, the rest waits until the loop has
    /// served its other channels (`resumeNextTurn`), so they do not wait long behind
    /// this one's copying.
    private var inlineBytes = 0
    private var resumeScheduled = false

    init(core: NBDServerCore) {
        self.core = core
        self.phase = .handshake(NBDNegotiation(exports: core.exports, tlsRequired: core.configuration.tls != nil))
    }

    // MARK: lifecycle

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        let loop = context.eventLoop
        let bound = NIOLoopBound(self, eventLoop: loop)
        budgetWake = { loop.execute { bound.value.budgetReleased() } }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        stopWaitingForBudget()
        detachWork()
        self.context = nil
    }

    /// Drop the budget's reference to this connection (the wake closure holds it).
    private func stopWaitingForBudget() {
        core.budget.cancelWait(id: ObjectIdentifier(self))
        budgetWake = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        var greeting = context.channel.allocator.buffer(capacity: 18)
        greeting.writeNBDGreeting()
        context.writeAndFlush(wrapOutboundOut(greeting), promise: nil)
        let timeout = core.configuration.handshakeTimeout
        handshakeTimer = context.eventLoop.assumeIsolated().scheduleTask(in: TimeAmount(timeout)) { [self] in
            if case .handshake = phase {
                core.log("client \(peer): handshake not finished within \(timeout); closing")
                hardClose()
            }
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        handshakeTimer?.cancel()
        handshakeTimer = nil
        phase = .closed
        // Requests still on the pool finish on their own; their replies go nowhere.
        while let (_, cost, held) = queued.popFirst() { release(cost, held: held) }
        detachWork()
        stopWaitingForBudget()
        context.fireChannelInactive()
    }

    /// Requests not yet run are dropped, finished replies not yet written are
    /// discarded; what runs on finishes by itself (see `NBDConnectionWork.detach`).
    private func detachWork() {
        guard let work else { return }
        self.work = nil
        for job in work.detach() { release(job.cost, held: job.held) }
    }

    var peer: String {
        context?.channel.remoteAddress?.description ?? "(unknown)"
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        switch phase {
        case .draining, .closed:
            // A close is under way (waiting for a reply to go out or requests to
            // finish); what else the client sent is moot, and socket errors close the
            // channel by themselves.
            return
        case .handshake:
            if case NBDDecodeError.optionTooLong(let code, _) = error {
                core.log("client \(peer): \(error); closing")
                var out = context.channel.allocator.buffer(capacity: 128)
                out.writeNBDOptionError(option: code, type: NBD.repErrTooBig, message: "\(error)")
                phase = .draining
                context.writeAndFlush(wrapOutboundOut(out)).assumeIsolated().whenComplete { [self] _ in hardClose() }
                return
            }
        case .transmission:
            break
        }
        if let tlsError = error as? NIOSSLError {
            // A client that hangs up without close_notify is no news.
            if case .uncleanShutdown = tlsError {} else { core.log("client \(peer): TLS failed (\(tlsError)); closing") }
        } else if !(error is NIOCore.IOError) && !(error is ChannelError) {
            core.log("client \(peer): \(error); closing")
        }
        hardClose()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard event is NBDServerShutdownEvent else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        switch phase {
        case .handshake:
            hardClose()
        case .transmission:
            // Stop taking requests; fail those not started, finish those running
            // (proto.md: "the server SHOULD wait for inflight requests to be serviced").
            phase = .draining
            while let (r, cost, held) = queued.popFirst() {
                reply(NBDCommands.errorReply(r, session: session!, error: NBDReplyError(NBD.ESHUTDOWN, "the server is shutting down")),
                      cost: cost, held: held)
            }
            closeIfDrained()
        case .draining, .closed:
            break
        }
    }

    // MARK: reading

    func read(context: ChannelHandlerContext) {
        if shouldPauseReading {
            readHeld = true
        } else {
            context.read()
        }
    }

    private var shouldPauseReading: Bool {
        guard let context else { return true }
        switch phase {
        case .handshake:
            return !context.channel.isWritable
        case .transmission:
            if inFlightCount >= core.configuration.maxRequestsInFlight
                || inFlightBytes >= core.configuration.maxBytesInFlight || !context.channel.isWritable {
                return true
            }
            // A connection holding nothing reads on whatever the balance (one request
            // always runs); the others wait for a release when the budget is spent.
            guard heldBudget > 0, let budgetWake else { return false }
            return !core.budget.hasRoom(id: ObjectIdentifier(self), wake: budgetWake)
        case .draining, .closed:
            return true
        }
    }

    /// Another connection (or this one) gave memory back to the server's budget.
    private func budgetReleased() {
        guard context != nil else { return }
        startQueued()
        resumeReadingIfPossible()
    }

    private func resumeReadingIfPossible() {
        guard readHeld, !shouldPauseReading, let context else { return }
        readHeld = false
        context.read()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        resumeReadingIfPossible()
        context.fireChannelWritabilityChanged()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        inReadBatch = true
        let message = unwrapInboundIn(data)
        switch phase {
        case .handshake(var negotiation):
            let outcome: NBDNegotiation.Outcome
            var out = context.channel.allocator.buffer(capacity: 256)
            switch message {
            case .clientFlags(let flags):
                outcome = negotiation.receiveClientFlags(flags)
            case .option(let code, let payload):
                outcome = negotiation.receiveOption(code: code, data: payload, into: &out)
            case .request:
                outcome = .close(reason: "sent a request before the handshake finished")
            }
            if out.readableBytes > 0, outcome != .startTLS { context.write(wrapOutboundOut(out), promise: nil) }
            switch outcome {
            case .continue:
                phase = .handshake(negotiation)
            case .startTLS:
                phase = .handshake(negotiation)
                startTLS(context: context, ack: out)
                return
            case .close(let reason):
                core.log("client \(peer): \(reason)")
                phase = .draining
                context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(capacity: 0))).assumeIsolated().whenComplete { [self] _ in
                    hardClose()
                }
            case .transmission:
                handshakeTimer?.cancel()
                handshakeTimer = nil
                let s = negotiation.session!
                session = s
                let loop = context.eventLoop
                let bound = NIOLoopBound(self, eventLoop: loop)
                work = NBDConnectionWork(session: s, core: core, loop: loop) { loop.execute { bound.value.workDone() } }
                phase = .transmission(s)
                core.log("client \(peer): connected to export '\(s.export.name)'")
            }

        case .transmission(let session):
            guard case .request(let r) = message else {
                core.log("client \(peer): sent an option during the transmission phase")
                return hardClose()
            }
            receive(r, session: session)

        case .draining, .closed:
            // After NBD_CMD_DISC the client may send nothing; during shutdown nothing more is taken.
            break
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        inReadBatch = false
        context.flush()
        context.fireChannelReadComplete()
    }

    /// Send the plain-text NBD_REP_ACK, then put TLS in front of the decoder: the ACK
    /// is past the pipeline (in the socket's queue) before the TLS handler exists, and
    /// every later byte in either direction goes through it. The decoder has already
    /// refused any plain-text bytes that came with the option.
    private func startTLS(context: ChannelHandlerContext, ack: ByteBuffer) {
        guard let tls = core.configuration.tls else {
            return hardClose()
        }
        context.writeAndFlush(wrapOutboundOut(ack), promise: nil)
        do {
            try context.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls.context), position: .first)
        } catch {
            core.log("client \(peer): cannot start TLS: \(error); closing")
            hardClose()
        }
    }

    // MARK: requests

    private func receive(_ r: NBDRequest, session: NBDSession) {
        if r.type == NBD.cmdDisc {
            // Finish everything sent before the disconnect, then close (no reply).
            phase = .draining
            closeIfDrained()
            return
        }
        let cost = NBDCommands.cost(r)
        inFlightCount += 1
        inFlightBytes += cost
        if let error = NBDCommands.validate(r, session: session) {
            reply(NBDCommands.errorReply(r, session: session, error: error), cost: cost, held: 0)
            return
        }
        var r = r
        var held = 0
        if let payload = r.payload {
            // Already in memory, so charged whatever the balance; reading stops
            // (`shouldPauseReading`) while the budget is spent.
            held = payload.readableBytes
            core.budget.charge(held)
            heldBudget += held
            // The payload is a slice of the receive buffer; holding it would pin that
            // whole buffer (which may have grown to the largest write seen) for as long
            // as the request is queued or running. A pooled copy of exactly its size
            // keeps the accounting honest.
            r.payload = core.bufferPool.copy(of: payload)
        }
        queued.append((r, cost, held))
        startQueued()
    }

    /// Hand queued requests over to run, as far as the server's memory budget allows.
    /// A read that memory can serve is answered here and now (`readInline`): no thread
    /// hand-over either way.
    private func startQueued() {
        guard let work, let session else { return }
        var answered = false
        while let next = queued.first {
            if inlineBytes >= NBDCommands.inlineBytesPerTurn && NBDCommands.mayReadInline(next.request) {
                resumeNextTurn()
                break
            }
            // A read's buffer is allocated when it runs: take it from the budget first,
            // or wait (in order) for a release.
            let buffer = NBDCommands.bufferCost(next.request)
            if buffer > 0 {
                guard let budgetWake, core.budget.acquire(buffer, holdsNothing: heldBudget == 0, id: ObjectIdentifier(self), wake: budgetWake) else {
                    break
                }
                heldBudget += buffer
            }
            let (r, cost, earlier) = queued.removeFirst()
            if let bytes = NBDCommands.readInline(r, session: session, pool: core.bufferPool) {
                inlineBytes += Int(r.length)
                reply(bytes, cost: cost, held: earlier + buffer, recycle: true, flush: false)
                answered = true
                continue
            }
            work.submit(.init(request: r, cost: cost, held: earlier + buffer))
        }
        if answered && !inReadBatch { context?.flush() }
    }

    /// Go on with `queued` once the loop has served its other channels.
    private func resumeNextTurn() {
        guard !resumeScheduled, let context else { return }
        resumeScheduled = true
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        context.eventLoop.execute {
            let handler = bound.value
            handler.resumeScheduled = false
            handler.inlineBytes = 0
            handler.startQueued()
        }
    }

    /// Replies have finished on the pool: write them all, then flush once.
    private func workDone() {
        guard let work, let session else { return }
        for done in work.takeDone() {
            let r = done.job.request
            if let bytes = done.reply {
                reply(bytes, cost: done.job.cost, held: done.job.held, recycle: r.type == NBD.cmdRead, flush: false)
            } else {
                // The pool stopped before running it: only during shutdown.
                reply(NBDCommands.errorReply(r, session: session, error: NBDReplyError(NBD.ESHUTDOWN, "the server is shutting down")),
                      cost: done.job.cost, held: done.job.held, flush: false)
            }
        }
        context?.flush()
    }

    /// Write a reply; when it has gone out (or failed to), release what the request held.
    private func reply(_ bytes: ByteBuffer, cost: Int, held: Int, recycle: Bool = false, flush: Bool = true) {
        guard let context, context.channel.isActive else {
            release(cost, held: held)
            return
        }
        let pool = core.bufferPool
        let written = context.write(wrapOutboundOut(bytes))
        if flush { context.flush() }
        written.assumeIsolated().whenComplete { [self] _ in
            if recycle { pool.recycle(bytes) }
            release(cost, held: held)
        }
    }

    private func release(_ cost: Int, held: Int) {
        inFlightCount -= 1
        inFlightBytes -= cost
        if held > 0 {
            heldBudget -= held
            core.budget.release(held)
        }
        switch phase {
        case .transmission:
            resumeReadingIfPossible()
        case .draining:
            closeIfDrained()
        default:
            break
        }
    }

    private func closeIfDrained() {
        if case .draining = phase, inFlightCount == 0 {
            hardClose()
        }
    }

    private func hardClose() {
        guard let context else { return }
        switch phase {
        case .closed: return
        default: break
        }
        phase = .draining
        context.close(promise: nil)
    }
}
