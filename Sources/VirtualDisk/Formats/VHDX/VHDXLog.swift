/// The VHDX log (MS-VHDX 2.3): a ring of entries, each a set of 4 KiB sector updates to
/// metadata. Pure parsing (entry validation, the active-sequence search of 2.3.3),
/// entry building for our own writes, and an in-memory overlay for read-only replay.
///
///     entry:  descriptor sector(s)                       | data sectors
///             "loge" header (64) | descriptors (32 each)  | "data" seqHigh | 4084 bytes | seqLow
///     data descriptor "desc" keeps the 8 leading and 4 trailing bytes of its sector;
///     zero descriptor "zero" zeroes a 4 KiB-aligned range.
enum VHDXLog {
    static let sector = 4096
    static let entrySignature: UInt32 = 0x6567_6F6C  // "loge"
    static let zeroSignature: UInt32 = 0x6F72_657A  // "zero"
    static let descSignature: UInt32 = 0x6373_6564  // "desc"
    static let dataSignature: UInt32 = 0x6174_6164  // "data"
    /// Logs longer than this are refused: replay may hold a whole sequence in memory.
    static let maxLogLength: UInt64 = 256 << 20

    /// One update a log entry asks for.
    struct Write: Equatable {
        var fileOffset: UInt64
        var length: UInt64
        /// nil: zeroes.
        var data: [UInt8]?
        var end: UInt64 { fileOffset + length }
    }

    struct Entry {
        var logOffset: UInt64
        var length: UInt64
        var tail: UInt64
        var sequence: UInt64
        var flushedFileOffset: UInt64
        var lastFileOffset: UInt64
        var writes: [Write]
    }

    /// Descriptor sectors needed for `count` descriptors.
    static func descriptorSectors(_ count: Int) -> Int { (64 + 32 * count + sector - 1) / sector }

    /// Parse and validate the entry at `at` (an offset inside a log of `logLength` bytes;
    /// entries may wrap). `read(logOffset, count)` reads log bytes (it wraps itself).
    /// nil when anything fails: signature, lengths, GUID, checksum, sequence numbers.
    static func entry(at: UInt64, logLength: UInt64, logGUID: [UInt8],
                      read: (UInt64, Int) throws -> [UInt8]) throws -> Entry? {
        let head = try read(at, sector)
        let r = ByteReader(head)
        guard r.le32(0) == entrySignature else { return nil }
        let length = UInt64(r.le32(8))
        let tail = UInt64(r.le32(12))
        let seq = r.le64(16)
        let count = Int(r.le32(24))
        guard length >= UInt64(sector), length % UInt64(sector) == 0, length <= logLength,
              tail % UInt64(sector) == 0, tail < logLength, seq > 0,
              r.slice(32, 16) == logGUID else { return nil }
        let sectors = Int(length) / sector
        let descSectors = descriptorSectors(count)
        guard count <= sectors * (sector / 32), descSectors <= sectors else { return nil }
        let bytes = try read(at, Int(length))
        guard CRC32C.checksum(bytes, zeroingFieldAt: 4) == r.le32(4) else { return nil }
        let all = ByteReader(bytes)
        var writes: [Write] = []
        var dataIndex = descSectors
        for d in 0..<count {
            let o = 64 + d * 32
            let sig = all.le32(o)
            guard all.le64(o + 24) == seq else { return nil }
            let fileOffset = all.le64(o + 16)
            guard fileOffset % UInt64(sector) == 0 else { return nil }
            switch sig {
            case zeroSignature:
                let zl = all.le64(o + 8)
                guard zl % UInt64(sector) == 0, !fileOffset.addingReportingOverflow(zl).overflow else { return nil }
                writes.append(Write(fileOffset: fileOffset, length: zl, data: nil))
            case descSignature:
                guard dataIndex < sectors else { return nil }
                let ds = dataIndex * sector
                guard all.le32(ds) == dataSignature, all.le32(ds + 4) == UInt32(seq >> 32),
                      all.le32(ds + sector - 4) == UInt32(truncatingIfNeeded: seq) else { return nil }
                var data = Array(bytes[ds..<(ds + sector)])
                data.replaceSubrange(0..<8, with: all.slice(o + 8, 8))
                data.replaceSubrange((sector - 4)..<sector, with: all.slice(o + 4, 4))
                writes.append(Write(fileOffset: fileOffset, length: UInt64(sector), data: data))
                dataIndex += 1
            default:
                return nil
            }
        }
        return Entry(logOffset: at, length: length, tail: tail, sequence: seq,
                     flushedFileOffset: r.le64(48), lastFileOffset: r.le64(56), writes: writes)
    }

