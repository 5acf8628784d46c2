/// A QCOW2 layer (v2 and v3): L1/L2 mapping with standard or extended (subcluster) L2
/// entries, zero clusters, compressed clusters (zlib, zstd), external data files,
/// refcounts of 1 to 64 bits, internal snapshots.
///
/// Every table (L1, L2, refcount table, refcount blocks) is read in pages of 4 KiB (or
/// the cluster, when smaller) through the shared `MetadataCache`; nothing is held whole.
/// A lookup that misses reads 4 KiB, not a whole 64 KiB or 2 MiB table, as qemu's L2
/// slices do; tables are cluster aligned, so no page straddles two of them. Write-back ranks, lowest
/// first, with a storage barrier before each rank:
///
///     data clusters (written directly) → 0 refcount blocks → 1 refcount table
///                                      → 2 L2 tables → 3 L1 table
///
/// so a crash can leak clusters but never expose a cluster whose data or refcount has
/// not reached the disk.
public final class QCOW2Layer: FormatLayer, @unchecked Sendable {
    // Safe: the mutable properties below (header, endCluster, freeHint, deferredFrees,
    // lastDecompressed) are guarded by `lock`; `allocLock` only orders allocating writes.

    static let rankRefcountBlock = 0
    static let rankRefcountTable = 1
    static let rankL2 = 2
    static let rankL1 = 3

    let file: HostFile
    let dataFile: HostFile
    let cache: MetadataCache
    let owner = MetadataCache.newOwner()
    let writable: Bool
    let lock = MetadataLock()
    let allocLock = Lock()

    var header: QCOW2Header
    /// First cluster index past everything allocated: new metadata goes here.
    var endCluster: UInt64
    /// Lowest cluster index that may be free.
    var freeHint: UInt64 = 0
    /// Host ranges whose references were dropped by writes; released with no I/O in flight.
    var deferredFrees: [(offset: UInt64, length: UInt64)] = []
    /// References dropped from tables whose new contents are not on disk yet. The
    /// refcounts go down only after those tables are written back and synced (at
    /// flush): decreasing first could leave a crashed image with a cluster still
    /// referenced on disk but free in its refcounts, and reused.
    var pendingDecrements: [(offset: UInt64, length: UInt64)] = []
    private var lastDecompressed: (token: UInt64, bytes: [UInt8])?
    /// Where the next compressed cluster may be packed (convert -c).
    var compressedCursor: UInt64?

    // Fixed for the life of the image, so kept apart from `header`: the data path
    // (compressing, decompressing) reads them without the lock.
    let clusterSize: UInt64
    /// The size of a metadata page in the cache.
    let pageSize: UInt64
    /// Bits of a compressed cluster descriptor that hold its host offset.
    let compressedOffsetBits: UInt64
    /// Compressed clusters are zstd (compression type 1), else deflate.
    let zstd: Bool
    var externalData: Bool { dataFile !== file }

    init(file: HostFile, header: QCOW2Header, dataFile: HostFile?, context: OpenContext) throws {
        self.file = file
        self.header = header
        self.dataFile = dataFile ?? file
        self.cache = context.cache
        self.writable = context.writable
        self.endCluster = (try file.size()).alignedUp(header.clusterSize) / header.clusterSize
        self.clusterSize = header.clusterSize
        self.pageSize = min(header.clusterSize, 4096)
        self.compressedOffsetBits = 62 - (UInt64(header.clusterBits) - 8)
        self.zstd = header.compressionType == 1
    }

    /// Open a QCOW2 image: parse, validate, and (read-write) repair a dirty image.
    public static func open(file: HostFile, context: OpenContext) throws -> QCOW2Layer {
        let fileSize = try file.size()
        var first = try file.read(at: 0, count: 4096)
        let clusterBits = ByteReader(first).be32(20)
        if clusterBits > 12 && clusterBits <= 21 {
            first = try file.read(at: 0, count: 1 << Int(clusterBits))
        }
        let header = try QCOW2Header.parse(first, fileSize: fileSize)
        if header.isCorrupt && context.writable {
            throw ImageError(.corrupt, "image is marked corrupt; open it read-only, or repair it with 'vloop check -r all \(file.path)'",
                             path: file.path, format: "qcow2")
        }
        var dataFile: HostFile?
        if header.hasDataFile {
            guard let name = header.dataFile, !name.isEmpty else {
                throw ImageError(.corrupt, "image needs an external data file but does not name one", path: file.path)
            }
            dataFile = try context.openAuxiliary(name, context.writable)
        }
        let layer = try QCOW2Layer(file: file, header: header, dataFile: dataFile, context: context)
        if context.writable {
            try layer.prepareForWriting()
        }
        return layer
    }

