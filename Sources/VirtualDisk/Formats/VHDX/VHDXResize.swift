/// Resize (grow), parent changes (rebase), emptying (commit) and parent validation.
extension VHDXLayer: ResizableLayer, BackingValidatingLayer, BackingSettableLayer, EmptiableLayer {
    // MARK: parent validation

    /// A differencing disk's parent must be the VHDX whose data write GUID the child's
    /// parent_linkage records: the same name may now hold another disk, or the parent
    /// may have been written since (its data write GUID then changed).
    public func validateBacking(_ backing: DiskImage) throws {
        let (isDifferencing, linkage, linkage2, name) = lock.run {
            (type == .differencing, metadata.parentValue("parent_linkage"), metadata.parentValue("parent_linkage2"), parentName ?? "")
        }
        guard isDifferencing, let linkage else { return }
        guard let expected = VHDXGUID.parse(linkage) else {
            throw ImageError(.corrupt, "parent_linkage '\(linkage)' is not a GUID", path: file.path, format: "vhdx")
        }
        // Hyper-V may record a second accepted GUID (parent_linkage2).
        let alternative = linkage2.flatMap(VHDXGUID.parse)
        guard let parent = (backing as? LayeredImage)?.layer as? VHDXLayer else {
            throw ImageError(.chain, "parent '\(name)' is a \(backing.info.format) image, but a differencing VHDX's parent must be a VHDX",
                             path: file.path, format: "vhdx")
        }
        let actual = parent.lock.run { parent.header.dataWriteGUID }
        if actual != expected && actual != alternative {
            throw ImageError(.chain, "parent '\(name)' has data write GUID \(VHDXGUID.string(actual)), but this differencing disk was made on \(VHDXGUID.string(expected)) (parent_linkage): the parent was replaced or written to since. Find the right parent",
                             path: file.path, format: "vhdx")
        }
    }

    // MARK: resize

    /// Grow the disk. The BAT gets the entries the new size needs: in its region when it
    /// has room, else a new BAT region at the end of the file (copied, then the region
    /// tables switched through the log). New blocks read as zeroes (fixed disks get them
    /// laid out at the end of the file). Shrinking is not supported.
    public func resize(to newSize: UInt64, shrink: Bool) throws {
        try allocLock.run {
            try lock.run {
                guard newSize % logicalSectorSize == 0 else {
                    throw ImageError(.invalidArgument, "this VHDX's sizes are whole \(logicalSectorSize)-byte sectors (got \(newSize))", path: file.path)
                }
                guard newSize <= VHDXMetadata.maxVirtualSize else {
                    throw ImageError(.invalidArgument, "VHDX images hold at most 64 TiB", path: file.path)
                }
                if newSize == virtualSize { return }
                guard newSize > virtualSize else {
                    throw ImageError(.unsupported, "shrinking VHDX images is not supported; convert to a smaller image instead", path: file.path)
                }
                guard writable else { throw ImageError(.readOnly, "image is open read-only", path: file.path) }
                try flushLocked()
                var h = header
                if !sessionStarted { h.fileWriteGUID = VHDXGUID.random() }
                h.dataWriteGUID = VHDXGUID.random()
                try writeHeadersLocked(h)
                sessionStarted = true
                dataChanged = true
                var updates: [(UInt64, [UInt8])] = []
                let need = Self.batEntriesNeeded(size: newSize, blockSize: blockSize, chunkRatio: chunkRatio, differencing: type == .differencing)
                var newRegions = regions
                if need * 8 > batLength {
                    let length = (need * 8).alignedUp(Self.mib)
                    guard length <= UInt64(UInt32.max) - Self.mib + 1 else {
                        throw ImageError(.invalidArgument, "the BAT for \(newSize) bytes would exceed 4 GiB; use a larger block size", path: file.path)
                    }
                    let at = try reserveLocked(length)
                    try prepareSpace(at: at, length: length)
                    var copied: UInt64 = 0
                    while copied < batLength {
                        let n = Int(min(Self.mib, batLength - copied))
                        try file.write(try readFile(at: batOffset + copied, count: n), at: at + copied)
                        copied += UInt64(n)
                    }
                    try file.sync()
                    let k = newRegions.entries.firstIndex { $0.guid == VHDXRegionTable.batGUID }!
                    newRegions.entries[k].fileOffset = at
                    newRegions.entries[k].length = UInt32(length)
                    let table = newRegions.serialized()
                    for off in VHDXRegionTable.offsets { updates.append((off, table)) }
                }
                // The virtual disk size item, its 4 KiB sector rewritten.
                guard let meta = regions.metadata,
                      let item = metadata.entries.first(where: { $0.guid == VHDXMetadata.virtualDiskSizeGUID && !$0.isUser }) else {
                    throw ImageError(.corrupt, "metadata lacks the virtual disk size item", path: file.path, format: "vhdx")
                }
                let itemAt = meta.fileOffset + UInt64(item.offset)
                let sectorAt = itemAt / Self.pageSize * Self.pageSize
                var sector = try readFile(at: sectorAt, count: Int(Self.pageSize))
                guard itemAt + 8 <= sectorAt + Self.pageSize else {
                    throw ImageError(.unsupported, "the virtual disk size item straddles a 4 KiB sector", path: file.path, format: "vhdx")
                }
                sector.putLE64(newSize, at: Int(itemAt - sectorAt))
                updates.append((sectorAt, sector))
                try commitThroughLogLocked(updates)
                cache.drop(owner: owner)
                regions = newRegions
                batOffset = newRegions.bat!.fileOffset
                batLength = UInt64(newRegions.bat!.length)
                let oldSize = virtualSize
                metadata.virtualDiskSize = newSize
                virtualSize = newSize
                if type == .fixed {
                    // Every block of a fixed disk is laid out.
                    let first = (oldSize + blockSize - 1) / blockSize
                    for i in first..<payloadBlocks {
                        let host = try reserveLocked(blockSize)
                        try prepareSpace(at: host, length: blockSize)
                        try setBATEntry(payloadEntryIndex(i), Self.entry(state: Self.fullyPresent, offset: host))
                    }
                }
                // The old last block's tail comes into view: it must read as zeroes.
                if oldSize % blockSize != 0 {
                    let i = oldSize / blockSize
                    let e = try batEntry(payloadEntryIndex(i))
                    if Self.state(e) == Self.fullyPresent || Self.state(e) == Self.partiallyPresent {
                        let host = try blockOffset(i, e)
                        try file.writeZeroes(at: host + oldSize % blockSize, length: blockSize - oldSize % blockSize)
                    }
                }
                try flushLocked()
            }
        }
    }
}

