#if canImport(Glibc)
import Glibc
#endif

/// How to open an image and its chain.
public struct OpenOptions: Sendable {
    /// The format of the named image; nil probes by content.
    public var format: ImageFormat?
    public var writable = false
    /// qemu-img -U: read even if another process writes.
    public var forceShare = false
    public var cache: MetadataCache = .shared
    /// Open without following the backing chain (rebase -u, info of one layer).
    public var noBacking = false
    /// Names the user gave on the command line: these may be protocol names or
    /// non-regular files. Names found inside images may not.
    public var userNamed: Set<String> = []
    /// Whether names inside the image (external data files, VMDK extents) may be
    /// opened at all; off for `check --untrusted`. An image's own file is always allowed.
    public var allowAuxiliaryFiles = true
    /// Where warnings go (probing a backing file whose format is not recorded).
    public var warn: @Sendable (String) -> Void = { _ in }
    public static let maxChainDepth = 16

    public init(format: ImageFormat? = nil, writable: Bool = false) {
        self.format = format
        self.writable = writable
    }
}

/// The one place names become files: the image the user named, backing files and
/// auxiliary files named inside images (with policy checks), image locks, chain depth
/// and cycle checks.
public enum ImageOpener {
    public static func open(_ path: String, options: OpenOptions) throws -> DiskImage {
        var visited: Set<FileID> = []
        return try open(path, options: options, depth: 0, visited: &visited, userNamed: true)
    }

    struct FileID: Hashable { let dev: UInt64; let ino: UInt64 }

    static func fileID(_ file: HostFile) -> FileID {
        var st = stat()
        fstat(file.fd, &st)
        return FileID(dev: UInt64(st.st_dev), ino: UInt64(st.st_ino))
    }

    /// Refuse names from image metadata that point outside plain files.
    static func vet(name: String, foundIn image: String, options: OpenOptions) throws {
        if options.userNamed.contains(name) { return }
        if let colon = name.firstIndex(of: ":"), !name[..<colon].contains("/") {
            let proto = String(name[..<colon])
            throw ImageError(.chain, "refers to '\(name)', a '\(proto):' protocol name; vloop opens only files named inside images (name it on the command line to allow it)",
                             path: image)
        }
    }

    static func sameFile(_ a: String, _ b: String) -> Bool {
        var sa = stat(), sb = stat()
        return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino
    }

    static func resolve(_ name: String, relativeTo image: String) -> String {
        if name.hasPrefix("/") { return name }
        if let slash = image.lastIndex(of: "/") {
            return String(image[...slash]) + name
        }
        return name
    }

    static func requireRegular(_ file: HostFile, name: String, foundIn image: String, options: OpenOptions) throws {
        if options.userNamed.contains(name) || file.isRegularFile { return }
        throw ImageError(.chain, "refers to '\(name)', which is not a regular file; vloop opens devices and directories only when named on the command line",
                         path: image)
    }