    /// Read-write open: rebuild refcounts of a dirty (lazy-refcount) image, and clear
    /// autoclear bits for structures this implementation does not keep up to date.
    private func prepareForWriting() throws {
        try lock.run {
            if header.isDirty {
                _ = try checkLocked(repair: .all)
                header.incompatibleFeatures &= ~QCOW2Header.incompatDirty
            }
            // Persistent bitmaps are not updated by our writes: the spec's autoclear rule
            // says a writer that does not maintain them clears their bit, so qemu later
            // sees them as inconsistent instead of trusting stale bits.
            header.autoclearFeatures &= QCOW2Header.autoclearDataFileRaw
            try writeHeaderFields()
        }
    }

    public var layerInfo: ImageInfo {
        lock.run {
            var caps: Capabilities = [.discard, .efficientZero, .resize, .snapshots]
            if writable { caps.insert(.writable) }
            var specific: [(String, JSONValue)] = [("compat", .string(header.version >= 3 ? "1.1" : "0.10"))]
            if header.version >= 3 {
                specific.append(("compression-type", .string(header.compressionType == 1 ? "zstd" : "zlib")))
                specific.append(("lazy-refcounts", .bool(header.lazyRefcounts)))
                specific.append(("refcount-bits", .uint(header.refcountBits)))
                specific.append(("corrupt", .bool(header.isCorrupt)))
                specific.append(("extended-l2", .bool(header.extendedL2)))
                if let df = header.dataFile {
                    specific.append(("data-file", .string(df)))
                    specific.append(("data-file-raw", .bool(header.dataFileRaw)))
                }
            }
            let backing = header.backingFile.map { BackingReference(name: $0, format: header.backingFormat) }
            return ImageInfo(format: "qcow2", virtualSize: header.size, clusterSize: clusterSize, capabilities: caps,
                             backing: backing, path: file.path, dirty: header.isDirty, formatSpecific: specific)
        }
    }

    // MARK: tables through the cache

    /// Run `body` on the cached page that holds byte `pos` of the image file, with the
    /// offset of `pos` within it.
    func withTablePage<R>(_ pos: UInt64, _ body: (MetadataCache.Page, Int) throws -> R) throws -> R {
        let page = pos.alignedDown(pageSize)
        return try cache.withPage(owner: owner, offset: page, count: Int(pageSize), from: file, at: page) { p in
            try body(p, Int(pos - page))
        }
    }

    /// Read the 64-bit big-endian entry `index` of the table at `table`.
    func tableEntry(_ table: UInt64, _ index: UInt64) throws -> UInt64 {
        try withTablePage(table + index * 8) { p, within in ByteReader(p.bytes).be64(within) }
    }

    func setTableEntry(_ table: UInt64, _ index: UInt64, _ value: UInt64, rank: Int) throws {
        if rank == Self.rankL2 {
            try checkTableTarget(table + index * 8, "L2 table")
        } else if (table + index * 8) / clusterSize >= endCluster {
            // The L1 or refcount table, where the header places it: inside the image.
            try checkTableTarget(table + index * 8, rank == Self.rankL1 ? "L1 table" : "refcount table")
        }
        try withTablePage(table + index * 8) { p, within in
            p.bytes.putBE64(value, at: within)
            cache.markDirty(p, rank: rank)
        }
    }

