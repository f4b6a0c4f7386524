//! The files behind an upstream's TLS (CA bundle, client certificate and
//! key), parsed into the rustls client configuration new dials start from.
//!
//! The raw bytes are kept beside what they parsed into: a reload compares
//! content, not paths or modification times, so a Kubernetes Secret's
//! `..data` symlink swap (new inode, old mtime possible) is seen like any
//! rewrite.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore};

use super::verify::{AcceptAny, ChainOnly};
use super::x509;
use crate::config::{TlsConfig, TlsMode, TlsVersion};

/// Why the TLS files could not be used. Names the `tls.` field, so a log
/// line says which Secret to fix.
#[derive(Debug, Clone, thiserror::Error)]
#[error("tls.{field}: {problem}")]
pub(crate) struct MaterialError {
    /// `ca_file`, `cert_file`, `key_file` (or `mode`, `min_version` for a
    /// combination rustls refuses).
    pub(crate) field: &'static str,
    /// What is wrong, with the path.
    pub(crate) problem: String,
}

fn bad(field: &'static str, path: &Path, problem: impl std::fmt::Display) -> MaterialError {
    MaterialError {
        field,
        problem: format!("{}: {problem}", path.display()),
    }
}

/// The bytes of the configured files, as last read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Contents {
    ca: Option<Vec<u8>>,
    cert: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
}

impl Contents {
    /// Reads every configured file now (blocking: small files, called from
    /// config validation and from `spawn_blocking`).
    pub(crate) fn read(cfg: &TlsConfig) -> Result<Self, MaterialError> {
        let read = |field, path: &Option<PathBuf>| {
            path.as_deref()
                .map(|p| std::fs::read(p).map_err(|e| bad(field, p, e)))
                .transpose()
        };
        Ok(Self {
            ca: read("ca_file", &cfg.ca_file)?,
            cert: read("cert_file", &cfg.cert_file)?,
            key: read("key_file", &cfg.key_file)?,
        })
    }
}

/// Parsed TLS material: what one generation of dials uses.
#[derive(Debug)]
pub(crate) struct Material {
    /// The bytes it was parsed from (to notice a change).
    pub(crate) contents: Contents,
    /// Verifier, versions and provider; the client certificate is set per
    /// dial (`net::tls`), which also records whether the server asked.
    pub(crate) config: Arc<ClientConfig>,
    /// The client certificate and key, when configured.
    pub(crate) client: Option<Arc<CertifiedKey>>,
    /// The earliest `notAfter` of the client certificate chain, in Unix
    /// seconds.
    pub(crate) client_not_after: Option<i64>,
}

impl Material {
    /// Parses `contents` under `cfg` into a client configuration.
    pub(crate) fn parse(
        cfg: &TlsConfig,
        contents: Contents,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, MaterialError> {
        let verifier = verifier(cfg, contents.ca.as_deref(), provider)?;
        let (client, client_not_after) = match (&contents.cert, &contents.key) {
            (Some(cert), Some(key)) => {
                let (certified, not_after) = client_key(cfg, cert, key, provider)?;
                (Some(certified), not_after)
            }
            _ => (None, None),
        };
        let versions: &[&rustls::SupportedProtocolVersion] = match cfg.min_version {
            TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::V1_3 => &[&rustls::version::TLS13],
        };
        let config = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| MaterialError {
                field: "min_version",
                problem: e.to_string(),
            })?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Self {
            contents,
            config: Arc::new(config),
            client,
            client_not_after,
        })
    }
}

/// The server check of `cfg.mode`, trusting `ca` (PEM) or the system roots.
fn verifier(
    cfg: &TlsConfig,
    ca: Option<&[u8]>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, MaterialError> {
    if cfg.mode == TlsMode::Require {
        return Ok(Arc::new(AcceptAny::new(
            provider.signature_verification_algorithms,
        )));
    }
    let mut roots = RootCertStore::empty();
    match (ca, cfg.ca_file.as_deref()) {
        (Some(pem), Some(path)) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| bad("ca_file", path, e))?;
                roots
                    .add(cert)
                    .map_err(|e| bad("ca_file", path, format!("not a usable CA: {e}")))?;
            }
            if roots.is_empty() {
                return Err(bad("ca_file", path, "no PEM certificate in it"));
            }
        }
        _ => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(MaterialError {
                    field: "ca_file",
                    problem: "not set, and the system has no CA certificates (install \
                              ca-certificates or set ca_file)"
                        .into(),
                });
            }
        }
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| MaterialError {
            field: "ca_file",
            problem: e.to_string(),
        })?;
    Ok(match cfg.mode {
        TlsMode::VerifyCa => Arc::new(ChainOnly(webpki)),
        _ => webpki,
    })
}

/// The client chain and its key, checked to belong together.
fn client_key(
    cfg: &TlsConfig,
    cert: &[u8],
    key: &[u8],
    provider: &Arc<CryptoProvider>,
) -> Result<(Arc<CertifiedKey>, Option<i64>), MaterialError> {
    let cert_path = cfg.cert_file.as_deref().unwrap_or(Path::new(""));
    let key_path = cfg.key_file.as_deref().unwrap_or(Path::new(""));
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("cert_file", cert_path, e))?;
    if chain.is_empty() {
        return Err(bad("cert_file", cert_path, "no PEM certificate in it"));
    }
    let not_after = chain.iter().filter_map(|c| x509::not_after(c)).min();
    let der = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad("key_file", key_path, e))?;
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| bad("key_file", key_path, e))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(bad(
                "key_file",
                key_path,
                format!("is not the key of {}", cert_path.display()),
            ));
        }
    }
    Ok((Arc::new(certified), not_after))
}
