extension QCOWLayer {
    /// Write a new, empty QCOW (version 1) image at `path`, laid out as
    /// `qemu-img create -f qcow` lays it out (block/qcow.c qcow_co_create):
    ///
    ///     0 header (48) | backing file name | pad to 8 | L1 table, zeroed in 512-byte sectors
    ///
    /// - Parameters:
    ///   - size: virtual size in bytes, rounded up to 512 as qemu-img does.
    ///   - clusterSize: 512 to 64k, a power of two. nil takes qemu's choice: 4k clusters
    ///     with 4k L2 tables, or, with a backing file, 512-byte clusters with 32k L2 tables
    ///     (qemu's small clusters keep partial writes from copying much of the backing file).
    ///   - l2Bits: log2 of the entries per L2 table (6 to 13). nil takes qemu's choice for
    ///     the default cluster size, and one cluster per L2 table otherwise.
    ///   - backingFile: name recorded in the header (qcow has no field for its format).
    public static func create(path: String, size: UInt64, clusterSize: UInt64? = nil, l2Bits: UInt8? = nil,
                              backingFile: String? = nil) throws {
        guard size > 0, size <= UInt64(Int64.max) / 2 else {
            throw ImageError(.invalidArgument, "qcow image size must be between 1 byte and \(UInt64(Int64.max) / 2) bytes (got \(size))")
        }
        var h = QCOWHeader()
        h.size = size.alignedUp(512)
        let backing = backingFile.flatMap { $0.isEmpty ? nil : Array($0.utf8) }
        if let backing {
            guard backing.count <= Int(QCOWHeader.maxBackingNameLength), !backing.contains(0) else {
                throw ImageError(.invalidArgument, "backing file name must be at most 1023 bytes, without NUL characters")
            }
        }
        if let clusterSize {
            guard clusterSize.isPowerOfTwo, clusterSize >= 512, clusterSize <= 65536 else {
                throw ImageError(.invalidArgument, "qcow cluster size must be a power of two from 512 to 64k (got \(clusterSize))")
            }
            h.clusterBits = UInt8(clusterSize.trailingZeroBitCount)
            h.l2Bits = l2Bits ?? h.clusterBits - 3
        } else {
            h.clusterBits = backing == nil ? 12 : 9
            h.l2Bits = l2Bits ?? (backing == nil ? 9 : 12)
        }
        guard QCOWHeader.l2BitsRange.contains(h.l2Bits) else {
            throw ImageError(.invalidArgument, "qcow l2_bits must be from 6 to 13 (L2 tables of 512 bytes to 64k; got \(h.l2Bits))")
        }
        guard h.l1Entries <= 4 << 20 else {
            throw ImageError(.invalidArgument, "virtual size \(size) needs an L1 table of \(h.l1Entries) entries; use a larger cluster size")
        }
        var headerSize = QCOWHeader.size
        if let backing {
            h.backingFileOffset = UInt64(headerSize)
            h.backingFileSize = UInt32(backing.count)
            headerSize += backing.count
        }
        headerSize = (headerSize + 7) & ~7
        h.l1TableOffset = UInt64(headerSize)

        // qemu writes the L1 table as whole zeroed sectors; the file ends there.
        let l1Sectors = (h.l1TableBytes + 511) / 512
        var head = h.serialize()
        if let backing { head += backing }
        head += [UInt8](repeating: 0, count: headerSize - head.count)
        let file = try HostFile(path: path, writable: true, create: true, truncate: true)
        try file.write(head, at: 0)
        try file.writeZeroes(at: UInt64(headerSize), length: l1Sectors * 512)
        try file.truncate(to: UInt64(headerSize) + l1Sectors * 512)
        try file.sync()
    }
}
