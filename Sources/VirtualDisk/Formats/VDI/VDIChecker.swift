/// `check` for VDI: every block map entry (a data block index inside the image, its
/// block inside the file, no two entries sharing one), the blocks-allocated count (no
/// lower than the used data, so a writer trusting it cannot overwrite a block), and
/// leaked data blocks (indices below the end of the data that no entry uses).
///
/// Repairs: `-r leaks` compacts the data (the last blocks move into the unused indices,
/// the file shrinks) and sets the count; `-r all` also unmaps entries that point past the
/// image's blocks and gives each entry that shares a block with another a copy of its
/// own (which entry the data belonged to cannot be known; copying keeps both readable and
/// stops writes to one changing the other).
extension VDILayer: CheckableLayer {
    public func check(repair: CheckRepair) throws -> CheckReport {
        try allocLock.run { try lock.run { try checkLocked(repair: repair) } }
    }

    struct Analysis {
        var corruptions: [String] = []
        var leaks = 0
        var leakDetails: [String] = []
        /// Entries pointing past the image's blocks.
        var badEntries: [UInt64] = []
        /// Entries sharing a data block with an earlier entry.
        var sharedEntries: [UInt64] = []
        var usedCount: UInt64 = 0
        var allocatedEntries: UInt64 = 0
    }

    /// Messages of one kind beyond this many are summarised.
    static let maxMessages = 50

    func analyzeLocked() throws -> Analysis {
        var a = Analysis()
        let fileSize = try file.size()
        var used = [UInt64](repeating: 0, count: Int((blocks + 63) / 64))
        var pastEnd = 0
        var usedEnd: UInt64 = 0
        func note(_ count: inout Int, _ message: @autoclosure () -> String) {
            count += 1
            if count <= Self.maxMessages { a.corruptions.append(message()) }
        }
        var badCount = 0, sharedCount = 0
        try forEachEntry { i, e in
            guard e < VDIHeader.blockZero else { return }
            a.allocatedEntries += 1
            let slot = UInt64(e)
            guard slot < blocks else {
                a.badEntries.append(i)
                note(&badCount, "block map entry \(i) points at data block \(e), past the \(self.blocks) blocks of the image")
                return
            }
            let (w, bit) = (Int(slot / 64), UInt64(1) << (slot % 64))
            if used[w] & bit != 0 {
                a.sharedEntries.append(i)
                note(&sharedCount, "block map entry \(i) points at data block \(e), which another entry uses too")
                return
            }
            used[w] |= bit
            a.usedCount += 1
            usedEnd = max(usedEnd, slot + 1)
            let end = slotOffset(slot) + span
            if end > fileSize {
                note(&pastEnd, "block map entry \(i): data block \(e) (\(slotOffset(slot))..<\(end)) lies past the end of the file (\(fileSize) bytes)")
            }
        }
        for (n, what) in [(badCount, "entries past the image's blocks"), (sharedCount, "entries sharing a data block"), (pastEnd, "data blocks past the end of the file")]
        where n > Self.maxMessages {
            a.corruptions.append("… \(n - Self.maxMessages) more \(what)")
        }
        let count = UInt64(header.blocksAllocated)
        if count < usedEnd {
            a.corruptions.append("blocks allocated is \(count), but data block \(usedEnd - 1) is in use: a writer trusting the count would overwrite it")
        }
        // Leaks: indices below the end of the data (the used blocks, the count, the
        // file) that no entry uses.
        let inFile = fileSize > offsetData ? (fileSize - offsetData + span - 1) / span : 0
        let end = max(usedEnd, count, min(inFile, blocks))
        if end > a.usedCount {
            a.leaks = Int(end - a.usedCount)
            a.leakDetails.append("\(a.leaks) data block indices below \(end) hold no block in use (blocks allocated \(count), in use \(a.usedCount), file room for \(inFile))")
        }
        return a
    }

