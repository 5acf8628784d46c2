import CVloop

/// Writing compressed clusters (`convert -c`): each cluster is deflated (or zstd'd) and
/// packed byte-contiguously after the previous one, as qemu does; host clusters holding
/// compressed data carry one reference per compressed cluster in them.
extension QCOW2Layer: CompressingLayer {
    public var compressionUnit: UInt64 { clusterSize }

    public func compressUnit(_ data: UnsafeRawBufferPointer, at offset: UInt64) -> [UInt8]? {
        let size = Int(clusterSize)
        var full = [UInt8](repeating: 0, count: size)
        full.withUnsafeMutableBytes { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: data[0..<min(data.count, size)])) }
        var out = [UInt8](repeating: 0, count: size)
        let n: Int = full.withUnsafeBytes { src in
            out.withUnsafeMutableBytes { dst in
                zstd
                    ? Int(vl_zstd_compress(src.baseAddress, src.count, dst.baseAddress, dst.count - 1, 3))
                    : Int(vl_deflate_raw(src.baseAddress, src.count, dst.baseAddress, dst.count - 1, 6))
            }
        }
        // Not worth it unless it saves at least a sector.
        guard n > 0, n < size - 512 else { return nil }
        out.removeSubrange(n...)
        return out
    }

    public func storeUnit(_ data: UnsafeRawBufferPointer, packed: [UInt8]?, at offset: UInt64) throws {
        guard !externalData else {
            throw ImageError(.unsupported, "compressed clusters cannot be used with an external data file", path: file.path)
        }
        let c = offset / clusterSize
        guard offset % clusterSize == 0 else { throw ImageError(.invalidArgument, "compressed writes must be cluster aligned") }
        guard let packed else {
            // Does not shrink: store plainly (the whole cluster, zero-padded at the disk's end).
            var full = [UInt8](repeating: 0, count: Int(clusterSize))
            full.withUnsafeMutableBytes { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: data[0..<min(data.count, Int(clusterSize))])) }
            try full.withUnsafeBytes { try write($0, at: offset, below: { _, b in b.initializeMemory(as: UInt8.self, repeating: 0) }) }
            return
        }
        let n = packed.count
        try allocLock.run {
            try lock.run {
                let old = try l2Entry(guestCluster: c)
                let host = try allocateCompressedBytes(UInt64(n))
                try file.write(packed, at: host)
                let x = compressedOffsetBits
                let sectors = (host + UInt64(n) - 1) / 512 - host / 512
                let entry = L2Entry.compressed | host | sectors << x
                try setL2Entry(guestCluster: c, L2Entry(raw: entry, bitmap: 0))
                try releaseEntry(old, deferred: false)
            }
        }
    }

    /// Byte-granular allocation for compressed data, packed as qemu packs it: each piece
    /// starts where the last one ended when that was in the last cluster of the file,
    /// and may run on into fresh clusters right after it. Every host cluster a piece
    /// touches holds one reference for it.
    private func allocateCompressedBytes(_ n: UInt64) throws -> UInt64 {
        if let cursor = compressedCursor, cursor % clusterSize != 0, cursor / clusterSize + 1 == endCluster {
            let first = cursor / clusterSize
            let last = (cursor + n - 1) / clusterSize
            try setRefcount(cluster: first, try refcount(cluster: first) + 1)
            if last > first {
                // `endCluster` is `first + 1` here, so these follow on directly.
                let more = try allocateContiguous(last - first)
                guard more == (first + 1) * clusterSize else {
                    throw ImageError(.io, "compressed data allocation was not contiguous", path: file.path, format: "qcow2")
                }
            }
            compressedCursor = cursor + n
            return cursor
        }
        let clusters = n.alignedUp(clusterSize) / clusterSize
        let start = try allocateContiguous(clusters)
        compressedCursor = start + n
        return start
    }
}
