//! Session windows: per key, rows less than `gap` apart in event time share a window `[first, last + gap)`.
//!
//! Rows wait until the watermark passes them, then each key's rows are folded in event-time order into its open
//! session (or start a new one). A session closes when the watermark reaches `last + gap - 1`. A row that arrives
//! behind the watermark still joins its key's open session if it falls within the gap; otherwise it is late.
//!
//! State is checkpointed incrementally, like windows': each session keeps its aggregates as of the last snapshot
//! (`base`) and those of the rows it got since (`fresh`). A delta holds the sessions opened or extended since the last
//! snapshot, with their whole extent and `fresh`'s partial aggregate state; a base holds every session whole. Each
//! row also carries `opened`, the event time of the row that opened the session, which never changes and tells
//! sessions of one key apart: a restore merges the rows of each (key, opened) into one session (extents grow, so
//! the union is the latest; partial states merge in any order), then drops the sessions that had closed at the
//! watermark of the subtask that wrote them. Merging by the gap rule instead would be wrong: a late row may extend
//! an open session back to within the gap of a closed one of the same key, and the two would be joined.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, StructArray, UInt32Array};
use arrow::compute::{filter_record_batch, take, take_record_batch};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow_row::{OwnedRow, RowConverter, SortField};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::Accumulator;
use datafusion::physical_expr::PhysicalExpr;
use nagare_sql::window::WindowKind;
use nagare_sql::{AggregateSpec, WindowAggregateSpec};

use super::window::aggregate_inputs;
use super::{OperatorContext, event_times, key_groups_of, meta_value};
use crate::error::{EngineError, Result};
use crate::operator::{Operator, PartKind, StatePart, take_part};
use crate::state::{Chain, Origins, StateRows, chained_meta, rows_in};

type Accumulators = Vec<Box<dyn Accumulator>>;
/// A session in a chain of snapshots: its key (as an arrow row) and when it opened.
type SessionId = (Box<[u8]>, i64);

struct Session {
    key: OwnedRow,
    /// Event time of the row that opened the session: it tells a key's sessions apart in a chain of snapshots.
    opened: i64,
    start: i64,
    last: i64,
    /// Aggregates as of the last snapshot (none for a session opened since).
    base: Option<Accumulators>,
    /// Aggregates of the rows since the last snapshot (none if it got none).
    fresh: Option<Accumulators>,
}

fn new_accumulators(aggregates: &[AggregateSpec]) -> Result<Accumulators> {
    Ok(aggregates.iter().map(|a| a.expr.create_accumulator()).collect::<Result<Vec<_>, _>>()?)
}

/// Each accumulator's state (which `state()` may consume, so `accs` must not be used after).
fn states(accs: &mut Accumulators) -> Result<Vec<Vec<ScalarValue>>> {
    Ok(accs.iter_mut().map(|a| a.state()).collect::<Result<Vec<_>, _>>()?)
}

/// Merges states (one per accumulator) into `accs`.
fn merge_states(accs: &mut Accumulators, states: &[Vec<ScalarValue>]) -> Result<()> {
    for (acc, st) in accs.iter_mut().zip(states) {
        let arrays = st.iter().map(|v| v.to_array()).collect::<Result<Vec<_>, _>>()?;
        acc.merge_batch(&arrays)?;
    }
    Ok(())
}

impl Session {
    /// Folds `fresh` into `base`, returning all the session's aggregates.
    fn fold(&mut self, aggregates: &[AggregateSpec]) -> Result<&mut Accumulators> {
        if let Some(mut fresh) = self.fresh.take() {
            match self.base.as_mut() {
                None => self.base = Some(fresh),
                Some(base) => merge_states(base, &states(&mut fresh)?)?,
            }
        }
        if self.base.is_none() {
            self.base = Some(new_accumulators(aggregates)?);
        }
        self.base.as_mut().ok_or_else(|| EngineError::Internal("session without aggregates".into()))
    }
}

/// A SESSION aggregate of one subtask.
pub struct SessionOperator {
    gap_us: i64,
    time_column: usize,
    time_type: DataType,
    window_position: usize,
    keys: Vec<Arc<dyn PhysicalExpr>>,
    converter: RowConverter,
    key_types: Vec<DataType>,
    input_schema: SchemaRef,
    aggregates: Vec<AggregateSpec>,
    out_schema: SchemaRef,
    pending: Vec<(RecordBatch, Vec<i64>)>,
    sessions: HashMap<Box<[u8]>, Session>,
    watermark: i64,
    reported_entries: i64,
    chain: Chain,
    /// After a restore, the watermarks of the subtasks the state came from: a row behind the watermark of the
    /// subtask that held its key joins an open session or is late, as it was there (see the window operator).
    floors: Option<Origins>,
    ctx: OperatorContext,
}

