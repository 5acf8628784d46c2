import ArgumentParser
import VirtualDisk
#if canImport(Glibc)
import Glibc
#endif

struct Create: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Create a new image.")
    @Option(name: .short, help: "Format (raw, qcow, qcow2, …).") var f: String = "raw"
    @Option(name: .short, help: "Format options: key=value,…") var o: [String] = []
    @Option(name: .short, help: "Backing file.") var b: String?
    @Option(name: .customShort("F"), help: "Backing file format.") var F: String?
    @Flag(name: .short, help: "Quiet.") var q = false
    @Argument var image: String
    @Argument var size: String?

    func run() throws {
        try Vloop.guarded {
            guard let format = try parseFormat(f) else { return }
            var r = CreateRequest(path: image, format: format, size: try size.map(SizeParser.parse))
            r.options = try o.flatMap(OptionList.parse)
            r.backingFile = b
            r.backingFormat = try parseFormat(F)
            try CreateOperation.run(r, warn: { printError("vloop: warning: \($0)") })
            if !q {
                var line = "Formatting '\(image)', fmt=\(format.rawValue)"
                if let s = r.size { line += " size=\(s)" }
                if let b { line += " backing_file=\(b)" }
                print(line)
            }
        }
    }
}

/// Draws qemu-img-style progress on stderr.
final class ProgressBar: Sendable {
    let enabled: Bool
    init(enabled: Bool) { self.enabled = enabled }
    func update(_ fraction: Double) {
        guard enabled else { return }
        let pct = min(100, max(0, fraction * 100))
        printErrorNoNewline("    (\(String(format2: pct))/100%)\r")
    }
    func finish() { if enabled { printError("") } }
}

func printErrorNoNewline(_ s: String) {
    _ = s.withCString { write(2, $0, strlen($0)) }
}

struct Convert: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Convert an image to another format (sparse, optionally compressed).")
    @Option(name: .short, help: "Source format.") var f: String?
    @Option(name: .customShort("O"), help: "Output format.") var O: String = "raw"
    @Option(name: .short, help: "Output format options.") var o: [String] = []
    @Flag(name: .short, help: "Compress the output (qcow2).") var c = false
    @Flag(name: .short, help: "Show progress.") var p = false
    @Option(name: .customShort("S"), help: "Minimum run of zeroes to leave sparse (default 4k; 0 writes all).") var S: String?
    @Flag(name: .short, help: "Write into an existing target image.") var n = false
    @Option(name: .customShort("B"), help: "Backing file of the output: only differences are written.") var B: String?
    @Option(name: .customShort("F"), help: "Format of the -B backing file.") var F: String?
    @Flag(name: [.customShort("U"), .customLong("force-share")]) var forceShare = false
    @Flag(name: .short, help: "Quiet.") var q = false
    @OptionGroup var common: CommonOptions
    @Argument var source: String
    @Argument var target: String

    func run() throws {
        try Vloop.guarded {
            try common.apply()
            let src = try openImage(source, format: f, forceShare: forceShare)
            defer { try? src.close() }
            guard let outFormat = try parseFormat(O) else { return }
            if !n {
                var r = CreateRequest(path: target, format: outFormat, size: src.virtualSize)
                r.options = try o.flatMap(OptionList.parse)
                r.backingFile = B
                r.backingFormat = try parseFormat(F)
                try CreateOperation.run(r)
            } else if B != nil {
                throw ImageError(.invalidArgument, "-B cannot be used with -n (the target exists already)")
            }
            let dst = try openImage(target, format: O, writable: true)
            var options = ConvertOptions()
            options.compress = c
            options.existingTarget = n
            if let S { options.sparseSize = try SizeParser.parse(S) }
            let bar = ProgressBar(enabled: p && !q)
            options.progress = { bar.update($0) }
            do {
                try ConvertOperation.run(source: src, target: dst, options: options)
                try dst.close()
            } catch {
                try? dst.close()
                throw error
            }
            bar.finish()
        }
    }
}

struct Commit: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Write an image's changes into its backing file.")
    @Option(name: .short, help: "Image format.") var f: String?
    @Flag(name: .short, help: "Keep the image's data (do not empty it).") var d = false
    @Flag(name: .short, help: "Show progress.") var p = false
    @Flag(name: .short, help: "Quiet.") var q = false
    @OptionGroup var common: CommonOptions
    @Argument var image: String

    func run() throws {
        try Vloop.guarded {
            try common.apply()
            // Find the backing file, then open it read-write under the top layer.
            let peek = try openImage(image, format: f, forceShare: true, noBacking: true)
            guard let ref = peek.info.backing else {
                try peek.close()
                throw ImageError(.invalidArgument, "image has no backing file to commit into", path: image)
            }
            try peek.close()
            let top = try ImageOpener.openForCommit(image, format: try parseFormat(f), backingFormat: ref.format.flatMap(ImageFormat.init(name:)))
            let bar = ProgressBar(enabled: p && !q)
            do {
                try CommitOperation.run(top: top, keepTop: d, progress: { bar.update($0) })
                try top.close()
            } catch {
                try? top.close()
                throw error
            }
            bar.finish()
            if !q { print("Image committed.") }
        }
    }
}