    /// The active sequence (MS-VHDX 2.3.3): the valid, complete sequence with the highest
    /// head sequence number, from its tail entry to its head. Empty when none.
    static func activeSequence(logLength: UInt64, logGUID: [UInt8], read rawRead: (UInt64, Int) throws -> [UInt8]) throws -> [Entry] {
        // A hostile log could make the search read whole entries from every 4 KiB
        // offset: the bytes read are capped.
        var budget = 8 * logLength + (1 << 20)
        let read: (UInt64, Int) throws -> [UInt8] = { at, n in
            guard UInt64(n) <= budget else {
                throw ImageError.corrupt("the log's entries overlap in ways no writer makes; searching it would read more than \(8 * logLength) bytes")
            }
            budget -= UInt64(n)
            return try rawRead(at, n)
        }
        var candidate: [Entry] = []
        var currentTail: UInt64 = 0
        var oldTail: UInt64 = 0
        var rounds: UInt64 = 0
        let maxRounds = logLength / UInt64(sector) + 1
        while rounds < maxRounds {
            rounds += 1
            var seq: [Entry] = []
            var pos = currentTail
            var covered: UInt64 = 0
            while covered < logLength, let e = try entry(at: pos, logLength: logLength, logGUID: logGUID, read: read),
                  seq.isEmpty || e.sequence == seq.last!.sequence &+ 1 {
                seq.append(e)
                covered += e.length
                pos = (pos + e.length) % logLength
            }
            if covered > logLength { seq.removeLast() }
            var valid: [Entry] = []
            if let head = seq.last, let k = seq.firstIndex(where: { $0.logOffset == head.tail }) {
                valid = Array(seq[k...])
            }
            if let h = valid.last, h.sequence > (candidate.last?.sequence ?? 0) { candidate = valid }
            if valid.isEmpty {
                currentTail += UInt64(sector)
                if currentTail >= logLength { currentTail = 0 }
            } else {
                currentTail = pos
            }
            if currentTail <= oldTail { break }
            oldTail = currentTail
        }
        return candidate
    }

    /// Build one entry for 4 KiB sector updates (offsets 4 KiB aligned, data 4 KiB each).
    static func build(updates: [(UInt64, [UInt8])], sequence: UInt64, tail: UInt32, logGUID: [UInt8],
                      flushedFileOffset: UInt64, lastFileOffset: UInt64) -> [UInt8] {
        let descSectors = descriptorSectors(updates.count)
        let length = (descSectors + updates.count) * sector
        var b = [UInt8](repeating: 0, count: length)
        b.putLE32(entrySignature, at: 0)
        b.putLE32(UInt32(length), at: 8)
        b.putLE32(tail, at: 12)
        b.putLE64(sequence, at: 16)
        b.putLE32(UInt32(updates.count), at: 24)
        b.putBytes(logGUID, at: 32)
        b.putLE64(flushedFileOffset, at: 48)
        b.putLE64(lastFileOffset, at: 56)
        for (i, (offset, data)) in updates.enumerated() {
            let o = 64 + i * 32
            b.putLE32(descSignature, at: o)
            b.putBytes(Array(data[(sector - 4)..<sector]), at: o + 4)
            b.putBytes(Array(data[0..<8]), at: o + 8)
            b.putLE64(offset, at: o + 16)
            b.putLE64(sequence, at: o + 24)
            let ds = (descSectors + i) * sector
            b.putLE32(dataSignature, at: ds)
            b.putLE32(UInt32(sequence >> 32), at: ds + 4)
            b.replaceSubrange((ds + 8)..<(ds + sector - 4), with: data[8..<(sector - 4)])
            b.putLE32(UInt32(truncatingIfNeeded: sequence), at: ds + sector - 4)
        }
        CRC32C.seal(&b, fieldAt: 4)
        return b
    }

    /// How many data sectors one entry may carry in a log of `logLength` bytes.
    static func capacity(logLength: UInt64) -> Int {
        let total = Int(logLength / UInt64(sector))
        var n = total - 1
        while n > 0 && n + descriptorSectors(n) > total { n -= 1 }
        return max(n, 0)
    }
}

/// A replayed log held in memory, over the file (read-only opens of an image whose log
/// was never replayed: the file must not change, yet reads must see the replayed state).
/// Writes apply in log order; later ones win.
struct VHDXOverlay {
    var writes: [VHDXLog.Write]
    let lowest: UInt64
    let highest: UInt64

    init(_ writes: [VHDXLog.Write]) {
        self.writes = writes
        lowest = writes.map(\.fileOffset).min() ?? 0
        highest = writes.map(\.end).max() ?? 0
    }

    func intersects(_ offset: UInt64, _ length: UInt64) -> Bool {
        guard offset < highest && lowest < offset + length else { return false }
        return writes.contains { $0.fileOffset < offset + length && offset < $0.end }
    }

    /// Patch `buffer` (file bytes read at `offset`) with the logged updates.
    func apply(_ buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) {
        let end = offset + UInt64(buffer.count)
        guard offset < highest && lowest < end else { return }
        for w in writes where w.fileOffset < end && offset < w.end {
            let from = max(w.fileOffset, offset), to = min(w.end, end)
            let dst = Int(from - offset)
            let n = Int(to - from)
            if let data = w.data {
                let src = Int(from - w.fileOffset)
                data.withUnsafeBytes { s in
                    UnsafeMutableRawBufferPointer(rebasing: buffer[dst..<(dst + n)]).copyMemory(from: UnsafeRawBufferPointer(rebasing: s[src..<(src + n)]))
                }
            } else {
                UnsafeMutableRawBufferPointer(rebasing: buffer[dst..<(dst + n)]).initializeMemory(as: UInt8.self, repeating: 0)
            }
        }
    }
}
