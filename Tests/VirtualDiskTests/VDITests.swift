import Foundation
import Testing
@testable import VirtualDisk

/// VDI against qemu-img/qemu-io (a peer no one here wrote) for dynamic and static images,
/// and against an in-memory model for differencing images (qemu cannot open those).
///
/// Helpers live in `VDIPeer` so this file shares no names with other test files.
enum VDIPeer {
    static func create(_ path: String, size: UInt64?, options: [(String, String)] = [], backing: String? = nil) throws {
        var r = CreateRequest(path: path, format: .vdi, size: size)
        r.options = options
        if let backing { r.backingFile = backing; r.backingFormat = .vdi }
        try CreateOperation.run(r)
    }

    /// qemu's reading of an image, as raw bytes.
    static func qemuRaw(_ path: String, _ dir: TempDir) throws -> [UInt8] {
        let raw = dir.file("qemu-\(UUID().uuidString).raw")
        try sh(["qemu-img", "convert", "-U", "-f", "vdi", "-O", "raw", path, raw])
        defer { try? FileManager.default.removeItem(atPath: raw) }
        return try readFile(raw)
    }

    static func qemuVirtualSize(_ path: String) throws -> UInt64 {
        let out = try sh(["qemu-img", "info", "-U", "-f", "vdi", "--output=json", path]).out
        let json = try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [String: Any]
        return (json?["virtual-size"] as? NSNumber)?.uint64Value ?? 0
    }

    /// qemu-img check and compare against the expected bytes.
    static func qemuAgrees(_ path: String, _ model: [UInt8], _ dir: TempDir) throws {
        try sh(["qemu-img", "check", "-U", "-f", "vdi", path])
        try qemuCompare(path, format: "vdi", model: model, dir)
    }

    static func layer(_ image: DiskImage) -> VDILayer {
        (image as! LayeredImage).layer as! VDILayer
    }

    static func check(_ path: String, repair: CheckRepair = .none) throws -> CheckReport {
        try checkImage(path, format: .vdi, repair: repair)
    }

    /// Random writes (unaligned, crossing blocks, some of zeroes), zero writes and
    /// discards, applied to the image and the model alike. Discarded bytes are read back
    /// at once (they may read as zeroes or as before) and the model settled from them.
    static func randomOps(_ img: DiskImage, _ model: inout [UInt8], count: Int, maxLength: Int, _ rng: inout SplitMix,
                          below: [UInt8]? = nil, limit: Int? = nil) throws {
        let span = limit ?? model.count
        for step in 0..<count {
            let len = Int.random(in: 1...min(maxLength, span), using: &rng)
            var off = Int.random(in: 0...(span - len), using: &rng)
            if step % 4 == 0 { off = off / 512 * 512 }
            switch step % 10 {
            case 0...6:
                let data = step % 7 == 5 ? [UInt8](repeating: 0, count: len) : randomBytes(len, &rng)
                try img.write(data, at: UInt64(off))
                model.replaceSubrange(off..<(off + len), with: data)
            case 7, 8:
                try img.writeZeroes(at: UInt64(off), length: UInt64(len), mayUnmap: step % 20 < 10)
                for k in off..<(off + len) { model[k] = 0 }
            default:
                try img.discard(at: UInt64(off), length: UInt64(len))
                let got = try img.read(at: UInt64(off), count: len)
                for i in 0..<len {
                    let ok = got[i] == model[off + i] || got[i] == 0 || got[i] == below?[off + i]
                    if !ok { throw TestFailure("byte \(off + i) after discard is \(got[i]), not old \(model[off + i]), 0 or the parent's") }
                    model[off + i] = got[i]
                }
            }
        }
    }

    /// Rewrite the header of a VDI with `edit` applied.
    static func patchHeader(_ path: String, _ edit: (inout VDIHeader) -> Void) throws {
        let f = try HostFile(path: path, writable: true)
        var h = VDIHeader.parse(try f.read(at: 0, count: VDIHeader.storedSize))!
        edit(&h)
        try f.write(h.bytes, at: 0)
    }

    /// Patch little-endian 32-bit values into a file.
    static func poke(_ path: String, _ values: [(UInt64, UInt32)]) throws {
        let f = try HostFile(path: path, writable: true)
        for (at, v) in values {
            var b = [UInt8](repeating: 0, count: 4)
            b.putLE32(v, at: 0)
            try f.write(b, at: at)
        }
    }

    /// The first offset where two byte arrays differ (or the shorter length), nil when
    /// equal: failures name one offset instead of printing megabytes.
    static func firstDifference(_ a: [UInt8], _ b: [UInt8]) -> Int? {
        if a.count != b.count { return min(a.count, b.count) }
        return a.indices.first { a[$0] != b[$0] }
    }

    static func header(_ path: String) throws -> VDIHeader {
        VDIHeader.parse(try HostFile(path: path, writable: false).read(at: 0, count: VDIHeader.storedSize))!
    }

    static func fileSize(_ path: String) throws -> UInt64 {
        try HostFile(path: path, writable: false).size()
    }
}

struct QemuVDICase: CustomStringConvertible, Sendable {
    let isStatic: Bool
    let size: String
    var description: String { "\(isStatic ? "static" : "dynamic") \(size)" }
}

