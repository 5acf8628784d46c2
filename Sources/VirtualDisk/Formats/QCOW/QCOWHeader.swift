/// The QCOW version 1 header (libqcow "File header – version 1"; keramics "File header –
/// version 1"): pure parse, validate and serialise.
///
///      0 magic "QFI\xfb"          4 version = 1
///      8 backing_file_offset     16 backing_file_size
///     20 mtime                   24 size (bytes)
///     32 cluster_bits            33 l2_bits        34 padding (2)
///     36 crypt_method            40 l1_table_offset
///     48 (end; qemu puts the backing file name here, then the L1 table at the next
///        8-byte boundary)
///
/// All fields are big-endian. There is no L1 size field: the L1 table has as many
/// entries as the virtual size needs.
struct QCOWHeader: Equatable {
    static let magic: UInt32 = 0x5146_49fb  // "QFI\xfb", shared with QCOW2
    static let size = 48
    static let cryptNone: UInt32 = 0
    static let cryptAES: UInt32 = 1
    /// qemu's limits (block/qcow.c): 512-byte to 64 KiB clusters and L2 tables.
    static let clusterBitsRange: ClosedRange<UInt8> = 9...16
    static let l2BitsRange: ClosedRange<UInt8> = 6...13
    /// qemu refuses backing names of 1024 bytes or more.
    static let maxBackingNameLength: UInt32 = 1023

    var version: UInt32 = 1
    var backingFileOffset: UInt64 = 0
    var backingFileSize: UInt32 = 0
    var mtime: UInt32 = 0
    /// Virtual size in bytes as stored. qemu serves `size / 512` sectors.
    var size: UInt64 = 0
    var clusterBits: UInt8 = 12
    var l2Bits: UInt8 = 9
    var cryptMethod: UInt32 = 0
    var l1TableOffset: UInt64 = 0

    var clusterSize: UInt64 { 1 << UInt64(clusterBits) }
    /// Entries in one L2 table.
    var l2Entries: UInt64 { 1 << UInt64(l2Bits) }
    /// Bytes of one L2 table (not necessarily one cluster: qemu makes 32 KiB tables
    /// for 512-byte clusters when there is a backing file).
    var l2TableBytes: UInt64 { l2Entries * 8 }
    /// Guest bytes one L1 entry covers.
    var l1Coverage: UInt64 { 1 << UInt64(clusterBits + l2Bits) }
    /// The size qemu serves: whole 512-byte sectors (block/qcow.c: total_sectors = size / 512).
    var virtualSize: UInt64 { size / 512 * 512 }
    /// L1 entries needed to cover `size` (no overflow: `size` is checked at parse).
    var l1Entries: UInt64 { size / l1Coverage + (size % l1Coverage == 0 ? 0 : 1) }
    var l1TableBytes: UInt64 { l1Entries * 8 }
    var l1TableEnd: UInt64 { l1TableOffset + l1TableBytes }
    /// Low bits of an L2 entry holding the host offset (qemu's cluster_offset_mask).
    var hostOffsetMask: UInt64 { (1 << (63 - UInt64(clusterBits))) - 1 }
    var hasBackingFile: Bool { backingFileOffset != 0 && backingFileSize != 0 }

