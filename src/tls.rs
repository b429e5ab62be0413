//! TLS settings (feature `tls`): rustls with the ring provider, TLS 1.3 and 1.2.
//!
//! A server serves `wss://` (and its page over `https://`) when
//! [`ServerConfig::tls`](crate::ServerConfig::tls) holds a [`ServerTls`]; the client and the
//! load generator connect to `wss://` URLs with a [`ClientTls`].
//!
//! ```no_run
//! # #[cfg(feature = "server")] {
//! let mut cfg = wsloop::ServerConfig::default();
//! cfg.tls = Some(wsloop::tls::ServerTls::from_pem_files("cert.pem", "key.pem")?);
//! let server = wsloop::Server::bind("0.0.0.0:443", cfg)?;
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

// Builds with only the server or only the client leave the other side's settings unused.
#![cfg_attr(not(all(feature = "server", feature = "client")), allow(dead_code))]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Why a TLS setting could not be made: one line naming the file and the problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfigError(String);

impl std::fmt::Display for TlsConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsConfigError {}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a file whole, with the file's name in the error.
fn read(path: &Path, what: &str) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|e| TlsConfigError(format!("cannot read {what} {}: {e}", path.display())))
}

/// Every certificate in a PEM text.
fn certs(pem: &[u8], source: &str) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsConfigError(format!("{source}: not a valid PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(TlsConfigError(format!(
            "{source}: no certificate (BEGIN CERTIFICATE) in it"
        )));
    }
    Ok(certs)
}

/// The server's side: its certificate chain and key.
///
/// One made by [`from_pem_files`](Self::from_pem_files) remembers its files, so that
/// [`reload`](Self::reload) can read them again: a running server takes a reloaded one with
/// [`Handle::reload_tls`](crate::server::Handle::reload_tls), and does so by itself on SIGHUP
/// with [`ServerConfig::handle_signals`](crate::ServerConfig::handle_signals).
#[derive(Clone)]
pub struct ServerTls {
    pub(crate) config: Arc<rustls::ServerConfig>,
    /// The certificate and key files it was read from, if it was.
    files: Option<Arc<(PathBuf, PathBuf)>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads a PEM certificate chain (the server's certificate first) and its PEM private key
    /// (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem_files(cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<ServerTls, TlsConfigError> {
        let (cert, key) = (cert.as_ref(), key.as_ref());
        let cert_pem = read(cert, "certificate file")?;
        let key_pem = read(key, "key file")?;
        let mut tls = Self::build(
            &cert_pem,
            &key_pem,
            &cert.display().to_string(),
            &key.display().to_string(),
        )?;
        tls.files = Some(Arc::new((cert.to_path_buf(), key.to_path_buf())));
        Ok(tls)
    }

    /// The certificate and key files this was read from ([`from_pem_files`](Self::from_pem_files)),
    /// or `None` when it was made from memory or a rustls configuration.
    pub fn files(&self) -> Option<(&Path, &Path)> {
        self.files.as_deref().map(|(c, k)| (c.as_path(), k.as_path()))
    }

    /// Reads this one's certificate and key files again (after a renewal, say): a new
    /// `ServerTls` when they hold a usable pair, the same error as
    /// [`from_pem_files`](Self::from_pem_files) otherwise (a missing or unparsable file, a key
    /// that is not the certificate's), and an error when this one was not read from files.
    /// This one is left as it was.
    pub fn reload(&self) -> Result<ServerTls, TlsConfigError> {
        match self.files() {
            Some((cert, key)) => Self::from_pem_files(cert, key),
            None => Err(TlsConfigError(
                "the certificate was not read from files: nothing to read again".to_string(),
            )),
        }
    }

    /// A PEM certificate chain and PEM private key held in memory.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<ServerTls, TlsConfigError> {
        Self::build(cert_pem, key_pem, "certificate", "key")
    }

    /// A rustls configuration made by the caller (client certificates, ALPN, other keys).
    pub fn from_rustls(config: Arc<rustls::ServerConfig>) -> ServerTls {
        ServerTls { config, files: None }
    }

    fn build(cert_pem: &[u8], key_pem: &[u8], cert_name: &str, key_name: &str) -> Result<ServerTls, TlsConfigError> {
        let chain = certs(cert_pem, cert_name)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| TlsConfigError(format!("{key_name}: no usable PEM private key in it: {e}")))?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsConfigError(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => {
                    TlsConfigError(format!("{key_name} is not the key of the certificate in {cert_name}"))
                }
                e => TlsConfigError(format!("{cert_name} / {key_name}: {e}")),
            })?;
        Ok(ServerTls {
            config: Arc::new(config),
            files: None,
        })
    }
}

/// Where the system's CA bundle usually is (Debian and derivatives first).
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
];

/// The client's side: which servers to trust.
#[derive(Clone)]
pub struct ClientTls {
    pub(crate) config: Arc<rustls::ClientConfig>,
    pub(crate) verifies: bool,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("verifies", &self.verifies)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the system's CA bundle: the file named by `SSL_CERT_FILE`, else the first of the
    /// usual places (`/etc/ssl/certs/ca-certificates.crt`, ...).
    pub fn system_roots() -> Result<ClientTls, TlsConfigError> {
        if let Some(f) = std::env::var_os("SSL_CERT_FILE") {
            return Self::with_ca_file(f);
        }
        match SYSTEM_BUNDLES.iter().find(|p| Path::new(p).exists()) {
            Some(p) => Self::with_ca_file(p),
            None => Err(TlsConfigError(
                "no system CA bundle found (set SSL_CERT_FILE or pass --ca FILE)".to_string(),
            )),
        }
    }

    /// Trusts only the CA certificates in a PEM file (like `curl --cacert`).
    pub fn with_ca_file(path: impl AsRef<Path>) -> Result<ClientTls, TlsConfigError> {
        let path = path.as_ref();
        let pem = read(path, "CA file")?;
        Self::build(&pem, &path.display().to_string())
    }

    /// Trusts only the CA certificates in a PEM text.
    pub fn with_ca_pem(pem: &[u8]) -> Result<ClientTls, TlsConfigError> {
        Self::build(pem, "CA certificates")
    }

    fn build(pem: &[u8], name: &str) -> Result<ClientTls, TlsConfigError> {
        let mut roots = rustls::RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(certs(pem, name)?);
        if added == 0 {
            return Err(TlsConfigError(format!("{name}: no usable CA certificate in it")));
        }
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsConfigError(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(ClientTls {
            config: Arc::new(config),
            verifies: true,
        })
    }

    /// Accepts any certificate: the connection is encrypted but the server is not
    /// authenticated. For tests against self-signed servers only.
    pub fn insecure() -> ClientTls {
        let provider = provider();
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
            .with_no_client_auth();
        ClientTls {
            config: Arc::new(config),
            verifies: false,
        }
    }

    /// A rustls configuration made by the caller (client certificates, other roots).
    pub fn from_rustls(config: Arc<rustls::ClientConfig>) -> ClientTls {
        ClientTls { config, verifies: true }
    }

    /// Starts a session with `host` (SNI and the name checked; an IP address is checked
    /// against the certificate's IP addresses).
    pub(crate) fn session(&self, host: &str) -> Result<rustls::client::UnbufferedClientConnection, String> {
        let name =
            ServerName::try_from(host.to_string()).map_err(|_| format!("'{host}' is not a valid TLS server name"))?;
        rustls::client::UnbufferedClientConnection::new(self.config.clone(), name).map_err(|e| e.to_string())
    }
}

/// `--insecure`: every certificate is accepted; signatures are still checked, so the
/// handshake itself is sound.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
