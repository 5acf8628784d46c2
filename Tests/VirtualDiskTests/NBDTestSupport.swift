import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The vloop built beside this test binary: the build may use a scratch path other
/// than .build, and the server must be the one just built.
let nbdVloopBinary: String = {
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buf, buf.count - 1)
    if n > 0 {
        let exe = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        var dir = (exe as NSString).deletingLastPathComponent
        // swift-testing may run inside the .xctest bundle directory.
        if dir.hasSuffix(".xctest") || dir.hasSuffix("/Contents/MacOS") { dir = (dir as NSString).deletingLastPathComponent }
        let candidate = dir + "/vloop"
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
    }
    return vloopBinary
}()

let haveNBDTools = ["nbdinfo", "nbdcopy", "qemu-img", "qemu-io"].allSatisfy { tool in
    (try? sh(["sh", "-c", "command -v \(tool)"], check: false).status) == 0
}
let haveFio = (try? sh(["sh", "-c", "command -v fio && fio --enghelp 2>&1 | grep -qw nbd"], check: false).status) == 0

/// nbdkit (delay and log filters) and nbdfuse: a disk that is slow on purpose.
let haveSlowDiskTools = ["nbdkit", "nbdfuse", "fusermount3"].allSatisfy { tool in
    (try? sh(["sh", "-c", "command -v \(tool)"], check: false).status) == 0
}

/// A slow disk: an nbdkit plugin (with filters) seen as a file through nbdfuse, with
/// nbdkit's log filter recording when each request starts and ends. Torn down when
/// released.
final class SlowDisk {
    let path: String
    let log: String
    private let nbdkit: Process
    private let fuse: Process
    private let mount: String

    /// Every read takes 200 ms (nbdkit's delay filter in front of `plugin`).
    convenience init(in dir: TempDir, plugin: [String]) throws {
        try self.init(in: dir, nbdkit: ["--filter=delay"] + plugin + ["rdelay=200ms"], readOnly: true)
    }

    init(in dir: TempDir, nbdkit arguments: [String], readOnly: Bool) throws {
        mount = dir.file("slow-mnt")
        try FileManager.default.createDirectory(atPath: mount, withIntermediateDirectories: true)
        let socket = dir.file("slow.sock")
        log = dir.file("slow-requests.log")
        nbdkit = try launchLogged("/usr/bin/env", ["nbdkit", "-f", "-U", socket, "--filter=log"] + arguments + ["logfile=\(log)"],
                                  log: dir.file("nbdkit.out"))
        let server = nbdkit
        var waited = 0
        while !FileManager.default.fileExists(atPath: socket) && waited < 500 { usleep(20_000); waited += 1 }
        guard FileManager.default.fileExists(atPath: socket) else {
            Self.stop(server)
            throw TestFailure("nbdkit did not start: \((try? String(contentsOfFile: dir.file("nbdkit.out"), encoding: .utf8)) ?? "")")
        }
        do {
            fuse = try launchLogged("/usr/bin/env", ["nbdfuse"] + (readOnly ? ["-r"] : []) + [mount, "nbd+unix:///?socket=\(socket)"],
                                    log: dir.file("nbdfuse.out"))
        } catch {
            Self.stop(server)
            throw error
        }
        path = mount + "/nbd"
        waited = 0
        while !FileManager.default.fileExists(atPath: path) && waited < 500 { usleep(20_000); waited += 1 }
        guard FileManager.default.fileExists(atPath: path) else {
            Self.unmount(mount, fuse)
            Self.stop(server)
            throw TestFailure("nbdfuse did not mount: \((try? String(contentsOfFile: dir.file("nbdfuse.out"), encoding: .utf8)) ?? "")")
        }
    }

