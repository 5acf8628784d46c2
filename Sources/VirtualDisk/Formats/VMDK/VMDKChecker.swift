/// `check` for VMDK, per sparse extent (flat and zero extents have no metadata):
///
/// - every grain directory entry names a grain table inside the file;
/// - the redundant directory and its tables match the primary ones (hosted extents);
/// - every grain table entry names a grain inside the file, after the metadata area
///   (the header's overhead); compressed grains start with a marker naming their own
///   sector and a plausible size;
/// - hosted extents with grains stored plainly: no grain overlaps another grain, a
///   grain table, a directory, the descriptor or the header; and leaks, runs of the
///   file past the overhead that no table references and that still hold data (a crash
///   between writing a grain and the table entry that exposes it leaves one).
///
/// Overlaps are found with a bitmap of the file's sectors built one window of
/// `windowSectors` at a time (16 MiB of bitmap for 64 GiB of file), re-reading the
/// tables for each window, so memory stays bounded whatever the file's size.
///
/// Repairs: `-r leaks` gives leaked space back (the file shrinks when the leak is at its
/// end, holes are punched elsewhere); `-r all` also makes the redundant directory and
/// tables copies of the primary ones, which are what every reader uses (a redundant
/// table that differs gets a fresh copy at the end of the file). Grains past the end
/// of the file or overlapping others are reported, not repaired: which data is right
/// cannot be known.
extension VMDKLayer: CheckableLayer {
    public func check(repair: CheckRepair) throws -> CheckReport {
        var report = CheckReport(format: "vmdk", path: file.path)
        let named = extents.count > 1
        for p in extents {
            guard let sparse = p.store as? VMDKSparseExtent else { continue }
            let r = try sparse.check(repair: repair)
            let prefix = named ? "\(sparse.sparseFile.path): " : ""
            report.corruptions += r.corruptions.map { prefix + $0 }
            report.leakDetails += r.leakDetails.map { prefix + $0 }
            report.leaks += r.leaks
            report.repairedLeaks += r.repairedLeaks
            report.repairedCorruptions += r.repairedCorruptions
            report.allocatedClusters += r.allocatedClusters
            report.totalClusters += r.totalClusters
            report.imageEndOffset = max(report.imageEndOffset, r.imageEndOffset)
            report.incomplete = report.incomplete ?? r.incomplete
        }
        if report.imageEndOffset == 0 { report.imageEndOffset = try file.size() }
        return report
    }
}

extension VMDKSparseExtent {
    /// Sectors one pass of the overlap check covers (a 16 MiB bitmap).
    static let windowSectors: UInt64 = 1 << 27
    /// Problems listed one by one; past this many they are counted in one line.
    static let listedProblems = 1000

    /// `window`: sectors per pass of the overlap check (smaller in tests).
    func check(repair: CheckRepair, window: UInt64 = windowSectors) throws -> CheckReport {
        try allocLock.run { try lock.run { try checkLocked(repair: repair, window: window) } }
    }

    private struct Problems {
        var report: CheckReport
        var repaired = 0
        var unlisted = 0
        var unlistedUnrepaired = 0

        mutating func add(_ message: @autoclosure () -> String, repaired fixed: Bool = false) {
            if report.corruptions.count < VMDKSparseExtent.listedProblems {
                report.corruptions.append(message())
                if fixed { repaired += 1 }
            } else {
                unlisted += 1
                if !fixed { unlistedUnrepaired += 1 }
            }
        }

        mutating func finish() -> CheckReport {
            if unlisted > 0 {
                report.corruptions.append("\(unlisted) more problems like those above")
                if unlistedUnrepaired == 0 { repaired += 1 }
            }
            report.repairedCorruptions = repaired
            return report
        }
    }

