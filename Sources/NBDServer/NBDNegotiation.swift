import NIOCore

/// What a connection agreed on during the handshake; fixed for the transmission phase.
public struct NBDSession: Sendable {
    public let export: NBDExport
    public let structuredReplies: Bool
    /// Contexts selected by NBD_OPT_SET_META_CONTEXT for this export (empty: no block status).
    public let metaContexts: [NBDMetaContext]
    public let transmissionFlags: UInt16

    public init(export: NBDExport, structuredReplies: Bool, metaContexts: [NBDMetaContext]) {
        self.export = export
        self.structuredReplies = structuredReplies
        self.metaContexts = metaContexts
        self.transmissionFlags = export.transmissionFlags(structuredReplies: structuredReplies)
    }
}

/// Option haggling of fixed newstyle negotiation (proto.md "Option types"), as a pure
/// state machine: each option goes in, reply bytes come out with what to do next. No
/// channel, no I/O: testable on plain buffers.
public struct NBDNegotiation {
    public enum Outcome: Equatable {
        /// Replies were written; wait for the next option.
        case `continue`
        /// Replies (if any) were written; then close the connection.
        case close(reason: String)
        /// Replies were written; the transmission phase starts with the next byte.
        case transmission
        /// NBD_REP_ACK to NBD_OPT_STARTTLS was written: once it has gone out in plain
        /// text, everything further is TLS (the client starts the TLS handshake).
        case startTLS
    }

    let exports: NBDExportTable
    public private(set) var clientFlags: UInt32 = 0
    public private(set) var structuredReplies = false
    /// The selection of the last NBD_OPT_SET_META_CONTEXT and the export it was for.
    public private(set) var metaContexts: [NBDMetaContext] = []
    var metaContextExport: String?
    /// Set when the outcome is `.transmission`.
    public private(set) var session: NBDSession?

    /// FORCEDTLS mode (proto.md "TLS support"): until STARTTLS, every option but
    /// STARTTLS and ABORT is refused with NBD_REP_ERR_TLS_REQD. Without it, NOTLS mode:
    /// STARTTLS is refused with NBD_REP_ERR_POLICY.
    public let tlsRequired: Bool
    /// STARTTLS was accepted: the rest of the handshake runs inside TLS.
    public private(set) var tlsActive = false

    public init(exports: NBDExportTable, tlsRequired: Bool = false) {
        self.exports = exports
        self.tlsRequired = tlsRequired
    }

    var noZeroes: Bool { clientFlags & NBD.clientFlagNoZeroes != 0 }

    /// The client's flags: anything but FIXED_NEWSTYLE and NO_ZEROES ends the session
    /// (proto.md: "the server MUST drop the TCP connection if the client sets an unknown flag").
    public mutating func receiveClientFlags(_ flags: UInt32) -> Outcome {
        let known = NBD.clientFlagFixedNewstyle | NBD.clientFlagNoZeroes
        if flags & ~known != 0 {
            return .close(reason: "client flags 0x\(String(flags, radix: 16)) include unknown bits")
        }
        clientFlags = flags
        return .continue
    }

