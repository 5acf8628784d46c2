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

/// The leaks a format's check finds: runs of the file no structure references. Each
/// run of at least one `unit` (a block, a grain) that still holds data is counted in
/// units and described (the first 16); with repair it is given back: a run that reaches
/// `end` is left for the caller to cut off (`tail`), one elsewhere has a hole punched.
struct LeakSweep {
    let file: HostFile
    let unit: UInt64
    let unitName: String
    /// How the description says nothing references the run, e.g. "not referenced by the BAT".
    let unreferenced: String
    let end: UInt64
    let repair: Bool
    /// Where the leak at the end starts, when there is one and repair is on.
    private(set) var tail: UInt64?
    /// Units given back, or to be given back by cutting off `tail`.
    private(set) var repaired = 0

    init(file: HostFile, unit: UInt64, unitName: String, unreferenced: String, end: UInt64, repair: Bool) {
        self.file = file
        self.unit = unit
        self.unitName = unitName
        self.unreferenced = unreferenced
        self.end = end
        self.repair = repair
    }

    /// Look at the unreferenced run `start ..< end`.
    mutating func run(_ start: UInt64, _ stop: UInt64, into report: inout CheckReport) {
        guard stop > start, stop - start >= unit, let d = file.nextData(from: start), d < stop else { return }
        let count = Int((stop - start) / unit)
        report.leaks += count
        if report.leakDetails.count < 16 {
            report.leakDetails.append("\(stop - start) bytes at \(start) are \(unreferenced) (\(count) \(unitName)\(count == 1 ? "" : "s"))")
        }
        guard repair else { return }
        if stop == end {
            tail = start
        } else if !file.punchHole(at: start, length: stop - start) {
            return  // the file system cannot give the space back: still a leak
        }
        repaired += count
    }
}
