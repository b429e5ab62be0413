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

use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

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
    std::fs::read(path).map_err(|e| {
        TlsConfigError(format!(
            "cannot read {what} {}: {}",
            path.display(),
            crate::io::describe(&e)
        ))
    })
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
                "no system CA bundle found (SSL_CERT_FILE is not set and none of the usual files exists)".to_string(),
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
        let certs = certs(pem, name)?;
        let mut roots = rustls::RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(certs.iter().cloned());
        if added == 0 {
            return Err(TlsConfigError(format!("{name}: no usable CA certificate in it")));
        }
        let provider = provider();
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| TlsConfigError(format!("{name}: {e}")))?;
        let verifier = CaFileVerifier {
            webpki,
            pinned: certs,
            provider: provider.clone(),
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsConfigError(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
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
    pub(crate) fn session(&self, host: &str) -> Result<rustls::client::UnbufferedClientConnection, TlsError> {
        let name = ServerName::try_from(host.to_string()).map_err(|_| TlsError::InvalidServerName(host.to_string()))?;
        rustls::client::UnbufferedClientConnection::new(self.config.clone(), name).map_err(|e| TlsError::from(&e))
    }
}

/// Why a TLS handshake failed, in terms a program can act on. `Display` says it in plain
/// words, in one line, without advice (what to do depends on the program).
///
/// ```
/// use wsloop::tls::TlsError;
/// assert_eq!(TlsError::NotTrusted.to_string(), "certificate not trusted (unknown issuer)");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsError {
    /// The server's certificate leads to no trusted certificate (an unknown issuer: a private
    /// CA or a self-signed certificate that is not in the trusted file).
    NotTrusted,
    /// The certificate is not for the name connected to.
    NameMismatch {
        /// The host name or address connected to.
        expected: String,
        /// The names the certificate is for (its subjectAltName entries; empty when it has
        /// none, or when they were not reported).
        presented: Vec<String>,
    },
    /// The certificate has expired.
    Expired,
    /// The certificate is not valid yet.
    NotValidYet,
    /// The certificate was revoked.
    Revoked,
    /// A signature on the certificate does not verify.
    BadSignature,
    /// Another problem with the certificate, in words.
    BadCertificate(String),
    /// The server answered with something that is not TLS (a plain `ws://` port).
    NotTls,
    /// The server ended the handshake with an alert (its description, in words).
    AlertReceived(String),
    /// The host cannot be used as a TLS server name.
    InvalidServerName(String),
    /// Another handshake failure, in words.
    Handshake(String),
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsError::NotTrusted => f.write_str("certificate not trusted (unknown issuer)"),
            TlsError::NameMismatch { expected, presented } if presented.is_empty() => {
                if expected.is_empty() {
                    f.write_str("name does not match (the certificate is for other names)")
                } else {
                    write!(f, "name does not match: the certificate is not for {expected}")
                }
            }
            TlsError::NameMismatch { expected, presented } => {
                write!(
                    f,
                    "name does not match: {expected} (the certificate is for {})",
                    presented.join(", ")
                )
            }
            TlsError::Expired => f.write_str("certificate expired"),
            TlsError::NotValidYet => f.write_str("certificate not valid yet"),
            TlsError::Revoked => f.write_str("certificate revoked"),
            TlsError::BadSignature => f.write_str("bad certificate signature"),
            TlsError::BadCertificate(why) => write!(f, "bad certificate: {why}"),
            TlsError::NotTls => f.write_str("the server does not speak TLS"),
            TlsError::AlertReceived(what) => write!(f, "the server refused the TLS handshake ({what})"),
            TlsError::InvalidServerName(host) => write!(f, "'{host}' is not a valid TLS server name"),
            TlsError::Handshake(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for TlsError {}

impl From<&rustls::Error> for TlsError {
    fn from(e: &rustls::Error) -> Self {
        use CertificateError as C;
        match e {
            rustls::Error::InvalidCertificate(c) => match c {
                C::UnknownIssuer => TlsError::NotTrusted,
                C::NotValidForName => TlsError::NameMismatch {
                    expected: String::new(),
                    presented: Vec::new(),
                },
                C::NotValidForNameContext { expected, presented } => TlsError::NameMismatch {
                    expected: expected.to_str().into_owned(),
                    presented: presented.iter().map(|n| presented_name(n)).collect(),
                },
                C::Expired | C::ExpiredContext { .. } => TlsError::Expired,
                C::NotValidYet | C::NotValidYetContext { .. } => TlsError::NotValidYet,
                C::Revoked => TlsError::Revoked,
                C::BadSignature => TlsError::BadSignature,
                C::BadEncoding => TlsError::BadCertificate("malformed".to_string()),
                C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                    TlsError::BadCertificate("not for TLS servers (extended key usage)".to_string())
                }
                C::UnsupportedSignatureAlgorithmContext { .. }
                | C::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
                    TlsError::BadCertificate("signed with an unsupported algorithm".to_string())
                }
                C::UnknownRevocationStatus => TlsError::BadCertificate("revocation status unknown".to_string()),
                C::Other(o) => TlsError::BadCertificate(words(&o.to_string())),
                c => TlsError::BadCertificate(words(&format!("{c:?}"))),
            },
            rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. } => TlsError::NotTls,
            rustls::Error::AlertReceived(a) => TlsError::AlertReceived(words(&format!("{a:?}"))),
            rustls::Error::NoCertificatesPresented => TlsError::Handshake("the server sent no certificate".to_string()),
            rustls::Error::PeerIncompatible(p) => TlsError::Handshake(format!(
                "the server's TLS is incompatible: {}",
                words(&format!("{p:?}"))
            )),
            rustls::Error::PeerMisbehaved(p) => TlsError::Handshake(format!(
                "the server broke the TLS protocol: {}",
                words(&format!("{p:?}"))
            )),
            rustls::Error::General(why) => TlsError::Handshake(why.clone()),
            e => TlsError::Handshake(format!("TLS: {e}")),
        }
    }
}

