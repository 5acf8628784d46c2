import Synchronization

/// One process-wide cache of metadata pages (L1/L2 tables, refcount blocks, BAT pages,
/// bitmaps, grain tables) with a byte budget and LRU eviction.
///
/// Ownership and locking:
/// - A page belongs to one owner (an open image layer). Its bytes are read and changed
///   only by that owner, under the owner's own lock; the cache never touches them.
/// - The cache's lock guards only bookkeeping (the key map, the LRU list, pins, dirty
///   sets) and is never held across I/O: a miss loads the page without the lock, then
///   inserts it. Another image's metadata I/O therefore never blocks this one.
/// - A miss in an owner's lookup (`MetadataLock.lookup`) loads with the owner's lock
///   let go as well, so neither do other lookups in the same image wait for it; a
///   change to the owner's metadata meanwhile restarts the lookup.
/// - A miss fills a buffer the cache hands out: the bytes of a page evicted a moment
///   before when one of the same size is spare, else a fresh one. Serving random reads
///   across a huge image evicts a page for every miss; reusing its buffer keeps the
///   allocator from fragmenting under that churn, so the budget bounds the memory the
///   pages really take.
/// - Dirty pages are never evicted. The owner writes them back itself, in rank order
///   (`writeBack`), at flush or when `isOverBudget` says memory is tight. Rank encodes
///   the write-back order the format needs, e.g. for QCOW2: refcount blocks (0) before
///   the refcount table (1) before L2 tables (2) before the L1 table (3), with a
///   stable-storage barrier between ranks.
public final class MetadataCache: Sendable {
    /// The cache every image uses unless told otherwise.
    public static let shared = MetadataCache(budget: 32 << 20)

    public struct Key: Hashable, Sendable {
        let owner: UInt64
        let offset: UInt64
    }

    /// One page. `bytes` belongs to the owner (see the type's comment).
    public final class Page: @unchecked Sendable {
        // Safe: `bytes` and `rank` are only touched by the owning layer under its own lock;
        // `pins`, `dirty` and the LRU links only under the cache's lock.
        public var bytes: [UInt8]
        let key: Key
        var pins = 0
        var dirty = false
        var rank = 0
        var prev: Page?
        var next: Page?
        init(key: Key, bytes: [UInt8]) { self.key = key; self.bytes = bytes }
    }

    struct State {
        var budget: Int
        /// Bytes the cached pages take: their contents and `pageOverhead` each.
        var used = 0
        var pages: [Key: Page] = [:]
        var dirty: [UInt64: [UInt64: Page]] = [:]  // owner -> offset -> page
        /// owner -> the highest offset it has ever had a page at: a range above it holds
        /// nothing cached (a run of clusters just added at the end of an image).
        var highest: [UInt64: UInt64] = [:]
        var head: Page?  // most recently used
        var tail: Page?  // least recently used
        var hits: UInt64 = 0
        var misses: UInt64 = 0
        var peak = 0
        /// Buffers of evicted pages, for the next misses to fill (see the type's comment).
        var spares: [[UInt8]] = []
        var spareBytes = 0
        static let maxSpares = 8

        /// Keep a removed page's buffer for reuse. The spares stay small, a few buffers
        /// and no more than 1/16 of the budget, and the newest win: buffers of a size
        /// no miss asks for any more (a closed image's) give way.
        mutating func recycle(_ bytes: inout [UInt8]) {
            let limit = max(budget / 16, 64 << 10)
            guard bytes.count <= limit else { return }
            while spares.count >= Self.maxSpares || spareBytes + bytes.count > limit {
                spareBytes -= spares.removeFirst().count
            }
            var b: [UInt8] = []
            swap(&b, &bytes)
            spareBytes += b.count
            spares.append(b)
        }
        mutating func takeSpare(_ count: Int) -> [UInt8]? {
            guard let i = spares.firstIndex(where: { $0.count == count }) else { return nil }
            spareBytes -= count
            spares.swapAt(i, spares.count - 1)
            return spares.removeLast()
        }
        mutating func trimSpares() {
            while spareBytes > max(budget / 16, 64 << 10), let b = spares.popLast() { spareBytes -= b.count }
        }

