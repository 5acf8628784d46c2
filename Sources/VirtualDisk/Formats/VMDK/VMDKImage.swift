/// A VMDK layer (VMware Virtual Disk): a descriptor naming extents laid end to end.
///
///     monolithicSparse / streamOptimized:  one "KDMV" file, descriptor embedded in it
///     monolithicFlat / twoGbMaxExtent* / vmfs* / custom:  a text descriptor + extent files
///     seSparse / COWD file opened directly:  one extent, no descriptor
///
/// Each extent answers for its own range (`VMDKExtentStore`); this layer routes guest
/// ranges to them, keeps the descriptor (CID, parent) and checks a delta link's parent.
/// Extent files are opened only through `OpenContext.openAuxiliary`, which applies the
/// open policy to names found in the descriptor.
public final class VMDKLayer: FormatLayer, BackingValidatingLayer, @unchecked Sendable {
    // Safe: `descriptor` and `cidUpdated` are read and written only under `lock`; the
    // extents are immutable after open and thread-safe themselves.

    enum DescriptorPlace {
        /// Inside a sparse extent: `offset`, room for `capacity` bytes.
        case embedded(offset: UInt64, capacity: Int)
        /// The whole of the image file.
        case file
        case none
    }

    struct Placed {
        let start: UInt64
        let store: VMDKExtentStore
    }

    let file: HostFile
    let extents: [Placed]
    let virtualSize: UInt64
    let writable: Bool
    let createType: String
    let place: DescriptorPlace
    let lock = Lock()
    var descriptor: VMDKDescriptor?
    var cidUpdated = false

    init(file: HostFile, extents: [Placed], writable: Bool, createType: String, place: DescriptorPlace, descriptor: VMDKDescriptor?) {
        self.file = file
        self.extents = extents
        self.virtualSize = extents.last.map { $0.start + $0.store.length } ?? 0
        self.writable = writable
        self.createType = createType
        self.place = place
        self.descriptor = descriptor
    }

    // MARK: open

    static func invalid(_ file: HostFile, _ message: String) -> ImageError {
        ImageError(.invalidFormat, message, path: file.path, format: "vmdk")
    }

    /// Open a VMDK image: a sparse extent (with its embedded descriptor), a bare
    /// seSparse or COWD extent, or a text descriptor naming extent files.
    public static func open(file: HostFile, context: OpenContext) throws -> VMDKLayer {
        let size = try file.size()
        guard size >= 4 else { throw invalid(file, "file is \(size) bytes, too small to be a VMDK image") }
        let head = try file.read(at: 0, count: Int(min(size, 2048)))
        let cache = context.cache
        if head.starts(with: VMDKSparseHeader.magic) {
            guard let header = VMDKSparseHeader.parse(head) else { throw invalid(file, "sparse header is truncated") }
            var descriptor: VMDKDescriptor?
            var place = DescriptorPlace.none
            if header.descriptorOffset > 0 && header.descriptorSize > 0 {
                let at = try checkedProduct(header.descriptorOffset, 512, "descriptor offset")
                let bytes = try checkedProduct(header.descriptorSize, 512, "descriptor size")
                guard bytes <= UInt64(VMDKDescriptor.maxSize), at < size else {
                    throw ImageError(.corrupt, "embedded descriptor (\(bytes) bytes at \(at)) is too large or outside the file", path: file.path, format: "vmdk")
                }
                let text = try file.read(at: at, count: Int(bytes))
                descriptor = try ImageError.attributing(to: file.path) { try VMDKDescriptor.parse(text) }
                place = .embedded(offset: at, capacity: Int(bytes))
            }
            if header.capacity == 0, let d = descriptor, !d.extents.isEmpty {
                // A descriptor file that happens to sit inside a sparse header (qemu reads it so).
                return try openDescriptor(d, file: file, place: place, context: context)
            }
            let access = descriptor?.extents.first?.access ?? .readWrite
            let extent = try VMDKSparseExtent.openHosted(file: file, header: header, length: nil, access: access,
                                                          writable: context.writable, cache: cache)
            let type = descriptor?.createType ?? (extent.compressed ? "streamOptimized" : "monolithicSparse")
            return VMDKLayer(file: file, extents: [Placed(start: 0, store: extent)], writable: context.writable && extent.canWrite,
                             createType: type, place: place, descriptor: descriptor)
        }
        if head.starts(with: VMDKCOWDHeader.magic) {
            let extent = try VMDKSparseExtent.openCOWD(file: file, length: nil, access: .readOnly, cache: cache)
            return VMDKLayer(file: file, extents: [Placed(start: 0, store: extent)], writable: false, createType: "vmfsSparse", place: .none, descriptor: nil)
        }
        if ByteReader(head).le64(0) == VMDKSESparseHeader.magic {
            let extent = try VMDKSparseExtent.openSESparse(file: file, length: nil, access: .readOnly, cache: cache)
            return VMDKLayer(file: file, extents: [Placed(start: 0, store: extent)], writable: false, createType: "seSparse", place: .none, descriptor: nil)
        }
        guard size <= UInt64(VMDKDescriptor.maxSize) else {
            throw invalid(file, "not a VMDK image: no sparse extent magic, and at \(size) bytes too large for a descriptor file")
        }
        let text = try file.read(at: 0, count: Int(size))
        let d = try ImageError.attributing(to: file.path) { try VMDKDescriptor.parse(text) }
        return try openDescriptor(d, file: file, place: .file, context: context)
    }

