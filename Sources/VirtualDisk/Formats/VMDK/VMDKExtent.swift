/// One extent of a VMDK disk: a run of the guest disk stored in one way (a flat file,
/// a sparse extent file, zeroes). `VMDKLayer` lays extents end to end; each answers
/// in offsets relative to its own start.
protocol VMDKExtentStore: AnyObject, Sendable {
    /// Bytes of the guest disk this extent covers.
    var length: UInt64 { get }
    var access: VMDKDescriptor.Access { get }
    /// The extent accepts writes (its file is open read-write and vloop can write it).
    var canWrite: Bool { get }
    /// Grain size for sparse extents, 0 for flat ones.
    var grainBytes: UInt64 { get }
    var typeName: String { get }
    var file: HostFile? { get }
    var isCompressed: Bool { get }

    func map(at offset: UInt64, length: UInt64) throws -> [LayerRun]
    /// Decode a compressed grain; `token` is what `map` returned.
    func readEncoded(token: UInt64, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws
    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, below: BelowReader) throws
    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, hasBacking: Bool, below: BelowReader) throws
    func discard(at offset: UInt64, length: UInt64, hasBacking: Bool) throws
    func flush() throws
    func close() throws
}

extension VMDKExtentStore {
    func readEncoded(token: UInt64, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        throw ImageError(.corrupt, "\(typeName) extent has no compressed data", path: file?.path)
    }
    var isCompressed: Bool { false }
    func flush() throws {}
    func close() throws {}
}

/// FLAT and VMFS extents: the guest bytes lie plainly in a file from `start` on. Bytes
/// past the end of the file read as zeroes (qemu reads them so too).
final class VMDKFlatExtent: VMDKExtentStore, Sendable {
    let flatFile: HostFile
    let start: UInt64
    let length: UInt64
    let access: VMDKDescriptor.Access
    let typeName: String
    var grainBytes: UInt64 { 0 }
    var file: HostFile? { flatFile }
    var canWrite: Bool { flatFile.writable && access == .readWrite }

    init(file: HostFile, start: UInt64, length: UInt64, access: VMDKDescriptor.Access, typeName: String) {
        self.flatFile = file
        self.start = start
        self.length = length
        self.access = access
        self.typeName = typeName
    }

    func map(at offset: UInt64, length: UInt64) throws -> [LayerRun] {
        [LayerRun(offset: offset, length: length, kind: .stored(file: flatFile, hostOffset: start + offset))]
    }

    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, below: BelowReader) throws {
        try flatFile.write(data, at: start + offset)
    }

    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, hasBacking: Bool, below: BelowReader) throws {
        if mayUnmap && flatFile.punchHole(at: start + offset, length: length) { return }
        try flatFile.writeZeroes(at: start + offset, length: length)
    }

    func discard(at offset: UInt64, length: UInt64, hasBacking: Bool) throws {
        // Advisory: give the space back where the file system can.
        flatFile.punchHole(at: start + offset, length: length)
    }

    func flush() throws {
        if flatFile.writable { try flatFile.sync() }
    }
}

/// ZERO extents read as zeroes and store nothing; NOACCESS extents refuse every access.
final class VMDKZeroExtent: VMDKExtentStore, Sendable {
    let length: UInt64
    let access: VMDKDescriptor.Access
    let name: String?
    let descriptorPath: String
    var grainBytes: UInt64 { 0 }
    var file: HostFile? { nil }
    var typeName: String { access == .noAccess ? "NOACCESS" : "ZERO" }
    var canWrite: Bool { false }

    init(length: UInt64, access: VMDKDescriptor.Access, name: String?, descriptorPath: String) {
        self.length = length
        self.access = access
        self.name = name
        self.descriptorPath = descriptorPath
    }

    private func denied() -> ImageError {
        ImageError(.readOnly, "extent \(name.map { "'\($0)' " } ?? "")is marked NOACCESS in the descriptor; its data may not be read or written",
                   path: descriptorPath, format: "vmdk")
    }

    func map(at offset: UInt64, length: UInt64) throws -> [LayerRun] {
        if access == .noAccess { throw denied() }
        return [LayerRun(offset: offset, length: length, kind: .zero)]
    }

    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, below: BelowReader) throws {
        if access == .noAccess { throw denied() }
        throw ImageError(.readOnly, "a ZERO extent cannot store data", path: descriptorPath, format: "vmdk")
    }

    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, hasBacking: Bool, below: BelowReader) throws {
        if access == .noAccess { throw denied() }
    }

    func discard(at offset: UInt64, length: UInt64, hasBacking: Bool) throws {}
}
