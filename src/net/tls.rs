//! One upstream's TLS: the handshake on a connected socket, the name it
//! verifies, the material it uses (reloaded when the files change), and
//! failures classified into what a person can fix.
//!
//! Rotation: [`Tls::refresh`] (run by the pool's maintenance loop every
//! `health.interval`) reads the files and, when their content changed,
//! parses them into a new generation. New dials use the newest generation;
//! pooled connections keep their session until their lifetime ends. Files
//! that fail to parse leave the previous generation in force, are logged
//! with their field and counted in `reload_failures`.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::sign::CertifiedKey;
use rustls::{AlertDescription, CertificateError, SignatureScheme};
use tokio::net::TcpStream;

use super::Stream;
use super::material::{Contents, Material, MaterialError};
use crate::config::{Source, TlsConfig};

/// What kind of TLS failure a dial met: each has its own message and
/// `lessor_connect_errors_total{reason}` label, so an alert or a log line
/// says what to fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsFailure {
    /// A PostgreSQL server answered the SSLRequest with `N`.
    Refused,
    /// The certificate does not chain to a trusted CA.
    Untrusted,
    /// The certificate is not valid for the name lessor verifies.
    NameMismatch,
    /// The certificate has expired (or is not valid yet).
    Expired,
    /// The server asked for a client certificate lessor does not have, and
    /// ended the session.
    ClientCertRequired,
    /// The server refused the client certificate lessor presented (expired,
    /// or from a CA it does not trust).
    ClientCertRejected,
    /// Anything else (a protocol version or cipher mismatch, a reset).
    Handshake,
}

impl TlsFailure {
    /// Every failure, in a stable order (the metric's label values).
    #[cfg(test)]
    pub(crate) const ALL: [TlsFailure; 7] = [
        Self::Refused,
        Self::Untrusted,
        Self::NameMismatch,
        Self::Expired,
        Self::ClientCertRequired,
        Self::ClientCertRejected,
        Self::Handshake,
    ];

    /// The `reason` label.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::Refused => "tls_refused",
            Self::Untrusted => "tls_untrusted",
            Self::NameMismatch => "tls_name_mismatch",
            Self::Expired => "tls_expired",
            Self::ClientCertRequired => "tls_client_cert_required",
            Self::ClientCertRejected => "tls_client_cert_rejected",
            Self::Handshake => "tls_handshake",
        }
    }

    /// What happened and what to do about it.
    fn explain(self) -> &'static str {
        match self {
            Self::Refused => {
                "the server refused TLS (enable ssl on the server, or set tls.mode: disable)"
            }
            Self::Untrusted => {
                "the server's certificate is not trusted: its issuer is not in tls.ca_file \
                 (or the system's roots)"
            }
            Self::NameMismatch => {
                "the server's certificate is not valid for the name lessor verifies: set \
                 tls.server_name to a name it carries, or use tls.mode: verify-ca"
            }
            Self::Expired => "the server's certificate has expired or is not valid yet",
            Self::ClientCertRequired => {
                "the server demands a client certificate: set tls.cert_file and tls.key_file"
            }
            Self::ClientCertRejected => {
                "the server rejected lessor's client certificate (expired, or not issued by a \
                 CA it trusts): check tls.cert_file"
            }
            Self::Handshake => "TLS handshake failed",
        }
    }
}

/// A dial's TLS failure: its kind, the name verified, and what rustls or
/// the server said.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{} (server name {name}): {detail}", failure.explain())]
pub(crate) struct TlsError {
    /// The kind, for the metric label.
    pub(crate) failure: TlsFailure,
    /// The name sent as SNI and verified.
    pub(crate) name: String,
    /// The underlying error's text.
    pub(crate) detail: String,
}