    /// The structure that host bytes `start ..< end` would damage if written as
    /// something else: the header, the L1 table, the refcount table, or nothing at all
    /// (past the end of the file, as far as this image has allocated); nil when none.
    func structureHit(_ start: UInt64, _ end: UInt64) -> String? {
        func overlaps(_ at: UInt64, _ length: UInt64) -> Bool { start < at + length && at < end }
        if start < clusterSize { return "the header" }
        if end > endCluster * clusterSize { return "past the end of the file (\(endCluster * clusterSize) bytes)" }
        // (No L1 table yet while a new image is made: offset 0.)
        if header.l1TableOffset != 0 && overlaps(header.l1TableOffset, UInt64(header.l1Size) * 8) { return "the L1 table" }
        if overlaps(header.refcountTableOffset, UInt64(header.refcountTableClusters) * clusterSize) { return "the refcount table" }
        return nil
    }

    /// Refuse to change the table page holding `pos` (of an L2 table or refcount block,
    /// `what`) where a damaged entry has put it: past the end of the image (it reads as
    /// zeroes, but writing it back would grow the file to wherever the entry points),
    /// or over the header, the L1 table or the refcount table.
    func checkTableTarget(_ pos: UInt64, _ what: @autoclosure () -> String) throws {
        let page = pos.alignedDown(pageSize)
        // Past the end first: a damaged entry may sit a page below 2^64.
        let hit = page / clusterSize >= endCluster ? structureHit(page, UInt64.max) : structureHit(page, page + pageSize)
        guard let hit else { return }
        let place = hit.hasPrefix("past") ? hit : "over " + hit
        throw ImageError(.corrupt, "the \(what()) at \(pos.alignedDown(clusterSize)) lies \(place); writing it would damage the image, so the write is refused; run 'vloop check -r all'",
                         path: file.path, format: "qcow2", offset: pos)
    }

