import NIOCore
import VirtualDisk
#if canImport(Glibc)
import Glibc
#endif

/// An error to send back for one request.
public struct NBDReplyError: Error, Equatable, Sendable {
    public var code: UInt32
    public var message: String
    public init(_ code: UInt32, _ message: String) {
        self.code = code
        self.message = message
    }
}

/// Transmission-phase commands (proto.md "Request types") against a `DiskImage`.
///
/// `validate` is cheap and runs on the event loop; `execute` does the image I/O and
/// runs on a pool thread; `readInline` serves a read from memory on the event loop, or
/// declines. All produce the complete reply bytes, so the event loop only writes them.
public enum NBDCommands {
    /// Flags each command accepts. FUA is valid on every command (we advertise
    /// SEND_FUA) and is ignored where nothing is written.
    static func allowedFlags(_ type: UInt16, structured: Bool) -> UInt16? {
        switch type {
        case NBD.cmdRead: return NBD.cmdFlagFUA | (structured ? NBD.cmdFlagDF : 0)
        case NBD.cmdWrite, NBD.cmdFlush, NBD.cmdTrim, NBD.cmdCache: return NBD.cmdFlagFUA
        case NBD.cmdWriteZeroes: return NBD.cmdFlagFUA | NBD.cmdFlagNoHole | NBD.cmdFlagFastZero
        case NBD.cmdBlockStatus: return NBD.cmdFlagFUA | NBD.cmdFlagReqOne
        case NBD.cmdDisc: return 0xffff
        default: return nil
        }
    }

    /// Check a request against the session before any I/O. Returns the error to reply
    /// with, or nil if the request is to be executed.
    public static func validate(_ r: NBDRequest, session: NBDSession) -> NBDReplyError? {
        guard let allowed = allowedFlags(r.type, structured: session.structuredReplies) else {
            return NBDReplyError(NBD.EINVAL, "unknown command \(r.type)")
        }
        if r.flags & ~allowed != 0 {
            return NBDReplyError(NBD.EINVAL, "flags 0x\(String(r.flags, radix: 16)) are not valid for command \(r.type)")
        }
        let export = session.export
        let writes = r.type == NBD.cmdWrite || r.type == NBD.cmdTrim || r.type == NBD.cmdWriteZeroes
        if r.payloadDropped {
            return NBDReplyError(NBD.EINVAL, "a write of \(r.length) bytes is over the \(NBD.maxPayload)-byte maximum payload")
        }
        if writes && export.readOnly {
            return NBDReplyError(NBD.EPERM, "the export is read-only")
        }
        if r.type == NBD.cmdFlush || r.type == NBD.cmdDisc { return nil }
        let (end, overflow) = r.offset.addingReportingOverflow(UInt64(r.length))
        if overflow || end > export.size {
            let code = (r.type == NBD.cmdWrite || r.type == NBD.cmdWriteZeroes) ? NBD.ENOSPC : NBD.EINVAL
            return NBDReplyError(code, "request at \(r.offset)+\(r.length) is past the end of the export (\(export.size) bytes)")
        }
        switch r.type {
        case NBD.cmdRead where Int(r.length) > NBD.maxPayload:
            return NBDReplyError(session.structuredReplies ? NBD.EOVERFLOW : NBD.EINVAL,
                                 "a read of \(r.length) bytes is over the \(NBD.maxPayload)-byte maximum payload")
        case NBD.cmdTrim where !export.capabilities.contains(.discard):
            return NBDReplyError(NBD.EINVAL, "the image does not support discard")
        case NBD.cmdWriteZeroes where r.flags & NBD.cmdFlagFastZero != 0
                && !export.capabilities.contains(.efficientZero):
            // The fast failure the spec asks for when zeroing is no faster than writing.
            return NBDReplyError(NBD.ENOTSUP, "zeroing is not faster than writing on this image")
        case NBD.cmdBlockStatus:
            if !session.structuredReplies || session.metaContexts.isEmpty {
                return NBDReplyError(NBD.EINVAL, "block status needs structured replies and a metadata context (NBD_OPT_SET_META_CONTEXT)")
            }
            if r.length == 0 { return NBDReplyError(NBD.EINVAL, "block status of zero bytes") }
        default:
            break
        }
        return nil
    }

