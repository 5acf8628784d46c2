#if canImport(Glibc)
import Glibc
#endif

/// A VDI layer (VirtualBox Disk Image): dynamic, static and differencing images, read
/// and write.
///
/// Layout (as qemu-img and VirtualBox write it):
///
///     0 pre-header + header | block map (u32 LE per block) | data block 0 | data block 1 | …
///     data block: block extra (usually 0 bytes) | block size bytes of guest data
///
/// Block map entries: 0xffffffff not allocated (a differencing image reads its parent
/// there, others zeroes), 0xfffffffe a zero block, anything else the index of a data
/// block. The map is read in 4 KiB pages through the shared `MetadataCache`, never whole.
///
/// Data blocks are dense: indices 0 ..< n, n = `blocks allocated`, so a writer that
/// trusts the count (qemu, VirtualBox) puts the next block at index n. New blocks go at
/// the end of the used data; the count is raised before the map entry that uses a
/// block is written. Write-back order, with a storage barrier before each step:
///
///     data (written directly) → header (blocks allocated) → block map pages
///
/// so a crash can leave a block unreferenced or the count ahead of the map (a leak; check
/// -r reclaims it), never a map entry pointing at data that has not reached the disk, nor
/// a count that would let the next allocation overwrite a block in use.
public final class VDILayer: FormatLayer, @unchecked Sendable {
    // Safe: the mutable properties below (header, type, offsetData, virtualSize, blocks,
    // nextSlot, fileLength, headerDirty, parentName, parentSearched) are read and written
    // only under `lock`; `allocLock` orders allocating writes and metadata changes that
    // move data; cache pages are this layer's alone and touched under `lock`
    // (MetadataCache's ownership rule).

    static let rankMap = 0
    static let mapPageSize: UInt64 = 4096
    /// Files read per directory when looking for a parent by UUID.
    static let maxParentCandidates = 4096

    let file: HostFile
    let cache: MetadataCache
    let owner = MetadataCache.newOwner()
    let writable: Bool
    let lock = MetadataLock()
    let allocLock = Lock()

    var header: VDIHeader
    var type: VDIHeader.ImageType
    let blockSize: UInt64
    let blockExtra: UInt64
    let span: UInt64
    let offsetBmap: UInt64
    /// Changes only when a resize moves data blocks (under both locks).
    var offsetData: UInt64
    var virtualSize: UInt64
    /// Entries in the block map.
    var blocks: UInt64
    /// The index the next new data block gets: one past the highest in use. Found by a
    /// scan of the map at the first allocation (nil until then).
    var nextSlot: UInt64?
    var fileLength: UInt64
    /// The header in memory differs from the file (blocks allocated, after allocation).
    var headerDirty = false
    /// The parent, as the opener should resolve it (differencing images only).
    var parentName: String?
    /// Where the parent was looked for, for messages.
    var parentSearched: [String] = []

    init(file: HostFile, header: VDIHeader, type: VDIHeader.ImageType, fileLength: UInt64, context: OpenContext) {
        self.file = file
        self.cache = context.cache
        self.writable = context.writable
        self.header = header
        self.type = type
        self.blockSize = UInt64(header.blockSize)
        self.blockExtra = UInt64(header.blockExtra)
        self.span = header.blockSpan
        self.offsetBmap = UInt64(header.offsetBmap)
        self.offsetData = UInt64(header.offsetData)
        self.virtualSize = header.virtualSize
        self.blocks = UInt64(header.blocksInImage)
        self.fileLength = fileLength
    }

    // MARK: open

