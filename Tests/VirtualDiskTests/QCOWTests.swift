import Foundation
import Testing
@testable import VirtualDisk

/// QCOW (version 1) against the real qemu-img and qemu-io: images qemu makes read back as
/// qemu reads them, and images we make and write are what qemu expects.
///
/// Helpers live in `QCOWPeer` so this file shares no names with other test files.
enum QCOWPeer {
    static let qemuImg = "/usr/bin/qemu-img"
    static let qemuIO = "/usr/bin/qemu-io"

    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    /// Run a program; returns exit status and stdout. Throws on a non-zero status
    /// unless `check` is false.
    @discardableResult
    static func run(_ args: [String], check: Bool = true) throws -> (status: Int32, out: Data) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: args[0])
        p.arguments = Array(args.dropFirst())
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        // qemu's diagnostics are short: stdout first, then stderr, cannot fill a pipe.
        let o = out.fileHandleForReading.readDataToEndOfFile()
        let e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        if check && p.terminationStatus != 0 {
            throw Failure(description: "\(args.joined(separator: " ")) exited \(p.terminationStatus): "
                + String(decoding: e, as: UTF8.self) + String(decoding: o, as: UTF8.self))
        }
        return (p.terminationStatus, o)
    }

    /// A fresh directory under /tmp, removed by `remove()`.
    static func tempDir() throws -> String {
        let path = "/tmp/vloop-qcow-test-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    static func remove(_ dir: String) { try? FileManager.default.removeItem(atPath: dir) }

    static func bytes(_ path: String) throws -> [UInt8] {
        [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
    }

    static func store(_ bytes: [UInt8], _ path: String) throws {
        try Data(bytes).write(to: URL(fileURLWithPath: path))
    }

    static func qemuIO(_ image: String, format: String = "qcow", _ commands: [String]) throws {
        var args = [qemuIO, "-f", format]
        for c in commands { args += ["-c", c] }
        try run(args + [image])
    }

    /// `qemu-img convert -c -O qcow src img`. The qemu-img here (7.2) exits 1 without a
    /// message after writing a complete compressed qcow image, so the status alone
    /// proves nothing: the result counts when `qemu-img compare` finds it equal to the
    /// source.
    static func compressWithQemu(_ src: String, _ img: String) throws {
        let status = try run([qemuImg, "convert", "-c", "-O", "qcow", src, img], check: false).status
        if status != 0 {
            let same = try run([qemuImg, "compare", "-f", "raw", "-F", "qcow", src, img], check: false).status
            if same != 0 { throw Failure(description: "qemu-img convert -c -O qcow exited \(status) and its output differs") }
        }
    }

    /// The guest bytes as qemu reads them (`qemu-img convert -O raw`).
    static func qemuRaw(_ image: String, in dir: String) throws -> [UInt8] {
        let out = dir + "/qemu-view-\(UUID().uuidString).raw"
        try run([qemuImg, "convert", "-O", "raw", image, out])
        defer { try? FileManager.default.removeItem(atPath: out) }
        return try bytes(out)
    }

    static func qemuInfo(_ image: String) throws -> [String: Any] {
        let out = try run([qemuImg, "info", "--output=json", image]).out
        guard let obj = try JSONSerialization.jsonObject(with: out) as? [String: Any] else {
            throw Failure(description: "qemu-img info gave no JSON object")
        }
        return obj
    }

    /// Guest ranges qemu reports as data in the top layer (`qemu-img map`, depth 0).
    static func qemuDataRanges(_ image: String) throws -> [Range<UInt64>] {
        let out = try run([qemuImg, "map", "--output=json", image]).out
        guard let items = try JSONSerialization.jsonObject(with: out) as? [[String: Any]] else {
            throw Failure(description: "qemu-img map gave no JSON array")
        }
        var ranges: [Range<UInt64>] = []
        for item in items where (item["data"] as? Bool) == true && (item["depth"] as? Int) == 0 {
            let start = (item["start"] as! NSNumber).uint64Value
            let length = (item["length"] as! NSNumber).uint64Value
            ranges.append(start..<(start + length))
        }
        return merge(ranges)
    }

    /// Guest ranges our layer reports as data in the top layer.
    static func ourDataRanges(_ image: DiskImage) throws -> [Range<UInt64>] {
        let ranges = try image.extents(at: 0, length: image.info.virtualSize)
            .filter { $0.isData && $0.depth == 0 }
            .map { $0.offset..<$0.end }
        return merge(ranges)
    }

    static func merge(_ ranges: [Range<UInt64>]) -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        for r in ranges.sorted(by: { $0.lowerBound < $1.lowerBound }) where !r.isEmpty {
            if let last = out.last, last.upperBound >= r.lowerBound {
                out[out.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
            } else {
                out.append(r)
            }
        }
        return out
    }

    static func open(_ path: String, writable: Bool = false, format: ImageFormat? = nil) throws -> DiskImage {
        try ImageOpener.open(path, options: OpenOptions(format: format, writable: writable))
    }

    /// Read the whole disk in randomly sized pieces (so runs split everywhere).
    static func readInPieces(_ image: DiskImage, rng: inout SplitMix64) throws -> [UInt8] {
        let size = Int(image.info.virtualSize)
        var out = [UInt8](repeating: 0, count: size)
        var pos = 0
        while pos < size {
            let n = min(size - pos, Int.random(in: 1...70_000, using: &rng))
            try out.withUnsafeMutableBytes { buf in
                try image.read(into: UnsafeMutableRawBufferPointer(rebasing: buf[pos..<(pos + n)]), at: UInt64(pos))
            }
            pos += n
        }
        return out
    }

    static func randomBytes(_ n: Int, rng: inout SplitMix64) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: n)
        out.withUnsafeMutableBytes { buf in
            var i = 0
            while i < n {
                var v = rng.next()
                for _ in 0..<min(8, n - i) {
                    buf[i] = UInt8(truncatingIfNeeded: v)
                    v >>= 8
                    i += 1
                }
            }
        }
        return out
    }

    /// Byte-for-byte equality of `got` with `model[offset...]` (memcmp: tests build unoptimised).
    static func matches(_ got: [UInt8], _ model: [UInt8], at offset: Int) -> Bool {
        guard offset + got.count <= model.count else { return false }
        return got.withUnsafeBytes { g in
            model.withUnsafeBytes { m in memcmp(g.baseAddress!, m.baseAddress! + offset, g.count) == 0 }
        }
    }

    static func put(_ data: [UInt8], into model: inout [UInt8], at offset: Int) {
        model.withUnsafeMutableBytes { m in
            data.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: m[offset..<(offset + $0.count)]).copyMemory(from: $0) }
        }
    }

    /// A compressible and incompressible mix: random bytes, repeated text, zeroes.
    static func mixedContent(_ n: Int, rng: inout SplitMix64) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(n)
        let text = Array("qcow version 1 compressed cluster test; ".utf8)
        while out.count < n {
            let len = min(n - out.count, Int.random(in: 1000...40_000, using: &rng))
            switch Int.random(in: 0..<3, using: &rng) {
            case 0: out += randomBytes(len, rng: &rng)
            case 1: out += (0..<len).map { text[$0 % text.count] }
            default: out += [UInt8](repeating: 0, count: len)
            }
        }
        return out
    }

    /// Deterministic pseudo-random numbers, so a failure reproduces.
    struct SplitMix64: RandomNumberGenerator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9e37_79b9_7f4a_7c15
            var z = state
            z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
            z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
            return z ^ (z >> 31)
        }
    }

    /// Random writes, zero writes and discards through `image`, mirrored in `model`,
    /// with reads checked against it as it goes. A discarded byte may read as its old
    /// value, as zero, or as the backing file's byte (`below`): it is read back at once
    /// and the model takes what it shows.
    static func exercise(_ image: DiskImage, model: inout [UInt8], below: [UInt8], ops: Int, maxLength: Int,
                         rng: inout SplitMix64) throws {
        let size = model.count
        for step in 0..<ops {
            let offset = Int.random(in: 0..<size, using: &rng)
            let length = min(size - offset, Int.random(in: 1...maxLength, using: &rng))
            switch Int.random(in: 0..<10, using: &rng) {
            case 0..<6:
                let data = randomBytes(length, rng: &rng)
                try image.write(data, at: UInt64(offset))
                put(data, into: &model, at: offset)
            case 6..<8:
                let unmap = Bool.random(using: &rng)
                try image.writeZeroes(at: UInt64(offset), length: UInt64(length), mayUnmap: unmap)
                put([UInt8](repeating: 0, count: length), into: &model, at: offset)
            case 8:
                try image.discard(at: UInt64(offset), length: UInt64(length))
                let got = try image.read(at: UInt64(offset), count: length)
                for i in 0..<length where got[i] != model[offset + i] {
                    guard got[i] == 0 || got[i] == below[offset + i] else {
                        throw Failure(description: "step \(step): byte \(offset + i) after discard reads \(got[i])")
                    }
                    model[offset + i] = got[i]
                }
            default:
                if Bool.random(using: &rng) { try image.flush() }
            }
            if step % 5 == 0 {
                let at = Int.random(in: 0..<size, using: &rng)
                let n = min(size - at, Int.random(in: 1...(maxLength * 2), using: &rng))
                if !matches(try image.read(at: UInt64(at), count: n), model, at: at) {
                    throw Failure(description: "step \(step): read of \(n) bytes at \(at) differs from the model")
                }
            }
        }
        if !matches(try image.read(at: 0, count: size), model, at: 0) {
            throw Failure(description: "final read differs from the model")
        }
    }
}

