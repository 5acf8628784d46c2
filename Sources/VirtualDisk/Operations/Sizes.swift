/// Parse sizes the way qemu-img does: a number with an optional k/K, M, G, T, P, E
/// suffix (powers of 1024), or `b` for bytes.
public enum SizeParser {
    public static func parse(_ text: String) throws -> UInt64 {
        var s = text.trimmingWhitespace()
        guard !s.isEmpty else { throw ImageError(.invalidArgument, "empty size") }
        var shift: UInt64 = 0
        if let last = s.last, last.isLetter {
            switch last.lowercased() {
            case "b": shift = 0
            case "k": shift = 10
            case "m": shift = 20
            case "g": shift = 30
            case "t": shift = 40
            case "p": shift = 50
            case "e": shift = 60
            default: throw ImageError(.invalidArgument, "invalid size suffix in '\(text)' (use k, M, G, T, P or E)")
            }
            s.removeLast()
        }
        if let v = UInt64(s) {
            let (r, o) = v.multipliedReportingOverflow(by: 1 << shift)
            if o { throw ImageError(.invalidArgument, "size '\(text)' is too large") }
            return r
        }
        if let d = Double(s), d >= 0, d.isFinite {
            let v = d * Double(UInt64(1) << shift)
            guard v < 1.8e19 else { throw ImageError(.invalidArgument, "size '\(text)' is too large") }
            return UInt64(v)
        }
        throw ImageError(.invalidArgument, "invalid size '\(text)': use a number with an optional k, M, G, T suffix")
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
    func trimmingWhitespace() -> String {
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
