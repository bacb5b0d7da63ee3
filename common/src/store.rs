//! Object storage: one handle over a local folder (the default), S3/MinIO, or memory (tests).
//!
//! Writes are always whole-object puts, which every backend makes atomic (the local store writes a
//! temporary file and renames it), so a crash can never leave a half-written output that a resume
//! would mistake for finished work.

use bytes::Bytes;
use object_store::{local::LocalFileSystem, memory::InMemory, path::Path, ObjectStore, ObjectStoreExt};
use std::sync::Arc;

/// Errors of the store, naming the key involved, each said once (the client's chain of causes is
/// flattened into `reason`, every message in it once).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{key}: not found in the store")]
    NotFound { key: String },
    /// The store refuses the credentials (401) or the permissions (403).
    #[error("{key}: the store refused access: {reason}")]
    Auth { key: String, reason: String },
    /// The store could not be reached, or failed in a way that may pass (network, 5xx, throttling),
    /// after the client's own retries.
    #[error("{key}: the store is unavailable: {reason}")]
    Unavailable { key: String, reason: String },
    /// A request the store will never accept (an invalid path, an unsupported operation, ...).
    #[error("{key}: {reason}")]
    Refused { key: String, reason: String },
    #[error("store location {location:?}: {reason}")]
    Config { location: String, reason: String },
    #[error("{key}: invalid JSON: {source}")]
    Json {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

impl StoreError {
    fn from_os(key: &Path, e: object_store::Error) -> Self {
        Self::from_object_store(key.as_ref(), e)
    }

    /// An object_store error about the object at `key` (a key, or a URL for slides in a bucket),
    /// classified.
    pub fn from_object_store(key: &str, e: object_store::Error) -> Self {
        use object_store::Error as E;
        let key = key.to_string();
        let reason = error_chain(&e);
        match e {
            E::NotFound { .. } => StoreError::NotFound { key },
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => StoreError::Auth { key, reason },
            // Generic covers the HTTP client's failures: connections, timeouts, 5xx after retries.
            E::Generic { .. } | E::JoinError { .. } => StoreError::Unavailable { key, reason },
            _ => StoreError::Refused { key, reason },
        }
    }
}

/// Every message of an error's chain of causes, once: the HTTP client's errors leave their cause
/// out of their own message (`error sending request` ... `connection refused`), while object_store's
/// put their cause's message inside theirs, so printing each level repeats some and printing only
/// the top loses others.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let m = c.to_string();
        if !m.is_empty() && !text.contains(&m) {
            text.push_str(": ");
            text.push_str(&m);
        }
        cause = c.source();
    }
    text
}