struct VloopVDICase: CustomStringConvertible, Sendable {
    let isStatic: Bool
    let size: UInt64
    let blockSize: String?
    var description: String { "\(isStatic ? "static" : "dynamic") \(size)\(blockSize.map { " block_size=\($0)" } ?? "")" }
}

@Suite("VDI")
struct VDITests {
    // MARK: qemu interop

    static let qemuCases: [QemuVDICase] = [
        QemuVDICase(isStatic: false, size: "5000001"),
        QemuVDICase(isStatic: false, size: "3146240"),
        QemuVDICase(isStatic: true, size: "4000256"),
        QemuVDICase(isStatic: true, size: "3M"),
    ]

    @Test("qemu-made VDIs read bit-exact; qemu reads back what vloop writes into them", arguments: qemuCases)
    func qemuMade(_ c: QemuVDICase) throws {
        let dir = TempDir()
        let path = dir.file("made.vdi")
        try sh(["qemu-img", "create", "-q", "-f", "vdi", "-o", "static=\(c.isStatic ? "on" : "off")", path, c.size])
        let qsize = try VDIPeer.qemuVirtualSize(path)
        try sh(["qemu-io", "-f", "vdi", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 3000 1001",
                "-c", "write -P 0x33 1048000 1000", "-c", "write -P 0x44 \(qsize - 4096) 4096", path])
        let expected = try VDIPeer.qemuRaw(path, dir)
        let img = try openRO(path)
        #expect(img.info.format == "vdi")
        #expect(img.info.virtualSize == qsize, "virtual size \(img.info.virtualSize), qemu says \(qsize)")
        var model = try readAll(img)
        #expect(VDIPeer.firstDifference(model, expected) == nil, "\(c): contents differ from qemu's reading")
        try img.close()
        #expect(try VDIPeer.check(path).exitCode == 0)

        let sizeBefore = try VDIPeer.fileSize(path)
        let rw = try openRW(path)
        var rng = SplitMix(state: 41)
        try VDIPeer.randomOps(rw, &model, count: 40, maxLength: 300_000, &rng)
        #expect(try VDIPeer.firstDifference(readAll(rw), model) == nil)
        try rw.close()
        try VDIPeer.qemuAgrees(path, model, dir)
        #expect(try VDIPeer.check(path).exitCode == 0)
        if c.isStatic {
            #expect(try VDIPeer.fileSize(path) == sizeBefore, "a static image grew")
        }
    }

    static let vloopCases: [VloopVDICase] = [
        VloopVDICase(isStatic: false, size: 7_340_544 + 3 * 512, blockSize: nil),
        VloopVDICase(isStatic: false, size: 3_000_001, blockSize: "1M"),
        VloopVDICase(isStatic: true, size: 5_000_000, blockSize: nil),
        VloopVDICase(isStatic: true, size: 2_097_152, blockSize: nil),
    ]

    @Test("VDIs vloop creates and writes pass qemu-img check and compare; qemu's writes into them read the same in vloop",
          arguments: vloopCases)
    func vloopMade(_ c: VloopVDICase) throws {
        let dir = TempDir()
        let path = dir.file("ours.vdi")
        var opts: [(String, String)] = []
        if c.isStatic { opts.append(("static", "on")) }
        if let b = c.blockSize { opts.append(("block_size", b)) }
        try VDIPeer.create(path, size: c.size, options: opts)
        try sh(["qemu-img", "check", "-f", "vdi", path])
        let img = try openRW(path)
        let size = img.info.virtualSize
        #expect(size == c.size.alignedUp(512))
        #expect(try VDIPeer.qemuVirtualSize(path) == size, "qemu sees another virtual size")
        var model = [UInt8](repeating: 0, count: Int(size))
        var rng = SplitMix(state: c.size ^ 0x5eed)
        try VDIPeer.randomOps(img, &model, count: 50, maxLength: 200_000, &rng)
        try img.close()
        try VDIPeer.qemuAgrees(path, model, dir)
        #expect(try VDIPeer.check(path).exitCode == 0)

        // Now qemu writes (allocating where we did not), and vloop reads it back.
        let at = UInt64(size) - 70_000
        try sh(["qemu-io", "-f", "vdi", "-c", "write -P 0x5a 512 1536", "-c", "write -P 0x6b \(at) 65536", path])
        for k in 512..<2048 { model[k] = 0x5a }
        for k in Int(at)..<(Int(at) + 65536) { model[k] = 0x6b }
        let again = try openRO(path)
        #expect(try VDIPeer.firstDifference(readAll(again), model) == nil, "vloop reads qemu's writes differently")
        try again.close()
        #expect(try VDIPeer.firstDifference(VDIPeer.qemuRaw(path, dir), model) == nil)
        #expect(try VDIPeer.check(path).exitCode == 0)
    }

    @Test("the creator lays files out byte for byte as qemu-img create does (text and UUIDs aside)",
          arguments: [(false, "10M"), (false, "5000001"), (false, "200M"), (true, "3M"), (true, "1000000"), (false, "0")])
    func createMatchesQemu(_ isStatic: Bool, _ size: String) throws {
        let dir = TempDir()
        let theirs = dir.file("theirs.vdi"), ours = dir.file("ours.vdi")
        try sh(["qemu-img", "create", "-q", "-f", "vdi", "-o", "static=\(isStatic ? "on" : "off")", theirs, size])
        try VDIPeer.create(ours, size: try SizeParser.parse(size), options: isStatic ? [("static", "on")] : [])
        var a = try readFile(theirs), b = try readFile(ours)
        #expect(a.count == b.count, "file sizes differ: qemu \(a.count), vloop \(b.count)")
        guard a.count == b.count else { return }
        for k in Array(0..<0x40) + Array(0x188..<0x1a8) { a[k] = 0; b[k] = 0 }
        #expect(VDIPeer.firstDifference(a, b) == nil, "layout differs from qemu-img's")
    }

