import Foundation
import Testing
@testable import VirtualDisk

@Suite("QCOW2 edge cases")
struct QCOW2EdgeTests {
    /// Patch bytes of a file.
    func patch(_ path: String, at offset: UInt64, _ bytes: [UInt8]) throws {
        let fh = FileHandle(forUpdatingAtPath: path)!
        fh.seek(toFileOffset: offset)
        fh.write(Data(bytes))
        fh.closeFile()
    }

    @Test("created images are no larger than qemu-img's", arguments: ["", "cluster_size=512", "cluster_size=2M", "extended_l2=on", "refcount_bits=1", "compat=0.10"])
    func createdSize(_ options: String) throws {
        let dir = TempDir()
        var r = CreateRequest(path: dir.file("ours.qcow2"), format: .qcow2, size: 1 << 30)
        r.options = try OptionList.parse(options)
        try CreateOperation.run(r)
        try sh(["qemu-img", "create", "-q", "-f", "qcow2"] + (options.isEmpty ? [] : ["-o", options]) + [dir.file("theirs.qcow2"), "1G"])
        let ours = try FileManager.default.attributesOfItem(atPath: dir.file("ours.qcow2"))[.size] as! Int
        let theirs = try FileManager.default.attributesOfItem(atPath: dir.file("theirs.qcow2"))[.size] as! Int
        #expect(ours <= theirs, "\(options): \(ours) > \(theirs)")
        // Allocated: the header, the refcount table, the refcount block and the L1
        // table each take one 4 KiB block; their zero tails are holes.
        let allocated = try dataBytes(dir.file("ours.qcow2"), 0, ours)
        #expect(allocated <= 4 * 4096, "\(options): \(allocated) bytes allocated")
        try sh(["qemu-img", "check", dir.file("ours.qcow2")])
    }

    /// A qcow2 made by qemu-img with 64 KiB of 0x11 at 0: its path, its bytes, and the
    /// offsets of its L1 and refcount tables.
    func writtenImage(in dir: TempDir, size: String) throws -> (path: String, bytes: [UInt8], l1: UInt64, refcountTable: UInt64) {
        let path = dir.file("w.qcow2")
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", path, size])
        try sh(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", path])
        let bytes = try readFile(path)
        return (path, bytes, ByteReader(bytes).be64(40), ByteReader(bytes).be64(48))
    }

    /// Bytes of `path` that hold data (not holes) in `offset..<offset+length`.
    func dataBytes(_ path: String, _ offset: Int, _ length: Int) throws -> Int {
        let seekData: Int32 = 3, seekHole: Int32 = 4  // Linux's SEEK_DATA, SEEK_HOLE (_GNU_SOURCE)
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw TestFailure("open \(path): errno \(errno)") }
        defer { close(fd) }
        var total = 0, at = offset
        while at < offset + length {
            let data = lseek(fd, at, seekData)
            if data < 0 || data >= offset + length { break }
            let hole = min(lseek(fd, data, seekHole), offset + length)
            total += hole - data
            at = hole
        }
        return total
    }

    @Test("tables are cached and written in 4 KiB pages: a cold read of a 2 MiB-cluster image loads 8 KiB, a new L2 table with one entry takes two blocks")
    func metadataPages() throws {
        let dir = TempDir()
        let path = dir.file("big.qcow2")
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", path, "2T"])
        try sh(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 40G 64k", path])

        // One read, cold: the L1 page and the L2 page that map it, 4 KiB each.
        let cache = MetadataCache(budget: 8 << 20)
        var ro = OpenOptions(format: .qcow2, writable: false)
        ro.userNamed = [path]
        ro.cache = cache
        let image = try ImageOpener.open(path, options: ro)
        #expect(try image.read(at: (40 << 30) + 4096, count: 4096) == [UInt8](repeating: 0x5a, count: 4096))
        #expect(cache.statistics.pages == 2 && cache.statistics.used == 2 * (4096 + MetadataCache.pageOverhead),
                "\(cache.statistics)")
        try image.close()

        // A write at 1 TiB + 4 GiB + 600 MiB makes the third L2 table (512 GiB each); the
        // entry, cluster 2348 of the table's 262144, lies in its page 4. The cluster's
        // first block (so that the file reaches it) and that page are written, no more.
        var rw = OpenOptions(format: .qcow2, writable: true)
        rw.userNamed = [path]
        rw.cache = cache
        let writer = try ImageOpener.open(path, options: rw)
        try writer.write([UInt8](repeating: 0xc3, count: 4096), at: 1_104_435_740_672)
        try writer.close()
        let header = try readFile(path)
        let l1 = ByteReader(header).be64(40)
        let fh = try #require(FileHandle(forReadingAtPath: path))
        fh.seek(toFileOffset: l1 + 16)
        let l2 = ByteReader([UInt8](fh.readData(ofLength: 8))).be64(0) & 0x00ff_ffff_ffff_fe00
        fh.closeFile()
        #expect(l2 != 0 && l2 % (2 << 20) == 0)
        let held = try dataBytes(path, Int(l2), 2 << 20)
        #expect(held > 0 && held <= 8192, "the new L2 table holds \(held) bytes of data")

        try sh(["qemu-img", "check", path])
        let io = try sh(["qemu-io", "-f", "qcow2", "-c", "read -P 0xc3 1104435740672 4k", "-c", "read -P 0x5a 40G 64k", "-c", "read -P 0 1104435736576 4k", path])
        #expect(!io.out.contains("Pattern verification failed"), "\(io.out)")
    }

