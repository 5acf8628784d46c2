/// VHDX header section (MS-VHDX 2.2): the file type identifier at 0 and the two image
/// headers at 64 KiB and 128 KiB. Pure parse, validate and serialise; CRC-32C and GUIDs.
///
///     0      file type identifier ("vhdxfile", creator)      64 KiB
///     64K    header 1 (4 KiB used)                           64 KiB
///     128K   header 2                                        64 KiB
///     192K   region table 1                                  64 KiB
///     256K   region table 2                                  64 KiB
///     320K   reserved                                  up to 1 MiB
///     1M…    log, BAT, metadata region, blocks (1 MiB aligned)

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as every VHDX checksum uses:
/// initial value all ones, result inverted (the usual CRC-32C; "initial value 0" in
/// some write-ups means the value stored in the checksum field while computing).
enum CRC32C {
    static let table: [UInt32] = (0..<256).map { i -> UInt32 in
        var c = UInt32(i)
        for _ in 0..<8 { c = c & 1 != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
        return c
    }

    static func update(_ crc: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        var c = crc
        table.withUnsafeBufferPointer { t in
            for b in bytes { c = t[Int((c ^ UInt32(b)) & 0xff)] ^ (c >> 8) }
        }
        return c
    }

    /// The checksum of `bytes` with the 4-byte field at `field` taken as zero.
    static func checksum(_ bytes: [UInt8], zeroingFieldAt field: Int? = nil) -> UInt32 {
        var c: UInt32 = 0xffff_ffff
        bytes.withUnsafeBytes { all in
            if let f = field, f + 4 <= all.count {
                c = update(c, UnsafeRawBufferPointer(rebasing: all[0..<f]))
                let zero: [UInt8] = [0, 0, 0, 0]
                zero.withUnsafeBytes { c = update(c, $0) }
                c = update(c, UnsafeRawBufferPointer(rebasing: all[(f + 4)...]))
            } else {
                c = update(c, all)
            }
        }
        return ~c
    }

    /// Store the checksum of `bytes` (field taken as zero) into the field.
    static func seal(_ bytes: inout [UInt8], fieldAt field: Int) {
        bytes.putLE32(0, at: field)
        bytes.putLE32(checksum(bytes), at: field)
    }
}

/// GUIDs as VHDX stores them: 16 bytes, the first three fields little-endian.
enum VHDXGUID {
    static let zero = [UInt8](repeating: 0, count: 16)

    /// A random (version 4) GUID.
    static func random() -> [UInt8] {
        var g = SystemRandomNumberGenerator()
        var out = (0..<16).map { _ in UInt8.random(in: 0...255, using: &g) }
        out[7] = (out[7] & 0x0f) | 0x40  // data3's high byte (little-endian field)
        out[8] = (out[8] & 0x3f) | 0x80
        return out
    }

    /// Parse "2dc27766-f623-4200-9d64-115e9bfd4a08", with or without braces.
    static func parse(_ text: String) -> [UInt8]? {
        var s = text.trimmingWhitespace()
        if s.hasPrefix("{") && s.hasSuffix("}") { s = String(s.dropFirst().dropLast()) }
        let hex = s.filter { $0 != "-" }
        guard s.count == 36, hex.count == 32 else { return nil }
        var b: [UInt8] = []
        var i = hex.startIndex
        while i < hex.endIndex {
            let j = hex.index(i, offsetBy: 2)
            guard let v = UInt8(hex[i..<j], radix: 16) else { return nil }
            b.append(v)
            i = j
        }
        // Text order is big-endian per field; storage swaps the first three fields.
        return [b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6]] + Array(b[8..<16])
    }

    static func string(_ g: [UInt8]) -> String {
        guard g.count == 16 else { return "" }
        func h(_ bytes: [UInt8]) -> String {
            bytes.map { let s = String($0, radix: 16); return s.count == 1 ? "0" + s : s }.joined()
        }
        return h([g[3], g[2], g[1], g[0]]) + "-" + h([g[5], g[4]]) + "-" + h([g[7], g[6]]) + "-" + h(Array(g[8..<10])) + "-" + h(Array(g[10..<16]))
    }

    /// A compile-time known GUID from its text form.
    static func known(_ text: String) -> [UInt8] { parse(text) ?? zero }
}

/// The file type identifier (MS-VHDX 2.2.1): "vhdxfile" and a UTF-16 creator string.
enum VHDXFileIdentifier {
    static let size = 64 * 1024
    static let signature = Array("vhdxfile".utf8)

    static func isValid(_ bytes: [UInt8]) -> Bool { bytes.starts(with: signature) }