    @Test("VirtualBox's layout (0x190 header, map at 1 MiB, data at 2 MiB) reads and writes as qemu reads it, and grows in place")
    func virtualBoxLayout() throws {
        let dir = TempDir()
        let path = dir.file("vbox.vdi")
        try VDIPeer.create(path, size: 8 << 20)
        var b = try VDIPeer.header(path).bytes
        var text = [UInt8](repeating: 0, count: 0x40)
        text.putBytes(Array("<<< Oracle VM VirtualBox Disk Image >>>\n".utf8), at: 0)
        b.putBytes(text, at: 0)
        b.putLE32(0x190, at: 0x48)
        var h = VDIHeader(bytes: b)
        h.offsetBmap = 1 << 20
        h.offsetData = 2 << 20
        let f = try HostFile(path: path, writable: true)
        try f.truncate(to: 0)
        try f.write(h.bytes, at: 0)
        try f.write([UInt8](repeating: 0xff, count: 8 * 4), at: 1 << 20)
        try f.truncate(to: 2 << 20)
        try sh(["qemu-io", "-f", "vdi", "-c", "write -P 0x21 5000 70000", "-c", "write -P 0x43 7340032 4096", path])
        var model = try VDIPeer.qemuRaw(path, dir)
        let img = try openRW(path)
        #expect(try VDIPeer.firstDifference(readAll(img), model) == nil, "contents differ from qemu's reading")
        var rng = SplitMix(state: 17)
        try VDIPeer.randomOps(img, &model, count: 30, maxLength: 300_000, &rng)
        try ResizeOperation.run(img, to: 100 << 20, shrink: false)
        model += [UInt8](repeating: 0, count: (100 << 20) - (8 << 20))
        try img.write([UInt8](repeating: 0x99, count: 3000), at: (90 << 20) + 1)
        for k in ((90 << 20) + 1)..<((90 << 20) + 3001) { model[k] = 0x99 }
        try img.close()
        let after = try VDIPeer.header(path)
        #expect(after.offsetData == 2 << 20 && after.offsetBmap == 1 << 20 && after.headerSize == 0x190)
        #expect(after.textField.hasPrefix("<<< Oracle VM VirtualBox Disk Image >>>"))
        try VDIPeer.qemuAgrees(path, model, dir)
        #expect(try VDIPeer.check(path).exitCode == 0)
    }

    @Test("block extra data: guest bytes follow it in every data block, and it stays zero")
    func blockExtra() throws {
        let dir = TempDir()
        let path = dir.file("extra.vdi")
        try VDIPeer.create(path, size: 3 << 20, options: [("block_size", "64k")])
        try VDIPeer.poke(path, [(0x17c, 512)])
        var model = [UInt8](repeating: 0, count: 3 << 20)
        var img = try openRW(path)
        try img.write([UInt8](repeating: 0xab, count: 100), at: 0)
        for k in 0..<100 { model[k] = 0xab }
        var rng = SplitMix(state: 19)
        try VDIPeer.randomOps(img, &model, count: 30, maxLength: 200_000, &rng)
        try img.close()
        img = try openRO(path)
        #expect(try VDIPeer.firstDifference(readAll(img), model) == nil)
        try img.close()
        // Guest block 0 was the first allocated: data block 0, after 512 bytes of extra data.
        let h = try VDIPeer.header(path)
        let raw = try HostFile(path: path, writable: false).read(at: UInt64(h.offsetData), count: 512 + (64 << 10))
        #expect(raw[0..<512].allSatisfy { $0 == 0 })
        #expect(raw[512..<(512 + (64 << 10))].elementsEqual(model[0..<(64 << 10)]))
        #expect(try VDIPeer.check(path).exitCode == 0)
    }

    // MARK: differencing

    static let diffSize = 6 * 1024 * 1024 + 3 * 512

    /// A dynamic VDI with random data in random places; returns its bytes.
    static func makeParent(_ path: String, _ rng: inout SplitMix, size: Int = diffSize, blockSize: String = "1M") throws -> [UInt8] {
        try VDIPeer.create(path, size: UInt64(size), options: [("block_size", blockSize)])
        let img = try openRW(path)
        var model = [UInt8](repeating: 0, count: size)
        for _ in 0..<8 {
            let len = Int.random(in: 1...400_000, using: &rng)
            let off = Int.random(in: 0...(size - len), using: &rng)
            let data = randomBytes(len, &rng)
            try img.write(data, at: UInt64(off))
            model.replaceSubrange(off..<(off + len), with: data)
        }
        try img.close()
        return model
    }

