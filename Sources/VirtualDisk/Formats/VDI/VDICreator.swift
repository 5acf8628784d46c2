#if canImport(Glibc)
import Glibc
#endif

/// Creating VDI images with qemu-img's option names (`-o static=on`), our `block_size`
/// (qemu's `cluster_size` where it is built with it), and differencing children
/// (`-b PARENT -F vdi`), which qemu cannot make.
public struct VDICreateOptions: Sendable {
    public var size: UInt64
    /// Every block allocated up front (VirtualBox "fixed", qemu "static").
    public var isStatic = false
    /// Bytes per block; VirtualBox and qemu use 1 MiB (qemu opens no other size).
    public var blockSize: UInt64 = VDIHeader.defaultBlockSize
    public var parent: VDIParentInfo?

    public init(size: UInt64) { self.size = size }
}

/// What a differencing child records about its parent: nothing but UUIDs (VirtualBox
/// keeps the chain in its media registry).
public struct VDIParentInfo: Sendable {
    /// The parent's image UUID: the child's link UUID.
    var uuidImage: VDIUUID
    /// The parent's modification UUID, recorded as the child's parent-modification UUID.
    var uuidModification: VDIUUID
}

extension VDILayer {
    /// `create` for VDI: parse the options, identify the parent of a differencing image,
    /// write the image.
    static func create(_ r: CreateRequest, size: UInt64, options: [(String, String)]) throws {
        var o = VDICreateOptions(size: size)
        for (k, v) in options {
            switch k {
            case "static": o.isStatic = try OptionList.bool(v, k)
            case "block_size", "cluster_size": o.blockSize = try SizeParser.parse(v)
            default: throw ImageError(.invalidArgument, "'vdi' does not support option '\(k)'")
            }
        }
        if let b = r.backingFile {
            if let f = r.backingFormat, f != .vdi {
                throw ImageError(.invalidArgument, "a differencing VDI's parent must be a VDI image (-F vdi), not \(f.rawValue); convert the parent first")
            }
            if o.isStatic {
                throw ImageError(.invalidArgument, "a static VDI cannot have a parent; drop static=on to make a differencing image")
            }
            o.parent = try parentInfo(name: b, child: r.path)
        }
        try create(path: r.path, options: o)
    }

    /// Identify a parent the user named: open it (a VDI, of any type) for its UUIDs, and
    /// make sure the child will find it again. A VDI records no parent path: the parent is
    /// looked up by UUID in the child's directory and the one above.
    static func parentInfo(name: String, child: String) throws -> VDIParentInfo {
        let resolved = ImageOpener.resolve(name, relativeTo: child)
        var o = OpenOptions(format: .vdi)
        o.forceShare = true
        o.noBacking = true
        o.userNamed = [name, resolved]
        let parent = try ImageOpener.open(resolved, options: o)
        defer { try? parent.close() }
        guard let layer = (parent as? LayeredImage)?.layer as? VDILayer else {
            throw ImageError(.invalidArgument, "parent '\(name)' is not a VDI image", path: resolved)
        }
        let dirs = parentDirectories(of: child).map { realPath($0.dir) }
        let parentDir = realPath(parentDirectories(of: resolved)[0].dir)
        guard let pd = parentDir, dirs.contains(pd) else {
            throw ImageError(.invalidArgument, "a differencing VDI records only its parent's UUID and finds the parent in its own directory or the one above; '\(name)' is elsewhere: create the child next to the parent or in a directory below it (as VirtualBox's Snapshots/)",
                             path: child)
        }
        return layer.lock.run { VDIParentInfo(uuidImage: layer.header.uuidImage, uuidModification: layer.header.uuidLastSnap) }
    }

    static func realPath(_ p: String) -> String? {
        guard let r = realpath(p, nil) else { return nil }
        defer { free(r) }
        return String(cString: r)
    }

    /// Write a new, empty VDI at `path`, laid out as qemu-img lays them out:
    ///
    ///     0 pre-header + header (512) | 0x200 block map (padded to 512) | data blocks
    ///
    /// A dynamic or differencing image ends after the block map (every entry
    /// 0xffffffff); a static one maps block i to data block i and holds them all
    /// (allocated with fallocate where the file system can).
    public static func create(path: String, options o: VDICreateOptions) throws {
        let bs = o.blockSize
        guard bs.isPowerOfTwo, bs >= 512, bs <= VDIHeader.maxBlockSize else {
            throw ImageError(.invalidArgument, "block_size must be a power of two from 512 bytes to 256 MiB (got \(bs))")
        }
        let blocks = (o.size + bs - 1) / bs
        guard blocks <= UInt64(VDIHeader.maxBlocks) else {
            throw ImageError(.invalidArgument, "VDI images of \(bs)-byte blocks hold at most \(UInt64(VDIHeader.maxBlocks) * bs) bytes (asked for \(o.size))")
        }
        let type: VDIHeader.ImageType = o.parent != nil ? .differencing : (o.isStatic ? .fixed : .dynamic)
        var header = VDIHeader(type: type, diskSize: o.size.alignedUp(512), blockSize: UInt32(bs), blocks: UInt32(blocks))
        if let p = o.parent {
            header.uuidLink = p.uuidImage
            header.uuidParentModification = p.uuidModification
        }
        if o.isStatic { header.blocksAllocated = UInt32(blocks) }
        let file = try HostFile(path: path, writable: true, create: true, truncate: true)
        let dataStart = UInt64(header.offsetData)
        // The header, then the block map in bounded chunks.
        try file.write(header.bytes, at: 0)
        let chunkEntries = 1 << 18
        var i: UInt64 = 0
        while i < blocks {
            let n = Int(min(UInt64(chunkEntries), blocks - i))
            var chunk = [UInt8](repeating: 0xff, count: n * 4)
            if o.isStatic {
                for k in 0..<n { chunk.putLE32(UInt32(i) + UInt32(k), at: k * 4) }
            }
            try file.write(chunk, at: UInt64(header.offsetBmap) + i * 4)
            i += UInt64(n)
        }
        let end = o.isStatic ? dataStart + blocks * bs : dataStart
        try file.truncate(to: end)
        if o.isStatic && end > dataStart {
            // Preallocate where the file system can; the data reads as zeroes either way.
            try? file.preallocate(at: dataStart, length: end - dataStart)
        }
        try file.sync()
    }
}