    /// Turn off the kernel's read-ahead on the mount, so every page a reader misses is
    /// one slow read of its own, as on a disk without a cache in front.
    func noReadAhead() throws {
        var st = stat()
        guard stat(mount, &st) == 0 else { throw TestFailure("stat \(mount): \(errno)") }
        let dev = UInt64(st.st_dev)
        let bdi = "/sys/class/bdi/\((dev >> 8) & 0xfff):\((dev & 0xff) | ((dev >> 12) & 0xfff00))/read_ahead_kb"
        try "0".write(toFile: bdi, atomically: false, encoding: .utf8)
    }

    deinit {
        Self.unmount(mount, fuse)
        Self.stop(nbdkit)
    }

    /// Lazy unmount (a file still open on it does not keep it), then up to 10 s for
    /// nbdfuse to go before it is killed.
    private static func unmount(_ mount: String, _ fuse: Process) {
        _ = try? sh(["fusermount3", "-u", "-z", mount], check: false)
        var waited = 0
        while fuse.isRunning && waited < 500 { usleep(20_000); waited += 1 }
        if fuse.isRunning { kill(fuse.processIdentifier, SIGKILL) }
        fuse.waitUntilExit()
    }

    /// nbdkit runs with the signal mask it inherited, so SIGTERM may not reach it.
    private static func stop(_ nbdkit: Process) {
        kill(nbdkit.processIdentifier, SIGKILL)
        nbdkit.waitUntilExit()
    }

    struct Read { let offset: UInt64; let count: UInt64; let start: Int; let end: Int }

    /// Every read the disk served, with the log line numbers it started and ended at.
    func reads() throws -> [Read] {
        var open: [String: (UInt64, UInt64, Int)] = [:]
        var out: [Read] = []
        func field(_ line: Substring, _ name: String) -> String? {
            line.split(separator: " ").first { $0.hasPrefix(name + "=") }.map { String($0.dropFirst(name.count + 1)) }
        }
        for (n, line) in try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n").enumerated() {
            guard let conn = field(line, "connection"), let id = field(line, "id") else { continue }
            if line.contains("...Read id=") {
                if let (o, c, s) = open.removeValue(forKey: conn + "/" + id) { out.append(Read(offset: o, count: c, start: s, end: n)) }
            } else if line.contains(" Read id="), let o = field(line, "offset"), let c = field(line, "count"),
                      let offset = UInt64(o.dropFirst(2), radix: 16), let count = UInt64(c.dropFirst(2), radix: 16) {
                open[conn + "/" + id] = (offset, count, n)
            }
        }
        return out
    }

    /// The most of `reads` that were under way at one time.
    static func mostAtOnce(_ reads: [Read]) -> Int {
        let events = reads.flatMap { [($0.start, 1), ($0.end, -1)] }.sorted { $0.0 < $1.0 }
        var now = 0, most = 0
        for (_, d) in events { now += d; most = max(most, now) }
        return most
    }
}

/// A TCP port that was free a moment ago (the kernel's pick for port 0).
func freeTCPPort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw TestFailure("socket: \(errno)") }
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = 0
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    let ok = withUnsafeMutablePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0 }
    }
    guard ok else { throw TestFailure("bind: \(errno)") }
    return Int(UInt16(bigEndian: addr.sin_port))
}

/// Start a long-running program with its output going to `log` (not to a pipe, which
/// would hold up whoever reads it to the end), input from /dev/null.
func launchLogged(_ executable: String, _ args: [String], log: String, cwd: String? = nil) throws -> Process {
    _ = FileManager.default.createFile(atPath: log, contents: nil)
    let p = Process()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = args
    if let cwd { p.currentDirectoryURL = URL(fileURLWithPath: cwd) }
    p.standardInput = FileHandle.nullDevice
    p.standardOutput = FileHandle(forWritingAtPath: log)
    p.standardError = FileHandle(forWritingAtPath: log)
    try p.run()
    return p
}

/// `vloop serve` running as a child process, stopped by SIGTERM.
final class ServeProcess: @unchecked Sendable {
    // Safe: used from one test at a time; Process is only touched by that test.
    let process: Process
    let port: Int
    let socketPath: String?
    let logPath: String

