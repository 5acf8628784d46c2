import Foundation
import Synchronization
import Testing
@testable import VirtualDisk

/// Many threads against one open image: random overlapping reads, writes, zero writes
/// (with and without unmap), discards, flushes and block status queries, checked against what concurrent
/// execution allows.
///
/// Every write fills each 512-byte sector it covers with a stamp naming the write and the
/// sector, so any sector read back says which write put it there. A global counter
/// brackets every operation with a start and an end tick. Per sector, a read (or the final
/// state) may show the value of a write W only if W started before the read ended and no
/// other write or zero write to that sector ran entirely after W and before the read began;
/// the previous contents only if no write to the sector completed before the read began.
/// A discard adds zeroes and the backing contents as possible values without hiding older
/// ones (it is advisory). A sector mixing several values is allowed only in a read that
/// overlapped a write to that sector (the host file gives no atomicity between a read and
/// a write), and never in the final state; a stamp for another sector is never allowed.
@Suite("Concurrency stress", .serialized)
struct StressTests {
    static let threads = 8
    /// VLOOP_STRESS_OPS raises it for a longer run.
    static let opsPerThread = Int(ProcessInfo.processInfo.environment["VLOOP_STRESS_OPS"] ?? "") ?? 120
    static let sector = 512

    /// Every writable conformance variant except the flat VMDK (a raw file with a
    /// descriptor, like raw) and duplicates of option sets the crash and conformance
    /// suites already spread wide.
    static let variants: [Variant] = [
        "raw", "qcow2", "qcow2-v2", "qcow2-512-rc1", "qcow2-extl2", "qcow2-datafile", "qcow2-on-raw",
        "qcow2-on-qcow2-on-raw", "qcow2-v2-on-qcow2", "qcow2-extl2-on-qcow2", "qcow", "qcow-on-qcow2-on-raw",
        "vhd-dynamic", "vhd-dynamic-4k", "vhd-fixed", "vhd-diff-on-vhd", "vhdx-dynamic", "vhdx-fixed",
        "vhdx-diff-on-vhdx", "vmdk-sparse", "vmdk-2gb-sparse", "vmdk-stream", "vmdk-delta-on-vmdk",
        "vdi-dynamic", "vdi-static", "vdi-diff-on-vdi",
    ].filter { name in
        // VLOOP_STRESS_VARIANTS=a,b narrows a long run to some variants.
        guard let only = ProcessInfo.processInfo.environment["VLOOP_STRESS_VARIANTS"] else { return true }
        return only.split(separator: ",").contains { $0 == name }
    }.map { name in conformanceVariants.first { $0.name == name }! }

    /// What a sector held when read.
    enum Seen {
        case stamp(UInt64)
        case zero
        case below
        case other([UInt8])
    }

    enum Kind {
        case write(UInt64)
        case zero
        case discard
        case flush
        case blockStatus
        case read([Seen])
    }

    struct Event {
        var start: UInt64
        var end: UInt64
        var firstSector: Int
        var sectors: Int
        var kind: Kind
    }

    /// A global tick: operations are ordered by the ticks taken before and after them.
    final class Clock: Sendable {
        private let value = Atomic<UInt64>(0)
        func tick() -> UInt64 { value.add(1, ordering: .sequentiallyConsistent).newValue }
    }

    // MARK: stamps

    static func check(_ op: UInt64, _ s: Int) -> UInt64 {
        var x = op &* 0x9e37_79b9_7f4a_7c15 ^ UInt64(s) &* 0xc2b2_ae3d_27d4_eb4f
        x ^= x >> 29
        return x & 0xffff_ffff
    }