@Suite("QCOW version 1 against qemu-img")
struct QCOWTests {
    typealias P = QCOWPeer

    // MARK: the header parser on in-memory bytes

    @Test("header of a qemu-made image parses and serialises back to the same bytes; short input is refused")
    func headerRoundTrip() throws {
        let dir = try P.tempDir()
        defer { P.remove(dir) }
        try P.run([P.qemuImg, "create", "-f", "raw", dir + "/base.raw", "7M"])
        for (name, extra) in [("plain.qcow", [String]()), ("over.qcow", ["-b", "base.raw", "-F", "raw"])] {
            let path = dir + "/" + name
            try P.run([P.qemuImg, "create", "-f", "qcow"] + extra + [path, "7000000"])
            let bytes = try P.bytes(path)
            let info = try P.qemuInfo(path)
            let h = try QCOWHeader.parse(Array(bytes.prefix(QCOWHeader.size)), fileSize: UInt64(bytes.count))
            #expect(h.serialize() == Array(bytes.prefix(QCOWHeader.size)))
            #expect(h.virtualSize == (info["virtual-size"] as! NSNumber).uint64Value)
            #expect(h.clusterSize == (info["cluster-size"] as! NSNumber).uint64Value)
            if h.hasBackingFile {
                let o = Int(h.backingFileOffset)
                #expect(QCOWHeader.backingName(Array(bytes[o..<(o + Int(h.backingFileSize))])) == info["backing-filename"] as? String)
            }
            // Drip-fed: every truncation of the header is a clean refusal.
            for n in 0..<QCOWHeader.size {
                #expect(throws: ImageError.self) { try QCOWHeader.parse(Array(bytes.prefix(n)), fileSize: UInt64(bytes.count)) }
            }
            // A file too short for its L1 table is refused.
            #expect(throws: ImageError.self) { try QCOWHeader.parse(Array(bytes.prefix(QCOWHeader.size)), fileSize: h.l1TableEnd - 1) }
        }
    }