/// What a handshake learned that matters later in the dial.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Handshake {
    /// The server asked for a client certificate and lessor has none:
    /// whatever fails next is most likely the server ending the session for it.
    pub(crate) cert_asked_unanswered: bool,
    /// The server asked for a client certificate and lessor sent one: under
    /// TLS 1.3 its verdict comes only with the first read.
    pub(crate) cert_sent: bool,
}

impl Handshake {
    /// Whether the dial must make a round trip before it counts: the
    /// server judged a client certificate (or its absence) after the
    /// client's handshake ended.
    pub(crate) fn confirm(self) -> bool {
        self.cert_asked_unanswered || self.cert_sent
    }
}

/// What [`Tls::refresh`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refreshed {
    /// The files are as they were.
    Unchanged,
    /// New material is in force.
    Reloaded,
    /// The files changed but could not be used; the previous stay.
    Failed(String),
}

/// TLS facts for `Stats`, `/readyz?verbose` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TlsStatus {
    /// `require`, `verify-ca` or `verify-full`.
    pub(crate) mode: &'static str,
    /// The name verified (or `per endpoint` when it is each endpoint's IP).
    pub(crate) server_name: String,
    /// `notAfter` of the client certificate in use (earliest of its chain),
    /// Unix seconds; `None` without a client certificate.
    pub(crate) client_cert_not_after: Option<i64>,
    /// Changed files that could not be used.
    pub(crate) reload_failures: u64,
    /// Successful reloads.
    pub(crate) reloads: u64,
    /// Why the last reload failed, while the previous material is in force.
    pub(crate) last_reload_error: Option<String>,
}

/// One upstream's TLS client.
#[derive(Debug)]
pub(crate) struct Tls {
    config: TlsConfig,
    provider: Arc<CryptoProvider>,
    /// The name to verify when `server_name` is not set: the address's
    /// host, or the DNS discovery name; `None`: each endpoint's IP.
    default_name: Option<String>,
    /// The generation new dials use (`None`: no usable files yet). A lock,
    /// held for an `Arc` clone.
    current: RwLock<Option<Arc<Material>>>,
    reload_failures: AtomicU64,
    reloads: AtomicU64,
    /// The last reload's error, cleared by the next success.
    last_error: Mutex<Option<String>>,
}

