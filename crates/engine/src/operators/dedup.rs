//! Dedup: `ROW_NUMBER() OVER (PARTITION BY key ORDER BY time [DESC]) = 1` on an unbounded stream.
//!
//! Semantics (event time): rows are held until the watermark passes them, then processed in event-time order (ties in
//! arrival order). A key's *group* starts at its first row and lasts for the TTL (`[t, t + ttl]`) or to the end of the
//! enclosing tumbling window. Keep-first emits the first row of each group as soon as it is processed; keep-last emits
//! the last row of a group when the group closes (the watermark passes its end). Rows that arrive already behind the
//! watermark are duplicates if their key's open group covers them (keep-last may still take them as the new last),
//! and late otherwise. For rows that are not late this equals the batch query over the same rows.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, UInt32Array};
use arrow::compute::{concat_batches, filter_record_batch, take_record_batch};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow_row::{OwnedRow, RowConverter, Rows, SortField};
use datafusion::common::ScalarValue;
use datafusion::physical_expr::PhysicalExpr;
use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
use nagare_sql::{DedupScope, DedupSpec, Keep};

use super::{OperatorContext, event_times};
use crate::error::{EngineError, Result};
use crate::metrics::NodeMetrics;
use crate::operator::Operator;

/// Input rows not yet behind the watermark.
struct Pending {
    batch: RecordBatch,
    times: Vec<i64>,
    min_t: i64,
    max_t: i64,
}

/// Where a keep-last group's current last row is.
enum Best {
    /// In the ready batch being processed (row index).
    InBatch(u32),
    /// Saved from an earlier batch.
    Stored(OwnedRow),
}

struct Group {
    key: Box<[u8]>,
    start: i64,
    /// Exclusive: rows at or after `end` start a new group.
    end: i64,
    generation: u64,
    best: Option<(i64, Best)>,
}

/// Encodes a row's key as bytes for hashing and equality.
enum KeyEncoder {
    /// One string or binary column: a tag byte and the raw bytes (no copy of the array).
    Bytes(ArrayRef),
    /// Anything else: arrow-row's order-preserving encoding.
    Rows(Rows),
}

impl KeyEncoder {
    fn encode_into(&self, row: usize, buf: &mut Vec<u8>) {
        buf.clear();
        match self {
            KeyEncoder::Bytes(a) => {
                if a.is_null(row) {
                    buf.push(0);
                    return;
                }
                buf.push(1);
                match a.data_type() {
                    DataType::Utf8 => buf.extend_from_slice(a.as_string::<i32>().value(row).as_bytes()),
                    DataType::LargeUtf8 => buf.extend_from_slice(a.as_string::<i64>().value(row).as_bytes()),
                    DataType::Utf8View => buf.extend_from_slice(a.as_string_view().value(row).as_bytes()),
                    DataType::Binary => buf.extend_from_slice(a.as_binary::<i32>().value(row)),
                    DataType::LargeBinary => buf.extend_from_slice(a.as_binary::<i64>().value(row)),
                    _ => buf.extend_from_slice(a.as_binary_view().value(row)),
                }
            }
            KeyEncoder::Rows(rows) => buf.extend_from_slice(rows.row(row).as_ref()),
        }
    }
}

/// The dedup operator of one subtask.
pub struct DedupOperator {
    keys: Vec<Arc<dyn PhysicalExpr>>,
    time_column: usize,
    keep: Keep,
    scope: DedupScope,
    out_schema: SchemaRef,
    key_converter: Option<RowConverter>,
    row_converter: Option<RowConverter>,
    watermark: i64,
    pending: Vec<Pending>,
    groups: HashTable<Group>,
    hasher: hashbrown::DefaultHashBuilder,
    /// (end, hash, generation) in order of non-decreasing end.
    expiry: VecDeque<(i64, u64, u64)>,
    next_generation: u64,
    reported_entries: i64,
    scratch: Vec<u8>,
    ctx: OperatorContext,
}

