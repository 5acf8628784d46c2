import NIOCore
import Synchronization

/// Buffers for read replies and write payloads, kept for reuse so that a stream of
/// large requests does not allocate (and fault in) a fresh buffer per request.
///
/// Read buffers go out to pool threads (which fill them) and come back from the event
/// loop once their reply has been written; write payloads are copied into one on the
/// event loop and come back once the image has them. At most `maxRetainedBytes` are kept; the rest are
/// left to be freed.
final class NBDBufferPool: Sendable {
    private let free = Mutex<(buffers: [ByteBuffer], bytes: Int)>(([], 0))
    private let allocator = ByteBufferAllocator()
    let maxRetainedBytes: Int
    let maxBuffers: Int

    init(maxRetainedBytes: Int = 128 << 20, maxBuffers: Int = 32) {
        self.maxRetainedBytes = maxRetainedBytes
        self.maxBuffers = maxBuffers
    }

    /// An empty buffer of at least `capacity` bytes: the smallest free one that fits
    /// (and is not wastefully large), or a new one.
    /// A pooled buffer holding exactly `payload`'s bytes: a write payload no longer pins
    /// the (possibly much larger) receive buffer it was sliced from.
    func copy(of payload: ByteBuffer) -> ByteBuffer {
        var copy = take(capacity: payload.readableBytes)
        copy.writeImmutableBuffer(payload)
        return copy
    }

    func take(capacity: Int) -> ByteBuffer {
        let largest = max(capacity * 4, 64 << 10)
        let reused: ByteBuffer? = free.withLock { state in
            var best: Int?
            for (i, b) in state.buffers.enumerated() where b.capacity >= capacity && b.capacity <= largest {
                if best == nil || b.capacity < state.buffers[best!].capacity { best = i }
            }
            guard let i = best else { return nil }
            // Removing it from the array leaves the caller the only reference, so
            // filling it does not copy.
            let b = state.buffers.remove(at: i)
            state.bytes -= b.capacity
            return b
        }
        if var b = reused {
            b.clear()
            return b
        }
        return allocator.buffer(capacity: capacity)
    }

    /// Give a buffer back once nothing else will read it.
    func recycle(_ buffer: ByteBuffer) {
        let size = buffer.capacity
        guard size <= maxRetainedBytes else { return }
        free.withLock { state in
            guard state.buffers.count < maxBuffers, state.bytes + size <= maxRetainedBytes else { return }
            state.buffers.append(buffer)
            state.bytes += size
        }
    }

    var retainedBytes: Int { free.withLock { $0.bytes } }
}
