import Dispatch
import FoundationEssentials
import VirtualDisk
#if canImport(Glibc)
import Glibc
#endif

public struct AttachOptions: Sendable {
    public var format: ImageFormat?
    public var readOnly = false
    public var partscan = false
    public var threads = 8
    public init() {}
}

/// The attach daemon: opens the image, serves it as a FUSE file, binds the file to a
/// loop device, records itself, and on SIGTERM/SIGINT unbinds, unmounts, closes the
/// image cleanly and removes every trace.
public enum AttachDaemon {
    /// Serve until told to stop. `ready` is called once: with the record when the
    /// device is usable, or with the error that prevented it.
    public static func serve(imagePath: String, options: AttachOptions, ready: (Result<AttachRecord, ImageError>) -> Void) -> Int32 {
        // Signals are taken synchronously by this thread; every thread started later
        // inherits the mask, so FUSE threads never see them.
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGTERM)
        sigaddset(&set, SIGINT)
        pthread_sigmask(SIG_BLOCK, &set, nil)
        signal(SIGHUP, SIG_IGN)
        signal(SIGPIPE, SIG_IGN)

        var cleanup: [() -> Void] = []
        func unwind() { for step in cleanup.reversed() { step() } }
        func fail(_ e: ImageError) -> Int32 {
            unwind()
            ready(.failure(e))
            return 1
        }

        guard let real = AttachRegistry.realPath(imagePath) else {
            return fail(ImageError(.notFound, "no such file; check the path", path: imagePath))
        }
        let image: DiskImage
        do {
            var o = OpenOptions(format: options.format, writable: !options.readOnly)
            o.userNamed = [real, imagePath]
            image = try ImageOpener.open(real, options: o)
        } catch var e as ImageError {
            if e.code == .locked, let holder = AttachRegistry.find(real).first {
                e.message = "already attached read-write as \(holder.device) by vloop (pid \(holder.pid)); detach it first with 'vloop detach \(holder.device)', or attach --read-only"
                if holder.readOnly { e.message = "attached read-only as \(holder.device) (pid \(holder.pid)); a read-write attach needs it detached first" }
            }
            return fail(e.at(path: imagePath))
        } catch {
            return fail(ImageError(.io, "\(error)", path: imagePath))
        }
        cleanup.append { try? image.close() }

        let id = "vloop-\(getpid())"
        let dir = AttachRegistry.directory(id)
        let mnt = dir + "/mnt"
        do {
            try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o700])
            chmod(AttachRegistry.root, 0o755)
        } catch {
            return fail(ImageError(.io, "cannot create \(mnt): \(error)"))
        }
        cleanup.append { AttachRegistry.remove(id) }

        let export = FUSEExport(image: image, mountPoint: mnt, readOnly: options.readOnly, threads: options.threads)
        do { try export.mount() } catch let e as ImageError { return fail(e) } catch { return fail(ImageError(.io, "\(error)")) }
        let loopDone = DispatchSemaphore(value: 0)
        do {
            try startThread(stackSize: 1 << 20) {
                export.run()
                loopDone.signal()
                // The session ended on its own (unmounted from outside): wake the main thread.
                kill(getpid(), SIGTERM)
            }
        } catch let e as ImageError {
            export.unmount()
            return fail(e)
        } catch {
            export.unmount()
            return fail(ImageError(.io, "\(error)"))
        }
        cleanup.append {
            export.stop()
            export.unmount()
            _ = loopDone.wait(timeout: .now() + 10)
        }

        let device: String
        do {
            device = try LoopDevice.attach(file: export.filePath, readOnly: options.readOnly, partscan: options.partscan,
                                           sectorSize: image.info.logicalSectorSize)
        } catch let e as ImageError {
            return fail(e)
        } catch {
            return fail(ImageError(.io, "\(error)"))
        }
        cleanup.append { try? LoopDevice.detach(device) }

        let record = AttachRecord(id: id, device: device, image: real, format: image.info.format, readOnly: options.readOnly,
                                  pid: getpid(), fuseMount: mnt, mountedAt: nil, mountedDevice: nil)
        do { try AttachRegistry.save(record) } catch { return fail(ImageError(.io, "cannot record the attachment: \(error)")) }
        ready(.success(record))

        var sig: Int32 = 0
        sigwait(&set, &sig)
        // Orderly teardown: unbind the loop device (flushing it), unmount, close the
        // image (flush, clean flags), remove the record.
        unwind()
        return 0
    }
}

private final class ThreadBody {
    let run: () -> Void
    init(_ run: @escaping () -> Void) { self.run = run }
}

/// Run `body` on a new detached thread with the given stack size.
private func startThread(stackSize: Int, _ body: @escaping () -> Void) throws {
    var attr = pthread_attr_t()
    pthread_attr_init(&attr)
    defer { pthread_attr_destroy(&attr) }
    pthread_attr_setstacksize(&attr, stackSize)
    pthread_attr_setdetachstate(&attr, Int32(PTHREAD_CREATE_DETACHED))
    let box = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
    var thread = pthread_t()
    let rc = pthread_create(&thread, &attr, { p in
        Unmanaged<ThreadBody>.fromOpaque(p!).takeRetainedValue().run()
        return nil
    }, box)
    if rc != 0 {
        Unmanaged<ThreadBody>.fromOpaque(box).release()
        throw ImageError(.io, "cannot start the FUSE thread: \(String(cString: strerror(rc)))")
    }
}
