#if canImport(Glibc)
import Glibc
#endif

/// A VHDX layer (Microsoft Virtual Hard Disk v2): fixed, dynamic and differencing
/// disks, read and write.
///
/// Layout (MS-VHDX 2.1), as qemu-img and we create it:
///
///     0  file id | 64K header 1 | 128K header 2 | 192K region table 1 | 256K region table 2
///     1M log (1 MiB default) | metadata region (1 MiB) | BAT (1 MiB multiple) | blocks…
///
/// The BAT (64-bit entries: state in bits 0-2, file offset in MiB in bits 20-63) holds
/// the entries of each chunk's payload blocks followed by the chunk's sector bitmap entry:
///
///     chunk ratio r = 2^23 × logical sector size / block size
///     payload block i → entry i + i / r;  chunk c's bitmap → entry c × (r + 1) + r
///
/// BAT pages and sector bitmap pages (4 KiB each) are read through the shared
/// `MetadataCache`; nothing is held whole. Dirty pages are committed through the log
/// (`commitThroughLog`): data is synced first, then bitmap pages (rank 0) and BAT pages
/// (rank 1) go into a log entry, which is flushed, applied and flushed, and the log is
/// cleared. A crash at any point leaves either the old or the new metadata.
public final class VHDXLayer: FormatLayer, @unchecked Sendable {
    // Safe: every mutable property below is read and written only under `lock`;
    // `allocLock` orders allocating writes and metadata changes (taken before `lock`,
    // never after); cache pages are this layer's alone and touched under `lock`
    // (MetadataCache's ownership rule). `overlay` is set in init and never changes.

    enum DiskType: String { case fixed, dynamic, differencing }

    static let rankBitmap = 0
    static let rankBAT = 1
    static let pageSize: UInt64 = 4096
    static let mib: UInt64 = 1 << 20
    static let sectorBitmapBlockSize: UInt64 = 1 << 20

    // Payload block states (MS-VHDX 2.5.1.1) and sector bitmap states (2.5.1.2).
    static let notPresent: UInt64 = 0
    static let undefined: UInt64 = 1
    static let zero: UInt64 = 2
    static let unmapped: UInt64 = 3
    /// UNMAPPED in the v0.95 draft; qemu reads it as zeroes, and so do we.
    static let unmappedV095: UInt64 = 5
    static let fullyPresent: UInt64 = 6
    static let partiallyPresent: UInt64 = 7
    static let sbPresent: UInt64 = 6

    let file: HostFile
    let cache: MetadataCache
    let owner = MetadataCache.newOwner()
    let writable: Bool
    let lock = MetadataLock()
    let allocLock = Lock()
    /// The replayed log of a read-only open (nil when there was none, or when the log
    /// was replayed into the file).
    let overlay: VHDXOverlay?

    var header: VHDXHeader
    var headerSlot: Int
    var regions: VHDXRegionTable
    var metadata: VHDXMetadata
    var type: DiskType
    var virtualSize: UInt64
    let blockSize: UInt64
    let logicalSectorSize: UInt64
    let chunkRatio: UInt64
    var batOffset: UInt64
    var batLength: UInt64
    /// Where the next block goes (1 MiB aligned, past every structure and the file end).
    var dataEnd: UInt64
    /// The file's length as far as this layer knows (with a read-only replay's extension).
    var fileLength: UInt64
    var parentName: String?
    /// The headers have been rewritten with a new file write GUID in this session.
    var sessionStarted = false
    /// The data write GUID has been changed in this session.
    var dataChanged = false
    var nextLogSequence: UInt64 = 1
    /// The log was replayed when opening (read-write: into the file; read-only: in memory).
    let replayedAtOpen: Bool