extension VHDXLayer {
    // MARK: parent changes

    /// Record a new parent (rebase): its data write GUID as parent_linkage and its
    /// names, in a new parent locator item written through the log (other metadata items
    /// stay where they are). Dropping the parent is refused: partially present blocks
    /// have no meaning in a dynamic disk.
    public func setBacking(name: String?, format: String?) throws {
        try allocLock.run {
            try lock.run {
                guard type == .differencing else {
                    throw ImageError(.unsupported, "a \(type.rawValue) VHDX cannot gain a parent; create a differencing child with 'vloop create -f vhdx -b PARENT -F vhdx'",
                                     path: file.path)
                }
                guard let name else {
                    throw ImageError(.unsupported, "a differencing VHDX cannot drop its parent; convert it to a standalone image instead", path: file.path)
                }
                if let format, ImageFormat(name: format) != .vhdx {
                    throw ImageError(.invalidArgument, "a differencing VHDX's parent must be a VHDX image, not \(format)", path: file.path)
                }
                guard writable else { throw ImageError(.readOnly, "image is open read-only", path: file.path) }
                let (info, sector) = try Self.parentInfo(name: name, child: file.path)
                guard UInt64(sector) == logicalSectorSize else {
                    throw ImageError(.invalidArgument, "parent '\(name)' has \(sector)-byte sectors, this disk \(logicalSectorSize)-byte ones", path: file.path)
                }
                try flushLocked()
                let pairs = Self.locatorPairs(info)
                try rewriteParentLocatorLocked(VHDXMetadata.serializeParentLocator(pairs))
                metadata.parentLocator = pairs
                parentName = VHDParentName.candidates(for: name).first ?? name
                var h = header
                if !sessionStarted { h.fileWriteGUID = VHDXGUID.random() }
                h.dataWriteGUID = VHDXGUID.random()
                try writeHeadersLocked(h)
                sessionStarted = true
                dataChanged = true
            }
        }
    }