    /// Handle one option, appending replies to `out`.
    public mutating func receiveOption(code: UInt32, data: ByteBuffer, into out: inout ByteBuffer) -> Outcome {
        var data = data
        if tlsRequired && !tlsActive {
            return beforeTLS(code: code, data: data, into: &out)
        }
        switch code {
        case NBD.optExportName:
            let bytes = data.readBytes(length: data.readableBytes) ?? []
            guard bytes.count <= NBD.maxStringLength else {
                return .close(reason: "export name longer than \(NBD.maxStringLength) bytes")
            }
            let name = String(decoding: bytes, as: UTF8.self)
            guard let export = exports.lookup(name) else {
                // NBD_OPT_EXPORT_NAME cannot carry an error: the spec says hang up.
                return .close(reason: "client asked for unknown export '\(name)'")
            }
            let session = makeSession(export)
            out.writeNBDExportNameReply(size: export.size, flags: session.transmissionFlags, noZeroes: noZeroes)
            self.session = session
            return .transmission

        case NBD.optAbort:
            out.writeNBDOptionReply(option: code, type: NBD.repAck)
            return .close(reason: "client aborted the handshake")

        case NBD.optList:
            guard data.readableBytes == 0 else {
                out.writeNBDOptionError(option: code, type: NBD.repErrInvalid, message: "NBD_OPT_LIST takes no data")
                return .continue
            }
            for e in exports.exports {
                out.writeNBDServerReply(name: e.name, description: e.description)
            }
            out.writeNBDOptionReply(option: code, type: NBD.repAck)
            return .continue

        case NBD.optInfo, NBD.optGo:
            return infoOrGo(code, &data, into: &out)

        case NBD.optStructuredReply:
            if data.readableBytes != 0 {
                out.writeNBDOptionError(option: code, type: NBD.repErrInvalid, message: "NBD_OPT_STRUCTURED_REPLY takes no data")
            } else if structuredReplies {
                out.writeNBDOptionError(option: code, type: NBD.repErrInvalid, message: "structured replies are already negotiated")
            } else {
                structuredReplies = true
                out.writeNBDOptionReply(option: code, type: NBD.repAck)
            }
            return .continue

        case NBD.optListMetaContext, NBD.optSetMetaContext:
            metaContext(code, &data, into: &out)
            return .continue

        case NBD.optStartTLS:
            if tlsActive {
                out.writeNBDOptionError(option: code, type: NBD.repErrInvalid, message: "TLS is already running")
            } else {
                out.writeNBDOptionError(option: code, type: NBD.repErrPolicy, message: "this server does not offer TLS")
            }
            return .continue

        default:
            out.writeNBDOptionError(option: code, type: NBD.repErrUnsup, message: "option \(code) is not supported")
            return .continue
        }
    }

    /// FORCEDTLS before the upgrade: only STARTTLS and ABORT are served.
    mutating func beforeTLS(code: UInt32, data: ByteBuffer, into out: inout ByteBuffer) -> Outcome {
        switch code {
        case NBD.optStartTLS:
            guard data.readableBytes == 0 else {
                out.writeNBDOptionError(option: code, type: NBD.repErrInvalid, message: "NBD_OPT_STARTTLS takes no data")
                return .continue
            }
            // "the server MUST NOT preserve any negotiation state … issued before this
            // command": nothing stateful was accepted before it, but start clean anyway.
            structuredReplies = false
            metaContexts = []
            metaContextExport = nil
            tlsActive = true
            out.writeNBDOptionReply(option: code, type: NBD.repAck)
            return .startTLS
        case NBD.optAbort:
            out.writeNBDOptionReply(option: code, type: NBD.repAck)
            return .close(reason: "client aborted the handshake")
        case NBD.optExportName:
            // It cannot carry an error: the spec says terminate.
            return .close(reason: "client asked for an export without TLS (NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS)")
        default:
            out.writeNBDOptionError(option: code, type: NBD.repErrTLSReqd,
                                    message: "this server requires TLS: send NBD_OPT_STARTTLS first (nbds:// URIs; tls-creds in qemu)")
            return .continue
        }
    }

    func makeSession(_ export: NBDExport) -> NBDSession {
        // Contexts count only if they were selected for the export now chosen.
        let contexts = metaContextExport == export.name ? metaContexts : []
        return NBDSession(export: export, structuredReplies: structuredReplies, metaContexts: contexts)
    }