struct Rebase: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Change an image's backing file (copying differences unless -u).")
    @Option(name: .short, help: "Image format.") var f: String?
    @Option(name: .short, help: "New backing file (\"\" for none).") var b: String
    @Option(name: .customShort("F"), help: "New backing file format.") var F: String?
    @Flag(name: .short, help: "Unsafe: only change the recorded name.") var u = false
    @Flag(name: .short, help: "Show progress.") var p = false
    @OptionGroup var common: CommonOptions
    @Argument var image: String

    func run() throws {
        try Vloop.guarded {
            try common.apply()
            let newName: String? = b.isEmpty ? nil : b
            var newFormat = F
            let top = try openImage(image, format: f, writable: true, noBacking: u)
            defer { try? top.close() }
            var newBacking: DiskImage?
            if let newName {
                var o = OpenOptions(format: try parseFormat(F))
                o.forceShare = true
                let resolved = newName.hasPrefix("/") ? newName : (image.contains("/") ? String(image[...image.lastIndex(of: "/")!]) + newName : newName)
                o.userNamed = [newName, resolved]
                do {
                    newBacking = try ImageOpener.open(resolved, options: o)
                } catch let e as ImageError where u && e.code == .notFound {
                    newBacking = nil  // unsafe rebase may name a file that does not exist yet
                }
                if newFormat == nil, let nb = newBacking { newFormat = nb.info.format }
            }
            defer { try? newBacking?.close() }
            if u {
                guard let layer = (top as? LayeredImage)?.layer as? BackingSettableLayer else {
                    throw ImageError(.unsupported, "\(top.info.format) images cannot change their backing file", path: image)
                }
                try layer.setBacking(name: newName, format: newFormat)
            } else {
                try RebaseOperation.run(top: top, newBacking: newBacking, newName: newName, newFormat: newFormat)
            }
            try top.close()
        }
    }
}

struct Resize: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Change an image's virtual size: SIZE, +SIZE or -SIZE.")
    @Option(name: .short, help: "Image format.") var f: String?
    @Flag(name: .customLong("shrink"), help: "Allow shrinking (loses data past the new end).") var shrink = false
    @Flag(name: .short, help: "Quiet.") var q = false
    @OptionGroup var common: CommonOptions
    @Argument var image: String
    @Argument var size: String

    func run() throws {
        try Vloop.guarded {
            try common.apply()
            let img = try openImage(image, format: f, writable: true, noBacking: true)
            defer { try? img.close() }
            let old = img.virtualSize
            let newSize = try SizeParser.resizeTarget(size, current: old)
            try ResizeOperation.run(img, to: newSize, shrink: shrink)
            try img.close()
            if !q { print("Image resized.") }
        }
    }
}

struct Measure: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Measure the size an image of a format needs.")
    @Option(name: .customShort("O"), help: "Output format.") var O: String = "raw"
    @Option(name: .short, help: "Output format options.") var o: [String] = []
    @Option(name: .customLong("size"), help: "Virtual size.") var size: String?
    @Option(name: .short, help: "Source format.") var f: String?
    @Option(name: .customLong("output"), help: "human or json.") var output: OutputFormat = .human
    @Flag(name: [.customShort("U"), .customLong("force-share")]) var forceShare = false
    @Argument var source: String?

    func run() throws {
        try Vloop.guarded {
            guard (size == nil) != (source == nil) else { throw ImageError(.invalidArgument, "give either --size SIZE or a source image") }
            guard let format = try parseFormat(O) else { return }
            let src = try source.map { try openImage($0, format: f, forceShare: forceShare) }
            defer { try? src?.close() }
            let r = try MeasureOperation.run(format: format, options: try o.flatMap(OptionList.parse), size: try size.map(SizeParser.parse), source: src)
            if output == .json {
                print(JSONValue.object([("bitmaps", .uint(0)), ("required", .uint(r.required)), ("fully-allocated", .uint(r.fullyAllocated))]).rendered())
            } else {
                print("required size: \(r.required)\nfully allocated size: \(r.fullyAllocated)")
            }
        }
    }
}
