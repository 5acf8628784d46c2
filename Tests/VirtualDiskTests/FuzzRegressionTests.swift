import Foundation
import Testing
@testable import NBDServer
@testable import VirtualDisk

/// Every input a fuzz target ever crashed on, replayed through the same exercise the
/// target runs. A regression traps the test process.
///
/// Tests/Fuzz/regressions/ holds the image target's crashers (replayed for every format,
/// read-only and read-write); its subfolders hold those of the other targets, by name.
/// Tests/Fuzz/seeds/TARGET/ holds a few valid inputs per target, replayed the same way,
/// so that each exercise runs in the tests even where its target has found nothing.
@Suite("Fuzz regressions")
struct FuzzRegressionTests {
    static func inputs(_ folder: String) -> [String] {
        let dir = FileManager.default.currentDirectoryPath + "/Tests/Fuzz/" + folder
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        return names.sorted().map { dir + "/" + $0 }.filter { path in
            var isDirectory: ObjCBool = false
            return FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) && !isDirectory.boolValue
        }
    }

    static func named(_ target: String) -> [String] {
        inputs("regressions/" + target) + inputs("seeds/" + target)
    }

    @Test("found crashers stay fixed", arguments: inputs("regressions"))
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

    @Test("VMDK descriptor inputs", arguments: named("vmdk-descriptor"))
    func vmdkDescriptor(_ input: String) throws {
        let dir = TempDir()
        VMDKDescriptorExercise.run(try readFile(input), scratch: dir.file("descriptor.vmdk"))
        if (input as NSString).lastPathComponent.hasPrefix("qemu-") {
            // Descriptors qemu-img wrote parse, with their extents: the exercise got past parsing.
            let d = try VMDKDescriptor.parse(try readFile(input))
            #expect(!d.extents.isEmpty)
        }
    }

    @Test("NBD client byte streams", arguments: named("nbd"))
    func nbd(_ input: String) throws {
        let dir = TempDir()
        NBDExercise.run(try readFile(input), scratchDirectory: dir.path)
        if input.hasSuffix("/go-simple") {
            // The stream's last write (0x11 at 1048000, after a zeroing of the start)
            // reached the image: the exercise got through the handshake and the requests.
            let disk = try readFile(dir.file("nbd-disk.raw"))
            #expect(disk[1_048_000] == 0x11 && disk[4096] == 0)
        }
    }

    @Test("command-line sizes, option lists and format names", arguments: named("arguments"))
    func arguments(_ input: String) throws {
        let dir = TempDir()
        ArgumentExercise.run(try readFile(input), scratchDirectory: dir.path)
        if input.hasSuffix("/args-0") {
            // Its first field is a size: the exercise parsed something real.
            let first = String(decoding: try readFile(input), as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false).first.map(String.init) ?? ""
            #expect((try? SizeParser.parse(first)) != nil, "args-0 starts with '\(first)'")
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
