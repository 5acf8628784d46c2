import Foundation
import Testing
@testable import VirtualDisk

/// Lookups in one image do not wait for each other's metadata reads
/// (`MetadataLock.lookup`, `MetadataCache.withPage`).
@Suite("lookups do not wait for each other's metadata I/O", .hangBackstop)
struct LookupConcurrencyTests {
    /// Run `body` on a thread of its own; the semaphore is signalled when it returns.
    func spawn(_ body: @escaping @Sendable () -> Void) -> DispatchSemaphore {
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            body()
            done.signal()
        }
        return done
    }

    final class Box<T>: @unchecked Sendable {
        // Safe: written by one thread before a semaphore is signalled, read after the wait.
        var value: T
        init(_ v: T) { value = v }
    }

    @Test("a page read in one lookup holds up neither another lookup nor a change; a change meanwhile restarts it")
    func loadsWithTheLockLetGo() throws {
        let cache = MetadataCache(budget: 1 << 20)
        let lock = MetadataLock()
        let owner = MetadataCache.newOwner()
        let entered = DispatchSemaphore(value: 0), gate = DispatchSemaphore(value: 0)
        let loads = Box(0), result = Box<UInt8>(0)
        // Lookup 1 misses and its read of the page stalls at the gate.
        let first = spawn {
            result.value = (try? lock.lookup {
                try cache.withPage(owner: owner, offset: 0, count: 1, load: {
                    loads.value += 1
                    entered.signal()
                    gate.wait()
                    $0[0] = UInt8(loads.value)
                }) { $0.bytes[0] }
            }) ?? 0
        }
        entered.wait()
        // Meanwhile another lookup (its own miss) and a change both get the lock.
        let second = spawn {
            _ = try? lock.lookup { try cache.withPage(owner: owner, offset: 4096, count: 1, load: { $0[0] = 9 }) { $0.bytes[0] } }
            lock.run {}
        }
        let otherDone = second.wait(timeout: .now() + 10) == .success
        #expect(otherDone, "a lookup or a change waited for another lookup's page read")
        // The change ran while page 0 was being read: lookup 1 reads it again.
        gate.signal()
        let again = entered.wait(timeout: .now() + 10) == .success
        gate.signal()
        #expect(first.wait(timeout: .now() + 20) == .success)
        #expect(again && loads.value == 2, "the lookup did not start again after a change")
        #expect(result.value == 2)
        // Without a change meanwhile, one read is enough.
        let once = Box(0)
        let v = try lock.lookup { try cache.withPage(owner: owner, offset: 8192, count: 1, load: { once.value += 1; $0[0] = 7 }) { $0.bytes[0] } }
        #expect(v == 7 && once.value == 1)
    }

    @Test("a page whose load needs another uncached page (a grain table and its directory) loads both and finishes")
    func nestedMisses() throws {
        let cache = MetadataCache(budget: 1 << 20)
        let lock = MetadataLock()
        let owner = MetadataCache.newOwner()
        let result = Box<UInt8>(0)
        let done = spawn {
            result.value = (try? lock.lookup {
                try cache.withPage(owner: owner, offset: 0, count: 1, load: { outer in
                    // The load of page 0 reads page 4096 first, itself a miss.
                    outer[0] = try cache.withPage(owner: owner, offset: 4096, count: 1, load: { $0[0] = 21 }) { $0.bytes[0] } * 2
                }) { $0.bytes[0] }
            }) ?? 0
        }
        #expect(done.wait(timeout: .now() + 10) == .success, "a miss inside a page's load hung")
        #expect(result.value == 42)
        // Both pages are cached now, and the lock is free.
        let both = try lock.lookup {
            try cache.withPage(owner: owner, offset: 4096, count: 1, load: { _ in Issue.record("page 4096 not cached") }) { $0.bytes[0] }
        }
        #expect(both == 21)
        lock.run {}
    }

    @Test("a lookup that changes keep restarting loads its page with the lock held after a few tries, and finishes")
    func restartsAreBounded() throws {
        let cache = MetadataCache(budget: 1 << 20)
        let lock = MetadataLock()
        let owner = MetadataCache.newOwner()
        let loads = Box(0), changesGotIn = Box(0), inTime = Box(0)
        let changes = Box<[DispatchSemaphore]>([])
        // Every page read lets a change in on another thread, if it can get the lock.
        let v = try lock.lookup {
            try cache.withPage(owner: owner, offset: 0, count: 1, load: {
                $0[0] = 5
                loads.value += 1
                // Without a cap this would go on for ever: stop letting changes in.
                if loads.value > 3 * MetadataLock.maxRestarts { return }
                let change = spawn {
                    lock.run {}
                    changesGotIn.value += 1
                }
                changes.value.append(change)
                if change.wait(timeout: .now() + 3) == .success { inTime.value += 1 }
            }) { $0.bytes[0] }
        }
        #expect(v == 5)
        #expect(loads.value == MetadataLock.maxRestarts + 1, "\(loads.value) page reads")
        // The last read held the lock: its change got in only after the lookup.
        #expect(inTime.value == MetadataLock.maxRestarts)
        #expect(changes.value.last?.wait(timeout: .now() + 10) == .success)
        #expect(changesGotIn.value == MetadataLock.maxRestarts + 1)
    }

    /// The first word of every L2 table in a qcow2 file: their host offsets, from the L1.
    func l2Offsets(_ path: String) throws -> [UInt64] {
        let bytes = try readFile(path)
        func be64(_ o: Int) -> UInt64 { bytes[o..<o + 8].reduce(0) { $0 << 8 | UInt64($1) } }
        let l1Size = Int(bytes[36..<40].reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
        let l1 = Int(be64(40))
        return (0..<l1Size).map { be64(l1 + 8 * $0) & 0x00ff_ffff_ffff_fe00 }.filter { $0 != 0 }
    }

    @Test("on a slow disk, reads through different L2 tables of one qcow2 load them at the same time",
          .enabled(if: haveSlowDiskTools))
    func l2LoadsOverlap() throws {
        let dir = TempDir()
        // 4 GiB, 64 KiB clusters: each L2 table maps 512 MiB; data in four of them.
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "disk.qcow2", "4G"], cwd: dir.path)
        let regions: [UInt64] = [0, 1, 2, 3].map { $0 << 30 }
        try sh(["qemu-io", "-f", "qcow2"] + regions.flatMap { ["-c", "write -P 0x6\($0 >> 30) \($0) 64k"] } + ["disk.qcow2"], cwd: dir.path)
        let tables = try l2Offsets(dir.file("disk.qcow2"))
        #expect(tables.count == regions.count)
        let disk = try SlowDisk(in: dir, nbdkit: ["--filter=delay", "file", "file=\(dir.file("disk.qcow2"))", "rdelay=200ms"], readOnly: true)
        let image = try openRO(disk.path, format: .qcow2)
        defer { try? image.close() }
        let done = regions.map { at in
            spawn {
                let data = try? image.read(at: at + 4096, count: 4096)
                #expect(data == [UInt8](repeating: 0x60 + UInt8(at >> 30), count: 4096))
            }
        }
        for d in done { d.wait() }
        let l2Reads = try disk.reads().filter { r in tables.contains { $0 < r.offset + r.count && r.offset < $0 + 65536 } }
        #expect(l2Reads.count >= regions.count)
        let most = SlowDisk.mostAtOnce(l2Reads)
        #expect(most >= 2, "the disk saw the \(regions.count) L2 tables read one at a time")
    }

    @Test("the first allocation in a full qcow2 looks for a free cluster without holding up reads elsewhere",
          .enabled(if: haveSlowDiskTools && geteuid() == 0))  // read-ahead is set in /sys
    func freeClusterScanLetsReadsThrough() throws {
        let dir = TempDir()
        // 4 KiB clusters, 64-bit refcounts: 512 refcounts per block, so the preallocated
        // 256 MiB hold about 130 refcount blocks. The 1 MiB the resize adds is
        // unallocated; qemu's write there takes the one free cluster below the end (and
        // one at the end), so after it every cluster in the file is in use.
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,refcount_bits=64,preallocation=metadata",
                "disk.qcow2", "256M"], cwd: dir.path)
        try sh(["qemu-img", "resize", "-q", "-f", "qcow2", "disk.qcow2", "257M"], cwd: dir.path)
        try sh(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 4k", "-c", "write 256M 4k", "disk.qcow2"], cwd: dir.path)
        // An NBD export cannot grow: room at the end of the file, free clusters past
        // every refcount block in use.
        try sh(["truncate", "-s", "+1M", "disk.qcow2"], cwd: dir.path)
        let disk = try SlowDisk(in: dir, nbdkit: ["--filter=delay", "file", "file=\(dir.file("disk.qcow2"))", "rdelay=20ms"],
                                readOnly: false)
        try disk.noReadAhead()
        let image = try openRW(disk.path, format: .qcow2)
        defer { try? image.close() }
        let started = try disk.reads().count
        // After opening, vloop looks for free clusters from the start of the file.
        let writer = spawn {
            do { try image.write([1, 2, 3], at: (256 << 20) + 65536) } catch { Issue.record("write: \(error)") }
        }
        // Once the writer is well into the refcount blocks, read elsewhere.
        var waited = 0
        while try disk.reads().count < started + 20 && waited < 1000 { usleep(10_000); waited += 1 }
        let reader = spawn {
            #expect((try? image.read(at: 0, count: 4096)) == [UInt8](repeating: 0x5a, count: 4096))
        }
        #expect(reader.wait(timeout: .now() + 60) == .success)
        let atRead = try disk.reads().count
        #expect(writer.wait(timeout: .now() + 60) == .success)
        let total = try disk.reads().count
        // The scan reads every refcount block; most of those reads came after the read.
        #expect(total - started > 100, "the writer read \(total - started) pages")
        #expect(total - atRead > 50, "the read waited for the scan: \(total - atRead) of \(total - started) reads came after it")
        #expect(try image.read(at: (256 << 20) + 65536, count: 3) == [1, 2, 3])
    }
}