        mutating func unlink(_ p: Page) {
            if let prev = p.prev { prev.next = p.next } else { head = p.next }
            if let next = p.next { next.prev = p.prev } else { tail = p.prev }
            p.prev = nil
            p.next = nil
        }
        mutating func pushFront(_ p: Page) {
            p.next = head
            p.prev = nil
            head?.prev = p
            head = p
            if tail == nil { tail = p }
        }
        mutating func remove(_ p: Page, recycling: Bool = true) {
            unlink(p)
            pages[p.key] = nil
            used -= MetadataCache.cost(p.bytes.count)
            if recycling && p.pins == 0 { recycle(&p.bytes) }
        }
        mutating func insert(_ p: Page) {
            pages[p.key] = p
            pushFront(p)
            used += MetadataCache.cost(p.bytes.count)
            peak = max(peak, used)
            highest[p.key.owner] = max(highest[p.key.owner] ?? 0, p.key.offset)
        }
        mutating func install(_ key: Key, _ bytes: [UInt8], rank: Int) {
            if let old = pages[key] {
                remove(old)
                dirty[key.owner]?[key.offset] = nil
            }
            let p = Page(key: key, bytes: bytes)
            p.dirty = true
            p.rank = rank
            insert(p)
            dirty[key.owner, default: [:]][key.offset] = p
        }
        mutating func invalidate(_ key: Key) {
            guard let p = pages[key] else { return }
            dirty[key.owner]?[key.offset] = nil
            if p.pins == 0 { remove(p) } else { pages[key] = nil; unlink(p); used -= MetadataCache.cost(p.bytes.count) }
        }
        /// Evict clean, unpinned pages from the cold end until within budget.
        mutating func evict() {
            var cursor = tail
            while used > budget, let p = cursor {
                cursor = p.prev
                if p.pins == 0 && !p.dirty { remove(p) }
            }
        }
    }

    private let state: Guarded<State>

    /// What a page costs beyond its contents, charged against the budget so that the
    /// budget bounds the memory the cache really takes: the page object, its key in the
    /// map, the array's header, and the allocator's rounding (about 190 bytes; for the
    /// 2 KiB grain tables of a VMDK that is a tenth more).
    public static let pageOverhead = 192
    static func cost(_ bytes: Int) -> Int { bytes + pageOverhead }
    private static let nextOwner = Atomic<UInt64>(1)

    public init(budget: Int) {
        state = Guarded(State(budget: max(budget, 64 << 10)))
    }

    /// A fresh owner id for an image layer.
    public static func newOwner() -> UInt64 { nextOwner.add(1, ordering: .relaxed).oldValue }

    public var budget: Int {
        get { state.withLock { $0.budget } }
    }

    public func setBudget(_ bytes: Int) {
        state.withLock { s in
            s.budget = max(bytes, 64 << 10)
            s.evict()
            s.trimSpares()
        }
    }

    public struct Statistics: Sendable {
        public var used: Int
        public var peak: Int
        public var pages: Int
        public var hits: UInt64
        public var misses: UInt64
    }

    public var statistics: Statistics {
        state.withLock { Statistics(used: $0.used, peak: $0.peak, pages: $0.pages.count, hits: $0.hits, misses: $0.misses) }
    }

    /// Run `body` with the page at `offset` pinned. On a miss, `load` fills a buffer of
    /// `count` bytes with the page (any old contents must all be overwritten).
    /// The caller must hold its own lock (the owner's pages are its alone).
    public func withPage<R>(owner: UInt64, offset: UInt64, count: Int,
                            load: (UnsafeMutableRawBufferPointer) throws -> Void,
                            _ body: (Page) throws -> R) throws -> R {
        let key = Key(owner: owner, offset: offset)
        var page: Page? = state.withLock { s in
            guard let p = s.pages[key] else { s.misses += 1; return nil }
            s.hits += 1
            p.pins += 1
            s.unlink(p)
            s.pushFront(p)
            return p
        }
        if page == nil {
            // Inside NonBlocking.attempt a miss is left to a thread that may wait: the
            // event loop allocates no pages (and lookups that miss are rare once warm).
            try NonBlocking.check()
            var spare = state.withLock { $0.takeSpare(count) }
            func fill() throws -> [UInt8] {
                // Moved, not copied: a second reference would make the write copy it.
                var b = spare.take() ?? [UInt8](repeating: 0, count: count)
                try b.withUnsafeMutableBytes(load)
                return b
            }
            // In a lookup, the owner's lock is let go while the page is read.
            var bytes = try MetadataLock.currentLookup?.loadUnlocked(fill) ?? fill()
            page = state.withLock { s in
                if let existing = s.pages[key] {
                    existing.pins += 1
                    s.recycle(&bytes)
                    return existing
                }
                let p = Page(key: key, bytes: bytes)
                p.pins = 1
                s.insert(p)
                s.evict()
                return p
            }
        }
        let p = page!
        defer { state.withLock { _ = $0; p.pins -= 1 } }
        return try body(p)
    }

