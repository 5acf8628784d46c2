/// The QCOW2 write path: in-place writes to clusters this image owns alone, allocating
/// writes with copy-on-write of the unit's uncovered parts, zero writes and discards.
extension QCOW2Layer {
    var unitSize: UInt64 { clusterSize / header.subclustersPerCluster }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, below: BelowReader) throws {
        let end = offset + UInt64(data.count)
        var pos = offset
        while pos < end {
            // Fast path: clusters already allocated here, owned alone (copied flag), and
            // every touched subcluster holding data — written in place, lock released.
            let direct = try lock.lookup { try directTargets(from: pos, to: end) }
            for (guest, host, len) in direct {
                let start = Int(guest - offset)
                try dataFile.write(UnsafeRawBufferPointer(rebasing: data[start..<(start + Int(len))]), at: host)
                pos = guest + len
            }
            if pos >= end { break }
            // Whole unallocated clusters: allocated as one contiguous run, one write.
            if pos % clusterSize == 0 && end - pos >= clusterSize && !externalData {
                let start = Int(pos - offset)
                let n = try allocLock.run { try writeFreshRun(data, from: start, at: pos, end: end) }
                if n > 0 { pos += n * clusterSize; continue }
            }
            let chunkEnd = min(end, (pos / clusterSize + 1) * clusterSize)
            let start = Int(pos - offset)
            try allocLock.run {
                try writeAllocating(UnsafeRawBufferPointer(rebasing: data[start..<(start + Int(chunkEnd - pos))]),
                                    at: pos, below: below)
            }
            pos = chunkEnd
        }
        try lock.run { try writeBackIfNeeded() }
    }

    /// Write whole clusters from `pos` that are unallocated here (no host cluster, no
    /// zero flag, no subcluster state) into one run of new clusters at the end of the
    /// file: one data write, then the L2 entries. Returns how many clusters it wrote (0
    /// when the first cluster does not qualify, or free space below the end must be
    /// reused first). Runs under `allocLock`.
    private func writeFreshRun(_ data: UnsafeRawBufferPointer, from start: Int, at pos: UInt64, end: UInt64) throws -> UInt64 {
        let first = pos / clusterSize
        let maxClusters = min((end - pos) / clusterSize, 512)
        try advanceFreeHint()
        let (count, host): (UInt64, UInt64) = try lock.run {
            var n: UInt64 = 0
            while n < maxClusters {
                let e = try l2Entry(guestCluster: first + n)
                guard e.raw == 0 && e.bitmap == 0 else { break }
                n += 1
            }
            guard n > 0 else { return (0, 0) }
            // Reuse freed clusters first (the one-by-one path does); append only when
            // nothing below the end of the file is free (`advanceFreeHint` has looked).
            guard try freeClusterInHintBlock() == nil, freeHint >= endCluster else { return (0, 0) }
            let h = try allocateContiguous(n)
            freeHint = endCluster
            forgetClusters(at: h, count: n)
            return (n, h)
        }
        guard count > 0 else { return 0 }
        let bytes = Int(count * clusterSize)
        try dataFile.write(UnsafeRawBufferPointer(rebasing: data[start..<(start + bytes)]), at: host)
        // Data is written; now expose it.
        try lock.run {
            for k in 0..<count {
                try setL2Entry(guestCluster: first + k,
                               L2Entry(raw: (host + k * clusterSize) | L2Entry.copied, bitmap: header.extendedL2 ? 0xffff_ffff : 0))
            }
        }
        return count
    }

    /// Contiguous writable host runs from `pos`, stopping at the first cluster that needs
    /// allocation or copy-on-write.
    private func directTargets(from start: UInt64, to end: UInt64) throws -> [(UInt64, UInt64, UInt64)] {
        var out: [(UInt64, UInt64, UInt64)] = []
        var pos = start
        while pos < end {
            let c = pos / clusterSize
            let e = try l2Entry(guestCluster: c)
            guard !e.isCompressed, e.isCopied, e.hostOffset != 0 || externalData else { break }
            let chunkEnd = min(end, (c + 1) * clusterSize)
            if header.extendedL2 {
                let first = (pos % clusterSize) / unitSize
                let last = (chunkEnd - 1 - c * clusterSize) / unitSize
                let mask = (UInt64(1) << (last + 1)) - (UInt64(1) << first)
                guard e.bitmap & mask == mask, e.hostOffset != 0 || externalData else { break }
            } else {
                guard e.raw & L2Entry.zeroFlag == 0, e.hostOffset != 0 || externalData else { break }
            }
            try checkInPlaceTarget(e, guestCluster: c)
            let host = e.hostOffset + pos - c * clusterSize
            if let last = out.last, last.0 + last.2 == pos, last.1 + last.2 == host {
                out[out.count - 1].2 += chunkEnd - pos
            } else {
                out.append((pos, host, chunkEnd - pos))
            }
            pos = chunkEnd
        }
        return out
    }

    /// A cluster about to be written in place because its L2 entry says this image owns
    /// it must lie inside the file, clear of the header, the active L1 table and the
    /// refcount table. A corrupt or hostile entry pointing elsewhere would have guest
    /// data overwrite metadata, or grow the file to wherever it points. (L2 tables and
    /// refcount blocks, which may lie anywhere, are left to `vloop check`: finding them
    /// would cost a lookup per write.) Runs under `lock`.
    func checkInPlaceTarget(_ e: L2Entry, guestCluster c: UInt64) throws {
        if externalData { return }
        let host = e.hostOffset
        guard let problem = structureHit(host, host + clusterSize) else { return }
        throw ImageError(.corrupt, "the L2 entry of guest offset \(c * clusterSize) points at host offset \(host), \(problem); writing there would damage the image, so the write is refused; run 'vloop check -r all'",
                         path: file.path, offset: host)
    }

    /// Fill `buffer` (guest bytes at `offset`, within one cluster with entry `e`) with what
    /// this layer shows there now.
    func currentView(_ e: L2Entry, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, below: BelowReader) throws {
        let c = offset / clusterSize
        var pos = offset
        let end = offset + UInt64(buffer.count)
        while pos < end {
            let sub = (pos - c * clusterSize) / unitSize
            let unitEnd = min(end, c * clusterSize + (sub + 1) * unitSize)
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(pos - offset)..<Int(unitEnd - offset)])
            switch try lock.run({ try unitState(e, sub: sub) }) {
            case .data(let host):
                let h = (externalData && header.dataFileRaw ? c * clusterSize + sub * unitSize : host)
                try dataFile.read(into: part, at: h + (pos - c * clusterSize - sub * unitSize))
            case .zero:
                part.initializeMemory(as: UInt8.self, repeating: 0)
            case .unallocated:
                try below(pos, part)
            case .compressed(let token):
                try readEncoded(token: token, at: pos, into: part)
            }
            pos = unitEnd
        }
    }

    /// Write within one cluster where the fast path could not: allocate, or copy on write.
    /// Runs under `allocLock`; `lock` is taken only around metadata.
    private func writeAllocating(_ data: UnsafeRawBufferPointer, at pos: UInt64, below: BelowReader) throws {
        let c = pos / clusterSize
        let clusterStart = c * clusterSize
        // Allocated here and referenced only by the active tables (with an external data
        // file, host offsets equal guest offsets and the copied flag marks allocation).
        func owns(_ e: L2Entry) -> Bool { !e.isCompressed && e.isCopied && (e.hostOffset != 0 || externalData) }
        let e = try lock.lookup {
            let e = try l2Entry(guestCluster: c)
            if owns(e) { try checkInPlaceTarget(e, guestCluster: c) }
            return e
        }
        let ownsCluster = owns(e)
        if ownsCluster && header.extendedL2 {
            return try writeOwnedUnits(data, at: pos, entry: e, below: below)
        }
        if ownsCluster && e.raw & L2Entry.zeroFlag == 0 {
            // Another writer allocated the cluster after the fast path looked: it holds
            // data now and other writers may be writing parts of it in place this very
            // moment, so only this write's bytes go in. Rewriting the whole cluster from
            // a read of its current view would undo theirs.
            let host = externalData ? clusterStart : e.hostOffset
            try dataFile.write(data, at: host + (pos - clusterStart))
            return
        }

        // Units (subclusters) the write touches; for standard L2 the whole cluster.
        let firstUnit = (pos - clusterStart) / unitSize
        let lastUnit = (pos + UInt64(data.count) - 1 - clusterStart) / unitSize
        let (spanStart, spanEnd): (UInt64, UInt64)
        if ownsCluster || (header.extendedL2 && !e.isCompressed && e.hostOffset == 0) {
            // In place, or a fresh extended-L2 cluster: only touched units are written.
            spanStart = clusterStart + firstUnit * unitSize
            spanEnd = clusterStart + (lastUnit + 1) * unitSize
        } else {
            // New host cluster replacing a shared, compressed or unallocated one: the whole
            // cluster is written (its current view plus the new data).
            spanStart = clusterStart
            spanEnd = clusterStart + clusterSize
        }
        var buffer = [UInt8](repeating: 0, count: Int(spanEnd - spanStart))
        try buffer.withUnsafeMutableBytes { buf in
            // What the write does not cover keeps its current contents (copy-on-write).
            if pos != spanStart || UInt64(data.count) != spanEnd - spanStart {
                try currentView(e, at: spanStart, into: buf, below: below)
            }
            let at = Int(pos - spanStart)
            UnsafeMutableRawBufferPointer(rebasing: buf[at..<(at + data.count)]).copyMemory(from: data)
        }

        var host: UInt64
        if ownsCluster {
            host = e.hostOffset
        } else if externalData {
            host = clusterStart
        } else {
            try advanceFreeHint()
            host = try lock.run { try allocateCluster() }
        }
        try dataFile.write(buffer, at: host + (spanStart - clusterStart))

        // Data is written; now expose it.
        try lock.run {
            var new = L2Entry(raw: (externalData ? clusterStart : host) | L2Entry.copied, bitmap: e.bitmap)
            if header.extendedL2 {
                let units = (spanEnd - spanStart) / unitSize
                let first = (spanStart - clusterStart) / unitSize
                let mask = units >= 64 ? UInt64.max : ((UInt64(1) << units) - 1) << first
                if e.isCompressed || !ownsCluster && e.hostOffset != 0 {
                    new.bitmap = 0xffff_ffff  // whole cluster rewritten with its current view
                } else {
                    new.bitmap = (e.bitmap | mask) & ~(mask << 32)
                }
            }
            try setL2Entry(guestCluster: c, new)
            if !ownsCluster { try releaseEntry(e, deferred: true) }
        }
    }

    /// A write into a cluster this image owns, with extended L2 entries, where some touched
    /// subclusters hold no data yet. Subclusters that do hold data may be written in place
    /// by other writers at this very moment (the fast path takes no allocation lock), so
    /// they get this write's bytes alone, never a rewrite from an earlier read of them;
    /// only the subclusters without data are filled from their current view (zeroes or
    /// the backing file), which no other writer can touch until their bits are set.
    /// Runs under `allocLock`.
    private func writeOwnedUnits(_ data: UnsafeRawBufferPointer, at pos: UInt64, entry e: L2Entry, below: BelowReader) throws {
        let c = pos / clusterSize
        let clusterStart = c * clusterSize
        // With an external data file, host offsets equal guest offsets.
        let host = externalData ? clusterStart : e.hostOffset
        let end = pos + UInt64(data.count)
        var unit = (pos - clusterStart) / unitSize
        var filled: UInt64 = 0
        while clusterStart + unit * unitSize < end {
            // A run of units that all hold data, or all do not.
            let hasData = e.bitmap & (1 << unit) != 0
            var last = unit
            while clusterStart + (last + 1) * unitSize < end, (e.bitmap & (1 << (last + 1)) != 0) == hasData { last += 1 }
            let runStart = clusterStart + unit * unitSize, runEnd = clusterStart + (last + 1) * unitSize
            let from = max(pos, runStart), to = min(end, runEnd)
            let mine = UnsafeRawBufferPointer(rebasing: data[Int(from - pos)..<Int(to - pos)])
            if hasData {
                try dataFile.write(mine, at: host + (from - clusterStart))
            } else {
                var buffer = [UInt8](repeating: 0, count: Int(runEnd - runStart))
                try buffer.withUnsafeMutableBytes { buf in
                    if from != runStart || to != runEnd { try currentView(e, at: runStart, into: buf, below: below) }
                    UnsafeMutableRawBufferPointer(rebasing: buf[Int(from - runStart)..<Int(to - runStart)]).copyMemory(from: mine)
                }
                try dataFile.write(buffer, at: host + (runStart - clusterStart))
                filled |= ((UInt64(1) << (last - unit + 1)) - 1) << unit
            }
            unit = last + 1
        }
        guard filled != 0 else { return }
        // Data is written; now expose it.
        try lock.run {
            try setL2Entry(guestCluster: c, L2Entry(raw: e.raw, bitmap: (e.bitmap | filled) & ~(filled << 32)))
        }
    }

    /// Store an L2 entry, allocating or copying the L2 table first when needed.
    func setL2Entry(guestCluster c: UInt64, _ e: L2Entry) throws {
        let l2 = try writableL2Table(l1Index: c / header.l2Entries)
        let i = c % header.l2Entries
        if header.extendedL2 {
            try setTableEntry(l2, i * 2, e.raw, rank: Self.rankL2)
            try setTableEntry(l2, i * 2 + 1, e.bitmap, rank: Self.rankL2)
        } else {
            try setTableEntry(l2, i, e.raw, rank: Self.rankL2)
        }
    }

    /// The L2 table for an L1 index, allocated (zeroed) or copied (when shared with a
    /// snapshot) so this image owns it alone.
    func writableL2Table(l1Index: UInt64) throws -> UInt64 {
        let (old, copied) = try l2TableOffset(l1: header.l1TableOffset, l1Index)
        if old != 0 && copied { return old }
        let new = try allocateCluster()
        var bytes = [UInt8](repeating: 0, count: Int(clusterSize))
        if old != 0 {
            bytes = try readTable(at: old, length: clusterSize)
            // Entries in the copy keep their data clusters; their refcounts already count
            // the snapshot's reference, so the copy's entries are not "copied".
            let step = Int(header.l2EntrySize)
            for k in stride(from: 0, to: bytes.count, by: step) {
                let raw = ByteReader(bytes).be64(k)
                if raw & L2Entry.compressed == 0 && raw & L2Entry.offsetMask != 0 {
                    let rc = try refcount(cluster: (raw & L2Entry.offsetMask) / clusterSize)
                    bytes.putBE64(rc == 1 ? raw | L2Entry.copied : raw & ~L2Entry.copied, at: k)
                }
            }
        }
        installTable(at: new, bytes, rank: Self.rankL2)
        try setTableEntry(header.l1TableOffset, l1Index, new | L2Entry.copied, rank: Self.rankL1)
        if old != 0 { deferredFrees.append((old, clusterSize)) }
        return new
    }

    // MARK: zeroes and discard

    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, hasBacking: Bool, below: BelowReader) throws {
        let end = offset + length
        var pos = offset
        while pos < end {
            let c = pos / clusterSize
            let clusterEnd = min(end, (c + 1) * clusterSize)
            let whole = pos == c * clusterSize && (clusterEnd == (c + 1) * clusterSize || clusterEnd == header.size)
            let done = whole ? try allocLock.run { try lock.run { try zeroCluster(c, mayUnmap: mayUnmap, hasBacking: hasBacking) } } : false
            if !done, try !readsAsZero(at: pos, length: clusterEnd - pos, hasBacking: hasBacking) {
                try writeZeroBytes(at: pos, length: clusterEnd - pos, below: below)
            }
            pos = clusterEnd
        }
        try lock.run { try writeBackIfNeeded() }
    }

    /// True when every unit touching the range already reads as zeroes in this layer
    /// (zero, or unallocated with nothing below): zeroing it needs no allocation.
    private func readsAsZero(at offset: UInt64, length: UInt64, hasBacking: Bool) throws -> Bool {
        try lock.run {
            let e = try l2Entry(guestCluster: offset / clusterSize)
            let c = offset / clusterSize * clusterSize
            for sub in ((offset - c) / unitSize)...((offset + length - 1 - c) / unitSize) {
                switch try unitState(e, sub: sub) {
                case .zero: continue
                case .unallocated where !hasBacking: continue
                default: return false
                }
            }
            return true
        }
    }

    private func writeZeroBytes(at offset: UInt64, length: UInt64, below: BelowReader) throws {
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(ZeroBuffer.size), length - done))
            try write(UnsafeRawBufferPointer(rebasing: ZeroBuffer.pointer[0..<n]), at: offset + done, below: below)
            done += UInt64(n)
        }
    }

    /// Make a whole cluster read as zeroes through metadata alone. Returns false when the
    /// format cannot (v2 with a backing file): the caller writes zero bytes.
    private func zeroCluster(_ c: UInt64, mayUnmap: Bool, hasBacking: Bool) throws -> Bool {
        let e = try l2Entry(guestCluster: c)
        let unallocated = e.raw == 0 && e.bitmap & 0xffff_ffff == 0
        if unallocated && !hasBacking { return true }  // reads as zeroes already: allocate nothing
        if header.version < 3 {
            if hasBacking { return false }
            try setL2Entry(guestCluster: c, L2Entry(raw: 0, bitmap: 0))
            try releaseEntry(e, deferred: false)
            return true
        }
        let keep = !mayUnmap && !e.isCompressed && e.isCopied && e.hostOffset != 0 && !externalData
        var new: L2Entry
        if header.extendedL2 {
            new = L2Entry(raw: keep ? e.raw : 0, bitmap: 0xffff_ffff_0000_0000)
        } else {
            new = L2Entry(raw: keep ? e.raw | L2Entry.zeroFlag : L2Entry.zeroFlag, bitmap: 0)
        }
        if !hasBacking && !keep { new = L2Entry(raw: 0, bitmap: 0) }
        try setL2Entry(guestCluster: c, new)
        if !keep { try releaseEntry(e, deferred: false) }
        if externalData && !keep { dataFile.punchHole(at: c * clusterSize, length: clusterSize) }
        return true
    }

    public func discard(at offset: UInt64, length: UInt64, hasBacking: Bool) throws {
        let first = offset.alignedUp(clusterSize) / clusterSize
        var lastEnd = (offset + length) / clusterSize
        if offset + length == header.size { lastEnd = (offset + length).alignedUp(clusterSize) / clusterSize }
        guard first < lastEnd else { return }
        try allocLock.run {
            try lock.run {
                for c in first..<lastEnd {
                    let e = try l2Entry(guestCluster: c)
                    if e.raw == 0 && e.bitmap == 0 { continue }
                    // Discarded clusters read as zeroes (v3) rather than exposing old
                    // backing data; without a backing file unallocated reads as zeroes.
                    let new = (hasBacking && header.version >= 3)
                        ? L2Entry(raw: header.extendedL2 ? 0 : L2Entry.zeroFlag, bitmap: header.extendedL2 ? 0xffff_ffff_0000_0000 : 0)
                        : L2Entry(raw: 0, bitmap: 0)
                    try setL2Entry(guestCluster: c, new)
                    try releaseEntry(e, deferred: false)
                    if externalData { dataFile.punchHole(at: c * clusterSize, length: clusterSize) }
                }
                try writeBackIfNeeded()
            }
        }
    }
}
