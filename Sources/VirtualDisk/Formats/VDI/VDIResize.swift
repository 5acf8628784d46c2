/// Resize, parent changes (rebase), emptying (commit) and parent validation for VDI.
extension VDILayer: ResizableLayer, BackingSettableLayer, EmptiableLayer, BackingValidatingLayer {
    // MARK: parent validation

    /// A differencing image's parent must be the VDI whose image UUID the child records as
    /// its link: another file under the expected name would show its bytes through the
    /// child's unallocated blocks unnoticed.
    public func validateBacking(_ backing: DiskImage) throws {
        let (hasParent, expected, name) = lock.run { (type.hasParent, header.uuidLink, parentName ?? "") }
        guard hasParent else { return }
        guard let parent = (backing as? LayeredImage)?.layer as? VDILayer else {
            throw ImageError(.chain, "parent '\(name)' is a \(backing.info.format) image, but a differencing VDI's parent must be a VDI",
                             path: file.path, format: "vdi")
        }
        let actual = parent.lock.run { parent.header.uuidImage }
        if actual != expected {
            throw ImageError(.chain, "parent '\(name)' has image UUID \(actual), but this differencing image was made on UUID \(expected); find the parent with UUID \(expected) (looked in \(lock.run { parentSearched }.joined(separator: ", "))), or record '\(name)' as the parent with 'vloop rebase -u -b \(name) -F vdi \(file.path)'",
                             path: file.path, format: "vdi")
        }
    }

    // MARK: resize

    /// New virtual size, a multiple of 512. Growing needs a map entry per block: the map
    /// grows into the space before the data when there is room, else the first data
    /// blocks move to the end of the file and the data area starts later. Shrinking
    /// unmaps the blocks past the end and compacts the data. A static image gets data
    /// blocks for the blocks it gains.
    public func resize(to newSize: UInt64, shrink: Bool) throws {
        try allocLock.run {
            try lock.run {
                guard newSize % 512 == 0 else {
                    throw ImageError(.invalidArgument, "VDI sizes are whole 512-byte sectors (got \(newSize))", path: file.path)
                }
                let need = (newSize + blockSize - 1) / blockSize
                guard need <= UInt64(VDIHeader.maxBlocks) else {
                    throw ImageError(.invalidArgument, "VDI images of \(blockSize)-byte blocks hold at most \(UInt64(VDIHeader.maxBlocks) * blockSize) bytes",
                                     path: file.path)
                }
                try flushLocked()
                if need > blocks {
                    try growMapLocked(to: need)
                } else if need < blocks {
                    try shrinkMapLocked(to: need)
                }
                header.diskSize = newSize
                virtualSize = newSize
                try writeHeaderLocked()
                try file.sync()
            }
        }
    }

    private func shrinkMapLocked(to need: UInt64) throws {
        for i in need..<blocks {
            if try mapEntry(i) != VDIHeader.blockFree { try setMapEntry(i, VDIHeader.blockFree) }
        }
        // The entries stop pointing at the blocks before the data moves.
        try flushLocked()
        try compactLocked()
        cache.drop(owner: owner)  // all clean; the last page's length changes
        blocks = need
        header.blocksInImage = UInt32(need)
        try writeHeaderLocked()
        try file.sync()
    }

    /// Make room for `need` map entries (all unallocated), then, in a static image,
    /// give the new blocks data.
    private func growMapLocked(to need: UInt64) throws {
        let old = blocks
        let room = (offsetData - offsetBmap) / 4
        if nextSlot == nil { nextSlot = try usedSlotEndLocked() }
        cache.drop(owner: owner)  // clean after the flush; the map is rewritten below
        if need > room {
            try relocateLocked(need: need)
        } else {
            // New entries first, then the header that makes them part of the map.
            try fillFree(at: offsetBmap + old * 4, count: need - old)
            try file.sync()
        }
        blocks = need
        header.blocksInImage = UInt32(need)
        try writeHeaderLocked()
        try file.sync()
        if type == .fixed {
            for i in old..<need {
                let slot = try reserveSlotLocked()
                try setMapEntry(i, UInt32(slot))
            }
            let end = slotOffset(nextSlot!)
            if end > fileLength {
                let start = fileLength
                try file.truncate(to: end)
                try? file.preallocate(at: start, length: end - start)
                fileLength = end
            }
            try flushLocked()
        }
    }

