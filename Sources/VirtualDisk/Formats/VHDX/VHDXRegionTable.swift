/// The region table (MS-VHDX 2.2.3): 64 KiB at 192 KiB and its copy at 256 KiB, naming
/// where the BAT and the metadata region lie. Pure parse, validate and serialise.
///
///     0  "regi" | checksum | entry count (≤ 2047) | reserved
///     16 entries of 32 bytes: GUID | file offset (1 MiB multiple) | length | required
struct VHDXRegionTable: Equatable {
    static let size = 64 * 1024
    static let offsets: [UInt64] = [192 << 10, 256 << 10]
    static let signature: UInt32 = 0x6967_6572  // "regi"
    static let maxEntries = 2047
    static let batGUID = VHDXGUID.known("2dc27766-f623-4200-9d64-115e9bfd4a08")
    static let metadataGUID = VHDXGUID.known("8b7ca206-4790-4b9a-b8fe-575f050f886e")

    struct Entry: Equatable {
        var guid: [UInt8]
        var fileOffset: UInt64
        var length: UInt32
        var required: Bool
        var end: UInt64 { fileOffset + UInt64(length) }
    }

    var entries: [Entry]

    var bat: Entry? { entries.first { $0.guid == Self.batGUID } }
    var metadata: Entry? { entries.first { $0.guid == Self.metadataGUID } }

    /// Parse and validate one copy. Throws a message describing the first problem.
    static func parse(_ bytes: [UInt8], fileSize: UInt64) throws -> VHDXRegionTable {
        let r = ByteReader(bytes)
        guard bytes.count >= size, r.le32(0) == signature else {
            throw ImageError.corrupt("no region table signature (\"regi\")")
        }
        let stored = r.le32(4)
        let computed = CRC32C.checksum(Array(bytes[0..<size]), zeroingFieldAt: 4)
        guard stored == computed else {
            throw ImageError.corrupt("region table checksum mismatch (stored 0x\(vhdHex(stored)), computed 0x\(vhdHex(computed)))")
        }
        let count = Int(r.le32(8))
        guard count <= maxEntries else {
            throw ImageError.corrupt("region table claims \(count) entries, more than the 2047 allowed")
        }
        var entries: [Entry] = []
        for i in 0..<count {
            let o = 16 + i * 32
            let e = Entry(guid: r.slice(o, 16), fileOffset: r.le64(o + 16), length: r.le32(o + 24), required: r.le32(o + 28) & 1 != 0)
            let known = e.guid == batGUID || e.guid == metadataGUID
            if !known && e.required {
                throw ImageError(.unsupported, "region \(VHDXGUID.string(e.guid)) is marked required but is unknown to vloop")
            }
            if entries.contains(where: { $0.guid == e.guid }) {
                throw ImageError.corrupt("region \(VHDXGUID.string(e.guid)) is listed twice")
            }
            let (end, o1) = e.fileOffset.addingReportingOverflow(UInt64(e.length))
            if e.fileOffset < (1 << 20) || e.fileOffset % (1 << 20) != 0 || e.length % (1 << 20) != 0 || e.length == 0 {
                throw ImageError.corrupt("region \(VHDXGUID.string(e.guid)) at \(e.fileOffset)+\(e.length) is not 1 MiB aligned after the header section")
            }
            if o1 || end > fileSize {
                throw ImageError.corrupt("region \(VHDXGUID.string(e.guid)) at \(e.fileOffset)+\(e.length) lies past the end of the file (\(fileSize) bytes)")
            }
            if let other = entries.first(where: { $0.fileOffset < end && e.fileOffset < $0.end }) {
                throw ImageError.corrupt("regions \(VHDXGUID.string(other.guid)) and \(VHDXGUID.string(e.guid)) overlap")
            }
            entries.append(e)
        }
        let t = VHDXRegionTable(entries: entries)
        guard t.bat != nil, t.metadata != nil else {
            throw ImageError.corrupt("region table lacks the \(t.bat == nil ? "BAT" : "metadata") region")
        }
        return t
    }

    func serialized() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: Self.size)
        b.putLE32(Self.signature, at: 0)
        b.putLE32(UInt32(entries.count), at: 8)
        for (i, e) in entries.enumerated() {
            let o = 16 + i * 32
            b.putBytes(e.guid, at: o)
            b.putLE64(e.fileOffset, at: o + 16)
            b.putLE32(e.length, at: o + 24)
            b.putLE32(e.required ? 1 : 0, at: o + 28)
        }
        CRC32C.seal(&b, fieldAt: 4)
        return b
    }
}
