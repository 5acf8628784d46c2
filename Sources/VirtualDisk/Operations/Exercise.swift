#if canImport(Glibc)
import Glibc
#endif

/// Drives every read-side path of the engine over an image from an untrusted source:
/// open (without following names inside it), info, reads across the disk, block
/// status, check; then, on a scratch copy, a few writes and a flush. Errors are the
/// expected outcome for garbage; a trap, a hang or a huge allocation is a bug. Used by
/// the fuzz targets and by the regression tests that replay what they found.
public enum ImageExercise {
    public static func run(path: String, format: ImageFormat?, writable: Bool) {
        var o = OpenOptions(format: format, writable: writable)
        o.noBacking = true
        o.userNamed = [path]
        guard let img = try? ImageOpener.open(path, options: o) else { return }
        defer { try? img.close() }
        let info = img.info
        _ = InfoOperation.json(img, actualSize: nil).rendered()
        let size = info.virtualSize
        if size > 0 {
            var buf = [UInt8](repeating: 0, count: 65536)
            let probes: [UInt64] = [0, 512, 65536, size / 3, size / 2, size > 65536 ? size - 65536 : 0, size - 1]
            for p in probes where p < size {
                let n = Int(min(UInt64(buf.count), size - p))
                _ = try? buf.withUnsafeMutableBytes { try img.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: p) }
            }
            _ = try? img.extents(at: 0, length: min(size, 1 << 30))
            if writable {
                let data = [UInt8](repeating: 0xa5, count: 4096 + 17)
                for p in [UInt64(0), size / 2, size > 5000 ? size - 5000 : 0] where p + UInt64(data.count) <= size {
                    _ = try? img.write(data, at: p)
                }
                _ = try? img.writeZeroes(at: 0, length: min(size, 1 << 20), mayUnmap: true)
                _ = try? img.discard(at: 0, length: min(size, 1 << 20))
                _ = try? img.flush()
            }
        }
        if let c = (img as? LayeredImage)?.layer as? CheckableLayer {
            _ = try? c.check(repair: .none)
        }
    }
}

/// Drives the VMDK descriptor parser over untrusted text: parse, read every field,
/// serialise and parse again (the extents must survive the round trip), then open the
/// text as a VMDK image (extents of type ZERO need no other file) and exercise it.
public enum VMDKDescriptorExercise {
    public static func run(_ bytes: [UInt8], scratch: String) {
        guard let d = try? VMDKDescriptor.parse(bytes) else { return }
        _ = (d.version, d.encoding, d["createType"], d["parentCID"], d["parentFileNameHint"], d.extents.count)
        let again = try? VMDKDescriptor.parse(d.serialized())
        precondition(again?.extents.count == d.extents.count, "descriptor extents changed in a round trip")
        var edited = d
        edited.set("CID", VMDKDescriptor.hex(0x1234_5678))
        edited.set("parentFileNameHint", "x y", quoted: true)
        _ = try? VMDKDescriptor.parse(edited.serialized())
        guard bytes.count < 64 << 10 else { return }
        let fd = open(scratch, O_CREAT | O_TRUNC | O_WRONLY, 0o600)
        guard fd >= 0 else { return }
        _ = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        close(fd)
        ImageExercise.run(path: scratch, format: .vmdk, writable: false)
        ImageExercise.run(path: scratch, format: .vmdk, writable: true)
    }
}

/// Drives what the command line parses from untrusted text: sizes ("10G"), `-o` option
/// lists, format names, resize targets ("+1G"), cache budgets, then `measure` and
/// `create` with what came out (in `scratchDirectory`, small sizes only, and never an
/// option that names another file). The input is fields separated by newlines.
public enum ArgumentExercise {
    public static func run(_ bytes: [UInt8], scratchDirectory: String) {
        let fields = String(decoding: bytes, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        func field(_ i: Int) -> String { i < fields.count ? fields[i] : "" }
        let size = try? SizeParser.parse(field(0))
        if let size { _ = SizeParser.human(size) }
        let options = (try? OptionList.parse(field(1))) ?? []
        for (k, v) in options { _ = try? OptionList.bool(v, k) }
        let format = ImageFormat(name: field(2))
        _ = try? SizeParser.resizeTarget(field(3), current: size ?? 1 << 20)
        _ = try? SizeParser.cacheBudget(field(4))
        _ = try? MeasureOperation.run(format: format ?? .qcow2, options: options, size: size, source: nil)

        // Create only what stays small and inside the scratch directory.
        guard let format, let size, size <= 16 << 20 else { return }
        for (k, v) in options {
            if k.contains("file") || k.contains("fmt") || k == "size" { return }
            if k.hasSuffix("size"), (try? SizeParser.parse(v)).map({ $0 > 64 << 20 }) ?? false { return }
        }
        let path = scratchDirectory + "/created"
        unlink(path)
        var r = CreateRequest(path: path, format: format, size: size)
        r.options = options
        guard (try? CreateOperation.run(r)) != nil else { return }
        ImageExercise.run(path: path, format: format, writable: true)
        if let grown = try? SizeParser.resizeTarget(field(3), current: size), grown <= 32 << 20,
           let img = try? ImageOpener.open(path, options: {
               var o = OpenOptions(format: format, writable: true)
               o.noBacking = true
               o.userNamed = [path]
               return o
           }()) {
            _ = try? ResizeOperation.run(img, to: grown, shrink: true)
            try? img.close()
        }
        // Formats with more than one file (twoGbMaxExtent VMDK) leave extents beside it.
        if let dir = opendir(scratchDirectory) {
            var names: [String] = []
            while let entry = readdir(dir) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                if name.hasPrefix("created") { names.append(name) }
            }
            closedir(dir)
            for n in names { unlink(scratchDirectory + "/" + n) }
        }
    }
}
