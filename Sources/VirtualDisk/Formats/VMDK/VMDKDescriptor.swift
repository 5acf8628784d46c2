/// The VMDK descriptor: a small text file (or text embedded in a sparse extent) naming
/// the extents, the content id (CID) and the parent of a delta link.
///
/// libvmdk "The descriptor file": `key=value` lines (keys case-insensitive, values
/// optionally quoted), `#` comments, extent lines
///
///     ACCESS SECTORS TYPE ["FILE" [OFFSET [PARTITION-UUID DEVICE]]]
///
/// and the disk database (`ddb.key = "value"`). Parsing is pure and total: anything it
/// does not understand is kept as text and ignored, never trapped on. Serialising keeps
/// every line as it was except the values changed with `set`, so a descriptor written
/// by another tool keeps its comments, order and line endings.
public struct VMDKDescriptor: Sendable, Equatable {
    public enum Access: String, Sendable {
        case readWrite = "RW", readOnly = "RDONLY", noAccess = "NOACCESS"
    }

    public enum ExtentType: Sendable, Equatable {
        case sparse, flat, zero, vmfs, vmfsSparse, seSparse
        /// VMFSRDM, VMFSRAW and anything unknown: devices or types vloop does not open.
        case other(String)

        init(_ s: String) {
            switch s.uppercased() {
            case "SPARSE": self = .sparse
            case "FLAT": self = .flat
            case "ZERO": self = .zero
            case "VMFS": self = .vmfs
            case "VMFSSPARSE": self = .vmfsSparse
            case "SESPARSE": self = .seSparse
            default: self = .other(s)
            }
        }

        public var name: String {
            switch self {
            case .sparse: return "SPARSE"
            case .flat: return "FLAT"
            case .zero: return "ZERO"
            case .vmfs: return "VMFS"
            case .vmfsSparse: return "VMFSSPARSE"
            case .seSparse: return "SESPARSE"
            case .other(let s): return s
            }
        }
    }

    public struct Extent: Sendable, Equatable {
        public var access: Access
        public var sectors: UInt64
        public var type: ExtentType
        /// The file name as written (relative to the descriptor); nil for ZERO.
        public var fileName: String?
        /// Start of the extent's data in its file, in sectors (FLAT only).
        public var offsetSectors: UInt64

        public init(access: Access, sectors: UInt64, type: ExtentType, fileName: String?, offsetSectors: UInt64 = 0) {
            self.access = access
            self.sectors = sectors
            self.type = type
            self.fileName = fileName
            self.offsetSectors = offsetSectors
        }

        /// The line as qemu-img and VMware write it.
        public var line: String {
            var s = "\(access.rawValue) \(sectors) \(type.name)"
            if let fileName { s += " \"\(fileName)\"" }
            if type == .flat { s += " \(offsetSectors)" }
            return s
        }
    }

    /// Descriptors larger than this are not descriptors (qemu reads at most 1 MiB).
    public static let maxSize = 1 << 20

    public private(set) var lines: [String]
    public private(set) var extents: [Extent]
    /// Lower-cased key → unquoted value, for header keys and the disk database.
    public private(set) var values: [String: String]
    let lineEnding: String

    public var version: Int? { values["version"].flatMap { Int($0) } }
    public var createType: String? { values["createtype"] }
    public var cid: UInt32? { values["cid"].flatMap(Self.parseHex) }
    public var parentCID: UInt32? { values["parentcid"].flatMap(Self.parseHex) }
    /// The parent of a delta link, when there is one.
    public var parentFileNameHint: String? {
        guard let v = values["parentfilenamehint"], !v.isEmpty else { return nil }
        return v
    }
    public var encoding: String? { values["encoding"] }

    public subscript(key: String) -> String? { values[key.lowercased()] }

    /// Parse descriptor text. The text ends at the first NUL (an embedded descriptor's
    /// area is zero-padded). Throws only when the text is too large or an extent line is
    /// malformed (a wrong extent line would give a wrong disk).
    public static func parse(_ bytes: [UInt8]) throws -> VMDKDescriptor {
        guard bytes.count <= maxSize else {
            throw ImageError(.invalidFormat, "descriptor is \(bytes.count) bytes; VMDK descriptors are at most \(maxSize) bytes")
        }
        let end = bytes.firstIndex(of: 0) ?? bytes.count
        let text = String(decoding: bytes[0..<end], as: UTF8.self)
        let crlf = text.contains("\r\n")
        // "\r\n" is one Character in Swift: split on both.
        var lines = text.split(omittingEmptySubsequences: false, whereSeparator: { $0 == "\n" || $0 == "\r\n" }).map { line -> String in
            var s = String(line)
            if s.hasSuffix("\r") { s.removeLast() }
            return s
        }
        if lines.last == "" { lines.removeLast() }
        var d = VMDKDescriptor(lines: lines, extents: [], values: [:], lineEnding: crlf ? "\r\n" : "\n")
        for (n, raw) in lines.enumerated() {
            let line = trim(raw)
            if line.isEmpty || line.hasPrefix("#") { continue }
            let first = line.prefix { !$0.isWhitespace }.uppercased()
            if Access(rawValue: first) != nil, line.count > first.count, line[line.index(line.startIndex, offsetBy: first.count)].isWhitespace {
                d.extents.append(try parseExtent(line, lineNumber: n + 1))
                continue
            }
            guard let eq = line.firstIndex(of: "=") else { continue }
            let key = trim(String(line[..<eq])).lowercased()
            let value = unquote(trim(String(line[line.index(after: eq)...])))
            if !key.isEmpty && d.values[key] == nil { d.values[key] = value }
        }
        return d
    }

