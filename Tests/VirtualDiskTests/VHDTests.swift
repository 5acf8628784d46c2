import Foundation
import Testing
@testable import VirtualDisk

/// VHD against real images (corpus), against qemu-img/qemu-io for fixed and dynamic
/// disks, and against an in-memory model for differencing disks (qemu reads those
/// without their parent, so it cannot judge them).
///
/// Helpers live in `VHDPeer` so this file shares no names with other test files.
enum VHDPeer {
    static func create(_ path: String, size: UInt64, options: [(String, String)] = [], backing: String? = nil) throws {
        var r = CreateRequest(path: path, format: .vhd, size: size)
        r.options = options
        if let backing { r.backingFile = backing; r.backingFormat = .vhd }
        try CreateOperation.run(r)
    }

    /// qemu's reading of an image, as raw bytes.
    static func qemuRaw(_ path: String, _ dir: TempDir, format: String = "vpc") throws -> [UInt8] {
        let raw = dir.file("qemu-\(UUID().uuidString).raw")
        try sh(["qemu-img", "convert", "-U", "-f", format, "-O", "raw", path, raw])
        defer { try? FileManager.default.removeItem(atPath: raw) }
        return try readFile(raw)
    }

    static func qemuVirtualSize(_ path: String) throws -> UInt64 {
        let out = try sh(["qemu-img", "info", "-U", "-f", "vpc", "--output=json", path]).out
        let json = try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [String: Any]
        return (json?["virtual-size"] as? NSNumber)?.uint64Value ?? 0
    }

    /// qemu-img compare of a VHD against the expected bytes.
    static func qemuAgrees(_ path: String, _ model: [UInt8], _ dir: TempDir) throws {
        try qemuCompare(path, format: "vpc", model: model, dir)
    }

    static func layer(_ image: DiskImage) -> VHDLayer {
        (image as! LayeredImage).layer as! VHDLayer
    }

    static func check(_ path: String, repair: CheckRepair = .none) throws -> CheckReport {
        try checkImage(path, format: .vhd, repair: repair)
    }


    /// Virtual sizes from MANIFEST.tsv, by file name.
    static func manifestSizes() -> [String: UInt64] {
        guard let text = try? String(contentsOfFile: sharedDir + "/corpus/MANIFEST.tsv", encoding: .utf8) else { return [:] }
        var out: [String: UInt64] = [:]
        for line in text.split(separator: "\n").dropFirst() {
            let f = line.split(separator: "\t", omittingEmptySubsequences: false).map(String.init)
            if f.count >= 4, f[1] == "vhd", let v = UInt64(f[3]) { out[f[0]] = v }
        }
        return out
    }

    /// Rewrite the dynamic header of a VHD with `edit` applied (checksum recomputed).
    static func patchHeader(_ path: String, _ edit: (inout VHDDynamicHeader, HostFile) throws -> Void) throws {
        let f = try HostFile(path: path, writable: true)
        var h = VHDDynamicHeader.parse(try f.read(at: 512, count: 1024))!
        try edit(&h, f)
        try f.write(h.serialized(), at: 512)
    }
}

struct QemuVHDCase: CustomStringConvertible, Sendable {
    let subformat: String
    let size: String
    let forceSize: Bool
    var description: String { "\(subformat) \(size)\(forceSize ? " force_size" : "")" }
}

struct VloopVHDCase: CustomStringConvertible, Sendable {
    let subformat: String
    let size: UInt64
    let forceSize: Bool
    let blockSize: String?
    var description: String { "\(subformat) \(size)\(forceSize ? " force_size" : "")\(blockSize.map { " block_size=\($0)" } ?? "")" }
}

@Suite("VHD (vpc)")
struct VHDTests {
    // MARK: corpus

