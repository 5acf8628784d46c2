/// What a format needs from the opener: policy-checked access to files that image
/// metadata names (external data files, VMDK extents). Only Open/ turns names written
/// inside an image into files.
public struct OpenContext: Sendable {
    public var writable: Bool
    public var cache: MetadataCache
    /// Open a file named inside the image, resolved and vetted by the open policy.
    public var openAuxiliary: @Sendable (_ name: String, _ writable: Bool) throws -> HostFile

    public init(writable: Bool, cache: MetadataCache = .shared,
                openAuxiliary: @escaping @Sendable (String, Bool) throws -> HostFile) {
        self.writable = writable
        self.cache = cache
        self.openAuxiliary = openAuxiliary
    }
}