    @Test("a refcount block or L2 table placed past the end of the file reads as zeroes but is never written there", arguments: ["refcount table", "L1", "refcount table, top"])
    func tablesPastTheEnd(_ which: String) throws {
        let dir = TempDir()
        let (path, bytes, l1, refcountTable) = try writtenImage(in: dir, size: "64M")
        let table = which == "L1" ? l1 : refcountTable
        // An entry 6.5 EB into the file (a fuzzer's 0x5a bytes), flags kept.
        // Or the last cluster below 2^64, where a page's end would overflow.
        let hostile: UInt64 = which == "refcount table, top" ? 0xffff_ffff_ffff_0000 : (which == "L1" ? 1 << 63 : 0) | 0x5a5a_5a5a_5a5a_0000
        try patch(path, at: table, (0..<8).map { UInt8(truncatingIfNeeded: hostile >> (56 - 8 * $0)) })
        let sizeBefore = bytes.count

        let image = try openRW(path)
        #expect(try image.read(at: 0, count: 512) == [UInt8](repeating: which == "L1" ? 0 : 0x11, count: 512))
        var refused: ImageError?
        do {
            try image.write([UInt8](repeating: 0x22, count: 4096), at: 1 << 20)
            try image.flush()
        } catch let e as ImageError { refused = e }
        // At the top of the range the page's read already fails (no file reaches there).
        let expected = which.hasSuffix("top") ? "is beyond any file" : "lies past the end of the file"
        #expect(refused?.code == .corrupt && refused?.message.contains(expected) == true, "\(String(describing: refused))")
        try? image.close()
        let sizeAfter = try #require(FileManager.default.attributesOfItem(atPath: path)[.size] as? Int)
        #expect(sizeAfter <= sizeBefore + (1 << 20), "the file grew from \(sizeBefore) to \(sizeAfter) bytes")
    }

    @Test("preallocation modes give clean images that read as zeroes", arguments: ["metadata", "falloc", "full"])
    func preallocation(_ mode: String) throws {
        let dir = TempDir()
        var r = CreateRequest(path: dir.file("p.qcow2"), format: .qcow2, size: 5 << 20)
        r.options = [("preallocation", mode)]
        try CreateOperation.run(r)
        try sh(["qemu-img", "check", dir.file("p.qcow2")])
        let map = try sh(["qemu-img", "map", "--output=json", dir.file("p.qcow2")]).out
        #expect(map.contains("\"data\": true"), "\(mode): clusters are not mapped")
        let img = try openRO(dir.file("p.qcow2"))
        #expect(try readAll(img).allSatisfy { $0 == 0 })
        try img.close()
    }

    @Test("unknown incompatible features are refused by name; the corrupt bit blocks writing")
    func featureBits() throws {
        let dir = TempDir()
        let path = dir.file("f.qcow2")
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", path, "1M"])
        // Bit 5 is unknown; qemu's feature table does not name it.
        try patch(path, at: 72 + 7, [0x20])
        do {
            _ = try openRO(path)
            Issue.record("opened an image with an unknown incompatible feature")
        } catch let e as ImageError {
            #expect(e.code == .unsupported && e.message.contains("bit 5"), "\(e)")
        }
        // The corrupt bit (1): read-only opens, read-write is refused with the repair hint.
        try patch(path, at: 72 + 7, [0x02])
        let ro = try openRO(path)
        try ro.close()
        do {
            _ = try openRW(path)
            Issue.record("opened a corrupt image read-write")
        } catch let e as ImageError {
            #expect(e.message.contains("check -r all"))
        }
    }

    @Test("encrypted images are refused clearly")
    func encrypted() throws {
        let dir = TempDir()
        // crypt_method 1 (AES) and 2 (LUKS) in the header.
        for method: UInt8 in [1, 2] {
            let path = dir.file("e\(method).qcow2")
            try sh(["qemu-img", "create", "-q", "-f", "qcow2", path, "1M"])
            try patch(path, at: 35, [method])
            do {
                _ = try openRO(path)
                Issue.record("opened an image with crypt_method \(method)")
            } catch let e as ImageError {
                #expect(e.code == .unsupported && e.message.contains("encrypted"))
            }
        }
        // A real LUKS image from qemu-img, when qemu can make one: its key-derivation
        // benchmark fails on a busy machine ("Unable to get accurate CPU usage").
        let luks = dir.file("luks.qcow2")
        let made = try sh(["qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s,data=pw",
                           "-o", "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10", luks, "1M"], check: false)
        if made.status == 0 {
            #expect(throws: ImageError.self) { _ = try openRO(luks) }
        }
    }

