import ArgumentParser
import NBDServer
import VirtualDisk
#if canImport(Glibc)
import Glibc
#endif

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve images over NBD (as qemu-nbd does) until interrupted.",
        discussion: """
            Each image is an export named by its file name (or by -x, with one image); the \
            first image is also the default export (the empty name). Clients connect with \
            nbd://ADDR:PORT/NAME, or nbd+unix:///NAME?socket=SOCKET with -k. The server stays \
            up for any number of successive and concurrent clients; SIGINT or SIGTERM lets \
            running requests finish, then flushes and closes the images.

            With --tls-cert and --tls-key every client must upgrade to TLS (NBD_OPT_STARTTLS) \
            before anything else: nbds://ADDR:PORT/NAME with libnbd, a tls-creds-x509 object \
            with qemu. With --tls-ca as well, clients must present a certificate signed by \
            that CA. Without certificates, TLS is refused.
            """)
    @Option(name: [.short, .customLong("format")], help: "Image format (probed when omitted).") var f: String?
    @Option(name: [.short, .customLong("bind")], help: "Address to listen on.") var b: String = "127.0.0.1"
    @Option(name: [.short, .customLong("port")], help: "TCP port to listen on (0: any free port).") var p: Int = 10809
    @Option(name: [.short, .customLong("socket")], help: "Listen on this Unix socket instead of TCP.") var k: String?
    @Option(name: [.short, .customLong("export-name")], help: "Export name (one image only; default: the file name).") var x: String?
    @Option(name: [.customShort("D"), .customLong("description")], help: "Export description shown to clients.") var description: String?
    @Flag(name: [.short, .customLong("read-only")], help: "Export read-only.") var r = false
    @Option(name: [.short, .customLong("shared")], help: "Most clients connected at once.") var e: Int = 100
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "With -r: serve even if another process writes the image.") var forceShare = false
    @Option(name: .customLong("handshake-limit"), help: "Seconds a client has to finish the handshake.") var handshakeLimit: Int = 10
    @Option(name: .customLong("memory-limit"), help: "Write payloads and read buffers all clients together may hold (e.g. 256M); past it, clients wait.") var memoryLimit: String = "256M"
    @Option(name: .customLong("tls-cert"), help: "PEM certificate of the server: clients must then use TLS.") var tlsCert: String?
    @Option(name: .customLong("tls-key"), help: "PEM private key of --tls-cert (unencrypted).") var tlsKey: String?
    @Option(name: .customLong("tls-ca"), help: "PEM CA certificate(s): clients must present a certificate it signed.") var tlsCA: String?
    @Option(name: .customLong("pid-file"), help: "Write the server's pid here once it listens (removed on exit).") var pidFile: String?
    @Flag(name: [.short, .customLong("persistent")], help: "Accepted as qemu-nbd takes it; vloop serve always stays up for more clients.") var t = false
    @Flag(name: [.short, .customLong("verbose")], help: "Report connections and misbehaving clients on stderr.") var v = false
    @OptionGroup var common: CommonOptions
    @Argument(help: "Images to export.") var images: [String]

    func validate() throws {
        if images.isEmpty { throw ValidationError("name at least one image") }
        if x != nil && images.count > 1 { throw ValidationError("-x names one export; with several images each is named by its file name") }
        if !(0...65535).contains(p) { throw ValidationError("port \(p) is not between 0 and 65535") }
        if e < 1 { throw ValidationError("-e must be at least 1") }
        if handshakeLimit < 1 { throw ValidationError("--handshake-limit must be at least 1 second") }
        if forceShare && !r { throw ValidationError("--force-share needs --read-only") }
        if (tlsCert == nil) != (tlsKey == nil) { throw ValidationError("--tls-cert and --tls-key go together: give both, or neither to serve without TLS") }
        if tlsCA != nil && tlsCert == nil { throw ValidationError("--tls-ca checks client certificates over TLS: give --tls-cert and --tls-key as well") }
        guard let limit = try? SizeParser.parse(memoryLimit), limit >= 1 << 20, limit <= UInt64(Int.max) else {
            throw ValidationError("--memory-limit \(memoryLimit) is not a size of at least 1M (e.g. 64M, 1G)")
        }
    }

    func run() throws {
        try Vloop.guarded {
            try common.apply()
            // Signals are taken synchronously by this thread; the server's threads,
            // started later, inherit the mask and never see them.
            var signals = sigset_t()
            sigemptyset(&signals)
            sigaddset(&signals, SIGINT)
            sigaddset(&signals, SIGTERM)
            pthread_sigmask(SIG_BLOCK, &signals, nil)
            signal(SIGPIPE, SIG_IGN)

            // Certificates are checked before any image is opened or port bound.
            var tls: NBDTLSConfiguration?
            if let tlsCert, let tlsKey {
                tls = try NBDTLSConfiguration(certificateFile: tlsCert, keyFile: tlsKey, caFile: tlsCA)
            }

            var opened: [DiskImage] = []
            var exports: [NBDExport] = []
            do {
                for path in images {
                    let image = try openImage(path, format: f, writable: !r, forceShare: forceShare)
                    opened.append(image)
                    exports.append(NBDExport(name: x ?? exportName(path), image: image, readOnly: r, description: description))
                }
            } catch {
                for image in opened { try? image.close() }
                throw error
            }

            var config = NBDServerConfiguration()
            config.address = k.map { .unix(path: $0) } ?? .tcp(host: b, port: p)
            config.maxConnections = e
            config.handshakeTimeout = .seconds(Int64(handshakeLimit))
            config.memoryLimit = Int(try SizeParser.parse(memoryLimit))
            config.tls = tls
            if v { config.log = { printError("vloop serve: \($0)") } }
            let server: NBDServer
            do {
                server = try NBDServer(exports: exports, configuration: config)
                let address = try server.start()
                if v {
                    let mode = tls.map { $0.verifiesClients ? ", TLS with client certificates" : ", TLS" } ?? ""
                    printError("vloop serve: listening on \(address)\(mode) (\(exports.map(\.name).joined(separator: ", ")))")
                }
                if let pidFile { try writePidFile(pidFile) }
            } catch {
                for image in opened { try? image.close() }
                throw error
            }

            var sig: Int32 = 0
            sigwait(&signals, &sig)
            if v { printError("vloop serve: signal \(sig): finishing requests and closing the images") }
            var failure: Error?
            do { try server.shutdown() } catch { failure = error }
            for image in opened {
                do { try closeImage(image) } catch { if failure == nil { failure = error } }
            }
            if let pidFile { unlink(pidFile) }
            if let failure { throw failure }
        }
    }

    /// The export name of an image: its file name.
    func exportName(_ path: String) -> String {
        let trimmed = path.hasSuffix("/") ? String(path.dropLast()) : path
        return trimmed.split(separator: "/").last.map(String.init) ?? trimmed
    }

    func writePidFile(_ path: String) throws {
        let text = "\(getpid())\n"
        let tmp = path + ".tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else { throw ImageError(.io, "cannot write the pid file", path: path, errno: errno) }
        _ = text.withCString { write(fd, $0, strlen($0)) }
        close(fd)
        // Renamed into place so that whoever waits for it never reads it half written.
        guard rename(tmp, path) == 0 else { throw ImageError(.io, "cannot write the pid file", path: path, errno: errno) }
    }
}