    /// A sector's stamp: (op, sector << 32 | check), sixteen bytes repeated 32 times.
    static func fill(_ buf: UnsafeMutableRawBufferPointer, op: UInt64, firstSector: Int) {
        for i in 0..<(buf.count / sector) {
            let s = firstSector + i
            let w1 = UInt64(s) << 32 | check(op, s)
            for k in stride(from: i * sector, to: (i + 1) * sector, by: 16) {
                buf.storeBytes(of: op.littleEndian, toByteOffset: k, as: UInt64.self)
                buf.storeBytes(of: w1.littleEndian, toByteOffset: k + 8, as: UInt64.self)
            }
        }
    }

    static func stampBytes(_ op: UInt64, _ s: Int) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: sector)
        b.withUnsafeMutableBytes { fill($0, op: op, firstSector: s) }
        return b
    }

    static func classify(_ bytes: UnsafeRawBufferPointer, sector s: Int, below: ArraySlice<UInt8>) -> Seen {
        let w0 = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        let w1 = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        var repeated = true
        for k in stride(from: 16, to: sector, by: 16) where
            bytes.loadUnaligned(fromByteOffset: k, as: UInt64.self) != w0.littleEndian
            || bytes.loadUnaligned(fromByteOffset: k + 8, as: UInt64.self) != w1.littleEndian {
            repeated = false
            break
        }
        if repeated && w0 != 0 && w1 == UInt64(s) << 32 | check(w0, s) { return .stamp(w0) }
        if repeated && w0 == 0 && w1 == 0 { return .zero }
        if bytes.elementsEqual(below) { return .below }
        return .other(Array(bytes))
    }

    // MARK: the model

    /// What a read of sector `s` during `start ... end` may return. `events` are the
    /// writes, zero writes and discards touching the sector, in any order.
    struct Allowed {
        var stamps: Set<UInt64> = []
        var zero = false
        var below = false
        /// A write to the sector overlapped the read in time.
        var concurrent = false
    }

    static func allowed(_ events: [Event], readStart: UInt64, readEnd: UInt64) -> Allowed {
        // The newest start among writes that finished before the read began: anything
        // that finished before that start is overwritten for good.
        var horizon: UInt64?
        for e in events where e.end < readStart {
            if case .discard = e.kind { continue }
            horizon = max(horizon ?? 0, e.start)
        }
        var a = Allowed()
        if horizon == nil { a.below = true }
        for e in events where e.start < readEnd && e.end > (horizon ?? 0) {
            switch e.kind {
            case .write(let op): a.stamps.insert(op)
            case .zero: a.zero = true
            case .discard: a.zero = true; a.below = true
            default: break
            }
            if e.end > readStart, e.start < readEnd {
                if case .discard = e.kind {} else { a.concurrent = true }
            }
        }
        return a
    }

    static func verify(_ seen: Seen, sector s: Int, _ a: Allowed, below: ArraySlice<UInt8>, belowIsZero: Bool, final: Bool) -> String? {
        switch seen {
        case .stamp(let op):
            return a.stamps.contains(op) ? nil : "stamp of op \(String(op, radix: 16)) (allowed \(a.stamps.map { String($0, radix: 16) }), zero \(a.zero), below \(a.below))"
        case .zero:
            return a.zero || (a.below && belowIsZero) ? nil : "zeroes (allowed \(a.stamps.map { String($0, radix: 16) }), below \(a.below))"
        case .below:
            return a.below ? nil : "the backing contents (allowed \(a.stamps.map { String($0, radix: 16) }), zero \(a.zero))"
        case .other(let bytes):
            if final || !a.concurrent { return "a sector that is no single value" }
            let candidates = a.stamps.map { stampBytes($0, s) } + (a.zero ? [[UInt8](repeating: 0, count: sector)] : [])
                + (a.below ? [Array(below)] : [])
            for i in 0..<sector where !candidates.contains(where: { $0[i] == bytes[i] }) {
                return "byte \(i) of a torn sector matches no allowed value"
            }
            return nil
        }
    }

    // MARK: the workload

    /// One thread's operations, deterministic from its seed.
    static func workload(_ img: DiskImage, thread t: Int, seed: UInt64, clock: Clock,
                         below: [UInt8], sectors: Int) throws -> [Event] {
        var rng = SplitMix(state: seed &+ UInt64(t) &* 7919)
        var events: [Event] = []
        var seq: UInt64 = 0
        // Most operations crowd into the first 256 KiB or 32 KiB, so that threads collide
        // within one cluster, block or grain.
        for _ in 0..<opsPerThread {
            let span = min([sectors, 512, 64][Int.random(in: 0..<3, using: &rng)], sectors)
            var count = Int.random(in: 1...(Bool.random(using: &rng) ? 8 : 160), using: &rng)
            // Now and then exactly one 64 KiB unit, so that whole clusters are zeroed and
            // discarded in the crowded region too, and partial writes refill them.
            if Int.random(in: 0..<8, using: &rng) == 0 { count = 128 }
            let n = min(count, sectors)
            var first = Int.random(in: 0...(max(span, n) - n), using: &rng)
            if count == 128 || Int.random(in: 0..<4, using: &rng) == 0 { first = first / 128 * 128 }  // 64 KiB aligned
            let offset = UInt64(first * sector), length = n * sector
            seq += 1
            let op = UInt64(t + 1) << 32 | seq
            let choice = Int.random(in: 0..<20, using: &rng)
            var kind: Kind
            var buffer = [UInt8](repeating: 0, count: length)
            if choice < 8 {
                buffer.withUnsafeMutableBytes { fill($0, op: op, firstSector: first) }
            }
            let start = clock.tick()
            switch choice {
            case 0..<8:
                try img.write(buffer, at: offset)
                kind = .write(op)
            case 8..<10:
                try img.writeZeroes(at: offset, length: UInt64(length), mayUnmap: choice == 9)
                kind = .zero
            case 10:
                try img.discard(at: offset, length: UInt64(length))
                kind = .discard
            case 11:
                try img.flush()
                kind = .flush
            case 19:
                // Block status while others allocate and free: the runs must tile the range.
                let extents = try img.extents(at: offset, length: UInt64(length))
                var at = offset
                for e in extents {
                    guard e.offset == at, e.length > 0 else { throw TestFailure("block status of \(offset)+\(length) has a gap or overlap at \(e.offset)") }
                    at += e.length
                }
                guard at == offset + UInt64(length) else { throw TestFailure("block status of \(offset)+\(length) stops at \(at)") }
                kind = .blockStatus
            default:
                try buffer.withUnsafeMutableBytes { try img.read(into: $0, at: offset) }
                kind = .read([])
            }
            let end = clock.tick()
            if case .read = kind {
                var seen: [Seen] = []
                seen.reserveCapacity(n)
                buffer.withUnsafeBytes { b in
                    for i in 0..<n {
                        let s = first + i
                        seen.append(classify(UnsafeRawBufferPointer(rebasing: b[(i * sector)..<((i + 1) * sector)]), sector: s,
                                             below: below[(s * sector)..<((s + 1) * sector)]))
                    }
                }
                kind = .read(seen)
            }
            events.append(Event(start: start, end: end, firstSector: first, sectors: n, kind: kind))
        }
        return events
    }

    /// Run `body` on `count` threads of their own (not a pool two cores wide) and wait
    /// for them, at most `timeout` seconds: a deadlock fails instead of hanging.
    static func onThreads(_ count: Int, timeout: TimeInterval, _ body: @escaping @Sendable (Int) -> Void) throws {
        let done = DispatchSemaphore(value: 0)
        for t in 0..<count {
            let thread = Thread {
                body(t)
                done.signal()
            }
            thread.stackSize = 4 << 20
            thread.start()
        }
        let deadline = DispatchTime.now() + timeout
        for finished in 0..<count where done.wait(timeout: deadline) == .timedOut {
            throw TestFailure("\(count - finished) of \(count) threads still running after \(timeout) s: deadlock or livelock")
        }
    }

    @Test("threads racing on one image see only what concurrent execution allows; the image checks clean", arguments: variants)
    func stress(_ v: Variant) throws {
        let dir = TempDir()
        let seed = UInt64(v.name.utf8.reduce(0) { $0 &* 31 &+ UInt64($1) })
        var rng = SplitMix(state: seed)
        let (path, below) = try ConformanceTests.makeChain(v, in: dir, rng: &rng)
        let size = ConformanceTests.size
        let sector = Self.sector
        let sectors = size / sector
        let belowIsZero = (0..<sectors).map { s in below[(s * sector)..<((s + 1) * sector)].allSatisfy { $0 == 0 } }

        let img = try openRW(path)
        let clock = Clock()
        let results = Mutex<[Int: Result<[Event], Error>]>([:])
        try Self.onThreads(Self.threads, timeout: 120) { t in
            let r = Result { try Self.workload(img, thread: t, seed: seed, clock: clock, below: below, sectors: sectors) }
            results.withLock { $0[t] = r }
        }
        var events: [Event] = []
        for t in 0..<Self.threads {
            events += try results.withLock { $0[t]! }.get()
        }

        // Writes, zero writes and discards by sector.
        var bySector = [[Event]](repeating: [], count: sectors)
        for e in events {
            switch e.kind {
            case .write, .zero, .discard:
                for s in e.firstSector..<(e.firstSector + e.sectors) { bySector[s].append(e) }
            default: break
            }
        }
        var failures: [String] = []
        func record(_ s: Int, _ seen: Seen, start: UInt64, end: UInt64, _ context: String) {
            let a = Self.allowed(bySector[s], readStart: start, readEnd: end)
            let final = start == .max
            if let why = Self.verify(seen, sector: s, a, below: below[(s * sector)..<((s + 1) * sector)],
                                     belowIsZero: belowIsZero[s], final: final) {
                failures.append("\(v) \(context): sector \(s) holds \(why)")
            }
        }
        var readSectors = 0
        for e in events {
            guard case .read(let seen) = e.kind else { continue }
            for (i, x) in seen.enumerated() { record(e.firstSector + i, x, start: e.start, end: e.end, "read at \(e.start)") }
            readSectors += seen.count
        }
        func checkFinal(_ image: DiskImage, _ context: String) throws {
            let all = try readAll(image)
            all.withUnsafeBytes { b in
                for s in 0..<sectors {
                    let range = (s * sector)..<((s + 1) * sector)
                    record(s, Self.classify(UnsafeRawBufferPointer(rebasing: b[range]), sector: s, below: below[range]),
                           start: .max, end: .max, context)
                }
            }
        }
        try checkFinal(img, "after the threads joined")
        try img.close()
        let again = try openRW(path)
        try checkFinal(again, "after reopening")
        // vloop's own check: no corruption, and no leaks either (nothing crashed). Raw,
        // QCOW v1 and VMDK have no vloop check (qemu-img checks VMDK below).
        let layer = (again as? LayeredImage)?.layer
        if [.qcow2, .vhd, .vhdx, .vdi].contains(v.format) {
            let c = try #require(layer as? CheckableLayer, "\(v): no vloop check for a format that has one")
            let report = try c.check(repair: .none)
            #expect(report.exitCode == 0, "\(v): vloop check: \(report.corruptions.prefix(5)), \(report.leaks) leaks \(report.leakDetails.prefix(3))")
        }
        try again.close()
        #expect(failures.isEmpty, "\(failures.count) violations; first: \(failures.prefix(8).joined(separator: "\n"))")

        // A checker no one here wrote, for the formats qemu checks.
        let qemuFormat: String? = switch v.format {
        case .qcow2: "qcow2"
        // qemu opens neither VDI nor VHDX differencing images.
        case .vdi where v.backing.isEmpty: "vdi"
        case .vhdx where v.backing.isEmpty: "vhdx"
        case .vmdk where !v.name.contains("stream"): "vmdk"
        default: nil
        }
        if let f = qemuFormat {
            let q = try sh(["qemu-img", "check", "-f", f, path], cwd: dir.path, check: false)
            #expect(q.status == 0, "\(v): qemu-img check exited \(q.status): \(q.out)\(q.err)")
        }
        let counts = events.reduce(into: [0, 0, 0, 0, 0, 0]) { c, e in
            switch e.kind {
            case .write: c[0] += 1
            case .zero: c[1] += 1
            case .discard: c[2] += 1
            case .flush: c[3] += 1
            case .read: c[4] += 1
            case .blockStatus: c[5] += 1
            }
        }
        print("stress \(v): \(events.count) operations on \(Self.threads) threads (\(counts[0]) writes, \(counts[1]) zero writes, "
              + "\(counts[2]) discards, \(counts[3]) flushes, \(counts[4]) reads of \(readSectors) sectors, \(counts[5]) block status queries)")
    }

    @Test("the model rejects a lost write, a stale read, a misplaced stamp and a torn final sector")
    func modelCatchesMistakes() {
        let below = ArraySlice([UInt8](repeating: 0, count: Self.sector))
        // Write 1 during ticks 1...2, write 2 during 3...4: afterwards only write 2 may show.
        let w1 = Event(start: 1, end: 2, firstSector: 0, sectors: 1, kind: .write(1))
        let w2 = Event(start: 3, end: 4, firstSector: 0, sectors: 1, kind: .write(2))
        let final = Self.allowed([w1, w2], readStart: .max, readEnd: .max)
        #expect(Self.verify(.stamp(2), sector: 0, final, below: below, belowIsZero: true, final: true) == nil)
        #expect(Self.verify(.stamp(1), sector: 0, final, below: below, belowIsZero: true, final: true) != nil)
        #expect(Self.verify(.zero, sector: 0, final, below: below, belowIsZero: true, final: true) != nil)
        // Overlapping in time, either may win; a read during both may see the old contents.
        let w3 = Event(start: 1, end: 4, firstSector: 0, sectors: 1, kind: .write(3))
        let racing = Self.allowed([w3, w2], readStart: .max, readEnd: .max)
        #expect(Self.verify(.stamp(3), sector: 0, racing, below: below, belowIsZero: true, final: true) == nil)
        #expect(Self.verify(.zero, sector: 0, Self.allowed([w3, w2], readStart: 2, readEnd: 5), below: below,
                            belowIsZero: true, final: false) == nil)
        // A discard allows zeroes but keeps the overwritten value possible.
        let d = Event(start: 5, end: 6, firstSector: 0, sectors: 1, kind: .discard)
        let discarded = Self.allowed([w1, w2, d], readStart: .max, readEnd: .max)
        #expect(Self.verify(.zero, sector: 0, discarded, below: below, belowIsZero: true, final: true) == nil)
        #expect(Self.verify(.stamp(1), sector: 0, discarded, below: below, belowIsZero: true, final: true) != nil)
        // Classification: a stamp names its own sector only; half a stamp is no value.
        var bytes = Self.stampBytes(7, 5)
        bytes.withUnsafeBytes { b in
            if case .stamp(7) = Self.classify(b, sector: 5, below: below) {} else { Issue.record("own stamp not recognised") }
            if case .other = Self.classify(b, sector: 6, below: below) {} else { Issue.record("stamp of sector 5 accepted at 6") }
        }
        for i in 0..<256 { bytes[i] = 0 }
        bytes.withUnsafeBytes { b in
            let seen = Self.classify(b, sector: 5, below: below)
            #expect(Self.verify(seen, sector: 5, Self.allowed([Event(start: 1, end: 2, firstSector: 5, sectors: 1, kind: .write(7))],
                                                             readStart: .max, readEnd: .max),
                                below: below, belowIsZero: true, final: true) != nil)
        }
    }
}
