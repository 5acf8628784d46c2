import NIOCore

/// The server side of the wire, as pure writers into a `ByteBuffer`.
extension ByteBuffer {
    /// The greeting of fixed newstyle negotiation:
    ///
    ///     S: "NBDMAGIC" | "IHAVEOPT" | 16 bits handshake flags
    mutating func writeNBDGreeting() {
        writeInteger(NBD.initMagic)
        writeInteger(NBD.optionMagic)
        writeInteger(NBD.flagFixedNewstyle | NBD.flagNoZeroes)
    }

    /// An option reply header and its data:
    ///
    ///     S: 64 bits 0x3e889045565a9 | 32 option | 32 reply type | 32 length | data
    mutating func writeNBDOptionReply(option: UInt32, type: UInt32, data: ByteBuffer? = nil) {
        writeInteger(NBD.optionReplyMagic)
        writeInteger(option)
        writeInteger(type)
        writeInteger(UInt32(data?.readableBytes ?? 0))
        if let data { writeImmutableBuffer(data) }
    }

    /// An error reply to an option, with a message for a person (capped at the
    /// protocol's string limit).
    mutating func writeNBDOptionError(option: UInt32, type: UInt32, message: String) {
        let bytes = Array(message.utf8.prefix(NBD.maxStringLength))
        writeNBDOptionReplyHeader(option: option, type: type, length: UInt32(bytes.count))
        writeBytes(bytes)
    }

    /// The reply to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zero bytes
    /// unless the client negotiated NBD_FLAG_C_NO_ZEROES.
    mutating func writeNBDExportNameReply(size: UInt64, flags: UInt16, noZeroes: Bool) {
        writeInteger(size)
        writeInteger(flags)
        if !noZeroes { writeRepeatingByte(0, count: 124) }
    }

    /// NBD_REP_INFO / NBD_INFO_EXPORT.
    mutating func writeNBDInfoExport(option: UInt32, size: UInt64, flags: UInt16) {
        writeNBDOptionReplyHeader(option: option, type: NBD.repInfo, length: 12)
        writeInteger(NBD.infoExport)
        writeInteger(size)
        writeInteger(flags)
    }

    /// NBD_REP_INFO / NBD_INFO_BLOCK_SIZE.
    mutating func writeNBDInfoBlockSize(option: UInt32, minimum: UInt32, preferred: UInt32, maximum: UInt32) {
        writeNBDOptionReplyHeader(option: option, type: NBD.repInfo, length: 14)
        writeInteger(NBD.infoBlockSize)
        writeInteger(minimum)
        writeInteger(preferred)
        writeInteger(maximum)
    }

    /// NBD_REP_INFO carrying a string (NBD_INFO_NAME, NBD_INFO_DESCRIPTION).
    mutating func writeNBDInfoString(option: UInt32, info: UInt16, _ string: String) {
        let bytes = Array(string.utf8.prefix(NBD.maxStringLength))
        writeNBDOptionReplyHeader(option: option, type: NBD.repInfo, length: UInt32(2 + bytes.count))
        writeInteger(info)
        writeBytes(bytes)
    }

    /// NBD_REP_SERVER: one export of a list.
    mutating func writeNBDServerReply(name: String, description: String?) {
        let nameBytes = Array(name.utf8)
        let descBytes = Array((description ?? "").utf8.prefix(NBD.maxStringLength))
        writeNBDOptionReplyHeader(option: NBD.optList, type: NBD.repServer, length: UInt32(4 + nameBytes.count + descBytes.count))
        writeInteger(UInt32(nameBytes.count))
        writeBytes(nameBytes)
        writeBytes(descBytes)
    }

    /// NBD_REP_META_CONTEXT: a context id and its name.
    mutating func writeNBDMetaContextReply(option: UInt32, id: UInt32, name: String) {
        writeNBDOptionReplyHeader(option: option, type: NBD.repMetaContext, length: UInt32(4 + name.utf8.count))
        writeInteger(id)
        writeString(name)
    }

    mutating func writeNBDOptionReplyHeader(option: UInt32, type: UInt32, length: UInt32) {
        writeInteger(NBD.optionReplyMagic)
        writeInteger(option)
        writeInteger(type)
        writeInteger(length)
    }

    // MARK: transmission

    /// A simple reply: `S: 32 magic 0x67446698 | 32 error | 64 cookie` (then read data, if any).
    mutating func writeNBDSimpleReply(error: UInt32, cookie: UInt64) {
        writeInteger(NBD.simpleReplyMagic)
        writeInteger(error)
        writeInteger(cookie)
    }

    /// A structured reply chunk header:
    /// `S: 32 magic 0x668e33ef | 16 flags | 16 type | 64 cookie | 32 length` (then payload).
    mutating func writeNBDChunkHeader(flags: UInt16, type: UInt16, cookie: UInt64, length: UInt32) {
        writeInteger(NBD.structuredReplyMagic)
        writeInteger(flags)
        writeInteger(type)
        writeInteger(cookie)
        writeInteger(length)
    }

    /// A final NBD_REPLY_TYPE_ERROR chunk: error, message length, message.
    mutating func writeNBDErrorChunk(error: UInt32, message: String, cookie: UInt64) {
        let bytes = Array(message.utf8.prefix(NBD.maxStringLength))
        writeNBDChunkHeader(flags: NBD.replyFlagDone, type: NBD.replyTypeError, cookie: cookie, length: UInt32(6 + bytes.count))
        writeInteger(error)
        writeInteger(UInt16(bytes.count))
        writeBytes(bytes)
    }

    /// A final NBD_REPLY_TYPE_OFFSET_HOLE chunk.
    mutating func writeNBDHoleChunk(offset: UInt64, length: UInt32, cookie: UInt64) {
        writeNBDChunkHeader(flags: NBD.replyFlagDone, type: NBD.replyTypeOffsetHole, cookie: cookie, length: 12)
        writeInteger(offset)
        writeInteger(length)
    }

    /// A final NBD_REPLY_TYPE_NONE chunk.
    mutating func writeNBDNoneChunk(cookie: UInt64) {
        writeNBDChunkHeader(flags: NBD.replyFlagDone, type: NBD.replyTypeNone, cookie: cookie, length: 0)
    }

    /// One NBD_REPLY_TYPE_BLOCK_STATUS chunk: context id, then (length, flags) pairs.
    mutating func writeNBDBlockStatusChunk(context: UInt32, descriptors: [(length: UInt32, flags: UInt32)],
                                           final: Bool, cookie: UInt64) {
        writeNBDChunkHeader(flags: final ? NBD.replyFlagDone : 0, type: NBD.replyTypeBlockStatus, cookie: cookie,
                            length: UInt32(4 + 8 * descriptors.count))
        writeInteger(context)
        for d in descriptors {
            writeInteger(d.length)
            writeInteger(d.flags)
        }
    }
}
