import Foundation
import NIOCore
import NIOEmbedded
import Synchronization
import Testing
@testable import NBDServer
@testable import VirtualDisk

/// Shared state for closures handed to the budget.
private final class Box<T: Sendable>: Sendable {
    let value: Mutex<T>
    init(_ v: T) { value = Mutex(v) }
}

@Suite("NBD FORCEDTLS negotiation and the server's memory budget")
struct NBDTLSBudgetUnitTests {
    func table(_ dir: TempDir) throws -> NBDExportTable {
        try NBDExportTable([NBDExport(name: "disk", image: try scratchImage(dir, "a.raw", size: 1 << 20))])
    }

    @Test("before STARTTLS only STARTTLS and ABORT are served; after it, everything but a second STARTTLS")
    func forcedTLS() throws {
        let dir = TempDir()
        var n = NBDNegotiation(exports: try table(dir), tlsRequired: true)
        #expect(n.receiveClientFlags(3) == .continue)
        var out = ByteBuffer()
        let info = byteBuffer(ClientBytes.infoRequest(name: "disk"))
        for (code, data) in [(NBD.optList, ByteBuffer()), (NBD.optInfo, info), (NBD.optGo, info),
                             (NBD.optStructuredReply, ByteBuffer()), (NBD.optListMetaContext, ByteBuffer()), (4711, ByteBuffer())] {
            #expect(n.receiveOption(code: code, data: data, into: &out) == .continue)
        }
        let refused = optionReplies(out)
        #expect(refused.count == 6 && refused.allSatisfy { $0.type == NBD.repErrTLSReqd }, "\(refused.map(\.type))")
        #expect(String(decoding: refused[0].data, as: UTF8.self).contains("TLS"))
        #expect(!n.structuredReplies)
        // EXPORT_NAME cannot carry an error: the session ends.
        var e = NBDNegotiation(exports: try table(dir), tlsRequired: true)
        out.clear()
        if case .close = e.receiveOption(code: NBD.optExportName, data: byteBuffer(Array("disk".utf8)), into: &out) {} else {
            Issue.record("EXPORT_NAME before TLS did not close")
        }
        #expect(out.readableBytes == 0)
        // STARTTLS with data is invalid and does not start TLS.
        out.clear()
        #expect(n.receiveOption(code: NBD.optStartTLS, data: byteBuffer([1]), into: &out) == .continue)
        #expect(optionReplies(out).map(\.type) == [NBD.repErrInvalid] && !n.tlsActive)
        // The upgrade.
        out.clear()
        #expect(n.receiveOption(code: NBD.optStartTLS, data: ByteBuffer(), into: &out) == .startTLS)
        #expect(optionReplies(out).map(\.type) == [NBD.repAck] && n.tlsActive)
        // Inside TLS: a second STARTTLS is invalid, and the rest works.
        out.clear()
        #expect(n.receiveOption(code: NBD.optStartTLS, data: ByteBuffer(), into: &out) == .continue)
        #expect(n.receiveOption(code: NBD.optStructuredReply, data: ByteBuffer(), into: &out) == .continue)
        #expect(n.receiveOption(code: NBD.optGo, data: info, into: &out) == .transmission)
        let after = optionReplies(out).map(\.type)
        #expect(after.first == NBD.repErrInvalid && after.dropFirst().first == NBD.repAck && after.last == NBD.repAck)
        #expect(!after.contains(NBD.repErrTLSReqd))
        #expect(n.session?.structuredReplies == true)

        // ABORT is served before TLS.
        var a = NBDNegotiation(exports: try table(dir), tlsRequired: true)
        out.clear()
        if case .close = a.receiveOption(code: NBD.optAbort, data: ByteBuffer(), into: &out) {} else { Issue.record("ABORT did not close") }
        #expect(optionReplies(out).map(\.type) == [NBD.repAck])
    }

    @Test("plain-text bytes sent with STARTTLS are refused, not taken as coming through TLS")
    func dataAfterStartTLS() throws {
        let startTLS = ClientBytes.option(NBD.optStartTLS, [])
        let smuggled = ClientBytes.option(NBD.optStructuredReply, [])
        var decoder = NBDMessageDecoder(expectClientFlags: false, startTLSOffered: true)
        var b = byteBuffer(startTLS + smuggled)
        #expect(throws: NBDDecodeError.dataAfterStartTLS(smuggled.count)) { try decoder.next(&b) }
        // Alone, it decodes; what follows in a later read (through TLS) decodes too.
        var clean = NBDMessageDecoder(expectClientFlags: false, startTLSOffered: true)
        var c = byteBuffer(startTLS)
        #expect(try clean.next(&c) == .option(code: NBD.optStartTLS, data: ByteBuffer()))
        var d = byteBuffer(smuggled + startTLS + smuggled)
        #expect(try clean.next(&d) == .option(code: NBD.optStructuredReply, data: ByteBuffer()))
        // A second STARTTLS (refused by the negotiation) is an ordinary option.
        #expect(try clean.next(&d) == .option(code: NBD.optStartTLS, data: ByteBuffer()))
        // A server without TLS refuses STARTTLS and goes on in plain text: nothing to guard.
        var plain = NBDMessageDecoder(expectClientFlags: false)
        var p = byteBuffer(startTLS + smuggled)
        #expect(try plain.next(&p) == .option(code: NBD.optStartTLS, data: ByteBuffer()))
        #expect(try plain.next(&p) == .option(code: NBD.optStructuredReply, data: ByteBuffer()))
    }

