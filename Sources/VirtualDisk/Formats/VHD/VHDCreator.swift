#if canImport(Glibc)
import Glibc
#endif

/// Creating VHD images with qemu-img's option names (`-f vhd` or `-f vpc`).
public struct VHDCreateOptions: Sendable {
    public var size: UInt64
    /// "dynamic" (default) or "fixed"; a parent makes a differencing disk.
    public var subformat = "dynamic"
    /// Bytes of guest data per block (dynamic and differencing); qemu always uses 2 MiB.
    public var blockSize: UInt64 = 2 << 20
    /// Record the exact size in `current_size` (creator "qem2", largest geometry), rather
    /// than rounding the size up to a CHS geometry as qemu-img does by default.
    public var forceSize = false
    public var parent: VHDParentInfo?

    public init(size: UInt64) { self.size = size }
}

/// What a differencing child records about its parent.
public struct VHDParentInfo: Sendable {
    /// The name as the user gave it (relative to the child's directory, or absolute).
    public var name: String
    /// The parent's absolute path, for the "W2ku" locator.
    public var absolutePath: String
    /// The parent's footer unique id; all zeroes when unknown (not checked on open).
    public var uniqueID: [UInt8]
    /// The parent file's modification time, VHD seconds.
    public var timestamp: UInt32
}

extension VHDLayer {
    /// `create` for VHD: parse qemu-img's options, look up the parent of a differencing
    /// disk, write the image.
    static func create(_ r: CreateRequest, size: UInt64, options: [(String, String)]) throws {
        var o = VHDCreateOptions(size: size)
        for (k, v) in options {
            switch k {
            case "subformat":
                guard v == "dynamic" || v == "fixed" else {
                    throw ImageError(.invalidArgument, "subformat must be dynamic or fixed (got '\(v)')")
                }
                o.subformat = v
            case "block_size": o.blockSize = try SizeParser.parse(v)
            case "force_size": o.forceSize = try OptionList.bool(v, k)
            default: throw ImageError(.invalidArgument, "'vhd' does not support option '\(k)'")
            }
        }
        if let b = r.backingFile {
            if let f = r.backingFormat, f != .vhd {
                throw ImageError(.invalidArgument, "a differencing VHD's parent must be a VHD image (-F vhd), not \(f.rawValue); convert the parent first")
            }
            if o.subformat == "fixed" {
                throw ImageError(.invalidArgument, "a fixed VHD cannot have a parent; drop subformat=fixed to make a differencing disk")
            }
            o.parent = try parentInfo(name: b, child: r.path, mustExist: true)
            // A child covers exactly its parent's disk (the size defaults to the
            // parent's): where no CHS geometry gives that size, it is recorded exactly.
            if !o.forceSize, try VHDFooter.sizing(for: size, forceSize: false).size != size.alignedUp(512) {
                o.forceSize = true
            }
        }
        try create(path: r.path, options: o)
    }

    /// Read what a child records about a parent the user named: its unique id (from its
    /// footer, through the opener), absolute path and modification time.
    static func parentInfo(name: String, child: String, mustExist: Bool) throws -> VHDParentInfo {
        let resolved = ImageOpener.resolve(name, relativeTo: child)
        var absolute = resolved
        if let real = realpath(resolved, nil) {
            absolute = String(cString: real)
            free(real)
        } else if !resolved.hasPrefix("/"), let cwd = getcwd(nil, 0) {
            absolute = String(cString: cwd) + "/" + resolved
            free(cwd)
        }
        var info = VHDParentInfo(name: name, absolutePath: absolute, uniqueID: [UInt8](repeating: 0, count: 16), timestamp: 0)
        var o = OpenOptions(format: .vhd)
        o.forceShare = true
        o.noBacking = true
        o.userNamed = [name, resolved]
        let parent: DiskImage
        do {
            parent = try ImageOpener.open(resolved, options: o)
        } catch let e as ImageError where e.code == .notFound && !mustExist {
            return info
        }
        defer { try? parent.close() }
        guard let layer = (parent as? LayeredImage)?.layer as? VHDLayer else {
            throw ImageError(.invalidArgument, "parent '\(name)' is not a VHD image", path: resolved)
        }
        info.uniqueID = layer.lock.run { layer.footer.uniqueID }
        var st = stat()
        if stat(resolved, &st) == 0 { info.timestamp = VHDFooter.vhdTime(Int(st.st_mtim.tv_sec)) }
        return info
    }

