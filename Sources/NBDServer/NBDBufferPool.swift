import NIOCore
import Synchronization

/// Buffers for read replies and write payloads, kept for reuse so that a stream of
/// requests does not allocate (and fault in) a fresh buffer per request.
///
/// Read buffers go out to be filled (on the event loop or a pool thread) and come back
/// once their reply has been written; write payloads are copied into one on the event
/// loop and come back once the image has them.
///
/// Buffers come in size classes, a power of two plus room for a reply header (a 4 KiB
/// read's buffer holds 4 KiB and its header), one free list per class, so taking and
/// giving back cost the same however many are kept. At most `maxRetainedBytes` in all
/// and `maxBuffers` of each class are kept (enough for every connection's requests in
/// flight under a copy with several connections; a class full of small buffers from
/// random reads does not keep large ones out); the rest are left to be freed.
final class NBDBufferPool: Sendable {
    private struct Free {
        /// Index: the class's power of two.
        var classes = [[ByteBuffer]](repeating: [], count: 64)
        var bytes = 0
    }

    private let free = Mutex(Free())
    private let allocator = ByteBufferAllocator()
    let maxRetainedBytes: Int
    let maxBuffers: Int
    /// The room above the power of two: a structured read reply's 28-byte header.
    static let headerRoom = 64

    init(maxRetainedBytes: Int = 128 << 20, maxBuffers: Int = 256) {
        self.maxRetainedBytes = maxRetainedBytes
        self.maxBuffers = maxBuffers
    }

    /// The class holding `capacity` bytes: the smallest `k` with 2^k + headerRoom >= capacity.
    static func sizeClass(_ capacity: Int) -> Int {
        let body = max(capacity - headerRoom, 1)
        return Int.bitWidth - (body - 1).leadingZeroBitCount
    }

    /// The bytes `take(capacity:)` allocates: what a request is charged for its buffer.
    static func allocation(_ capacity: Int) -> Int { (1 << sizeClass(capacity)) + headerRoom }

    /// A pooled buffer holding exactly `payload`'s bytes: a write payload no longer pins
    /// the (possibly much larger) receive buffer it was sliced from.
    func copy(of payload: ByteBuffer) -> ByteBuffer {
        var copy = take(capacity: payload.readableBytes)
        copy.writeImmutableBuffer(payload)
        return copy
    }

    /// An empty buffer of at least `capacity` bytes: a free one of its class, or a new one.
    func take(capacity: Int) -> ByteBuffer {
        let k = Self.sizeClass(capacity)
        let reused: ByteBuffer? = free.withLock { state in
            // Once off the list it has one reference, so clearing (and later filling)
            // it does not copy; it must be cleared here, before the optional holding
            // it adds a second.
            guard var b = state.classes[k].popLast() else { return nil }
            state.bytes -= b.capacity
            b.clear()
            return b
        }
        return reused ?? allocator.buffer(capacity: Self.allocation(capacity))
    }

    /// Give a buffer back once nothing else will read it. Buffers not made by `take`
    /// (small replies) are filed under the class they fill.
    func recycle(_ buffer: ByteBuffer) {
        let size = buffer.capacity
        guard size <= maxRetainedBytes, size > Self.headerRoom else { return }
        // The largest class the buffer fills completely.
        let k = Int.bitWidth - 1 - (size - Self.headerRoom).leadingZeroBitCount
        free.withLock { state in
            guard state.classes[k].count < maxBuffers, state.bytes + size <= maxRetainedBytes else { return }
            state.classes[k].append(buffer)
            state.bytes += size
        }
    }

    var retainedBytes: Int { free.withLock { $0.bytes } }
}
