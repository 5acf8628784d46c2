/// Internal snapshots (qcow2 spec, "Snapshots"): the snapshot table and its entries.
public struct QCOW2Snapshot: Sendable {
    public var l1TableOffset: UInt64
    public var l1Size: UInt32
    public var id: String
    public var name: String
    public var dateSeconds: UInt32
    public var dateNanoseconds: UInt32
    public var vmClockNanoseconds: UInt64
    public var vmStateSize: UInt64
    public var diskSize: UInt64?
    var extra: [UInt8]

    /// Bytes this entry occupies in the table (8-aligned).
    var encodedSize: UInt64 { (40 + UInt64(extra.count) + UInt64(id.utf8.count) + UInt64(name.utf8.count)).alignedUp(8) }

    func encoded() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: Int(encodedSize))
        b.putBE64(l1TableOffset, at: 0)
        b.putBE32(l1Size, at: 8)
        b.putBE16(UInt16(id.utf8.count), at: 12)
        b.putBE16(UInt16(name.utf8.count), at: 14)
        b.putBE32(dateSeconds, at: 16)
        b.putBE32(dateNanoseconds, at: 20)
        b.putBE64(vmClockNanoseconds, at: 24)
        b.putBE32(UInt32(truncatingIfNeeded: min(vmStateSize, UInt64(UInt32.max))), at: 32)
        b.putBE32(UInt32(extra.count), at: 36)
        var e = extra
        if e.count >= 16 {
            e.putBE64(vmStateSize, at: 0)
            e.putBE64(diskSize ?? 0, at: 8)
        }
        b.putBytes(e, at: 40)
        b.putBytes(Array(id.utf8), at: 40 + e.count)
        b.putBytes(Array(name.utf8), at: 40 + e.count + id.utf8.count)
        return b
    }
}

extension QCOW2Layer {
    /// Parse the snapshot table, bounded by the file and by sane entry counts.
    func readSnapshotTable() throws -> [QCOW2Snapshot] {
        let count = Int(header.nbSnapshots)
        if count == 0 { return [] }
        let fileSize = try file.size()
        var out: [QCOW2Snapshot] = []
        var pos = header.snapshotsOffset
        for i in 0..<count {
            guard pos + 40 <= fileSize else { throw ImageError(.corrupt, "snapshot table entry \(i) lies past the end of the file", path: file.path) }
            let fixed = ByteReader(try file.read(at: pos, count: 40))
            let idLen = Int(fixed.be16(12)), nameLen = Int(fixed.be16(14))
            let extraLen = Int(fixed.be32(36))
            guard extraLen <= 1024 else { throw ImageError(.corrupt, "snapshot \(i) has \(extraLen) bytes of extra data (1024 at most)", path: file.path) }
            let rest = try file.read(at: pos + 40, count: extraLen + idLen + nameLen)
            let extra = Array(rest[0..<extraLen])
            let er = ByteReader(extra)
            var s = QCOW2Snapshot(
                l1TableOffset: fixed.be64(0), l1Size: fixed.be32(8),
                id: String(decoding: rest[extraLen..<(extraLen + idLen)], as: UTF8.self),
                name: String(decoding: rest[(extraLen + idLen)...], as: UTF8.self),
                dateSeconds: fixed.be32(16), dateNanoseconds: fixed.be32(20), vmClockNanoseconds: fixed.be64(24),
                vmStateSize: UInt64(fixed.be32(32)), diskSize: nil, extra: extra)
            if extraLen >= 8 { s.vmStateSize = er.be64(0) }
            if extraLen >= 16 { s.diskSize = er.be64(8) }
            guard s.l1TableOffset % clusterSize == 0, UInt64(s.l1Size) * 8 <= 32 << 20,
                  s.l1TableOffset + UInt64(s.l1Size) * 8 <= fileSize.alignedUp(clusterSize) else {
                throw ImageError(.corrupt, "snapshot '\(s.name)' has an invalid L1 table (\(s.l1Size) entries at \(s.l1TableOffset))", path: file.path)
            }
            out.append(s)
            pos += s.encodedSize
        }
        return out
    }

    func snapshotTableSize(_ snaps: [QCOW2Snapshot]) -> UInt64 {
        snaps.reduce(0) { $0 + $1.encodedSize }
    }

    public func snapshots() throws -> [QCOW2Snapshot] {
        try lock.run { try readSnapshotTable() }
    }
}