    static func creator(_ bytes: [UInt8]) -> String {
        var units: [UInt16] = []
        var i = 8
        while i + 1 < min(bytes.count, 520) {
            let u = UInt16(bytes[i]) | UInt16(bytes[i + 1]) << 8
            if u == 0 { break }
            units.append(u)
            i += 2
        }
        return String(decoding: units, as: UTF16.self)
    }

    static func serialized(creator: String) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: size)
        b.putBytes(signature, at: 0)
        var at = 8
        for u in creator.utf16.prefix(255) {
            b.putLE16(u, at: at)
            at += 2
        }
        return b
    }
}

/// One image header (MS-VHDX 2.2.2), 4 KiB at 64 KiB or 128 KiB.
struct VHDXHeader: Equatable {
    static let size = 4096
    static let offsets: [UInt64] = [64 << 10, 128 << 10]
    static let signature: UInt32 = 0x6461_6568  // "head"

    var sequenceNumber: UInt64
    var fileWriteGUID: [UInt8]
    var dataWriteGUID: [UInt8]
    var logGUID: [UInt8]
    var logVersion: UInt16
    var version: UInt16
    var logLength: UInt32
    var logOffset: UInt64
    var storedChecksum: UInt32 = 0
    var computedChecksum: UInt32 = 0

    var checksumIsValid: Bool { storedChecksum == computedChecksum }
    var hasLog: Bool { logGUID != VHDXGUID.zero }

    init(sequenceNumber: UInt64, logLength: UInt32, logOffset: UInt64) {
        self.sequenceNumber = sequenceNumber
        fileWriteGUID = VHDXGUID.random()
        dataWriteGUID = VHDXGUID.random()
        logGUID = VHDXGUID.zero
        logVersion = 0
        version = 1
        self.logLength = logLength
        self.logOffset = logOffset
    }

    /// Parse 4 KiB; nil when the signature is absent.
    static func parse(_ bytes: [UInt8]) -> VHDXHeader? {
        let r = ByteReader(bytes)
        guard bytes.count >= size, r.le32(0) == signature else { return nil }
        var h = VHDXHeader(sequenceNumber: r.le64(8), logLength: r.le32(68), logOffset: r.le64(72))
        h.fileWriteGUID = r.slice(16, 16)
        h.dataWriteGUID = r.slice(32, 16)
        h.logGUID = r.slice(48, 16)
        h.logVersion = r.le16(64)
        h.version = r.le16(66)
        h.storedChecksum = r.le32(4)
        h.computedChecksum = CRC32C.checksum(Array(bytes[0..<size]), zeroingFieldAt: 4)
        return h
    }

    func serialized() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: Self.size)
        b.putLE32(Self.signature, at: 0)
        b.putLE64(sequenceNumber, at: 8)
        b.putBytes(fileWriteGUID, at: 16)
        b.putBytes(dataWriteGUID, at: 32)
        b.putBytes(logGUID, at: 48)
        b.putLE16(logVersion, at: 64)
        b.putLE16(version, at: 66)
        b.putLE32(logLength, at: 68)
        b.putLE64(logOffset, at: 72)
        CRC32C.seal(&b, fieldAt: 4)
        return b
    }

    /// Why this header cannot be used (checksum, version, log placement), or nil.
    func problem(fileSize: UInt64) -> String? {
        if !checksumIsValid {
            return "checksum mismatch (stored 0x\(vhdHex(storedChecksum)), computed 0x\(vhdHex(computedChecksum)))"
        }
        if version != 1 { return "format version \(version), only 1 is defined" }
        if hasLog && logVersion != 0 { return "log version \(logVersion), only 0 is defined" }
        if logLength % (1 << 20) != 0 || logOffset % (1 << 20) != 0 || (logLength > 0 && logOffset < (1 << 20)) {
            return "log at \(logOffset)+\(logLength) is not 1 MiB aligned after the header section"
        }
        let (end, o) = logOffset.addingReportingOverflow(UInt64(logLength))
        if o || (hasLog && end > fileSize) {
            return "log at \(logOffset)+\(logLength) lies past the end of the file (\(fileSize) bytes)"
        }
        return nil
    }

    /// Choose between the two headers: the valid one with the higher sequence number.
    /// Returns the chosen header and its slot (0 or 1), or the reasons both failed.
    static func choose(_ a: VHDXHeader?, _ b: VHDXHeader?, fileSize: UInt64) -> (header: VHDXHeader, slot: Int)? {
        let good = [a, b].enumerated().compactMap { (i, h) -> (VHDXHeader, Int)? in
            guard let h, h.problem(fileSize: fileSize) == nil else { return nil }
            return (h, i)
        }
        return good.max { $0.0.sequenceNumber < $1.0.sequenceNumber }.map { ($0.0, $0.1) }
    }
}
