import Foundation
import Testing
@testable import VirtualDisk

/// VHDX against real images (corpus, the dirty-log image among them), against
/// qemu-img/qemu-io for fixed and dynamic disks, and against an in-memory model for
/// differencing disks (qemu cannot open those).
///
/// Helpers live in `VHDXPeer` so this file shares no names with other test files.
enum VHDXPeer {
    static func create(_ path: String, size: UInt64, options: [(String, String)] = [], backing: String? = nil) throws {
        var r = CreateRequest(path: path, format: .vhdx, size: size)
        r.options = options
        if let backing { r.backingFile = backing; r.backingFormat = .vhdx }
        try CreateOperation.run(r)
    }

    static func qemuRaw(_ path: String, _ dir: TempDir) throws -> [UInt8] {
        let raw = dir.file("qemu-\(UUID().uuidString).raw")
        try sh(["qemu-img", "convert", "-U", "-f", "vhdx", "-O", "raw", path, raw])
        defer { try? FileManager.default.removeItem(atPath: raw) }
        return try readFile(raw)
    }

    static func qemuAgrees(_ path: String, _ model: [UInt8], _ dir: TempDir) throws {
        try sh(["qemu-img", "check", "-U", "-f", "vhdx", path])
        try qemuCompare(path, format: "vhdx", model: model, dir)
    }

    static func sha256(_ path: String) throws -> String {
        try sh(["sha256sum", path]).out.split(separator: " ").first.map(String.init) ?? ""
    }

    static func layer(_ image: DiskImage) -> VHDXLayer {
        (image as! LayeredImage).layer as! VHDXLayer
    }

    static func check(_ path: String, repair: CheckRepair = .none) throws -> CheckReport {
        try checkImage(path, format: .vhdx, repair: repair)
    }

}

struct QemuVHDXCase: CustomStringConvertible, Sendable {
    let options: String
    let size: String
    var description: String { "\(options) \(size)" }
}

struct VloopVHDXCase: CustomStringConvertible, Sendable {
    let options: [String]
    let size: UInt64
    var description: String { "\(options.joined(separator: ",")) \(size)" }
}

@Suite("VHDX")
struct VHDXTests {
    // MARK: pure parsers