/// A name as webpki reports it (`DnsName("example.com")`, `IpAddress(10.0.0.1)`), bare.
fn presented_name(n: &str) -> String {
    let bare = n
        .strip_prefix("DnsName(")
        .or_else(|| n.strip_prefix("IpAddress("))
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or(n);
    bare.trim_matches('"').to_string()
}

/// An enum variant's name (`CaUsedAsEndEntity`, `HandshakeFailure { .. }`) as lower-case words
/// (`ca used as end entity`), so that no type name reaches a user.
fn words(variant: &str) -> String {
    let name = variant.split(|c: char| !c.is_ascii_alphanumeric()).next().unwrap_or("");
    let mut out = String::with_capacity(name.len() + 8);
    let mut prev_lower = false;
    for c in name.chars() {
        if c.is_ascii_uppercase() && prev_lower {
            out.push(' ');
        }
        prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// The verifier of a CA file (`--ca FILE`): webpki's, and one more way to trust a certificate.
///
/// A self-signed server certificate made with `openssl req -x509` carries `CA:TRUE`, and webpki
/// refuses a CA certificate as the server's own (`CaUsedAsEndEntity`) even when it is the very
/// certificate trusted. Python, Node and curl accept it; so does this: a server certificate that
/// is byte for byte one of the file's is accepted when its self-signature verifies (with the
/// provider's algorithms), it is within its validity, and it is for the name connected to.
#[derive(Debug)]
struct CaFileVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    /// The file's certificates, trusted as they are when a server presents one as its own.
    pinned: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for CaFileVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(_))
                if self.pinned.iter().any(|c| c.as_ref() == end_entity.as_ref()) =>
            {
                verify_pinned(end_entity, server_name, now, &self.provider)?;
                Ok(ServerCertVerified::assertion())
            }
            // A CA certificate as the server's own is trusted only as itself (above): any
            // other is one this file does not trust.
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(o)))
                if o.to_string().contains("CaUsedAsEndEntity") =>
            {
                Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))
            }
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.webpki.root_hint_subjects()
    }
}

