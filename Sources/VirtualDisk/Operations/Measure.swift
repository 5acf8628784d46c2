/// `measure`: how large an image of a format would be for a given size or source.
public enum MeasureOperation {
    public struct Result: Sendable {
        public var required: UInt64
        public var fullyAllocated: UInt64
    }

    /// Bytes of data the source holds (data extents), rounded to `unit`.
    static func allocatedBytes(_ source: DiskImage, unit: UInt64) throws -> UInt64 {
        var total: UInt64 = 0
        var lastUnit: UInt64 = .max
        for e in try MapOperation.extents(source) where e.isData {
            var u = e.offset / unit
            let end = (e.end - 1) / unit
            if u == lastUnit { u += 1 }
            if u <= end { total += (end - u + 1) * unit }
            lastUnit = end
        }
        return total
    }

    public static func run(format: ImageFormat, options: [(String, String)], size: UInt64?, source: DiskImage?) throws -> Result {
        let virtualSize = try size ?? source?.info.virtualSize ?? { throw ImageError(.invalidArgument, "give --size or a source image") }()
        switch format {
        case .raw:
            let data = try source.map { try allocatedBytes($0, unit: 512) } ?? virtualSize
            return Result(required: data, fullyAllocated: virtualSize)
        case .qcow2:
            var cs: UInt64 = 65536, refBits: UInt64 = 16, extended = false
            for (k, v) in options {
                switch k {
                case "cluster_size": cs = try SizeParser.parse(v)
                case "refcount_bits": refBits = try SizeParser.parse(v)
                case "extended_l2": extended = try OptionList.bool(v, k)
                default: break
                }
            }
            guard cs.isPowerOfTwo, cs >= 512, cs <= 2 << 20 else { throw ImageError(.invalidArgument, "invalid cluster_size") }
            guard refBits.isPowerOfTwo, refBits <= 64 else {
                throw ImageError(.invalidArgument, "refcount_bits must be a power of two up to 64 (got \(refBits))")
            }
            // qcow2 images end well before 2^63 bytes (qemu's limit is 2^61 with L1 tables of 32 MiB).
            guard virtualSize <= 1 << 62 else {
                throw ImageError(.invalidArgument, "virtual size \(virtualSize) is too large for a qcow2 image")
            }
            func metadata(_ data: UInt64) -> UInt64 {
                let entry: UInt64 = extended ? 16 : 8
                let perL2 = cs / entry
                let clusters = virtualSize.alignedUp(cs) / cs
                let l1 = ((clusters + perL2 - 1) / perL2 * 8).alignedUp(cs)
                let l2 = min((data / cs + perL2 - 1) / perL2, (clusters + perL2 - 1) / perL2) * cs
                // Refcounts for everything, including themselves (fixed point).
                var total = cs + l1 + l2 + data
                var refs: UInt64 = 0
                for _ in 0..<4 {
                    let blocks = ((total + refs) / cs + cs * 8 / refBits - 1) / (cs * 8 / refBits)
                    let table = (blocks * 8).alignedUp(cs)
                    refs = blocks * cs + table
                }
                total += refs
                return total
            }
            let data = try source.map { try allocatedBytes($0, unit: cs) } ?? 0
            return Result(required: metadata(data), fullyAllocated: metadata(virtualSize.alignedUp(cs)))
        default:
            throw ImageError(.unsupported, "measuring \(format.rawValue) images is not supported by this version of vloop")
        }
    }
}
