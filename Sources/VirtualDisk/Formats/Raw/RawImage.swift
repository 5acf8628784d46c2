import Synchronization

/// A raw image: the file is the disk. Holes in a sparse file read as zeroes and are
/// reported as such (SEEK_DATA/SEEK_HOLE); discards punch holes; zero writes use
/// fallocate.
public final class RawLayer: FormatLayer {
    let file: HostFile
    private let size: Mutex<UInt64>
    private let writable: Bool
    /// The last data run SEEK_DATA/SEEK_HOLE found, and a generation that every hole
    /// punch bumps. On tmpfs each SEEK_HOLE walks the file's pages up to the next hole
    /// (to the end of a fully written file), so asking again for every chunk of a
    /// sequential copy costs time quadratic in the file size. Writes only turn holes
    /// into data, so a known data run stays true until a hole is punched.
    private let knownData = Mutex<(start: UInt64, end: UInt64, generation: UInt64)>((0, 0, 0))

    public init(file: HostFile) throws {
        self.file = file
        self.writable = file.writable
        self.size = Mutex(try file.size())
    }

    public var layerInfo: ImageInfo {
        var caps: Capabilities = [.discard, .efficientZero, .resize]
        if writable { caps.insert(.writable) }
        return ImageInfo(format: "raw", virtualSize: size.withLock { $0 }, capabilities: caps, path: file.path)
    }

    public func map(at offset: UInt64, length: UInt64) throws -> [LayerRun] {
        // Finding holes (SEEK_DATA) may wait for the file's lock or its extent list;
        // holes read as zeroes anyway.
        if NonBlocking.active { return [LayerRun(offset: offset, length: length, kind: .stored(file: file, hostOffset: offset))] }
        var runs: [LayerRun] = []
        let end = offset + length
        var pos = offset
        while pos < end {
            let known = knownData.withLock { $0 }
            if known.start <= pos && pos < known.end {
                let stop = min(known.end, end)
                runs.append(LayerRun(offset: pos, length: stop - pos, kind: .stored(file: file, hostOffset: pos)))
                pos = stop
                continue
            }
            guard let data = file.nextData(from: pos), data < end else {
                runs.append(LayerRun(offset: pos, length: end - pos, kind: .zero))
                break
            }
            if data > pos {
                runs.append(LayerRun(offset: pos, length: data - pos, kind: .zero))
            }
            let holeAt = max(file.nextHole(from: data), data + 1)
            knownData.withLock { if $0.generation == known.generation { $0 = (data, holeAt, known.generation) } }
            let hole = min(holeAt, end)
            runs.append(LayerRun(offset: data, length: hole - data, kind: .stored(file: file, hostOffset: data)))
            pos = hole
        }
        return runs
    }

    /// Forget the known data run: holes may have appeared.
    private func holesChanged() {
        knownData.withLock { $0 = (0, 0, $0.generation &+ 1) }
    }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, below: BelowReader) throws {
        try file.write(data, at: offset)
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, hasBacking: Bool, below: BelowReader) throws {
        defer { holesChanged() }  // fallocate's zero range may leave holes too
        if mayUnmap && file.punchHole(at: offset, length: length) { return }
        try file.writeZeroes(at: offset, length: length)
    }

    public func discard(at offset: UInt64, length: UInt64, hasBacking: Bool) throws {
        file.punchHole(at: offset, length: length)
        holesChanged()
    }

    public func resize(to newSize: UInt64) throws {
        try file.truncate(to: newSize)
        holesChanged()
        size.withLock { $0 = newSize }
    }

    public func flush() throws { try file.sync() }
    public func close() throws { if writable { try file.sync() } }

    /// Create an empty raw image of `size` bytes (sparse unless preallocated).
    public static func create(path: String, size: UInt64, preallocation: String = "off") throws {
        let file = try HostFile(path: path, writable: true, create: true, truncate: true)
        try file.truncate(to: size)
        switch preallocation {
        case "off", "metadata": break
        case "falloc": try file.preallocate(at: 0, length: size)
        case "full": try file.writeZeroesExplicitly(at: 0, length: size)
        default: throw ImageError(.invalidArgument, "unknown preallocation mode '\(preallocation)' (off, metadata, falloc, full)")
        }
        try file.sync()
    }
}

extension HostFile {
    /// Write real zero bytes (full preallocation), without fallocate shortcuts.
    func writeZeroesExplicitly(at offset: UInt64, length: UInt64) throws {
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(ZeroBuffer.size), length - done))
            try write(UnsafeRawBufferPointer(rebasing: ZeroBuffer.pointer[0..<n]), at: offset + done)
            done += UInt64(n)
        }
    }
}
