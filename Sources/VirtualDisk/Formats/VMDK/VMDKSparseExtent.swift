import Synchronization

/// A sparse extent: hosted ("KDMV", monolithicSparse / twoGbMaxExtentSparse /
/// streamOptimized), ESX "COWD" (vmfsSparse) or ESXi seSparse. All three map grains
/// through a two-level table:
///
///     grain directory (GD) ──► grain table (GT) ──► grain (grainBytes of data)
///
/// Both levels are read through the shared `MetadataCache`: the GD in 4 KiB pages,
/// each GT as one page (at most 32 KiB), keyed by GD index so a grain table keeps its
/// identity when a stream-optimized flush moves it. Nothing is loaded whole.
///
/// Write-back order (hosted, tables in place), a storage barrier before each rank:
///
///     grains (written directly) → GT pages (both copies) → GD pages → redundant GD
///
/// so a crash can leak a grain but never expose one whose data did not reach the disk.
/// Stream-optimized extents with the GD at the end rewrite their tables at flush
/// (see VMDKStreamOptimized.swift).
final class VMDKSparseExtent: VMDKExtentStore, @unchecked Sendable {
    // Safe: the mutable properties (gdOffset, dataEnd, fileLength, streamDirty,
    // pendingGTs, header, pending) are read and written only under `lock`; `allocLock`
    // orders allocating writes; cache pages belong to this extent's owners and are
    // touched only under `lock` (MetadataCache's ownership rule); `decoded` is a Mutex.

    enum Kind { case hosted, cowd, seSparse }
    enum Grain: Equatable { case unallocated, zero, data(UInt64), compressed(UInt64) }
    enum GTRef { case none, zeroed, present }

    static let pageSize: UInt64 = 4096
    static let rankGT = 0
    static let rankGD = 1
    /// Largest grain accepted (qemu allows 1 GiB; a grain is a unit of memory here).
    static let maxGrainBytes: UInt64 = 64 << 20
    static let maxCompressedGrainBytes: UInt64 = 16 << 20
    /// Largest grain directory accepted, in entries (qemu's limit).
    static let maxGDEntries: UInt64 = 32 << 20

    let kind: Kind
    let sparseFile: HostFile
    let access: VMDKDescriptor.Access
    let length: UInt64
    /// Bytes the tables cover (the header's capacity).
    let capacity: UInt64
    let grainBytes: UInt64
    let gtEntries: UInt64
    let entrySize: UInt64
    let gdEntries: UInt64
    let rgdOffset: UInt64?
    let compressed: Bool
    let markers: Bool
    let zeroedGTE: Bool
    /// Stream-optimized with the grain directory after the data (VMware's layout).
    let streamLayout: Bool
    let seTablesOffset: UInt64
    let seGrainsOffset: UInt64
    let canWrite: Bool
    let cache: MetadataCache
    let ownerGT = MetadataCache.newOwner()
    let ownerGD = MetadataCache.newOwner()
    let ownerRGD = MetadataCache.newOwner()
    let lock = MetadataLock()
    let allocLock = Lock()

    var header: VMDKSparseHeader?
    var gdOffset: UInt64
    var dataEnd: UInt64
    var fileLength: UInt64
    var streamDirty = false
    /// Stream layout: grain tables that exist only in the cache until the next flush.
    var pendingGTs: Set<UInt64> = []
    /// A compressed grain being filled by partial writes (see VMDKStreamOptimized).
    var pending: (grain: UInt64, bytes: [UInt8])?
    /// The last grain decompressed, by host offset.
    let decoded = Mutex<(UInt64, [UInt8])?>(nil)

    var file: HostFile? { sparseFile }
    var isCompressed: Bool { compressed }
    var typeName: String {
        switch kind {
        case .hosted: return compressed ? "SPARSE (stream-optimized)" : "SPARSE"
        case .cowd: return "VMFSSPARSE"
        case .seSparse: return "SESPARSE"
        }
    }
    var gtBytes: UInt64 { gtEntries * entrySize }
    var gdBytes: UInt64 { gdEntries * entrySize }

