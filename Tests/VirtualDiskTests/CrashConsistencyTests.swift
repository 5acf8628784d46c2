import Foundation
import Testing
@testable import VirtualDisk

/// Power-cut simulation. A random workload runs on a real image while every change to
/// its files is recorded; then, for every prefix of that log — and for variants where
/// writes not yet covered by a sync are dropped at random — the files are rebuilt as a
/// power cut could leave them, and the image must open, check without corruption
/// (leaks allowed), and read back every byte that a completed flush acknowledged.
struct CrashVariant: CustomStringConvertible, Sendable {
    let name: String
    let format: ImageFormat
    let options: [(String, String)]
    let withBacking: Bool
    var description: String { name }
}

let crashVariants: [CrashVariant] = [
    CrashVariant(name: "qcow2", format: .qcow2, options: [("cluster_size", "4k")], withBacking: false),
    CrashVariant(name: "qcow2-512-rc1", format: .qcow2, options: [("cluster_size", "512"), ("refcount_bits", "1")], withBacking: false),
    CrashVariant(name: "qcow2-extl2-backed", format: .qcow2, options: [("extended_l2", "on"), ("cluster_size", "16k")], withBacking: true),
    CrashVariant(name: "qcow2-v2-backed", format: .qcow2, options: [("compat", "0.10"), ("cluster_size", "4k")], withBacking: true),
    CrashVariant(name: "qcow", format: .qcow, options: [], withBacking: false),
    CrashVariant(name: "vhd-dynamic", format: .vhd, options: [("block_size", "64k")], withBacking: false),
    CrashVariant(name: "vmdk-sparse", format: .vmdk, options: [], withBacking: false),
    CrashVariant(name: "qcow2-second-workload", format: .qcow2, options: [("cluster_size", "4k")], withBacking: false),
]

@Suite("Crash consistency")
struct CrashConsistencyTests {
    static let size = 1 << 20

    /// Rebuild the files of `dir` from `base` plus the given ops.
    static func materialize(base: [String: [UInt8]], ops: ArraySlice<WriteRecorder.Op>, drop: Set<Int>, into dir: String) throws {
        var files = base
        for (i, op) in zip(ops.indices, ops) where !drop.contains(i) {
            switch op {
            case let .write(path, offset, bytes):
                var f = files[path] ?? []
                let end = Int(offset) + bytes.count
                if f.count < end { f += [UInt8](repeating: 0, count: end - f.count) }
                f.replaceSubrange(Int(offset)..<end, with: bytes)
                files[path] = f
            case let .zero(path, offset, length):
                var f = files[path] ?? []
                let end = min(f.count, Int(offset + length))
                if Int(offset) < end { for k in Int(offset)..<end { f[k] = 0 } }
                files[path] = f
            case let .truncate(path, size):
                var f = files[path] ?? []
                if f.count > Int(size) { f.removeLast(f.count - Int(size)) } else { f += [UInt8](repeating: 0, count: Int(size) - f.count) }
                files[path] = f
            case .sync:
                break
            }
        }
        for (path, bytes) in files {
            let name = (path as NSString).lastPathComponent
            try Data(bytes).write(to: URL(fileURLWithPath: dir + "/" + name))
        }
    }

