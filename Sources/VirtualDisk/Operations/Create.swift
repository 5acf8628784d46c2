/// `create`: a new image of any writable format, with qemu-img's option names.
public struct CreateRequest: Sendable {
    public var path: String
    public var format: ImageFormat
    public var size: UInt64?
    public var options: [(String, String)] = []
    public var backingFile: String?
    public var backingFormat: ImageFormat?

    public init(path: String, format: ImageFormat, size: UInt64?) {
        self.path = path
        self.format = format
        self.size = size
    }
}

public enum CreateOperation {
    public static func run(_ r: CreateRequest, warn: @escaping @Sendable (String) -> Void = { _ in }) throws {
        var r = r
        // backing_file / backing_fmt may come as -o options too.
        var rest: [(String, String)] = []
        for (k, v) in r.options {
            switch k {
            case "backing_file": r.backingFile = v
            case "backing_fmt":
                guard let f = ImageFormat(name: v) else { throw ImageError(.invalidArgument, "unknown backing format '\(v)'") }
                r.backingFormat = f
            case "size": r.size = try SizeParser.parse(v)
            default: rest.append((k, v))
            }
        }
        var size = r.size
        if let b = r.backingFile {
            // The backing file must open, and gives the size when none is given.
            let resolved = ImageOpener.resolve(b, relativeTo: r.path)
            var o = OpenOptions(format: r.backingFormat)
            o.forceShare = true
            o.userNamed = [b, resolved]
            let backing = try ImageOpener.open(resolved, options: o)
            if r.backingFormat == nil {
                r.backingFormat = ImageFormat(name: backing.info.format)
            }
            if size == nil { size = backing.virtualSize }
            try backing.close()
        }
        guard let size else {
            throw ImageError(.invalidArgument, "no size given; add a size (e.g. 10G) or a backing file with -b", path: r.path)
        }
        let imagePath = r.path
        let aux: @Sendable (String, Bool) throws -> HostFile = { name, writable in
            try HostFile(path: ImageOpener.resolve(name, relativeTo: imagePath), writable: writable, create: true)
        }
        func unknown(_ k: String) -> ImageError {
            ImageError(.invalidArgument, "'\(r.format.rawValue)' does not support option '\(k)'")
        }
        switch r.format {
        case .raw:
            var prealloc = "off"
            for (k, v) in rest {
                guard k == "preallocation" else { throw unknown(k) }
                prealloc = v
            }
            if r.backingFile != nil { throw ImageError(.invalidArgument, "raw images cannot have a backing file") }
            try RawLayer.create(path: r.path, size: size, preallocation: prealloc)
        case .qcow2:
            var o = QCOW2CreateOptions(size: size)
            for (k, v) in rest {
                switch k {
                case "cluster_size": o.clusterSize = try SizeParser.parse(v)
                case "compat": o.compat = v
                case "lazy_refcounts": o.lazyRefcounts = try OptionList.bool(v, k)
                case "refcount_bits": o.refcountBits = try SizeParser.parse(v)
                case "extended_l2": o.extendedL2 = try OptionList.bool(v, k)
                case "compression_type": o.compressionType = v
                case "data_file": o.dataFile = v
                case "data_file_raw": o.dataFileRaw = try OptionList.bool(v, k)
                case "preallocation": o.preallocation = v
                case "encryption", "encrypt.format":
                    throw ImageError(.unsupported, "encrypted qcow2 images are not supported")
                default: throw unknown(k)
                }
            }
            o.backingFile = r.backingFile
            o.backingFormat = r.backingFormat?.rawValue
            try QCOW2Layer.create(path: r.path, options: o, openAuxiliary: aux)
        case .qcow:
            var clusterSize: UInt64?
            for (k, v) in rest {
                switch k {
                case "cluster_size": clusterSize = try SizeParser.parse(v)
                case "encryption", "encrypt.format": throw ImageError(.unsupported, "encrypted qcow images are not supported")
                default: throw unknown(k)
                }
            }
            try QCOWLayer.create(path: r.path, size: size, clusterSize: clusterSize, backingFile: r.backingFile)
        default:
            try FormatCreators.create(r, size: size, options: rest)
        }
    }
}

/// Creators of formats outside this file register here.
enum FormatCreators {
    static func create(_ r: CreateRequest, size: UInt64, options: [(String, String)]) throws {
        switch r.format {
        case .vhd: try VHDLayer.create(r, size: size, options: options)
        case .vhdx: try VHDXLayer.create(r, size: size, options: options)
        case .vdi: try VDILayer.create(r, size: size, options: options)
        case .vmdk: try VMDKLayer.create(r, size: size, options: options)
        default:
            throw ImageError(.unsupported, "creating \(r.format.rawValue) images is not supported by this version of vloop")
        }
    }
}
