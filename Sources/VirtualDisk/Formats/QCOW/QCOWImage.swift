import CVloop

/// A QCOW version 1 layer: one L1 table of L2 table offsets, L2 tables of data cluster
/// offsets, compressed clusters (raw deflate), and a backing file named in the header.
/// There are no refcounts, snapshots or zero flags; like qemu, new clusters and L2
/// tables always go at the end of the file and are never reused.
///
/// Tables go through the shared `MetadataCache` in pages, so memory stays bounded
/// whatever the image claims: the L1 table in pages of up to `l1PageBytes` measured
/// from its start (it need not be aligned, and qemu puts it right after the header),
/// each L2 table as one page of `l2TableBytes`. Pages hold only table bytes, so
/// writing one back never touches the header or data around it.
///
/// Write-back order, lowest first, with a storage barrier before each rank:
///
///     data clusters (written directly) → 0 L2 tables → 1 L1 table
///
/// so a crash can leak space at the end of the file but never expose an L2 table or
/// cluster whose contents have not reached the disk.
public final class QCOWLayer: FormatLayer, @unchecked Sendable {
    // Safe: the mutable properties (endOffset, lastDecompressed) are guarded by `lock`,
    // and cache pages are only touched under `lock`; `header` is immutable after open.
    // `allocLock` only serialises allocating writes (taken before `lock`, never after).

    static let rankL2 = 0
    static let rankL1 = 1
    static let l1PageBytes: UInt64 = 4096

    let file: HostFile
    let header: QCOWHeader
    let backingName: String?
    let cache: MetadataCache
    let owner = MetadataCache.newOwner()
    let writable: Bool
    let lock = MetadataLock()
    let allocLock = Lock()

    /// First byte past everything allocated (on disk or as a dirty page): new L2 tables
    /// and clusters go at or after it, aligned to the cluster size as qemu does.
    var endOffset: UInt64
    private var lastDecompressed: (token: UInt64, bytes: [UInt8])?

    var clusterSize: UInt64 { header.clusterSize }
    var virtualSize: UInt64 { header.virtualSize }

    init(file: HostFile, header: QCOWHeader, backingName: String?, context: OpenContext) throws {
        self.file = file
        self.header = header
        self.backingName = backingName
        self.cache = context.cache
        self.writable = context.writable
        self.endOffset = try file.size()
    }

    /// Open a QCOW (version 1) image: parse and validate the header, read the backing
    /// file name. Encrypted images are refused.
    public static func open(file: HostFile, context: OpenContext) throws -> QCOWLayer {
        let fileSize = try file.size()
        let head = try file.read(at: 0, count: QCOWHeader.size)
        let header = try QCOWHeader.parse(fileSize < UInt64(QCOWHeader.size) ? Array(head.prefix(Int(fileSize))) : head,
                                          fileSize: fileSize)
        var name: String?
        if header.hasBackingFile {
            name = QCOWHeader.backingName(try file.read(at: header.backingFileOffset, count: Int(header.backingFileSize)))
        }
        return try QCOWLayer(file: file, header: header, backingName: name, context: context)
    }

    public var layerInfo: ImageInfo {
        var caps: Capabilities = [.discard]
        if backingName == nil { caps.insert(.efficientZero) }
        if writable { caps.insert(.writable) }
        let backing = backingName.map { BackingReference(name: $0, format: nil) }
        return ImageInfo(format: "qcow", virtualSize: virtualSize, clusterSize: clusterSize, capabilities: caps,
                         backing: backing, path: file.path)
    }

    // MARK: tables through the cache (all under `lock`)

    /// The cache page holding L1 entry `index`: its file offset and length.
    private func l1Page(_ index: UInt64) -> (offset: UInt64, count: Int, within: Int) {
        let pos = index * 8
        let start = pos / Self.l1PageBytes * Self.l1PageBytes
        let count = min(Self.l1PageBytes, header.l1TableBytes - start)
        return (header.l1TableOffset + start, Int(count), Int(pos - start))
    }

    func l1Entry(_ index: UInt64) throws -> UInt64 {
        let (page, count, within) = l1Page(index)
        return try cache.withPage(owner: owner, offset: page, count: count, from: file, at: page) { p in
            ByteReader(p.bytes).be64(within)
        }
    }

