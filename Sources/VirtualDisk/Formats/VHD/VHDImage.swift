#if canImport(Glibc)
import Glibc
#endif

/// A VHD layer (Microsoft Virtual Hard Disk, qemu's "vpc"): fixed, dynamic and
/// differencing disks, read and write.
///
/// Layouts (spec "Overview"):
///
///     fixed:        data ………………………………… | footer
///     dynamic/diff: footer copy | header | BAT | [locator data] | block | block | … | footer
///     block:        sector bitmap (1 bit per sector, padded to 512) | data (block size)
///
/// The BAT (big-endian sector numbers, 0xFFFFFFFF unallocated) is read in 4 KiB pages
/// and the sector bitmaps one per page through the shared `MetadataCache`; nothing is
/// held whole. Write-back ranks, lowest first, with a storage barrier before each:
///
///     data (written directly) → 0 sector bitmaps → 1 BAT pages
///
/// so a crash can leak a block (check -r reclaims it) but never expose a sector whose
/// data has not reached the disk.
///
/// A set bitmap bit means the sector is stored in this layer. A clear bit means: in a
/// differencing disk, read the parent (`.unallocated`); in a dynamic disk, zeroes.
/// (qemu ignores the bitmap and reads a whole allocated block from this file, so a
/// differencing disk reads wrongly there; see README.md.)
public final class VHDLayer: FormatLayer, @unchecked Sendable {
    // Safe: the mutable properties below (footer, header, type, virtualSize, dataEnd,
    // fileLength, parentName) are read and written only under `lock`; `allocLock` only
    // orders allocating writes and other metadata changes; cache pages are this layer's
    // alone and touched under `lock` (MetadataCache's ownership rule).

    static let rankBitmap = 0
    static let rankBAT = 1
    static let batPageSize: UInt64 = 4096
    static let unallocated: UInt32 = 0xffff_ffff
    /// Locator data longer than this is not a path.
    static let maxLocatorData: UInt32 = 64 << 10

    let file: HostFile
    let cache: MetadataCache
    let owner = MetadataCache.newOwner()
    let writable: Bool
    let lock = MetadataLock()
    let allocLock = Lock()

    var footer: VHDFooter
    /// nil for fixed disks.
    var header: VHDDynamicHeader?
    var type: VHDFooter.DiskType
    /// Fixed disks stay fixed (only differencing ↔ dynamic changes), so this is read
    /// without the lock.
    let isFixed: Bool
    var virtualSize: UInt64
    let blockSize: UInt64
    let bitmapSize: UInt64
    /// Dynamic: where the next block goes and the end footer sits. Fixed: the end of
    /// the data, where the footer sits.
    var dataEnd: UInt64
    /// The file's length as far as this layer knows.
    var fileLength: UInt64
    /// The parent, as the opener should resolve it (differencing disks only).
    var parentName: String?
    /// True when the last 512 bytes held a valid footer at open.
    let endFooterWasValid: Bool

    init(file: HostFile, footer: VHDFooter, header: VHDDynamicHeader?, type: VHDFooter.DiskType,
         dataEnd: UInt64, fileLength: UInt64, endFooterValid: Bool, parentName: String?, context: OpenContext) {
        self.file = file
        self.cache = context.cache
        self.writable = context.writable
        self.footer = footer
        self.header = header
        self.type = type
        self.isFixed = type == .fixed
        self.virtualSize = footer.virtualSize
        self.blockSize = header.map { UInt64($0.blockSize) } ?? 0
        self.bitmapSize = header.map { VHDDynamicHeader.bitmapSize(blockSize: UInt64($0.blockSize)) } ?? 0
        self.dataEnd = dataEnd
        self.fileLength = fileLength
        self.endFooterWasValid = endFooterValid
        self.parentName = parentName
    }

    // MARK: open