    init(kind: Kind, file: HostFile, access: VMDKDescriptor.Access, length: UInt64, capacity: UInt64, grainBytes: UInt64,
         gtEntries: UInt64, entrySize: UInt64, gdEntries: UInt64, gdOffset: UInt64, rgdOffset: UInt64?,
         header: VMDKSparseHeader?, streamLayout: Bool, seTablesOffset: UInt64 = 0, seGrainsOffset: UInt64 = 0,
         dataEnd: UInt64, fileLength: UInt64, canWrite: Bool, cache: MetadataCache) {
        self.kind = kind
        self.sparseFile = file
        self.access = access
        self.length = length
        self.capacity = capacity
        self.grainBytes = grainBytes
        self.gtEntries = gtEntries
        self.entrySize = entrySize
        self.gdEntries = gdEntries
        self.gdOffset = gdOffset
        self.rgdOffset = rgdOffset
        self.header = header
        self.compressed = header?.isCompressed ?? false
        self.markers = header?.hasMarkers ?? false
        self.zeroedGTE = header?.hasZeroedGTE ?? false
        self.streamLayout = streamLayout
        self.seTablesOffset = seTablesOffset
        self.seGrainsOffset = seGrainsOffset
        self.dataEnd = dataEnd
        self.fileLength = fileLength
        self.canWrite = canWrite
        self.cache = cache
    }

    // MARK: open

    static func corrupt(_ file: HostFile, _ message: String, offset: UInt64? = nil) -> ImageError {
        ImageError(.corrupt, message, path: file.path, format: "vmdk", offset: offset)
    }

