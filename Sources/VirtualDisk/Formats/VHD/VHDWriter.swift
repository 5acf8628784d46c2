/// The VHD write path: in-place writes to present sectors, allocating writes (new
/// blocks at the end of the file, sector bits set as sectors are filled), zero writes
/// and discards.
extension VHDLayer {
    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, below: BelowReader) throws {
        if isFixed {
            try file.write(data, at: offset)
            return
        }
        let end = offset + UInt64(data.count)
        var pos = offset
        while pos < end {
            let i = pos / blockSize
            let chunkEnd = min(end, (i + 1) * blockSize)
            let start = Int(pos - offset)
            let part = UnsafeRawBufferPointer(rebasing: data[start..<(start + Int(chunkEnd - pos))])
            // Fast path: every touched sector already stored here — written in place,
            // lock released.
            if let host = try lock.lookup({ try inPlaceTarget(block: i, from: pos, to: chunkEnd) }) {
                try file.write(part, at: host)
            } else {
                try allocLock.run { try writeFilling(part, at: pos, below: below) }
            }
            pos = chunkEnd
        }
        if cache.isOverBudget(owner: owner) { try lock.run { try flushLocked() } }
    }

    /// Where `from ..< to` (inside block `i`) can be written in place, or nil when the
    /// block is unallocated or a touched sector is not yet stored here.
    private func inPlaceTarget(block i: UInt64, from: UInt64, to: UInt64) throws -> UInt64? {
        let entry = try batEntry(i)
        if entry == Self.unallocated { return nil }
        let block = try blockOffset(i, entry)
        let blockStart = i * blockSize
        let first = Int((from - blockStart) / 512)
        let last = Int((to - 1 - blockStart) / 512)
        let present = try withBitmap(block) { p in Self.runEnd(p.bytes, from: first, limit: last + 1, state: true) > last }
        return present ? block + bitmapSize + (from - blockStart) : nil
    }

    /// Write within one block where the fast path could not: allocate the block if
    /// needed, store each absent sector whole (the bytes the write does not cover come
    /// from `below` in a differencing disk, zeroes in a dynamic one), then set their
    /// bits. Present sectors get only the bytes written, so a concurrent in-place
    /// writer's bytes are never overwritten with stale ones. Runs under `allocLock`.
    ///
    /// Order: data, then the bitmap page (rank 0), then for a new block its BAT entry
    /// (rank 1); the new block's space and the moved footer are written first of all.
    private func writeFilling(_ part: UnsafeRawBufferPointer, at pos: UInt64, below: BelowReader) throws {
        let i = pos / blockSize
        let blockStart = i * blockSize
        let end = pos + UInt64(part.count)
        let (block, reservation, before, differencing) = try lock.run { () -> (UInt64, Reservation?, [UInt8], Bool) in
            let entry = try batEntry(i)
            if entry != Self.unallocated {
                let b = try blockOffset(i, entry)
                return (b, nil, try withBitmap(b) { $0.bytes }, type == .differencing)
            }
            let r = try reserveBlockLocked()
            return (r.block, r, [UInt8](repeating: 0, count: Int(bitmapSize)), type == .differencing)
        }
        let fresh = reservation != nil
        if let reservation { try prepare(reservation) }
        var bitmap = before
        let data = block + bitmapSize
        let first = Int((pos - blockStart) / 512)
        let last = Int((end - 1 - blockStart) / 512)
        var k = first
        while k <= last {
            let present = Self.bit(bitmap, k)
            let kEnd = Self.runEnd(bitmap, from: k + 1, limit: last + 1, state: present)
            let runStart = blockStart + UInt64(k) * 512
            let runEnd = blockStart + UInt64(kEnd) * 512
            let wStart = max(pos, runStart), wEnd = min(end, runEnd)
            let src = UnsafeRawBufferPointer(rebasing: part[Int(wStart - pos)..<Int(wEnd - pos)])
            if present || (wStart == runStart && wEnd == runEnd) {
                try file.write(src, at: data + (wStart - blockStart))
            } else {
                var buf = [UInt8](repeating: 0, count: Int(runEnd - runStart))
                try buf.withUnsafeMutableBytes { b in
                    if differencing {
                        if wStart > runStart {
                            try below(runStart, UnsafeMutableRawBufferPointer(rebasing: b[0..<Int(wStart - runStart)]))
                        }
                        if wEnd < runEnd {
                            try below(wEnd, UnsafeMutableRawBufferPointer(rebasing: b[Int(wEnd - runStart)...]))
                        }
                    }
                    UnsafeMutableRawBufferPointer(rebasing: b[Int(wStart - runStart)..<Int(wEnd - runStart)]).copyMemory(from: src)
                }
                try file.write(buf, at: data + (runStart - blockStart))
            }
            if !present {
                for s in k..<kEnd { Self.setBit(&bitmap, s, true) }
            }
            k = kEnd
        }
        if bitmap == before && !fresh { return }
        try lock.run {
            if fresh {
                cache.install(owner: owner, offset: block, bytes: bitmap, rank: Self.rankBitmap)
                try setBATEntry(i, UInt32(block / 512))
            } else {
                // Only allocating writes and discards (both under allocLock) change bits,
                // so the page still holds `before` plus nothing: OR in the new bits.
                try withBitmap(block) { p in
                    for j in 0..<min(p.bytes.count, bitmap.count) { p.bytes[j] |= bitmap[j] }
                    cache.markDirty(p, rank: Self.rankBitmap)
                }
            }
        }
    }

    /// A block reserved at the end of the data whose space is still to be prepared.
    struct Reservation {
        var block: UInt64
        var footer: [UInt8]
        var newEnd: UInt64
        var oldLength: UInt64
    }

    /// Reserve a new block at the end of the data (under `lock`); `prepare` does the I/O
    /// afterwards without `lock` (under `allocLock`, which keeps the reservation ours).
    func reserveBlockLocked() throws -> Reservation {
        let block = dataEnd
        let newEnd = block + bitmapSize + blockSize
        guard block / 512 < UInt64(VHDLayer.unallocated) else {
            throw ImageError(.unsupported, "the image file would grow past what a VHD BAT can address (2 TiB)", path: file.path, format: "vhd")
        }
        let r = Reservation(block: block, footer: footer.serialized(), newEnd: newEnd, oldLength: fileLength)
        dataEnd = newEnd
        fileLength = max(fileLength, newEnd + 512)
        return r
    }

    /// The footer moves first, to the new end of the file, so the file always ends with
    /// a valid footer. The block's space then reads as zeroes except where the old file
    /// reached (the old footer, under the bitmap that will replace it), which is zeroed
    /// in the data area.
    func prepare(_ r: Reservation) throws {
        try file.write(r.footer, at: r.newEnd)
        let dataStart = r.block + bitmapSize
        if r.oldLength > dataStart {
            try file.writeZeroes(at: dataStart, length: min(r.oldLength, r.newEnd) - dataStart)
        }
    }

    // MARK: zeroes and discard

    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, hasBacking: Bool, below: BelowReader) throws {
        switch lock.run({ type }) {
        case .fixed:
            if mayUnmap && file.punchHole(at: offset, length: length) { return }
            try file.writeZeroes(at: offset, length: length)
        case .dynamic:
            // Unallocated blocks read as zeroes already. In allocated ones the data is
            // zeroed in place and the bits stay: every reader, qemu included (it ignores
            // the bitmap), then sees zeroes, and no metadata changes.
            for (host, len) in try allocatedRanges(at: offset, length: length) {
                if mayUnmap && file.punchHole(at: host, length: len) { continue }
                try file.writeZeroes(at: host, length: len)
            }
        case .differencing:
            // Zeroes must hide the parent: they are stored like any data.
            var done: UInt64 = 0
            while done < length {
                let n = Int(min(UInt64(ZeroBuffer.size), length - done))
                try write(UnsafeRawBufferPointer(rebasing: ZeroBuffer.pointer[0..<n]), at: offset + done, below: below)
                done += UInt64(n)
            }
        }
    }

    /// Host ranges of the allocated blocks' data within a guest range.
    private func allocatedRanges(at offset: UInt64, length: UInt64) throws -> [(UInt64, UInt64)] {
        try lock.run {
            var out: [(UInt64, UInt64)] = []
            let end = offset + length
            var pos = offset
            while pos < end {
                let i = pos / blockSize
                let chunkEnd = min(end, (i + 1) * blockSize)
                let entry = try batEntry(i)
                if entry != Self.unallocated {
                    let data = try blockOffset(i, entry) + bitmapSize
                    out.append((data + pos - i * blockSize, chunkEnd - pos))
                }
                pos = chunkEnd
            }
            return out
        }
    }

    /// Discard: fixed and dynamic disks give the space back (the range reads as zeroes);
    /// a differencing disk also clears the bits of whole sectors, so the parent shows
    /// through again.
    public func discard(at offset: UInt64, length: UInt64, hasBacking: Bool) throws {
        let (type, size) = lock.run { (self.type, virtualSize) }
        switch type {
        case .fixed:
            file.punchHole(at: offset, length: length)
        case .dynamic:
            for (host, len) in try allocatedRanges(at: offset, length: length) {
                file.punchHole(at: host, length: len)
            }
        case .differencing:
            let first = offset.alignedUp(512)
            var last = (offset + length).alignedDown(512)
            if offset + length == size { last = offset + length }
            guard first < last else { return }
            try allocLock.run {
                try lock.run {
                    var pos = first
                    while pos < last {
                        let i = pos / blockSize
                        let blockStart = i * blockSize
                        let chunkEnd = min(last, blockStart + blockSize)
                        let entry = try batEntry(i)
                        if entry != Self.unallocated {
                            let block = try blockOffset(i, entry)
                            try withBitmap(block) { p in
                                for s in Int((pos - blockStart) / 512)..<Int((chunkEnd - blockStart) / 512) { Self.setBit(&p.bytes, s, false) }
                                cache.markDirty(p, rank: Self.rankBitmap)
                            }
                            file.punchHole(at: block + bitmapSize + pos - blockStart, length: chunkEnd - pos)
                        }
                        pos = chunkEnd
                    }
                }
            }
        }
    }
}