impl Tls {
    /// Reads and parses the files now. Validation parsed them already; if
    /// they broke since, dials fail naming the field until a refresh finds
    /// usable files.
    pub(crate) fn new(config: &TlsConfig, source: &Source) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = Contents::read(config).and_then(|c| Material::parse(config, c, &provider));
        let default_name = match source {
            Source::Address(address) => Some(host_of(address).to_owned()),
            Source::Dns(dns) => Some(dns.name.clone()),
            // Each endpoint's own host (see `server_name`).
            Source::Static(_) | Source::Kubernetes(_) => None,
        };
        let (current, failures, error) = match loaded {
            Ok(material) => (Some(Arc::new(material)), 0, None),
            Err(e) => (None, 1, Some(e.to_string())),
        };
        Self {
            config: config.clone(),
            provider,
            default_name,
            current: RwLock::new(current),
            reload_failures: AtomicU64::new(failures),
            reloads: AtomicU64::new(0),
            last_error: Mutex::new(error),
        }
    }

    /// Checks `config` the way [`Tls::new`] will, for config validation.
    pub(crate) fn check(config: &TlsConfig) -> Result<(), MaterialError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Material::parse(config, Contents::read(config)?, &provider).map(drop)
    }

    fn material(&self) -> Option<Arc<Material>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The name verified for a dial to `ip`.
    pub(crate) fn server_name(&self, target: &str, ip: std::net::IpAddr) -> String {
        self.config
            .server_name
            .clone()
            .or_else(|| self.default_name.clone())
            .unwrap_or_else(|| {
                // A listed endpoint's host name; an IP verifies as an IP.
                let host = host_of(target);
                match host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
                    Ok(_) => ip.to_string(),
                    Err(_) => host.to_owned(),
                }
            })
    }

    /// Runs the TLS handshake on a connected socket (inside the dial's
    /// timeout). `name` is what [`Tls::server_name`] gave.
    pub(crate) async fn handshake(
        &self,
        tcp: TcpStream,
        name: &str,
    ) -> Result<(Stream, Handshake), TlsError> {
        let error = |failure, detail: String| TlsError {
            failure,
            name: name.to_owned(),
            detail,
        };
        let server_name = ServerName::try_from(name.to_owned())
            .map_err(|e| error(TlsFailure::Handshake, format!("invalid server name: {e}")))?;
        let material = self.material().ok_or_else(|| {
            let why = self.status().last_reload_error.unwrap_or_default();
            error(TlsFailure::Handshake, format!("no usable TLS files: {why}"))
        })?;
        let asked = Arc::new(AtomicBool::new(false));
        // A per-dial copy (a handful of `Arc`s) so that this dial's resolver
        // can say whether the server asked for a certificate.
        let mut config = (*material.config).clone();
        config.client_auth_cert_resolver = Arc::new(Recording {
            key: material.client.clone(),
            asked: asked.clone(),
        });
        let unanswered = || material.client.is_none() && asked.load(Ordering::Relaxed);
        let sent = || material.client.is_some() && asked.load(Ordering::Relaxed);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        match connector.connect(server_name, tcp).await {
            Ok(stream) => Ok((
                Stream::Tls(Box::new(stream)),
                Handshake {
                    cert_asked_unanswered: unanswered(),
                    cert_sent: sent(),
                },
            )),
            Err(e) => Err(error(classify(&e, unanswered(), sent()), e.to_string())),
        }
    }

    /// A failure after the handshake, while the session opened, seen in the
    /// light of what the handshake learned.
    pub(crate) fn after_handshake(
        &self,
        handshake: Handshake,
        name: &str,
        detail: &str,
        transport: bool,
    ) -> Option<TlsError> {
        // TLS 1.3 finishes the client's handshake before the server has
        // judged its (empty) certificate: the refusal arrives as an alert or
        // a close on the first read, or (PostgreSQL) as an error message
        // that names the certificate.
        let about_cert = transport || detail.contains("certificate");
        let failure = if handshake.cert_asked_unanswered {
            TlsFailure::ClientCertRequired
        } else if handshake.cert_sent {
            TlsFailure::ClientCertRejected
        } else {
            return None;
        };
        about_cert.then(|| TlsError {
            failure,
            name: name.to_owned(),
            detail: detail.to_owned(),
        })
    }

    /// A PostgreSQL server that answered the SSLRequest with `N`.
    pub(crate) fn refused(&self, name: &str) -> TlsError {
        TlsError {
            failure: TlsFailure::Refused,
            name: name.to_owned(),
            detail: "SSLRequest answered N".into(),
        }
    }

    /// Reads the files again; parses and swaps in new material when their
    /// content changed.
    pub(crate) async fn refresh(self: &Arc<Self>) -> Refreshed {
        let this = self.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let contents = Contents::read(&this.config)?;
            if this.material().is_some_and(|m| m.contents == contents) {
                return Ok(None);
            }
            Material::parse(&this.config, contents, &this.provider).map(Some)
        })
        .await;
        let result = match outcome {
            // Back to (or still) what is in force: any earlier failure is over.
            Ok(Ok(None)) => Refreshed::Unchanged,
            Ok(Ok(Some(material))) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) =
                    Some(Arc::new(material));
                self.reloads.fetch_add(1, Ordering::Relaxed);
                Refreshed::Reloaded
            }
            Ok(Err(e)) => Refreshed::Failed(e.to_string()),
            Err(join) => Refreshed::Failed(format!("reading the TLS files: {join}")),
        };
        let mut last = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match &result {
            Refreshed::Failed(error) => {
                // Counted once per change of the error, not once per tick:
                // a broken file stays broken until someone fixes it.
                if last.as_deref() != Some(error.as_str()) {
                    self.reload_failures.fetch_add(1, Ordering::Relaxed);
                    *last = Some(error.clone());
                }
            }
            _ => *last = None,
        }
        result
    }

    /// What `Stats` and the metrics show.
    pub(crate) fn status(&self) -> TlsStatus {
        TlsStatus {
            mode: self.config.mode.as_str(),
            server_name: self
                .config
                .server_name
                .clone()
                .or_else(|| self.default_name.clone())
                .unwrap_or_else(|| "per endpoint".into()),
            client_cert_not_after: self.material().and_then(|m| m.client_not_after),
            reload_failures: self.reload_failures.load(Ordering::Relaxed),
            reloads: self.reloads.load(Ordering::Relaxed),
            last_reload_error: self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

/// The host of `host:port` (`[v6]:port` included); the whole string when
/// there is no port.
fn host_of(address: &str) -> &str {
    let host = match address.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => address,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Which failure an error from the handshake is. `unanswered`: the server
/// asked for a client certificate and got none; `sent`: it asked and got
/// lessor's.
fn classify(e: &io::Error, unanswered: bool, sent: bool) -> TlsFailure {
    let rustls_error = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(cert)) => match cert {
            CertificateError::UnknownIssuer => TlsFailure::Untrusted,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                TlsFailure::NameMismatch
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => TlsFailure::Expired,
            _ if unanswered => TlsFailure::ClientCertRequired,
            _ => TlsFailure::Handshake,
        },
        Some(rustls::Error::AlertReceived(AlertDescription::CertificateRequired)) => {
            TlsFailure::ClientCertRequired
        }
        // TLS 1.2: the server judges the certificate inside the handshake.
        Some(rustls::Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied,
        )) if sent => TlsFailure::ClientCertRejected,
        _ if unanswered => TlsFailure::ClientCertRequired,
        _ => TlsFailure::Handshake,
    }
}