impl DedupOperator {
    /// A dedup for `spec`; `in_schema` is its input and `out_schema` its output (input plus the row number).
    pub fn new(spec: &DedupSpec, in_schema: SchemaRef, out_schema: SchemaRef, ctx: OperatorContext) -> Result<Self> {
        let key_types = spec.keys.iter().map(|k| k.data_type(&in_schema)).collect::<Result<Vec<_>, _>>()?;
        let single_bytes = key_types.len() == 1
            && matches!(
                key_types[0],
                DataType::Utf8
                    | DataType::LargeUtf8
                    | DataType::Utf8View
                    | DataType::Binary
                    | DataType::LargeBinary
                    | DataType::BinaryView
            );
        let key_converter = if single_bytes {
            None
        } else {
            Some(RowConverter::new(key_types.into_iter().map(SortField::new).collect())?)
        };
        let row_converter = match spec.keep {
            Keep::Last => Some(RowConverter::new(
                in_schema.fields().iter().map(|f| SortField::new(f.data_type().clone())).collect(),
            )?),
            Keep::First => None,
        };
        Ok(DedupOperator {
            keys: spec.keys.clone(),
            time_column: spec.time_column,
            keep: spec.keep,
            scope: spec.scope,
            out_schema,
            key_converter,
            row_converter,
            watermark: i64::MIN,
            pending: Vec::new(),
            groups: HashTable::new(),
            hasher: hashbrown::DefaultHashBuilder::default(),
            expiry: VecDeque::new(),
            next_generation: 0,
            reported_entries: 0,
            scratch: Vec::with_capacity(64),
            ctx,
        })
    }

    fn encoder(&self, batch: &RecordBatch) -> Result<KeyEncoder> {
        let n = batch.num_rows();
        let cols =
            self.keys.iter().map(|k| k.evaluate(batch).and_then(|v| v.into_array(n))).collect::<Result<Vec<_>, _>>()?;
        Ok(match &self.key_converter {
            None => KeyEncoder::Bytes(
                cols.into_iter().next().ok_or_else(|| EngineError::Internal("dedup without key".into()))?,
            ),
            Some(conv) => KeyEncoder::Rows(conv.convert_columns(&cols)?),
        })
    }

    /// The group a row starting a new group at `t` gets: its start and exclusive end.
    fn group_bounds(&self, t: i64) -> (i64, i64) {
        match self.scope {
            DedupScope::Ttl { ttl_us } => (t, t.saturating_add(ttl_us).saturating_add(1)),
            DedupScope::Window { size_us } => {
                let start = t - t.rem_euclid(size_us);
                (start, start.saturating_add(size_us))
            }
        }
    }

    /// Appends the constant row-number column.
    fn with_row_number(&self, batch: RecordBatch) -> Result<RecordBatch> {
        let n = batch.num_rows();
        let rn_type = self.out_schema.field(self.out_schema.fields().len() - 1).data_type().clone();
        let one = ScalarValue::UInt64(Some(1)).cast_to(&rn_type)?.to_array_of_size(n)?;
        let mut cols = batch.columns().to_vec();
        cols.push(one);
        Ok(RecordBatch::try_new(self.out_schema.clone(), cols)?)
    }

    fn handle_late(&mut self, batch: &RecordBatch, times: &[i64], late_rows: &[u32]) -> Result<()> {
        let encoder = self.encoder(batch)?;
        let mut truly_late = Vec::new();
        let mut stored_rows: Option<Rows> = None;
        for &r in late_rows {
            let t = times[r as usize];
            encoder.encode_into(r as usize, &mut self.scratch);
            let h = self.hasher.hash_one(&self.scratch[..]);
            let key = &self.scratch;
            let group = self.groups.find_mut(h, |g| g.key.as_ref() == key.as_slice());
            match group {
                Some(g) if g.start <= t && t < g.end => match self.keep {
                    Keep::First => NodeMetrics::add(&self.ctx.metrics.duplicates, 1),
                    Keep::Last => {
                        let newer = g.best.as_ref().is_none_or(|(bt, _)| t >= *bt);
                        NodeMetrics::add(&self.ctx.metrics.duplicates, 1);
                        if newer {
                            let conv = self
                                .row_converter
                                .as_ref()
                                .ok_or_else(|| EngineError::Internal("no row converter".into()))?;
                            if stored_rows.is_none() {
                                stored_rows = Some(conv.convert_columns(batch.columns())?);
                            }
                            if let Some(rows) = &stored_rows {
                                g.best = Some((t, Best::Stored(rows.row(r as usize).owned())));
                            }
                        }
                    }
                },
                _ => truly_late.push(r),
            }
        }
        if !truly_late.is_empty() {
            let rows = take_record_batch(batch, &UInt32Array::from(truly_late))?;
            self.ctx.late(&rows, self.watermark)?;
        }
        Ok(())
    }

