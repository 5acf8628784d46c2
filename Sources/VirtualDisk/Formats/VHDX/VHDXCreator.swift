#if canImport(Glibc)
import Glibc
#endif

/// Creating VHDX images with qemu-img's option names (`-f vhdx`), plus
/// `logical_sector_size` (qemu has none) and differencing children (`-b PARENT -F vhdx`).
public struct VHDXCreateOptions: Sendable {
    public var size: UInt64
    /// "dynamic" (default) or "fixed"; a parent makes a differencing disk.
    public var subformat = "dynamic"
    /// Bytes per payload block; 0 picks as qemu-img does by disk size (8–64 MiB), or 2 MiB
    /// for a differencing child.
    public var blockSize: UInt64 = 0
    public var logSize: UInt64 = 1 << 20
    /// qemu's block_state_zero: a fixed disk's blocks start in the ZERO state (offset 0,
    /// as qemu and Hyper-V require), their space laid out but unreferenced; written blocks
    /// then go at the end of the file, as qemu does. Off: every block FULLY_PRESENT in place.
    public var blockStateZero = true
    public var logicalSectorSize: UInt32 = 512
    public var physicalSectorSize: UInt32 = 4096
    public var parent: VHDXParentInfo?

    public init(size: UInt64) { self.size = size }
}

/// What a differencing child records about its parent.
public struct VHDXParentInfo: Sendable {
    /// The name as the user gave it (relative to the child's directory, or absolute).
    public var name: String
    public var absolutePath: String
    /// The parent's data write GUID: the child's parent_linkage.
    public var dataWriteGUID: [UInt8]
    /// The parent's virtual disk identifier (page 83 data), which a child shares.
    public var page83: [UInt8]
}

extension VHDXLayer {
    /// `create` for VHDX: parse options, look up the parent of a differencing disk.
    static func create(_ r: CreateRequest, size: UInt64, options: [(String, String)]) throws {
        var o = VHDXCreateOptions(size: size)
        var sectorGiven = false
        for (k, v) in options {
            switch k {
            case "subformat":
                guard v == "dynamic" || v == "fixed" else {
                    throw ImageError(.invalidArgument, "subformat must be dynamic or fixed (got '\(v)')")
                }
                o.subformat = v
            case "block_size": o.blockSize = try SizeParser.parse(v)
            case "log_size": o.logSize = try SizeParser.parse(v)
            case "block_state_zero": o.blockStateZero = try OptionList.bool(v, k)
            case "logical_sector_size":
                let n = try SizeParser.parse(v)
                guard n == 512 || n == 4096 else {
                    throw ImageError(.invalidArgument, "logical_sector_size must be 512 or 4096 (got \(v))")
                }
                o.logicalSectorSize = UInt32(n)
                sectorGiven = true
            default: throw ImageError(.invalidArgument, "'vhdx' does not support option '\(k)'")
            }
        }
        if let b = r.backingFile {
            if let f = r.backingFormat, f != .vhdx {
                throw ImageError(.invalidArgument, "a differencing VHDX's parent must be a VHDX image (-F vhdx), not \(f.rawValue); convert the parent first")
            }
            if o.subformat == "fixed" {
                throw ImageError(.invalidArgument, "a fixed VHDX cannot have a parent; drop subformat=fixed to make a differencing disk")
            }
            let (info, parentSector) = try parentInfo(name: b, child: r.path)
            if sectorGiven && o.logicalSectorSize != parentSector {
                throw ImageError(.invalidArgument, "a differencing VHDX must have its parent's logical sector size (\(parentSector))")
            }
            o.logicalSectorSize = parentSector
            o.parent = info
        }
        try create(path: r.path, options: o)
    }

    /// What a child records about the parent the user named, read through the opener.
    static func parentInfo(name: String, child: String) throws -> (VHDXParentInfo, UInt32) {
        let resolved = ImageOpener.resolve(name, relativeTo: child)
        var absolute = resolved
        if let real = realpath(resolved, nil) {
            absolute = String(cString: real)
            free(real)
        }
        var o = OpenOptions(format: .vhdx)
        o.forceShare = true
        o.noBacking = true
        o.userNamed = [name, resolved]
        let parent = try ImageOpener.open(resolved, options: o)
        defer { try? parent.close() }
        guard let layer = (parent as? LayeredImage)?.layer as? VHDXLayer else {
            throw ImageError(.invalidArgument, "parent '\(name)' is not a VHDX image", path: resolved)
        }
        let (guid, lss, page83) = layer.lock.run { (layer.header.dataWriteGUID, UInt32(layer.logicalSectorSize), layer.metadata.page83) }
        return (VHDXParentInfo(name: name, absolutePath: absolute, dataWriteGUID: guid, page83: page83), lss)
    }

    /// The parent locator pairs a child records: parent_linkage, relative_path (Windows
    /// form, ".\name"), absolute_win32_path (on this host a POSIX path; see README.md).
    static func locatorPairs(_ p: VHDXParentInfo) -> [(key: String, value: String)] {
        var out: [(key: String, value: String)] = [("parent_linkage", "{" + VHDXGUID.string(p.dataWriteGUID) + "}")]
        if !p.name.hasPrefix("/") { out.append(("relative_path", VHDParentName.windowsRelative(p.name))) }
        out.append(("absolute_win32_path", p.absolutePath))
        return out
    }

