#if canImport(Glibc)
import Glibc
#endif

/// The metadata region (MS-VHDX 2.6): a 64 KiB table of items, then the items. Pure
/// parse, validate and serialise of the table, the known items and the parent locator.
///
///     0      "metadata" | reserved | entry count (≤ 2047) | reserved        (32 bytes)
///     32     entries: item GUID | offset (from region start) | length | flags | reserved
///     64K…   item data
struct VHDXMetadata: Equatable {
    static let tableSize = 64 * 1024
    static let signature = Array("metadata".utf8)
    static let maxEntries = 2047

    static let fileParametersGUID = VHDXGUID.known("caa16737-fa36-4d43-b3b6-33f0aa44e76b")
    static let virtualDiskSizeGUID = VHDXGUID.known("2fa54224-cd1b-4876-b211-5dbed83bf4b8")
    static let page83GUID = VHDXGUID.known("beca12ab-b2e6-4523-93ef-c309e000c746")
    static let logicalSectorSizeGUID = VHDXGUID.known("8141bf1d-a96f-4709-ba47-f233a8faab5f")
    static let physicalSectorSizeGUID = VHDXGUID.known("cda348c7-445d-4471-9cc9-e9885251c556")
    static let parentLocatorGUID = VHDXGUID.known("a8d35f2d-b30b-454d-abf7-d3d84834ab0c")
    static let vhdxParentLocatorType = VHDXGUID.known("b04aefb7-d19e-4a81-b789-25b8e9445913")

    static let minBlockSize: UInt64 = 1 << 20
    static let maxBlockSize: UInt64 = 256 << 20
    /// MS-VHDX 2.6.2.2: at most 64 TiB.
    static let maxVirtualSize: UInt64 = 64 << 40
    /// Parent locators larger than this are not path lists.
    static let maxParentLocator = 64 * 1024

    struct Entry: Equatable {
        var guid: [UInt8]
        var offset: UInt32
        var length: UInt32
        var isUser: Bool
        var isVirtualDisk: Bool
        var isRequired: Bool
    }

    var entries: [Entry]
    var blockSize: UInt32
    var leaveBlocksAllocated: Bool
    var hasParent: Bool
    var virtualDiskSize: UInt64
    var page83: [UInt8]
    var logicalSectorSize: UInt32
    var physicalSectorSize: UInt32
    /// Key/value pairs of the parent locator, in file order (differencing only).
    var parentLocator: [(key: String, value: String)]

    static func == (a: VHDXMetadata, b: VHDXMetadata) -> Bool {
        a.entries == b.entries && a.blockSize == b.blockSize && a.leaveBlocksAllocated == b.leaveBlocksAllocated
            && a.hasParent == b.hasParent && a.virtualDiskSize == b.virtualDiskSize && a.page83 == b.page83
            && a.logicalSectorSize == b.logicalSectorSize && a.physicalSectorSize == b.physicalSectorSize
            && a.parentLocator.map { $0.key + "\u{0}" + $0.value } == b.parentLocator.map { $0.key + "\u{0}" + $0.value }
    }

    init(blockSize: UInt32, leaveBlocksAllocated: Bool, virtualDiskSize: UInt64, logicalSectorSize: UInt32,
         physicalSectorSize: UInt32, parentLocator: [(key: String, value: String)]? = nil) {
        entries = []
        self.blockSize = blockSize
        self.leaveBlocksAllocated = leaveBlocksAllocated
        self.hasParent = parentLocator != nil
        self.virtualDiskSize = virtualDiskSize
        self.page83 = VHDXGUID.random()
        self.logicalSectorSize = logicalSectorSize
        self.physicalSectorSize = physicalSectorSize
        self.parentLocator = parentLocator ?? []
    }

