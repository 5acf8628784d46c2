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
