//! Where cluster state lives: etcd for a cluster; a local file (or memory) for one `nagare run` and tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

/// A metadata store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// etcd could not be reached or refused the request.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// A record could not be read.
    #[error("metadata record {key} is not understood: {reason}")]
    Corrupt {
        /// Its key.
        key: String,
        /// Why.
        reason: String,
    },
}

/// Keys and values with prefix listing: what the coordinator needs of etcd.
#[async_trait]
pub trait MetadataStore: Send + Sync {
    /// The value at `key`.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Sets `key`.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError>;
    /// Every key under `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Removes `key` (absent is not an error).
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
}

/// etcd (v3 API); every key is put under a prefix, so several clusters (or tests) can share an etcd.
#[derive(Clone)]
pub struct EtcdStore {
    client: etcd_client::Client,
    /// Without a request timeout, for calls that wait by design (a campaign behind the leader).
    waiting: etcd_client::Client,
    prefix: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EtcdStore")
    }
}

impl EtcdStore {
    /// Connects to etcd (comma-separated endpoints), with timeouts so a lost etcd fails calls instead of hanging:
    /// each request gets 5 s, and HTTP/2 keep-alive pings find a dead connection within 10 s (etcd refuses pings
    /// more often than every 5 s), after which the next call connects again.
    pub async fn connect(endpoints: &str, prefix: &str) -> Result<Self, StoreError> {
        let endpoints: Vec<&str> = endpoints.split(',').map(str::trim).filter(|e| !e.is_empty()).collect();
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        let client =
            etcd_client::Client::connect(&endpoints, Some(options.clone().with_timeout(Duration::from_secs(5))))
                .await?;
        let waiting = etcd_client::Client::connect(&endpoints, Some(options)).await?;
        Ok(EtcdStore { client, waiting, prefix: prefix.trim_end_matches('/').to_string() })
    }

    /// The etcd key of a logical key (see [`crate::keys`]).
    pub fn key(&self, logical: &str) -> String {
        format!("{}{logical}", self.prefix)
    }

    /// The client, for leases and elections.
    pub fn client(&self) -> etcd_client::Client {
        self.client.clone()
    }

    /// A client without a request timeout, for calls that wait by design (campaigning behind another leader): a
    /// dead connection still fails them, by keep-alive.
    pub fn waiting_client(&self) -> etcd_client::Client {
        self.waiting.clone()
    }
}

#[async_trait]
impl MetadataStore for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let resp = self.client.clone().get(self.key(key), None).await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.client.clone().put(self.key(key), value, None).await?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let resp =
            self.client.clone().get(self.key(prefix), Some(etcd_client::GetOptions::new().with_prefix())).await?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                (key.strip_prefix(&self.prefix).unwrap_or(&key).to_string(), kv.value().to_vec())
            })
            .collect())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.client.clone().delete(self.key(key), None).await?;
        Ok(())
    }
}

/// In memory (one process; tests).
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    map: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
}

#[async_trait]
impl MetadataStore for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.map.lock().map_err(|_| poisoned(key))?.get(key).cloned())
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.map.lock().map_err(|_| poisoned(key))?.insert(key.to_string(), value);
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let map = self.map.lock().map_err(|_| poisoned(prefix))?;
        Ok(map
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.map.lock().map_err(|_| poisoned(key))?.remove(key);
        Ok(())
    }
}

/// In a local JSON file, rewritten atomically (a temporary file renamed over it) on every change: the embedded
/// store of a single `nagare run`, which keeps its job record across restarts without etcd.
#[derive(Debug, Clone)]
pub struct FileStore {
    path: std::path::PathBuf,
    map: Arc<Mutex<BTreeMap<String, String>>>,
}

impl FileStore {
    /// Opens `path`, or starts empty when it does not exist yet.
    pub fn open(path: impl Into<std::path::PathBuf>) -> Result<Self, StoreError> {
        let path = path.into();
        let corrupt = |reason: String| StoreError::Corrupt { key: path.display().to_string(), reason };
        let map = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(corrupt(e.to_string())),
        };
        Ok(FileStore { path, map: Arc::new(Mutex::new(map)) })
    }

    fn write(&self, map: &BTreeMap<String, String>) -> Result<(), StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt { key: self.path.display().to_string(), reason };
        let json = serde_json::to_vec_pretty(map).map_err(|e| corrupt(e.to_string()))?;
        let tmp = self.path.with_extension("json.tmp");
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| corrupt(e.to_string()))?;
        }
        std::fs::write(&tmp, json).map_err(|e| corrupt(format!("writing {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| corrupt(format!("replacing it: {e}")))
    }
}

#[async_trait]
impl MetadataStore for FileStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.map.lock().map_err(|_| poisoned(key))?.get(key).map(|v| v.clone().into_bytes()))
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let value = String::from_utf8(value)
            .map_err(|_| StoreError::Corrupt { key: key.to_string(), reason: "not UTF-8".into() })?;
        let mut map = self.map.lock().map_err(|_| poisoned(key))?;
        map.insert(key.to_string(), value);
        self.write(&map)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let map = self.map.lock().map_err(|_| poisoned(prefix))?;
        Ok(map
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
            .collect())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let mut map = self.map.lock().map_err(|_| poisoned(key))?;
        if map.remove(key).is_some() {
            self.write(&map)?;
        }
        Ok(())
    }
}

fn poisoned(key: &str) -> StoreError {
    StoreError::Corrupt { key: key.to_string(), reason: "the in-memory store was poisoned by a panic".into() }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_file_store_keeps_its_records_across_opens_and_lists_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/jobs.json");
        let store = FileStore::open(&path).unwrap();
        store.put("/nagare/jobs/a", b"{\"x\":1}".to_vec()).await.unwrap();
        store.put("/nagare/jobs/b", b"{}".to_vec()).await.unwrap();
        store.put("/nagare/workers/w", b"{}".to_vec()).await.unwrap();
        let again = FileStore::open(&path).unwrap();
        assert_eq!(again.get("/nagare/jobs/a").await.unwrap(), Some(b"{\"x\":1}".to_vec()));
        assert_eq!(again.list("/nagare/jobs/").await.unwrap().len(), 2);
        assert!(!path.with_extension("json.tmp").exists(), "written through a renamed temporary file");
        std::fs::write(&path, "not json").unwrap();
        assert!(matches!(FileStore::open(&path), Err(StoreError::Corrupt { .. })));
    }
}