    static let deviceTypes: Set<String> = ["fulldevice", "partitioneddevice", "vmfsraw", "vmfsrdm", "vmfsrdmp",
                                            "vmfsrawdevicemap", "vmfspassthroughrawdevicemap"]

    /// Open the extents a descriptor names, in order.
    static func openDescriptor(_ d: VMDKDescriptor, file: HostFile, place: DescriptorPlace, context: OpenContext) throws -> VMDKLayer {
        guard !d.extents.isEmpty else {
            throw invalid(file, "descriptor names no extents (no 'RW SECTORS TYPE \"FILE\"' lines)")
        }
        let type = d.createType ?? "custom"
        if deviceTypes.contains(type.lowercased()) {
            throw ImageError(.unsupported, "createType \"\(type)\" maps a physical device; vloop opens only files", path: file.path, format: "vmdk")
        }
        var placed: [Placed] = []
        var start: UInt64 = 0
        var writable = context.writable
        for e in d.extents {
            let length = try checkedProduct(e.sectors, 512, "extent size")
            let (end, o) = start.addingReportingOverflow(length)
            guard !o, end < (1 << 62) else { throw invalid(file, "extents add up to more than a disk can hold") }
            let wantWrite = context.writable && e.access == .readWrite
            let store: VMDKExtentStore
            if e.access == .noAccess || e.type == .zero {
                store = VMDKZeroExtent(length: length, access: e.access, name: e.fileName, descriptorPath: file.path)
            } else {
                guard let name = e.fileName else { throw invalid(file, "extent without a file name") }
                let f = try openExtentFile(name, writable: wantWrite, file: file, context: context)
                store = try ImageError.attributing(to: f.path) { try openExtent(e, file: f, length: length, writable: wantWrite, cache: context.cache) }
            }
            if !store.canWrite { writable = false }
            placed.append(Placed(start: start, store: store))
            start = end
        }
        return VMDKLayer(file: file, extents: placed, writable: writable, createType: type, place: place, descriptor: d)
    }

    static func openExtentFile(_ name: String, writable: Bool, file: HostFile, context: OpenContext) throws -> HostFile {
        do {
            return try context.openAuxiliary(name, writable)
        } catch let e as ImageError where e.code == .notFound {
            throw ImageError(.notFound, "extent file '\(name)' named in the descriptor was not found (looked beside \(file.path))",
                             path: file.path, format: "vmdk")
        }
    }

    static func openExtent(_ e: VMDKDescriptor.Extent, file f: HostFile, length: UInt64, writable: Bool, cache: MetadataCache) throws -> VMDKExtentStore {
        switch e.type {
        case .flat, .vmfs:
            let start = try checkedProduct(e.type == .vmfs ? 0 : e.offsetSectors, 512, "extent offset")
            return VMDKFlatExtent(file: f, start: start, length: length, access: e.access, typeName: e.type.name)
        case .sparse, .vmfsSparse:
            let head = try f.read(at: 0, count: 2048)
            if let h = VMDKSparseHeader.parse(head) {
                return try VMDKSparseExtent.openHosted(file: f, header: h, length: length, access: e.access, writable: writable, cache: cache)
            }
            if VMDKCOWDHeader.parse(head) != nil {
                return try VMDKSparseExtent.openCOWD(file: f, length: length, access: e.access, cache: cache)
            }
            throw ImageError(.invalidFormat, "\(e.type.name) extent is neither a hosted sparse (KDMV) nor a COWD extent", path: f.path, format: "vmdk")
        case .seSparse:
            return try VMDKSparseExtent.openSESparse(file: f, length: length, access: e.access, cache: cache)
        case .zero:
            return VMDKZeroExtent(length: length, access: e.access, name: nil, descriptorPath: f.path)
        case .other(let t):
            throw ImageError(.unsupported, "extent type '\(t)' is not supported (SPARSE, FLAT, ZERO, VMFS, VMFSSPARSE and SESPARSE are)", path: f.path, format: "vmdk")
        }
    }