    /// The cost of a request for back-pressure: the bytes it holds while in flight.
    static func cost(_ r: NBDRequest) -> Int {
        switch r.type {
        case NBD.cmdRead, NBD.cmdWrite: return max(Int(min(r.length, UInt32(NBD.maxPayload))), 512)
        case NBD.cmdBlockStatus: return 8 * NBD.maxBlockStatusDescriptors * NBDMetaContext.allCases.count
        default: return 512
        }
    }

    /// The buffer a request allocates when it runs, taken from the server's memory
    /// budget before it starts: a read's reply (header and data), CACHE's one chunk.
    static func bufferCost(_ r: NBDRequest) -> Int {
        switch r.type {
        case NBD.cmdRead where r.length > 0: return NBDBufferPool.allocation(28 + Int(min(r.length, UInt32(NBD.maxPayload))))
        case NBD.cmdCache where r.length > 0: return cacheChunk
        default: return 0
        }
    }

    /// Reads up to this size are tried on the event loop (`readInline`); larger ones
    /// would hold up the loop's other connections while their bytes are copied.
    static let inlineReadLimit = 256 << 10
    /// Bytes one connection reads inline before it lets its event loop go round.
    static let inlineBytesPerTurn = 1 << 20

    static func mayReadInline(_ r: NBDRequest) -> Bool { r.type == NBD.cmdRead && r.length <= inlineReadLimit }

    /// A validated read served from memory without blocking (`NonBlocking`): from the
    /// page cache and the metadata cache, without waiting for a lock held over I/O. Nil
    /// when it would have had to wait: then it runs on the pool like any request.
    static func readInline(_ r: NBDRequest, session: NBDSession, pool: NBDBufferPool) -> ByteBuffer? {
        guard mayReadInline(r) else { return nil }
        do {
            return try NonBlocking.attempt { try read(r, session: session, pool: pool) }
        } catch {
            return errorReply(r, session: session, error: replyError(for: error, request: r))
        }
    }

    /// Run a validated request against the image. Blocking: call on a pool thread.
    static func execute(_ r: NBDRequest, session: NBDSession, pool: NBDBufferPool) -> ByteBuffer {
        let image = session.export.image
        do {
            switch r.type {
            case NBD.cmdRead:
                return try read(r, session: session, pool: pool)
            case NBD.cmdWrite:
                if let payload = r.payload {
                    defer { pool.recycle(payload) }
                    try payload.withUnsafeReadableBytes { try image.write($0, at: r.offset) }
                }
                if r.flags & NBD.cmdFlagFUA != 0 { try image.flush() }
            case NBD.cmdFlush:
                try image.flush()
            case NBD.cmdTrim:
                try inPieces(r) { try image.discard(at: $0, length: $1) }
                if r.flags & NBD.cmdFlagFUA != 0 { try image.flush() }
            case NBD.cmdWriteZeroes:
                let mayUnmap = r.flags & NBD.cmdFlagNoHole == 0
                try inPieces(r) { try image.writeZeroes(at: $0, length: $1, mayUnmap: mayUnmap) }
                if r.flags & NBD.cmdFlagFUA != 0 { try image.flush() }
            case NBD.cmdCache:
                try cache(r, image: image, pool: pool)
            case NBD.cmdBlockStatus:
                return try blockStatus(r, session: session)
            default:
                throw NBDReplyError(NBD.EINVAL, "unknown command \(r.type)")
            }
            return okReply(r, session: session)
        } catch {
            return errorReply(r, session: session, error: replyError(for: error, request: r))
        }
    }

    /// Zeroing and discarding hold the image exclusively (they may free clusters): a
    /// request for gigabytes is done 64 MiB at a time, at 64 MiB-aligned boundaries
    /// (whole clusters for every format), so other clients' I/O gets in between.
    static func inPieces(_ r: NBDRequest, _ body: (UInt64, UInt64) throws -> Void) throws {
        let piece: UInt64 = 64 << 20
        var at = r.offset
        let end = r.offset + UInt64(r.length)
        while at < end {
            let next = min(end, (at / piece + 1) * piece)
            try body(at, next - at)
            at = next
        }
    }

    // MARK: replies

