/// On-disk headers of VMDK sparse extents (libvmdk "The VMDK sparse extent data file",
/// "The COWD sparse extent data file"; seSparse after qemu's block/vmdk.c, the format
/// being undocumented). Pure parse, validate and serialise; all little-endian.

/// The 512-byte header of a hosted sparse extent ("KDMV"), also the footer of a
/// stream-optimized one.
///
///     0 "KDMV" | 4 version | 8 flags | 12 capacity | 20 grainSize | 28 descriptorOffset
///     36 descriptorSize | 44 numGTEsPerGT | 48 rgdOffset | 56 gdOffset | 64 overHead
///     72 uncleanShutdown | 73 "\n \r\n" | 77 compressAlgorithm | 79 padding
///
/// Sizes and offsets are in sectors of 512 bytes.
public struct VMDKSparseHeader: Sendable, Equatable {
    public static let magic: [UInt8] = Array("KDMV".utf8)
    public static let flagNewlineTest: UInt32 = 1 << 0
    public static let flagRedundantGD: UInt32 = 1 << 1
    public static let flagZeroedGTE: UInt32 = 1 << 2
    public static let flagCompressed: UInt32 = 1 << 16
    public static let flagMarkers: UInt32 = 1 << 17
    /// gdOffset of a stream-optimized header whose grain directory follows the data;
    /// the footer near the end of the file holds the real one.
    public static let gdAtEnd: UInt64 = .max
    public static let compressionDeflate: UInt16 = 1

    public var version: UInt32 = 1
    public var flags: UInt32 = 0
    public var capacity: UInt64 = 0
    public var grainSize: UInt64 = 128
    public var descriptorOffset: UInt64 = 0
    public var descriptorSize: UInt64 = 0
    public var numGTEsPerGT: UInt32 = 512
    public var rgdOffset: UInt64 = 0
    public var gdOffset: UInt64 = 0
    public var overHead: UInt64 = 0
    public var uncleanShutdown: UInt8 = 0
    public var checkBytes: [UInt8] = [0x0a, 0x20, 0x0d, 0x0a]
    public var compressAlgorithm: UInt16 = 0

    public init() {}

    public static func parse(_ b: [UInt8]) -> VMDKSparseHeader? {
        guard b.count >= 512, b.starts(with: magic) else { return nil }
        let r = ByteReader(b)
        var h = VMDKSparseHeader()
        h.version = r.le32(4)
        h.flags = r.le32(8)
        h.capacity = r.le64(12)
        h.grainSize = r.le64(20)
        h.descriptorOffset = r.le64(28)
        h.descriptorSize = r.le64(36)
        h.numGTEsPerGT = r.le32(44)
        h.rgdOffset = r.le64(48)
        h.gdOffset = r.le64(56)
        h.overHead = r.le64(64)
        h.uncleanShutdown = b[72]
        h.checkBytes = Array(b[73..<77])
        h.compressAlgorithm = r.le16(77)
        return h
    }

    public func serialized() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 512)
        b.putBytes(Self.magic, at: 0)
        b.putLE32(version, at: 4)
        b.putLE32(flags, at: 8)
        b.putLE64(capacity, at: 12)
        b.putLE64(grainSize, at: 20)
        b.putLE64(descriptorOffset, at: 28)
        b.putLE64(descriptorSize, at: 36)
        b.putLE32(numGTEsPerGT, at: 44)
        b.putLE64(rgdOffset, at: 48)
        b.putLE64(gdOffset, at: 56)
        b.putLE64(overHead, at: 64)
        b[72] = uncleanShutdown
        b.putBytes(checkBytes.count == 4 ? checkBytes : [0x0a, 0x20, 0x0d, 0x0a], at: 73)
        b.putLE16(compressAlgorithm, at: 77)
        return b
    }

    public var isCompressed: Bool { compressAlgorithm == Self.compressionDeflate }
    public var hasMarkers: Bool { flags & Self.flagMarkers != 0 }
    public var hasZeroedGTE: Bool { flags & Self.flagZeroedGTE != 0 }
    public var usesRedundantGD: Bool { flags & Self.flagRedundantGD != 0 }
}

