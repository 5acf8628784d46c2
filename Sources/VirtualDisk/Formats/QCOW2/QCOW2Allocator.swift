/// Cluster allocation and refcounts (qcow2 spec, "Host cluster management").
///
/// Refcount entries are `refcount_bits` wide, packed big-endian; entries narrower than
/// a byte are packed from the least significant bit, as qemu does. All methods run
/// under `lock`, except `advanceFreeHint`, which takes it.
extension QCOW2Layer {
    var refcountsPerBlock: UInt64 { clusterSize * 8 / header.refcountBits }
    var refcountTableEntries: UInt64 { UInt64(header.refcountTableClusters) * clusterSize / 8 }
    var maxRefcount: UInt64 { header.refcountBits == 64 ? UInt64.max : (1 << header.refcountBits) - 1 }
    /// Refcount entries in one cached page of a refcount block.
    var refcountsPerPage: UInt64 { pageSize * 8 / header.refcountBits }

    /// Run `body` on the cached page of the refcount block at `blockOffset` that holds
    /// entry `index`, with the entry's index within the page.
    func withRefcountPage<R>(_ blockOffset: UInt64, _ index: UInt64, _ body: (MetadataCache.Page, UInt64) throws -> R) throws -> R {
        let page = blockOffset + index / refcountsPerPage * pageSize
        return try cache.withPage(owner: owner, offset: page, count: Int(pageSize), from: file, at: page) { p in
            try body(p, index % refcountsPerPage)
        }
    }

    func refcount(cluster c: UInt64) throws -> UInt64 {
        let block = c / refcountsPerBlock
        if block >= refcountTableEntries { return 0 }
        let blockOffset = try tableEntry(header.refcountTableOffset, block) & ~(clusterSize - 1)
        if blockOffset == 0 { return 0 }
        return try withRefcountPage(blockOffset, c % refcountsPerBlock) { p, i in
            Self.getRefcount(p.bytes, i, header.refcountOrder)
        }
    }

    static func getRefcount(_ b: [UInt8], _ i: UInt64, _ order: UInt32) -> UInt64 {
        switch order {
        case 0...2:
            let bits = UInt64(1) << UInt64(order)
            let perByte = 8 / bits
            let byte = b[Int(i / perByte)]
            return UInt64(byte >> UInt8((i % perByte) * bits)) & ((1 << bits) - 1)
        default:
            let width = Int(1 << (order - 3))
            var v: UInt64 = 0
            for k in 0..<width { v = v << 8 | UInt64(b[Int(i) * width + k]) }
            return v
        }
    }

    static func putRefcount(_ b: inout [UInt8], _ i: UInt64, _ order: UInt32, _ value: UInt64) {
        switch order {
        case 0...2:
            let bits = UInt64(1) << UInt64(order)
            let perByte = 8 / bits
            let shift = UInt8((i % perByte) * bits)
            let mask = UInt8((1 << bits) - 1) << shift
            let idx = Int(i / perByte)
            b[idx] = (b[idx] & ~mask) | (UInt8(value) << shift & mask)
        default:
            let width = Int(1 << (order - 3))
            for k in 0..<width { b[Int(i) * width + k] = UInt8(truncatingIfNeeded: value >> UInt64(8 * (width - 1 - k))) }
        }
    }

    /// Set a cluster's refcount, creating refcount blocks (and growing the refcount
    /// table) as needed. New refcount blocks go at the end of the file.
    func setRefcount(cluster c: UInt64, _ value: UInt64) throws {
        if value > maxRefcount {
            throw ImageError(.unsupported, "refcount of cluster \(c) would exceed \(maxRefcount) (refcount_bits=\(header.refcountBits))", path: file.path)
        }
        let block = c / refcountsPerBlock
        if block >= refcountTableEntries {
            try growRefcountTable(toCover: block + 1)
        }
        var blockOffset = try tableEntry(header.refcountTableOffset, block) & ~(clusterSize - 1)
        if blockOffset == 0 {
            if value == 0 { return }
            blockOffset = endCluster * clusterSize
            endCluster += 1
            installTable(at: blockOffset, [UInt8](repeating: 0, count: Int(clusterSize)), rank: Self.rankRefcountBlock)
            try setTableEntry(header.refcountTableOffset, block, blockOffset, rank: Self.rankRefcountTable)
            try setRefcount(cluster: blockOffset / clusterSize, 1)
        }
        try checkTableTarget(blockOffset + (c % refcountsPerBlock) / refcountsPerPage * pageSize, "refcount block for cluster \(c)")
        try withRefcountPage(blockOffset, c % refcountsPerBlock) { p, i in
            Self.putRefcount(&p.bytes, i, header.refcountOrder, value)
            cache.markDirty(p, rank: Self.rankRefcountBlock)
        }
        if value == 0 && c < freeHint { freeHint = c }
    }

    /// Move the refcount table to a larger one at the end of the file.
    func growRefcountTable(toCover blocks: UInt64) throws {
        // Everything dirty reaches the disk first: the new table is written directly and
        // must not point at refcount blocks that exist only in memory.
        try flushLocked()
        let oldOffset = header.refcountTableOffset
        let oldClusters = UInt64(header.refcountTableClusters)
        let oldEntries = refcountTableEntries
        // Room for the blocks asked for, the table itself and its blocks, plus slack.
        let wantEntries = max(blocks + blocks / 2 + 8, oldEntries * 2)
        let newClusters = (wantEntries * 8).alignedUp(clusterSize) / clusterSize
        guard newClusters <= 1 << 22 else {
            throw ImageError(.unsupported, "refcount table would grow past \(newClusters) clusters", path: file.path)
        }
        let newOffset = endCluster * clusterSize
        endCluster += newClusters
        var table = [UInt8](repeating: 0, count: Int(newClusters * clusterSize))
        for i in 0..<oldEntries {
            table.putBE64(try tableEntry(oldOffset, i), at: Int(i * 8))
        }
        try file.write(table, at: newOffset)
        try file.sync()
        header.refcountTableOffset = newOffset
        header.refcountTableClusters = UInt32(newClusters)
        try writeHeaderFields()
        try file.sync()
        forgetClusters(at: oldOffset, count: oldClusters)
        for k in 0..<newClusters { try setRefcount(cluster: newOffset / clusterSize + k, 1) }
        for k in 0..<oldClusters { try setRefcount(cluster: oldOffset / clusterSize + k, 0) }
    }