/// S3 settings beyond what the standard `AWS_*` environment variables give.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// Endpoint of an S3-compatible server (MinIO, SeaweedFS); `AWS_ENDPOINT` otherwise.
    pub endpoint: Option<String>,
    /// Region; `AWS_REGION`/`AWS_DEFAULT_REGION` otherwise.
    pub region: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`), which MinIO and most self-hosted servers need.
    pub path_style: bool,
    /// Retries of a failed request inside the S3 client (with backoff) before the error reaches the
    /// job, which then retries on its own terms; `None` keeps the client's default (10).
    pub max_retries: Option<usize>,
    /// An access key given in code (tools, tests); `None` takes the `AWS_*` variables and the
    /// usual chain (instance profile, web identity) as the S3 client finds them.
    pub credentials: Option<S3Credentials>,
}

/// An S3 access key pair. Its `Debug` never shows the secret.
#[derive(Clone, Default)]
pub struct S3Credentials {
    pub key_id: String,
    pub secret: String,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials").field("key_id", &self.key_id).field("secret", &"…").finish()
    }
}

/// A cloneable handle to the store every stage reads from and writes to.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    location: String,
}

/// Only the location: the S3 client's own `Debug` would include credentials.
impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("location", &self.location).finish()
    }
}

impl Store {
    /// Open `location`: `s3://bucket[/prefix]`, `memory://`, or a local folder (created if needed).
    pub fn open(location: &str, s3: &S3Options) -> Result<Self, StoreError> {
        let config = |reason: String| StoreError::Config { location: location.to_string(), reason };
        let inner: Arc<dyn ObjectStore> = if let Some(rest) = location.strip_prefix("s3://") {
            // TLS through rustls with ring; installing twice is harmless (the first one stays).
            let _ = rustls::crypto::ring::default_provider().install_default();
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(config("no bucket in the s3:// URL".into()));
            }
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
            if let Some(e) = &s3.endpoint {
                b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
            } else if let Ok(e) = std::env::var("AWS_ENDPOINT") {
                b = b.with_allow_http(e.starts_with("http://"));
            }
            if let Some(r) = &s3.region {
                b = b.with_region(r);
            }
            if s3.path_style {
                b = b.with_virtual_hosted_style_request(false);
            }
            if let Some(c) = &s3.credentials {
                b = b.with_access_key_id(&c.key_id).with_secret_access_key(&c.secret);
            }
            if let Some(n) = s3.max_retries {
                b = b.with_retry(object_store::RetryConfig { max_retries: n, ..Default::default() });
            }
            let s3store = b.build().map_err(|e| config(e.to_string()))?;
            let prefix = prefix.trim_matches('/');
            if prefix.is_empty() {
                Arc::new(s3store)
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(s3store, prefix))
            }
        } else if location == "memory://" {
            Arc::new(InMemory::new())
        } else {
            let dir = location.strip_prefix("file://").unwrap_or(location);
            std::fs::create_dir_all(dir).map_err(|e| config(format!("cannot create folder: {e}")))?;
            Arc::new(LocalFileSystem::new_with_prefix(dir).map_err(|e| config(e.to_string()))?)
        };
        Ok(Store { inner, location: location.to_string() })
    }

    /// An empty in-memory store, for tests.
    pub fn memory() -> Self {
        Store { inner: Arc::new(InMemory::new()), location: "memory://".into() }
    }

    /// Where this store lives, as the user named it (never holds credentials).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The local folder behind this store, when it is one (used to print output paths).
    pub fn local_path(&self, key: &Path) -> Option<std::path::PathBuf> {
        if self.location.contains("://") && !self.location.starts_with("file://") {
            return None;
        }
        let dir = self.location.strip_prefix("file://").unwrap_or(&self.location);
        Some(std::path::Path::new(dir).join(key.as_ref()))
    }

    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    pub async fn put(&self, key: &Path, bytes: impl Into<Bytes>) -> Result<(), StoreError> {
        self.inner.put(key, bytes.into().into()).await.map(|_| ()).map_err(|e| StoreError::from_os(key, e))
    }

    pub async fn get(&self, key: &Path) -> Result<Bytes, StoreError> {
        let r = self.inner.get(key).await.map_err(|e| StoreError::from_os(key, e))?;
        r.bytes().await.map_err(|e| StoreError::from_os(key, e))
    }

    /// The size of the object at `key` in bytes.
    pub async fn size(&self, key: &Path) -> Result<u64, StoreError> {
        self.inner.head(key).await.map(|m| m.size).map_err(|e| StoreError::from_os(key, e))
    }

    /// Bytes `range` of the object at `key` (a ranged GET on S3, a seek and read locally).
    pub async fn get_range(&self, key: &Path, range: std::ops::Range<u64>) -> Result<Bytes, StoreError> {
        self.inner.get_range(key, range).await.map_err(|e| StoreError::from_os(key, e))
    }

    pub async fn exists(&self, key: &Path) -> Result<bool, StoreError> {
        match self.inner.head(key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(StoreError::from_os(key, e)),
        }
    }

    pub async fn delete(&self, key: &Path) -> Result<(), StoreError> {
        match self.inner.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StoreError::from_os(key, e)),
        }
    }

    /// Keys under `prefix`, sorted.
    pub async fn list(&self, prefix: &Path) -> Result<Vec<Path>, StoreError> {
        use futures::TryStreamExt;
        let mut keys: Vec<Path> = self
            .inner
            .list(Some(prefix))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| StoreError::from_os(prefix, e))?;
        keys.sort();
        Ok(keys)
    }

    pub async fn put_json<T: serde::Serialize>(&self, key: &Path, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(value).expect("our types serialise");
        self.put(key, bytes).await
    }

    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, key: &Path) -> Result<T, StoreError> {
        let bytes = self.get(key).await?;
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Json { key: key.to_string(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_store_round_trips_and_reports_missing_keys_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap(), &S3Options::default()).unwrap();
        let k = Path::from("a/b.json");
        assert!(!store.exists(&k).await.unwrap());
        store.put_json(&k, &vec![1, 2, 3]).await.unwrap();
        assert!(store.exists(&k).await.unwrap());
        assert_eq!(store.get_json::<Vec<i32>>(&k).await.unwrap(), vec![1, 2, 3]);
        assert!(dir.path().join("a/b.json").is_file());
        let err = store.get(&Path::from("nope.bin")).await.unwrap_err();
        assert!(err.to_string().contains("nope.bin"), "{err}");
        assert!(matches!(err, StoreError::NotFound { .. }));
        assert_eq!(store.list(&Path::from("a")).await.unwrap(), vec![k]);
    }

    #[test]
    fn debug_output_never_shows_credentials() {
        let opts = S3Options {
            endpoint: Some("http://127.0.0.1:1".into()),
            path_style: true,
            credentials: Some(S3Credentials { key_id: "AKIDEXAMPLE".into(), secret: "very-secret-key".into() }),
            ..Default::default()
        };
        assert!(!format!("{opts:?}").contains("very-secret-key"), "{opts:?}");
        let store = Store::open("s3://bucket/prefix", &opts).unwrap();
        let shown = format!("{store:?}");
        assert!(!shown.contains("very-secret-key") && !shown.contains("AKIDEXAMPLE"), "{shown}");
        assert!(shown.contains("s3://bucket/prefix"));
    }

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);
    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn a_chain_of_causes_is_said_once_with_nothing_lost() {
        // As object_store and reqwest nest them: the outer messages embed some inner ones.
        let inner = Layer("tcp connect error: Connection refused (os error 111)", None);
        let http = Layer("error sending request", Some(Box::new(inner)));
        let retry = Layer("Error performing GET http://h/b/k - error sending request", Some(Box::new(http)));
        let top =
            Layer("Generic S3 error: Error performing GET http://h/b/k - error sending request", Some(Box::new(retry)));
        let text = error_chain(&top);
        assert_eq!(
            text,
            "Generic S3 error: Error performing GET http://h/b/k - error sending request: tcp connect error: \
             Connection refused (os error 111)"
        );
    }

    #[tokio::test]
    async fn an_unreachable_s3_store_is_unavailable_and_says_why_once() {
        let opts = S3Options {
            endpoint: Some("http://127.0.0.1:9".into()),
            path_style: true,
            max_retries: Some(0),
            credentials: Some(S3Credentials { key_id: "AKIDEXAMPLE".into(), secret: "very-secret-key".into() }),
            ..Default::default()
        };
        let store = Store::open("s3://bucket/prefix", &opts).unwrap();
        let err = store.get(&Path::from("a/b.json")).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.starts_with("a/b.json: the store is unavailable"), "{text}");
        assert_eq!(text.matches("error sending request").count(), 1, "{text}");
        assert!(text.to_lowercase().contains("connection refused"), "{text}");
        assert!(!text.contains("very-secret-key"), "{text}");
    }

    #[test]
    fn s3_url_without_bucket_is_a_clear_error() {
        let err = Store::open("s3://", &S3Options::default()).unwrap_err();
        assert!(err.to_string().contains("no bucket"), "{err}");
    }
}
