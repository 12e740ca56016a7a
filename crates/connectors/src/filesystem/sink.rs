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
use nagare_engine::connector::{Sink, SinkContext};
use nagare_engine::metrics::NodeMetrics;
use nagare_sql::SinkSpec;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression as PqCompression, ZstdLevel};
use parquet::file::properties::WriterProperties;

/// Output encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutFormat {
    Parquet,
    Json,
}

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
    ctx: SinkContext,
}

impl FileSink {
    /// The sink subtask `ctx.subtask` writing rows of `schema` for `spec`.
    pub fn new(spec: &SinkSpec, schema: SchemaRef, ctx: SinkContext) -> Result<Self, EngineError> {
        let o = &spec.table.options;
        let dir =
            PathBuf::from(o.get_str("path").ok_or_else(|| EngineError::Config("filesystem sink needs 'path'".into()))?);
        std::fs::create_dir_all(&dir)
            .map_err(|e| EngineError::io(format!("creating output directory {}", dir.display()), e))?;
        let format = match o.get_str("format").as_deref() {
            Some("json") => OutFormat::Json,
            _ => OutFormat::Parquet,
        };
        let default_compression = if format == OutFormat::Parquet { "snappy" } else { "none" };
        let positive = |v: Option<u64>| v.filter(|n| *n > 0);
        Ok(FileSink {
            dir,
            schema,
            format,
            compression: o.get_str("compression").unwrap_or_else(|| default_compression.into()),
            rollover_rows: positive(o.get_int("rollover_rows").map(|i| i as u64)),
            rollover_bytes: positive(o.get_bytes("rollover_bytes")),
            rollover_interval: o.get_duration("rollover_interval").filter(|d| !d.is_zero()),
            prefix: format!("part-{}-{:03}", ctx.run_id, ctx.subtask),
            seq: 0,
            current: None,
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

    fn close(&mut self) -> Result<(), EngineError> {
        let Some(f) = self.current.take() else { return Ok(()) };
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
        std::fs::rename(&f.temp, &f.final_path)
            .map_err(|e| EngineError::io(format!("renaming {} to {}", f.temp.display(), f.final_path.display()), e))?;
        NodeMetrics::add(&self.ctx.metrics.bytes, size as usize);
        tracing::debug!(file = %f.final_path.display(), rows = f.rows, bytes = size, "closed output file");
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
                self.close()?;
            }
        }
        Ok(())
    }

    async fn tick(&mut self) -> Result<(), EngineError> {
        if self.should_roll() {
            self.close()?;
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), EngineError> {
        self.close()
    }
}
