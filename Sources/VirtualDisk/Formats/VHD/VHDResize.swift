/// Resize, parent changes (rebase), emptying (commit) and parent validation for VHD.
extension VHDLayer: ResizableLayer, BackingSettableLayer, EmptiableLayer, BackingValidatingLayer {
    // MARK: parent validation

    /// A differencing disk's parent must be the VHD whose footer unique id the child
    /// recorded: the same name may now hold another disk, whose bytes would show through
    /// the child's absent sectors unnoticed.
    public func validateBacking(_ backing: DiskImage) throws {
        let (isDifferencing, expected, name) = lock.run { (type == .differencing, header?.parentUniqueID ?? [], parentName ?? "") }
        guard isDifferencing, expected.contains(where: { $0 != 0 }) else { return }
        guard let parent = (backing as? LayeredImage)?.layer as? VHDLayer else {
            throw ImageError(.chain, "parent '\(name)' is a \(backing.info.format) image, but a differencing VHD's parent must be a VHD",
                             path: file.path, format: "vhd")
        }
        let actual = parent.lock.run { parent.footer.uniqueID }
        if actual != expected {
            throw ImageError(.chain, "parent '\(name)' has unique id \(VHDFooter.uuidString(actual)), but this differencing disk was made on unique id \(VHDFooter.uuidString(expected)): the parent was replaced or modified. Find the right parent; if '\(name)' is right after all, record it with 'vloop rebase -u -b \(name) -F vhd \(file.path)'",
                             path: file.path, format: "vhd")
        }
    }

    // MARK: resize

    /// New virtual size. The footer's size fields follow the image's own size rule: an
    /// image sized by `current_size` gets the exact size (and a matching geometry); one
    /// sized by CHS accepts only sizes a geometry expresses. Dynamic disks need a BAT
    /// entry per block: the BAT grows in place when nothing follows it, else it moves to
    /// the end of the file.
    public func resize(to newSize: UInt64, shrink: Bool) throws {
        try allocLock.run {
            try lock.run {
                guard newSize % 512 == 0 else {
                    throw ImageError(.invalidArgument, "VHD sizes are whole 512-byte sectors (got \(newSize))", path: file.path)
                }
                var f = footer
                if f.usesCurrentSize {
                    guard newSize / 512 <= VHDFooter.maxSectors else {
                        throw ImageError(.invalidArgument, "VHD images hold at most 2040 GiB", path: file.path)
                    }
                    if f.geometry != VHDFooter.maxGeometry { f.geometry = VHDFooter.geometry(forSectors: newSize / 512) }
                } else {
                    let (geo, size) = try VHDFooter.sizing(for: newSize, forceSize: false)
                    guard size == newSize else {
                        throw ImageError(.invalidArgument, "this VHD takes its size from its CHS geometry (creator '\(f.creatorApp)'), which cannot express \(newSize) bytes; the next size it can is \(size)",
                                         path: file.path)
                    }
                    f.geometry = geo
                }
                f.currentSize = newSize
                if type == .fixed {
                    try resizeFixedLocked(f, newSize)
                } else {
                    try resizeDynamicLocked(f, newSize)
                }
                virtualSize = footer.virtualSize
            }
        }
    }

    private func resizeFixedLocked(_ f: VHDFooter, _ newSize: UInt64) throws {
        let oldFooter = dataEnd
        let oldSize = virtualSize
        footer = f
        dataEnd = newSize
        // The footer moves first, so the file always ends with one.
        try writeFootersLocked()
        if newSize > oldSize {
            // What lay past the old disk (bytes beyond a CHS size, the old footer) now
            // shows: it must read as zeroes.
            try file.writeZeroes(at: oldSize, length: min(newSize, oldFooter + 512) - oldSize)
        }
        try file.truncate(to: newSize + 512)
        fileLength = newSize + 512
        try file.sync()
    }

