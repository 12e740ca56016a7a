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

use crate::json_fast::FastJsonDecoder;

/// What to do with a record that does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
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
    /// JSON: the decoder that reads only the projected fields, while it keeps up (see [`FastJsonDecoder`]).
    fast: Option<FastJsonDecoder>,
    /// Blocks in a row the fast decoder declined; at [`MAX_DECLINES`] it is dropped for this source.
    declines: u32,
}

/// A source whose blocks the fast JSON decoder keeps declining (say, numbers written as strings) stops trying it;
/// only whole blocks count, not the lines a block with bad records is re-read by.
const MAX_DECLINES: u32 = 8;

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
        let fast = match format {
            TextFormat::Json => {
                let raw = (0..schema.fields().len()).map(|i| json_columns.contains(&i)).collect();
                FastJsonDecoder::try_new(schema.clone(), raw)
            }
            TextFormat::Csv { .. } => None,
        };
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
            fast,
            declines: 0,
        })
    }

    /// Decodes `block` (complete lines, each ending in `\n` except possibly the last) of `file` starting at
    /// `base`. Empty lines are ignored.
    pub fn decode(&mut self, block: &[u8], file: &str, base: LineBase) -> Result<Option<RecordBatch>, EngineError> {
        if block.is_empty() {
            return Ok(None);
        }
        if let Some(fast) = self.fast.as_mut() {
            match fast.decode(block) {
                Ok(batch) => {
                    self.declines = 0;
                    return Ok(batch);
                }
                Err(_) => {
                    self.declines += 1;
                    if self.declines >= MAX_DECLINES {
                        tracing::debug!(origin = %self.origin, "JSON blocks keep needing arrow-json; using it from now on");
                        self.fast = None;
                    }
                }
            }
        }
        match self.decode_fast(block) {
            Ok(b) => Ok(b),
            Err(_) => self.decode_slow(block, file, base),
        }
    }

    /// Decodes `block` (complete lines) all or nothing: an error for the whole block when any line does not decode,
    /// without applying the `bad_records` policy or counting. For sources that attribute bad records themselves
    /// (SQS: to a message id) and must know which lines a batch's rows came from.
    pub fn try_decode(&mut self, block: &[u8]) -> Result<Option<RecordBatch>, EngineError> {
        if block.is_empty() {
            return Ok(None);
        }
        if let Some(fast) = self.fast.as_mut() {
            match fast.decode(block) {
                Ok(batch) => {
                    self.declines = 0;
                    return Ok(batch);
                }
                Err(_) => {
                    self.declines += 1;
                    if self.declines >= MAX_DECLINES {
                        self.fast = None;
                    }
                }
            }
        }
        self.decode_fast(block)
            .map_err(|e| EngineError::BadRecord { location: String::new(), reason: clean_reason(&e) })
    }

    /// The whole block through arrow-json / arrow-csv (also line by line, from [`Self::decode_slow`]).
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

#[cfg(test)]
mod tests {
    use arrow::datatypes::{DataType, Field, Fields, TimeUnit};
    use nagare_sql::types::{EXTENSION_NAME_KEY, JSON_EXTENSION};

    use super::*;

