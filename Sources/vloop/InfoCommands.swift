import ArgumentParser
import VirtualDisk

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show an image's format, size, backing file and details.")
    @Option(name: .short, help: "Image format (probed when omitted).") var f: String?
    @Option(name: .customLong("output"), help: "human or json.") var output: OutputFormat = .human
    @Flag(name: .customLong("backing-chain"), help: "Describe every image in the chain.") var backingChain = false
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Open even if another process writes the image.") var forceShare = false
    @OptionGroup var common: CommonOptions
    @Argument var image: String

    func run() throws {
        try Vloop.guarded {
            try common.apply()
            let img = try openImage(image, format: f, forceShare: forceShare, noBacking: !backingChain)
            defer { try? img.close() }
            var chain: [DiskImage] = [img]
            while backingChain, let b = chain.last?.backingImage { chain.append(b) }
            if output == .json {
                let items = chain.map { InfoOperation.json($0, actualSize: actualSize($0.info.path)) }
                print(backingChain ? JSONValue.array(items).rendered() : items[0].rendered())
            } else {
                print(chain.map { InfoOperation.human($0, actualSize: actualSize($0.info.path)) }.joined(separator: "\n"), terminator: "")
            }
        }
    }
}

struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Check an image for consistency; -r repairs. Exit: 0 clean, 1 not completed, 2 corruption, 3 leaks.")
    @Option(name: .short, help: "Image format.") var f: String?
    @Option(name: .short, help: "Repair: leaks or all.") var r: String?
    @Option(name: .customLong("output"), help: "human or json.") var output: OutputFormat = .human
    @Flag(name: [.customShort("U"), .customLong("force-share")]) var forceShare = false
    @Flag(name: .customLong("untrusted"), help: "Safety verdict for an image from a stranger: exactly one image of the claimed format (-f), no other files named, consistent. Exit 0 safe, 2 unsafe.")
    var untrusted = false
    @Flag(name: .customLong("allow-backing"), help: "With --untrusted: a backing file is acceptable.") var allowBacking = false
    @OptionGroup var common: CommonOptions
    @Argument var image: String

    func run() throws {
        var code: Int32 = 0
        if untrusted {
            let verdict = UntrustedInspection.inspect(path: image, claimed: try parseFormat(f), allowBacking: allowBacking)
            if output == .json {
                print(verdict.json.rendered())
            } else if verdict.safe {
                print("\(image): safe (\(verdict.format ?? "?"), \(verdict.virtualSize ?? 0) bytes)")
            } else {
                print("\(image): UNSAFE")
                for p in verdict.problems { print("  - \(p)") }
            }
            if !verdict.safe { throw ExitCode(2) }
            return
        }
        try Vloop.guarded {
            try common.apply()
            let repair: CheckRepair
            switch r {
            case nil: repair = .none
            case "leaks": repair = .leaks
            case "all": repair = .all
            default: throw ImageError(.invalidArgument, "-r takes leaks or all")
            }
            let img = try openImage(image, format: f, writable: repair != .none, forceShare: forceShare && repair == .none, noBacking: true)
            defer { try? img.close() }
            guard let layer = (img as? LayeredImage)?.layer as? CheckableLayer else {
                throw ImageError(.unsupported, "this image format (\(img.info.format)) does not support checks", path: image)
            }
            let report = try layer.check(repair: repair)
            if output == .json {
                var pairs: [(String, JSONValue)] = [("image-end-offset", .uint(report.imageEndOffset)),
                                                    ("total-clusters", .uint(report.totalClusters)),
                                                    ("check-errors", .int(0)),
                                                    ("allocated-clusters", .uint(report.allocatedClusters)),
                                                    ("filename", .string(image)), ("format", .string(report.format))]
                if report.leaks > 0 { pairs.append(("leaks", .int(Int64(report.leaks)))) }
                if report.repairedLeaks > 0 { pairs.append(("leaks-fixed", .int(Int64(report.repairedLeaks)))) }
                if !report.corruptions.isEmpty { pairs.append(("corruptions", .int(Int64(report.corruptions.count)))) }
                if report.repairedCorruptions > 0 { pairs.append(("corruptions-fixed", .int(Int64(report.repairedCorruptions)))) }
                print(JSONValue.object(pairs).rendered())
            } else {
                for c in report.corruptions.prefix(64) { print("ERROR \(c)") }
                for l in report.leakDetails { print("Leaked: \(l)") }
                if report.repairedLeaks > 0 || report.repairedCorruptions > 0 {
                    print("The following inconsistencies were found and repaired:\n\n    \(report.repairedLeaks) leaked clusters\n    \(report.repairedCorruptions) corruptions\n")
                }
                if report.remainingCorruptions > 0 {
                    print("\n\(report.remainingCorruptions) errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.")
                } else if report.remainingLeaks > 0 {
                    print("\n\(report.remainingLeaks) leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.")
                } else {
                    print("No errors were found on the image.")
                }
                if report.totalClusters > 0 {
                    let pct = Double(report.allocatedClusters) * 100 / Double(report.totalClusters)
                    print("\(report.allocatedClusters)/\(report.totalClusters) = \(String(format2: pct))% allocated")
                }
                print("Image end offset: \(report.imageEndOffset)")
            }
            code = report.exitCode
        }
        if code != 0 { throw ExitCode(code) }
    }
}

