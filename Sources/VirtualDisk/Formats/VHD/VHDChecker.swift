/// `check` for VHD: the footer at the end and its copy at 0, every BAT entry (inside the
/// data, clear of the metadata and of every other block), locator data inside the file,
/// and leaked space (block-sized runs of the file no structure references that still
/// hold data, as a torn allocation or a shrink leaves them).
///
/// Repairs: `-r leaks` gives leaked space back (the file shrinks when it is at the end,
/// holes are punched elsewhere); `-r all` also rewrites a damaged footer from the good
/// copy and unmaps BAT entries that point past the data. Overlapping blocks are reported,
/// not repaired: which of two blocks holds the right data cannot be known. A damaged
/// dynamic header (it has no copy) stops the open itself, with its checksums named.
extension VHDLayer: CheckableLayer {
    public func check(repair: CheckRepair) throws -> CheckReport {
        try allocLock.run { try lock.run { try checkLocked(repair: repair) } }
    }

    func checkLocked(repair: CheckRepair) throws -> CheckReport {
        var report = CheckReport(format: "vhd", path: file.path)
        let fixAll = repair == .all
        let fixLeaks = repair != .none
        var fixedCorruptions = 0
        var fixedLeaks = 0
        let fileSize = try file.size()
        let good = footer.serialized()

        // Footers.
        let tailBytes = fileSize >= 512 ? try file.read(at: fileSize - 512, count: 512) : []
        let tail = VHDFooter.parse(tailBytes)
        var endFooterBad = false
        if tail == nil {
            report.corruptions.append("no footer at the end of the file")
            endFooterBad = true
        } else if !tail!.checksumIsValid {
            report.corruptions.append("footer at the end of the file: checksum mismatch (stored 0x\(vhdHex(tail!.storedChecksum)), computed 0x\(vhdHex(tail!.computedChecksum)))")
            endFooterBad = true
        } else if tailBytes != good {
            report.corruptions.append("footer at the end of the file differs from the footer in use")
            endFooterBad = true
        }
        var headCopyBad = false
        if type != .fixed, try file.read(at: 0, count: 512) != good {
            report.corruptions.append("footer copy at offset 0 differs from the footer at the end of the file")
            headCopyBad = true
        }
        if fixAll && (endFooterBad || headCopyBad) {
            try writeFootersLocked()
            fixedCorruptions += (endFooterBad ? 1 : 0) + (headCopyBad ? 1 : 0)
        }

        guard type != .fixed, let h = header else {
            report.imageEndOffset = fileSize
            if fixAll { try file.sync() }
            return finish(report, fixedCorruptions, fixedLeaks)
        }

        // Metadata ranges: footer copy, header, BAT, locator data.
        var used: [(start: UInt64, end: UInt64, what: String)] = [
            (0, 512, "footer copy"),
            (footer.dataOffset, footer.dataOffset + UInt64(VHDDynamicHeader.size), "dynamic header"),
            (h.batOffset, h.batOffset + batBytes, "BAT"),
        ]
        if type == .differencing {
            for (n, l) in h.locators.enumerated() where !l.isEmpty {
                let (end, o) = l.dataOffset.addingReportingOverflow(UInt64(l.dataLength))
                if o || end > fileSize {
                    report.corruptions.append("parent locator \(n) (\(l.code)) data at \(l.dataOffset)+\(l.dataLength) lies past the end of the file")
                } else {
                    used.append((l.dataOffset, end, "parent locator \(n)"))
                }
            }
        }

        // Blocks.
        let span = bitmapSize + blockSize
        let entries = UInt64(h.maxTableEntries)
        let maxBlocks = fileSize / span + 1
        var blocks: [(start: UInt64, index: UInt64)] = []
        var pastEnd: [UInt64] = []
        var tooMany = false
        for i in 0..<entries {
            let e = try batEntry(i)
            if e == Self.unallocated { continue }
            let start = UInt64(e) * 512
            let end = start + span
            if end > dataEnd {
                report.corruptions.append("BAT entry \(i): block at \(start)..\(end) lies past the end of the data (\(dataEnd))")
                pastEnd.append(i)
                continue
            }
            if let m = used.first(where: { start < $0.end && $0.start < end }) {
                report.corruptions.append("BAT entry \(i): block at \(start) overlaps the \(m.what)")
                continue
            }
            if UInt64(blocks.count) >= maxBlocks {
                tooMany = true
                continue
            }
            blocks.append((start, i))
        }
        if tooMany {
            report.corruptions.append("more blocks are allocated than the file can hold: blocks overlap")
        }
        blocks.sort { $0.start < $1.start }
        for k in blocks.indices.dropFirst() where blocks[k - 1].start + span > blocks[k].start {
            report.corruptions.append("blocks of BAT entries \(blocks[k - 1].index) and \(blocks[k].index) overlap at \(blocks[k].start)")
        }
        report.allocatedClusters = UInt64(blocks.count)
        report.totalClusters = (virtualSize + blockSize - 1) / blockSize
        if fixAll {
            for i in pastEnd {
                try setBATEntry(i, Self.unallocated)
                fixedCorruptions += 1
            }
        }

        // Leaks: unreferenced runs of at least one block that still hold data.
        var covered = used.map { ($0.start, $0.end) } + blocks.map { ($0.start, $0.start + span) }
        covered.sort { $0.0 < $1.0 }
        var gaps: [(UInt64, UInt64)] = []
        var cursor: UInt64 = 0
        for (s, e) in covered {
            if s > cursor { gaps.append((cursor, min(s, dataEnd))) }
            cursor = max(cursor, e)
        }
        if cursor < dataEnd { gaps.append((cursor, dataEnd)) }
        var sweep = LeakSweep(file: file, unit: span, unitName: "block", unreferenced: "not referenced by the BAT", end: dataEnd, repair: fixLeaks)
        for (s, e) in gaps { sweep.run(s, e, into: &report) }
        fixedLeaks = sweep.repaired
        if fixAll || fixLeaks { try flushLocked() }
        if let s = sweep.tail {
            // The file ends after the last structure: the footer moves back.
            dataEnd = s.alignedUp(512)
            try writeFootersLocked()
            try file.truncate(to: dataEnd + 512)
            fileLength = dataEnd + 512
            try file.sync()
        }
        report.imageEndOffset = try file.size()
        return finish(report, fixedCorruptions, fixedLeaks)
    }

    private func finish(_ r: CheckReport, _ corruptions: Int, _ leaks: Int) -> CheckReport {
        var r = r
        r.repairedCorruptions = corruptions
        r.repairedLeaks = leaks
        return r
    }
}