    @Test("bad certificate and key files are refused naming the file")
    func badFiles() throws {
        let dir = TempDir()
        let junk = dir.file("junk.pem")
        try "not a certificate\n".write(toFile: junk, atomically: true, encoding: .utf8)
        let missing = dir.file("missing.pem")
        #expect { try NBDTLSConfiguration(certificateFile: missing, keyFile: junk) } throws: { error in
            "\(error)".contains(missing) && "\(error)".contains("--tls-cert")
        }
        #expect { try NBDTLSConfiguration(certificateFile: junk, keyFile: junk) } throws: { error in
            "\(error)".contains(junk) && "\(error)".contains("PEM")
        }
    }

    // MARK: budget

    @Test("the budget: acquire within the limit, charges past it, waiters woken on release")
    func budget() {
        let b = NBDMemoryBudget(limit: 1000)
        let wokenBox = Box<[String]>([])
        let woken = wokenBox
        func names() -> [String] { woken.value.withLock { $0 } }
        // Identities of two live objects, as the handlers are.
        let holderA = Box(0), holderB = Box(0)
        let idA = ObjectIdentifier(holderA), idB = ObjectIdentifier(holderB)
        defer { withExtendedLifetime((holderA, holderB)) {} }
        let wakeA: NBDMemoryBudget.Wake = { wokenBox.value.withLock { $0.append("a") } }
        let wakeB: NBDMemoryBudget.Wake = { wokenBox.value.withLock { $0.append("b") } }

        #expect(b.acquire(600, holdsNothing: false, id: idA, wake: wakeA))
        #expect(b.hasRoom(id: idA, wake: wakeA))
        // 600 + 500 > 1000: refused, and A waits.
        #expect(!b.acquire(500, holdsNothing: false, id: idA, wake: wakeA))
        #expect(b.waiterCount == 1 && b.used == 600)
        // A holder of nothing may always take one request, even past the limit.
        #expect(b.acquire(500, holdsNothing: true, id: idB, wake: wakeB))
        #expect(b.used == 1100 && b.peak == 1100)
        // Spent: hasRoom registers B as well (registering twice keeps one entry).
        #expect(!b.hasRoom(id: idB, wake: wakeB))
        #expect(!b.hasRoom(id: idB, wake: wakeB))
        #expect(b.waiterCount == 2)
        // Received payloads are charged whatever the balance.
        b.charge(300)
        #expect(b.used == 1400 && b.peak == 1400)
        // A release wakes every waiter once, and forgets them.
        b.release(300)
        #expect(names().sorted() == ["a", "b"])
        #expect(b.waiterCount == 0)
        b.release(500)
        #expect(names().count == 2, "nobody was waiting")
        // A cancelled waiter is not woken.
        #expect(!b.acquire(1000, holdsNothing: false, id: idA, wake: wakeA))
        b.cancelWait(id: idA)
        b.release(600)
        #expect(names().count == 2)
        #expect(b.used == 0 && b.peak == 1400)
    }

    @Test("the budget under contention: every acquire is released, waiters always woken")
    func budgetThreads() async {
        let b = NBDMemoryBudget(limit: 64 << 10)
        let taken = await withTaskGroup(of: Int.self) { group in
            for worker in 0..<8 {
                group.addTask {
                    let holder = Box(0)
                    let id = ObjectIdentifier(holder)
                    defer { withExtendedLifetime(holder) {} }
                    var count = 0
                    for i in 0..<500 {
                        let n = 1024 * (1 + (worker + i) % 16)
                        // Wait for room as a connection would: retry after a wake.
                        while true {
                            let (stream, cont) = AsyncStream<Void>.makeStream()
                            if b.acquire(n, holdsNothing: false, id: id, wake: { cont.yield(()); cont.finish() }) {
                                cont.finish()
                                break
                            }
                            // A release may have come between the refusal and now: the
                            // wake was registered under the lock, so it is not lost.
                            for await _ in stream { break }
                        }
                        count += 1
                        #expect(b.used <= b.limit)
                        b.release(n)
                    }
                    return count
                }
            }
            return await group.reduce(0, +)
        }
        #expect(taken == 8 * 500)
        #expect(b.used == 0 && b.peak <= b.limit)
    }
}
