//! The filesystem source: JSON lines, CSV or Parquet files, plain or gzip/zstd-compressed, read in parallel splits;
//! bounded, or watching a directory for new files.

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, RecordBatch, new_null_array};
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use nagare_engine::EngineError;
use nagare_engine::connector::{Source, SourceContext, SourceEvent};
use nagare_engine::metrics::NodeMetrics;
use nagare_sql::SourceSpec;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use tokio::sync::mpsc;

use super::SourceConfig;
use super::listing::{Resume, Split, assign, list_files, owner_of, plan_splits};
use crate::decode::{BlockDecoder, LineBase, TextFormat};

/// Bytes read from a file at a time.
const READ_CHUNK: usize = 4 << 20;

/// File encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// JSON lines.
    Json,
    /// CSV.
    Csv,
    /// Parquet.
    Parquet,
}

impl Format {
    /// Parses the (validated) option value.
    pub fn parse(s: &str) -> Format {
        match s {
            "csv" => Format::Csv,
            "parquet" => Format::Parquet,
            _ => Format::Json,
        }
    }
}

/// Compression of text files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// None.
    None,
    /// gzip (also concatenated members).
    Gzip,
    /// Zstandard.
    Zstd,
}

/// The compression `option` means for `path` (`auto` looks at the extension).
pub fn compression_for(option: &str, path: &Path) -> Compression {
    match option {
        "gzip" => Compression::Gzip,
        "zstd" => Compression::Zstd,
        "none" => Compression::None,
        _ => match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("gz" | "gzip") => Compression::Gzip,
            Some("zst" | "zstd") => Compression::Zstd,
            _ => Compression::None,
        },
    }
}

/// Reads lines of one split in blocks.
struct TextReader {
    /// Stream offset of the split's first byte that counts towards its resume point.
    origin: u64,
    display: String,
    input: Box<dyn Read + Send>,
    buf: Vec<u8>,
    pos: usize,
    /// File offset of `buf[pos]` (of the decompressed stream for compressed files).
    offset: u64,
    end: Option<u64>,
    /// Line number of `buf[pos]`, when known (whole files).
    line: Option<u64>,
    skip_first_line: bool,
    eof: bool,
    done: bool,
    metrics: Arc<NodeMetrics>,
}

impl TextReader {
    fn fill(&mut self) -> Result<(), EngineError> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let old = self.buf.len();
        // read_to_end fills spare capacity without zeroing it first.
        let n = (&mut self.input)
            .take(READ_CHUNK as u64)
            .read_to_end(&mut self.buf)
            .map_err(|e| EngineError::io(format!("reading {}", self.display), e))?;
        if n < READ_CHUNK {
            self.eof = true;
        }
        NodeMetrics::add(&self.metrics.bytes, self.buf.len() - old);
        Ok(())
    }

    /// The next block of at most `max_lines` complete lines, as a range of `buf` and where it starts.
    fn next_block(&mut self, max_lines: usize) -> Result<Option<(std::ops::Range<usize>, LineBase)>, EngineError> {
        if self.done {
            return Ok(None);
        }
        while self.skip_first_line {
            match memchr::memchr(b'\n', &self.buf[self.pos..]) {
                Some(nl) => {
                    self.pos += nl + 1;
                    self.offset += nl as u64 + 1;
                    self.line = self.line.map(|l| l + 1);
                    self.skip_first_line = false;
                }
                None if self.eof => {
                    self.done = true;
                    return Ok(None);
                }
                None => self.fill()?,
            }
        }
        if let Some(end) = self.end
            && self.offset >= end
        {
            self.done = true;
            return Ok(None);
        }
        loop {
            let avail = &self.buf[self.pos..];
            let mut lines = 0usize;
            let mut cut = None;
            let mut last = false;
            for nl in memchr::memchr_iter(b'\n', avail) {
                lines += 1;
                let next_start = self.offset + nl as u64 + 1;
                if self.end.is_some_and(|end| next_start >= end) {
                    cut = Some(nl + 1);
                    last = true;
                    break;
                }
                if lines == max_lines {
                    cut = Some(nl + 1);
                    break;
                }
            }
            if cut.is_none() {
                if !self.eof {
                    self.fill()?;
                    continue;
                }
                if avail.is_empty() {
                    self.done = true;
                    return Ok(None);
                }
                cut = Some(avail.len());
                last = true;
            }
            let c = cut.unwrap_or(0);
            let base = match self.line {
                Some(l) => LineBase::Line(l),
                None => LineBase::Byte(self.offset),
            };
            let range = self.pos..self.pos + c;
            self.pos += c;
            self.offset += c as u64;
            self.line = self.line.map(|l| l + lines as u64);
            self.done = last;
            return Ok(Some((range, base)));
        }
    }
}

