import Dispatch

/// Layers that can store a cluster compressed (`convert -c`). Compression and storage
/// are separate steps so that units can be compressed on several threads while they
/// are stored one after another in guest order, which keeps the output deterministic.
public protocol CompressingLayer: FormatLayer {
    /// Allocation unit for compressed writes.
    var compressionUnit: UInt64 { get }
    /// Compress one unit (the whole unit, or the tail of the disk). Touches no state:
    /// safe to call from any thread. nil: the unit does not shrink and is stored plainly.
    func compressUnit(_ data: UnsafeRawBufferPointer, at offset: UInt64) -> [UInt8]?
    /// Store one unit: `packed` as `compressUnit` returned it for `data`, or nil to
    /// store `data` plainly.
    func storeUnit(_ data: UnsafeRawBufferPointer, packed: [UInt8]?, at offset: UInt64) throws
}

public struct ConvertOptions: Sendable {
    /// Runs of zeroes at least this long are not written (qemu-img -S; 0 writes all).
    public var sparseSize: UInt64 = 4096
    public var compress = false
    /// The destination already exists (-n): zero ranges must be written as zeroes.
    public var existingTarget = false
    public var progress: (@Sendable (Double) -> Void)?
    public init() {}
}

/// Copy the guest view of `source` into `target`, keeping holes: ranges the source
/// reports as zero or unallocated are not written (or are zeroed cheaply when the
/// target is not fresh), and data runs of zero bytes are skipped. With a backing file
/// in the target, only ranges that differ from it are written.
public enum ConvertOperation {
    public static func run(source: DiskImage, target: DiskImage, options: ConvertOptions) throws {
        let size = source.virtualSize
        guard target.virtualSize >= size else {
            throw ImageError(.invalidArgument, "target is smaller (\(target.virtualSize) bytes) than the source (\(size) bytes)", path: target.info.path)
        }
        let compressor = options.compress ? ((target as? LayeredImage)?.layer as? CompressingLayer) : nil
        if options.compress && compressor == nil {
            throw ImageError(.unsupported, "the \(target.info.format) format cannot store compressed data", path: target.info.path)
        }
        let targetBacking = target.backingImage
        var chunk: UInt64 = 2 << 20
        // Compressed output: larger chunks give every core enough units per pass.
        if let c = compressor { chunk = max(c.compressionUnit, (8 << 20) / c.compressionUnit * c.compressionUnit) }
        var base = [UInt8](repeating: 0, count: targetBacking == nil ? 0 : Int(chunk))
        if let compressor {
            var buffer = [UInt8](repeating: 0, count: Int(chunk))
            var pos: UInt64 = 0
            while pos < size {
                let len = min(chunk, size - pos)
                if try clippedExtents(source, pos, len).contains(where: { $0.isData }) {
                    try compressChunk(compressor, source, &buffer, at: pos, length: len)
                }
                pos += len
                options.progress?(Double(pos) / Double(max(size, 1)))
            }
            try target.flush()
            return
        }
        // The source is read a chunk ahead on another thread while this one writes.
        let ahead = ReadAhead(source: source, size: size, chunk: chunk)
        defer { ahead.finish() }
        while let c = try ahead.next() {
            for e in c.extents {
                if !e.isData {
                    // Reads as zero in the source.
                    if targetBacking != nil || options.existingTarget {
                        try writeZeroRange(target, targetBacking, e.offset, e.length, &base)
                    }
                    continue
                }
                try writeSparse(target, targetBacking, c.buffer, chunkStart: c.pos, from: e.offset, length: e.length,
                                sparse: options.sparseSize, existing: options.existingTarget, base: &base)
            }
            options.progress?(Double(c.pos + c.length) / Double(max(size, 1)))
            ahead.done(c)
        }
        try target.flush()
    }

    /// The source's extents over `pos ..< pos+len`, clipped to it: a source must not
    /// make us index past the buffer.
    static func clippedExtents(_ source: DiskImage, _ pos: UInt64, _ len: UInt64) throws -> [Extent] {
        try source.extents(at: pos, length: len).compactMap { e -> Extent? in
            let a = max(e.offset, pos), b = min(e.end, pos + len)
            guard a < b else { return nil }
            var c = e
            c.offset = a
            c.length = b - a
            return c
        }
    }