/// Checks a trusted certificate presented as the server's own: its self-signature, its
/// validity at `now`, and its names against `server_name`.
fn verify_pinned(
    cert: &CertificateDer<'_>,
    server_name: &ServerName<'_>,
    now: UnixTime,
    provider: &CryptoProvider,
) -> Result<(), rustls::Error> {
    let bad = |e: CertificateError| rustls::Error::InvalidCertificate(e);
    let parts = der::certificate(cert.as_ref()).ok_or(bad(CertificateError::BadEncoding))?;
    let alg = provider
        .signature_verification_algorithms
        .all
        .iter()
        .find(|a| {
            a.signature_alg_id().as_ref() == parts.signature_alg && a.public_key_alg_id().as_ref() == parts.key_alg
        })
        .ok_or_else(|| {
            bad(CertificateError::UnsupportedSignatureAlgorithmContext {
                signature_algorithm_id: parts.signature_alg.to_vec(),
                supported_algorithms: Vec::new(),
            })
        })?;
    alg.verify_signature(parts.public_key, parts.tbs, parts.signature)
        .map_err(|_| bad(CertificateError::BadSignature))?;
    let time = |secs: u64| UnixTime::since_unix_epoch(Duration::from_secs(secs));
    let t = now.as_secs();
    if t < parts.not_before {
        return Err(bad(CertificateError::NotValidYetContext {
            time: now,
            not_before: time(parts.not_before),
        }));
    }
    if t > parts.not_after {
        return Err(bad(CertificateError::ExpiredContext {
            time: now,
            not_after: time(parts.not_after),
        }));
    }
    let parsed = rustls::server::ParsedCertificate::try_from(cert)?;
    rustls::client::verify_server_name(&parsed, server_name)
}