    static func okReply(_ r: NBDRequest, session: NBDSession) -> ByteBuffer {
        var out = ByteBufferAllocator().buffer(capacity: 20)
        if session.structuredReplies && r.type == NBD.cmdRead {
            out.writeNBDNoneChunk(cookie: r.cookie)
        } else {
            // A simple reply is allowed for anything without a payload, even when
            // structured replies are negotiated.
            out.writeNBDSimpleReply(error: 0, cookie: r.cookie)
        }
        return out
    }

    public static func errorReply(_ r: NBDRequest, session: NBDSession, error: NBDReplyError) -> ByteBuffer {
        var out = ByteBufferAllocator().buffer(capacity: 32 + error.message.utf8.count)
        if session.structuredReplies {
            out.writeNBDErrorChunk(error: error.code, message: error.message, cookie: r.cookie)
        } else {
            out.writeNBDSimpleReply(error: error.code, cookie: r.cookie)
        }
        return out
    }

    /// The NBD error for an engine error. Messages leave out host paths: clients need
    /// not learn where the server keeps its images.
    static func replyError(for error: Error, request r: NBDRequest) -> NBDReplyError {
        if let e = error as? NBDReplyError { return e }
        guard let e = error as? ImageError else { return NBDReplyError(NBD.EIO, "\(error)") }
        let writing = r.type == NBD.cmdWrite || r.type == NBD.cmdWriteZeroes
        switch e.code {
        case .readOnly: return NBDReplyError(NBD.EPERM, e.message)
        case .outOfRange: return NBDReplyError(writing ? NBD.ENOSPC : NBD.EINVAL, e.message)
        case .unsupported, .invalidArgument: return NBDReplyError(NBD.EINVAL, e.message)
        default:
            switch e.errno {
            case ENOSPC, EDQUOT, EFBIG: return NBDReplyError(NBD.ENOSPC, e.message)
            case ENOMEM: return NBDReplyError(NBD.ENOMEM, e.message)
            default: return NBDReplyError(NBD.EIO, e.message)
            }
        }
    }

    // MARK: read

    /// A read into a pooled buffer with room for the reply header in front, so header
    /// and data go out as one buffer:
    ///
    ///     simple:      [16-byte reply header][data]
    ///     structured:  [20-byte chunk header][8-byte offset][data]
    ///
    /// With structured replies, a range that reads as zeroes throughout is answered
    /// with one NBD_REPLY_TYPE_OFFSET_HOLE chunk and no data. That is found from the
    /// bytes read (a scan that stops at the first non-zero byte), not from a lookup of
    /// the range beforehand: unallocated ranges cost no I/O to read anyway, and one
    /// lookup per request instead of two is what random reads feel.
    static func read(_ r: NBDRequest, session: NBDSession, pool: NBDBufferPool) throws -> ByteBuffer {
        let image = session.export.image
        let length = Int(r.length)
        if session.structuredReplies && length == 0 { return okReply(r, session: session) }
        let headerSize = session.structuredReplies ? 28 : 16
        var buffer = pool.take(capacity: headerSize + length)
        buffer.moveWriterIndex(forwardBy: headerSize)
        var zero = false
        do {
            try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { space in
                let data = UnsafeMutableRawBufferPointer(rebasing: space[0..<length])
                try image.read(into: data, at: r.offset)
                zero = session.structuredReplies && ZeroScan.isAllZero(UnsafeRawBufferPointer(data))
                return length
            }
        } catch {
            pool.recycle(buffer)
            throw error
        }
        if zero {
            pool.recycle(buffer)
            var out = ByteBufferAllocator().buffer(capacity: 32)
            out.writeNBDHoleChunk(offset: r.offset, length: r.length, cookie: r.cookie)
            return out
        }
        var header = ByteBufferAllocator().buffer(capacity: headerSize)
        if session.structuredReplies {
            header.writeNBDChunkHeader(flags: NBD.replyFlagDone, type: NBD.replyTypeOffsetData, cookie: r.cookie,
                                       length: UInt32(8 + length))
            header.writeInteger(r.offset)
        } else {
            header.writeNBDSimpleReply(error: 0, cookie: r.cookie)
        }
        buffer.setBuffer(header, at: 0)
        return buffer
    }

