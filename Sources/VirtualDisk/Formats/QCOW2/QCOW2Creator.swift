/// Creating QCOW2 images with qemu-img's option names.
public struct QCOW2CreateOptions: Sendable {
    public var size: UInt64
    public var clusterSize: UInt64 = 65536
    public var compat: String = "1.1"
    public var lazyRefcounts = false
    public var refcountBits: UInt64 = 16
    public var extendedL2 = false
    public var compressionType = "zlib"
    public var dataFile: String?
    public var dataFileRaw = false
    public var preallocation = "off"
    public var backingFile: String?
    public var backingFormat: String?

    public init(size: UInt64) { self.size = size }
}

extension QCOW2Layer {
    /// Write a new, empty QCOW2 image at `path`. Layout, as qemu-img's:
    ///
    ///     cluster 0 header | 1 refcount table | 2 refcount block | 3.. L1 table
    public static func create(path: String, options o: QCOW2CreateOptions,
                              openAuxiliary: @escaping @Sendable (String, Bool) throws -> HostFile) throws {
        guard o.clusterSize.isPowerOfTwo, o.clusterSize >= 512, o.clusterSize <= 2 << 20 else {
            throw ImageError(.invalidArgument, "cluster_size must be a power of two between 512 and 2M")
        }
        guard o.refcountBits.isPowerOfTwo, o.refcountBits <= 64 else {
            throw ImageError(.invalidArgument, "refcount_bits must be a power of two from 1 to 64")
        }
        var h = QCOW2Header()
        switch o.compat {
        case "0.10", "v2": h.version = 2
        case "1.1", "v3": h.version = 3
        default: throw ImageError(.invalidArgument, "compat must be 0.10 or 1.1 (got '\(o.compat)')")
        }
        if h.version == 2 {
            if o.refcountBits != 16 { throw ImageError(.invalidArgument, "refcount_bits other than 16 needs compat=1.1") }
            if o.lazyRefcounts || o.extendedL2 || o.dataFile != nil || o.compressionType != "zlib" {
                throw ImageError(.invalidArgument, "lazy_refcounts, extended_l2, data_file and compression_type need compat=1.1")
            }
        }
        if o.extendedL2 && o.clusterSize < 16384 {
            throw ImageError(.invalidArgument, "extended_l2 needs cluster_size of at least 16k")
        }
        h.clusterBits = UInt32(o.clusterSize.trailingZeroBitCount)
        h.size = o.size
        h.refcountOrder = UInt32(o.refcountBits.trailingZeroBitCount)
        h.headerLength = h.version >= 3 ? 112 : 72
        if o.lazyRefcounts { h.compatibleFeatures |= QCOW2Header.compatLazyRefcounts }
        if o.extendedL2 { h.incompatibleFeatures |= QCOW2Header.incompatExtendedL2 }
        switch o.compressionType {
        case "zlib": break
        case "zstd": h.compressionType = 1; h.incompatibleFeatures |= QCOW2Header.incompatCompression
        default: throw ImageError(.invalidArgument, "compression_type must be zlib or zstd")
        }
        if let df = o.dataFile {
            h.dataFile = df
            h.incompatibleFeatures |= QCOW2Header.incompatDataFile
            if o.dataFileRaw { h.autoclearFeatures |= QCOW2Header.autoclearDataFileRaw }
        } else if o.dataFileRaw {
            throw ImageError(.invalidArgument, "data_file_raw needs data_file")
        }
        if let b = o.backingFile {
            h.backingFile = b
            h.backingFormat = o.backingFormat
        }
        let cs = o.clusterSize
        let l1Entries = try h.requiredL1Entries(for: o.size)
        guard l1Entries * 8 <= 32 << 20 else {
            throw ImageError(.invalidArgument, "virtual size \(o.size) is too large for cluster_size \(cs)")
        }
        h.l1Size = UInt32(l1Entries)
        h.refcountTableOffset = cs
        h.refcountTableClusters = 1
        h.l1TableOffset = 0

        let file = try HostFile(path: path, writable: true, create: true, truncate: true)
        let head = try h.serialize()
        // serialize() placed the backing name: keep its position for later header updates.
        h.backingFileOffset = ByteReader(head).be64(8)
        h.backingFileSize = ByteReader(head).be32(16)
        var rt = [UInt8](repeating: 0, count: Int(cs))
        rt.putBE64(2 * cs, at: 0)
        var rb = [UInt8](repeating: 0, count: Int(cs))
        for c in 0..<UInt64(3) where c < cs * 8 / o.refcountBits {
            putRefcount(&rb, c, h.refcountOrder, 1)
        }
        // The file is new: the zero tails of the header, the refcount table and the
        // block stay holes (the L1 table's truncate below makes the file reach them).
        for (bytes, at) in [(head, 0), (rt, cs), (rb, 2 * cs)] {
            try file.write(Array(bytes[0..<QCOW2Layer.usedHead(bytes)]), at: at)
        }

        var dataHost: HostFile?
        if let df = o.dataFile {
            let d = try openAuxiliary(df, true)
            try d.truncate(to: o.dataFileRaw ? o.size : 0)
            dataHost = d
        }
        let layer = try QCOW2Layer(file: file, header: h, dataFile: dataHost,
                                   context: OpenContext(writable: true, openAuxiliary: openAuxiliary))
        try layer.lock.run {
            let l1 = try layer.allocateContiguous(max(1, (l1Entries * 8).alignedUp(cs) / cs))
            layer.header.l1TableOffset = l1
            try layer.writeHeaderFields()
            try file.truncate(to: l1 + max(l1Entries * 8, 8))
            try layer.flushLocked()
        }
        if o.preallocation != "off" {
            try layer.preallocate(mode: o.preallocation)
        }
        try layer.close()
    }

    /// Map every cluster to host space ("metadata"), and reserve ("falloc") or write
    /// ("full") it.
    func preallocate(mode: String) throws {
        guard ["metadata", "falloc", "full"].contains(mode) else {
            throw ImageError(.invalidArgument, "preallocation must be off, metadata, falloc or full (got '\(mode)')")
        }
        try lock.run {
            let clusters = header.size.alignedUp(clusterSize) / clusterSize
            // L2 tables first, then data in one contiguous run, as qemu lays it out.
            for i in 0..<((clusters + header.l2Entries - 1) / header.l2Entries) { _ = try writableL2Table(l1Index: i) }
            let data = externalData ? 0 : try allocateContiguous(clusters)
            for c in 0..<clusters {
                let host = externalData ? c * clusterSize : data + c * clusterSize
                try setL2Entry(guestCluster: c, L2Entry(raw: host | L2Entry.copied, bitmap: header.extendedL2 ? 0xffff_ffff : 0))
            }
            let target = externalData ? dataFile : file
            let start = externalData ? 0 : data
            let length = clusters * clusterSize
            switch mode {
            case "falloc": try target.preallocate(at: start, length: length)
            case "full": try target.writeZeroesExplicitly(at: start, length: length)
            default: if try target.size() < start + length { try target.truncate(to: start + length) }
            }
            try flushLocked()
        }
    }
}