    private init(process: Process, port: Int, socketPath: String?, logPath: String) {
        self.process = process
        self.port = port
        self.socketPath = socketPath
        self.logPath = logPath
    }

    /// Start `vloop serve ARGS` in `dir` on a fresh port (or the Unix socket given in
    /// ARGS with -k) and wait until it listens (its pid file appears).
    static func start(_ args: [String], in dir: TempDir, unixSocket: String? = nil) throws -> ServeProcess {
        var lastLog = ""
        for attempt in 0..<4 {
            let port = unixSocket == nil ? try freeTCPPort() : 0
            let pidFile = dir.file("serve-\(port)-\(attempt).pid")
            let logPath = dir.file("serve-\(port)-\(attempt).log")
            var full = ["serve", "--pid-file", pidFile]
            if let unixSocket { full += ["-k", unixSocket] } else { full += ["-p", String(port)] }
            let p = try launchLogged(nbdVloopBinary, full + args, log: logPath, cwd: dir.path)
            let deadline = Date().addingTimeInterval(30)
            while Date() < deadline {
                if FileManager.default.fileExists(atPath: pidFile) {
                    return ServeProcess(process: p, port: port, socketPath: unixSocket, logPath: logPath)
                }
                if !p.isRunning { break }
                usleep(20_000)
            }
            if p.isRunning { p.terminate() }
            p.waitUntilExit()
            lastLog = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
            // Another process took the port between our probe and the server's bind.
            if !lastLog.contains("cannot listen") { break }
        }
        throw TestFailure("vloop serve did not start: \(lastLog)")
    }

    func uri(_ export: String = "") -> String {
        if let socketPath { return "nbd+unix:///\(export)?socket=\(socketPath)" }
        return "nbd://127.0.0.1:\(port)/\(export)"
    }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }
    var isRunning: Bool { process.isRunning }

    /// SIGTERM, then wait for a clean exit; returns the exit status.
    @discardableResult
    func stop(timeout: TimeInterval = 30) throws -> Int32 {
        if process.isRunning { kill(process.processIdentifier, SIGTERM) }
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { usleep(20_000) }
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            throw TestFailure("vloop serve did not stop within \(timeout) s of SIGTERM: \(log)")
        }
        process.waitUntilExit()
        return process.terminationStatus
    }

    deinit {
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }
}

/// A plain blocking socket speaking raw NBD bytes: for clients that misbehave on purpose.
final class RawNBDClient {
    let fd: Int32

