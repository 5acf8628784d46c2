/// The VDI pre-header and header (VirtualBox `VDICore.h`; the Kaitai description in
/// `../shared/specs/kaitai-filesystem-vdi.ksy`; qemu `block/vdi.c`). Little-endian.
///
///     0x000 text "<<< … >>>\n" (64)      0x040 signature 0xbeda107f   0x044 version 1.1
///     0x048 header size (0x180, or 0x190 with the LCHS geometry)
///     0x04c image type  1 dynamic, 2 static, 3 undo, 4 differencing
///     0x050 image flags  0x054 description (256)
///     0x154 block map offset   0x158 data offset
///     0x15c legacy geometry: cylinders, heads, sectors, sector size (512)   0x16c unused
///     0x170 disk size (u64)    0x178 block size   0x17c block extra
///     0x180 blocks in image    0x184 blocks allocated
///     0x188 UUID image   0x198 UUID last snapshot (modification)
///     0x1a8 UUID link (the parent's image UUID)   0x1b8 UUID parent modification
///     0x1c8 LCHS geometry (16, header size 0x190 only)
///
/// Data block `b` (a block map entry below 0xfffffffe) starts at
/// `data offset + b × (block extra + block size)`; its guest bytes follow the
/// `block extra` bytes. Pure parse, validate and serialise: the bytes are kept whole, so
/// fields this code does not know survive a rewrite.
struct VDIHeader {
    static let signature: UInt32 = 0xbeda_107f
    static let version11: UInt32 = 0x0001_0001
    /// The pre-header: text, signature, version.
    static let preHeaderSize = 0x48
    /// `sizeof(VDIHEADER1)`: the smallest version 1 header.
    static let headerSizeV1: UInt32 = 0x180
    /// `sizeof(VDIHEADER1PLUS)`: with the LCHS geometry.
    static let headerSizeV1Plus: UInt32 = 0x190
    /// What is read and kept: the pre-header and the largest header this code knows.
    static let storedSize = 0x200

    /// Block map entries that are not block numbers (VirtualBox's names).
    static let blockFree: UInt32 = 0xffff_ffff
    static let blockZero: UInt32 = 0xffff_fffe

    /// qemu's limit (`VDI_BLOCKS_IN_IMAGE_MAX`): the block map, rounded up to a sector,
    /// stays below 2 GiB, and every offset stays a 32-bit number.
    static let maxBlocks: UInt32 = 0x1fff_ff80
    /// Block sizes accepted: powers of two from a sector to 256 MiB (VirtualBox takes any
    /// power of two; qemu only 1 MiB).
    static let maxBlockSize: UInt64 = 256 << 20
    static let maxBlockExtra: UInt32 = 1 << 20
    static let defaultBlockSize: UInt64 = 1 << 20
    static let text = "<<< vloop Virtual Disk Image >>>\n"

    enum ImageType: UInt32 {
        case dynamic = 1, fixed = 2, undo = 3, differencing = 4
        var name: String {
            switch self {
            case .dynamic: return "dynamic"
            case .fixed: return "static"
            case .undo: return "undo"
            case .differencing: return "differencing"
            }
        }
        /// Undo images (VirtualBox 1.x) link to a parent as differencing images do.
        var hasParent: Bool { self == .differencing || self == .undo }
    }

    private(set) var bytes: [UInt8]

    init(bytes: [UInt8]) {
        precondition(bytes.count == Self.storedSize)
        self.bytes = bytes
    }

    /// A new header laid out as qemu-img writes it: version 1.1, header size 0x180, the
    /// block map at 0x200 and the data after it, sector-aligned; fresh image and
    /// modification UUIDs.
    init(type: ImageType, diskSize: UInt64, blockSize: UInt32, blocks: UInt32) {
        bytes = [UInt8](repeating: 0, count: Self.storedSize)
        bytes.putBytes(Array(Self.text.utf8), at: 0)
        bytes.putLE32(Self.signature, at: 0x40)
        bytes.putLE32(Self.version11, at: 0x44)
        bytes.putLE32(Self.headerSizeV1, at: 0x48)
        imageType = type.rawValue
        offsetBmap = 0x200
        offsetData = 0x200 + UInt32((UInt64(blocks) * 4).alignedUp(512))
        bytes.putLE32(512, at: 0x168)
        self.diskSize = diskSize
        bytes.putLE32(blockSize, at: 0x178)
        blocksInImage = blocks
        uuidImage = VDIUUID.random()
        uuidLastSnap = VDIUUID.random()
    }

