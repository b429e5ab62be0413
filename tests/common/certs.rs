//! Certificates made at run time (rcgen): a test CA and a server certificate it signed for
//! `localhost` and `127.0.0.1`, written as PEM files.

#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// PEM files in one directory.
pub struct TestCerts {
    /// The CA certificate clients trust.
    pub ca: PathBuf,
    /// The server's certificate chain (its certificate, then the CA's).
    pub cert: PathBuf,
    /// The server's private key (PKCS#8).
    pub key: PathBuf,
    /// A private key that belongs to no certificate here.
    pub other_key: PathBuf,
}

/// Makes a CA and a server certificate for `localhost` and `127.0.0.1` under `dir`.
pub fn make(dir: &Path) -> TestCerts {
    make_for(dir, &["localhost", "127.0.0.1"])
}

/// Makes a CA and a server certificate for `names` under `dir` (created if missing).
pub fn make_for(dir: &Path, names: &[&str]) -> TestCerts {
    std::fs::create_dir_all(dir).expect("create the certificate directory");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let name = dir
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("wsloop test CA {name}"));
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key")).expect("CA certificate");
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names.clone()).expect("server params");
    params.distinguished_name.push(DnType::CommonName, names[0].as_str());
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &ca).expect("server certificate");
    let other = KeyPair::generate().expect("another key");
    let out = TestCerts {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        other_key: dir.join("other-key.pem"),
    };
    let write = |p: &Path, s: String| std::fs::write(p, s).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    write(&out.ca, ca.pem());
    write(&out.cert, format!("{}{}", cert.pem(), ca.pem()));
    write(&out.key, key.serialize_pem());
    write(&out.other_key, other.serialize_pem());
    out
}