    /// Open a hosted sparse extent ("KDMV"). `header` is the one at offset 0; for a
    /// stream-optimized extent with the GD at the end, the footer replaces it.
    /// `length` is the extent's size from the descriptor (nil: the header's capacity).
    static func openHosted(file: HostFile, header first: VMDKSparseHeader, length: UInt64?, access: VMDKDescriptor.Access,
                           writable: Bool, cache: MetadataCache) throws -> VMDKSparseExtent {
        let fileSize = try file.size()
        var h = first
        var streamLayout = false
        var dataEnd = fileSize.alignedUp(512)
        if h.gdOffset == VMDKSparseHeader.gdAtEnd {
            // The footer, one sector before the end-of-stream marker, holds the real GD.
            guard fileSize >= 1536 + 512 else { throw corrupt(file, "stream-optimized extent is too short to hold its footer") }
            let tail = try file.read(at: fileSize - 1536, count: 1536)
            let r = ByteReader(tail)
            guard r.le32(8) == 0, r.le32(12) == VMDKMarker.footer, let footer = VMDKSparseHeader.parse(Array(tail[512..<1024])),
                  r.le64(1024) == 0, r.le32(1032) == 0, r.le32(1036) == VMDKMarker.endOfStream else {
                throw corrupt(file, "stream-optimized extent has no valid footer and end-of-stream marker in its last 1536 bytes; the file is truncated or was not closed")
            }
            guard footer.gdOffset != VMDKSparseHeader.gdAtEnd else { throw corrupt(file, "the footer does not give the grain directory's offset") }
            h = footer
            streamLayout = true
            dataEnd = fileSize - 1536
        }
        guard (1...3).contains(h.version) else {
            throw ImageError(.unsupported, "VMDK sparse extent version \(h.version) is not supported (1 to 3 are)", path: file.path, format: "vmdk")
        }
        guard h.compressAlgorithm == 0 || h.compressAlgorithm == VMDKSparseHeader.compressionDeflate else {
            throw ImageError(.unsupported, "compression method \(h.compressAlgorithm) is not supported (deflate is)", path: file.path, format: "vmdk")
        }
        let maxGrain = h.isCompressed ? maxCompressedGrainBytes : maxGrainBytes
        guard h.grainSize.isPowerOfTwo, h.grainSize <= maxGrain / 512 else {
            throw corrupt(file, "grain size \(h.grainSize) sectors is not a power of two up to \(maxGrain / 512) sectors")
        }
        guard h.numGTEsPerGT >= 1, h.numGTEsPerGT <= 512 else {
            throw corrupt(file, "\(h.numGTEsPerGT) entries per grain table; 1 to 512 are allowed")
        }
        let capacity = try checkedProduct(h.capacity, 512, "capacity")
        guard h.capacity > 0, capacity < (1 << 62) else { throw corrupt(file, "capacity \(h.capacity) sectors is out of range") }
        let grainBytes = h.grainSize * 512
        let coverage = UInt64(h.numGTEsPerGT) * grainBytes
        let gdEntries = (capacity + coverage - 1) / coverage
        guard gdEntries <= maxGDEntries else {
            throw corrupt(file, "capacity \(h.capacity) sectors needs \(gdEntries) grain directory entries, more than the \(maxGDEntries) allowed")
        }
        let gdBytes = gdEntries * 4
        func checkTable(_ sector: UInt64, _ what: String) throws -> UInt64 {
            let at = try checkedProduct(sector, 512, what)
            let (end, o) = at.addingReportingOverflow(gdBytes)
            guard sector > 0, !o, end <= fileSize else {
                throw corrupt(file, "\(what) of \(gdEntries) entries at sector \(sector) does not fit in the file (\(fileSize) bytes)")
            }
            return at
        }
        let gd = try checkTable(h.gdOffset, "grain directory")
        var rgd: UInt64?
        if h.usesRedundantGD && !streamLayout && h.rgdOffset != 0 {
            rgd = try checkTable(h.rgdOffset, "redundant grain directory")
        }
        let overheadEnd = try checkedProduct(h.overHead, 512, "overhead")
        guard overheadEnd <= fileSize || streamLayout else {
            throw corrupt(file, "file truncated: the header says grains start at \(overheadEnd) bytes, the file has \(fileSize)")
        }
        // Version 3 without compression may track changed blocks (CBT) we would not
        // update: read only, as qemu does.
        let cbt = h.version == 3 && !h.isCompressed
        let canWrite = writable && file.writable && access == .readWrite && !cbt
            && (!h.isCompressed || h.hasMarkers)
        return VMDKSparseExtent(kind: .hosted, file: file, access: access, length: length ?? capacity, capacity: capacity,
                                grainBytes: grainBytes, gtEntries: UInt64(h.numGTEsPerGT), entrySize: 4, gdEntries: gdEntries,
                                gdOffset: gd, rgdOffset: rgd, header: h, streamLayout: streamLayout,
                                dataEnd: max(dataEnd, overheadEnd.alignedUp(512)), fileLength: fileSize, canWrite: canWrite, cache: cache)
    }

    /// Open an ESX "COWD" sparse extent (read only).
    static func openCOWD(file: HostFile, length: UInt64?, access: VMDKDescriptor.Access, cache: MetadataCache) throws -> VMDKSparseExtent {
        let fileSize = try file.size()
        guard let h = VMDKCOWDHeader.parse(try file.read(at: 0, count: 2048)) else { throw corrupt(file, "not a COWD extent") }
        guard h.grainSize.isPowerOfTwo, h.grainSize <= maxGrainBytes / 512 else {
            throw corrupt(file, "grain size \(h.grainSize) sectors is not a power of two up to \(maxGrainBytes / 512)")
        }
        let capacity = h.capacity * 512
        let grainBytes = h.grainSize * 512
        let coverage = VMDKCOWDHeader.gtEntries * grainBytes
        let needed = (capacity + coverage - 1) / coverage
        guard h.gdEntries >= needed, h.gdEntries <= maxGDEntries else {
            throw corrupt(file, "grain directory of \(h.gdEntries) entries does not cover the \(capacity)-byte extent")
        }
        let gd = h.gdOffset * 512
        guard h.gdOffset > 0, gd + h.gdEntries * 4 <= fileSize else {
            throw corrupt(file, "grain directory at sector \(h.gdOffset) does not fit in the file (\(fileSize) bytes)")
        }
        return VMDKSparseExtent(kind: .cowd, file: file, access: access, length: length ?? capacity, capacity: capacity,
                                grainBytes: grainBytes, gtEntries: VMDKCOWDHeader.gtEntries, entrySize: 4, gdEntries: h.gdEntries,
                                gdOffset: gd, rgdOffset: nil, header: nil, streamLayout: false,
                                dataEnd: fileSize, fileLength: fileSize, canWrite: false, cache: cache)
    }

