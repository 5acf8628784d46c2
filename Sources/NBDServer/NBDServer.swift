import NIOCore
import NIOPosix
import Synchronization
import VirtualDisk
#if canImport(Glibc)
import Glibc
#endif

/// How and where a server listens, and the limits it keeps.
public struct NBDServerConfiguration: Sendable {
    public enum Address: Sendable, Equatable {
        case tcp(host: String, port: Int)
        case unix(path: String)
    }

    public var address: Address = .tcp(host: "127.0.0.1", port: 10809)
    /// Connections at once (qemu-nbd -e); more are refused as they arrive.
    public var maxConnections = 100
    /// A client that has not finished the handshake by then is disconnected.
    public var handshakeTimeout: Duration = .seconds(10)
    /// Requests one connection may have outstanding (decoded, not yet answered).
    public var maxRequestsInFlight = 64
    /// Pool threads one connection's requests may run on at once: its fair share. One
    /// runs them while they do not block; more join while they do (disk I/O, flushes),
    /// up to this many (see `NBDConnectionWork`).
    public var maxRunningPerConnection = 4
    /// Payload and read-buffer bytes one connection may hold before it stops reading
    /// (a request already read always runs, whatever its size).
    public var maxBytesInFlight = 64 << 20
    /// Write payload and read-buffer bytes all connections together may hold; past it,
    /// connections holding some stop reading until replies give memory back (see
    /// `NBDMemoryBudget` for the bound). Buffers kept for reuse are capped at it too.
    public var memoryLimit = 256 << 20
    /// With certificates, TLS is required of every client (FORCEDTLS); without, the
    /// server offers no TLS.
    public var tls: NBDTLSConfiguration?
    /// Threads doing image I/O, shared by all connections.
    public var ioThreads = 8
    /// Event loop threads: they only frame requests, copy write payloads and write replies.
    public var eventLoopThreads = min(System.coreCount, 4)
    /// Where to report client misbehaviour and connection events (nothing by default).
    public var log: @Sendable (String) -> Void = { _ in }

    public init() {}
}

/// What every connection of one server shares.
final class NBDServerCore: Sendable {
    let exports: NBDExportTable
    let configuration: NBDServerConfiguration
    let threadPool: NIOThreadPool
    let bufferPool: NBDBufferPool
    let budget: NBDMemoryBudget
    /// Open client channels, and whether the server still accepts new ones.
    private let connections = Mutex<(channels: [ObjectIdentifier: Channel], accepting: Bool)>(([:], true))

    init(exports: NBDExportTable, configuration: NBDServerConfiguration, threadPool: NIOThreadPool) {
        self.exports = exports
        self.configuration = configuration
        self.threadPool = threadPool
        self.budget = NBDMemoryBudget(limit: configuration.memoryLimit)
        self.bufferPool = NBDBufferPool(maxRetainedBytes: min(128 << 20, max(configuration.memoryLimit, 1 << 20)))
    }

    func log(_ message: String) { configuration.log(message) }

    /// Admit a new connection, or refuse it (server full or stopping).
    func register(_ channel: Channel) -> Bool {
        connections.withLock { state in
            guard state.accepting, state.channels.count < configuration.maxConnections else { return false }
            state.channels[ObjectIdentifier(channel)] = channel
            return true
        }
    }

    func unregister(_ channel: Channel) {
        _ = connections.withLock { $0.channels.removeValue(forKey: ObjectIdentifier(channel)) }
    }

    /// Stop admitting; the channels open now.
    func stopAccepting() -> [Channel] {
        connections.withLock { state in
            state.accepting = false
            return Array(state.channels.values)
        }
    }

    var connectionCount: Int { connections.withLock { $0.channels.count } }
}

public enum NBDServerError: Error, CustomStringConvertible {
    case tooManyConnections(Int)
    case notRunning

    public var description: String {
        switch self {
        case .tooManyConnections(let n): return "refused a connection: \(n) clients are connected (the -e limit)"
        case .notRunning: return "the server is not running"
        }
    }
}

/// An NBD server (fixed newstyle, structured replies, block status) for any `DiskImage`s.
///
/// The event loop frames requests and writes replies; image I/O runs on a bounded
/// thread pool. Every connection to an export shares its one `DiskImage`, so writes
/// are coherent across connections (NBD_FLAG_CAN_MULTI_CONN).
///
///     let server = try NBDServer(exports: [NBDExport(name: "disk", image: image)])
///     let address = try server.start()
///     …
///     try server.shutdown()   // drains clients; then flush and close the images
public final class NBDServer: Sendable {
    let core: NBDServerCore
    private let group: MultiThreadedEventLoopGroup
    private let state = Mutex<(listener: Channel?, stopped: Bool)>((nil, false))

