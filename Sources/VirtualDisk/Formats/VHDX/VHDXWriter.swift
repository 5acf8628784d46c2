/// The VHDX write path: in-place writes to present data, allocating writes (new blocks
/// at the end of the file, 1 MiB aligned; sector bitmaps for differencing disks), zero
/// writes and discards through the ZERO and UNMAPPED block states.
///
/// Order: a new block's space is made (the file extended) and its data written before
/// its BAT entry changes; bitmap pages (rank 0) and BAT pages (rank 1) reach the file
/// only through the log, at flush, after a storage barrier.
extension VHDXLayer {
    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, below: BelowReader) throws {
        try beginChange(visible: true)
        let end = offset + UInt64(data.count)
        var pos = offset
        while pos < end {
            let i = pos / blockSize
            let chunkEnd = min(end, (i + 1) * blockSize)
            let start = Int(pos - offset)
            let part = UnsafeRawBufferPointer(rebasing: data[start..<(start + Int(chunkEnd - pos))])
            if let host = try lock.lookup({ try inPlaceTarget(block: i, from: pos, to: chunkEnd) }) {
                try file.write(part, at: host)
            } else {
                try allocLock.run { try writeSlow(part, at: pos, below: below) }
            }
            pos = chunkEnd
        }
        if cache.isOverBudget(owner: owner) { try lock.run { try flushLocked() } }
    }

    /// Where `from ..< to` (inside block `i`) can be written in place, or nil.
    private func inPlaceTarget(block i: UInt64, from: UInt64, to: UInt64) throws -> UInt64? {
        let e = try batEntry(payloadEntryIndex(i))
        let blockStart = i * blockSize
        switch Self.state(e) {
        case Self.fullyPresent:
            return try blockOffset(i, e) + (from - blockStart)
        case Self.partiallyPresent where type == .differencing:
            guard let sb = try bitmapBlock(chunk: i / chunkRatio) else { return nil }
            let host = try blockOffset(i, e)
            let runs = try sectorRuns(block: i, sb: sb, from: from, to: to)
            return runs.count == 1 && runs[0].2 ? host + (from - blockStart) : nil
        default:
            return nil
        }
    }

    /// Reserve `length` bytes at the end of the file (under `lock`).
    func reserveLocked(_ length: UInt64) throws -> UInt64 {
        let at = dataEnd
        guard (at + length) >> 20 < (1 << 44) else {
            throw ImageError(.unsupported, "the image file would grow past what a VHDX BAT can address", path: file.path, format: "vhdx")
        }
        dataEnd = at + length
        fileLength = max(fileLength, dataEnd)
        return at
    }

    /// Make reserved space real: the file grows over it, so it reads as zeroes.
    func prepareSpace(at: UInt64, length: UInt64) throws {
        if try file.size() < at + length {
            try file.truncate(to: at + length)
        } else {
            try file.writeZeroes(at: at, length: length)
        }
    }

    /// Write within block `i` where the fast path could not. Runs under `allocLock`.
    private func writeSlow(_ part: UnsafeRawBufferPointer, at pos: UInt64, below: BelowReader) throws {
        let i = pos / blockSize
        let blockStart = i * blockSize
        let end = pos + UInt64(part.count)
        let (entry, differencing) = try lock.run { (try batEntry(payloadEntryIndex(i)), type == .differencing) }
        let state = Self.state(entry)
        if state == Self.fullyPresent {
            let host = try lock.run { try blockOffset(i, entry) }
            try file.write(part, at: host + (pos - blockStart))
            return
        }
        if state == 4 || (state == Self.partiallyPresent && !differencing) {
            throw ImageError(.corrupt, "BAT entry for block \(i) has state \(state), invalid here; run 'vloop check \(file.path)'", path: file.path, format: "vhdx")
        }
        let ext = blockExtent(i)
        if lock.run({ type }) == .fixed && Self.offset(entry) != 0 {
            // A fixed disk's block that records its place keeps it (an UNMAPPED or
            // UNDEFINED block of a fixed disk laid out by another writer): the rest of it is
            // zeroed around the write.
            let host = try lock.run { try blockOffset(i, entry) }
            if pos > blockStart { try file.writeZeroes(at: host, length: pos - blockStart) }
            if end < blockStart + ext { try file.writeZeroes(at: host + (end - blockStart), length: blockStart + ext - end) }
            try file.write(part, at: host + (pos - blockStart))
            try lock.run { try setBATEntry(payloadEntryIndex(i), Self.entry(state: Self.fullyPresent, offset: host)) }
            return
        }
        let covers = pos == blockStart && end == blockStart + ext
        // A block that reads as zeroes here (or anywhere in a non-differencing disk), or a
        // write covering the whole block: a new, fully present block.
        if state != Self.partiallyPresent && (!differencing || covers || state == Self.zero || state == Self.unmapped || state == Self.unmappedV095) {
            let host = try lock.run { try reserveLocked(blockSize) }
            try prepareSpace(at: host, length: blockSize)
            try file.write(part, at: host + (pos - blockStart))
            try lock.run { try setBATEntry(payloadEntryIndex(i), Self.entry(state: Self.fullyPresent, offset: host)) }
            return
        }
        // Differencing: the block shows the parent where its bits are clear.
        let chunk = i / chunkRatio
        var sb = try lock.run { try bitmapBlock(chunk: chunk) }
        if sb == nil {
            let at = try lock.run { try reserveLocked(Self.sectorBitmapBlockSize) }
            try prepareSpace(at: at, length: Self.sectorBitmapBlockSize)
            try lock.run { try setBATEntry(bitmapEntryIndex(chunk: chunk), Self.entry(state: Self.sbPresent, offset: at)) }
            sb = at
        }
        var host: UInt64
        if state == Self.partiallyPresent {
            host = try lock.run { try blockOffset(i, entry) }
        } else {
            // NOT_PRESENT / UNDEFINED: a new block whose bits are all clear. Bits of a
            // block that was never partially present may hold leftovers: clear them.
            host = try lock.run { try reserveLocked(blockSize) }
            try prepareSpace(at: host, length: blockSize)
            try lock.run { try setBits(block: i, sb: sb!, from: blockStart, to: blockStart + blockExtent(i), on: false) }
        }
        let runs = try lock.run { try sectorRuns(block: i, sb: sb!, from: pos, to: end) }
        let lss = logicalSectorSize
        for (a, b, present) in runs {
            let src = UnsafeRawBufferPointer(rebasing: part[Int(a - pos)..<Int(b - pos)])
            let sa = a / lss * lss, sbEnd = (b + lss - 1) / lss * lss
            if present || (sa == a && sbEnd == b) {
                try file.write(src, at: host + (a - blockStart))
            } else {
                // Partial sectors: the rest of each comes from below.
                var buf = [UInt8](repeating: 0, count: Int(sbEnd - sa))
                try buf.withUnsafeMutableBytes { m in
                    if a > sa { try below(sa, UnsafeMutableRawBufferPointer(rebasing: m[0..<Int(a - sa)])) }
                    if b < sbEnd { try below(b, UnsafeMutableRawBufferPointer(rebasing: m[Int(b - sa)...])) }
                    UnsafeMutableRawBufferPointer(rebasing: m[Int(a - sa)..<Int(b - sa)]).copyMemory(from: src)
                }
                try file.write(buf, at: host + (sa - blockStart))
            }
        }
        try lock.run {
            try setBits(block: i, sb: sb!, from: pos, to: end, on: true)
            if state != Self.partiallyPresent {
                try setBATEntry(payloadEntryIndex(i), Self.entry(state: Self.partiallyPresent, offset: host))
            }
        }
    }

    /// Set or clear the bits of the sectors touching `from ..< to` (block `i`). Under `lock`.
    func setBits(block i: UInt64, sb: UInt64, from: UInt64, to: UInt64, on: Bool) throws {
        let blockStart = i * blockSize
        let base = firstBit(ofBlock: i)
        var s = (from - blockStart) / logicalSectorSize
        let last = (to - 1 - blockStart) / logicalSectorSize + 1
        let pageBits = Self.pageSize * 8
        while s < last {
            let bitIndex = base + s
            let limit = min(last, s + ((bitIndex / pageBits + 1) * pageBits - bitIndex))
            try withBitmapPage(sb, bit: bitIndex) { p, k in
                for q in 0..<Int(limit - s) { Self.setBit(&p.bytes, k + q, on) }
                cache.markDirty(p, rank: Self.rankBitmap)
            }
            s = limit
        }
    }

    // MARK: zeroes and discard

    /// Whole blocks in `offset ..< offset+length`, and the partial pieces around them.
    private func split(_ offset: UInt64, _ length: UInt64) -> [(block: UInt64, from: UInt64, to: UInt64, whole: Bool)] {
        var out: [(UInt64, UInt64, UInt64, Bool)] = []
        let end = offset + length
        var pos = offset
        while pos < end {
            let i = pos / blockSize
            let chunkEnd = min(end, (i + 1) * blockSize)
            out.append((i, pos, chunkEnd, pos == i * blockSize && chunkEnd == i * blockSize + blockExtent(i)))
            pos = chunkEnd
        }
        return out
    }

    /// Give a whole block up: its entry takes `state` (offset cleared), then its space is
    /// punched. A crash between the two leaves the old data or zeroes, both valid reads.
    private func dropBlock(_ i: UInt64, state: UInt64) throws {
        let old = try lock.run { () -> UInt64? in
            let e = try batEntry(payloadEntryIndex(i))
            let s = Self.state(e)
            let host = (s == Self.fullyPresent || s == Self.partiallyPresent) ? try blockOffset(i, e) : nil
            try setBATEntry(payloadEntryIndex(i), Self.entry(state: state, offset: 0))
            return host
        }
        if let old {
            try flush()  // the entry stops pointing at the block before its space goes
            file.punchHole(at: old, length: blockSize)
        }
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, hasBacking: Bool, below: BelowReader) throws {
        try beginChange(visible: true)
        let kind = lock.run { type }
        for (i, from, to, whole) in split(offset, length) {
            let e = try lock.run { try batEntry(payloadEntryIndex(i)) }
            let s = Self.state(e)
            if s == Self.zero || s == Self.unmapped || s == Self.unmappedV095 { continue }
            if kind == .fixed {
                guard s == Self.fullyPresent else { continue }  // absent blocks read as zeroes
                let host = try lock.run { try blockOffset(i, e) } + (from - i * blockSize)
                if mayUnmap && file.punchHole(at: host, length: to - from) { continue }
                try file.writeZeroes(at: host, length: to - from)
                continue
            }
            if whole {
                // Dynamic disks leave an absent block absent: it reads as zeroes already.
                if kind == .dynamic && (s == Self.notPresent || s == Self.undefined) { continue }
                try allocLock.run { try dropBlock(i, state: Self.zero) }
                continue
            }
            switch s {
            case Self.fullyPresent:
                let host = try lock.run { try blockOffset(i, e) } + (from - i * blockSize)
                try file.writeZeroes(at: host, length: to - from)
            case Self.notPresent, Self.undefined:
                if kind == .dynamic { continue }
                fallthrough
            default:
                // Differencing: zeroes must hide the parent; they are stored like data.
                var done = from
                while done < to {
                    let n = Int(min(UInt64(ZeroBuffer.size), to - done))
                    try write(UnsafeRawBufferPointer(rebasing: ZeroBuffer.pointer[0..<n]), at: done, below: below)
                    done += UInt64(n)
                }
            }
        }
    }

    /// Discard: whole blocks become UNMAPPED (they read as zeroes) and their space goes;
    /// in fixed disks and in part-blocks of dynamic ones the file gets a hole (zeroes).
    /// Part-blocks of differencing disks keep their data (discard is advisory).
    public func discard(at offset: UInt64, length: UInt64, hasBacking: Bool) throws {
        let kind = lock.run { type }
        try beginChange(visible: true)
        for (i, from, to, whole) in split(offset, length) {
            let e = try lock.run { try batEntry(payloadEntryIndex(i)) }
            let s = Self.state(e)
            if kind != .fixed && whole {
                if s == Self.unmapped || s == Self.zero { continue }
                if kind == .dynamic && (s == Self.notPresent || s == Self.undefined) { continue }
                try allocLock.run { try dropBlock(i, state: Self.unmapped) }
                continue
            }
            if s == Self.fullyPresent && kind != .differencing {
                let host = try lock.run { try blockOffset(i, e) } + (from - i * blockSize)
                file.punchHole(at: host, length: to - from)
            }
        }
    }
}