/// The few X.509 fields a self-signed certificate's own check needs, read from its DER.
mod der {
    /// One certificate's parts.
    pub(super) struct Parts<'a> {
        /// The signed part, whole (tag and length included).
        pub(super) tbs: &'a [u8],
        /// The signature algorithm identifier's contents.
        pub(super) signature_alg: &'a [u8],
        /// The signature's bits.
        pub(super) signature: &'a [u8],
        /// The public key algorithm identifier's contents.
        pub(super) key_alg: &'a [u8],
        /// The public key's bits.
        pub(super) public_key: &'a [u8],
        /// Validity, in seconds since 1970.
        pub(super) not_before: u64,
        pub(super) not_after: u64,
    }

    const SEQUENCE: u8 = 0x30;
    const BIT_STRING: u8 = 0x03;
    const UTC_TIME: u8 = 0x17;
    const GENERALIZED_TIME: u8 = 0x18;

    /// One element: its tag, its contents, the element whole, and what follows it.
    type Element<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);

    /// Splits the first element off `input`.
    fn element(input: &[u8]) -> Option<Element<'_>> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n].iter().fold(0u64, |l, &b| (l << 8) | u64::from(b));
            (usize::try_from(len).ok()?, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        let header = input.len() - rest.len();
        Some((tag, &rest[..len], &input[..header + len], &rest[len..]))
    }

    /// An element with tag `want`: its contents and what follows.
    fn expect(input: &[u8], want: u8) -> Option<(&[u8], &[u8])> {
        let (tag, contents, _, rest) = element(input)?;
        (tag == want).then_some((contents, rest))
    }

    /// A BIT STRING's contents as whole bytes (no unused bits).
    fn bits(contents: &[u8]) -> Option<&[u8]> {
        match contents.split_first()? {
            (0, bits) => Some(bits),
            _ => None,
        }
    }

    /// Reads a certificate's parts; `None` when it is not one.
    pub(super) fn certificate(cert: &[u8]) -> Option<Parts<'_>> {
        let (outer, _) = expect(cert, SEQUENCE)?;
        let (tag, tbs_contents, tbs, rest) = element(outer)?;
        if tag != SEQUENCE {
            return None;
        }
        let (signature_alg, rest) = expect(rest, SEQUENCE)?;
        let (signature, _) = expect(rest, BIT_STRING)?;
        // tbsCertificate: [0] version (optional), serial, signature, issuer, validity, subject,
        // subjectPublicKeyInfo, ...
        let (tag, _, _, mut fields) = element(tbs_contents)?;
        if tag == 0xa0 {
            fields = element(fields)?.3; // the serial, after the version
        }
        let fields = expect(fields, SEQUENCE)?.1; // signature
        let fields = expect(fields, SEQUENCE)?.1; // issuer
        let (validity, fields) = expect(fields, SEQUENCE)?;
        let fields = expect(fields, SEQUENCE)?.1; // subject
        let (spki, _) = expect(fields, SEQUENCE)?;
        let (key_alg, spki_rest) = expect(spki, SEQUENCE)?;
        let (key, _) = expect(spki_rest, BIT_STRING)?;
        let (tag, t, _, validity) = element(validity)?;
        let not_before = time(tag, t)?;
        let (tag, t, _, _) = element(validity)?;
        let not_after = time(tag, t)?;
        Some(Parts {
            tbs,
            signature_alg,
            signature: bits(signature)?,
            key_alg,
            public_key: bits(key)?,
            not_before,
            not_after,
        })
    }

    /// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) in seconds since 1970.
    fn time(tag: u8, t: &[u8]) -> Option<u64> {
        let digits = |s: &[u8]| -> Option<u64> {
            s.iter()
                .try_fold(0u64, |n, &c| c.is_ascii_digit().then(|| n * 10 + u64::from(c - b'0')))
        };
        let (year, rest) = match (tag, t.len()) {
            (UTC_TIME, 13) => {
                let yy = digits(&t[..2])?;
                (if yy < 50 { 2000 + yy } else { 1900 + yy }, &t[2..])
            }
            (GENERALIZED_TIME, 15) => (digits(&t[..4])?, &t[4..]),
            _ => return None,
        };
        if rest[10] != b'Z' || year < 1970 {
            return None;
        }
        let (month, day) = (digits(&rest[0..2])?, digits(&rest[2..4])?);
        let (h, m, s) = (digits(&rest[4..6])?, digits(&rest[6..8])?, digits(&rest[8..10])?);
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
            return None;
        }
        Some(days_since_1970(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
    }

    /// Days from 1970-01-01 to a date on or after it (the proleptic Gregorian calendar).
    fn days_since_1970(year: u64, month: u64, day: u64) -> u64 {
        // Years counted from March, so that the leap day ends a year (H. Hinnant's days_from_civil).
        let y = if month <= 2 { year - 1 } else { year };
        let era = y / 400;
        let yoe = y - era * 400;
        let mp = (month + 9) % 12;
        let doy = (153 * mp + 2) / 5 + day - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn times() {
            assert_eq!(time(UTC_TIME, b"700101000000Z"), Some(0));
            assert_eq!(time(UTC_TIME, b"000301000000Z"), Some(951_868_800));
            assert_eq!(time(GENERALIZED_TIME, b"20380119031408Z"), Some(2_147_483_648));
            assert_eq!(time(UTC_TIME, b"491231235959Z"), Some(2_524_607_999));
            assert_eq!(time(UTC_TIME, b"700101000000+"), None);
            assert_eq!(time(UTC_TIME, b"701301000000Z"), None);
            assert_eq!(time(GENERALIZED_TIME, b"2038011903140Z"), None);
        }

        #[test]
        fn truncated_input_is_no_certificate() {
            let der = [0x30, 0x82, 0xff, 0xff, 0x30];
            assert!(certificate(&der).is_none());
            assert!(certificate(&[]).is_none());
            assert!(element(&[0x30, 0x85, 1, 1, 1, 1, 1]).is_none());
        }
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