    @Test("hostile headers fail cleanly without huge allocations")
    func hostileHeaders() throws {
        let dir = TempDir()
        let path = dir.file("h.qcow2")
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", path, "1M"])
        let original = try readFile(path)
        let cases: [(Int, [UInt8])] = [
            (20, [0, 0, 0, 40]),                           // cluster_bits 40
            (36, [0xff, 0xff, 0xff, 0xff]),                // l1_size 4G entries
            (24, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]),  // virtual size beyond L1
            (56, [0x7f, 0xff, 0xff, 0xff]),                // refcount table clusters
            (60, [0x7f, 0xff, 0xff, 0xff]),                // snapshot count
            (100, [0, 0, 0x20, 0]),                        // header length 8192
            (96, [0, 0, 0, 9]),                            // refcount order 9
            (8, [0, 0, 0, 0, 0, 0, 0, 0x70, 0, 0, 0x20, 0]),  // backing name past the header
        ]
        for (offset, bytes) in cases {
            var b = original
            b.replaceSubrange(offset..<(offset + bytes.count), with: bytes)
            try Data(b).write(to: URL(fileURLWithPath: path))
            #expect(throws: ImageError.self, "patch at \(offset)") { _ = try openRO(path) }
        }
    }

    @Test("a write into a cluster whose L2 entry points at metadata or past the end of the file is refused, the file untouched")
    func inPlaceWritesStayInTheFile() throws {
        let dir = TempDir()
        let (path, clean, l1, refcountTable) = try writtenImage(in: dir, size: "1M")
        let l2 = ByteReader(clean).be64(Int(l1)) & 0x00ff_ffff_ffff_fe00
        let copied: UInt64 = 1 << 63
        let targets: [(String, UInt64, String)] = [("L1 table", l1, "the L1 table"), ("refcount table", refcountTable, "the refcount table"),
                                                   ("end of the file", 1 << 40, "past the end of the file")]
        for (what, host, named) in targets {
            var b = clean
            b.putBE64(host | copied, at: Int(l2))
            try Data(b).write(to: URL(fileURLWithPath: path))
            let img = try openRW(path)
            do {
                try img.write([UInt8](repeating: 0x22, count: 4096), at: 8192)
                Issue.record("a write through an L2 entry pointing at the \(what) went through")
            } catch let e as ImageError {
                #expect(e.code == .corrupt && e.path == path && e.message.contains(named) && e.message.contains("vloop check"), "\(what): \(e)")
            }
            try? img.close()
            #expect(try readFile(path) == b, "the \(what) case changed the file")
        }
    }

    @Test("an L2 table or refcount block that a damaged entry places over the L1 table or the refcount table is never written there",
          arguments: ["L2 over the L1 table", "L2 over the refcount table", "refcount block over the L1 table"])
    func tablesOverStructures(_ case_: String) throws {
        let dir = TempDir()
        let (path, clean, l1, refcountTable) = try writtenImage(in: dir, size: "64M")
        let copied: UInt64 = 1 << 63
        var b = clean
        switch case_ {
        case "L2 over the L1 table": b.putBE64(l1 | copied, at: Int(l1))
        case "L2 over the refcount table": b.putBE64(refcountTable | copied, at: Int(l1))
        default: b.putBE64(l1, at: Int(refcountTable))
        }
        try Data(b).write(to: URL(fileURLWithPath: path))
        let img = try openRW(path)
        var refused: ImageError?
        do {
            try img.write([UInt8](repeating: 0x22, count: 4096), at: 8192)
            try img.write([UInt8](repeating: 0x33, count: 4096), at: 32 << 20)
            try img.flush()
        } catch let e as ImageError { refused = e }
        try? img.close()
        let named = case_.hasSuffix("L1 table") ? "the L1 table" : "the refcount table"
        // Refused as the table is changed, or already as data would be written through it.
        #expect(refused?.code == .corrupt && refused?.message.contains(named) == true && refused?.message.contains("vloop check") == true,
                "\(case_): \(String(describing: refused))")
        // The header, the refcount table and the L1 table are as they were.
        let after = try readFile(path)
        for start in [0, Int(refcountTable), Int(l1)] {
            #expect(after[start..<(start + 65536)] == b[start..<(start + 65536)], "\(case_): the cluster at \(start) changed")
        }
    }

    @Test("measure is an upper bound of what convert writes")
    func measure() throws {
        let dir = TempDir()
        let src = dir.file("s.raw")
        try sh(["qemu-img", "create", "-q", "-f", "raw", src, "64M"])
        try sh(["qemu-io", "-f", "raw", "-c", "write -P 1 0 5M", "-c", "write -P 2 40M 3M", src])
        let s = try openRO(src)
        let m = try MeasureOperation.run(format: .qcow2, options: [], size: nil, source: s)
        try s.close()
        try sh(["qemu-img", "convert", "-O", "qcow2", src, dir.file("d.qcow2")])
        let actual = try FileManager.default.attributesOfItem(atPath: dir.file("d.qcow2"))[.size] as! Int
        #expect(UInt64(actual) <= m.required, "measured \(m.required), qemu-img wrote \(actual)")
        #expect(m.fullyAllocated >= 64 << 20)
    }

    /// The interleaving the stress test hunts for, forced: with extended L2, a write over a
    /// subcluster with data and one without pauses while it reads the backing file for
    /// the second; meanwhile another write goes in place into the first. The paused
    /// write must not bring back what the first subcluster held before.
    @Test("extended L2: a copy-on-write from the backing file does not undo a concurrent in-place write")
    func extendedL2InPlaceRace() throws {
        let dir = TempDir()
        try RawLayer.create(path: dir.file("base.raw"), size: 1 << 20)
        var r = CreateRequest(path: dir.file("top.qcow2"), format: .qcow2, size: 1 << 20)
        r.options = [("extended_l2", "on"), ("cluster_size", "64k")]
        r.backingFile = "base.raw"
        r.backingFormat = .raw
        try CreateOperation.run(r)
        var o = OpenOptions(format: .qcow2, writable: true)
        o.noBacking = true
        o.userNamed = [dir.file("top.qcow2")]
        let top = try ImageOpener.open(dir.file("top.qcow2"), options: o) as! LayeredImage
        let gate = GatedImage(try openRO(dir.file("base.raw")))
        let img = LayeredImage(layer: top.layer, backing: gate)
        defer { try? img.close() }
        try img.write([UInt8](repeating: 1, count: 2048), at: 0)  // subcluster 0 holds data, 1 does not
        gate.arm()
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            try! img.write([UInt8](repeating: 2, count: 2048), at: 1024)  // half of subcluster 1
            done.signal()
        }
        #expect(gate.waitUntilEntered(timeout: 30), "the write over both subclusters never read the backing file")
        try img.write([UInt8](repeating: 3, count: 512), at: 0)  // in place, while the other waits
        gate.release()
        #expect(done.wait(timeout: .now() + 30) == .success, "the paused write never finished")
        let got = try img.read(at: 0, count: 4096)
        #expect(got[0..<512].allSatisfy { $0 == 3 }, "the in-place write was undone: sector 0 holds \(got[0])")
        #expect(got[512..<1024].allSatisfy { $0 == 1 } && got[1024..<3072].allSatisfy { $0 == 2 } && got[3072..<4096].allSatisfy { $0 == 0 })
    }
}

