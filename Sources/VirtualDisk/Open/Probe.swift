/// Image formats vloop knows by name.
public enum ImageFormat: String, CaseIterable, Sendable {
    case raw, qcow, qcow2, vhd, vhdx, vmdk, vdi

    /// Accepts qemu's other names too (`vpc` for VHD).
    public init?(name: String) {
        switch name.lowercased() {
        case "vpc": self = .vhd
        default:
            guard let f = ImageFormat(rawValue: name.lowercased()) else { return nil }
            self = f
        }
    }
}

/// Recognise a format by content: magic numbers at the start, and for fixed VHDs the
/// footer in the last 512 bytes.
public enum Probe {
    public static func detect(head: [UInt8], tail: [UInt8]) -> ImageFormat {
        let r = ByteReader(head)
        if r.be32(0) == QCOW2Header.magic {
            return r.be32(4) == 1 ? .qcow : .qcow2
        }
        if head.starts(with: Array("vhdxfile".utf8)) { return .vhdx }
        if head.starts(with: Array("conectix".utf8)) { return .vhd }
        if head.starts(with: Array("KDMV".utf8)) || head.starts(with: Array("COWD".utf8)) { return .vmdk }
        if r.le64(0) == 0x0000_0000_cafe_babe { return .vmdk }  // seSparse
        if head.count >= 0x44 && r.le32(0x40) == 0xbeda_107f { return .vdi }
        if isVMDKDescriptor(head) { return .vmdk }
        if tail.count == 512 && tail.starts(with: Array("conectix".utf8)) { return .vhd }
        return .raw
    }

    static func isVMDKDescriptor(_ head: [UInt8]) -> Bool {
        let text = String(decoding: head.prefix(1024), as: UTF8.self)
        return text.hasPrefix("# Disk DescriptorFile") || (text.contains("createType=") && text.contains("version="))
    }

    public static func detect(file: HostFile) throws -> ImageFormat {
        let size = try file.size()
        let head = try file.read(at: 0, count: Int(min(size, 4096)))
        let tail = size >= 512 ? try file.read(at: size - 512, count: 512) : []
        return detect(head: head, tail: tail)
    }
}
