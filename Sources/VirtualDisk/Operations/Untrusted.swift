#if canImport(Glibc)
import Glibc
#endif

/// `check --untrusted`: a safety verdict for an image from a stranger, like a cloud's
/// image-upload checks. Safe means: a regular file holding exactly one image of the
/// claimed format, naming no other file (backing file, external data file, VMDK
/// extent) unless allowed, and consistent (no corruption; leaks are tolerated).
public struct SafetyVerdict: Sendable {
    public var path: String
    public var format: String?
    public var virtualSize: UInt64?
    public var problems: [String] = []
    public var safe: Bool { problems.isEmpty }

    public var json: JSONValue {
        var pairs: [(String, JSONValue)] = [("filename", .string(path)), ("safe", .bool(safe))]
        if let format { pairs.append(("format", .string(format))) }
        if let virtualSize { pairs.append(("virtual-size", .uint(virtualSize))) }
        pairs.append(("problems", .array(problems.map { .string($0) })))
        return .object(pairs)
    }
}

public enum UntrustedInspection {
    public static func inspect(path: String, claimed: ImageFormat?, allowBacking: Bool = false) -> SafetyVerdict {
        var v = SafetyVerdict(path: path)
        var st = stat()
        guard lstat(path, &st) == 0 else {
            v.problems.append("cannot stat the file: \(String(cString: strerror(errno)))")
            return v
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            v.problems.append("not a regular file (a device, directory, socket or symbolic link)")
            return v
        }
        let probed: ImageFormat
        do {
            probed = try Probe.detect(file: try HostFile(path: path, writable: false))
        } catch {
            v.problems.append("cannot read the file: \(error)")
            return v
        }
        v.format = probed.rawValue
        if let claimed, claimed != probed {
            v.problems.append("claimed to be \(claimed.rawValue) but its content is \(probed.rawValue)")
        }
        var o = OpenOptions(format: probed, writable: false)
        o.noBacking = true
        o.forceShare = true
        o.allowAuxiliaryFiles = false
        o.userNamed = [path]
        let image: DiskImage
        do {
            image = try ImageOpener.open(path, options: o)
        } catch let e as ImageError {
            v.problems.append(e.message)
            return v
        } catch {
            v.problems.append("\(error)")
            return v
        }
        defer { try? image.close() }
        let info = image.info
        v.virtualSize = info.virtualSize
        if let b = info.backing, !allowBacking {
            v.problems.append("has a backing file, '\(b.name)'")
        }
        for (key, value) in info.formatSpecific {
            if key == "data-file" { v.problems.append("has an external data file, \(value.plain)") }
        }
        if let check = (image as? LayeredImage)?.layer as? CheckableLayer {
            do {
                let report = try check.check(repair: .none)
                if !report.corruptions.isEmpty {
                    v.problems.append("\(report.corruptions.count) inconsistencies, first: \(report.corruptions[0])")
                }
            } catch let e as ImageError {
                v.problems.append("check failed: \(e.message)")
            } catch {
                v.problems.append("check failed: \(error)")
            }
        }
        return v
    }
}
