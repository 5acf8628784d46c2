/// The hosted sparse write path: in-place writes to allocated grains, allocating writes
/// (new grains at the end of the extent file, data before the grain table entry that
/// exposes it; both GT copies updated at write-back), zeroed-grain entries, new grain
/// tables where the directory has none.
extension VMDKSparseExtent {
    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, below: BelowReader) throws {
        guard canWrite else {
            throw ImageError(.readOnly, "this \(typeName) extent is read-only", path: sparseFile.path, format: "vmdk")
        }
        let end = offset + UInt64(data.count)
        var pos = offset
        while pos < end {
            let g = pos / grainBytes
            let chunkEnd = min(end, (g + 1) * grainBytes)
            let start = Int(pos - offset)
            let part = UnsafeRawBufferPointer(rebasing: data[start..<(start + Int(chunkEnd - pos))])
            if compressed {
                try allocLock.run { try writeCompressedGrain(part, at: pos, below: below) }
            } else if case .data(let host) = try lock.lookup({ try inPlace(g) }) {
                // Allocated: written in place, outside the lock.
                try sparseFile.write(part, at: host + (pos - g * grainBytes))
            } else {
                try allocLock.run { try writeAllocating(part, at: pos, below: below) }
            }
            pos = chunkEnd
        }
        if cache.isOverBudget(owner: ownerGT) { try allocLock.run { try lock.run { try flushLocked() } } }
    }

    private func inPlace(_ g: UInt64) throws -> Grain {
        if g * grainBytes >= capacity { throw outsideCapacity(g) }
        return try grain(g)
    }

    func outsideCapacity(_ g: UInt64) -> ImageError {
        ImageError(.corrupt, "grain \(g) lies past the extent's capacity (\(capacity) bytes) recorded in its header; the descriptor and the extent disagree",
                   path: sparseFile.path, format: "vmdk")
    }

    /// The bytes of grain `g` as it reads now: `below` for an unallocated grain (the
    /// parent, or zeroes), zeroes for a zeroed one. Only the part inside the extent.
    func currentGrain(_ g: UInt64, _ state: Grain, below: BelowReader) throws -> [UInt8] {
        let start = g * grainBytes
        let n = Int(min(grainBytes, length - start))
        var buf = [UInt8](repeating: 0, count: Int(grainBytes))
        switch state {
        case .zero: break
        case .unallocated:
            try buf.withUnsafeMutableBytes { try below(start, UnsafeMutableRawBufferPointer(rebasing: $0[0..<n])) }
        case .data(let host):
            try buf.withUnsafeMutableBytes { try sparseFile.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: host) }
        case .compressed(let host):
            let bytes = try decodeGrain(host: host, grain: g)
            let m = min(bytes.count, n)
            buf.replaceSubrange(0..<m, with: bytes[0..<m])
        }
        return buf
    }

    /// Allocate grain space at the end of the file. Under `lock`.
    func reserveLocked(_ bytes: UInt64) throws -> UInt64 {
        let at = dataEnd
        let (end, o) = at.addingReportingOverflow(bytes)
        guard !o, kind != .hosted || end / 512 <= UInt64(UInt32.max) else {
            throw ImageError(.unsupported, "the extent file would grow past what 32-bit grain table entries address (2 TiB)",
                             path: sparseFile.path, format: "vmdk")
        }
        dataEnd = end
        fileLength = max(fileLength, end)
        return at
    }

    /// Make grain table `i` exist (allocating it, and its redundant copy, at the end of
    /// the file when the directory has none). Under `lock`.
    func ensureGTLocked(_ i: UInt64) throws {
        let ref = try gtRef(i)
        if ref == .present { return }
        // A zeroed directory entry stands for a table of zeroed entries.
        var table = [UInt8](repeating: 0, count: Int(gtBytes))
        if ref == .zeroed { for k in 0..<Int(gtEntries) { table.putLE32(1, at: k * 4) } }
        if streamLayout {
            pendingGTs.insert(i)
            cache.install(owner: ownerGT, offset: i, bytes: table, rank: Self.rankGT)
            return
        }
        let space = gtBytes.alignedUp(512)
        let primary = try reserveLocked(space)
        cache.install(owner: ownerGT, offset: i, bytes: table, rank: Self.rankGT)
        try setGDEntry(i, primary / 512)
        if rgdOffset != nil {
            let copy = try reserveLocked(space)
            try setGDEntry(i, copy / 512, redundant: true)
        }
    }

    /// Write within one grain that is not allocated (or was allocated meanwhile):
    /// the whole grain is written at the end of the file, then its entry set.
    private func writeAllocating(_ part: UnsafeRawBufferPointer, at pos: UInt64, below: BelowReader) throws {
        let g = pos / grainBytes
        let (state, host) = try lock.run { () -> (Grain, UInt64?) in
            let s = try inPlace(g)
            if case .data = s { return (s, nil) }
            return (s, try reserveLocked(grainBytes))
        }
        let inGrain = Int(pos - g * grainBytes)
        guard let host else {
            if case .data(let h) = state { try sparseFile.write(part, at: h + UInt64(inGrain)) }
            return
        }
        var buf = try currentGrain(g, state, below: below)
        buf.withUnsafeMutableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[inGrain..<(inGrain + part.count)]).copyMemory(from: part) }
        try sparseFile.write(buf, at: host)
        try lock.run {
            try ensureGTLocked(g / gtEntries)
            try setGTEntry(g, host / 512)
        }
    }

    // MARK: zeroes and discard

    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, hasBacking: Bool, below: BelowReader) throws {
        guard canWrite else {
            throw ImageError(.readOnly, "this \(typeName) extent is read-only", path: sparseFile.path, format: "vmdk")
        }
        let end = offset + length
        var pos = offset
        while pos < end {
            let g = pos / grainBytes
            let grainStart = g * grainBytes
            let chunkEnd = min(end, grainStart + grainBytes)
            let whole = pos == grainStart && (chunkEnd == grainStart + grainBytes || chunkEnd == self.length)
            let done: Bool = try allocLock.run {
                try lock.run {
                    if compressed, let p = pending, p.grain == g { try commitPendingLocked() }
                    let state = try inPlace(g)
                    if state == .zero || (state == .unallocated && !hasBacking) { return true }
                    if whole && zeroedGTE {
                        // A zeroed entry reads as zeroes whatever lies below.
                        try ensureGTLocked(g / gtEntries)
                        try setGTEntry(g, 1)
                        return true
                    }
                    if whole && compressed && !hasBacking {
                        // With nothing below, no entry reads as zeroes.
                        try setGTEntry(g, 0)
                        return true
                    }
                    if case .data(let h) = state {
                        // Keep the grain, zero its bytes.
                        if whole && mayUnmap && sparseFile.punchHole(at: h, length: grainBytes) { return true }
                        try sparseFile.writeZeroes(at: h + (pos - grainStart), length: chunkEnd - pos)
                        return true
                    }
                    return false
                }
            }
            if !done {
                // Zeroes must hide the parent (or replace compressed data): store them.
                var left = chunkEnd - pos
                var at = pos
                while left > 0 {
                    let n = Int(min(left, UInt64(ZeroBuffer.size)))
                    try write(UnsafeRawBufferPointer(rebasing: ZeroBuffer.pointer[0..<n]), at: at, below: below)
                    at += UInt64(n)
                    left -= UInt64(n)
                }
            }
            pos = chunkEnd
        }
    }

    /// Advisory, and VMDK has no way to free a grain: discard does nothing (qemu does
    /// not implement it either).
    func discard(at offset: UInt64, length: UInt64, hasBacking: Bool) throws {}
}
