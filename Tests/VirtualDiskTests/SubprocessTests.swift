import Exports
import Glibc
import Testing

/// Host programs run through posix_spawn (attach and mount run losetup, blkid, mount and
/// vloop's own daemon this way).
@Suite struct SubprocessTests {
    @Test("exit code, stdout and stderr come back; a full stderr pipe does not stall the child")
    func output() throws {
        let r = try Subprocess.run(["sh", "-c", "echo out; head -c 300000 /dev/zero | tr '\\000' e >&2; exit 3"])
        #expect(r.status == 3)
        #expect(r.out == "out\n")
        #expect(r.err.count == 300000 && r.err.allSatisfy { $0 == "e" })
        let killed = try Subprocess.run(["sh", "-c", "kill -9 $$"])
        #expect(killed.status == 128 + 9)
        #expect(throws: (any Error).self) { try Subprocess.run(["vloop-no-such-program"]) }
    }

    @Test("a child writing 50 MB is read to its exit; only the first outputLimit bytes are kept")
    func boundedOutput() throws {
        let r = try Subprocess.run(["sh", "-c", "head -c 50000000 /dev/zero | tr '\\000' o; echo done >&2"])
        #expect(r.status == 0)
        #expect(r.out.utf8.count == Subprocess.outputLimit && r.out.allSatisfy { $0 == "o" })
        #expect(r.err == "done\n")
    }

    @Test("the child inherits no descriptor but stdin, stdout and stderr")
    func noInheritedDescriptors() throws {
        // A descriptor without close-on-exec, as one handed down by a parent would be.
        let fd = open("/dev/null", O_RDONLY)
        #expect(fd > 2)
        defer { close(fd) }
        let r = try Subprocess.run(["sh", "-c", "ls /proc/$$/fd"])
        let fds = r.out.split(separator: "\n").compactMap { Int32($0) }.sorted()
        #expect(fds == [0, 1, 2], "the child had descriptors \(fds) open")
    }

    @Test("the child starts with no signal blocked and none ignored, whatever the caller set")
    func cleanSignals() throws {
        // As the attach daemon does: signals blocked for sigwait (this thread only), one
        // ignored (SIGUSR2: process-wide, so one no other test touches).
        var block = sigset_t(), old = sigset_t()
        sigemptyset(&block)
        sigaddset(&block, SIGUSR1)
        sigaddset(&block, SIGTERM)
        pthread_sigmask(SIG_BLOCK, &block, &old)
        let oldDisposition = signal(SIGUSR2, SIG_IGN)
        defer {
            signal(SIGUSR2, oldDisposition)
            pthread_sigmask(SIG_SETMASK, &old, nil)
        }
        // grep reads its own status (a shell would show its own mask, which it changes
        // for a moment around each fork).
        let r = try Subprocess.run(["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"])
        var fields: [String: UInt64] = [:]
        for line in r.out.split(separator: "\n") {
            let parts = line.split(separator: "\t")
            if parts.count == 2 { fields[String(parts[0].dropLast())] = UInt64(parts[1], radix: 16) }
        }
        #expect(fields["SigBlk"] == 0, "blocked in the child: \(r.out)")
        #expect(fields["SigIgn"].map { $0 & (1 << (UInt64(SIGUSR2) - 1)) == 0 } == true, "SIGUSR2 ignored in the child: \(r.out)")
    }
}
