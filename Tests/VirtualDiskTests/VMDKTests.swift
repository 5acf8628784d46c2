import Foundation
import Testing
@testable import VirtualDisk

/// VMDK against real images (corpus), against qemu-img/qemu-io both ways for every
/// subformat qemu makes, against libvmdk's vmdkinfo where installed, and against an
/// in-memory model for delta links and rewritten stream-optimized images.
///
/// Helpers live in `VMDKPeer` so this file shares no names with other test files.
enum VMDKPeer {
    static func create(_ path: String, size: UInt64, options: [(String, String)] = [], backing: String? = nil) throws {
        var r = CreateRequest(path: path, format: .vmdk, size: size)
        r.options = options
        if let backing { r.backingFile = backing; r.backingFormat = .vmdk }
        try CreateOperation.run(r)
    }

    /// Our guest view written to a sparse raw file (convert keeps holes).
    static func ourRaw(_ img: DiskImage, _ dir: TempDir) throws -> String {
        let raw = dir.file("ours-\(UUID().uuidString).raw")
        try RawLayer.create(path: raw, size: img.info.virtualSize)
        let out = try openRW(raw, format: .raw)
        try ConvertOperation.run(source: img, target: out, options: ConvertOptions())
        try out.close()
        return raw
    }

    static func qemuRaw(_ path: String, _ dir: TempDir) throws -> String {
        let raw = dir.file("qemu-\(UUID().uuidString).raw")
        try sh(["qemu-img", "convert", "-U", "-f", "vmdk", "-O", "raw", path, raw], cwd: dir.path)
        return raw
    }

    static func writeModel(_ model: [UInt8], _ dir: TempDir) throws -> String {
        let raw = dir.file("model-\(UUID().uuidString).raw")
        try Data(model).write(to: URL(fileURLWithPath: raw))
        return raw
    }

    /// qemu-img compare of a VMDK against raw bytes; throws with qemu's words on a difference.
    static func qemuAgrees(_ path: String, _ raw: String, _ dir: TempDir) throws {
        try sh(["qemu-img", "compare", "-U", "-f", "vmdk", "-F", "raw", path, raw], cwd: dir.path)
    }


    static func layer(_ image: DiskImage) -> VMDKLayer {
        (image as! LayeredImage).layer as! VMDKLayer
    }

    static var hasVmdkinfo: Bool {
        (try? sh(["sh", "-c", "command -v vmdkinfo"], check: false).status) == 0
    }

    /// libvmdk's reading of the media size, when vmdkinfo is installed.
    static func vmdkinfoSize(_ path: String) throws -> UInt64? {
        guard hasVmdkinfo else { return nil }
        let out = try sh(["vmdkinfo", path]).out
        guard let line = out.split(separator: "\n").first(where: { $0.contains("Media size") }),
              let open = line.lastIndex(of: "("), let bytes = line[line.index(after: open)...].split(separator: " ").first else { return nil }
        return UInt64(bytes)
    }
}

struct VMDKCase: CustomStringConvertible, Sendable {
    let subformat: String
    let size: UInt64
    var description: String { "\(subformat) \(size)" }
}

@Suite("VMDK", .serialized)  // the twoGbMaxExtent cases hold 2 GiB images in memory: one at a time
struct VMDKTests {
    // MARK: descriptor

    @Test("descriptor parser: comments, CRLF, quotes, case, unknown keys, odd extent lines")
    func descriptorParsing() throws {
        let text = "\u{feff}# Disk DescriptorFile\r\nversion=1\r\nencoding=\"UTF-8\"\r\n  CID = 0x1a2B3c4D  \r\nparentCID=ffffffff\r\n"
            + "isNativeSnapshot=\"no\"\r\ncreateType=\"twoGbMaxExtentSparse\"\r\nparentFileNameHint=\"dir with space/base.vmdk\"\r\n"
            + "\r\n# Extent description\r\nRW 4192256 SPARSE \"a b-s001.vmdk\"\r\nrdonly 2048 FLAT \"x.raw\" 63\r\n"
            + "NOACCESS 100 ZERO\r\nRW 8 VMFSRDM \"dev.vmdk\"\r\n\r\n#DDB\r\nddb.adapterType = \"lsilogic\"\r\nddb.unknownThing = whatever\r\n"
            + "garbage line without equals\r\n"
        let d = try VMDKDescriptor.parse(Array(text.utf8) + [0, 0, 0x41])
        #expect(d.version == 1)
        #expect(d.cid == 0x1a2b_3c4d)
        #expect(d.parentCID == 0xffff_ffff)
        #expect(d.createType == "twoGbMaxExtentSparse")
        #expect(d.parentFileNameHint == "dir with space/base.vmdk")
        #expect(d["DDB.ADAPTERTYPE"] == "lsilogic")
        #expect(d["ddb.unknownThing"] == "whatever")
        #expect(d.extents.count == 4)
        #expect(d.extents[0] == .init(access: .readWrite, sectors: 4_192_256, type: .sparse, fileName: "a b-s001.vmdk"))
        #expect(d.extents[1] == .init(access: .readOnly, sectors: 2048, type: .flat, fileName: "x.raw", offsetSectors: 63))
        #expect(d.extents[2] == .init(access: .noAccess, sectors: 100, type: .zero, fileName: nil))
        #expect(d.extents[3].type == .other("VMFSRDM"))
        // Changing the CID keeps every other line, and the CRLF line ends.
        var e = d
        e.set("CID", "deadbeef")
        let out = String(decoding: e.serialized(), as: UTF8.self)
        #expect(out.contains("CID=deadbeef\r\n"))
        #expect(out.contains("ddb.unknownThing = whatever\r\n") && out.contains("garbage line without equals\r\n"))
        let again = try VMDKDescriptor.parse(e.serialized())
        #expect(again.cid == 0xdead_beef && again.extents == d.extents && again.parentFileNameHint == d.parentFileNameHint)
    }