    /// A whole table (`length` bytes from `offset`) as it stands, dirty pages included.
    func readTable(at offset: UInt64, length: UInt64) throws -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(Int(length))
        var at = offset
        while at < offset + length {
            try withTablePage(at) { p, _ in out += p.bytes }
            at += pageSize
        }
        return out
    }

    /// Put a table this image has just made (`bytes`, whole clusters) into the cache, dirty.
    func installTable(at offset: UInt64, _ bytes: [UInt8], rank: Int) {
        cache.install(owner: owner, offset: offset, bytes: bytes, pageSize: Int(pageSize), rank: rank)
    }

    /// Forget whatever the cache holds for `count` clusters from `offset`: they were
    /// freed, or hold something else now.
    func forgetClusters(at offset: UInt64, count: UInt64 = 1) {
        cache.invalidate(owner: owner, offset: offset, length: count * clusterSize, pageSize: pageSize)
    }

    /// L2 table offset for L1 index `i` in the L1 table at `l1` (0 when unallocated).
    func l2TableOffset(l1: UInt64, _ i: UInt64) throws -> (offset: UInt64, copied: Bool) {
        let e = try tableEntry(l1, i)
        let off = e & L2Entry.offsetMask
        if off % clusterSize != 0 {
            throw ImageError(.corrupt, "L1 entry \(i) points to unaligned L2 table at \(off); run 'vloop check -r all'", path: file.path)
        }
        return (off, e & L2Entry.copied != 0)
    }

    /// The L2 entry for a guest cluster in the active table (entry 0 when no L2 table).
    func l2Entry(guestCluster c: UInt64) throws -> L2Entry {
        let (l2, _) = try l2TableOffset(l1: header.l1TableOffset, c / header.l2Entries)
        if l2 == 0 { return L2Entry(raw: 0, bitmap: 0) }
        return try l2Entry(table: l2, index: c % header.l2Entries)
    }

    func l2Entry(table l2: UInt64, index: UInt64) throws -> L2Entry {
        if header.extendedL2 {
            return L2Entry(raw: try tableEntry(l2, index * 2), bitmap: try tableEntry(l2, index * 2 + 1))
        }
        return L2Entry(raw: try tableEntry(l2, index), bitmap: 0)
    }

    func writeHeaderFields() throws {
        let bytes = header.fixedFields()
        try file.write(bytes, at: 0)
    }

    // MARK: mapping

    /// State of one subcluster (or whole cluster without extended L2).
    enum UnitState { case data(UInt64), zero, unallocated, compressed(UInt64) }

    /// Classify the `sub`th subcluster of a cluster with entry `e`.
    func unitState(_ e: L2Entry, sub: UInt64) throws -> UnitState {
        if e.isCompressed { return .compressed(e.raw) }
        let host = e.hostOffset
        if header.extendedL2 {
            let alloc = e.bitmap >> sub & 1 != 0
            let zero = e.bitmap >> (32 + sub) & 1 != 0
            if alloc && zero {
                throw ImageError(.corrupt, "subcluster both allocated and zero (L2 bitmap \(String(e.bitmap, radix: 16))); run 'vloop check -r all'", path: file.path)
            }
            if zero { return .zero }
            if alloc {
                if host == 0 && !externalData { throw ImageError(.corrupt, "allocated subcluster without a host cluster", path: file.path) }
                return .data(host + sub * (clusterSize / 32))
            }
            return .unallocated
        }
        if e.raw & L2Entry.zeroFlag != 0 { return .zero }
        if host != 0 || (externalData && e.raw & L2Entry.copied != 0) { return .data(host) }
        return .unallocated
    }

    public func map(at offset: UInt64, length: UInt64) throws -> [LayerRun] {
        try lock.lookup { try mapLocked(l1: header.l1TableOffset, at: offset, length: length) }
    }

    func mapLocked(l1: UInt64, at offset: UInt64, length: UInt64) throws -> [LayerRun] {
        var runs: [LayerRun] = []
        let end = offset + length
        let units = header.subclustersPerCluster
        let unitSize = clusterSize / units
        var pos = offset
        func add(_ len: UInt64, _ kind: LayerRun.Kind) {
            if var last = runs.last, last.end == pos {
                switch (last.kind, kind) {
                case (.zero, .zero), (.unallocated, .unallocated):
                    last.length += len; runs[runs.count - 1] = last; return
                case let (.stored(f1, h1), .stored(f2, h2)) where f1 === f2 && h1 + last.length == h2:
                    last.length += len; runs[runs.count - 1] = last; return
                case let (.encoded(t1), .encoded(t2)) where t1 == t2:
                    last.length += len; runs[runs.count - 1] = last; return
                default: break
                }
            }
            runs.append(LayerRun(offset: pos, length: len, kind: kind))
        }
        while pos < end {
            let cluster = pos / clusterSize
            let l1Index = cluster / header.l2Entries
            let (l2, _) = try l2TableOffset(l1: l1, l1Index)
            // All clusters this L2 table covers within the request.
            let tableEnd = min(end, (l1Index + 1) * header.l2Entries * clusterSize)
            if l2 == 0 {
                add(tableEnd - pos, .unallocated)
                pos = tableEnd
                continue
            }
            while pos < tableEnd {
                let c = pos / clusterSize
                let e = try l2Entry(table: l2, index: c % header.l2Entries)
                let sub = (pos % clusterSize) / unitSize
                let unitEnd = min(tableEnd, c * clusterSize + (sub + 1) * unitSize)
                let len = unitEnd - pos
                switch try unitState(e, sub: sub) {
                case .data(let host):
                    try checkHost(host, e)
                    add(len, .stored(file: dataFile, hostOffset: host + (pos - c * clusterSize - sub * unitSize)))
                case .zero: add(len, .zero)
                case .unallocated: add(len, .unallocated)
                case .compressed(let token): add(len, .encoded(token: token))
                }
                pos = unitEnd
            }
        }
        return runs
    }

    private func checkHost(_ host: UInt64, _ e: L2Entry) throws {
        if host % clusterSize != 0 && !header.extendedL2 {
            throw ImageError(.corrupt, "L2 entry \(String(e.raw, radix: 16)) points to unaligned cluster \(host); run 'vloop check -r all'", path: file.path)
        }
    }

    // MARK: compressed clusters

    /// Host range of a compressed cluster descriptor (qcow2 spec, "Compressed Clusters Descriptor").
    func compressedRange(_ token: UInt64) -> (offset: UInt64, length: UInt64) {
        let x = compressedOffsetBits
        let offset = token & ((1 << x) - 1)
        let sectors = (token >> x) & ((1 << (62 - x)) - 1)
        let length = (sectors + 1) * 512 - (offset & 511)
        return (offset, length)
    }

    func decompress(_ token: UInt64) throws -> [UInt8] {
        if let cached = try lock.lookup({ lastDecompressed }), cached.token == token { return cached.bytes }
        // Decompressing is work for a thread that may take its time.
        try NonBlocking.check()
        let (off, len) = compressedRange(token)
        let capped = min(len, clusterSize * 2 + 512)
        let input = try file.read(at: off, count: Int(capped))
        var out = [UInt8](repeating: 0, count: Int(clusterSize))
        let n = input.withUnsafeBytes { src in
            out.withUnsafeMutableBytes { dst in
                zstd
                    ? vlZstdDecompress(src, dst)
                    : vlInflate(src, dst)
            }
        }
        if n != Int(clusterSize) {
            throw ImageError(.corrupt, "compressed cluster at \(off) does not decompress (\(zstd ? "zstd" : "zlib")); run 'vloop check'", path: file.path, offset: off)
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
        try lock.flush(dirty: { cache.hasDirtyPages(owner: owner) || !pendingDecrements.isEmpty }, locked: flushLocked) {
            if externalData { try dataFile.sync() }
            try file.sync()
        }
    }

    func flushLocked() throws {
        if externalData { try dataFile.sync() }
        try cache.writeBack(owner: owner, barrier: { try file.sync() }, write: { off, bytes in try writePage(bytes, at: off) })
        try file.sync()
        if !pendingDecrements.isEmpty {
            // The tables that dropped these references are on disk now.
            let pending = pendingDecrements
            pendingDecrements = []
            for f in pending { try freeRange(f.offset, f.length) }
            try cache.writeBack(owner: owner, barrier: {}, write: { off, bytes in try writePage(bytes, at: off) })
            try file.sync()
        }
    }

    /// Write back early when memory or the list of pending frees grows large.
    func writeBackIfNeeded() throws {
        if pendingDecrements.count > 4096 || cache.isOverBudget(owner: owner) { try flushLocked() }
    }

    /// The bytes of `bytes` up to its last non-zero one, rounded up to 4 KiB (a
    /// file-system block): what must be written of a table whose tail may be a hole.
    static func usedHead(_ bytes: [UInt8]) -> Int {
        var used = bytes.count
        while used > 0 && bytes[used - 1] == 0 { used -= 1 }
        return min(bytes.count, (used + 4095) / 4096 * 4096)
    }

    /// Write a metadata page, leaving its all-zero tail as a hole: mostly-empty tables
    /// (a fresh L1, a new refcount block) then take a file-system block or two, not a
    /// cluster. An all-zero page past the end of the file is not written at all, except
    /// at the start of a cluster: the file must reach every cluster in use, or the next
    /// open would take the end of the file for free space.
    private func writePage(_ bytes: [UInt8], at offset: UInt64) throws {
        let head = Self.usedHead(bytes)
        if head == bytes.count {
            try file.write(bytes, at: offset)
            return
        }
        let tail = UInt64(bytes.count - head)
        if try file.size() <= offset + UInt64(head) {
            // The tail lies past the end of the file: it reads as zeroes already.
            if head > 0 || offset % clusterSize == 0 {
                try file.write(Array(bytes[0..<max(head, 8)]), at: offset)
            }
        } else if file.punchHole(at: offset + UInt64(head), length: tail) {
            if head > 0 { try file.write(Array(bytes[0..<head]), at: offset) }
        } else {
            try file.write(bytes, at: offset)
        }
    }

    public func close() throws {
        if writable {
            try releaseDeferredFrees()
            try flush()
        }
        cache.drop(owner: owner)
    }

    public var hasDeferredFrees: Bool { lock.run { !deferredFrees.isEmpty } }

    public func releaseDeferredFrees() throws {
        try lock.run { try releaseDeferredFreesLocked() }
    }
}

func vlInflate(_ src: UnsafeRawBufferPointer, _ dst: UnsafeMutableRawBufferPointer) -> Int {
    Int(vl_inflate_raw(src.baseAddress, src.count, dst.baseAddress, dst.count))
}

func vlZstdDecompress(_ src: UnsafeRawBufferPointer, _ dst: UnsafeMutableRawBufferPointer) -> Int {
    Int(vl_zstd_decompress_stream(src.baseAddress, src.count, dst.baseAddress, dst.count))
}

import CVloop