    @Test("CRC-32C matches the standard check value and GUIDs round-trip")
    func crcAndGUID() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        let g = VHDXRegionTable.batGUID
        #expect(VHDXGUID.string(g) == "2dc27766-f623-4200-9d64-115e9bfd4a08")
        #expect(VHDXGUID.parse("{" + VHDXGUID.string(g).uppercased() + "}") == g)
    }

    @Test("a log entry we build parses back, and a flipped byte invalidates it")
    func logEntryRoundTrip() throws {
        let guid = VHDXGUID.random()
        var sector = [UInt8](repeating: 0x5c, count: 4096)
        sector[0] = 1; sector[4095] = 2
        let entry = VHDXLog.build(updates: [(3 << 20, sector)], sequence: 7, tail: 0, logGUID: guid,
                                  flushedFileOffset: 4 << 20, lastFileOffset: 5 << 20)
        var log = entry + [UInt8](repeating: 0, count: (1 << 20) - entry.count)
        let read: (UInt64, Int) throws -> [UInt8] = { at, n in Array(log[Int(at)..<(Int(at) + n)]) }
        let seq = try VHDXLog.activeSequence(logLength: 1 << 20, logGUID: guid, read: read)
        #expect(seq.count == 1 && seq[0].sequence == 7 && seq[0].writes == [VHDXLog.Write(fileOffset: 3 << 20, length: 4096, data: sector)])
        #expect(try VHDXLog.activeSequence(logLength: 1 << 20, logGUID: VHDXGUID.random(), read: read).isEmpty, "another log GUID must not replay")
        log[5000] ^= 1
        let read2: (UInt64, Int) throws -> [UInt8] = { at, n in Array(log[Int(at)..<(Int(at) + n)]) }
        #expect(try VHDXLog.activeSequence(logLength: 1 << 20, logGUID: guid, read: read2).isEmpty)
    }

    // MARK: corpus

    @Test("corpus VHDXs read as their MANIFEST sha256 says", arguments: corpusEntries(format: "vhdx").filter { !$0.sha256.isEmpty })
    func corpusContents(_ e: CorpusEntry) throws {
        let dir = TempDir()
        let path = try unpackCorpus(e.file, into: dir)
        let img = try openRO(path)
        #expect(img.info.format == "vhdx")
        let raw = dir.file("view.raw")
        try RawLayer.create(path: raw, size: img.info.virtualSize)
        let out = try openRW(raw, format: .raw)
        try ConvertOperation.run(source: img, target: out, options: ConvertOptions())
        try out.close()
        try img.close()
        #expect(try VHDXPeer.sha256(raw) == e.sha256, "\(e.file): sha256 of the guest view differs")
        #expect(try VHDXPeer.check(path).exitCode == 0, "\(e.file): vloop check finds problems")
    }

    @Test("the dirty-log image reads 0xa5 over 0..18 MiB read-only without changing its file; read-write replays it for qemu")
    func dirtyLog() throws {
        let dir = TempDir()
        let path = try unpackCorpus("iotest-dirtylog-10G-4M.vhdx.xz", into: dir)
        let before = try VHDXPeer.sha256(path)
        let img = try openRO(path)
        let head = try img.read(at: 0, count: 18 << 20)
        #expect(head.allSatisfy { $0 == 0xa5 }, "replayed contents differ")
        #expect(try VHDXPeer.check(path).exitCode == 2, "check must report the unreplayed log")
        try img.close()
        #expect(try VHDXPeer.sha256(path) == before, "a read-only open changed the file")
        // qemu refuses the dirty image read-only.
        #expect(try sh(["qemu-img", "info", "-f", "vhdx", path], check: false).status != 0)

        let rw = try openRW(path)
        #expect(VHDXPeer.layer(rw).lock.run { !VHDXPeer.layer(rw).header.hasLog }, "the log GUID is still set")
        try rw.close()
        #expect(try VHDXPeer.sha256(path) != before)
        let reopened = try openRO(path)
        #expect(VHDXPeer.layer(reopened).overlay == nil, "the log was not emptied")
        #expect(try reopened.read(at: 0, count: 18 << 20).allSatisfy { $0 == 0xa5 })
        try reopened.close()
        try sh(["qemu-img", "check", "-f", "vhdx", path])
        // qemu's view: 10 GiB (read only its head; the rest is a hole).
        let raw = dir.file("qemu.raw")
        try sh(["qemu-img", "convert", "-U", "-f", "vhdx", "-O", "raw", path, raw])
        #expect(try FileManager.default.attributesOfItem(atPath: raw)[.size] as? Int == 10 << 30)
        let qhead = try #require(FileHandle(forReadingAtPath: raw)).readData(ofLength: 18 << 20)
        #expect(qhead.count == 18 << 20 && qhead.allSatisfy { $0 == 0xa5 })
    }

    @Test("the differencing corpus image parses and fails naming its missing parent")
    func missingParent() throws {
        let dir = TempDir()
        let path = try unpackCorpus("win10-differencing.avhdx.xz", into: dir)
        var o = OpenOptions(format: .vhdx)
        o.noBacking = true
        o.userNamed = [path]
        let top = try ImageOpener.open(path, options: o)
        let name = try #require(top.info.backing?.name)
        #expect(name.hasSuffix(".avhdx") || name.hasSuffix(".vhdx"))
        #expect(top.info.backing?.format == "vhdx")
        try top.close()
        do {
            try openRO(path).close()
            Issue.record("opened without its parent")
        } catch let e as ImageError {
            #expect(e.code == .chain)
            #expect(e.description.contains(name), "\(e)")
        }
    }

    // MARK: qemu interop

    static let qemuCases: [QemuVHDXCase] = [
        QemuVHDXCase(options: "subformat=dynamic", size: "5000001"),
        QemuVHDXCase(options: "subformat=dynamic,block_size=1M,block_state_zero=off", size: "9437696"),
        QemuVHDXCase(options: "subformat=fixed", size: "3146240"),
        QemuVHDXCase(options: "subformat=fixed,block_state_zero=off,block_size=2M", size: "10M"),
    ]

    @Test("qemu-made VHDXs read bit-exact; qemu reads back what vloop writes into them", arguments: qemuCases)
    func qemuMade(_ c: QemuVHDXCase) throws {
        let dir = TempDir()
        let path = dir.file("made.vhdx")
        try sh(["qemu-img", "create", "-q", "-f", "vhdx", "-o", c.options, path, c.size])
        let img0 = try openRO(path)
        let size = img0.info.virtualSize
        try img0.close()
        try sh(["qemu-io", "-f", "vhdx", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 3000 1001",
                "-c", "write -P 0x33 2097000 1000", "-c", "write -P 0x44 \(size - 4096) 4096", path])
        let expected = try VHDXPeer.qemuRaw(path, dir)
        let img = try openRO(path)
        #expect(img.info.virtualSize == UInt64(expected.count))
        var model = try readAll(img)
        #expect(model == expected, "\(c): contents differ from qemu's reading")
        try img.close()

        let rw = try openRW(path)
        var rng = SplitMix(state: 77)
        try randomWrites(rw, &model, count: 30, maxLength: 300_000, &rng)
        try rw.writeZeroes(at: 1024, length: 70_000, mayUnmap: true)
        for k in 1024..<71_024 { model[k] = 0 }
        try rw.discard(at: 0, length: 0)
        #expect(try readAll(rw) == model)
        try rw.close()
        try VHDXPeer.qemuAgrees(path, model, dir)
        #expect(try VHDXPeer.check(path).exitCode == 0)
    }

    static let vloopCases: [VloopVHDXCase] = [
        VloopVHDXCase(options: [], size: 7_340_544),
        VloopVHDXCase(options: ["block_size=1M"], size: 5_000_192 + 512),
        VloopVHDXCase(options: ["block_size=1M", "logical_sector_size=4096"], size: 6 << 20),
        VloopVHDXCase(options: ["subformat=fixed", "block_size=2M"], size: 5_000_192),
        VloopVHDXCase(options: ["subformat=fixed", "block_state_zero=off", "logical_sector_size=4096", "block_size=1M"], size: 3 << 20 + 4096),
        VloopVHDXCase(options: ["log_size=2M", "block_state_zero=off", "block_size=1M"], size: 4 << 20),
    ]

    @Test("VHDXs vloop creates and writes pass qemu-img check and compare; qemu's writes into them read the same",
          arguments: vloopCases)
    func vloopMade(_ c: VloopVHDXCase) throws {
        let dir = TempDir()
        let path = dir.file("ours.vhdx")
        let opts = c.options.map { o -> (String, String) in
            let kv = o.split(separator: "=").map(String.init)
            return (kv[0], kv[1])
        }
        try VHDXPeer.create(path, size: c.size, options: opts)
        // qemu opens only 512-byte logical sectors ("Operation not supported" otherwise):
        // those images are judged against the model and by reopening.
        let lss: UInt32 = c.options.contains("logical_sector_size=4096") ? 4096 : 512
        let qemu = lss == 512
        if qemu { try VHDXPeer.qemuAgrees(path, [UInt8](repeating: 0, count: Int(c.size)), dir) }
        let img = try openRW(path)
        let size = img.info.virtualSize
        #expect(size == c.size)
        #expect(img.info.logicalSectorSize == lss)
        var model = [UInt8](repeating: 0, count: Int(size))
        var rng = SplitMix(state: c.size ^ 0x5eed)
        try randomWrites(img, &model, count: 40, maxLength: 200_000, &rng)
        // Whole-block zeroes and discards take the ZERO / UNMAPPED states.
        try img.writeZeroes(at: 0, length: 1 << 20, mayUnmap: false)
        for k in 0..<(1 << 20) { model[k] = 0 }
        try img.discard(at: 1 << 20, length: 1 << 20)
        let got = try img.read(at: 1 << 20, count: 1 << 20)
        model.replaceSubrange((1 << 20)..<(2 << 20), with: got)
        try img.close()
        let back = try openRO(path)
        #expect(try readAll(back) == model, "contents differ from the model after reopen")
        try back.close()
        #expect(try VHDXPeer.check(path).exitCode == 0)
        guard qemu else { return }
        try VHDXPeer.qemuAgrees(path, model, dir)

        let at = size - 70_000
        try sh(["qemu-io", "-f", "vhdx", "-c", "write -P 0x5a 512 1536", "-c", "write -P 0x6b \(at) 65536", path])
        for k in 512..<2048 { model[k] = 0x5a }
        for k in Int(at)..<(Int(at) + 65536) { model[k] = 0x6b }
        let again = try openRO(path)
        #expect(try readAll(again) == model, "vloop reads qemu's writes differently")
        try again.close()
    }

    @Test("writing zeroes where nothing is allocated allocates nothing")
    func zeroesAllocateNothing() throws {
        let dir = TempDir()
        let path = dir.file("z.vhdx")
        try VHDXPeer.create(path, size: 8 << 20, options: [("block_size", "1M")])
        let before = try FileManager.default.attributesOfItem(atPath: path)[.size] as! UInt64
        let img = try openRW(path)
        try img.write([UInt8](repeating: 0, count: 3 << 20), at: 1000)
        try img.writeZeroes(at: 0, length: 8 << 20, mayUnmap: false)
        try img.close()
        let after = try FileManager.default.attributesOfItem(atPath: path)[.size] as! UInt64
        #expect(after == before)
    }

    @Test("resize grows the disk (BAT moved when it lacks room); qemu agrees", arguments: [false, true])
    func resize(_ fixed: Bool) throws {
        let dir = TempDir()
        let path = dir.file("r.vhdx")
        try VHDXPeer.create(path, size: 3 << 20, options: [("block_size", "1M")] + (fixed ? [("subformat", "fixed")] : []))
        var model = [UInt8](repeating: 0, count: 3 << 20)
        var rng = SplitMix(state: 5)
        var img = try openRW(path)
        try randomWrites(img, &model, count: 10, maxLength: 100_000, &rng)
        try img.close()
        let big: UInt64 = fixed ? (40 << 20) + 512 : (600 << 30)  // 600 GiB: 1 MiB of BAT is too small
        img = try openRW(path)
        try ResizeOperation.run(img, to: big, shrink: false)
        try img.close()
        img = try openRW(path)
        #expect(img.info.virtualSize == big)
        try img.write([1, 2, 3], at: big - 3)
        #expect(try img.read(at: 0, count: model.count) == model)
        #expect(try img.read(at: big - 4, count: 4) == [0, 1, 2, 3])
        try img.close()
        #expect(try VHDXPeer.check(path).exitCode == 0)
        try sh(["qemu-img", "check", "-f", "vhdx", path])
        if fixed {
            model += [UInt8](repeating: 0, count: Int(big) - model.count)
            model.replaceSubrange((Int(big) - 3)..<Int(big), with: [1, 2, 3])
            try VHDXPeer.qemuAgrees(path, model, dir)
        }
    }

    // MARK: differencing

    static let diffSize = 6 * 1024 * 1024 + 3 * 512

    static func makeParent(_ path: String, _ rng: inout SplitMix, options: [(String, String)] = []) throws -> [UInt8] {
        try VHDXPeer.create(path, size: UInt64(diffSize), options: [("block_size", "1M")] + options)
        let img = try openRW(path)
        var model = [UInt8](repeating: 0, count: diffSize)
        for _ in 0..<8 {
            let len = Int.random(in: 1...400_000, using: &rng)
            let off = Int.random(in: 0...(diffSize - len), using: &rng)
            let data = randomBytes(len, &rng)
            try img.write(data, at: UInt64(off))
            model.replaceSubrange(off..<(off + len), with: data)
        }
        try img.close()
        return model
    }

    @Test("differencing child: random partial-sector writes match a model through reopen; the parent is untouched",
          arguments: [("1M", 512), ("2M", 512), ("1M", 4096)])
    func differencing(_ childBlock: String, _ sector: Int) throws {
        let dir = TempDir()
        var rng = SplitMix(state: UInt64(sector) + (childBlock == "2M" ? 3 : 4))
        let parentPath = dir.file("parent.vhdx")
        let size = sector == 4096 ? Self.diffSize / 4096 * 4096 + 4096 : Self.diffSize
        var parentView = try Self.makeParent(parentPath, &rng, options: sector == 4096 ? [("logical_sector_size", "4096")] : [])
        parentView += [UInt8](repeating: 0, count: max(0, size - parentView.count))
        parentView = Array(parentView.prefix(size))
        let parentFile = try readFile(parentPath)
        let child = dir.file("child.vhdx")
        try VHDXPeer.create(child, size: UInt64(size), options: [("block_size", childBlock)], backing: "parent.vhdx")

        var img = try openRW(child)
        #expect(img.info.backing?.name == "parent.vhdx" && img.info.backing?.format == "vhdx")
        #expect(img.info.logicalSectorSize == UInt32(sector))
        #expect(try readAll(img) == parentView, "a new child does not show its parent")
        var model = parentView
        var loose = [Bool](repeating: false, count: size)
        for step in 0..<120 {
            let len = Int.random(in: 1...(step % 9 == 0 ? 2_500_000 : 20_000), using: &rng)
            let off = Int.random(in: 0...(size - len), using: &rng)
            switch step % 10 {
            case 0...5:
                let data = randomBytes(len, &rng)
                try img.write(data, at: UInt64(off))
                model.replaceSubrange(off..<(off + len), with: data)
                for k in off..<(off + len) { loose[k] = false }
            case 6:
                try img.writeZeroes(at: UInt64(off), length: UInt64(len), mayUnmap: step % 20 == 6)
                for k in off..<(off + len) { model[k] = 0; loose[k] = false }
            case 7:
                try img.discard(at: UInt64(off), length: UInt64(len))
                for k in off..<(off + len) { loose[k] = true }
            case 8:
                try img.close()
                img = try openRW(child)
            default:
                let got = try img.read(at: UInt64(off), count: len)
                for i in 0..<len where !loose[off + i] && got[i] != model[off + i] {
                    Issue.record("step \(step): byte \(off + i) is \(got[i]), expected \(model[off + i])")
                    break
                }
            }
        }
        let all = try readAll(img)
        for k in 0..<size where loose[k] {
            #expect(all[k] == model[k] || all[k] == 0 || all[k] == parentView[k])
            model[k] = all[k]
        }
        #expect(all == model, "child view differs from the model")
        try img.close()
        let reopened = try openRO(child)
        #expect(try readAll(reopened) == model, "child view differs from the model after reopen")
        let extents = try reopened.extents(at: 0, length: UInt64(size))
        #expect(extents.contains { $0.depth == 1 } && extents.contains { $0.depth == 0 && $0.isData })
        try reopened.close()
        #expect(try readFile(parentPath) == parentFile, "the parent file changed")
        #expect(try VHDXPeer.check(child).exitCode == 0)
    }

    @Test("a parent written since the child was made is refused, naming it and both GUIDs")
    func parentIdentity() throws {
        let dir = TempDir()
        var rng = SplitMix(state: 9)
        let parentPath = dir.file("base.vhdx")
        _ = try Self.makeParent(parentPath, &rng)
        let child = dir.file("child.vhdx")
        try VHDXPeer.create(child, size: UInt64(Self.diffSize), backing: "base.vhdx")
        try openRO(child).close()
        let p = try openRW(parentPath)
        try p.write([1], at: 0)
        try p.close()
        do {
            try openRO(child).close()
            Issue.record("a child opened over a changed parent")
        } catch let e as ImageError {
            #expect(e.code == .chain)
            #expect(e.message.contains("base.vhdx") && e.message.contains("data write GUID"), "\(e)")
        }
    }

    @Test("the parent is found through Windows-style locator paths")
    func parentLocatorPaths() throws {
        let m = { (pairs: [(key: String, value: String)]) -> VHDXMetadata in
            VHDXMetadata(blockSize: 1 << 20, leaveBlocksAllocated: false, virtualDiskSize: 1 << 20, logicalSectorSize: 512,
                         physicalSectorSize: 4096, parentLocator: pairs)
        }
        let dir = TempDir()
        _ = FileManager.default.createFile(atPath: dir.file("base.vhdx"), contents: Data())
        let f = try HostFile(path: dir.file("child.vhdx"), writable: true, create: true)
        #expect(try VHDXLayer.parentName(m([("relative_path", ".\\base.vhdx")]), file: f) == "base.vhdx")
        #expect(try VHDXLayer.parentName(m([("absolute_win32_path", "\\\\?\\C:\\VMs\\base.vhdx")]), file: f) == "base.vhdx")
        #expect(try VHDXLayer.parentName(m([("relative_path", "..\\gone\\x.vhdx"), ("volume_path", "\\\\?\\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\\VMs\\base.vhdx")]), file: f) == "base.vhdx")
        #expect(throws: ImageError.self) { try VHDXLayer.parentName(m([("parent_linkage", "{x}")]), file: f) }
    }

    @Test("commit writes a child into its parent and empties it; the child then records the parent's new identity")
    func commit() throws {
        let dir = TempDir()
        var rng = SplitMix(state: 21)
        let basePath = dir.file("base.vhdx")
        var model = try Self.makeParent(basePath, &rng)
        let child = dir.file("child.vhdx")
        try VHDXPeer.create(child, size: UInt64(Self.diffSize), options: [("block_size", "1M")], backing: "base.vhdx")
        let c = try openRW(child)
        try randomWrites(c, &model, count: 20, maxLength: 300_000, &rng)
        try c.close()
        let top = try ImageOpener.openForCommit(child, format: .vhdx, backingFormat: .vhdx)
        try CommitOperation.run(top: top, keepTop: false)
        try top.close()
        #expect(try VHDXPeer.qemuRaw(basePath, dir) == model, "the parent does not hold the committed data")
        let reopened = try openRO(child)
        #expect(try readAll(reopened) == model)
        #expect(try !reopened.extents(at: 0, length: UInt64(Self.diffSize)).contains { $0.depth == 0 && $0.isData })
        try reopened.close()
        #expect(try VHDXPeer.check(child).exitCode == 0)
        let childSize = try FileManager.default.attributesOfItem(atPath: child)[.size] as! UInt64
        #expect(childSize <= 5 << 20)
    }

    @Test("rebase onto another parent keeps the child's view and records the new parent")
    func rebase() throws {
        let dir = TempDir()
        var rng = SplitMix(state: 22)
        var model = try Self.makeParent(dir.file("a.vhdx"), &rng)
        _ = try Self.makeParent(dir.file("b.vhdx"), &rng)
        let child = dir.file("child.vhdx")
        try VHDXPeer.create(child, size: UInt64(Self.diffSize), options: [("block_size", "1M")], backing: "a.vhdx")
        let c = try openRW(child)
        try randomWrites(c, &model, count: 10, maxLength: 100_000, &rng)
        let b = try openRO(dir.file("b.vhdx"))
        try RebaseOperation.run(top: c, newBacking: b, newName: "b.vhdx", newFormat: "vhdx")
        try b.close()
        try c.close()
        let reopened = try openRO(child)
        #expect(reopened.info.backing?.name == "b.vhdx")
        #expect(try readAll(reopened) == model)
        try reopened.close()
        #expect(try VHDXPeer.check(child).exitCode == 0)
    }

    // MARK: power cuts

    @Test("every power-cut state opens (replaying the log, in memory when read-only), checks clean and keeps flushed data",
          arguments: ["dynamic", "fixed", "differencing"])
    func powerCuts(_ kind: String) throws {
        let dir = TempDir()
        let size = 4 << 20
        var rng = SplitMix(state: UInt64(kind.count) * 1000 + 17)
        var below = [UInt8](repeating: 0, count: size)
        let path = dir.file("img.vhdx")
        if kind == "differencing" {
            below = try Self.makeParent(dir.file("base.vhdx"), &rng)
            below = Array(below.prefix(size)) + [UInt8](repeating: 0, count: max(0, size - below.count))
            try FileManager.default.removeItem(atPath: dir.file("base.vhdx"))
            try VHDXPeer.create(dir.file("base.vhdx"), size: UInt64(size), options: [("block_size", "1M")])
            let b = try openRW(dir.file("base.vhdx"))
            try b.write(below, at: 0)
            try b.close()
            try VHDXPeer.create(path, size: UInt64(size), options: [("block_size", "1M")], backing: "base.vhdx")
        } else {
            try VHDXPeer.create(path, size: UInt64(size), options: [("block_size", "1M"), ("subformat", kind)])
        }
        var base: [String: [UInt8]] = [:]
        for name in try FileManager.default.contentsOfDirectory(atPath: dir.path) { base[dir.file(name)] = try readFile(dir.file(name)) }
        let recorder = WriteRecorder(directory: dir.path + "/img")
        var model = below
        var durable: [(logLength: Int, bytes: [UInt8], dirty: [Bool])] = [(0, below, [Bool](repeating: false, count: size))]
        var dirtySinceFlush = [Bool](repeating: false, count: size)
        recorder.start()
        do {
            let img = try openRW(path)
            for _ in 0..<30 {
                let len = Int.random(in: 1...300_000, using: &rng)
                let off = Int.random(in: 0..<(size - len), using: &rng)
                switch Int.random(in: 0..<6, using: &rng) {
                case 0...2:
                    let data = randomBytes(len, &rng)
                    try img.write(data, at: UInt64(off))
                    model.replaceSubrange(off..<(off + len), with: data)
                    for k in off..<(off + len) { dirtySinceFlush[k] = true }
                case 3:
                    try img.writeZeroes(at: UInt64(off), length: UInt64(len), mayUnmap: off % 2 == 0)
                    for k in off..<(off + len) { model[k] = 0; dirtySinceFlush[k] = true }
                default:
                    try img.flush()
                    durable.append((recorder.log.count, model, [Bool](repeating: false, count: size)))
                    dirtySinceFlush = [Bool](repeating: false, count: size)
                }
                for k in 0..<size where dirtySinceFlush[k] { durable[durable.count - 1].dirty[k] = true }
            }
            try img.close()
            durable.append((recorder.log.count, model, [Bool](repeating: false, count: size)))
        }
        recorder.stop()
        let log = recorder.log
        let stateDir = TempDir()
        if kind == "differencing" { try Data(base[dir.file("base.vhdx")]!).write(to: URL(fileURLWithPath: stateDir.file("base.vhdx"))) }
        var states = 0
        var replayedInMemory = 0
        for cut in stride(from: 0, through: log.count, by: max(1, log.count / 150)) {
            var lastSync: [String: Int] = [:]
            for i in 0..<cut { if case let .sync(p) = log[i] { lastSync[p] = i } }
            let unsynced = (0..<cut).filter { i in
                switch log[i] {
                case let .write(p, _, _), let .zero(p, _, _), let .truncate(p, _): return i > (lastSync[p] ?? -1)
                case .sync: return false
                }
            }
            var variants: [Set<Int>] = [[]]
            if !unsynced.isEmpty { variants.append(Set(unsynced)) }
            let promise = durable.last { $0.logLength <= cut }!
            for drop in variants {
                try CrashConsistencyTests.materialize(base: base.filter { !$0.key.hasSuffix("base.vhdx") }, ops: log[0..<cut], drop: drop, into: stateDir.path)
                let p = stateDir.file("img.vhdx")
                let before = try readFile(p)
                let img = try openRO(p)
                let got = try readAll(img)
                for k in 0..<size where !promise.dirty[k] && got[k] != promise.bytes[k] {
                    Issue.record("\(kind): cut \(cut)/\(log.count), dropped \(drop.count): byte \(k) is \(got[k]), flushed \(promise.bytes[k])")
                    break
                }
                if VHDXPeer.layer(img).overlay != nil { replayedInMemory += 1 }
                let report = try VHDXPeer.layer(img).check(repair: .none)
                #expect(report.corruptions.filter { !$0.contains("log") }.isEmpty, "\(kind): cut \(cut): \(report.corruptions)")
                try img.close()
                #expect(try readFile(p) == before, "a read-only open changed the file")
                // A read-write open replays the log into the file: the same bytes.
                let rw = try openRW(p)
                #expect(try readAll(rw) == got, "\(kind): cut \(cut): replay in the file differs from the in-memory one")
                try rw.close()
                if kind != "differencing" && states % 10 == 0 {
                    try sh(["qemu-img", "check", "-f", "vhdx", p])
                }
                states += 1
            }
        }
        #expect(states > 60)
        #expect(replayedInMemory > 0, "\(kind): no power-cut state left a log to replay")
    }

    @Test("check finds damaged header and region table copies; -r all rewrites them and qemu agrees")
    func repair() throws {
        let dir = TempDir()
        let path = dir.file("c.vhdx")
        try VHDXPeer.create(path, size: 8 << 20, options: [("block_size", "1M")])
        let img = try openRW(path)
        try img.write([UInt8](repeating: 7, count: 5000), at: 4000)
        try img.close()
        let f = try HostFile(path: path, writable: true)
        let slot = VHDXHeader.parse(try f.read(at: VHDXHeader.offsets[0], count: 4096))!.sequenceNumber
            < VHDXHeader.parse(try f.read(at: VHDXHeader.offsets[1], count: 4096))!.sequenceNumber ? 0 : 1
        try f.write([0xee], at: VHDXHeader.offsets[slot] + 200)        // the older header
        try f.write([0xee], at: VHDXRegionTable.offsets[1] + 9000)     // region table copy 2
        let r = try VHDXPeer.check(path)
        #expect(r.corruptions.count == 2 && r.exitCode == 2, "\(r.corruptions)")
        let fixed = try VHDXPeer.check(path, repair: .all)
        #expect(fixed.repairedCorruptions == 2 && fixed.exitCode == 0, "\(fixed.corruptions)")
        #expect(try VHDXPeer.check(path).exitCode == 0)
        var model = [UInt8](repeating: 0, count: 8 << 20)
        for k in 4000..<9000 { model[k] = 7 }
        try VHDXPeer.qemuAgrees(path, model, dir)
    }

    @Test("concurrent writers to one image keep every write", arguments: [false, true])
    func concurrentWriters(_ differencing: Bool) throws {
        let dir = TempDir()
        let size = 6 << 20
        var below = [UInt8](repeating: 0, count: size)
        let path = dir.file("top.vhdx")
        if differencing {
            var rng = SplitMix(state: 3)
            below = randomBytes(size, &rng)
            try VHDXPeer.create(dir.file("base.vhdx"), size: UInt64(size), options: [("block_size", "1M")])
            let b = try openRW(dir.file("base.vhdx"))
            try b.write(below, at: 0)
            try b.close()
            try VHDXPeer.create(path, size: UInt64(size), options: [("block_size", "1M")], backing: "base.vhdx")
        } else {
            try VHDXPeer.create(path, size: UInt64(size), options: [("block_size", "1M")])
        }
        let img = try openRW(path)
        let threads = 4, stripe = 8192
        let stripes = size / stripe
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            var r = SplitMix(state: UInt64(t) + 1)
            for s in stride(from: t, to: stripes, by: threads) where Int.random(in: 0..<3, using: &r) != 0 {
                try! img.write([UInt8](repeating: UInt8(t + 1), count: stripe - 100), at: UInt64(s * stripe + 50))
                if s % 7 == 0 { _ = try! img.read(at: UInt64(s * stripe), count: stripe) }
                if s % 50 == 0 { try! img.flush() }
            }
        }
        try img.close()
        var expected = below
        for t in 0..<threads {
            var r = SplitMix(state: UInt64(t) + 1)
            for s in stride(from: t, to: stripes, by: threads) where Int.random(in: 0..<3, using: &r) != 0 {
                for k in (s * stripe + 50)..<(s * stripe + stripe - 50) { expected[k] = UInt8(t + 1) }
            }
        }
        let check = try openRO(path)
        #expect(try readAll(check) == expected)
        try check.close()
        #expect(try VHDXPeer.check(path).exitCode == 0)
    }

    @Test("random damage to the metadata of a differencing chain never traps: each open, read and check succeeds or fails cleanly")
    func mutations() throws {
        let dir = TempDir()
        let size = 6 << 20
        try VHDXPeer.create(dir.file("base.vhdx"), size: UInt64(size), options: [("block_size", "1M")])
        let b = try openRW(dir.file("base.vhdx"))
        try b.write([UInt8](repeating: 9, count: 3 << 20), at: 1 << 20)
        try b.close()
        let path = dir.file("child.vhdx")
        try VHDXPeer.create(path, size: UInt64(size), options: [("block_size", "1M")], backing: "base.vhdx")
        let c = try openRW(path)
        try c.write([UInt8](repeating: 5, count: 100_000), at: 1_500_000)
        try c.write([UInt8](repeating: 6, count: 2 << 20), at: 3 << 20)
        try c.close()
        let pristine = try readFile(path)
        // Where the structures are: header section, log, BAT, metadata, first bitmap page.
        let hot: [Range<Int>] = [0..<(320 << 10), (1 << 20)..<((1 << 20) + 8192), (2 << 20)..<((2 << 20) + 4096),
                                 (3 << 20)..<((3 << 20) + 66 << 10), (4 << 20)..<((4 << 20) + 4096)]
        var rng = SplitMix(state: 1234)
        var opened = 0
        for round in 0..<150 {
            var bytes = pristine
            for _ in 0..<Int.random(in: 1...6, using: &rng) {
                let r = hot[Int.random(in: 0..<hot.count, using: &rng)]
                let k = Int.random(in: r, using: &rng)
                guard k < bytes.count else { continue }
                bytes[k] = round % 3 == 0 ? 0xff : UInt8.random(in: 0...255, using: &rng)
            }
            // Keep some damage past the CRCs: reseal headers and region tables half the time.
            if round % 2 == 0 {
                for at in VHDXHeader.offsets.map(Int.init) {
                    var h = Array(bytes[at..<(at + 4096)]); CRC32C.seal(&h, fieldAt: 4); bytes.replaceSubrange(at..<(at + 4096), with: h)
                }
                for at in VHDXRegionTable.offsets.map(Int.init) {
                    var t = Array(bytes[at..<(at + 65536)]); CRC32C.seal(&t, fieldAt: 4); bytes.replaceSubrange(at..<(at + 65536), with: t)
                }
            }
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            do {
                let img = try openRO(path)
                opened += 1
                _ = try? readAll(img)
                _ = try? img.extents(at: 0, length: img.info.virtualSize)
                _ = try? VHDXPeer.layer(img).check(repair: .none)
                try img.close()
            } catch let e as ImageError {
                #expect(e.path != nil, "round \(round): error names no file: \(e)")
            }
        }
        #expect(opened > 10)
    }

    // MARK: hostile input

    @Test("hostile headers, region tables and metadata fail cleanly, naming the file",
          arguments: ["both-headers", "region-count", "region-offset", "bat-too-small", "block-size", "sector-size", "log-huge",
                     "log-into-header", "log-far-past-end"])
    func hostile(_ what: String) throws {
        let dir = TempDir()
        let path = dir.file("h.vhdx")
        try VHDXPeer.create(path, size: 64 << 20, options: [("block_size", "1M")])
        let f = try HostFile(path: path, writable: true)
        func patchRegion(_ edit: (inout [UInt8]) -> Void) throws {
            for at in VHDXRegionTable.offsets {
                var b = try f.read(at: at, count: VHDXRegionTable.size)
                edit(&b)
                CRC32C.seal(&b, fieldAt: 4)
                try f.write(b, at: at)
            }
        }
        func patchMetadataItem(_ guid: [UInt8], _ value: [UInt8]) throws {
            let t = try VHDXRegionTable.parse(try f.read(at: VHDXRegionTable.offsets[0], count: VHDXRegionTable.size), fileSize: try f.size())
            let meta = t.metadata!.fileOffset
            let table = try f.read(at: meta, count: 65536)
            for i in 0..<Int(ByteReader(table).le16(10)) where Array(table[(32 + i * 32)..<(48 + i * 32)]) == guid {
                try f.write(value, at: meta + UInt64(ByteReader(table).le32(48 + i * 32)))
            }
        }
        switch what {
        case "both-headers":
            for at in VHDXHeader.offsets { try f.write([0xff], at: at + 100) }
        case "region-count":
            try patchRegion { $0.putLE32(100_000, at: 8) }
        case "region-offset":
            try patchRegion { $0.putLE64(UInt64.max - 5, at: 16 + 16) }
        case "bat-too-small":
            try patchMetadataItem(VHDXMetadata.virtualDiskSizeGUID, { var b = [UInt8](repeating: 0, count: 8); b.putLE64(60 << 40, at: 0); return b }())
        case "block-size":
            try patchMetadataItem(VHDXMetadata.fileParametersGUID, [0, 0, 0, 0x30, 0, 0, 0, 0])
        case "sector-size":
            try patchMetadataItem(VHDXMetadata.logicalSectorSizeGUID, [0, 3, 0, 0])
        case "log-into-header", "log-far-past-end":
            // A valid log entry (right GUID, CRC, sequence) whose update is out of bounds.
            let guid = VHDXGUID.random()
            let target: UInt64 = what == "log-into-header" ? VHDXHeader.offsets[0] : 1 << 50
            let entry = VHDXLog.build(updates: [(target, [UInt8](repeating: 0x41, count: 4096))], sequence: 1, tail: 0, logGUID: guid,
                                      flushedFileOffset: 0, lastFileOffset: what == "log-into-header" ? 0 : (1 << 50) + (1 << 20))
            for at in VHDXHeader.offsets {
                var h = VHDXHeader.parse(try f.read(at: at, count: 4096))!
                try f.write(entry, at: h.logOffset)
                h.logGUID = guid
                try f.write(h.serialized(), at: at)
            }
        default:
            for at in VHDXHeader.offsets {
                var h = VHDXHeader.parse(try f.read(at: at, count: 4096))!
                h.logGUID = VHDXGUID.random()
                h.logLength = UInt32.max & ~UInt32((1 << 20) - 1)
                try f.write(h.serialized(), at: at)
            }
        }
        do {
            let img = try openRO(path)
            _ = try img.read(at: 0, count: 1 << 20)
            try img.close()
            Issue.record("\(what): opened")
        } catch let e as ImageError {
            #expect(e.path == path, "\(what): error does not name the file: \(e)")
            #expect([.corrupt, .invalidFormat, .unsupported].contains(e.code), "\(what): \(e)")
        }
    }
}
