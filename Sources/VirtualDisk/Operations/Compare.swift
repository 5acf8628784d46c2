/// `compare`: are two images' guest views the same?
public enum CompareResult: Sendable, Equatable {
    case identical
    case sizeMismatch
    case contentMismatch(offset: UInt64)
}

public enum CompareOperation {
    /// Compare the common part; past it, the larger image must read as zeroes unless
    /// `strict`, where differing sizes are a mismatch (qemu-img compare -s).
    public static func run(_ a: DiskImage, _ b: DiskImage, strict: Bool) throws -> CompareResult {
        let sa = a.virtualSize, sb = b.virtualSize
        if strict && sa != sb { return .sizeMismatch }
        let common = min(sa, sb)
        let chunk: UInt64 = 1 << 20
        var x = [UInt8](repeating: 0, count: Int(chunk))
        var y = [UInt8](repeating: 0, count: Int(chunk))
        var pos: UInt64 = 0
        while pos < common {
            let len = min(chunk, common - pos)
            // Both zero by block status: nothing to read.
            let ea = try a.extents(at: pos, length: len), eb = try b.extents(at: pos, length: len)
            if ea.allSatisfy({ !$0.isData }) && eb.allSatisfy({ !$0.isData }) { pos += len; continue }
            try x.withUnsafeMutableBytes { try a.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<Int(len)]), at: pos) }
            try y.withUnsafeMutableBytes { try b.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<Int(len)]), at: pos) }
            if !x[0..<Int(len)].elementsEqual(y[0..<Int(len)]) {
                var i = 0
                while x[i] == y[i] { i += 1 }
                return .contentMismatch(offset: (pos + UInt64(i)) / 512 * 512)
            }
            pos += len
        }
        let larger = sa > sb ? a : b
        pos = common
        while pos < larger.virtualSize {
            let len = min(chunk, larger.virtualSize - pos)
            for e in try larger.extents(at: pos, length: len) where e.isData {
                var buf = [UInt8](repeating: 0, count: Int(e.length))
                try buf.withUnsafeMutableBytes { try larger.read(into: $0, at: e.offset) }
                if let i = buf.firstIndex(where: { $0 != 0 }) {
                    return .contentMismatch(offset: (e.offset + UInt64(i)) / 512 * 512)
                }
            }
            pos += len
        }
        return .identical
    }
}