/// A stream-optimized marker (libvmdk "Markers"): a grain marker `lba, size, data…`
/// when size > 0, else a metadata marker `numSectors, 0, type` padded to 512 bytes.
enum VMDKMarker {
    static let endOfStream: UInt32 = 0
    static let grainTable: UInt32 = 1
    static let grainDirectory: UInt32 = 2
    static let footer: UInt32 = 3

    static func metadata(type: UInt32, sectors: UInt64) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 512)
        b.putLE64(sectors, at: 0)
        b.putLE32(type, at: 12)
        return b
    }
}

/// The 2048-byte header of an ESX sparse extent ("COWD", vmfsSparse); read only.
///
///     0 "COWD" | 4 version | 8 flags | 12 numSectors | 16 grainSize | 20 gdOffset
///     24 numGDEntries | 28 freeSector | …
///
/// Grain tables hold 4096 entries.
struct VMDKCOWDHeader: Sendable {
    static let magic: [UInt8] = Array("COWD".utf8)
    static let gtEntries: UInt64 = 4096
    var version: UInt32
    var flags: UInt32
    var capacity: UInt64
    var grainSize: UInt64
    var gdOffset: UInt64
    var gdEntries: UInt64

    static func parse(_ b: [UInt8]) -> VMDKCOWDHeader? {
        guard b.count >= 32, b.starts(with: magic) else { return nil }
        let r = ByteReader(b)
        return VMDKCOWDHeader(version: r.le32(4), flags: r.le32(8), capacity: UInt64(r.le32(12)), grainSize: UInt64(r.le32(16)),
                              gdOffset: UInt64(r.le32(20)), gdEntries: UInt64(r.le32(24)))
    }
}

/// The seSparse (ESXi 6.5+) constant header, 512 bytes of little-endian u64s; read
/// only. Checked as strictly as qemu does, the format having no public specification.
struct VMDKSESparseHeader: Sendable {
    static let magic: UInt64 = 0xcafe_babe
    static let volatileMagic: UInt64 = 0xcafe_cafe
    static let version: UInt64 = 0x0000_0002_0000_0001
    var capacity: UInt64
    var grainSize: UInt64
    var grainTableSize: UInt64
    var volatileHeaderOffset: UInt64
    var grainDirOffset: UInt64
    var grainDirSize: UInt64
    var grainTablesOffset: UInt64
    var grainTablesSize: UInt64
    var grainsOffset: UInt64
    var grainsSize: UInt64

    /// Parse and check; the error says what is unsupported.
    static func parse(_ b: [UInt8]) throws -> VMDKSESparseHeader {
        let r = ByteReader(b)
        guard b.count >= 512, r.le64(0) == magic else { throw ImageError(.invalidFormat, "not a seSparse extent (bad magic)") }
        let q = { (i: Int) in r.le64(i * 8) }
        guard q(1) == version else { throw ImageError(.unsupported, "seSparse version 0x\(String(q(1), radix: 16)) is not supported (0x200000001 is)") }
        guard q(3) == 8 else { throw ImageError(.unsupported, "seSparse grain size \(q(3)) sectors is not supported (8 is)") }
        guard q(4) == 64 else { throw ImageError(.unsupported, "seSparse grain table size \(q(4)) sectors is not supported (64 is)") }
        guard q(5) == 0 else { throw ImageError(.unsupported, "seSparse flags 0x\(String(q(5), radix: 16)) are not supported") }
        guard q(6) == 0 && q(7) == 0 && q(8) == 0 && q(9) == 0, b[208..<512].allSatisfy({ $0 == 0 }) else {
            throw ImageError(.unsupported, "seSparse header has reserved fields set; this version is not supported")
        }
        return VMDKSESparseHeader(capacity: q(2), grainSize: q(3), grainTableSize: q(4), volatileHeaderOffset: q(10),
                                  grainDirOffset: q(16), grainDirSize: q(17), grainTablesOffset: q(18), grainTablesSize: q(19),
                                  grainsOffset: q(24), grainsSize: q(25))
    }

    /// The volatile header must have its magic and no journal waiting for replay.
    static func checkVolatile(_ b: [UInt8]) throws {
        let r = ByteReader(b)
        guard b.count >= 512, r.le64(0) == volatileMagic else { throw ImageError(.corrupt, "seSparse volatile header has a bad magic") }
        if r.le64(24) != 0 {
            throw ImageError(.unsupported, "seSparse journal needs replay; open and close it on ESXi first")
        }
    }
}