    /// Parse the region's bytes (`region` holds at least the table; `readItem` reads
    /// `length` bytes at `offset` from the region start, both already bounds-checked).
    static func parse(table: [UInt8], regionLength: UInt32, readItem: (UInt32, Int) throws -> [UInt8]) throws -> VHDXMetadata {
        let r = ByteReader(table)
        guard table.count >= tableSize, table.starts(with: signature) else {
            throw ImageError.corrupt("no metadata table signature (\"metadata\") at the start of the metadata region")
        }
        let count = Int(r.le16(10))
        guard count <= maxEntries else {
            throw ImageError.corrupt("metadata table claims \(count) entries, more than the 2047 allowed")
        }
        var entries: [Entry] = []
        for i in 0..<count {
            let o = 32 + i * 32
            let flags = r.le32(o + 24)
            let e = Entry(guid: r.slice(o, 16), offset: r.le32(o + 16), length: r.le32(o + 20),
                          isUser: flags & 1 != 0, isVirtualDisk: flags & 2 != 0, isRequired: flags & 4 != 0)
            if e.length > 0 {
                let end = UInt64(e.offset) + UInt64(e.length)
                guard e.offset >= UInt32(tableSize), end <= UInt64(regionLength) else {
                    throw ImageError.corrupt("metadata item \(VHDXGUID.string(e.guid)) at \(e.offset)+\(e.length) lies outside the metadata region (\(regionLength) bytes)")
                }
                if let other = entries.first(where: { $0.length > 0 && UInt64($0.offset) < end && UInt64(e.offset) < UInt64($0.offset) + UInt64($0.length) }) {
                    throw ImageError.corrupt("metadata items \(VHDXGUID.string(other.guid)) and \(VHDXGUID.string(e.guid)) overlap")
                }
            }
            if entries.contains(where: { $0.guid == e.guid && $0.isUser == e.isUser }) {
                throw ImageError.corrupt("metadata item \(VHDXGUID.string(e.guid)) is listed twice")
            }
            entries.append(e)
        }
        func item(_ guid: [UInt8], _ need: Int, _ name: String) throws -> [UInt8]? {
            guard let e = entries.first(where: { $0.guid == guid && !$0.isUser }) else { return nil }
            guard Int(e.length) >= need else {
                throw ImageError.corrupt("metadata item '\(name)' is \(e.length) bytes, needs \(need)")
            }
            return try readItem(e.offset, min(Int(e.length), max(need, guid == parentLocatorGUID ? maxParentLocator : need)))
        }
        for e in entries where e.isRequired && !e.isUser {
            let known = [fileParametersGUID, virtualDiskSizeGUID, page83GUID, logicalSectorSizeGUID, physicalSectorSizeGUID, parentLocatorGUID]
            if !known.contains(e.guid) {
                throw ImageError(.unsupported, "metadata item \(VHDXGUID.string(e.guid)) is marked required but is unknown to vloop")
            }
        }
        guard let fp = try item(fileParametersGUID, 8, "file parameters") else {
            throw ImageError.corrupt("metadata lacks the file parameters item")
        }
        guard let vs = try item(virtualDiskSizeGUID, 8, "virtual disk size") else {
            throw ImageError.corrupt("metadata lacks the virtual disk size item")
        }
        guard let ls = try item(logicalSectorSizeGUID, 4, "logical sector size") else {
            throw ImageError.corrupt("metadata lacks the logical sector size item")
        }
        let ps = try item(physicalSectorSizeGUID, 4, "physical sector size")
        let p83 = try item(page83GUID, 16, "page 83 data")
        let fr = ByteReader(fp)
        let bits = fr.le32(4)
        var m = VHDXMetadata(blockSize: fr.le32(0), leaveBlocksAllocated: bits & 1 != 0, virtualDiskSize: ByteReader(vs).le64(0),
                             logicalSectorSize: ByteReader(ls).le32(0), physicalSectorSize: ps.map { ByteReader($0).le32(0) } ?? 4096)
        m.hasParent = bits & 2 != 0
        m.entries = entries
        m.page83 = p83 ?? VHDXGUID.zero
        try m.validate()
        if m.hasParent {
            guard let pl = try item(parentLocatorGUID, 20, "parent locator") else {
                throw ImageError.corrupt("a differencing VHDX (has_parent set) without a parent locator")
            }
            m.parentLocator = try parseParentLocator(pl)
        }
        return m
    }

    func validate() throws {
        let bs = UInt64(blockSize)
        guard bs.isPowerOfTwo, bs >= Self.minBlockSize, bs <= Self.maxBlockSize else {
            throw ImageError.corrupt("block size \(bs) is not a power of two from 1 MiB to 256 MiB")
        }
        guard logicalSectorSize == 512 || logicalSectorSize == 4096 else {
            throw ImageError.corrupt("logical sector size \(logicalSectorSize) is neither 512 nor 4096")
        }
        guard physicalSectorSize == 512 || physicalSectorSize == 4096 else {
            throw ImageError.corrupt("physical sector size \(physicalSectorSize) is neither 512 nor 4096")
        }
        guard virtualDiskSize % UInt64(logicalSectorSize) == 0, virtualDiskSize <= Self.maxVirtualSize else {
            throw ImageError.corrupt("virtual disk size \(virtualDiskSize) is not a multiple of the \(logicalSectorSize)-byte sector or exceeds 64 TiB")
        }
    }

    /// Key/value pairs (UTF-16LE, no terminator), each checked to lie inside the item.
    static func parseParentLocator(_ b: [UInt8]) throws -> [(key: String, value: String)] {
        let r = ByteReader(b)
        guard r.slice(0, 16) == vhdxParentLocatorType else {
            throw ImageError(.unsupported, "parent locator of type \(VHDXGUID.string(r.slice(0, 16))) is not the VHDX one")
        }
        let count = Int(r.le16(18))
        guard 20 + count * 12 <= b.count else {
            throw ImageError.corrupt("parent locator claims \(count) entries, more than its \(b.count) bytes hold")
        }
        var out: [(String, String)] = []
        for i in 0..<count {
            let o = 20 + i * 12
            let ko = Int(r.le32(o)), vo = Int(r.le32(o + 4)), kl = Int(r.le16(o + 8)), vl = Int(r.le16(o + 10))
            guard r.has(ko, kl), r.has(vo, vl), ko >= 20, vo >= 20 else {
                throw ImageError.corrupt("parent locator entry \(i) points outside the locator")
            }
            out.append((utf16(r.slice(ko, kl)), utf16(r.slice(vo, vl))))
        }
        return out
    }

