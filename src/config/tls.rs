//! An upstream's `tls:` block: whether lessor dials it over TLS, how much
//! of the server's certificate it checks, and the files it reads (CA bundle,
//! client certificate and key). The modes mean what PostgreSQL's `sslmode`
//! means, so a connection string's setting carries over unchanged.

use std::path::PathBuf;

use serde::Deserialize;

/// How much TLS an upstream gets and how much of the server is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Plain TCP, as without a `tls:` block (a block kept for later).
    Disable,
    /// Encrypt, no verification: any certificate is accepted. Protects
    /// against eavesdropping, not against someone in the middle.
    Require,
    /// The certificate must chain to a trusted CA; its name is not checked.
    VerifyCa,
    /// The chain and the name (`server_name`, or the address's host).
    #[default]
    VerifyFull,
}

impl TlsMode {
    /// The name used in config, `Stats` and `/readyz?verbose`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// The oldest TLS version lessor agrees to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 or 1.3.
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    V1_3,
}

/// `upstreams[].tls`: present means TLS (`verify-full` unless `mode` says
/// otherwise). The files are read again whenever their content changes, so
/// a rotated Secret reaches new dials without a restart.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Default `verify-full`.
    #[serde(default)]
    pub mode: TlsMode,
    /// PEM bundle of the CAs that may sign the server's certificate; absent:
    /// the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The name sent as SNI and verified against the certificate. Default:
    /// the host of `address` (an IP address verifies against IP SANs), the
    /// DNS discovery name, or each Kubernetes endpoint's IP.
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM client certificate chain, for servers that demand one (mutual TLS).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// `"1.2"` (default) or `"1.3"`.
    #[serde(default)]
    pub min_version: TlsVersion,
}

impl TlsConfig {
    /// Whether dials use TLS at all.
    pub fn enabled(&self) -> bool {
        self.mode != TlsMode::Disable
    }
}