    /// Open a VHD: find and verify the footer (end of file, or the copy at 0), then for
    /// dynamic and differencing disks the dynamic header, BAT bounds and parent name.
    public static func open(file: HostFile, context: OpenContext) throws -> VHDLayer {
        let fileSize = try file.size()
        guard fileSize >= 512 else {
            throw ImageError(.invalidFormat, "file is \(fileSize) bytes, too small to hold a VHD footer", path: file.path, format: "vhd")
        }
        let tailOffset = fileSize - 512
        let tail = VHDFooter.parse(try file.read(at: tailOffset, count: 512))
        let head = VHDFooter.parse(try file.read(at: 0, count: 512))
        let endValid = tail?.checksumIsValid == true
        let footer: VHDFooter
        if let t = tail, t.checksumIsValid {
            footer = t
        } else if let h = head, h.checksumIsValid, h.type != .fixed {
            // The end footer is damaged or missing (a torn allocation, a truncated copy):
            // a dynamic disk's copy at offset 0 serves; check -r all rewrites the end.
            footer = h
        } else if let bad = tail ?? head {
            throw ImageError(.corrupt, "footer checksum mismatch: stored 0x\(vhdHex(bad.storedChecksum)), computed 0x\(vhdHex(bad.computedChecksum)); the footer is damaged and no good copy exists",
                             path: file.path, format: "vhd", offset: tail != nil ? tailOffset : 0)
        } else {
            throw ImageError(.invalidFormat, "not a VHD image: no footer (\"conectix\") at the start or the end of the file", path: file.path, format: "vhd")
        }
        guard let type = footer.type else {
            throw ImageError(.unsupported, "VHD disk type \(footer.diskType) is not supported (2 fixed, 3 dynamic, 4 differencing are)", path: file.path, format: "vhd")
        }
        let size = footer.virtualSize
        if size / 512 > VHDFooter.maxSectors {
            throw ImageError(.corrupt, "virtual size \(size) exceeds the VHD limit of 2040 GiB", path: file.path, format: "vhd")
        }
        if type == .fixed {
            guard endValid else {
                throw ImageError(.corrupt, "fixed VHD without a valid footer at the end of the file", path: file.path, format: "vhd")
            }
            guard size <= tailOffset else {
                throw ImageError(.corrupt, "fixed VHD holds \(tailOffset) bytes of data but its footer gives a \(size)-byte disk; the file is truncated",
                                 path: file.path, format: "vhd")
            }
            return VHDLayer(file: file, footer: footer, header: nil, type: .fixed, dataEnd: tailOffset, fileLength: fileSize,
                            endFooterValid: true, parentName: nil, context: context)
        }

        let header = try readHeader(file: file, footer: footer, fileSize: fileSize, virtualSize: size)
        var metadataEnd = max(footer.dataOffset + UInt64(VHDDynamicHeader.size), header.batOffset + UInt64(header.maxTableEntries) * 4)
        var parent: String?
        if type == .differencing {
            let (name, locatorEnd) = try parentName(file: file, header: header, fileSize: fileSize)
            parent = name
            metadataEnd = max(metadataEnd, locatorEnd)
        }
        // New blocks go where the end footer is now (damaged or not), never over metadata.
        let dataEnd = max(tail != nil ? tailOffset : fileSize, metadataEnd).alignedUp(512)
        return VHDLayer(file: file, footer: footer, header: header, type: type, dataEnd: dataEnd, fileLength: fileSize,
                        endFooterValid: endValid, parentName: parent, context: context)
    }