    /// Open a VDI: read and validate the header; for a differencing image find the parent
    /// by its UUID next to the image.
    public static func open(file: HostFile, context: OpenContext) throws -> VDILayer {
        let fileSize = try file.size()
        guard fileSize >= UInt64(VDIHeader.preHeaderSize) + UInt64(VDIHeader.headerSizeV1) else {
            throw ImageError(.invalidFormat, "file is \(fileSize) bytes, too small to hold a VDI header", path: file.path, format: "vdi")
        }
        guard let header = VDIHeader.parse(try file.read(at: 0, count: VDIHeader.storedSize)) else {
            throw ImageError(.invalidFormat, "not a VDI image: no signature 0xbeda107f at offset 0x40", path: file.path, format: "vdi")
        }
        try header.validate(fileSize: fileSize, path: file.path)
        let layer = VDILayer(file: file, header: header, type: header.type!, fileLength: fileSize, context: context)
        if layer.type.hasParent {
            // A null link UUID names no parent: nothing is searched, and the open of
            // the chain fails on the guessed name below.
            let (name, searched) = header.uuidLink.isNull ? (nil, []) : findParent(of: file, uuid: header.uuidLink)
            layer.parentSearched = searched
            // Not found: VirtualBox names a snapshot image after its own UUID, so that
            // name is the best guess; the opener then reports it missing.
            layer.parentName = name ?? "{\(header.uuidLink)}.vdi"
        }
        return layer
    }

    /// The directories a differencing image's parent is looked for in: the image's own
    /// and the one above (VirtualBox keeps snapshots in `Snapshots/` below the base).
    static func parentDirectories(of path: String) -> [(dir: String, prefix: String)] {
        guard let slash = path.lastIndex(of: "/") else { return [(".", ""), ("..", "../")] }
        let dir = String(path[..<slash])
        return [(dir.isEmpty ? "/" : dir, ""), ((dir.isEmpty ? "" : dir) + "/..", "../")]
    }

