import CVloop
import Foundation
import Testing
@testable import VirtualDisk

/// Whether files in the tests' temporary directory live on a device (not tmpfs): only
/// there can a read have to wait.
let tempDirOnDevice: Bool = {
    let fd = open(NSTemporaryDirectory(), O_RDONLY)
    defer { close(fd) }
    return fd >= 0 && vl_fd_in_memory(fd) == 0
}()

/// `NonBlocking.attempt`, which `vloop serve` uses to answer reads on its event loop:
/// it must give up exactly where waiting would begin, and change nothing when it does.
@Suite("reads that must not wait (NonBlocking)")
struct NonBlockingTests {
    static let formats: [(qemu: String, format: ImageFormat)] = [
        ("raw", .raw), ("qcow", .qcow), ("qcow2", .qcow2), ("vpc", .vhd), ("vhdx", .vhdx), ("vmdk", .vmdk), ("vdi", .vdi),
    ]

    /// An 8 MiB image of `qemu` format with a pattern at 4 MiB, made by qemu-io.
    func make(_ qemu: String, in dir: TempDir) throws -> String {
        let path = dir.file("disk.\(qemu)")
        try sh(["qemu-img", "create", "-q", "-f", qemu, path, "8M"])
        try sh(["qemu-io", "-f", qemu, "-c", "write -P 0x5a 4M 64k", path])
        return path
    }

    /// Push the file's pages out of the page cache (they are clean: qemu-io has exited).
    func evict(_ path: String) {
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        _ = fdatasync(fd)
        _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
    }

    @Test("a read of data not in the page cache gives up; once cached, it reads the same bytes as a plain read",
          .enabled(if: tempDirOnDevice), arguments: formats.map(\.qemu))
    func givesUpOnTheDisk(_ qemu: String) throws {
        let dir = TempDir()
        let format = Self.formats.first { $0.qemu == qemu }!.format
        let path = try make(qemu, in: dir)
        let image = try openRO(path, format: format)
        defer { try? image.close() }
        evict(path)
        let first = try NonBlocking.attempt { try image.read(at: 4 << 20, count: 4096) }
        #expect(first == nil, "\(qemu): a read from an evicted file did not give up")
        let plain = try image.read(at: 4 << 20, count: 4096)
        #expect(plain == [UInt8](repeating: 0x5a, count: 4096))
        let again = try NonBlocking.attempt { try image.read(at: 4 << 20, count: 4096) }
        #expect(again == plain, "\(qemu): a cached read inside attempt gave \(again.map { "\($0.prefix(8))…" } ?? "up")")
        // Unallocated ranges need no I/O at all.
        let hole = try NonBlocking.attempt { try image.read(at: 1 << 20, count: 4096) }
        #expect(hole == [UInt8](repeating: 0, count: 4096))
    }

    @Test("writes inside attempt give up before anything changes", arguments: formats.map(\.qemu))
    func writesGiveUp(_ qemu: String) throws {
        let dir = TempDir()
        let format = Self.formats.first { $0.qemu == qemu }!.format
        let path = try make(qemu, in: dir)
        let image = try openRW(path, format: format)
        let data = [UInt8](repeating: 0xc3, count: 65536)
        #expect(try NonBlocking.attempt { try image.write(data, at: 4 << 20) } == nil, "\(qemu): a write over data ran")
        #expect(try NonBlocking.attempt { try image.write(data, at: 1 << 20) } == nil, "\(qemu): an allocating write ran")
        #expect(try NonBlocking.attempt { try image.flush() } == nil, "\(qemu): a flush ran")
        #expect(try image.read(at: 4 << 20, count: 65536) == [UInt8](repeating: 0x5a, count: 65536))
        #expect(try image.read(at: 1 << 20, count: 65536) == [UInt8](repeating: 0, count: 65536))
        try image.close()
        if ["qcow2", "vhdx", "vdi"].contains(qemu) { try sh(["qemu-img", "check", "-f", qemu, path]) }
        // qemu reads what was there before.
        try sh(["qemu-io", "-f", qemu, "-c", "read -P 0x5a 4M 64k", "-c", "read -P 0 1M 64k", path])
    }

    @Test("a lookup does not wait for the layer's lock while another thread holds it")
    func lockHeldElsewhere() throws {
        let dir = TempDir()
        let path = try make("qcow2", in: dir)
        let image = try openRO(path, format: .qcow2)
        defer { try? image.close() }
        let want = try image.read(at: 4 << 20, count: 4096)
        let layer = try #require((image as? LayeredImage)?.layer as? QCOW2Layer)
        let held = DispatchSemaphore(value: 0), release = DispatchSemaphore(value: 0), done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            layer.lock.run {
                held.signal()
                release.wait()
            }
            done.signal()
        }
        held.wait()
        let blocked = try NonBlocking.attempt { try image.read(at: 4 << 20, count: 4096) }
        release.signal()
        done.wait()
        #expect(blocked == nil, "the read waited for a lock held by another thread")
        #expect(try NonBlocking.attempt { try image.read(at: 4 << 20, count: 4096) } == want)
    }
}
