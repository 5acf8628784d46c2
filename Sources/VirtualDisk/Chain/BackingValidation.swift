/// Layers that can tell whether the image opened below them is the one they were made
/// on top of (a VHD differencing disk records its parent's unique id; a name alone can
/// point at a different file). The opener asks right after opening the backing image;
/// a wrong parent fails the open instead of showing mixed data.
public protocol BackingValidatingLayer: FormatLayer {
    /// Throw an `ImageError` naming the parent and the mismatch when `backing` is not
    /// the image this layer's data was written against.
    func validateBacking(_ backing: DiskImage) throws
}