    @Test("corpus VHDs read as qemu-img reads them (MANIFEST sha256)",
          arguments: corpusEntries(format: "vhd").filter { !$0.sha256.isEmpty })
    func corpusContents(_ e: CorpusEntry) throws {
        let dir = TempDir()
        let path = try unpackCorpus(e.file, into: dir)
        let img = try openRO(path)
        #expect(img.info.format == "vhd")
        let raw = dir.file("view.raw")
        try RawLayer.create(path: raw, size: img.info.virtualSize)
        let out = try openRW(raw, format: .raw)
        try ConvertOperation.run(source: img, target: out, options: ConvertOptions())
        try out.close()
        try img.close()
        let sum = try sh(["sha256sum", raw]).out.split(separator: " ").first.map(String.init)
        #expect(sum == e.sha256, "\(e.file): sha256 of the guest view differs")
        #expect(try Self.cleanCheck(path), "\(e.file): vloop check finds problems")
    }

    static func cleanCheck(_ path: String) throws -> Bool {
        let r = try VHDPeer.check(path)
        return r.exitCode == 0
    }

    @Test("virtual sizes follow the creator: Hyper-V and Disk2vhd use current_size, Virtual PC the CHS geometry")
    func corpusSizes() throws {
        let sizes = VHDPeer.manifestSizes()
        #expect(sizes["hyperv2012r2-dynamic.vhd.xz"] != nil && sizes["virtualpc-dynamic.vhd.xz"] != nil)
        let dir = TempDir()
        for (name, want) in sizes.sorted(by: { $0.key < $1.key }) {
            let path = try unpackCorpus(name, into: dir)
            let img = try openRO(path)
            #expect(img.info.virtualSize == want, "\(name): virtual size \(img.info.virtualSize), MANIFEST says \(want)")
            if name.hasPrefix("hyperv") || name.hasPrefix("virtualpc") {
                // Empty 127 GiB disks: every extent reads as zero, none holds data.
                let extents = try img.extents(at: 0, length: img.info.virtualSize)
                #expect(!extents.contains { $0.isData }, "\(name): an empty disk reports data")
                #expect(try img.read(at: img.info.virtualSize - 4096, count: 4096).allSatisfy { $0 == 0 })
            }
            try img.close()
        }
    }

    @Test("afl5.img (a fuzzed VHD with a huge BAT entry count) fails cleanly, naming the file")
    func hostileCorpusImage() throws {
        let dir = TempDir()
        let path = try unpackCorpus("afl5.img.xz", into: dir)
        do {
            let img = try openRO(path)
            try img.close()
            Issue.record("afl5.img opened")
        } catch let e as ImageError {
            #expect(e.path == path, "error does not name the file: \(e)")
            #expect(e.code == .corrupt || e.code == .invalidFormat, "\(e)")
        }
    }

    // MARK: qemu interop

    static let qemuCases: [QemuVHDCase] = [
        QemuVHDCase(subformat: "dynamic", size: "5000001", forceSize: false),
        QemuVHDCase(subformat: "dynamic", size: "9437696", forceSize: true),
        QemuVHDCase(subformat: "fixed", size: "3146240", forceSize: true),
        QemuVHDCase(subformat: "fixed", size: "10M", forceSize: false),
    ]

    @Test("qemu-made VHDs read bit-exact; qemu reads back what vloop writes into them", arguments: qemuCases)
    func qemuMade(_ c: QemuVHDCase) throws {
        let dir = TempDir()
        let path = dir.file("made.vhd")
        var opts = "subformat=\(c.subformat)"
        if c.forceSize { opts += ",force_size=on" }
        try sh(["qemu-img", "create", "-q", "-f", "vpc", "-o", opts, path, c.size])
        let qsize = try VHDPeer.qemuVirtualSize(path)
        try sh(["qemu-io", "-f", "vpc", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 3000 1001",
                "-c", "write -P 0x33 2097000 1000", "-c", "write -P 0x44 \(qsize - 4096) 4096", path])
        let expected = try VHDPeer.qemuRaw(path, dir)
        let img = try openRO(path)
        #expect(img.info.virtualSize == qsize, "virtual size \(img.info.virtualSize), qemu says \(qsize)")
        var model = try readAll(img)
        #expect(model == expected, "\(c): contents differ from qemu's reading")
        try img.close()

        let rw = try openRW(path)
        var rng = SplitMix(state: 41)
        try randomWrites(rw, &model, count: 30, maxLength: 300_000, &rng)
        try rw.writeZeroes(at: 1024, length: 70_000, mayUnmap: true)
        for k in 1024..<71_024 { model[k] = 0 }
        #expect(try readAll(rw) == model)
        try rw.close()
        try VHDPeer.qemuAgrees(path, model, dir)
        #expect(try Self.cleanCheck(path))
    }

