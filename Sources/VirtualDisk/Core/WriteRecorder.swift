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

    static let active = Atomic<Bool>(false)
    static let current = Mutex<WriteRecorder?>(nil)

    /// Record changes to files under `directory` until `stop`.
    public func start() {
        Self.current.withLock { $0 = self }
        Self.active.store(true, ordering: .releasing)
    }

    public func stop() {
        Self.active.store(false, ordering: .releasing)
        Self.current.withLock { $0 = nil }
    }

    /// Record `op` if a recorder covers `path`.
    static func note(_ path: String, _ op: @autoclosure () -> Op) {
        guard active.load(ordering: .relaxed) else { return }
        current.withLock { r in
            if let r, path.hasPrefix(r.directory) { r.record(op()) }
        }
    }
}
