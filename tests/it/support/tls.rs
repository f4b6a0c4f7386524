//! Throwaway PKI for the TLS tests (rcgen): CAs, server certificates for
//! `127.0.0.1` and `localhost` or for another name, expired ones, client
//! certificates; and a redis-server that speaks TLS only (`--port 0
//! --tls-port N`), driven by the tests over TLS of their own.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, date_time_ymd,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::PATIENCE;
use super::ports;
use super::process::command;

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Pair {
    pub cert: String,
    pub key: String,
}

/// A certificate authority that signs test certificates.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn sign(&self, params: CertificateParams) -> Pair {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate for `names` (IP addresses become IP SANs).
    pub fn server(&self, names: &[&str]) -> Pair {
        self.sign(server_params(names))
    }

    /// A server certificate for `names` that expired in 2021.
    pub fn expired_server(&self, names: &[&str]) -> Pair {
        let mut params = server_params(names);
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2021, 1, 1);
        self.sign(params)
    }

    /// A client certificate for `common_name`, valid until `until` (y, m, d).
    pub fn client(&self, common_name: &str, until: (i32, u8, u8)) -> Pair {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = date_time_ymd(2024, 1, 1);
        params.not_after = date_time_ymd(until.0, until.1, until.2);
        self.sign(params)
    }
}

fn server_params(names: &[&str]) -> CertificateParams {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(names).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "lessor test server");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params
}

/// The Unix time of midnight UTC on `(y, m, d)`.
pub fn unix(date: (i32, u8, u8)) -> i64 {
    date_time_ymd(date.0, date.1, date.2).unix_timestamp()
}

/// Writes `contents` to `dir/name`, returning the path.
pub fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// A rustls client of the tests' own, trusting `ca`, with an optional
/// client certificate.
pub fn client_config(ca: &str, client: Option<&Pair>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match client {
        Some(pair) => {
            let chain = CertificateDer::pem_slice_iter(pair.cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// The files a TLS redis-server is started with (in its own temp dir).
pub struct RedisFiles {
    /// The server's certificate and key.
    pub server: Pair,
    /// The CAs whose client certificates it accepts (PEM bundle).
    pub client_cas: String,
    /// `--tls-auth-clients yes`.
    pub auth_clients: bool,
}

/// A redis-server listening for TLS only, killed on drop.
pub struct TlsRedis {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    /// What the tests' own connections use (trusting the server's CA, with
    /// a client certificate when the server demands one).
    admin: Arc<rustls::ClientConfig>,
}

impl TlsRedis {
    /// Starts redis-server with `files`; `admin` is how the test talks to
    /// it. `None` (skip) when redis-server is not installed and not required.
    pub async fn start(files: &RedisFiles, admin: Arc<rustls::ClientConfig>) -> Option<Self> {
        let binary = std::env::var("LESSOR_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let required = std::env::var("LESSOR_REQUIRE_REDIS").is_ok_and(|v| v == "1");
        let dir = tempfile::tempdir().unwrap();
        let cert = write(dir.path(), "server.crt", &files.server.cert);
        let key = write(dir.path(), "server.key", &files.server.key);
        let ca = write(dir.path(), "clients-ca.crt", &files.client_cas);
        let mut dir = Some(dir);
        for _ in 0..5 {
            let port = ports::reserve();
            let spawned = command(&binary)
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--tls-cert-file")
                .arg(&cert)
                .arg("--tls-key-file")
                .arg(&key)
                .arg("--tls-ca-cert-file")
                .arg(&ca)
                .args([
                    "--tls-auth-clients",
                    if files.auth_clients { "yes" } else { "no" },
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let child = match spawned {
                Ok(c) => c,
                Err(e) if !required => {
                    super::skip(&format!("redis-server not available ({e})"));
                    return None;
                }
                Err(e) => panic!("LESSOR_REQUIRE_REDIS=1 but {binary} cannot start: {e}"),
            };
            let mut redis = Self {
                child,
                port,
                dir: dir.take().expect("the files' dir"),
                admin: admin.clone(),
            };
            if redis.wait_ready().await {
                return Some(redis);
            }
            dir = Some(std::mem::replace(
                &mut redis.dir,
                tempfile::tempdir().unwrap(),
            ));
        }
        panic!("redis-server exited at start on five ports in a row");
    }

    /// `127.0.0.1:port` (TLS).
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Writes a file beside the server's own (for `CONFIG SET tls-*`).
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        write(self.dir.path(), name, contents)
    }

    async fn wait_ready(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while tokio::time::Instant::now() < deadline {
            if let Ok(reply) = self.command(b"PING\r\n").await
                && reply == b"+PONG\r\n"
            {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("TLS redis-server on port {} did not answer PING", self.port);
    }

    /// Sends one inline command over a fresh TLS connection and returns the
    /// first reply chunk.
    pub async fn command(&self, cmd: &[u8]) -> std::io::Result<Vec<u8>> {
        let tcp = tokio::net::TcpStream::connect(self.addr()).await?;
        let connector = tokio_rustls::TlsConnector::from(self.admin.clone());
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut s = tokio::time::timeout(PATIENCE, connector.connect(name, tcp))
            .await
            .map_err(|_| std::io::Error::other("TLS handshake timed out"))??;
        s.write_all(cmd).await?;
        s.flush().await?;
        let mut buf = vec![0; 16 * 1024];
        let n = tokio::time::timeout(PATIENCE, s.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::other("redis reply timed out"))??;
        buf.truncate(n);
        Ok(buf)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
