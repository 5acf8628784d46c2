import Foundation
import Testing
@testable import NBDServer
@testable import VirtualDisk
#if canImport(Glibc)
import Glibc
#endif

/// An image to serve, made by the commands in `create` (run in the test directory).
/// The served image is always "disk".
struct NBDVariant: CustomStringConvertible, Sendable {
    let name: String
    let create: [[String]]
    let format: String
    var description: String { name }
}

let nbdVariants: [NBDVariant] = [
    NBDVariant(name: "qcow2 by qemu-img, 4k clusters", create: [
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "disk", "48M"],
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 3M", "-c", "write -z 8M 2M", "-c", "write -P 0x33 30M 100k",
         "-c", "write -P 0x34 47M 12345", "disk"],
    ], format: "qcow2"),
    NBDVariant(name: "qcow2 over raw, by vloop create", create: [
        ["vloop", "create", "-q", "-f", "raw", "base", "40M"],
        ["qemu-io", "-f", "raw", "-c", "write -P 0x77 0 6M", "-c", "write -P 0x11 20M 1M", "base"],
        ["vloop", "create", "-q", "-f", "qcow2", "-b", "base", "-F", "raw", "disk"],
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 2M 1M", "-c", "write -z 5M 64k", "-c", "write -P 0x44 30M 64k", "disk"],
    ], format: "qcow2"),
]

@Suite("NBD server with real clients (nbdinfo, nbdcopy, qemu-img, qemu-io, fio)",
       .enabled(if: haveNBDTools), .serialized, .hangBackstop)
struct NBDServerTests {
    func make(_ v: NBDVariant, in dir: TempDir) throws {
        for c in v.create {
            let args = c[0] == "vloop" ? [nbdVloopBinary] + c.dropFirst() : c
            try sh(args, cwd: dir.path)
        }
    }

    /// The guest view as qemu-img sees it.
    func reference(_ image: String, format: String, in dir: TempDir) throws -> [UInt8] {
        let out = dir.file("ref-\(UUID().uuidString).raw")
        try sh(["qemu-img", "convert", "-U", "-f", format, "-O", "raw", image, out], cwd: dir.path)
        return try readFile(out)
    }

    /// `nbdinfo --map --json` as (offset, length, type), merging neighbours of one type.
    func nbdMap(_ uri: String, context: String = "base:allocation") throws -> [(UInt64, UInt64, UInt32)] {
        let json = try sh(["nbdinfo", "--map=\(context)", "--json", uri]).out
        let entries = try #require(try parseJSON(json) as? [[String: Any]])
        return merge(entries.map { e in
            ((e["offset"] as! NSNumber).uint64Value, (e["length"] as! NSNumber).uint64Value, (e["type"] as! NSNumber).uint32Value)
        })
    }

    func merge(_ runs: [(UInt64, UInt64, UInt32)]) -> [(UInt64, UInt64, UInt32)] {
        var out: [(UInt64, UInt64, UInt32)] = []
        for r in runs where r.1 > 0 {
            if let last = out.last, last.2 == r.2, last.0 + last.1 == r.0 {
                out[out.count - 1].1 += r.1
            } else {
                out.append(r)
            }
        }
        return out
    }

    /// What the map should be: the image's own extents, in the context's flags.
    func expectedMap(_ path: String, context: NBDMetaContext) throws -> [(UInt64, UInt64, UInt32)] {
        let image = try openRO(dir: path)
        defer { try? image.close() }
        let extents = try image.extents(at: 0, length: image.info.virtualSize)
        var offset: UInt64 = 0
        var runs: [(UInt64, UInt64, UInt32)] = []
        for e in extents {
            // The mappings as the spec and qemu's interop doc define them.
            let flags: UInt32
            switch (context, e.kind) {
            case (.baseAllocation, .data): flags = 0
            case (.baseAllocation, .zero): flags = 2            // NBD_STATE_ZERO
            case (.baseAllocation, .unallocated): flags = 3     // NBD_STATE_HOLE | NBD_STATE_ZERO
            case (.allocationDepth, .unallocated): flags = 0
            case (.allocationDepth, _): flags = UInt32(e.depth + 1)
            }
            runs.append((offset, e.length, flags))
            offset += e.length
        }
        return merge(runs)
    }

