import FoundationEssentials
import VirtualDisk
#if canImport(Glibc)
import Glibc
#endif

/// One attached image, as recorded under /run/vloop/<id>/info.json.
public struct AttachRecord: Codable, Sendable {
    public var id: String
    public var device: String
    public var image: String
    public var format: String
    public var readOnly: Bool
    public var pid: Int32
    /// The private FUSE mount point holding the image's raw view.
    public var fuseMount: String
    /// Where `vloop mount` mounted a file system from the device, if it did.
    public var mountedAt: String?
    public var mountedDevice: String?

    /// The daemon still runs (a zombie left unreaped by its new parent does not count).
    public var daemonAlive: Bool {
        guard kill(pid, 0) == 0 || errno == EPERM else { return false }
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return true }
        let state = String(stat[stat.index(after: close)...]).trimmingWhitespace().first
        return state != "Z" && state != "X"
    }
}

/// Where attach daemons record themselves. Only root writes here.
public enum AttachRegistry {
    public static var root: String { ProcessInfo.processInfo.environment["VLOOP_RUN_DIR"] ?? "/run/vloop" }

    public static func directory(_ id: String) -> String { root + "/" + id }

    public static func all() -> [AttachRecord] {
        guard let ids = try? FileManager.default.contentsOfDirectory(atPath: root) else { return [] }
        return ids.sorted().compactMap { load($0) }
    }

    public static func load(_ id: String) -> AttachRecord? {
        guard let data = FileManager.default.contents(atPath: directory(id) + "/info.json") else { return nil }
        return try? JSONDecoder().decode(AttachRecord.self, from: data)
    }

    public static func save(_ r: AttachRecord) throws {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        let data = try enc.encode(r)
        let tmp = directory(r.id) + "/info.json.tmp"
        try data.write(to: URL(fileURLWithPath: tmp))
        rename(tmp, directory(r.id) + "/info.json")
    }

    /// Records naming `target` as device (/dev/loopN), image path or file-system mount.
    public static func find(_ target: String) -> [AttachRecord] {
        let real = realPath(target) ?? target
        return all().filter { $0.device == target || $0.image == real || $0.mountedAt == real || $0.mountedAt == target }
    }

    public static func realPath(_ p: String) -> String? {
        guard let r = realpath(p, nil) else { return nil }
        defer { free(r) }
        return String(cString: r)
    }

    public static func remove(_ id: String) {
        try? FileManager.default.removeItem(atPath: directory(id))
    }
}