/// A chain of snapshots holds at most this many rows per live one (see [`Chain::new`]): the base about one each, the
/// deltas (rows updated since, and rows that close before the next base) up to as many again.
const CHAIN_ROWS_PER_LIVE: usize = 2;

impl SessionOperator {
    /// An operator for `spec` producing `out_schema`.
    pub fn new(spec: &WindowAggregateSpec, out_schema: SchemaRef, ctx: OperatorContext) -> Result<Self> {
        let WindowKind::Session { gap_us } = spec.window else {
            return Err(EngineError::Internal("SessionOperator needs a session window".into()));
        };
        let key_types: Vec<DataType> = if spec.keys.is_empty() {
            vec![DataType::Boolean]
        } else {
            spec.keys.iter().map(|k| Ok(k.data_type(&spec.input_schema)?)).collect::<Result<_>>()?
        };
        Ok(SessionOperator {
            gap_us,
            time_column: spec.time_column,
            time_type: spec.input_schema.field(spec.time_column).data_type().clone(),
            window_position: spec.window_position,
            keys: spec.keys.clone(),
            converter: RowConverter::new(key_types.iter().cloned().map(SortField::new).collect())?,
            key_types,
            input_schema: spec.input_schema.clone(),
            aggregates: spec.aggregates.clone(),
            out_schema,
            pending: Vec::new(),
            sessions: HashMap::new(),
            watermark: i64::MIN,
            reported_entries: 0,
            chain: Chain::new(CHAIN_ROWS_PER_LIVE),
            floors: None,
            ctx,
        })
    }

    /// Columns of the `sessions` state part: keys, key group, start, last, opened, then each aggregate's state
    /// (checkpoints written before snapshots were chained have no `opened`).
    fn state_schema(&self, opened: bool) -> Result<SchemaRef> {
        let mut fields: Vec<arrow::datatypes::Field> = self
            .key_types
            .iter()
            .enumerate()
            .map(|(i, t)| arrow::datatypes::Field::new(format!("k{i}"), t.clone(), true))
            .collect();
        fields.push(arrow::datatypes::Field::new(crate::state::KEY_GROUP, DataType::UInt16, false));
        fields.push(arrow::datatypes::Field::new("start", DataType::Int64, false));
        fields.push(arrow::datatypes::Field::new("last", DataType::Int64, false));
        if opened {
            fields.push(arrow::datatypes::Field::new("opened", DataType::Int64, false));
        }
        for (a, spec) in self.aggregates.iter().enumerate() {
            for (i, f) in spec.expr.state_fields()?.iter().enumerate() {
                fields.push(arrow::datatypes::Field::new(format!("s{a}_{i}"), f.data_type().clone(), true));
            }
        }
        Ok(Arc::new(arrow::datatypes::Schema::new(fields)))
    }

    fn key_columns(&self, batch: &RecordBatch) -> Result<Vec<ArrayRef>> {
        let n = batch.num_rows();
        if self.keys.is_empty() {
            return Ok(vec![Arc::new(BooleanArray::from(vec![true; n]))]);
        }
        Ok(self.keys.iter().map(|k| k.evaluate(batch).and_then(|v| v.into_array(n))).collect::<Result<Vec<_>, _>>()?)
    }

    fn new_session(&self, key: OwnedRow, t: i64) -> Result<Session> {
        let fresh = Some(new_accumulators(&self.aggregates)?);
        Ok(Session { key, opened: t, start: t, last: t, base: None, fresh })
    }

    /// Folds rows `idx` (of one key, one session) into `session`'s rows since the last snapshot.
    fn update(
        session: &mut Session,
        aggregates: &[AggregateSpec],
        inputs: &[(Vec<ArrayRef>, Option<BooleanArray>)],
        idx: &[u32],
    ) -> Result<()> {
        let idx = UInt32Array::from(idx.to_vec());
        let fresh = match &mut session.fresh {
            Some(fresh) => fresh,
            None => session.fresh.insert(new_accumulators(aggregates)?),
        };
        for (acc, (args, filter)) in fresh.iter_mut().zip(inputs) {
            let mut cols = args.iter().map(|a| take(a, &idx, None)).collect::<Result<Vec<_>, _>>()?;
            if let Some(f) = filter {
                let f = take(f, &idx, None)?;
                let f =
                    f.as_any().downcast_ref::<BooleanArray>().ok_or_else(|| EngineError::Internal("filter".into()))?;
                let batch_cols: Vec<ArrayRef> =
                    cols.iter().map(|c| arrow::compute::filter(c, f)).collect::<Result<_, _>>()?;
                cols = batch_cols;
            }
            acc.update_batch(&cols)?;
        }
        Ok(())
    }

