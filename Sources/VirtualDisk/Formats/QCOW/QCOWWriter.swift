/// The QCOW write path: in-place writes to clusters already allocated here, allocating
/// writes (a fresh cluster at the end of the file, filled with what the layer shows
/// there now), zero writes and discards.
///
/// Every data cluster belongs to this image alone (version 1 has no snapshots), so an
/// allocated, uncompressed cluster is always written in place. A compressed cluster is
/// never written: rewriting any part of it copies its decompressed contents to a new
/// cluster, as qemu does.
extension QCOWLayer {
    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, below: BelowReader) throws {
        let end = offset + UInt64(data.count)
        var pos = offset
        while pos < end {
            // Fast path: clusters already allocated, written in place with the lock released.
            let direct = try lock.lookup { try directTargets(from: pos, to: end) }
            for (guest, host, len) in direct {
                let start = Int(guest - offset)
                try file.write(UnsafeRawBufferPointer(rebasing: data[start..<(start + Int(len))]), at: host)
                pos = guest + len
            }
            if pos >= end { break }
            let chunkEnd = min(end, (pos / clusterSize + 1) * clusterSize)
            let start = Int(pos - offset)
            try allocLock.run {
                try writeAllocating(UnsafeRawBufferPointer(rebasing: data[start..<(start + Int(chunkEnd - pos))]),
                                    at: pos, below: below)
            }
            pos = chunkEnd
        }
        if cache.isOverBudget(owner: owner) { try lock.run { try flushLocked() } }
    }

    /// Contiguous host runs for the allocated, uncompressed clusters from `start`,
    /// stopping at the first cluster that needs allocation. Runs under `lock`.
    private func directTargets(from start: UInt64, to end: UInt64) throws -> [(guest: UInt64, host: UInt64, length: UInt64)] {
        var out: [(guest: UInt64, host: UInt64, length: UInt64)] = []
        var pos = start
        while pos < end {
            let c = pos / clusterSize
            let e = try entry(guestCluster: c)
            guard !e.isUnallocated, !e.isCompressed else { break }
            let clusterHost = e.hostOffset(header)
            try checkData(clusterHost, e)
            let chunkEnd = min(end, (c + 1) * clusterSize)
            let host = clusterHost + (pos - c * clusterSize)
            if let last = out.last, last.guest + last.length == pos, last.host + last.length == host {
                out[out.count - 1].length += chunkEnd - pos
            } else {
                out.append((pos, host, chunkEnd - pos))
            }
            pos = chunkEnd
        }
        return out
    }

    /// Write within one cluster the fast path could not: allocate a cluster, fill it with
    /// the layer's current view (the backing chain through `below`, or the decompressed
    /// cluster) plus `data`, write it, then expose it in the L2 table. Runs under
    /// `allocLock`; `lock` is taken only around metadata.
    private func writeAllocating(_ data: UnsafeRawBufferPointer, at pos: UInt64, below: BelowReader) throws {
        let c = pos / clusterSize
        let clusterStart = c * clusterSize
        let e = try lock.lookup { try entry(guestCluster: c) }
        if !e.isUnallocated && !e.isCompressed {
            // Another writer allocated it after our fast-path look: write in place.
            let host = e.hostOffset(header)
            try lock.run { try checkData(host, e) }
            try file.write(data, at: host + (pos - clusterStart))
            return
        }
        var buffer = [UInt8](repeating: 0, count: Int(clusterSize))
        try buffer.withUnsafeMutableBytes { buf in
            let at = Int(pos - clusterStart)
            let tail = at + data.count
            if e.isCompressed {
                let old = try decompress(e.raw)
                old.withUnsafeBytes { buf.copyMemory(from: $0) }
            } else {
                // Only the parts the write leaves uncovered come from below.
                if at > 0 { try below(clusterStart, UnsafeMutableRawBufferPointer(rebasing: buf[0..<at])) }
                if tail < buf.count { try below(clusterStart + UInt64(tail), UnsafeMutableRawBufferPointer(rebasing: buf[tail...])) }
            }
            UnsafeMutableRawBufferPointer(rebasing: buf[at..<tail]).copyMemory(from: data)
        }
        // The L2 table first, then the cluster after it, as qemu lays them out.
        let host = try lock.run {
            _ = try writableL2Table(l1Index: c / header.l2Entries)
            return allocate(clusterSize)
        }
        try file.write(buffer, at: host)
        // Data is written; now expose it. The old compressed bytes are left in place
        // (they may share host sectors with other compressed clusters).
        try lock.run { try setEntry(guestCluster: c, QCOWEntry(raw: host)) }
    }

    // MARK: zeroes and discard

    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, hasBacking: Bool, below: BelowReader) throws {
        let end = offset + length
        var pos = offset
        while pos < end {
            let c = pos / clusterSize
            let clusterEnd = min(end, (c + 1) * clusterSize)
            let whole = pos == c * clusterSize && (clusterEnd == (c + 1) * clusterSize || clusterEnd == virtualSize)
            // Where metadata alone makes the range read as zeroes, the position to go on
            // from; nil when zero bytes must be written.
            let next: UInt64? = try allocLock.run {
                try lock.run {
                    let l1Index = c / header.l2Entries
                    let table = try l2TableOffset(l1Index)
                    if table == 0 && !hasBacking {
                        return min(end, (l1Index + 1) * header.l1Coverage)  // no table: zeroes already
                    }
                    let e = table == 0 ? QCOWEntry(raw: 0) : try l2Entry(table: table, index: c % header.l2Entries)
                    if e.isUnallocated && !hasBacking { return clusterEnd }  // allocate nothing
                    if whole && mayUnmap && !hasBacking {
                        try unmapLocked(guestCluster: c, e)
                        return clusterEnd
                    }
                    return nil
                }
            }
            if let next {
                pos = next
                continue
            }
            try writeZeroBytes(at: pos, length: clusterEnd - pos, below: below)
            pos = clusterEnd
        }
        if cache.isOverBudget(owner: owner) { try lock.run { try flushLocked() } }
    }

    private func writeZeroBytes(at offset: UInt64, length: UInt64, below: BelowReader) throws {
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(ZeroBuffer.size), length - done))
            try write(UnsafeRawBufferPointer(rebasing: ZeroBuffer.pointer[0..<n]), at: offset + done, below: below)
            done += UInt64(n)
        }
    }

    /// Drop a cluster's mapping (it then reads as zeroes: callers make sure there is no
    /// backing file) and give a plain cluster's space back to the host file system.
    /// Compressed bytes are left: they may share host sectors with other clusters.
    /// Runs under `lock`, with no I/O in flight (the image holds its I/O lock exclusively).
    private func unmapLocked(guestCluster c: UInt64, _ e: QCOWEntry) throws {
        if e.isUnallocated { return }
        var punch: UInt64?
        if !e.isCompressed {
            let host = e.hostOffset(header)
            try checkData(host, e)
            punch = host
        }
        try setEntry(guestCluster: c, QCOWEntry(raw: 0))
        if let punch { file.punchHole(at: punch, length: clusterSize) }
    }

    /// Advisory. Without a backing file, whole clusters are unmapped (they read as
    /// zeroes). With one, nothing is done: version 1 has no zero flag, and unmapping
    /// would show stale backing data where the guest wrote.
    public func discard(at offset: UInt64, length: UInt64, hasBacking: Bool) throws {
        if hasBacking { return }
        let first = offset.alignedUp(clusterSize) / clusterSize
        var lastEnd = (offset + length) / clusterSize
        if offset + length == virtualSize { lastEnd = virtualSize.alignedUp(clusterSize) / clusterSize }
        guard first < lastEnd else { return }
        try allocLock.run {
            try lock.run {
                var c = first
                while c < lastEnd {
                    let l1Index = c / header.l2Entries
                    let table = try l2TableOffset(l1Index)
                    if table == 0 {
                        c = (l1Index + 1) * header.l2Entries
                        continue
                    }
                    try unmapLocked(guestCluster: c, try l2Entry(table: table, index: c % header.l2Entries))
                    c += 1
                }
            }
        }
    }
}