    /// qemu-img's default block size for a disk of `size` bytes.
    static func defaultBlockSize(_ size: UInt64) -> UInt64 {
        if size > 32 << 40 { return 64 << 20 }
        if size > 100 << 30 { return 32 << 20 }
        if size > 1 << 30 { return 16 << 20 }
        return 8 << 20
    }

    /// Write a new, empty VHDX at `path`:
    ///
    ///     0 file id | 64K header 1 | 128K header 2 | 192K region table | 256K copy
    ///     1M log | BAT (1 MiB multiple) | metadata region (1 MiB) | [fixed: blocks]
    public static func create(path: String, options o: VHDXCreateOptions) throws {
        guard o.subformat == "dynamic" || o.subformat == "fixed" else {
            throw ImageError(.invalidArgument, "subformat must be dynamic or fixed (got '\(o.subformat)')")
        }
        guard o.logicalSectorSize == 512 || o.logicalSectorSize == 4096 else {
            throw ImageError(.invalidArgument, "logical_sector_size must be 512 or 4096")
        }
        let lss = UInt64(o.logicalSectorSize)
        let size = o.size.alignedUp(lss)
        guard size <= VHDXMetadata.maxVirtualSize else {
            throw ImageError(.invalidArgument, "VHDX images hold at most 64 TiB")
        }
        let bs = o.blockSize != 0 ? o.blockSize : (o.parent != nil ? 2 << 20 : defaultBlockSize(size))
        guard bs.isPowerOfTwo, bs >= VHDXMetadata.minBlockSize, bs <= VHDXMetadata.maxBlockSize else {
            throw ImageError(.invalidArgument, "block_size must be a power of two from 1 MiB to 256 MiB (got \(bs))")
        }
        guard o.logSize >= mib, o.logSize % mib == 0, o.logSize <= VHDXLog.maxLogLength else {
            throw ImageError(.invalidArgument, "log_size must be a multiple of 1 MiB from 1 MiB to 256 MiB (got \(o.logSize))")
        }
        let fixed = o.subformat == "fixed" && o.parent == nil
        let ratio = (UInt64(1) << 23) * lss / bs
        let entries = batEntriesNeeded(size: size, blockSize: bs, chunkRatio: ratio, differencing: o.parent != nil)
        let logOffset = mib
        let batOffset = logOffset + o.logSize
        let batLength = max(entries * 8, 1).alignedUp(mib)
        guard batLength <= UInt64(UInt32.max - UInt32(mib) + 1) else {
            throw ImageError(.invalidArgument, "block_size \(bs) is too small for \(size) bytes: the BAT would exceed 4 GiB")
        }
        let metadataOffset = batOffset + batLength
        let dataStart = metadataOffset + mib

        let file = try HostFile(path: path, writable: true, create: true, truncate: true)
        try file.write(VHDXFileIdentifier.serialized(creator: "vloop"), at: 0)
        var h = VHDXHeader(sequenceNumber: 1, logLength: UInt32(o.logSize), logOffset: logOffset)
        try file.write(h.serialized(), at: VHDXHeader.offsets[0])
        h.sequenceNumber = 2
        try file.write(h.serialized(), at: VHDXHeader.offsets[1])
        let regions = VHDXRegionTable(entries: [
            .init(guid: VHDXRegionTable.batGUID, fileOffset: batOffset, length: UInt32(batLength), required: true),
            .init(guid: VHDXRegionTable.metadataGUID, fileOffset: metadataOffset, length: UInt32(mib), required: true),
        ])
        for at in VHDXRegionTable.offsets { try file.write(regions.serialized(), at: at) }
        var m = VHDXMetadata(blockSize: UInt32(bs), leaveBlocksAllocated: fixed, virtualDiskSize: size,
                             logicalSectorSize: o.logicalSectorSize, physicalSectorSize: o.physicalSectorSize,
                             parentLocator: o.parent.map(locatorPairs))
        if let p = o.parent, p.page83.count == 16 { m.page83 = p.page83 }
        // The region is 1 MiB but its table and items fill only the start: the rest stays
        // a hole of the new file (reads as zeroes), so an empty image allocates ~200 KiB.
        let region = m.serializedRegion(length: Int(mib))
        let used = ((region.lastIndex { $0 != 0 } ?? 0) + 4096) / 4096 * 4096
        try file.write(Array(region[0..<min(used, region.count)]), at: metadataOffset)

        var end = dataStart
        if fixed {
            // Blocks in order after the metadata; the BAT is written a page at a time.
            let blocks = (size + bs - 1) / bs
            let state = o.blockStateZero ? Self.zero : Self.fullyPresent
            var page = [UInt8](repeating: 0, count: Int(pageSize))
            var pageStart: UInt64 = 0
            for i in 0..<blocks {
                let index = i + i / ratio
                let pos = index * 8
                if pos / pageSize * pageSize != pageStart {
                    try file.write(page, at: batOffset + pageStart)
                    page = [UInt8](repeating: 0, count: Int(pageSize))
                    pageStart = pos / pageSize * pageSize
                }
                // A ZERO entry's offset must be 0 (Hyper-V refuses others; qemu writes 0 too):
                // the block's space stays laid out but unreferenced until written.
                page.putLE64(entry(state: state, offset: state == Self.zero ? 0 : dataStart + i * bs), at: Int(pos - pageStart))
            }
            try file.write(page, at: batOffset + pageStart)
            end = dataStart + blocks * bs
        }
        try file.truncate(to: end)
        try file.sync()
    }
}
