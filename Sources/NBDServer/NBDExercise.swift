import NIOCore
import VirtualDisk
#if canImport(Glibc)
import Glibc
#endif

/// Drives the server's side of a connection over untrusted bytes, as a connection would:
/// the decoder frames them (fed in pieces of a size the input chooses), the handshake
/// takes the client flags and options, and in the transmission phase each request is
/// validated and run against small real images. Replies are built and dropped. Used by
/// the fuzz target and by the regression tests that replay what it found.
public enum NBDExercise {
    /// - Parameter scratchDirectory: where the exported images are made (fresh each run).
    public static func run(_ bytes: [UInt8], scratchDirectory: String) {
        guard let exports = try? makeExports(scratchDirectory) else { return }
        defer { for e in exports.exports { try? e.image.close() } }
        let pool = NBDBufferPool(maxRetainedBytes: 1 << 20, maxBuffers: 4)
        var decoder = NBDMessageDecoder()
        var negotiation = NBDNegotiation(exports: exports)
        var session: NBDSession?
        var buffer = ByteBufferAllocator().buffer(capacity: bytes.count)
        let piece = bytes.isEmpty ? 1 : Int(bytes[0] % 32) + 1
        var fed = min(1, bytes.count)
        var messages = 0
        // Returns false when the connection would end.
        func handle(_ m: NBDClientMessage) -> Bool {
            messages += 1
            var out = ByteBufferAllocator().buffer(capacity: 256)
            if let s = session {
                guard case .request(let r) = m, r.type != NBD.cmdDisc else { return false }
                if let error = NBDCommands.validate(r, session: s) {
                    _ = NBDCommands.errorReply(r, session: s, error: error)
                } else {
                    var r = r
                    if let payload = r.payload { r.payload = pool.copy(of: payload) }
                    pool.recycle(NBDCommands.execute(r, session: s, pool: pool))
                }
                return messages < 2000
            }
            let outcome: NBDNegotiation.Outcome
            switch m {
            case .clientFlags(let flags): outcome = negotiation.receiveClientFlags(flags)
            case .option(let code, let data): outcome = negotiation.receiveOption(code: code, data: data, into: &out)
            case .request: return false
            }
            switch outcome {
            case .continue: return messages < 2000
            case .close: return false
            // Only offered when certificates are configured, which this harness never does.
            case .startTLS: return false
            case .transmission:
                session = negotiation.session
                return true
            }
        }
        while fed < bytes.count {
            let n = min(piece, bytes.count - fed)
            buffer.writeBytes(bytes[fed..<(fed + n)])
            fed += n
            do {
                while let m = try decoder.next(&buffer) {
                    if !handle(m) { return }
                }
            } catch {
                return
            }
        }
    }

    static func makeExports(_ dir: String) throws -> NBDExportTable {
        func make(_ name: String, _ format: ImageFormat, _ size: UInt64) throws -> DiskImage {
            let path = dir + "/" + name
            unlink(path)
            try CreateOperation.run(CreateRequest(path: path, format: format, size: size))
            var o = OpenOptions(format: format, writable: true)
            o.userNamed = [path]
            return try ImageOpener.open(path, options: o)
        }
        return try NBDExportTable([
            NBDExport(name: "disk", image: try make("nbd-disk.raw", .raw, 1 << 20)),
            NBDExport(name: "q", image: try make("nbd-q.qcow2", .qcow2, 1 << 20)),
            NBDExport(name: "ro", image: try make("nbd-ro.raw", .raw, 65536 + 512), readOnly: true),
        ])
    }
}
