import CFuse
import VirtualDisk
#if canImport(Glibc)
import Glibc
#endif

/// Serves one `DiskImage` as a single regular file ("disk") on a private FUSE mount,
/// ready for the kernel loop driver. Knows nothing of formats.
///
/// The file is opened with direct I/O (no page cache in FUSE), so the loop device can
/// use direct I/O too without double caching, and without the corruption a cached FUSE
/// file under a direct-I/O loop device shows (see PLATFORM-NOTES).
///
///   read/write   → image.read / image.write
///   fsync/flush  → image.flush (data and metadata on stable storage)
///   fallocate    → PUNCH_HOLE: writeZeroes(mayUnmap: true); ZERO_RANGE: writeZeroes
///   lseek        → SEEK_DATA / SEEK_HOLE from image extents
public final class FUSEExport: @unchecked Sendable {
    // Safe: `session` is set once in `mount` before any request thread starts and
    // cleared only after the loop has ended; the image is thread-safe.
    public let image: DiskImage
    public let readOnly: Bool
    public let mountPoint: String
    public static let fileName = "disk"
    static let fileInode: fuse_ino_t = 2
    private var session: OpaquePointer?
    private let threads: Int

    public init(image: DiskImage, mountPoint: String, readOnly: Bool, threads: Int = 8) {
        self.image = image
        self.mountPoint = mountPoint
        self.readOnly = readOnly
        self.threads = threads
    }

    public var filePath: String { mountPoint + "/" + Self.fileName }

    /// Mount the file system. Requests are served once `run` is called.
    public func mount() throws {
        var ops = makeOperations()
        let argStrings = ["vloop", "-o", "fsname=vloop,subtype=vloop,allow_other,default_permissions,max_read=1048576"]
        var argv: [UnsafeMutablePointer<CChar>?] = argStrings.map { strdup($0) }
        defer { for p in argv { free(p) } }
        let se: OpaquePointer? = argv.withUnsafeMutableBufferPointer { buf -> OpaquePointer? in
            var args = fuse_args(argc: Int32(argStrings.count), argv: buf.baseAddress, allocated: 0)
            let s = fuse_session_new(&args, &ops, MemoryLayout<fuse_lowlevel_ops>.size,
                                     Unmanaged.passUnretained(self).toOpaque())
            fuse_opt_free_args(&args)
            return s
        }
        guard let se else {
            throw ImageError(.io, "cannot start a FUSE session (is /dev/fuse present and the fuse module loaded?)")
        }
        if fuse_session_mount(se, mountPoint) != 0 {
            fuse_session_destroy(se)
            throw ImageError(.io, "cannot mount FUSE at \(mountPoint)")
        }
        session = se
    }

    /// Serve requests on `threads` threads until the session ends (unmount or `stop`).
    public func run() {
        guard let se = session else { return }
        let cfg = fuse_loop_cfg_create()
        fuse_loop_cfg_set_max_threads(cfg, UInt32(threads))
        fuse_loop_cfg_set_clone_fd(cfg, 1)
        _ = fuse_session_loop_mt(se, cfg)
        fuse_loop_cfg_destroy(cfg)
    }

    /// End the request loop and unmount.
    public func stop() {
        guard let se = session else { return }
        fuse_session_exit(se)
    }

    public func unmount() {
        guard let se = session else { return }
        fuse_session_unmount(se)
        fuse_session_destroy(se)
        session = nil
    }

    static func from(_ req: fuse_req_t?) -> FUSEExport {
        Unmanaged<FUSEExport>.fromOpaque(fuse_req_userdata(req)!).takeUnretainedValue()
    }

    func fileStat(_ ino: fuse_ino_t) -> stat? {
        var st = stat()
        switch ino {
        case 1:
            st.st_ino = 1
            st.st_mode = S_IFDIR | 0o755
            st.st_nlink = 2
        case Self.fileInode:
            st.st_ino = __ino_t(Self.fileInode)
            st.st_mode = S_IFREG | (readOnly ? 0o400 : 0o600)
            st.st_nlink = 1
            st.st_size = off_t(image.virtualSize)
            st.st_blksize = 4096
            st.st_blocks = blkcnt_t((image.virtualSize + 511) / 512)
        default:
            return nil
        }
        st.st_uid = getuid()
        st.st_gid = getgid()
        return st
    }

    /// errno for an engine error.
    static func errnoFor(_ error: Error) -> Int32 {
        guard let e = error as? ImageError else { return EIO }
        switch e.code {
        case .readOnly: return EROFS
        case .outOfRange: return EINVAL
        case .unsupported: return EOPNOTSUPP
        default: return e.errno ?? EIO
        }
    }

    func log(_ message: String) {
        let line = "vloop: \(image.info.path): \(message)\n"
        _ = line.withCString { Glibc.write(2, $0, strlen($0)) }
    }
}