    /// Open an ESXi seSparse extent (read only).
    static func openSESparse(file: HostFile, length: UInt64?, access: VMDKDescriptor.Access, cache: MetadataCache) throws -> VMDKSparseExtent {
        let fileSize = try file.size()
        let h = try ImageError.attributing(to: file.path) { try VMDKSESparseHeader.parse(try file.read(at: 0, count: 512)) }
        func region(_ sector: UInt64, _ sectors: UInt64, _ what: String) throws -> UInt64 {
            let at = try checkedProduct(sector, 512, what)
            let size = try checkedProduct(sectors, 512, what)
            let (end, o) = at.addingReportingOverflow(size)
            guard !o, end <= fileSize || what == "grains" else {
                throw corrupt(file, "seSparse \(what) at sector \(sector) (\(sectors) sectors) lies outside the file (\(fileSize) bytes)")
            }
            return at
        }
        let vol = try region(h.volatileHeaderOffset, 1, "volatile header")
        try ImageError.attributing(to: file.path) { try VMDKSESparseHeader.checkVolatile(try file.read(at: vol, count: 512)) }
        let gd = try region(h.grainDirOffset, h.grainDirSize, "grain directory")
        let tables = try region(h.grainTablesOffset, h.grainTablesSize, "grain tables")
        let grains = try region(h.grainsOffset, 0, "grains")
        let capacity = try checkedProduct(h.capacity, 512, "capacity")
        let grainBytes = h.grainSize * 512
        let gtEntries = h.grainTableSize * 512 / 8
        let coverage = gtEntries * grainBytes
        let needed = (capacity + coverage - 1) / coverage
        let gdEntries = h.grainDirSize * 512 / 8
        guard needed <= gdEntries, needed <= maxGDEntries else {
            throw corrupt(file, "seSparse grain directory (\(gdEntries) entries) does not cover the \(capacity)-byte disk")
        }
        return VMDKSparseExtent(kind: .seSparse, file: file, access: access, length: length ?? capacity, capacity: capacity,
                                grainBytes: grainBytes, gtEntries: gtEntries, entrySize: 8, gdEntries: needed,
                                gdOffset: gd, rgdOffset: nil, header: nil, streamLayout: false,
                                seTablesOffset: tables, seGrainsOffset: grains,
                                dataEnd: fileSize, fileLength: fileSize, canWrite: false, cache: cache)
    }

    // MARK: tables (call with `lock` held)

    func entry(_ bytes: [UInt8], _ o: Int) -> UInt64 {
        let r = ByteReader(bytes)
        return entrySize == 4 ? UInt64(r.le32(o)) : r.le64(o)
    }

    private func put(_ bytes: inout [UInt8], _ o: Int, _ v: UInt64) {
        if entrySize == 4 { bytes.putLE32(UInt32(truncatingIfNeeded: v), at: o) } else { bytes.putLE64(v, at: o) }
    }

    /// Run `body` on the GD page holding entry `i` (primary or redundant directory).
    func withGDPage<R>(_ i: UInt64, redundant: Bool = false, _ body: (MetadataCache.Page, Int) throws -> R) throws -> R {
        let base = redundant ? (rgdOffset ?? 0) : gdOffset
        let byte = i * entrySize
        let page = byte / Self.pageSize
        let pageStart = page * Self.pageSize
        let count = Int(min(Self.pageSize, gdBytes - pageStart))
        let f = sparseFile
        return try cache.withPage(owner: redundant ? ownerRGD : ownerGD, offset: page,
                                  count: count, from: f, at: base + pageStart) { p in
            let o = Int(byte - pageStart)
            guard o + Int(entrySize) <= p.bytes.count else { throw Self.corrupt(f, "grain directory page is short") }
            return try body(p, o)
        }
    }