    /// `withPage` for the common page: `count` bytes of `file` at `at`.
    public func withPage<R>(owner: UInt64, offset: UInt64, count: Int, from file: HostFile, at: UInt64,
                            _ body: (Page) throws -> R) throws -> R {
        try withPage(owner: owner, offset: offset, count: count, load: { try file.read(into: $0, at: at) }, body)
    }

    /// Put a page the owner has just created (a newly allocated table) into the cache,
    /// replacing anything cached at that offset, and mark it dirty.
    public func install(owner: UInt64, offset: UInt64, bytes: [UInt8], rank: Int) {
        state.withLock { s in
            s.install(Key(owner: owner, offset: offset), bytes, rank: rank)
            s.evict()
        }
    }

    /// `install` for a table cached in pages of `pageSize`: `bytes` is cut into pages
    /// starting at `offset`, each one installed dirty.
    public func install(owner: UInt64, offset: UInt64, bytes: [UInt8], pageSize: Int, rank: Int) {
        precondition(pageSize > 0 && bytes.count % pageSize == 0, "a table is a whole number of pages")
        state.withLock { s in
            for start in stride(from: 0, to: bytes.count, by: pageSize) {
                s.install(Key(owner: owner, offset: offset + UInt64(start)), Array(bytes[start..<(start + pageSize)]), rank: rank)
            }
            s.evict()
        }
    }

    /// Mark a page changed; it will be written back in rank order.
    public func markDirty(_ page: Page, rank: Int) {
        state.withLock { s in
            page.dirty = true
            page.rank = rank
            s.dirty[page.key.owner, default: [:]][page.key.offset] = page
        }
    }

    /// Forget a cached page (the cluster it lived in was freed or now holds data).
    public func invalidate(owner: UInt64, offset: UInt64) {
        state.withLock { $0.invalidate(Key(owner: owner, offset: offset)) }
    }

    /// Forget the pages of `pageSize` cached for `length` bytes from `offset` (a run of
    /// clusters that was freed or now holds data).
    public func invalidate(owner: UInt64, offset: UInt64, length: UInt64, pageSize: UInt64) {
        var at = offset
        let end = min(offset + length, state.withLock { s in s.highest[owner].map { $0 + 1 } ?? 0 })
        while at < end {
            // A few dozen pages per hold: a long run of big clusters must not keep every
            // other image's lookups waiting.
            state.withLock { s in
                for _ in 0..<64 where at < end {
                    s.invalidate(Key(owner: owner, offset: at))
                    at += pageSize
                }
            }
        }
    }

    /// True when the owner has dirty pages and the cache is over budget: the owner should
    /// write back now, at a point where its write order allows it.
    public func isOverBudget(owner: UInt64) -> Bool {
        state.withLock { s in s.used > s.budget && !(s.dirty[owner]?.isEmpty ?? true) }
    }

    public func hasDirtyPages(owner: UInt64) -> Bool {
        state.withLock { !($0.dirty[owner]?.isEmpty ?? true) }
    }

    /// Write back the owner's dirty pages, lowest rank first, calling `barrier` between
    /// ranks (and before the first, so data written before reaches storage before any
    /// metadata that exposes it). `write` receives each page's offset and bytes.
    public func writeBack(owner: UInt64, barrier: () throws -> Void,
                          write: (UInt64, [UInt8]) throws -> Void) throws {
        let dirty: [Page] = state.withLock { s in
            let pages = Array((s.dirty[owner] ?? [:]).values)
            for p in pages { p.pins += 1 }
            return pages
        }
        if dirty.isEmpty { return }
        defer { state.withLock { _ = $0; for p in dirty { p.pins -= 1 } } }
        let byRank = Dictionary(grouping: dirty, by: { $0.rank }).sorted { $0.key < $1.key }
        for (_, pages) in byRank {
            try barrier()
            for p in pages.sorted(by: { $0.key.offset < $1.key.offset }) {
                try write(p.key.offset, p.bytes)
                state.withLock { s in
                    p.dirty = false
                    s.dirty[owner]?[p.key.offset] = nil
                }
            }
        }
        state.withLock { $0.evict() }
    }

    /// Drop every page of an owner (after its final write-back, or to discard changes).
    public func drop(owner: UInt64) {
        state.withLock { s in
            let keys = s.pages.keys.filter { $0.owner == owner }
            for k in keys { if let p = s.pages[k] { s.remove(p, recycling: false) } }
            s.dirty[owner] = nil
            s.highest[owner] = nil
        }
    }
}
