import ArgumentParser
import Exports
import FoundationEssentials
import VirtualDisk
#if canImport(Glibc)
import Glibc
#endif

struct Attach: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Attach an image as a block device (/dev/loopN), read-write unless --read-only.")
    @Option(name: .short, help: "Image format (probed when omitted).") var f: String?
    @Flag(name: [.short, .customLong("read-only")], help: "Attach read-only.") var readOnly = false
    @Flag(name: .customLong("partscan"), help: "Scan the partition table: partitions appear as /dev/loopNpM.") var partscan = false
    @Flag(name: .customLong("foreground"), help: "Stay in the foreground until interrupted.") var foreground = false
    @Flag(name: .customLong("notify-stdout"), help: .hidden) var notifyStdout = false
    @OptionGroup var common: CommonOptions
    @Argument var image: String

    func run() throws {
        try Vloop.guarded {
            try common.apply()
            try AttachPreflight.check()
            var options = AttachOptions()
            options.format = try parseFormat(f)
            options.readOnly = readOnly
            options.partscan = partscan
            if foreground {
                if notifyStdout { setsid() }
                var failure: ImageError?
                let code = AttachDaemon.serve(imagePath: image, options: options) { result in
                    switch result {
                    case .success(let r):
                        if notifyStdout {
                            print("OK \(r.device)")
                            fflush(nil)
                            // The parent has what it needs; the daemon keeps no terminal.
                            let null = open("/dev/null", O_RDWR)
                            dup2(null, 0); dup2(null, 1)
                            close(null)
                        } else {
                            print(r.device)
                            fflush(nil)
                        }
                    case .failure(let e):
                        failure = e
                        if notifyStdout { print("ERR \(e.description)"); fflush(nil) }
                    }
                }
                if let failure, !notifyStdout { throw failure }
                if code != 0 { throw ExitCode(code) }
                return
            }
            let device = try spawnDaemon()
            print(device)
        }
    }

    /// Start `vloop attach --foreground` in its own session and wait until it reports.
    func spawnDaemon() throws -> String {
        var args = [selfExecutable(), "attach", "--foreground", "--notify-stdout"]
        if let f { args += ["-f", f] }
        if readOnly { args.append("--read-only") }
        if partscan { args.append("--partscan") }
        if let c = common.cacheSize { args += ["--cache-size", c] }
        args.append(image)
        let logPath = "/run/vloop-attach-\(getpid()).log"
        let log = open(logPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard log >= 0 else { throw ImageError(.io, "cannot create \(logPath): \(String(cString: strerror(errno)))") }
        defer { unlink(logPath) }
        let out: Subprocess.Pipe
        do { out = try Subprocess.Pipe() } catch { close(log); throw error }
        let pid: pid_t
        do {
            pid = try Subprocess.spawn(args, stdout: out.write, stderr: log)
        } catch {
            close(out.read); close(out.write); close(log)
            throw error
        }
        close(out.write); close(log)
        // The daemon writes one line once the device is ready ("OK /dev/loopN") or it
        // gave up ("ERR why"); end of file means it exited without a word. A line is
        // short: 64 KiB of one is taken as all of it.
        var line: [UInt8] = []
        var byte: UInt8 = 0
        while line.count < 65536 {
            let n = read(out.read, &byte, 1)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 || byte == 10 { break }
            line.append(byte)
        }
        close(out.read)
        let text = String(decoding: line, as: UTF8.self)
        if text.hasPrefix("OK ") { return String(text.dropFirst(3)) }
        _ = Subprocess.wait(pid)
        let logText = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
        if text.hasPrefix("ERR ") { throw ImageError(.io, String(text.dropFirst(4)).replacing("vloop: ", with: "")) }
        throw ImageError(.io, "the attach daemon exited before the device was ready: \(logText.trimmingWhitespace())", path: image)
    }
}

func selfExecutable() -> String {
    var buf = [UInt8](repeating: 0, count: 4096)
    let n = buf.withUnsafeMutableBytes { readlink("/proc/self/exe", $0.baseAddress!.assumingMemoryBound(to: CChar.self), $0.count - 1) }
    return n > 0 ? String(decoding: buf[0..<n], as: UTF8.self) : CommandLine.arguments[0]
}

/// Stop an attach daemon and wait until it has cleaned up.
func detachRecord(_ r: AttachRecord, force: Bool) throws {
    if let m = r.mountedAt {
        throw ImageError(.invalidArgument, "\(r.device) has a file system mounted at \(m); run 'vloop umount \(m)' first")
    }
    if r.daemonAlive {
        if LoopDevice.isBusy(r.device) && !force {
            throw ImageError(.invalidArgument, "\(r.device) is in use (mounted or open); unmount or close it first, or use --force")
        }
        kill(r.pid, SIGTERM)
        for _ in 0..<1200 {
            if !r.daemonAlive { break }
            usleep(50_000)
        }
        if r.daemonAlive {
            if !force { throw ImageError(.io, "the daemon (pid \(r.pid)) for \(r.device) did not stop; retry with --force") }
            kill(r.pid, SIGKILL)
            usleep(200_000)
        }
    }
    if !r.daemonAlive {
        // The daemon is gone (killed, crashed, or done): clear whatever it left.
        if LoopDevice.backingFile(r.device)?.hasPrefix(r.fuseMount) == true {
            try? LoopDevice.detach(r.device)
        }
        if FileManager.default.fileExists(atPath: r.fuseMount) {
            _ = try? Subprocess.run(["fusermount3", "-u", "-z", r.fuseMount])
        }
        AttachRegistry.remove(r.id)
    }
}

