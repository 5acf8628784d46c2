/// What one run of guest bytes is in a single layer, and where to find it.
public struct LayerRun: Sendable {
    public enum Kind: Sendable {
        /// Stored plainly at `hostOffset` in `file`.
        case stored(file: HostFile, hostOffset: UInt64)
        /// Reads as zeroes in this layer.
        case zero
        /// Not in this layer: read through to the backing image (zeroes if none).
        case unallocated
        /// Stored in a form only the format can decode (compressed); `token` is the
        /// format's own description, handed back to `readEncoded`.
        case encoded(token: UInt64)
    }
    public var offset: UInt64
    public var length: UInt64
    public var kind: Kind

    public init(offset: UInt64, length: UInt64, kind: Kind) {
        self.offset = offset
        self.length = length
        self.kind = kind
    }
}

/// Reads what lies below a layer (the backing chain, or zeroes) into a buffer. Formats
/// call it to fill the parts of a unit they allocate that the write does not cover:
/// this is the one copy-on-write mechanism every format shares.
public typealias BelowReader = (_ offset: UInt64, _ into: UnsafeMutableRawBufferPointer) throws -> Void

/// One format's view of its own layer. A format answers only for itself: each range is
/// data here, zero here, or unallocated. `LayeredImage` turns a layer plus a backing image
/// into a `DiskImage`.
///
/// Thread safety: `map` and metadata changes run under the format's own lock; data I/O
/// on the runs `map` returns happens outside it, under the image's shared I/O lock.
public protocol FormatLayer: AnyObject, Sendable {
    var layerInfo: ImageInfo { get }

    /// Runs covering exactly `offset ..< offset+length`, in order.
    func map(at offset: UInt64, length: UInt64) throws -> [LayerRun]

    /// Decode an `.encoded` run's bytes for `offset ..< offset+buffer.count`.
    func readEncoded(token: UInt64, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws

    /// Store `data` in this layer, allocating as needed; `below` supplies the bytes of
    /// newly allocated units that `data` does not cover.
    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, below: BelowReader) throws

    /// Make a range read as zeroes. `hasBacking` tells whether unallocated ranges would
    /// show a backing file.
    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, hasBacking: Bool, below: BelowReader) throws

    /// Advisory: drop the range's data where whole units allow it.
    func discard(at offset: UInt64, length: UInt64, hasBacking: Bool) throws

    /// True when clusters were freed by a write and wait for `releaseDeferredFrees`,
    /// which runs with no I/O in flight.
    var hasDeferredFrees: Bool { get }
    func releaseDeferredFrees() throws

    func flush() throws
    func close() throws
}

extension FormatLayer {
    public func readEncoded(token: UInt64, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        throw ImageError(.unsupported, "encoded data in a format that has none", path: layerInfo.path)
    }
    public var hasDeferredFrees: Bool { false }
    public func releaseDeferredFrees() throws {}
}

extension Array where Element == LayerRun {
    /// Append a run, merging it into the last one when it continues it: zero after
    /// zero, unallocated after unallocated, stored data contiguous in the same file.
    /// Every format's `map` builds its result this way.
    public mutating func appendMerging(_ run: LayerRun) {
        if var last = self.last, last.offset + last.length == run.offset {
            switch (last.kind, run.kind) {
            case (.zero, .zero), (.unallocated, .unallocated):
                last.length += run.length; self[count - 1] = last; return
            case let (.stored(f1, h1), .stored(f2, h2)) where f1 === f2 && h1 + last.length == h2:
                last.length += run.length; self[count - 1] = last; return
            default: break
            }
        }
        append(run)
    }
}