    static func parseExtent(_ line: String, lineNumber: Int) throws -> Extent {
        let tokens = tokenize(line)
        func bad(_ why: String) -> ImageError {
            ImageError(.invalidFormat, "descriptor line \(lineNumber) (\(line.prefix(120))): \(why)")
        }
        guard tokens.count >= 3, let access = Access(rawValue: tokens[0].uppercased()) else {
            throw bad("an extent line needs ACCESS SECTORS TYPE")
        }
        guard let sectors = UInt64(tokens[1]), sectors > 0, sectors < (1 << 54) else {
            throw bad("extent size '\(tokens[1])' is not a positive number of sectors")
        }
        let type = ExtentType(tokens[2])
        var name: String?
        if tokens.count >= 4 { name = tokens[3] }
        if type != .zero && (name ?? "").isEmpty { throw bad("a \(type.name) extent needs a file name") }
        var offset: UInt64 = 0
        if tokens.count >= 5 {
            guard let o = UInt64(tokens[4]), o < (1 << 54) else { throw bad("extent offset '\(tokens[4])' is not a number of sectors") }
            offset = o
        }
        return Extent(access: access, sectors: sectors, type: type, fileName: name, offsetSectors: offset)
    }

    /// Whitespace-separated tokens; a double-quoted token may hold spaces.
    static func tokenize(_ line: String) -> [String] {
        var out: [String] = []
        var current = ""
        var inQuotes = false
        var hadToken = false
        for ch in line {
            if inQuotes {
                if ch == "\"" { inQuotes = false } else { current.append(ch) }
            } else if ch == "\"" {
                inQuotes = true
                hadToken = true
            } else if ch.isWhitespace {
                if hadToken { out.append(current); current = ""; hadToken = false }
            } else {
                current.append(ch)
                hadToken = true
            }
        }
        if hadToken { out.append(current) }
        return out
    }

    static func trim(_ s: String) -> String {
        var sub = Substring(s)
        while let f = sub.first, f.isWhitespace || f == "\u{feff}" { sub.removeFirst() }
        while let l = sub.last, l.isWhitespace { sub.removeLast() }
        return String(sub)
    }

    static func unquote(_ s: String) -> String {
        if s.count >= 2 && s.hasPrefix("\"") && s.hasSuffix("\"") { return String(s.dropFirst().dropLast()) }
        return s
    }

    /// Hexadecimal as qemu's `%x` reads it (an optional 0x prefix).
    static func parseHex(_ s: String) -> UInt32? {
        var t = Substring(s)
        if t.lowercased().hasPrefix("0x") { t = t.dropFirst(2) }
        let digits = t.prefix { $0.isHexDigit }
        return digits.isEmpty ? nil : UInt32(digits, radix: 16)
    }

    /// Set a header value, replacing the line that holds the key (case-insensitive) or
    /// adding one after the header.
    public mutating func set(_ key: String, _ value: String, quoted: Bool = false) {
        let text = quoted ? "\(key)=\"\(value)\"" : "\(key)=\(value)"
        let lower = key.lowercased()
        values[lower] = value
        for (i, raw) in lines.enumerated() {
            let line = Self.trim(raw)
            guard !line.hasPrefix("#"), let eq = line.firstIndex(of: "=") else { continue }
            if Self.trim(String(line[..<eq])).lowercased() == lower {
                lines[i] = text
                return
            }
        }
        // After the last header key (before the first extent line), else at the end.
        let firstExtent = lines.firstIndex { l in
            let t = Self.trim(l)
            return Access(rawValue: t.prefix { !$0.isWhitespace }.uppercased()) != nil
        }
        var at = firstExtent ?? lines.count
        while at > 0 && (Self.trim(lines[at - 1]).isEmpty || Self.trim(lines[at - 1]).hasPrefix("#")) { at -= 1 }
        lines.insert(text, at: at)
    }

    public func serialized() -> [UInt8] {
        Array((lines.joined(separator: lineEnding) + lineEnding).utf8)
    }

    public static func hex(_ v: UInt32) -> String { String(v, radix: 16) }

    /// A new descriptor as qemu-img writes one.
    public static func make(cid: UInt32, parentCID: UInt32, createType: String, parentFileNameHint: String?,
                            extents: [Extent], hwVersion: String, adapterType: String, size: UInt64,
                            toolsVersion: String = "2147483647") -> VMDKDescriptor {
        let heads: UInt64 = adapterType == "ide" ? 16 : 255
        var text = "# Disk DescriptorFile\nversion=1\nCID=\(hex(cid))\nparentCID=\(hex(parentCID))\ncreateType=\"\(createType)\"\n"
        if let p = parentFileNameHint { text += "parentFileNameHint=\"\(p)\"\n" }
        text += "\n# Extent description\n"
        for e in extents { text += e.line + "\n" }
        text += "\n# The Disk Data Base\n#DDB\n\n"
        text += "ddb.virtualHWVersion = \"\(hwVersion)\"\n"
        text += "ddb.geometry.cylinders = \"\(size / (63 * heads * 512))\"\n"
        text += "ddb.geometry.heads = \"\(heads)\"\n"
        text += "ddb.geometry.sectors = \"63\"\n"
        text += "ddb.adapterType = \"\(adapterType)\"\n"
        text += "ddb.toolsVersion = \"\(toolsVersion)\"\n"
        // Cannot fail: the text is ours and small.
        return (try? parse(Array(text.utf8))) ?? VMDKDescriptor(lines: [], extents: extents, values: [:], lineEnding: "\n")
    }
}
