/// Endian-explicit field access over byte buffers. Every on-disk structure is parsed
/// through these, so a short buffer is an error, never a trap.
struct ByteReader {
    let bytes: [UInt8]
    init(_ bytes: [UInt8]) { self.bytes = bytes }

    func has(_ offset: Int, _ count: Int) -> Bool { offset >= 0 && count >= 0 && offset <= bytes.count - count }

    func be16(_ o: Int) -> UInt16 { has(o, 2) ? UInt16(bytes[o]) << 8 | UInt16(bytes[o + 1]) : 0 }
    func be32(_ o: Int) -> UInt32 {
        guard has(o, 4) else { return 0 }
        var v: UInt32 = 0
        for i in 0..<4 { v = v << 8 | UInt32(bytes[o + i]) }
        return v
    }
    func be64(_ o: Int) -> UInt64 {
        guard has(o, 8) else { return 0 }
        var v: UInt64 = 0
        for i in 0..<8 { v = v << 8 | UInt64(bytes[o + i]) }
        return v
    }
    func le16(_ o: Int) -> UInt16 { has(o, 2) ? UInt16(bytes[o]) | UInt16(bytes[o + 1]) << 8 : 0 }
    func le32(_ o: Int) -> UInt32 {
        guard has(o, 4) else { return 0 }
        var v: UInt32 = 0
        for i in (0..<4).reversed() { v = v << 8 | UInt32(bytes[o + i]) }
        return v
    }
    func le64(_ o: Int) -> UInt64 {
        guard has(o, 8) else { return 0 }
        var v: UInt64 = 0
        for i in (0..<8).reversed() { v = v << 8 | UInt64(bytes[o + i]) }
        return v
    }
    func slice(_ o: Int, _ n: Int) -> [UInt8] { has(o, n) ? Array(bytes[o..<(o + n)]) : [] }
}

extension Array where Element == UInt8 {
    mutating func putBE16(_ v: UInt16, at o: Int) { self[o] = UInt8(v >> 8); self[o + 1] = UInt8(truncatingIfNeeded: v) }
    mutating func putBE32(_ v: UInt32, at o: Int) { for i in 0..<4 { self[o + i] = UInt8(truncatingIfNeeded: v >> (24 - 8 * i)) } }
    mutating func putBE64(_ v: UInt64, at o: Int) { for i in 0..<8 { self[o + i] = UInt8(truncatingIfNeeded: v >> (56 - 8 * i)) } }
    mutating func putLE16(_ v: UInt16, at o: Int) { self[o] = UInt8(truncatingIfNeeded: v); self[o + 1] = UInt8(v >> 8) }
    mutating func putLE32(_ v: UInt32, at o: Int) { for i in 0..<4 { self[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) } }
    mutating func putLE64(_ v: UInt64, at o: Int) { for i in 0..<8 { self[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) } }
    mutating func putBytes(_ b: [UInt8], at o: Int) { replaceSubrange(o..<(o + b.count), with: b) }
}

extension UInt64 {
    func alignedUp(_ a: UInt64) -> UInt64 { (self + a - 1) / a * a }
    func alignedDown(_ a: UInt64) -> UInt64 { self / a * a }
    var isPowerOfTwo: Bool { self != 0 && self & (self - 1) == 0 }
}

/// Multiply two sizes from untrusted metadata, failing cleanly on overflow.
func checkedProduct(_ a: UInt64, _ b: UInt64, _ what: String) throws -> UInt64 {
    let (p, o) = a.multipliedReportingOverflow(by: b)
    if o { throw ImageError.corrupt("\(what) overflows (\(a) × \(b))") }
    return p
}

/// A buffer of zeroes shared by everyone who needs to write zeroes.
enum ZeroBuffer {
    static let size = 1 << 20
    nonisolated(unsafe) static let pointer: UnsafeRawBufferPointer = {
        // Allocated once, never freed, never written: safe to share across threads.
        let p = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
        p.initializeMemory(as: UInt8.self, repeating: 0)
        return UnsafeRawBufferPointer(p)
    }()
}

/// Whether bytes are all zero: eight at a time, stopping at the first that is not.
public enum ZeroScan {
    public static func isAllZero(_ data: UnsafeRawBufferPointer) -> Bool {
        var i = 0
        let n = data.count
        while i + 8 <= n {
            if data.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
            i += 8
        }
        while i < n { if data[i] != 0 { return false }; i += 1 }
        return true
    }
}
