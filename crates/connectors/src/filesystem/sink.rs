//! The filesystem sink: Parquet or JSON-lines files in a directory, rolled by rows, bytes or time.
//!
//! A file is written under a hidden `.inprogress` name and renamed when closed, so readers of the directory only
//! ever see complete files. Names carry the run id, the subtask and a sequence number, so they never collide.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use nagare_engine::EngineError;
use nagare_engine::connector::{Committer, Sink, SinkContext};
use nagare_engine::metrics::NodeMetrics;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression as PqCompression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use super::{OutFormat, SinkConfig};

enum Writer {
    Parquet(ArrowWriter<File>),
    Json(arrow_json::LineDelimitedWriter<Box<dyn Write + Send>>),
}

/// Counts bytes written through it.
struct Counting<W> {
    inner: W,
    bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct OpenFile {
    writer: Writer,
    temp: PathBuf,
    final_path: PathBuf,
    rows: u64,
    opened: Instant,
    json_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl OpenFile {
    fn bytes(&self) -> u64 {
        match &self.writer {
            Writer::Parquet(w) => (w.bytes_written() + w.in_progress_size()) as u64,
            Writer::Json(_) => self.json_bytes.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// One subtask of a filesystem sink.
pub struct FileSink {
    dir: PathBuf,
    schema: SchemaRef,
    format: OutFormat,
    compression: String,
    rollover_rows: Option<u64>,
    rollover_bytes: Option<u64>,
    rollover_interval: Option<Duration>,
    prefix: String,
    seq: u64,
    current: Option<OpenFile>,
    /// Exactly-once: closed files not yet visible, oldest first.
    uncommitted: Vec<Pending>,
    /// Exactly-once: how many of `uncommitted` each pre-committed checkpoint covers.
    prepared: std::collections::BTreeMap<u64, usize>,
    ctx: SinkContext,
}

/// A closed file waiting for its checkpoint to complete: written under a hidden name, renamed at commit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pending {
    /// Hidden name it was written under.
    pub temp: PathBuf,
    /// Name it gets when committed.
    pub final_path: PathBuf,
}

impl Pending {
    /// Makes the file visible; idempotent (already renamed is fine).
    pub fn commit(&self) -> Result<(), EngineError> {
        match std::fs::rename(&self.temp, &self.final_path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.final_path.exists() => Ok(()),
            Err(e) => Err(EngineError::io(
                format!("committing {} (written for a completed checkpoint)", self.final_path.display()),
                e,
            )),
        }
    }
}

impl FileSink {
    /// The sink subtask `ctx.subtask` writing rows of `schema` as `config` says.
    pub fn new(config: SinkConfig, schema: SchemaRef, ctx: SinkContext) -> Result<Self, EngineError> {
        let dir = PathBuf::from(&config.path);
        std::fs::create_dir_all(&dir)
            .map_err(|e| EngineError::io(format!("creating output directory {}", dir.display()), e))?;
        Ok(FileSink {
            dir,
            schema,
            format: config.format,
            compression: config.compression,
            rollover_rows: config.rollover_rows,
            rollover_bytes: config.rollover_bytes,
            rollover_interval: config.rollover_interval,
            prefix: format!("part-{}-{:03}", ctx.run_id, ctx.subtask),
            seq: 0,
            current: None,
            uncommitted: Vec::new(),
            prepared: std::collections::BTreeMap::new(),
            ctx,
        })
    }

    fn extension(&self) -> String {
        match (self.format, self.compression.as_str()) {
            (OutFormat::Parquet, _) => "parquet".into(),
            (OutFormat::Json, "gzip") => "jsonl.gz".into(),
            (OutFormat::Json, "zstd") => "jsonl.zst".into(),
            (OutFormat::Json, _) => "jsonl".into(),
        }
    }

    fn open(&mut self) -> Result<(), EngineError> {
        let name = format!("{}-{:05}.{}", self.prefix, self.seq, self.extension());
        self.seq += 1;
        let final_path = self.dir.join(&name);
        let temp = self.dir.join(format!(".{name}.inprogress"));
        let file = File::create(&temp).map_err(|e| EngineError::io(format!("creating {}", temp.display()), e))?;
        let json_bytes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writer = match self.format {
            OutFormat::Parquet => {
                let compression = match self.compression.as_str() {
                    "zstd" => PqCompression::ZSTD(ZstdLevel::default()),
                    "none" => PqCompression::UNCOMPRESSED,
                    _ => PqCompression::SNAPPY,
                };
                let props = WriterProperties::builder().set_compression(compression).build();
                Writer::Parquet(ArrowWriter::try_new(file, self.schema.clone(), Some(props))?)
            }
            OutFormat::Json => {
                let counted = Counting { inner: BufWriter::with_capacity(1 << 20, file), bytes: json_bytes.clone() };
                let out: Box<dyn Write + Send> = match self.compression.as_str() {
                    "gzip" => Box::new(flate2::write::GzEncoder::new(counted, flate2::Compression::default())),
                    "zstd" => Box::new(
                        zstd::stream::write::Encoder::new(counted, 3)
                            .map_err(|e| EngineError::io("starting zstd stream", e))?
                            .auto_finish(),
                    ),
                    _ => Box::new(counted),
                };
                Writer::Json(arrow_json::LineDelimitedWriter::new(out))
            }
        };
        self.current = Some(OpenFile { writer, temp, final_path, rows: 0, opened: Instant::now(), json_bytes });
        Ok(())
    }

    /// Closes the open file off the async threads (flushing, the Parquet footer and fsync block): visible at once,
    /// or (exactly once) kept for the checkpoint that covers it.
    async fn close(&mut self) -> Result<(), EngineError> {
        let Some(f) = self.current.take() else { return Ok(()) };
        let exactly_once = self.ctx.exactly_once;
        let (pending, size) = tokio::task::spawn_blocking(move || finish_file(f, exactly_once))
            .await
            .map_err(|e| EngineError::Internal(format!("closing an output file: {e}")))??;
        if exactly_once {
            // Visible only when a checkpoint covering it completes.
            self.uncommitted.push(pending);
        }
        NodeMetrics::add(&self.ctx.metrics.bytes, size as usize);
        Ok(())
    }

    fn should_roll(&self) -> bool {
        let Some(f) = &self.current else { return false };
        self.rollover_rows.is_some_and(|n| f.rows >= n)
            || self.rollover_bytes.is_some_and(|b| f.bytes() >= b)
            || self.rollover_interval.is_some_and(|d| f.opened.elapsed() >= d)
    }

    /// The directory written to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[async_trait]
impl Sink for FileSink {
    async fn write(&mut self, batch: RecordBatch) -> Result<(), EngineError> {
        let batch = if batch.schema() == self.schema {
            batch
        } else {
            RecordBatch::try_new(self.schema.clone(), batch.columns().to_vec())?
        };
        let mut offset = 0;
        while offset < batch.num_rows() {
            if self.current.is_none() {
                self.open()?;
            }
            // Split so that a file ends exactly at rollover_rows.
            let room = match (self.rollover_rows, &self.current) {
                (Some(n), Some(f)) => (n.saturating_sub(f.rows) as usize).max(1),
                _ => usize::MAX,
            };
            let len = room.min(batch.num_rows() - offset);
            let part = batch.slice(offset, len);
            if let Some(f) = self.current.as_mut() {
                match &mut f.writer {
                    Writer::Parquet(w) => w.write(&part)?,
                    Writer::Json(w) => w.write(&part)?,
                }
                f.rows += len as u64;
            }
            offset += len;
            if self.should_roll() {
                self.close().await?;
            }
        }
        Ok(())
    }

    async fn tick(&mut self) -> Result<(), EngineError> {
        if self.should_roll() {
            self.close().await?;
        }
        Ok(())
    }

    async fn pre_commit(
        &mut self,
        checkpoint: nagare_core::CheckpointId,
        _last: bool,
    ) -> Result<serde_json::Value, EngineError> {
        self.close().await?;
        self.prepared.insert(checkpoint.0, self.uncommitted.len());
        serde_json::to_value(&self.uncommitted).map_err(|e| EngineError::Internal(e.to_string()))
    }

    async fn commit(&mut self, checkpoint: nagare_core::CheckpointId) -> Result<(), EngineError> {
        let covered = self.prepared.range(..=checkpoint.0).map(|(_, n)| *n).max().unwrap_or(0);
        let renames: Vec<Pending> = self.uncommitted.drain(..covered).collect();
        if !renames.is_empty() {
            tokio::task::spawn_blocking(move || renames.iter().try_for_each(Pending::commit))
                .await
                .map_err(|e| EngineError::Internal(format!("committing output files: {e}")))??;
        }
        self.prepared = self.prepared.split_off(&(checkpoint.0 + 1));
        for n in self.prepared.values_mut() {
            *n -= covered;
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), EngineError> {
        if !self.ctx.exactly_once {
            return self.close().await;
        }
        // The final checkpoint committed everything; rows after it cannot exist.
        if let Some(f) = self.current.take() {
            if f.rows > 0 {
                return Err(EngineError::Internal(format!("{} rows written after the final checkpoint", f.rows)));
            }
            let _ = std::fs::remove_file(&f.temp);
        }
        Ok(())
    }
}

/// Ends a file: flushes it and writes its footer; with exactly once, syncs it to disk for its checkpoint, else makes
/// it visible. Returns it and its size.
fn finish_file(f: OpenFile, exactly_once: bool) -> Result<(Pending, u64), EngineError> {
    match f.writer {
        Writer::Parquet(w) => {
            w.close()?;
        }
        Writer::Json(mut w) => {
            w.finish()?;
            let mut inner = w.into_inner();
            inner.flush().map_err(|e| EngineError::io(format!("writing {}", f.temp.display()), e))?;
            drop(inner);
        }
    }
    let size = std::fs::metadata(&f.temp).map(|m| m.len()).unwrap_or(0);
    let pending = Pending { temp: f.temp.clone(), final_path: f.final_path.clone() };
    if exactly_once {
        sync_file(&f.temp)?;
    } else {
        pending.commit()?;
    }
    tracing::debug!(file = %f.final_path.display(), rows = f.rows, bytes = size, "closed output file");
    Ok((pending, size))
}

/// Flushes a file's data to disk, so that a committed file survives a machine crash, not only a process crash.
fn sync_file(path: &Path) -> Result<(), EngineError> {
    File::open(path).and_then(|f| f.sync_all()).map_err(|e| EngineError::io(format!("syncing {}", path.display()), e))
}

/// A filesystem sink table's committer: its subtasks rename their own files at commit, so it only recovers.
#[derive(Debug)]
pub struct Recovery {
    /// The output directory.
    pub dir: PathBuf,
}

#[async_trait]
impl Committer for Recovery {
    async fn recover(&self, handles: &[serde_json::Value]) -> Result<(), EngineError> {
        recover(&self.dir, handles)
    }
}

/// Recovery before an exactly-once job starts: commits the files the restored checkpoint pre-committed (`handles`,
/// each a list of [`Pending`]) and deletes every other in-progress file in `dir` (written after that checkpoint).
pub fn recover(dir: &Path, handles: &[serde_json::Value]) -> Result<(), EngineError> {
    let mut keep = std::collections::HashSet::new();
    for h in handles {
        let files: Vec<Pending> = serde_json::from_value(h.clone()).map_err(|e| {
            EngineError::Config(format!("checkpoint commit data of a filesystem sink is not valid: {e}"))
        })?;
        for p in files {
            if !p.temp.exists() && !p.final_path.exists() {
                return Err(EngineError::Config(format!(
                    "{} was written for the last completed checkpoint but is gone; the output directory was changed",
                    p.final_path.display()
                )));
            }
            p.commit()?;
            keep.insert(p.temp);
        }
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for e in entries.flatten() {
        let path = e.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with(".part-") && name.ends_with(".inprogress") && !keep.contains(&path) {
            tracing::info!(file = %path.display(), "discarding output written after the last completed checkpoint");
            std::fs::remove_file(&path).map_err(|e| EngineError::io(format!("removing {}", path.display()), e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use nagare_core::CheckpointId;

    use super::*;

    fn sink(dir: &Path) -> FileSink {
        let config = SinkConfig {
            path: dir.display().to_string(),
            format: OutFormat::Json,
            compression: "none".into(),
            rollover_rows: None,
            rollover_bytes: None,
            rollover_interval: None,
        };
        let ctx = SinkContext {
            subtask: 0,
            parallelism: 1,
            run_id: "r".into(),
            metrics: Arc::new(nagare_engine::metrics::NodeMetrics::new(0, "o".into(), "sink", 1)),
            exactly_once: true,
            checkpoint_interval: Some(Duration::from_secs(1)),
            dead_letter: None,
        };
        FileSink::new(config, schema(), ctx).unwrap()
    }

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]))
    }

    fn batch(from: i64, to: i64) -> RecordBatch {
        RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from_iter_values(from..to))]).unwrap()
    }

    /// Lines of the committed (visible) files.
    fn visible(dir: &Path) -> usize {
        let mut lines = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if !p.file_name().unwrap().to_string_lossy().starts_with('.') {
                lines += std::fs::read_to_string(&p).unwrap().lines().count();
            }
        }
        lines
    }

    #[tokio::test]
    async fn files_appear_when_their_checkpoint_completes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = sink(dir.path());
        for i in 0..10 {
            s.write(batch(i * 100, i * 100 + 100)).await.unwrap();
        }
        s.pre_commit(CheckpointId(1), false).await.unwrap();
        assert_eq!(visible(dir.path()), 0, "pre-committed files stay hidden");
        s.write(batch(1000, 1050)).await.unwrap();
        s.commit(CheckpointId(1)).await.unwrap();
        assert_eq!(visible(dir.path()), 1000, "the completed checkpoint's rows, and only those");
        s.pre_commit(CheckpointId(2), true).await.unwrap();
        s.commit(CheckpointId(2)).await.unwrap();
        s.finish().await.unwrap();
        assert_eq!(visible(dir.path()), 1050);
    }

    #[tokio::test]
    async fn a_file_that_cannot_be_created_fails_the_write() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let mut s = sink(&out);
        std::fs::remove_dir(&out).unwrap();
        let e = s.write(batch(0, 10)).await.unwrap_err().to_string();
        assert!(e.contains("creating") && e.contains("out"), "{e}");
    }
}
