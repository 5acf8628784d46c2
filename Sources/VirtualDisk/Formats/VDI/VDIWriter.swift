/// The VDI write path: in-place writes to allocated blocks, allocating writes (a new data
/// block at the end of the used data, its unwritten bytes filled from the parent or with
/// zeroes), zero writes and discards.
extension VDILayer {
    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, below: BelowReader) throws {
        let end = offset + UInt64(data.count)
        var pos = offset
        while pos < end {
            let i = pos / blockSize
            let chunkEnd = min(end, (i + 1) * blockSize)
            let start = Int(pos - offset)
            let part = UnsafeRawBufferPointer(rebasing: data[start..<(start + Int(chunkEnd - pos))])
            // Fast path: the block is allocated — written in place, lock released.
            if let host = try lock.lookup({ try inPlaceTarget(block: i, at: pos) }) {
                try file.write(part, at: host)
            } else {
                try allocLock.run { try writeAllocating(part, at: pos, below: below) }
            }
            pos = chunkEnd
        }
        if cache.isOverBudget(owner: owner) { try lock.run { try flushLocked() } }
    }

    /// Where guest offset `pos` of block `i` lives, or nil when the block has no data
    /// block yet.
    private func inPlaceTarget(block i: UInt64, at pos: UInt64) throws -> UInt64? {
        let entry = try mapEntry(i)
        guard entry < VDIHeader.blockZero else { return nil }
        return try dataOffset(i, entry) + (pos - i * blockSize)
    }

    /// A new data block, reserved under `lock`; its I/O happens outside it.
    private struct Fresh {
        var slot: UInt64
        var host: UInt64
        /// What the unwritten bytes hold: the parent's bytes (a differencing image's
        /// unallocated block) or zeroes (a zero block, or an image without a parent).
        var fromBelow: Bool
        var oldLength: UInt64
        var virtualSize: UInt64
    }

    /// Write within one block where the fast path could not (under `allocLock`): in place
    /// if another writer allocated it meanwhile, else into a new data block, whole: the
    /// bytes before and after the write come from `below` (differencing) or are zero.
    /// Order: the file grows, the block's data is written, then the map entry changes in
    /// the cache (the header's count was raised when the block was reserved).
    private func writeAllocating(_ part: UnsafeRawBufferPointer, at pos: UInt64, below: BelowReader) throws {
        let i = pos / blockSize
        let blockStart = i * blockSize
        let end = pos + UInt64(part.count)
        let fresh: Fresh? = try lock.run {
            let entry = try mapEntry(i)
            if entry < VDIHeader.blockZero { return nil }
            let slot = try reserveSlotLocked()
            let f = Fresh(slot: slot, host: slotOffset(slot), fromBelow: entry == VDIHeader.blockFree && type.hasParent,
                          oldLength: fileLength, virtualSize: virtualSize)
            fileLength = max(fileLength, f.host + span)
            return f
        }
        guard let f = fresh else {
            // Allocated by another writer while this one waited.
            let host = try lock.lookup { try inPlaceTarget(block: i, at: pos) }
            if let host { try file.write(part, at: host) }
            return
        }
        do {
            if f.host + span > f.oldLength { try file.truncate(to: f.host + span) }
            let data = f.host + blockExtra
            if blockExtra > 0 && f.host < f.oldLength {
                try file.writeZeroes(at: f.host, length: min(blockExtra, f.oldLength - f.host))
            }
            try fill(from: blockStart, to: pos, blockStart: blockStart, data: data, f, below)
            try file.write(part, at: data + (pos - blockStart))
            try fill(from: end, to: blockStart + blockSize, blockStart: blockStart, data: data, f, below)
        } catch {
            // The block never got its map entry: give its slot back (allocations are
            // serialized by `allocLock`, so it is still the last one), or the header's
            // count would stay above the blocks in use.
            let shrunk = f.host + span > f.oldLength && (try? file.truncate(to: f.oldLength)) != nil
            lock.run {
                nextSlot = f.slot
                header.blocksAllocated = UInt32(f.slot)
                if shrunk { fileLength = f.oldLength }
            }
            throw error
        }
        try lock.run { try setMapEntry(i, UInt32(f.slot)) }
    }

    /// Fill guest bytes `from ..< to` of a new block: the parent's bytes (up to the
    /// disk's end) or zeroes, the latter written only where the file already had bytes.
    private func fill(from: UInt64, to: UInt64, blockStart: UInt64, data: UInt64, _ f: Fresh, _ below: BelowReader) throws {
        guard from < to else { return }
        var zeroFrom = from
        if f.fromBelow {
            let limit = min(to, max(from, f.virtualSize))
            var buf = [UInt8](repeating: 0, count: Int(min(limit - from, 1 << 20)))
            var p = from
            while p < limit {
                let n = Int(min(UInt64(buf.count), limit - p))
                try buf.withUnsafeMutableBytes { try below(p, UnsafeMutableRawBufferPointer(rebasing: $0[0..<n])) }
                try buf.withUnsafeBytes { try file.write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: data + (p - blockStart)) }
                p += UInt64(n)
            }
            zeroFrom = limit
        }
        let hostStart = data + (zeroFrom - blockStart)
        let hostEnd = min(data + (to - blockStart), f.oldLength)
        if hostStart < hostEnd { try file.writeZeroes(at: hostStart, length: hostEnd - hostStart) }
    }

    /// The next data block index; raises the header's count to cover it (written before
    /// any map page, see `flushLocked`).
    func reserveSlotLocked() throws -> UInt64 {
        if nextSlot == nil { nextSlot = try usedSlotEndLocked() }
        let slot = nextSlot!
        guard slot < blocks else {
            throw ImageError(.corrupt, "no free data block index: the \(blocks) indices are taken by blocks no longer in use; run 'vloop check -r all \(file.path)'",
                             path: file.path, format: "vdi")
        }
        nextSlot = slot + 1
        header.blocksAllocated = UInt32(slot + 1)
        headerDirty = true
        return slot
    }

    // MARK: zeroes and discard

    /// What one block of a zero write or discard holds.
    private enum BlockState {
        case data(UInt64)
        case free
        case zero
    }

    private func blockState(_ i: UInt64) throws -> BlockState {
        try lock.run {
            let e = try mapEntry(i)
            switch e {
            case VDIHeader.blockFree: return .free
            case VDIHeader.blockZero: return .zero
            default: return .data(try dataOffset(i, e))
            }
        }
    }

    /// Allocated blocks are zeroed in place (punched when allowed, except in a static
    /// image, which keeps its space). Unallocated blocks of an image without a parent
    /// read as zeroes already. In a differencing image a whole unallocated block becomes a
    /// zero block (no data); part of one is written like any data, so the rest keeps
    /// showing the parent.
    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, hasBacking: Bool, below: BelowReader) throws {
        let (hasParent, isStatic, size) = lock.run { (type.hasParent, type == .fixed, virtualSize) }
        let end = offset + length
        var pos = offset
        while pos < end {
            let i = pos / blockSize
            let blockStart = i * blockSize
            let chunkEnd = min(end, blockStart + blockSize)
            switch try blockState(i) {
            case .data(let data):
                let host = data + (pos - blockStart)
                if !(mayUnmap && !isStatic && file.punchHole(at: host, length: chunkEnd - pos)) {
                    try file.writeZeroes(at: host, length: chunkEnd - pos)
                }
            case .zero:
                break
            case .free:
                guard hasParent else { break }
                if pos == blockStart && chunkEnd >= min(blockStart + blockSize, size) {
                    try allocLock.run {
                        try lock.run {
                            // Still unallocated: allocating writes hold allocLock too.
                            if try mapEntry(i) == VDIHeader.blockFree { try setMapEntry(i, VDIHeader.blockZero) }
                        }
                    }
                } else {
                    var done = pos
                    while done < chunkEnd {
                        let n = Int(min(UInt64(ZeroBuffer.size), chunkEnd - done))
                        try write(UnsafeRawBufferPointer(rebasing: ZeroBuffer.pointer[0..<n]), at: done, below: below)
                        done += UInt64(n)
                    }
                }
            }
            pos = chunkEnd
        }
    }

    /// Discard gives the space of allocated data back by punching holes (the range then
    /// reads as zeroes); the block stays allocated, so the data blocks stay dense for
    /// every other writer. Static images keep their space.
    public func discard(at offset: UInt64, length: UInt64, hasBacking: Bool) throws {
        if lock.run({ type == .fixed }) { return }
        let end = offset + length
        var pos = offset
        while pos < end {
            let i = pos / blockSize
            let chunkEnd = min(end, (i + 1) * blockSize)
            if case .data(let data) = try blockState(i) {
                file.punchHole(at: data + (pos - i * blockSize), length: chunkEnd - pos)
            }
            pos = chunkEnd
        }
    }
}
