//! Where checkpoints live: state files (Parquet) and metadata (JSON) under a root in object storage — a local
//! directory (`file://` or a plain path), `s3://bucket/prefix` or `gs://bucket/prefix`.
//!
//! Layout: `<root>/chk-<id>/<node>-<subtask>-<part>.parquet` and `<root>/chk-<id>/_metadata.json`. The metadata is
//! written last and in one put (atomic on every backend): its presence marks the checkpoint complete. Incremental
//! state (a base and deltas that later checkpoints keep referring to) lives in
//! `<root>/shared/<node>-<subtask>-<part>-<id>.parquet` and is deleted once no kept checkpoint refers to it.

use std::sync::Arc;

use arrow::array::RecordBatch;
use bytes::Bytes;
use futures::TryStreamExt;
use nagare_core::checkpoint::{Candidate, CheckpointMetadata, RestoreChoice, StateFile, choose_restore};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::error::{EngineError, Result};
use crate::operator::StatePart;

const METADATA: &str = "_metadata.json";
const SHARED: &str = "shared";
/// Why a checkpoint directory without metadata is skipped: a checkpoint that never completed, not a damaged one.
pub const NEVER_COMPLETED: &str = "no metadata: it never completed";

/// A checkpoint root in object storage.
#[derive(Clone)]
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    root: Path,
    url: String,
}

impl std::fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

fn storage_error(url: &str, what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::External {
        system: format!("checkpoint store {url}"),
        message: format!("{what}: {e}"),
        retriable: true,
    }
}

impl CheckpointStore {
    /// A store that lives as long as the process: checkpoints then only pace commits and acknowledgements (a queue
    /// source deletes messages once their rows are committed), and a restart begins anew.
    pub fn in_memory() -> Self {
        CheckpointStore {
            store: Arc::new(object_store::memory::InMemory::new()),
            root: Path::from(""),
            url: "memory://".to_string(),
        }
    }

    /// Opens `location`: `file:///dir`, a plain directory path, `s3://bucket/prefix` (credentials and endpoint from
    /// the usual `AWS_*` variables) or `gs://bucket/prefix` (`GOOGLE_*` variables).
    pub fn open(location: &str) -> Result<Self> {
        let bad = |e: &dyn std::fmt::Display| EngineError::Config(format!("checkpoint location '{location}': {e}"));
        if location.starts_with("s3://") || location.starts_with("s3a://") {
            let url = url::Url::parse(location).map_err(|e| bad(&e))?;
            let store =
                object_store::aws::AmazonS3Builder::from_env().with_url(location).build().map_err(|e| bad(&e))?;
            let root = Path::from(url.path().trim_matches('/'));
            return Ok(CheckpointStore { store: Arc::new(store), root, url: location.to_string() });
        }
        if location.starts_with("gs://") {
            let url = url::Url::parse(location).map_err(|e| bad(&e))?;
            let store = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(location)
                .build()
                .map_err(|e| bad(&e))?;
            let root = Path::from(url.path().trim_matches('/'));
            return Ok(CheckpointStore { store: Arc::new(store), root, url: location.to_string() });
        }
        let dir = match location.strip_prefix("file://") {
            Some(p) => std::path::PathBuf::from(p),
            None if location.contains("://") => {
                return Err(bad(&"unsupported scheme (use file://, s3:// or gs://)"));
            }
            None => std::path::PathBuf::from(location),
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| EngineError::io(format!("creating checkpoint directory {}", dir.display()), e))?;
        let dir = dir.canonicalize().map_err(|e| EngineError::io(format!("resolving {}", dir.display()), e))?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(&dir).map_err(|e| bad(&e))?;
        Ok(CheckpointStore { store: Arc::new(store), root: Path::from(""), url: format!("file://{}", dir.display()) })
    }