    /// Parse and validate the fixed fields. `fileSize` bounds every offset the header
    /// names; the backing file name itself is read by the caller (`backingName`).
    static func parse(_ bytes: [UInt8], fileSize: UInt64) throws -> QCOWHeader {
        let r = ByteReader(bytes)
        guard r.has(0, size) else { throw ImageError.invalid("file is too short for a qcow header (\(bytes.count) bytes)") }
        guard r.be32(0) == magic else { throw ImageError.invalid("not a qcow image (bad magic)") }
        var h = QCOWHeader()
        h.version = r.be32(4)
        guard h.version == 1 else {
            if h.version == 2 || h.version == 3 {
                throw ImageError(.invalidFormat, "this is a qcow2 image (version \(h.version)), not qcow; open it as qcow2")
            }
            throw ImageError(.unsupported, "qcow version \(h.version) is not supported (only version 1 is qcow)")
        }
        h.backingFileOffset = r.be64(8)
        h.backingFileSize = r.be32(16)
        h.mtime = r.be32(20)
        h.size = r.be64(24)
        h.clusterBits = bytes[32]
        h.l2Bits = bytes[33]
        h.cryptMethod = r.be32(36)
        h.l1TableOffset = r.be64(40)

        // Checks in qemu's order (block/qcow.c qcow_open), so errors match its diagnosis.
        guard h.size >= 2 else { throw ImageError.corrupt("qcow image size \(h.size) is too small (at least 2 bytes)") }
        guard h.size <= UInt64(Int64.max) / 2 else { throw ImageError.corrupt("qcow image size \(h.size) is too large") }
        guard clusterBitsRange.contains(h.clusterBits) else {
            throw ImageError.corrupt("qcow cluster_bits \(h.clusterBits) is outside 9..16 (cluster size 512 to 64k)")
        }
        guard l2BitsRange.contains(h.l2Bits) else {
            throw ImageError.corrupt("qcow l2_bits \(h.l2Bits) is outside 6..13 (L2 table size 512 to 64k)")
        }
        switch h.cryptMethod {
        case cryptNone: break
        case cryptAES:
            throw ImageError(.unsupported, "AES-encrypted qcow images are not supported; decrypt with 'qemu-img convert -O qcow2' first")
        default:
            throw ImageError.corrupt("qcow crypt_method \(h.cryptMethod) is unknown (0 none, 1 AES)")
        }
        // The L1 table must lie in the file past the fixed header. Paging it through the
        // cache keeps memory bounded, and fitting the file bounds the claimed size.
        let (l1End, overflow) = h.l1TableOffset.addingReportingOverflow(h.l1TableBytes)
        guard h.l1Entries <= UInt64(Int32.max) / 8 else {
            throw ImageError.corrupt("qcow L1 table needs \(h.l1Entries) entries; the image is too large")
        }
        guard h.l1TableOffset >= UInt64(size), !overflow, l1End <= fileSize else {
            throw ImageError.corrupt("qcow L1 table (\(h.l1Entries) entries at \(h.l1TableOffset)) does not fit the file (\(fileSize) bytes)")
        }
        if h.backingFileOffset != 0 {
            guard h.backingFileSize <= maxBackingNameLength else {
                throw ImageError.corrupt("qcow backing file name is too long (\(h.backingFileSize) bytes; 1023 at most)")
            }
            let (nameEnd, o) = h.backingFileOffset.addingReportingOverflow(UInt64(h.backingFileSize))
            guard !o, nameEnd <= fileSize, h.backingFileOffset >= UInt64(size) || h.backingFileSize == 0 else {
                throw ImageError.corrupt("qcow backing file name (offset \(h.backingFileOffset), \(h.backingFileSize) bytes) does not fit the file")
            }
        }
        return h
    }

    /// The backing file name from its raw bytes: up to the first NUL, as qemu reads it
    /// (a C string). Empty means no backing file.
    static func backingName(_ raw: [UInt8]) -> String? {
        let name = raw.prefix { $0 != 0 }
        return name.isEmpty ? nil : String(decoding: name, as: UTF8.self)
    }

    /// True when a host range overlaps the header, the backing file name or the L1
    /// table: an L2 table or data cluster there would be metadata corruption.
    func overlapsMetadata(_ offset: UInt64, _ length: UInt64) -> Bool {
        let end = offset + length  // callers bound both well below 2^63
        func hits(_ start: UInt64, _ stop: UInt64) -> Bool { offset < stop && start < end }
        if hits(0, UInt64(Self.size)) { return true }
        if hasBackingFile && hits(backingFileOffset, backingFileOffset + UInt64(backingFileSize)) { return true }
        return hits(l1TableOffset, l1TableEnd)
    }

    /// The 48 fixed bytes.
    func serialize() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: Self.size)
        b.putBE32(Self.magic, at: 0)
        b.putBE32(version, at: 4)
        b.putBE64(backingFileOffset, at: 8)
        b.putBE32(backingFileSize, at: 16)
        b.putBE32(mtime, at: 20)
        b.putBE64(size, at: 24)
        b[32] = clusterBits
        b[33] = l2Bits
        b.putBE32(cryptMethod, at: 36)
        b.putBE64(l1TableOffset, at: 40)
        return b
    }
}

/// One L2 entry (libqcow "Cluster block reference – version 1").
///
///     uncompressed: 63 = 0 | 0..62 host offset (qemu uses the low 63-cluster_bits bits)
///     compressed:   63 = 1 | (63-cluster_bits)..62 compressed size in bytes
///                          | 0..(62-cluster_bits) host offset (any byte, not aligned)
///     0: unallocated (reads the backing file, or zeroes)
struct QCOWEntry: Equatable {
    static let compressedFlag: UInt64 = 1 << 63
    var raw: UInt64

    var isUnallocated: Bool { raw == 0 }
    var isCompressed: Bool { raw & Self.compressedFlag != 0 }

    /// Host offset of the data (plain or compressed).
    func hostOffset(_ h: QCOWHeader) -> UInt64 { raw & h.hostOffsetMask }

    /// Compressed size in bytes (qemu: `(entry >> (63 - cluster_bits)) & (cluster_size - 1)`).
    func compressedSize(_ h: QCOWHeader) -> UInt64 {
        (raw >> (63 - UInt64(h.clusterBits))) & (h.clusterSize - 1)
    }
}