struct Detach: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Detach devices made by vloop attach: flush, unbind, unmount, close cleanly.")
    @Flag(name: .customLong("all"), help: "Detach every vloop device.") var all = false
    @Flag(name: .customLong("force"), help: "Also when the device is busy or the daemon is gone.") var force = false
    @Argument(help: "A /dev/loopN device or an image path.") var target: String?

    func run() throws {
        try Vloop.guarded {
            let records: [AttachRecord]
            if all {
                records = AttachRegistry.all()
            } else {
                guard let target else { throw ImageError(.invalidArgument, "name a device or image, or use --all") }
                records = AttachRegistry.find(target)
                if records.isEmpty { throw ImageError(.notFound, "not attached by vloop (see 'vloop list')", path: target) }
            }
            for r in records { try detachRecord(r, force: force) }
        }
    }
}

struct List: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List images attached by vloop.")
    @Option(name: .customLong("output"), help: "human or json.") var output: OutputFormat = .human

    func run() throws {
        let records = AttachRegistry.all()
        if output == .json {
            let items: [JSONValue] = records.map { r in
                var pairs: [(String, JSONValue)] = [("device", .string(r.device)), ("image", .string(r.image)), ("format", .string(r.format)),
                                                    ("read-only", .bool(r.readOnly)), ("pid", .int(Int64(r.pid))), ("alive", .bool(r.daemonAlive))]
                if let m = r.mountedAt { pairs.append(("mounted-at", .string(m))) }
                return .object(pairs)
            }
            print(JSONValue.array(items).rendered())
            return
        }
        func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s + " " : s + String(repeating: " ", count: n - s.count) }
        print(pad("DEVICE", 14) + pad("FORMAT", 7) + pad("RO", 4) + pad("PID", 8) + "IMAGE")
        for r in records {
            var line = pad(r.device, 14) + pad(r.format, 7) + pad(r.readOnly ? "yes" : "no", 4) + pad(r.daemonAlive ? String(r.pid) : "dead", 8) + r.image
            if let m = r.mountedAt { line += " (mounted at \(m))" }
            print(line)
        }
    }
}

struct MountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "mount", abstract: "Attach an image and mount its file system (the first partition that has one, by default).")
    @Option(name: .short, help: "Image format.") var f: String?
    @Flag(name: [.short, .customLong("read-only")], help: "Attach and mount read-only.") var readOnly = false
    @Option(name: .customLong("partition"), help: "Partition number to mount (0: the whole device).") var partition: Int?
    @OptionGroup var common: CommonOptions
    @Argument var image: String
    @Argument var directory: String

    func run() throws {
        try Vloop.guarded {
            try AttachPreflight.check()
            var attach = try Attach.parse([image, "--partscan"] + (readOnly ? ["--read-only"] : []) + (f.map { ["-f", $0] } ?? []))
            attach.foreground = false
            let device = try attach.spawnDaemon()
            guard let record = AttachRegistry.find(device).first else { throw ImageError(.io, "attached \(device) but cannot find its record") }
            do {
                let part = try chooseDevice(device)
                var args = ["mount"]
                if readOnly { args += ["-o", "ro"] }
                let r = try Subprocess.run(args + [part, directory])
                if r.status != 0 { throw ImageError(.io, "mount \(part) on \(directory) failed: \(r.err.trimmingWhitespace())") }
                var updated = record
                updated.mountedAt = AttachRegistry.realPath(directory) ?? directory
                updated.mountedDevice = part
                try AttachRegistry.save(updated)
                print("\(part) mounted at \(directory)")
            } catch {
                try? detachRecord(record, force: true)
                throw error
            }
        }
    }

    /// The partition (or whole device) to mount.
    func chooseDevice(_ device: String) throws -> String {
        // Partitions show up as /dev/loopNpM once the kernel has scanned the table.
        _ = try? Subprocess.run(["udevadm", "settle", "--timeout=5"])
        LoopDevice.addPartitions(device)
        let parts = LoopDevice.partitions(device)
        if let n = partition {
            if n == 0 { return device }
            guard parts.contains(n) else { throw ImageError(.notFound, "partition \(n) does not exist on the image (has: \(parts.map(String.init).joined(separator: ", ")))") }
            return "\(device)p\(n)"
        }
        for n in parts {
            let p = "\(device)p\(n)"
            if let t = try? Subprocess.run(["blkid", "-o", "value", "-s", "TYPE", p]), t.status == 0, !t.out.isEmpty { return p }
        }
        if let t = try? Subprocess.run(["blkid", "-o", "value", "-s", "TYPE", device]), t.status == 0, !t.out.isEmpty { return device }
        throw ImageError(.notFound, "no file system found on the image or its partitions; use --partition N to choose", path: image)
    }
}

struct Umount: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Unmount a directory mounted by vloop mount and detach its image.")
    @Argument var directory: String

    func run() throws {
        try Vloop.guarded {
            let real = AttachRegistry.realPath(directory) ?? directory
            guard var record = AttachRegistry.all().first(where: { $0.mountedAt == real }) else {
                throw ImageError(.notFound, "not mounted by vloop mount (see 'vloop list')", path: directory)
            }
            let r = try Subprocess.run(["umount", real])
            if r.status != 0 { throw ImageError(.io, "umount failed: \(r.err.trimmingWhitespace())", path: directory) }
            record.mountedAt = nil
            record.mountedDevice = nil
            try detachRecord(record, force: false)
        }
    }
}

