import Testing
@testable import VirtualDisk

/// The shared metadata cache on its own: budget, eviction, and the reuse of evicted
/// pages' buffers by later misses.
@Suite struct MetadataCacheTests {
    /// Load page `offset` (16 KiB, every byte `fill`), returning the buffer's address.
    @discardableResult
    func load(_ cache: MetadataCache, _ owner: UInt64, _ offset: UInt64, fill: UInt8) throws -> UInt {
        var address: UInt = 0
        try cache.withPage(owner: owner, offset: offset, count: 16 << 10, load: { b in
            address = UInt(bitPattern: b.baseAddress)
            b.initializeMemory(as: UInt8.self, repeating: fill)
        }) { p in
            #expect(p.bytes.allSatisfy { $0 == fill })
        }
        return address
    }

    /// Room for exactly four 16 KiB pages (each also costs `pageOverhead`).
    let budget = 4 * ((16 << 10) + MetadataCache.pageOverhead)

    @Test("the budget bounds the cached pages; a miss after an eviction fills the evicted page's buffer")
    func evictedBuffersAreReused() throws {
        let cache = MetadataCache(budget: budget)
        let owner = MetadataCache.newOwner()
        var addresses: [UInt] = []
        for i in 0..<40 {
            addresses.append(try load(cache, owner, UInt64(i) << 14, fill: UInt8(i + 1)))
            #expect(cache.statistics.used == min(i + 1, 4) * ((16 << 10) + MetadataCache.pageOverhead))
        }
        // Four pages fit. Loading page i evicts page i-4, and the next miss, page i+1,
        // is filled in that page's very buffer: it is still alive when handed over, so
        // the same address means it was not copied (or freed and allocated anew).
        let reused = (5..<40).filter { addresses[$0] == addresses[$0 - 5] }.count
        #expect(reused == 35, "\(reused) of 35 misses filled the buffer of the page evicted before them")
        // A reused buffer holds only the new page: a hit sees exactly what was loaded.
        try cache.withPage(owner: owner, offset: 39 << 14, count: 16 << 10, load: { _ in Issue.record("a miss on a cached page") }) { p in
            #expect(p.bytes.count == 16 << 10 && p.bytes.allSatisfy { $0 == 40 })
        }
    }

    @Test("a copy of a page's bytes taken before its eviction keeps them after the buffer is reused")
    func copiesSurviveReuse() throws {
        let cache = MetadataCache(budget: budget)
        let owner = MetadataCache.newOwner()
        try load(cache, owner, 0, fill: 0xAA)
        let copy = try cache.withPage(owner: owner, offset: 0, count: 16 << 10, load: { _ in }) { $0.bytes }
        for i in 1..<12 { try load(cache, owner, UInt64(i) << 14, fill: UInt8(i)) }
        #expect(copy.count == 16 << 10 && copy.allSatisfy { $0 == 0xAA })
    }

    @Test("buffers of another size are not handed out, and a dirty page is never evicted")
    func sizesAndDirtyPages() throws {
        let cache = MetadataCache(budget: budget)
        let owner = MetadataCache.newOwner()
        try cache.withPage(owner: owner, offset: 1 << 30, count: 4096, load: { $0.initializeMemory(as: UInt8.self, repeating: 7) }) { p in
            p.bytes[0] = 8
            cache.markDirty(p, rank: 0)
        }
        for i in 0..<10 { try load(cache, owner, UInt64(i) << 14, fill: UInt8(i + 1)) }
        try cache.withPage(owner: owner, offset: 1 << 30, count: 4096, load: { _ in Issue.record("the dirty page was evicted") }) { p in
            #expect(p.bytes.count == 4096 && p.bytes[0] == 8 && p.bytes[1] == 7)
        }
        // The evictions above left 16 KiB buffers spare: a 4 KiB miss gets a 4 KiB one.
        try cache.withPage(owner: owner, offset: 2 << 30, count: 4096, load: { b in
            #expect(b.count == 4096)
            b.initializeMemory(as: UInt8.self, repeating: 9)
        }) { p in
            #expect(p.bytes.count == 4096 && p.bytes.allSatisfy { $0 == 9 })
        }
        var written: [UInt64] = []
        try cache.writeBack(owner: owner, barrier: {}, write: { offset, bytes in written.append(offset); #expect(bytes.count == 4096) })
        #expect(written == [1 << 30])
    }

    /// Whether page `offset` (4 KiB) of `owner` is cached: a miss records nothing and
    /// leaves it uncached (the load throws).
    func cached(_ cache: MetadataCache, _ owner: UInt64, _ offset: UInt64) -> Bool {
        struct Miss: Error {}
        return (try? cache.withPage(owner: owner, offset: offset, count: 4096, load: { _ in throw Miss() }) { _ in true }) ?? false
    }

    @Test("a table installed as a run of pages is dirty page by page; invalidating a range forgets exactly its pages, also ones loaded later and higher")
    func pageRuns() throws {
        let cache = MetadataCache(budget: 1 << 20)
        let owner = MetadataCache.newOwner(), other = MetadataCache.newOwner()
        let table = (0..<16384).map { UInt8(truncatingIfNeeded: $0 / 4096 + 1) }
        cache.install(owner: owner, offset: 1 << 16, bytes: table, pageSize: 4096, rank: 2)
        cache.install(owner: other, offset: 1 << 16, bytes: table, pageSize: 4096, rank: 2)
        var written: [UInt64: UInt8] = [:]
        try cache.writeBack(owner: owner, barrier: {}, write: { off, bytes in
            #expect(bytes.count == 4096 && Set(bytes).count == 1)
            written[off] = bytes[0]
        })
        #expect(written == [0x10000: 1, 0x11000: 2, 0x12000: 3, 0x13000: 4])

        cache.invalidate(owner: owner, offset: 0x11000, length: 0x2000, pageSize: 4096)
        #expect([0x10000, 0x11000, 0x12000, 0x13000].map { cached(cache, owner, $0) } == [true, false, false, true])
        #expect(cached(cache, other, 0x11000), "another owner's page was forgotten")

        // A page loaded above everything installed so far is found by a later range.
        try cache.withPage(owner: owner, offset: 1 << 40, count: 4096, load: { _ in }) { _ in }
        cache.invalidate(owner: owner, offset: (1 << 40) - (1 << 30), length: 2 << 30, pageSize: 4096)
        #expect(!cached(cache, owner, 1 << 40))
        #expect(cached(cache, owner, 0x13000))
    }
}