    private func resizeDynamicLocked(_ f: VHDFooter, _ newSize: UInt64) throws {
        let need = (newSize + blockSize - 1) / blockSize
        guard need <= UInt64(UInt32.max) else {
            throw ImageError(.invalidArgument, "size \(newSize) needs more than 2^32 blocks of \(blockSize) bytes", path: file.path)
        }
        if need > UInt64(header!.maxTableEntries) {
            try growBATLocked(to: need)
        }
        if newSize < virtualSize {
            // Blocks wholly past the new end are dropped and their space given back.
            let oldBlocks = (virtualSize + blockSize - 1) / blockSize
            var dropped: [UInt64] = []
            var i = need
            while i < oldBlocks {
                let e = try batEntry(i)
                if e != Self.unallocated {
                    dropped.append(try blockOffset(i, e))
                    try setBATEntry(i, Self.unallocated)
                }
                i += 1
            }
            // The BAT stops pointing at them before their space goes.
            try flushLocked()
            for block in dropped {
                cache.invalidate(owner: owner, offset: block)
                file.punchHole(at: block, length: bitmapSize + blockSize)
            }
        }
        try flushLocked()
        footer = f
        try writeFootersLocked()
        try file.sync()
    }

    /// Make room for `entries` BAT entries.
    private func growBATLocked(to entries: UInt64) throws {
        try flushLocked()
        cache.drop(owner: owner)  // all clean now; page lengths change below
        var h = header!
        let oldBytes = batBytes
        let newBytes = entries * 4
        let ff = [UInt8](repeating: 0xff, count: 1 << 20)
        func fill(_ at: UInt64, _ length: UInt64) throws {
            var done: UInt64 = 0
            while done < length {
                let n = Int(min(UInt64(ff.count), length - done))
                try ff.withUnsafeBytes { try file.write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: at + done) }
                done += UInt64(n)
            }
        }
        if h.batOffset + newBytes <= (try firstStructure(after: h.batOffset + oldBytes)) {
            try fill(h.batOffset + oldBytes, newBytes - oldBytes)
            try file.sync()
        } else {
            // Move the BAT to the end: copy, then point the header at it. A crash before
            // the header is written leaves the old BAT in force (and a leak).
            let newOffset = dataEnd
            let space = newBytes.alignedUp(512)
            var copied: UInt64 = 0
            while copied < oldBytes {
                let n = Int(min(UInt64(1 << 20), oldBytes - copied))
                let bytes = try file.read(at: h.batOffset + copied, count: n)
                try file.write(bytes, at: newOffset + copied)
                copied += UInt64(n)
            }
            try fill(newOffset + oldBytes, space - oldBytes)
            let old = (h.batOffset, oldBytes)
            dataEnd = newOffset + space
            try writeFootersLocked()
            try file.sync()
            h.batOffset = newOffset
            header = h
            try writeHeaderLocked()
            try file.sync()
            file.punchHole(at: old.0, length: old.1)
        }
        h = header!
        h.maxTableEntries = UInt32(entries)
        header = h
        try writeHeaderLocked()
        try file.sync()
        cache.drop(owner: owner)  // pages read meanwhile were clean; the last one's length changed
    }

    /// The lowest file offset at or after `offset` that holds something: a block, locator
    /// data, the header, or the end of the data.
    private func firstStructure(after offset: UInt64) throws -> UInt64 {
        var lowest = dataEnd
        if footer.dataOffset >= offset { lowest = min(lowest, footer.dataOffset) }
        for l in header!.locators where !l.isEmpty && l.dataOffset >= offset { lowest = min(lowest, l.dataOffset) }
        for i in 0..<UInt64(header!.maxTableEntries) {
            let e = try batEntry(i)
            if e != Self.unallocated && UInt64(e) * 512 >= offset { lowest = min(lowest, UInt64(e) * 512) }
        }
        return lowest
    }

    // MARK: parent changes

    /// Record a new parent (rebase), or none: a differencing disk without a parent
    /// becomes a dynamic disk, whose absent sectors read as zeroes (rebase has copied in
    /// every sector where the old parent differed from zero). A dynamic disk cannot gain
    /// a parent this way: its absent sectors would change meaning.
    public func setBacking(name: String?, format: String?) throws {
        try allocLock.run {
            try lock.run {
                guard type != .fixed else {
                    throw ImageError(.unsupported, "fixed VHD images cannot have a parent", path: file.path)
                }
                guard let name else {
                    guard type == .differencing else { return }
                    try flushLocked()
                    var h = header!
                    h.clearParent()
                    header = h
                    type = .dynamic
                    footer.diskType = VHDFooter.DiskType.dynamic.rawValue
                    parentName = nil
                    try writeHeaderLocked()
                    try writeFootersLocked()
                    try file.sync()
                    return
                }
                guard type == .differencing else {
                    throw ImageError(.unsupported, "a dynamic VHD cannot gain a parent (its absent sectors read as zeroes, a differencing disk's as the parent's); create a differencing child with 'vloop create -f vhd -b \(name) -F vhd'",
                                     path: file.path)
                }
                if let format, ImageFormat(name: format) != .vhd {
                    throw ImageError(.invalidArgument, "a differencing VHD's parent must be a VHD image, not \(format)", path: file.path)
                }
                let info = try Self.parentInfo(name: name, child: file.path, mustExist: false)
                try flushLocked()
                try recordParentLocked(info)
            }
        }
    }

    /// Write locators, name, unique id and time stamp for a new parent. Locator data
    /// goes where the old locator of the same kind was when it fits, else at the end
    /// of the data (the footer moving past it first).
    private func recordParentLocked(_ info: VHDParentInfo) throws {
        var h = header!
        let old = h.locators
        h.clearParent()
        var placed: [(slot: Int, locator: VHDDynamicHeader.Locator, data: [UInt8])] = []
        var appendAt = dataEnd
        for (slot, payload) in Self.locatorPayloads(info, child: file.path).enumerated() {
            let space = max(UInt64(payload.data.count).alignedUp(512), 512)
            var at: UInt64
            if let reuse = old.first(where: { $0.code == payload.code && !$0.isEmpty && UInt64($0.dataLength).alignedUp(512) >= space && $0.dataOffset % 512 == 0 }) {
                at = reuse.dataOffset
            } else {
                at = appendAt
                appendAt += space
            }
            var data = payload.data
            data += [UInt8](repeating: 0, count: Int(space) - data.count)
            placed.append((slot, .init(code: payload.code, dataSpace: UInt32(space), dataLength: UInt32(payload.data.count), dataOffset: at), data))
        }
        if appendAt > dataEnd {
            dataEnd = appendAt
            try writeFootersLocked()
            try file.sync()
        }
        for p in placed {
            try file.write(p.data, at: p.locator.dataOffset)
            h.setLocator(p.slot, p.locator)
        }
        h.parentUniqueID = info.uniqueID
        h.parentTimestamp = info.timestamp
        h.parentName = VHDParentName.basename(info.absolutePath)
        try file.sync()
        header = h
        try writeHeaderLocked()
        try file.sync()
        parentName = VHDParentName.candidates(for: info.name).first ?? info.name
    }

    // MARK: emptying

    /// Drop every block of a differencing disk (after commit): the parent shows through
    /// everywhere, and the file shrinks to its metadata.
    public func makeEmpty() throws {
        try allocLock.run {
            try lock.run {
                guard type == .differencing else {
                    throw ImageError(.unsupported, "only differencing VHD images can be emptied", path: file.path)
                }
                try flushLocked()
                let entries = UInt64(header!.maxTableEntries)
                var dropped: [UInt64] = []
                for i in 0..<entries {
                    let e = try batEntry(i)
                    guard e != Self.unallocated else { continue }
                    dropped.append(UInt64(e) * 512)
                    try setBATEntry(i, Self.unallocated)
                }
                // The BAT stops pointing at the blocks before their space goes.
                try flushLocked()
                for block in dropped where block + bitmapSize + blockSize <= dataEnd && !overlapsMetadata(block, block + bitmapSize + blockSize) {
                    cache.invalidate(owner: owner, offset: block)
                    file.punchHole(at: block, length: bitmapSize + blockSize)
                }
                let end = metadataEndLocked()
                if end < dataEnd {
                    dataEnd = end
                    try writeFootersLocked()
                    try file.truncate(to: end + 512)
                    fileLength = end + 512
                }
                try file.sync()
            }
        }
    }

    /// End of the header, the BAT and the locator data, rounded up to a sector.
    func metadataEndLocked() -> UInt64 {
        guard let h = header else { return dataEnd }
        var end = max(footer.dataOffset + UInt64(VHDDynamicHeader.size), h.batOffset + batBytes)
        if type == .differencing {
            for l in h.locators where !l.isEmpty && l.dataOffset + UInt64(l.dataLength) <= fileLength {
                end = max(end, l.dataOffset + UInt64(l.dataLength))
            }
        }
        return end.alignedUp(512)
    }
}