    // MARK: info

    var cid: UInt32? { lock.run { descriptor?.cid } }
    var parentCID: UInt32? { lock.run { descriptor?.parentCID } }
    var parentHint: String? { lock.run { descriptor?.parentFileNameHint } }

    public var layerInfo: ImageInfo {
        lock.run {
            var caps: Capabilities = [.discard]
            if writable { caps.insert(.writable) }
            let grain = extents.map(\.store.grainBytes).first { $0 > 0 } ?? 0
            var specific: [(String, JSONValue)] = [("create-type", .string(createType))]
            if let c = descriptor?.cid { specific.append(("cid", .uint(UInt64(c)))) }
            if let p = descriptor?.parentCID { specific.append(("parent-cid", .uint(UInt64(p)))) }
            specific.append(("extents", .array(extents.map { p in
                var o: [(String, JSONValue)] = [("filename", .string(p.store.file?.path ?? "")), ("format", .string(p.store.typeName)),
                                                ("virtual-size", .uint(p.store.length))]
                if p.store.grainBytes > 0 { o.append(("cluster-size", .uint(p.store.grainBytes))) }
                if p.store.isCompressed { o.append(("compressed", .bool(true))) }
                return .object(o)
            })))
            let backing = descriptor?.parentFileNameHint.map { BackingReference(name: $0, format: "vmdk") }
            return ImageInfo(format: "vmdk", virtualSize: virtualSize, clusterSize: grain, capabilities: caps,
                             backing: backing, path: file.path, formatSpecific: specific)
        }
    }

    /// A delta link records its parent's CID (`parentCID`); the parent opened below must
    /// still carry it, else its content changed since the link was made.
    public func validateBacking(_ backing: DiskImage) throws {
        guard let want = parentCID, let parent = (backing as? LayeredImage)?.layer as? VMDKLayer else { return }
        let name = parentHint ?? backing.info.path
        guard let have = parent.cid else {
            throw ImageError(.chain, "parent '\(name)' has no CID in its descriptor; this delta link expects CID \(VMDKDescriptor.hex(want))",
                             path: file.path, format: "vmdk")
        }
        if have != want {
            throw ImageError(.chain, "parent '\(name)' has CID \(VMDKDescriptor.hex(have)) but this delta link was made on CID \(VMDKDescriptor.hex(want)) (parentCID): the parent changed after the link was made; if it is the right parent, set parentCID=\(VMDKDescriptor.hex(have)) in the descriptor",
                             path: file.path, format: "vmdk")
        }
    }

    // MARK: routing