    init(port: Int, receiveTimeout: Int = 10) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw TestFailure("socket: \(errno)") }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = UInt16(port).bigEndian
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else { close(fd); throw TestFailure("connect to port \(port): errno \(errno)") }
        var tv = timeval(tv_sec: receiveTimeout, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { close(fd) }

    /// Send everything; false if the peer has gone (never SIGPIPE).
    @discardableResult
    func send(_ bytes: [UInt8]) -> Bool {
        var sent = 0
        while sent < bytes.count {
            let n = bytes[sent...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return false }
            sent += n
        }
        return true
    }

    func receive(_ count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            // Into the whole array at an offset: a slice here would be copied on every call.
            let n = out.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + got, count - got, 0) }
            if n == 0 { throw TestFailure("server closed the connection after \(got) of \(count) bytes") }
            if n < 0 { throw TestFailure("receive failed: errno \(errno) after \(got) of \(count) bytes") }
            got += n
        }
        return out
    }

    /// Whether the server closes the connection within the receive timeout (reading
    /// and dropping anything it still sends).
    func closedByServer() -> Bool {
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n == 0 { return true }
            if n < 0 { return errno == ECONNRESET }
        }
    }

    // MARK: protocol helpers

    /// Read the greeting and answer with FIXED_NEWSTYLE | NO_ZEROES.
    func greet() throws {
        let g = try receive(18)
        #expect(nbdBE64(g, 0) == 0x4e42_444d_4147_4943 && nbdBE64(g, 8) == 0x4948_4156_454f_5054, "not an NBD greeting")
        send(nbd32(3))
    }

    func sendOption(_ code: UInt32, _ data: [UInt8]) {
        send(nbd64(0x4948_4156_454f_5054) + nbd32(code) + nbd32(UInt32(data.count)) + data)
    }

    /// One option reply: (option, type, data).
    func optionReply() throws -> (option: UInt32, type: UInt32, data: [UInt8]) {
        let h = try receive(20)
        #expect(nbdBE64(h, 0) == 0x0003_e889_0455_65a9, "bad option reply magic")
        let length = Int(nbdBE32(h, 16))
        return (nbdBE32(h, 8), nbdBE32(h, 12), length > 0 ? try receive(length) : [])
    }

    /// Negotiate (optionally structured replies and base:allocation) and enter
    /// transmission with NBD_OPT_GO. Returns the export size and flags.
    @discardableResult
    func handshake(export: String, structured: Bool = true) throws -> (size: UInt64, flags: UInt16) {
        try greet()
        if structured {
            sendOption(8, [])
            #expect(try optionReply().type == 1)
        }
        let name = Array(export.utf8)
        sendOption(7, nbd32(UInt32(name.count)) + name + nbd16(0))
        var size: UInt64 = 0, flags: UInt16 = 0
        while true {
            let r = try optionReply()
            if r.type == 3, nbdBE16(r.data, 0) == 0 {
                size = nbdBE64(r.data, 2)
                flags = nbdBE16(r.data, 10)
            } else if r.type == 1 {
                return (size, flags)
            } else if r.type & 0x8000_0000 != 0 {
                throw TestFailure("NBD_OPT_GO failed: reply type 0x\(String(r.type, radix: 16)) \(String(decoding: r.data, as: UTF8.self))")
            }
        }
    }

    @discardableResult
    func sendRequest(type: UInt16, flags: UInt16 = 0, cookie: UInt64, offset: UInt64, length: UInt32, payload: [UInt8] = []) -> Bool {
        send(nbd32(0x2560_9513) + nbd16(flags) + nbd16(type) + nbd64(cookie) + nbd64(offset) + nbd32(length) + payload)
    }

    /// A simple reply's (error, cookie).
    func simpleReply() throws -> (error: UInt32, cookie: UInt64) {
        let h = try receive(16)
        #expect(nbdBE32(h, 0) == 0x6744_6698, "expected a simple reply")
        return (nbdBE32(h, 4), nbdBE64(h, 8))
    }

    /// One structured chunk: (flags, type, cookie, payload).
    func chunk() throws -> (flags: UInt16, type: UInt16, cookie: UInt64, payload: [UInt8]) {
        let h = try receive(20)
        #expect(nbdBE32(h, 0) == 0x668e_33ef, "expected a structured reply chunk")
        let length = Int(nbdBE32(h, 16))
        return (nbdBE16(h, 4), nbdBE16(h, 6), nbdBE64(h, 8), length > 0 ? try receive(length) : [])
    }
}

func nbd16(_ v: UInt16) -> [UInt8] { withUnsafeBytes(of: v.bigEndian, Array.init) }
func nbd32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.bigEndian, Array.init) }
func nbd64(_ v: UInt64) -> [UInt8] { withUnsafeBytes(of: v.bigEndian, Array.init) }
func nbdBE16(_ b: [UInt8], _ at: Int) -> UInt16 { b[at..<at + 2].reduce(0) { $0 << 8 | UInt16($1) } }
func nbdBE32(_ b: [UInt8], _ at: Int) -> UInt32 { b[at..<at + 4].reduce(0) { $0 << 8 | UInt32($1) } }
func nbdBE64(_ b: [UInt8], _ at: Int) -> UInt64 { b[at..<at + 8].reduce(0) { $0 << 8 | UInt64($1) } }

/// A JSON value from a tool's output.
func parseJSON(_ text: String) throws -> Any {
    try JSONSerialization.jsonObject(with: Data(text.utf8))
}