    /// The location as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn dir(&self, id: u64) -> Path {
        self.root.clone().join(format!("chk-{id:010}").as_str())
    }

    fn path(&self, rel: &str) -> Path {
        rel.split('/').fold(self.root.clone(), |p, part| p.join(part))
    }

    /// The relative path of a state file.
    pub fn state_path(id: u64, node: usize, subtask: usize, part: &str) -> String {
        format!("chk-{id:010}/{node}-{subtask}-{part}.parquet")
    }

    /// The relative path of a state file that later checkpoints may refer to (a base or a delta).
    pub fn shared_path(id: u64, node: usize, subtask: usize, part: &str) -> String {
        format!("{SHARED}/{node}-{subtask}-{part}-{id:010}.parquet")
    }

    /// Every object under `prefix`.
    async fn list_under(&self, prefix: &Path, what: &str) -> Result<Vec<Path>> {
        self.store
            .list(Some(prefix))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| storage_error(&self.url, &format!("listing {what}"), e))
    }

    /// Every object under `rel_prefix` (a relative directory), as relative paths.
    pub async fn list_files(&self, rel_prefix: &str) -> Result<Vec<String>> {
        let files = self.list_under(&self.path(rel_prefix), rel_prefix).await?;
        let root = self.root.as_ref();
        Ok(files
            .iter()
            .map(|f| {
                let p = f.as_ref();
                p.strip_prefix(root).map_or(p, |r| r.trim_start_matches('/')).to_string()
            })
            .collect())
    }

    /// Every shared state file, with the checkpoint that wrote it.
    pub async fn list_shared(&self) -> Result<Vec<(String, u64)>> {
        let files = self.list_files(SHARED).await?;
        Ok(files
            .into_iter()
            .filter_map(|f| {
                let id = f.strip_suffix(".parquet")?.rsplit('-').next()?.parse().ok()?;
                Some((f, id))
            })
            .collect())
    }

    /// Deletes one state file (relative path); a missing file is not an error.
    pub async fn delete_file(&self, rel: &str) -> Result<()> {
        self.delete_object(&self.path(rel)).await
    }

    async fn delete_object(&self, path: &Path) -> Result<()> {
        match self.store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(storage_error(&self.url, &format!("deleting {path}"), e)),
        }
    }

    /// Encodes a state batch as Parquet (synchronous: done on the task, before the upload).
    pub fn encode(batch: &RecordBatch) -> Result<Bytes> {
        let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
        let mut buf = Vec::new();
        let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props))?;
        w.write(batch)?;
        w.close()?;
        Ok(Bytes::from(buf))
    }

    /// Uploads an encoded state file.
    pub async fn put(&self, rel: &str, bytes: Bytes) -> Result<()> {
        self.store
            .put(&self.path(rel), PutPayload::from_bytes(bytes))
            .await
            .map_err(|e| storage_error(&self.url, &format!("writing {rel}"), e))?;
        Ok(())
    }

    /// Reads a state file back.
    pub async fn read_state(&self, file: &StateFile) -> Result<Vec<RecordBatch>> {
        let bytes = self
            .store
            .get(&self.path(&file.path))
            .await
            .map_err(|e| storage_error(&self.url, &format!("reading {}", file.path), e))?
            .bytes()
            .await
            .map_err(|e| storage_error(&self.url, &format!("reading {}", file.path), e))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()?;
        Ok(reader.collect::<Result<Vec<_>, _>>()?)
    }

    /// Reads an operator's state files back as parts. A part stored incrementally has several files (a base and
    /// deltas): they are concatenated, and the operator merges them.
    pub async fn read_parts(&self, files: &[StateFile]) -> Result<Vec<StatePart>> {
        let mut parts: Vec<StatePart> = Vec::new();
        for f in files {
            let mut batches = self.read_state(f).await?;
            if let Some(i) = parts.iter().position(|p| p.name == f.part) {
                batches.insert(0, parts.remove(i).batch);
            }
            if let Some(first) = batches.first() {
                let batch = arrow::compute::concat_batches(&first.schema(), &batches)?;
                parts.push(StatePart::new(&f.part, batch));
            }
        }
        Ok(parts)
    }

    /// Writes the metadata: the commit point of the checkpoint.
    pub async fn write_metadata(&self, metadata: &CheckpointMetadata) -> Result<()> {
        let json = serde_json::to_vec_pretty(metadata).map_err(|e| EngineError::Internal(e.to_string()))?;
        let path = self.dir(metadata.id).join(METADATA);
        self.store
            .put(&path, PutPayload::from(json))
            .await
            .map_err(|e| storage_error(&self.url, &format!("writing metadata of checkpoint {}", metadata.id), e))?;
        Ok(())
    }

    /// Ids of every checkpoint directory, complete or not, ascending.
    pub async fn list(&self) -> Result<Vec<u64>> {
        let prefix = (!self.root.as_ref().is_empty()).then_some(&self.root);
        let listing = self
            .store
            .list_with_delimiter(prefix)
            .await
            .map_err(|e| storage_error(&self.url, "listing checkpoints", e))?;
        let mut ids: Vec<u64> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().and_then(|n| n.strip_prefix("chk-")).and_then(|n| n.parse().ok()))
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Reads and checks one checkpoint: metadata present and parseable, every state file present with its size
    /// and a Parquet footer.
    pub async fn load(&self, id: u64) -> Candidate {
        Candidate { id, metadata: self.load_checked(id).await }
    }

    async fn load_checked(&self, id: u64) -> std::result::Result<CheckpointMetadata, String> {
        let path = self.dir(id).join(METADATA);
        let bytes = match self.store.get(&path).await {
            Ok(r) => r.bytes().await.map_err(|e| format!("metadata unreadable: {e}"))?,
            Err(object_store::Error::NotFound { .. }) => return Err(NEVER_COMPLETED.into()),
            Err(e) => return Err(format!("metadata unreadable: {e}")),
        };
        let metadata: CheckpointMetadata =
            serde_json::from_slice(&bytes).map_err(|e| format!("metadata is not valid: {e}"))?;
        for f in metadata.files() {
            let p = self.path(&f.path);
            let head = self.store.head(&p).await.map_err(|e| format!("state file {} is missing: {e}", f.path))?;
            if head.size != f.bytes {
                return Err(format!(
                    "state file {} has {} bytes, {} expected (truncated?)",
                    f.path, head.size, f.bytes
                ));
            }
            if f.bytes < 8 {
                return Err(format!("state file {} is too short to be Parquet", f.path));
            }
            let tail = self
                .store
                .get_range(&p, f.bytes - 4..f.bytes)
                .await
                .map_err(|e| format!("state file {}: {e}", f.path))?;
            if tail.as_ref() != b"PAR1" {
                return Err(format!("state file {} is not a complete Parquet file", f.path));
            }
        }
        Ok(metadata)
    }

    /// The newest intact checkpoint, and the newer ones that are not.
    pub async fn latest(&self) -> Result<RestoreChoice> {
        let ids = self.list().await?;
        let mut candidates = Vec::new();
        // Newest first; stop at the first intact one.
        for id in ids.iter().rev() {
            let c = self.load(*id).await;
            let ok = c.metadata.is_ok();
            candidates.push(c);
            if ok {
                break;
            }
        }
        Ok(choose_restore(candidates))
    }

    /// Reads the metadata of every complete checkpoint (for listings), skipping damaged ones.
    pub async fn completed(&self) -> Result<Vec<std::result::Result<CheckpointMetadata, (u64, String)>>> {
        let mut out = Vec::new();
        for id in self.list().await? {
            out.push(self.load(id).await.metadata.map_err(|e| (id, e)));
        }
        Ok(out)
    }

    /// Deletes a checkpoint directory and everything in it.
    pub async fn delete(&self, id: u64) -> Result<()> {
        let files = self.list_under(&self.dir(id), &format!("checkpoint {id}")).await?;
        for f in files {
            self.delete_object(&f).await?;
        }
        Ok(())
    }
}
