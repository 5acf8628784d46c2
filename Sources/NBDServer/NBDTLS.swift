import NIOSSL
import VirtualDisk
#if canImport(Glibc)
import Glibc
#endif

/// The server's certificate, key and (optionally) the CA its clients' certificates must
/// chain to, loaded and checked when the server is configured, so that a bad file is
/// reported before anything listens.
///
/// With TLS configured the server runs in the protocol's FORCEDTLS mode (proto.md
/// "TLS support"): every option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is answered
/// `NBD_REP_ERR_TLS_REQD` until the client has upgraded, so no export is reached in
/// plain text.
public struct NBDTLSConfiguration: Sendable {
    let context: NIOSSLContext
    /// Whether clients must present a certificate signed by the CA.
    public let verifiesClients: Bool

    /// - Parameters:
    ///   - certificateFile: PEM: the server's certificate, then any intermediates.
    ///   - keyFile: PEM: the private key of that certificate.
    ///   - caFile: PEM: CA certificates; when given, clients must present a certificate
    ///     that chains to one of them.
    public init(certificateFile: String, keyFile: String, caFile: String? = nil) throws {
        try Self.checkReadable(certificateFile, what: "--tls-cert")
        try Self.checkReadable(keyFile, what: "--tls-key")
        if let caFile { try Self.checkReadable(caFile, what: "--tls-ca") }

        let chain = try Self.certificates(certificateFile, flag: "--tls-cert", what: "the server's certificate")
        let key: NIOSSLPrivateKey
        do {
            key = try NIOSSLPrivateKey(file: keyFile, format: .pem)
        } catch {
            throw ImageError(.invalidArgument, "not an unencrypted PEM private key (\(error)); give --tls-key the key of the --tls-cert certificate, without a passphrase",
                             path: keyFile)
        }
        var configuration: TLSConfiguration
        if let caFile {
            let roots = try Self.certificates(caFile, flag: "--tls-ca", what: "the CA certificate(s) that sign client certificates")
            configuration = .makeServerConfigurationWithMTLS(certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(key),
                                                            trustRoots: .certificates(roots))
            // Clients pick their certificate by the CA names the server sends.
            configuration.sendCANameList = true
        } else {
            configuration = .makeServerConfiguration(certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(key))
        }
        // proto.md: "NBD implementations supporting TLS MUST support TLS version 1.2 …
        // MAY support older versions but SHOULD NOT do so by default".
        configuration.minimumTLSVersion = .tlsv12
        // On close we send close_notify and wait this long for the client's; an idle
        // client that never answers would otherwise hold a server shutdown for 5 s.
        configuration.shutdownTimeout = .seconds(1)
        do {
            context = try NIOSSLContext(configuration: configuration)
        } catch {
            throw ImageError(.invalidArgument, "the key does not fit the certificate in \(certificateFile) (\(error)); give --tls-key the private key that belongs to --tls-cert",
                             path: keyFile)
        }
        verifiesClients = caFile != nil
    }

    /// The certificates of a PEM file, at least one.
    static func certificates(_ path: String, flag: String, what: String) throws -> [NIOSSLCertificate] {
        let found: [NIOSSLCertificate]
        do {
            found = try NIOSSLCertificate.fromPEMFile(path)
        } catch {
            throw ImageError(.invalidArgument, "not a PEM certificate (\(error)); give \(flag) \(what) in PEM form ('-----BEGIN CERTIFICATE-----')",
                             path: path)
        }
        guard !found.isEmpty else {
            throw ImageError(.invalidArgument, "holds no certificate; give \(flag) \(what) in PEM form", path: path)
        }
        return found
    }

    static func checkReadable(_ path: String, what: String) throws {
        if access(path, R_OK) != 0 {
            let e = errno
            let reason = e == ENOENT ? "no such file" : String(cString: strerror(e))
            throw ImageError(e == ENOENT ? .notFound : .io, "\(reason); \(what) needs a readable PEM file", path: path, errno: e)
        }
    }
}