    func checkLocked(repair: CheckRepair, window: UInt64) throws -> CheckReport {
        let f = sparseFile
        let fixAll = repair == .all && canWrite
        let fixLeaks = repair != .none && canWrite
        if canWrite { try flushLocked() }
        var problems = Problems(report: CheckReport(format: "vmdk", path: f.path))
        problems.report.totalClusters = (capacity + grainBytes - 1) / grainBytes

        if kind == .hosted && !streamLayout && rgdOffset != nil {
            try checkRedundantDirectory(&problems, fix: fixAll)
            if fixAll { try flushLocked() }
        }

        let fileSize = try f.size()
        let fileSectors = (fileSize + 511) / 512
        // Overlaps and leaks: hosted extents with plainly stored grains, where grains
        // have a fixed size and the tables stay in place.
        let track = kind == .hosted && !compressed && !streamLayout
        let overheadEnd = (header?.overHead ?? 0) * 512
        var bits = [UInt64](repeating: 0, count: track ? Int((min(window, max(fileSectors, 1)) + 63) / 64) : 0)
        var windowStart: UInt64 = 0
        var allocated: UInt64 = 0
        var sweep = LeakSweep(file: f, unit: grainBytes, unitName: "grain", unreferenced: "referenced by no grain table", end: fileSize, repair: fixLeaks)
        /// A run of the file (bytes) that nothing references, still open at the end of
        /// a window: it may go on in the next.
        var gap: (start: UInt64, end: UInt64)?
        /// Structures reported as overlapping, by offset (bounded; for straddlers).
        var reported: Set<UInt64> = []
        func closeGap() {
            guard let (s, e) = gap else { return }
            gap = nil
            sweep.run(s, e, into: &problems.report)
        }
        repeat {
            let first = windowStart == 0
            let windowEnd = min(fileSectors, windowStart + window)
            if !first { for k in bits.indices { bits[k] = 0 } }
            /// Mark the sectors of `at ..< at+bytes` inside this window; a sector already
            /// marked means two structures share it.
            func mark(_ at: UInt64, _ bytes: UInt64, _ what: @autoclosure () -> String) {
                guard track, bytes > 0, at < fileSize else { return }
                let end = min(fileSize, bytes > fileSize - at ? fileSize : at + bytes)
                let lo = max(at / 512, windowStart), hi = min((end + 511) / 512, windowEnd)
                guard lo < hi else { return }
                var shared = false
                for s in lo..<hi {
                    let k = s - windowStart
                    let bit: UInt64 = 1 << (k & 63)
                    if bits[Int(k >> 6)] & bit != 0 { shared = true }
                    bits[Int(k >> 6)] |= bit
                }
                // Once per structure, though it may straddle windows.
                if shared && !(windowStart > at / 512 && reported.contains(at)) {
                    problems.add("\(what()) overlaps another grain or table")
                    if reported.count < 1 << 16 { reported.insert(at) }
                }
            }
            if let h = header, track {
                mark(0, 512, "the header")
                let (at, o1) = h.descriptorOffset.multipliedReportingOverflow(by: 512)
                let (size, o2) = h.descriptorSize.multipliedReportingOverflow(by: 512)
                if h.descriptorOffset > 0 && !o1 && !o2 { mark(at, size, "the embedded descriptor") }
                mark(gdOffset, gdBytes, "the grain directory")
                if let r = rgdOffset { mark(r, gdBytes, "the redundant grain directory") }
            }
            for i in 0..<gdEntries {
                if rgdOffset != nil, let r = try? gtLocation(i, redundant: true) {
                    mark(r, gtBytes, "redundant grain table \(i) at offset \(r)")
                }
                let at: UInt64?
                do {
                    at = try gtLocation(i)
                } catch let e as ImageError {
                    if first { problems.add(e.message) }
                    continue
                }
                guard let at else { continue }
                mark(at, gtBytes, "grain table \(i) at offset \(at)")
                let table = try withGT(i) { $0.bytes }
                for k in 0..<gtEntries {
                    let g = i * gtEntries + k
                    if g * grainBytes >= capacity { break }
                    if kind != .hosted {
                        // Read-only ESX formats: the mapping itself validates each entry.
                        guard first else { continue }
                        do {
                            switch try grain(g) {
                            case .data, .compressed: allocated += 1
                            case .zero, .unallocated: break
                            }
                        } catch let e as ImageError {
                            problems.add(e.message)
                        }
                        continue
                    }
                    let e = entry(table, Int(k * entrySize))
                    if e == 0 || (e == 1 && zeroedGTE) { continue }
                    let host = e * 512
                    let guest = g * grainBytes
                    if compressed {
                        if first {
                            allocated += 1
                            try checkMarker(host, grain: g, fileSize: fileSize, &problems)
                        }
                        continue
                    }
                    let stored = min(grainBytes, capacity - guest)
                    if host + stored > fileSize {
                        if first {
                            problems.add("grain \(g) (guest offset \(guest)) at offset \(host) lies past the end of the file (\(fileSize) bytes)")
                        }
                        continue
                    }
                    if first {
                        allocated += 1
                        if host < overheadEnd {
                            problems.add("grain \(g) (guest offset \(guest)) at offset \(host) lies in the metadata area, before the first grain at \(overheadEnd)")
                        }
                    }
                    mark(host, min(grainBytes, fileSize - host), "grain \(g) (guest offset \(guest)) at offset \(host)")
                }
            }
            if track {
                // Unmarked runs past the overhead, in this window.
                var s = max(windowStart, overheadEnd / 512)
                while s < windowEnd {
                    let k = s - windowStart
                    if bits[Int(k >> 6)] & (1 << (k & 63)) != 0 { s += 1; continue }
                    let start = s
                    while s < windowEnd, bits[Int((s - windowStart) >> 6)] & (1 << ((s - windowStart) & 63)) == 0 { s += 1 }
                    if let g = gap, g.end == start * 512 {
                        gap!.end = min(fileSize, s * 512)
                    } else {
                        closeGap()
                        gap = (start * 512, min(fileSize, s * 512))
                    }
                    if s < windowEnd { closeGap() }
                }
            }
            windowStart = windowEnd
        } while windowStart < fileSectors && track
        closeGap()
        problems.report.allocatedClusters = allocated
        if let s = sweep.tail {
            try f.truncate(to: s)
            dataEnd = max(s, overheadEnd)
            fileLength = s
        }
        if fixLeaks { try f.sync() }
        problems.report.repairedLeaks = sweep.repaired
        problems.report.imageEndOffset = try f.size()
        return problems.finish()
    }

