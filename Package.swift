// swift-tools-version:6.0
import PackageDescription
import Foundation

let package = Package(
    name: "vloop",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "VirtualDisk", targets: ["VirtualDisk"]),
        .library(name: "Exports", targets: ["Exports"]),
        .library(name: "NBDServer", targets: ["NBDServer"]),
        .executable(name: "vloop", targets: ["vloop"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
    ],
    targets: [
        // Thin C shim: Linux-only constants and calls that Glibc's Swift overlay hides
        // without _GNU_SOURCE (OFD locks, fallocate modes, SEEK_DATA/SEEK_HOLE, O_DIRECT),
        // plus zlib and zstd.
        .target(
            name: "CVloop",
            linkerSettings: [.linkedLibrary("z"), .linkedLibrary("zstd")]
        ),
        .target(
            name: "VirtualDisk",
            dependencies: ["CVloop"],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        .systemLibrary(name: "CFuse", pkgConfig: "fuse3", providers: [.apt(["libfuse3-dev"])]),
        // Exports serve any DiskImage; they know nothing of formats.
        .target(
            name: "Exports",
            dependencies: ["VirtualDisk", "CFuse", "CVloop"],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        // The NBD server: any DiskImage over the network. The event loop only decodes
        // and encodes; image I/O runs on a bounded thread pool.
        .target(
            name: "NBDServer",
            dependencies: [
                "VirtualDisk",
                "CVloop",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        .executableTarget(
            name: "vloop",
            dependencies: [
                "VirtualDisk",
                "Exports",
                "NBDServer",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)],
            // Release builds pack their relative relocations (DT_RELR, with the toolchain's
            // lld): unpacked, ~94,000 of them took 2.2 MB that every start read, and an
            // idle `serve` held 1.9 MiB more than a position-dependent build. Position
            // independence (ASLR) stays, for a server that usually runs as root.
            linkerSettings: [.unsafeFlags(["-use-ld=lld", "-Xlinker", "-z", "-Xlinker", "pack-relative-relocs"], .when(configuration: .release))]
        ),
        .testTarget(
            name: "VirtualDiskTests",
            dependencies: [
                "VirtualDisk", "Exports", "CVloop", "NBDServer",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOTestUtils", package: "swift-nio"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
    ]
)

// Fuzz targets: built only for scripts/fuzz.sh (they need -sanitize=fuzzer for a main).
if ProcessInfo.processInfo.environment["VLOOP_FUZZ"] != nil {
    package.products.append(.executable(name: "vloop-fuzz", targets: ["VloopFuzz"]))
    package.targets.append(.executableTarget(name: "VloopFuzz", dependencies: ["VirtualDisk", "NBDServer"],
                                             swiftSettings: [.swiftLanguageMode(.v6), .unsafeFlags(["-parse-as-library"])]))
}
