import VirtualDisk
#if canImport(Glibc)
import Glibc
#endif

// libFuzzer entry point (built only with VLOOP_FUZZ=1; see scripts/fuzz.sh). The input
// becomes an image file; every format's open/info/read/extents/check runs over it
// read-only, then read-write on a scratch copy.
nonisolated(unsafe) let scratch = "/dev/shm/vloop-fuzz-\(getpid()).img"

@_cdecl("LLVMFuzzerTestOneInput")
public func vloopFuzzImage(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let formats: [ImageFormat?] = [nil] + ImageFormat.allCases.map { $0 }
    for format in formats {
        for writable in [false, true] {
            let fd = open(scratch, O_CREAT | O_TRUNC | O_WRONLY, 0o600)
            if fd < 0 { return 0 }
            var done = 0
            while done < size {
                let n = Glibc.write(fd, data + done, size - done)
                if n <= 0 { break }
                done += n
            }
            close(fd)
            ImageExercise.run(path: scratch, format: format, writable: writable)
        }
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
    return LLVMFuzzerRunDriver(&c, &v, vloopFuzzImage)
}
