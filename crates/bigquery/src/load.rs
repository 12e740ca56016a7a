//! `write_mode = 'load'`: rows are staged as Parquet files and loaded with BigQuery load jobs, for bulk ingestion
//! where load jobs are free and the Storage Write API is not.
//!
//! Each sink subtask writes its rows to a Parquet file per checkpoint epoch under `staging_uri` and puts the file in
//! the checkpoint. Every `load_interval` (counted in checkpoints, so all subtasks agree) and at the final checkpoint
//! the files staged so far are *sealed*; when that checkpoint completes, one load job per table loads every sealed
//! file of every subtask. The job id is derived from the files, and the job is looked up before it is started, so a
//! load retried after a crash never runs twice. After a crash, every file the restored checkpoint lists is loaded
//! (sealed ones are found already loaded) and files of later, abandoned epochs are deleted.
//!
//! Quota: BigQuery allows 1,500 load jobs per table per day; this mode runs at most
//! `86,400 / max(load_interval, checkpoint_interval)` a day (288 with the default five minutes).

use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use bytes::Bytes;
use nagare_core::CheckpointId;
use nagare_engine::EngineError;
use nagare_engine::checkpoint::store::CheckpointStore;
use nagare_engine::connector::{Sink, SinkContext};
use nagare_sql::SinkSpec;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::BqError;
use crate::rest::RestClient;
use crate::target::Target;
use crate::types::{to_wire, wire_schema};

/// Load jobs BigQuery allows per table per day.
pub const LOAD_JOBS_PER_TABLE_PER_DAY: f64 = 1_500.0;

/// A staged file is closed and a new one started past this size (compressed), to bound memory.
const MAX_FILE_BYTES: usize = 128 * 1024 * 1024;

/// Where staged files go and how BigQuery reads them, from the sink's options.
#[derive(Debug, Clone)]
pub struct Staging {
    /// Where nagare writes (`gs://`, `s3://`, `file://` or a directory).
    pub uri: String,
    /// The same place as BigQuery addresses it (`gs://...`).
    pub source_uri: String,
    /// Time between loads.
    pub interval: Duration,
}

impl Staging {
    /// The staging of a load-mode sink, from its configuration.
    pub fn from_spec(spec: &SinkSpec) -> Result<Self, BqError> {
        let c = crate::config::BigQueryConfig::of(spec)?;
        let uri = c.staging_uri.ok_or_else(|| BqError::Config("write_mode = 'load' needs staging_uri".into()))?;
        let source_uri = c.staging_source_uri.unwrap_or_else(|| uri.clone());
        Ok(Staging { uri, source_uri, interval: c.load_interval })
    }

    /// The directory (relative to the staging root) of one table's files.
    fn dir(target: &Target) -> String {
        format!("{}.{}.{}", target.table.project, target.table.dataset, target.table.table)
    }
}

/// A file staged by a sink subtask and not yet known to be loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagedFile {
    /// Path relative to the staging root.
    pub path: String,
    /// Rows in it.
    pub rows: i64,
    /// The checkpoint that sealed it for loading; `None` while it waits for the next load.
    pub sealed: Option<u64>,
}

/// What a checkpoint records for a load-mode sink subtask.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadHandle {
    /// Staged files not yet loaded, oldest first.
    pub files: Vec<StagedFile>,
}

fn parse_handles(handles: &[serde_json::Value]) -> Result<Vec<LoadHandle>, BqError> {
    crate::parse_handles(handles, "bigquery load handle")
}

/// The load job's id: a digest of the table and the files, so the same load always has the same id.
fn job_id(target: &Target, paths: &[&str]) -> String {
    let mut sorted = paths.to_vec();
    sorted.sort_unstable();
    let id = xxhash_rust::xxh3::xxh3_128(format!("{}|{}", target.table, sorted.join("|")).as_bytes());
    format!("nagare_load_{id:032x}")
}

/// Loads `paths` (relative to the staging root) into the table with one job, unless that job ran before, then
/// deletes the files.
async fn load_files(
    target: &Target,
    staging: &Staging,
    store: &CheckpointStore,
    paths: &[&str],
) -> Result<(), BqError> {
    if paths.is_empty() {
        return Ok(());
    }
    let rest: RestClient = target.rest_client()?;
    let t = &target.table;
    let sources: Vec<String> = paths.iter().map(|p| format!("{}/{p}", staging.source_uri)).collect();
    let id = job_id(target, paths);
    let configuration = json!({"load": {
        "sourceUris": sources,
        "sourceFormat": "PARQUET",
        "destinationTable": {"projectId": t.project, "datasetId": t.dataset, "tableId": t.table},
        "writeDisposition": "WRITE_APPEND",
        "createDisposition": "CREATE_NEVER",
        "parquetOptions": {"enableListInference": true},
    }});
    rest.run_job_config(&t.project, &id, configuration).await?;
    tracing::debug!(table = %t, files = paths.len(), job = id, "loaded staged files");
    for p in paths {
        if let Err(e) = store.delete_file(p).await {
            tracing::warn!(file = p, error = %e, "could not delete a loaded staging file; it is safe to delete");
        }
    }
    Ok(())
}