    init(file: HostFile, context: OpenContext, header: VHDXHeader, slot: Int, regions: VHDXRegionTable, metadata: VHDXMetadata,
         fileLength: UInt64, overlay: VHDXOverlay?, replayed: Bool, parentName: String?) {
        self.file = file
        self.cache = context.cache
        self.writable = context.writable
        self.header = header
        self.headerSlot = slot
        self.regions = regions
        self.metadata = metadata
        self.overlay = overlay
        self.replayedAtOpen = replayed
        self.type = metadata.hasParent ? .differencing : (metadata.leaveBlocksAllocated ? .fixed : .dynamic)
        self.virtualSize = metadata.virtualDiskSize
        self.blockSize = UInt64(metadata.blockSize)
        self.logicalSectorSize = UInt64(metadata.logicalSectorSize)
        self.chunkRatio = (UInt64(1) << 23) * UInt64(metadata.logicalSectorSize) / UInt64(metadata.blockSize)
        self.batOffset = regions.bat!.fileOffset
        self.batLength = UInt64(regions.bat!.length)
        self.fileLength = fileLength
        var end = fileLength.alignedUp(Self.mib)
        for r in regions.entries { end = max(end, r.end) }
        end = max(end, header.logOffset + UInt64(header.logLength))
        self.dataEnd = end
        self.parentName = parentName
    }

    // MARK: geometry

    var payloadBlocks: UInt64 { (virtualSize + blockSize - 1) / blockSize }

    static func batEntriesNeeded(size: UInt64, blockSize: UInt64, chunkRatio: UInt64, differencing: Bool) -> UInt64 {
        let blocks = (size + blockSize - 1) / blockSize
        if blocks == 0 { return 0 }
        if differencing {
            return ((blocks + chunkRatio - 1) / chunkRatio) * (chunkRatio + 1)
        }
        return blocks + (blocks - 1) / chunkRatio
    }

    @inline(__always) func payloadEntryIndex(_ block: UInt64) -> UInt64 { block + block / chunkRatio }
    @inline(__always) func bitmapEntryIndex(chunk: UInt64) -> UInt64 { chunk * (chunkRatio + 1) + chunkRatio }

    // MARK: file reads through the log overlay

    /// Read file bytes as the replayed log would leave them.
    func readFile(at offset: UInt64, count: Int) throws -> [UInt8] {
        var b = [UInt8](repeating: 0, count: count)
        try b.withUnsafeMutableBytes { try readFile(into: $0, at: offset) }
        return b
    }

    func readFile(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try file.read(into: buffer, at: offset)
        overlay?.apply(buffer, at: offset)
    }

    // MARK: BAT and bitmaps through the cache (all under `lock`)

    func withBATPage<R>(_ index: UInt64, _ body: (MetadataCache.Page, Int) throws -> R) throws -> R {
        let pos = index * 8
        guard pos + 8 <= batLength else {
            throw ImageError(.corrupt, "BAT entry \(index) lies past the BAT region (\(batLength) bytes)", path: file.path, format: "vhdx")
        }
        let key = batOffset + pos / Self.pageSize * Self.pageSize
        return try cache.withPage(owner: owner, offset: key, count: Int(Self.pageSize), load: { try readFile(into: $0, at: key) }) { p in
            try body(p, Int(pos % Self.pageSize))
        }
    }

    func batEntry(_ index: UInt64) throws -> UInt64 {
        try withBATPage(index) { p, within in ByteReader(p.bytes).le64(within) }
    }

    func setBATEntry(_ index: UInt64, _ value: UInt64) throws {
        try withBATPage(index) { p, within in
            p.bytes.putLE64(value, at: within)
            cache.markDirty(p, rank: Self.rankBAT)
        }
    }

    static func state(_ entry: UInt64) -> UInt64 { entry & 7 }
    static func offset(_ entry: UInt64) -> UInt64 { (entry >> 20) << 20 }
    static func entry(state: UInt64, offset: UInt64) -> UInt64 { (offset >> 20) << 20 | state }

    /// Bytes of block `i` inside the virtual disk (the last block may be short).
    func blockExtent(_ i: UInt64) -> UInt64 { min(blockSize, virtualSize - min(virtualSize, i * blockSize)) }

