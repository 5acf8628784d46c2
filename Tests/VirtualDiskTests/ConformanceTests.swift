import Foundation
import Testing
@testable import VirtualDisk

/// A configuration under test: how to make the image (and its chain).
struct Variant: CustomStringConvertible, Sendable {
    let name: String
    let format: ImageFormat
    let options: [(String, String)]
    /// Backing chain below, bottom first: (format, options, fill pattern seed).
    let backing: [(ImageFormat, [(String, String)])]
    var description: String { name }
}

let conformanceVariants: [Variant] = [
    Variant(name: "raw", format: .raw, options: [], backing: []),
    Variant(name: "qcow2", format: .qcow2, options: [], backing: []),
    Variant(name: "qcow2-v2", format: .qcow2, options: [("compat", "0.10")], backing: []),
    Variant(name: "qcow2-512-rc1", format: .qcow2, options: [("cluster_size", "512"), ("refcount_bits", "1")], backing: []),
    Variant(name: "qcow2-2M-rc64", format: .qcow2, options: [("cluster_size", "2M"), ("refcount_bits", "64")], backing: []),
    Variant(name: "qcow2-extl2", format: .qcow2, options: [("extended_l2", "on"), ("cluster_size", "64k")], backing: []),
    Variant(name: "qcow2-zstd", format: .qcow2, options: [("compression_type", "zstd")], backing: []),
    Variant(name: "qcow2-datafile", format: .qcow2, options: [("data_file", "data.bin")], backing: []),
    Variant(name: "qcow2-datafile-raw", format: .qcow2, options: [("data_file", "data.bin"), ("data_file_raw", "on")], backing: []),
    Variant(name: "qcow2-on-raw", format: .qcow2, options: [], backing: [(.raw, [])]),
    Variant(name: "qcow2-on-qcow2-on-raw", format: .qcow2, options: [("cluster_size", "4k")], backing: [(.raw, []), (.qcow2, [])]),
    Variant(name: "qcow2-v2-on-qcow2", format: .qcow2, options: [("compat", "0.10")], backing: [(.qcow2, [])]),
    Variant(name: "qcow2-extl2-on-qcow2", format: .qcow2, options: [("extended_l2", "on")], backing: [(.qcow2, [])]),
    Variant(name: "vhd-dynamic", format: .vhd, options: [("force_size", "on")], backing: []),
    Variant(name: "vhd-dynamic-4k", format: .vhd, options: [("force_size", "on"), ("block_size", "4k")], backing: []),
    Variant(name: "vhd-fixed", format: .vhd, options: [("subformat", "fixed"), ("force_size", "on")], backing: []),
    Variant(name: "vhd-diff-on-vhd", format: .vhd, options: [("force_size", "on"), ("block_size", "512k")], backing: [(.vhd, [("force_size", "on")])]),
    Variant(name: "vhdx-dynamic", format: .vhdx, options: [("block_size", "1M")], backing: []),
    Variant(name: "vhdx-fixed", format: .vhdx, options: [("subformat", "fixed"), ("block_size", "1M")], backing: []),
    Variant(name: "vhdx-diff-on-vhdx", format: .vhdx, options: [("block_size", "1M")], backing: [(.vhdx, [("block_size", "2M")])]),
    Variant(name: "qcow", format: .qcow, options: [], backing: []),
    Variant(name: "qcow-on-qcow2-on-raw", format: .qcow, options: [], backing: [(.raw, []), (.qcow2, [])]),
    Variant(name: "qcow2-on-qcow", format: .qcow2, options: [], backing: [(.qcow, [])]),
    Variant(name: "vmdk-sparse", format: .vmdk, options: [], backing: []),
    Variant(name: "vmdk-zeroed-grain", format: .vmdk, options: [("zeroed_grain", "on")], backing: []),
    Variant(name: "vmdk-flat", format: .vmdk, options: [("subformat", "monolithicFlat")], backing: []),
    Variant(name: "vmdk-2gb-sparse", format: .vmdk, options: [("subformat", "twoGbMaxExtentSparse")], backing: []),
    Variant(name: "vmdk-stream", format: .vmdk, options: [("subformat", "streamOptimized")], backing: []),
    Variant(name: "vmdk-delta-on-vmdk", format: .vmdk, options: [], backing: [(.vmdk, [("zeroed_grain", "on")])]),
    Variant(name: "vmdk-stream-delta-on-vmdk", format: .vmdk, options: [("subformat", "streamOptimized")], backing: [(.vmdk, [])]),
    Variant(name: "vdi-dynamic", format: .vdi, options: [], backing: []),
    Variant(name: "vdi-dynamic-64k", format: .vdi, options: [("block_size", "64k")], backing: []),
    Variant(name: "vdi-static", format: .vdi, options: [("static", "on")], backing: []),
    Variant(name: "vdi-diff-on-vdi", format: .vdi, options: [("block_size", "512k")], backing: [(.vdi, [])]),
    Variant(name: "vdi-diff-on-vdi-diff", format: .vdi, options: [], backing: [(.vdi, [("static", "on")]), (.vdi, [("block_size", "64k")])]),
]

