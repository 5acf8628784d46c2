/// The QCOW2 header (qcow2 spec, "Header") and its extensions: pure parse, validate and
/// serialise. Version 2 headers are 72 bytes; version 3 headers state their length.
struct QCOW2Header {
    static let magic: UInt32 = 0x5146_49fb  // "QFI\xfb"

    // Incompatible feature bits (spec "incompatible_features").
    static let incompatDirty: UInt64 = 1 << 0
    static let incompatCorrupt: UInt64 = 1 << 1
    static let incompatDataFile: UInt64 = 1 << 2
    static let incompatCompression: UInt64 = 1 << 3
    static let incompatExtendedL2: UInt64 = 1 << 4
    static let knownIncompatible: UInt64 = 0x1f
    // Compatible feature bits.
    static let compatLazyRefcounts: UInt64 = 1 << 0
    // Autoclear feature bits.
    static let autoclearBitmaps: UInt64 = 1 << 0
    static let autoclearDataFileRaw: UInt64 = 1 << 1

    // Header extension types.
    static let extEnd: UInt32 = 0
    static let extBackingFormat: UInt32 = 0xe279_2aca
    static let extFeatureTable: UInt32 = 0x6803_f857
    static let extBitmaps: UInt32 = 0x2385_2875
    static let extEncryption: UInt32 = 0x0537_be77
    static let extDataFile: UInt32 = 0x4441_5441

    var version: UInt32 = 3
    var backingFileOffset: UInt64 = 0
    var backingFileSize: UInt32 = 0
    var clusterBits: UInt32 = 16
    var size: UInt64 = 0
    var cryptMethod: UInt32 = 0
    var l1Size: UInt32 = 0
    var l1TableOffset: UInt64 = 0
    var refcountTableOffset: UInt64 = 0
    var refcountTableClusters: UInt32 = 0
    var nbSnapshots: UInt32 = 0
    var snapshotsOffset: UInt64 = 0
    var incompatibleFeatures: UInt64 = 0
    var compatibleFeatures: UInt64 = 0
    var autoclearFeatures: UInt64 = 0
    var refcountOrder: UInt32 = 4
    var headerLength: UInt32 = 112
    /// 0 = zlib (deflate), 1 = zstd.
    var compressionType: UInt8 = 0

    // From extensions.
    var backingFile: String?
    var backingFormat: String?
    var dataFile: String?
    var featureNames: [(type: UInt8, bit: UInt8, name: String)] = []
    /// Extensions we keep verbatim when rewriting the header (unknown ones, bitmaps).
    var otherExtensions: [(type: UInt32, data: [UInt8])] = []

    var clusterSize: UInt64 { 1 << UInt64(clusterBits) }
    var refcountBits: UInt64 { 1 << UInt64(refcountOrder) }
    var extendedL2: Bool { incompatibleFeatures & Self.incompatExtendedL2 != 0 }
    var l2EntrySize: UInt64 { extendedL2 ? 16 : 8 }
    var l2Entries: UInt64 { clusterSize / l2EntrySize }
    var subclustersPerCluster: UInt64 { extendedL2 ? 32 : 1 }
    var hasDataFile: Bool { incompatibleFeatures & Self.incompatDataFile != 0 }
    var dataFileRaw: Bool { autoclearFeatures & Self.autoclearDataFileRaw != 0 }
    var isDirty: Bool { incompatibleFeatures & Self.incompatDirty != 0 }
    var isCorrupt: Bool { incompatibleFeatures & Self.incompatCorrupt != 0 }
    var lazyRefcounts: Bool { compatibleFeatures & Self.compatLazyRefcounts != 0 }