    @Test("descriptor parser: missing fields are nil; bad extent lines fail with the line; nothing traps",
          arguments: ["", "version=1\n", "createType=\n", "CID=\nparentCID=zz\n", "RW\n", "RW 0 SPARSE \"x\"\n",
                      "RW -5 FLAT \"x\" 0\n", "RW 10 SPARSE\n", "RW 10 FLAT \"x\" notanumber\n", "RW 99999999999999999999 FLAT \"x\"\n",
                      "RW 10 FLAT \"unterminated\n", "\"\"\"===\n", "RDONLY\t12\tflat\t\"tab.raw\"\t0\n"])
    func descriptorEdgeCases(_ text: String) {
        do {
            let d = try VMDKDescriptor.parse(Array(text.utf8))
            #expect(d.cid == nil || text.contains("CID="))
            if text.hasPrefix("RDONLY") { #expect(d.extents.first?.fileName == "tab.raw" && d.extents.first?.type == .flat) }
            if text == "RW 10 FLAT \"unterminated\n" { #expect(d.extents.first?.fileName == "unterminated") }
        } catch let e as ImageError {
            #expect(e.code == .invalidFormat && e.message.contains("line 1"), "\(e)")
        } catch {
            Issue.record("unexpected error \(error)")
        }
    }

    @Test("descriptors over 1 MiB are refused")
    func descriptorCap() {
        #expect(throws: ImageError.self) { try VMDKDescriptor.parse([UInt8](repeating: 0x41, count: VMDKDescriptor.maxSize + 1)) }
    }

    // MARK: corpus

    @Test("iotest-version3.vmdk (VMware stream-optimized, GD at the end) reads as qemu-img reads it")
    func corpusStream() throws {
        let dir = TempDir()
        let path = try unpackCorpus("iotest-version3.vmdk.xz", into: dir)
        let img = try openRO(path)
        #expect(img.info.format == "vmdk" && img.info.virtualSize == 17_179_869_184)
        #expect(img.info.capabilities.contains(.writable) == false, "an RDONLY extent must make the image read-only")
        let ours = try VMDKPeer.ourRaw(img, dir)
        let extents = try img.extents(at: 0, length: img.info.virtualSize)
        #expect(extents.contains { $0.isData })
        try img.close()
        let theirs = try VMDKPeer.qemuRaw(path, dir)
        try sh(["qemu-img", "compare", "-f", "raw", "-F", "raw", ours, theirs])
    }

    @Test("esxi-sesparse.vmdk (a bare seSparse extent) reads 16 MiB of 'a' at 0")
    func corpusSESparse() throws {
        let dir = TempDir()
        let path = try unpackCorpus("esxi-sesparse.vmdk.xz", into: dir)
        let img = try openRO(path, format: .vmdk)
        #expect(img.info.virtualSize >= 16 << 20)
        let head = try img.read(at: 0, count: 16 << 20)
        #expect(head.allSatisfy { $0 == 0x61 })
        // Probing finds it too (qemu-img probes it as raw).
        let probed = try openRO(path)
        #expect(probed.info.format == "vmdk")
        try probed.close()
        try img.close()
    }

    @Test("afl9.vmdk (fuzzed header) fails cleanly, naming the file, without allocating its claimed tables")
    func corpusHostile() throws {
        let dir = TempDir()
        let path = try unpackCorpus("afl9.vmdk.xz", into: dir)
        let before = MetadataCache.shared.statistics.peak
        do {
            let img = try openRO(path)
            try img.close()
            Issue.record("afl9.vmdk opened")
        } catch let e as ImageError {
            #expect(e.path == path, "error does not name the file: \(e)")
            #expect(e.code == .corrupt || e.code == .invalidFormat || e.code == .unsupported, "\(e)")
        }
        #expect(MetadataCache.shared.statistics.peak - before < 64 << 20)
    }

    // MARK: qemu interop

    static let cases: [VMDKCase] = [
        VMDKCase(subformat: "monolithicSparse", size: 5_000_192),
        VMDKCase(subformat: "monolithicFlat", size: 3_146_240),
        VMDKCase(subformat: "twoGbMaxExtentSparse", size: (2 << 30) + 1_049_088),
        VMDKCase(subformat: "twoGbMaxExtentFlat", size: (2 << 30) + 1_049_088),
        VMDKCase(subformat: "streamOptimized", size: 7_340_544 + 512),
    ]

    @Test("qemu-made VMDKs read bit-exact; vloop's writes into them pass qemu-img check and compare", arguments: cases)
    func qemuMade(_ c: VMDKCase) throws {
        let dir = TempDir()
        let path = dir.file("made.vmdk")
        let size = c.size
        var rng = SplitMix(state: size ^ 0x77)
        // Data in places qemu writes: the start, across a grain, the last bytes.
        let spots: [(UInt64, Int)] = [(0, 65536), (65536 * 3 + 1000, 100_000), (size - 70_000, 70_000)]
        if c.subformat == "streamOptimized" {
            // qemu writes stream-optimized images only by convert (whole grains once).
            var src = [UInt8](repeating: 0, count: Int(size))
            for (o, n) in spots { src.replaceSubrange(Int(o)..<(Int(o) + n), with: randomBytes(n, &rng)) }
            let raw = try VMDKPeer.writeModel(src, dir)
            try sh(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, path])
        } else {
            try sh(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=\(c.subformat)", path, String(size)])
            var cmds: [String] = []
            for (i, (o, n)) in spots.enumerated() { cmds += ["-c", "write -P \(0x21 + i) \(o) \(n)"] }
            try sh(["qemu-io", "-f", "vmdk"] + cmds + [path])
        }
        let img = try openRO(path)
        #expect(img.info.virtualSize == size)
        let ours = try VMDKPeer.ourRaw(img, dir)
        try img.close()
        try sh(["qemu-img", "compare", "-f", "raw", "-F", "raw", ours, try VMDKPeer.qemuRaw(path, dir)])

        // vloop writes; qemu must find the image clean and equal to our view.
        if size < 64 << 20 {
            let reader = try openRO(path)
            var model = try readAll(reader)
            try reader.close()  // its shared lock would refuse the writer below
            let rw = try openRW(path)
            try randomWrites(rw, &model, count: 30, maxLength: 200_000, &rng)
            try rw.writeZeroes(at: 1024, length: 70_000, mayUnmap: true)
            for k in 1024..<71_024 { model[k] = 0 }
            #expect(try readAll(rw) == model)
            try rw.close()
            try VMDKPeer.qemuAgrees(path, try VMDKPeer.writeModel(model, dir), dir)
        } else {
            let rw = try openRW(path)
            let data = randomBytes(300_000, &rng)
            let at = (2 << 30) - 150_000  // across the extent boundary
            try rw.write(data, at: UInt64(at))
            try rw.close()
            let again = try openRO(path)
            #expect(try again.read(at: UInt64(at), count: data.count) == data)
            let view = try VMDKPeer.ourRaw(again, dir)
            try again.close()
            try VMDKPeer.qemuAgrees(path, view, dir)
        }
        if c.subformat != "monolithicFlat" && c.subformat != "twoGbMaxExtentFlat" {
            try sh(["qemu-img", "check", "-f", "vmdk", path], cwd: dir.path)
        }
        let report = try checkImage(path, format: .vmdk)
        #expect(report.exitCode == 0 && report.corruptions.isEmpty && report.leaks == 0, "\(report)")
    }

    @Test("VMDKs vloop creates and writes read the same in qemu-img and libvmdk; qemu's writes into them read the same in vloop",
          arguments: cases)
    func vloopMade(_ c: VMDKCase) throws {
        let dir = TempDir()
        let path = dir.file("ours.vmdk")
        try VMDKPeer.create(path, size: c.size, options: [("subformat", c.subformat)])
        let img = try openRW(path)
        #expect(img.info.virtualSize == c.size)
        var rng = SplitMix(state: c.size ^ 0x5eed)
        let big = c.size > 64 << 20
        var model = [UInt8](repeating: 0, count: big ? 0 : Int(c.size))
        if big {
            let spots: [UInt64] = [0, (2 << 30) - 70_000, c.size - 5000]
            for at in spots {
                let n: Int = 100_000 < c.size - at ? 100_000 : Int(c.size - at)
                try img.write(randomBytes(n, &rng), at: at)
            }
        } else {
            try randomWrites(img, &model, count: 40, maxLength: 200_000, &rng)
        }
        let view = big ? try VMDKPeer.ourRaw(img, dir) : try VMDKPeer.writeModel(model, dir)
        try img.close()
        #expect(try sh(["qemu-img", "info", "-f", "vmdk", path]).out.contains("virtual size"))
        if !c.subformat.hasSuffix("Flat") { try sh(["qemu-img", "check", "-f", "vmdk", path], cwd: dir.path) }
        let report = try checkImage(path, format: .vmdk)
        #expect(report.exitCode == 0 && report.corruptions.isEmpty && report.leaks == 0, "\(report)")
        try VMDKPeer.qemuAgrees(path, view, dir)
        if let size = try VMDKPeer.vmdkinfoSize(path) { #expect(size == c.size, "vmdkinfo reads another media size") }
        if c.subformat.hasPrefix("twoGb") {
            let files = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.hasPrefix("ours-s0") || $0.hasPrefix("ours-f0") }
            #expect(files.count == 2, "\(files)")
        }
        guard !big else { return }
        // qemu writes (not into stream-optimized images, which it writes only once).
        if c.subformat != "streamOptimized" {
            try sh(["qemu-io", "-f", "vmdk", "-c", "write -P 0x5a 512 1536", "-c", "write -P 0x6b \(c.size - 70_000) 65536", path])
            for k in 512..<2048 { model[k] = 0x5a }
            for k in Int(c.size - 70_000)..<Int(c.size - 70_000 + 65536) { model[k] = 0x6b }
        }
        let again = try openRO(path)
        #expect(try readAll(again) == model, "vloop reads qemu's writes differently")
        try again.close()
    }

    @Test("the creator makes what qemu-img makes: extent files, sizes, descriptor lines",
          arguments: ["monolithicFlat", "twoGbMaxExtentFlat", "twoGbMaxExtentSparse", "monolithicSparse"])
    func createMatchesQemu(_ subformat: String) throws {
        let dir = TempDir()
        try FileManager.default.createDirectory(atPath: dir.file("q"), withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: dir.file("v"), withIntermediateDirectories: true)
        let size: UInt64 = (5 << 30) + 3 * 512
        try sh(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=\(subformat)", dir.file("q/d.vmdk"), String(size)])
        try VMDKPeer.create(dir.file("v/d.vmdk"), size: size, options: [("subformat", subformat)])
        let q = try FileManager.default.contentsOfDirectory(atPath: dir.file("q")).sorted()
        let v = try FileManager.default.contentsOfDirectory(atPath: dir.file("v")).sorted()
        #expect(q == v)
        for name in q where name != "d.vmdk" || subformat == "monolithicSparse" {
            let a = try FileManager.default.attributesOfItem(atPath: dir.file("q/" + name))[.size] as? UInt64
            let b = try FileManager.default.attributesOfItem(atPath: dir.file("v/" + name))[.size] as? UInt64
            #expect(a == b, "\(name): qemu \(a ?? 0) bytes, vloop \(b ?? 0)")
        }
        if subformat != "monolithicSparse" {
            let extentLines = { (p: String) in try VMDKDescriptor.parse(readFile(p)).extents }
            #expect(try extentLines(dir.file("q/d.vmdk")) == extentLines(dir.file("v/d.vmdk")))
        } else {
            // Header and tables byte for byte (the descriptor's CID differs).
            let a = try readFile(dir.file("q/d.vmdk")), b = try readFile(dir.file("v/d.vmdk"))
            #expect(a[0..<512] == b[0..<512])
            #expect(a[(21 * 512)...] == b[(21 * 512)...])
        }
    }

    // MARK: stream-optimized rewrites

    @Test("a stream-optimized image rewritten in place (convert -n) compares equal to its new source; writes append grains")
    func streamRewrite() throws {
        let dir = TempDir()
        let size = 9 * 65536 + 3 * 512
        var rng = SplitMix(state: 5)
        var a = [UInt8](repeating: 0, count: size)
        for _ in 0..<5 {
            let n = Int.random(in: 1...150_000, using: &rng), o = Int.random(in: 0...(size - n), using: &rng)
            a.replaceSubrange(o..<(o + n), with: randomBytes(n, &rng))
        }
        var b = a
        for _ in 0..<6 {
            let n = Int.random(in: 1...100_000, using: &rng), o = Int.random(in: 0...(size - n), using: &rng)
            b.replaceSubrange(o..<(o + n), with: step(n, &rng))
        }
        func step(_ n: Int, _ r: inout SplitMix) -> [UInt8] { Bool.random(using: &r) ? [UInt8](repeating: 0, count: n) : randomBytes(n, &r) }
        let rawA = try VMDKPeer.writeModel(a, dir), rawB = try VMDKPeer.writeModel(b, dir)
        let path = dir.file("stream.vmdk")
        try VMDKPeer.create(path, size: UInt64(size), options: [("subformat", "streamOptimized")])
        var options = ConvertOptions()
        options.compress = true
        let t1 = try openRW(path)
        try ConvertOperation.run(source: try openRO(rawA, format: .raw), target: t1, options: options)
        try t1.close()
        try VMDKPeer.qemuAgrees(path, rawA, dir)
        try sh(["qemu-img", "check", "-f", "vmdk", path])
        // Rewrite with another source: allocated grains get fresh copies.
        var again = ConvertOptions()
        again.existingTarget = true
        let t2 = try openRW(path)
        try ConvertOperation.run(source: try openRO(rawB, format: .raw), target: t2, options: again)
        #expect(try readAll(t2) == b)
        try t2.close()
        try VMDKPeer.qemuAgrees(path, rawB, dir)
        try sh(["qemu-img", "check", "-f", "vmdk", path])
        if let s = try VMDKPeer.vmdkinfoSize(path) { #expect(s == UInt64(size)) }
        let f = try readFile(path)
        #expect(String(decoding: f[512..<1024], as: UTF8.self).contains("createType=\"streamOptimized\""))
        // The file still ends with footer marker, footer and end-of-stream marker.
        let tail = ByteReader(Array(f[(f.count - 1536)...]))
        #expect(tail.le32(12) == 3 && tail.le32(1036) == 0 && Array(f[(f.count - 1024)..<(f.count - 1020)]) == Array("KDMV".utf8))
    }

    @Test("convert -O vmdk -o subformat=streamOptimized by vloop: qemu-img reads it")
    func streamConvert() throws {
        let dir = TempDir()
        var rng = SplitMix(state: 8)
        let size = 3 << 20
        var src = [UInt8](repeating: 0, count: size)
        src.replaceSubrange(100_000..<900_000, with: randomBytes(800_000, &rng))
        src.replaceSubrange((size - 4096)..<size, with: [UInt8](repeating: 0x33, count: 4096))
        let raw = try VMDKPeer.writeModel(src, dir)
        let path = dir.file("out.vmdk")
        try VMDKPeer.create(path, size: UInt64(size), options: [("subformat", "streamOptimized")])
        let t = try openRW(path)
        try ConvertOperation.run(source: try openRO(raw, format: .raw), target: t, options: ConvertOptions())
        try t.close()
        try VMDKPeer.qemuAgrees(path, raw, dir)
        // Stream-optimized files are small: data compressed, zero grains absent.
        #expect(try readFile(path).count < 1_200_000)
    }

    // MARK: delta links

    @Test("delta link: child over a monolithicSparse parent matches a model through reopen; a changed parent is refused",
          arguments: ["monolithicSparse", "twoGbMaxExtentSparse", "streamOptimized"])
    func deltaLink(_ childFormat: String) throws {
        let dir = TempDir()
        var rng = SplitMix(state: 21)
        let size = 4 * 1024 * 1024 + 3 * 512
        let parentPath = dir.file("base.vmdk")
        try VMDKPeer.create(parentPath, size: UInt64(size))
        var parentView = [UInt8](repeating: 0, count: size)
        let p = try openRW(parentPath)
        try randomWrites(p, &parentView, count: 10, maxLength: 300_000, &rng)
        try p.close()
        let parentFile = try readFile(parentPath)
        let child = dir.file("child.vmdk")
        try VMDKPeer.create(child, size: UInt64(size), options: [("subformat", childFormat)], backing: "base.vmdk")
        var img = try openRW(child)
        #expect(img.info.backing?.name == "base.vmdk" && img.info.backing?.format == "vmdk")
        #expect(try readAll(img) == parentView)
        var model = parentView
        for step in 0..<60 {
            let len = Int.random(in: 1...60_000, using: &rng)
            let off = Int.random(in: 0...(size - len), using: &rng)
            switch step % 6 {
            case 0...2:
                let data = randomBytes(len, &rng)
                try img.write(data, at: UInt64(off))
                model.replaceSubrange(off..<(off + len), with: data)
            case 3:
                try img.writeZeroes(at: UInt64(off), length: UInt64(len), mayUnmap: true)
                for k in off..<(off + len) { model[k] = 0 }
            case 4:
                try img.close()
                img = try openRW(child)
            default:
                #expect(try img.read(at: UInt64(off), count: len) == Array(model[off..<(off + len)]), "step \(step)")
            }
        }
        #expect(try readAll(img) == model)
        try img.close()
        #expect(try readFile(parentPath) == parentFile, "the parent file changed")
        try VMDKPeer.qemuAgrees(child, try VMDKPeer.writeModel(model, dir), dir)
        let reader = try openRO(child)
        let extents = try reader.extents(at: 0, length: UInt64(size))
        try reader.close()  // it holds the parent's shared lock, which the writer below needs gone
        #expect(extents.contains { $0.depth == 1 })

        // Writing to the parent gives it a new CID: the child no longer trusts it.
        let p2 = try openRW(parentPath)
        try p2.write([1, 2, 3], at: 0)
        try p2.close()
        do {
            try openRO(child).close()
            Issue.record("a delta link opened over a changed parent")
        } catch let e as ImageError {
            #expect(e.code == .chain && e.message.contains("base.vmdk") && e.message.contains("CID"), "\(e)")
            #expect(e.path == child)
        }
    }

    // MARK: descriptors with odd extents

    @Test("custom descriptors: flat extents at offsets across files, ZERO, RDONLY and NOACCESS extents")
    func customDescriptor() throws {
        let dir = TempDir()
        var rng = SplitMix(state: 31)
        let a = randomBytes(3 * 65536, &rng), b = randomBytes(65536, &rng)
        try Data([UInt8](repeating: 0xee, count: 1024) + a).write(to: URL(fileURLWithPath: dir.file("a.bin")))
        try Data(b).write(to: URL(fileURLWithPath: dir.file("b bin.raw")))
        let text = "# Disk DescriptorFile\nversion=1\nCID=1234\nparentCID=ffffffff\ncreateType=\"custom\"\n"
            + "RW 384 FLAT \"a.bin\" 2\nRW 128 ZERO\nRDONLY 128 FLAT \"b bin.raw\" 0\n"
        try Data(text.utf8).write(to: URL(fileURLWithPath: dir.file("d.vmdk")))
        let img = try openRW(dir.file("d.vmdk"))
        #expect(img.info.virtualSize == 640 * 512)
        #expect(!img.info.capabilities.contains(.writable), "an RDONLY extent leaves the image writable")
        let all = try readAll(img)
        #expect(Array(all[0..<a.count]) == a)
        #expect(all[a.count..<(a.count + 65536)].allSatisfy { $0 == 0 })
        #expect(Array(all[(a.count + 65536)...]) == b)
        #expect(throws: ImageError.self) { try img.write([1], at: 0) }
        try img.close()
        // qemu reads the same (it skips nothing here but the RDONLY extent's access).
        let noaccess = text.replacingOccurrences(of: "RW 128 ZERO", with: "NOACCESS 128 ZERO")
        try Data(noaccess.utf8).write(to: URL(fileURLWithPath: dir.file("n.vmdk")))
        let n = try openRO(dir.file("n.vmdk"))
        #expect(try n.read(at: 0, count: 512) == Array(a[0..<512]))
        do {
            _ = try n.read(at: UInt64(a.count), count: 512)
            Issue.record("a NOACCESS extent was read")
        } catch let e as ImageError {
            #expect(e.message.contains("NOACCESS"), "\(e)")
        }
        try n.close()
    }

    @Test("extent names are vetted: protocol names and devices are refused, missing files named")
    func extentPolicy() throws {
        let dir = TempDir()
        for (name, word) in [("nbd://host/x", "protocol"), ("/dev/null", "not a regular file"), ("missing.bin", "missing.bin")] {
            let text = "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"\(name)\" 0\n"
            let d = dir.file("d.vmdk")
            try Data(text.utf8).write(to: URL(fileURLWithPath: d))
            do {
                try openRO(d).close()
                Issue.record("\(name) opened")
            } catch let e as ImageError {
                #expect(e.description.contains(word), "\(e)")
            }
        }
    }

    @Test("hostile sparse headers fail with a clear error, never a trap or a huge allocation")
    func hostileHeaders() throws {
        let dir = TempDir()
        let base = dir.file("base.vmdk")
        try VMDKPeer.create(base, size: 8 << 20)
        let w = try openRW(base)
        try w.write([UInt8](repeating: 0x31, count: 1 << 20), at: 100_000)
        try w.close()
        let pristine = try readFile(base)
        let edits: [(String, (inout [UInt8]) -> Void)] = [
            ("grain size not a power of two", { $0.putLE64(100, at: 20) }),
            ("huge grain", { $0.putLE64(1 << 40, at: 20) }),
            ("huge capacity", { $0.putLE64(.max / 256, at: 12) }),
            ("GD past the end", { $0.putLE64(1 << 30, at: 56) }),
            ("zero GTEs per GT", { $0.putLE32(0, at: 44) }),
            ("version 9", { $0.putLE32(9, at: 4) }),
            ("GD entry past the end", { b in b.putLE32(0x7fff_ffff, at: 21 * 512) ; b.putLE32(0x7fff_ffff, at: Int(ByteReader(b).le64(56)) * 512) }),
            ("GT entry past the end", { b in
                let gd = Int(ByteReader(b).le64(56)) * 512
                let gt = Int(ByteReader(b).le32(gd)) * 512
                b.putLE32(0x7fff_fff0, at: gt + 4)
            }),
            ("descriptor size huge", { $0.putLE64(1 << 40, at: 36) }),
        ]
        for (what, edit) in edits {
            var bytes = pristine
            edit(&bytes)
            let p = dir.file("bad.vmdk")
            try Data(bytes).write(to: URL(fileURLWithPath: p))
            do {
                let img = try openRO(p)
                _ = try readAll(img)
                try img.close()
                Issue.record("\(what): opened and read")
            } catch let e as ImageError {
                #expect(e.path == p, "\(what): \(e)")
            }
        }
    }

    @Test("zeroed_grain=on: zeroing whole grains stores zeroed entries (qemu reads zeroes)")
    func zeroedGrain() throws {
        let dir = TempDir()
        let path = dir.file("z.vmdk")
        let size = 2 << 20
        try VMDKPeer.create(path, size: UInt64(size), options: [("zeroed_grain", "on")])
        var rng = SplitMix(state: 3)
        var model = randomBytes(size, &rng)
        let img = try openRW(path)
        try img.write(model, at: 0)
        try img.writeZeroes(at: 65536, length: 3 * 65536 + 100, mayUnmap: false)
        for k in 65536..<(4 * 65536 + 100) { model[k] = 0 }
        #expect(try readAll(img) == model)
        let ext = try img.extents(at: 65536, length: 3 * 65536)
        #expect(ext.allSatisfy { $0.kind == .zero }, "\(ext)")
        try img.close()
        try VMDKPeer.qemuAgrees(path, try VMDKPeer.writeModel(model, dir), dir)
        try sh(["qemu-img", "check", "-f", "vmdk", path])
    }

    // MARK: check

    /// Little-endian fields of a file, read and patched in place.
    struct FileFields {
        let path: String
        func le32(_ at: UInt64) throws -> UInt64 { UInt64(ByteReader(try HostFile(path: path, writable: false).read(at: at, count: 4)).le32(0)) }
        func le64(_ at: UInt64) throws -> UInt64 { ByteReader(try HostFile(path: path, writable: false).read(at: at, count: 8)).le64(0) }
        func set32(_ at: UInt64, _ v: UInt64) throws {
            var b = [UInt8](repeating: 0, count: 4)
            b.putLE32(UInt32(v), at: 0)
            let f = try HostFile(path: path, writable: true)
            try f.write(b, at: at)
        }
        /// Byte offset of the entry for grain `g` in the first grain table of the primary
        /// (or redundant) directory, the header at `headerAt`.
        func gte(_ g: UInt64, redundant: Bool = false, headerAt: UInt64 = 0) throws -> UInt64 {
            let gd = try le64(headerAt + (redundant ? 48 : 56)) * 512
            return try le32(gd) * 512 + g * 4
        }
    }

    /// The overlap and leak pass over windows of 7 sectors (every structure straddles
    /// some) finds what one window over the whole file finds.
    func expectSameInSmallWindows(_ path: String, _ whole: CheckReport) throws {
        let img = try openRO(path, format: .vmdk)
        defer { try? img.close() }
        let extent = try #require(VMDKPeer.layer(img).extents.first?.store as? VMDKSparseExtent)
        let small = try extent.check(repair: .none, window: 7)
        #expect(small.leaks == whole.leaks && small.corruptions.sorted() == whole.corruptions.sorted(),
                "7-sector windows: \(small); one window: \(whole)")
    }

    @Test("check: qemu-made sparse images are clean; leaks, shared grains, grains past the end and a stale redundant table are found; -r repairs leaks and the redundant copy")
    func checkFindsAndRepairs() throws {
        let dir = TempDir()
        let clean = dir.file("clean.vmdk")
        try sh(["qemu-img", "create", "-q", "-f", "vmdk", clean, "8M"])
        try sh(["qemu-io", "-f", "vmdk", "-c", "write -P 1 0 64k", "-c", "write -P 2 64k 64k", "-c", "write -P 3 128k 64k", clean])
        let good = try checkImage(clean, format: .vmdk)
        #expect(good.exitCode == 0 && good.leaks == 0 && good.corruptions.isEmpty && good.allocatedClusters == 3, "\(good)")
        let bytes = try readFile(clean)
        var model = [UInt8](repeating: 0, count: 8 << 20)
        for (k, v) in [(0, 1), (1, 2), (2, 3)] { for j in 0..<65536 { model[k * 65536 + j] = UInt8(v) } }
        func fresh(_ name: String) throws -> (String, FileFields) {
            let path = dir.file(name)
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            return (path, FileFields(path: path))
        }

        // A grain no table references in the middle of the file (a crash between the
        // grain and its table entry): a leak; -r leaks punches it out.
        let (mid, midF) = try fresh("mid.vmdk")
        try midF.set32(try midF.gte(1), 0)
        try midF.set32(try midF.gte(1, redundant: true), 0)
        let midReport = try checkImage(mid, format: .vmdk)
        #expect(midReport.leaks == 1 && midReport.exitCode == 3, "\(midReport)")
        try expectSameInSmallWindows(mid, midReport)
        #expect(try checkImage(mid, format: .vmdk, repair: .leaks).repairedLeaks == 1)
        #expect(try checkImage(mid, format: .vmdk).exitCode == 0)
        var midModel = model
        for j in 65536..<131072 { midModel[j] = 0 }
        try VMDKPeer.qemuAgrees(mid, try VMDKPeer.writeModel(midModel, dir), dir)

        // Data past the last grain: the file shrinks back.
        let (tail, _) = try fresh("tail.vmdk")
        let h = FileHandle(forWritingAtPath: tail)!
        h.seekToEndOfFile()
        h.write(Data(repeating: 0x55, count: 65536))
        h.closeFile()
        #expect(try checkImage(tail, format: .vmdk).leaks == 1)
        #expect(try checkImage(tail, format: .vmdk, repair: .leaks).repairedLeaks == 1)
        #expect(try readFile(tail).count == bytes.count)
        #expect(try checkImage(tail, format: .vmdk).exitCode == 0)
        try VMDKPeer.qemuAgrees(tail, try VMDKPeer.writeModel(model, dir), dir)
        try sh(["qemu-img", "check", "-f", "vmdk", tail])

        // Two entries naming one grain, and one past the end of the file: corruption,
        // not repaired.
        let (bad, badF) = try fresh("bad.vmdk")
        for redundant in [false, true] {
            try badF.set32(try badF.gte(1, redundant: redundant), try badF.le32(try badF.gte(0, redundant: redundant)))
            try badF.set32(try badF.gte(2, redundant: redundant), 0x7fff_0000)
        }
        try expectSameInSmallWindows(bad, try checkImage(bad, format: .vmdk))
        let badReport = try checkImage(bad, format: .vmdk, repair: .all)
        #expect(badReport.exitCode == 2, "\(badReport)")
        #expect(badReport.corruptions.contains { $0.contains("grain 1") && $0.contains("overlaps") }, "\(badReport.corruptions)")
        #expect(badReport.corruptions.contains { $0.contains("grain 2") && $0.contains("past the end of the file") }, "\(badReport.corruptions)")

        // The redundant table says otherwise: -r all rewrites it from the primary.
        let (stale, staleF) = try fresh("stale.vmdk")
        let redundantEntry = try staleF.gte(0, redundant: true)
        try staleF.set32(redundantEntry, 0)
        let staleReport = try checkImage(stale, format: .vmdk)
        #expect(staleReport.exitCode == 2 && staleReport.corruptions.contains { $0.contains("redundant copy") }, "\(staleReport)")
        let fixed = try checkImage(stale, format: .vmdk, repair: .all)
        #expect(fixed.repairedCorruptions == 1 && fixed.exitCode == 0, "\(fixed)")
        #expect(try staleF.le32(try staleF.gte(0, redundant: true)) == (try staleF.le32(try staleF.gte(0))))
        #expect(try checkImage(stale, format: .vmdk).exitCode == 0)
        try VMDKPeer.qemuAgrees(stale, try VMDKPeer.writeModel(model, dir), dir)
    }

    @Test("check of a stream-optimized image: grain markers must name their own grain")
    func checkStreamMarkers() throws {
        let dir = TempDir()
        var src = [UInt8](repeating: 0, count: 1 << 20)
        for j in 0..<65536 { src[j] = 0x41; src[65536 + j] = UInt8(j & 0xff) }
        let raw = try VMDKPeer.writeModel(src, dir)
        let path = dir.file("s.vmdk")
        try sh(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, path])
        let ok = try checkImage(path, format: .vmdk)
        #expect(ok.exitCode == 0 && ok.allocatedClusters == 2, "\(ok)")
        // With the directory at the end (GD_AT_END in the header), the footer, 1024
        // bytes before the end, says where it is.
        let f = FileFields(path: path)
        let footer = try f.le64(56) == UInt64.max ? UInt64(try readFile(path).count) - 1024 : 0
        let e0 = try f.gte(0, headerAt: footer), e1 = try f.gte(1, headerAt: footer)
        let (g0, g1) = (try f.le32(e0), try f.le32(e1))
        try f.set32(e0, g1)
        try f.set32(e1, g0)
        let swapped = try checkImage(path, format: .vmdk)
        #expect(swapped.exitCode == 2 && swapped.corruptions.filter { $0.contains("is marked as sector") }.count == 2, "\(swapped)")
    }
}