    // MARK: images qemu made, read by us

    @Test("qemu-made image without backing, odd size, reads as qemu reads it")
    func readsQemuImage() throws {
        let dir = try P.tempDir()
        defer { P.remove(dir) }
        let img = dir + "/plain.qcow"
        try P.run([P.qemuImg, "create", "-f", "qcow", img, "5000001"])
        try P.qemuIO(img, ["write -P 0x5a 4k 64k", "write -P 0xa5 1000 3000", "write -P 0x33 1048000 200000",
                           "write -P 0x11 4999680 512", "write -P 0x00 2m 8k"])
        let expected = try P.qemuRaw(img, in: dir)
        let info = try P.qemuInfo(img)

        let image = try P.open(img)
        defer { try? image.close() }
        #expect(image.info.format == "qcow")
        #expect(image.info.virtualSize == (info["virtual-size"] as! NSNumber).uint64Value)
        #expect(image.info.clusterSize == (info["cluster-size"] as! NSNumber).uint64Value)
        #expect(image.info.backing == nil)
        #expect(try P.readAllChecked(image) == expected)
        var rng = P.SplitMix64(state: 1)
        #expect(try P.readInPieces(image, rng: &rng) == expected)
        #expect(try P.ourDataRanges(image) == P.qemuDataRanges(img))
    }

