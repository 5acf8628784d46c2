import Foundation
import NIOCore
import NIOEmbedded
import NIOTestUtils
import Testing
@testable import NBDServer
@testable import VirtualDisk

/// Client bytes, built by hand from the spec's layouts.
enum ClientBytes {
    static func option(_ code: UInt32, _ data: [UInt8]) -> [UInt8] {
        nbd64(NBD.optionMagic) + nbd32(code) + nbd32(UInt32(data.count)) + data
    }
    static func request(type: UInt16, flags: UInt16 = 0, cookie: UInt64, offset: UInt64, length: UInt32, payload: [UInt8] = []) -> [UInt8] {
        nbd32(NBD.requestMagic) + nbd16(flags) + nbd16(type) + nbd64(cookie) + nbd64(offset) + nbd32(length) + payload
    }
    static func infoRequest(name: String, infos: [UInt16] = []) -> [UInt8] {
        nbd32(UInt32(name.utf8.count)) + Array(name.utf8) + nbd16(UInt16(infos.count)) + infos.flatMap(nbd16)
    }
    static func metaRequest(name: String, queries: [String]) -> [UInt8] {
        nbd32(UInt32(name.utf8.count)) + Array(name.utf8) + nbd32(UInt32(queries.count))
            + queries.flatMap { nbd32(UInt32($0.utf8.count)) + Array($0.utf8) }
    }
}

func byteBuffer(_ bytes: [UInt8]) -> ByteBuffer { ByteBuffer(bytes: bytes) }

/// Option replies parsed back out of what the server wrote.
func optionReplies(_ out: ByteBuffer) -> [(option: UInt32, type: UInt32, data: [UInt8])] {
    var b = out
    var replies: [(UInt32, UInt32, [UInt8])] = []
    while b.readableBytes >= 20 {
        let magic = b.readInteger(as: UInt64.self)!
        #expect(magic == NBD.optionReplyMagic)
        let option = b.readInteger(as: UInt32.self)!
        let type = b.readInteger(as: UInt32.self)!
        let length = Int(b.readInteger(as: UInt32.self)!)
        replies.append((option, type, b.readBytes(length: length) ?? []))
    }
    #expect(b.readableBytes == 0, "trailing bytes after option replies")
    return replies
}

/// A sparse raw image of `size` bytes in `dir`, opened read-write.
func scratchImage(_ dir: TempDir, _ name: String = "disk.raw", size: UInt64 = 4 << 20) throws -> DiskImage {
    let path = dir.file(name)
    _ = FileManager.default.createFile(atPath: path, contents: nil)
    let h = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
    try h.truncate(atOffset: size)
    try h.close()
    return try openRW(path, format: .raw)
}

@Suite("NBD framing, encoding and negotiation")
struct NBDCodecTests {
    // MARK: decoder