    private static func writeZeroRange(_ target: DiskImage, _ backing: DiskImage?, _ offset: UInt64, _ length: UInt64, _ base: inout [UInt8]) throws {
        if let backing {
            // Only where the backing file does not already read as zero.
            let bExtents = try backing.extents(at: offset, length: min(length, backing.virtualSize > offset ? backing.virtualSize - offset : 0))
            for b in bExtents where b.isData {
                try target.writeZeroes(at: b.offset, length: b.length, mayUnmap: false)
            }
        } else {
            try target.writeZeroes(at: offset, length: length, mayUnmap: true)
        }
    }

    private static func writeSparse(_ target: DiskImage, _ backing: DiskImage?, _ buffer: UnsafeRawBufferPointer, chunkStart: UInt64,
                                    from offset: UInt64, length: UInt64, sparse: UInt64, existing: Bool, base: inout [UInt8]) throws {
        let granule = max(sparse, 512)
        let start = Int(offset - chunkStart)
        if let backing {
            // Write only granules that differ from what the backing file shows.
            let n = Int(length)
            try base.withUnsafeMutableBytes { b in
                let part = UnsafeMutableRawBufferPointer(rebasing: b[start..<(start + n)])
                let inside = offset >= backing.virtualSize ? 0 : Int(min(length, backing.virtualSize - offset))
                if inside > 0 { try backing.read(into: UnsafeMutableRawBufferPointer(rebasing: part[0..<inside]), at: offset) }
                if inside < n { UnsafeMutableRawBufferPointer(rebasing: part[inside...]).initializeMemory(as: UInt8.self, repeating: 0) }
            }
            try forEachRun(start, n, granule: Int(granule), differs: { a, b in !buffer[a..<b].elementsEqual(base[a..<b]) }) { a, b in
                try target.write(UnsafeRawBufferPointer(rebasing: buffer[a..<b]), at: chunkStart + UInt64(a))
            }
            return
        }
        if sparse == 0 {
            try target.write(UnsafeRawBufferPointer(rebasing: buffer[start..<(start + Int(length))]), at: offset)
            return
        }
        try forEachRun(start, Int(length), granule: Int(granule), differs: { a, b in !ZeroScan.isAllZero(UnsafeRawBufferPointer(rebasing: buffer[a..<b])) }) { a, b in
            try target.write(UnsafeRawBufferPointer(rebasing: buffer[a..<b]), at: chunkStart + UInt64(a))
        } zeroRun: { a, b in
            if existing { try target.writeZeroes(at: chunkStart + UInt64(a), length: UInt64(b - a), mayUnmap: true) }
        }
    }

    /// Split `start..<start+n` into granules; call `write` for maximal runs of granules
    /// where `differs` holds, and `zeroRun` for the others.
    private static func forEachRun(_ start: Int, _ n: Int, granule: Int,
                                   differs: (Int, Int) -> Bool, write: (Int, Int) throws -> Void,
                                   zeroRun: (Int, Int) throws -> Void = { _, _ in }) throws {
        var runStart = start
        var runWrites: Bool?
        var p = start
        let end = start + n
        while p < end {
            let q = min(end, (p / granule + 1) * granule)
            let d = differs(p, q)
            if runWrites != nil && runWrites != d {
                if runWrites! { try write(runStart, p) } else { try zeroRun(runStart, p) }
                runStart = p
            }
            runWrites = d
            p = q
        }
        if let w = runWrites { if w { try write(runStart, end) } else { try zeroRun(runStart, end) } }
    }

