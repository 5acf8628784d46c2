import Foundation
import Testing
@testable import VirtualDisk

/// Run a program, returning its exit status and output. A program still running after
/// `timeout` seconds is killed and the call throws: no test waits forever on a child.
@discardableResult
func sh(_ args: [String], cwd: String? = nil, check: Bool = true, timeout: TimeInterval = 600) throws -> (status: Int32, out: String, err: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = args
    if let cwd { p.currentDirectoryURL = URL(fileURLWithPath: cwd) }
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    let exited = DispatchSemaphore(value: 0)
    p.terminationHandler = { _ in exited.signal() }
    try p.run()
    // Drain both pipes while waiting, so a chatty child cannot block on a full pipe.
    let output = PipeDrain(out.fileHandleForReading), errors = PipeDrain(err.fileHandleForReading)
    if exited.wait(timeout: .now() + timeout) == .timedOut {
        kill(p.processIdentifier, SIGKILL)
        _ = exited.wait(timeout: .now() + 10)
        throw TestFailure("\(args.joined(separator: " ")) still running after \(timeout) s; killed")
    }
    let r = (p.terminationStatus, String(decoding: output.wait(), as: UTF8.self), String(decoding: errors.wait(), as: UTF8.self))
    if check && r.0 != 0 {
        throw TestFailure("\(args.joined(separator: " ")) exited \(r.0): \(r.2)\(r.1)")
    }
    return r
}

/// Reads a pipe to its end on a thread of its own.
final class PipeDrain: @unchecked Sendable {
    // Safe: `data` is written by the reading thread before `done` is signalled and read
    // by the waiter only after it.
    private var data = Data()
    private let done = DispatchSemaphore(value: 0)

    init(_ handle: FileHandle) {
        Thread.detachNewThread { [self] in
            data = handle.readDataToEndOfFile()
            done.signal()
        }
    }

    /// The bytes read; waits at most 30 s for the pipe to close (a daemon the child
    /// started may hold it open), else returns nothing.
    func wait() -> Data {
        done.wait(timeout: .now() + 30) == .success ? data : Data()
    }
}

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// A fresh temporary directory, removed when the value is released.
final class TempDir: @unchecked Sendable {
    // Safe: immutable after init.
    let path: String
    init() {
        path = NSTemporaryDirectory() + "vloop-test-" + UUID().uuidString
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
    func file(_ name: String) -> String { path + "/" + name }
}

func readFile(_ path: String) throws -> [UInt8] {
    [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
}

func openRW(_ path: String, format: ImageFormat? = nil) throws -> DiskImage {
    var o = OpenOptions(format: format, writable: true)
    o.userNamed = [path]
    return try ImageOpener.open(path, options: o)
}

func openRO(_ path: String, format: ImageFormat? = nil) throws -> DiskImage {
    var o = OpenOptions(format: format, writable: false)
    o.userNamed = [path]
    return try ImageOpener.open(path, options: o)
}

/// Read the whole guest view.
func readAll(_ image: DiskImage) throws -> [UInt8] {
    try image.read(at: 0, count: Int(image.info.virtualSize))
}

/// Deterministic pseudo-random numbers (SplitMix64), so failures reproduce.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}

/// `n` bytes from a seeded generator.
func randomBytes(_ n: Int, _ rng: inout SplitMix) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: n)
    var i = 0
    while i < n {
        var v = rng.next()
        for _ in 0..<8 where i < n { out[i] = UInt8(truncatingIfNeeded: v); v >>= 8; i += 1 }
    }
    return out
}

/// Random writes (unaligned, crossing blocks, some of zeroes) applied to the image and
/// the model alike.
func randomWrites(_ img: DiskImage, _ model: inout [UInt8], count: Int, maxLength: Int, _ rng: inout SplitMix) throws {
    for step in 0..<count {
        let len = Int.random(in: 1...maxLength, using: &rng)
        var off = Int.random(in: 0...(model.count - len), using: &rng)
        if step % 4 == 0 { off = off / 512 * 512 }
        let data = step % 5 == 4 ? [UInt8](repeating: 0, count: len) : randomBytes(len, &rng)
        try img.write(data, at: UInt64(off))
        model.replaceSubrange(off..<(off + len), with: data)
    }
}

/// vloop's check of one image file on its own (no backing file), repairing as asked.
func checkImage(_ path: String, format: ImageFormat, repair: CheckRepair = .none) throws -> CheckReport {
    var o = OpenOptions(format: format, writable: repair != .none)
    o.noBacking = true
    o.userNamed = [path]
    let img = try ImageOpener.open(path, options: o)
    defer { try? img.close() }
    guard let layer = (img as? LayeredImage)?.layer as? CheckableLayer else {
        throw ImageError(.unsupported, "no check for \(format)", path: path)
    }
    return try layer.check(repair: repair)
}

/// `qemu-img compare` of an image (in qemu's format name) against the expected bytes.
func qemuCompare(_ path: String, format: String, model: [UInt8], _ dir: TempDir) throws {
    let raw = dir.file("model-\(UUID().uuidString).raw")
    try Data(model).write(to: URL(fileURLWithPath: raw))
    defer { try? FileManager.default.removeItem(atPath: raw) }
    try sh(["qemu-img", "compare", "-U", "-f", format, "-F", "raw", path, raw])
}

let sharedDir: String = {
    // Tests run from the package root; shared/ sits beside the checkout.
    let cwd = FileManager.default.currentDirectoryPath
    for candidate in [cwd + "/../shared", "/work/shared"] where FileManager.default.fileExists(atPath: candidate + "/corpus/MANIFEST.tsv") {
        return candidate
    }
    return cwd + "/../shared"
}()

let vloopBinary: String = {
    let cwd = FileManager.default.currentDirectoryPath
    return cwd + "/.build/debug/vloop"
}()

/// The pid of the daemon serving an attached device, from its entry in /run/vloop ("" when none).
func attachDaemonPID(_ dev: String) throws -> String {
    let escaped = dev.replacingOccurrences(of: "/", with: "\\\\/")
    return try sh(["sh", "-c", "grep -l '\"\(escaped)\"' /run/vloop/*/info.json | xargs grep '\"pid\"' | tr -dc 0-9"], timeout: 30).out
}

extension Trait where Self == TimeLimitTrait {
    /// A backstop against a hung test, not a speed check. Swift Testing starts a test's
    /// clock when the test is scheduled, not when its synchronous body gets one of the
    /// cooperative threads (two on this machine kind): a test queued behind long attach
    /// and conformance tests has waited over seven minutes before running for seconds.
    /// Every child process and every wait in the tests has its own, shorter bound.
    static var hangBackstop: Self { .timeLimit(.minutes(30)) }
}