    /// Put a new parent locator item in the metadata region: where the old one was when
    /// it fits there, else after the last item; table entry and data through the log.
    private func rewriteParentLocatorLocked(_ data: [UInt8]) throws {
        guard let meta = regions.metadata else { return }
        var table = try readFile(at: meta.fileOffset, count: VHDXMetadata.tableSize)
        let r = ByteReader(table)
        let count = Int(r.le16(10))
        var index: Int?
        var itemsEnd = UInt64(VHDXMetadata.tableSize)
        for i in 0..<count {
            let o = 32 + i * 32
            let off = UInt64(r.le32(o + 16)), len = UInt64(r.le32(o + 20))
            if len > 0 { itemsEnd = max(itemsEnd, off + len) }
            if r.slice(o, 16) == VHDXMetadata.parentLocatorGUID && r.le32(o + 24) & 1 == 0 { index = i }
        }
        guard let index else {
            throw ImageError(.corrupt, "the metadata has no parent locator item to rewrite", path: file.path, format: "vhdx")
        }
        let o = 32 + index * 32
        var at = UInt64(r.le32(o + 16))
        if UInt64(data.count) > UInt64(r.le32(o + 20)) && at + UInt64(r.le32(o + 20)) != itemsEnd {
            at = itemsEnd.alignedUp(8)
        }
        guard at + UInt64(data.count) <= UInt64(meta.length) else {
            throw ImageError(.unsupported, "the new parent locator does not fit in the metadata region", path: file.path, format: "vhdx")
        }
        table.putLE32(UInt32(at), at: o + 16)
        table.putLE32(UInt32(data.count), at: o + 20)
        // The item's sectors, read, patched, and logged with the table.
        let first = (meta.fileOffset + at) / Self.pageSize * Self.pageSize
        let last = (meta.fileOffset + at + UInt64(data.count)).alignedUp(Self.pageSize)
        var sectors = try readFile(at: first, count: Int(last - first))
        let start = Int(meta.fileOffset + at - first)
        sectors.replaceSubrange(start..<(start + data.count), with: data)
        var updates: [(UInt64, [UInt8])] = []
        if first >= meta.fileOffset + UInt64(VHDXMetadata.tableSize) {
            updates = [(first, sectors), (meta.fileOffset, table)]
        } else {
            // Item data inside the table's 64 KiB cannot be: items start at 64 KiB.
            throw ImageError(.corrupt, "parent locator item inside the metadata table", path: file.path, format: "vhdx")
        }
        try commitThroughLogLocked(updates)
    }

    // MARK: emptying

    /// Drop every block of a differencing disk (after commit): the parent shows through
    /// everywhere, and the file shrinks to its metadata.
    public func makeEmpty() throws {
        try allocLock.run {
            try lock.run {
                guard type == .differencing else {
                    throw ImageError(.unsupported, "only differencing VHDX images can be emptied", path: file.path)
                }
                try flushLocked()
                var h = header
                if !sessionStarted { h.fileWriteGUID = VHDXGUID.random() }
                h.dataWriteGUID = VHDXGUID.random()
                try writeHeadersLocked(h)
                sessionStarted = true
                dataChanged = true
                let entries = Self.batEntriesNeeded(size: virtualSize, blockSize: blockSize, chunkRatio: chunkRatio, differencing: true)
                for index in 0..<entries where try batEntry(index) != 0 {
                    try setBATEntry(index, 0)
                    if cache.isOverBudget(owner: owner) { try flushLocked() }
                }
                // The BAT stops pointing at the blocks before their space goes.
                try flushLocked()
                var end = Self.mib
                for r in metadataRanges { end = max(end, r.1) }
                end = end.alignedUp(Self.mib)
                if try file.size() > end { try file.truncate(to: end) }
                dataEnd = end
                fileLength = end
                try file.sync()
                // Commit changed the parent's data write GUID; an empty child is right over
                // whatever the parent now holds, so it records the parent's new identity.
                if let name = parentName, let (info, sector) = try? Self.parentInfo(name: name, child: file.path),
                   UInt64(sector) == logicalSectorSize {
                    let pairs = metadata.parentLocator.map { p in
                        p.key == "parent_linkage" ? (key: p.key, value: "{" + VHDXGUID.string(info.dataWriteGUID) + "}") : p
                    }.filter { $0.key != "parent_linkage2" }
                    try rewriteParentLocatorLocked(VHDXMetadata.serializeParentLocator(pairs))
                    metadata.parentLocator = pairs
                }
            }
        }
    }
}
