import CVloop
#if canImport(Glibc)
import Glibc
#endif

/// An open file in the host file system: positional I/O that retries short transfers
/// and turns errno into ImageError naming the file.
public final class HostFile: Sendable {
    public let path: String
    public let fd: Int32
    public let writable: Bool
    /// The file lives in memory (tmpfs, ramfs): reading it never waits for a device.
    private let inMemory: Bool

    public init(path: String, writable: Bool, create: Bool = false, truncate: Bool = false) throws {
        var flags: Int32 = writable ? O_RDWR : O_RDONLY
        flags |= O_CLOEXEC
        if create { flags |= O_CREAT }
        if truncate { flags |= O_TRUNC }
        let fd = open(path, flags, 0o644)
        if fd < 0 {
            let e = errno
            let what: String
            switch e {
            case ENOENT: what = "no such file; check the path"
            case EACCES, EPERM: what = "permission denied" + (writable ? "; open read-only or fix the file's permissions" : "")
            case EISDIR: what = "is a directory, not an image"
            case EROFS: what = "read-only file system; open read-only"
            default: what = String(cString: strerror(e))
            }
            throw ImageError(e == ENOENT ? .notFound : .io, what, path: path, errno: e)
        }
        self.path = path
        self.fd = fd
        self.writable = writable
        self.inMemory = vl_fd_in_memory(fd) != 0
    }

    deinit { Glibc.close(fd) }

    private func ioError(_ op: String, _ offset: UInt64) -> ImageError {
        let e = errno
        return ImageError(.io, "\(op) at \(offset) failed: \(String(cString: strerror(e)))", path: path, offset: offset, errno: e)
    }

    /// Offsets from image metadata can be anything: refuse what the kernel cannot take
    /// (off_t is signed) instead of trapping on the conversion.
    private func checkOffset(_ offset: UInt64, _ count: Int) throws {
        if offset > UInt64(Int64.max) - UInt64(count) {
            throw ImageError(.corrupt, "offset \(offset) is beyond any file; the image metadata is corrupt", path: path, offset: offset)
        }
    }

    /// Read exactly `buffer.count` bytes; bytes past the end of the file read as zero.
    /// Inside `NonBlocking.attempt`, only what needs no device I/O.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkOffset(offset, buffer.count)
        let nowait = !inMemory && NonBlocking.active
        var done = 0
        while done < buffer.count {
            let n: Int
            if nowait {
                let r = vl_pread_nowait(fd, buffer.baseAddress! + done, buffer.count - done, Int64(offset) + Int64(done))
                // Not in the page cache, or the file system (or kernel) cannot tell:
                // the plain read on a thread that may wait reports any real error.
                if r < 0 && r != -Int(EINTR) { throw NonBlocking.WouldBlock() }
                if r < 0 { errno = EINTR }
                n = r
            } else {
                n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw ioError("read", offset + UInt64(done))
            }
            if n == 0 {
                (buffer.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - done)
                return
            }
            done += n
        }
    }

    public func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        if count > 0 { try out.withUnsafeMutableBytes { try read(into: $0, at: offset) } }
        return out
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try NonBlocking.check()
        try checkOffset(offset, buffer.count)
        WriteRecorder.note(path, .write(path: path, offset: offset, bytes: Array(buffer)))
        var done = 0
        while done < buffer.count {
            let n = pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw ioError("write", offset + UInt64(done))
            }
            done += n
        }
    }

    public func write(_ bytes: [UInt8], at offset: UInt64) throws {
        if bytes.isEmpty { return }
        try bytes.withUnsafeBytes { try write($0, at: offset) }
    }

    /// Write `length` zero bytes, preferring fallocate.
    public func writeZeroes(at offset: UInt64, length: UInt64) throws {
        if length == 0 { return }
        try NonBlocking.check()
        try checkOffset(offset, Int(min(length, UInt64(Int.max))))
        if vl_zero_range(fd, Int64(offset), Int64(length), 0) == 0 {
            WriteRecorder.note(path, .zero(path: path, offset: offset, length: length))
            return
        }
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(ZeroBuffer.size), length - done))
            try write(UnsafeRawBufferPointer(rebasing: ZeroBuffer.pointer[0..<n]), at: offset + done)
            done += UInt64(n)
        }
    }

    /// Give the space back; the range reads as zeroes afterwards. Returns false when the
    /// file system cannot punch holes.
    @discardableResult
    public func punchHole(at offset: UInt64, length: UInt64) -> Bool {
        if length == 0 { return true }
        if NonBlocking.active { return false }
        if offset > UInt64(Int64.max) - min(length, UInt64(Int64.max)) { return false }
        guard vl_punch_hole(fd, Int64(offset), Int64(length)) == 0 else { return false }
        WriteRecorder.note(path, .zero(path: path, offset: offset, length: length))
        return true
    }

    public func preallocate(at offset: UInt64, length: UInt64) throws {
        try NonBlocking.check()
        try checkOffset(offset, Int(min(length, UInt64(Int.max))))
        let r = vl_fallocate(fd, Int64(offset), Int64(length))
        if r < 0 { throw ImageError(.io, "fallocate failed: \(String(cString: strerror(-r)))", path: path, errno: -r) }
    }

    public func size() throws -> UInt64 {
        var st = stat()
        if fstat(fd, &st) != 0 { throw ioError("stat", 0) }
        return UInt64(st.st_size)
    }

    /// Bytes actually allocated on the host file system.
    public func allocatedSize() throws -> UInt64 {
        var st = stat()
        if fstat(fd, &st) != 0 { throw ioError("stat", 0) }
        return UInt64(st.st_blocks) * 512
    }

    public func truncate(to size: UInt64) throws {
        try NonBlocking.check()
        try checkOffset(size, 0)
        if ftruncate(fd, off_t(size)) != 0 { throw ioError("truncate", size) }
        WriteRecorder.note(path, .truncate(path: path, size: size))
    }

    public func sync() throws {
        try NonBlocking.check()
        if fdatasync(fd) != 0 { throw ioError("fdatasync", 0) }
        WriteRecorder.note(path, .sync(path: path))
    }

    /// Next data at or after `offset` (SEEK_DATA); nil when there is none.
    func nextData(from offset: UInt64) -> UInt64? {
        if offset > UInt64(Int64.max) { return nil }
        let r = vl_seek_data(fd, Int64(offset))
        if r < 0 { return r == -Int64(ENXIO) ? nil : offset }
        return UInt64(r)
    }

    /// Next hole at or after `offset` (SEEK_HOLE); the end of the file at worst.
    func nextHole(from offset: UInt64) -> UInt64 {
        if offset > UInt64(Int64.max) { return offset }
        let r = vl_seek_hole(fd, Int64(offset))
        if r < 0 { return (try? size()) ?? offset }
        return UInt64(r)
    }

    var isRegularFile: Bool {
        var st = stat()
        return fstat(fd, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG
    }
}