    /// Read and validate the dynamic header: checksum, block size, BAT size against the
    /// file and the disk (so a hostile entry count is refused before anything is read).
    static func readHeader(file: HostFile, footer: VHDFooter, fileSize: UInt64, virtualSize size: UInt64) throws -> VHDDynamicHeader {
        let at = footer.dataOffset
        let (headerEnd, o1) = at.addingReportingOverflow(UInt64(VHDDynamicHeader.size))
        guard !o1, at >= 512, headerEnd <= fileSize else {
            throw ImageError(.corrupt, "dynamic header offset \(at) lies outside the file (\(fileSize) bytes)", path: file.path, format: "vhd")
        }
        guard let header = VHDDynamicHeader.parse(try file.read(at: at, count: VHDDynamicHeader.size)) else {
            throw ImageError(.corrupt, "no dynamic disk header (\"cxsparse\") at offset \(at)", path: file.path, format: "vhd", offset: at)
        }
        guard header.checksumIsValid else {
            throw ImageError(.corrupt, "dynamic header checksum mismatch: stored 0x\(vhdHex(header.storedChecksum)), computed 0x\(vhdHex(header.computedChecksum)); the header is damaged",
                             path: file.path, format: "vhd", offset: at)
        }
        let bs = UInt64(header.blockSize)
        guard bs.isPowerOfTwo, bs >= 512, bs <= VHDDynamicHeader.maxBlockSize else {
            throw ImageError(.corrupt, "block size \(bs) is not a power of two from 512 bytes to 256 MiB", path: file.path, format: "vhd")
        }
        let entries = UInt64(header.maxTableEntries)
        let batBytes = entries * 4
        let (batEnd, o2) = header.batOffset.addingReportingOverflow(batBytes)
        guard !o2, batEnd <= fileSize else {
            throw ImageError(.corrupt, "BAT of \(entries) entries (\(batBytes) bytes) at offset \(header.batOffset) does not fit in the file (\(fileSize) bytes)",
                             path: file.path, format: "vhd")
        }
        guard entries * bs >= size else {
            throw ImageError(.corrupt, "BAT has \(entries) entries of \(bs) bytes, too few for the \(size)-byte disk", path: file.path, format: "vhd")
        }
        if batBytes > 0 && (header.batOffset < 512 || (header.batOffset < headerEnd && batEnd > at)) {
            throw ImageError(.corrupt, "BAT at offset \(header.batOffset) overlaps the footer copy or the dynamic header", path: file.path, format: "vhd")
        }
        return header
    }

    /// The parent's name from the locators (relative first) and the header's unicode
    /// name: the first candidate that exists beside the image, else the first one.
    /// Returns also the end of the locator data (metadata the allocator must not reuse).
    static func parentName(file: HostFile, header: VHDDynamicHeader, fileSize: UInt64) throws -> (String, UInt64) {
        var candidates: [String] = []
        var locatorEnd: UInt64 = 0
        let order = ["W2ru", "W2ku", "MacX", "Wi2r", "Wi2k"]
        let locators = header.locators.filter { !$0.isEmpty }.sorted {
            (order.firstIndex(of: $0.code) ?? order.count) < (order.firstIndex(of: $1.code) ?? order.count)
        }
        for l in locators {
            let (end, o) = l.dataOffset.addingReportingOverflow(UInt64(l.dataLength))
            guard !o, end <= fileSize, l.dataLength <= maxLocatorData, l.dataOffset >= 512 else { continue }
            locatorEnd = max(locatorEnd, end)
            let data = try file.read(at: l.dataOffset, count: Int(l.dataLength))
            if let text = VHDParentName.decode(code: l.code, data: data) {
                candidates += VHDParentName.candidates(for: text)
            }
        }
        let unicode = header.parentName
        if !unicode.isEmpty { candidates += VHDParentName.candidates(for: unicode) }
        var seen: Set<String> = []
        candidates = candidates.filter { seen.insert($0).inserted }
        guard let first = candidates.first else {
            throw ImageError(.corrupt, "differencing VHD names no parent (no usable parent locator or parent name); rebase it with 'vloop rebase -u -b PARENT -F vhd \(file.path)'",
                             path: file.path, format: "vhd")
        }
        let found = candidates.first { access(ImageOpener.resolve($0, relativeTo: file.path), F_OK) == 0 }
        return (found ?? first, locatorEnd)
    }

    // MARK: info

    public var layerInfo: ImageInfo {
        lock.run {
            var caps: Capabilities = [.discard, .resize]
            if type != .differencing { caps.insert(.efficientZero) }
            if writable { caps.insert(.writable) }
            let app = String(footer.creatorApp.unicodeScalars.filter { $0 != "\0" }).trimmingWhitespace()
            var specific: [(String, JSONValue)] = [
                ("subformat", .string(type.name)),
                ("creator", .string(app)),
                ("unique-id", .string(VHDFooter.uuidString(footer.uniqueID))),
                ("size-from", .string(footer.usesCurrentSize ? "current_size" : "chs")),
            ]
            if footer.savedState { specific.append(("saved-state", .bool(true))) }
            let backing = type == .differencing ? parentName.map { BackingReference(name: $0, format: "vhd") } : nil
            return ImageInfo(format: "vhd", virtualSize: virtualSize, clusterSize: type == .fixed ? 0 : blockSize,
                             capabilities: caps, backing: backing, path: file.path, formatSpecific: specific)
        }
    }