    @Test("differencing child: random writes, zeroes and discards match a model through reopen; the parent is untouched",
          arguments: ["1M", "64k"])
    func differencing(_ childBlock: String) throws {
        let dir = TempDir()
        var rng = SplitMix(state: childBlock == "1M" ? 3 : 4)
        let parentPath = dir.file("parent.vdi")
        let parentView = try Self.makeParent(parentPath, &rng)
        let parentFile = try readFile(parentPath)
        let child = dir.file("child.vdi")
        try VDIPeer.create(child, size: nil, options: [("block_size", childBlock)], backing: "parent.vdi")

        var img = try openRW(child)
        #expect(img.info.virtualSize == UInt64(Self.diffSize))
        #expect(img.info.backing?.name == "parent.vdi" && img.info.backing?.format == "vdi")
        #expect(try VDIPeer.firstDifference(readAll(img), parentView) == nil, "a new child does not show its parent")
        var model = parentView
        for round in 0..<6 {
            // The last MiB stays the parent's.
            try VDIPeer.randomOps(img, &model, count: 20, maxLength: round % 2 == 0 ? 700_000 : 20_000, &rng, below: parentView,
                                  limit: Self.diffSize - (1 << 20))
            let got = try readAll(img)
            #expect(VDIPeer.firstDifference(got, model) == nil, "round \(round): child view differs from the model")
            try img.close()
            img = try openRW(child)
        }
        try img.close()
        let reopened = try openRO(child)
        #expect(try VDIPeer.firstDifference(readAll(reopened), model) == nil, "child view differs from the model after reopen")
        // What the child does not hold comes from depth 1 (the parent).
        let extents = try reopened.extents(at: 0, length: UInt64(Self.diffSize))
        #expect(extents.contains { $0.depth == 1 } && extents.contains { $0.depth == 0 && $0.isData })
        for e in extents where e.depth == 1 {
            #expect(try reopened.read(at: e.offset, count: Int(e.length)).elementsEqual(parentView[Int(e.offset)..<Int(e.end)]))
        }
        try reopened.close()
        #expect(try readFile(parentPath) == parentFile, "the parent file changed")
        #expect(try VDIPeer.check(child).exitCode == 0)
        // The child records the parent's UUIDs, nothing else.
        let (p, c) = (try VDIPeer.header(parentPath), try VDIPeer.header(child))
        #expect(c.uuidLink == p.uuidImage && c.uuidParentModification == p.uuidLastSnap && c.type == .differencing)
    }

    @Test("a chain in VirtualBox's layout (base beside Snapshots/) is found by UUID, whatever the file names")
    func snapshotsLayout() throws {
        let dir = TempDir()
        var rng = SplitMix(state: 5)
        let base = dir.file("base.vdi")
        var model = try Self.makeParent(base, &rng)
        try FileManager.default.createDirectory(atPath: dir.file("Snapshots"), withIntermediateDirectories: true)
        let snap1 = dir.file("Snapshots/snap1.vdi"), snap2 = dir.file("Snapshots/snap2.vdi")
        try VDIPeer.create(snap1, size: nil, backing: "../base.vdi")
        var img = try openRW(snap1)
        try VDIPeer.randomOps(img, &model, count: 10, maxLength: 300_000, &rng)
        try img.close()
        try VDIPeer.create(snap2, size: nil, backing: "snap1.vdi")
        img = try openRW(snap2)
        try VDIPeer.randomOps(img, &model, count: 10, maxLength: 300_000, &rng)
        try img.close()
        // VirtualBox names snapshot images after their UUIDs and the base anything.
        let u1 = try VDIPeer.header(snap1).uuidImage
        let renamed1 = dir.file("Snapshots/{\(u1)}.vdi")
        try FileManager.default.moveItem(atPath: snap1, toPath: renamed1)
        try FileManager.default.moveItem(atPath: base, toPath: dir.file("Windows 10.vdi"))
        let top = try openRO(snap2)
        #expect(top.info.backing?.name == "{\(u1)}.vdi")
        #expect(top.backingImage?.info.backing?.name == "../Windows 10.vdi")
        #expect(try VDIPeer.firstDifference(readAll(top), model) == nil)
        try top.close()
    }

    @Test("a missing parent is named by UUID with where it was looked for; a wrong parent under the expected name is refused; rebase -u records a new one")
    func parentIdentity() throws {
        let dir = TempDir()
        var rng = SplitMix(state: 9)
        let parentPath = dir.file("base.vdi")
        _ = try Self.makeParent(parentPath, &rng)
        let uuid = try VDIPeer.header(parentPath).uuidImage
        let child = dir.file("child.vdi")
        try VDIPeer.create(child, size: nil, backing: "base.vdi")
        try openRO(child).close()
        try FileManager.default.moveItem(atPath: parentPath, toPath: dir.file("base.bak"))
        do {
            try openRO(child).close()
            Issue.record("a child opened without its parent")
        } catch let e as ImageError {
            #expect(e.code == .chain)
            #expect(e.message.contains("\(uuid)"), "\(e)")
            #expect(e.path == child)
        }
        // info still works on the child alone, and says where the parent was looked for.
        var o = OpenOptions(format: .vdi)
        o.noBacking = true
        o.userNamed = [child]
        let alone = try ImageOpener.open(child, options: o)
        let search = alone.info.formatSpecific.first { $0.0 == "parent-search" }
        #expect(search != nil)
        try alone.close()

        // Another disk under the name the child falls back to.
        let impostor = dir.file("{\(uuid)}.vdi")
        _ = try Self.makeParent(impostor, &rng)
        do {
            try openRO(child).close()
            Issue.record("a child opened over the wrong parent")
        } catch let e as ImageError {
            #expect(e.code == .chain)
            #expect(e.message.contains("\(uuid)") && e.message.contains("UUID"), "\(e)")
        }
        // rebase -u records the impostor's identity; then it opens on it.
        var rw = OpenOptions(format: .vdi, writable: true)
        rw.noBacking = true
        rw.userNamed = [child]
        let top = try ImageOpener.open(child, options: rw)
        try VDIPeer.layer(top).setBacking(name: "{\(uuid)}.vdi", format: "vdi")
        try top.close()
        let now = try openRO(child)
        #expect(now.info.backing?.name == "{\(uuid)}.vdi")
        let impostorImage = try openRO(impostor)
        #expect(try VDIPeer.firstDifference(readAll(now), readAll(impostorImage)) == nil)
        try impostorImage.close()
        try now.close()

        // A parent the child could not find again is refused at create.
        let far = TempDir()
        try FileManager.default.createDirectory(atPath: far.file("a/b"), withIntermediateDirectories: true)
        try VDIPeer.create(far.file("p.vdi"), size: 1 << 20)
        #expect(throws: ImageError.self) { try VDIPeer.create(far.file("a/b/c.vdi"), size: nil, backing: "../../p.vdi") }
    }

