/// Creating VMDK images with qemu-img's option names (`-f vmdk -o subformat=…`).
public struct VMDKCreateOptions: Sendable {
    public enum Subformat: String, CaseIterable, Sendable {
        case monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat, streamOptimized
    }
    public var size: UInt64
    public var subformat = Subformat.monolithicSparse
    public var adapterType = "ide"
    public var hwVersion = "4"
    public var toolsVersion = "2147483647"
    public var zeroedGrain = false
    /// A delta link: the parent's name as recorded, and its CID.
    public var parent: (name: String, cid: UInt32)?

    public init(size: UInt64) { self.size = size }

    /// Bytes per extent file of the twoGbMaxExtent layouts. qemu-img 7.2 (the peer the
    /// tests run against) makes 2 GiB extents; VMware's own tools use 2 GiB - 1 MiB.
    public static let splitSize: UInt64 = 2 << 30
}

extension VMDKLayer {
    static let adapterTypes = ["ide", "buslogic", "lsilogic", "legacyESX"]

    static func create(_ r: CreateRequest, size: UInt64, options: [(String, String)]) throws {
        var o = VMDKCreateOptions(size: size.alignedUp(512))
        var compat6 = false
        var hw: String?
        for (k, v) in options {
            switch k {
            case "subformat":
                guard let s = VMDKCreateOptions.Subformat(rawValue: v) else {
                    throw ImageError(.invalidArgument, "subformat must be one of \(VMDKCreateOptions.Subformat.allCases.map(\.rawValue).joined(separator: ", ")) (got '\(v)')")
                }
                o.subformat = s
            case "adapter_type":
                guard let a = adapterTypes.first(where: { $0.lowercased() == v.lowercased() }) else {
                    throw ImageError(.invalidArgument, "adapter_type must be one of \(adapterTypes.joined(separator: ", ")) (got '\(v)')")
                }
                o.adapterType = a
            case "hwversion": hw = v == "undefined" ? nil : v
            case "compat6": compat6 = try OptionList.bool(v, k)
            case "toolsversion": o.toolsVersion = v
            case "zeroed_grain": o.zeroedGrain = try OptionList.bool(v, k)
            default: throw ImageError(.invalidArgument, "'vmdk' does not support option '\(k)'")
            }
        }
        if compat6 {
            if hw != nil { throw ImageError(.invalidArgument, "compat6 cannot be enabled with hwversion set") }
            hw = "6"
        }
        o.hwVersion = hw ?? "4"
        let flat = o.subformat == .monolithicFlat || o.subformat == .twoGbMaxExtentFlat
        if flat && o.zeroedGrain { throw ImageError(.invalidArgument, "a flat VMDK cannot use zeroed grains; drop zeroed_grain=on") }
        if let b = r.backingFile {
            if flat { throw ImageError(.invalidArgument, "a flat VMDK cannot have a backing file (use a sparse subformat)") }
            if let f = r.backingFormat, f != .vmdk {
                throw ImageError(.invalidArgument, "a VMDK delta link's parent must be a VMDK image (-F vmdk), not \(f.rawValue)")
            }
            o.parent = (b, try parentCID(name: b, child: r.path))
        }
        try create(path: r.path, options: o)
    }

    /// The CID of the parent a delta link is made on.
    static func parentCID(name: String, child: String) throws -> UInt32 {
        let resolved = ImageOpener.resolve(name, relativeTo: child)
        var o = OpenOptions(format: .vmdk)
        o.forceShare = true
        o.noBacking = true
        o.userNamed = [name, resolved]
        let parent = try ImageOpener.open(resolved, options: o)
        defer { try? parent.close() }
        guard let layer = (parent as? LayeredImage)?.layer as? VMDKLayer, let cid = layer.cid else {
            throw ImageError(.invalidArgument, "parent '\(name)' has no CID to record (a VMDK descriptor is needed)", path: resolved)
        }
        return cid
    }

