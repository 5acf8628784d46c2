/// A small ordered JSON value for machine-readable output (qemu-img's key order kept).
public indirect enum JSONValue: Sendable {
    case string(String)
    case int(Int64)
    case uint(UInt64)
    case bool(Bool)
    case null
    case array([JSONValue])
    case object([(String, JSONValue)])

    /// Render with qemu-img's style: 4-space indentation, `"key": value`.
    public func rendered(indent: Int = 0, pretty: Bool = true) -> String {
        let pad = pretty ? String(repeating: " ", count: indent) : ""
        let inner = pretty ? String(repeating: " ", count: indent + 4) : ""
        let nl = pretty ? "\n" : ""
        switch self {
        case .string(let s): return JSONValue.quote(s)
        case .int(let i): return String(i)
        case .uint(let u): return String(u)
        case .bool(let b): return b ? "true" : "false"
        case .null: return "null"
        case .array(let items):
            if items.isEmpty { return "[]" }
            let parts = items.map { inner + $0.rendered(indent: indent + 4, pretty: pretty) }
            return "[" + nl + parts.joined(separator: "," + nl + (pretty ? "" : " ")) + nl + pad + "]"
        case .object(let pairs):
            if pairs.isEmpty { return "{}" }
            let parts = pairs.map { inner + JSONValue.quote($0.0) + ": " + $0.1.rendered(indent: indent + 4, pretty: pretty) }
            return "{" + nl + parts.joined(separator: "," + nl + (pretty ? "" : " ")) + nl + pad + "}"
        }
    }

    static func quote(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if scalar.value < 0x20 {
                    let hex = String(scalar.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }
}