/// Reads a Parquet file, projecting and casting to the declared columns.
struct ParquetReader {
    rows_read: u64,
    display: String,
    reader: ParquetRecordBatchReader,
    /// For each output column: its index in the read batch, or None (absent from the file: nulls).
    columns: Vec<Option<usize>>,
}

enum Reader {
    Text(TextReader),
    Parquet(ParquetReader),
}

struct Watch {
    path: String,
    interval: Duration,
    next_poll: Instant,
    seen: HashSet<PathBuf>,
}

/// What one subtask reads, and how: runs on its own thread (file reads, decompression and decoding block).
struct FileReader {
    schema: SchemaRef,
    format: Format,
    compression: String,
    skip_header: bool,
    splits: VecDeque<Split>,
    current: Option<Reader>,
    watch: Option<Watch>,
    decoder: Option<BlockDecoder>,
    split_size: u64,
    ctx: SourceContext,
}

impl FileReader {
    fn new(
        config: &SourceConfig,
        spec: &SourceSpec,
        schema: SchemaRef,
        ctx: SourceContext,
    ) -> Result<Self, EngineError> {
        let format = config.format;
        let compression = config.compression.clone();
        let files = list_files(&config.path)?;
        let splittable = |p: &Path| format == Format::Json && compression_for(&compression, p) == Compression::None;
        let splits = assign(plan_splits(&files, splittable, config.split_size)?, ctx.subtask, ctx.parallelism);
        let watch = config.watch_interval.map(|interval| Watch {
            path: config.path.clone(),
            interval,
            next_poll: Instant::now(),
            seen: files.iter().cloned().collect(),
        });
        let decoder = match format {
            Format::Parquet => None,
            text => {
                let tf = if text == Format::Csv {
                    TextFormat::Csv { delimiter: config.csv_delimiter }
                } else {
                    TextFormat::Json
                };
                Some(BlockDecoder::new(
                    tf,
                    schema.clone(),
                    spec.table.schema.clone(),
                    spec.projection.clone(),
                    config.bad_records,
                    ctx.dead_letter.clone(),
                    ctx.metrics.clone(),
                    format!("source {}", spec.table.name),
                )?)
            }
        };
        Ok(FileReader {
            schema,
            format,
            compression,
            skip_header: format == Format::Csv && config.csv_header,
            splits: splits.into(),
            current: None,
            watch,
            decoder,
            split_size: config.split_size,
            ctx,
        })
    }