    /// Processes the pending rows at or before `watermark` in event-time order, then closes groups that end.
    fn advance(&mut self, watermark: i64, out: &mut Vec<RecordBatch>) -> Result<()> {
        let mut ready: Vec<(RecordBatch, Vec<i64>)> = Vec::new();
        let mut keep: Vec<Pending> = Vec::with_capacity(self.pending.len());
        for p in std::mem::take(&mut self.pending) {
            if p.max_t <= watermark {
                ready.push((p.batch, p.times));
            } else if p.min_t > watermark {
                keep.push(p);
            } else {
                let mask: BooleanArray = p.times.iter().map(|t| Some(*t <= watermark)).collect();
                let now = filter_record_batch(&p.batch, &mask)?;
                let later = filter_record_batch(&p.batch, &arrow::compute::not(&mask)?)?;
                let (now_t, later_t): (Vec<i64>, Vec<i64>) = p.times.iter().partition(|t| **t <= watermark);
                ready.push((now, now_t));
                let (min_t, max_t) = min_max(&later_t);
                keep.push(Pending { batch: later, times: later_t, min_t, max_t });
            }
        }
        self.pending = keep;

        let mut emitted_stored: Vec<OwnedRow> = Vec::new();
        if !ready.is_empty() {
            let (batch, times) = if ready.len() == 1 {
                ready.pop().ok_or_else(|| EngineError::Internal("ready vanished".into()))?
            } else {
                let schema = ready[0].0.schema();
                let batches: Vec<&RecordBatch> = ready.iter().map(|(b, _)| b).collect();
                let batch = concat_batches(&schema, batches)?;
                let times = ready.iter().flat_map(|(_, t)| t.iter().copied()).collect::<Vec<_>>();
                (batch, times)
            };
            let mut order: Vec<u32> = (0..times.len() as u32).collect();
            if !times.windows(2).all(|w| w[0] <= w[1]) {
                order.sort_unstable_by_key(|&i| (times[i as usize], i));
            }
            let encoder = self.encoder(&batch)?;
            let mut emit_idx: Vec<u32> = Vec::new();
            let mut in_batch_best = false;
            for &i in &order {
                let t = times[i as usize];
                encoder.encode_into(i as usize, &mut self.scratch);
                let h = self.hasher.hash_one(&self.scratch[..]);
                let (start, end) = self.group_bounds(t);
                let generation = self.next_generation;
                let scratch = &self.scratch;
                let hasher = &self.hasher;
                let mut new_group = false;
                match self.groups.entry(h, |g| g.key.as_ref() == scratch.as_slice(), |g| hasher.hash_one(&g.key[..])) {
                    Entry::Occupied(mut e) => {
                        let g = e.get_mut();
                        if t < g.end {
                            NodeMetrics::add(&self.ctx.metrics.duplicates, 1);
                            if self.keep == Keep::Last {
                                g.best = Some((t, Best::InBatch(i)));
                                in_batch_best = true;
                            }
                        } else {
                            if let Some((_, best)) = g.best.take() {
                                match best {
                                    Best::InBatch(b) => emit_idx.push(b),
                                    Best::Stored(row) => emitted_stored.push(row),
                                }
                            }
                            g.start = start;
                            g.end = end;
                            g.generation = generation;
                            new_group = true;
                            if self.keep == Keep::Last {
                                g.best = Some((t, Best::InBatch(i)));
                                in_batch_best = true;
                            }
                        }
                    }
                    Entry::Vacant(v) => {
                        let best = (self.keep == Keep::Last).then_some((t, Best::InBatch(i)));
                        in_batch_best |= best.is_some();
                        v.insert(Group { key: scratch.as_slice().into(), start, end, generation, best });
                        new_group = true;
                    }
                }
                if new_group {
                    self.next_generation += 1;
                    self.expiry.push_back((end, h, generation));
                    if self.keep == Keep::First {
                        emit_idx.push(i);
                    }
                }
            }
            // Keep-last: rows still best move out of the batch before it is dropped.
            if in_batch_best {
                let conv =
                    self.row_converter.as_ref().ok_or_else(|| EngineError::Internal("no row converter".into()))?;
                let rows = conv.convert_columns(batch.columns())?;
                for g in self.groups.iter_mut() {
                    if let Some((t, Best::InBatch(i))) = &g.best {
                        g.best = Some((*t, Best::Stored(rows.row(*i as usize).owned())));
                    }
                }
            }
            if !emit_idx.is_empty() {
                out.push(self.with_row_number(take_record_batch(&batch, &UInt32Array::from(emit_idx))?)?);
            }
        }

        // Close groups whose end the watermark has passed.
        while let Some(&(end, h, generation)) = self.expiry.front() {
            if end.saturating_sub(1) > watermark {
                break;
            }
            self.expiry.pop_front();
            if let Ok(e) = self.groups.find_entry(h, |g| g.generation == generation) {
                let (g, _) = e.remove();
                if let Some((_, Best::Stored(row))) = g.best {
                    emitted_stored.push(row);
                }
            }
        }
        if !emitted_stored.is_empty() {
            let conv = self.row_converter.as_ref().ok_or_else(|| EngineError::Internal("no row converter".into()))?;
            let cols = conv.convert_rows(emitted_stored.iter().map(|r| r.row()))?;
            let schema = Arc::new(arrow::datatypes::Schema::new(
                self.out_schema.fields()[..self.out_schema.fields().len() - 1].to_vec(),
            ));
            out.push(self.with_row_number(RecordBatch::try_new(schema, cols)?)?);
        }
        let entries = self.groups.len() as i64;
        self.ctx.metrics.state_entries.fetch_add(entries - self.reported_entries, std::sync::atomic::Ordering::Relaxed);
        self.reported_entries = entries;
        Ok(())
    }
}