    /// Parse and validate. `fileSize` bounds every offset the header names.
    static func parse(_ bytes: [UInt8], fileSize: UInt64) throws -> QCOW2Header {
        let r = ByteReader(bytes)
        guard r.be32(0) == magic else { throw ImageError.invalid("not a qcow2 image (bad magic)") }
        var h = QCOW2Header()
        h.version = r.be32(4)
        guard h.version == 2 || h.version == 3 else {
            throw ImageError(.unsupported, "qcow2 version \(h.version) is not supported (2 and 3 are)")
        }
        h.backingFileOffset = r.be64(8)
        h.backingFileSize = r.be32(16)
        h.clusterBits = r.be32(20)
        h.size = r.be64(24)
        h.cryptMethod = r.be32(32)
        h.l1Size = r.be32(36)
        h.l1TableOffset = r.be64(40)
        h.refcountTableOffset = r.be64(48)
        h.refcountTableClusters = r.be32(56)
        h.nbSnapshots = r.be32(60)
        h.snapshotsOffset = r.be64(64)
        if h.version >= 3 {
            h.incompatibleFeatures = r.be64(72)
            h.compatibleFeatures = r.be64(80)
            h.autoclearFeatures = r.be64(88)
            h.refcountOrder = r.be32(96)
            h.headerLength = r.be32(100)
            guard h.headerLength >= 104, h.headerLength <= 4096, h.headerLength % 8 == 0 || h.headerLength == 104 else {
                throw ImageError.corrupt("qcow2 header length \(h.headerLength) is invalid")
            }
            if h.headerLength > 104 { h.compressionType = bytes.count > 104 ? bytes[104] : 0 }
        } else {
            h.refcountOrder = 4
            h.headerLength = 72
        }

        guard h.clusterBits >= 9 && h.clusterBits <= 21 else {
            throw ImageError.corrupt("qcow2 cluster_bits \(h.clusterBits) is outside 9..21")
        }
        guard h.refcountOrder <= 6 else { throw ImageError.corrupt("qcow2 refcount_order \(h.refcountOrder) is above 6") }
        if h.cryptMethod != 0 {
            throw ImageError(.unsupported, "encrypted qcow2 images are not supported; decrypt with 'qemu-img convert' first")
        }
        let unknown = h.incompatibleFeatures & ~knownIncompatible
        let cs = h.clusterSize
        for (name, off) in [("L1 table", h.l1TableOffset), ("refcount table", h.refcountTableOffset)] where off % cs != 0 {
            throw ImageError.corrupt("qcow2 \(name) offset \(off) is not cluster aligned")
        }
        if h.snapshotsOffset % cs != 0 && h.nbSnapshots > 0 {
            throw ImageError.corrupt("qcow2 snapshot table offset is not cluster aligned")
        }
        if h.compressionType > 1 {
            throw ImageError(.unsupported, "qcow2 compression type \(h.compressionType) is unknown (0 zlib, 1 zstd)")
        }
        if h.compressionType != 0 && h.incompatibleFeatures & incompatCompression == 0 {
            throw ImageError.corrupt("qcow2 compression type set without its incompatible feature bit")
        }
        // qemu's limit; keeps every size computation below far from overflow.
        if h.size > 1 << 61 { throw ImageError.corrupt("qcow2 virtual size \(h.size) is larger than 2^61 bytes") }
        // A grossly oversized table is refused before anything allocates for it.
        let l1Bytes = UInt64(h.l1Size) * 8
        if l1Bytes > 32 << 20 || h.l1TableOffset > fileSize {
            throw ImageError.corrupt("qcow2 L1 table (\(h.l1Size) entries at \(h.l1TableOffset)) does not fit the file")
        }
        let needL1 = try h.requiredL1Entries(for: h.size)
        if UInt64(h.l1Size) < needL1 {
            throw ImageError.corrupt("qcow2 L1 table has \(h.l1Size) entries but \(needL1) are needed for the virtual size")
        }
        // Both tables lie inside the file (qemu and vloop always write them there).
        let fileEnd = fileSize.alignedUp(cs)
        if h.l1TableOffset > fileEnd || l1Bytes > fileEnd - h.l1TableOffset {
            throw ImageError.corrupt("qcow2 L1 table (\(h.l1Size) entries at \(h.l1TableOffset)) lies past the end of the file")
        }
        if UInt64(h.refcountTableClusters) * cs > 1 << 32 || h.refcountTableOffset > fileEnd
            || UInt64(h.refcountTableClusters) * cs > fileEnd - h.refcountTableOffset {
            throw ImageError.corrupt("qcow2 refcount table (\(h.refcountTableClusters) clusters) does not fit the file")
        }
        if h.nbSnapshots > 65536 { throw ImageError.corrupt("qcow2 snapshot count \(h.nbSnapshots) is too large") }

        try h.parseExtensions(r)
        if unknown != 0 {
            var names: [String] = []
            for bit in 0..<64 where unknown & (1 << UInt64(bit)) != 0 {
                let named = h.featureNames.first { $0.type == 0 && Int($0.bit) == bit }?.name
                names.append(named.map { "'\($0)' (bit \(bit))" } ?? "bit \(bit)")
            }
            throw ImageError(.unsupported, "qcow2 image uses unsupported incompatible features: \(names.joined(separator: ", "))")
        }
        if h.backingFileOffset != 0 {
            guard h.backingFileSize > 0 && h.backingFileSize <= 1023,
                  h.backingFileOffset + UInt64(h.backingFileSize) <= UInt64(bytes.count) else {
                throw ImageError.corrupt("qcow2 backing file name (offset \(h.backingFileOffset), \(h.backingFileSize) bytes) is invalid")
            }
            let o = Int(h.backingFileOffset)
            h.backingFile = String(decoding: bytes[o..<(o + Int(h.backingFileSize))], as: UTF8.self)
        }
        return h
    }

