//! TLS configuration for both ends, always with the ring provider (it builds in half the time
//! of aws-lc-rs here and gives a smaller binary).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// ALPN protocol id of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN protocol id of HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Why TLS could not be configured. Each says what is wrong in words (never a library's
/// debug text) and carries no source of its own, so that a printed chain says it once.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot read certificates from {path}: {why}")]
    Certs { path: PathBuf, why: String },
    #[error("no certificate found in {0}")]
    NoCerts(PathBuf),
    #[error("cannot read private key from {path}: {why}")]
    Key { path: PathBuf, why: String },
    #[error("{0}")]
    Rustls(String),
    #[error("cannot verify client certificates with these CA certificates: {0}")]
    ClientVerifier(String),
}

impl From<rustls::Error> for TlsConfigError {
    fn from(e: rustls::Error) -> Self {
        use rustls::{Error, InconsistentKeys};
        Self::Rustls(match e {
            Error::InconsistentKeys(InconsistentKeys::KeyMismatch) => {
                "the private key does not belong to the certificate: give the key file that \
                 was made with this certificate"
                    .into()
            }
            // webpki names this case only by its debug name.
            other if other.to_string().contains("UnsupportedCertVersion") => {
                "the certificate is X.509 version 1; TLS clients need version 3 (sign it with \
                 extensions, for example `openssl x509 -req ... -extfile` naming a \
                 subjectAltName)"
                    .into()
            }
            other => format!("invalid TLS configuration: {other}"),
        })
    }
}

/// What is wrong with a PEM file, in words.
fn pem_problem(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match e {
        Error::Io(io) => io.to_string(),
        Error::MissingSectionEnd { .. } => {
            "a PEM section has no END line (is the file complete, or still being written?)".into()
        }
        Error::IllegalSectionStart { .. } => "a PEM section's BEGIN line is malformed".into(),
        Error::Base64Decode(_) => "a PEM section is not valid base64".into(),
        Error::NoItemsFound => "it holds no PEM item of the expected kind".into(),
        other => other.to_string(),
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsConfigError::Certs {
            path: path.to_path_buf(),
            why: pem_problem(&e),
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCerts(path.to_path_buf()));
    }
    Ok(certs)
}

/// A server-side TLS handshake failure as one sentence for the log: a client that sent no
/// TLS at all (cleartext HTTP or gRPC to a TLS port) is named as such instead of rustls's
/// "received corrupt message of type InvalidContentType".
pub fn describe_handshake_failure(e: &std::io::Error) -> String {
    use rustls::{Error, InvalidMessage};
    let rustls_error = e.get_ref().and_then(|inner| inner.downcast_ref::<Error>());
    match rustls_error {
        Some(Error::InvalidMessage(
            InvalidMessage::InvalidContentType | InvalidMessage::UnknownProtocolVersion,
        )) => "the client did not speak TLS (cleartext HTTP or gRPC sent to a TLS port?)".into(),
        Some(Error::NoApplicationProtocol) => {
            "TLS handshake failed: the client offered no protocol (ALPN) this port speaks".into()
        }
        Some(other) => format!("TLS handshake failed: {other}"),
        None => format!("TLS handshake failed: {e}"),
    }
}

/// Server configuration from PEM files, offering ALPN `alpn` in order of preference.
pub fn server_config(
    cert: &Path,
    key: &Path,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let certs = load_certs(cert)?;
    server_config_from_der(certs, load_key(key)?, alpn)
}

/// The private key in a PEM file.
pub(crate) fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsConfigError::Key {
        path: path.to_path_buf(),
        why: match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                "it holds no private key in PEM format".into()
            }
            other => pem_problem(&other),
        },
    })
}

/// Server configuration from DER certificates and key (used by `agentgate demo`).
pub fn server_config_from_der(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// How a client verifies the server.
#[derive(Debug, Clone, Default)]
pub enum ServerVerification {
    /// The operating system's trust store.
    #[default]
    SystemRoots,
    /// Only the CA certificates in this PEM file.
    CaFile(PathBuf),
    /// No verification at all. For tests and first contact only.
    InsecureSkipVerify,
}

/// The operating system's trust store, read once per process. Parsing it takes milliseconds
/// of CPU, and a process that runs many agents (the bench's load generators) would otherwise
/// parse it once per agent. A changed trust store takes effect on restart.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            for e in &native.errors {
                tracing::debug!(error = %e, "skipping a system certificate");
            }
            roots.add_parsable_certificates(native.certs);
            Arc::new(roots)
        })
        .clone()
}

/// Client configuration without ALPN (each dial sets its own).
pub fn client_config(verify: &ServerVerification) -> Result<ClientConfig, TlsConfigError> {
    client_config_presenting(verify, None)
}

/// Like [`client_config`], presenting `client_cert` when the server asks for one.
pub fn client_config_presenting(
    verify: &ServerVerification,
    client_cert: Option<Arc<dyn rustls::client::ResolvesClientCert>>,
) -> Result<ClientConfig, TlsConfigError> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match verify {
        ServerVerification::SystemRoots => builder.with_root_certificates(system_roots()),
        ServerVerification::CaFile(path) => {
            let mut roots = RootCertStore::empty();
            for c in load_certs(path)? {
                roots.add(c)?;
            }
            builder.with_root_certificates(roots)
        }
        ServerVerification::InsecureSkipVerify => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider()))),
    };
    Ok(match client_cert {
        Some(resolver) => builder.with_client_cert_resolver(resolver),
        None => builder.with_no_client_auth(),
    })
}

/// Accepts any certificate, but still checks handshake signatures so the connection is
/// well-formed TLS.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