    /// Write a new, empty VMDK at `path` laid out as qemu-img does (except
    /// streamOptimized, which gets VMware's layout: grain directory at the end).
    public static func create(path: String, options o: VMDKCreateOptions) throws {
        let size = o.size.alignedUp(512)
        guard size > 0 else { throw ImageError(.invalidArgument, "a VMDK needs a size above 0") }
        let flat = o.subformat == .monolithicFlat || o.subformat == .twoGbMaxExtentFlat
        let split = o.subformat == .twoGbMaxExtentSparse || o.subformat == .twoGbMaxExtentFlat
        if !flat && (split ? VMDKCreateOptions.splitSize : size) > (1 << 41) {
            throw ImageError(.invalidArgument, "a VMDK sparse extent holds at most 2 TiB; use a twoGbMaxExtent subformat")
        }
        let (dir, prefix, postfix) = decompose(path)
        var cid = UInt32.random(in: 0...0xffff_fffd)
        if cid == o.parent?.cid { cid &+= 1 }
        func descriptor(_ extents: [VMDKDescriptor.Extent]) -> VMDKDescriptor {
            VMDKDescriptor.make(cid: cid, parentCID: o.parent?.cid ?? 0xffff_ffff, createType: o.subformat.rawValue,
                                parentFileNameHint: o.parent?.name, extents: extents, hwVersion: o.hwVersion,
                                adapterType: o.adapterType, size: size, toolsVersion: o.toolsVersion)
        }
        let type: VMDKDescriptor.ExtentType = flat ? .flat : .sparse
        if !split && !flat {
            let name = prefix + postfix
            let d = descriptor([.init(access: .readWrite, sectors: size / 512, type: .sparse, fileName: name)]).serialized()
            let f = try HostFile(path: path, writable: true, create: true, truncate: true)
            if o.subformat == .streamOptimized {
                try writeStreamExtent(f, capacity: size, descriptor: d)
            } else {
                try writeSparseExtent(f, capacity: size, zeroedGrain: o.zeroedGrain, descriptor: d)
            }
            try f.sync()
            return
        }
        var extents: [VMDKDescriptor.Extent] = []
        var done: UInt64 = 0
        var index = 1
        while done < size {
            let n = split ? min(VMDKCreateOptions.splitSize, size - done) : size
            let name = split ? "\(prefix)-\(flat ? "f" : "s")\(index < 10 ? "00" : index < 100 ? "0" : "")\(index)\(postfix)" : "\(prefix)-flat\(postfix)"
            let f = try HostFile(path: dir + name, writable: true, create: true, truncate: true)
            if flat {
                try f.truncate(to: n)
            } else {
                try writeSparseExtent(f, capacity: n, zeroedGrain: o.zeroedGrain, descriptor: nil)
            }
            try f.sync()
            extents.append(.init(access: .readWrite, sectors: n / 512, type: type, fileName: name))
            done += n
            index += 1
        }
        let bytes = descriptor(extents).serialized()
        let f = try HostFile(path: path, writable: true, create: true, truncate: true)
        try f.write(bytes, at: 0)
        try f.sync()
    }

    /// Directory (with its slash), base name without the extension, extension.
    static func decompose(_ path: String) -> (String, String, String) {
        var dir = "", base = path
        if let slash = path.lastIndex(of: "/") {
            dir = String(path[...slash])
            base = String(path[path.index(after: slash)...])
        }
        if let dot = base.lastIndex(of: "."), dot != base.startIndex {
            return (dir, String(base[..<dot]), String(base[dot...]))
        }
        return (dir, base, "")
    }

    static func newHeader(capacity: UInt64) -> VMDKSparseHeader {
        var h = VMDKSparseHeader()
        h.capacity = capacity / 512
        h.grainSize = 128
        h.numGTEsPerGT = 512
        h.descriptorOffset = 1
        h.descriptorSize = 20
        return h
    }

