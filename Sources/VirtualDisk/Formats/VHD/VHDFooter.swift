#if canImport(Glibc)
import Glibc
#endif

/// The VHD hard disk footer (libvhdi VHD spec, "Footer"; Microsoft VHD spec 1.0, "Hard
/// Disk Footer Format"): 512 bytes, big-endian, at the end of every VHD and, for
/// dynamic and differencing disks, copied at offset 0.
///
///     0 cookie "conectix" | 8 features | 12 version | 16 data offset (header, or ~0)
///     24 time stamp | 28 creator app | 32 creator version | 36 creator host OS
///     40 original size | 48 current size | 56 geometry C(2) H(1) S(1) | 60 disk type
///     64 checksum | 68 unique id (16) | 84 saved state | 85 reserved (427)
///
/// Pure parse and serialise: the bytes are kept whole, so reserved and unknown fields
/// survive a rewrite.
struct VHDFooter: Equatable {
    static let size = 512
    static let cookie = Array("conectix".utf8)
    /// Seconds from the Unix epoch to the VHD epoch, 2000-01-01 00:00:00 UTC.
    static let epoch: Int = 946_684_800
    /// The largest CHS geometry, 65535 × 16 × 255: images with it state their size in
    /// `currentSize` whatever their creator (qemu's rule, iotest 146).
    static let maxGeometry = Geometry(cylinders: 65535, heads: 16, sectorsPerTrack: 255)
    /// The VHD size limit qemu enforces: 2040 GiB.
    static let maxSectors: UInt64 = 0xff00_0000

    enum DiskType: UInt32 {
        case fixed = 2, dynamic = 3, differencing = 4
        var name: String {
            switch self {
            case .fixed: return "fixed"
            case .dynamic: return "dynamic"
            case .differencing: return "differencing"
            }
        }
    }

    struct Geometry: Equatable {
        var cylinders: UInt16
        var heads: UInt8
        var sectorsPerTrack: UInt8
        var sectors: UInt64 { UInt64(cylinders) * UInt64(heads) * UInt64(sectorsPerTrack) }
    }

    /// The raw 512 bytes; the accessors below read and write fields in place.
    private(set) var bytes: [UInt8]

    init(bytes: [UInt8]) {
        precondition(bytes.count == Self.size)
        self.bytes = bytes
    }

    /// A new footer with qemu-img's fixed fields: features 2 (reserved bit, always set),
    /// version 1.0, creator version 5.3 (Virtual PC 2007), host OS "Wi2k".
    init(type: DiskType, currentSize: UInt64, geometry: Geometry, creatorApp: String) {
        bytes = [UInt8](repeating: 0, count: Self.size)
        bytes.putBytes(Self.cookie, at: 0)
        bytes.putBE32(2, at: 8)
        bytes.putBE32(0x0001_0000, at: 12)
        dataOffset = type == .fixed ? UInt64.max : 512
        timestamp = Self.now()
        self.creatorApp = creatorApp
        bytes.putBE32(0x0005_0003, at: 32)
        bytes.putBytes(Array("Wi2k".utf8), at: 36)
        originalSize = currentSize
        self.currentSize = currentSize
        self.geometry = geometry
        diskType = type.rawValue
        uniqueID = Self.newUniqueID()
    }

    private var r: ByteReader { ByteReader(bytes) }

    var hasCookie: Bool { bytes.starts(with: Self.cookie) }
    var features: UInt32 { r.be32(8) }
    var formatVersion: UInt32 { r.be32(12) }
    var dataOffset: UInt64 {
        get { r.be64(16) }
        set { bytes.putBE64(newValue, at: 16) }
    }
    var timestamp: UInt32 {
        get { r.be32(24) }
        set { bytes.putBE32(newValue, at: 24) }
    }
    /// Four bytes, kept as written ("win ", "d2v\0", "qem2"…).
    var creatorApp: String {
        get { String(decoding: bytes[28..<32], as: UTF8.self) }
        set {
            var b = Array(newValue.utf8.prefix(4))
            while b.count < 4 { b.append(0) }
            bytes.putBytes(b, at: 28)
        }
    }
    var creatorAppBytes: [UInt8] { Array(bytes[28..<32]) }
    var creatorVersion: UInt32 { r.be32(32) }
    var creatorOS: String { String(decoding: bytes[36..<40], as: UTF8.self) }
    var originalSize: UInt64 {
        get { r.be64(40) }
        set { bytes.putBE64(newValue, at: 40) }
    }
    var currentSize: UInt64 {
        get { r.be64(48) }
        set { bytes.putBE64(newValue, at: 48) }
    }
    var geometry: Geometry {
        get { Geometry(cylinders: r.be16(56), heads: bytes[58], sectorsPerTrack: bytes[59]) }
        set {
            bytes.putBE16(newValue.cylinders, at: 56)
            bytes[58] = newValue.heads
            bytes[59] = newValue.sectorsPerTrack
        }
    }
    var diskType: UInt32 {
        get { r.be32(60) }
        set { bytes.putBE32(newValue, at: 60) }
    }
    var type: DiskType? { DiskType(rawValue: diskType) }
    var storedChecksum: UInt32 { r.be32(64) }
    var uniqueID: [UInt8] {
        get { Array(bytes[68..<84]) }
        set { bytes.putBytes(newValue, at: 68) }
    }
    var savedState: Bool { bytes[84] != 0 }