    static let vloopCases: [VloopVHDCase] = [
        VloopVHDCase(subformat: "dynamic", size: 7_340_544, forceSize: false, blockSize: nil),
        VloopVHDCase(subformat: "dynamic", size: 7_340_544 + 512, forceSize: true, blockSize: "512k"),
        VloopVHDCase(subformat: "dynamic", size: 3_000_000, forceSize: true, blockSize: "4k"),
        VloopVHDCase(subformat: "fixed", size: 7_340_544, forceSize: false, blockSize: nil),
        VloopVHDCase(subformat: "fixed", size: 5_000_192, forceSize: true, blockSize: nil),
    ]

    @Test("VHDs vloop creates and writes read the same in qemu; qemu's writes into them read the same in vloop",
          arguments: vloopCases)
    func vloopMade(_ c: VloopVHDCase) throws {
        let dir = TempDir()
        let path = dir.file("ours.vhd")
        var opts: [(String, String)] = [("subformat", c.subformat)]
        if c.forceSize { opts.append(("force_size", "on")) }
        if let b = c.blockSize { opts.append(("block_size", b)) }
        try VHDPeer.create(path, size: c.size, options: opts)
        let img = try openRW(path)
        let size = img.info.virtualSize
        #expect(size >= c.size && (!c.forceSize || size == c.size.alignedUp(512)))
        #expect(try VHDPeer.qemuVirtualSize(path) == size, "qemu sees another virtual size")
        var model = [UInt8](repeating: 0, count: Int(size))
        var rng = SplitMix(state: c.size ^ 0x5eed)
        try randomWrites(img, &model, count: 40, maxLength: 200_000, &rng)
        try img.close()
        try VHDPeer.qemuAgrees(path, model, dir)
        #expect(try Self.cleanCheck(path))

        // Now qemu writes (allocating where we did not), and vloop reads it back.
        let at = UInt64(size) - 70_000
        try sh(["qemu-io", "-f", "vpc", "-c", "write -P 0x5a 512 1536", "-c", "write -P 0x6b \(at) 65536", path])
        for k in 512..<2048 { model[k] = 0x5a }
        for k in Int(at)..<(Int(at) + 65536) { model[k] = 0x6b }
        let again = try openRO(path)
        #expect(try readAll(again) == model, "vloop reads qemu's writes differently")
        try again.close()
        #expect(try VHDPeer.qemuRaw(path, dir) == model)
    }

    @Test("the creator lays files out byte for byte as qemu-img create does (time stamp, unique id, checksum aside)",
          arguments: [("dynamic", "10M", false), ("dynamic", "5000001", false), ("dynamic", "1G", true), ("fixed", "3M", false), ("fixed", "1000000", true)])
    func createMatchesQemu(_ subformat: String, _ size: String, _ force: Bool) throws {
        let dir = TempDir()
        let theirs = dir.file("theirs.vhd"), ours = dir.file("ours.vhd")
        var opts = "subformat=\(subformat)"
        if force { opts += ",force_size=on" }
        try sh(["qemu-img", "create", "-q", "-f", "vpc", "-o", opts, theirs, size])
        var o: [(String, String)] = [("subformat", subformat)]
        if force { o.append(("force_size", "on")) }
        try VHDPeer.create(ours, size: try SizeParser.parse(size), options: o)
        var a = try readFile(theirs), b = try readFile(ours)
        #expect(a.count == b.count, "file sizes differ: qemu \(a.count), vloop \(b.count)")
        guard a.count == b.count else { return }
        // Footers (at the end, and at 0 for dynamic disks) differ in time stamp, checksum and unique id.
        for footerAt in Set([a.count - 512] + (subformat == "dynamic" ? [0] : [])) {
            for k in Array(24..<28) + Array(64..<84) { a[footerAt + k] = 0; b[footerAt + k] = 0 }
        }
        #expect(a == b, "layout differs from qemu-img's")
    }