    fn emit(&self, closed: Vec<Session>, out: &mut Vec<RecordBatch>) -> Result<()> {
        if closed.is_empty() {
            return Ok(());
        }
        let DataType::Timestamp(unit, _) = self.time_type.clone() else {
            return Err(EngineError::Internal("session time column is not a timestamp".into()));
        };
        let keys = self.converter.convert_rows(closed.iter().map(|s| s.key.row()))?;
        let to_ts = |v: Vec<i64>| -> Result<ArrayRef> {
            let a: ArrayRef = Arc::new(arrow::array::Int64Array::from(
                v.into_iter().map(|us| nagare_core::keys::from_micros(us, unit)).collect::<Vec<_>>(),
            ));
            Ok(arrow::compute::cast(&a, &self.time_type)?)
        };
        let starts = to_ts(closed.iter().map(|s| s.start).collect())?;
        let ends = to_ts(closed.iter().map(|s| s.last.saturating_add(self.gap_us)).collect())?;
        let DataType::Struct(fields) = self.out_schema.field(self.window_position).data_type().clone() else {
            return Err(EngineError::Internal("window column is not a struct".into()));
        };
        let window_col: ArrayRef = Arc::new(StructArray::try_new(fields, vec![starts, ends], None)?);
        let mut cols: Vec<ArrayRef> = Vec::new();
        let mut key_iter = keys.into_iter();
        if self.keys.is_empty() {
            key_iter.next();
        }
        for i in 0..=self.keys.len() {
            if i == self.window_position {
                cols.push(window_col.clone());
            } else {
                cols.push(key_iter.next().ok_or_else(|| EngineError::Internal("missing key column".into()))?);
            }
        }
        let mut closed = closed;
        let mut all = Vec::with_capacity(closed.len());
        for s in &mut closed {
            all.push(s.fold(&self.aggregates)?);
        }
        for a in 0..self.aggregates.len() {
            let values = all.iter_mut().map(|accs| accs[a].evaluate()).collect::<Result<Vec<ScalarValue>, _>>()?;
            cols.push(ScalarValue::iter_to_array(values)?);
        }
        let cols = cols
            .into_iter()
            .zip(self.out_schema.fields())
            .map(|(c, f)| if c.data_type() == f.data_type() { Ok(c) } else { arrow::compute::cast(&c, f.data_type()) })
            .collect::<Result<Vec<_>, _>>()?;
        out.push(RecordBatch::try_new(self.out_schema.clone(), cols)?);
        Ok(())
    }

    fn report_state(&mut self) {
        let entries = self.sessions.len() as i64;
        self.ctx.metrics.state_entries.fetch_add(entries - self.reported_entries, std::sync::atomic::Ordering::Relaxed);
        self.reported_entries = entries;
    }
}