    /// One's complement of the byte sum, the checksum field counted as zero.
    var computedChecksum: UInt32 { VHDFooter.checksum(bytes, skipping: 64) }
    var checksumIsValid: Bool { storedChecksum == computedChecksum }

    /// The bytes to write: the footer with its checksum brought up to date.
    func serialized() -> [UInt8] {
        var out = bytes
        out.putBE32(computedChecksum, at: 64)
        return out
    }

    /// Sum every byte except the 4-byte checksum field at `skipping`, then complement.
    static func checksum(_ bytes: [UInt8], skipping at: Int) -> UInt32 {
        var sum: UInt32 = 0
        for (i, b) in bytes.enumerated() where i < at || i >= at + 4 {
            sum &+= UInt32(b)
        }
        return ~sum
    }

    /// Parse 512 bytes. Only the cookie is required here; the caller decides what a
    /// checksum mismatch means (a second copy may be good).
    static func parse(_ bytes: [UInt8]) -> VHDFooter? {
        guard bytes.count == size, bytes.starts(with: cookie) else { return nil }
        return VHDFooter(bytes: bytes)
    }

    // MARK: virtual size

    /// Creators whose images state their size in `currentSize`, not in the geometry:
    /// Hyper-V and Windows ("win "), Disk2vhd (both spellings seen), qemu with
    /// force_size ("qem2"), XenServer ("tap\0"), XenConverter ("CTXS"), Azure ("wa\0\0").
    /// Virtual PC ("vpc "), Virtual Server ("vs  "), qemu ("qemu") and anything else use
    /// the CHS geometry, as Virtual PC sees them (qemu's vpc_open, iotest 146).
    static let currentSizeCreators: [[UInt8]] = ["win ", "qem2", "d2v ", "d2v\0", "tap\0", "CTXS", "wa\0\0"].map { Array($0.utf8) }

    var usesCurrentSize: Bool {
        Self.currentSizeCreators.contains(creatorAppBytes) || geometry == Self.maxGeometry
    }

    /// The guest-visible size in bytes, a multiple of 512.
    var virtualSize: UInt64 {
        usesCurrentSize ? currentSize / 512 * 512 : geometry.sectors * 512
    }

    /// CHS for a sector count: the VHD spec's appendix algorithm ("CHS calculation"),
    /// capped at the largest geometry.
    static func geometry(forSectors count: UInt64) -> Geometry {
        let total = min(count, maxGeometry.sectors)
        var spt: UInt64, heads: UInt64, cylTimesHeads: UInt64
        if total >= 65535 * 16 * 63 {
            spt = 255
            heads = 16
            cylTimesHeads = total / spt
        } else {
            spt = 17
            cylTimesHeads = total / spt
            heads = max((cylTimesHeads + 1023) / 1024, 4)
            if cylTimesHeads >= heads * 1024 || heads > 16 {
                spt = 31
                heads = 16
                cylTimesHeads = total / spt
            }
            if cylTimesHeads >= heads * 1024 {
                spt = 63
                heads = 16
                cylTimesHeads = total / spt
            }
        }
        return Geometry(cylinders: UInt16(cylTimesHeads / heads), heads: UInt8(heads), sectorsPerTrack: UInt8(spt))
    }

    /// Geometry and size for a requested size, as qemu-img creates them: without
    /// `forceSize` the smallest geometry at least as large (so a converted disk is never
    /// cut short), and that geometry's size; with it, the largest geometry and the exact
    /// size (which only readers that honour `currentSize` see).
    static func sizing(for size: UInt64, forceSize: Bool) throws -> (geometry: Geometry, size: UInt64) {
        let sectors = size.alignedUp(512) / 512
        var geo = Geometry(cylinders: 0, heads: 0, sectorsPerTrack: 0)
        if forceSize {
            geo = maxGeometry
        } else {
            let want = min(maxGeometry.sectors, sectors)
            var extra: UInt64 = 0
            while want > geo.sectors {
                geo = geometry(forSectors: want + extra)
                extra += 1
            }
        }
        let total = geo == maxGeometry ? sectors : geo.sectors
        if total > maxSectors {
            throw ImageError(.invalidArgument, "VHD images hold at most 2040 GiB (asked for \(size) bytes)")
        }
        return (geo, total * 512)
    }

    // MARK: identity and time

    static func newUniqueID() -> [UInt8] {
        var g = SystemRandomNumberGenerator()
        var id = (0..<16).map { _ in UInt8.random(in: 0...255, using: &g) }
        id[6] = id[6] & 0x0f | 0x40  // RFC 4122 version 4
        id[8] = id[8] & 0x3f | 0x80
        return id
    }

    static func now() -> UInt32 {
        vhdTime(Int(time(nil)))
    }

    /// Unix seconds to VHD seconds (clamped to the field).
    static func vhdTime(_ unix: Int) -> UInt32 {
        UInt32(clamping: max(0, unix - epoch))
    }

    static func uuidString(_ id: [UInt8]) -> String {
        let hex = id.map { b -> String in
            let s = String(b, radix: 16)
            return s.count == 1 ? "0" + s : s
        }.joined()
        guard hex.count == 32 else { return hex }
        let c = Array(hex)
        return [c[0..<8], c[8..<12], c[12..<16], c[16..<20], c[20..<32]].map { String($0) }.joined(separator: "-")
    }
}