    // MARK: hostile input

    @Test("malformed headers and block map entries fail with a clear error, never a trap or a huge allocation")
    func hostileHeaders() throws {
        let dir = TempDir()
        let base = dir.file("base.vdi")
        try VDIPeer.create(base, size: 8 << 20)
        let w = try openRW(base)
        try w.write([UInt8](repeating: 0x31, count: 3 << 20), at: 100_000)
        try w.close()
        let pristine = try readFile(base)
        let edits: [(String, [(UInt64, UInt32)])] = [
            ("signature", [(0x40, 0x1234_5678)]),
            ("version 2", [(0x44, 0x0002_0000)]),
            ("version 0", [(0x44, 0x0000_0002)]),
            ("header size", [(0x48, 0x100)]),
            ("image type", [(0x4c, 9)]),
            ("sector size", [(0x168, 4096)]),
            ("block size 3M", [(0x178, 3 << 20)]),
            ("block size 0", [(0x178, 0)]),
            ("block size 1G", [(0x178, 1 << 30)]),
            ("block extra", [(0x17c, 3)]),
            ("huge map", [(0x180, 0x7fff_ffff)]),
            ("map past end", [(0x180, 0x0100_0000)]),
            ("map in header", [(0x154, 0x100)]),
            ("map offset past end", [(0x154, 0x8000_0000)]),
            ("data in map", [(0x158, 0x200)]),
            ("data past end", [(0x158, 0x7000_0000)]),
            ("disk bigger than map", [(0x170, 0), (0x174, 1)]),
            ("entry past blocks", [(0x200, 5000)]),
            ("entry huge", [(0x204, 0xffff_fff0)]),
        ]
        for (name, values) in edits {
            let path = dir.file("\(name).vdi")
            try Data(pristine).write(to: URL(fileURLWithPath: path))
            try VDIPeer.poke(path, values)
            do {
                let img = try openRO(path, format: .vdi)
                _ = try readAll(img)
                try img.close()
                Issue.record("\(name): read without complaint")
            } catch let e as ImageError {
                #expect(e.path == path, "\(name): \(e)")
                #expect([.corrupt, .unsupported, .invalidFormat].contains(e.code), "\(name): \(e)")
            }
        }
    }

    @Test("random damage to header and block map never traps")
    func randomDamage() throws {
        let dir = TempDir()
        let base = dir.file("base.vdi")
        try VDIPeer.create(base, size: 3 << 20, options: [("block_size", "64k")])
        let w = try openRW(base)
        try w.write([UInt8](repeating: 0x31, count: 1 << 20), at: 100_000)
        try w.close()
        let pristine = try readFile(base)
        var rng = SplitMix(state: 77)
        for round in 0..<80 {
            var bytes = pristine
            for _ in 0..<Int.random(in: 1...6, using: &rng) {
                let at = Int.random(in: 0x40..<0x400, using: &rng)
                bytes[at] = UInt8.random(in: 0...255, using: &rng)
            }
            let path = dir.file("damaged-\(round).vdi")
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            do {
                let img = try openRW(path, format: .vdi)
                if img.info.virtualSize <= 64 << 20 {
                    _ = try readAll(img)
                    try img.write([UInt8](repeating: 0x77, count: 70_000), at: 60_000)
                    _ = try VDIPeer.layer(img).check(repair: .all)
                }
                try img.close()
            } catch let e as ImageError {
                #expect(e.path == path, "round \(round): \(e)")
            }
            try? FileManager.default.removeItem(atPath: path)
        }
    }

    // MARK: check

    /// An image with blocks 0…4 allocated in that order (data block i holds guest block
    /// i, filled with i+1), and its model.
    static func fiveBlocks(_ path: String) throws -> [UInt8] {
        try VDIPeer.create(path, size: 8 << 20)
        let img = try openRW(path)
        var model = [UInt8](repeating: 0, count: 8 << 20)
        for i in 0..<5 {
            try img.write([UInt8](repeating: UInt8(i + 1), count: 1 << 20), at: UInt64(i) << 20)
            for k in (i << 20)..<((i + 1) << 20) { model[k] = UInt8(i + 1) }
        }
        try img.close()
        return model
    }