    @Test("every crash state opens, checks clean of corruption, and keeps flushed data", arguments: crashVariants)
    func powerCuts(_ v: CrashVariant) throws {
        let dir = TempDir()
        var rng = SplitMix(state: UInt64(v.name.utf8.reduce(0) { $0 &* 31 &+ UInt64($1) }))
        var below = [UInt8](repeating: 0, count: Self.size)
        if v.withBacking {
            let b = dir.file("base.raw")
            try RawLayer.create(path: b, size: UInt64(Self.size))
            let img = try openRW(b, format: .raw)
            below = (0..<Self.size).map { _ in UInt8.random(in: 0...255, using: &rng) }
            try img.write(below, at: 0)
            try img.close()
        }
        let path = dir.file("img.\(v.format.rawValue)")
        var r = CreateRequest(path: path, format: v.format, size: UInt64(Self.size))
        r.options = v.options
        if v.withBacking { r.backingFile = "base.raw"; r.backingFormat = .raw }
        try CreateOperation.run(r)
        // Snapshot of the files before the workload.
        var base: [String: [UInt8]] = [:]
        for name in try FileManager.default.contentsOfDirectory(atPath: dir.path) {
            base[dir.file(name)] = try readFile(dir.file(name))
        }
        // The workload, with the model of what each completed flush made durable.
        let recorder = WriteRecorder(directory: dir.path + "/img")
        var model = below
        var durable: [(logLength: Int, bytes: [UInt8], dirty: [Bool])] = [(0, below, [Bool](repeating: false, count: Self.size))]
        var dirtySinceFlush = [Bool](repeating: false, count: Self.size)
        recorder.start()
        do {
            let img = try openRW(path)
            for step in 0..<40 {
                let len = Int.random(in: 1...40_000, using: &rng)
                let off = Int.random(in: 0..<(Self.size - len), using: &rng)
                switch Int.random(in: 0..<6, using: &rng) {
                case 0...2:
                    let data = (0..<len).map { _ in UInt8.random(in: 0...255, using: &rng) }
                    try img.write(data, at: UInt64(off))
                    model.replaceSubrange(off..<(off + len), with: data)
                    for k in off..<(off + len) { dirtySinceFlush[k] = true }
                case 3:
                    try img.writeZeroes(at: UInt64(off), length: UInt64(len), mayUnmap: step % 2 == 0)
                    for k in off..<(off + len) { model[k] = 0; dirtySinceFlush[k] = true }
                default:
                    try img.flush()
                    durable.append((recorder.log.count, model, [Bool](repeating: false, count: Self.size)))
                    dirtySinceFlush = [Bool](repeating: false, count: Self.size)
                }
                // Bytes changed after a flush may read either way after a crash.
                for k in 0..<Self.size where dirtySinceFlush[k] { durable[durable.count - 1].dirty[k] = true }
            }
            try img.close()
            durable.append((recorder.log.count, model, [Bool](repeating: false, count: Self.size)))
        }
        recorder.stop()
        let log = recorder.log
        #expect(log.count > 20, "\(v): only \(log.count) operations recorded")

        var states = 0
        let stateDir = TempDir()
        if v.withBacking { try Data(below).write(to: URL(fileURLWithPath: stateDir.file("base.raw"))) }
        for cut in stride(from: 0, through: log.count, by: max(1, log.count / 120)) {
            // Which writes may be lost: those after the last sync of their file.
            var lastSync: [String: Int] = [:]
            for i in 0..<cut { if case let .sync(p) = log[i] { lastSync[p] = i } }
            let unsynced = (0..<cut).filter { i in
                switch log[i] {
                case let .write(p, _, _), let .zero(p, _, _), let .truncate(p, _): return i > (lastSync[p] ?? -1)
                case .sync: return false
                }
            }
            var variants: [Set<Int>] = [[]]
            if !unsynced.isEmpty {
                variants.append(Set(unsynced))
                variants.append(Set(unsynced.filter { _ in Bool.random(using: &rng) }))
            }
            // The newest flush whose log ends within this prefix is what must survive.
            let promise = durable.last { $0.logLength <= cut }!
            for drop in variants {
                try Self.materialize(base: base.filter { !$0.key.hasSuffix("base.raw") }, ops: log[0..<cut], drop: drop, into: stateDir.path)
                let p = stateDir.file("img.\(v.format.rawValue)")
                let img = try openRO(p)
                let got = try readAll(img)
                for k in 0..<Self.size where !promise.dirty[k] && got[k] != promise.bytes[k] {
                    Issue.record("\(v): cut \(cut)/\(log.count), dropped \(drop.count): byte \(k) is \(got[k]), flushed \(promise.bytes[k])")
                    break
                }
                try img.close()
                if v.format == .qcow2 {
                    // Leaks are allowed after a power cut; corruption is not.
                    let rw = try openRW(p)
                    let report = try ((rw as! LayeredImage).layer as! QCOW2Layer).check(repair: .none)
                    #expect(report.corruptions.isEmpty, "\(v): cut \(cut): \(report.corruptions.prefix(3))")
                    try rw.close()
                    if states % 25 == 0 {
                        let q = try sh(["qemu-img", "check", p], check: false)
                        #expect(q.status == 0 || q.status == 3, "\(v): cut \(cut): qemu-img check: \(q.out)")
                    }
                }
                states += 1
            }
        }
        #expect(states > 100)
        print("crash-consistency \(v): \(log.count) recorded operations, \(states) crash states checked")
    }
}
