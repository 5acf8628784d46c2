import CVloop
#if canImport(Glibc)
import Glibc
#endif

/// QEMU-compatible image locking (qemu's file-posix.c): one-byte OFD locks, a shared
/// lock at byte 100+i for each permission held and at 200+i for each permission not
/// shared with others. Permissions: 0 consistent-read, 1 write, 2 write-unchanged,
/// 3 resize. A holder conflicts with us when it holds a permission we do not share,
/// or does not share one we hold.
public struct ImagePermissions: OptionSet, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let consistentRead = ImagePermissions(rawValue: 1 << 0)
    public static let write = ImagePermissions(rawValue: 1 << 1)
    public static let writeUnchanged = ImagePermissions(rawValue: 1 << 2)
    public static let resize = ImagePermissions(rawValue: 1 << 3)
    public static let all: ImagePermissions = [.consistentRead, .write, .writeUnchanged, .resize]
    static let names = ["consistent read", "write", "write unchanged", "resize"]
}

public enum ImageLock {
    static let permBase: Int64 = 100
    static let sharedBase: Int64 = 200

    /// Permissions for an open: writers share reading only; readers refuse writers
    /// unless `forceShare` (qemu-img -U).
    public static func permissions(writable: Bool, forceShare: Bool) -> (held: ImagePermissions, shared: ImagePermissions) {
        if writable { return ([.consistentRead, .write, .writeUnchanged, .resize], [.consistentRead, .writeUnchanged]) }
        if forceShare { return ([], .all) }
        return ([.consistentRead], [.consistentRead, .writeUnchanged])
    }

    /// Take the locks on `file`, failing with `.locked` if another process's locks
    /// conflict. Locks go away when the file is closed.
    public static func acquire(_ file: HostFile, held: ImagePermissions, shared: ImagePermissions) throws {
        // Check first, so nothing is taken when something conflicts.
        for i in 0..<4 {
            let bit = ImagePermissions(rawValue: 1 << UInt8(i))
            if held.contains(bit) {
                try test(file, sharedBase + Int64(i), "\(ImagePermissions.names[i])")
            }
            if !shared.contains(bit) {
                try test(file, permBase + Int64(i), "\(ImagePermissions.names[i])")
            }
        }
        for i in 0..<4 {
            let bit = ImagePermissions(rawValue: 1 << UInt8(i))
            if held.contains(bit) { try lock(file, permBase + Int64(i)) }
            if !shared.contains(bit) { try lock(file, sharedBase + Int64(i)) }
        }
    }

    /// Drop every lock this open file description holds on the image.
    public static func release(_ file: HostFile) {
        _ = vl_ofd_lock(file.fd, permBase, sharedBase + 100 - permBase, 0, 1)
    }

    private static func test(_ file: HostFile, _ byte: Int64, _ what: String) throws {
        var pid: Int32 = -1
        let r = vl_ofd_test(file.fd, byte, 1, 1, &pid)
        if r == 1 {
            let holder = pid > 0 ? " (pid \(pid))" : ""
            throw ImageError(.locked, "failed to get \"\(what)\" lock: the image is in use by another process\(holder); close it first, or open read-only with -U/--force-share to read it anyway",
                             path: file.path)
        }
        if r < 0 && r != -EINVAL && r != -EOPNOTSUPP {
            throw ImageError(.io, "cannot test image locks: \(String(cString: strerror(-r)))", path: file.path)
        }
    }

    private static func lock(_ file: HostFile, _ byte: Int64) throws {
        let r = vl_ofd_lock(file.fd, byte, 1, 0, 0)
        if r == -EAGAIN || r == -EACCES {
            throw ImageError(.locked, "the image is in use by another process; close it first", path: file.path)
        }
        // File systems without lock support: qemu carries on too.
    }
}