/// The client certificate resolver of one dial: hands over the configured
/// certificate (if any) and records that the server asked for one.
#[derive(Debug)]
struct Recording {
    key: Option<Arc<CertifiedKey>>,
    asked: Arc<AtomicBool>,
}

impl ResolvesClientCert for Recording {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.asked.store(true, Ordering::Relaxed);
        self.key.clone()
    }

    fn has_certs(&self) -> bool {
        self.key.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert_eq!(host_of("db.internal:5432"), "db.internal");
        assert_eq!(host_of("127.0.0.1:6379"), "127.0.0.1");
        assert_eq!(host_of("[::1]:6379"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
    }

    #[test]
    fn alerts_and_certificates_are_told_apart() {
        let wrap = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        let cert = |c| wrap(rustls::Error::InvalidCertificate(c));
        assert_eq!(
            classify(&cert(CertificateError::UnknownIssuer), false, false),
            TlsFailure::Untrusted
        );
        assert_eq!(
            classify(&cert(CertificateError::NotValidForName), false, false),
            TlsFailure::NameMismatch
        );
        assert_eq!(
            classify(&cert(CertificateError::Expired), true, false),
            TlsFailure::Expired
        );
        let alert = wrap(rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired,
        ));
        assert_eq!(
            classify(&alert, false, false),
            TlsFailure::ClientCertRequired
        );
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert_eq!(classify(&eof, true, false), TlsFailure::ClientCertRequired);
        assert_eq!(classify(&eof, false, false), TlsFailure::Handshake);
        // TLS 1.2: the server's verdict on the certificate lessor sent.
        let refused = wrap(rustls::Error::AlertReceived(AlertDescription::UnknownCA));
        assert_eq!(
            classify(&refused, false, true),
            TlsFailure::ClientCertRejected
        );
        assert_eq!(classify(&refused, false, false), TlsFailure::Handshake);
    }
}
