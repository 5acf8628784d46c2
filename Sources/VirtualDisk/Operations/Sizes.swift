/// Parse sizes the way qemu-img does: a number with an optional k/K, M, G, T, P, E
/// suffix (powers of 1024), or `b` for bytes.
public enum SizeParser {
    /// A size as qemu-img reads one: a decimal number (a fraction only with a multiplier
    /// suffix, or one that is zero), or a hexadecimal integer (0x…), then an optional
    /// suffix b, k, M, G, T, P or E (powers of 1024, any case). Exponents, hexadecimal
    /// fractions, leading dots and trailing text are refused.
    public static func parse(_ text: String) throws -> UInt64 {
        let s = Array(text.trimmingWhitespace().utf8)
        func invalid(_ why: String) -> ImageError {
            ImageError(.invalidArgument, "invalid size '\(text)': \(why); use a number with an optional k, M, G, T, P or E suffix (e.g. 512M, 1.5G)")
        }
        guard !s.isEmpty else { throw ImageError(.invalidArgument, "empty size; use a number with an optional k, M, G, T, P or E suffix (e.g. 512M, 1.5G)") }
        func isDigit(_ c: UInt8) -> Bool { c >= 0x30 && c <= 0x39 }
        func hexValue(_ c: UInt8) -> UInt64? {
            switch c {
            case 0x30...0x39: return UInt64(c - 0x30)
            case 0x41...0x46: return UInt64(c - 0x41 + 10)
            case 0x61...0x66: return UInt64(c - 0x61 + 10)
            default: return nil
            }
        }
        var i = 0
        var whole: UInt64 = 0
        var fraction: [UInt8] = []
        var hex = false
        if s.count >= 2, s[0] == 0x30, s[1] | 0x20 == 0x78 {
            hex = true
            i = 2
            let start = i
            while i < s.count, let d = hexValue(s[i]) {
                let (m, o1) = whole.multipliedReportingOverflow(by: 16)
                let (v, o2) = m.addingReportingOverflow(d)
                if o1 || o2 { throw ImageError(.invalidArgument, "size '\(text)' is too large") }
                whole = v
                i += 1
            }
            if i == start { throw invalid("no digits after 0x") }
        } else {
            let start = i
            while i < s.count, isDigit(s[i]) {
                let (m, o1) = whole.multipliedReportingOverflow(by: 10)
                let (v, o2) = m.addingReportingOverflow(UInt64(s[i] - 0x30))
                if o1 || o2 { throw ImageError(.invalidArgument, "size '\(text)' is too large") }
                whole = v
                i += 1
            }
            if i == start { throw invalid("it does not start with a digit") }
            if i < s.count, s[i] == 0x2e {  // "."
                i += 1
                while i < s.count, isDigit(s[i]) { fraction.append(s[i]); i += 1 }
            }
        }
        var shift: UInt64 = 0
        if i < s.count {
            guard i == s.count - 1 else { throw invalid("unexpected '\(String(decoding: s[i...], as: UTF8.self))'") }
            switch s[i] | 0x20 {
            case 0x62: shift = 0   // b
            case 0x6b: shift = 10  // k
            case 0x6d: shift = 20  // m
            case 0x67: shift = 30  // g
            case 0x74: shift = 40  // t
            case 0x70: shift = 50  // p
            case 0x65: shift = 60  // e
            default: throw invalid(hex ? "a hexadecimal size takes no fraction or exponent" : "unknown suffix '\(String(decoding: [s[i]], as: UTF8.self))'")
            }
        }
        let (scaled, overflow) = whole.multipliedReportingOverflow(by: UInt64(1) << shift)
        if overflow { throw ImageError(.invalidArgument, "size '\(text)' is too large") }
        guard fraction.contains(where: { $0 != 0x30 }) else { return scaled }
        if shift == 0 { throw invalid("a fraction of a byte") }
        // The fraction's share of one unit, truncated to whole bytes.
        let part = UInt64((Double("0." + String(decoding: fraction, as: UTF8.self)) ?? 0) * Double(UInt64(1) << shift))
        let (total, o) = scaled.addingReportingOverflow(part)
        if o { throw ImageError(.invalidArgument, "size '\(text)' is too large") }
        return total
    }

    /// The size `resize` aims for: SIZE, +SIZE (grow by) or -SIZE (shrink by) from `current`.
    public static func resizeTarget(_ text: String, current old: UInt64) throws -> UInt64 {
        if text.hasPrefix("+") {
            let (grown, overflow) = old.addingReportingOverflow(try parse(String(text.dropFirst())))
            if overflow { throw ImageError(.invalidArgument, "size \(old) \(text) is too large") }
            return grown
        } else if text.hasPrefix("-") {
            let d = try parse(String(text.dropFirst()))
            guard d <= old else { throw ImageError(.invalidArgument, "cannot shrink below zero") }
            return old - d
        }
        return try parse(text)
    }

    /// A metadata cache budget in bytes (`--cache-size`).
    public static func cacheBudget(_ text: String) throws -> Int {
        guard let budget = Int(exactly: try parse(text)) else {
            throw ImageError(.invalidArgument, "cache size '\(text)' is too large")
        }
        return budget
    }

    /// qemu-img's human form: "10 MiB", "1.5 GiB".
    public static func human(_ v: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
        var value = Double(v)
        var i = 0
        while value >= 1024 && i < units.count - 1 { value /= 1024; i += 1 }
        if i == 0 { return "\(v) B" }
        let rounded = (value * 100).rounded() / 100
        if rounded == rounded.rounded() { return "\(Int(rounded)) \(units[i])" }
        var text = String(rounded)
        while text.hasSuffix("0") { text.removeLast() }
        return "\(text) \(units[i])"
    }
}

extension String {
    public func trimmingWhitespace() -> String {
        var s = Substring(self)
        while let f = s.first, f.isWhitespace { s.removeFirst() }
        while let l = s.last, l.isWhitespace { s.removeLast() }
        return String(s)
    }
}

/// Parse qemu-img's `-o key=value,key=value` (with `,,` for a literal comma).
public enum OptionList {
    public static func parse(_ text: String) throws -> [(String, String)] {
        var out: [(String, String)] = []
        var items: [String] = []
        var cur = ""
        var chars = Array(text)
        var i = 0
        while i < chars.count {
            if chars[i] == "," {
                if i + 1 < chars.count && chars[i + 1] == "," { cur.append(","); i += 2; continue }
                items.append(cur); cur = ""
            } else {
                cur.append(chars[i])
            }
            i += 1
        }
        if !cur.isEmpty { items.append(cur) }
        chars = []
        for item in items where !item.isEmpty {
            if let eq = item.firstIndex(of: "=") {
                out.append((String(item[..<eq]), String(item[item.index(after: eq)...])))
            } else {
                out.append((item, "on"))
            }
        }
        return out
    }

    public static func bool(_ v: String, _ key: String) throws -> Bool {
        switch v.lowercased() {
        case "on", "true", "yes", "1": return true
        case "off", "false", "no", "0": return false
        default: throw ImageError(.invalidArgument, "option '\(key)' takes on or off (got '\(v)')")
        }
    }
}