    /// A payload block's file offset, checked against the file and the metadata.
    func blockOffset(_ i: UInt64, _ entry: UInt64) throws -> UInt64 {
        let host = Self.offset(entry)
        let end = host + blockExtent(i)
        if host < Self.mib || end > max(fileLength, dataEnd) || overlapsMetadata(host, host + blockSize) {
            throw ImageError(.corrupt, "BAT entry for block \(i) places it at \(host), outside the file or over its metadata; run 'vloop check \(file.path)'",
                             path: file.path, format: "vhdx", offset: host)
        }
        return host
    }

    /// Header section, log, BAT and metadata region, as (start, end, name).
    var metadataRanges: [(UInt64, UInt64, String)] {
        var r: [(UInt64, UInt64, String)] = [(0, Self.mib, "header section")]
        if header.logLength > 0 { r.append((header.logOffset, header.logOffset + UInt64(header.logLength), "log")) }
        for e in regions.entries {
            r.append((e.fileOffset, e.end, e.guid == VHDXRegionTable.batGUID ? "BAT" : (e.guid == VHDXRegionTable.metadataGUID ? "metadata region" : "region \(VHDXGUID.string(e.guid))")))
        }
        return r
    }

    func overlapsMetadata(_ start: UInt64, _ end: UInt64) -> Bool {
        metadataRanges.contains { start < $0.1 && $0.0 < end }
    }

    /// The sector bitmap block of a chunk, or nil when it is not present.
    func bitmapBlock(chunk: UInt64) throws -> UInt64? {
        let e = try batEntry(bitmapEntryIndex(chunk: chunk))
        guard Self.state(e) == Self.sbPresent else { return nil }
        let host = Self.offset(e)
        if host < Self.mib || host + Self.sectorBitmapBlockSize > max(fileLength, dataEnd) || overlapsMetadata(host, host + Self.sectorBitmapBlockSize) {
            throw ImageError(.corrupt, "sector bitmap of chunk \(chunk) lies at \(host), outside the file or over its metadata; run 'vloop check \(file.path)'",
                             path: file.path, format: "vhdx", offset: host)
        }
        return host
    }

    /// Where in the chunk's bitmap the bits of block `i` start (in bits).
    func firstBit(ofBlock i: UInt64) -> UInt64 { (i % chunkRatio) * (blockSize / logicalSectorSize) }

    /// Run `body` over the bitmap page holding bit `bit` of the bitmap at `sb`: the page
    /// and the bit's index within it.
    func withBitmapPage<R>(_ sb: UInt64, bit: UInt64, _ body: (MetadataCache.Page, Int) throws -> R) throws -> R {
        let byte = bit / 8
        let key = sb + byte / Self.pageSize * Self.pageSize
        return try cache.withPage(owner: owner, offset: key, count: Int(Self.pageSize), load: { try readFile(into: $0, at: key) }) { p in
            try body(p, Int(bit - (byte / Self.pageSize * Self.pageSize) * 8))
        }
    }

    @inline(__always)
    static func bit(_ bytes: [UInt8], _ k: Int) -> Bool { bytes[k >> 3] & (1 << UInt8(k & 7)) != 0 }

    @inline(__always)
    static func setBit(_ bytes: inout [UInt8], _ k: Int, _ on: Bool) {
        if on { bytes[k >> 3] |= 1 << UInt8(k & 7) } else { bytes[k >> 3] &= ~(1 << UInt8(k & 7)) }
    }

    /// First bit at or after `from` (before `limit`) that differs from `state`.
    static func runEnd(_ bytes: [UInt8], from: Int, limit: Int, state: Bool) -> Int {
        let full: UInt8 = state ? 0xff : 0
        var k = from
        while k < limit {
            if k & 7 == 0 && k + 8 <= limit && bytes[k >> 3] == full { k += 8; continue }
            if bit(bytes, k) != state { return k }
            k += 1
        }
        return limit
    }