    private func setL1Entry(_ index: UInt64, _ value: UInt64) throws {
        let (page, count, within) = l1Page(index)
        try cache.withPage(owner: owner, offset: page, count: count, from: file, at: page) { p in
            guard p.bytes.count >= within + 8 else { throw ImageError(.corrupt, "L1 page at \(page) is short", path: file.path) }
            p.bytes.putBE64(value, at: within)
            cache.markDirty(p, rank: Self.rankL1)
        }
    }

    /// Offset of the L2 table for L1 index `i`, validated; 0 when there is none.
    func l2TableOffset(_ i: UInt64) throws -> UInt64 {
        let off = try l1Entry(i)
        if off == 0 { return 0 }
        // Every table must lie inside what exists and clear of the header and L1 table;
        // this also keeps L2 pages from sharing a cache key with L1 pages.
        guard off < 1 << 62, off + header.l2TableBytes <= endOffset,
              !header.overlapsMetadata(off, header.l2TableBytes) else {
            throw ImageError(.corrupt, "L1 entry \(i) points to an invalid L2 table at \(off) (file ends at \(endOffset)); the image is damaged",
                             path: file.path, format: "qcow", offset: off)
        }
        return off
    }

    func l2Entry(table: UInt64, index: UInt64) throws -> QCOWEntry {
        try cache.withPage(owner: owner, offset: table, count: Int(header.l2TableBytes), from: file, at: table) { p in
            QCOWEntry(raw: ByteReader(p.bytes).be64(Int(index * 8)))
        }
    }

    /// The entry for a guest cluster (unallocated when it has no L2 table).
    func entry(guestCluster c: UInt64) throws -> QCOWEntry {
        let table = try l2TableOffset(c / header.l2Entries)
        if table == 0 { return QCOWEntry(raw: 0) }
        return try l2Entry(table: table, index: c % header.l2Entries)
    }

    /// Store an L2 entry, allocating its L2 table first when there is none.
    func setEntry(guestCluster c: UInt64, _ e: QCOWEntry) throws {
        let table = try writableL2Table(l1Index: c / header.l2Entries)
        let within = Int((c % header.l2Entries) * 8)
        try cache.withPage(owner: owner, offset: table, count: Int(header.l2TableBytes), from: file, at: table) { p in
            guard p.bytes.count >= within + 8 else { throw ImageError(.corrupt, "L2 table at \(table) is short", path: file.path) }
            p.bytes.putBE64(e.raw, at: within)
            cache.markDirty(p, rank: Self.rankL2)
        }
    }

    /// The L2 table for an L1 index, allocated (zeroed, at the end of the file) if absent.
    func writableL2Table(l1Index: UInt64) throws -> UInt64 {
        let old = try l2TableOffset(l1Index)
        if old != 0 { return old }
        let table = allocate(header.l2TableBytes)
        cache.install(owner: owner, offset: table, bytes: [UInt8](repeating: 0, count: Int(header.l2TableBytes)), rank: Self.rankL2)
        try setL1Entry(l1Index, table)
        return table
    }

    /// Reserve `length` bytes at the next cluster boundary at or past the end (qemu:
    /// `QEMU_ALIGN_UP(bdrv_getlength(file), cluster_size)`).
    func allocate(_ length: UInt64) -> UInt64 {
        let start = endOffset.alignedUp(clusterSize)
        endOffset = start + length
        return start
    }

    // MARK: mapping

    /// Check a plain data cluster's host offset; corrupt when it cannot be right.
    func checkData(_ host: UInt64, _ e: QCOWEntry) throws {
        if host + clusterSize > endOffset || header.overlapsMetadata(host, clusterSize) {
            throw ImageError(.corrupt, "L2 entry \(String(e.raw, radix: 16)) points to data at \(host) outside the data area (file ends at \(endOffset)); the image is damaged",
                             path: file.path, format: "qcow", offset: host)
        }
    }