impl Operator for SessionOperator {
    fn process(&mut self, batch: RecordBatch, _out: &mut Vec<RecordBatch>) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let (mut times, nulls) = event_times(batch.column(self.time_column))?;
        if let Some(nb) = &nulls {
            for (i, t) in times.iter_mut().enumerate() {
                if nb.is_null(i) {
                    *t = i64::MIN;
                }
            }
        }
        // Each row's watermark: this subtask's, or (after a restore, until that passes them) its key's origin's.
        if self.floors.as_ref().and_then(Origins::max_watermark).is_none_or(|w| w <= self.watermark) {
            self.floors = None;
        }
        let late_mask: Vec<bool> = match &self.floors {
            None => times.iter().map(|t| *t <= self.watermark).collect(),
            Some(origins) => {
                let groups = key_groups_of(&self.key_columns(&batch)?, batch.num_rows(), self.ctx.max_parallelism)?;
                times
                    .iter()
                    .zip(groups)
                    .map(|(t, g)| *t <= origins.watermark_of(g).map_or(self.watermark, |w| w.max(self.watermark)))
                    .collect()
            }
        };
        if !late_mask.iter().any(|l| *l) {
            self.pending.push((batch, times));
            return Ok(());
        }
        // Rows behind the watermark: join an open session within the gap, or are late.
        let keys = self.converter.convert_columns(&self.key_columns(&batch)?)?;
        let inputs = self.aggregates.iter().map(|a| aggregate_inputs(a, &batch)).collect::<Result<Vec<_>>>()?;
        let mut late = Vec::new();
        for (i, is_late) in late_mask.iter().enumerate() {
            if !is_late {
                continue;
            }
            let t = times[i];
            match self.sessions.get_mut(keys.row(i).as_ref()) {
                Some(s) if t != i64::MIN && t > s.start - self.gap_us && t < s.last + self.gap_us => {
                    s.start = s.start.min(t);
                    s.last = s.last.max(t);
                    Self::update(s, &self.aggregates, &inputs, &[i as u32])?;
                }
                _ => late.push(i as u32),
            }
        }
        if !late.is_empty() {
            self.ctx.late(&take_record_batch(&batch, &UInt32Array::from(late))?, self.watermark)?;
        }
        let on_time: BooleanArray = late_mask.iter().map(|l| Some(!l)).collect();
        if on_time.true_count() > 0 {
            let b = filter_record_batch(&batch, &on_time)?;
            let t: Vec<i64> = times.iter().zip(&late_mask).filter(|(_, l)| !**l).map(|(t, _)| *t).collect();
            self.pending.push((b, t));
        }
        Ok(())
    }

    fn on_watermark(&mut self, watermark: i64, out: &mut Vec<RecordBatch>) -> Result<()> {
        if watermark <= self.watermark {
            return Ok(());
        }
        let mut closed = Vec::new();
        // All rows now behind the watermark, from every pending batch, so they can be ordered together.
        let mut ready_parts: Vec<RecordBatch> = Vec::new();
        let mut ready_times: Vec<i64> = Vec::new();
        for (batch, times) in std::mem::take(&mut self.pending) {
            let ready: BooleanArray = times.iter().map(|t| Some(*t <= watermark)).collect();
            if ready.true_count() < times.len() {
                let later = filter_record_batch(&batch, &arrow::compute::not(&ready)?)?;
                self.pending.push((later, times.iter().filter(|t| **t > watermark).copied().collect()));
            }
            if ready.true_count() == 0 {
                continue;
            }
            ready_parts.push(if ready.true_count() == times.len() {
                batch
            } else {
                filter_record_batch(&batch, &ready)?
            });
            ready_times.extend(times.into_iter().filter(|t| *t <= watermark));
        }
        if let Some(first) = ready_parts.first() {
            let batch = arrow::compute::concat_batches(&first.schema(), &ready_parts)?;
            let times = ready_times;
            let keys = self.converter.convert_columns(&self.key_columns(&batch)?)?;
            let inputs = self.aggregates.iter().map(|a| aggregate_inputs(a, &batch)).collect::<Result<Vec<_>>>()?;
            let mut order: Vec<u32> = (0..times.len() as u32).collect();
            order.sort_unstable_by(|a, b| {
                keys.row(*a as usize).cmp(&keys.row(*b as usize)).then(times[*a as usize].cmp(&times[*b as usize]))
            });
            let mut k = 0;
            while k < order.len() {
                let key = keys.row(order[k] as usize);
                let mut end = k;
                while end < order.len() && keys.row(order[end] as usize) == key {
                    end += 1;
                }
                let mut session = self.sessions.remove(key.as_ref());
                let mut segment: Vec<u32> = Vec::new();
                for &i in &order[k..end] {
                    let t = times[i as usize];
                    match session.as_mut() {
                        Some(s) if t < s.last + self.gap_us => {
                            s.last = s.last.max(t);
                            s.start = s.start.min(t);
                            segment.push(i);
                        }
                        _ => {
                            if let Some(mut s) = session.take() {
                                if !segment.is_empty() {
                                    Self::update(&mut s, &self.aggregates, &inputs, &segment)?;
                                    segment.clear();
                                }
                                closed.push(s);
                            }
                            session = Some(self.new_session(key.owned(), t)?);
                            segment.push(i);
                        }
                    }
                }
                if let Some(mut s) = session {
                    if !segment.is_empty() {
                        Self::update(&mut s, &self.aggregates, &inputs, &segment)?;
                    }
                    self.sessions.insert(key.as_ref().into(), s);
                }
                k = end;
            }
        }
        let gap = self.gap_us;
        let expired: Vec<Box<[u8]>> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.last.saturating_add(gap).saturating_sub(1) <= watermark)
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            if let Some(s) = self.sessions.remove(&k) {
                closed.push(s);
            }
        }
        self.watermark = watermark;
        closed.sort_by_key(|s| s.start);
        self.emit(closed, out)?;
        self.report_state();
        Ok(())
    }

    fn state_entries(&self) -> usize {
        self.sessions.len()
    }

    fn snapshot(&mut self, force_full: bool) -> Result<Vec<StatePart>> {
        let schema = self.state_schema(true)?;
        let touched = self.sessions.values().filter(|s| s.fresh.is_some()).count();
        let kind = self.chain.next_kind(force_full, touched, self.sessions.len());
        let aggregates = &self.aggregates;
        // (session, aggregate states) of each session written.
        let mut written: Vec<(&Session, Vec<Vec<ScalarValue>>)> = Vec::new();
        for s in self.sessions.values_mut() {
            let states = match kind {
                // Sessions opened or extended since the last snapshot: their extent and the rows' partial state,
                // which then joins the base.
                PartKind::Delta => {
                    let Some(mut fresh) = s.fresh.take() else { continue };
                    let states = states(&mut fresh)?;
                    match &mut s.base {
                        Some(base) => merge_states(base, &states)?,
                        None => {
                            let mut base = new_accumulators(aggregates)?;
                            merge_states(&mut base, &states)?;
                            s.base = Some(base);
                        }
                    }
                    states
                }
                // Every session whole; state() may consume, so it is merged back into new accumulators.
                PartKind::Base | PartKind::Whole => {
                    let all = s.fold(aggregates)?;
                    let states = states(all)?;
                    let mut base = new_accumulators(aggregates)?;
                    merge_states(&mut base, &states)?;
                    s.base = Some(base);
                    states
                }
            };
            written.push((s, states));
        }
        let n = written.len();
        let keys = self.converter.convert_rows(written.iter().map(|(s, _)| s.key.row()))?;
        let key_groups = key_groups_of(&keys, n, self.ctx.max_parallelism)?;
        let mut cols: Vec<ArrayRef> = keys;
        cols.push(Arc::new(arrow::array::UInt16Array::from(key_groups)));
        for f in [|s: &Session| s.start, |s: &Session| s.last, |s: &Session| s.opened] {
            cols.push(Arc::new(arrow::array::Int64Array::from(written.iter().map(|(s, _)| f(s)).collect::<Vec<_>>())));
        }
        for (a, spec) in self.aggregates.iter().enumerate() {
            for i in 0..spec.expr.state_fields()?.len() {
                let values: Vec<ScalarValue> = written.iter().map(|(_, st)| st[a][i].clone()).collect();
                let field = schema.field(cols.len());
                cols.push(if values.is_empty() {
                    arrow::array::new_empty_array(field.data_type())
                } else {
                    ScalarValue::iter_to_array(values)?
                });
            }
        }
        let cols = cols
            .into_iter()
            .zip(schema.fields())
            .map(|(c, f)| if c.data_type() == f.data_type() { Ok(c) } else { arrow::compute::cast(&c, f.data_type()) })
            .collect::<Result<Vec<_>, _>>()?;
        let sessions = RecordBatch::try_new(schema, cols)?;
        self.chain.wrote(kind, sessions.num_rows());
        let held: Vec<RecordBatch> = self.pending.iter().map(|(b, _)| b.clone()).collect();
        let pending = match held.first() {
            Some(first) => arrow::compute::concat_batches(&first.schema(), &held)?,
            None => RecordBatch::new_empty(self.input_schema.clone()),
        };
        Ok(vec![
            StatePart::chained("sessions", sessions, kind),
            StatePart::new("pending", pending),
            chained_meta(self.watermark, self.ctx.key_groups, &[])?,
        ])
    }

    fn restore(&mut self, mut parts: Vec<StatePart>) -> Result<()> {
        let mut origins = Origins::default();
        if let Some(meta) = take_part(&mut parts, "meta") {
            self.watermark = meta_value(&meta, "watermark")?.unwrap_or(i64::MIN);
            origins = Origins::from_meta(&meta)?;
        }
        if let Some(state) = take_part(&mut parts, "sessions") {
            // By name and type, this subtask's key groups only; then in the operator's own column order.
            let state = StateRows::mine(state, self.ctx.key_groups, "session state")?;
            let has_opened = state.has("opened");
            let state = state.columns(&self.state_schema(has_opened)?)?;
            let n_keys = self.key_types.len();
            let keys = self.converter.convert_columns(&state.columns()[..n_keys])?;
            let int = |i: usize| state.column(i).as_primitive::<arrow::datatypes::Int64Type>().clone();
            let key_groups = state.column(n_keys).as_primitive::<arrow::datatypes::UInt16Type>().clone();
            let (starts, lasts) = (int(n_keys + 1), int(n_keys + 2));
            // Whole sessions written before chains: one per key, so its start tells it apart.
            let opened = if has_opened { int(n_keys + 3) } else { starts.clone() };
            let first_state = n_keys + 3 + usize::from(has_opened);
            // The parts of each session (base and deltas), merged: extents by union, states in any order.
            let mut merged: HashMap<SessionId, (u16, Session)> = HashMap::new();
            for i in 0..state.num_rows() {
                let id = (keys.row(i).as_ref().into(), opened.value(i));
                let (_, session) = match merged.entry(id) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let session = Session {
                            key: keys.row(i).owned(),
                            opened: opened.value(i),
                            start: starts.value(i),
                            last: lasts.value(i),
                            base: Some(new_accumulators(&self.aggregates)?),
                            fresh: None,
                        };
                        e.insert((key_groups.value(i), session))
                    }
                };
                session.start = session.start.min(starts.value(i));
                session.last = session.last.max(lasts.value(i));
                let base = session.base.as_mut().ok_or_else(|| EngineError::Internal("restored session".into()))?;
                let mut col = first_state;
                for (acc, spec) in base.iter_mut().zip(&self.aggregates) {
                    let width = spec.expr.state_fields()?.len();
                    let arrays: Vec<ArrayRef> =
                        state.columns()[col..col + width].iter().map(|c| c.slice(i, 1)).collect();
                    acc.merge_batch(&arrays)?;
                    col += width;
                }
            }
            // A chain's base and deltas may hold sessions that closed (and were emitted) after they were written.
            let gap = self.gap_us;
            for ((key, _), (group, session)) in merged {
                if origins.closed(group, session.last.saturating_add(gap).saturating_sub(1)) {
                    continue;
                }
                if self.sessions.insert(key, session).is_some() {
                    return Err(EngineError::Internal(
                        "the checkpoint holds two open sessions of one key (a bug in how it was written)".into(),
                    ));
                }
            }
        }
        if origins.max_watermark().is_some_and(|w| w > self.watermark) {
            self.floors = Some(origins);
        }
        if let Some(pending) = take_part(&mut parts, "pending")
            && pending.num_rows() > 0
        {
            let keys = self.key_columns(&pending)?;
            let batch = rows_in(&pending, &keys, self.ctx.key_groups, self.ctx.max_parallelism)?;
            let mut unused = Vec::new();
            self.process(batch, &mut unused)?;
        }
        if let Some(p) = parts.first() {
            return Err(EngineError::Internal(format!("unknown session state part '{}'", p.name)));
        }
        self.reported_entries = 0;
        self.report_state();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{AsArray, Int64Array, TimestampMicrosecondArray};
    use arrow::datatypes::{Field, Schema};
    use datafusion::common::DFSchema;
    use datafusion::functions_aggregate::expr_fn::sum;
    use datafusion::logical_expr::col;
    use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
    use datafusion::physical_expr::aggregate::LoweredAggregateBuilder;
    use datafusion::physical_expr::execution_props::ExecutionProps;
    use datafusion::physical_expr::expressions::Column;

    use super::*;
    use crate::metrics::NodeMetrics;
    use crate::state::testing::{self, ALL, Rng, Shape, Step, Stored};

    fn setup() -> (SessionOperator, SchemaRef, Arc<NodeMetrics>) {
        setup_in(ALL)
    }

    fn setup_in(key_groups: nagare_core::KeyGroupRange) -> (SessionOperator, SchemaRef, Arc<NodeMetrics>) {
        let ts = DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None);
        let input = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("t", ts.clone(), true),
            Field::new("v", DataType::Int64, true),
        ]));
        let df = DFSchema::try_from(input.as_ref().clone()).unwrap();
        let l = LoweredAggregateBuilder::new(
            &sum(col("v")),
            &df,
            &input,
            &ExecutionProps::new(),
            &PhysicalPlanningContext::default(),
        )
        .build()
        .unwrap();
        let spec = WindowAggregateSpec {
            window: WindowKind::Session { gap_us: 10 },
            time_column: 1,
            window_position: 1,
            keys: vec![Arc::new(Column::new("k", 0))],
            aggregates: vec![AggregateSpec { expr: l.aggregate, filter: None }],
            input_schema: input.clone(),
        };
        let out = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("w", nagare_sql::window::window_struct_type(&ts), true),
            Field::new("s", DataType::Int64, true),
        ]));
        let metrics = Arc::new(NodeMetrics::new(0, "s".into(), "window", 1));
        let ctx = OperatorContext {
            label: "s".into(),
            metrics: metrics.clone(),
            late_rows: nagare_sql::LateRowPolicy::Drop,
            dead_letter: None,
            max_parallelism: 128,
            key_groups,
        };
        (SessionOperator::new(&spec, out, ctx).unwrap(), input, metrics)
    }

    fn batch(schema: &SchemaRef, rows: &[(i64, i64, i64)]) -> RecordBatch {
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())),
                Arc::new(TimestampMicrosecondArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
                Arc::new(Int64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())),
            ],
        )
        .unwrap()
    }

    fn rows(out: &[RecordBatch]) -> Vec<(i64, i64, i64, i64)> {
        let mut v = Vec::new();
        for b in out {
            let w = b.column(1).as_struct();
            let (s, e) = (
                w.column(0).as_primitive::<arrow::datatypes::TimestampMicrosecondType>(),
                w.column(1).as_primitive::<arrow::datatypes::TimestampMicrosecondType>(),
            );
            for i in 0..b.num_rows() {
                v.push((
                    b.column(0).as_primitive::<arrow::datatypes::Int64Type>().value(i),
                    s.value(i),
                    e.value(i),
                    b.column(2).as_primitive::<arrow::datatypes::Int64Type>().value(i),
                ));
            }
        }
        v.sort();
        v
    }

    #[test]
    fn rows_in_any_arrival_order_form_the_same_sessions() {
        let (mut op, s, _) = setup();
        let mut out = Vec::new();
        // Key 1: 0, 5, 14 (one session, gaps < 10) and 30 (a new one). Arrival order is scrambled across batches.
        op.process(batch(&s, &[(1, 14, 3), (2, 3, 100)]), &mut out).unwrap();
        op.process(batch(&s, &[(1, 0, 1), (1, 30, 7)]), &mut out).unwrap();
        op.process(batch(&s, &[(1, 5, 2)]), &mut out).unwrap();
        op.on_watermark(20, &mut out).unwrap();
        assert_eq!(rows(&out), vec![(2, 3, 13, 100)], "key 1's session may still grow until 14 + 10 - 1");
        out.clear();
        op.on_watermark(i64::MAX, &mut out).unwrap();
        assert_eq!(rows(&out), vec![(1, 0, 24, 6), (1, 30, 40, 7)]);
    }

    #[test]
    fn a_late_row_joins_an_open_session_or_is_late() {
        let (mut op, s, m) = setup();
        let mut out = Vec::new();
        op.process(batch(&s, &[(1, 100, 1)]), &mut out).unwrap();
        op.on_watermark(105, &mut out).unwrap();
        op.process(batch(&s, &[(1, 95, 2), (1, 50, 4)]), &mut out).unwrap();
        assert_eq!(NodeMetrics::get(&m.late_rows), 1, "50 is far from the open session");
        op.on_watermark(i64::MAX, &mut out).unwrap();
        assert_eq!(rows(&out), vec![(1, 95, 110, 3)]);
    }

    #[test]
    fn sessions_survive_a_snapshot_and_restore() {
        let input = [vec![(1, 0, 1), (2, 3, 100)], vec![(1, 5, 2), (1, 30, 7)], vec![(1, 14, 3), (2, 50, 9)]];
        let run = |cut: Option<usize>| {
            let (mut op, s, _) = setup();
            let mut out = Vec::new();
            for (i, rows) in input.iter().enumerate() {
                if Some(i) == cut {
                    let parts = op.snapshot(false).unwrap();
                    let (mut fresh, _, _) = setup();
                    fresh.restore(parts).unwrap();
                    op = fresh;
                }
                op.process(batch(&s, rows), &mut out).unwrap();
                op.on_watermark(rows.iter().map(|r| r.1).max().unwrap() - 20, &mut out).unwrap();
            }
            op.on_watermark(i64::MAX, &mut out).unwrap();
            rows(&out)
        };
        let whole = run(None);
        for cut in 1..3 {
            assert_eq!(run(Some(cut)), whole, "restored before batch {cut}");
        }
    }

    fn make(range: nagare_core::KeyGroupRange) -> Box<dyn Operator> {
        Box::new(setup_in(range).0)
    }

    fn input(rows: &[(i64, i64, i64)]) -> RecordBatch {
        batch(&setup().1, rows)
    }

    /// Steps of 5 µs: rows of 8 keys up to 15 behind and 10 ahead of the step, watermark 12 behind; with a gap of 10,
    /// sessions run over several steps and snapshots, and late rows join open sessions (at either end) or are late.
    fn random_steps(rng: &mut Rng, from: i64, steps: usize) -> Vec<Step> {
        Shape { every: 5, max_rows: 7, keys: 8, behind: 15, span: 26, lag: 12 }.steps(rng, from, steps)
    }

    #[test]
    fn base_and_deltas_restore_like_an_uninterrupted_run() {
        let mut deltas = 0;
        for seed in 0..40 {
            let steps = random_steps(&mut Rng::new(seed), 0, 60);
            let plain = rows(&testing::run_plain(&make, &input, &steps));
            assert!(plain.len() > 10);
            let (got, restored_deltas) = testing::run_with_restores(&make, &input, &steps, seed);
            assert_eq!(rows(&got), plain, "seed {seed}");
            deltas += restored_deltas;
        }
        assert!(deltas > 40, "restores read chains with deltas ({deltas})");
    }

    #[test]
    fn a_session_closed_after_its_base_is_not_emitted_again_nor_joined_to_the_next() {
        let (mut op, s, _) = setup();
        let mut stored = Stored::default();
        let mut out = Vec::new();
        op.process(batch(&s, &[(1, 0, 1), (1, 8, 2), (2, 5, 100)]), &mut out).unwrap();
        op.on_watermark(9, &mut out).unwrap();
        assert_eq!(stored.store(op.snapshot(false).unwrap()), PartKind::Base);
        op.on_watermark(17, &mut out).unwrap();
        assert_eq!(rows(&out), vec![(1, 0, 18, 3), (2, 5, 15, 100)], "closed at 8 + 10 - 1 and 5 + 10 - 1");
        out.clear();
        op.process(batch(&s, &[(1, 20, 4)]), &mut out).unwrap();
        op.on_watermark(25, &mut out).unwrap();
        // Behind the watermark, 12 joins the open session (12 > 20 - 10), which now starts within the gap of the
        // closed one: the sessions of key 1 must not be merged by the gap rule on restore.
        op.process(batch(&s, &[(1, 12, 8)]), &mut out).unwrap();
        let delta = op.snapshot(false).unwrap();
        assert_eq!(delta[0].batch.num_rows(), 1, "only the extended session");
        assert_eq!(stored.store(delta), PartKind::Delta);
        let (mut restored, _, _) = setup();
        restored.restore(Stored::parts(&[&stored])).unwrap();
        assert_eq!(restored.state_entries(), 1);
        restored.on_watermark(i64::MAX, &mut out).unwrap();
        assert_eq!(rows(&out), vec![(1, 12, 30, 12)]);
        assert_eq!(restored.snapshot(false).unwrap()[0].kind, PartKind::Base, "a restore starts a new chain");
    }

    #[test]
    fn chains_of_two_subtasks_rescale_to_other_ranges_with_every_session_once() {
        let ranges = |cuts: &[u32]| -> Vec<nagare_core::KeyGroupRange> {
            cuts.windows(2).map(|c| nagare_core::KeyGroupRange { start: c[0], end: c[1] }).collect()
        };
        for seed in 0..15 {
            let mut rng = Rng::new(seed);
            // The second subtask's watermark lags 30 µs behind the first's.
            let before: Vec<_> = random_steps(&mut rng, 0, 50).into_iter().map(|(rows, w)| (rows, w, w - 30)).collect();
            let cut = before.last().unwrap().1;
            // After the restore, rows behind the first old subtask's watermark but not the second's (see the window
            // test): they join an open session or are late, as they were at the first.
            let after: Vec<Step> = random_steps(&mut rng, cut - 20, 30);
            for cuts in [&[0, 128][..], &[0, 40, 128], &[0, 100, 128]] {
                let (got, want) = testing::run_rescaled(&make, &input, &before, &after, &ranges(cuts), seed);
                assert_eq!(rows(&got), rows(&want), "seed {seed} into {cuts:?}");
            }
        }
    }

    #[test]
    fn checkpoints_of_whole_session_state_still_restore() {
        let steps = random_steps(&mut Rng::new(3), 0, 60);
        let plain = rows(&testing::run_plain(&make, &input, &steps));
        let (mut op, s, _) = setup();
        let mut out = Vec::new();
        for (rows, wm) in &steps[..30] {
            op.process(batch(&s, rows), &mut out).unwrap();
            op.on_watermark(*wm, &mut out).unwrap();
        }
        // The layout before chains: every session in a whole part without `opened`, meta with the watermark only.
        let parts: Vec<StatePart> = op
            .snapshot(true)
            .unwrap()
            .into_iter()
            .map(|p| match p.name.as_str() {
                "meta" => crate::operators::meta_part(&[("watermark", op.watermark)]).unwrap(),
                "sessions" => {
                    let mut b = p.batch;
                    b.remove_column(b.schema().index_of("opened").unwrap());
                    StatePart::new("sessions", b)
                }
                _ => p,
            })
            .collect();
        assert!(parts.iter().any(|p| p.name == "sessions" && p.batch.num_rows() > 0));
        assert!(parts.iter().any(|p| p.name == "pending" && p.batch.num_rows() > 0));
        let (mut restored, _, _) = setup();
        restored.restore(parts).unwrap();
        for (rows, wm) in &steps[30..] {
            restored.process(batch(&s, rows), &mut out).unwrap();
            restored.on_watermark(*wm, &mut out).unwrap();
        }
        restored.on_watermark(i64::MAX, &mut out).unwrap();
        assert_eq!(rows(&out), plain);
    }
}
