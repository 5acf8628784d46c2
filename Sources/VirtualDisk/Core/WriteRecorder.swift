import Synchronization

/// Records every change vloop makes to files under a directory — writes, zeroed or
/// punched ranges, truncations, syncs — in order. The crash-consistency harness
/// replays prefixes of the log (with unsynced writes dropped) to build the states a
/// power cut could leave. Off unless a harness installs one; then one relaxed atomic
/// load per I/O is all it costs.
public final class WriteRecorder: Sendable {
    public enum Op: Sendable {
        case write(path: String, offset: UInt64, bytes: [UInt8])
        case zero(path: String, offset: UInt64, length: UInt64)
        case truncate(path: String, size: UInt64)
        case sync(path: String)
    }

    public let directory: String
    private let ops = Mutex<[Op]>([])

    public init(directory: String) { self.directory = directory }

    public var log: [Op] { ops.withLock { $0 } }

    func record(_ op: Op) { ops.withLock { $0.append(op) } }

    static let active = Atomic<Int>(0)
    static let current = Mutex<[WriteRecorder]>([])

    /// Record changes to files under `directory` until `stop`.
    public func start() {
        Self.current.withLock { $0.append(self) }
        Self.active.add(1, ordering: .releasing)
    }

    public func stop() {
        Self.current.withLock { $0.removeAll { $0 === self } }
        Self.active.subtract(1, ordering: .releasing)
    }

    /// Record `op` with every recorder that covers `path`.
    static func note(_ path: String, _ op: @autoclosure () -> Op) {
        guard active.load(ordering: .relaxed) > 0 else { return }
        current.withLock { all in
            for r in all where path.hasPrefix(r.directory) { r.record(op()) }
        }
    }
}