    func checkLocked(repair: CheckRepair) throws -> CheckReport {
        if repair != .none && !writable {
            throw ImageError(.readOnly, "check -r needs the image open read-write", path: file.path, format: "vdi")
        }
        try flushLocked()
        var report = CheckReport(format: "vdi", path: file.path)
        let before = try analyzeLocked()
        report.corruptions = before.corruptions
        report.leaks = before.leaks
        report.leakDetails = before.leakDetails
        report.allocatedClusters = before.allocatedEntries
        report.totalClusters = (virtualSize + blockSize - 1) / blockSize
        if repair != .none {
            if repair == .all {
                for i in before.badEntries { try setMapEntry(i, VDIHeader.blockFree) }
                try flushLocked()
            }
            try compactLocked()
            if repair == .all {
                try unshareLocked(before.sharedEntries)
            }
            let after = try analyzeLocked()
            report.repairedCorruptions = max(0, before.corruptions.count - after.corruptions.count)
            report.repairedLeaks = max(0, before.leaks - after.leaks)
            report.allocatedClusters = after.allocatedEntries
        }
        report.imageEndOffset = try file.size()
        return report
    }

    /// Copy `count` bytes of the file from `from` to `to` (whole blocks of data).
    func copyFileRange(from: UInt64, to: UInt64, count: UInt64) throws {
        var done: UInt64 = 0
        while done < count {
            let n = Int(min(UInt64(1 << 20), count - done))
            let bytes = try file.read(at: from + done, count: n)
            try file.write(bytes, at: to + done)
            done += UInt64(n)
        }
    }

    /// Make the data blocks dense again: the highest blocks move into unused indices
    /// below the number in use, then the count is set and the file cut after the data.
    /// Each step leaves a consistent image: the copies are written and synced before any
    /// entry points at them, the old blocks stay intact until the entries have moved and
    /// the count is lowered only after that. Under both locks.
    func compactLocked() throws {
        try flushLocked()
        var used = [UInt64](repeating: 0, count: Int((blocks + 63) / 64))
        var usedCount: UInt64 = 0
        var usedEnd: UInt64 = 0
        try forEachEntry { _, e in
            let slot = UInt64(e)
            guard e < VDIHeader.blockZero, slot < blocks else { return }
            let (w, bit) = (Int(slot / 64), UInt64(1) << (slot % 64))
            if used[w] & bit == 0 { usedCount += 1 }
            used[w] |= bit
            usedEnd = max(usedEnd, slot + 1)
        }
        func isUsed(_ s: UInt64) -> Bool { used[Int(s / 64)] & (UInt64(1) << (s % 64)) != 0 }
        if usedEnd > usedCount {
            // Pair the unused indices below usedCount with the used ones at or above it.
            var moves: [UInt32: UInt32] = [:]
            var hole: UInt64 = 0
            var top = usedEnd
            while true {
                while hole < usedCount && isUsed(hole) { hole += 1 }
                repeat { top -= 1 } while top > hole && !isUsed(top)
                guard hole < usedCount, top >= usedCount else { break }
                moves[UInt32(top)] = UInt32(hole)
                hole += 1
            }
            let oldLength = fileLength
            for (from, to) in moves {
                let src = slotOffset(UInt64(from)), dst = slotOffset(UInt64(to))
                if src < oldLength {
                    try copyFileRange(from: src, to: dst, count: min(span, oldLength - src))
                }
                if src + span > oldLength {
                    // The source reads as zeroes past the end of the file.
                    let z = max(src, oldLength)
                    try file.writeZeroes(at: dst + (z - src), length: src + span - z)
                }
            }
            try file.sync()
            try forEachEntry { i, e in
                if let to = moves[e] { try setMapEntry(i, to) }
            }
            try flushLocked()
        }
        nextSlot = usedCount
        header.blocksAllocated = UInt32(usedCount)
        try writeHeaderLocked()
        try file.sync()
        let end = max(slotOffset(usedCount), offsetData)
        let actualSize = try file.size()
        if fileLength != end || actualSize != end {
            try file.truncate(to: end)
            fileLength = end
            try file.sync()
        }
    }

    /// Give each listed entry a copy of the data block it shares with another entry, at
    /// the end of the data (copy synced before the entry changes).
    func unshareLocked(_ entries: [UInt64]) throws {
        for i in entries {
            let e = try mapEntry(i)
            guard e < VDIHeader.blockZero, UInt64(e) < blocks else { continue }
            let slot = try reserveSlotLocked()
            let dst = slotOffset(slot)
            if dst + span > fileLength {
                try file.truncate(to: dst + span)
                fileLength = dst + span
            }
            try copyFileRange(from: slotOffset(UInt64(e)), to: dst, count: span)
            try file.sync()
            try setMapEntry(i, UInt32(slot))
        }
        try flushLocked()
    }
}
