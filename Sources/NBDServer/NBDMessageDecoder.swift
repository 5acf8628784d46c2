import NIOCore

/// A transmission-phase request (proto.md "Request message").
///
///     C: 32 bits magic 0x25609513 | 16 flags | 16 type | 64 cookie | 64 offset | 32 length
///     C: length bytes of data, for NBD_CMD_WRITE only
public struct NBDRequest: Sendable, Equatable {
    public var flags: UInt16
    public var type: UInt16
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32
    /// The data of a write (a slice of the receive buffer, not a copy).
    public var payload: ByteBuffer?
    /// A write longer than `NBD.maxPayload`: its data was read and dropped, never
    /// buffered, and the request is to be failed.
    public var payloadDropped: Bool

    public init(flags: UInt16, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32,
                payload: ByteBuffer? = nil, payloadDropped: Bool = false) {
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.payload = payload
        self.payloadDropped = payloadDropped
    }

    public static let headerSize = 28
}

/// What a client sends, framed.
public enum NBDClientMessage: Sendable, Equatable {
    /// The 32-bit client flags that open the handshake.
    case clientFlags(UInt32)
    /// An option during haggling: its code and data (at most `NBD.maxOptionLength`).
    case option(code: UInt32, data: ByteBuffer)
    case request(NBDRequest)
}

/// Framing errors: the peer does not speak NBD (or is hostile). The connection ends.
public enum NBDDecodeError: Error, Equatable, CustomStringConvertible {
    case badMagic(UInt64)
    case optionTooLong(code: UInt32, length: UInt32)
    /// Bytes followed NBD_OPT_STARTTLS before the server's reply: plain text that
    /// would otherwise be taken as coming from inside TLS.
    case dataAfterStartTLS(Int)

    public var description: String {
        switch self {
        case .dataAfterStartTLS(let n): return "sent \(n) bytes after NBD_OPT_STARTTLS without waiting for the reply"
        case .badMagic(let m): return "not an NBD option or request (magic 0x\(String(m, radix: 16)))"
        case .optionTooLong(let code, let length): return "option \(code) is \(length) bytes, over the \(NBD.maxOptionLength)-byte limit"
        }
    }
}

/// Frames the client side of an NBD connection: the client flags, then options and
/// requests. Options and requests are told apart by their magic numbers, so the
/// decoder needs no word from the handler about which phase the connection is in;
/// the handler checks that each message fits its phase.
///
/// Memory is bounded whatever the client claims: option data is capped, and a write
/// longer than `NBD.maxPayload` is consumed and dropped as it arrives, not buffered.
public struct NBDMessageDecoder: ByteToMessageDecoder {
    public typealias InboundOut = NBDClientMessage

    enum State: Equatable {
        case clientFlags
        case messages
        /// Dropping the data of an oversized write; the request is emitted when it has all gone.
        case droppingPayload(NBDRequest, remaining: UInt32)
    }

    private(set) var state: State
    /// Whether the server answers NBD_OPT_STARTTLS by starting TLS, and whether the
    /// client has asked yet.
    let startTLSOffered: Bool
    private var startTLSSeen = false

    /// - Parameters:
    ///   - expectClientFlags: whether the stream starts with the 4-byte client flags
    ///     (a fresh connection) or directly with options and requests.
    ///   - startTLSOffered: the server starts TLS on NBD_OPT_STARTTLS. The client must
    ///     then wait for the reply before it sends anything (its TLS handshake); bytes
    ///     that came with the option in plain text are refused, since once the handler
    ///     has put TLS in front of this decoder they would pass as having come through it.
    public init(expectClientFlags: Bool = true, startTLSOffered: Bool = false) {
        state = expectClientFlags ? .clientFlags : .messages
        self.startTLSOffered = startTLSOffered
    }

