//! A server certificate that can be replaced while the server runs: certificate renewal
//! without a restart. New handshakes get the new certificate; established connections keep
//! theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::tls::{load_certs, load_key, provider, TlsConfigError};

/// (modified time, length) of each file, to tell whether either changed.
type Stamps = [Option<(SystemTime, u64)>; 2];

/// The certificate chain and key in two PEM files, re-read on demand.
#[derive(Debug)]
pub struct ReloadableCert {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, Stamps)>,
}

/// When the leaf certificate of `key` stops being valid, in Unix seconds.
fn not_after(key: &CertifiedKey) -> Option<i64> {
    let leaf = key.cert.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// Whether the leaf certificate of `key` is a CA's (basicConstraints CA:TRUE), as
/// `openssl req -x509` makes by default.
fn is_ca(key: &CertifiedKey) -> bool {
    key.cert
        .first()
        .and_then(|leaf| x509_parser::parse_x509_certificate(leaf.as_ref()).ok())
        .and_then(|(_, cert)| {
            cert.basic_constraints()
                .ok()
                .flatten()
                .map(|bc| bc.value.ca)
        })
        .unwrap_or(false)
}

/// Says so when the served certificate is a CA's: rustls clients (our agent among them) refuse
/// it as a server certificate, so every agent would fail its handshake with a less direct
/// message.
fn warn_if_ca(path: &Path, key: &CertifiedKey) {
    if is_ca(key) {
        tracing::warn!(
            cert = %path.display(),
            "the certificate is a CA certificate (basicConstraints CA:TRUE): rustls-based \
             clients, the agent among them, refuse it as a server certificate; serve a leaf \
             certificate signed by the CA"
        );
    }
}

impl ReloadableCert {
    /// Reads both files; fails if they cannot be read or do not match.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsConfigError> {
        let stamps = stamps(cert, key);
        let certified = read(cert, key)?;
        warn_if_ca(cert, &certified);
        Ok(Arc::new(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new((Arc::new(certified), stamps)),
        }))
    }

    /// Reads the files again if either changed since the last read. `Ok(true)` when a new
    /// certificate is now served; on an error (a half-written file, a key that does not
    /// match) the previous certificate stays.
    pub fn reload_if_changed(&self) -> Result<bool, TlsConfigError> {
        let now = stamps(&self.cert, &self.key);
        if now == self.current.read().unwrap().1 {
            return Ok(false);
        }
        let certified = read(&self.cert, &self.key)?;
        warn_if_ca(&self.cert, &certified);
        *self.current.write().unwrap() = (Arc::new(certified), now);
        Ok(true)
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    /// When the certificate served now expires (Unix seconds), for the expiry gauge.
    pub fn not_after_unix(&self) -> Option<i64> {
        not_after(&self.current.read().unwrap().0)
    }

    /// A server configuration that serves whatever certificate this holds at each handshake.
    pub fn server_config(
        self: &Arc<Self>,
        alpn: &[&[u8]],
    ) -> Result<Arc<ServerConfig>, TlsConfigError> {
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }
}

impl ReloadableCert {
    /// Like [`Self::server_config`], and every client must present a certificate that
    /// `client_ca` signs (mutual TLS).
    pub fn server_config_requiring_clients(
        self: &Arc<Self>,
        alpn: &[&[u8]],
        client_ca: &Path,
    ) -> Result<Arc<ServerConfig>, TlsConfigError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in load_certs(client_ca)? {
            roots.add(c)?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsConfigError::ClientVerifier(e.to_string()))?;
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }
}

/// The same pair as a client certificate (a replica calling its peers with mutual TLS): a
/// renewed certificate is presented from the next handshake on.
impl ResolvesClientCert for ReloadableCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap().0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap().0.clone())
    }
}

fn stamps(cert: &Path, key: &Path) -> Stamps {
    let stamp = |p: &Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    [stamp(cert), stamp(key)]
}

fn read(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsConfigError> {
    let certs = load_certs(cert)?;
    Ok(CertifiedKey::from_der(certs, load_key(key)?, &provider())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_certificate_is_told_from_a_leaf() {
        let leaf = rcgen::generate_simple_self_signed(vec!["leaf".to_string()]).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["ca".to_string()]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        let certified = |der: rustls_pki_types::CertificateDer<'static>, key: &rcgen::KeyPair| {
            let key = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
            CertifiedKey::from_der(vec![der], key, &provider()).unwrap()
        };
        assert!(!is_ca(&certified(
            leaf.cert.der().clone(),
            &leaf.signing_key
        )));
        assert!(is_ca(&certified(ca.der().clone(), &ca_key)));
    }

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&c, ck.cert.pem()).unwrap();
        std::fs::write(&k, ck.signing_key.serialize_pem()).unwrap();
        (c, k)
    }

    #[test]
    fn the_expiry_of_the_served_certificate_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["exp.test".to_string()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        let r = ReloadableCert::load(&c, &k).unwrap();
        // 2031-05-17T00:00:00Z
        assert_eq!(r.not_after_unix(), Some(1_936_742_400));
    }

    #[test]
    fn a_changed_pair_is_served_and_a_broken_one_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_pair(dir.path(), "one.test");
        let r = ReloadableCert::load(&c, &k).unwrap();
        let first = r.current.read().unwrap().0.cert[0].clone();
        assert!(!r.reload_if_changed().unwrap(), "nothing changed");
        std::thread::sleep(std::time::Duration::from_millis(20));
        write_pair(dir.path(), "two.test.example");
        assert!(r.reload_if_changed().unwrap());
        let second = r.current.read().unwrap().0.cert[0].clone();
        assert_ne!(first, second);
        // A key that belongs to another certificate: refused, the second stays.
        let other = rcgen::generate_simple_self_signed(vec!["x.test".into()]).unwrap();
        std::fs::write(&k, other.signing_key.serialize_pem()).unwrap();
        assert!(r.reload_if_changed().is_err());
        assert_eq!(r.current.read().unwrap().0.cert[0], second);
    }
}
