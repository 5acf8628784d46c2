import VirtualDisk
#if canImport(Glibc)
import Glibc
#endif

/// The image target: the input becomes an image file; every format's open/info/read/
/// extents/check runs over it read-only, then read-write on a scratch copy.
func fuzzImage(_ data: UnsafePointer<UInt8>, _ size: Int) {
    let formats: [ImageFormat?] = [nil] + ImageFormat.allCases.map { $0 }
    for format in formats {
        for writable in [false, true] {
            let fd = open(scratch + "/image", O_CREAT | O_TRUNC | O_WRONLY, 0o600)
            if fd < 0 { return }
            var done = 0
            while done < size {
                let n = Glibc.write(fd, data + done, size - done)
                if n <= 0 { break }
                done += n
            }
            close(fd)
            ImageExercise.run(path: scratch + "/image", format: format, writable: writable)
        }
    }
}