    /// Entries an L1 table needs to cover `size` bytes.
    func requiredL1Entries(for size: UInt64) throws -> UInt64 {
        let perL2 = clusterSize * l2Entries
        return size / perL2 + (size % perL2 == 0 ? 0 : 1)
    }

    private mutating func parseExtensions(_ r: ByteReader) throws {
        var off = Int(headerLength)
        off = (off + 7) & ~7
        let limit = backingFileOffset != 0 ? min(Int(backingFileOffset), r.bytes.count) : min(Int(clusterSize), r.bytes.count)
        var seen = 0
        while off + 8 <= limit {
            let type = r.be32(off)
            let len = Int(r.be32(off + 4))
            if type == Self.extEnd { return }
            guard len <= limit - off - 8 else { throw ImageError.corrupt("qcow2 header extension 0x\(String(type, radix: 16)) overruns the header cluster") }
            let data = r.slice(off + 8, len)
            switch type {
            case Self.extBackingFormat:
                backingFormat = String(decoding: data, as: UTF8.self)
            case Self.extDataFile:
                dataFile = String(decoding: data, as: UTF8.self)
            case Self.extFeatureTable:
                var i = 0
                while i + 48 <= data.count {
                    let nameBytes = data[(i + 2)..<(i + 48)].prefix { $0 != 0 }
                    featureNames.append((data[i], data[i + 1], String(decoding: nameBytes, as: UTF8.self)))
                    i += 48
                }
            case Self.extEncryption:
                throw ImageError(.unsupported, "encrypted qcow2 images are not supported; decrypt with 'qemu-img convert' first")
            default:
                otherExtensions.append((type, data))
            }
            off += 8 + ((len + 7) & ~7)
            seen += 1
            if seen > 1024 { throw ImageError.corrupt("qcow2 header has too many extensions") }
        }
    }

