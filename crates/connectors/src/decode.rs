//! Text records (JSON lines, CSV lines) to Arrow batches against a declared schema, a block of lines at a time.
//!
//! The fast path hands a whole block to arrow-json / arrow-csv. Only when that fails is the block decoded line by
//! line, to find the malformed records and apply the `bad_records` policy to exactly those.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions, StringBuilder};
use arrow::datatypes::{Schema, SchemaRef};
use nagare_engine::EngineError;
use nagare_engine::dead_letter::DeadLetterWriter;
use nagare_engine::metrics::NodeMetrics;
use nagare_sql::types::is_json_field;
use serde_json::value::RawValue;

/// What to do with a record that does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRecords {
    /// Stop the job, naming the file, line and reason.
    Fail,
    /// Write the raw record and reason to the dead-letter output, and go on.
    DeadLetter,
    /// Count it and go on.
    Skip,
}

impl BadRecords {
    /// Parses the option value (already validated).
    pub fn parse(value: Option<String>) -> BadRecords {
        match value.as_deref() {
            Some("dead_letter") => BadRecords::DeadLetter,
            Some("skip") => BadRecords::Skip,
            _ => BadRecords::Fail,
        }
    }
}

/// Where a block starts, for error locations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineBase {
    /// At this line number (1-based) of the file.
    Line(u64),
    /// At this byte offset (inside a split of a large file, where line numbers are not known).
    Byte(u64),
}

impl LineBase {
    fn locate(self, file: &str, index: usize) -> String {
        match self {
            LineBase::Line(l) => format!("{file}:{}", l + index as u64),
            LineBase::Byte(b) => format!("{file}: line {} after byte {b}", index + 1),
        }
    }
}

/// Text format of a record.
#[derive(Debug, Clone)]
pub enum TextFormat {
    /// One JSON object per line.
    Json,
    /// Delimited values in declared column order.
    Csv {
        /// Field separator.
        delimiter: u8,
    },
}

/// Decodes blocks of complete lines into batches of the projected schema.
pub struct BlockDecoder {
    format: TextFormat,
    /// The projected output schema.
    schema: SchemaRef,
    /// For CSV: the full declared schema (columns by position) and the projection.
    csv_full: Option<(SchemaRef, Vec<usize>)>,
    /// JSON: output columns that hold raw JSON text, decoded apart.
    json_columns: Vec<usize>,
    /// JSON: the schema arrow-json decodes (without raw JSON columns).
    typed_schema: SchemaRef,
    policy: BadRecords,
    dead_letter: Option<Arc<DeadLetterWriter>>,
    metrics: Arc<NodeMetrics>,
    origin: String,
    /// JSON: the arrow-json decoder of the previous block and the lines it takes, kept so its buffers are not
    /// grown again for every block (dropped after a failed block).
    json: Option<(arrow_json::reader::Decoder, usize)>,
}