    /// Sector presence runs for guest range `from ..< to` inside block `i` whose bitmap is
    /// at `sb`: (start, end, present), in guest offsets.
    func sectorRuns(block i: UInt64, sb: UInt64, from: UInt64, to: UInt64) throws -> [(UInt64, UInt64, Bool)] {
        let blockStart = i * blockSize
        let base = firstBit(ofBlock: i)
        var out: [(UInt64, UInt64, Bool)] = []
        var s = (from - blockStart) / logicalSectorSize
        let last = (to - 1 - blockStart) / logicalSectorSize + 1
        while s < last {
            let bitIndex = base + s
            let pageBits = Self.pageSize * 8
            let pageEndBit = (bitIndex / pageBits + 1) * pageBits
            let limit = min(last, s + (pageEndBit - bitIndex))
            try withBitmapPage(sb, bit: bitIndex) { p, k in
                var q = s
                while q < limit {
                    let kk = k + Int(q - s)
                    let present = Self.bit(p.bytes, kk)
                    let e = Self.runEnd(p.bytes, from: kk + 1, limit: k + Int(limit - s), state: present)
                    let qEnd = s + UInt64(e - k)
                    let a = max(from, blockStart + q * logicalSectorSize), b = min(to, blockStart + qEnd * logicalSectorSize)
                    if let lastRun = out.last, lastRun.2 == present, lastRun.1 == a {
                        out[out.count - 1].1 = b
                    } else {
                        out.append((a, b, present))
                    }
                    q = qEnd
                }
            }
            s = limit
        }
        return out
    }

    // MARK: info

    public var layerInfo: ImageInfo {
        lock.run {
            var caps: Capabilities = [.discard, .resize, .efficientZero]
            if writable { caps.insert(.writable) }
            let specific: [(String, JSONValue)] = [
                ("subformat", .string(type.rawValue)),
                ("block-size", .uint(blockSize)),
                ("logical-sector-size", .uint(logicalSectorSize)),
                ("physical-sector-size", .uint(UInt64(metadata.physicalSectorSize))),
                ("data-write-guid", .string(VHDXGUID.string(header.dataWriteGUID))),
                ("log-replayed", .bool(replayedAtOpen)),
            ]
            let backing = type == .differencing ? parentName.map { BackingReference(name: $0, format: "vhdx") } : nil
            // A log replayed only in memory leaves the file dirty.
            return ImageInfo(format: "vhdx", virtualSize: virtualSize, clusterSize: blockSize, logicalSectorSize: UInt32(logicalSectorSize),
                             capabilities: caps, backing: backing, path: file.path, dirty: overlay != nil, formatSpecific: specific)
        }
    }

    // MARK: mapping

    public func map(at offset: UInt64, length: UInt64) throws -> [LayerRun] {
        try lock.lookup { try mapLocked(at: offset, length: length) }
    }

    func mapLocked(at offset: UInt64, length: UInt64) throws -> [LayerRun] {
        var runs: [LayerRun] = []
        func add(_ at: UInt64, _ len: UInt64, _ kind: LayerRun.Kind) {
            runs.appendMerging(LayerRun(offset: at, length: len, kind: kind))
        }
        func stored(_ at: UInt64, _ len: UInt64, _ host: UInt64) {
            // Bytes the in-memory log replay changed are read through `readEncoded`.
            if let overlay, overlay.intersects(host, len) {
                runs.append(LayerRun(offset: at, length: len, kind: .encoded(token: host)))
            } else {
                add(at, len, .stored(file: file, hostOffset: host))
            }
        }
        let end = offset + length
        var pos = offset
        while pos < end {
            let i = pos / blockSize
            let blockStart = i * blockSize
            let chunkEnd = min(end, blockStart + blockSize)
            let e = try batEntry(payloadEntryIndex(i))
            switch Self.state(e) {
            case Self.fullyPresent:
                stored(pos, chunkEnd - pos, try blockOffset(i, e) + (pos - blockStart))
            case Self.partiallyPresent:
                guard type == .differencing, let sb = try bitmapBlock(chunk: i / chunkRatio) else {
                    throw ImageError(.corrupt, "block \(i) is partially present, but \(type == .differencing ? "its chunk has no sector bitmap" : "the disk is not a differencing disk"); run 'vloop check \(file.path)'",
                                     path: file.path, format: "vhdx")
                }
                let host = try blockOffset(i, e)
                for (a, b, present) in try sectorRuns(block: i, sb: sb, from: pos, to: chunkEnd) {
                    if present { stored(a, b - a, host + (a - blockStart)) } else { add(a, b - a, .unallocated) }
                }
            case Self.zero, Self.unmapped, Self.unmappedV095:
                add(pos, chunkEnd - pos, .zero)
            case Self.notPresent, Self.undefined:
                // Differencing: the parent's; dynamic: nothing here, reads as zeroes.
                add(pos, chunkEnd - pos, .unallocated)
            default:
                throw ImageError(.corrupt, "BAT entry for block \(i) has reserved state \(Self.state(e)); run 'vloop check \(file.path)'",
                                 path: file.path, format: "vhdx")
            }
            pos = chunkEnd
        }
        return runs
    }

