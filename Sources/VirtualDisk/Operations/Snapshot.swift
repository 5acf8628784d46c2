#if canImport(Glibc)
import Glibc
#endif

/// `snapshot`: list, create, apply and delete internal snapshots.
public enum SnapshotOperation {
    static func layer(_ image: DiskImage) throws -> QCOW2Layer {
        guard let l = (image as? LayeredImage)?.layer as? QCOW2Layer else {
            throw ImageError(.unsupported, "\(image.info.format) images have no internal snapshots (qcow2 has)", path: image.info.path)
        }
        return l
    }

    public static func list(_ image: DiskImage) throws -> [QCOW2Snapshot] { try layer(image).snapshots() }

    public static func create(_ image: DiskImage, name: String) throws { try layer(image).createSnapshot(name: name) }
    public static func apply(_ image: DiskImage, name: String) throws {
        defer { (image as? LayeredImage)?.sizeChanged() }
        try layer(image).applySnapshot(name: name)
    }
    public static func delete(_ image: DiskImage, name: String) throws { try layer(image).deleteSnapshot(name: name) }

    /// qemu-img's snapshot table.
    public static func table(_ snaps: [QCOW2Snapshot]) -> String {
        func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s + " " : s + String(repeating: " ", count: n - s.count) }
        var out = pad("ID", 10) + pad("TAG", 18) + pad("VM SIZE", 8) + pad("DATE", 20) + "VM CLOCK\n"
        for s in snaps {
            var t = time_t(s.dateSeconds)
            var tmv = tm()
            localtime_r(&t, &tmv)
            var buf = [CChar](repeating: 0, count: 32)
            strftime(&buf, 32, "%Y-%m-%d %H:%M:%S", &tmv)
            let date = String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            let ns = s.vmClockNanoseconds
            let secs = ns / 1_000_000_000
            let clock = String(format2(secs / 3600)) + ":" + format2((secs / 60) % 60) + ":" + format2(secs % 60) + "." + format3((ns / 1_000_000) % 1000)
            out += pad(s.id, 10) + pad(s.name, 18) + pad(SizeParser.human(s.vmStateSize), 8) + pad(date, 20) + clock + "\n"
        }
        return out
    }

    static func format2(_ v: UInt64) -> String { v < 10 ? "0\(v)" : "\(v)" }
    static func format3(_ v: UInt64) -> String { v < 10 ? "00\(v)" : v < 100 ? "0\(v)" : "\(v)" }
}