extension String {
    init(format2 v: Double) {
        let r = (v * 100).rounded() / 100
        let whole = Int(r)
        let frac = Int(((r - Double(whole)) * 100).rounded())
        self = "\(whole)." + (frac < 10 ? "0\(frac)" : "\(frac)")
    }
}

struct Compare: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Compare two images' contents. Exit: 0 same, 1 different, 2 error.")
    @Option(name: .short, help: "Format of the first image.") var f: String?
    @Option(name: .customShort("F"), help: "Format of the second image.") var F: String?
    @Flag(name: .short, help: "Strict: differing sizes are a mismatch.") var s = false
    @Flag(name: [.customShort("U"), .customLong("force-share")]) var forceShare = false
    @OptionGroup var common: CommonOptions
    @Argument var first: String
    @Argument var second: String

    func run() throws {
        var result: CompareResult = .identical
        try Vloop.guarded(exitCode: 2) {
            try common.apply()
            let a = try openImage(first, format: f, forceShare: forceShare)
            defer { try? a.close() }
            let b = try openImage(second, format: F, forceShare: forceShare)
            defer { try? b.close() }
            if a.virtualSize != b.virtualSize && !s {
                print("Warning: Image size mismatch!")
            }
            result = try CompareOperation.run(a, b, strict: s)
        }
        switch result {
        case .identical: print("Images are identical.")
        case .sizeMismatch:
            print("Strict mode: Image size mismatch!")
            throw ExitCode(1)
        case .contentMismatch(let off):
            print("Content mismatch at offset \(off)!")
            throw ExitCode(1)
        }
    }
}

struct MapCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "map", abstract: "Show which ranges hold data, zeroes or nothing, and where.")
    @Option(name: .short, help: "Image format.") var f: String?
    @Option(name: .customLong("output"), help: "human or json.") var output: OutputFormat = .human
    @Flag(name: [.customShort("U"), .customLong("force-share")]) var forceShare = false
    @Option(name: [.customShort("s"), .customLong("start-offset")], help: "Map from this guest offset (e.g. 1G).", transform: sizeOption)
    var startOffset: UInt64 = 0
    @Option(name: [.customShort("l"), .customLong("max-length")], help: "Map at most this many bytes.", transform: sizeOption)
    var maxLength: UInt64?
    @OptionGroup var common: CommonOptions
    @Argument var image: String

    func run() throws {
        try Vloop.guarded {
            try common.apply()
            let img = try openImage(image, format: f, forceShare: forceShare)
            defer { try? img.close() }
            let extents = try MapOperation.extents(img, start: startOffset, length: maxLength)
            if output == .json {
                print(MapOperation.json(extents))
            } else {
                var chain: [String] = [img.info.path]
                var cur = img.backingImage
                while let c = cur { chain.append(c.info.path); cur = c.backingImage }
                print(MapOperation.human(extents, files: { $0 < chain.count ? chain[$0] : "" }), terminator: "")
            }
        }
    }
}

struct Snapshot: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List, create, apply or delete internal snapshots (qcow2).")
    @Flag(name: .short, help: "List snapshots.") var l = false
    @Option(name: .short, help: "Create a snapshot.") var c: String?
    @Option(name: .short, help: "Apply (revert to) a snapshot.") var a: String?
    @Option(name: .short, help: "Delete a snapshot.") var d: String?
    @Option(name: .short, help: "Image format.") var f: String?
    @Flag(name: [.customShort("U"), .customLong("force-share")]) var forceShare = false
    @OptionGroup var common: CommonOptions
    @Argument var image: String

    func run() throws {
        try Vloop.guarded {
            try common.apply()
            let count = [l, c != nil, a != nil, d != nil].filter { $0 }.count
            guard count == 1 else { throw ImageError(.invalidArgument, "give exactly one of -l, -c NAME, -a NAME, -d NAME") }
            let img = try openImage(image, format: f, writable: !l, forceShare: l && forceShare, noBacking: true)
            defer { try? img.close() }
            if l {
                let snaps = try SnapshotOperation.list(img)
                if !snaps.isEmpty { print("Snapshot list:\n" + SnapshotOperation.table(snaps), terminator: "") }
            } else if let c { try SnapshotOperation.create(img, name: c) }
            else if let a { try SnapshotOperation.apply(img, name: a) }
            else if let d { try SnapshotOperation.delete(img, name: d) }
            try img.close()
        }
    }
}