    /// Take one message from the front of `buffer`, or nil if more bytes are needed.
    /// Pure: consumes only the bytes of the message it returns (or of a dropped payload).
    public mutating func next(_ buffer: inout ByteBuffer) throws -> NBDClientMessage? {
        switch state {
        case .clientFlags:
            guard let flags = buffer.readInteger(as: UInt32.self) else { return nil }
            state = .messages
            return .clientFlags(flags)

        case .droppingPayload(let request, let remaining):
            let n = min(UInt32(buffer.readableBytes), remaining)
            buffer.moveReaderIndex(forwardBy: Int(n))
            if n < remaining {
                state = .droppingPayload(request, remaining: remaining - n)
                return nil
            }
            state = .messages
            return .request(request)

        case .messages:
            guard let first = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return nil }
            if first == NBD.requestMagic {
                return try nextRequest(&buffer)
            }
            guard let magic = buffer.getInteger(at: buffer.readerIndex, as: UInt64.self) else {
                // Only a prefix of IHAVEOPT may be waiting for more bytes.
                if first == UInt32(truncatingIfNeeded: NBD.optionMagic >> 32) { return nil }
                throw NBDDecodeError.badMagic(UInt64(first))
            }
            guard magic == NBD.optionMagic else { throw NBDDecodeError.badMagic(magic) }
            return try nextOption(&buffer)
        }
    }

    private mutating func nextOption(_ buffer: inout ByteBuffer) throws -> NBDClientMessage? {
        // magic(8) option(4) length(4) data(length)
        let start = buffer.readerIndex
        guard let code = buffer.getInteger(at: start + 8, as: UInt32.self),
              let length = buffer.getInteger(at: start + 12, as: UInt32.self) else { return nil }
        if length > UInt32(NBD.maxOptionLength) {
            throw NBDDecodeError.optionTooLong(code: code, length: length)
        }
        guard buffer.readableBytes >= 16 + Int(length) else { return nil }
        buffer.moveReaderIndex(forwardBy: 16)
        let data = buffer.readSlice(length: Int(length))!
        if startTLSOffered && !startTLSSeen && code == NBD.optStartTLS && length == 0 {
            // The first valid STARTTLS is accepted; everything after it must arrive
            // through TLS, which the handler inserts when it sees this option.
            startTLSSeen = true
            if buffer.readableBytes > 0 { throw NBDDecodeError.dataAfterStartTLS(buffer.readableBytes) }
        }
        return .option(code: code, data: data)
    }

    private mutating func nextRequest(_ buffer: inout ByteBuffer) throws -> NBDClientMessage? {
        let start = buffer.readerIndex
        guard buffer.readableBytes >= NBDRequest.headerSize else { return nil }
        var request = NBDRequest(
            flags: buffer.getInteger(at: start + 4)!,
            type: buffer.getInteger(at: start + 6)!,
            cookie: buffer.getInteger(at: start + 8)!,
            offset: buffer.getInteger(at: start + 16)!,
            length: buffer.getInteger(at: start + 24)!)
        guard request.type == NBD.cmdWrite else {
            buffer.moveReaderIndex(forwardBy: NBDRequest.headerSize)
            return .request(request)
        }
        if request.length > UInt32(NBD.maxPayload) {
            buffer.moveReaderIndex(forwardBy: NBDRequest.headerSize)
            request.payloadDropped = true
            state = .droppingPayload(request, remaining: request.length)
            return try next(&buffer)
        }
        guard buffer.readableBytes >= NBDRequest.headerSize + Int(request.length) else { return nil }
        buffer.moveReaderIndex(forwardBy: NBDRequest.headerSize)
        request.payload = buffer.readSlice(length: Int(request.length))!
        return .request(request)
    }

    // MARK: ByteToMessageDecoder

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let message = try next(&buffer) else { return .needMoreData }
        context.fireChannelRead(Self.wrapInboundOut(message))
        return .continue
    }

    public mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        // A request cut short by a disconnect is dropped: there is no one to answer.
        while let message = try next(&buffer) {
            context.fireChannelRead(Self.wrapInboundOut(message))
        }
        return .needMoreData
    }
}
