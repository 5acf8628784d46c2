/// The one error type of the engine: a small code, a message that tells a person what
/// to do next, and where it happened.
public struct ImageError: Error, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        case io, invalidFormat, unsupported, corrupt, outOfRange, readOnly, notFound, locked, chain, invalidArgument
    }

    public var code: Code
    public var message: String
    public var path: String?
    public var format: String?
    public var offset: UInt64?
    public var errno: Int32?

    public init(_ code: Code, _ message: String, path: String? = nil, format: String? = nil,
                offset: UInt64? = nil, errno: Int32? = nil) {
        self.code = code
        self.message = message
        self.path = path
        self.format = format
        self.offset = offset
        self.errno = errno
    }

    /// `path: message` — the form the CLI prints.
    public var description: String {
        if let path { return "\(path): \(message)" }
        return message
    }

    /// The same error attributed to a file, unless it already names one.
    public func at(path newPath: String) -> ImageError {
        var copy = self
        if copy.path == nil { copy.path = newPath }
        return copy
    }

    static func corrupt(_ message: String, offset: UInt64? = nil) -> ImageError {
        ImageError(.corrupt, message, offset: offset)
    }
    static func invalid(_ message: String) -> ImageError {
        ImageError(.invalidFormat, message)
    }
}

extension ImageError {
    /// Run `body`, attributing any ImageError thrown to `path`.
    static func attributing<T>(to path: String, _ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch let error as ImageError {
            throw error.at(path: path)
        }
    }
}