    /// A compressed grain starts with a marker: its own sector number and the size of
    /// the deflated data that follows.
    private func checkMarker(_ host: UInt64, grain g: UInt64, fileSize: UInt64, _ problems: inout Problems) throws {
        let guest = g * grainBytes
        guard host + (markers ? 12 : 1) <= fileSize else {
            problems.add("compressed grain \(g) (guest offset \(guest)) at offset \(host) lies past the end of the file (\(fileSize) bytes)")
            return
        }
        guard markers else { return }
        let m = ByteReader(try sparseFile.read(at: host, count: 12))
        let lba = m.le64(0), size = UInt64(m.le32(8))
        if lba != guest / 512 {
            problems.add("compressed grain \(g) at offset \(host) is marked as sector \(lba), not \(guest / 512): the grain table points at another grain")
        } else if size == 0 || size > grainBytes * 2 + 512 || host + 12 + size > fileSize {
            problems.add("compressed grain \(g) at offset \(host) has an invalid size (\(size) bytes)")
        }
    }

    /// The redundant directory and its tables must say what the primary ones say.
    /// A redundant table that differs is never rewritten where it lies (a damaged or
    /// hostile directory entry may point into a grain or another table): repair writes
    /// a fresh copy at the end of the file and points the redundant entry at it; the old
    /// space is then unreferenced, and given back as a leak where nothing else uses it.
    private func checkRedundantDirectory(_ problems: inout Problems, fix: Bool) throws {
        let f = sparseFile
        /// A fresh redundant copy of table `i` at the end; the write-back fills it.
        func recopy(_ i: UInt64) throws {
            let copy = try reserveLocked(gtBytes.alignedUp(512))
            try setGDEntry(i, copy / 512, redundant: true)
            try withGT(i) { cache.markDirty($0, rank: Self.rankGT) }
        }
        for i in 0..<gdEntries {
            let primary = try gdEntry(i), redundant = try gdEntry(i, redundant: true)
            let p: UInt64?, r: UInt64?
            do { p = try gtLocation(i) } catch { continue }  // reported by the main pass
            do {
                r = try gtLocation(i, redundant: true)
            } catch let e as ImageError {
                if fix { if p != nil { try recopy(i) } else { try setGDEntry(i, primary, redundant: true) } }
                problems.add("redundant \(e.message)", repaired: fix)
                continue
            }
            switch (p, r) {
            case (nil, nil):
                if primary != redundant {
                    if fix { try setGDEntry(i, primary, redundant: true) }
                    problems.add("grain directory entry \(i) is \(primary), its redundant copy \(redundant)", repaired: fix)
                }
            case (nil, .some):
                if fix { try setGDEntry(i, primary, redundant: true) }
                problems.add("grain directory entry \(i) has no grain table, its redundant copy has one", repaired: fix)
            case (.some, nil):
                if fix { try recopy(i) }
                problems.add("grain table \(i) has no redundant copy", repaired: fix)
            case let (.some, .some(at)):
                let mine = try withGT(i) { $0.bytes }
                if try f.read(at: at, count: Int(gtBytes)) != mine {
                    if fix { try recopy(i) }
                    problems.add("grain table \(i) differs from its redundant copy at offset \(at)", repaired: fix)
                }
            }
        }
    }
}
