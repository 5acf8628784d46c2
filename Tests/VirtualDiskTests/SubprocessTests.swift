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
}
