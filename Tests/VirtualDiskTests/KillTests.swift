import Foundation
import CVloop
import Synchronization
import Testing
@testable import VirtualDisk
#if canImport(Glibc)
import Glibc
#endif

/// SIGKILL campaigns: `vloop serve` and `vloop attach` are killed at a random moment while
/// a writer streams known data with flushes; afterwards each image must open, check free of
/// corruption (leaks are allowed), and hold every byte a completed flush acknowledged.
///
/// VLOOP_KILL_ROUNDS sets the rounds (5 by default). Each round kills what serves two
/// images — one `vloop serve`, or both attach daemons — a qcow2 and one of vhdx, vhd,
/// vdi, vmdk in turn.
enum KillCampaign {
    static let rounds = Int(ProcessInfo.processInfo.environment["VLOOP_KILL_ROUNDS"] ?? "") ?? 5
    static let others = ["vhdx", "vhd", "vdi", "vmdk"]
    static let imageSize = 32 << 20
    static let block = 4096

    /// The formats `qemu-img check` knows (qemu calls VHD "vpc" and does not check it).
    static func qemuChecks(_ format: String) -> Bool { ["qcow2", "vhdx", "vdi", "vmdk"].contains(format) }

    /// A block's contents for the write numbered `seq` (0: never written, zeroes).
    static func fill(_ p: UnsafeMutableRawBufferPointer, seq: UInt64, block b: Int) {
        let word = seq == 0 ? 0 : (seq << 24 | UInt64(b)) ^ 0x5bd1_e995_0000_0000
        for k in stride(from: 0, to: block, by: 8) { p.storeBytes(of: word, toByteOffset: k, as: UInt64.self) }
    }

    /// What a writer knows: the write that each block last received, what the last
    /// acknowledged flush made durable, and which blocks changed since.
    struct Ledger {
        var current = [UInt64](repeating: 0, count: imageSize / block)
        var durable = [UInt64](repeating: 0, count: imageSize / block)
        var dirty = [Bool](repeating: false, count: imageSize / block)
        var writes = 0
        var flushes = 0
        var firstFlushSeen = false

        /// Before a write is sent: its blocks may read either way from now on.
        mutating func willWrite(_ first: Int, _ count: Int, seq: UInt64) {
            for b in first..<(first + count) { current[b] = seq; dirty[b] = true }
        }

        mutating func flushed() {
            durable = current
            dirty = [Bool](repeating: false, count: dirty.count)
            flushes += 1
        }

        /// Blocks whose contents a completed flush guarantees.
        var promisedBlocks: Int { dirty.indices.filter { !dirty[$0] && durable[$0] != 0 }.count }
    }

    /// A ledger shared between its writer thread and the test.
    final class SharedLedger: Sendable {
        private let ledger = Mutex(Ledger())
        func withLock<R>(_ body: (inout Ledger) -> R) -> R { ledger.withLock { body(&$0) } }
    }

    /// A random run of blocks to write.
    static func nextWrite(_ rng: inout SplitMix) -> (first: Int, count: Int) {
        let count = Int.random(in: 1...(Bool.random(using: &rng) ? 4 : 64), using: &rng)
        let first = Int.random(in: 0...(imageSize / block - count), using: &rng)
        return (first, count)
    }

    /// Check a killed image: open read-write (a VHDX replays its log), every promised byte
    /// reads back; then `vloop check` and `qemu-img check` find no corruption.
    static func verify(_ path: String, format: String, ledger: Ledger, in dir: String, context: String) throws {
        let img = try openRW(path)
        let all = try readAll(img)
        try img.close()
        var expected = [UInt8](repeating: 0, count: block)
        var bad = 0
        for b in 0..<(imageSize / block) where !ledger.dirty[b] {
            expected.withUnsafeMutableBytes { fill($0, seq: ledger.durable[b], block: b) }
            if !all[(b * block)..<((b + 1) * block)].elementsEqual(expected) {
                if bad == 0 { Issue.record("\(context): block \(b) lost write \(ledger.durable[b]) acknowledged by a flush") }
                bad += 1
            }
        }
        #expect(bad == 0, "\(context): \(bad) flushed blocks lost")
        // vloop has no VMDK checker yet; qemu-img checks those.
        if format != "vmdk" {
            let own = try sh([vloopBinary, "check", path], cwd: dir, check: false, timeout: 120)
            #expect(own.status == 0 || own.status == 3, "\(context): vloop check exited \(own.status): \(own.out)\(own.err)")
        }
        if qemuChecks(format) {
            let q = try sh(["qemu-img", "check", "-f", format, path], cwd: dir, check: false, timeout: 120)
            #expect(q.status == 0 || q.status == 3, "\(context): qemu-img check exited \(q.status): \(q.out)\(q.err)")
        }
    }