    func openRO(dir path: String) throws -> DiskImage {
        var o = OpenOptions(format: nil, writable: false)
        o.userNamed = [path]
        o.forceShare = true
        return try ImageOpener.open(path, options: o)
    }

    /// Bytes that qemu-img map reports as data (present in some layer, not known zero).
    func qemuDataRanges(_ path: String, in dir: TempDir) throws -> [(UInt64, UInt64)] {
        let json = try sh(["qemu-img", "map", "-U", "--output=json", path], cwd: dir.path).out
        let entries = try #require(try parseJSON(json) as? [[String: Any]])
        var out: [(UInt64, UInt64)] = []
        for e in entries where (e["data"] as? Bool) == true {
            let start = (e["start"] as! NSNumber).uint64Value, length = (e["length"] as! NSNumber).uint64Value
            if let last = out.last, last.0 + last.1 == start { out[out.count - 1].1 += length } else { out.append((start, length)) }
        }
        return out
    }

    @Test("nbdinfo size, --list and --map; nbdcopy and qemu-img convert bit-exact; concurrent clients", arguments: nbdVariants)
    func readPath(_ v: NBDVariant) throws {
        let dir = TempDir()
        try make(v, in: dir)
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "second.qcow2", "3M"], cwd: dir.path)
        let want = try reference("disk", format: v.format, in: dir)
        let info = try #require(try parseJSON(try sh(["qemu-img", "info", "-U", "--output=json", "disk"], cwd: dir.path).out) as? [String: Any])
        let size = (info["virtual-size"] as! NSNumber).uint64Value

        let server = try ServeProcess.start(["-f", v.format, "disk", "second.qcow2"], in: dir)
        // Size.
        let nbdInfo = try #require(try parseJSON(try sh(["nbdinfo", "--json", server.uri("disk")]).out) as? [String: Any])
        let export = try #require((nbdInfo["exports"] as? [[String: Any]])?.first)
        #expect((export["export-size"] as? NSNumber)?.uint64Value == size)
        #expect(export["can_multi_conn"] as? Bool == true && export["is_read_only"] as? Bool == false)
        #expect((export["contexts"] as? [String])?.contains("base:allocation") == true)
        // The default export is the first image.
        #expect(try sh(["nbdinfo", "--size", server.uri()]).out.trimmingCharacters(in: .whitespacesAndNewlines) == String(size))

        // List.
        let list = try #require(try parseJSON(try sh(["nbdinfo", "--list", "--json", server.uri()]).out) as? [String: Any])
        let names = ((list["exports"] as? [[String: Any]]) ?? []).compactMap { $0["export-name"] as? String }
        #expect(Set(names) == ["disk", "second.qcow2"])

        // Maps, in both contexts.
        let base = try nbdMap(server.uri("disk"))
        let depth = try nbdMap(server.uri("disk"), context: "qemu:allocation-depth")

        // Several clients at once, and one after another.
        var copies: [(Process, String)] = []
        for i in 0..<3 {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            p.arguments = ["nbdcopy", server.uri("disk"), dir.file("copy\(i).raw")]
            try p.run()
            copies.append((p, dir.file("copy\(i).raw")))
        }
        try sh(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri("disk"), dir.file("converted.raw")])
        for (p, path) in copies {
            p.waitUntilExit()
            #expect(p.terminationStatus == 0)
            #expect(try readFile(path) == want, "nbdcopy output differs from qemu-img convert")
        }
        #expect(try readFile(dir.file("converted.raw")) == want, "qemu-img convert from nbd:// differs")
        try sh(["nbdcopy", server.uri("second.qcow2"), dir.file("second.raw")])
        let secondWant = try reference("second.qcow2", format: "qcow2", in: dir)
        #expect(try readFile(dir.file("second.raw")) == secondWant)

        #expect(try server.stop() == 0, "server log: \(server.log)")
        try sh(["qemu-img", "check", "disk"], cwd: dir.path)

        let wantBase = try expectedMap(dir.file("disk"), context: .baseAllocation)
        #expect(base.map(\.0) == wantBase.map(\.0) && base.map(\.1) == wantBase.map(\.1) && base.map(\.2) == wantBase.map(\.2),
                "nbdinfo --map \(base) differs from the image's extents \(wantBase)")
        let wantDepth = try expectedMap(dir.file("disk"), context: .allocationDepth)
        #expect(depth.map(\.0) == wantDepth.map(\.0) && depth.map(\.1) == wantDepth.map(\.1) && depth.map(\.2) == wantDepth.map(\.2),
                "allocation depth \(depth) differs from \(wantDepth)")
        // And qemu, a peer, agrees on where the data is.
        let dataRuns = base.filter { $0.2 & NBD.stateZero == 0 }.map { ($0.0, $0.1) }
        let qemuData = try qemuDataRanges("disk", in: dir)
        #expect(dataRuns.map(\.0) == qemuData.map(\.0) && dataRuns.map(\.1) == qemuData.map(\.1),
                "data ranges: nbd \(dataRuns), qemu-img map \(qemuData)")
        #expect(!dataRuns.isEmpty && base.contains { $0.2 != 0 }, "the test image should mix data and zeroes")
    }

    /// The same qemu-io commands, through the server and directly on a copy.
    static let ioCommands = [
        "write -P 0x61 100k 300k",
        "write -f -P 0x62 7M 64k",          // FUA
        "write -z 2M 512k",                 // NO_HOLE: zeroes stay allocated
        "write -z -u 3M 1M",                // may unmap
        "discard 9M 1M", "write -P 0x63 9M 1M",  // trim, then defined contents again
        "write -P 0x64 33554431 1",         // unaligned, one byte
        "aio_write -P 0x65 12M 64k", "aio_write -P 0x66 13M 64k", "aio_flush",
        "flush",
    ]

    @Test("qemu-io writes through NBD; after the server stops, qemu-img check is clean and qemu-img compare matches", arguments: nbdVariants)
    func writePath(_ v: NBDVariant) throws {
        let dir = TempDir()
        try make(v, in: dir)
        try sh(["cp", "--sparse=always", "disk", "ref"], cwd: dir.path)
        let server = try ServeProcess.start(["-f", v.format, "disk"], in: dir)
        let io = try sh(["qemu-io", "-f", "raw"] + Self.ioCommands.flatMap { ["-c", $0] } + [server.uri("disk")])
        #expect(!io.out.contains("error") && !io.err.contains("error"), "qemu-io: \(io.out)\(io.err)")
        // Read back through the server too.
        let verify = try sh(["qemu-io", "-f", "raw", "-c", "read -P 0x61 100k 300k", "-c", "read -P 0 2M 512k", "-c", "read -P 0x63 9M 1M",
                             server.uri("disk")])
        #expect(!verify.out.contains("Pattern verification failed"), "\(verify.out)")
        #expect(try server.stop() == 0, "server log: \(server.log)")

        try sh(["qemu-io", "-f", v.format] + Self.ioCommands.flatMap { ["-c", $0] } + ["ref"], cwd: dir.path)
        try sh(["qemu-img", "check", "-f", v.format, "disk"], cwd: dir.path)
        try sh(["qemu-img", "compare", "-f", v.format, "-F", v.format, "disk", "ref"], cwd: dir.path)
    }

    @Test("nbdcopy into the server (zeroing, sparse writes) reproduces the source")
    func copyIn() throws {
        let dir = TempDir()
        try sh([nbdVloopBinary, "create", "-q", "-f", "qcow2", "disk", "24M"], cwd: dir.path)
        // A sparse source with data at scattered places.
        try sh(["truncate", "-s", "24M", "src.raw"], cwd: dir.path)
        for (seek, count) in [(0, 3), (17, 1), (40, 5), (95, 1)] {
            try sh(["dd", "if=/dev/urandom", "of=src.raw", "bs=256k", "seek=\(seek)", "count=\(count)", "conv=notrunc", "status=none"], cwd: dir.path)
        }
        // Data in the target where the source has holes: must end up zero.
        try sh(["qemu-io", "-f", "qcow2", "-c", "write -P 0xcc 8M 2M", "disk"], cwd: dir.path)
        let server = try ServeProcess.start(["disk"], in: dir)
        try sh(["nbdcopy", dir.file("src.raw"), server.uri("disk")])
        #expect(try server.stop() == 0, "server log: \(server.log)")
        try sh(["qemu-img", "check", "disk"], cwd: dir.path)
        try sh(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", "src.raw", "disk"], cwd: dir.path)
    }

    @Test("fio random writes with crc32c verification over two connections", .enabled(if: haveFio))
    func fio() throws {
        let dir = TempDir()
        try sh([nbdVloopBinary, "create", "-q", "-f", "qcow2", "-o", "cluster_size=16k", "disk", "64M"], cwd: dir.path)
        let server = try ServeProcess.start(["disk"], in: dir)
        let r = try sh(["fio", "--name=nbd", "--ioengine=nbd", "--uri=\(server.uri("disk"))", "--rw=randwrite", "--bsrange=4k-64k",
                        "--size=24M", "--numjobs=2", "--offset_increment=32M", "--iodepth=32", "--verify=crc32c",
                        "--verify_fatal=1", "--randseed=1234", "--output-format=terse"], cwd: dir.path, check: false)
        #expect(r.status == 0, "fio: \(r.err)")
        #expect(try server.stop() == 0, "server log: \(server.log)")
        try sh(["qemu-img", "check", "disk"], cwd: dir.path)
    }

    @Test("hostile and broken clients get errors or a closed connection; good clients keep working")
    func hostileClients() throws {
        let dir = TempDir()
        try sh([nbdVloopBinary, "create", "-q", "-f", "qcow2", "disk", "40M"], cwd: dir.path)
        try sh(["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 0 1M", "disk"], cwd: dir.path)
        let want = try reference("disk", format: "qcow2", in: dir)
        let server = try ServeProcess.start(["--handshake-limit", "2", "-v", "disk"], in: dir)

        // Random bytes from the start.
        var rng = SplitMix(state: 99)
        let garbage = try RawNBDClient(port: server.port)
        garbage.send((0..<4096).map { _ in UInt8.random(in: 0...255, using: &rng) })
        #expect(garbage.closedByServer())

        // A truncated handshake: half the client flags, then gone.
        do {
            let c = try RawNBDClient(port: server.port)
            _ = try c.receive(18)
            c.send([0, 0])
        }
        // Unknown client flags.
        let flags = try RawNBDClient(port: server.port)
        _ = try flags.receive(18)
        flags.send(nbd32(0x80))
        #expect(flags.closedByServer())
        // A request before the handshake.
        let early = try RawNBDClient(port: server.port)
        try early.greet()
        early.sendRequest(type: NBD.cmdRead, cookie: 1, offset: 0, length: 512)
        #expect(early.closedByServer())
        // An option claiming a gigabyte: refused at its header.
        let big = try RawNBDClient(port: server.port)
        try big.greet()
        big.send(nbd64(NBD.optionMagic) + nbd32(NBD.optGo) + nbd32(1 << 30))
        #expect(try big.optionReply().type == NBD.repErrTooBig)
        #expect(big.closedByServer())
        // Options sent without reading a single reply: the server stops reading rather
        // than queue replies without end, and the handshake limit ends it.
        let flood = try RawNBDClient(port: server.port)
        try flood.greet()
        let list = nbd64(NBD.optionMagic) + nbd32(NBD.optList) + nbd32(0)
        flood.send(Array([[UInt8]](repeating: list, count: 50_000).joined()))
        #expect(flood.closedByServer())
        // Silence: dropped after the handshake limit (2 s here), long before our 10 s timeout.
        let idle = try RawNBDClient(port: server.port)
        let start = Date()
        #expect(idle.closedByServer())
        #expect(Date().timeIntervalSince(start) < 8)

        // Disconnects in the middle of requests.
        do {
            let c = try RawNBDClient(port: server.port)
            try c.handshake(export: "disk")
            c.sendRequest(type: NBD.cmdWrite, cookie: 1, offset: 4 << 20, length: 1 << 20, payload: [UInt8](repeating: 1, count: 100_000))
        }
        do {
            let c = try RawNBDClient(port: server.port)
            try c.handshake(export: "disk", structured: false)
            for i in 0..<32 { c.sendRequest(type: NBD.cmdRead, cookie: UInt64(i), offset: 0, length: 16 << 20) }
        }

        // Oversized and invalid requests: error replies, and the connection goes on.
        let c = try RawNBDClient(port: server.port)
        let (size, _) = try c.handshake(export: "disk")
        #expect(size == UInt64(want.count))
        c.sendRequest(type: NBD.cmdRead, cookie: 10, offset: 0, length: 64 << 20)
        var chunk = try c.chunk()
        #expect(chunk.cookie == 10 && chunk.type == NBD.replyTypeError && chunk.flags & NBD.replyFlagDone != 0)
        #expect([NBD.EOVERFLOW, NBD.EINVAL].contains(nbdBE32(chunk.payload, 0)))
        let oversize = NBD.maxPayload + 65536
        c.sendRequest(type: NBD.cmdWrite, cookie: 11, offset: 0, length: UInt32(oversize))
        let block = [UInt8](repeating: 0xff, count: 1 << 20)
        var sent = 0
        while sent < oversize {
            let n = min(block.count, oversize - sent)
            #expect(c.send(Array(block[0..<n])))
            sent += n
        }
        // With structured replies negotiated, errors come as error chunks with a message.
        chunk = try c.chunk()
        #expect(chunk.cookie == 11 && chunk.type == NBD.replyTypeError && nbdBE32(chunk.payload, 0) == NBD.EINVAL)
        c.sendRequest(type: NBD.cmdRead, cookie: 12, offset: size - 512, length: 1024)
        chunk = try c.chunk()
        #expect(chunk.cookie == 12 && nbdBE32(chunk.payload, 0) == NBD.EINVAL)
        c.sendRequest(type: 99, cookie: 13, offset: 0, length: 0)
        chunk = try c.chunk()
        #expect(chunk.cookie == 13 && nbdBE32(chunk.payload, 0) == NBD.EINVAL)
        c.sendRequest(type: NBD.cmdBlockStatus, cookie: 14, offset: 0, length: 4096)
        chunk = try c.chunk()
        #expect(chunk.cookie == 14 && chunk.type == NBD.replyTypeError)
        // A good read after all that.
        c.sendRequest(type: NBD.cmdRead, cookie: 15, offset: 0, length: 4096)
        chunk = try c.chunk()
        #expect(chunk.cookie == 15 && chunk.type == NBD.replyTypeOffsetData && Array(chunk.payload[8...]) == Array(want[0..<4096]))
        c.sendRequest(type: NBD.cmdDisc, cookie: 16, offset: 0, length: 0)
        #expect(c.closedByServer())

        // The server is still up and serves a real client correctly.
        #expect(server.isRunning)
        try sh(["nbdcopy", server.uri("disk"), dir.file("after.raw")])
        #expect(try readFile(dir.file("after.raw")) == want)
        #expect(try server.stop() == 0, "server log: \(server.log)")
        try sh(["qemu-img", "check", "disk"], cwd: dir.path)
    }

    @Test("many requests in flight on one connection, answered in any order, all correct")
    func pipelining() throws {
        let dir = TempDir()
        try sh([nbdVloopBinary, "create", "-q", "-f", "qcow2", "disk", "16M"], cwd: dir.path)
        try sh(["qemu-io", "-f", "qcow2", "-c", "write -P 0x21 0 16M", "disk"], cwd: dir.path)
        let server = try ServeProcess.start(["disk"], in: dir)
        let c = try RawNBDClient(port: server.port)
        try c.handshake(export: "disk", structured: false)
        // Far more than the in-flight limit, sent without reading a single reply.
        let count = 500
        var payloads: [UInt64: UInt8] = [:]
        for i in 0..<count {
            let cookie = UInt64(1000 + i)
            let offset = UInt64(i % 256) * 65536
            if i < 256 {
                let byte = UInt8(truncatingIfNeeded: i)
                payloads[cookie] = byte
                c.sendRequest(type: NBD.cmdWrite, cookie: cookie, offset: offset, length: 65536, payload: [UInt8](repeating: byte, count: 65536))
            } else {
                c.sendRequest(type: NBD.cmdFlush, cookie: cookie, offset: 0, length: 0)
            }
        }
        var seen = Set<UInt64>()
        for _ in 0..<count {
            let r = try c.simpleReply()
            #expect(r.error == 0)
            #expect(seen.insert(r.cookie).inserted, "cookie \(r.cookie) answered twice")
        }
        #expect(seen.count == count)
        // Read everything back with reads in flight at once.
        for i in 0..<256 { c.sendRequest(type: NBD.cmdRead, cookie: UInt64(i), offset: UInt64(i) * 65536, length: 65536) }
        for _ in 0..<256 {
            let r = try c.simpleReply()
            let data = try c.receive(65536)
            #expect(r.error == 0 && data.allSatisfy { $0 == UInt8(truncatingIfNeeded: r.cookie) })
        }
        c.sendRequest(type: NBD.cmdDisc, cookie: 0, offset: 0, length: 0)
        #expect(try server.stop() == 0, "server log: \(server.log)")
        try sh(["qemu-img", "check", "disk"], cwd: dir.path)
    }

    @Test("reads that block on a slow disk run in parallel on one connection",
          .enabled(if: haveSlowDiskTools))
    func blockingReadsRunInParallel() throws {
        let dir = TempDir()
        let disk = try SlowDisk(in: dir, plugin: ["memory", "size=64M"])
        let server = try ServeProcess.start(["-r", "-f", "raw", disk.path], in: dir)
        defer { _ = try? server.stop() }  // before the disk goes, even when a check throws
        let count = 16
        try readConcurrently(server, export: "nbd", offsets: (0..<count).map { UInt64($0) << 22 }) { _, data in
            #expect(data.allSatisfy { $0 == 0 })
        }
        #expect(try server.stop() == 0, "server log: \(server.log)")
        let reads = try disk.reads()
        #expect(reads.count >= count)
        let most = SlowDisk.mostAtOnce(reads)
        #expect(most >= 2, "the disk only ever saw \(most) read at a time from a client with \(count) in flight")
        // The first read's slowness held up no other: the second started before it ended.
        let byStart = reads.sorted { $0.start < $1.start }
        if byStart.count >= 2 {
            #expect(byStart[1].start < byStart[0].end, "the second read reached the disk only after the first was done")
        }
    }

    @Test("reads of data the page cache does not hold go to the pool; what it holds is answered at once; all bit-exact",
          .enabled(if: tempDirOnDevice))
    func readsFromDiskAndMemory() throws {
        let dir = TempDir()
        // A chain, so that a read may need both files.
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "64M"], cwd: dir.path)
        try sh(["qemu-io", "-f", "qcow2", "-c", "write -P 0x71 0 64M", "base.qcow2"], cwd: dir.path)
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "disk.qcow2"], cwd: dir.path)
        try sh(["qemu-io", "-f", "qcow2", "-c", "write -P 0x72 4M 8M", "-c", "write -z 20M 1M", "disk.qcow2"], cwd: dir.path)
        let want = try reference("disk.qcow2", format: "qcow2", in: dir)
        let server = try ServeProcess.start(["-r", "disk.qcow2"], in: dir)
        defer { _ = try? server.stop() }
        func evict() {
            for f in ["base.qcow2", "disk.qcow2"] {
                let fd = open(dir.file(f), O_RDONLY)
                _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
                close(fd)
            }
        }
        // Random 4 KiB reads, many in flight: first with nothing cached, then again
        // with everything cached.
        var rng = SplitMix(state: 7)
        let offsets = (0..<256).map { _ in (rng.next() % (64 << 8)) << 12 }
        for round in ["evicted", "cached"] {
            if round == "evicted" { evict() }
            try readConcurrently(server, export: "disk.qcow2", offsets: offsets) { offset, data in
                #expect(data[...] == want[Int(offset)..<Int(offset) + 4096], "\(round): 4 KiB at \(offset) differs")
            }
        }
        evict()
        try sh(["nbdcopy", server.uri("disk.qcow2"), dir.file("copy.raw")])
        #expect(try readFile(dir.file("copy.raw")) == want, "nbdcopy of an evicted chain differs from qemu-img convert")
        #expect(try server.stop() == 0, "server log: \(server.log)")
    }

    /// Send 4 KiB reads at `offsets` all at once on one connection, then check each reply.
    func readConcurrently(_ server: ServeProcess, export: String, offsets: [UInt64], check: (UInt64, [UInt8]) -> Void) throws {
        let c = try RawNBDClient(port: server.port, receiveTimeout: 60)
        try c.handshake(export: export, structured: false)
        for (i, o) in offsets.enumerated() { c.sendRequest(type: NBD.cmdRead, cookie: UInt64(i), offset: o, length: 4096) }
        var seen = Set<UInt64>()
        for _ in offsets {
            let r = try c.simpleReply()
            let data = try c.receive(4096)
            #expect(r.error == 0)
            if r.cookie < offsets.count { check(offsets[Int(r.cookie)], data) }
            seen.insert(r.cookie)
        }
        #expect(seen == Set(0..<UInt64(offsets.count)))
        c.sendRequest(type: NBD.cmdDisc, cookie: 0, offset: 0, length: 0)
    }

    @Test("-e caps connections; later clients get in once others leave")
    func connectionCap() throws {
        let dir = TempDir()
        try sh([nbdVloopBinary, "create", "-q", "-f", "qcow2", "disk", "1M"], cwd: dir.path)
        let server = try ServeProcess.start(["-e", "2", "disk"], in: dir)
        var held: [RawNBDClient] = []
        for _ in 0..<2 {
            let c = try RawNBDClient(port: server.port)
            try c.handshake(export: "disk")
            held.append(c)
        }
        let third = try RawNBDClient(port: server.port, receiveTimeout: 5)
        #expect(third.closedByServer(), "a third client was served with -e 2")
        held.removeAll()
        var ok = false
        for _ in 0..<50 where !ok {
            ok = try sh(["nbdinfo", "--size", server.uri("disk")], check: false).status == 0
            if !ok { usleep(100_000) }
        }
        #expect(ok, "no client got in after the others left")
        #expect(try server.stop() == 0, "server log: \(server.log)")
    }

    @Test("SIGTERM with a client connected: requests finish, the image is flushed and closed clean")
    func shutdownWithClient() throws {
        let dir = TempDir()
        try sh([nbdVloopBinary, "create", "-q", "-f", "qcow2", "disk", "8M"], cwd: dir.path)
        let server = try ServeProcess.start(["disk"], in: dir)
        let c = try RawNBDClient(port: server.port)
        try c.handshake(export: "disk", structured: false)
        c.sendRequest(type: NBD.cmdWrite, cookie: 1, offset: 1 << 20, length: 65536, payload: [UInt8](repeating: 0x5e, count: 65536))
        #expect(try c.simpleReply() == (0, 1))
        #expect(try server.stop() == 0, "server log: \(server.log)")
        #expect(c.closedByServer())
        // Clean: no leaks, not marked dirty, and the write is there.
        try sh(["qemu-img", "check", "disk"], cwd: dir.path)
        let io = try sh(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5e 1M 64k", "disk"], cwd: dir.path)
        #expect(!io.out.contains("Pattern verification failed"))
    }

    @Test("a Unix socket, a read-only export named by -x, and the default export")
    func unixReadOnly() throws {
        let dir = TempDir()
        try sh([nbdVloopBinary, "create", "-q", "-f", "qcow2", "disk.qcow2", "2M"], cwd: dir.path)
        try sh(["qemu-io", "-f", "qcow2", "-c", "write -P 0x17 0 64k", "disk.qcow2"], cwd: dir.path)
        let sock = dir.file("nbd.sock")
        let server = try ServeProcess.start(["-r", "-x", "named", "-D", "a test disk", "disk.qcow2"], in: dir, unixSocket: sock)
        let info = try #require(try parseJSON(try sh(["nbdinfo", "--json", server.uri("named")]).out) as? [String: Any])
        let export = try #require((info["exports"] as? [[String: Any]])?.first)
        #expect(export["is_read_only"] as? Bool == true)
        #expect(export["can_trim"] as? Bool == false && export["can_zero"] as? Bool == false)
        #expect(export["description"] as? String == "a test disk")
        #expect(try sh(["nbdinfo", "--size", server.uri()]).out.trimmingCharacters(in: .whitespacesAndNewlines) == "2097152")
        let write = try sh(["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", server.uri("named")], check: false)
        #expect(write.status != 0 || write.out.contains("failed") || write.err.contains("failed") || write.err.contains("read-only") || write.err.contains("read only"),
                "a write to a read-only export succeeded: \(write.out)\(write.err)")
        try sh(["nbdcopy", server.uri("named"), dir.file("out.raw")])
        #expect(try readFile(dir.file("out.raw")) == (try reference("disk.qcow2", format: "qcow2", in: dir)))
        #expect(try server.stop() == 0, "server log: \(server.log)")
        #expect(!FileManager.default.fileExists(atPath: sock), "the socket file was left behind")
    }

    @Test("bad command lines fail with a message, and nothing is left listening")
    func badCommandLines() throws {
        let dir = TempDir()
        try sh([nbdVloopBinary, "create", "-q", "-f", "qcow2", "a", "1M"], cwd: dir.path)
        try sh(["mkdir", "sub"], cwd: dir.path)
        try sh([nbdVloopBinary, "create", "-q", "-f", "qcow2", "sub/a", "1M"], cwd: dir.path)
        let dup = try sh([nbdVloopBinary, "serve", "-p", String(try freeTCPPort()), "a", "sub/a"], cwd: dir.path, check: false)
        #expect(dup.status != 0 && dup.err.contains("'a'"), "\(dup.err)")
        let missing = try sh([nbdVloopBinary, "serve", "-p", String(try freeTCPPort()), "nope.qcow2"], cwd: dir.path, check: false)
        #expect(missing.status != 0 && missing.err.contains("nope.qcow2"), "\(missing.err)")
        let twoNames = try sh([nbdVloopBinary, "serve", "-x", "n", "a", "sub/a"], cwd: dir.path, check: false)
        #expect(twoNames.status != 0)
        // A port already taken.
        let server = try ServeProcess.start(["a"], in: dir)
        let taken = try sh([nbdVloopBinary, "serve", "-p", String(server.port), "sub/a"], cwd: dir.path, check: false)
        #expect(taken.status != 0 && taken.err.contains("cannot listen"), "\(taken.err)")
        #expect(try server.stop() == 0)
    }
}
