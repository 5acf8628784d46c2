import Foundation
import Testing
@testable import VirtualDisk

/// Images made by qemu-img/qemu-io must read back exactly as qemu reads them.
struct QemuMade: CustomStringConvertible, Sendable {
    let name: String
    let size: String
    let createOptions: String
    let ioCommands: [String]
    /// Convert the made image with these qemu-img convert flags into the final one.
    let convertFlags: [String]
    var description: String { name }
}

let qemuMadeImages: [QemuMade] = [
    QemuMade(name: "odd-size", size: "5000001", createOptions: "", ioCommands: ["write -P 0x11 0 64k", "write -P 0x22 4999000 1001"], convertFlags: []),
    QemuMade(name: "512-clusters", size: "3M", createOptions: "cluster_size=512", ioCommands: ["write -P 0x33 1000 100k", "write -z 20k 8k"], convertFlags: []),
    QemuMade(name: "2M-clusters", size: "9M", createOptions: "cluster_size=2M", ioCommands: ["write -P 0x44 3M 1M", "write -P 0x45 100 300"], convertFlags: []),
    QemuMade(name: "refcount-1", size: "4M", createOptions: "refcount_bits=1", ioCommands: ["write -P 0x55 0 1M", "discard 256k 256k"], convertFlags: []),
    QemuMade(name: "refcount-64", size: "4M", createOptions: "refcount_bits=64", ioCommands: ["write -P 0x66 512k 1M"], convertFlags: []),
    QemuMade(name: "compat-0.10", size: "4M", createOptions: "compat=0.10", ioCommands: ["write -P 0x77 0 2M", "write -z 1M 64k"], convertFlags: []),
    QemuMade(name: "extended-l2", size: "4M", createOptions: "extended_l2=on,cluster_size=128k",
             ioCommands: ["write -P 0x88 4k 4k", "write -P 0x89 130k 10k", "write -z 1M 4k", "write -P 0x8a 2M 256k"], convertFlags: []),
    QemuMade(name: "compressed-zlib", size: "4M", createOptions: "", ioCommands: ["write -P 0x99 0 3M"], convertFlags: ["-c"]),
    QemuMade(name: "compressed-zstd", size: "4M", createOptions: "compression_type=zstd", ioCommands: ["write -P 0x9a 0 3M"], convertFlags: ["-c", "-o", "compression_type=zstd"]),
    QemuMade(name: "lazy-refcounts", size: "4M", createOptions: "lazy_refcounts=on", ioCommands: ["write -P 0xab 64k 1M"], convertFlags: []),
]

@Suite("Interop with qemu-img and qemu-io")
struct QemuInteropTests {
    static func reference(_ path: String, _ dir: TempDir, format: String = "qcow2") throws -> [UInt8] {
        let raw = dir.file("ref-\(UUID().uuidString).raw")
        try sh(["qemu-img", "convert", "-U", "-f", format, "-O", "raw", path, raw], cwd: dir.path)
        return try readFile(raw)
    }

    @Test("qemu-made qcow2 reads bit-exact", arguments: qemuMadeImages)
    func readsQemuImages(_ m: QemuMade) throws {
        let dir = TempDir()
        var path = dir.file("made.qcow2")
        var args = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if !m.createOptions.isEmpty { args += ["-o", m.createOptions] }
        try sh(args + [path, m.size])
        for c in m.ioCommands { try sh(["qemu-io", "-f", "qcow2", "-c", c, path]) }
        if !m.convertFlags.isEmpty {
            let out = dir.file("converted.qcow2")
            try sh(["qemu-img", "convert", "-O", "qcow2"] + m.convertFlags + [path, out])
            path = out
        }
        let expected = try Self.reference(path, dir)
        let img = try openRO(path)
        #expect(img.info.format == "qcow2")
        let got = try readAll(img)
        #expect(got == expected, "\(m): contents differ from qemu's reading")
        try img.close()
        // Then write through vloop and let qemu judge the result.
        let rw = try openRW(path)
        var model = got
        let pattern = [UInt8](repeating: 0xc3, count: 70_000)
        let at = min(model.count - pattern.count, 777)
        try rw.write(pattern, at: UInt64(at))
        model.replaceSubrange(at..<(at + pattern.count), with: pattern)
        try rw.writeZeroes(at: UInt64(model.count / 2), length: 65536, mayUnmap: true)
        for k in (model.count / 2)..<(model.count / 2 + 65536) { model[k] = 0 }
        try rw.close()
        try sh(["qemu-img", "check", path])
        #expect(try Self.reference(path, dir) == model, "\(m): qemu reads back something else after vloop wrote")
    }