    /// Compress a whole chunk: its units are compressed in parallel (one task per core),
    /// then stored in guest order. All-zero units are left unallocated.
    private static func compressChunk(_ c: CompressingLayer, _ source: DiskImage, _ buffer: inout [UInt8],
                                      at pos: UInt64, length len: UInt64) throws {
        let unit = Int(c.compressionUnit)
        try buffer.withUnsafeMutableBytes { try source.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<Int(len)]), at: pos) }
        let units = stride(from: 0, to: Int(len), by: unit).map { $0..<min($0 + unit, Int(len)) }.filter { r in buffer.withUnsafeBytes { !ZeroScan.isAllZero(UnsafeRawBufferPointer(rebasing: $0[r])) } }
        guard !units.isEmpty else { return }
        let packed = PackedUnits(count: units.count)
        let input = buffer  // shared, not copied: nothing writes `buffer` during the pass
        DispatchQueue.concurrentPerform(iterations: units.count) { i in
            let r = units[i]
            packed.set(i, input.withUnsafeBytes { c.compressUnit(UnsafeRawBufferPointer(rebasing: $0[r]), at: pos + UInt64(r.lowerBound)) })
        }
        try buffer.withUnsafeBytes { raw in
            for (i, r) in units.enumerated() {
                try c.storeUnit(UnsafeRawBufferPointer(rebasing: raw[r]), packed: packed.get(i), at: pos + UInt64(r.lowerBound))
            }
        }
    }
}

/// Results of a parallel compression pass: each slot is written by exactly one task.
private final class PackedUnits: @unchecked Sendable {
    // Safe: `concurrentPerform` gives every index to one task, and the slots are read
    // only after it returns. Raw storage, so that no task takes an access to a shared array.
    private let slots: UnsafeMutableBufferPointer<[UInt8]?>
    init(count: Int) {
        slots = .allocate(capacity: count)
        slots.initialize(repeating: nil)
    }
    deinit {
        slots.deinitialize()
        slots.deallocate()
    }
    func set(_ i: Int, _ v: [UInt8]?) { slots[i] = v }
    func get(_ i: Int) -> [UInt8]? { slots[i] }
}

/// The source of a convert, read one chunk ahead of the writer on a thread of its own:
/// its extents, and its data where there is any. Two chunk buffers take turns.
private final class ReadAhead: @unchecked Sendable {
    struct Chunk {
        let pos: UInt64
        let length: UInt64
        let extents: [Extent]
        let buffer: UnsafeRawBufferPointer
    }

    // Safe: a slot's buffer is written by the reader only after taking it from `free`
    // and before passing it on through `ready`; the writer reads it only after taking
    // it from `ready`, until it hands it back (`done`). `ready` and `stopped` are
    // guarded by `lock`.
    private let buffers: [UnsafeMutableRawBufferPointer]
    private let free = DispatchSemaphore(value: 2)
    private let filled = DispatchSemaphore(value: 0)
    private let lock = Lock()
    private var ready: [Result<Chunk, Error>?] = []
    private var stopped = false
    private let finished = DispatchSemaphore(value: 0)

    init(source: DiskImage, size: UInt64, chunk: UInt64) {
        buffers = (0..<2).map { _ in .allocate(byteCount: Int(chunk), alignment: 4096) }
        DispatchQueue(label: "vloop.convert.read-ahead").async { [self] in
            defer { finished.signal() }
            var pos: UInt64 = 0
            var slot = 0
            while pos < size {
                free.wait()
                if lock.run({ stopped }) { return }
                let len = min(chunk, size - pos)
                let result = Result<Chunk, Error> {
                    let extents = try ConvertOperation.clippedExtents(source, pos, len)
                    for e in extents where e.isData {
                        let start = Int(e.offset - pos)
                        try source.read(into: UnsafeMutableRawBufferPointer(rebasing: buffers[slot][start..<(start + Int(e.length))]), at: e.offset)
                    }
                    return Chunk(pos: pos, length: len, extents: extents, buffer: UnsafeRawBufferPointer(buffers[slot]))
                }
                lock.run { ready.append(result) }
                filled.signal()
                if case .failure = result { return }
                pos += len
                slot ^= 1
            }
            lock.run { ready.append(nil) }
            filled.signal()
        }
    }

    /// The next chunk in order; nil after the last.
    func next() throws -> Chunk? {
        filled.wait()
        return try lock.run { ready.removeFirst() }?.get()
    }

    /// The writer is done with `chunk`'s buffer.
    func done(_ chunk: Chunk) { free.signal() }

    /// Stop reading (after the last chunk, or when the writer failed) and wait for the
    /// reader to be gone before the buffers go.
    func finish() {
        lock.run { stopped = true }
        free.signal()
        free.signal()
        finished.wait()
        for b in buffers { b.deallocate() }
    }
}
