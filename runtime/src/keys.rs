//! Key files: one key per line (blank lines and `#` comments skipped), read again when
//! the file's modification time changes, so keys are added and revoked without a restart
//! (a Kubernetes Secret mounted as a file is updated in place). A file that cannot be read
//! keeps the keys already loaded. Keys are compared in time that does not depend on where
//! they differ. The gateway's API keys (`--api-key-file`) and the token between the
//! gateway and rank 0 (`--worker-token-file`, `--token-file`) are both key files.

use crate::sync;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

/// The keys of a key file, reloaded when the file changes.
pub struct KeyFile {
    path: PathBuf,
    keys: RwLock<Keys>,
    modified: Mutex<Option<SystemTime>>,
}

/// The keys as loaded, and `Bearer FIRST-KEY`, built once per load for a client to send.
struct Keys {
    all: Arc<Vec<Vec<u8>>>,
    bearer: Option<http::HeaderValue>,
}

impl Keys {
    fn new(all: Vec<Vec<u8>>) -> Self {
        let bearer = all.first().and_then(|key| {
            let mut value = http::HeaderValue::from_bytes(&[b"Bearer ", key.as_slice()].concat()).ok()?;
            value.set_sensitive(true);
            Some(value)
        });
        Self {
            all: Arc::new(all),
            bearer,
        }
    }
}

/// Runs `check` every `every` on a task of its own (until the task is aborted): how key
/// and certificate files are watched for changes.
pub(crate) fn spawn_every(every: Duration, check: impl Fn() + Send + 'static) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            check();
        }
    })
}

impl std::fmt::Debug for KeyFile {
    /// The path only: never the keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read the key file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the key file {0} holds no key (one per line; # starts a comment)")]
    Empty(PathBuf),
}

fn read_keys(path: &Path) -> Result<(Vec<Vec<u8>>, Option<SystemTime>), KeyFileError> {
    let read = |source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    };
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let text = std::fs::read_to_string(path).map_err(read)?;
    let keys = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.as_bytes().to_vec())
        .collect();
    Ok((keys, modified))
}

/// Equal in time independent of where `a` and `b` differ (their lengths may show).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl KeyFile {
    /// Reads the file; one that cannot be read or holds no key is an error (the binary
    /// does not start).
    pub fn load(path: &Path) -> Result<Arc<Self>, KeyFileError> {
        let (keys, modified) = read_keys(path)?;
        if keys.is_empty() {
            return Err(KeyFileError::Empty(path.to_owned()));
        }
        tracing::info!(path = %path.display(), keys = keys.len(), "keys loaded");
        Ok(Arc::new(Self {
            path: path.to_owned(),
            keys: RwLock::new(Keys::new(keys)),
            modified: Mutex::new(modified),
        }))
    }

    /// Reads the file again if its modification time changed.
    pub fn reload_if_changed(&self) {
        let now = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        if now == *sync::lock(&self.modified) {
            return;
        }
        match read_keys(&self.path) {
            Ok((keys, modified)) => {
                if keys.is_empty() {
                    tracing::warn!(path = %self.path.display(), "the key file holds no key: every request is refused");
                } else {
                    tracing::info!(path = %self.path.display(), keys = keys.len(), "keys reloaded");
                }
                *sync::write(&self.keys) = Keys::new(keys);
                *sync::lock(&self.modified) = modified;
            }
            Err(e) => tracing::warn!(error = %e, "keeping the keys already loaded"),
        }
    }

    /// Reloads every `every` (until the task is aborted).
    pub fn spawn_reloader(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let keys = self.clone();
        spawn_every(every, move || keys.reload_if_changed())
    }

    /// Whether `authorization` is `Bearer KEY` with one of the keys.
    pub fn allows(&self, authorization: Option<&http::HeaderValue>) -> bool {
        let Some(token) = authorization
            .map(http::HeaderValue::as_bytes)
            .and_then(|v| v.strip_prefix(b"Bearer ").or_else(|| v.strip_prefix(b"bearer ")))
        else {
            return false;
        };
        let keys = sync::read(&self.keys).all.clone();
        // Every key is compared, so the time does not tell which one matched.
        keys.iter().fold(false, |found, k| found | same(k, token))
    }

    /// `Bearer KEY` with the file's first key, for a client to send.
    pub fn bearer(&self) -> Option<http::HeaderValue> {
        sync::read(&self.keys).bearer.clone()
    }
}

/// A layer for a tonic server: a call without `authorization: Bearer KEY` metadata
/// holding one of the keys gets UNAUTHENTICATED with `refused` as its message, unless
/// `open` lets its path through (health probes). Without keys, everything passes.
#[derive(Clone)]
pub struct GrpcAuthLayer {
    keys: Option<Arc<KeyFile>>,
    open: fn(&str) -> bool,
    refused: &'static str,
}

impl GrpcAuthLayer {
    pub fn new(keys: Option<Arc<KeyFile>>, open: fn(&str) -> bool, refused: &'static str) -> Self {
        Self { keys, open, refused }
    }
}

impl<S> tower::Layer<S> for GrpcAuthLayer {
    type Service = GrpcAuth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcAuth {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcAuth<S> {
    inner: S,
    layer: GrpcAuthLayer,
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcAuth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future =
        futures_util::future::Either<S::Future, std::future::Ready<Result<http::Response<RB>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match &self.layer.keys {
            Some(keys)
                if !(self.layer.open)(req.uri().path())
                    && !keys.allows(req.headers().get(http::header::AUTHORIZATION)) =>
            {
                let status = tonic::Status::unauthenticated(self.layer.refused);
                futures_util::future::Either::Right(std::future::ready(Ok(status.into_http())))
            }
            _ => futures_util::future::Either::Left(self.inner.call(req)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_compared_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("rankway-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys");
        std::fs::write(&file, "# ops\nalpha\n\n  beta  \n").unwrap();
        let keys = KeyFile::load(&file).unwrap();
        let bearer = |k: &str| http::HeaderValue::from_str(&format!("Bearer {k}")).unwrap();
        assert!(keys.allows(Some(&bearer("alpha"))));
        assert!(keys.allows(Some(&bearer("beta"))));
        assert_eq!(keys.bearer(), Some(bearer("alpha")));
        for bad in ["alph", "alphaa", "# ops", ""] {
            assert!(!keys.allows(Some(&bearer(bad))), "{bad:?}");
        }
        assert!(!keys.allows(Some(&http::HeaderValue::from_static("alpha"))));
        assert!(!keys.allows(None));

        // A new modification time: read again.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&file, "gamma\n").unwrap();
        let later = SystemTime::now() + Duration::from_secs(1);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(later)
            .unwrap();
        keys.reload_if_changed();
        assert!(!keys.allows(Some(&bearer("alpha"))));
        assert!(keys.allows(Some(&bearer("gamma"))));
        // Gone: the keys stay.
        std::fs::remove_file(&file).unwrap();
        keys.reload_if_changed();
        assert!(keys.allows(Some(&bearer("gamma"))));

        std::fs::write(&file, "# nothing\n").unwrap();
        assert!(matches!(KeyFile::load(&file), Err(KeyFileError::Empty(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