    /// Write `count` unallocated entries (0xffffffff) at `at`.
    private func fillFree(at: UInt64, count: UInt64) throws {
        let chunk = [UInt8](repeating: 0xff, count: 1 << 20)
        var done: UInt64 = 0
        while done < count * 4 {
            let n = Int(min(UInt64(chunk.count), count * 4 - done))
            try chunk.withUnsafeBytes { try file.write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: at + done) }
            done += UInt64(n)
        }
    }

    /// Grow the map past the data offset: the data area starts `k` blocks later, so the
    /// blocks in its first `k` indices are copied to the end, then every entry is
    /// renumbered and the header moves the data offset.
    ///
    ///     before: header | map | pad | b0 | b1 | … | b(n-1)
    ///     after:  header | map ……………………… | pad | b(k) … b(n-1) | b0 … b(k-1)
    ///
    /// The copies are written and synced before the map changes. Renumbering the map and
    /// moving the data offset in the header cannot be done in one write: a crash between
    /// the two leaves the entries pointing `k` blocks off (VirtualBox has the same window).
    /// Everything is synced right after.
    private func relocateLocked(need: UInt64) throws {
        let extra = need * 4 - (offsetData - offsetBmap)
        let k = (extra + span - 1) / span
        let newOffsetData = offsetData + k * span
        guard newOffsetData <= UInt64(UInt32.max) else {
            throw ImageError(.unsupported, "the block map of \(need) entries does not fit before 4 GiB with the data moved; VDI offsets are 32-bit",
                             path: file.path, format: "vdi")
        }
        let n = nextSlot!
        // Old index e < k moves to old index base + e, which is new index base + e - k.
        let base = max(n, k)
        var usedLow = [Bool](repeating: false, count: Int(min(k, n)))
        try forEachEntryDirect { _, e in
            if e < VDIHeader.blockZero, UInt64(e) < min(k, n) { usedLow[Int(e)] = true }
        }
        let copyEnd = slotOffset(base + UInt64(usedLow.count))
        if copyEnd > fileLength {
            try file.truncate(to: copyEnd)
            fileLength = copyEnd
        }
        for (e, isUsed) in usedLow.enumerated() where isUsed {
            try copyFileRange(from: slotOffset(UInt64(e)), to: slotOffset(base + UInt64(e)), count: span)
        }
        try file.sync()
        // The renumbered map, chunk by chunk, then the new entries.
        let chunkEntries: UInt64 = 1 << 18
        var i: UInt64 = 0
        while i < blocks {
            let count = min(chunkEntries, blocks - i)
            var bytes = try file.read(at: offsetBmap + i * 4, count: Int(count * 4))
            for j in 0..<Int(count) {
                let e = ByteReader(bytes).le32(j * 4)
                guard e < VDIHeader.blockZero, UInt64(e) < blocks else { continue }
                let renumbered = UInt64(e) < k ? base + UInt64(e) - k : UInt64(e) - k
                bytes.putLE32(UInt32(renumbered), at: j * 4)
            }
            try file.write(bytes, at: offsetBmap + i * 4)
            i += count
        }
        try fillFree(at: offsetBmap + blocks * 4, count: need - blocks)
        let padStart = offsetBmap + need * 4
        if padStart < newOffsetData { try file.writeZeroes(at: padStart, length: newOffsetData - padStart) }
        offsetData = newOffsetData
        header.offsetData = UInt32(newOffsetData)
        nextSlot = base + UInt64(usedLow.count) - k
        header.blocksAllocated = UInt32(nextSlot!)
        header.blocksInImage = UInt32(need)
        try writeHeaderLocked()
        try file.sync()
        // The old copies of the moved blocks lay where the map and its padding are now;
        // the file ends after the data.
        let end = slotOffset(nextSlot!)
        if fileLength > end {
            try file.truncate(to: end)
            fileLength = end
            try file.sync()
        }
    }

    /// Every entry read straight from the file (the cache is empty), a chunk at a time.
    private func forEachEntryDirect(_ body: (UInt64, UInt32) throws -> Void) throws {
        let chunkEntries: UInt64 = 1 << 18
        var i: UInt64 = 0
        while i < blocks {
            let count = min(chunkEntries, blocks - i)
            let bytes = try file.read(at: offsetBmap + i * 4, count: Int(count * 4))
            let r = ByteReader(bytes)
            for j in 0..<Int(count) { try body(i + UInt64(j), r.le32(j * 4)) }
            i += count
        }
    }

    // MARK: parent changes

    /// Record a new parent (rebase), or none: a differencing image without a parent
    /// becomes a dynamic one (its unallocated blocks then read as zeroes, after rebase
    /// has copied in every range where the old parent differed from zero), and a dynamic
    /// one gains a parent the same way round. The parent is recorded by UUID only, so it
    /// must be where the child looks for it.
    public func setBacking(name: String?, format: String?) throws {
        try allocLock.run {
            try lock.run {
                guard type != .fixed else {
                    throw ImageError(.unsupported, "static VDI images cannot have a parent", path: file.path)
                }
                guard let name else {
                    guard type.hasParent else { return }
                    try flushLocked()
                    header.imageType = VDIHeader.ImageType.dynamic.rawValue
                    header.uuidLink = .null
                    header.uuidParentModification = .null
                    type = .dynamic
                    parentName = nil
                    parentSearched = []
                    try writeHeaderLocked()
                    try file.sync()
                    return
                }
                if let format, ImageFormat(name: format) != .vdi {
                    throw ImageError(.invalidArgument, "a differencing VDI's parent must be a VDI image, not \(format)", path: file.path)
                }
                let info = try Self.parentInfo(name: name, child: file.path)
                if info.uuidImage == header.uuidImage {
                    throw ImageError(.invalidArgument, "'\(name)' has this image's own UUID; an image cannot be its own parent", path: file.path)
                }
                try flushLocked()
                header.imageType = VDIHeader.ImageType.differencing.rawValue
                header.uuidLink = info.uuidImage
                header.uuidParentModification = info.uuidModification
                type = .differencing
                try writeHeaderLocked()
                try file.sync()
                let (found, searched) = Self.findParent(of: file, uuid: info.uuidImage)
                parentName = found ?? name
                parentSearched = searched
            }
        }
    }

    // MARK: emptying

    /// Unmap every block of a differencing image (after commit): the parent shows through
    /// everywhere, and the file shrinks to its header and map.
    public func makeEmpty() throws {
        try allocLock.run {
            try lock.run {
                guard type.hasParent else {
                    throw ImageError(.unsupported, "only differencing VDI images can be emptied", path: file.path)
                }
                try flushLocked()
                try forEachEntry { i, e in
                    if e != VDIHeader.blockFree { try setMapEntry(i, VDIHeader.blockFree) }
                }
                // The map stops pointing at the blocks before the count drops and the
                // file is cut.
                try flushLocked()
                nextSlot = 0
                header.blocksAllocated = 0
                try writeHeaderLocked()
                try file.sync()
                try file.truncate(to: offsetData)
                fileLength = offsetData
                try file.sync()
            }
        }
    }
}