    @Test("qemu-made chains (qcow over qcow, qcow over raw, overlay larger than its base)")
    func readsQemuChain() throws {
        let dir = try P.tempDir()
        defer { P.remove(dir) }
        let base = dir + "/base.qcow"
        try P.run([P.qemuImg, "create", "-f", "qcow", base, "2M"])
        try P.qemuIO(base, ["write -P 0x61 0 1m", "write -P 0x62 1536k 100k"])
        let top = dir + "/top.qcow"
        // Overlay larger than its base: past the base's end reads as zeroes.
        try P.run([P.qemuImg, "create", "-f", "qcow", "-b", "base.qcow", "-F", "qcow", top, "3M"])
        try P.qemuIO(top, ["write -P 0x71 1234 5000", "write -P 0x72 900k 300k", "write -P 0x73 2090000 100000"])

        let rawBase = dir + "/base.raw"
        try P.run([P.qemuImg, "create", "-f", "raw", rawBase, "1M"])
        try P.qemuIO(rawBase, format: "raw", ["write -P 0x44 0 1m"])
        let overRaw = dir + "/over-raw.qcow"
        try P.run([P.qemuImg, "create", "-f", "qcow", "-b", "base.raw", "-F", "raw", overRaw])
        try P.qemuIO(overRaw, ["write -P 0x45 513 777", "write -P 0x46 700k 10k"])

        for path in [top, overRaw] {
            let expected = try P.qemuRaw(path, in: dir)
            let image = try P.open(path)
            defer { try? image.close() }
            #expect(image.info.backing?.name == (try P.qemuInfo(path)["backing-filename"] as? String))
            #expect(image.backingImage != nil)
            #expect(try P.readAllChecked(image) == expected)
            var rng = P.SplitMix64(state: 2)
            #expect(try P.readInPieces(image, rng: &rng) == expected)
            #expect(try P.ourDataRanges(image) == P.qemuDataRanges(path))
        }
    }

    @Test("compressed image from 'qemu-img convert -c -O qcow'")
    func readsCompressedImage() throws {
        let dir = try P.tempDir()
        defer { P.remove(dir) }
        var rng = P.SplitMix64(state: 3)
        let content = P.mixedContent(1_500_000, rng: &rng)  // not a multiple of 512
        let src = dir + "/src.raw"
        try P.store(content, src)
        let img = dir + "/comp.qcow"
        try P.compressWithQemu(src, img)
        let expected = try P.qemuRaw(img, in: dir)

        let image = try P.open(img)
        defer { try? image.close() }
        #expect(image.info.virtualSize == UInt64(expected.count))
        let got = try P.readAllChecked(image)
        #expect(got == expected)
        #expect(Array(got.prefix(content.count)) == content)
        #expect(try P.readInPieces(image, rng: &rng) == expected)
        // Compressed clusters show as data without a host offset.
        let extents = try image.extents(at: 0, length: image.info.virtualSize)
        #expect(extents.contains { $0.kind == .data(hostOffset: nil) })
        #expect(try P.ourDataRanges(image) == P.qemuDataRanges(img))
    }