    static let sampleMessages: [(ByteBuffer, [NBDClientMessage])] = {
        let payload = (0..<1000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        let write = ClientBytes.request(type: NBD.cmdWrite, flags: NBD.cmdFlagFUA, cookie: 2, offset: 4096, length: 1000, payload: payload)
        return [
            (byteBuffer(ClientBytes.option(NBD.optGo, ClientBytes.infoRequest(name: "disk", infos: [3]))),
             [.option(code: NBD.optGo, data: byteBuffer(ClientBytes.infoRequest(name: "disk", infos: [3])))]),
            (byteBuffer(ClientBytes.option(NBD.optList, [])), [.option(code: NBD.optList, data: ByteBuffer())]),
            (byteBuffer(ClientBytes.request(type: NBD.cmdRead, cookie: 1, offset: 512, length: 65536)),
             [.request(NBDRequest(flags: 0, type: NBD.cmdRead, cookie: 1, offset: 512, length: 65536))]),
            (byteBuffer(write),
             [.request(NBDRequest(flags: NBD.cmdFlagFUA, type: NBD.cmdWrite, cookie: 2, offset: 4096, length: 1000, payload: byteBuffer(payload)))]),
            (byteBuffer(ClientBytes.request(type: NBD.cmdWrite, cookie: 3, offset: 0, length: 0)),
             [.request(NBDRequest(flags: 0, type: NBD.cmdWrite, cookie: 3, offset: 0, length: 0, payload: ByteBuffer()))]),
            (byteBuffer(ClientBytes.request(type: NBD.cmdDisc, cookie: 4, offset: 0, length: 0)),
             [.request(NBDRequest(flags: 0, type: NBD.cmdDisc, cookie: 4, offset: 0, length: 0))]),
        ]
    }()

    @Test("options and requests decode whether drip-fed, coalesced or one by one (ByteToMessageDecoderVerifier)")
    func verifier() throws {
        try ByteToMessageDecoderVerifier.verifyDecoder(inputOutputPairs: Self.sampleMessages) {
            NBDMessageDecoder(expectClientFlags: false)
        }
    }

    /// A whole client session as one byte stream.
    static let session: [UInt8] = nbd32(NBD.clientFlagFixedNewstyle | NBD.clientFlagNoZeroes)
        + ClientBytes.option(NBD.optStructuredReply, [])
        + ClientBytes.option(NBD.optSetMetaContext, ClientBytes.metaRequest(name: "disk", queries: ["base:allocation"]))
        + ClientBytes.option(NBD.optGo, ClientBytes.infoRequest(name: "disk"))
        + ClientBytes.request(type: NBD.cmdWrite, cookie: 7, offset: 0, length: 3, payload: [1, 2, 3])
        + ClientBytes.request(type: NBD.cmdBlockStatus, cookie: 8, offset: 0, length: 1 << 20)
        + ClientBytes.request(type: NBD.cmdDisc, cookie: 9, offset: 0, length: 0)

    func decodeThroughChannel(_ chunks: [[UInt8]]) throws -> [NBDClientMessage] {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(NBDMessageDecoder()))
        var out: [NBDClientMessage] = []
        for c in chunks {
            try channel.writeInbound(byteBuffer(c))
            while let m = try channel.readInbound(as: NBDClientMessage.self) { out.append(m) }
        }
        _ = try channel.finish()
        return out
    }

    @Test("a whole session decodes the same byte by byte, in odd chunks and coalesced")
    func wholeSession() throws {
        let bytes = Self.session
        let coalesced = try decodeThroughChannel([bytes])
        let dripped = try decodeThroughChannel(bytes.map { [$0] })
        var rng = SplitMix(state: 42)
        var odd: [[UInt8]] = []
        var i = 0
        while i < bytes.count {
            let n = Int.random(in: 1...37, using: &rng)
            odd.append(Array(bytes[i..<min(bytes.count, i + n)]))
            i += n
        }
        let chunked = try decodeThroughChannel(odd)
        #expect(coalesced.count == 7)
        #expect(coalesced == dripped)
        #expect(coalesced == chunked)
        guard coalesced.count == 7 else { return }
        #expect(coalesced[0] == .clientFlags(3))
        if case .request(let w) = coalesced[4] {
            #expect(w.type == NBD.cmdWrite && w.cookie == 7 && w.payload == byteBuffer([1, 2, 3]))
        } else {
            Issue.record("fifth message is not the write")
        }
    }

