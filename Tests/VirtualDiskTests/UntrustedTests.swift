import Foundation
import Testing
@testable import VirtualDisk

@Suite("check --untrusted")
struct UntrustedTests {
    @Test("plain images are safe; backing files, data files, wrong claims and corruption are not")
    func verdicts() throws {
        let dir = TempDir()
        let plain = dir.file("plain.qcow2")
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", plain, "4M"])
        try sh(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", plain])
        #expect(UntrustedInspection.inspect(path: plain, claimed: .qcow2).safe)

        let claimedRaw = UntrustedInspection.inspect(path: plain, claimed: .raw)
        #expect(!claimedRaw.safe && claimedRaw.problems.contains { $0.contains("claimed to be raw") })

        let child = dir.file("child.qcow2")
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "plain.qcow2", "-F", "qcow2", child])
        #expect(!UntrustedInspection.inspect(path: child, claimed: .qcow2).safe)
        #expect(UntrustedInspection.inspect(path: child, claimed: .qcow2, allowBacking: true).safe)

        let ext = dir.file("ext.qcow2")
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=ext.bin", ext, "4M"], cwd: dir.path)
        let e = UntrustedInspection.inspect(path: ext, claimed: .qcow2)
        #expect(!e.safe && e.problems.contains { $0.contains("ext.bin") }, "\(e.problems)")

        // A refcount dropped behind qemu's back: a cluster in use but free.
        let bad = dir.file("bad.qcow2")
        try sh(["cp", plain, bad])
        let fh = FileHandle(forUpdatingAtPath: bad)!
        fh.seek(toFileOffset: 2 * 65536 + 2 * 5)  // refcount of the first data cluster
        fh.write(Data([0, 0]))
        fh.closeFile()
        let b = UntrustedInspection.inspect(path: bad, claimed: .qcow2)
        #expect(!b.safe, "\(b.problems)")

        #expect(!UntrustedInspection.inspect(path: "/dev/null", claimed: nil).safe)
        #expect(!UntrustedInspection.inspect(path: dir.path, claimed: nil).safe)
    }

    @Test("the CLI reports the verdict as JSON with exit codes 0 and 2")
    func cli() throws {
        let dir = TempDir()
        let img = dir.file("a.qcow2")
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "x.raw", "-F", "raw", "-u", img, "1M"])
        let r = try sh([vloopBinary, "check", "--untrusted", "--output", "json", img], check: false)
        #expect(r.status == 2 && r.out.contains("\"safe\": false") && r.out.contains("x.raw"))
        let ok = dir.file("b.qcow2")
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", ok, "1M"])
        #expect(try sh([vloopBinary, "check", "--untrusted", "-f", "qcow2", ok], check: false).status == 0)
    }
}
