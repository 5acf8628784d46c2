import NBDServer
import VirtualDisk
#if canImport(Glibc)
import Glibc
#endif

// libFuzzer entry point (built only with VLOOP_FUZZ=1; see scripts/fuzz.sh). One binary,
// several targets; VLOOP_FUZZ_TARGET picks one:
//
//   image            any bytes as an image file, every format (the default)
//   vmdk-descriptor  VMDK descriptor text: parse, round trip, open as an image
//   nbd              bytes from an NBD client: framing, handshake, requests
//   arguments        command-line sizes, -o option lists, format names, measure, create

/// A scratch directory of this process's own in memory.
nonisolated(unsafe) let scratch: String = {
    let dir = "/dev/shm/vloop-fuzz-\(getpid())"
    mkdir(dir, 0o700)
    return dir
}()

nonisolated(unsafe) let target: String = {
    guard let t = getenv("VLOOP_FUZZ_TARGET") else { return "image" }
    return String(cString: t)
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func vloopFuzzOne(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    switch target {
    case "image":
        fuzzImage(data, size)
    case "vmdk-descriptor":
        VMDKDescriptorExercise.run(Array(UnsafeBufferPointer(start: data, count: size)), scratch: scratch + "/descriptor.vmdk")
    case "nbd":
        NBDExercise.run(Array(UnsafeBufferPointer(start: data, count: size)), scratchDirectory: scratch)
    case "arguments":
        ArgumentExercise.run(Array(UnsafeBufferPointer(start: data, count: size)), scratchDirectory: scratch)
    default:
        fatalError("unknown VLOOP_FUZZ_TARGET '\(target)' (image, vmdk-descriptor, nbd, arguments)")
    }
    return 0
}

// SwiftPM links an executable target's entry point under this name; hand control to
// libFuzzer's driver with our callback.
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<Int32>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>, Int) -> Int32) -> Int32

@_cdecl("VloopFuzz_main")
public func vloopFuzzMain(_ argc: Int32, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> Int32 {
    var c = argc
    var v = argv
    return LLVMFuzzerRunDriver(&c, &v, vloopFuzzOne)
}
