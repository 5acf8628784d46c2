/// What an image can do beyond reading.
public struct Capabilities: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let writable = Capabilities(rawValue: 1 << 0)
    public static let discard = Capabilities(rawValue: 1 << 1)
    public static let efficientZero = Capabilities(rawValue: 1 << 2)
    public static let resize = Capabilities(rawValue: 1 << 3)
    public static let snapshots = Capabilities(rawValue: 1 << 4)
}

/// Where an image's backing file is named, as the image records it.
public struct BackingReference: Sendable, Equatable {
    /// The name as written in the image.
    public var name: String
    /// The format recorded in the image, if any.
    public var format: String?
    /// The name resolved against the image's directory.
    public var resolvedPath: String?
}

/// Static facts about an open image.
public struct ImageInfo: Sendable {
    public var format: String
    public var virtualSize: UInt64
    /// Allocation unit of this layer (cluster, block or grain size); 0 when none.
    public var clusterSize: UInt64
    public var logicalSectorSize: UInt32
    public var capabilities: Capabilities
    public var backing: BackingReference?
    public var path: String
    public var dirty: Bool
    /// Format-specific facts for `info`, as key/value pairs in qemu-img's naming.
    public var formatSpecific: [(String, JSONValue)]

    public init(format: String, virtualSize: UInt64, clusterSize: UInt64 = 0, logicalSectorSize: UInt32 = 512,
                capabilities: Capabilities, backing: BackingReference? = nil, path: String, dirty: Bool = false,
                formatSpecific: [(String, JSONValue)] = []) {
        self.format = format
        self.virtualSize = virtualSize
        self.clusterSize = clusterSize
        self.logicalSectorSize = logicalSectorSize
        self.capabilities = capabilities
        self.backing = backing
        self.path = path
        self.dirty = dirty
        self.formatSpecific = formatSpecific
    }
}

/// A virtual disk: the guest-visible bytes of an image (with its backing chain).
///
/// Synchronous and thread-safe: callers bring their own threads. Offsets are guest
/// offsets in bytes; lengths are bytes.
public protocol DiskImage: AnyObject, Sendable {
    var info: ImageInfo { get }
    /// The guest-visible size, cheap enough for every request (`info` gathers
    /// everything `vloop info` shows).
    var virtualSize: UInt64 { get }
    /// The image below this one, if it has a backing chain.
    var backingImage: DiskImage? { get }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws
    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws
    /// Make a range read as zeroes. With `mayUnmap`, space may be given back.
    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool) throws
    /// Tell the image a range is no longer needed. Afterwards it reads as zeroes or as
    /// the backing file's data, whichever the format defines.
    func discard(at offset: UInt64, length: UInt64) throws
    /// Runs of data, zero and unallocated covering `offset ..< offset+length`, through
    /// the whole chain (depth says which layer answered).
    func extents(at offset: UInt64, length: UInt64) throws -> [Extent]
    /// Data and metadata reach stable storage.
    func flush() throws
    /// Flush and release everything; the image is marked clean.
    func close() throws
}

extension DiskImage {
    public var virtualSize: UInt64 { info.virtualSize }

    /// Read into a new array (for tests and small metadata).
    public func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { try read(into: $0, at: offset) }
        return out
    }

    public func write(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try write($0, at: offset) }
    }

    /// Check that `offset ..< offset+length` lies inside the disk.
    func checkRange(_ offset: UInt64, _ length: UInt64) throws {
        let (end, overflow) = offset.addingReportingOverflow(length)
        let size = virtualSize
        if overflow || end > size {
            throw ImageError(.outOfRange, "request at \(offset)+\(length) is past the end of the disk (\(size) bytes)",
                             path: info.path, offset: offset)
        }
    }
}