    // MARK: images we made and wrote, checked by qemu

    @Test("creator lays files out byte for byte as qemu-img create does",
          arguments: [(UInt64(1_000_001), false), (UInt64(10 << 20), false), (UInt64(3_000_000), true), (UInt64(5 << 30), true)])
    func createMatchesQemu(size: UInt64, withBacking: Bool) throws {
        let dir = try P.tempDir()
        defer { P.remove(dir) }
        let ours = dir + "/ours.qcow", theirs = dir + "/theirs.qcow"
        var args = [P.qemuImg, "create", "-f", "qcow"]
        if withBacking {
            try P.run([P.qemuImg, "create", "-f", "raw", dir + "/base.raw", String(size)])
            args += ["-b", "base.raw", "-F", "raw"]
        }
        try P.run(args + [theirs, String(size)])
        try QCOWLayer.create(path: ours, size: size, backingFile: withBacking ? "base.raw" : nil)
        #expect(try P.bytes(ours) == P.bytes(theirs))
        let info = try P.qemuInfo(ours)
        #expect(info["format"] as? String == "qcow")
        #expect((info["virtual-size"] as! NSNumber).uint64Value == size.alignedUp(512))
    }

    @Test("random writes, zeroes and discards through LayeredImage; qemu-img compare agrees",
          arguments: [UInt64?.none, 512, 65536])
    func writesReadByQemu(clusterSize: UInt64?) throws {
        let dir = try P.tempDir()
        defer { P.remove(dir) }
        let img = dir + "/ours.qcow"
        let size = 3 * 1024 * 1024 + 1536 + 7  // odd: rounded up to 512 by the creator
        try QCOWLayer.create(path: img, size: UInt64(size), clusterSize: clusterSize)
        let image = try P.open(img, writable: true)
        #expect(image.layeredLayer is QCOWLayer)
        let virtual = Int(image.info.virtualSize)
        #expect(virtual == (size + 511) / 512 * 512)
        var model = [UInt8](repeating: 0, count: virtual)
        var rng = P.SplitMix64(state: 4 &+ (clusterSize ?? 0))
        try P.exercise(image, model: &model, below: [UInt8](repeating: 0, count: virtual), ops: 300, maxLength: 90_000, rng: &rng)
        try image.close()

        let expected = dir + "/expected.raw"
        try P.store(model, expected)
        #expect(try P.run([P.qemuImg, "compare", "-f", "qcow", "-F", "raw", img, expected], check: false).status == 0)
        let info = try P.qemuInfo(img)
        #expect(info["format"] as? String == "qcow")
        #expect((info["virtual-size"] as! NSNumber).uint64Value == UInt64(virtual))
        #expect(try P.qemuRaw(img, in: dir) == model)
        // qemu can keep writing the image we wrote, and we read what it wrote.
        try P.qemuIO(img, ["write -P 0x3c 300k 70k"])
        let reopened = try P.open(img)
        defer { try? reopened.close() }
        #expect(try P.readAllChecked(reopened) == P.qemuRaw(img, in: dir))
    }