    // MARK: differencing

    static let diffSize = 6 * 1024 * 1024 + 3 * 512

    /// A dynamic parent with random data in random places; returns the parent's bytes.
    static func makeParent(_ path: String, _ rng: inout SplitMix, blockSize: String = "1M") throws -> [UInt8] {
        try VHDPeer.create(path, size: UInt64(diffSize), options: [("force_size", "on"), ("block_size", blockSize)])
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
          arguments: ["2M", "512k"])
    func differencing(_ childBlock: String) throws {
        let dir = TempDir()
        var rng = SplitMix(state: childBlock == "2M" ? 3 : 4)
        let parentPath = dir.file("parent.vhd")
        let parentView = try Self.makeParent(parentPath, &rng)
        let parentFile = try readFile(parentPath)
        let child = dir.file("child.vhd")
        try VHDPeer.create(child, size: UInt64(Self.diffSize), options: [("force_size", "on"), ("block_size", childBlock)], backing: "parent.vhd")

        var img = try openRW(child)
        #expect(img.info.backing?.name == "parent.vhd" && img.info.backing?.format == "vhd")
        #expect(try readAll(img) == parentView, "a new child does not show its parent")
        var model = parentView
        var loose = [Bool](repeating: false, count: Self.diffSize)
        for step in 0..<120 {
            let len = Int.random(in: 1...(step % 9 == 0 ? 700_000 : 20_000), using: &rng)
            let off = Int.random(in: 0...(Self.diffSize - len), using: &rng)
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
                // Discarded sectors read as the old data, zeroes or the parent's bytes.
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
        // Settle what discards left, then compare everything, before and after reopen.
        let all = try readAll(img)
        for k in 0..<Self.diffSize where loose[k] {
            #expect(all[k] == model[k] || all[k] == 0 || all[k] == parentView[k])
            model[k] = all[k]
        }
        #expect(all == model, "child view differs from the model")
        try img.close()
        let reopened = try openRO(child)
        #expect(try readAll(reopened) == model, "child view differs from the model after reopen")
        // What the child does not hold comes from depth 1 (the parent).
        let extents = try reopened.extents(at: 0, length: UInt64(Self.diffSize))
        #expect(extents.contains { $0.depth == 1 } && extents.contains { $0.depth == 0 && $0.isData })
        try reopened.close()
        #expect(try readFile(parentPath) == parentFile, "the parent file changed")
        #expect(try Self.cleanCheck(child))
    }

    @Test("a differencing child takes its parent's exact size, records its identity and its locators",
          arguments: [(UInt64(diffSize), true), (UInt64(10 << 20), false), (UInt64(5_000_001), false)])
    func childSize(_ size: UInt64, _ force: Bool) throws {
        let dir = TempDir()
        let parent = dir.file("base.vhd")
        try VHDPeer.create(parent, size: size, options: force ? [("force_size", "on")] : [])
        let child = dir.file("child.vhd")
        var r = CreateRequest(path: child, format: .vhd, size: nil)
        r.backingFile = "base.vhd"
        r.backingFormat = .vhd
        try CreateOperation.run(r)
        let p = try openRO(parent), c = try openRO(child)
        #expect(c.info.virtualSize == p.info.virtualSize)
        let pl = VHDPeer.layer(p), cl = VHDPeer.layer(c)
        #expect(cl.header?.parentUniqueID == pl.footer.uniqueID)
        #expect(cl.header?.parentName == "base.vhd")
        let codes = cl.header?.locators.filter { !$0.isEmpty }.map(\.code)
        #expect(codes == ["W2ru", "W2ku"])
        try c.close()
        try p.close()
        #expect(try Self.cleanCheck(child))
    }

    @Test("a replaced parent is refused, the error naming the parent and both unique ids")
    func parentIdentity() throws {
        let dir = TempDir()
        var rng = SplitMix(state: 9)
        let parentPath = dir.file("base.vhd")
        _ = try Self.makeParent(parentPath, &rng)
        let child = dir.file("child.vhd")
        try VHDPeer.create(child, size: UInt64(Self.diffSize), options: [("force_size", "on")], backing: "base.vhd")
        try openRO(child).close()
        // Another disk under the same name.
        try FileManager.default.removeItem(atPath: parentPath)
        _ = try Self.makeParent(parentPath, &rng)
        do {
            let img = try openRO(child)
            try img.close()
            Issue.record("a child opened over a replaced parent")
        } catch let e as ImageError {
            #expect(e.code == .chain)
            #expect(e.message.contains("base.vhd") && e.message.contains("unique id"), "\(e)")
            #expect(e.path == child)
        }
        // rebase -u records the new parent's identity; then it opens.
        let top = try ImageOpener.open(child, options: { var o = OpenOptions(format: .vhd, writable: true); o.noBacking = true; o.userNamed = [child]; return o }())
        try VHDPeer.layer(top).setBacking(name: "base.vhd", format: "vhd")
        try top.close()
        try openRO(child).close()
    }

    @Test("the parent is found through Windows and Mac locators and the unicode name",
          arguments: [
            [("W2ru", ".\\base.vhd")],
            [("W2ku", "C:\\Hyper-V\\Virtual Hard Disks\\base.vhd")],
            [("W2ru", "..\\elsewhere\\missing.vhd"), ("W2ku", "D:\\vms\\base.vhd")],
            [("MacX", "file://localhost/Users/someone/Documents/base.vhd")],
            [],
          ])
    func parentLocators(_ locators: [(String, String)]) throws {
        let dir = TempDir()
        var rng = SplitMix(state: 11)
        let parentView = try Self.makeParent(dir.file("base.vhd"), &rng)
        let child = dir.file("child.vhd")
        try VHDPeer.create(child, size: UInt64(Self.diffSize), options: [("force_size", "on")], backing: "base.vhd")
        let child2 = try openRW(child)
        try child2.write([UInt8](repeating: 0xee, count: 1000), at: 5000)
        try child2.close()
        try VHDPeer.patchHeader(child) { h, f in
            let slots = h.locators.filter { !$0.isEmpty }
            for i in 0..<VHDDynamicHeader.locatorCount { h.setLocator(i, nil) }
            for (i, (code, text)) in locators.enumerated() {
                let data = code == "MacX" ? Array(text.utf8) : VHDParentName.utf16LE(text)
                let slot = slots[i]
                try f.write(data + [UInt8](repeating: 0, count: 512 - data.count % 512), at: slot.dataOffset)
                h.setLocator(i, .init(code: code, dataSpace: 512, dataLength: UInt32(data.count), dataOffset: slot.dataOffset))
            }
            h.parentName = locators.isEmpty ? "base.vhd" : "wrong-name.vhd"
        }
        let img = try openRO(child)
        #expect(img.info.backing?.name == "base.vhd")
        var model = parentView
        for k in 5000..<6000 { model[k] = 0xee }
        #expect(try readAll(img) == model)
        try img.close()
    }

    @Test("recorded parent paths become names next to the child")
    func parentNameCandidates() {
        #expect(VHDParentName.candidates(for: ".\\x.vhd") == ["x.vhd"])
        #expect(VHDParentName.candidates(for: "..\\dir\\x.vhd") == ["../dir/x.vhd"])
        #expect(VHDParentName.candidates(for: "C:\\dir\\x.vhd") == ["x.vhd"])
        #expect(VHDParentName.candidates(for: "\\\\server\\share\\x.vhd") == ["x.vhd"])
        #expect(VHDParentName.candidates(for: "/abs/x.vhd") == ["/abs/x.vhd", "x.vhd"])
        #expect(VHDParentName.fileURLPath("file:///a%20b/x.vhd") == "/a b/x.vhd")
        #expect(VHDParentName.windowsRelative("sub/x.vhd") == ".\\sub\\x.vhd")
        #expect(VHDParentName.utf16(VHDParentName.utf16LE("päth.vhd")) == "päth.vhd")
    }

    // MARK: integrity

    @Test("checksums are verified: a damaged fixed footer or dynamic header is named; a damaged end footer is rebuilt from the copy")
    func checksums() throws {
        let dir = TempDir()
        let fixed = dir.file("fixed.vhd")
        try VHDPeer.create(fixed, size: 1 << 20, options: [("subformat", "fixed"), ("force_size", "on")])
        let f = try HostFile(path: fixed, writable: true)
        try f.write([0x7f], at: (1 << 20) + 40)  // a byte of original_size
        do {
            try openRO(fixed).close()
            Issue.record("a fixed VHD with a damaged footer opened")
        } catch let e as ImageError {
            #expect(e.message.contains("footer checksum"), "\(e)")
            #expect(e.path == fixed)
        }

        let dyn = dir.file("dynamic.vhd")
        try VHDPeer.create(dyn, size: 4 << 20, options: [("force_size", "on")])
        let img = try openRW(dyn)
        try img.write([UInt8](repeating: 0x42, count: 4096), at: 8192)
        try img.close()
        let d = try HostFile(path: dyn, writable: true)
        try d.write([0x01], at: 512 + 30)  // max_table_entries
        do {
            try openRO(dyn).close()
            Issue.record("a VHD with a damaged dynamic header opened")
        } catch let e as ImageError {
            #expect(e.message.contains("dynamic header checksum"), "\(e)")
        }
        try d.write([0x00], at: 512 + 30)
        // Damage the end footer: the copy at 0 serves, check reports, -r all repairs.
        let end = try d.size() - 512
        try d.write([0x55], at: end + 90)
        let ro = try openRO(dyn)
        #expect(try ro.read(at: 8192, count: 4) == [0x42, 0x42, 0x42, 0x42])
        try ro.close()
        #expect(try VHDPeer.check(dyn).exitCode == 2)
        let fixedReport = try VHDPeer.check(dyn, repair: .all)
        #expect(fixedReport.repairedCorruptions >= 1)
        #expect(try VHDPeer.check(dyn).exitCode == 0)
        #expect(try VHDPeer.qemuRaw(dyn, dir)[8192] == 0x42)
    }

    @Test("malformed headers and BAT entries fail with a clear error, never a trap or a huge allocation")
    func hostileHeaders() throws {
        let dir = TempDir()
        let base = dir.file("base.vhd")
        try VHDPeer.create(base, size: 8 << 20, options: [("force_size", "on"), ("block_size", "1M")])
        let w = try openRW(base)
        try w.write([UInt8](repeating: 0x31, count: 3 << 20), at: 100_000)
        try w.close()
        let pristine = try readFile(base)
        let edits: [(String, (inout VHDDynamicHeader, HostFile) throws -> Void)] = [
            ("huge BAT", { h, _ in h.maxTableEntries = 0x4000_0001 }),
            ("BAT too small", { h, _ in h.maxTableEntries = 2 }),
            ("BAT past end", { h, _ in h.batOffset = 1 << 40 }),
            ("block size", { h, _ in h = VHDDynamicHeader(bytes: { var b = h.bytes; b.putBE32(3 << 20, at: 32); return b }()) }),
            ("zero block size", { h, _ in h = VHDDynamicHeader(bytes: { var b = h.bytes; b.putBE32(0, at: 32); return b }()) }),
            ("BAT over header", { h, _ in h.batOffset = 600 }),
            ("entry past end", { h, f in try f.write([0x7f, 0xff, 0xff, 0x00], at: h.batOffset) }),
            ("entry into BAT", { h, f in try f.write([0, 0, 0, 3], at: h.batOffset + 4) }),
        ]
        for (name, edit) in edits {
            let path = dir.file("\(name).vhd")
            try Data(pristine).write(to: URL(fileURLWithPath: path))
            try VHDPeer.patchHeader(path, edit)
            do {
                let img = try openRO(path)
                _ = try readAll(img)
                try img.close()
                Issue.record("\(name): read without complaint")
            } catch let e as ImageError {
                #expect(e.path == path, "\(name): \(e)")
                #expect(e.code == .corrupt, "\(name): \(e)")
            }
        }
    }

    @Test("random damage to footer, header and BAT never traps")
    func randomDamage() throws {
        let dir = TempDir()
        let base = dir.file("base.vhd")
        try VHDPeer.create(base, size: 3 << 20, options: [("force_size", "on"), ("block_size", "512k")])
        let w = try openRW(base)
        try w.write([UInt8](repeating: 0x31, count: 1 << 20), at: 100_000)
        try w.close()
        let pristine = try readFile(base)
        var rng = SplitMix(state: 77)
        for round in 0..<60 {
            var bytes = pristine
            for _ in 0..<Int.random(in: 1...6, using: &rng) {
                let at = Int.random(in: 0..<1600, using: &rng)
                bytes[at] = UInt8.random(in: 0...255, using: &rng)
            }
            // Keep checksums right half the time, so the damage gets past them.
            if round % 2 == 0 {
                var f = VHDFooter(bytes: Array(bytes[0..<512]))
                f = VHDFooter(bytes: f.serialized())
                bytes.replaceSubrange(0..<512, with: f.bytes)
                bytes.replaceSubrange((bytes.count - 512)..<bytes.count, with: f.bytes)
                let h = VHDDynamicHeader(bytes: Array(bytes[512..<1536]))
                bytes.replaceSubrange(512..<1536, with: h.serialized())
            }
            let path = dir.file("damaged-\(round).vhd")
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            do {
                let img = try openRO(path)
                if img.info.virtualSize <= 64 << 20 { _ = try readAll(img) }
                try img.close()
            } catch let e as ImageError {
                #expect(e.path == path, "round \(round): \(e)")
            }
            try? FileManager.default.removeItem(atPath: path)
        }
    }

    @Test("check finds blocks no BAT entry references and -r leaks gives the space back")
    func leaks() throws {
        let dir = TempDir()
        let path = dir.file("leaky.vhd")
        try VHDPeer.create(path, size: 8 << 20, options: [("force_size", "on")])
        let img = try openRW(path)
        try img.write([UInt8](repeating: 1, count: 4096), at: 0)
        try img.write([UInt8](repeating: 2, count: 4096), at: 6 << 20)
        try img.close()
        let sizeBefore = try HostFile(path: path, writable: false).size()
        // Forget the last block, as a crash between allocation and BAT write-back would.
        try VHDPeer.patchHeader(path) { h, f in try f.write([0xff, 0xff, 0xff, 0xff], at: h.batOffset + 12) }
        let report = try VHDPeer.check(path)
        #expect(report.leaks == 1 && report.exitCode == 3, "\(report)")
        let repaired = try VHDPeer.check(path, repair: .leaks)
        #expect(repaired.repairedLeaks == 1)
        #expect(try VHDPeer.check(path).exitCode == 0)
        #expect(try HostFile(path: path, writable: false).size() < sizeBefore)
        var model = [UInt8](repeating: 0, count: 8 << 20)
        for k in 0..<4096 { model[k] = 1 }
        try VHDPeer.qemuAgrees(path, model, dir)
    }

    // MARK: operations

    @Test("resize: a dynamic disk grows past its BAT (which moves) and shrinks; a fixed disk grows and shrinks; qemu agrees")
    func resize() throws {
        let dir = TempDir()
        var rng = SplitMix(state: 21)
        for subformat in ["dynamic", "fixed"] {
            let path = dir.file("\(subformat).vhd")
            // 64 KiB blocks: the BAT's padding holds 128 entries (8 MiB), so growing to
            // 40 MiB moves the BAT.
            try VHDPeer.create(path, size: 3 << 20, options: [("subformat", subformat), ("force_size", "on"), ("block_size", "64k")])
            let img = try openRW(path)
            var model = [UInt8](repeating: 0, count: 3 << 20)
            try randomWrites(img, &model, count: 10, maxLength: 300_000, &rng)
            try ResizeOperation.run(img, to: 40 << 20, shrink: false)
            model += [UInt8](repeating: 0, count: (40 << 20) - (3 << 20))
            #expect(img.info.virtualSize == 40 << 20)
            try img.write([UInt8](repeating: 0x77, count: 100_000), at: (40 << 20) - 100_000)
            for k in ((40 << 20) - 100_000)..<(40 << 20) { model[k] = 0x77 }
            #expect(try readAll(img) == model)
            try img.close()
            try VHDPeer.qemuAgrees(path, model, dir)
            #expect(try Self.cleanCheck(path))

            let again = try openRW(path)
            try ResizeOperation.run(again, to: 2 << 20, shrink: true)
            try again.close()
            model = Array(model[0..<(2 << 20)])
            try VHDPeer.qemuAgrees(path, model, dir)
            let grown = try openRW(path)
            try ResizeOperation.run(grown, to: 5 << 20, shrink: false)
            model += [UInt8](repeating: 0, count: 3 << 20)
            #expect(try readAll(grown) == model, "\(subformat): bytes past a shrink came back")
            try grown.close()
            try VHDPeer.qemuAgrees(path, model, dir)
        }
        // A disk sized by CHS refuses a size its geometry cannot express.
        let chs = dir.file("chs.vhd")
        try VHDPeer.create(chs, size: 10 << 20)
        let img = try openRW(chs)
        #expect(throws: ImageError.self) { try ResizeOperation.run(img, to: (20 << 20) + 512, shrink: false) }
        try img.close()
    }

    @Test("rebase onto nothing turns a differencing disk into a dynamic one with the same contents")
    func rebaseToNone() throws {
        let dir = TempDir()
        var rng = SplitMix(state: 31)
        let parentView = try Self.makeParent(dir.file("p.vhd"), &rng)
        let child = dir.file("c.vhd")
        try VHDPeer.create(child, size: UInt64(Self.diffSize), options: [("force_size", "on")], backing: "p.vhd")
        let top = try openRW(child)
        var model = parentView
        try randomWrites(top, &model, count: 20, maxLength: 100_000, &rng)
        try RebaseOperation.run(top: top, newBacking: nil, newName: nil, newFormat: nil)
        try top.close()
        let img = try openRO(child)
        #expect(img.info.backing == nil)
        #expect(try readAll(img) == model)
        try img.close()
        try VHDPeer.qemuAgrees(child, model, dir)
        #expect(try Self.cleanCheck(child))
    }

    @Test("commit writes a differencing child into its parent and empties the child")
    func commit() throws {
        let dir = TempDir()
        var rng = SplitMix(state: 41)
        let parentPath = dir.file("p.vhd")
        let parentView = try Self.makeParent(parentPath, &rng)
        let child = dir.file("c.vhd")
        try VHDPeer.create(child, size: UInt64(Self.diffSize), options: [("force_size", "on")], backing: "p.vhd")
        let top = try openRW(child)
        var model = parentView
        try randomWrites(top, &model, count: 20, maxLength: 100_000, &rng)
        try top.close()
        let c = try ImageOpener.openForCommit(child, format: .vhd, backingFormat: .vhd)
        try CommitOperation.run(top: c, keepTop: false)
        try c.close()
        try VHDPeer.qemuAgrees(parentPath, model, dir)
        let after = try openRO(child)
        #expect(try readAll(after) == model)
        #expect(try after.extents(at: 0, length: after.info.virtualSize).allSatisfy { $0.depth == 1 || !$0.isData })
        try after.close()
        #expect(try Self.cleanCheck(child))
    }

    @Test("concurrent writers to a dynamic and a differencing disk keep every write", arguments: [false, true])
    func concurrentWriters(_ differencing: Bool) throws {
        let dir = TempDir()
        var rng = SplitMix(state: 51)
        let size = Self.diffSize
        var below = [UInt8](repeating: 0, count: size)
        let path = dir.file("top.vhd")
        if differencing {
            below = try Self.makeParent(dir.file("p.vhd"), &rng, blockSize: "512k")
            try VHDPeer.create(path, size: UInt64(size), options: [("force_size", "on"), ("block_size", "512k")], backing: "p.vhd")
        } else {
            try VHDPeer.create(path, size: UInt64(size), options: [("force_size", "on"), ("block_size", "512k")])
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
        #expect(try Self.cleanCheck(path))
    }
}
