/// Resize, rebase (backing name) and emptying for QCOW2.
extension QCOW2Layer: ResizableLayer, BackingSettableLayer, EmptiableLayer, CheckableLayer {
    public func resize(to newSize: UInt64, shrink: Bool) throws {
        try allocLock.run {
            try lock.run {
                if header.nbSnapshots > 0 && newSize < header.size {
                    throw ImageError(.unsupported, "cannot shrink an image that has snapshots; delete them first", path: file.path)
                }
                if newSize < header.size {
                    // Free every cluster past the new end.
                    let firstGone = newSize.alignedUp(clusterSize) / clusterSize
                    let lastCluster = header.size.alignedUp(clusterSize) / clusterSize
                    var c = firstGone
                    while c < lastCluster {
                        let e = try l2Entry(guestCluster: c)
                        if e.raw != 0 || e.bitmap != 0 {
                            try setL2Entry(guestCluster: c, L2Entry(raw: 0, bitmap: 0))
                            try releaseEntry(e, deferred: false)
                        }
                        c += 1
                    }
                }
                let need = try header.requiredL1Entries(for: newSize)
                if need > UInt64(header.l1Size) { try growL1(to: need) }
                header.size = newSize
                try flushLocked()
                try writeHeaderFields()
                try file.sync()
            }
        }
    }

    /// Move the L1 table to a larger one at the end of the file.
    private func growL1(to entries: UInt64) throws {
        guard entries * 8 <= 32 << 20 else { throw ImageError(.invalidArgument, "size is too large for this cluster size", path: file.path) }
        try flushLocked()
        let bytes = entries * 8
        let newL1 = try allocateContiguous(bytes.alignedUp(clusterSize) / clusterSize)
        var table = [UInt8](repeating: 0, count: Int(bytes.alignedUp(clusterSize)))
        for i in 0..<UInt64(header.l1Size) { table.putBE64(try tableEntry(header.l1TableOffset, i), at: Int(i * 8)) }
        try file.write(table, at: newL1)
        try flushLocked()
        let old = header.l1TableOffset, oldSize = UInt64(header.l1Size) * 8
        header.l1TableOffset = newL1
        header.l1Size = UInt32(entries)
        try writeHeaderFields()
        try file.sync()
        forgetClusters(at: old, count: oldSize.alignedUp(clusterSize) / clusterSize)
        if oldSize > 0 { try freeRange(old, oldSize) }
    }

    public func setBacking(name: String?, format: String?) throws {
        try lock.run {
            try flushLocked()
            header.backingFile = name
            header.backingFormat = name == nil ? nil : format
            if name == nil { header.backingFileOffset = 0; header.backingFileSize = 0 }
            let bytes = try header.serialize()
            let r = ByteReader(bytes)
            header.backingFileOffset = r.be64(8)
            header.backingFileSize = r.be32(16)
            // The header cluster holds only the header, its extensions and the name.
            try file.write(bytes, at: 0)
            try file.sync()
        }
    }

    public func makeEmpty() throws {
        try allocLock.run {
            try lock.run {
                if header.nbSnapshots > 0 {
                    throw ImageError(.unsupported, "cannot empty an image with snapshots", path: file.path)
                }
                for c in 0..<(header.size.alignedUp(clusterSize) / clusterSize) {
                    let e = try l2Entry(guestCluster: c)
                    if e.raw == 0 && e.bitmap == 0 { continue }
                    try setL2Entry(guestCluster: c, L2Entry(raw: 0, bitmap: 0))
                    try releaseEntry(e, deferred: false)
                }
                try flushLocked()
            }
        }
    }
}

extension RawLayer: ResizableLayer {
    public func resize(to newSize: UInt64, shrink: Bool) throws { try resize(to: newSize) }
}