    @Test("our overlay over a qemu-made base: copy-on-write fills from the chain",
          arguments: [UInt64?.none, 4096])
    func writesOverBacking(clusterSize: UInt64?) throws {
        let dir = try P.tempDir()
        defer { P.remove(dir) }
        let base = dir + "/base.qcow"
        try P.run([P.qemuImg, "create", "-f", "qcow", base, "2M"])
        try P.qemuIO(base, ["write -P 0x5a 4k 64k", "write -P 0x21 1m 900k", "write -P 0x22 300000 5000"])
        let baseBefore = try P.bytes(base)
        let below = try P.qemuRaw(base, in: dir)

        let top = dir + "/top.qcow"
        let size = 2 * 1024 * 1024 + 4096 + 512  // larger than the base
        try QCOWLayer.create(path: top, size: UInt64(size), clusterSize: clusterSize, backingFile: "base.qcow")
        let image = try P.open(top, writable: true)
        #expect(image.info.backing?.name == "base.qcow")
        var model = below + [UInt8](repeating: 0, count: size - below.count)
        var rng = P.SplitMix64(state: 5 &+ (clusterSize ?? 0))
        try P.exercise(image, model: &model, below: model, ops: 250, maxLength: 20_000, rng: &rng)
        try image.close()

        let expected = dir + "/expected.raw"
        try P.store(model, expected)
        #expect(try P.run([P.qemuImg, "compare", "-f", "qcow", "-F", "raw", top, expected], check: false).status == 0)
        #expect(try P.qemuInfo(top)["backing-filename"] as? String == "base.qcow")
        #expect(try P.bytes(base) == baseBefore)
    }

    @Test("rewriting compressed clusters copies them to fresh clusters")
    func rewritesCompressedClusters() throws {
        let dir = try P.tempDir()
        defer { P.remove(dir) }
        var rng = P.SplitMix64(state: 6)
        var model = P.mixedContent(1 << 20, rng: &rng)
        let src = dir + "/src.raw"
        try P.store(model, src)
        let img = dir + "/comp.qcow"
        try P.compressWithQemu(src, img)
        let image = try P.open(img, writable: true)
        let compressedBefore = try image.extents(at: 0, length: image.info.virtualSize).filter { $0.kind == .data(hostOffset: nil) }
        #expect(!compressedBefore.isEmpty)
        // Small writes into the middle of compressed clusters: the rest must survive.
        for e in compressedBefore.prefix(20) {
            let at = Int(e.offset) + Int(e.length / 2)
            let data = P.randomBytes(100, rng: &rng)
            try image.write(data, at: UInt64(at))
            model.replaceSubrange(at..<(at + 100), with: data)
        }
        try P.exercise(image, model: &model, below: [UInt8](repeating: 0, count: model.count), ops: 100, maxLength: 30_000, rng: &rng)
        try image.close()
        let expected = dir + "/expected.raw"
        try P.store(model, expected)
        #expect(try P.run([P.qemuImg, "compare", "-f", "qcow", "-F", "raw", img, expected], check: false).status == 0)
    }

    @Test("zero writes where nothing is allocated and there is no backing allocate nothing")
    func zeroWritesAllocateNothing() throws {
        let dir = try P.tempDir()
        defer { P.remove(dir) }
        let img = dir + "/z.qcow"
        try QCOWLayer.create(path: img, size: 8 << 20)
        let before = try P.bytes(img)
        let image = try P.open(img, writable: true)
        try image.writeZeroes(at: 0, length: 8 << 20, mayUnmap: false)
        try image.writeZeroes(at: 12345, length: 100_000, mayUnmap: true)
        try image.close()
        #expect(try P.bytes(img) == before)

        // Unmapping zero writes over data drop whole clusters; partial ones write zeroes.
        let again = try P.open(img, writable: true)
        try again.write([UInt8](repeating: 0xee, count: 64 << 10), at: 1 << 20)
        try again.writeZeroes(at: 1 << 20, length: 32 << 10, mayUnmap: true)
        try again.writeZeroes(at: (1 << 20) + (40 << 10) + 100, length: 1000, mayUnmap: true)
        try again.close()
        let check = try P.open(img)
        defer { try? check.close() }
        #expect(try P.ourDataRanges(check) == P.qemuDataRanges(img))
        #expect(try P.readAllChecked(check) == P.qemuRaw(img, in: dir))
    }

