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

/// Creating, applying and deleting snapshots. Reference counting follows qemu: a
/// snapshot holds one reference on every L2 table and every data cluster its L1 table
/// reaches; the active tables' copied flags say "refcount is exactly 1".
extension QCOW2Layer {
    /// Add `delta` to the refcount of every L2 table and data cluster a tree reaches.
    func adjustTree(l1: UInt64, size: UInt64, by delta: Int64) throws {
        func bump(_ c: UInt64) throws {
            let rc = try refcount(cluster: c)
            let new = Int64(rc) + delta
            if new < 0 { throw ImageError(.corrupt, "refcount of cluster \(c) would go below zero; run 'vloop check -r all'", path: file.path) }
            try setRefcount(cluster: c, UInt64(new))
            if new == 0 { forgetClusters(at: c * clusterSize); file.punchHole(at: c * clusterSize, length: clusterSize) }
        }
        for i in 0..<size {
            let l2 = try tableEntry(l1, i) & L2Entry.offsetMask
            if l2 == 0 { continue }
            for j in 0..<header.l2Entries {
                let e = try l2Entry(table: l2, index: j)
                if e.isCompressed {
                    let (off, len) = compressedRange(e.raw)
                    for c in (off / clusterSize)...((off + len - 1) / clusterSize) { try bump(c) }
                } else if e.hostOffset != 0 && !externalData {
                    try bump(e.hostOffset / clusterSize)
                }
            }
            try bump(l2 / clusterSize)
        }
    }

    /// Make the active tables' copied flags match the refcounts.
    func refreshCopiedFlags() throws {
        for i in 0..<UInt64(header.l1Size) {
            let raw = try tableEntry(header.l1TableOffset, i)
            let l2 = raw & L2Entry.offsetMask
            if l2 == 0 { continue }
            let l2rc = try refcount(cluster: l2 / clusterSize)
            let want = l2rc == 1 ? raw | L2Entry.copied : raw & ~L2Entry.copied
            if want != raw { try setTableEntry(header.l1TableOffset, i, want, rank: Self.rankL1) }
            for j in 0..<header.l2Entries {
                let idx = header.extendedL2 ? j * 2 : j
                let e = try tableEntry(l2, idx)
                if e & L2Entry.compressed != 0 || externalData { continue }
                let host = e & L2Entry.offsetMask
                if host == 0 { continue }
                let rc = try refcount(cluster: host / clusterSize)
                let w = rc == 1 ? e | L2Entry.copied : e & ~L2Entry.copied
                if w != e { try setTableEntry(l2, idx, w, rank: Self.rankL2) }
            }
        }
    }

    /// Write a new snapshot table, point the header at it, and free the old one.
    private func replaceSnapshotTable(_ snaps: [QCOW2Snapshot]) throws {
        let oldOffset = header.snapshotsOffset
        let oldSize = snapshotTableSize(try readSnapshotTable())
        var bytes: [UInt8] = []
        for s in snaps { bytes += s.encoded() }
        var newOffset: UInt64 = 0
        if !bytes.isEmpty {
            newOffset = try allocateContiguous(UInt64(bytes.count).alignedUp(clusterSize) / clusterSize)
            try file.write(bytes, at: newOffset)
        }
        try flushLocked()
        header.snapshotsOffset = newOffset
        header.nbSnapshots = UInt32(snaps.count)
        try writeHeaderFields()
        try file.sync()
        if oldSize > 0 && oldOffset != 0 { try freeRange(oldOffset, oldSize) }
    }

    private func findSnapshot(_ snaps: [QCOW2Snapshot], _ name: String) throws -> Int {
        if let i = snaps.firstIndex(where: { $0.name == name }) ?? snaps.firstIndex(where: { $0.id == name }) { return i }
        throw ImageError(.notFound, "no snapshot named '\(name)'; list them with 'vloop snapshot -l \(file.path)'", path: file.path)
    }