    func gdEntry(_ i: UInt64, redundant: Bool = false) throws -> UInt64 {
        try withGDPage(i, redundant: redundant) { p, o in entry(p.bytes, o) }
    }

    func setGDEntry(_ i: UInt64, _ v: UInt64, redundant: Bool = false) throws {
        try withGDPage(i, redundant: redundant) { p, o in
            put(&p.bytes, o, v)
            cache.markDirty(p, rank: Self.rankGD)
        }
    }

    /// Where grain table `i` lives, in bytes, per the primary directory.
    func gtLocation(_ i: UInt64, redundant: Bool = false) throws -> UInt64? {
        let e = try gdEntry(i, redundant: redundant)
        let at: UInt64
        switch kind {
        case .hosted, .cowd:
            if e == 0 || (e == 1 && zeroedGTE) { return nil }
            at = e * 512
        case .seSparse:
            if e == 0 { return nil }
            guard e >> 32 == 0x1000_0000 else { throw Self.corrupt(sparseFile, "seSparse grain directory entry \(i) is invalid (0x\(String(e, radix: 16)))") }
            at = seTablesOffset + (e & 0xffff_ffff) * gtBytes
        }
        let (end, o) = at.addingReportingOverflow(gtBytes)
        guard !o, end <= fileLength else {
            throw Self.corrupt(sparseFile, "grain table \(i) at offset \(at) lies past the end of the file (\(fileLength) bytes)", offset: at)
        }
        return at
    }

    func gtRef(_ i: UInt64) throws -> GTRef {
        if pendingGTs.contains(i) { return .present }
        let e = try gdEntry(i)
        if kind != .seSparse && e == 1 && zeroedGTE { return .zeroed }
        return e == 0 ? .none : .present
    }

    /// Run `body` on grain table `i` (which must be present).
    func withGT<R>(_ i: UInt64, _ body: (MetadataCache.Page) throws -> R) throws -> R {
        let f = sparseFile
        let n = Int(gtBytes)
        return try cache.withPage(owner: ownerGT, offset: i, count: n, load: {
            guard let at = try gtLocation(i) else { throw Self.corrupt(f, "grain table \(i) vanished") }
            try f.read(into: $0, at: at)
        }, body)
    }

    func gtEntry(_ g: UInt64) throws -> UInt64 {
        try withGT(g / gtEntries) { p in entry(p.bytes, Int((g % gtEntries) * entrySize)) }
    }

    func setGTEntry(_ g: UInt64, _ v: UInt64) throws {
        try withGT(g / gtEntries) { p in
            put(&p.bytes, Int((g % gtEntries) * entrySize), v)
            cache.markDirty(p, rank: Self.rankGT)
        }
        if streamLayout { streamDirty = true }
    }

    /// What grain `g` (extent-relative index) is.
    func grain(_ g: UInt64) throws -> Grain {
        let i = g / gtEntries
        if g * grainBytes >= capacity || i >= gdEntries { return .zero }
        switch try gtRef(i) {
        case .none: return .unallocated
        case .zeroed: return .zero
        case .present: break
        }
        let e = try gtEntry(g)
        switch kind {
        case .hosted, .cowd:
            if e == 0 { return .unallocated }
            if e == 1 && zeroedGTE { return .zero }
            let host = e * 512
            guard host < fileLength else {
                throw Self.corrupt(sparseFile, "grain table entry for grain \(g) points past the end of the file (sector \(e))", offset: host)
            }
            return compressed ? .compressed(host) : .data(host)
        case .seSparse:
            switch e >> 60 {
            case 0:
                if e == 0 { return .unallocated }
            case 1, 2:
                return .zero
            case 3:
                let cluster = ((e & 0x0fff_0000_0000_0000) >> 48) | ((e & 0x0000_ffff_ffff_ffff) << 12)
                let (off, o1) = cluster.multipliedReportingOverflow(by: grainBytes)
                let (host, o2) = seGrainsOffset.addingReportingOverflow(off)
                if !o1 && !o2 && host < fileLength { return .data(host) }
            default:
                break
            }
            throw Self.corrupt(sparseFile, "seSparse grain table entry for grain \(g) is invalid (0x\(String(e, radix: 16)))")
        }
    }