    @Test("concurrent writers to shared clusters keep every byte")
    func concurrentWrites() throws {
        let dir = try P.tempDir()
        defer { P.remove(dir) }
        let base = dir + "/base.raw"
        var rng = P.SplitMix64(state: 7)
        let below = P.randomBytes(1 << 20, rng: &rng)
        try P.store(below, base)
        let img = dir + "/top.qcow"
        try QCOWLayer.create(path: img, size: 1 << 20, clusterSize: 4096, backingFile: "base.raw")
        let image = try P.open(img, writable: true)
        // Four writers own interleaved 256-byte stripes, so they meet in every cluster.
        let writers = 4, stripe = 256
        let results = P.LockedResults()
        DispatchQueue.concurrentPerform(iterations: writers) { w in
            var r = P.SplitMix64(state: 100 + UInt64(w))
            do {
                for _ in 0..<400 {
                    let index = Int.random(in: 0..<((1 << 20) / stripe / writers), using: &r) * writers + w
                    let data = P.randomBytes(stripe, rng: &r)
                    try image.write(data, at: UInt64(index * stripe))
                    results.record(index * stripe, data)
                }
            } catch {
                results.fail(error)
            }
        }
        #expect(results.error == nil)
        var model = below
        for (offset, data) in results.writes { model.replaceSubrange(offset..<(offset + data.count), with: data) }
        #expect(try P.readAllChecked(image) == model)
        try image.close()
        let expected = dir + "/expected.raw"
        try P.store(model, expected)
        #expect(try P.run([P.qemuImg, "compare", "-f", "qcow", "-F", "raw", img, expected], check: false).status == 0)
    }

    // MARK: hostile and unsupported input

    @Test("encrypted images are refused as unsupported")
    func refusesEncrypted() throws {
        let dir = try P.tempDir()
        defer { P.remove(dir) }
        let img = dir + "/enc.qcow"
        try P.run([P.qemuImg, "create", "-f", "qcow", "--object", "secret,id=sec0,data=secret",
                   "-o", "encrypt.format=aes,encrypt.key-secret=sec0", img, "1M"])
        do {
            _ = try P.open(img)
            Issue.record("encrypted image opened")
        } catch let e as ImageError {
            #expect(e.code == .unsupported)
            #expect(e.message.contains("encrypted"))
        }
    }

    @Test("malformed headers fail with a clear error, never a trap")
    func refusesMalformedHeaders() throws {
        let dir = try P.tempDir()
        defer { P.remove(dir) }
        let good = dir + "/good.qcow"
        try P.run([P.qemuImg, "create", "-f", "qcow", good, "4M"])
        try P.qemuIO(good, ["write -P 0x5a 0 64k"])
        let original = try P.bytes(good)
        func patched(_ edit: (inout [UInt8]) -> Void) throws -> String {
            var b = original
            edit(&b)
            let path = dir + "/bad-\(UUID().uuidString).qcow"
            try P.store(b, path)
            return path
        }
        let cases: [(String, (inout [UInt8]) -> Void, ImageError.Code)] = [
            ("cluster_bits 8", { $0[32] = 8 }, .corrupt),
            ("cluster_bits 17", { $0[32] = 17 }, .corrupt),
            ("l2_bits 5", { $0[33] = 5 }, .corrupt),
            ("l2_bits 14", { $0[33] = 14 }, .corrupt),
            ("crypt_method 9", { $0.putBE32(9, at: 36) }, .corrupt),
            ("size 1", { $0.putBE64(1, at: 24) }, .corrupt),
            ("size huge", { $0.putBE64(1 << 61, at: 24) }, .corrupt),
            ("L1 past the end", { $0.putBE64(1 << 40, at: 40) }, .corrupt),
            ("L1 over the header", { $0.putBE64(8, at: 40) }, .corrupt),
            ("backing name too long", { $0.putBE64(48, at: 8); $0.putBE32(5000, at: 16) }, .corrupt),
            ("backing name past the end", { $0.putBE64(1 << 33, at: 8); $0.putBE32(10, at: 16) }, .corrupt),
            ("version 2 as qcow", { $0.putBE32(2, at: 4) }, .invalidFormat),
        ]
        for (name, edit, code) in cases {
            let path = try patched(edit)
            do {
                let image = try P.open(path, format: .qcow)
                try? image.close()
                Issue.record("\(name): opened")
            } catch let e as ImageError {
                #expect(e.code == code, "\(name): \(e)")
            }
        }

        // L1 and L2 entries pointing at the header, or past the end of the file.
        let l1 = Int(ByteReader(original).be64(40))
        let l2 = Int(ByteReader(original).be64(l1))
        let tables: [(String, (inout [UInt8]) -> Void)] = [
            ("L1 entry at the header", { $0.putBE64(0, at: l1); $0[l1 + 7] = 16 }),
            ("L1 entry past the end", { $0.putBE64(1 << 50, at: l1) }),
            ("L2 entry at the header", { $0.putBE64(16, at: l2) }),
            ("L2 entry past the end", { $0.putBE64(1 << 45, at: l2) }),
            ("compressed entry of size 0", { $0.putBE64(1 << 63 | 8192, at: l2) }),
            ("compressed entry of garbage", { $0.putBE64(1 << 63 | 100 << 51 | 4096, at: l2) }),
        ]
        for (name, edit) in tables {
            let image = try P.open(try patched(edit))
            defer { try? image.close() }
            do {
                _ = try image.read(at: 0, count: 65536)
                Issue.record("\(name): read succeeded")
            } catch let e as ImageError {
                #expect(e.code == .corrupt, "\(name): \(e)")
            }
        }
    }

