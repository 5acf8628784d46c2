/// `info`: what qemu-img info prints, human or JSON, for one image or its whole chain.
public enum InfoOperation {
    public static func json(_ image: DiskImage, actualSize: UInt64?) -> JSONValue {
        let i = image.info
        var pairs: [(String, JSONValue)] = []
        if let b = i.backing, let f = b.format { pairs.append(("backing-filename-format", .string(f))) }
        pairs.append(("virtual-size", .uint(i.virtualSize)))
        pairs.append(("filename", .string(i.path)))
        if i.clusterSize > 0 { pairs.append(("cluster-size", .uint(i.clusterSize))) }
        pairs.append(("format", .string(i.format)))
        if let a = actualSize { pairs.append(("actual-size", .uint(a))) }
        if !i.formatSpecific.isEmpty {
            pairs.append(("format-specific", .object([("type", .string(i.format)), ("data", .object(i.formatSpecific))])))
        }
        if let b = i.backing {
            pairs.append(("full-backing-filename", .string(b.resolvedPath ?? ImageOpener.resolve(b.name, relativeTo: i.path))))
            pairs.append(("backing-filename", .string(b.name)))
        }
        pairs.append(("dirty-flag", .bool(i.dirty)))
        return .object(pairs)
    }

    public static func human(_ image: DiskImage, actualSize: UInt64?) -> String {
        let i = image.info
        var s = "image: \(i.path)\nfile format: \(i.format)\n"
        s += "virtual size: \(SizeParser.human(i.virtualSize)) (\(i.virtualSize) bytes)\n"
        if let a = actualSize { s += "disk size: \(SizeParser.human(a))\n" }
        if i.clusterSize > 0 { s += "cluster_size: \(i.clusterSize)\n" }
        if let b = i.backing {
            s += "backing file: \(b.name)"
            let full = ImageOpener.resolve(b.name, relativeTo: i.path)
            if full != b.name { s += " (actual path: \(full))" }
            s += "\n"
            if let f = b.format { s += "backing file format: \(f)\n" }
        }
        if let snaps = ((image as? LayeredImage)?.layer as? QCOW2Layer).flatMap({ try? $0.snapshots() }), !snaps.isEmpty {
            s += "Snapshot list:\n" + SnapshotOperation.table(snaps)
        }
        if i.dirty { s += "dirty flag: yes\n" }
        if !i.formatSpecific.isEmpty {
            s += "Format specific information:\n"
            for (k, v) in i.formatSpecific {
                s += "    \(k.replacingHyphens()): \(v.plain)\n"
            }
        }
        return s
    }
}

extension String {
    func replacingHyphens() -> String { String(map { $0 == "-" ? " " : $0 }) }
}

extension JSONValue {
    /// Scalar form for human output.
    var plain: String {
        switch self {
        case .string(let s): return s
        case .int(let i): return String(i)
        case .uint(let u): return String(u)
        case .bool(let b): return b ? "true" : "false"
        case .null: return "null"
        default: return rendered(pretty: false)
        }
    }
}