    /// Host range of a compressed cluster, validated.
    func compressedRange(_ e: QCOWEntry) throws -> (offset: UInt64, length: UInt64) {
        let host = e.hostOffset(header)
        let length = e.compressedSize(header)
        if length == 0 || host + length > endOffset || header.overlapsMetadata(host, length) {
            throw ImageError(.corrupt, "compressed cluster entry \(String(e.raw, radix: 16)) (\(length) bytes at \(host)) is invalid; the image is damaged",
                             path: file.path, format: "qcow", offset: host)
        }
        return (host, length)
    }

    public func map(at offset: UInt64, length: UInt64) throws -> [LayerRun] {
        try lock.lookup { try mapLocked(at: offset, length: length) }
    }

    private func mapLocked(at offset: UInt64, length: UInt64) throws -> [LayerRun] {
        var runs: [LayerRun] = []
        let end = offset + length
        var pos = offset
        func add(_ len: UInt64, _ kind: LayerRun.Kind) {
            if var last = runs.last, last.end == pos {
                switch (last.kind, kind) {
                case (.unallocated, .unallocated):
                    last.length += len; runs[runs.count - 1] = last; return
                case let (.stored(_, h1), .stored(_, h2)) where h1 + last.length == h2:
                    last.length += len; runs[runs.count - 1] = last; return
                default: break
                }
            }
            runs.append(LayerRun(offset: pos, length: len, kind: kind))
        }
        while pos < end {
            let l1Index = pos / header.l1Coverage
            let tableEnd = min(end, (l1Index + 1) * header.l1Coverage)
            let table = try l2TableOffset(l1Index)
            if table == 0 {
                add(tableEnd - pos, .unallocated)
                pos = tableEnd
                continue
            }
            while pos < tableEnd {
                let c = pos / clusterSize
                let clusterEnd = min(tableEnd, (c + 1) * clusterSize)
                let e = try l2Entry(table: table, index: c % header.l2Entries)
                if e.isUnallocated {
                    add(clusterEnd - pos, .unallocated)
                } else if e.isCompressed {
                    _ = try compressedRange(e)
                    add(clusterEnd - pos, .encoded(token: e.raw))
                } else {
                    let host = e.hostOffset(header)
                    try checkData(host, e)
                    add(clusterEnd - pos, .stored(file: file, hostOffset: host + (pos - c * clusterSize)))
                }
                pos = clusterEnd
            }
        }
        return runs
    }

    // MARK: compressed clusters

    /// The whole decompressed cluster for a compressed entry.
    func decompress(_ token: UInt64) throws -> [UInt8] {
        if let cached = try lock.lookup({ lastDecompressed }), cached.token == token { return cached.bytes }
        // Decompressing is work for a thread that may take its time.
        try NonBlocking.check()
        let e = QCOWEntry(raw: token)
        let (off, len) = try lock.lookup { try compressedRange(e) }
        let input = try file.read(at: off, count: Int(len))
        var out = [UInt8](repeating: 0, count: Int(clusterSize))
        let n = input.withUnsafeBytes { src in
            out.withUnsafeMutableBytes { dst in
                Int(vl_inflate_raw(src.baseAddress, src.count, dst.baseAddress, dst.count))
            }
        }
        if n != Int(clusterSize) {
            throw ImageError(.corrupt, "compressed cluster at \(off) (\(len) bytes) does not decompress to \(clusterSize) bytes; the image is damaged",
                             path: file.path, format: "qcow", offset: off)
        }
        try lock.lookup { lastDecompressed = (token, out) }
        return out
    }

    public func readEncoded(token: UInt64, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        let bytes = try decompress(token)
        let start = Int(offset % clusterSize)
        bytes.withUnsafeBytes { src in
            buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[start..<(start + buffer.count)]))
        }
    }

    // MARK: flush / close

    public func flush() throws {
        try lock.flush(dirty: { cache.hasDirtyPages(owner: owner) }, locked: flushLocked, sync: file.sync)
    }

    func flushLocked() throws {
        try cache.writeBack(owner: owner, barrier: { try file.sync() }, write: { off, bytes in try file.write(bytes, at: off) })
        try file.sync()
    }

    public func close() throws {
        if writable { try flush() }
        cache.drop(owner: owner)
    }
}
