/// Constants of the NBD protocol, named as in the specification
/// (github.com/NetworkBlockDevice/nbd doc/proto.md, "Values"). Everything on the wire
/// is big-endian.
public enum NBD {
    // MARK: magic numbers

    /// "NBDMAGIC": the first 8 bytes the server sends.
    public static let initMagic: UInt64 = 0x4e42_444d_4147_4943
    /// "IHAVEOPT": sent by the server after NBDMAGIC, and by the client before every option.
    public static let optionMagic: UInt64 = 0x4948_4156_454f_5054
    /// Magic of every option reply (fixed newstyle).
    public static let optionReplyMagic: UInt64 = 0x0003_e889_0455_65a9
    public static let requestMagic: UInt32 = 0x2560_9513
    public static let simpleReplyMagic: UInt32 = 0x6744_6698
    public static let structuredReplyMagic: UInt32 = 0x668e_33ef

    // MARK: handshake flags (server, 16 bits) and client flags (32 bits)

    public static let flagFixedNewstyle: UInt16 = 1 << 0
    public static let flagNoZeroes: UInt16 = 1 << 1
    public static let clientFlagFixedNewstyle: UInt32 = 1 << 0
    public static let clientFlagNoZeroes: UInt32 = 1 << 1

    // MARK: transmission flags (16 bits)

    public static let flagHasFlags: UInt16 = 1 << 0
    public static let flagReadOnly: UInt16 = 1 << 1
    public static let flagSendFlush: UInt16 = 1 << 2
    public static let flagSendFUA: UInt16 = 1 << 3
    public static let flagRotational: UInt16 = 1 << 4
    public static let flagSendTrim: UInt16 = 1 << 5
    public static let flagSendWriteZeroes: UInt16 = 1 << 6
    public static let flagSendDF: UInt16 = 1 << 7
    public static let flagCanMultiConn: UInt16 = 1 << 8
    public static let flagSendCache: UInt16 = 1 << 10
    public static let flagSendFastZero: UInt16 = 1 << 11

    // MARK: options

    public static let optExportName: UInt32 = 1
    public static let optAbort: UInt32 = 2
    public static let optList: UInt32 = 3
    public static let optStartTLS: UInt32 = 5
    public static let optInfo: UInt32 = 6
    public static let optGo: UInt32 = 7
    public static let optStructuredReply: UInt32 = 8
    public static let optListMetaContext: UInt32 = 9
    public static let optSetMetaContext: UInt32 = 10

    // MARK: option replies

    public static let repAck: UInt32 = 1
    public static let repServer: UInt32 = 2
    public static let repInfo: UInt32 = 3
    public static let repMetaContext: UInt32 = 4
    public static let repErrUnsup: UInt32 = 0x8000_0001
    public static let repErrPolicy: UInt32 = 0x8000_0002
    public static let repErrInvalid: UInt32 = 0x8000_0003
    public static let repErrPlatform: UInt32 = 0x8000_0004
    public static let repErrTLSReqd: UInt32 = 0x8000_0005
    public static let repErrUnknown: UInt32 = 0x8000_0006
    public static let repErrShutdown: UInt32 = 0x8000_0007
    public static let repErrBlockSizeReqd: UInt32 = 0x8000_0008
    public static let repErrTooBig: UInt32 = 0x8000_0009

    // MARK: NBD_REP_INFO types

    public static let infoExport: UInt16 = 0
    public static let infoName: UInt16 = 1
    public static let infoDescription: UInt16 = 2
    public static let infoBlockSize: UInt16 = 3

    // MARK: commands

    public static let cmdRead: UInt16 = 0
    public static let cmdWrite: UInt16 = 1
    public static let cmdDisc: UInt16 = 2
    public static let cmdFlush: UInt16 = 3
    public static let cmdTrim: UInt16 = 4
    public static let cmdCache: UInt16 = 5
    public static let cmdWriteZeroes: UInt16 = 6
    public static let cmdBlockStatus: UInt16 = 7

    // MARK: command flags

    public static let cmdFlagFUA: UInt16 = 1 << 0
    public static let cmdFlagNoHole: UInt16 = 1 << 1
    public static let cmdFlagDF: UInt16 = 1 << 2
    public static let cmdFlagReqOne: UInt16 = 1 << 3
    public static let cmdFlagFastZero: UInt16 = 1 << 4

    // MARK: structured replies

    public static let replyFlagDone: UInt16 = 1 << 0
    public static let replyTypeNone: UInt16 = 0
    public static let replyTypeOffsetData: UInt16 = 1
    public static let replyTypeOffsetHole: UInt16 = 2
    public static let replyTypeBlockStatus: UInt16 = 5
    public static let replyTypeError: UInt16 = 0x8001
    public static let replyTypeErrorOffset: UInt16 = 0x8002

    // MARK: base:allocation flags

    public static let stateHole: UInt32 = 1 << 0
    public static let stateZero: UInt32 = 1 << 1

    // MARK: errors (the error field of replies)

    public static let EPERM: UInt32 = 1
    public static let EIO: UInt32 = 5
    public static let ENOMEM: UInt32 = 12
    public static let EINVAL: UInt32 = 22
    public static let ENOSPC: UInt32 = 28
    public static let EOVERFLOW: UInt32 = 75
    public static let ENOTSUP: UInt32 = 95
    public static let ESHUTDOWN: UInt32 = 108

    // MARK: our limits

    /// The longest string the protocol allows (export names, messages, context names).
    public static let maxStringLength = 4096
    /// The largest option payload we accept; real options are a few hundred bytes.
    public static let maxOptionLength = 64 * 1024
    /// The largest READ or WRITE payload (the spec's interoperable maximum, 2^25).
    public static let maxPayload = 32 * 1024 * 1024
    /// Advertised size constraints: any alignment works, 4 KiB is efficient.
    public static let minimumBlockSize: UInt32 = 1
    public static let preferredBlockSize: UInt32 = 4096
    /// The most descriptors one block-status chunk carries: 1 MiB of reply (the spec
    /// allows up to 2^20 descriptors; clients ask again for the rest).
    public static let maxBlockStatusDescriptors = 1 << 17
    /// How much of the disk one block-status request looks at, at most.
    public static let maxBlockStatusSpan: UInt64 = 1 << 30
}

/// The metadata contexts this server offers for NBD_CMD_BLOCK_STATUS.
public enum NBDMetaContext: UInt32, Sendable, CaseIterable {
    /// `base:allocation`: hole and zero flags.
    case baseAllocation = 1
    /// `qemu:allocation-depth`: which layer of the chain answers (0 unallocated, 1 top…).
    case allocationDepth = 2

    public var name: String {
        switch self {
        case .baseAllocation: return "base:allocation"
        case .allocationDepth: return "qemu:allocation-depth"
        }
    }

    /// Contexts a query names: a full name selects it; `ns:` (in a list request only)
    /// selects the whole namespace. Unknown namespaces and names select nothing.
    static func matching(_ query: String, wildcards: Bool) -> [NBDMetaContext] {
        allCases.filter { ctx in
            if ctx.name == query { return true }
            guard wildcards, query.hasSuffix(":"), !query.dropLast().contains(":") else { return false }
            return ctx.name.hasPrefix(query)
        }
    }
}