impl BlockDecoder {
    /// A decoder producing `schema`; for CSV `full_schema` and `projection` say which declared columns to keep.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        format: TextFormat,
        schema: SchemaRef,
        full_schema: SchemaRef,
        projection: Vec<usize>,
        policy: BadRecords,
        dead_letter: Option<Arc<DeadLetterWriter>>,
        metrics: Arc<NodeMetrics>,
        origin: String,
    ) -> Result<Self, EngineError> {
        if policy == BadRecords::DeadLetter && dead_letter.is_none() {
            return Err(EngineError::Config(format!(
                "{origin}: bad_records = 'dead_letter' needs a directory: set the table option dead_letter_path or SET dead_letter_path"
            )));
        }
        let json_columns: Vec<usize> =
            schema.fields().iter().enumerate().filter(|(_, f)| is_json_field(f)).map(|(i, _)| i).collect();
        let typed_schema = Arc::new(Schema::new(
            schema
                .fields()
                .iter()
                .enumerate()
                .filter(|(i, _)| !json_columns.contains(i))
                .map(|(_, f)| f.clone())
                .collect::<Vec<_>>(),
        ));
        let csv_full = matches!(format, TextFormat::Csv { .. }).then(|| (full_schema, projection));
        Ok(BlockDecoder {
            format,
            schema,
            csv_full,
            json_columns,
            typed_schema,
            policy,
            dead_letter,
            metrics,
            origin,
            json: None,
        })
    }

    /// Decodes `block` (complete lines, each ending in `\n` except possibly the last) of `file` starting at
    /// `base`. Empty lines are ignored.
    pub fn decode(&mut self, block: &[u8], file: &str, base: LineBase) -> Result<Option<RecordBatch>, EngineError> {
        if block.is_empty() {
            return Ok(None);
        }
        match self.decode_fast(block) {
            Ok(b) => Ok(b),
            Err(_) => self.decode_slow(block, file, base),
        }
    }

    fn decode_fast(&mut self, block: &[u8]) -> Result<Option<RecordBatch>, EngineError> {
        let lines = memchr::memchr_iter(b'\n', block).count() + 1;
        match &self.format {
            TextFormat::Json => {
                let (mut decoder, capacity) = match self.json.take() {
                    Some((d, capacity)) if capacity > lines => (d, capacity),
                    _ => (
                        arrow_json::ReaderBuilder::new(self.typed_schema.clone())
                            .with_batch_size(lines + 1)
                            .with_strict_mode(false)
                            .build_decoder()?,
                        lines + 1,
                    ),
                };
                let mut rest = block;
                while !rest.is_empty() {
                    let n = decoder.decode(rest)?;
                    if n == 0 {
                        return Err(EngineError::Internal("JSON decoder made no progress".into()));
                    }
                    rest = &rest[n..];
                }
                let flushed = decoder.flush()?;
                self.json = Some((decoder, capacity));
                let Some(typed) = flushed else { return Ok(None) };
                if self.json_columns.is_empty() {
                    return Ok(Some(typed));
                }
                let raw = self.raw_json_columns(block.split(|b| *b == b'\n').filter(|l| !is_blank(l)))?;
                Ok(Some(self.assemble(typed, raw)?))
            }
            TextFormat::Csv { delimiter } => {
                let Some((full, projection)) = &self.csv_full else {
                    return Err(EngineError::Internal("csv schema".into()));
                };
                let mut decoder = arrow_csv::ReaderBuilder::new(full.clone())
                    .with_header(false)
                    .with_delimiter(*delimiter)
                    .with_batch_size(lines + 1)
                    .with_projection(projection.clone())
                    .build_decoder();
                let mut rest = block;
                loop {
                    let n = decoder.decode(rest)?;
                    if n == 0 {
                        break;
                    }
                    rest = &rest[n..];
                }
                let batch = decoder.flush()?;
                Ok(batch.map(|b| RecordBatch::try_new(self.schema.clone(), b.columns().to_vec())).transpose()?)
            }
        }
    }

    /// Raw JSON text of the JSON-typed columns, one value per line.
    fn raw_json_columns<'a>(&self, lines: impl Iterator<Item = &'a [u8]>) -> Result<Vec<ArrayRef>, EngineError> {
        let names: Vec<&str> = self.json_columns.iter().map(|i| self.schema.field(*i).name().as_str()).collect();
        let mut builders: Vec<StringBuilder> = names.iter().map(|_| StringBuilder::new()).collect();
        for line in lines {
            let obj: HashMap<&str, &RawValue> = serde_json::from_slice(line)
                .map_err(|e| EngineError::BadRecord { location: String::new(), reason: e.to_string() })?;
            for (b, name) in builders.iter_mut().zip(&names) {
                match obj.get(name) {
                    Some(v) if v.get() != "null" => b.append_value(v.get()),
                    _ => b.append_null(),
                }
            }
        }
        Ok(builders.into_iter().map(|mut b| Arc::new(b.finish()) as ArrayRef).collect())
    }

    fn assemble(&self, typed: RecordBatch, raw: Vec<ArrayRef>) -> Result<RecordBatch, EngineError> {
        let mut typed_cols = typed.columns().iter();
        let mut raw_cols = raw.into_iter();
        let mut cols = Vec::with_capacity(self.schema.fields().len());
        for i in 0..self.schema.fields().len() {
            let c = if self.json_columns.contains(&i) { raw_cols.next() } else { typed_cols.next().cloned() };
            cols.push(c.ok_or_else(|| EngineError::Internal("column count".into()))?);
        }
        Ok(RecordBatch::try_new_with_options(
            self.schema.clone(),
            cols,
            &RecordBatchOptions::new().with_row_count(Some(typed.num_rows())),
        )?)
    }

    /// Line by line: good lines are decoded together, bad ones follow the policy.
    fn decode_slow(&mut self, block: &[u8], file: &str, base: LineBase) -> Result<Option<RecordBatch>, EngineError> {
        let mut good: Vec<u8> = Vec::with_capacity(block.len());
        for (i, line) in block.split(|b| *b == b'\n').enumerate() {
            if is_blank(line) {
                continue;
            }
            let mut one = line.to_vec();
            one.push(b'\n');
            match self.decode_fast(&one) {
                Ok(_) => good.extend_from_slice(&one),
                Err(e) => {
                    let reason = clean_reason(&e);
                    let location = base.locate(file, i);
                    NodeMetrics::add(&self.metrics.bad_records, 1);
                    match self.policy {
                        BadRecords::Fail => {
                            return Err(EngineError::BadRecord {
                                location,
                                reason: format!(
                                    "{reason} (set bad_records = 'dead_letter' or 'skip' to continue past bad records)"
                                ),
                            });
                        }
                        BadRecords::DeadLetter => {
                            if let Some(dl) = &self.dead_letter {
                                dl.write_raw(&self.origin, &location, &reason, &String::from_utf8_lossy(line))?;
                            }
                        }
                        BadRecords::Skip => {
                            tracing::debug!(%location, %reason, "skipping bad record");
                        }
                    }
                }
            }
        }
        if good.is_empty() {
            return Ok(None);
        }
        self.decode_fast(&good)
    }
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(|b| b.is_ascii_whitespace())
}

fn clean_reason(e: &EngineError) -> String {
    let s = match e {
        EngineError::Arrow(a) => a.to_string(),
        EngineError::BadRecord { reason, .. } => reason.clone(),
        other => other.to_string(),
    };
    s.trim_start_matches("Json error: ")
        .trim_start_matches("Parser error: ")
        .trim_start_matches("Csv error: ")
        .to_string()
}