/// Opens the staging location, so a bad `staging_uri` fails before the job starts.
pub fn check_staging(spec: &SinkSpec) -> Result<(), BqError> {
    open_store(&Staging::from_spec(spec)?).map(|_| ())
}

fn open_store(staging: &Staging) -> Result<CheckpointStore, BqError> {
    CheckpointStore::open(&staging.uri).map_err(|e| BqError::Config(format!("staging_uri: {e}")))
}

/// A checkpoint completed: loads the files its subtasks sealed, with one job for the table.
pub async fn commit(spec: &SinkSpec, handles: &[serde_json::Value]) -> Result<(), BqError> {
    let handles = parse_handles(handles)?;
    let sealed: Vec<&str> =
        handles.iter().flat_map(|h| &h.files).filter(|f| f.sealed.is_some()).map(|f| f.path.as_str()).collect();
    if sealed.is_empty() {
        return Ok(());
    }
    let (target, staging) = (Target::from_spec(spec)?, Staging::from_spec(spec)?);
    load_files(&target, &staging, &open_store(&staging)?, &sealed).await
}

/// Before a restored job starts: loads what the restored checkpoint staged (sealed files with the job the commit
/// used, so they load once; the rest with one more job) and deletes files of epochs after it.
pub async fn recover(spec: &SinkSpec, handles: &[serde_json::Value]) -> Result<(), BqError> {
    let handles = parse_handles(handles)?;
    let (target, staging) = (Target::from_spec(spec)?, Staging::from_spec(spec)?);
    let store = open_store(&staging)?;
    let files: Vec<&StagedFile> = handles.iter().flat_map(|h| &h.files).collect();
    let sealed: Vec<&str> = files.iter().filter(|f| f.sealed.is_some()).map(|f| f.path.as_str()).collect();
    let open: Vec<&str> = files.iter().filter(|f| f.sealed.is_none()).map(|f| f.path.as_str()).collect();
    load_files(&target, &staging, &store, &sealed).await?;
    load_files(&target, &staging, &store, &open).await?;
    let dir = Staging::dir(&target);
    let leftovers = store.list_files(&dir).await.map_err(|e| BqError::Config(format!("staging_uri: {e}")))?;
    for f in leftovers.iter().filter(|f| f.ends_with(".parquet")) {
        tracing::debug!(file = f, "deleting a file staged after the restored checkpoint");
        if let Err(e) = store.delete_file(f).await {
            tracing::warn!(file = f, error = %e, "could not delete an abandoned staging file");
        }
    }
    Ok(())
}

/// One subtask of a load-mode bigquery sink.
pub struct LoadSink {
    target: Target,
    staging: Staging,
    store: CheckpointStore,
    wire: SchemaRef,
    ctx: SinkContext,
    /// The file being written, with its row count.
    writer: Option<(ArrowWriter<Vec<u8>>, i64)>,
    /// Staged files not yet loaded.
    files: Vec<StagedFile>,
    /// Files written by this subtask, for unique names.
    written: u64,
    /// Checkpoints per load (all subtasks seal at the same checkpoints).
    every: u64,
    /// Without checkpoints: when the last load ran.
    last_load: Instant,
}

impl LoadSink {
    /// A subtask staging rows of `schema`.
    pub fn new(spec: &SinkSpec, schema: SchemaRef, ctx: SinkContext) -> Result<Self, BqError> {
        let target = Target::from_spec(spec)?;
        let staging = Staging::from_spec(spec)?;
        let store = open_store(&staging)?;
        let every = match ctx.checkpoint_interval {
            Some(c) => (staging.interval.as_secs_f64() / c.as_secs_f64().max(0.001)).ceil().max(1.0) as u64,
            None => 1,
        };
        let period = ctx.checkpoint_interval.map_or(staging.interval, |c| c.max(staging.interval));
        let per_day = 86_400.0 / period.as_secs_f64().max(0.001);
        if ctx.subtask == 0 && per_day > LOAD_JOBS_PER_TABLE_PER_DAY * 2.0 / 3.0 {
            tracing::warn!(
                table = %target.table,
                loads_per_day = per_day as u64,
                quota = LOAD_JOBS_PER_TABLE_PER_DAY,
                "this sink may run load jobs near BigQuery's quota of load jobs per table per day: set a longer \
                 load_interval"
            );
        }
        Ok(LoadSink {
            wire: wire_schema(&schema),
            target,
            staging,
            store,
            ctx,
            writer: None,
            files: Vec::new(),
            written: 0,
            every,
            last_load: Instant::now(),
        })
    }

