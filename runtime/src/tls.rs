//! TLS (rustls, the `ring` provider) for the gateway's front ends and a worker's gRPC
//! port: a certificate chain and key from PEM files, read again when either file changes
//! (every `--tls-reload-interval`; handshakes after the reload present the new
//! certificate), and optionally a CA whose client certificates are required (mutual
//! TLS). [`client_config`] is the other side: how the gateway reaches TLS workers.

use crate::sync;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};

/// TLS settings of a binary's front ends, flattened into its command line.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain (leaf first): with --tls-key, the API listeners (the
    /// gateway's REST and gRPC, a worker's gRPC; not the metrics port) serve TLS only.
    #[arg(long, env = "RANKWAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "RANKWAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM bundle of CAs: every client must then present a certificate one of them
    /// signed (mutual TLS).
    #[arg(long, env = "RANKWAY_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// How often the certificate and key files are checked for changes.
    #[arg(long, env = "RANKWAY_TLS_RELOAD_INTERVAL", value_parser = humantime::parse_duration, default_value = "5s")]
    pub tls_reload_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA bundle: {0}")]
    ClientCa(String),
}

fn read_err(path: &Path) -> impl Fn(rustls::pki_types::pem::Error) -> TlsError + '_ {
    move |e| TlsError::Read {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read_err(path))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_err(path))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The server's certificate and key, read again when their files change.
pub struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    modified: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl std::fmt::Debug for CertFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertFiles")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl CertFiles {
    fn read(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
        let chain = certificates(cert)?;
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(read_err(key))?;
        Ok(CertifiedKey::from_der(chain, key_der, &provider())?)
    }

    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        let times = (modified(cert), modified(key));
        let current = Self::read(cert, key)?;
        Ok(Arc::new(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(Arc::new(current)),
            modified: Mutex::new(times),
        }))
    }

    /// Reads the files again if either changed; a pair that does not load (a key
    /// written before its certificate, say) keeps the one in use and is tried again.
    pub fn reload_if_changed(&self) {
        let now = (modified(&self.cert), modified(&self.key));
        let mut seen = sync::lock(&self.modified);
        if now == *seen {
            return;
        }
        match Self::read(&self.cert, &self.key) {
            Ok(key) => {
                *sync::write(&self.current) = Arc::new(key);
                *seen = now;
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => tracing::warn!(error = %e, "keeping the TLS certificate in use"),
        }
    }

    /// Reloads every `every` (until the task is aborted).
    pub fn spawn_reloader(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let files = self.clone();
        crate::keys::spawn_every(every, move || files.reload_if_changed())
    }
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(sync::read(&self.current).clone())
    }
}

impl TlsArgs {
    /// The certificate and key files, or `None` without --tls-cert.
    pub fn files(&self) -> Result<Option<Arc<CertFiles>>, TlsError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => CertFiles::load(cert, key).map(Some),
            _ => Ok(None),
        }
    }

    /// The server configuration of a listener speaking the `alpn` protocols and
    /// presenting `files`' certificate; `None` without files (no --tls-cert).
    pub fn config(
        &self,
        files: Option<&Arc<CertFiles>>,
        alpn: &[&[u8]],
    ) -> Result<Option<Arc<ServerConfig>>, TlsError> {
        let Some(files) = files else {
            return Ok(None);
        };
        let builder =
            ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
        let builder = match &self.tls_client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in certificates(ca)? {
                    roots.add(c)?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .map_err(|e| TlsError::ClientCa(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(files.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Some(Arc::new(config)))
    }
}

/// A client configuration trusting the CAs in `ca` (PEM) and, for mutual TLS, presenting
/// `identity` (certificate chain and key files); ALPN `h2`.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certificates(ca)? {
        roots.add(c)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(read_err(key))?;
            builder.with_client_auth_cert(certificates(cert)?, key_der)?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