    // MARK: BAT and bitmaps through the cache (all under `lock`)

    var batBytes: UInt64 { UInt64(header?.maxTableEntries ?? 0) * 4 }

    /// The cache page holding BAT byte `pos`: its key (file offset) and length (pages
    /// never run past the BAT, so write-back touches nothing else).
    func batPage(_ pos: UInt64) -> (offset: UInt64, length: Int, within: Int) {
        let start = pos / Self.batPageSize * Self.batPageSize
        return (header!.batOffset + start, Int(min(Self.batPageSize, batBytes - start)), Int(pos - start))
    }

    func batEntry(_ i: UInt64) throws -> UInt32 {
        let (key, length, within) = batPage(i * 4)
        return try cache.withPage(owner: owner, offset: key, count: length, from: file, at: key) { p in
            ByteReader(p.bytes).be32(within)
        }
    }

    func setBATEntry(_ i: UInt64, _ value: UInt32) throws {
        let (key, length, within) = batPage(i * 4)
        try cache.withPage(owner: owner, offset: key, count: length, from: file, at: key) { p in
            p.bytes.putBE32(value, at: within)
            cache.markDirty(p, rank: Self.rankBAT)
        }
    }

    /// The file offset of block `i`'s bitmap, checked against the file and the metadata.
    func blockOffset(_ i: UInt64, _ entry: UInt32) throws -> UInt64 {
        let host = UInt64(entry) * 512
        let end = host + bitmapSize + blockSize
        if end > dataEnd || overlapsMetadata(host, end) {
            throw ImageError(.corrupt, "BAT entry \(i) places its block at \(host), outside the file or over its metadata; run 'vloop check \(file.path)'",
                             path: file.path, format: "vhd", offset: host)
        }
        return host
    }

    func overlapsMetadata(_ start: UInt64, _ end: UInt64) -> Bool {
        guard let h = header else { return false }
        func hits(_ a: UInt64, _ b: UInt64) -> Bool { start < b && a < end }
        return hits(0, 512) || hits(footer.dataOffset, footer.dataOffset + UInt64(VHDDynamicHeader.size))
            || hits(h.batOffset, h.batOffset + batBytes)
    }

    func withBitmap<R>(_ block: UInt64, _ body: (MetadataCache.Page) throws -> R) throws -> R {
        try cache.withPage(owner: owner, offset: block, count: Int(bitmapSize), from: file, at: block, body)
    }

    @inline(__always)
    static func bit(_ bitmap: [UInt8], _ sector: Int) -> Bool {
        bitmap[sector >> 3] & (0x80 >> UInt8(sector & 7)) != 0
    }

    @inline(__always)
    static func setBit(_ bitmap: inout [UInt8], _ sector: Int, _ on: Bool) {
        if on { bitmap[sector >> 3] |= 0x80 >> UInt8(sector & 7) } else { bitmap[sector >> 3] &= ~(0x80 >> UInt8(sector & 7)) }
    }

    /// The first sector at or after `from` (and before `limit`) whose bit differs from
    /// `state`; whole bytes of equal bits are skipped at once.
    static func runEnd(_ bitmap: [UInt8], from: Int, limit: Int, state: Bool) -> Int {
        let full: UInt8 = state ? 0xff : 0
        var k = from
        while k < limit {
            if k & 7 == 0 && k + 8 <= limit && bitmap[k >> 3] == full {
                k += 8
                continue
            }
            if bit(bitmap, k) != state { return k }
            k += 1
        }
        return limit
    }

    // MARK: mapping