    public func readEncoded(token: UInt64, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        try file.read(into: buffer, at: token)
        overlay?.apply(buffer, at: token)
    }

    // MARK: headers

    /// Write `h` into both header slots, non-current first, each with the next sequence
    /// number and a flush after it (MS-VHDX 2.2.2.1): a torn write leaves the other one.
    func writeHeadersLocked(_ h: VHDXHeader) throws {
        var h = h
        var slot = headerSlot
        for _ in 0..<2 {
            slot = 1 - slot
            h.sequenceNumber = header.sequenceNumber + 1
            try file.write(h.serialized(), at: VHDXHeader.offsets[slot])
            try file.sync()
            header = h
            headerSlot = slot
        }
    }

    /// Before the first change in this session: a new file write GUID, and before the
    /// first change the guest can see, a new data write GUID (MS-VHDX 2.2.2).
    func beginChange(visible: Bool) throws {
        try lock.run {
            if sessionStarted && (dataChanged || !visible) { return }
            var h = header
            if !sessionStarted { h.fileWriteGUID = VHDXGUID.random() }
            if visible && !dataChanged { h.dataWriteGUID = VHDXGUID.random() }
            try writeHeadersLocked(h)
            sessionStarted = true
            if visible { dataChanged = true }
        }
    }

    // MARK: flush and the log

    public func flush() throws {
        guard writable else { return }
        try lock.flush(dirty: { cache.hasDirtyPages(owner: owner) }, locked: flushLocked, sync: file.sync)
    }

    /// Commit dirty metadata pages: data first (a barrier), then the pages through the log.
    func flushLocked() throws {
        guard writable else { return }
        if cache.hasDirtyPages(owner: owner) {
            try file.sync()
            var pages: [(UInt64, [UInt8])] = []
            try cache.writeBack(owner: owner, barrier: {}, write: { off, bytes in pages.append((off, bytes)) })
            try commitThroughLogLocked(pages)
        }
        try file.sync()
    }

    /// Metadata updates through the log (MS-VHDX 2.3): set a fresh log GUID, then per log
    /// entry: write it, flush, apply the updates in place, flush; finally clear the log
    /// GUID. Updates are 4 KiB-aligned whole sectors, in the order given (bitmaps before
    /// the BAT entries that rely on them when one entry cannot hold them all).
    func commitThroughLogLocked(_ updates: [(UInt64, [UInt8])]) throws {
        var sectors: [(UInt64, [UInt8])] = []
        for (off, bytes) in updates {
            var k = 0
            while k < bytes.count {
                let n = min(VHDXLog.sector, bytes.count - k)
                var s = Array(bytes[k..<(k + n)])
                if n < VHDXLog.sector {
                    s += try file.read(at: off + UInt64(k + n), count: VHDXLog.sector - n)
                }
                sectors.append((off + UInt64(k), s))
                k += n
            }
        }
        if sectors.isEmpty { return }
        let logLength = UInt64(header.logLength)
        let capacity = VHDXLog.capacity(logLength: logLength)
        guard capacity > 0 else {
            throw ImageError(.unsupported, "the image has no log to write metadata through (log length \(logLength))", path: file.path, format: "vhdx")
        }
        var h = header
        if !sessionStarted { h.fileWriteGUID = VHDXGUID.random() }
        h.logGUID = VHDXGUID.random()
        try writeHeadersLocked(h)
        sessionStarted = true
        var start = 0
        while start < sectors.count {
            let part = Array(sectors[start..<min(sectors.count, start + capacity)])
            let size = try file.size()
            let last = max(size, part.map { $0.0 + UInt64(VHDXLog.sector) }.max() ?? 0, dataEnd).alignedUp(Self.mib)
            let entry = VHDXLog.build(updates: part, sequence: nextLogSequence, tail: 0, logGUID: header.logGUID,
                                      flushedFileOffset: size.alignedDown(Self.mib), lastFileOffset: last)
            nextLogSequence += 1
            try file.write(entry, at: header.logOffset)
            try file.sync()
            for (off, data) in part { try file.write(data, at: off) }
            try file.sync()
            start += part.count
        }
        var cleared = header
        cleared.logGUID = VHDXGUID.zero
        try writeHeadersLocked(cleared)
    }

