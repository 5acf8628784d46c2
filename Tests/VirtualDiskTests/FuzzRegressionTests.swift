import Foundation
import Testing
@testable import VirtualDisk

/// Every input the fuzzer ever crashed on, replayed through the same exercise, for
/// every format, read-only and read-write. A regression traps the test process.
@Suite("Fuzz regressions")
struct FuzzRegressionTests {
    static var inputs: [String] {
        let dir = FileManager.default.currentDirectoryPath + "/Tests/Fuzz/regressions"
        return ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted().map { dir + "/" + $0 }
    }

    @Test("found crashers stay fixed", arguments: inputs)
    func replay(_ input: String) throws {
        let dir = TempDir()
        let formats: [ImageFormat?] = [nil] + ImageFormat.allCases.map { $0 }
        for format in formats {
            for writable in [false, true] {
                let copy = dir.file("img")
                try? FileManager.default.removeItem(atPath: copy)
                try FileManager.default.copyItem(atPath: input, toPath: copy)
                ImageExercise.run(path: copy, format: format, writable: writable)
            }
        }
    }

    @Test("the malformed corpus images go through the exercise without trapping")
    func corpusMalformed() throws {
        let dir = TempDir()
        for name in ["afl5.img.xz", "afl9.vmdk.xz"] {
            let path = try unpackCorpus(name, into: dir)
            for format in [nil] + ImageFormat.allCases.map({ Optional($0) }) {
                ImageExercise.run(path: path, format: format, writable: false)
            }
        }
    }
}
