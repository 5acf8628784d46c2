import Synchronization

/// A format layer over an optional backing image: the `DiskImage` every format is
/// served as. Read-through to the backing image and the copy-on-write fill of partial
/// units live here once, for every format and any mix of formats in a chain.
public final class LayeredImage: DiskImage {
    public let layer: FormatLayer
    public let backingImage: DiskImage?
    private let ioLock = RWLock()
    private let closed = Atomic<Bool>(false)
    /// The layer's virtual size, read on every request; `sizeChanged` after a resize or
    /// a snapshot revert.
    private let size: Atomic<UInt64>
    /// Open for writing (fixed for the image's life).
    private let writable: Bool
    /// Extra cleanup when closing (image locks, backing handles).
    private let onClose: @Sendable () -> Void

    public init(layer: FormatLayer, backing: DiskImage?, onClose: @escaping @Sendable () -> Void = {}) {
        self.layer = layer
        self.backingImage = backing
        self.onClose = onClose
        let info = layer.layerInfo
        self.size = Atomic(info.virtualSize)
        self.writable = info.capabilities.contains(.writable)
    }

    public var info: ImageInfo { layer.layerInfo }

    public var virtualSize: UInt64 { size.load(ordering: .acquiring) }

    /// The layer's size changed (resize, snapshot revert).
    func sizeChanged() {
        size.store(layer.layerInfo.virtualSize, ordering: .releasing)
    }

    // MARK: read

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, UInt64(buffer.count))
        if buffer.isEmpty { return }
        try ioLock.sharedLookup {
            let runs = try checked(layer.map(at: offset, length: UInt64(buffer.count)), offset, UInt64(buffer.count))
            for run in runs {
                let start = Int(run.offset - offset)
                let part = UnsafeMutableRawBufferPointer(rebasing: buffer[start..<(start + Int(run.length))])
                switch run.kind {
                case .stored(let file, let host):
                    try file.read(into: part, at: host)
                case .zero:
                    part.initializeMemory(as: UInt8.self, repeating: 0)
                case .unallocated:
                    try readBelow(run.offset, part)
                case .encoded(let token):
                    try layer.readEncoded(token: token, at: run.offset, into: part)
                }
            }
        }
    }

    /// A layer's runs must tile the request exactly; anything else is a bug in the
    /// format (or metadata it failed to validate), reported instead of trapping later.
    private func checked(_ runs: [LayerRun], _ offset: UInt64, _ length: UInt64) throws -> [LayerRun] {
        var pos = offset
        for r in runs {
            guard r.offset == pos, r.length > 0, r.length <= offset + length - pos else {
                throw ImageError(.corrupt, "\(info.format) mapping of \(offset)+\(length) is inconsistent at \(r.offset)+\(r.length); run 'vloop check'",
                                 path: info.path, offset: r.offset)
            }
            pos += r.length
        }
        guard pos == offset + length else {
            throw ImageError(.corrupt, "\(info.format) mapping of \(offset)+\(length) stops at \(pos)", path: info.path, offset: pos)
        }
        return runs
    }

    /// What lies below this layer: the backing image, zero-filled past its end, or zeroes.
    func readBelow(_ offset: UInt64, _ buffer: UnsafeMutableRawBufferPointer) throws {
        guard let backing = backingImage else {
            buffer.initializeMemory(as: UInt8.self, repeating: 0)
            return
        }
        let size = backing.virtualSize
        let inside = offset >= size ? 0 : Int(min(UInt64(buffer.count), size - offset))
        if inside > 0 {
            try backing.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<inside]), at: offset)
        }
        if inside < buffer.count {
            UnsafeMutableRawBufferPointer(rebasing: buffer[inside...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    // MARK: write

    private func requireWritable() throws {
        if !writable {
            throw ImageError(.readOnly, "image is open read-only", path: info.path)
        }
    }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try requireWritable()
        try checkRange(offset, UInt64(data.count))
        if data.isEmpty { return }
        // Writing zeroes is zeroing: where nothing is allocated (and no backing file
        // shows through) it allocates nothing, in every format.
        if data.count >= 512 && ZeroScan.isAllZero(data) {
            try writeZeroes(at: offset, length: UInt64(data.count), mayUnmap: false)
            return
        }
        try ioLock.shared {
            try layer.write(data, at: offset, below: readBelow)
        }
        try releaseFreesIfAny()
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool) throws {
        try requireWritable()
        try checkRange(offset, length)
        if length == 0 { return }
        // Zeroing may free clusters: no other I/O may be using them meanwhile.
        try ioLock.exclusive {
            try layer.writeZeroes(at: offset, length: length, mayUnmap: mayUnmap,
                                  hasBacking: backingImage != nil, below: readBelow)
            if layer.hasDeferredFrees { try layer.releaseDeferredFrees() }
        }
    }

    public func discard(at offset: UInt64, length: UInt64) throws {
        try requireWritable()
        try checkRange(offset, length)
        if length == 0 { return }
        try ioLock.exclusive {
            try layer.discard(at: offset, length: length, hasBacking: backingImage != nil)
            if layer.hasDeferredFrees { try layer.releaseDeferredFrees() }
        }
    }

    private func releaseFreesIfAny() throws {
        if layer.hasDeferredFrees {
            try ioLock.exclusive { try layer.releaseDeferredFrees() }
        }
    }

    // MARK: block status

    public func extents(at offset: UInt64, length: UInt64) throws -> [Extent] {
        try checkRange(offset, length)
        if length == 0 { return [] }
        let runs = try ioLock.shared { try checked(layer.map(at: offset, length: length), offset, length) }
        var out: [Extent] = []
        for run in runs {
            switch run.kind {
            case .stored(_, let host):
                out.append(Extent(offset: run.offset, length: run.length, kind: .data(hostOffset: host)))
            case .encoded:
                out.append(Extent(offset: run.offset, length: run.length, kind: .data(hostOffset: nil)))
            case .zero:
                out.append(Extent(offset: run.offset, length: run.length, kind: .zero))
            case .unallocated:
                guard let backing = backingImage else {
                    out.append(Extent(offset: run.offset, length: run.length, kind: .unallocated))
                    continue
                }
                let size = backing.virtualSize
                let insideEnd = min(run.end, max(size, run.offset))
                if insideEnd > run.offset {
                    for e in try backing.extents(at: run.offset, length: insideEnd - run.offset) {
                        var deeper = e
                        deeper.depth += 1
                        out.append(deeper)
                    }
                }
                if insideEnd < run.end {
                    // Past the backing file's end this layer answers: zeroes (qemu reports the same depth).
                    out.append(Extent(offset: insideEnd, length: run.end - insideEnd, kind: .unallocated, depth: 0))
                }
            }
        }
        return out.coalesced()
    }

    // MARK: lifetime

    public func flush() throws {
        if writable { try layer.flush() }
    }

    public func close() throws {
        // Closing twice is harmless: the second call does nothing.
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        defer { onClose() }
        var firstError: Error?
        do { try layer.close() } catch { firstError = error }
        if let backing = backingImage {
            do { try backing.close() } catch { if firstError == nil { firstError = error } }
        }
        if let firstError { throw firstError }
    }
}

extension LayerRun {
    var end: UInt64 { offset + length }
}