    public func createSnapshot(name: String, now: UInt32 = UInt32(truncatingIfNeeded: Int(time(nil)))) throws {
        guard writable else { throw ImageError(.readOnly, "image is open read-only", path: file.path) }
        try allocLock.run {
            try lock.run {
                try releaseDeferredFreesLocked()
                try flushLocked()
                var snaps = try readSnapshotTable()
                if snaps.contains(where: { $0.name == name }) {
                    throw ImageError(.invalidArgument, "a snapshot named '\(name)' exists already", path: file.path)
                }
                guard !name.isEmpty, name.utf8.count < 65536 else { throw ImageError(.invalidArgument, "invalid snapshot name") }
                // Copy the active L1 table.
                let l1Bytes = UInt64(header.l1Size) * 8
                let copy = try allocateContiguous(max(1, l1Bytes.alignedUp(clusterSize) / clusterSize))
                var l1 = [UInt8](repeating: 0, count: Int(l1Bytes))
                for i in 0..<UInt64(header.l1Size) {
                    l1.putBE64(try tableEntry(header.l1TableOffset, i) & ~L2Entry.copied, at: Int(i * 8))
                }
                try file.write(l1, at: copy)
                try adjustTree(l1: header.l1TableOffset, size: UInt64(header.l1Size), by: 1)
                try refreshCopiedFlags()
                let nextID = (snaps.compactMap { UInt64($0.id) }.max() ?? 0) + 1
                var extra = [UInt8](repeating: 0, count: 24)
                extra.putBE64(UInt64.max, at: 16)  // icount: -1, record/replay not used
                let s = QCOW2Snapshot(l1TableOffset: copy, l1Size: header.l1Size, id: String(nextID), name: name,
                                      dateSeconds: now, dateNanoseconds: 0, vmClockNanoseconds: 0, vmStateSize: 0,
                                      diskSize: header.size, extra: extra)
                snaps.append(s)
                try replaceSnapshotTable(snaps)
                try flushLocked()
            }
        }
    }

    public func applySnapshot(name: String) throws {
        guard writable else { throw ImageError(.readOnly, "image is open read-only", path: file.path) }
        try allocLock.run {
            try lock.run {
                try releaseDeferredFreesLocked()
                try flushLocked()
                let snaps = try readSnapshotTable()
                let s = snaps[try findSnapshot(snaps, name)]
                guard UInt64(s.l1Size) <= UInt64(header.l1Size) else {
                    throw ImageError(.unsupported, "snapshot '\(name)' has a larger L1 table than the image; resize the image first", path: file.path)
                }
                try adjustTree(l1: s.l1TableOffset, size: UInt64(s.l1Size), by: 1)
                let oldEntries = try (0..<UInt64(header.l1Size)).map { try tableEntry(header.l1TableOffset, $0) }
                for i in 0..<UInt64(header.l1Size) {
                    let v = i < UInt64(s.l1Size) ? try tableEntry(s.l1TableOffset, i) & ~L2Entry.copied : 0
                    try setTableEntry(header.l1TableOffset, i, v, rank: Self.rankL1)
                }
                // Drop the old active tree's references (its L1 entries, saved above).
                try flushLocked()
                let scratch = try allocateContiguous(max(1, (UInt64(oldEntries.count) * 8).alignedUp(clusterSize) / clusterSize))
                var old = [UInt8](repeating: 0, count: oldEntries.count * 8)
                for (i, e) in oldEntries.enumerated() { old.putBE64(e, at: i * 8) }
                try file.write(old, at: scratch)
                try adjustTree(l1: scratch, size: UInt64(oldEntries.count), by: -1)
                try freeRange(scratch, UInt64(old.count))
                if let size = s.diskSize, size != 0 { header.size = size; try writeHeaderFields() }
                try refreshCopiedFlags()
                try flushLocked()
            }
        }
    }

    public func deleteSnapshot(name: String) throws {
        guard writable else { throw ImageError(.readOnly, "image is open read-only", path: file.path) }
        try allocLock.run {
            try lock.run {
                try releaseDeferredFreesLocked()
                try flushLocked()
                var snaps = try readSnapshotTable()
                let s = snaps.remove(at: try findSnapshot(snaps, name))
                try replaceSnapshotTable(snaps)
                try adjustTree(l1: s.l1TableOffset, size: UInt64(s.l1Size), by: -1)
                try freeRange(s.l1TableOffset, UInt64(s.l1Size) * 8)
                try refreshCopiedFlags()
                try flushLocked()
            }
        }
    }

    func releaseDeferredFreesLocked() throws {
        // No I/O is in flight: these may now be freed once the tables are on disk.
        pendingDecrements += deferredFrees
        deferredFrees = []
    }
}

#if canImport(Glibc)
import Glibc
#endif