    /// Serialise header, extensions and backing name into one cluster-sized buffer.
    /// The fixed header fields alone (72 bytes for v2, header_length for v3), for
    /// in-place updates that must not move extensions or the backing file name.
    func fixedFields() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: version >= 3 ? Int(headerLength) : 72)
        b.putBE32(Self.magic, at: 0)
        b.putBE32(version, at: 4)
        b.putBE64(backingFileOffset, at: 8)
        b.putBE32(backingFileSize, at: 16)
        b.putBE32(clusterBits, at: 20)
        b.putBE64(size, at: 24)
        b.putBE32(cryptMethod, at: 32)
        b.putBE32(l1Size, at: 36)
        b.putBE64(l1TableOffset, at: 40)
        b.putBE64(refcountTableOffset, at: 48)
        b.putBE32(refcountTableClusters, at: 56)
        b.putBE32(nbSnapshots, at: 60)
        b.putBE64(snapshotsOffset, at: 64)
        if version >= 3 {
            b.putBE64(incompatibleFeatures, at: 72)
            b.putBE64(compatibleFeatures, at: 80)
            b.putBE64(autoclearFeatures, at: 88)
            b.putBE32(refcountOrder, at: 96)
            b.putBE32(headerLength, at: 100)
            if headerLength > 104 { b[104] = compressionType }
        }
        return b
    }

    func serialize() throws -> [UInt8] {
        var b = [UInt8](repeating: 0, count: Int(clusterSize))
        b.putBE32(Self.magic, at: 0)
        b.putBE32(version, at: 4)
        b.putBE32(clusterBits, at: 20)
        b.putBE64(size, at: 24)
        b.putBE32(cryptMethod, at: 32)
        b.putBE32(l1Size, at: 36)
        b.putBE64(l1TableOffset, at: 40)
        b.putBE64(refcountTableOffset, at: 48)
        b.putBE32(refcountTableClusters, at: 56)
        b.putBE32(nbSnapshots, at: 60)
        b.putBE64(snapshotsOffset, at: 64)
        var off: Int
        if version >= 3 {
            b.putBE64(incompatibleFeatures, at: 72)
            b.putBE64(compatibleFeatures, at: 80)
            b.putBE64(autoclearFeatures, at: 88)
            b.putBE32(refcountOrder, at: 96)
            b.putBE32(headerLength, at: 100)
            if headerLength > 104 { b[104] = compressionType }
            off = Int(headerLength)
        } else {
            off = 72
        }
        off = (off + 7) & ~7
        func ext(_ type: UInt32, _ data: [UInt8]) throws {
            let padded = (data.count + 7) & ~7
            guard off + 8 + padded + 8 <= b.count else {
                throw ImageError(.invalidArgument, "qcow2 header extensions do not fit in one cluster; use a larger cluster size")
            }
            b.putBE32(type, at: off)
            b.putBE32(UInt32(data.count), at: off + 4)
            b.putBytes(data, at: off + 8)
            off += 8 + padded
        }
        if let backingFormat { try ext(Self.extBackingFormat, Array(backingFormat.utf8)) }
        if let dataFile { try ext(Self.extDataFile, Array(dataFile.utf8)) }
        for e in otherExtensions { try ext(e.type, e.data) }
        if version >= 3 { try ext(Self.extFeatureTable, Self.featureTable) }
        off += 8  // end-of-extensions marker (zeroes)
        if let backingFile {
            let name = Array(backingFile.utf8)
            guard off + name.count <= b.count, name.count <= 1023 else {
                throw ImageError(.invalidArgument, "backing file name is too long (1023 bytes at most)")
            }
            b.putBytes(name, at: off)
            b.putBE64(UInt64(off), at: 8)
            b.putBE32(UInt32(name.count), at: 16)
        }
        return b
    }

    /// The feature name table qemu writes, so tools can name the features we set.
    static let featureTable: [UInt8] = {
        let names: [(UInt8, UInt8, String)] = [
            (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
            (0, 3, "compression type"), (0, 4, "extended L2 entries"),
            (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data"),
        ]
        var out: [UInt8] = []
        for (t, bit, name) in names {
            var entry = [UInt8](repeating: 0, count: 48)
            entry[0] = t
            entry[1] = bit
            entry.putBytes(Array(name.utf8.prefix(46)), at: 2)
            out += entry
        }
        return out
    }()
}

/// One L2 entry, decoded (qcow2 spec, "Cluster mapping").
///
///     standard:   63 copied | 62 compressed=0 | 56..61 reserved | 9..55 host offset | 0 all-zeroes
///     compressed: 63 copied=0 | 62 compressed=1 | x..61 extra sectors | 0..x-1 host offset
///                 with x = 62 - (cluster_bits - 8)
struct L2Entry {
    static let copied: UInt64 = 1 << 63
    static let compressed: UInt64 = 1 << 62
    static let zeroFlag: UInt64 = 1
    static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00

    var raw: UInt64
    var bitmap: UInt64  // extended L2 only: bits 0..31 allocated, 32..63 reads as zero

    var isCompressed: Bool { raw & Self.compressed != 0 }
    var hostOffset: UInt64 { raw & Self.offsetMask }
    var isCopied: Bool { raw & Self.copied != 0 }
}