    @Test("check finds a wrong count, shared blocks, entries past the image and leaks; -r repairs them and qemu agrees")
    func checkAndRepair() throws {
        let dir = TempDir()
        // A count too low: the next block qemu allocates would overwrite block 4.
        let low = dir.file("low.vdi")
        var model = try Self.fiveBlocks(low)
        try VDIPeer.poke(low, [(0x184, 3)])
        var r = try VDIPeer.check(low)
        #expect(r.exitCode == 2 && r.corruptions.contains { $0.contains("blocks allocated") }, "\(r)")
        r = try VDIPeer.check(low, repair: .all)
        #expect(r.repairedCorruptions >= 1)
        #expect(try VDIPeer.check(low).exitCode == 0)
        try VDIPeer.qemuAgrees(low, model, dir)

        // Two entries sharing a block: each gets its own copy, then writes stay apart.
        let shared = dir.file("shared.vdi")
        model = try Self.fiveBlocks(shared)
        try VDIPeer.poke(shared, [(0x200 + 4 * 6, 1)])  // guest block 6 → data block 1
        for k in (6 << 20)..<(7 << 20) { model[k] = 2 }
        r = try VDIPeer.check(shared)
        #expect(r.exitCode == 2 && r.corruptions.contains { $0.contains("another entry") }, "\(r)")
        r = try VDIPeer.check(shared, repair: .all)
        #expect(r.remainingCorruptions == 0 && r.repairedCorruptions >= 1, "\(r)")
        let img = try openRW(shared)
        try img.write([UInt8](repeating: 0xee, count: 4096), at: 6 << 20)
        for k in (6 << 20)..<((6 << 20) + 4096) { model[k] = 0xee }
        #expect(try VDIPeer.firstDifference(readAll(img), model) == nil)
        try img.close()
        try VDIPeer.qemuAgrees(shared, model, dir)

        // An entry past the image's blocks is unmapped by -r all.
        let past = dir.file("past.vdi")
        model = try Self.fiveBlocks(past)
        try VDIPeer.poke(past, [(0x200 + 4 * 2, 100)])
        for k in (2 << 20)..<(3 << 20) { model[k] = 0 }
        #expect(try VDIPeer.check(past).exitCode == 2)
        _ = try VDIPeer.check(past, repair: .all)
        #expect(try VDIPeer.check(past).exitCode == 0)
        try VDIPeer.qemuAgrees(past, model, dir)

        // A block no entry uses (as a crash between data and map leaves): -r leaks moves
        // the last block into its place and the file shrinks.
        let leaky = dir.file("leaky.vdi")
        model = try Self.fiveBlocks(leaky)
        try VDIPeer.poke(leaky, [(0x200 + 4 * 1, 0xffff_ffff)])
        for k in (1 << 20)..<(2 << 20) { model[k] = 0 }
        r = try VDIPeer.check(leaky)
        #expect(r.leaks == 1 && r.exitCode == 3, "\(r)")
        let sizeBefore = try VDIPeer.fileSize(leaky)
        r = try VDIPeer.check(leaky, repair: .leaks)
        #expect(r.repairedLeaks == 1)
        #expect(try VDIPeer.check(leaky).exitCode == 0)
        #expect(try VDIPeer.fileSize(leaky) == sizeBefore - (1 << 20))
        #expect(try VDIPeer.header(leaky).blocksAllocated == 4)
        try VDIPeer.qemuAgrees(leaky, model, dir)
        // qemu's own check finds the repaired images clean too (qemuAgrees ran it).
    }

    // MARK: operations

    @Test("resize: grows within the map's room, grows past it (data blocks move), shrinks; static images grow; qemu agrees")
    func resize() throws {
        let dir = TempDir()
        var rng = SplitMix(state: 21)
        for isStatic in [false, true] {
            let path = dir.file(isStatic ? "static.vdi" : "dynamic.vdi")
            // qemu's layout: a 512-byte map, room for 128 blocks.
            try sh(["qemu-img", "create", "-q", "-f", "vdi", "-o", "static=\(isStatic ? "on" : "off")", path, "3M"])
            let img = try openRW(path)
            var model = [UInt8](repeating: 0, count: 3 << 20)
            try VDIPeer.randomOps(img, &model, count: 12, maxLength: 300_000, &rng)
            try ResizeOperation.run(img, to: 40 << 20, shrink: false)
            model += [UInt8](repeating: 0, count: (40 << 20) - (3 << 20))
            #expect(img.info.virtualSize == 40 << 20)
            try img.write([UInt8](repeating: 0x77, count: 100_000), at: (40 << 20) - 100_000)
            for k in ((40 << 20) - 100_000)..<(40 << 20) { model[k] = 0x77 }
            #expect(try VDIPeer.firstDifference(readAll(img), model) == nil)
            try img.close()
            #expect(try VDIPeer.header(path).offsetData == 0x400, "grew without moving data")
            try VDIPeer.qemuAgrees(path, model, dir)
            #expect(try VDIPeer.check(path).exitCode == 0)

            // Past the room: 300 blocks need 1200 bytes of map, so data blocks move.
            let big = try openRW(path)
            try ResizeOperation.run(big, to: 300 << 20, shrink: false)
            model += [UInt8](repeating: 0, count: (300 << 20) - (40 << 20))
            try big.write([UInt8](repeating: 0x66, count: 5000), at: (200 << 20) + 7)
            for k in ((200 << 20) + 7)..<((200 << 20) + 5007) { model[k] = 0x66 }
            #expect(try VDIPeer.firstDifference(readAll(big), model) == nil)
            try big.close()
            #expect(try VDIPeer.header(path).offsetData > 0x400)
            try VDIPeer.qemuAgrees(path, model, dir)
            #expect(try VDIPeer.check(path).exitCode == 0)

            let small = try openRW(path)
            try ResizeOperation.run(small, to: 2 << 20, shrink: true)
            try small.close()
            model = Array(model[0..<(2 << 20)])
            try VDIPeer.qemuAgrees(path, model, dir)
            #expect(try VDIPeer.check(path).exitCode == 0)
            let grown = try openRW(path)
            try ResizeOperation.run(grown, to: (5 << 20) + 512, shrink: false)
            model += [UInt8](repeating: 0, count: (3 << 20) + 512)
            #expect(try VDIPeer.firstDifference(readAll(grown), model) == nil, "bytes past a shrink came back")
            #expect(throws: ImageError.self) { try ResizeOperation.run(grown, to: (6 << 20) + 1, shrink: false) }
            try grown.close()
            try VDIPeer.qemuAgrees(path, model, dir)
            #expect(try VDIPeer.check(path).exitCode == 0)
        }
    }