    /// NBD_CMD_CACHE: look the range up (bringing its metadata into the cache) and read
    /// it (bringing its data into the host's page cache), a megabyte at a time through
    /// one buffer. Advisory: at most the first `NBD.maxPayload` bytes are read.
    static let cacheChunk = 1 << 20

    static func cache(_ r: NBDRequest, image: DiskImage, pool: NBDBufferPool) throws {
        let length = UInt64(min(Int(r.length), NBD.maxPayload))
        guard length > 0 else { return }
        let extents = try image.extents(at: r.offset, length: length)
        let chunk = cacheChunk
        var buffer = pool.take(capacity: chunk)
        defer { pool.recycle(buffer) }
        for e in extents where e.isData {
            var at = e.offset
            while at < e.end {
                let n = Int(min(UInt64(chunk), e.end - at))
                try buffer.withUnsafeMutableWritableBytes { space in
                    try image.read(into: UnsafeMutableRawBufferPointer(rebasing: space[0..<n]), at: at)
                }
                at += UInt64(n)
            }
        }
    }

    // MARK: block status

    /// NBD_CMD_BLOCK_STATUS: one chunk per selected context, from the image's extents.
    ///
    ///     base:allocation        data → 0, zero → ZERO, unallocated → HOLE|ZERO
    ///     qemu:allocation-depth  unallocated → 0, else 1 + the layer's depth (1 = top)
    static func blockStatus(_ r: NBDRequest, session: NBDSession) throws -> ByteBuffer {
        let image = session.export.image
        // Look at no more than the descriptor limit can describe at one extent per
        // allocation unit, so the extent list stays small however fragmented the image.
        let unit = session.export.clusterSize > 0 ? max(session.export.clusterSize, 512) : 8192
        let (reach, overflow) = unit.multipliedReportingOverflow(by: UInt64(NBD.maxBlockStatusDescriptors))
        let span = min(UInt64(r.length), NBD.maxBlockStatusSpan, overflow ? .max : reach)
        let extents = try image.extents(at: r.offset, length: span)
        guard !extents.isEmpty else {
            throw NBDReplyError(NBD.EIO, "the image reported no extents for \(r.offset)+\(span)")
        }
        let reqOne = r.flags & NBD.cmdFlagReqOne != 0
        var chunks: [(NBDMetaContext, [(length: UInt32, flags: UInt32)])] = []
        var bytes = 0
        for ctx in session.metaContexts {
            let list = descriptors(extents, context: ctx, limit: reqOne ? 1 : NBD.maxBlockStatusDescriptors)
            chunks.append((ctx, list))
            bytes += 24 + 8 * list.count
        }
        var out = ByteBufferAllocator().buffer(capacity: bytes)
        for (i, (ctx, list)) in chunks.enumerated() {
            out.writeNBDBlockStatusChunk(context: ctx.rawValue, descriptors: list, final: i == chunks.count - 1, cookie: r.cookie)
        }
        return out
    }

    /// Status flags of one extent in a context.
    public static func flags(of e: Extent, in context: NBDMetaContext) -> UInt32 {
        switch context {
        case .baseAllocation:
            switch e.kind {
            case .data: return 0
            case .zero: return NBD.stateZero
            case .unallocated: return NBD.stateHole | NBD.stateZero
            }
        case .allocationDepth:
            if case .unallocated = e.kind { return 0 }
            return UInt32(e.depth + 1)
        }
    }

    /// Consecutive extents merged where their flags agree, at most `limit` descriptors.
    /// Extents are contiguous, in order, and each shorter than 2^32 (the span is capped).
    static func descriptors(_ extents: [Extent], context: NBDMetaContext, limit: Int) -> [(length: UInt32, flags: UInt32)] {
        var out: [(length: UInt64, flags: UInt32)] = []
        for e in extents where e.length > 0 {
            let f = flags(of: e, in: context)
            if let last = out.last, last.flags == f, last.length + e.length <= UInt64(UInt32.max) {
                out[out.count - 1].length += e.length
            } else {
                if out.count == limit { break }
                out.append((e.length, f))
            }
        }
        return out.map { (UInt32($0.length), $0.flags) }
    }
}