    @Test("a dirty lazy-refcount image is repaired on read-write open and reads fine read-only")
    func dirtyLazyRefcounts() throws {
        let dir = TempDir()
        let path = dir.file("lazy.qcow2")
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "8M"])
        // qemu-io aborts after writing: the image is left dirty, refcounts stale.
        _ = try sh(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5c 0 2M", "-c", "abort", path], check: false)
        let info = try sh(["qemu-img", "info", "--output=json", "-U", path]).out
        #expect(info.contains("\"dirty-flag\": true"))
        let ro = try openRO(path)
        #expect(try ro.read(at: 1 << 20, count: 4) == [0x5c, 0x5c, 0x5c, 0x5c])
        try ro.close()
        let rw = try openRW(path)
        #expect(rw.info.dirty == false)
        try rw.close()
        try sh(["qemu-img", "check", path])
    }

    @Test("external data file images from qemu read and write")
    func externalDataFile() throws {
        let dir = TempDir()
        let path = dir.file("ext.qcow2")
        // qemu-img creates the data file relative to its working directory.
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=ext.data", path, "4M"], cwd: dir.path)
        try sh(["qemu-io", "-f", "qcow2", "-c", "write -P 0x71 1M 1M", path], cwd: dir.path)
        let expected = try Self.reference(path, dir)
        let img = try openRW(path)
        #expect(try readAll(img) == expected)
        try img.write([UInt8](repeating: 0x72, count: 4096), at: 0)
        try img.close()
        var model = expected
        for k in 0..<4096 { model[k] = 0x72 }
        #expect(try Self.reference(path, dir) == model)
        try sh(["qemu-img", "check", path], cwd: dir.path)
    }

    @Test("chains raw <- qcow2 <- qcow2 read like qemu")
    func chains() throws {
        let dir = TempDir()
        let base = dir.file("base.raw"), mid = dir.file("mid.qcow2"), top = dir.file("top.qcow2")
        try sh(["qemu-img", "create", "-q", "-f", "raw", base, "6M"])
        try sh(["qemu-io", "-f", "raw", "-c", "write -P 1 0 6M", base])
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, "8M"])
        try sh(["qemu-io", "-f", "qcow2", "-c", "write -P 2 1M 1M", "-c", "write -z 3M 512k", mid])
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "mid.qcow2", "-F", "qcow2", top])
        try sh(["qemu-io", "-f", "qcow2", "-c", "write -P 3 1536k 4k", "-c", "write -P 4 7M 4k", top])
        let expected = try Self.reference(top, dir)
        let img = try openRO(top)
        #expect(try readAll(img) == expected)
        // Block status through the chain matches qemu-img map's depth and data flags.
        let ours = MapOperation.json(try MapOperation.extents(img))
        try img.close()
        let theirs = try sh(["qemu-img", "map", "--output=json", top]).out
        func summary(_ s: String) -> [String] {
            s.split(separator: "\n").map { line in
                line.split(separator: ",").filter { $0.contains("start") || $0.contains("length") || $0.contains("depth") || $0.contains("data") }
                    .map { $0.trimmingCharacters(in: .whitespaces).trimmingCharacters(in: CharacterSet(charactersIn: "[{}]")) }.joined(separator: ",")
            }
        }
        #expect(summary(ours) == summary(theirs), "map differs:\nvloop:\n\(ours)\nqemu:\n\(theirs)")
    }

    @Test("internal snapshots made by qemu survive vloop writes; vloop's snapshots read in qemu")
    func snapshots() throws {
        let dir = TempDir()
        let path = dir.file("snap.qcow2")
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", path, "4M"])
        try sh(["qemu-io", "-f", "qcow2", "-c", "write -P 0x10 0 1M", path])
        try sh(["qemu-img", "snapshot", "-c", "first", path])
        let atFirst = try Self.reference(path, dir)
        // Write through vloop after qemu's snapshot: the snapshot must keep old data.
        let img = try openRW(path)
        try img.write([UInt8](repeating: 0x20, count: 100_000), at: 1000)
        // And take a snapshot of our own, then write again.
        try SnapshotOperation.create(img, name: "second")
        try img.write([UInt8](repeating: 0x30, count: 5000), at: 0)
        try img.close()
        try sh(["qemu-img", "check", path])
        let list = try sh(["qemu-img", "snapshot", "-l", path]).out
        #expect(list.contains("first") && list.contains("second"))
        // qemu reads our snapshot and its own.
        let s1 = dir.file("s1.raw")
        try sh(["qemu-img", "convert", "-l", "snapshot.name=first", "-O", "raw", path, s1])
        #expect(try readFile(s1) == atFirst)
        // Apply qemu's snapshot with vloop, then delete ours.
        let rw = try openRW(path)
        try SnapshotOperation.apply(rw, name: "first")
        #expect(try readAll(rw) == atFirst)
        try SnapshotOperation.delete(rw, name: "second")
        try rw.close()
        try sh(["qemu-img", "check", path])
        #expect(try Self.reference(path, dir) == atFirst)
    }

    @Test("compressed output of vloop convert -c reads in qemu; zero runs stay sparse")
    func compressedConvert() throws {
        let dir = TempDir()
        let src = dir.file("src.raw")
        try sh(["qemu-img", "create", "-q", "-f", "raw", src, "6M"])
        try sh(["qemu-io", "-f", "raw", "-c", "write -P 0x61 0 2M", "-c", "write -P 0x62 4M 100k", src])
        for ct in ["zlib", "zstd"] {
            let dst = dir.file("c-\(ct).qcow2")
            var r = CreateRequest(path: dst, format: .qcow2, size: 6 << 20)
            r.options = [("compression_type", ct)]
            try CreateOperation.run(r)
            let s = try openRO(src), d = try openRW(dst)
            var o = ConvertOptions()
            o.compress = true
            try ConvertOperation.run(source: s, target: d, options: o)
            try d.close(); try s.close()
            try sh(["qemu-img", "check", dst])
            try sh(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, dst])
            let size = try FileManager.default.attributesOfItem(atPath: dst)[.size] as! Int
            #expect(size < 400_000, "\(ct): compressed image is \(size) bytes")
        }
    }

    @Test("convert -c compresses on every core yet writes the same file each time; qemu reads it")
    func compressedConvertIsDeterministic() throws {
        let dir = TempDir()
        // Several compression passes (8 MiB each), mixed content, a tail shorter than a cluster.
        let src = dir.file("src.raw")
        let size = (21 << 20) + 12_800
        try sh(["qemu-img", "create", "-q", "-f", "raw", src, "\(size)"])
        try sh(["sh", "-c", "head -c 5M /dev/urandom | dd of=\(src) bs=1M seek=1 conv=notrunc status=none"])
        // Text that packs to about three quarters: two pieces never share one cluster.
        try sh(["sh", "-c", "head -c 4M /dev/urandom | base64 -w0 | head -c 4M | dd of=\(src) bs=1M seek=13 conv=notrunc status=none"])
        try sh(["qemu-io", "-f", "raw", "-c", "write -P 0x61 9M 3M", "-c", "write -P 0x62 \(size - 7000) 7000", src])
        for (format, opts) in [("qcow2", "compression_type=zlib"), ("qcow2", "compression_type=zstd"),
                               ("vmdk", "subformat=streamOptimized")] {
            var files: [[UInt8]] = []
            for n in 0..<2 {
                let dst = dir.file("c\(n).\(format)")
                try sh([vloopBinary, "convert", "-c", "-f", "raw", "-O", format, "-o", opts, src, dst])
                try sh(["qemu-img", "compare", "-f", "raw", "-F", format, src, dst])
                if format == "qcow2" { try sh(["qemu-img", "check", dst]) }
                files.append(try readFile(dst))
            }
            // VMDK embeds a random CID; everything else must match byte for byte.
            if format == "vmdk" {
                #expect(files[0].count == files[1].count, "\(opts): sizes differ")
                #expect(files[0][65536...] == files[1][65536...], "\(opts): grains or tables differ")
            } else {
                #expect(files[0] == files[1], "\(opts): two runs wrote different files")
            }
            #expect(files[0].count < 10 << 20, "\(opts): \(files[0].count) bytes")
            // Packed as tightly as qemu packs it (pieces run across cluster boundaries).
            let peer = dir.file("qemu.\(format)")
            try sh(["qemu-img", "convert", "-c", "-f", "raw", "-O", format, "-o", opts, src, peer])
            let peerSize = try readFile(peer).count
            #expect(files[0].count <= peerSize + 128 << 10, "\(opts): \(files[0].count) bytes, qemu-img \(peerSize)")
        }
    }

    @Test("resize, commit and rebase agree with qemu")
    func chainOperations() throws {
        let dir = TempDir()
        let base = dir.file("base.qcow2"), top = dir.file("top.qcow2"), other = dir.file("other.qcow2")
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", base, "4M"])
        try sh(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4M", base])
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top])
        try sh(["qemu-io", "-f", "qcow2", "-c", "write -P 2 1M 64k", "-c", "write -z 2M 64k", top])
        let view = try Self.reference(top, dir)
        // Safe rebase onto an empty image keeps the guest view.
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", other, "4M"])
        do {
            let t = try openRW(top)
            var o = OpenOptions(format: .qcow2); o.userNamed = [other]
            let nb = try ImageOpener.open(other, options: o)
            try RebaseOperation.run(top: t, newBacking: nb, newName: "other.qcow2", newFormat: "qcow2")
            try t.close(); try nb.close()
        }
        #expect(try Self.reference(top, dir) == view)
        #expect(try sh(["qemu-img", "info", top]).out.contains("backing file: other.qcow2"))
        try sh(["qemu-img", "check", top])
        // Commit into the new backing file.
        let committed = try ImageOpener.openForCommit(top, format: .qcow2, backingFormat: .qcow2)
        try CommitOperation.run(top: committed, keepTop: false)
        try committed.close()
        #expect(try Self.reference(other, dir) == view)
        try sh(["qemu-img", "check", other])
        try sh(["qemu-img", "check", top])
        // Grow and shrink.
        let img = try openRW(other)
        try ResizeOperation.run(img, to: 100 << 20, shrink: false)
        try img.close()
        #expect(try sh(["qemu-img", "info", "--output=json", other]).out.contains("\"virtual-size\": 104857600"))
        try sh(["qemu-img", "check", other])
        let grown = try Self.reference(other, dir)
        #expect(Array(grown[0..<view.count]) == view && grown[view.count...].allSatisfy { $0 == 0 })
        let s = try openRW(other)
        try ResizeOperation.run(s, to: 1 << 20 + 1000, shrink: true)
        try ResizeOperation.run(s, to: 2 << 20, shrink: false)
        try s.close()
        try sh(["qemu-img", "check", other])
        let shrunk = try Self.reference(other, dir)
        #expect(Array(shrunk[0..<(1 << 20 + 1000)]) == Array(view[0..<(1 << 20 + 1000)]))
        #expect(shrunk[(1 << 20 + 1000)...].allSatisfy { $0 == 0 })
    }
}