    /// Find the `.vdi` file whose image UUID is `uuid`, in the image's directory, then the
    /// one above: its name relative to the image, and the directories searched. Only
    /// regular files are read (512 bytes each), at most `maxParentCandidates` a directory.
    static func findParent(of child: HostFile, uuid: VDIUUID) -> (String?, [String]) {
        var childStat = stat()
        fstat(child.fd, &childStat)
        var searched: [String] = []
        for (dir, prefix) in parentDirectories(of: child.path) {
            searched.append(dir)
            guard let d = opendir(dir) else { continue }
            var names: [String] = []
            while let entry = readdir(d) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                    String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
                }
                if name.lowercased().hasSuffix(".vdi") { names.append(name) }
                if names.count >= maxParentCandidates { break }
            }
            closedir(d)
            for name in names.sorted() {
                let path = dir + "/" + name
                var st = stat()
                guard stat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { continue }
                if st.st_dev == childStat.st_dev && st.st_ino == childStat.st_ino { continue }
                let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
                guard fd >= 0 else { continue }
                var buf = [UInt8](repeating: 0, count: VDIHeader.storedSize)
                let n = buf.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
                Glibc.close(fd)
                guard n == VDIHeader.storedSize, let h = VDIHeader.parse(buf), h.uuidImage == uuid else { continue }
                return (prefix + name, searched)
            }
        }
        return (nil, searched)
    }

    // MARK: info

    public var layerInfo: ImageInfo {
        lock.run {
            var caps: Capabilities = [.discard, .resize]
            if !type.hasParent { caps.insert(.efficientZero) }
            if writable { caps.insert(.writable) }
            var specific: [(String, JSONValue)] = [
                ("type", .string(type.name)),
                ("uuid", .string(header.uuidImage.description)),
                ("blocks-allocated", .uint(UInt64(header.blocksAllocated))),
            ]
            var backing: BackingReference?
            if type.hasParent {
                specific.append(("parent-uuid", .string(header.uuidLink.description)))
                specific.append(("parent-search", .array(parentSearched.map { .string($0) })))
                backing = parentName.map { BackingReference(name: $0, format: "vdi") }
            }
            return ImageInfo(format: "vdi", virtualSize: virtualSize, clusterSize: blockSize,
                             capabilities: caps, backing: backing, path: file.path, formatSpecific: specific)
        }
    }

    // MARK: block map through the cache (all under `lock`)

    var mapBytes: UInt64 { blocks * 4 }

    /// The cache page holding map byte `pos`: its key (file offset), length (pages never
    /// run past the map, so write-back touches nothing else) and the position within.
    func mapPage(_ pos: UInt64) -> (offset: UInt64, length: Int, within: Int) {
        let start = pos / Self.mapPageSize * Self.mapPageSize
        return (offsetBmap + start, Int(min(Self.mapPageSize, mapBytes - start)), Int(pos - start))
    }

    func mapEntry(_ i: UInt64) throws -> UInt32 {
        let (key, length, within) = mapPage(i * 4)
        return try cache.withPage(owner: owner, offset: key, count: length, from: file, at: key) { p in
            ByteReader(p.bytes).le32(within)
        }
    }

    func setMapEntry(_ i: UInt64, _ value: UInt32) throws {
        let (key, length, within) = mapPage(i * 4)
        try cache.withPage(owner: owner, offset: key, count: length, from: file, at: key) { p in
            p.bytes.putLE32(value, at: within)
            cache.markDirty(p, rank: Self.rankMap)
        }
    }

    /// Call `body` with every entry, a page at a time.
    func forEachEntry(_ body: (UInt64, UInt32) throws -> Void) throws {
        var i: UInt64 = 0
        while i < blocks {
            let (key, length, _) = mapPage(i * 4)
            let entries = try cache.withPage(owner: owner, offset: key, count: length, from: file, at: key) { p in
                (0..<(length / 4)).map { ByteReader(p.bytes).le32($0 * 4) }
            }
            for e in entries {
                try body(i, e)
                i += 1
            }
        }
    }

    /// File offset of data block `slot` (its block extra first).
    func slotOffset(_ slot: UInt64) -> UInt64 { offsetData + slot * span }

    /// File offset of the guest data of block `i`, whose map entry is `entry`; an index
    /// past the image's blocks is refused (it would place data anywhere).
    func dataOffset(_ i: UInt64, _ entry: UInt32) throws -> UInt64 {
        guard UInt64(entry) < blocks else {
            throw ImageError(.corrupt, "block map entry \(i) points at data block \(entry), past the \(blocks) blocks of the image; run 'vloop check -r all \(file.path)'",
                             path: file.path, format: "vdi", offset: offsetBmap + i * 4)
        }
        return slotOffset(UInt64(entry)) + blockExtra
    }

    /// One past the highest data block index in use (a scan of the whole map).
    func usedSlotEndLocked() throws -> UInt64 {
        var end: UInt64 = 0
        try forEachEntry { _, e in
            if e < VDIHeader.blockZero && UInt64(e) < blocks { end = max(end, UInt64(e) + 1) }
        }
        return end
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
        let end = offset + length
        var pos = offset
        while pos < end {
            let i = pos / blockSize
            let blockStart = i * blockSize
            let chunkEnd = min(end, blockStart + blockSize)
            let entry = try mapEntry(i)
            switch entry {
            case VDIHeader.blockFree: add(pos, chunkEnd - pos, .unallocated)
            case VDIHeader.blockZero: add(pos, chunkEnd - pos, .zero)
            default: add(pos, chunkEnd - pos, .stored(file: file, hostOffset: try dataOffset(i, entry) + (pos - blockStart)))
            }
            pos = chunkEnd
        }
        return runs
    }

    // MARK: header, flush

    func writeHeaderLocked() throws {
        try file.write(header.serialized(), at: 0)
        headerDirty = false
    }

    public func flush() throws {
        guard writable else { return }
        try lock.flush(dirty: { headerDirty || cache.hasDirtyPages(owner: owner) }, locked: flushLocked, sync: file.sync)
    }

    /// Data, then the header (its count), then the map pages, a barrier before each.
    func flushLocked() throws {
        guard writable else { return }
        if headerDirty {
            try file.sync()
            try writeHeaderLocked()
        }
        try cache.writeBack(owner: owner, barrier: { try file.sync() }, write: { off, bytes in try file.write(bytes, at: off) })
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