    /// A round's images in a fresh directory: a qcow2 and the next of the other formats.
    static func images(round: Int) throws -> (dir: TempDir, names: [String], formats: [String]) {
        let dir = TempDir()
        let formats = ["qcow2", others[round % others.count]]
        let names = ["a.\(formats[0])", "b.\(formats[1])"]
        for (name, format) in zip(names, formats) {
            try sh([nbdVloopBinary, "create", "-q", "-f", format, name, String(imageSize)], cwd: dir.path)
        }
        return (dir, names, formats)
    }

    /// What a campaign ran and checked.
    struct Totals {
        var rounds = 0, writes = 0, flushes = 0, promised = 0

        /// Check each killed image of a round and count it in.
        mutating func verify(round: Int, names: [String], formats: [String], ledgers: [Ledger], in dir: TempDir, _ what: String) throws {
            for (i, name) in names.enumerated() {
                let l = ledgers[i]
                #expect(l.flushes > 0, "\(what) round \(round) \(name): no flush acknowledged before the kill")
                try KillCampaign.verify(dir.file(name), format: formats[i], ledger: l, in: dir.path, context: "\(what) round \(round) \(name)")
                writes += l.writes
                flushes += l.flushes
                promised += l.promisedBlocks
            }
            rounds += 1
        }
    }

    /// Wait for a process to be gone, at most `timeout` seconds.
    static func waitGone(_ pid: pid_t, timeout: TimeInterval) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if kill(pid, 0) != 0 && errno == ESRCH { return true }
            usleep(20_000)
        }
        return false
    }

    /// Run each writer on a thread of its own and kill `pid` a random 0–1.2 s after every
    /// writer has seen its first flush acknowledged. Returns the writers' ledgers.
    static func race(writers: [@Sendable (SharedLedger) -> Void], kill pid: @escaping @Sendable () -> pid_t, seed: UInt64) throws -> [Ledger] {
        let ledgers = writers.map { _ in SharedLedger() }
        let done = DispatchSemaphore(value: 0)
        for (w, ledger) in zip(writers, ledgers) {
            Thread.detachNewThread {
                w(ledger)
                done.signal()
            }
        }
        var rng = SplitMix(state: seed)
        let deadline = Date().addingTimeInterval(30)
        while !ledgers.allSatisfy({ $0.withLock { $0.firstFlushSeen } }) && Date() < deadline { usleep(5000) }
        usleep(UInt32.random(in: 0...1_200_000, using: &rng))
        let target = pid()
        Foundation.kill(target, SIGKILL)
        #expect(waitGone(target, timeout: 30), "process \(target) still alive 30 s after SIGKILL")
        for _ in writers where done.wait(timeout: .now() + 60) == .timedOut {
            throw TestFailure("a writer is still blocked 60 s after the kill")
        }
        return ledgers.map { $0.withLock { $0 } }
    }
}

// No overall time limit (a long campaign runs as long as it must): every wait inside is bounded.
@Suite("SIGKILL campaigns", .serialized)
struct KillTests {
    @Test("vloop serve killed mid-stream keeps every flushed write, images check clean", .enabled(if: haveNBDTools))
    func serve() throws {
        var totals = KillCampaign.Totals()
        for round in 0..<KillCampaign.rounds {
            let (dir, names, formats) = try KillCampaign.images(round: round)
            let server = try ServeProcess.start(names, in: dir)
            let port = server.port
            let writers: [@Sendable (KillCampaign.SharedLedger) -> Void] = names.enumerated().map { (i, name) in
                { ledger in
                    var rng = SplitMix(state: UInt64(round * 2 + i) &+ 17)
                    guard let client = try? RawNBDClient(port: port, receiveTimeout: 20),
                          (try? client.handshake(export: name, structured: false)) != nil else { return }
                    var seq: UInt64 = 0, cookie: UInt64 = 0
                    var buffer = [UInt8](repeating: 0, count: 64 * KillCampaign.block)
                    while true {
                        seq += 1; cookie += 1
                        let (first, count) = KillCampaign.nextWrite(&rng)
                        buffer.withUnsafeMutableBytes { p in
                            for k in 0..<count {
                                KillCampaign.fill(UnsafeMutableRawBufferPointer(rebasing: p[(k * KillCampaign.block)..<((k + 1) * KillCampaign.block)]),
                                                  seq: seq, block: first + k)
                            }
                        }
                        ledger.withLock { $0.willWrite(first, count, seq: seq); $0.writes += 1 }
                        guard client.sendRequest(type: 1, cookie: cookie, offset: UInt64(first * KillCampaign.block),
                                                 length: UInt32(count * KillCampaign.block),
                                                 payload: Array(buffer[0..<(count * KillCampaign.block)])),
                              let r = try? client.simpleReply(), r.error == 0 else { return }
                        if Int.random(in: 0..<6, using: &rng) == 0 {
                            cookie += 1
                            guard client.sendRequest(type: 3, cookie: cookie, offset: 0, length: 0),
                                  let f = try? client.simpleReply(), f.error == 0 else { return }
                            ledger.withLock { $0.flushed(); $0.firstFlushSeen = true }
                        }
                    }
                }
            }
            let pid = server.process.processIdentifier
            let ledgers = try KillCampaign.race(writers: writers, kill: { pid }, seed: UInt64(round) &+ 1000)
            server.process.waitUntilExit()
            try totals.verify(round: round, names: names, formats: formats, ledgers: ledgers, in: dir, "serve")
        }
        print("kill campaign, serve: \(totals.rounds) rounds, \(totals.rounds * 2) images, \(totals.writes) writes, "
              + "\(totals.flushes) acknowledged flushes, \(totals.promised) flushed 4 KiB blocks verified")
    }
}