    /// A hosted sparse extent as qemu-img lays it out:
    ///
    ///     0 header | 1 descriptor (20 sectors) | 21 redundant GD | its GTs | GD | its GTs
    ///     | grains from the next 64 KiB boundary
    ///
    /// Every grain table is preallocated (zeroes: holes in the file).
    static func writeSparseExtent(_ f: HostFile, capacity: UInt64, zeroedGrain: Bool, descriptor: [UInt8]?) throws {
        var h = newHeader(capacity: capacity)
        h.version = zeroedGrain ? 2 : 1
        h.flags = VMDKSparseHeader.flagRedundantGD | VMDKSparseHeader.flagNewlineTest | (zeroedGrain ? VMDKSparseHeader.flagZeroedGTE : 0)
        let grains = (h.capacity + h.grainSize - 1) / h.grainSize
        let gtSectors = UInt64(h.numGTEsPerGT) * 4 / 512
        let gtCount = (grains + UInt64(h.numGTEsPerGT) - 1) / UInt64(h.numGTEsPerGT)
        let gdSectors = (gtCount * 4 + 511) / 512
        h.rgdOffset = h.descriptorOffset + h.descriptorSize
        h.gdOffset = h.rgdOffset + gdSectors + gtSectors * gtCount
        h.overHead = (h.gdOffset + gdSectors + gtSectors * gtCount).alignedUp(h.grainSize)
        try f.write(h.serialized(), at: 0)
        try f.truncate(to: h.overHead * 512)
        if let descriptor {
            guard descriptor.count <= Int(h.descriptorSize) * 512 else {
                throw ImageError(.invalidArgument, "descriptor does not fit in \(h.descriptorSize) sectors", path: f.path)
            }
            try f.write(descriptor, at: h.descriptorOffset * 512)
        }
        for base in [h.rgdOffset, h.gdOffset] {
            var gd = [UInt8](repeating: 0, count: Int(gdSectors * 512))
            for i in 0..<gtCount { gd.putLE32(UInt32(base + gdSectors + i * gtSectors), at: Int(i * 4)) }
            try f.write(gd, at: base * 512)
        }
    }

    /// A stream-optimized extent in VMware's layout, empty:
    ///
    ///     0 header (gdOffset = GD_AT_END) | 1 descriptor (20 sectors) | 128 GD marker | GD
    ///     | footer marker | footer | end-of-stream marker
    static func writeStreamExtent(_ f: HostFile, capacity: UInt64, descriptor: [UInt8]) throws {
        var h = newHeader(capacity: capacity)
        h.version = 3
        h.flags = VMDKSparseHeader.flagNewlineTest | VMDKSparseHeader.flagCompressed | VMDKSparseHeader.flagMarkers
        h.compressAlgorithm = VMDKSparseHeader.compressionDeflate
        h.gdOffset = VMDKSparseHeader.gdAtEnd
        h.overHead = 128
        guard descriptor.count <= Int(h.descriptorSize) * 512 else {
            throw ImageError(.invalidArgument, "descriptor does not fit in \(h.descriptorSize) sectors", path: f.path)
        }
        let coverage = UInt64(h.numGTEsPerGT) * h.grainSize * 512
        let gdEntries = (capacity + coverage - 1) / coverage
        let gdSectors = (gdEntries * 4 + 511) / 512
        var at: UInt64 = h.overHead * 512
        try f.write(h.serialized(), at: 0)
        try f.write(descriptor, at: 512)
        try f.write(VMDKMarker.metadata(type: VMDKMarker.grainDirectory, sectors: gdSectors), at: at)
        var footer = h
        footer.gdOffset = at / 512 + 1
        at += 512 + gdSectors * 512
        try f.truncate(to: at)  // the GD: zeroes
        try f.write(VMDKMarker.metadata(type: VMDKMarker.footer, sectors: 1), at: at)
        try f.write(footer.serialized(), at: at + 512)
        try f.write(VMDKMarker.metadata(type: VMDKMarker.endOfStream, sectors: 0), at: at + 1024)
        try f.truncate(to: at + 1536)
    }
}
