import CVloop
import VirtualDisk
#if canImport(Glibc)
import Glibc
#endif

/// Host programs (losetup, mount, blkid, fusermount3, vloop's own attach daemon) run as
/// child processes through posix_spawn, looked up in PATH, with stdin from /dev/null
/// and no descriptor but stdin, stdout and stderr.
public enum Subprocess {
    public struct Output: Sendable {
        /// The exit code, or 128 + the signal that ended it.
        public var status: Int32
        public var out: String
        public var err: String
    }

    /// What `run` keeps of each stream: host tools answer in lines, and a child that
    /// writes without end must not take this process's memory with it.
    public static let outputLimit = 1 << 20

    /// Run `args` to the end, collecting what it writes to stdout and stderr (both read
    /// as they come, so neither pipe filling up can stall it; past `outputLimit` bytes
    /// a stream is read and dropped).
    public static func run(_ args: [String]) throws -> Output {
        let out = try Pipe()
        let err: Pipe
        do { err = try Pipe() } catch { out.closeBoth(); throw error }
        let pid: pid_t
        do {
            pid = try spawn(args, stdout: out.write, stderr: err.write)
        } catch {
            out.closeBoth(); err.closeBoth()
            throw error
        }
        close(out.write); close(err.write)
        var collected = [[UInt8](), [UInt8]()]
        var fds = [pollfd(fd: out.read, events: Int16(POLLIN), revents: 0), pollfd(fd: err.read, events: Int16(POLLIN), revents: 0)]
        var buffer = [UInt8](repeating: 0, count: 65536)
        while fds.contains(where: { $0.fd >= 0 }) {
            if poll(&fds, nfds_t(fds.count), -1) < 0 {
                if errno == EINTR { continue }
                break
            }
            for i in fds.indices where fds[i].fd >= 0 && fds[i].revents != 0 {
                let n = buffer.withUnsafeMutableBytes { read(fds[i].fd, $0.baseAddress, $0.count) }
                if n > 0 {
                    collected[i] += buffer[0..<min(n, max(0, outputLimit - collected[i].count))]
                } else if n == 0 || errno != EINTR {
                    close(fds[i].fd)
                    fds[i].fd = -1
                }
            }
        }
        for f in fds where f.fd >= 0 { close(f.fd) }
        return Output(status: wait(pid), out: String(decoding: collected[0], as: UTF8.self),
                      err: String(decoding: collected[1], as: UTF8.self))
    }

    /// Start `args` with stdout and stderr on the given descriptors (which the caller
    /// still owns); returns the child's pid, to `wait` for.
    public static func spawn(_ args: [String], stdout: Int32, stderr: Int32) throws -> pid_t {
        guard let name = args.first else { throw ImageError(.invalidArgument, "no program to run") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, stdout, 1)
        posix_spawn_file_actions_adddup2(&actions, stderr, 2)
        // Nothing else is inherited: a descriptor this process got from its own parent
        // (say, the socket a supervisor watches for its end) must not stay open in a
        // daemon that outlives it.
        vl_spawn_close_from(&actions, 3)
        // The child starts with no signal blocked and every signal at its default: a
        // caller may have blocked some (the attach daemon waits for its signals with
        // sigwait) or ignored some (SIGPIPE), and both would otherwise carry over.
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t(), all = sigset_t()
        sigemptyset(&none)
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attributes, &none)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        let argv: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        var pid: pid_t = 0
        let rc = posix_spawnp(&pid, name, &actions, &attributes, argv, environ)
        guard rc == 0 else { throw ImageError(.io, "cannot run \(name): \(String(cString: strerror(rc)))") }
        return pid
    }

    /// Wait for a child to end: its exit code, or 128 + the signal that ended it.
    public static func wait(_ pid: pid_t) -> Int32 {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            if errno != EINTR { return -1 }
        }
        let signal = status & 0x7f
        return signal == 0 ? (status >> 8) & 0xff : 128 + signal
    }

    /// A pipe whose ends are closed on exec (the child gets its own copies by dup2).
    public struct Pipe {
        public let read: Int32
        public let write: Int32
        public init() throws {
            var fds: [Int32] = [0, 0]
            guard vl_pipe_cloexec(&fds) == 0 else { throw ImageError(.io, "cannot make a pipe: \(String(cString: strerror(errno)))") }
            read = fds[0]
            write = fds[1]
        }
        func closeBoth() { close(read); close(write) }
    }
}