fn min_max(times: &[i64]) -> (i64, i64) {
    times.iter().fold((i64::MAX, i64::MIN), |(lo, hi), t| (lo.min(*t), hi.max(*t)))
}

impl Operator for DedupOperator {
    fn process(&mut self, batch: RecordBatch, _out: &mut Vec<RecordBatch>) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let (mut times, nulls) = event_times(batch.column(self.time_column))?;
        if let Some(nulls) = nulls {
            // Rows without an event time cannot be ordered: they count as late.
            for (i, t) in times.iter_mut().enumerate() {
                if nulls.is_null(i) {
                    *t = i64::MIN;
                }
            }
        }
        let (min_t, max_t) = min_max(&times);
        if min_t > self.watermark {
            self.pending.push(Pending { batch, times, min_t, max_t });
            return Ok(());
        }
        let late_rows: Vec<u32> =
            times.iter().enumerate().filter(|(_, t)| **t <= self.watermark).map(|(i, _)| i as u32).collect();
        self.handle_late(&batch, &times, &late_rows)?;
        if late_rows.len() < times.len() {
            let mask: BooleanArray = times.iter().map(|t| Some(*t > self.watermark)).collect();
            let on_time = filter_record_batch(&batch, &mask)?;
            let on_time_t: Vec<i64> = times.into_iter().filter(|t| *t > self.watermark).collect();
            let (min_t, max_t) = min_max(&on_time_t);
            self.pending.push(Pending { batch: on_time, times: on_time_t, min_t, max_t });
        }
        Ok(())
    }

    fn on_watermark(&mut self, watermark: i64, out: &mut Vec<RecordBatch>) -> Result<()> {
        if watermark <= self.watermark {
            return Ok(());
        }
        self.advance(watermark, out)?;
        self.watermark = watermark;
        Ok(())
    }

    fn state_entries(&self) -> usize {
        self.groups.len()
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{StringArray, TimestampMicrosecondArray, UInt64Array};
    use arrow::datatypes::{Field, Schema, TimeUnit};
    use datafusion::physical_expr::expressions::Column;

    use super::*;
    use crate::metrics::NodeMetrics;

    fn schemas() -> (SchemaRef, SchemaRef) {
        let fields = vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("t", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
            Field::new("v", DataType::Utf8, true),
        ];
        let input = Arc::new(Schema::new(fields.clone()));
        let mut out = fields;
        out.push(Field::new("rn", DataType::UInt64, false));
        (input, Arc::new(Schema::new(out)))
    }

    fn batch(schema: &SchemaRef, rows: &[(&str, i64, &str)]) -> RecordBatch {
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())),
                Arc::new(
                    TimestampMicrosecondArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>()).with_timezone("UTC"),
                ),
                Arc::new(StringArray::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())),
            ],
        )
        .unwrap()
    }

    fn op(keep: Keep, scope: DedupScope) -> (DedupOperator, SchemaRef, Arc<NodeMetrics>) {
        let (input, output) = schemas();
        let spec = DedupSpec {
            keys: vec![Arc::new(Column::new("id", 0))],
            key_names: vec!["id".into()],
            time_column: 1,
            keep,
            scope,
        };
        let metrics = Arc::new(NodeMetrics::new(0, "dedup".into(), "dedup", 1));
        let ctx = OperatorContext {
            label: "dedup".into(),
            metrics: metrics.clone(),
            late_rows: nagare_sql::LateRowPolicy::Drop,
            dead_letter: None,
        };
        (DedupOperator::new(&spec, input.clone(), output, ctx).unwrap(), input, metrics)
    }

    fn rows(out: &[RecordBatch]) -> Vec<(String, i64, String)> {
        let mut v = Vec::new();
        for b in out {
            let id = b.column(0).as_string::<i32>();
            let t = b.column(1).as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
            let val = b.column(2).as_string::<i32>();
            let rn = b.column(3).as_any().downcast_ref::<UInt64Array>().unwrap();
            for i in 0..b.num_rows() {
                assert_eq!(rn.value(i), 1);
                v.push((id.value(i).to_string(), t.value(i), val.value(i).to_string()));
            }
        }
        v
    }

    #[test]
    fn keep_first_waits_for_the_watermark_and_picks_the_earliest() {
        let (mut d, s, m) = op(Keep::First, DedupScope::Ttl { ttl_us: 1_000 });
        let mut out = Vec::new();
        d.process(batch(&s, &[("a", 20, "late-arriving"), ("b", 15, "b1")]), &mut out).unwrap();
        d.process(batch(&s, &[("a", 10, "earliest"), ("a", 30, "dup")]), &mut out).unwrap();
        d.on_watermark(25, &mut out).unwrap();
        assert_eq!(rows(&out), vec![("a".into(), 10, "earliest".into()), ("b".into(), 15, "b1".into())]);
        out.clear();
        d.on_watermark(100, &mut out).unwrap();
        assert!(out.is_empty(), "a@30 is within the TTL of a@10");
        assert_eq!(NodeMetrics::get(&m.duplicates), 2);
    }

    #[test]
    fn ttl_expiry_starts_a_new_group() {
        let (mut d, s, _) = op(Keep::First, DedupScope::Ttl { ttl_us: 100 });
        let mut out = Vec::new();
        d.process(batch(&s, &[("a", 0, "x"), ("a", 100, "within"), ("a", 101, "after")]), &mut out).unwrap();
        d.on_watermark(1_000, &mut out).unwrap();
        assert_eq!(rows(&out), vec![("a".into(), 0, "x".into()), ("a".into(), 101, "after".into())]);
        assert_eq!(d.state_entries(), 0, "expired groups are removed");
    }

    #[test]
    fn late_redelivery_is_a_duplicate_and_late_new_key_is_late() {
        let (mut d, s, m) = op(Keep::First, DedupScope::Ttl { ttl_us: 1_000 });
        let mut out = Vec::new();
        d.process(batch(&s, &[("a", 10, "x")]), &mut out).unwrap();
        d.on_watermark(50, &mut out).unwrap();
        d.process(batch(&s, &[("a", 10, "x"), ("z", 5, "too late")]), &mut out).unwrap();
        assert_eq!(rows(&out).len(), 1);
        assert_eq!(NodeMetrics::get(&m.duplicates), 1);
        assert_eq!(NodeMetrics::get(&m.late_rows), 1);
    }

    #[test]
    fn keep_last_emits_the_latest_when_the_window_closes() {
        let (mut d, s, _) = op(Keep::Last, DedupScope::Window { size_us: 100 });
        let mut out = Vec::new();
        d.process(batch(&s, &[("a", 10, "v1"), ("a", 50, "v3"), ("b", 60, "b")]), &mut out).unwrap();
        d.on_watermark(40, &mut out).unwrap();
        d.process(batch(&s, &[("a", 45, "v2"), ("a", 150, "next window")]), &mut out).unwrap();
        d.on_watermark(98, &mut out).unwrap();
        assert!(out.is_empty(), "window [0, 100) closes at watermark 99");
        d.on_watermark(99, &mut out).unwrap();
        let mut got = rows(&out);
        got.sort();
        assert_eq!(got, vec![("a".into(), 50, "v3".into()), ("b".into(), 60, "b".into())]);
        out.clear();
        d.on_watermark(i64::MAX, &mut out).unwrap();
        assert_eq!(rows(&out), vec![("a".into(), 150, "next window".into())]);
    }
}