    /// The extents overlapping `offset ..< offset+length`, with the extent-relative range.
    func pieces(_ offset: UInt64, _ length: UInt64) -> [(Placed, UInt64, UInt64, Int)] {
        var out: [(Placed, UInt64, UInt64, Int)] = []
        let end = offset + length
        var lo = 0, hi = extents.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if extents[mid].start + extents[mid].store.length <= offset { lo = mid + 1 } else { hi = mid }
        }
        var i = lo
        while i < extents.count && extents[i].start < end {
            let p = extents[i]
            let a = max(offset, p.start), b = min(end, p.start + p.store.length)
            if b > a { out.append((p, a - p.start, b - a, i)) }
            i += 1
        }
        return out
    }

    public func map(at offset: UInt64, length: UInt64) throws -> [LayerRun] {
        var runs: [LayerRun] = []
        for (p, local, len, i) in pieces(offset, length) {
            let extentIndex = UInt64(i)
            for r in try p.store.map(at: local, length: len) {
                var kind = r.kind
                if case .encoded(let t) = r.kind { kind = .encoded(token: extentIndex << 48 | t) }
                runs.append(LayerRun(offset: p.start + r.offset, length: r.length, kind: kind))
            }
        }
        return runs
    }

    public func readEncoded(token: UInt64, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        let i = Int(token >> 48)
        guard i < extents.count else { throw ImageError(.corrupt, "bad compressed-data token", path: file.path, format: "vmdk") }
        let p = extents[i]
        try p.store.readEncoded(token: token & 0xffff_ffff_ffff, at: offset - p.start, into: buffer)
    }

    private func requireWritable(_ p: Placed) throws {
        guard writable, p.store.canWrite else {
            throw ImageError(.readOnly, "extent '\(p.store.file?.path ?? p.store.typeName)' is \(p.store.access == .readWrite ? "read-only" : p.store.access.rawValue)",
                             path: file.path, format: "vmdk")
        }
    }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, below: BelowReader) throws {
        try noteFirstWrite()
        for (p, local, len, _) in pieces(offset, UInt64(data.count)) {
            try requireWritable(p)
            let s = Int(p.start + local - offset)
            let start = p.start
            try p.store.write(UnsafeRawBufferPointer(rebasing: data[s..<(s + Int(len))]), at: local,
                              below: { o, b in try below(o + start, b) })
        }
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, hasBacking: Bool, below: BelowReader) throws {
        try noteFirstWrite()
        for (p, local, len, _) in pieces(offset, length) {
            try requireWritable(p)
            let start = p.start
            try p.store.writeZeroes(at: local, length: len, mayUnmap: mayUnmap, hasBacking: hasBacking,
                                    below: { o, b in try below(o + start, b) })
        }
    }

    public func discard(at offset: UInt64, length: UInt64, hasBacking: Bool) throws {
        for (p, local, len, _) in pieces(offset, length) where p.store.canWrite {
            try p.store.discard(at: local, length: len, hasBacking: hasBacking)
        }
    }

    /// Give the disk a new CID on its first change after open (as VMware and qemu do), so
    /// delta links made on the old content no longer trust it. The descriptor is updated
    /// before any data changes.
    func noteFirstWrite() throws {
        try lock.run {
            guard !cidUpdated, writable else { return }
            cidUpdated = true
            guard var d = descriptor, d.cid != nil else { return }
            var cid = UInt32.random(in: 0...0xffff_fffd)
            if cid == d.cid { cid &+= 1 }
            d.set("CID", VMDKDescriptor.hex(cid))
            let bytes = d.serialized()
            switch place {
            case .embedded(let at, let capacity):
                // A descriptor that no longer fits keeps its old CID (never overwrite grains).
                guard bytes.count <= capacity else { return }
                try file.write(bytes + [UInt8](repeating: 0, count: capacity - bytes.count), at: at)
            case .file:
                try file.write(bytes, at: 0)
                try file.truncate(to: UInt64(bytes.count))
            case .none:
                return
            }
            try file.sync()
            descriptor = d
        }
    }

    public func flush() throws {
        for p in extents where p.store.canWrite { try p.store.flush() }
    }

    public func close() throws {
        var first: Error?
        for p in extents {
            do { try p.store.close() } catch { if first == nil { first = error } }
        }
        ImageLock.release(file)
        if let first { throw first }
    }
}

extension VMDKLayer: CompressingLayer {
    public var compressionUnit: UInt64 {
        let g = extents.map(\.store.grainBytes).max() ?? 0
        return g > 0 ? g : 65536
    }

    /// The streamOptimized extent grain that `data` at `offset` exactly covers, if any.
    private func compressedGrain(_ offset: UInt64, _ count: Int) -> (Placed, VMDKSparseExtent, UInt64)? {
        let ps = pieces(offset, UInt64(count))
        guard ps.count == 1, let s = ps[0].0.store as? VMDKSparseExtent, s.compressed else { return nil }
        let local = ps[0].1
        guard local % s.grainBytes == 0, UInt64(count) == min(s.grainBytes, s.length - local) else { return nil }
        return (ps[0].0, s, local / s.grainBytes)
    }

    /// Compressed extents compress every grain anyway; other extents store it plainly.
    public func compressUnit(_ data: UnsafeRawBufferPointer, at offset: UInt64) -> [UInt8]? {
        guard compressedGrain(offset, data.count) != nil else { return nil }
        return VMDKZlib.compress(data, capacity: data.count * 2 + 1024)
    }

    public func storeUnit(_ data: UnsafeRawBufferPointer, packed: [UInt8]?, at offset: UInt64) throws {
        guard let packed, let (p, s, g) = compressedGrain(offset, data.count) else {
            try write(data, at: offset, below: { _, b in b.initializeMemory(as: UInt8.self, repeating: 0) })
            return
        }
        try noteFirstWrite()
        try requireWritable(p)
        try s.storePackedGrain(g, packed: packed, bytes: data)
    }
}
