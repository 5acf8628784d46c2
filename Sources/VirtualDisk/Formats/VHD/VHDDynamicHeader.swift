/// The VHD dynamic disk header (libvhdi VHD spec, "Dynamic disk header"): 1024 bytes,
/// big-endian, at the footer's data offset in dynamic and differencing disks.
///
///     0 cookie "cxsparse" | 8 data offset (unused, ~0) | 16 BAT offset | 24 version
///     28 max table entries | 32 block size | 36 checksum | 40 parent unique id (16)
///     56 parent time stamp | 60 reserved | 64 parent unicode name (UTF-16BE, 512)
///     576 parent locators, 8 × 24 | 768 reserved (256)
///
/// Pure parse and serialise; the bytes are kept whole so unknown fields survive.
struct VHDDynamicHeader {
    static let size = 1024
    static let cookie = Array("cxsparse".utf8)
    static let locatorCount = 8
    /// The largest block size accepted: its sector bitmap is 64 KiB.
    static let maxBlockSize: UInt64 = 256 << 20

    /// A parent locator entry (spec "Parent locator entry").
    struct Locator: Equatable {
        /// Platform code, four characters: "W2ru", "W2ku", "MacX", "Mac ", "Wi2r", "Wi2k".
        var code: String
        /// Space reserved for the data: bytes (Hyper-V) or sectors (Virtual PC).
        var dataSpace: UInt32
        var dataLength: UInt32
        var dataOffset: UInt64
        var isEmpty: Bool { code.utf8.allSatisfy { $0 == 0 } || dataLength == 0 }
    }

    private(set) var bytes: [UInt8]

    init(bytes: [UInt8]) {
        precondition(bytes.count == Self.size)
        self.bytes = bytes
    }

    /// A new header as qemu-img writes it: data offset ~0 (all 64 bits: Microsoft tools
    /// expect them, whatever the spec's text says), version 1.0.
    init(batOffset: UInt64, maxTableEntries: UInt32, blockSize: UInt32) {
        bytes = [UInt8](repeating: 0, count: Self.size)
        bytes.putBytes(Self.cookie, at: 0)
        bytes.putBE64(UInt64.max, at: 8)
        self.batOffset = batOffset
        bytes.putBE32(0x0001_0000, at: 24)
        self.maxTableEntries = maxTableEntries
        bytes.putBE32(blockSize, at: 32)
    }

    private var r: ByteReader { ByteReader(bytes) }

    var batOffset: UInt64 {
        get { r.be64(16) }
        set { bytes.putBE64(newValue, at: 16) }
    }
    var version: UInt32 { r.be32(24) }
    var maxTableEntries: UInt32 {
        get { r.be32(28) }
        set { bytes.putBE32(newValue, at: 28) }
    }
    var blockSize: UInt32 { r.be32(32) }
    var storedChecksum: UInt32 { r.be32(36) }
    var computedChecksum: UInt32 { VHDFooter.checksum(bytes, skipping: 36) }
    var checksumIsValid: Bool { storedChecksum == computedChecksum }

    var parentUniqueID: [UInt8] {
        get { Array(bytes[40..<56]) }
        set { bytes.putBytes(newValue, at: 40) }
    }
    var parentTimestamp: UInt32 {
        get { r.be32(56) }
        set { bytes.putBE32(newValue, at: 56) }
    }

    /// The parent's name, UTF-16BE up to the first NUL (unpaired surrogates become U+FFFD).
    var parentName: String {
        get {
            var units: [UInt16] = []
            var o = 64
            while o < 576 {
                let u = r.be16(o)
                if u == 0 { break }
                units.append(u)
                o += 2
            }
            return String(decoding: units, as: UTF16.self)
        }
        set {
            var field = [UInt8](repeating: 0, count: 512)
            for (i, u) in newValue.utf16.prefix(255).enumerated() {
                field.putBE16(u, at: i * 2)
            }
            bytes.putBytes(field, at: 64)
        }
    }

    func locator(_ i: Int) -> Locator {
        let o = 576 + i * 24
        return Locator(code: String(decoding: bytes[o..<(o + 4)], as: UTF8.self),
                       dataSpace: r.be32(o + 4), dataLength: r.be32(o + 8), dataOffset: r.be64(o + 16))
    }

    mutating func setLocator(_ i: Int, _ l: Locator?) {
        let o = 576 + i * 24
        var entry = [UInt8](repeating: 0, count: 24)
        if let l {
            var code = Array(l.code.utf8.prefix(4))
            while code.count < 4 { code.append(0x20) }
            entry.putBytes(code, at: 0)
            entry.putBE32(l.dataSpace, at: 4)
            entry.putBE32(l.dataLength, at: 8)
            entry.putBE64(l.dataOffset, at: 16)
        }
        bytes.putBytes(entry, at: o)
    }

    var locators: [Locator] { (0..<Self.locatorCount).map(locator) }

    /// Forget the parent: unique id, time stamp, name and locators cleared.
    mutating func clearParent() {
        parentUniqueID = [UInt8](repeating: 0, count: 16)
        parentTimestamp = 0
        parentName = ""
        for i in 0..<Self.locatorCount { setLocator(i, nil) }
    }

