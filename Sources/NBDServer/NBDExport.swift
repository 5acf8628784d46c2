import VirtualDisk

/// One image offered by the server under a name.
public struct NBDExport: Sendable {
    public let name: String
    public let image: DiskImage
    /// Refuse writes even if the image is writable (qemu-nbd -r).
    public let readOnly: Bool
    /// Shown to clients by NBD_OPT_LIST and NBD_INFO_DESCRIPTION.
    public let description: String?
    /// Facts read once: `info` may take the image's lock and build a fresh value,
    /// which the event loop must not wait for on every request.
    public let size: UInt64
    let capabilities: Capabilities
    let clusterSize: UInt64

    public init(name: String, image: DiskImage, readOnly: Bool = false, description: String? = nil) {
        let info = image.info
        self.name = name
        self.image = image
        self.readOnly = readOnly || !info.capabilities.contains(.writable)
        self.description = description
        self.size = info.virtualSize
        self.capabilities = info.capabilities
        self.clusterSize = info.clusterSize
    }

    /// The transmission flags this export is served with.
    ///
    /// NBD_FLAG_CAN_MULTI_CONN holds because every connection shares the one
    /// `DiskImage` (and its one metadata cache): a flush on any connection flushes what
    /// every connection wrote.
    func transmissionFlags(structuredReplies: Bool) -> UInt16 {
        var flags = NBD.flagHasFlags | NBD.flagSendFlush | NBD.flagSendFUA | NBD.flagSendCache | NBD.flagCanMultiConn
        if readOnly {
            flags |= NBD.flagReadOnly
        } else {
            flags |= NBD.flagSendWriteZeroes | NBD.flagSendFastZero
            if capabilities.contains(.discard) { flags |= NBD.flagSendTrim }
        }
        if structuredReplies { flags |= NBD.flagSendDF }
        return flags
    }
}

/// The exports of one server, by name. The empty name (the protocol's "default
/// export") is the first export.
public struct NBDExportTable: Sendable {
    public let exports: [NBDExport]

    public init(_ exports: [NBDExport]) throws {
        var seen: Set<String> = []
        for e in exports {
            if e.name.isEmpty {
                throw ImageError(.invalidArgument, "an export needs a name")
            }
            if e.name.utf8.count > NBD.maxStringLength {
                throw ImageError(.invalidArgument, "export name '\(e.name.prefix(40))…' is longer than \(NBD.maxStringLength) bytes")
            }
            if !seen.insert(e.name).inserted {
                throw ImageError(.invalidArgument, "two images would both be exported as '\(e.name)'; rename one, or serve them from separate servers")
            }
        }
        if exports.isEmpty { throw ImageError(.invalidArgument, "nothing to export") }
        self.exports = exports
    }

    public func lookup(_ name: String) -> NBDExport? {
        if name.isEmpty { return exports.first }
        return exports.first { $0.name == name }
    }
}