/// The model: what each byte must read as. After a discard a byte may read as its old
/// value, as zero, or as the backing file's byte; the first read settles it.
struct Model {
    var bytes: [UInt8]
    var loose: [Bool]
    let below: [UInt8]

    mutating func check(_ got: [UInt8], at offset: Int, _ context: String) throws {
        for i in 0..<got.count {
            let k = offset + i
            if loose[k] {
                guard got[i] == bytes[k] || got[i] == 0 || got[i] == below[k] else {
                    throw TestFailure("\(context): byte \(k) after discard is \(got[i]), not old \(bytes[k]), 0 or backing \(below[k])")
                }
                bytes[k] = got[i]
                loose[k] = false
            } else if got[i] != bytes[k] {
                throw TestFailure("\(context): byte \(k) is \(got[i]), expected \(bytes[k])")
            }
        }
    }
}

@Suite("Conformance against an in-memory model")
struct ConformanceTests {
    static let size = 3 * 1024 * 1024 + 512 * 3  // odd size: not a multiple of any cluster

    /// Build the chain: each backing layer gets random data in random places.
    static func makeChain(_ v: Variant, in dir: TempDir, rng: inout SplitMix) throws -> (path: String, below: [UInt8]) {
        var below = [UInt8](repeating: 0, count: size)
        var previous: (String, ImageFormat)?
        for (i, layer) in v.backing.enumerated() {
            let path = dir.file("layer\(i).\(layer.0.rawValue)")
            var r = CreateRequest(path: path, format: layer.0, size: UInt64(size))
            r.options = layer.1
            if let p = previous { r.backingFile = (p.0 as NSString).lastPathComponent; r.backingFormat = p.1 }
            try CreateOperation.run(r)
            let img = try openRW(path, format: layer.0)
            for _ in 0..<6 {
                let len = Int.random(in: 1...200_000, using: &rng)
                let off = Int.random(in: 0..<(size - len), using: &rng)
                let data = (0..<len).map { _ in UInt8.random(in: 1...255, using: &rng) }
                try img.write(data, at: UInt64(off))
                below.replaceSubrange(off..<(off + len), with: data)
            }
            try img.close()
            previous = (path, layer.0)
        }
        let top = dir.file("top.\(v.format.rawValue)")
        var r = CreateRequest(path: top, format: v.format, size: UInt64(size))
        r.options = v.options
        if let p = previous { r.backingFile = (p.0 as NSString).lastPathComponent; r.backingFormat = p.1 }
        try CreateOperation.run(r)
        return (top, below)
    }

    @Test("random I/O matches the model, across reopen", arguments: conformanceVariants)
    func randomIO(_ v: Variant) throws {
        let dir = TempDir()
        var rng = SplitMix(state: UInt64(abs(v.name.hashValue % 1000)) + 7)
        let (path, below) = try Self.makeChain(v, in: dir, rng: &rng)
        var model = Model(bytes: below, loose: [Bool](repeating: false, count: Self.size), below: below)
        var img = try openRW(path)
        let initial = try readAll(img)
        try model.check(initial, at: 0, "\(v): initial contents")
        for step in 0..<160 {
            let len = Int.random(in: 1...(step % 7 == 0 ? 600_000 : 70_000), using: &rng)
            // Bias toward cluster- and sector-aligned offsets, with odd ones too.
            var off = Int.random(in: 0..<(Self.size - len), using: &rng)
            if step % 3 == 0 { off = off / 4096 * 4096 }
            let ctx = "\(v) step \(step)"
            switch Int.random(in: 0..<10, using: &rng) {
            case 0...3:
                let data = (0..<len).map { _ in UInt8.random(in: 0...255, using: &rng) }
                try img.write(data, at: UInt64(off))
                model.bytes.replaceSubrange(off..<(off + len), with: data)
                for k in off..<(off + len) { model.loose[k] = false }
            case 4:
                let mayUnmap = Bool.random(using: &rng)
                try img.writeZeroes(at: UInt64(off), length: UInt64(len), mayUnmap: mayUnmap)
                for k in off..<(off + len) { model.bytes[k] = 0; model.loose[k] = false }
            case 5:
                try img.discard(at: UInt64(off), length: UInt64(len))
                for k in off..<(off + len) { model.loose[k] = true }
            case 6:
                try img.flush()
            case 7:
                // Reopen: everything written must persist.
                try img.close()
                img = try openRW(path)
            default:
                let got = try img.read(at: UInt64(off), count: len)
                try model.check(got, at: off, ctx)
            }
        }
        // Block status agrees with the data: ranges reported zero read as zero.
        let all = try readAll(img)
        try model.check(all, at: 0, "\(v): final contents")
        for e in try MapOperation.extents(img) where !e.isData {
            if e.kind == .unallocated || e.kind == .zero {
                let slice = all[Int(e.offset)..<Int(e.end)]
                #expect(slice.allSatisfy { $0 == 0 }, "\(v): extent \(e) reported without data reads non-zero")
            }
        }
        try img.close()
        if v.format == .qcow {
            let expected = dir.file("expected.raw")
            try Data(model.bytes).write(to: URL(fileURLWithPath: expected))
            try sh(["qemu-img", "compare", "-f", "qcow", "-F", "raw", path, expected], cwd: dir.path)
        }
        if v.format == .qcow2 {
            // qemu-img, a peer that no one here wrote, must find it clean and equal.
            // qemu opens a relative data file name from its working directory.
            try sh(["qemu-img", "check", path], cwd: dir.path)
            let expected = dir.file("expected.raw")
            try Data(model.bytes).write(to: URL(fileURLWithPath: expected))
            try sh(["qemu-img", "compare", "-F", "raw", path, expected], cwd: dir.path)
            // And our own check agrees.
            let again = try openRO(path)
            let report = try ((again as! LayeredImage).layer as! QCOW2Layer).check(repair: .none)
            #expect(report.exitCode == 0, "\(v): vloop check: \(report.corruptions) leaks \(report.leaks)")
            try again.close()
        }
    }