    /// NBD_OPT_INFO and NBD_OPT_GO:
    ///
    ///     32 bits name length | name | 16 bits count | count × 16 bits information request
    mutating func infoOrGo(_ code: UInt32, _ data: inout ByteBuffer, into out: inout ByteBuffer) -> Outcome {
        func invalid(_ message: String) -> Outcome {
            out.writeNBDOptionError(option: code, type: NBD.repErrInvalid, message: message)
            return .continue
        }
        guard let nameLength = data.readInteger(as: UInt32.self),
              Int(nameLength) <= data.readableBytes - 2 else {
            return invalid("malformed request: the name length does not fit the option")
        }
        guard Int(nameLength) <= NBD.maxStringLength else {
            return invalid("export name longer than \(NBD.maxStringLength) bytes")
        }
        let name = data.readString(length: Int(nameLength)) ?? ""
        let count = Int(data.readInteger(as: UInt16.self)!)
        guard data.readableBytes == 2 * count else {
            return invalid("malformed request: \(count) information requests do not fit the option")
        }
        var requested: Set<UInt16> = []
        for _ in 0..<count { requested.insert(data.readInteger(as: UInt16.self)!) }

        guard let export = exports.lookup(name) else {
            out.writeNBDOptionError(option: code, type: NBD.repErrUnknown,
                                    message: "no export named '\(name)'; NBD_OPT_LIST shows the exports")
            return .continue
        }
        let session = makeSession(export)
        out.writeNBDInfoExport(option: code, size: export.size, flags: session.transmissionFlags)
        if requested.contains(NBD.infoName) {
            out.writeNBDInfoString(option: code, info: NBD.infoName, export.name)
        }
        if requested.contains(NBD.infoDescription), let d = export.description {
            out.writeNBDInfoString(option: code, info: NBD.infoDescription, d)
        }
        // Sent whether asked or not (the spec allows unrequested information): clients
        // that understand it keep their requests within the limits.
        out.writeNBDInfoBlockSize(option: code, minimum: NBD.minimumBlockSize, preferred: NBD.preferredBlockSize,
                                  maximum: UInt32(NBD.maxPayload))
        out.writeNBDOptionReply(option: code, type: NBD.repAck)
        if code == NBD.optGo {
            self.session = session
            return .transmission
        }
        return .continue
    }

    /// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT:
    ///
    ///     32 bits name length | name | 32 bits count | count × (32 bits length | query)
    mutating func metaContext(_ code: UInt32, _ data: inout ByteBuffer, into out: inout ByteBuffer) {
        let setting = code == NBD.optSetMetaContext
        // "Issuing this command replaces all previously-set metadata contexts (including
        // when this command fails)".
        if setting {
            metaContexts = []
            metaContextExport = nil
        }
        func fail(_ type: UInt32, _ message: String) {
            out.writeNBDOptionError(option: code, type: type, message: message)
        }
        guard structuredReplies else {
            return fail(NBD.repErrInvalid, "negotiate structured replies (NBD_OPT_STRUCTURED_REPLY) before metadata contexts")
        }
        guard let nameLength = data.readInteger(as: UInt32.self), Int(nameLength) <= data.readableBytes,
              Int(nameLength) <= NBD.maxStringLength,
              let name = data.readString(length: Int(nameLength)),
              let count = data.readInteger(as: UInt32.self) else {
            return fail(NBD.repErrInvalid, "malformed metadata context request")
        }
        var queries: [String] = []
        for _ in 0..<min(count, UInt32(NBD.maxOptionLength / 4) + 1) {
            guard let length = data.readInteger(as: UInt32.self), Int(length) <= data.readableBytes,
                  Int(length) <= NBD.maxStringLength,
                  let query = data.readString(length: Int(length)) else {
                return fail(NBD.repErrInvalid, "malformed metadata context query")
            }
            queries.append(query)
        }
        guard queries.count == Int(count), data.readableBytes == 0 else {
            return fail(NBD.repErrInvalid, "malformed metadata context request: \(count) queries do not match the option length")
        }
        guard let export = exports.lookup(name) else {
            return fail(NBD.repErrUnknown, "no export named '\(name)'")
        }
        var selected: [NBDMetaContext] = []
        if queries.isEmpty {
            // Listing with no query lists everything; setting with none selects nothing.
            if !setting { selected = NBDMetaContext.allCases }
        } else {
            for q in queries {
                for ctx in NBDMetaContext.matching(q, wildcards: !setting) where !selected.contains(ctx) {
                    selected.append(ctx)
                }
            }
        }
        for ctx in selected {
            // Context ids in a list reply are reserved and zero.
            out.writeNBDMetaContextReply(option: code, id: setting ? ctx.rawValue : 0, name: ctx.name)
        }
        out.writeNBDOptionReply(option: code, type: NBD.repAck)
        if setting {
            metaContexts = selected
            metaContextExport = export.name
        }
    }
}