    /// A tiny deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[self.below(items.len() as u64) as usize]
        }
    }

    fn schema(with_json: bool) -> SchemaRef {
        let json = Field::new("j", DataType::Utf8, true)
            .with_metadata([(EXTENSION_NAME_KEY.to_string(), JSON_EXTENSION.to_string())].into());
        let inner = Fields::from(vec![Field::new("c", DataType::Float64, true)]);
        let st = Fields::from(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("b", DataType::Utf8, true),
            Field::new("inner", DataType::Struct(inner), true),
            Field::new("tags", DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))), true),
        ]);
        let mut fields = vec![
            Field::new("s", DataType::Utf8, true),
            Field::new("i", DataType::Int64, true),
            Field::new("i8", DataType::Int8, true),
            Field::new("u", DataType::UInt32, true),
            Field::new("f", DataType::Float64, true),
            Field::new("f32", DataType::Float32, true),
            Field::new("b", DataType::Boolean, true),
            Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
            Field::new("tsn", DataType::Timestamp(TimeUnit::Millisecond, None), true),
            Field::new("l", DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))), true),
            Field::new("li", DataType::List(Arc::new(Field::new("item", DataType::Int64, true))), true),
            Field::new("st", DataType::Struct(st), true),
        ];
        if with_json {
            fields.push(json);
        }
        Arc::new(Schema::new(fields))
    }

    fn string(r: &mut Rng, clean: bool) -> String {
        let all = [
            "plain",
            "é",
            "日本",
            "",
            " ",
            "\\n",
            "\\\"",
            "\\\\",
            "\\/",
            "\\u00e9",
            "\\u0041",
            "\\t",
            "tab\there",
            "\\ud83d\\ude00",
            "\\x",
        ];
        let parts = if clean { &all[..12] } else { &all[..] };
        let n = r.below(4);
        let body: String = (0..n).map(|_| r.pick(parts)).collect();
        format!("\"{body}\"")
    }

    fn number(r: &mut Rng, clean: bool) -> String {
        match r.below(10) {
            0 if clean => r.pick(&["0", "-0", "1.0", "1e3", "-1.5E-7", "9223372036854775808"]).into(),
            0 => r.pick(&["0", "-0", "1.0", "1e3", "-1.5E-7", "01", "1.", "+1", "9223372036854775808", "-129"]).into(),
            1 => format!("{}", r.next() as i64),
            2 => format!("{:e}", (r.next() as i64) as f64 / 7.0),
            3..=5 => format!("{}", r.below(300) as i64 - 150),
            _ => format!("{}", (r.next() % 1_000_000) as f64 / 100.0),
        }
    }

    fn any(r: &mut Rng, depth: u32, clean: bool) -> String {
        match r.below(if depth > 2 { 5 } else { 7 }) {
            0 => string(r, clean),
            1 => number(r, clean),
            2 => r.pick(&["true", "false"]).into(),
            3 => "null".into(),
            4 => r
                .pick(&["\"2026-01-01T00:00:00.123Z\"", "\"2026-03-04 05:06:07\"", "\"2026-01-01T01:00:00+02:00\""])
                .into(),
            5 => {
                let items: Vec<String> = (0..r.below(3)).map(|_| any(r, depth + 1, clean)).collect();
                format!("[{}]", items.join(" , "))
            }
            _ => {
                let members: Vec<String> =
                    (0..r.below(3)).map(|k| format!("\"k{k}\": {}", any(r, depth + 1, clean))).collect();
                format!("{{ {} }}", members.join(","))
            }
        }
    }

    /// A value for a field of type `kind`: usually of that type, sometimes null or anything else.
    fn value(r: &mut Rng, kind: &str, clean: bool) -> String {
        if clean {
            match kind {
                "s" => return string(r, true),
                "i" => return format!("{}", r.next() as i64),
                "i8" => return format!("{}", r.below(256) as i64 - 128),
                "u" => return format!("{}", r.below(5_000_000_000) as u32),
                "f" | "f32" => return format!("{}", (r.next() % 10_000_000) as f64 / 1000.0 - 500.0),
                "ts" | "tsn" => {
                    return r
                        .pick(&[
                            "\"2026-01-01T00:00:00.123Z\"",
                            "\"2026-03-04 05:06:07\"",
                            "\"2026-01-01T01:00:00+02:00\"",
                        ])
                        .into();
                }
                "l" => {
                    return format!("[{}]", (0..r.below(4)).map(|_| string(r, true)).collect::<Vec<_>>().join(","));
                }
                "li" => {
                    return format!(
                        "[{}]",
                        (0..r.below(4)).map(|_| r.below(99).to_string()).collect::<Vec<_>>().join(", ")
                    );
                }
                _ => {}
            }
        }
        if !clean && r.below(10) == 0 {
            return any(r, 0, clean);
        }
        if r.below(12) == 0 {
            return "null".into();
        }
        match kind {
            "s" => string(r, clean),
            "i" | "i8" | "u" | "f" | "f32" => number(r, clean),
            "b" => r.pick(&["true", "false"]).into(),
            "ts" | "tsn" => r
                .pick(&[
                    "\"2026-01-01T00:00:00.123Z\"",
                    "\"2026-03-04 05:06:07\"",
                    "\"2026-01-01T01:00:00+02:00\"",
                    "\"2026-01-01T00:00:00.123456789Z\"",
                    "\"not a time\"",
                    "1700000000",
                ])
                .into(),
            "l" => format!("[{}]", (0..r.below(4)).map(|_| string(r, clean)).collect::<Vec<_>>().join(",")),
            "li" => format!("[{}]", (0..r.below(4)).map(|_| number(r, clean)).collect::<Vec<_>>().join(", ")),
            "st" => {
                let mut m = vec![];
                if r.below(4) > 0 {
                    m.push(format!("\"a\":{}", value(r, "i", clean)));
                }
                if r.below(4) > 0 {
                    m.push(format!("\"b\":{}", value(r, "s", clean)));
                }
                if r.below(4) > 0 {
                    m.push(format!("\"inner\":{{\"c\":{}}}", value(r, "f", clean)));
                }
                if r.below(4) > 0 {
                    m.push(format!("\"tags\":{}", value(r, "l", clean)));
                }
                if r.below(4) == 0 {
                    m.push(format!("\"extra\":{}", any(r, 1, clean)));
                }
                format!("{{{}}}", m.join(","))
            }
            _ => any(r, 0, clean),
        }
    }

    fn record(r: &mut Rng, clean: bool) -> String {
        let kinds = ["s", "i", "i8", "u", "f", "f32", "b", "ts", "tsn", "l", "li", "st", "j"];
        let mut members = Vec::new();
        for k in kinds {
            if r.below(8) == 0 {
                continue; // missing
            }
            members.push(format!("\"{k}\":{}", value(r, k, clean)));
            if !clean && r.below(40) == 0 {
                members.push(format!("\"{k}\":{}", value(r, k, clean))); // duplicate key
            }
            if r.below(5) == 0 {
                members.push(format!("\"unused{}\": {}", r.below(3), any(r, 0, clean)));
            }
        }
        // Member order varies, as it does between producers.
        if r.below(3) == 0 {
            members.reverse();
        }
        // Now and then a record over several lines, which arrow-json reads and the raw JSON column path refuses.
        let sep = if r.below(10) == 0 { ",\n  " } else { r.pick(&[",", ", ", " ,\t"]) };
        let mut line = format!("{{{}}}", members.join(sep));
        if !clean && r.below(50) == 0 {
            let mut at = r.below(line.len() as u64) as usize;
            while !line.is_char_boundary(at) {
                at += 1;
            }
            line.insert(at, r.pick(&["}", "\"", ",", "x"]).as_bytes()[0] as char);
        }
        line
    }

    /// For every block the fast decoder accepts, arrow-json (with the raw JSON columns read by serde_json) returns
    /// the same batch.
    #[test]
    fn fast_json_decoder_agrees_with_arrow_json() {
        agrees_with_arrow_json(true);
        agrees_with_arrow_json(false);
    }

    fn agrees_with_arrow_json(with_json: bool) {
        let schema = schema(with_json);
        let metrics = Arc::new(NodeMetrics::new(0, "t".into(), "source", 1));
        let new = || {
            BlockDecoder::new(
                TextFormat::Json,
                schema.clone(),
                schema.clone(),
                vec![],
                BadRecords::Fail,
                None,
                metrics.clone(),
                "t".into(),
            )
            .unwrap()
        };
        let mut reference = new();
        reference.fast = None;
        let mut fast = new().fast.expect("the schema is one the fast decoder handles");
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut accepted, mut declined) = (0, 0);
        for _ in 0..4000 {
            let clean = r.below(2) == 0;
            let lines: Vec<String> = (0..1 + r.below(4)).map(|_| record(&mut r, clean)).collect();
            let block = lines.join(if r.below(5) == 0 { "\r\n" } else { "\n" });
            let want = reference.decode_fast(block.as_bytes());
            match fast.decode(block.as_bytes()) {
                Ok(got) => {
                    accepted += 1;
                    let want =
                        want.unwrap_or_else(|e| panic!("arrow-json refuses what the fast decoder took: {e}\n{block}"));
                    assert_eq!(got, want, "{block}");
                }
                Err(_) => declined += 1,
            }
        }
        eprintln!("accepted {accepted}, declined {declined}");
        assert!(accepted > 1000 && declined > 500, "accepted {accepted}, declined {declined}");
    }

    #[test]
    fn a_block_of_w1_events_takes_the_fast_path() {
        let detail = Fields::from(vec![
            Field::new("tenant_id", DataType::Int64, true),
            Field::new("amount", DataType::Float64, true),
        ]);
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("time", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
            Field::new("detail", DataType::Struct(detail), true),
        ]));
        let raw = vec![false; 3];
        let mut fast = FastJsonDecoder::try_new(schema, raw).unwrap();
        let block = br#"{"version":"0","id":"a","time":"2026-01-01T00:00:00.000Z","resources":["s3://x"],"detail":{"tenant_id":84,"document_id":"d","amount":455.83}}
{"version":"0","id":"b","time":"2026-01-01T00:00:00.001Z","region":"us-east-1","detail":{"tenant_id":2,"amount":7}}
"#;
        let batch = fast.decode(block).unwrap().unwrap();
        assert_eq!(batch.num_rows(), 2);
        let detail = batch.column(2).as_any().downcast_ref::<arrow::array::StructArray>().unwrap();
        let amount = detail.column(1).as_any().downcast_ref::<arrow::array::Float64Array>().unwrap();
        assert_eq!(amount.values().to_vec(), vec![455.83, 7.0]);
    }
}