    /// Move `freeHint` up to the first free cluster (or the end of the file) before an
    /// allocation takes the lock for a change. After opening, the hint is 0 and the
    /// first free cluster may lie many refcount blocks on, in a large image; scanned
    /// under `run`, every read of the image would wait for all of them to load. Here each
    /// refcount block is scanned in a lookup section of its own: it is loaded with the
    /// lock let go and the lock is given up between blocks. The hint only ever passes
    /// clusters seen in use under the lock (a change that frees one lower moves it back
    /// down), so moving it here is as safe as in `allocateCluster`, which finishes the
    /// job under the lock. Call it under `allocLock`, without `lock`.
    func advanceFreeHint() throws {
        var more = true
        while more {
            // One refcount block per section; on to the next while none is free.
            more = try lock.lookup {
                if try freeClusterInHintBlock() == nil && freeHint < endCluster { return true }
                // Done: load the refcount block the next cluster at the end goes into, too.
                _ = try refcount(cluster: endCluster)
                return false
            }
        }
    }

    /// Allocate one cluster with refcount 1: the first free one at or after the hint
    /// within the hint's refcount block, else a new one at the end of the file. Free
    /// clusters further on are left for `advanceFreeHint` to find before the next
    /// allocation: a change scans at most one refcount block, so it holds the lock for
    /// the reads of one refcount table page and one block's pages at most.
    func allocateCluster() throws -> UInt64 {
        let c: UInt64
        if let free = try freeClusterInHintBlock() {
            c = free
            freeHint = c + 1
        } else {
            c = endCluster
            endCluster += 1
            if freeHint >= c { freeHint = endCluster }
        }
        try setRefcount(cluster: c, 1)
        let offset = c * clusterSize
        forgetClusters(at: offset)
        return offset
    }

    /// The first free cluster below the end of the file from `freeHint` to the end of
    /// its refcount block, moving the hint past the clusters in use. Reads the refcount
    /// table page and the block's pages, at most. Runs under `lock`.
    func freeClusterInHintBlock() throws -> UInt64? {
        guard freeHint < endCluster else { return nil }
        let block = freeHint / refcountsPerBlock
        let blockEnd = min(endCluster, (block + 1) * refcountsPerBlock)
        guard block < refcountTableEntries else { return freeHint }
        let blockOffset = try tableEntry(header.refcountTableOffset, block) & ~(clusterSize - 1)
        if blockOffset == 0 { return freeHint }
        let first = freeHint % refcountsPerBlock, last = blockEnd - block * refcountsPerBlock
        var free: UInt64?
        var i = first
        while i < last && free == nil {
            // Page by page: the rest of a page is scanned once it is loaded.
            let pageEnd = min(last, (i / refcountsPerPage + 1) * refcountsPerPage)
            free = try withRefcountPage(blockOffset, i) { p, within in
                var k = within
                while i < pageEnd {
                    if Self.getRefcount(p.bytes, k, header.refcountOrder) == 0 { return i }
                    i += 1
                    k += 1
                }
                return nil
            }
        }
        if let i = free {
            freeHint = block * refcountsPerBlock + i
            return freeHint
        }
        freeHint = blockEnd
        return nil
    }

    /// Allocate `n` contiguous clusters at the end of the file.
    func allocateContiguous(_ n: UInt64) throws -> UInt64 {
        let start = endCluster
        endCluster += n
        for k in 0..<n { try setRefcount(cluster: start + k, 1) }
        return start * clusterSize
    }

    /// Drop one reference from every cluster touched by a host range; clusters that
    /// reach zero are punched out of the file.
    func freeRange(_ offset: UInt64, _ length: UInt64) throws {
        if length == 0 { return }
        let first = offset / clusterSize
        let last = (offset + length - 1) / clusterSize
        for c in first...last {
            let rc = try refcount(cluster: c)
            if rc == 0 {
                throw ImageError(.corrupt, "freeing cluster \(c) whose refcount is already 0; run 'vloop check -r all'", path: file.path)
            }
            try setRefcount(cluster: c, rc - 1)
            if rc == 1 {
                forgetClusters(at: c * clusterSize)
                file.punchHole(at: c * clusterSize, length: clusterSize)
            }
        }
    }

    /// Release the host space an L2 entry holds: once no I/O can be using it (`deferred`
    /// waits for in-flight requests) and once the tables no longer pointing at it are
    /// on disk (both lists are drained in order by the flush path).
    func releaseEntry(_ e: L2Entry, deferred: Bool) throws {
        var range: (UInt64, UInt64)?
        if e.isCompressed {
            range = compressedRange(e.raw)
        } else if e.hostOffset != 0 && !externalData {
            range = (e.hostOffset, clusterSize)
        }
        guard let (off, len) = range else { return }
        if deferred { deferredFrees.append((off, len)) } else { pendingDecrements.append((off, len)) }
    }
}