    public init(exports: [NBDExport], configuration: NBDServerConfiguration = NBDServerConfiguration()) throws {
        let table = try NBDExportTable(exports)
        let threadPool = NIOThreadPool(numberOfThreads: max(1, configuration.ioThreads))
        self.core = NBDServerCore(exports: table, configuration: configuration, threadPool: threadPool)
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, configuration.eventLoopThreads))
    }

    /// Bind and start accepting. Returns the address bound (with the real port when
    /// port 0 was asked for).
    @discardableResult
    public func start() throws -> SocketAddress {
        core.threadPool.start()
        let core = self.core
        var bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 4096, initial: 65536, maximum: 256 << 10))
            .childChannelOption(.writeBufferWaterMark, value: .init(low: 256 << 10, high: 1 << 20))
        if case .tcp = core.configuration.address {
            bootstrap = bootstrap.childChannelOption(.socketOption(.tcp_nodelay), value: 1)
        }
        bootstrap = bootstrap.childChannelInitializer { channel in
            guard core.register(channel) else {
                core.log("refused a connection from \(channel.remoteAddress?.description ?? "?"): \(core.configuration.maxConnections) clients connected or the server is stopping")
                return channel.eventLoop.makeFailedFuture(NBDServerError.tooManyConnections(core.configuration.maxConnections))
            }
            channel.closeFuture.whenComplete { _ in core.unregister(channel) }
            return channel.eventLoop.makeCompletedFuture {
                let decoder = ByteToMessageHandler(NBDMessageDecoder(startTLSOffered: core.configuration.tls != nil),
                                                   maximumBufferSize: NBD.maxPayload + (2 << 20))
                try channel.pipeline.syncOperations.addHandlers(decoder, NBDConnectionHandler(core: core))
            }
        }
        let listener: Channel
        do {
            switch core.configuration.address {
            case .tcp(let host, let port):
                listener = try bootstrap.bind(host: host, port: port).wait()
            case .unix(let path):
                listener = try bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).wait()
            }
        } catch {
            try? core.threadPool.syncShutdownGracefully()
            try? group.syncShutdownGracefully()
            throw ImageError(.io, "cannot listen on \(Self.describe(core.configuration.address)): \(error)")
        }
        state.withLock { $0.listener = listener }
        return listener.localAddress!
    }

    static func describe(_ address: NBDServerConfiguration.Address) -> String {
        switch address {
        case .tcp(let host, let port): return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case .unix(let path): return path
        }
    }

    /// Clients connected now.
    public var connectionCount: Int { core.connectionCount }

    /// Stop listening, let every connection finish the requests it has running (failing
    /// those not started with NBD_ESHUTDOWN), close the connections, and stop the I/O
    /// threads. Images are flushed; closing them is the caller's. Waits at most
    /// `timeout` for clients, then closes them regardless.
    public func shutdown(timeout: TimeAmount = .seconds(30)) throws {
        let listener: Channel? = state.withLock { s in
            if s.stopped { return nil }
            s.stopped = true
            return s.listener
        }
        guard let listener else { return }
        try? listener.close().wait()
        let channels = core.stopAccepting()
        for c in channels {
            c.pipeline.fireUserInboundEventTriggered(NBDServerShutdownEvent())
        }
        let deadline = NIODeadline.now() + timeout
        for c in channels {
            let remaining = deadline - .now()
            let closed = c.eventLoop.makePromise(of: Void.self)
            c.closeFuture.cascade(to: closed)
            let timer = c.eventLoop.scheduleTask(in: max(remaining, .zero)) { c.close(promise: nil) }
            try? closed.futureResult.wait()
            timer.cancel()
        }
        if case .unix(let path) = core.configuration.address { unlink(path) }
        try core.threadPool.syncShutdownGracefully()
        var firstError: Error?
        for e in core.exports.exports where !e.readOnly {
            do { try e.image.flush() } catch { if firstError == nil { firstError = error } }
        }
        try group.syncShutdownGracefully()
        if let firstError { throw firstError }
    }
}
