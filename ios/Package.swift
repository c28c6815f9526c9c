// swift-tools-version:5.9
// CairnKit: Swift over Cairn's C ABI. Run ./build-xcframework.sh first (on a Mac with
// Xcode and rustup); it puts build/CairnFFI.xcframework (static library, cairn.h and
// the module map) where the binary target below expects it.
import PackageDescription

let package = Package(
    name: "CairnKit",
    platforms: [.iOS(.v15), .macOS(.v12)],
    products: [.library(name: "CairnKit", targets: ["CairnKit"])],
    targets: [
        .binaryTarget(name: "CairnFFI", path: "build/CairnFFI.xcframework"),
        .target(name: "CairnKit", dependencies: ["CairnFFI"], path: "Sources/CairnKit"),
    ]
)