    // MARK: map

    func map(at offset: UInt64, length: UInt64) throws -> [LayerRun] {
        try lock.lookup { try mapLocked(at: offset, length: length) }
    }

    func mapLocked(at offset: UInt64, length: UInt64) throws -> [LayerRun] {
        var runs: [LayerRun] = []
        func add(_ at: UInt64, _ len: UInt64, _ kind: LayerRun.Kind) {
            if var last = runs.last, last.offset + last.length == at {
                switch (last.kind, kind) {
                case (.zero, .zero), (.unallocated, .unallocated):
                    last.length += len; runs[runs.count - 1] = last; return
                case let (.stored(_, h1), .stored(_, h2)) where h1 + last.length == h2:
                    last.length += len; runs[runs.count - 1] = last; return
                default: break
                }
            }
            runs.append(LayerRun(offset: at, length: len, kind: kind))
        }
        let end = offset + length
        var pos = offset
        while pos < end {
            let g = pos / grainBytes
            let grainStart = g * grainBytes
            let chunkEnd = min(end, grainStart + grainBytes)
            if let p = pending, p.grain == g {
                // Token 0 (the header sector, never a grain): the grain being filled.
                add(pos, chunkEnd - pos, .encoded(token: 0))
                pos = chunkEnd
                continue
            }
            switch try grain(g) {
            case .unallocated: add(pos, chunkEnd - pos, .unallocated)
            case .zero: add(pos, chunkEnd - pos, .zero)
            case .data(let host): add(pos, chunkEnd - pos, .stored(file: sparseFile, hostOffset: host + (pos - grainStart)))
            case .compressed(let host): add(pos, chunkEnd - pos, .encoded(token: host / 512))
            }
            pos = chunkEnd
        }
        return runs
    }

    func flush() throws {
        guard canWrite else { return }
        // No grain tables or directories to write: only the sync, outside the locks
        // (as `MetadataLock.flush`; compressed and stream layouts always go through
        // `flushLocked`, which finishes their pending grain and tail).
        let quiet = lock.run { !compressed && !streamLayout && ![ownerGT, ownerGD, ownerRGD].contains { cache.hasDirtyPages(owner: $0) } }
        if quiet { return try sparseFile.sync() }
        try allocLock.run { try lock.run { try flushLocked() } }
    }

    /// Write back dirty tables (and for compressed extents the grain being filled).
    func flushLocked() throws {
        if compressed { try commitPendingLocked() }
        if streamLayout {
            try writeStreamTailLocked()
            return
        }
        let f = sparseFile
        try cache.writeBack(owner: ownerGT, barrier: { try f.sync() }) { i, bytes in
            if let at = try gtLocation(i) { try f.write(bytes, at: at) }
            if rgdOffset != nil, let at = try gtLocation(i, redundant: true) { try f.write(bytes, at: at) }
        }
        let gd = gdOffset, gdLen = gdBytes
        let directories: [(UInt64, UInt64?)] = [(ownerGD, gd), (ownerRGD, rgdOffset)]
        for (owner, base) in directories {
            guard let base else { continue }
            try cache.writeBack(owner: owner, barrier: { try f.sync() }) { page, bytes in
                let start = page * Self.pageSize
                if start < gdLen { try f.write(bytes, at: base + start) }
            }
        }
        try f.sync()
    }

    func close() throws {
        if canWrite { try flush() }
        cache.drop(owner: ownerGT)
        cache.drop(owner: ownerGD)
        cache.drop(owner: ownerRGD)
    }
}
