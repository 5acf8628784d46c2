import FoundationEssentials
import VirtualDisk
#if canImport(Glibc)
import Glibc
#endif

/// Running host tools (losetup, mount, blkid) and reading their answers.
enum HostCommand {
    @discardableResult
    static func run(_ args: [String], allowFailure: Bool = false) throws -> Subprocess.Output {
        let r = try Subprocess.run(args)
        if r.status != 0 && !allowFailure {
            throw ImageError(.io, "\(args.joined(separator: " ")) failed: \(r.err.trimmingWhitespace())")
        }
        return r
    }
}

/// The kernel loop driver, through util-linux's losetup.
public enum LoopDevice {
    /// Bind `file` to a free loop device with direct I/O; returns /dev/loopN.
    public static func attach(file: String, readOnly: Bool, partscan: Bool, sectorSize: UInt32) throws -> String {
        var args = ["losetup", "--find", "--show", "--direct-io=on"]
        if sectorSize != 512 { args += ["--sector-size", String(sectorSize)] }
        if readOnly { args.append("--read-only") }
        if partscan { args.append("--partscan") }
        args.append(file)
        let r = try HostCommand.run(args, allowFailure: true)
        if r.status != 0 {
            let msg = r.err.trimmingWhitespace()
            if msg.contains("could not find any free loop device") || msg.contains("failed to find an unused loop device") {
                throw ImageError(.io, "no free loop device; detach one ('vloop list', 'losetup -a') or raise max_loop")
            }
            throw ImageError(.io, "losetup failed: \(msg)")
        }
        let device = r.out.trimmingWhitespace()
        if partscan { addPartitions(device) }
        return device
    }

    /// Partitions of the device. Some kernels (containers among them) do not scan loop
    /// devices themselves even with LO_FLAGS_PARTSCAN: then partx adds them.
    public static func addPartitions(_ device: String) {
        if partitions(device).isEmpty {
            _ = try? HostCommand.run(["partx", "-a", device], allowFailure: true)
        }
    }

    /// Partition numbers the kernel knows for a device.
    public static func partitions(_ device: String) -> [Int] {
        let base = deviceName(device)
        return ((try? FileManager.default.contentsOfDirectory(atPath: "/sys/block/\(base)")) ?? [])
            .filter { $0.hasPrefix(base + "p") }
            .compactMap { Int($0.dropFirst(base.count + 1)) }.sorted()
    }

    /// Flush the device's buffers and unbind it, waiting until the kernel lets go of
    /// the backing file.
    public static func detach(_ device: String) throws {
        _ = try? HostCommand.run(["blockdev", "--flushbufs", device], allowFailure: true)
        let r = try HostCommand.run(["losetup", "-d", device], allowFailure: true)
        if r.status != 0 && !r.err.contains("No such device") {
            throw ImageError(.io, "losetup -d \(device) failed: \(r.err.trimmingWhitespace())")
        }
        let name = deviceName(device)
        for _ in 0..<200 {
            if !FileManager.default.fileExists(atPath: "/sys/block/\(name)/loop/backing_file") { return }
            usleep(25_000)
        }
        throw ImageError(.io, "\(device) still holds its file after detach; is it mounted or open?")
    }

    /// True when something (a mount, an open) holds the device exclusively.
    public static func isBusy(_ device: String) -> Bool {
        let fd = open(device, O_RDONLY | O_EXCL | O_CLOEXEC)
        if fd < 0 { return errno == EBUSY }
        close(fd)
        return false
    }

    /// "loop3" for "/dev/loop3": the device's name under /sys/block.
    static func deviceName(_ device: String) -> String {
        String(device.split(separator: "/").last ?? Substring(device))
    }

    public static func backingFile(_ device: String) -> String? {
        let name = deviceName(device)
        return (try? String(contentsOfFile: "/sys/block/\(name)/loop/backing_file", encoding: .utf8))?
            .trimmingWhitespace()
    }
}

/// Checks that the host can attach at all, with messages that say what to do.
public enum AttachPreflight {
    public static func check() throws {
        if geteuid() != 0 {
            throw ImageError(.invalidArgument, "attaching needs root (loop devices and FUSE mounts); run with sudo")
        }
        if access("/dev/fuse", R_OK | W_OK) != 0 {
            throw ImageError(.notFound, "/dev/fuse is missing; load the fuse module ('modprobe fuse') or install fuse3")
        }
        if access("/dev/loop-control", R_OK | W_OK) != 0 {
            throw ImageError(.notFound, "/dev/loop-control is missing; load the loop driver ('modprobe loop')")
        }
        for tool in ["losetup", "blockdev"] where !FileManager.default.isExecutableFile(atPath: "/usr/sbin/\(tool)") && !FileManager.default.isExecutableFile(atPath: "/sbin/\(tool)") {
            throw ImageError(.notFound, "\(tool) is missing; install util-linux")
        }
    }
}