    @Test("rebase onto nothing turns a differencing image into a dynamic one that qemu reads the same")
    func rebaseToNone() throws {
        let dir = TempDir()
        var rng = SplitMix(state: 31)
        let parentView = try Self.makeParent(dir.file("p.vdi"), &rng)
        let child = dir.file("c.vdi")
        try VDIPeer.create(child, size: nil, backing: "p.vdi")
        let top = try openRW(child)
        var model = parentView
        try VDIPeer.randomOps(top, &model, count: 20, maxLength: 100_000, &rng, below: parentView)
        try RebaseOperation.run(top: top, newBacking: nil, newName: nil, newFormat: nil)
        try top.close()
        let img = try openRO(child)
        #expect(img.info.backing == nil)
        #expect(try VDIPeer.firstDifference(readAll(img), model) == nil)
        try img.close()
        try VDIPeer.qemuAgrees(child, model, dir)
        #expect(try VDIPeer.check(child).exitCode == 0)
    }

    @Test("commit writes a differencing child into its parent and empties the child")
    func commit() throws {
        let dir = TempDir()
        var rng = SplitMix(state: 41)
        let parentPath = dir.file("p.vdi")
        let parentView = try Self.makeParent(parentPath, &rng)
        let child = dir.file("c.vdi")
        try VDIPeer.create(child, size: nil, backing: "p.vdi")
        let top = try openRW(child)
        var model = parentView
        try VDIPeer.randomOps(top, &model, count: 20, maxLength: 100_000, &rng, below: parentView)
        try top.close()
        let c = try ImageOpener.openForCommit(child, format: .vdi, backingFormat: .vdi)
        try CommitOperation.run(top: c, keepTop: false)
        try c.close()
        try VDIPeer.qemuAgrees(parentPath, model, dir)
        let after = try openRO(child)
        #expect(try VDIPeer.firstDifference(readAll(after), model) == nil)
        #expect(try after.extents(at: 0, length: after.info.virtualSize).allSatisfy { $0.depth == 1 || !$0.isData })
        try after.close()
        #expect(try VDIPeer.check(child).exitCode == 0)
        #expect(try VDIPeer.header(child).blocksAllocated == 0)
    }

