/// What `check -r` may repair.
public enum CheckRepair: String, Sendable {
    case none, leaks, all
}

/// The result of a consistency check, with qemu-img's exit code convention.
public struct CheckReport: Sendable {
    public var format: String
    public var path: String
    public var corruptions: [String] = []
    public var leaks = 0
    public var leakDetails: [String] = []
    public var repairedLeaks = 0
    public var repairedCorruptions = 0
    public var allocatedClusters: UInt64 = 0
    public var totalClusters: UInt64 = 0
    public var imageEndOffset: UInt64 = 0
    /// Problems the check could not look at (it stopped early).
    public var incomplete: String?

    public init(format: String, path: String) {
        self.format = format
        self.path = path
    }

    /// Problems remaining after repair.
    public var remainingCorruptions: Int { max(0, corruptions.count - repairedCorruptions) }
    public var remainingLeaks: Int { max(0, leaks - repairedLeaks) }

    /// qemu-img's codes: 0 clean, 1 check not completed, 2 corruptions, 3 leaks only.
    public var exitCode: Int32 {
        if incomplete != nil { return 1 }
        if remainingCorruptions > 0 { return 2 }
        if remainingLeaks > 0 { return 3 }
        return 0
    }
}

/// Formats that can check themselves.
public protocol CheckableLayer: FormatLayer {
    func check(repair: CheckRepair) throws -> CheckReport
}
