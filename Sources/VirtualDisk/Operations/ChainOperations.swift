/// Layers whose recorded backing file can be changed (rebase).
public protocol BackingSettableLayer: FormatLayer {
    func setBacking(name: String?, format: String?) throws
}

/// Layers that can change their virtual size.
public protocol ResizableLayer: FormatLayer {
    func resize(to newSize: UInt64, shrink: Bool) throws
}

/// Layers that can drop all their data so the backing file shows through (commit).
public protocol EmptiableLayer: FormatLayer {
    func makeEmpty() throws
}

public enum CommitOperation {
    /// Write every range the top layer holds into its backing image, then empty the top
    /// (unless `keepTop`). `top` must be open read-write with its backing open read-write.
    public static func run(top: DiskImage, keepTop: Bool, progress: (@Sendable (Double) -> Void)? = nil) throws {
        guard let base = top.backingImage else {
            throw ImageError(.invalidArgument, "image has no backing file to commit into", path: top.info.path)
        }
        guard let layer = (top as? LayeredImage)?.layer else {
            throw ImageError(.unsupported, "cannot commit this image", path: top.info.path)
        }
        let size = top.virtualSize
        if base.virtualSize < size {
            throw ImageError(.invalidArgument, "backing file is smaller (\(base.virtualSize) bytes) than the image (\(size)); resize it first with 'vloop resize'", path: base.info.path)
        }
        let chunk: UInt64 = 2 << 20
        var buf = [UInt8](repeating: 0, count: Int(chunk))
        var pos: UInt64 = 0
        while pos < size {
            let len = min(chunk, size - pos)
            for run in try layer.map(at: pos, length: len) {
                switch run.kind {
                case .unallocated: continue
                case .zero:
                    try base.writeZeroes(at: run.offset, length: run.length, mayUnmap: false)
                default:
                    try buf.withUnsafeMutableBytes { b in
                        let part = UnsafeMutableRawBufferPointer(rebasing: b[0..<Int(run.length)])
                        try top.read(into: part, at: run.offset)
                        try base.write(UnsafeRawBufferPointer(part), at: run.offset)
                    }
                }
            }
            pos += len
            progress?(Double(pos) / Double(max(size, 1)))
        }
        try base.flush()
        if !keepTop {
            guard let e = layer as? EmptiableLayer else {
                throw ImageError(.unsupported, "\(top.info.format) images cannot be emptied after commit; use -d to keep the data", path: top.info.path)
            }
            try e.makeEmpty()
        }
        try top.flush()
    }
}

public enum RebaseOperation {
    /// Safe rebase: wherever the top layer does not hold data and the old chain differs
    /// from `newBacking`, copy the old chain's bytes into the top, then record the new
    /// backing file. `newBacking` nil means no backing file.
    public static func run(top: DiskImage, newBacking: DiskImage?, newName: String?, newFormat: String?) throws {
        guard let layer = (top as? LayeredImage)?.layer as? BackingSettableLayer else {
            throw ImageError(.unsupported, "\(top.info.format) images cannot change their backing file", path: top.info.path)
        }
        let size = top.virtualSize
        let chunk: UInt64 = 1 << 20
        var old = [UInt8](repeating: 0, count: Int(chunk))
        var new = [UInt8](repeating: 0, count: Int(chunk))
        var pos: UInt64 = 0
        while pos < size {
            let len = min(chunk, size - pos)
            for run in try layer.map(at: pos, length: len) {
                guard case .unallocated = run.kind else { continue }
                let n = Int(run.length)
                try old.withUnsafeMutableBytes { try top.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: run.offset) }
                try new.withUnsafeMutableBytes { b in
                    let part = UnsafeMutableRawBufferPointer(rebasing: b[0..<n])
                    part.initializeMemory(as: UInt8.self, repeating: 0)
                    if let nb = newBacking, run.offset < nb.virtualSize {
                        let inside = Int(min(run.length, nb.virtualSize - run.offset))
                        try nb.read(into: UnsafeMutableRawBufferPointer(rebasing: part[0..<inside]), at: run.offset)
                    }
                }
                // Copy in 64 KiB granules that differ.
                var g = 0
                while g < n {
                    let e = min(n, g + 65536)
                    if !old[g..<e].elementsEqual(new[g..<e]) {
                        try old.withUnsafeBytes { try top.write(UnsafeRawBufferPointer(rebasing: $0[g..<e]), at: run.offset + UInt64(g)) }
                    }
                    g = e
                }
            }
            pos += len
        }
        try top.flush()
        try layer.setBacking(name: newName, format: newFormat)
    }
}

public enum ResizeOperation {
    public static func run(_ image: DiskImage, to newSize: UInt64, shrink: Bool) throws {
        guard let layer = (image as? LayeredImage)?.layer as? ResizableLayer else {
            throw ImageError(.unsupported, "\(image.info.format) images cannot be resized by this version of vloop", path: image.info.path)
        }
        let old = image.virtualSize
        if newSize < old && !shrink {
            throw ImageError(.invalidArgument, "shrinking loses data past the new end; add --shrink if that is intended", path: image.info.path)
        }
        do {
            // Whatever size the layer got to, even if it failed part-way.
            defer { (image as? LayeredImage)?.sizeChanged() }
            try layer.resize(to: newSize, shrink: shrink)
        }
        // Bytes a shrink left in a partial last unit must not reappear on growth.
        let unit = max(image.info.clusterSize, 512)
        let tailEnd = min(newSize, old.alignedUp(unit))
        if newSize > old && tailEnd > old {
            try image.writeZeroes(at: old, length: tailEnd - old, mayUnmap: false)
        }
        try image.flush()
    }
}
