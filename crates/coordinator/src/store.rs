//! Where cluster state lives: etcd for a cluster, memory for tests and one-process use.

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
}

/// etcd (v3 API); every key is put under a prefix, so several clusters (or tests) can share an etcd.
#[derive(Clone)]
pub struct EtcdStore {
    client: etcd_client::Client,
    prefix: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EtcdStore")
    }
}

impl EtcdStore {
    /// Connects to etcd (comma-separated endpoints), with timeouts so a lost etcd fails calls instead of hanging.
    pub async fn connect(endpoints: &str, prefix: &str) -> Result<Self, StoreError> {
        let endpoints: Vec<&str> = endpoints.split(',').map(str::trim).filter(|e| !e.is_empty()).collect();
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        let client = etcd_client::Client::connect(endpoints, Some(options)).await?;
        Ok(EtcdStore { client, prefix: prefix.trim_end_matches('/').to_string() })
    }

    /// The etcd key of a logical key (see [`crate::keys`]).
    pub fn key(&self, logical: &str) -> String {
        format!("{}{logical}", self.prefix)
    }

    /// The client, for leases and elections.
    pub fn client(&self) -> etcd_client::Client {
        self.client.clone()
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
}

impl MemoryStore {
    /// Removes a key (what a lease expiry does to a worker's registration).
    pub fn map_remove(&self, key: &str) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(key);
        }
    }
}

fn poisoned(key: &str) -> StoreError {
    StoreError::Corrupt { key: key.to_string(), reason: "the in-memory store was poisoned by a panic".into() }
}
