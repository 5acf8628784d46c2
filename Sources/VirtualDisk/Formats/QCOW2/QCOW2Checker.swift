/// `check` for QCOW2: rebuild the expected refcount of every cluster from the metadata
/// (header, L1/L2 tables of the active state and every snapshot, refcount structures,
/// snapshot table, data and compressed clusters), compare with the stored refcounts,
/// verify copied flags, and optionally repair.
extension QCOW2Layer {
    func checkLocked(repair: CheckRepair) throws -> CheckReport {
        // Pending frees belong to the image's state: apply them first (read-only opens
        // have none).
        if writable { try releaseDeferredFreesLocked(); try flushLocked() }
        var report = CheckReport(format: "qcow2", path: file.path)
        let fileSize = try file.size()
        let fileClusters = fileSize.alignedUp(clusterSize) / clusterSize
        // Expected refcounts, saturating. Clusters past the end of the file are tracked
        // sparsely (they are errors anyway).
        var expected = [UInt16](repeating: 0, count: Int(min(fileClusters, 1 << 31)))
        var beyond: [UInt64: UInt64] = [:]
        func ref(_ offset: UInt64, _ length: UInt64, _ what: String, weight: Int = 1) {
            guard length > 0 else { return }
            guard offset <= UInt64.max - length, offset + length <= fileSize.alignedUp(clusterSize) + clusterSize << 20 else {
                report.corruptions.append("\(what) at \(offset) (\(length) bytes) lies far past the end of the file")
                return
            }
            let first = offset / clusterSize
            let last = (offset + length - 1) / clusterSize
            for c in first...last {
                if c < UInt64(expected.count) {
                    expected[Int(c)] = UInt16(min(Int(UInt16.max), Int(expected[Int(c)]) + weight))
                } else {
                    beyond[c, default: 0] += UInt64(weight)
                    if beyond.count <= 16 {
                        report.corruptions.append("\(what) at \(c * clusterSize) lies past the end of the file (\(fileSize) bytes)")
                    }
                }
            }
        }
        ref(0, clusterSize, "header")
        ref(header.refcountTableOffset, UInt64(header.refcountTableClusters) * clusterSize, "refcount table")
        for i in 0..<refcountTableEntries {
            let b = try tableEntry(header.refcountTableOffset, i) & ~(clusterSize - 1)
            if b != 0 { ref(b, clusterSize, "refcount block") }
        }
        // Active L1 and snapshot L1 tables.
        var l1Tables: [(offset: UInt64, size: UInt64, active: Bool)] = [(header.l1TableOffset, UInt64(header.l1Size), true)]
        if header.nbSnapshots > 0 {
            let snaps = try readSnapshotTable()
            ref(header.snapshotsOffset, snapshotTableSize(snaps), "snapshot table")
            for s in snaps { l1Tables.append((s.l1TableOffset, UInt64(s.l1Size), false)) }
        }
        // Each L2 table is counted once per L1 entry that reaches it, shared or not (a
        // snapshot holds one reference to each L2 table and data cluster it reaches),
        // but scanned once: a hostile L1 pointing everywhere at one table stays cheap.
        var l2Refs: [UInt64: Int] = [:]
        for t in l1Tables {
            ref(t.offset, t.size * 8, "L1 table")
            for i in 0..<t.size {
                let raw = try tableEntry(t.offset, i)
                let l2 = raw & L2Entry.offsetMask
                if l2 == 0 { continue }
                if l2 % clusterSize != 0 {
                    report.corruptions.append("L1 entry \(i) points to unaligned L2 table \(l2)")
                    continue
                }
                if l2 >= fileSize.alignedUp(clusterSize) {
                    report.corruptions.append("L1 entry \(i) points to L2 table \(l2) past the end of the file")
                    continue
                }
                l2Refs[l2, default: 0] += 1
            }
        }
        for (l2, weight) in l2Refs.sorted(by: { $0.key < $1.key }) {
            do {
                ref(l2, clusterSize, "L2 table", weight: weight)
                for j in 0..<header.l2Entries {
                    let e = try l2Entry(table: l2, index: j)
                    if e.isCompressed {
                        let (off, len) = compressedRange(e.raw)
                        ref(off, len, "compressed cluster", weight: weight)
                    } else if e.hostOffset != 0 && !externalData {
                        if e.hostOffset % clusterSize != 0 {
                            report.corruptions.append("L2 entry at \(l2 + j * header.l2EntrySize) points to unaligned cluster \(e.hostOffset)")
                            continue
                        }
                        ref(e.hostOffset, clusterSize, "data cluster", weight: weight)
                    }
                    if header.extendedL2 && e.bitmap & (e.bitmap >> 32) & 0xffff_ffff != 0 {
                        report.corruptions.append("L2 entry at \(l2 + j * header.l2EntrySize) marks subclusters both allocated and zero")
                    }
                }
            }
        }
        // Compare with the stored refcounts.
        var fixes: [(UInt64, UInt64)] = []
        let limit = max(UInt64(expected.count), fileClusters)
        for c in 0..<limit {
            let want = c < UInt64(expected.count) ? UInt64(expected[Int(c)]) : 0
            let have = try refcount(cluster: c)
            if have == want { continue }
            if have < want {
                report.corruptions.append("cluster \(c): refcount \(have) but \(want) references")
            } else {
                report.leaks += 1
                if report.leakDetails.count < 16 { report.leakDetails.append("cluster \(c): refcount \(have) but \(want) references") }
            }
            fixes.append((c, want))
        }
        // Copied flags in the active tables must say "refcount is exactly 1".
        var flagFixes: [(table: UInt64, index: UInt64, value: UInt64, rank: Int)] = []
        var flagScanned: Set<UInt64> = []
        for i in 0..<UInt64(header.l1Size) {
            let raw = try tableEntry(header.l1TableOffset, i)
            let l2 = raw & L2Entry.offsetMask
            guard l2 != 0, l2 % clusterSize == 0 else { continue }
            let rc = l2 / clusterSize < UInt64(expected.count) ? UInt64(expected[Int(l2 / clusterSize)]) : 0
            let want = rc == 1 ? raw | L2Entry.copied : raw & ~L2Entry.copied
            if want != raw {
                report.corruptions.append("L1 entry \(i): copied flag \(raw & L2Entry.copied != 0) but refcount \(rc)")
                flagFixes.append((header.l1TableOffset, i, want, Self.rankL1))
            }
            guard l2 < fileSize.alignedUp(clusterSize), flagScanned.insert(l2).inserted else { continue }
            for j in 0..<header.l2Entries {
                let idx = header.extendedL2 ? j * 2 : j
                let e = try tableEntry(l2, idx)
                if e & L2Entry.compressed != 0 || externalData { continue }
                let host = e & L2Entry.offsetMask
                guard host != 0, host % clusterSize == 0 else { continue }
                let drc = host / clusterSize < UInt64(expected.count) ? UInt64(expected[Int(host / clusterSize)]) : 0
                let wantE = drc == 1 ? e | L2Entry.copied : e & ~L2Entry.copied
                if wantE != e {
                    report.corruptions.append("L2 entry for cluster at \(host): copied flag \(e & L2Entry.copied != 0) but refcount \(drc)")
                    flagFixes.append((l2, idx, wantE, Self.rankL2))
                }
            }
        }
        report.imageEndOffset = fileSize
        report.allocatedClusters = UInt64(expected.lazy.filter { $0 > 0 }.count)
        report.totalClusters = header.size.alignedUp(clusterSize) / clusterSize

        let fixLeaks = repair != .none
        let fixAll = repair == .all
        if fixLeaks || fixAll {
            var fixedLeaks = 0, fixedCorruptions = 0
            for (c, want) in fixes {
                let have = try refcount(cluster: c)
                if have > want && fixLeaks {
                    try setRefcount(cluster: c, want)
                    if want == 0 { forgetClusters(at: c * clusterSize); file.punchHole(at: c * clusterSize, length: clusterSize) }
                    fixedLeaks += 1
                } else if have < want && fixAll {
                    try setRefcount(cluster: c, min(want, maxRefcount))
                    fixedCorruptions += 1
                }
            }
            if fixAll {
                for f in flagFixes { try setTableEntry(f.table, f.index, f.value, rank: f.rank); fixedCorruptions += 1 }
            }
            try flushLocked()
            report.repairedLeaks = fixedLeaks
            report.repairedCorruptions = fixedCorruptions
            if fixedCorruptions > 0 && fixedCorruptions >= report.corruptions.count && header.isCorrupt {
                header.incompatibleFeatures &= ~QCOW2Header.incompatCorrupt
                try writeHeaderFields()
            }
        }
        return report
    }

    public func check(repair: CheckRepair) throws -> CheckReport {
        try allocLock.run { try lock.run { try checkLocked(repair: repair) } }
    }
}