    static func utf16(_ b: [UInt8]) -> String {
        var units: [UInt16] = []
        var i = 0
        while i + 1 < b.count {
            units.append(UInt16(b[i]) | UInt16(b[i + 1]) << 8)
            i += 2
        }
        while units.last == 0 { units.removeLast() }
        return String(decoding: units, as: UTF16.self)
    }

    func parentValue(_ key: String) -> String? { parentLocator.first { $0.key == key }?.value }

    // MARK: serialise

    /// The item bytes this metadata records, with their flags, in qemu's order.
    func items() -> [(guid: [UInt8], flags: UInt32, data: [UInt8])] {
        var fp = [UInt8](repeating: 0, count: 8)
        fp.putLE32(blockSize, at: 0)
        fp.putLE32((leaveBlocksAllocated ? 1 : 0) | (hasParent ? 2 : 0), at: 4)
        var vs = [UInt8](repeating: 0, count: 8)
        vs.putLE64(virtualDiskSize, at: 0)
        var ls = [UInt8](repeating: 0, count: 4)
        ls.putLE32(logicalSectorSize, at: 0)
        var ps = [UInt8](repeating: 0, count: 4)
        ps.putLE32(physicalSectorSize, at: 0)
        var out: [([UInt8], UInt32, [UInt8])] = [
            (Self.fileParametersGUID, 4, fp),
            (Self.virtualDiskSizeGUID, 6, vs),
            (Self.page83GUID, 6, page83),
            (Self.logicalSectorSizeGUID, 6, ls),
            (Self.physicalSectorSizeGUID, 6, ps),
        ]
        if hasParent { out.append((Self.parentLocatorGUID, 4, Self.serializeParentLocator(parentLocator))) }
        return out
    }

    static func serializeParentLocator(_ pairs: [(key: String, value: String)]) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 20 + pairs.count * 12)
        b.putBytes(vhdxParentLocatorType, at: 0)
        b.putLE16(UInt16(pairs.count), at: 18)
        for (i, p) in pairs.enumerated() {
            let k = VHDParentName.utf16LE(p.key), v = VHDParentName.utf16LE(p.value)
            let o = 20 + i * 12
            b.putLE32(UInt32(b.count), at: o)
            b += k
            b.putLE32(UInt32(b.count), at: o + 4)
            b += v
            b.putLE16(UInt16(k.count), at: o + 8)
            b.putLE16(UInt16(v.count), at: o + 10)
        }
        return b
    }

    /// The whole region (table and items), `length` bytes.
    func serializedRegion(length: Int) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: length)
        b.putBytes(Self.signature, at: 0)
        let list = items()
        b.putLE16(UInt16(list.count), at: 10)
        var at = Self.tableSize
        for (i, it) in list.enumerated() {
            let o = 32 + i * 32
            b.putBytes(it.guid, at: o)
            b.putLE32(UInt32(at), at: o + 16)
            b.putLE32(UInt32(it.data.count), at: o + 20)
            b.putLE32(it.flags, at: o + 24)
            b.putBytes(it.data, at: at)
            at += (it.data.count + 7) / 8 * 8
        }
        return b
    }
}

extension VHDXLayer {
    /// The parent's name from the locator: relative_path, volume_path, absolute_win32_path
    /// in that order, each in POSIX form (Windows absolute paths → the base name, looked
    /// for next to the child). The first candidate that exists is chosen, else the first.
    static func parentName(_ m: VHDXMetadata, file: HostFile) throws -> String {
        var candidates: [String] = []
        for key in ["relative_path", "volume_path", "absolute_win32_path"] {
            guard var v = m.parentValue(key), !v.isEmpty else { continue }
            // "\\?\C:\dir\p.vhdx" and "\\?\Volume{GUID}\dir\p.vhdx": drop the "\\?\" prefix.
            if v.hasPrefix("\\\\?\\") { v = String(v.dropFirst(4)) }
            if v.hasPrefix("Volume{"), let slash = v.firstIndex(of: "\\") {
                v = "C:" + v[slash...]  // any drive: only the base name is used
            }
            candidates += VHDParentName.candidates(for: v)
        }
        var seen: Set<String> = []
        candidates = candidates.filter { seen.insert($0).inserted }
        guard let first = candidates.first else {
            throw ImageError(.corrupt, "differencing VHDX names no parent (no relative_path, volume_path or absolute_win32_path in its parent locator)",
                             path: file.path, format: "vhdx")
        }
        let found = candidates.first { access(ImageOpener.resolve($0, relativeTo: file.path), F_OK) == 0 }
        return found ?? first
    }
}