    @Test("garbage after the client flags is a framing error, not a crash")
    func garbage() throws {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(NBDMessageDecoder()))
        #expect(throws: NBDDecodeError.self) {
            try channel.writeInbound(byteBuffer(nbd32(1) + Array("GET / HTTP/1.1\r\n".utf8)))
        }
        _ = try? channel.finish()
        // Random bytes: whatever they are, decoding ends in an error or waits; it never traps.
        var rng = SplitMix(state: 7)
        for _ in 0..<200 {
            var decoder = NBDMessageDecoder()
            var b = byteBuffer((0..<Int.random(in: 0...300, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) })
            do { while try decoder.next(&b) != nil {} } catch {}
        }
    }

    @Test("an option longer than the cap fails at its header, before its data is buffered")
    func optionCap() throws {
        var decoder = NBDMessageDecoder(expectClientFlags: false)
        var b = byteBuffer(nbd64(NBD.optionMagic) + nbd32(NBD.optGo) + nbd32(1 << 30))
        #expect(throws: NBDDecodeError.optionTooLong(code: NBD.optGo, length: 1 << 30)) { try decoder.next(&b) }
        // Right at the cap is fine.
        var ok = NBDMessageDecoder(expectClientFlags: false)
        let data = [UInt8](repeating: 0x41, count: NBD.maxOptionLength)
        var c = byteBuffer(ClientBytes.option(99, data))
        #expect(try ok.next(&c) == .option(code: 99, data: byteBuffer(data)))
    }

    @Test("a write over the payload cap is consumed as it arrives and reported, never buffered")
    func oversizedWriteDropped() throws {
        var decoder = NBDMessageDecoder(expectClientFlags: false)
        let length = UInt32(NBD.maxPayload + 4096)
        var b = byteBuffer(ClientBytes.request(type: NBD.cmdWrite, cookie: 5, offset: 0, length: length))
        #expect(try decoder.next(&b) == nil)
        let chunk = [UInt8](repeating: 0xee, count: 1 << 20)
        var sent = 0
        var result: NBDClientMessage?
        while result == nil {
            let n = min(chunk.count, Int(length) - sent)
            var c = byteBuffer(Array(chunk[0..<n]) + (sent + n == Int(length) ? ClientBytes.request(type: NBD.cmdFlush, cookie: 6, offset: 0, length: 0) : []))
            sent += n
            result = try decoder.next(&c)
            if result == nil {
                #expect(c.readableBytes == 0, "payload bytes were kept")
            } else {
                // The next request follows, intact.
                #expect(try decoder.next(&c) == .request(NBDRequest(flags: 0, type: NBD.cmdFlush, cookie: 6, offset: 0, length: 0)))
            }
        }
        #expect(sent == Int(length))
        #expect(result == .request(NBDRequest(flags: 0, type: NBD.cmdWrite, cookie: 5, offset: 0, length: length, payloadDropped: true)))
    }

    // MARK: encoder

    @Test("server messages have the spec's layouts")
    func encoding() {
        var g = ByteBuffer()
        g.writeNBDGreeting()
        #expect(g.readableBytesView.elementsEqual(nbd64(0x4e42_444d_4147_4943) + nbd64(0x4948_4156_454f_5054) + nbd16(3)))
        var s = ByteBuffer()
        s.writeNBDSimpleReply(error: 22, cookie: 0x0102_0304_0506_0708)
        #expect(s.readableBytesView.elementsEqual(nbd32(0x6744_6698) + nbd32(22) + nbd64(0x0102_0304_0506_0708)))
        var e = ByteBuffer()
        e.writeNBDErrorChunk(error: 5, message: "bad", cookie: 9)
        #expect(e.readableBytesView.elementsEqual(nbd32(0x668e_33ef) + nbd16(1) + nbd16(0x8001) + nbd64(9) + nbd32(9) + nbd32(5) + nbd16(3) + Array("bad".utf8)))
        var h = ByteBuffer()
        h.writeNBDHoleChunk(offset: 4096, length: 512, cookie: 1)
        #expect(h.readableBytesView.elementsEqual(nbd32(0x668e_33ef) + nbd16(1) + nbd16(2) + nbd64(1) + nbd32(12) + nbd64(4096) + nbd32(512)))
        var bs = ByteBuffer()
        bs.writeNBDBlockStatusChunk(context: 1, descriptors: [(4096, 0), (8192, 3)], final: false, cookie: 2)
        #expect(bs.readableBytesView.elementsEqual(nbd32(0x668e_33ef) + nbd16(0) + nbd16(5) + nbd64(2) + nbd32(20) + nbd32(1) + nbd32(4096) + nbd32(0) + nbd32(8192) + nbd32(3)))
        var x = ByteBuffer()
        x.writeNBDExportNameReply(size: 1 << 20, flags: 1, noZeroes: false)
        #expect(x.readableBytes == 8 + 2 + 124)
        // Messages are capped at the protocol's string limit.
        var long = ByteBuffer()
        long.writeNBDErrorChunk(error: 5, message: String(repeating: "x", count: 10000), cookie: 1)
        #expect(long.readableBytes == 20 + 6 + NBD.maxStringLength)
    }

    // MARK: negotiation

    func table(_ dir: TempDir, readOnlySecond: Bool = false) throws -> NBDExportTable {
        try NBDExportTable([
            NBDExport(name: "disk", image: try scratchImage(dir, "a.raw", size: 4 << 20), description: "first"),
            NBDExport(name: "other", image: try scratchImage(dir, "b.raw", size: 1 << 20), readOnly: readOnlySecond),
        ])
    }

    @Test("client flags: known bits accepted, unknown bits end the session")
    func clientFlags() throws {
        let dir = TempDir()
        var n = NBDNegotiation(exports: try table(dir))
        #expect(n.receiveClientFlags(3) == .continue)
        var m = NBDNegotiation(exports: try table(dir))
        if case .close = m.receiveClientFlags(1 << 5) {} else { Issue.record("unknown client flag accepted") }
    }

    @Test("LIST names every export; INFO and GO describe one; unknown names are errors")
    func listInfoGo() throws {
        let dir = TempDir()
        let exports = try table(dir, readOnlySecond: true)
        var n = NBDNegotiation(exports: exports)
        _ = n.receiveClientFlags(3)
        var out = ByteBuffer()
        #expect(n.receiveOption(code: NBD.optList, data: ByteBuffer(), into: &out) == .continue)
        let list = optionReplies(out)
        #expect(list.last?.type == NBD.repAck)
        let names = list.filter { $0.type == NBD.repServer }.map { r in
            String(decoding: r.data[4..<(4 + Int(nbdBE32(r.data, 0)))], as: UTF8.self)
        }
        #expect(names == ["disk", "other"])

        out.clear()
        #expect(n.receiveOption(code: NBD.optList, data: byteBuffer([1]), into: &out) == .continue)
        #expect(optionReplies(out).map(\.type) == [NBD.repErrInvalid])

        out.clear()
        #expect(n.receiveOption(code: NBD.optInfo, data: byteBuffer(ClientBytes.infoRequest(name: "nope")), into: &out) == .continue)
        #expect(optionReplies(out).map(\.type) == [NBD.repErrUnknown])

        out.clear()
        var bad = ClientBytes.infoRequest(name: "disk")
        bad[3] = 200  // name length past the end of the option
        #expect(n.receiveOption(code: NBD.optInfo, data: byteBuffer(bad), into: &out) == .continue)
        #expect(optionReplies(out).map(\.type) == [NBD.repErrInvalid])

        out.clear()
        #expect(n.receiveOption(code: NBD.optInfo, data: byteBuffer(ClientBytes.infoRequest(name: "other", infos: [NBD.infoName, NBD.infoBlockSize])), into: &out) == .continue)
        let info = optionReplies(out)
        #expect(info.last?.type == NBD.repAck)
        let export = try #require(info.first { $0.type == NBD.repInfo && nbdBE16($0.data, 0) == NBD.infoExport })
        #expect(nbdBE64(export.data, 2) == 1 << 20)
        let flags = nbdBE16(export.data, 10)
        #expect(flags & NBD.flagReadOnly != 0 && flags & NBD.flagSendTrim == 0 && flags & NBD.flagHasFlags != 0)
        let block = try #require(info.first { $0.type == NBD.repInfo && nbdBE16($0.data, 0) == NBD.infoBlockSize })
        #expect(nbdBE32(block.data, 2) == 1 && nbdBE32(block.data, 6) == 4096 && nbdBE32(block.data, 10) == UInt32(NBD.maxPayload))
        #expect(info.contains { $0.type == NBD.repInfo && nbdBE16($0.data, 0) == NBD.infoName && Array($0.data[2...]) == Array("other".utf8) })

        // The empty name is the default export, the first one.
        out.clear()
        #expect(n.receiveOption(code: NBD.optGo, data: byteBuffer(ClientBytes.infoRequest(name: "")), into: &out) == .transmission)
        #expect(n.session?.export.name == "disk")
        #expect(n.session!.transmissionFlags & NBD.flagReadOnly == 0)
        #expect(n.session!.transmissionFlags & NBD.flagCanMultiConn != 0)
    }

    @Test("structured replies and metadata contexts")
    func metaContexts() throws {
        let dir = TempDir()
        var n = NBDNegotiation(exports: try table(dir))
        _ = n.receiveClientFlags(1)
        var out = ByteBuffer()
        let set = byteBuffer(ClientBytes.metaRequest(name: "disk", queries: ["base:allocation", "qemu:allocation-depth", "x-nope:thing", "base:nope"]))
        // Before structured replies: refused.
        _ = n.receiveOption(code: NBD.optSetMetaContext, data: set, into: &out)
        #expect(optionReplies(out).map(\.type) == [NBD.repErrInvalid])

        out.clear()
        _ = n.receiveOption(code: NBD.optStructuredReply, data: ByteBuffer(), into: &out)
        _ = n.receiveOption(code: NBD.optStructuredReply, data: ByteBuffer(), into: &out)
        #expect(optionReplies(out).map(\.type) == [NBD.repAck, NBD.repErrInvalid])

        out.clear()
        _ = n.receiveOption(code: NBD.optListMetaContext, data: byteBuffer(ClientBytes.metaRequest(name: "disk", queries: [])), into: &out)
        var r = optionReplies(out)
        #expect(Set(r.filter { $0.type == NBD.repMetaContext }.map { String(decoding: $0.data[4...], as: UTF8.self) })
                == ["base:allocation", "qemu:allocation-depth"])
        #expect(r.filter { $0.type == NBD.repMetaContext }.allSatisfy { nbdBE32($0.data, 0) == 0 })

        out.clear()
        _ = n.receiveOption(code: NBD.optListMetaContext, data: byteBuffer(ClientBytes.metaRequest(name: "disk", queries: ["qemu:"])), into: &out)
        r = optionReplies(out)
        #expect(r.map(\.type) == [NBD.repMetaContext, NBD.repAck])
        #expect(String(decoding: r[0].data[4...], as: UTF8.self) == "qemu:allocation-depth")

        out.clear()
        _ = n.receiveOption(code: NBD.optSetMetaContext, data: set, into: &out)
        r = optionReplies(out)
        #expect(r.map(\.type) == [NBD.repMetaContext, NBD.repMetaContext, NBD.repAck])
        #expect(Set(r.dropLast().map { nbdBE32($0.data, 0) }).count == 2)
        #expect(n.metaContexts == [.baseAllocation, .allocationDepth])

        // A query count that does not match the data is malformed, and clears the selection.
        out.clear()
        var broken = ClientBytes.metaRequest(name: "disk", queries: ["base:allocation"])
        broken[11] = 5
        _ = n.receiveOption(code: NBD.optSetMetaContext, data: byteBuffer(broken), into: &out)
        #expect(optionReplies(out).map(\.type) == [NBD.repErrInvalid])
        #expect(n.metaContexts.isEmpty)

        // Contexts chosen for one export do not carry over to another.
        out.clear()
        _ = n.receiveOption(code: NBD.optSetMetaContext, data: set, into: &out)
        #expect(n.receiveOption(code: NBD.optGo, data: byteBuffer(ClientBytes.infoRequest(name: "other")), into: &out) == .transmission)
        #expect(n.session!.metaContexts.isEmpty && n.session!.structuredReplies)
    }

    @Test("unknown options, TLS, EXPORT_NAME and ABORT")
    func otherOptions() throws {
        let dir = TempDir()
        var n = NBDNegotiation(exports: try table(dir))
        _ = n.receiveClientFlags(1)
        var out = ByteBuffer()
        _ = n.receiveOption(code: 4711, data: byteBuffer([1, 2, 3]), into: &out)
        _ = n.receiveOption(code: NBD.optStartTLS, data: ByteBuffer(), into: &out)
        #expect(optionReplies(out).map(\.type) == [NBD.repErrUnsup, NBD.repErrPolicy])

        out.clear()
        if case .close = n.receiveOption(code: NBD.optExportName, data: byteBuffer(Array("nope".utf8)), into: &out) {} else {
            Issue.record("EXPORT_NAME of an unknown export did not close")
        }
        out.clear()
        #expect(n.receiveOption(code: NBD.optExportName, data: byteBuffer(Array("other".utf8)), into: &out) == .transmission)
        // Without NO_ZEROES: size, flags and 124 zeroes.
        #expect(out.readableBytes == 134)
        #expect(out.getInteger(at: 0, as: UInt64.self) == 1 << 20)

        var m = NBDNegotiation(exports: try table(dir))
        _ = m.receiveClientFlags(3)
        out.clear()
        #expect(m.receiveOption(code: NBD.optExportName, data: ByteBuffer(), into: &out) == .transmission)
        #expect(out.readableBytes == 10)

        var a = NBDNegotiation(exports: try table(dir))
        out.clear()
        if case .close = a.receiveOption(code: NBD.optAbort, data: ByteBuffer(), into: &out) {} else { Issue.record("ABORT did not close") }
        #expect(optionReplies(out).map(\.type) == [NBD.repAck])
    }

    // MARK: commands

    func session(_ image: DiskImage, readOnly: Bool = false, structured: Bool = true,
                 contexts: [NBDMetaContext] = [.baseAllocation, .allocationDepth]) -> NBDSession {
        NBDSession(export: NBDExport(name: "disk", image: image, readOnly: readOnly), structuredReplies: structured, metaContexts: contexts)
    }

    @Test("requests are checked before any I/O")
    func validation() throws {
        let dir = TempDir()
        let image = try scratchImage(dir)
        defer { try? image.close() }
        let size = image.info.virtualSize
        let s = session(image)
        func check(_ r: NBDRequest, _ s: NBDSession) -> UInt32? { NBDCommands.validate(r, session: s)?.code }
        #expect(check(NBDRequest(flags: 0, type: NBD.cmdRead, cookie: 1, offset: 0, length: 4096), s) == nil)
        #expect(check(NBDRequest(flags: 0, type: NBD.cmdRead, cookie: 1, offset: size - 1, length: 2), s) == NBD.EINVAL)
        #expect(check(NBDRequest(flags: 0, type: NBD.cmdRead, cookie: 1, offset: .max, length: 2), s) == NBD.EINVAL)
        #expect(check(NBDRequest(flags: 0, type: NBD.cmdWrite, cookie: 1, offset: size, length: 1, payload: byteBuffer([0])), s) == NBD.ENOSPC)
        #expect(check(NBDRequest(flags: 0, type: NBD.cmdRead, cookie: 1, offset: 0, length: UInt32(NBD.maxPayload) + 1), s) == NBD.EOVERFLOW
                || size < UInt64(NBD.maxPayload) + 1)
        #expect(check(NBDRequest(flags: NBD.cmdFlagNoHole, type: NBD.cmdRead, cookie: 1, offset: 0, length: 1), s) == NBD.EINVAL)
        #expect(check(NBDRequest(flags: NBD.cmdFlagDF, type: NBD.cmdRead, cookie: 1, offset: 0, length: 1), session(image, structured: false)) == NBD.EINVAL)
        #expect(check(NBDRequest(flags: 0, type: 42, cookie: 1, offset: 0, length: 0), s) == NBD.EINVAL)
        #expect(check(NBDRequest(flags: 0, type: NBD.cmdWrite, cookie: 1, offset: 0, length: 1, payload: byteBuffer([0])), session(image, readOnly: true)) == NBD.EPERM)
        #expect(check(NBDRequest(flags: 0, type: NBD.cmdTrim, cookie: 1, offset: 0, length: 1), session(image, readOnly: true)) == NBD.EPERM)
        #expect(check(NBDRequest(flags: 0, type: NBD.cmdWrite, cookie: 1, offset: 0, length: 1 << 30, payloadDropped: true), s) == NBD.EINVAL)
        #expect(check(NBDRequest(flags: 0, type: NBD.cmdBlockStatus, cookie: 1, offset: 0, length: 4096), session(image, contexts: [])) == NBD.EINVAL)
        #expect(check(NBDRequest(flags: 0, type: NBD.cmdBlockStatus, cookie: 1, offset: 0, length: 0), s) == NBD.EINVAL)
        #expect(check(NBDRequest(flags: NBD.cmdFlagReqOne, type: NBD.cmdBlockStatus, cookie: 1, offset: 0, length: 4096), s) == nil)
        #expect(check(NBDRequest(flags: NBD.cmdFlagFastZero | NBD.cmdFlagNoHole, type: NBD.cmdWriteZeroes, cookie: 1, offset: 0, length: 4096), s) == nil)
    }

    @Test("the buffer pool hands a recycled buffer out again, the same memory, not a copy")
    func poolReusesBuffers() throws {
        let pool = NBDBufferPool(maxRetainedBytes: 1 << 20, maxBuffers: 4)
        func address(_ b: ByteBuffer) -> UInt { b.withVeryUnsafeBytes { UInt(bitPattern: $0.baseAddress) } }
        var first = pool.take(capacity: 28 + 4096)
        first.writeBytes([1, 2, 3])
        let at = address(first)
        pool.recycle(first)
        first = ByteBuffer()
        // The pool's reference moves to the caller: clearing it for reuse must not copy.
        let again = pool.take(capacity: 28 + 4096)
        #expect(address(again) == at, "the pool allocated a new buffer instead of reusing its free one")
        #expect(again.readableBytes == 0 && again.capacity >= 28 + 4096)
        #expect(pool.retainedBytes == 0)
        // A different size class is not served from it.
        pool.recycle(again)
        let big = pool.take(capacity: 28 + 65536)
        #expect(address(big) != at && big.capacity >= 28 + 65536 && pool.retainedBytes > 0)
    }

    @Test("read, write, zero and block status against a real image produce the spec's replies")
    func execution() throws {
        let dir = TempDir()
        let image = try scratchImage(dir)
        defer { try? image.close() }
        let pool = NBDBufferPool()
        let s = session(image)
        let data = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 1) }
        func run(_ r: NBDRequest, _ s: NBDSession) -> ByteBuffer { NBDCommands.execute(r, session: s, pool: pool) }

        var w = run(NBDRequest(flags: NBD.cmdFlagFUA, type: NBD.cmdWrite, cookie: 11, offset: 65536, length: 8192, payload: byteBuffer(data)), s)
        #expect(w.readBytes(length: 16) == nbd32(NBD.simpleReplyMagic) + nbd32(0) + nbd64(11))

        // Structured read of data: one OFFSET_DATA chunk, done.
        var r = run(NBDRequest(flags: 0, type: NBD.cmdRead, cookie: 12, offset: 65536, length: 8192), s)
        #expect(r.readBytes(length: 20) == nbd32(NBD.structuredReplyMagic) + nbd16(NBD.replyFlagDone) + nbd16(NBD.replyTypeOffsetData) + nbd64(12) + nbd32(8 + 8192))
        #expect(r.readInteger(as: UInt64.self) == 65536)
        #expect(r.readBytes(length: r.readableBytes) == data)
        pool.recycle(r)

        // Structured read of a hole: one OFFSET_HOLE chunk, no data.
        var h = run(NBDRequest(flags: 0, type: NBD.cmdRead, cookie: 13, offset: 1 << 20, length: 65536), s)
        #expect(h.readBytes(length: 20) == nbd32(NBD.structuredReplyMagic) + nbd16(NBD.replyFlagDone) + nbd16(NBD.replyTypeOffsetHole) + nbd64(13) + nbd32(12))
        #expect(h.readInteger(as: UInt64.self) == 1 << 20 && h.readInteger(as: UInt32.self) == 65536)

        // Simple read: header then data, in one buffer (reusing the recycled one).
        var sr = run(NBDRequest(flags: 0, type: NBD.cmdRead, cookie: 14, offset: 65536 + 100, length: 1000), session(image, structured: false))
        #expect(sr.readBytes(length: 16) == nbd32(NBD.simpleReplyMagic) + nbd32(0) + nbd64(14))
        #expect(sr.readBytes(length: sr.readableBytes) == Array(data[100..<1100]))

        // Zero part of the data, then block status: data, zero, rest.
        var z = run(NBDRequest(flags: NBD.cmdFlagNoHole, type: NBD.cmdWriteZeroes, cookie: 15, offset: 65536 + 4096, length: 4096), s)
        #expect(z.readBytes(length: 16) == nbd32(NBD.simpleReplyMagic) + nbd32(0) + nbd64(15))
        #expect(try image.read(at: 65536 + 4096, count: 4096).allSatisfy { $0 == 0 })

        let expected = try image.extents(at: 0, length: 1 << 20)
        var bs = run(NBDRequest(flags: 0, type: NBD.cmdBlockStatus, cookie: 16, offset: 0, length: 1 << 20), s)
        for (i, ctx) in [NBDMetaContext.baseAllocation, .allocationDepth].enumerated() {
            let header = bs.readBytes(length: 20)!
            #expect(nbdBE16(header, 4) == (i == 1 ? NBD.replyFlagDone : 0) && nbdBE16(header, 6) == NBD.replyTypeBlockStatus)
            let count = (Int(nbdBE32(header, 16)) - 4) / 8
            #expect(bs.readInteger(as: UInt32.self) == ctx.rawValue)
            var got: [(UInt64, UInt32)] = []
            for _ in 0..<count { got.append((UInt64(bs.readInteger(as: UInt32.self)!), bs.readInteger(as: UInt32.self)!)) }
            let want = NBDCommands.descriptors(expected, context: ctx, limit: .max)
            #expect(got.map(\.0) == want.map { UInt64($0.length) } && got.map(\.1) == want.map(\.flags))
            #expect(got.reduce(0) { $0 + $1.0 } == 1 << 20)
        }

        // Errors: a structured error chunk with a message, or a simple reply with the code.
        var e = NBDCommands.errorReply(NBDRequest(flags: 0, type: NBD.cmdRead, cookie: 17, offset: 0, length: 1), session: s,
                                       error: NBDReplyError(NBD.EIO, "boom"))
        #expect(e.readBytes(length: 20) == nbd32(NBD.structuredReplyMagic) + nbd16(NBD.replyFlagDone) + nbd16(NBD.replyTypeError) + nbd64(17) + nbd32(10))
        #expect(e.readInteger(as: UInt32.self) == NBD.EIO)
    }

    @Test("block-status descriptors merge equal neighbours and respect the limit")
    func descriptors() {
        let extents = [
            Extent(offset: 0, length: 4096, kind: .data(hostOffset: 0)),
            Extent(offset: 4096, length: 4096, kind: .data(hostOffset: 99999)),
            Extent(offset: 8192, length: 8192, kind: .zero, depth: 1),
            Extent(offset: 16384, length: 4096, kind: .unallocated, depth: 1),
            Extent(offset: 20480, length: 4096, kind: .data(hostOffset: nil), depth: 1),
        ]
        let base = NBDCommands.descriptors(extents, context: .baseAllocation, limit: .max)
        #expect(base.map(\.length) == [8192, 8192, 4096, 4096])
        #expect(base.map(\.flags) == [0, NBD.stateZero, NBD.stateHole | NBD.stateZero, 0])
        let depth = NBDCommands.descriptors(extents, context: .allocationDepth, limit: .max)
        #expect(depth.map(\.length) == [8192, 8192, 4096, 4096])
        #expect(depth.map(\.flags) == [1, 2, 0, 2])
        let one = NBDCommands.descriptors(extents, context: .baseAllocation, limit: 1)
        #expect(one.count == 1 && one[0].length == 8192)
    }

    @Test("long zero and trim requests are split at aligned 64 MiB boundaries")
    func pieces() throws {
        var got: [(UInt64, UInt64)] = []
        try NBDCommands.inPieces(NBDRequest(flags: 0, type: NBD.cmdTrim, cookie: 0, offset: 60 << 20, length: 200 << 20)) { got.append(($0, $1)) }
        // 60 MiB + 200 MiB ends at 260 MiB.
        let mib: UInt64 = 1 << 20
        let starts: [UInt64] = [60, 64, 128, 192, 256].map { $0 * mib }
        let lengths: [UInt64] = [4, 64, 64, 64, 4].map { $0 * mib }
        #expect(got.map(\.0) == starts)
        #expect(got.map(\.1) == lengths)
        got = []
        try NBDCommands.inPieces(NBDRequest(flags: 0, type: NBD.cmdTrim, cookie: 0, offset: 5, length: 10)) { got.append(($0, $1)) }
        #expect(got.count == 1 && got[0] == (5, 10))
    }
}