    @Test("raw block status follows holes punched and filled after it was asked")
    func rawBlockStatusTracksHoles() throws {
        let dir = TempDir()
        let path = dir.file("r.raw")
        try sh(["sh", "-c", "head -c 8M /dev/urandom > \(path)"])
        let img = try openRW(path, format: .raw)
        defer { try? img.close() }
        func dataRanges() throws -> [Range<UInt64>] {
            try MapOperation.extents(img).filter(\.isData).map { $0.offset..<$0.end }
        }
        #expect(try dataRanges() == [0..<(8 << 20)])
        try img.discard(at: 1 << 20, length: 2 << 20)
        #expect(try dataRanges() == [0..<(1 << 20), (3 << 20)..<(8 << 20)])
        try img.write([UInt8](repeating: 7, count: 4096), at: 2 << 20)
        let after = try dataRanges()
        #expect(after.first == 0..<(1 << 20) && after.last == (3 << 20)..<(8 << 20) && after.count == 3)
        #expect(after.contains { $0.contains(2 << 20) })
        try img.writeZeroes(at: 5 << 20, length: 1 << 20, mayUnmap: true)
        #expect(try !dataRanges().contains { $0.contains(5 << 20) })
    }

    @Test("concurrent writers to one image keep every write", arguments: ["raw", "qcow2", "qcow2-extl2-on-qcow2"])
    func concurrentWriters(_ name: String) throws {
        let v = conformanceVariants.first { $0.name == name }!
        let dir = TempDir()
        var rng = SplitMix(state: 99)
        let (path, below) = try Self.makeChain(v, in: dir, rng: &rng)
        let img = try openRW(path)
        // Each thread owns interleaved 8 KiB stripes, writing unaligned pieces of them.
        let threads = 4, stripe = 8192
        let stripes = Self.size / stripe
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            var r = SplitMix(state: UInt64(t) + 1)
            for s in stride(from: t, to: stripes, by: threads) where Int.random(in: 0..<3, using: &r) != 0 {
                let data = [UInt8](repeating: UInt8(t + 1), count: stripe - 100)
                try! img.write(data, at: UInt64(s * stripe + 50))
                if s % 7 == 0 { _ = try! img.read(at: UInt64(s * stripe), count: stripe) }
            }
        }
        try img.close()
        let check = try openRO(path)
        let all = try readAll(check)
        for s in 0..<stripes {
            let base = s * stripe
            let head = all[base..<(base + 50)], belowHead = below[base..<(base + 50)]
            #expect(head.elementsEqual(belowHead), "stripe \(s) head changed")
            let mid = all[(base + 50)..<(base + stripe - 50)]
            let owner = UInt8(s % threads + 1)
            let expectMid = mid.allSatisfy { $0 == owner } || mid.elementsEqual(below[(base + 50)..<(base + stripe - 50)])
            #expect(expectMid, "stripe \(s) holds a mix of writes")
        }
        try check.close()
        if v.format == .qcow2 { try sh(["qemu-img", "check", path]) }
    }
}