/// The attach campaign runs with the other attach tests, one at a time: they expect to
/// see no attachment but their own.
extension AttachTests {
    @Test("vloop attach killed mid-stream keeps every flushed write; detach --force cleans up")
    func killCampaign() throws {
        var totals = KillCampaign.Totals()
        for round in 0..<KillCampaign.rounds {
            let (dir, names, formats) = try KillCampaign.images(round: round)
            var devices: [String] = []
            defer { for d in devices { _ = try? sh([vloopBinary, "detach", "--force", d], check: false, timeout: 60) } }
            for name in names {
                devices.append(try sh([vloopBinary, "attach", name], cwd: dir.path, timeout: 60).out
                    .trimmingCharacters(in: .whitespacesAndNewlines))
            }
            // Both daemons die together: the kill takes whichever device's daemon, and the
            // other is killed right after.
            var found: [pid_t] = []
            for dev in devices {
                let pid = try attachDaemonPID(dev)
                found.append(try #require(pid_t(pid), "no daemon pid for \(dev)"))
            }
            let pids = found
            let writers: [@Sendable (KillCampaign.SharedLedger) -> Void] = devices.enumerated().map { (i, dev) in
                { ledger in
                    var rng = SplitMix(state: UInt64(round * 2 + i) &+ 5000)
                    let fd = open(dev, O_RDWR | vl_o_direct())
                    guard fd >= 0 else { return }
                    defer { close(fd) }
                    var raw: UnsafeMutableRawPointer?
                    guard posix_memalign(&raw, 4096, 64 * KillCampaign.block) == 0, let base = raw else { return }
                    defer { free(base) }
                    let buffer = UnsafeMutableRawBufferPointer(start: base, count: 64 * KillCampaign.block)
                    var seq: UInt64 = 0
                    while true {
                        seq += 1
                        let (first, count) = KillCampaign.nextWrite(&rng)
                        for k in 0..<count {
                            KillCampaign.fill(UnsafeMutableRawBufferPointer(rebasing: buffer[(k * KillCampaign.block)..<((k + 1) * KillCampaign.block)]),
                                              seq: seq, block: first + k)
                        }
                        ledger.withLock { $0.willWrite(first, count, seq: seq); $0.writes += 1 }
                        let n = count * KillCampaign.block
                        guard pwrite(fd, base, n, off_t(first * KillCampaign.block)) == n else { return }
                        if Int.random(in: 0..<6, using: &rng) == 0 {
                            guard fsync(fd) == 0 else { return }
                            ledger.withLock { $0.flushed(); $0.firstFlushSeen = true }
                        }
                    }
                }
            }
            let killed = Mutex<[pid_t]>([])
            let ledgers = try KillCampaign.race(writers: writers, kill: {
                // The first daemon is the one the random moment targets; the second follows.
                let order = round % 2 == 0 ? pids : pids.reversed()
                kill(order[1], SIGKILL)
                killed.withLock { $0 = order }
                return order[0]
            }, seed: UInt64(round) &+ 2000)
            for p in killed.withLock({ $0 }) { #expect(KillCampaign.waitGone(p, timeout: 30), "daemon \(p) survived SIGKILL") }
            // I/O on the orphaned device fails instead of hanging.
            for dev in devices {
                let r = try sh(["dd", "if=\(dev)", "of=/dev/null", "bs=4k", "count=1", "iflag=direct"], check: false, timeout: 60)
                #expect(r.status != 0, "round \(round): \(dev) still reads after its daemon was killed")
            }
            for dev in devices { try sh([vloopBinary, "detach", "--force", dev], timeout: 60) }
            devices = []
            #expect(!(try sh(["losetup", "-a"], timeout: 30).out.contains(dir.path)), "round \(round): loop devices left behind")
            try totals.verify(round: round, names: names, formats: formats, ledgers: ledgers, in: dir, "attach")
        }
        print("kill campaign, attach: \(totals.rounds) rounds, \(totals.rounds * 2) images, \(totals.writes) writes, "
              + "\(totals.flushes) acknowledged fsyncs, \(totals.promised) flushed 4 KiB blocks verified")
    }
}