    /// Closes the current file, if it has rows, and stages it.
    async fn close_file(&mut self) -> Result<(), EngineError> {
        let Some((writer, rows)) = self.writer.take() else { return Ok(()) };
        let bytes = writer.into_inner().map_err(|e| BqError::Protocol(format!("writing Parquet: {e}")))?;
        if rows == 0 {
            return Ok(());
        }
        self.written += 1;
        let path = format!(
            "{}/{}-{:04}-{:06}.parquet",
            Staging::dir(&self.target),
            self.ctx.run_id,
            self.ctx.subtask,
            self.written
        );
        self.store.put(&path, Bytes::from(bytes)).await?;
        self.files.push(StagedFile { path, rows, sealed: None });
        Ok(())
    }

    /// Without checkpoints: loads what is staged (at least once).
    async fn load_now(&mut self) -> Result<(), EngineError> {
        self.close_file().await?;
        let paths: Vec<&str> = self.files.iter().map(|f| f.path.as_str()).collect();
        load_files(&self.target, &self.staging, &self.store, &paths).await?;
        self.files.clear();
        self.last_load = Instant::now();
        Ok(())
    }
}

#[async_trait]
impl Sink for LoadSink {
    async fn write(&mut self, batch: RecordBatch) -> Result<(), EngineError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let wire = to_wire(&batch, &self.wire)?;
        if self.writer.is_none() {
            let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
            let w = ArrowWriter::try_new(Vec::new(), self.wire.clone(), Some(props))
                .map_err(|e| BqError::Protocol(format!("writing Parquet: {e}")))?;
            self.writer = Some((w, 0));
        }
        let Some((w, rows)) = self.writer.as_mut() else { return Ok(()) };
        w.write(&wire).map_err(|e| BqError::Protocol(format!("writing Parquet: {e}")))?;
        *rows += wire.num_rows() as i64;
        if w.bytes_written() + w.in_progress_size() > MAX_FILE_BYTES {
            // Not yet in a checkpoint: only durable once a checkpoint lists it.
            self.close_file().await?;
        }
        Ok(())
    }

    async fn tick(&mut self) -> Result<(), EngineError> {
        if !self.ctx.exactly_once && self.last_load.elapsed() >= self.staging.interval {
            self.load_now().await?;
        }
        Ok(())
    }

    async fn pre_commit(&mut self, checkpoint: CheckpointId, last: bool) -> Result<serde_json::Value, EngineError> {
        self.close_file().await?;
        if last || checkpoint.0.is_multiple_of(self.every) {
            for f in self.files.iter_mut().filter(|f| f.sealed.is_none()) {
                f.sealed = Some(checkpoint.0);
            }
        }
        serde_json::to_value(LoadHandle { files: self.files.clone() }).map_err(|e| EngineError::Internal(e.to_string()))
    }

    /// The table's committer has loaded every file sealed up to `checkpoint`.
    async fn commit(&mut self, checkpoint: CheckpointId) -> Result<(), EngineError> {
        self.files.retain(|f| f.sealed.is_none_or(|s| s > checkpoint.0));
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), EngineError> {
        if !self.ctx.exactly_once {
            self.load_now().await?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for LoadSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadSink").field("table", &self.target.table).field("staged", &self.files.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_depend_on_the_files_not_their_order() {
        let spec_target = |table: &str| Target {
            table: crate::rest::TableRef { project: "p".into(), dataset: "d".into(), table: table.into() },
            auth: crate::auth::Auth::None,
            endpoint: String::new(),
            rest_endpoint: String::new(),
            max_request_bytes: 1,
            merge: None,
            commit: "auto".into(),
            stream_max_age: std::time::Duration::from_secs(3600),
            stream_max_bytes: crate::config::DEFAULT_STREAM_MAX_BYTES,
        };
        let t = spec_target("t");
        assert_eq!(job_id(&t, &["a", "b"]), job_id(&t, &["b", "a"]));
        assert_ne!(job_id(&t, &["a", "b"]), job_id(&t, &["a"]));
        assert_ne!(job_id(&t, &["a"]), job_id(&spec_target("u"), &["a"]));
        assert!(job_id(&t, &["a"]).len() <= 1024, "BigQuery job ids are at most 1,024 characters");
    }
}
