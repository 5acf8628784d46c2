import Foundation
import Testing
@testable import VirtualDisk

/// The `vloop` command line, driven as a user would, side by side with qemu-img.
@Suite("Command line")
struct CLITests {
    func vloop(_ args: [String], cwd: String? = nil) throws -> (status: Int32, out: String, err: String) {
        try sh([vloopBinary] + args, cwd: cwd, check: false)
    }

    @Test("map --start-offset and --max-length report what qemu-img map reports",
          arguments: [["-s", "0", "-l", "1M"], ["--start-offset", "100k", "--max-length", "3M"], ["--start-offset=2M"],
                      ["-l", "100G"], ["-s", "9M", "-l", "512"]])
    func mapRange(_ range: [String]) throws {
        let dir = TempDir()
        let img = dir.file("a.qcow2")
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "10M"])
        try sh(["qemu-io", "-f", "qcow2", "-c", "write -P 7 8k 8k", "-c", "write -z 1M 1M", "-c", "write -P 3 2052k 900k", img])
        let ours = try vloop(["map", "--output", "json"] + range + [img])
        let theirs = try sh(["qemu-img", "map", "--output=json"] + range + [img], check: false)
        #expect(ours.status == theirs.status, "vloop: \(ours.err) qemu-img: \(theirs.err)")
        #expect(ours.out.trimmingCharacters(in: .whitespacesAndNewlines) == theirs.out.trimmingCharacters(in: .whitespacesAndNewlines))
        // From the end on qemu-img prints one entry of length 0; vloop prints none.
        for start in ["10M", "11M"] {
            let end = try vloop(["map", "--output", "json", "-s", start, img])
            #expect(end.status == 0 && end.out.trimmingCharacters(in: .whitespacesAndNewlines) == "[]")
        }
        let notASize = try vloop(["map", "-s", "lots", img])
        #expect(notASize.status != 0 && notASize.err.contains("invalid size 'lots'") && notASize.err.contains("suffix"), "\(notASize.err)")
        // --output is human or json, for every command that has it.
        for command in [["map", img], ["info", img], ["check", img], ["measure", "--size", "1G"], ["list"]] {
            let xml = try vloop([command[0], "--output", "xml"] + command.dropFirst())
            #expect(xml.status != 0 && xml.err.contains("'human'") && xml.err.contains("'json'"), "\(command[0]): \(xml.err)")
        }
    }

    @Test("convert copies a chain as qemu-img reads it, and stops with the file named when the source turns out corrupt part-way")
    func convertReadsAhead() throws {
        let dir = TempDir()
        let base = dir.file("base.qcow2"), top = dir.file("top.qcow2")
        // 24 MiB over several chunks: data, zeroes, backing data showing through.
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", base, "24M"])
        try sh(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 5M", "-c", "write -P 2 13M 3M", base])
        // 4 KiB clusters: one L2 table for every 2 MiB.
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", base, "-F", "qcow2", top])
        try sh(["qemu-io", "-f", "qcow2", "-c", "write -P 3 1M 1M", "-c", "write -z 14M 1M", "-c", "write -P 4 20M 4M", top])
        for format in ["raw", "qcow2", "vhdx"] {
            let out = dir.file("out.\(format)")
            let r = try sh([vloopBinary, "convert", "-O", format, top, out], check: false, timeout: 120)
            #expect(r.status == 0, "\(r.err)")
            try sh(["qemu-img", "compare", "-f", "qcow2", "-F", format == "raw" ? "raw" : format, top, out])
        }
        // The L1 entry for 20 MiB made unaligned: what comes before converts, then the
        // lookup there fails.
        let bytes = try readFile(top)
        let l1 = Int(bytes[40..<48].reduce(UInt64(0)) { $0 << 8 | UInt64($1) })
        #expect(bytes[(l1 + 80)..<(l1 + 88)].contains { $0 != 0 }, "the test needs an L2 table at 20 MiB")
        let fd = open(top, O_WRONLY)
        var bad: [UInt8] = [0x80, 0, 0, 0, 0, 0x01, 0x02, 0x08]
        _ = pwrite(fd, &bad, 8, off_t(l1 + 80))
        close(fd)
        let r = try sh([vloopBinary, "convert", "-O", "raw", top, dir.file("broken.raw")], check: false, timeout: 120)
        #expect(r.status != 0)
        #expect(r.err.contains(top) && r.err.contains("unaligned"), "\(r.err)")
        // What came before the broken table was written.
        let partial = try readFile(dir.file("broken.raw"))
        #expect(partial.count >= 2 << 20 && partial[(1 << 20)..<(2 << 20)].allSatisfy { $0 == 3 })
    }

    @Test("sizes are read as qemu-img reads them: the same accepted, the same refused",
          arguments: ["1048576", "1M", "1.5M", "0x100000", "0X10", "0x2M", " 4k", "4K", "2b", "5.", "5.M", "1.25k", "1.0001k",
                      "3.000", "0", "1e6", "0x1p20", "1.5", "1.5b", ".5M", "0x", "1..5M", "1.5.M", "12abc", "", "k", "-1", "0x1.8M", "1 M"])
    func sizesLikeQemu(_ text: String) throws {
        let dir = TempDir()
        let theirs = try sh(["qemu-img", "create", "-q", "-f", "raw", dir.file("q.raw"), text], check: false)
        let ours = try? SizeParser.parse(text)
        #expect((ours != nil) == (theirs.status == 0), "qemu-img: \(theirs.status == 0 ? "accepts" : "refuses"); vloop: \(ours.map { String($0) } ?? "refuses")")
        if let ours, theirs.status == 0 {
            // qemu-img create rounds a raw image's size up to whole sectors.
            let size = try #require(FileManager.default.attributesOfItem(atPath: dir.file("q.raw"))[.size] as? NSNumber).uint64Value
            #expect(size == (ours + 511) / 512 * 512)
        }
        if ours == nil {
            let message = try vloop(["create", "-q", "-f", "raw", dir.file("v.raw"), text])
            #expect(message.status != 0 && message.err.contains("size"))
        }
        #expect(throws: ImageError.self) { try SizeParser.parse("16E") }
        #expect(try SizeParser.parse("7E") == 7 << 60 && (try SizeParser.parse("0xffffffffffffffff")) == UInt64.max)
    }

    @Test("create, info, map, check and compare speak qemu-img's language")
    func basics() throws {
        let dir = TempDir()
        let img = dir.file("a.qcow2")
        #expect(try vloop(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "10M"]).status == 0)
        try sh(["qemu-img", "check", img])
        try sh(["qemu-io", "-f", "qcow2", "-c", "write -P 7 8k 8k", img])
        let info = try vloop(["info", "--output", "json", img])
        #expect(info.status == 0)
        #expect(info.out.contains("\"virtual-size\": 10485760") && info.out.contains("\"cluster-size\": 4096") && info.out.contains("\"format\": \"qcow2\""))
        let ourMap = try vloop(["map", "--output", "json", img]).out
        let theirMap = try sh(["qemu-img", "map", "--output=json", img]).out
        #expect(ourMap.trimmingCharacters(in: .whitespacesAndNewlines) == theirMap.trimmingCharacters(in: .whitespacesAndNewlines))
        #expect(try vloop(["check", img]).status == 0)
        let raw = dir.file("a.raw")
        #expect(try vloop(["convert", "-O", "raw", img, raw]).status == 0)
        #expect(try vloop(["compare", img, raw]).status == 0)
        try sh(["qemu-io", "-f", "raw", "-c", "write -P 9 5M 512", raw])
        let diff = try vloop(["compare", img, raw])
        #expect(diff.status == 1 && diff.out.contains("Content mismatch at offset 5242880!"))
    }

    @Test("errors are one line naming the file, with qemu-img's exit codes")
    func errors() throws {
        let dir = TempDir()
        let missing = try vloop(["info", dir.file("nope.qcow2")])
        #expect(missing.status == 1 && missing.err.contains("nope.qcow2") && missing.err.split(separator: "\n").count == 1)
        let bad = try vloop(["create", "-f", "qcow2", "-o", "cluster_size=3000", dir.file("x.qcow2"), "1M"])
        #expect(bad.status == 1 && bad.err.contains("cluster_size"))
        #expect(try vloop(["compare", dir.file("a"), dir.file("b")]).status == 2)
        // A leaked cluster: check exits 3, -r leaks repairs it.
        let img = dir.file("leak.qcow2")
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", img, "1M"])
        try sh(["qemu-io", "-f", "qcow2", "-c", "write 0 64k", img])
        // Bump the refcount of cluster 0 behind qemu's back: a leak.
        let fh = FileHandle(forUpdatingAtPath: img)!
        fh.seek(toFileOffset: 2 * 65536)
        fh.write(Data([0, 2]))
        fh.closeFile()
        #expect(try vloop(["check", img]).status == 3)
        #expect(try vloop(["check", "-r", "leaks", img]).status == 0)
        try sh(["qemu-img", "check", img])
    }

    @Test("image locks keep vloop and qemu from writing the same image")
    func locking() throws {
        let dir = TempDir()
        let img = dir.file("l.qcow2")
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", img, "1M"])
        // qemu-io holds it read-write (sleeping) while vloop tries.
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-io")
        p.arguments = ["-f", "qcow2", "-c", "sleep 4000", img]
        try p.run()
        defer { p.terminate(); p.waitUntilExit() }
        Thread.sleep(forTimeInterval: 1.0)
        #expect(throws: ImageError.self) { try openRW(img) }
        #expect(throws: ImageError.self) { try openRO(img) }
        // -U reads anyway.
        var o = OpenOptions(format: .qcow2); o.forceShare = true
        let shared = try ImageOpener.open(img, options: o)
        try shared.close()
        p.terminate(); p.waitUntilExit()
        // And the reverse: vloop writes, qemu-img is refused.
        let ours = try openRW(img)
        let r = try sh(["qemu-img", "info", img], check: false)
        #expect(r.status != 0 && r.err.contains("lock"))
        #expect(try sh(["qemu-img", "info", "-U", img], check: false).status == 0)
        try ours.close()
        #expect(try sh(["qemu-img", "info", img], check: false).status == 0)
    }

    @Test("backing names inside images cannot reach protocols or devices")
    func untrustedBackingNames() throws {
        let dir = TempDir()
        for name in ["nbd://127.0.0.1:10809/x", "json:{\"file.filename\":\"/etc/passwd\"}", "/dev/null"] {
            let img = dir.file("evil-\(abs(name.hashValue)).qcow2")
            try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "raw", img, "1M"])
            #expect(throws: ImageError.self) { try openRO(img) }
        }
        // A chain that loops back on itself is refused, not followed forever.
        let a = dir.file("a.qcow2"), b = dir.file("b.qcow2")
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", a, "1M"])
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", b, "1M"])
        #expect(throws: ImageError.self) { try openRO(a) }
    }
}