    public func map(at offset: UInt64, length: UInt64) throws -> [LayerRun] {
        if isFixed { return mapFixed(at: offset, length: length) }
        return try lock.lookup { try mapLocked(at: offset, length: length) }
    }

    /// A fixed disk is its file's first bytes: holes read as zeroes, as for raw.
    private func mapFixed(at offset: UInt64, length: UInt64) -> [LayerRun] {
        // As for raw: no SEEK_DATA where nothing may wait.
        if NonBlocking.active { return [LayerRun(offset: offset, length: length, kind: .stored(file: file, hostOffset: offset))] }
        var runs: [LayerRun] = []
        let end = offset + length
        var pos = offset
        while pos < end {
            guard let data = file.nextData(from: pos), data < end else {
                runs.append(LayerRun(offset: pos, length: end - pos, kind: .zero))
                break
            }
            if data > pos { runs.append(LayerRun(offset: pos, length: data - pos, kind: .zero)) }
            let hole = min(max(file.nextHole(from: data), data + 1), end)
            runs.append(LayerRun(offset: data, length: hole - data, kind: .stored(file: file, hostOffset: data)))
            pos = hole
        }
        return runs
    }

    func mapLocked(at offset: UInt64, length: UInt64) throws -> [LayerRun] {
        var runs: [LayerRun] = []
        func add(_ at: UInt64, _ len: UInt64, _ kind: LayerRun.Kind) {
            runs.appendMerging(LayerRun(offset: at, length: len, kind: kind))
        }
        let absent: LayerRun.Kind = type == .differencing ? .unallocated : .zero
        let end = offset + length
        var pos = offset
        while pos < end {
            let i = pos / blockSize
            let blockStart = i * blockSize
            let chunkEnd = min(end, blockStart + blockSize)
            let entry = try batEntry(i)
            if entry == Self.unallocated {
                add(pos, chunkEnd - pos, .unallocated)
                pos = chunkEnd
                continue
            }
            let block = try blockOffset(i, entry)
            let data = block + bitmapSize
            let lastSector = Int((chunkEnd - 1 - blockStart) / 512)
            try withBitmap(block) { p in
                var q = pos
                while q < chunkEnd {
                    let k = Int((q - blockStart) / 512)
                    let present = Self.bit(p.bytes, k)
                    let kEnd = Self.runEnd(p.bytes, from: k + 1, limit: lastSector + 1, state: present)
                    let runEnd = min(chunkEnd, blockStart + UInt64(kEnd) * 512)
                    add(q, runEnd - q, present ? .stored(file: file, hostOffset: data + (q - blockStart)) : absent)
                    q = runEnd
                }
            }
            pos = chunkEnd
        }
        return runs
    }

    // MARK: footer, header, flush

    /// Write the footer at the end of the data and, for dynamic disks, its copy at 0.
    func writeFootersLocked() throws {
        let bytes = footer.serialized()
        footer = VHDFooter(bytes: bytes)
        try file.write(bytes, at: dataEnd)
        fileLength = max(fileLength, dataEnd + 512)
        if type != .fixed { try file.write(bytes, at: 0) }
    }

    func writeHeaderLocked() throws {
        guard let h = header else { return }
        let bytes = h.serialized()
        header = VHDDynamicHeader(bytes: bytes)
        try file.write(bytes, at: footer.dataOffset)
    }

    public func flush() throws {
        try lock.flush(dirty: { type != .fixed && cache.hasDirtyPages(owner: owner) }, locked: flushLocked, sync: file.sync)
    }

    func flushLocked() throws {
        if type != .fixed {
            try cache.writeBack(owner: owner, barrier: { try file.sync() }, write: { off, bytes in try file.write(bytes, at: off) })
        }
        try file.sync()
    }

    public func close() throws {
        if writable { try flush() }
        cache.drop(owner: owner)
        // The image locks go with the layer: an image built around this layer outside
        // the usual open (commit's) may not know to release them. Releasing twice is
        // harmless.
        ImageLock.release(file)
    }
}

func vhdHex(_ v: UInt32) -> String {
    let s = String(v, radix: 16)
    return String(repeating: "0", count: max(0, 8 - s.count)) + s
}
