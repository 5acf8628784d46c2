import CFuse
import VirtualDisk
#if canImport(Glibc)
import Glibc
#endif

/// The low-level FUSE callbacks. They are plain C function pointers (no captures);
/// the export comes back through the session's userdata. Kept out of main.swift so
/// they are not main-actor isolated (they run on FUSE's threads).
extension FUSEExport {
    func makeOperations() -> fuse_lowlevel_ops {
        var ops = fuse_lowlevel_ops()
        ops.`init` = { userdata, conn in
            guard let conn else { return }
            vl_conn_set_max_read(conn, 1 << 20)
            vl_conn_set_max_write(conn, 1 << 20)
            vl_conn_want(conn, vl_cap_async_read())
            vl_conn_unwant(conn, vl_cap_writeback_cache())
        }
        ops.lookup = { req, parent, name in
            let export = FUSEExport.from(req)
            guard parent == 1, let name, String(cString: name) == FUSEExport.fileName, let st = export.fileStat(FUSEExport.fileInode) else {
                fuse_reply_err(req, ENOENT)
                return
            }
            var e = fuse_entry_param()
            e.ino = FUSEExport.fileInode
            e.attr = st
            e.attr_timeout = 3600
            e.entry_timeout = 3600
            fuse_reply_entry(req, &e)
        }
        ops.getattr = { req, ino, _ in
            let export = FUSEExport.from(req)
            guard var st = export.fileStat(ino) else { fuse_reply_err(req, ENOENT); return }
            fuse_reply_attr(req, &st, 3600)
        }
        ops.open = { req, ino, fi in
            let export = FUSEExport.from(req)
            guard ino == FUSEExport.fileInode, let fi else { fuse_reply_err(req, ino == 1 ? EISDIR : ENOENT); return }
            let acc = vl_fi_flags(fi) & O_ACCMODE
            if export.readOnly && acc != O_RDONLY { fuse_reply_err(req, EROFS); return }
            vl_fi_set_direct_io(fi, 1)
            vl_fi_set_parallel_direct_writes(fi, 1)
            fuse_reply_open(req, fi)
        }
        ops.read = { req, ino, size, off, _ in
            let export = FUSEExport.from(req)
            let total = export.image.virtualSize
            guard off >= 0, UInt64(off) < total else { fuse_reply_buf(req, nil, 0); return }
            let n = Int(min(UInt64(size), total - UInt64(off)))
            let buf = ReadBuffers.buffer(n)
            do {
                try export.image.read(into: UnsafeMutableRawBufferPointer(start: buf, count: n), at: UInt64(off))
                fuse_reply_buf(req, buf, n)
            } catch {
                export.log("read at \(off) failed: \(error)")
                fuse_reply_err(req, FUSEExport.errnoFor(error))
            }
        }
        ops.write = { req, ino, data, size, off, _ in
            let export = FUSEExport.from(req)
            guard !export.readOnly else { fuse_reply_err(req, EROFS); return }
            let total = export.image.virtualSize
            guard off >= 0, UInt64(off) <= total else { fuse_reply_err(req, ENOSPC); return }
            let n = Int(min(UInt64(size), total - UInt64(off)))
            if n == 0 && size > 0 { fuse_reply_err(req, ENOSPC); return }
            do {
                try export.image.write(UnsafeRawBufferPointer(start: data, count: n), at: UInt64(off))
                fuse_reply_write(req, n)
            } catch {
                export.log("write at \(off) failed: \(error)")
                fuse_reply_err(req, FUSEExport.errnoFor(error))
            }
        }
        ops.flush = { req, _, _ in
            fuse_reply_err(req, 0)
        }
        ops.fsync = { req, _, _, _ in
            let export = FUSEExport.from(req)
            do {
                try export.image.flush()
                fuse_reply_err(req, 0)
            } catch {
                export.log("flush failed: \(error)")
                fuse_reply_err(req, FUSEExport.errnoFor(error))
            }
        }
        ops.release = { req, _, _ in
            fuse_reply_err(req, 0)
        }
        ops.fallocate = { req, _, mode, off, length, _ in
            let export = FUSEExport.from(req)
            guard !export.readOnly else { fuse_reply_err(req, EROFS); return }
            let total = export.image.virtualSize
            guard off >= 0, length >= 0, UInt64(off) <= total else { fuse_reply_err(req, EINVAL); return }
            let len = min(UInt64(length), total - UInt64(off))
            do {
                if mode & vl_falloc_punch_hole() != 0 {
                    // The range must read as zeroes afterwards; space may go back.
                    try export.image.writeZeroes(at: UInt64(off), length: len, mayUnmap: true)
                } else if mode & vl_falloc_zero_range() != 0 {
                    try export.image.writeZeroes(at: UInt64(off), length: len, mayUnmap: false)
                } else if mode & ~vl_falloc_keep_size() == 0 {
                    // Plain allocation within the disk: the disk is fixed-size; nothing to do.
                } else {
                    fuse_reply_err(req, EOPNOTSUPP)
                    return
                }
                fuse_reply_err(req, 0)
            } catch {
                export.log("fallocate at \(off) failed: \(error)")
                fuse_reply_err(req, FUSEExport.errnoFor(error))
            }
        }
        ops.lseek = { req, _, off, whence, _ in
            let export = FUSEExport.from(req)
            let total = export.image.virtualSize
            guard off >= 0, UInt64(off) < total else { fuse_reply_err(req, ENXIO); return }
            do {
                let extents = try export.image.extents(at: UInt64(off), length: total - UInt64(off))
                if whence == vl_seek_data_whence() {
                    if let e = extents.first(where: { $0.isData }) { fuse_reply_lseek(req, off_t(max(e.offset, UInt64(off)))) } else { fuse_reply_err(req, ENXIO) }
                } else if whence == vl_seek_hole_whence() {
                    let e = extents.first(where: { !$0.isData })
                    fuse_reply_lseek(req, off_t(e.map { max($0.offset, UInt64(off)) } ?? total))
                } else {
                    fuse_reply_err(req, EINVAL)
                }
            } catch {
                fuse_reply_err(req, FUSEExport.errnoFor(error))
            }
        }
        ops.opendir = { req, ino, fi in
            guard ino == 1 else { fuse_reply_err(req, ENOTDIR); return }
            fuse_reply_open(req, fi)
        }
        ops.readdir = { req, ino, size, off, _ in
            let export = FUSEExport.from(req)
            guard ino == 1 else { fuse_reply_err(req, ENOTDIR); return }
            var buf = [CChar](repeating: 0, count: Int(size))
            var used = 0
            let entries: [(String, fuse_ino_t)] = [(".", 1), ("..", 1), (FUSEExport.fileName, FUSEExport.fileInode)]
            for (i, entry) in entries.enumerated() where i >= Int(off) {
                guard var st = export.fileStat(entry.1) else { continue }
                let need = buf.withUnsafeMutableBufferPointer { b in
                    fuse_add_direntry(req, b.baseAddress! + used, Int(size) - used, entry.0, &st, off_t(i + 1))
                }
                if used + need > Int(size) { break }
                used += need
            }
            buf.withUnsafeBufferPointer { _ = fuse_reply_buf(req, $0.baseAddress, used) }
        }
        ops.releasedir = { req, _, _ in fuse_reply_err(req, 0) }
        ops.statfs = { req, _ in
            var st = statvfs()
            st.f_bsize = 4096
            st.f_frsize = 4096
            st.f_namemax = 255
            fuse_reply_statfs(req, &st)
        }
        return ops
    }
}

/// One reusable read buffer per FUSE thread: no allocation per request.
enum ReadBuffers {
    private static let key: pthread_key_t = {
        var k = pthread_key_t()
        pthread_key_create(&k) { p in
            p?.deallocate()
        }
        return k
    }()
    static let size = 1 << 20 + 4096

    static func buffer(_ n: Int) -> UnsafeMutableRawPointer {
        precondition(n <= size)
        if let p = pthread_getspecific(key) { return p }
        let p = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096)
        pthread_setspecific(key, p)
        return p
    }
}