    /// Parent locators a child records, as Hyper-V writes them: "W2ru" (relative to the
    /// child, ".\name") when there is a relative form, and "W2ku" (absolute), both
    /// UTF-16LE. On this host the absolute path is a POSIX one; readers on Windows fall
    /// back to the relative locator.
    static func locatorPayloads(_ p: VHDParentInfo, child: String) -> [(code: String, data: [UInt8])] {
        var out: [(String, [UInt8])] = []
        if !p.name.hasPrefix("/") {
            out.append(("W2ru", VHDParentName.utf16LE(VHDParentName.windowsRelative(p.name))))
        } else if let slash = p.name.lastIndex(of: "/"), ImageOpener.resolve("x", relativeTo: child) == String(p.name[...slash]) + "x" {
            out.append(("W2ru", VHDParentName.utf16LE(".\\" + VHDParentName.basename(p.name))))
        }
        out.append(("W2ku", VHDParentName.utf16LE(p.absolutePath)))
        return out
    }

    /// Write a new, empty VHD at `path`, laid out as qemu-img lays out dynamic disks:
    ///
    ///     0 footer copy | 512 dynamic header | 1536 BAT (all 0xFF, padded to 512)
    ///     | locator data (differencing; each padded to 512) | footer
    ///
    /// Fixed disks are the zeroed data (sparse) followed by the footer.
    public static func create(path: String, options o: VHDCreateOptions) throws {
        guard o.subformat == "dynamic" || o.subformat == "fixed" else {
            throw ImageError(.invalidArgument, "subformat must be dynamic or fixed (got '\(o.subformat)')")
        }
        let (geometry, size) = try VHDFooter.sizing(for: o.size, forceSize: o.forceSize)
        let type: VHDFooter.DiskType = o.parent != nil ? .differencing : (o.subformat == "fixed" ? .fixed : .dynamic)
        var footer = VHDFooter(type: type, currentSize: size, geometry: geometry, creatorApp: o.forceSize ? "qem2" : "qemu")
        let file = try HostFile(path: path, writable: true, create: true, truncate: true)
        if type == .fixed {
            try file.truncate(to: size + 512)
            try file.write(footer.serialized(), at: size)
            try file.sync()
            return
        }
        let bs = o.blockSize
        guard bs.isPowerOfTwo, bs >= 512, bs <= VHDDynamicHeader.maxBlockSize else {
            throw ImageError(.invalidArgument, "block_size must be a power of two from 512 bytes to 256 MiB (got \(bs))")
        }
        let entries = (size + bs - 1) / bs
        guard entries <= UInt64(UInt32.max) else {
            throw ImageError(.invalidArgument, "block_size \(bs) is too small for \(size) bytes")
        }
        let batOffset: UInt64 = 1536
        let batSpace = (entries * 4).alignedUp(512)
        var header = VHDDynamicHeader(batOffset: batOffset, maxTableEntries: UInt32(entries), blockSize: UInt32(bs))
        var end = batOffset + batSpace
        // The BAT, all unallocated, in bounded chunks.
        let chunk = [UInt8](repeating: 0xff, count: 1 << 20)
        var written: UInt64 = 0
        while written < batSpace {
            let n = Int(min(UInt64(chunk.count), batSpace - written))
            try chunk.withUnsafeBytes { try file.write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: batOffset + written) }
            written += UInt64(n)
        }
        if let p = o.parent {
            header.parentUniqueID = p.uniqueID
            header.parentTimestamp = p.timestamp
            header.parentName = VHDParentName.basename(p.absolutePath)
            for (slot, payload) in locatorPayloads(p, child: path).enumerated() {
                let space = max(UInt64(payload.data.count).alignedUp(512), 512)
                var data = payload.data
                data += [UInt8](repeating: 0, count: Int(space) - data.count)
                try file.write(data, at: end)
                header.setLocator(slot, .init(code: payload.code, dataSpace: UInt32(space), dataLength: UInt32(payload.data.count), dataOffset: end))
                end += space
            }
        }
        footer.dataOffset = 512
        let footerBytes = footer.serialized()
        try file.write(footerBytes, at: 0)
        try file.write(header.serialized(), at: 512)
        try file.write(footerBytes, at: end)
        try file.truncate(to: end + 512)
        try file.sync()
    }
}