    public func close() throws {
        if writable { try flush() }
        cache.drop(owner: owner)
        ImageLock.release(file)
    }
}

// MARK: open

extension VHDXLayer {
    /// Open a VHDX: file identifier, the current header, the log (replayed into the file
    /// when writable, in memory when not), a region table (copy 2 if copy 1 is damaged),
    /// the metadata, and the BAT's size against the disk and the file.
    public static func open(file: HostFile, context: OpenContext) throws -> VHDXLayer {
        func fail(_ code: ImageError.Code, _ message: String, offset: UInt64? = nil) -> ImageError {
            ImageError(code, message, path: file.path, format: "vhdx", offset: offset)
        }
        let realSize = try file.size()
        guard realSize >= mib else {
            throw fail(.invalidFormat, "file is \(realSize) bytes, too small for a VHDX header section (1 MiB)")
        }
        guard VHDXFileIdentifier.isValid(try file.read(at: 0, count: 8)) else {
            throw fail(.invalidFormat, "not a VHDX image: no \"vhdxfile\" signature at offset 0")
        }
        let h1 = VHDXHeader.parse(try file.read(at: VHDXHeader.offsets[0], count: VHDXHeader.size))
        let h2 = VHDXHeader.parse(try file.read(at: VHDXHeader.offsets[1], count: VHDXHeader.size))
        guard let (header, slot) = VHDXHeader.choose(h1, h2, fileSize: realSize) else {
            let why = [h1, h2].enumerated().map { i, h in
                "header \(i + 1): " + (h.map { $0.problem(fileSize: realSize) ?? "?" } ?? "no \"head\" signature")
            }.joined(separator: "; ")
            throw fail(.corrupt, "no usable VHDX header (\(why))")
        }

        // The log (MS-VHDX 2.3.3): replay before reading anything else.
        var overlay: VHDXOverlay?
        var replayed = false
        var fileLength = realSize
        var nextSequence: UInt64 = 1
        if header.hasLog && header.logLength > 0 {
            let logLength = UInt64(header.logLength)
            guard logLength <= VHDXLog.maxLogLength else {
                throw fail(.unsupported, "log of \(logLength) bytes is larger than vloop replays (\(VHDXLog.maxLogLength))")
            }
            let entries = try VHDXLog.activeSequence(logLength: logLength, logGUID: header.logGUID) { at, count in
                var out: [UInt8] = []
                var pos = at % logLength
                var left = count
                while left > 0 {
                    let n = Int(min(UInt64(left), logLength - pos))
                    out += try file.read(at: header.logOffset + pos, count: n)
                    left -= n
                    pos = 0
                }
                return out
            }
            if let head = entries.last {
                guard realSize >= head.flushedFileOffset else {
                    throw fail(.corrupt, "the log says the file held \(head.flushedFileOffset) bytes, but it has \(realSize): the file was truncated")
                }
                // What the log may touch: nothing in the header section, nothing past
                // the size it gives the file, and that size within reach of the file's.
                guard head.lastFileOffset <= realSize + (4 << 30) else {
                    throw fail(.corrupt, "the log grows the file to \(head.lastFileOffset) bytes, far past its \(realSize)")
                }
                let writes = entries.flatMap(\.writes)
                let limit = max(realSize, head.lastFileOffset)
                for w in writes where w.fileOffset < mib || w.end > limit {
                    throw fail(.corrupt, "the log writes \(w.length) bytes at \(w.fileOffset), \(w.fileOffset < mib ? "inside the header section" : "past the end the log gives the file (\(limit))")",
                               offset: w.fileOffset)
                }
                let end = writes.map(\.end).max() ?? 0
                nextSequence = head.sequence &+ 1
                if context.writable {
                    for w in writes {
                        if let d = w.data { try file.write(d, at: w.fileOffset) } else { try file.writeZeroes(at: w.fileOffset, length: w.length) }
                    }
                    if try file.size() < head.lastFileOffset { try file.truncate(to: head.lastFileOffset) }
                    try file.sync()
                } else {
                    overlay = VHDXOverlay(writes)
                    fileLength = max(realSize, head.lastFileOffset, end)
                }
                replayed = true
            }
            if context.writable { fileLength = try file.size() }
        }
        func readFile(_ at: UInt64, _ count: Int) throws -> [UInt8] {
            var b = try file.read(at: at, count: count)
            if let overlay { b.withUnsafeMutableBytes { overlay.apply($0, at: at) } }
            return b
        }

        // Region tables: the first valid copy.
        var regions: VHDXRegionTable?
        var regionErrors: [String] = []
        for (k, at) in VHDXRegionTable.offsets.enumerated() {
            do {
                regions = try VHDXRegionTable.parse(try readFile(at, VHDXRegionTable.size), fileSize: fileLength)
                break
            } catch let e as ImageError {
                if e.code == .unsupported { throw e.at(path: file.path) }
                regionErrors.append("copy \(k + 1): \(e.message)")
            }
        }
        guard let regions, let bat = regions.bat, let meta = regions.metadata else {
            throw fail(.corrupt, "no usable region table (\(regionErrors.joined(separator: "; ")))")
        }
        if header.logLength > 0 {
            let logEnd = header.logOffset + UInt64(header.logLength)
            for r in regions.entries where r.fileOffset < logEnd && header.logOffset < r.end {
                throw fail(.corrupt, "the log at \(header.logOffset)+\(header.logLength) overlaps region \(VHDXGUID.string(r.guid))")
            }
        }

        // Metadata.
        let metadata: VHDXMetadata
        do {
            metadata = try VHDXMetadata.parse(table: try readFile(meta.fileOffset, VHDXMetadata.tableSize), regionLength: meta.length) { off, count in
                try readFile(meta.fileOffset + UInt64(off), count)
            }
        } catch let e as ImageError {
            throw e.at(path: file.path)
        }
        let ratio = (UInt64(1) << 23) * UInt64(metadata.logicalSectorSize) / UInt64(metadata.blockSize)
        let need = batEntriesNeeded(size: metadata.virtualDiskSize, blockSize: UInt64(metadata.blockSize), chunkRatio: ratio,
                                    differencing: metadata.hasParent)
        guard need * 8 <= UInt64(bat.length) else {
            throw fail(.corrupt, "the BAT region holds \(bat.length / 8) entries, but a \(metadata.virtualDiskSize)-byte disk of \(metadata.blockSize)-byte blocks needs \(need)")
        }

        var parent: String?
        if metadata.hasParent {
            parent = try parentName(metadata, file: file)
        }
        let layer = VHDXLayer(file: file, context: context, header: header, slot: slot, regions: regions, metadata: metadata,
                              fileLength: fileLength, overlay: overlay, replayed: replayed, parentName: parent)
        layer.nextLogSequence = nextSequence
        if context.writable && header.hasLog {
            // The log is in the file now (or held nothing valid): clear it.
            try layer.lock.run {
                var h = layer.header
                h.fileWriteGUID = VHDXGUID.random()
                h.logGUID = VHDXGUID.zero
                try layer.writeHeadersLocked(h)
                layer.sessionStarted = true
            }
        }
        return layer
    }
}