    @Test("random corruption of header and tables never traps")
    func survivesRandomCorruption() throws {
        let dir = try P.tempDir()
        defer { P.remove(dir) }
        let good = dir + "/good.qcow"
        try P.run([P.qemuImg, "create", "-f", "raw", dir + "/base.raw", "1M"])
        try P.run([P.qemuImg, "create", "-f", "qcow", "-b", "base.raw", "-F", "raw", good, "1M"])
        try P.qemuIO(good, ["write -P 0x5a 0 64k", "write -P 0x5b 500k 3k"])
        let original = try P.bytes(good)
        let metadataEnd = min(original.count, 512 * 80)  // header, L1 and the first L2 table
        var rng = P.SplitMix64(state: 8)
        for round in 0..<150 {
            var b = original
            for _ in 0..<Int.random(in: 1...6, using: &rng) {
                b[Int.random(in: 0..<metadataEnd, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
            }
            let path = dir + "/fuzz.qcow"
            try P.store(b, path)
            do {
                let image = try P.open(path, writable: round % 2 == 0, format: .qcow)
                defer { try? image.close() }
                _ = try image.read(at: 0, count: Int(min(image.info.virtualSize, 1 << 20)))
                if round % 2 == 0 && image.info.virtualSize > 70_000 {
                    try image.write([UInt8](repeating: 7, count: 3000), at: 65_000)
                }
            } catch is ImageError {
                // A clear refusal is the expected outcome for most mutations.
            }
        }
    }
}

extension QCOWPeer {
    /// Read the whole disk in one request.
    static func readAllChecked(_ image: DiskImage) throws -> [UInt8] {
        try image.read(at: 0, count: Int(image.info.virtualSize))
    }

    final class LockedResults: @unchecked Sendable {
        // Safe: every access to `writes` and `firstError` goes through `lock`.
        private let lock = NSLock()
        private var list: [(Int, [UInt8])] = []
        private var firstError: Error?
        func record(_ offset: Int, _ data: [UInt8]) { lock.lock(); list.append((offset, data)); lock.unlock() }
        func fail(_ e: Error) { lock.lock(); if firstError == nil { firstError = e }; lock.unlock() }
        var writes: [(Int, [UInt8])] { lock.lock(); defer { lock.unlock() }; return list }
        var error: Error? { lock.lock(); defer { lock.unlock() }; return firstError }
    }
}

extension DiskImage {
    /// The format layer under a `LayeredImage` (nil for other images).
    fileprivate var layeredLayer: FormatLayer? { (self as? LayeredImage)?.layer }
}