    private var r: ByteReader { ByteReader(bytes) }

    var textField: String { String(decoding: bytes[0..<0x40].prefix { $0 != 0 }, as: UTF8.self) }
    var storedSignature: UInt32 { r.le32(0x40) }
    var version: UInt32 { r.le32(0x44) }
    var majorVersion: UInt32 { version >> 16 }
    var headerSize: UInt32 { r.le32(0x48) }
    var imageType: UInt32 {
        get { r.le32(0x4c) }
        set { bytes.putLE32(newValue, at: 0x4c) }
    }
    var type: ImageType? { ImageType(rawValue: imageType) }
    var imageFlags: UInt32 { r.le32(0x50) }
    var offsetBmap: UInt32 {
        get { r.le32(0x154) }
        set { bytes.putLE32(newValue, at: 0x154) }
    }
    var offsetData: UInt32 {
        get { r.le32(0x158) }
        set { bytes.putLE32(newValue, at: 0x158) }
    }
    var sectorSize: UInt32 { r.le32(0x168) }
    var diskSize: UInt64 {
        get { r.le64(0x170) }
        set { bytes.putLE64(newValue, at: 0x170) }
    }
    var blockSize: UInt32 { r.le32(0x178) }
    var blockExtra: UInt32 { r.le32(0x17c) }
    var blocksInImage: UInt32 {
        get { r.le32(0x180) }
        set { bytes.putLE32(newValue, at: 0x180) }
    }
    var blocksAllocated: UInt32 {
        get { r.le32(0x184) }
        set { bytes.putLE32(newValue, at: 0x184) }
    }
    var uuidImage: VDIUUID {
        get { VDIUUID(bytes: r.slice(0x188, 16)) }
        set { bytes.putBytes(newValue.bytes, at: 0x188) }
    }
    var uuidLastSnap: VDIUUID {
        get { VDIUUID(bytes: r.slice(0x198, 16)) }
        set { bytes.putBytes(newValue.bytes, at: 0x198) }
    }
    var uuidLink: VDIUUID {
        get { VDIUUID(bytes: r.slice(0x1a8, 16)) }
        set { bytes.putBytes(newValue.bytes, at: 0x1a8) }
    }
    var uuidParentModification: VDIUUID {
        get { VDIUUID(bytes: r.slice(0x1b8, 16)) }
        set { bytes.putBytes(newValue.bytes, at: 0x1b8) }
    }

    /// Guest bytes: the disk size rounded up to a sector, as qemu reads it ('VBoxManage
    /// convertfromraw' writes odd sizes).
    var virtualSize: UInt64 { diskSize.alignedUp(512) }
    /// Bytes one data block takes in the file.
    var blockSpan: UInt64 { UInt64(blockExtra) + UInt64(blockSize) }
    var mapBytes: UInt64 { UInt64(blocksInImage) * 4 }

    /// The bytes that hold known header fields: never past the block map, never more
    /// than this code knows (so a larger header's unknown tail is left alone).
    var writableLength: Int {
        let known = Self.preHeaderSize + Int(min(headerSize, Self.headerSizeV1Plus))
        return min(known, Int(offsetBmap))
    }

    /// The bytes to write at offset 0.
    func serialized() -> [UInt8] { Array(bytes[0..<writableLength]) }

    static func parse(_ bytes: [UInt8]) -> VDIHeader? {
        guard bytes.count == storedSize, ByteReader(bytes).le32(0x40) == signature else { return nil }
        return VDIHeader(bytes: bytes)
    }

