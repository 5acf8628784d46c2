import CVloop

/// Compressed grains (stream-optimized extents).
///
/// A grain is stored as a marker `lba (u64), size (u32)` followed by `size` bytes of
/// zlib data (RFC 1950: deflate with a 2-byte header and an Adler-32 trailer; libvmdk
/// and qemu's `uncompress` read exactly that), padded to a sector. VMware's layout:
///
///     header (gdOffset = GD_AT_END) | descriptor | grain | grain | … | GT marker | GT | …
///     | GD marker | GD | footer marker | footer (header with the real gdOffset) | EOS
///
/// qemu-img instead preallocates the tables after the descriptor, as in a
/// monolithicSparse extent; both are read, and both written.
///
/// Writing: every grain is written whole and compressed, appended at the end (a grain
/// already stored is never overwritten: the new copy is appended and its entry moved;
/// qemu refuses such writes with EIO). Partial writes collect in one pending grain that
/// is compressed when another grain is written, at flush, or before zeroing it. With
/// the GD at the end, new grains overwrite the old footer, and each flush appends the
/// changed grain tables, a new directory, footer and end-of-stream marker; between a
/// first write and the next flush the file has no footer.
enum VMDKZlib {
    /// zlib-wrap `data`; nil when it does not fit in `capacity` bytes.
    static func compress(_ data: UnsafeRawBufferPointer, capacity: Int) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: capacity + 6)
        out[0] = 0x78
        out[1] = 0x9c
        let n = out.withUnsafeMutableBytes { dst in
            Int(vl_deflate_raw(data.baseAddress, data.count, dst.baseAddress! + 2, capacity, 6))
        }
        guard n > 0 else { return nil }
        let a = adler32(data)
        out.removeSubrange((n + 6)...)
        out.putBE32(a, at: n + 2)
        return out
    }

    /// Inflate zlib data (or raw deflate, if there is no zlib header) into `out`;
    /// returns the bytes produced, or nil when the data is not a valid stream.
    static func decompress(_ src: [UInt8], into out: inout [UInt8]) -> Int? {
        var skip = 0
        if src.count >= 2, src[0] & 0x0f == 8, src[0] >> 4 <= 7, (UInt16(src[0]) << 8 | UInt16(src[1])) % 31 == 0, src[1] & 0x20 == 0 {
            skip = 2
        }
        let n = src.withUnsafeBytes { s in
            out.withUnsafeMutableBytes { d in
                vl_inflate_raw(s.baseAddress! + skip, s.count - skip, d.baseAddress, d.count)
            }
        }
        return n < 0 ? nil : n
    }

    static func adler32(_ data: UnsafeRawBufferPointer) -> UInt32 {
        var a: UInt32 = 1, b: UInt32 = 0
        var i = 0
        let n = data.count
        while i < n {
            let end = min(n, i + 5552)
            while i < end { a += UInt32(data[i]); b += a; i += 1 }
            a %= 65521
            b %= 65521
        }
        return b << 16 | a
    }
}

extension VMDKSparseExtent {
    /// Decompress the grain stored at `host`.
    func decodeGrain(host: UInt64, grain g: UInt64) throws -> [UInt8] {
        if let hit = decoded.withLock({ $0 }), hit.0 == host { return hit.1 }
        // Decompressing is work for a thread that may take its time.
        try NonBlocking.check()
        let f = sparseFile
        let limit = Int(grainBytes) * 2 + 512
        var size: Int
        var dataAt = host
        if markers {
            let m = ByteReader(try f.read(at: host, count: 12))
            size = Int(m.le32(8))
            dataAt = host + 12
            guard size > 0, size <= limit else {
                throw Self.corrupt(f, "compressed grain \(g) at offset \(host) has an invalid size (\(size) bytes)", offset: host)
            }
        } else {
            size = limit
        }
        guard dataAt < fileLength else { throw Self.corrupt(f, "compressed grain \(g) lies past the end of the file", offset: host) }
        size = min(size, Int(fileLength - dataAt))
        let src = try f.read(at: dataAt, count: size)
        var out = [UInt8](repeating: 0, count: Int(grainBytes))
        guard let n = VMDKZlib.decompress(src, into: &out) else {
            throw Self.corrupt(f, "compressed grain \(g) at offset \(host) does not inflate", offset: host)
        }
        let want = Int(min(grainBytes, length - min(length, g * grainBytes)))
        guard n >= want else {
            throw Self.corrupt(f, "compressed grain \(g) at offset \(host) holds \(n) bytes, \(want) expected", offset: host)
        }
        decoded.withLock { $0 = (host, out) }
        return out
    }

