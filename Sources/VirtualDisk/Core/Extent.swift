/// What one run of guest bytes is, in the layer that answers for it.
public enum ExtentKind: Equatable, Sendable {
    /// Stored data; `hostOffset` is where it lives in the image (or data) file when it is
    /// stored plainly (nil for compressed data or data in another file).
    case data(hostOffset: UInt64?)
    /// Reads as zeroes.
    case zero
    /// Not allocated in this layer nor any below it.
    case unallocated
}

/// A run of guest bytes with one kind. `depth` counts backing layers from the top (0).
public struct Extent: Equatable, Sendable {
    public var offset: UInt64
    public var length: UInt64
    public var kind: ExtentKind
    public var depth: Int

    public init(offset: UInt64, length: UInt64, kind: ExtentKind, depth: Int = 0) {
        self.offset = offset
        self.length = length
        self.kind = kind
        self.depth = depth
    }

    public var end: UInt64 { offset + length }
    public var isData: Bool { if case .data = kind { return true } else { return false } }
}

extension Array where Element == Extent {
    /// Merge adjacent runs of the same kind (contiguous host offsets for data).
    func coalesced() -> [Extent] {
        var out: [Extent] = []
        out.reserveCapacity(count)
        for e in self where e.length > 0 {
            if var last = out.last, last.end == e.offset, last.depth == e.depth {
                switch (last.kind, e.kind) {
                case (.zero, .zero), (.unallocated, .unallocated), (.data(nil), .data(nil)):
                    last.length += e.length
                    out[out.count - 1] = last
                    continue
                case let (.data(.some(a)), .data(.some(b))) where a + last.length == b:
                    last.length += e.length
                    out[out.count - 1] = last
                    continue
                default:
                    break
                }
            }
            out.append(e)
        }
        return out
    }
}
