/// `check` for VHDX: both headers and both region tables (signature, CRC-32C, equal
/// content), the log (a read-only open that had to replay it in memory reports it), and
/// every BAT entry: a known state valid for the disk type, blocks and sector bitmaps
/// inside the file, clear of the header section, log, BAT and metadata, and of each other.
///
/// Repairs (`-r all`): a read-write open has already replayed a dirty log (counted as
/// repaired); a damaged header or region table copy is rewritten from the good one;
/// BAT entries pointing outside the file or over metadata become NOT_PRESENT (the block
/// reads as zeroes, or the parent's data). Overlapping blocks are reported, not repaired.
extension VHDXLayer: CheckableLayer {
    public func check(repair: CheckRepair) throws -> CheckReport {
        try allocLock.run { try lock.run { try checkLocked(repair: repair) } }
    }

    func checkLocked(repair: CheckRepair) throws -> CheckReport {
        var report = CheckReport(format: "vhdx", path: file.path)
        let fixAll = repair == .all && writable
        var fixed = 0
        let size = max(try file.size(), fileLength)

        if replayedAtOpen {
            if writable {
                report.corruptions.append("the log held updates not yet applied; they were replayed when the image was opened")
                fixed += 1
            } else {
                report.corruptions.append("the log holds updates not yet applied (shown replayed in memory); run 'vloop check -r all \(file.path)' to replay it")
            }
        }

        // Headers.
        var badHeaders: [Int] = []
        for (k, at) in VHDXHeader.offsets.enumerated() {
            let h = VHDXHeader.parse(try file.read(at: at, count: VHDXHeader.size))
            let problem: String? = h == nil ? "no \"head\" signature" : h!.problem(fileSize: size)
            if let problem {
                report.corruptions.append("header \(k + 1) at \(at): \(problem)")
                badHeaders.append(k)
            }
        }
        if fixAll && !badHeaders.isEmpty {
            try writeHeadersLocked(header)
            fixed += badHeaders.count
        }

        // Region tables.
        let good = regions.serialized()
        for (k, at) in VHDXRegionTable.offsets.enumerated() {
            let bytes = try readFile(at: at, count: VHDXRegionTable.size)
            var problem: String?
            do {
                let t = try VHDXRegionTable.parse(bytes, fileSize: size)
                if t != regions { problem = "differs from the region table in use" }
            } catch let e as ImageError {
                problem = e.message
            }
            if let problem {
                report.corruptions.append("region table \(k + 1) at \(at): \(problem)")
                if fixAll && overlay == nil {
                    try commitThroughLogLocked([(at, good)])
                    fixed += 1
                }
            }
        }

        // BAT.
        let used = metadataRanges
        let differencing = type == .differencing
        let blocks = payloadBlocks
        let chunks = (blocks + chunkRatio - 1) / chunkRatio
        let maxRanges = size / Self.mib + 2
        var ranges: [(start: UInt64, end: UInt64, what: String)] = []
        var tooMany = false
        var unmap: [UInt64] = []
        func place(_ index: UInt64, _ start: UInt64, _ length: UInt64, _ what: String) -> Bool {
            let end = start + length
            if start < Self.mib || start % Self.mib != 0 || end > max(size, dataEnd) {
                report.corruptions.append("\(what) at \(start)+\(length) lies outside the file (\(size) bytes) or the header section")
                return false
            }
            if let m = used.first(where: { start < $0.1 && $0.0 < end }) {
                report.corruptions.append("\(what) at \(start) overlaps the \(m.2)")
                return false
            }
            if UInt64(ranges.count) >= maxRanges { tooMany = true; return true }
            ranges.append((start, end, what))
            return true
        }
        var allocated: UInt64 = 0
        for i in 0..<blocks {
            let index = payloadEntryIndex(i)
            let e = try batEntry(index)
            let s = Self.state(e)
            switch s {
            case Self.notPresent, Self.undefined, Self.zero, Self.unmapped, Self.unmappedV095:
                continue
            case Self.fullyPresent, Self.partiallyPresent:
                if s == Self.partiallyPresent && !differencing {
                    report.corruptions.append("block \(i): partially present in a disk that is not differencing")
                    if fixAll { unmap.append(index) }
                    continue
                }
                if place(index, Self.offset(e), blockExtent(i), "block \(i)") {
                    allocated += 1
                } else if fixAll {
                    unmap.append(index)
                }
            default:
                report.corruptions.append("block \(i): reserved state \(s)")
                if fixAll { unmap.append(index) }
            }
        }
        for c in 0..<chunks {
            let index = bitmapEntryIndex(chunk: c)
            guard index * 8 + 8 <= batLength else { break }
            let e = try batEntry(index)
            switch Self.state(e) {
            case Self.notPresent:
                if differencing {
                    // Partially present blocks need their chunk's bitmap.
                    for i in (c * chunkRatio)..<min(blocks, (c + 1) * chunkRatio)
                    where Self.state(try batEntry(payloadEntryIndex(i))) == Self.partiallyPresent {
                        report.corruptions.append("block \(i) is partially present, but chunk \(c) has no sector bitmap")
                        break
                    }
                }
            case Self.sbPresent:
                if !differencing {
                    report.corruptions.append("chunk \(c): a sector bitmap in a disk that is not differencing")
                    continue
                }
                if !place(index, Self.offset(e), Self.sectorBitmapBlockSize, "sector bitmap of chunk \(c)") && fixAll {
                    unmap.append(index)
                }
            default:
                report.corruptions.append("chunk \(c): sector bitmap entry in reserved state \(Self.state(e))")
                if fixAll { unmap.append(index) }
            }
        }
        if tooMany {
            report.corruptions.append("more blocks are allocated than the file can hold: blocks overlap")
        }
        ranges.sort { $0.start < $1.start }
        for k in ranges.indices.dropFirst() where ranges[k - 1].end > ranges[k].start {
            report.corruptions.append("\(ranges[k - 1].what) and \(ranges[k].what) overlap at \(ranges[k].start)")
        }
        if fixAll && !unmap.isEmpty && overlay == nil {
            for index in unmap { try setBATEntry(index, 0) }
            fixed += unmap.count
            try flushLocked()
        }
        report.allocatedClusters = allocated
        report.totalClusters = blocks
        report.imageEndOffset = try file.size()
        report.repairedCorruptions = fixed
        return report
    }
}
