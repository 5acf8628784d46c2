import Foundation
import Testing
@testable import VirtualDisk

/// Attach through the real kernel loop driver and FUSE, with real file systems.
/// Needs root, /dev/fuse and /dev/loop-control (CI has them).
let canAttach = geteuid() == 0 && FileManager.default.fileExists(atPath: "/dev/fuse")
    && FileManager.default.fileExists(atPath: "/dev/loop-control")

struct AttachVariant: CustomStringConvertible, Sendable {
    let name: String
    let create: [[String]]  // commands run in the test directory; the image is "disk"
    let qemuFormat: String?
    var description: String { name }
}

let attachVariants: [AttachVariant] = [
    AttachVariant(name: "qcow2", create: [["create", "-q", "-f", "qcow2", "disk", "96M"]], qemuFormat: "qcow2"),
    AttachVariant(name: "qcow2-4k-clusters", create: [["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "disk", "96M"]], qemuFormat: "qcow2"),
    AttachVariant(name: "qcow2-extended-l2", create: [["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "disk", "96M"]], qemuFormat: "qcow2"),
    AttachVariant(name: "qcow2-overlay", create: [["create", "-q", "-f", "raw", "base", "96M"],
                                                  ["create", "-q", "-f", "qcow2", "-b", "base", "-F", "raw", "disk"]], qemuFormat: "qcow2"),
    AttachVariant(name: "qcow", create: [["create", "-q", "-f", "qcow", "disk", "96M"]], qemuFormat: "qcow"),
    AttachVariant(name: "raw", create: [["create", "-q", "-f", "raw", "disk", "96M"]], qemuFormat: "raw"),
    AttachVariant(name: "vhd-dynamic", create: [["create", "-q", "-f", "vhd", "disk", "96M"]], qemuFormat: nil),
    AttachVariant(name: "vhd-fixed", create: [["create", "-q", "-f", "vhd", "-o", "subformat=fixed", "disk", "96M"]], qemuFormat: nil),
    AttachVariant(name: "vhd-differencing", create: [["create", "-q", "-f", "vhd", "base.vhd", "96M"],
                                                     ["create", "-q", "-f", "vhd", "-b", "base.vhd", "-F", "vhd", "disk"]], qemuFormat: nil),
    AttachVariant(name: "vmdk-monolithicSparse", create: [["create", "-q", "-f", "vmdk", "disk", "96M"]], qemuFormat: "vmdk"),
    AttachVariant(name: "vmdk-twoGbMaxExtentSparse", create: [["create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", "disk", "96M"]], qemuFormat: "vmdk"),
    AttachVariant(name: "vmdk-streamOptimized", create: [["create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", "disk", "96M"]], qemuFormat: nil),
    AttachVariant(name: "vdi", create: [["create", "-q", "-f", "vdi", "disk", "96M"]], qemuFormat: "vdi"),
    AttachVariant(name: "vhdx-dynamic", create: [["create", "-q", "-f", "vhdx", "disk", "96M"]], qemuFormat: "vhdx"),
    AttachVariant(name: "vhdx-fixed", create: [["create", "-q", "-f", "vhdx", "-o", "subformat=fixed", "disk", "96M"]], qemuFormat: "vhdx"),
    AttachVariant(name: "vhdx-4k-sectors", create: [["create", "-q", "-f", "vhdx", "-o", "logical_sector_size=4096", "disk", "96M"]], qemuFormat: nil),
    AttachVariant(name: "vhdx-differencing", create: [["create", "-q", "-f", "vhdx", "base.vhdx", "96M"],
                                                      ["create", "-q", "-f", "vhdx", "-b", "base.vhdx", "-F", "vhdx", "disk"]], qemuFormat: nil),
]

@Suite("Attach as a block device", .enabled(if: canAttach), .serialized)
struct AttachTests {
    func vloop(_ args: [String], cwd: String) throws -> String {
        try sh([vloopBinary] + args, cwd: cwd).out.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Write files with known contents on a mounted device; return name → sha256.
    func writeFiles(_ mnt: String) throws -> [String: String] {
        var sums: [String: String] = [:]
        for (i, size) in [1, 300, 4096, 3 << 20, 17 << 20].enumerated() {
            let f = "\(mnt)/file\(i)"
            try sh(["sh", "-c", "head -c \(size) /dev/urandom > \(f)"])
            sums["file\(i)"] = try sh(["sha256sum", f]).out.split(separator: " ")[0].description
        }
        try sh(["sync"])
        return sums
    }

    func verify(_ mnt: String, _ sums: [String: String]) throws {
        for (name, sum) in sums {
            let got = try sh(["sha256sum", "\(mnt)/\(name)"]).out.split(separator: " ")[0].description
            #expect(got == sum, "\(name) changed")
        }
    }

    @Test("mkfs, mount, write, detach, check, re-attach read-only, verify", arguments: attachVariants)
    func fileSystemRoundTrip(_ v: AttachVariant) throws {
        let dir = TempDir()
        for c in v.create { _ = try vloop(c, cwd: dir.path) }
        let mnt = dir.file("mnt")
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        let dev = try vloop(["attach", "disk"], cwd: dir.path)
        #expect(dev.hasPrefix("/dev/loop"))
        // The device's logical block size is the image's sector size.
        let sectorSize = try sh(["blockdev", "--getss", dev]).out.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(sectorSize == (v.name.contains("4k-sectors") ? "4096" : "512"), "\(v): logical block size \(sectorSize)")
        var sums: [String: String] = [:]
        do {
            try sh(["mkfs.ext4", "-q", "-F", dev])
            try sh(["mount", dev, mnt])
            sums = try writeFiles(mnt)
            try sh(["umount", mnt])
            try sh(["fsck.ext4", "-n", "-f", dev])
        } catch {
            _ = try? sh(["umount", mnt], check: false)
            _ = try? vloop(["detach", "--force", dev], cwd: dir.path)
            throw error
        }
        _ = try vloop(["detach", dev], cwd: dir.path)
        // No leftovers.
        #expect(!(try sh(["losetup", "-a"]).out.contains(dir.path)))
        #expect(try vloop(["list", "--output", "json"], cwd: dir.path) == "[]")
        if let f = v.qemuFormat, f != "raw", f != "qcow" { try sh(["qemu-img", "check", "-f", f, "disk"], cwd: dir.path) }
        let ro = try vloop(["attach", "--read-only", "disk"], cwd: dir.path)
        defer { _ = try? vloop(["detach", "--force", ro], cwd: dir.path) }
        try sh(["mount", "-o", "ro", ro, mnt])
        defer { _ = try? sh(["umount", mnt], check: false) }
        try verify(mnt, sums)
        // A second reader that no one here wrote agrees with the contents where qemu
        // reads the format right (qemu ignores VHD parents and cannot rewrite streams).
        if v.name == "vhd-dynamic" || v.name == "vhd-fixed" || v.name == "vmdk-streamOptimized" {
            let raw = dir.file("check.raw")
            // qemu probes a fixed VHD as raw: name the format.
            try sh(["qemu-img", "convert", "-U", "-f", v.name.hasPrefix("vhd") ? "vpc" : "vmdk", "-O", "raw", "disk", raw], cwd: dir.path)
            try sh(["qemu-img", "compare", "-U", "-f", "raw", raw, ro])
        }
        // A read-only device refuses writes.
        #expect(try sh(["sh", "-c", "echo x > \(mnt)/new"], check: false).status != 0)
    }

    @Test("fstrim gives space back to a qcow2 image")
    func trimReturnsSpace() throws {
        let dir = TempDir()
        _ = try vloop(["create", "-q", "-f", "qcow2", "disk", "128M"], cwd: dir.path)
        let mnt = dir.file("mnt")
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        let dev = try vloop(["attach", "disk"], cwd: dir.path)
        defer { _ = try? vloop(["detach", "--force", dev], cwd: dir.path) }
        try sh(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev])
        try sh(["mount", dev, mnt])
        try sh(["sh", "-c", "head -c 60000000 /dev/urandom > \(mnt)/big && sync"])
        func allocated() throws -> Int { Int(try sh(["du", "-B1", dir.file("disk")]).out.split(separator: "\t")[0])! }
        let full = try allocated()
        try sh(["rm", "\(mnt)/big"])
        try sh(["sync"])
        try sh(["sh", "-c", "sync -f \(mnt)"])
        try sh(["fstrim", "-v", mnt])
        try sh(["umount", mnt])
        let trimmed = try allocated()
        #expect(full > 55_000_000 && trimmed < full - 40_000_000, "allocated \(full) → \(trimmed)")
        _ = try vloop(["detach", dev], cwd: dir.path)
        try sh(["qemu-img", "check", "disk"], cwd: dir.path)
    }

    @Test("the same image twice: second writer refused, qemu refused, readers share, overlays share a base")
    func locking() throws {
        let dir = TempDir()
        _ = try vloop(["create", "-q", "-f", "qcow2", "base.qcow2", "32M"], cwd: dir.path)
        let dev = try vloop(["attach", "base.qcow2"], cwd: dir.path)
        defer { _ = try? vloop(["detach", "--force", dev], cwd: dir.path) }
        let second = try sh([vloopBinary, "attach", "base.qcow2"], cwd: dir.path, check: false)
        #expect(second.status != 0 && second.err.contains(dev), "second attach: \(second.err)")
        let qemu = try sh(["qemu-io", "-f", "qcow2", "-c", "write 0 4k", "base.qcow2"], cwd: dir.path, check: false)
        #expect(qemu.status != 0 || qemu.err.contains("lock"), "qemu-io wrote an attached image")
        _ = try vloop(["detach", dev], cwd: dir.path)
        // Two overlays over one base, both attached read-write.
        _ = try vloop(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "a.qcow2"], cwd: dir.path)
        _ = try vloop(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "b.qcow2"], cwd: dir.path)
        let a = try vloop(["attach", "a.qcow2"], cwd: dir.path)
        defer { _ = try? vloop(["detach", "--force", a], cwd: dir.path) }
        let b = try vloop(["attach", "b.qcow2"], cwd: dir.path)
        defer { _ = try? vloop(["detach", "--force", b], cwd: dir.path) }
        let r1 = try vloop(["attach", "-r", "base.qcow2"], cwd: dir.path)
        defer { _ = try? vloop(["detach", "--force", r1], cwd: dir.path) }
        #expect(a != b && b != r1)
        // But the base cannot be written while overlays use it.
        #expect(try sh([vloopBinary, "attach", "base.qcow2"], cwd: dir.path, check: false).status != 0)
    }

    @Test("qemu-nbd and vloop attach refuse to share an image for writing, both ways")
    func qemuNBDLocks() throws {
        let dir = TempDir()
        _ = try vloop(["create", "-q", "-f", "qcow2", "img.qcow2", "32M"], cwd: dir.path)
        let port = 20000 + Int(getpid() % 10000)
        let nbd = Process()
        nbd.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-nbd")
        nbd.arguments = ["-f", "qcow2", "-p", String(port), "-t", dir.file("img.qcow2")]
        try nbd.run()
        Thread.sleep(forTimeInterval: 1.0)
        let refused = try sh([vloopBinary, "attach", "img.qcow2"], cwd: dir.path, check: false)
        kill(nbd.processIdentifier, SIGKILL)  // qemu-nbd -t does not stop on SIGTERM while idle
        nbd.waitUntilExit()
        #expect(refused.status != 0 && refused.err.contains("lock"), "attach while qemu-nbd serves: \(refused.err)")
        let dev = try vloop(["attach", "img.qcow2"], cwd: dir.path)
        defer { _ = try? vloop(["detach", "--force", dev], cwd: dir.path) }
        let q = try sh(["qemu-nbd", "-f", "qcow2", "-p", String(port + 1), dir.file("img.qcow2")], check: false)
        #expect(q.status != 0 && q.err.contains("lock"), "qemu-nbd while attached: \(q.err)")
    }

    @Test("vloop mount finds the partition with a file system")
    func mountPartition() throws {
        let dir = TempDir()
        _ = try vloop(["create", "-q", "-f", "qcow2", "disk.qcow2", "64M"], cwd: dir.path)
        let dev = try vloop(["attach", "--partscan", "disk.qcow2"], cwd: dir.path)
        defer { _ = try? vloop(["detach", "--force", dev], cwd: dir.path) }
        try sh(["sh", "-c", "printf 'label: dos\\nstart=2048, size=20480, type=83\\nstart=22528, type=83\\n' | sfdisk -q \(dev)"])
        try sh(["partx", "-a", dev], check: false)
        try sh(["udevadm", "settle"], check: false)
        try sh(["mkfs.ext4", "-q", "-F", "\(dev)p2"])
        _ = try vloop(["detach", dev], cwd: dir.path)
        let mnt = dir.file("mnt")
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        let out = try vloop(["mount", "disk.qcow2", mnt], cwd: dir.path)
        #expect(out.contains("p2 mounted"))
        try sh(["sh", "-c", "echo hello > \(mnt)/hello"])
        _ = try vloop(["umount", mnt], cwd: dir.path)
        #expect(try vloop(["list", "--output", "json"], cwd: dir.path) == "[]")
        try sh(["qemu-img", "check", "disk.qcow2"], cwd: dir.path)
    }

    @Test("a killed daemon fails I/O instead of hanging; detach --force cleans up; the image checks clean")
    func killedDaemon() throws {
        let dir = TempDir()
        _ = try vloop(["create", "-q", "-f", "qcow2", "disk.qcow2", "64M"], cwd: dir.path)
        let dev = try vloop(["attach", "disk.qcow2"], cwd: dir.path)
        try sh(["sh", "-c", "head -c 8M /dev/urandom | dd of=\(dev) bs=1M oflag=direct conv=fsync status=none"])
        let pid = try attachDaemonPID(dev)
        #expect(!pid.isEmpty)
        // Kill it in the middle of a write stream.
        let writer = Process()
        writer.executableURL = URL(fileURLWithPath: "/bin/sh")
        writer.arguments = ["-c", "dd if=/dev/urandom of=\(dev) bs=1M count=40 seek=10 oflag=direct status=none"]
        try writer.run()
        Thread.sleep(forTimeInterval: 0.3)
        try sh(["kill", "-9", pid])
        writer.waitUntilExit()  // must return: I/O fails, it does not hang
        #expect(try sh(["dd", "if=\(dev)", "of=/dev/null", "bs=4k", "count=1", "iflag=direct"], check: false).status != 0)
        _ = try vloop(["detach", "--force", dev], cwd: dir.path)
        #expect(try vloop(["list", "--output", "json"], cwd: dir.path) == "[]")
        #expect(!(try sh(["losetup", "-a"]).out.contains("/run/vloop")))
        // Leaks are allowed after a crash; corruption is not.
        let check = try sh(["qemu-img", "check", "disk.qcow2"], cwd: dir.path, check: false)
        #expect(check.status == 0 || check.status == 3, "qemu-img check: \(check.out)")
    }
}
