/// `map`: the image's extents through the chain, in qemu-img map's shapes.
public enum MapOperation {
    /// The extents of `start ..< start+length` (to the end of the image when `length` is
    /// nil or runs past it), as `qemu-img map --start-offset --max-length` reports them;
    /// none from the end of the image on.
    public static func extents(_ image: DiskImage, start: UInt64 = 0, length: UInt64? = nil) throws -> [Extent] {
        var out: [Extent] = []
        let size = image.virtualSize
        // At or past the end there is nothing to map (qemu-img prints one empty entry).
        guard start < size else { return [] }
        let end = length.map { start + min($0, size - start) } ?? size
        var pos = start
        let step: UInt64 = 1 << 30
        while pos < end {
            let len = min(step, end - pos)
            out += try image.extents(at: pos, length: len)
            pos += len
        }
        return out.coalesced()
    }

    /// qemu-img map --output=json lines.
    public static func json(_ extents: [Extent]) -> String {
        var lines: [String] = []
        for e in extents {
            var s = "{ \"start\": \(e.offset), \"length\": \(e.length), \"depth\": \(e.depth)"
            switch e.kind {
            case .data(let host):
                s += ", \"present\": true, \"zero\": false, \"data\": true"
                if let host { s += ", \"offset\": \(host)" }
            case .zero:
                s += ", \"present\": true, \"zero\": true, \"data\": false"
            case .unallocated:
                s += ", \"present\": false, \"zero\": true, \"data\": false"
            }
            lines.append(s + "}")
        }
        return "[" + lines.joined(separator: ",\n") + "]"
    }

    /// qemu-img map's human table: data extents only.
    public static func human(_ extents: [Extent], files: (Int) -> String) -> String {
        func pad(_ s: String) -> String { s + String(repeating: " ", count: max(1, 16 - s.count)) }
        var out = pad("Offset") + pad("Length") + pad("Mapped to") + "File\n"
        for e in extents {
            if case .data(let host?) = e.kind {
                out += pad("0x" + String(e.offset, radix: 16)) + pad("0x" + String(e.length, radix: 16))
                    + pad("0x" + String(host, radix: 16)) + files(e.depth) + "\n"
            }
        }
        return out
    }
}