    static func open(_ path: String, options: OpenOptions, depth: Int, visited: inout Set<FileID>, userNamed: Bool) throws -> DiskImage {
        if depth > OpenOptions.maxChainDepth {
            throw ImageError(.chain, "backing chain is deeper than \(OpenOptions.maxChainDepth) images; check the chain for mistakes", path: path)
        }
        let file = try HostFile(path: path, writable: options.writable)
        if !userNamed && !file.isRegularFile && !options.userNamed.contains(path) {
            throw ImageError(.chain, "backing file is not a regular file", path: path)
        }
        let id = fileID(file)
        if !visited.insert(id).inserted {
            throw ImageError(.chain, "backing chain loops back to this image; fix it with 'vloop rebase -u -b NEW'", path: path)
        }
        let perms = ImageLock.permissions(writable: options.writable, forceShare: options.forceShare)
        try ImageLock.acquire(file, held: perms.held, shared: perms.shared)

        let format = try options.format ?? Probe.detect(file: file)
        let dir = path
        let auxOptions = options
        let context = OpenContext(writable: options.writable, cache: options.cache) { name, writable in
            try vet(name: name, foundIn: dir, options: auxOptions)
            let resolved = resolve(name, relativeTo: dir)
            if !auxOptions.allowAuxiliaryFiles && !sameFile(resolved, dir) {
                throw ImageError(.chain, "refers to another file, '\(name)'", path: dir)
            }
            let aux = try HostFile(path: resolved, writable: writable)
            try requireRegular(aux, name: name, foundIn: dir, options: auxOptions)
            return aux
        }
        let layer: FormatLayer = try ImageError.attributing(to: path) {
            try FormatRegistry.openLayer(format, file: file, context: context)
        }
        var backing: DiskImage?
        if !options.noBacking, let ref = layer.layerInfo.backing, !ref.name.isEmpty {
            try vet(name: ref.name, foundIn: path, options: options)
            let resolved = resolve(ref.name, relativeTo: path)
            var sub = options
            sub.writable = false
            sub.forceShare = options.forceShare
            if let f = ref.format {
                guard let known = ImageFormat(name: f) else {
                    throw ImageError(.chain, "backing file '\(ref.name)' has unknown format '\(f)'", path: path)
                }
                sub.format = known
            } else {
                sub.format = nil
                options.warn("\(path): backing file '\(ref.name)' has no recorded format; probing it. Record it with 'vloop rebase -u -b \(ref.name) -F FMT \(path)'")
            }
            do {
                backing = try open(resolved, options: sub, depth: depth + 1, visited: &visited, userNamed: options.userNamed.contains(ref.name))
            } catch let e as ImageError where e.code == .notFound {
                throw ImageError(.chain, "backing file '\(ref.name)' not found (looked for \(resolved)); restore it or rebase with 'vloop rebase -u -b NEW \(path)'", path: path)
            }
            if let v = layer as? BackingValidatingLayer, let backing {
                do { try v.validateBacking(backing) } catch { try? backing.close(); throw error }
            }
        }
        return LayeredImage(layer: layer, backing: backing, onClose: { ImageLock.release(file) })
    }
}

/// Maps a format to its layer implementation.
public enum FormatRegistry {
    static func openLayer(_ format: ImageFormat, file: HostFile, context: OpenContext) throws -> FormatLayer {
        switch format {
        case .raw: return try RawLayer(file: file)
        case .qcow2: return try QCOW2Layer.open(file: file, context: context)
        case .qcow: return try QCOWLayer.open(file: file, context: context)
        case .vhd: return try VHDLayer.open(file: file, context: context)
        case .vhdx: return try VHDXLayer.open(file: file, context: context)
        case .vdi: return try VDILayer.open(file: file, context: context)
        case .vmdk: return try VMDKLayer.open(file: file, context: context)
        default:
            throw ImageError(.unsupported, "\(format.rawValue) images are not supported by this version of vloop", format: format.rawValue)
        }
    }
}

extension ImageOpener {
    /// Open an image read-write over its backing file opened read-write too (commit).
    public static func openForCommit(_ path: String, format: ImageFormat?, backingFormat: ImageFormat?) throws -> DiskImage {
        var topOptions = OpenOptions(format: format, writable: true)
        topOptions.noBacking = true
        topOptions.userNamed = [path]
        let topOnly = try open(path, options: topOptions)
        guard let ref = topOnly.info.backing, let layered = topOnly as? LayeredImage else {
            try topOnly.close()
            throw ImageError(.invalidArgument, "image has no backing file to commit into", path: path)
        }
        do {
            try vet(name: ref.name, foundIn: path, options: topOptions)
            var o = OpenOptions(format: backingFormat, writable: true)
            o.userNamed = []
            let base = try open(resolve(ref.name, relativeTo: path), options: o)
            let file = (layered.layer as? QCOW2Layer)?.file
            return LayeredImage(layer: layered.layer, backing: base, onClose: { if let file { ImageLock.release(file) } })
        } catch {
            try? topOnly.close()
            throw error
        }
    }
}