    func serialized() -> [UInt8] {
        var out = bytes
        out.putBE32(computedChecksum, at: 36)
        return out
    }

    static func parse(_ bytes: [UInt8]) -> VHDDynamicHeader? {
        guard bytes.count == size, bytes.starts(with: cookie) else { return nil }
        return VHDDynamicHeader(bytes: bytes)
    }

    /// Sector bitmap bytes for a block size: one bit per 512-byte sector, padded to a
    /// whole sector (spec "Data blocks").
    static func bitmapSize(blockSize: UInt64) -> UInt64 {
        ((blockSize / 512 + 7) / 8).alignedUp(512)
    }
}

/// Parent names: how the names a differencing disk records (Windows paths, Mac URLs)
/// become names the opener can resolve next to the image. Pure.
enum VHDParentName {
    /// Decode one locator's data by its platform code; nil for codes that hold no path
    /// we can use ("Mac " aliases are opaque blobs).
    static func decode(code: String, data: [UInt8]) -> String? {
        var text: String
        switch code {
        case "W2ru", "W2ku":
            text = utf16(data)
        case "Wi2r", "Wi2k":
            // Deprecated ANSI paths: bytes up to the first NUL.
            text = String(decoding: data.prefix { $0 != 0 }, as: UTF8.self)
        case "MacX":
            text = String(decoding: data.prefix { $0 != 0 }, as: UTF8.self)
            guard let path = fileURLPath(text) else { return nil }
            text = path
        default:
            return nil
        }
        text = text.trimmingWhitespace()
        return text.isEmpty ? nil : text
    }

    /// UTF-16 locator text. Windows writes it little-endian (whatever the spec's
    /// "big-endian" says); a leading NUL byte before a printable one means big-endian.
    static func utf16(_ data: [UInt8]) -> String {
        let bigEndian = data.count >= 2 && data[0] == 0 && data[1] != 0
        var units: [UInt16] = []
        var i = 0
        while i + 1 < data.count {
            let u = bigEndian ? UInt16(data[i]) << 8 | UInt16(data[i + 1]) : UInt16(data[i]) | UInt16(data[i + 1]) << 8
            if u == 0 { break }
            units.append(u)
            i += 2
        }
        return String(decoding: units, as: UTF16.self)
    }

    /// "file://localhost/Users/x/p.vhd" or "file:///Users/x/p.vhd" → "/Users/x/p.vhd".
    static func fileURLPath(_ url: String) -> String? {
        guard url.lowercased().hasPrefix("file://") else { return url.hasPrefix("/") ? url : nil }
        var rest = Substring(url.dropFirst(7))
        if !rest.hasPrefix("/") {
            guard let slash = rest.firstIndex(of: "/") else { return nil }
            rest = rest[slash...]
        }
        return percentDecoded(String(rest))
    }

    static func percentDecoded(_ s: String) -> String {
        var out: [UInt8] = []
        let b = Array(s.utf8)
        var i = 0
        while i < b.count {
            if b[i] == UInt8(ascii: "%"), i + 2 < b.count, let v = UInt8(String(decoding: b[(i + 1)...(i + 2)], as: UTF8.self), radix: 16) {
                out.append(v)
                i += 3
            } else {
                out.append(b[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// The names to try for one recorded path, best first, in POSIX form:
    ///
    ///     .\x.vhd            → x.vhd
    ///     ..\dir\x.vhd       → ../dir/x.vhd
    ///     C:\dir\x.vhd       → x.vhd  (a Windows absolute path: look next to the child)
    ///     \\server\share\x   → x
    ///     /abs/x.vhd         → /abs/x.vhd, then x.vhd
    static func candidates(for recorded: String) -> [String] {
        var p = recorded.replacingBackslashes()
        let base = basename(p)
        let bytes = Array(p.utf8)
        let driveLetter = bytes.count >= 2 && bytes[1] == UInt8(ascii: ":") && (bytes[0] | 0x20) >= UInt8(ascii: "a") && (bytes[0] | 0x20) <= UInt8(ascii: "z")
        if driveLetter || p.hasPrefix("//") {
            return base.isEmpty ? [] : [base]
        }
        while p.hasPrefix("./") { p.removeFirst(2) }
        if p.isEmpty { return [] }
        if p.hasPrefix("/") {
            return base.isEmpty || base == p ? [p] : [p, base]
        }
        return [p]
    }

    static func basename(_ posix: String) -> String {
        if let slash = posix.lastIndex(of: "/") { return String(posix[posix.index(after: slash)...]) }
        return posix
    }

    /// POSIX name to the Windows relative form Hyper-V writes in a "W2ru" locator.
    static func windowsRelative(_ posix: String) -> String {
        var p = posix
        while p.hasPrefix("./") { p.removeFirst(2) }
        let win = String(p.map { $0 == "/" ? "\\" : $0 })
        return win.hasPrefix("..") ? win : ".\\" + win
    }

    static func utf16LE(_ s: String) -> [UInt8] {
        var out: [UInt8] = []
        for u in s.utf16 {
            out.append(UInt8(truncatingIfNeeded: u))
            out.append(UInt8(u >> 8))
        }
        return out
    }
}

extension String {
    func replacingBackslashes() -> String {
        String(map { $0 == "\\" ? "/" : $0 })
    }
}