    fn open(&self, split: &Split) -> Result<Reader, EngineError> {
        let display = split.path.display().to_string();
        let mut file = File::open(&split.path).map_err(|e| EngineError::io(format!("opening {display}"), e))?;
        if self.format == Format::Parquet {
            return self.open_parquet(file, display, split);
        }
        let compression = compression_for(&self.compression, &split.path);
        let mut skip_first_line = self.skip_header;
        let mut offset = 0;
        let mut origin = split.start;
        let mut line = (split.start == 0).then_some(1);
        let mut discard = 0u64;
        match &split.resume {
            Some(r) => {
                // Resume exactly where the checkpoint left off: at the start of a line.
                skip_first_line = false;
                line = r.line;
                if compression == Compression::None {
                    offset = split.start + r.bytes;
                    file.seek(SeekFrom::Start(offset)).map_err(|e| EngineError::io(format!("seeking {display}"), e))?;
                } else {
                    discard = r.bytes;
                    origin = 0;
                }
            }
            None if split.start > 0 => {
                // Start inside the file: the line in progress belongs to the previous split.
                file.seek(SeekFrom::Start(split.start - 1))
                    .map_err(|e| EngineError::io(format!("seeking {display}"), e))?;
                offset = split.start - 1;
                skip_first_line = true;
            }
            None => {}
        }
        let mut input: Box<dyn Read + Send> = match compression {
            Compression::None => Box::new(file),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file))),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::new(file)
                    .map_err(|e| EngineError::io(format!("opening zstd stream {display}"), e))?,
            ),
        };
        if discard > 0 {
            // Compressed streams cannot seek: decompress and drop what was read before.
            let skipped = std::io::copy(&mut (&mut input).take(discard), &mut std::io::sink())
                .map_err(|e| EngineError::io(format!("resuming {display}"), e))?;
            if skipped < discard {
                return Err(EngineError::Config(format!(
                    "cannot resume {display}: the checkpoint had read {discard} bytes but the file now has {skipped} (was it replaced?)"
                )));
            }
            offset = discard;
        }
        Ok(Reader::Text(TextReader {
            origin,
            display,
            input,
            buf: Vec::with_capacity(READ_CHUNK),
            pos: 0,
            offset,
            end: split.end,
            line,
            skip_first_line,
            eof: false,
            done: false,
            metrics: self.ctx.metrics.clone(),
        }))
    }

    fn open_parquet(&self, file: File, display: String, split: &Split) -> Result<Reader, EngineError> {
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| EngineError::Config(format!("reading Parquet file {display}: {e}")))?;
        let file_schema = builder.schema().clone();
        let mut roots = Vec::new();
        let mut wanted = Vec::new();
        for field in self.schema.fields() {
            match file_schema.index_of(field.name()) {
                Ok(i) => {
                    roots.push(i);
                    wanted.push(Some(i));
                }
                Err(_) if field.is_nullable() => wanted.push(None),
                Err(_) => {
                    return Err(EngineError::Config(format!(
                        "Parquet file {display} has no column '{}', which is declared NOT NULL",
                        field.name()
                    )));
                }
            }
        }
        let mut sorted = roots.clone();
        sorted.sort_unstable();
        sorted.dedup();
        // Read columns come back in file order; map each output column to its position among them.
        let columns = wanted.iter().map(|w| w.and_then(|i| sorted.iter().position(|s| *s == i))).collect();
        let mask = ProjectionMask::roots(builder.parquet_schema(), sorted);
        let rows_read = split.resume.as_ref().map(|r| r.rows).unwrap_or(0);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(self.ctx.batch_size)
            .with_offset(rows_read as usize)
            .build()?;
        NodeMetrics::add(&self.ctx.metrics.bytes, size as usize);
        Ok(Reader::Parquet(ParquetReader { rows_read, display, reader, columns }))
    }

    fn adapt_parquet(&self, r: &ParquetReader, batch: RecordBatch) -> Result<RecordBatch, EngineError> {
        let n = batch.num_rows();
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        for (field, src) in self.schema.fields().iter().zip(&r.columns) {
            let col = match src {
                Some(i) => {
                    let c = batch.column(*i).clone();
                    if c.data_type() == field.data_type() {
                        c
                    } else {
                        arrow::compute::cast(&c, field.data_type()).map_err(|e| {
                            EngineError::Config(format!(
                                "Parquet file {}: column '{}' is {} and cannot be read as declared ({}): {e}",
                                r.display,
                                field.name(),
                                c.data_type(),
                                nagare_sql::types::arrow_to_sql(field.data_type())
                            ))
                        })?
                    }
                }
                None => new_null_array(field.data_type(), n),
            };
            cols.push(col);
        }
        Ok(RecordBatch::try_new(self.schema.clone(), cols)?)
    }

    /// Looks for new files: `Ok(None)` when not watching, else what was found (or how long to wait).
    fn poll_watch(&mut self) -> Result<Option<Polled>, EngineError> {
        let Some(w) = self.watch.as_mut() else { return Ok(None) };
        let now = Instant::now();
        if now < w.next_poll {
            return Ok(Some(Polled::Wait(w.next_poll - now)));
        }
        w.next_poll = now + w.interval;
        let files = match list_files(&w.path) {
            Ok(f) => f,
            // A watched directory may appear later.
            Err(EngineError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let seen: Vec<PathBuf> = files.into_iter().filter(|f| w.seen.insert(f.clone())).collect();
        let new: Vec<PathBuf> =
            seen.iter().filter(|f| owner_of(f, self.ctx.parallelism) == self.ctx.subtask).cloned().collect();
        if seen.is_empty() {
            return Ok(Some(Polled::Wait(w.interval)));
        }
        if !new.is_empty() {
            tracing::info!(files = new.len(), path = %w.path, "new files to read");
        }
        let format = self.format;
        let compression = self.compression.clone();
        let splittable = |p: &Path| format == Format::Json && compression_for(&compression, p) == Compression::None;
        let splits = plan_splits(&new, splittable, self.split_size)?;
        self.splits.extend(splits.iter().cloned());
        Ok(Some(Polled::Found { seen, splits }))
    }

    /// The next thing to tell the source task: one read, one open, or one look for new files.
    fn step(&mut self) -> Result<Step, EngineError> {
        if self.current.is_none() {
            return match self.splits.pop_front() {
                Some(split) => {
                    self.current = Some(self.open(&split)?);
                    Ok(Step::Tell(Event::Opened(split)))
                }
                None => match self.poll_watch()? {
                    None => Ok(Step::Tell(Event::End)),
                    Some(Polled::Wait(wait)) => Ok(Step::Wait(wait)),
                    Some(Polled::Found { seen, splits }) => Ok(Step::Tell(Event::Found { seen, splits })),
                },
            };
        }
        let batch_size = self.ctx.batch_size;
        match self.current.as_mut() {
            Some(Reader::Text(r)) => match r.next_block(batch_size)? {
                Some((range, base)) => {
                    let decoder =
                        self.decoder.as_mut().ok_or_else(|| EngineError::Internal("no text decoder".into()))?;
                    let batch = decoder.decode(&r.buf[range], &r.display, base)?;
                    let resume = Resume { bytes: r.offset - r.origin, line: r.line, rows: 0 };
                    let last = r.done;
                    if last {
                        self.current = None;
                    }
                    Ok(Step::Tell(Event::Read { batch, resume, last }))
                }
                None => {
                    self.current = None;
                    Ok(Step::Tell(Event::Closed))
                }
            },
            Some(Reader::Parquet(r)) => match r.reader.next() {
                Some(batch) => {
                    let batch =
                        batch.map_err(|e| EngineError::Config(format!("reading Parquet file {}: {e}", r.display)))?;
                    r.rows_read += batch.num_rows() as u64;
                    let resume = Resume { bytes: 0, line: None, rows: r.rows_read };
                    let batch = match self.current.as_ref() {
                        Some(Reader::Parquet(r)) => Some(self.adapt_parquet(r, batch)?),
                        _ => None,
                    };
                    Ok(Step::Tell(Event::Read { batch, resume, last: false }))
                }
                None => {
                    self.current = None;
                    Ok(Step::Tell(Event::Closed))
                }
            },
            None => Err(EngineError::Internal("no open split".into())),
        }
    }

    /// Reads ahead of the source task, a few events at a time, until the input ends, the task goes away or an
    /// error (which the task gets).
    fn run(mut self, tx: mpsc::Sender<Result<Event, EngineError>>) {
        loop {
            match self.step() {
                Ok(Step::Tell(event)) => {
                    let end = matches!(event, Event::End);
                    if tx.blocking_send(Ok(event)).is_err() || end {
                        return;
                    }
                }
                Ok(Step::Wait(wait)) => {
                    // Watching with nothing new: sleep in short steps, so a stopped task does not wait for us.
                    let until = Instant::now() + wait;
                    while Instant::now() < until {
                        if tx.is_closed() {
                            return;
                        }
                        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(100)));
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    }
}

/// What a look for new files found.
enum Polled {
    /// Nothing new: look again after this long.
    Wait(Duration),
    /// Files not seen before (any subtask's) and the splits of those that are this subtask's.
    Found { seen: Vec<PathBuf>, splits: Vec<Split> },
}

/// One step of the reading thread.
enum Step {
    Tell(Event),
    Wait(Duration),
}

/// What the reading thread tells the source task, in order; the task keeps the read position from it.
#[derive(Debug)]
enum Event {
    /// The next split of the queue was opened.
    Opened(Split),
    /// Rows of the open split (none when every record of the block was bad); `resume` is where it continues after
    /// them; `last`: the split is done.
    Read { batch: Option<RecordBatch>, resume: Resume, last: bool },
    /// The open split is done.
    Closed,
    /// Watching: files seen for the first time, and the splits that join the queue.
    Found { seen: Vec<PathBuf>, splits: Vec<Split> },
    /// The input has ended (not watching).
    End,
}

/// Events the reading thread may be ahead of the source task by.
const READ_AHEAD: usize = 2;

/// One subtask of a filesystem source. Reading, decompressing and decoding run on a thread of their own, a few
/// batches ahead, so a slow disk or a large gzip member never stalls the other tasks of the runtime; the task keeps
/// the position of what it has handed downstream.
pub struct FileSource {
    /// Until the first read.
    reader: Option<FileReader>,
    rx: Option<mpsc::Receiver<Result<Event, EngineError>>>,
    /// Splits not yet opened, in order.
    queue: VecDeque<Split>,
    /// The open split, with where it resumes after what was handed downstream.
    current: Option<Split>,
    /// Watching: every file seen.
    seen: Option<HashSet<PathBuf>>,
    label: String,
}

impl FileSource {
    /// The subtask `ctx.subtask` of a source over `spec` (configured by `config`), producing `schema`.
    pub fn new(
        config: &SourceConfig,
        spec: &SourceSpec,
        schema: SchemaRef,
        ctx: SourceContext,
    ) -> Result<Self, EngineError> {
        let label = format!("nagare-read-{}", ctx.subtask);
        let reader = FileReader::new(config, spec, schema, ctx)?;
        let mut source =
            FileSource { reader: None, rx: None, queue: VecDeque::new(), current: None, seen: None, label };
        source.follow(reader);
        Ok(source)
    }

    /// Takes the reader's queue and seen files as the position (before it starts).
    fn follow(&mut self, reader: FileReader) {
        self.queue = reader.splits.clone();
        self.seen = reader.watch.as_ref().map(|w| w.seen.clone());
        self.current = None;
        self.reader = Some(reader);
    }

    /// Applies an event to the position; the rows to hand on, if any.
    fn apply(&mut self, event: Event) -> Result<Option<SourceEvent>, EngineError> {
        match event {
            Event::Opened(split) => {
                let next = self.queue.pop_front();
                if next.as_ref().is_none_or(|n| (&n.path, n.start) != (&split.path, split.start)) {
                    return Err(EngineError::Internal(format!("reader opened {} out of order", split.path.display())));
                }
                self.current = Some(split);
                Ok(None)
            }
            Event::Read { batch, resume, last } => {
                match self.current.as_mut() {
                    Some(_) if last => self.current = None,
                    Some(s) => s.resume = Some(resume),
                    None => return Err(EngineError::Internal("rows read outside a split".into())),
                }
                Ok(batch.map(SourceEvent::Batch))
            }
            Event::Closed => {
                self.current = None;
                Ok(None)
            }
            Event::Found { seen, splits } => {
                if let Some(s) = self.seen.as_mut() {
                    s.extend(seen);
                }
                self.queue.extend(splits);
                Ok(None)
            }
            Event::End => Ok(Some(SourceEvent::End)),
        }
    }
}

/// A filesystem source's checkpoint position: what is left to read, and (watching) which files it has seen.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Position {
    splits: Vec<Split>,
    seen: Option<Vec<PathBuf>>,
}

impl FileSource {
    /// Resumes from checkpoint positions instead of the listing: the splits left in `mine` (one position, or
    /// several after a rescale), and every file any subtask had seen (`all`), so a watched file is read once.
    pub fn restore<'a>(
        &mut self,
        mine: &[&serde_json::Value],
        all: impl Iterator<Item = &'a serde_json::Value>,
    ) -> Result<(), EngineError> {
        let parse = |v: &serde_json::Value| -> Result<Position, EngineError> {
            serde_json::from_value(v.clone()).map_err(|e| {
                EngineError::Config(format!("checkpoint position of a filesystem source is not valid: {e}"))
            })
        };
        let Some(mut reader) = self.reader.take() else {
            return Err(EngineError::Internal("a filesystem source is restored before it reads".into()));
        };
        let mut splits = Vec::new();
        for p in mine {
            splits.extend(parse(p)?.splits);
        }
        // In the input's own order, whichever old subtask had each split: read one old subtask's rest after
        // another's, event time would jump back and those rows would fall behind the watermark.
        splits.sort_by(|a, b| (&a.path, a.start).cmp(&(&b.path, b.start)));
        reader.splits = splits.into();
        if let Some(w) = reader.watch.as_mut() {
            w.seen.clear();
            for p in all {
                w.seen.extend(parse(p)?.seen.unwrap_or_default());
            }
        }
        reader.current = None;
        self.follow(reader);
        Ok(())
    }
}

#[async_trait]
impl Source for FileSource {
    fn snapshot_position(&mut self, _checkpoint: nagare_core::CheckpointId) -> Result<serde_json::Value, EngineError> {
        let splits: Vec<Split> = self.current.iter().chain(self.queue.iter()).cloned().collect();
        let seen = self.seen.as_ref().map(|seen| {
            let mut v: Vec<PathBuf> = seen.iter().cloned().collect();
            v.sort();
            v
        });
        serde_json::to_value(Position { splits, seen }).map_err(|e| EngineError::Internal(e.to_string()))
    }

    async fn next(&mut self) -> Result<SourceEvent, EngineError> {
        if let Some(reader) = self.reader.take() {
            let (tx, rx) = mpsc::channel(READ_AHEAD);
            std::thread::Builder::new()
                .name(self.label.clone())
                .spawn(move || reader.run(tx))
                .map_err(|e| EngineError::io("starting a file reading thread", e))?;
            self.rx = Some(rx);
        }
        loop {
            let Some(rx) = self.rx.as_mut() else { return Ok(SourceEvent::End) };
            // Not waiting long: coordinator messages (barriers) are taken between calls.
            let event = match tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
                Ok(Some(event)) => event?,
                Ok(None) => return Err(EngineError::Internal("the file reading thread ended early".into())),
                Err(_) if self.current.is_none() && self.queue.is_empty() && self.seen.is_some() => {
                    // Watching, and nothing left to read: idle.
                    return Ok(SourceEvent::Idle(Duration::from_millis(100)));
                }
                Err(_) => return Ok(SourceEvent::Pending),
            };
            if let Some(out) = self.apply(event)? {
                if matches!(out, SourceEvent::End) {
                    self.rx = None;
                }
                return Ok(out);
            }
        }
    }
}