    @Test("concurrent writers to a dynamic and a differencing image keep every write", arguments: [false, true])
    func concurrentWriters(_ differencing: Bool) throws {
        let dir = TempDir()
        var rng = SplitMix(state: 51)
        let size = Self.diffSize
        var below = [UInt8](repeating: 0, count: size)
        let path = dir.file("top.vdi")
        if differencing {
            below = try Self.makeParent(dir.file("p.vdi"), &rng, blockSize: "64k")
            try VDIPeer.create(path, size: nil, options: [("block_size", "64k")], backing: "p.vdi")
        } else {
            try VDIPeer.create(path, size: UInt64(size), options: [("block_size", "64k")])
        }
        let img = try openRW(path)
        // Each thread owns interleaved 8 KiB stripes and writes unaligned pieces of them.
        let threads = 4, stripe = 8192
        let stripes = size / stripe
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            var r = SplitMix(state: UInt64(t) + 1)
            for s in stride(from: t, to: stripes, by: threads) where Int.random(in: 0..<3, using: &r) != 0 {
                try! img.write([UInt8](repeating: UInt8(t + 1), count: stripe - 100), at: UInt64(s * stripe + 50))
                if s % 5 == 0 { _ = try! img.read(at: UInt64(s * stripe), count: stripe) }
            }
        }
        try img.close()
        let reader = try openRO(path)
        let all = try readAll(reader)
        try reader.close()
        for s in 0..<stripes {
            let base = s * stripe
            #expect(all[base..<(base + 50)].elementsEqual(below[base..<(base + 50)]), "stripe \(s) head changed")
            let mid = all[(base + 50)..<(base + stripe - 50)]
            let ok = mid.allSatisfy { $0 == UInt8(s % threads + 1) } || mid.elementsEqual(below[(base + 50)..<(base + stripe - 50)])
            #expect(ok, "stripe \(s) holds a mix of writes")
        }
        #expect(try VDIPeer.check(path).exitCode == 0)
    }

    @Test("every power-cut state opens, has no corruption, and keeps flushed data", arguments: [false, true])
    func powerCuts(_ differencing: Bool) throws {
        let size = 1 << 20
        let dir = TempDir()
        var rng = SplitMix(state: differencing ? 61 : 62)
        var below = [UInt8](repeating: 0, count: size)
        let path = dir.file("img.vdi")
        if differencing {
            below = try Self.makeParent(dir.file("base.vdi"), &rng, size: size, blockSize: "64k")
            try VDIPeer.create(path, size: nil, options: [("block_size", "64k")], backing: "base.vdi")
        } else {
            try VDIPeer.create(path, size: UInt64(size), options: [("block_size", "64k")])
        }
        let base = [path: try readFile(path)]
        let recorder = WriteRecorder(directory: dir.path + "/img")
        var model = below
        var durable: [(logLength: Int, bytes: [UInt8], dirty: [Bool])] = [(0, below, [Bool](repeating: false, count: size))]
        var dirty = [Bool](repeating: false, count: size)
        recorder.start()
        do {
            let img = try openRW(path)
            for _ in 0..<40 {
                let len = Int.random(in: 1...40_000, using: &rng)
                let off = Int.random(in: 0..<(size - len), using: &rng)
                switch Int.random(in: 0..<6, using: &rng) {
                case 0...2:
                    let data = randomBytes(len, &rng)
                    try img.write(data, at: UInt64(off))
                    model.replaceSubrange(off..<(off + len), with: data)
                    for k in off..<(off + len) { dirty[k] = true }
                case 3:
                    try img.writeZeroes(at: UInt64(off), length: UInt64(len), mayUnmap: false)
                    for k in off..<(off + len) { model[k] = 0; dirty[k] = true }
                default:
                    try img.flush()
                    durable.append((recorder.log.count, model, [Bool](repeating: false, count: size)))
                    dirty = [Bool](repeating: false, count: size)
                }
                for k in 0..<size where dirty[k] { durable[durable.count - 1].dirty[k] = true }
            }
            try img.close()
            durable.append((recorder.log.count, model, [Bool](repeating: false, count: size)))
        }
        recorder.stop()
        let log = recorder.log
        #expect(log.count > 20)
        let stateDir = TempDir()
        if differencing { try FileManager.default.copyItem(atPath: dir.file("base.vdi"), toPath: stateDir.file("base.vdi")) }
        var states = 0
        for cut in stride(from: 0, through: log.count, by: max(1, log.count / 100)) {
            var lastSync = -1
            for i in 0..<cut { if case .sync = log[i] { lastSync = i } }
            let unsynced = (0..<cut).filter { i in
                if case .sync = log[i] { return false }
                return i > lastSync
            }
            var variants: [Set<Int>] = [[]]
            if !unsynced.isEmpty {
                variants.append(Set(unsynced))
                variants.append(Set(unsynced.filter { _ in Bool.random(using: &rng) }))
            }
            let promise = durable.last { $0.logLength <= cut }!
            for drop in variants {
                try CrashConsistencyTests.materialize(base: base, ops: log[0..<cut], drop: drop, into: stateDir.path)
                let p = stateDir.file("img.vdi")
                let img = try openRO(p)
                let got = try readAll(img)
                for k in 0..<size where !promise.dirty[k] && got[k] != promise.bytes[k] {
                    Issue.record("cut \(cut)/\(log.count), dropped \(drop.count): byte \(k) is \(got[k]), flushed \(promise.bytes[k])")
                    break
                }
                try img.close()
                let report = try VDIPeer.check(p)
                #expect(report.corruptions.isEmpty, "cut \(cut): \(report.corruptions.prefix(3))")
                states += 1
            }
        }
        #expect(states > 100)
    }

    // MARK: pure parsing

    @Test("UUIDs print as VirtualBox prints them; headers round-trip")
    func uuidAndHeader() {
        let u = VDIUUID(bytes: [0x2f, 0xc6, 0x5d, 0x59, 0xb9, 0x2d, 0x95, 0x4f, 0xaa, 0x32, 0x65, 0xd0, 0xa5, 0x3d, 0xa5, 0x63])
        #expect(u.description == "595dc62f-2db9-4f95-aa32-65d0a53da563")
        #expect(VDIUUID.random().description.dropFirst(14).first == "4")
        var h = VDIHeader(type: .dynamic, diskSize: 5_000_192, blockSize: 1 << 20, blocks: 5)
        #expect(h.offsetBmap == 0x200 && h.offsetData == 0x400 && h.headerSize == 0x180 && h.writableLength == 0x1c8)
        h.blocksAllocated = 3
        let again = VDIHeader.parse(h.bytes)
        #expect(again?.blocksAllocated == 3 && again?.virtualSize == 5_000_192 && again?.type == .dynamic)
        #expect((try? again?.validate(fileSize: 0x400, path: "x")) != nil)
        #expect(VDIHeader.parse([UInt8](repeating: 0, count: VDIHeader.storedSize)) == nil)
    }
}