/// A backing image whose next read, once armed, waits until released: it holds a
/// copy-on-write at a known point so a test can interleave another request there.
final class GatedImage: DiskImage, @unchecked Sendable {
    // Safe: `inner` is thread-safe; the gate state is guarded by `condition`.
    let inner: DiskImage
    private let condition = NSCondition()
    private var armed = false, entered = false, released = false

    init(_ inner: DiskImage) { self.inner = inner }

    func arm() { condition.lock(); armed = true; entered = false; released = false; condition.unlock() }

    func waitUntilEntered(timeout: TimeInterval) -> Bool {
        condition.lock(); defer { condition.unlock() }
        let deadline = Date().addingTimeInterval(timeout)
        while !entered { if !condition.wait(until: deadline) { return false } }
        return true
    }

    func release() { condition.lock(); released = true; condition.broadcast(); condition.unlock() }

    var info: ImageInfo { inner.info }
    var backingImage: DiskImage? { inner.backingImage }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        condition.lock()
        if armed {
            armed = false
            entered = true
            condition.broadcast()
            let deadline = Date().addingTimeInterval(30)
            while !released { if !condition.wait(until: deadline) { break } }
        }
        condition.unlock()
        try inner.read(into: buffer, at: offset)
    }

    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws { try inner.write(data, at: offset) }
    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool) throws { try inner.writeZeroes(at: offset, length: length, mayUnmap: mayUnmap) }
    func discard(at offset: UInt64, length: UInt64) throws { try inner.discard(at: offset, length: length) }
    func extents(at offset: UInt64, length: UInt64) throws -> [Extent] { try inner.extents(at: offset, length: length) }
    func flush() throws { try inner.flush() }
    func close() throws { try inner.close() }
}