    /// Check every field against the others and the file, so that nothing later can
    /// trap, overflow or read outside the file: the version, the header size, sector
    /// and block sizes, the block map against the file and the cap, the data offset
    /// against the block map, the disk against the block map.
    func validate(fileSize: UInt64, path: String) throws {
        func corrupt(_ m: String) -> ImageError { ImageError(.corrupt, m, path: path, format: "vdi") }
        func unsupported(_ m: String) -> ImageError { ImageError(.unsupported, m, path: path, format: "vdi") }
        guard majorVersion == 1 else {
            throw unsupported("VDI version \(majorVersion).\(version & 0xffff) is not supported (1.x is); convert it with 'VBoxManage clonemedium'")
        }
        guard headerSize >= Self.headerSizeV1 else {
            throw corrupt("header size \(headerSize) is smaller than a version 1 header (\(Self.headerSizeV1) bytes)")
        }
        guard type != nil else {
            throw unsupported("image type \(imageType) is not supported (1 dynamic, 2 static, 3 undo, 4 differencing are)")
        }
        guard sectorSize == 512 else {
            throw unsupported("sector size \(sectorSize) is not supported (512 is)")
        }
        let bs = UInt64(blockSize)
        guard bs.isPowerOfTwo, bs >= 512, bs <= Self.maxBlockSize else {
            throw corrupt("block size \(bs) is not a power of two from 512 bytes to 256 MiB")
        }
        guard blockExtra == 0 || (UInt64(blockExtra).isPowerOfTwo && blockExtra <= Self.maxBlockExtra) else {
            throw corrupt("block extra data size \(blockExtra) is not zero or a power of two up to 1 MiB")
        }
        guard blocksInImage <= Self.maxBlocks else {
            throw corrupt("block map of \(blocksInImage) entries exceeds the limit of \(Self.maxBlocks)")
        }
        let minMap = UInt64(Self.preHeaderSize) + UInt64(Self.headerSizeV1)
        guard UInt64(offsetBmap) >= minMap else {
            throw corrupt("block map offset \(offsetBmap) lies inside the header (which ends at \(minMap))")
        }
        let mapEnd = UInt64(offsetBmap) + mapBytes
        guard mapEnd <= fileSize else {
            throw corrupt("block map of \(blocksInImage) entries at offset \(offsetBmap) does not fit in the file (\(fileSize) bytes); the file is truncated or the header is damaged")
        }
        guard UInt64(offsetData) >= mapEnd else {
            throw corrupt("data offset \(offsetData) lies inside the block map (\(offsetBmap)..<\(mapEnd))")
        }
        guard UInt64(offsetData) <= fileSize else {
            throw corrupt("data offset \(offsetData) lies past the end of the file (\(fileSize) bytes); the file is truncated or the header is damaged")
        }
        guard diskSize <= UInt64(blocksInImage) * bs else {
            throw corrupt("disk size \(diskSize) is larger than the \(blocksInImage) blocks of \(bs) bytes the block map covers")
        }
    }

    /// The description field (comment), up to its first NUL.
    var comment: String { String(decoding: bytes[0x54..<0x154].prefix { $0 != 0 }, as: UTF8.self) }
}

/// A VirtualBox UUID as stored (IPRT's `RTUUID`): the first three fields little-endian,
/// the rest as in RFC 4122. Compared as stored; printed in the usual form.
struct VDIUUID: Equatable, Hashable, CustomStringConvertible {
    var bytes: [UInt8]

    init(bytes: [UInt8]) {
        self.bytes = bytes.count == 16 ? bytes : [UInt8](repeating: 0, count: 16)
    }

    static let null = VDIUUID(bytes: [UInt8](repeating: 0, count: 16))
    var isNull: Bool { bytes.allSatisfy { $0 == 0 } }

    /// A random (version 4) UUID in the stored layout.
    static func random() -> VDIUUID {
        var g = SystemRandomNumberGenerator()
        var b = (0..<16).map { _ in UInt8.random(in: 0...255, using: &g) }
        // RFC 4122 byte 6 (version) is stored at 7, byte 8 (variant) stays at 8.
        b[7] = b[7] & 0x0f | 0x40
        b[8] = b[8] & 0x3f | 0x80
        return VDIUUID(bytes: b)
    }

    /// "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", fields as VirtualBox prints them.
    var description: String {
        let order = [3, 2, 1, 0, -1, 5, 4, -1, 7, 6, -1, 8, 9, -1, 10, 11, 12, 13, 14, 15]
        var s = ""
        for i in order {
            if i < 0 { s += "-"; continue }
            let h = String(bytes[i], radix: 16)
            s += h.count == 1 ? "0" + h : h
        }
        return s
    }
}
