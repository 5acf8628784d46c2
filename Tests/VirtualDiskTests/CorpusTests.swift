import Foundation
import Testing
@testable import VirtualDisk

/// The real-world images in ../shared/corpus: contents must match the sha256 a peer
/// computed, in MANIFEST.tsv.
struct CorpusEntry: CustomStringConvertible, Sendable {
    let file: String
    let format: String
    let sha256: String
    var description: String { file }
}

func corpusEntries(format: String) -> [CorpusEntry] {
    guard let text = try? String(contentsOfFile: sharedDir + "/corpus/MANIFEST.tsv", encoding: .utf8) else { return [] }
    return text.split(separator: "\n").dropFirst().compactMap { line in
        let f = line.split(separator: "\t", omittingEmptySubsequences: false).map(String.init)
        guard f.count >= 5, f[1] == format else { return nil }
        return CorpusEntry(file: f[0], format: f[1], sha256: f[4])
    }
}

func unpackCorpus(_ name: String, into dir: TempDir) throws -> String {
    let out = dir.file(String(name.dropLast(3)))
    try sh(["sh", "-c", "xz -dc '\(sharedDir)/corpus/\(name)' > '\(out)'"])
    return out
}

@Suite("Corpus images")
struct CorpusTests {
    @Test("qcow2 corpus images match MANIFEST sha256", arguments: corpusEntries(format: "qcow2"))
    func qcow2(_ e: CorpusEntry) throws {
        let dir = TempDir()
        let path = try unpackCorpus(e.file, into: dir)
        // Chains and data files sit beside the image.
        for other in ["backing-chain-2.qcow2.xz", "backing-chain-3.qcow2.xz", "data-file.bin.xz"] where other != e.file {
            _ = try unpackCorpus(other, into: dir)
        }
        let img = try openRO(path)
        let raw = dir.file("view.raw")
        let out = try openRW({ try RawLayer.create(path: raw, size: img.info.virtualSize); return raw }(), format: .raw)
        try ConvertOperation.run(source: img, target: out, options: ConvertOptions())
        try out.close()
        try img.close()
        let sum = try sh(["sha256sum", raw]).out.split(separator: " ").first.map(String.init)
        #expect(sum == e.sha256, "\(e.file): sha256 of the guest view differs")
    }

    @Test("the malformed and foreign corpus images fail with a clear error, never a crash")
    func unsupportedFormatsFailCleanly() throws {
        let dir = TempDir()
        for name in ["afl5.img.xz", "afl9.vmdk.xz"] {
            let path = try unpackCorpus(name, into: dir)
            do {
                let img = try openRO(path)
                // Whatever opens must read without trapping.
                _ = try img.read(at: 0, count: Int(min(img.info.virtualSize, 1 << 20)))
                try img.close()
            } catch let e as ImageError {
                #expect(e.description.contains(path) || e.path == path, "\(name): error does not name the file: \(e)")
            }
        }
    }
}