    func readEncoded(token: UInt64, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        let g = offset / grainBytes
        let inGrain = Int(offset - g * grainBytes)
        guard inGrain + buffer.count <= Int(grainBytes) else { throw Self.corrupt(sparseFile, "compressed read crosses a grain") }
        var bytes: [UInt8]
        if token == 0 {
            // The pending grain — or, if it was committed since `map`, wherever it is now.
            let now: [UInt8]? = try lock.lookup {
                if let p = pending, p.grain == g { return p.bytes }
                switch try grain(g) {
                case .compressed(let h): return try decodeGrain(host: h, grain: g)
                default: return nil
                }
            }
            guard let now else { throw Self.corrupt(sparseFile, "pending grain \(g) vanished") }
            bytes = now
        } else {
            bytes = try decodeGrain(host: token * 512, grain: g)
        }
        bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[inGrain..<(inGrain + buffer.count)])) }
    }

    /// Store part of grain `pos / grainBytes` compressed. Under `allocLock`.
    func writeCompressedGrain(_ part: UnsafeRawBufferPointer, at pos: UInt64, below: BelowReader) throws {
        let g = pos / grainBytes
        let inGrain = Int(pos - g * grainBytes)
        if g * grainBytes >= capacity { throw outsideCapacity(g) }
        let whole = inGrain == 0 && (part.count == Int(grainBytes) || pos + UInt64(part.count) == length)
        let current: Grain? = try lock.run {
            if let p = pending, p.grain == g { return nil }
            try commitPendingLocked()
            return whole ? .zero : try grain(g)
        }
        var bytes: [UInt8]
        if let current {
            bytes = try currentGrain(g, current, below: below)
        } else {
            bytes = lock.run { pending?.bytes } ?? [UInt8](repeating: 0, count: Int(grainBytes))
        }
        bytes.withUnsafeMutableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[inGrain..<(inGrain + part.count)]).copyMemory(from: part) }
        try lock.run {
            pending = (g, bytes)
            if whole { try commitPendingLocked() }
        }
    }

    /// Compress and append the pending grain, then point its entry at it. Under `lock`.
    func commitPendingLocked() throws {
        guard let p = pending else { return }
        pending = nil
        let n = Int(min(grainBytes, length - p.grain * grainBytes))
        let packed: [UInt8]? = p.bytes.withUnsafeBytes { VMDKZlib.compress(UnsafeRawBufferPointer(rebasing: $0[0..<n]), capacity: n * 2 + 1024) }
        guard let packed else { throw ImageError(.io, "cannot compress grain \(p.grain)", path: sparseFile.path, format: "vmdk") }
        try appendGrainLocked(p.grain, packed: packed, bytes: p.bytes)
    }

    /// Store grain `g` compressed beforehand by `VMDKZlib.compress` from `bytes` (the
    /// whole grain, or the extent's tail): `convert -c` compresses grains on several
    /// threads and stores them here in order.
    func storePackedGrain(_ g: UInt64, packed: [UInt8], bytes: UnsafeRawBufferPointer) throws {
        if g * grainBytes >= capacity { throw outsideCapacity(g) }
        var whole = [UInt8](repeating: 0, count: Int(grainBytes))
        whole.withUnsafeMutableBytes { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[0..<min(bytes.count, Int(grainBytes))])) }
        try allocLock.run {
            try lock.run {
                if let p = pending, p.grain == g { pending = nil }
                try commitPendingLocked()
                try appendGrainLocked(g, packed: packed, bytes: whole)
            }
        }
    }

    /// Append a grain record holding `packed` and point grain `g`'s entry at it. Under `lock`.
    private func appendGrainLocked(_ g: UInt64, packed: [UInt8], bytes: [UInt8]) throws {
        var record = [UInt8](repeating: 0, count: (12 + packed.count + 511) / 512 * 512)
        record.putLE64(g * grainBytes / 512, at: 0)
        record.putLE32(UInt32(packed.count), at: 8)
        record.putBytes(packed, at: 12)
        let host = try reserveLocked(UInt64(record.count))
        try sparseFile.write(record, at: host)
        decoded.withLock { $0 = (host, bytes) }
        try ensureGTLocked(g / gtEntries)
        try setGTEntry(g, host / 512)
    }

    /// Append the changed grain tables, a new grain directory, footer and end-of-stream
    /// marker (GD-at-end layout). Under `lock`.
    func writeStreamTailLocked() throws {
        guard streamDirty, var h = header else { return }
        let f = sparseFile
        try f.sync()  // grains before the tables that expose them
        var at = dataEnd
        let gtSpace = gtBytes.alignedUp(512)
        try cache.writeBack(owner: ownerGT, barrier: {}) { i, bytes in
            try f.write(VMDKMarker.metadata(type: VMDKMarker.grainTable, sectors: gtSpace / 512), at: at)
            try f.write(bytes + [UInt8](repeating: 0, count: Int(gtSpace) - bytes.count), at: at + 512)
            try setGDEntry(i, (at + 512) / 512)
            pendingGTs.remove(i)
            at += 512 + gtSpace
        }
        let gdSpace = gdBytes.alignedUp(512)
        try f.write(VMDKMarker.metadata(type: VMDKMarker.grainDirectory, sectors: gdSpace / 512), at: at)
        let newGD = at + 512
        var page: UInt64 = 0
        while page * Self.pageSize < gdBytes {
            let bytes = try withGDPage(page * Self.pageSize / entrySize) { p, _ in p.bytes }
            try f.write(bytes, at: newGD + page * Self.pageSize)
            page += 1
        }
        if gdSpace > gdBytes { try f.write([UInt8](repeating: 0, count: Int(gdSpace - gdBytes)), at: newGD + gdBytes) }
        cache.drop(owner: ownerGD)
        gdOffset = newGD
        at = newGD + gdSpace
        h.gdOffset = newGD / 512
        header = h
        try f.write(VMDKMarker.metadata(type: VMDKMarker.footer, sectors: 1), at: at)
        try f.write(h.serialized(), at: at + 512)
        try f.write(VMDKMarker.metadata(type: VMDKMarker.endOfStream, sectors: 0), at: at + 1024)
        try f.truncate(to: at + 1536)
        try f.sync()
        dataEnd = at
        fileLength = at + 1536
        streamDirty = false
    }
}
