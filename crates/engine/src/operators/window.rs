//! Tumbling and hopping window aggregates, vectorised with DataFusion's group-by machinery.
//!
//! Each open window keeps DataFusion's [`GroupValues`] (key → group index) and one [`GroupsAccumulator`] per
//! aggregate, so rows are folded in batch at a time. A window `[start, end)` closes when the watermark reaches
//! `end - 1`; then all its groups are evaluated at once. A row whose windows have all closed is late.
//!
//! State is checkpointed incrementally. Each window keeps two sets of groups: `base`, its aggregates as of the last
//! snapshot, and `fresh`, the aggregates of the rows since (which is all `process` touches). A delta holds `fresh`'s
//! partial aggregate states for the windows touched since the last snapshot, which are then merged into `base`; a
//! base holds every open window whole. Restoring merges the base and every delta (partial states merge in any
//! order). Windows that closed after a base was written are still in it: a restore drops the rows whose window had
//! closed at the watermark of the subtask that wrote them (its `meta` row gives its key-group range and watermark).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, StructArray, UInt32Array};
use arrow::compute::take;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::GroupsAccumulatorAdapter;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::aggregates::group_values::{GroupValues, new_group_values};
use datafusion::physical_plan::aggregates::order::GroupOrdering;
use nagare_sql::window::WindowKind;
use nagare_sql::{AggregateSpec, WindowAggregateSpec};

use super::{OperatorContext, event_times, key_groups_of, meta_value};
use crate::error::{EngineError, Result};
use crate::operator::{Operator, PartKind, StatePart, take_part};
use crate::state::{Chain, Origins, StateRows, chained_meta};

/// Keys (group values) and their aggregate states.
struct Groups {
    groups: Box<dyn GroupValues>,
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
}

impl Groups {
    fn new(key_schema: &SchemaRef, aggregates: &[AggregateSpec]) -> Result<Groups> {
        let groups = new_group_values(key_schema.clone(), &GroupOrdering::None)?;
        let accumulators = aggregates.iter().map(|a| new_accumulator(&a.expr)).collect::<Result<_>>()?;
        Ok(Groups { groups, accumulators })
    }

    fn len(&self) -> usize {
        self.groups.len()
    }

    /// Takes every group out: its keys, and each aggregate's state columns.
    fn take(&mut self) -> Result<(Vec<ArrayRef>, Vec<Vec<ArrayRef>>)> {
        let keys = self.groups.emit(EmitTo::All)?;
        let states = self.accumulators.iter_mut().map(|a| a.state(EmitTo::All)).collect::<Result<Vec<_>, _>>()?;
        Ok((keys, states))
    }

    /// Merges partial states (of keys `keys`, one set of state columns per aggregate) into these groups.
    fn merge(&mut self, keys: &[ArrayRef], states: &[Vec<ArrayRef>]) -> Result<()> {
        let mut ids = Vec::new();
        self.groups.intern(keys, &mut ids)?;
        let total = self.groups.len();
        for (acc, st) in self.accumulators.iter_mut().zip(states) {
            acc.merge_batch(st, &ids, total)?;
        }
        Ok(())
    }
}

/// One open window: its aggregates as of the last snapshot, and those of the rows it got since.
struct OpenWindow {
    base: Option<Groups>,
    fresh: Option<Groups>,
}

impl OpenWindow {
    /// Folds `fresh` into `base`, returning the window's every group.
    fn fold(&mut self) -> Result<Option<&mut Groups>> {
        if let Some(mut fresh) = self.fresh.take() {
            match self.base.as_mut() {
                None => self.base = Some(fresh),
                Some(base) => {
                    let (keys, states) = fresh.take()?;
                    base.merge(&keys, &states)?;
                }
            }
        }
        Ok(self.base.as_mut())
    }

    /// Groups held, counting a key updated since the last snapshot twice (once in each set).
    fn len(&self) -> usize {
        self.base.as_ref().map_or(0, Groups::len) + self.fresh.as_ref().map_or(0, Groups::len)
    }
}

/// A TUMBLE or HOP aggregate of one subtask.
pub struct WindowAggregateOperator {
    size_us: i64,
    slide_us: i64,
    time_column: usize,
    time_type: DataType,
    window_position: usize,
    keys: Vec<Arc<dyn PhysicalExpr>>,
    key_schema: SchemaRef,
    aggregates: Vec<AggregateSpec>,
    out_schema: SchemaRef,
    windows: BTreeMap<i64, OpenWindow>,
    watermark: i64,
    reported_entries: i64,
    chain: Chain,
    /// After a restore, the watermarks of the subtasks the state came from: a row whose windows had all closed at the
    /// subtask that held its key is late, as it was there, even while this subtask's own watermark (the smallest of
    /// its inputs') is behind; otherwise it would open an already emitted window again.
    floors: Option<Origins>,
    ctx: OperatorContext,
}

/// A chain of snapshots holds at most this many rows per live one (see [`Chain::new`]): the base about one each, the
/// deltas (rows updated since, and rows that close before the next base) up to as many again.
const CHAIN_ROWS_PER_LIVE: usize = 2;

impl WindowAggregateOperator {
    /// An operator for `spec` producing `out_schema`.
    pub fn new(spec: &WindowAggregateSpec, out_schema: SchemaRef, ctx: OperatorContext) -> Result<Self> {
        let (size_us, slide_us) = match spec.window {
            WindowKind::Tumble { size_us } => (size_us, size_us),
            WindowKind::Hop { slide_us, size_us } => (size_us, slide_us),
            WindowKind::Session { .. } => {
                return Err(EngineError::Internal("session windows use SessionOperator".into()));
            }
        };
        let time_type = spec.input_schema.field(spec.time_column).data_type().clone();
        let key_fields: Vec<Field> = if spec.keys.is_empty() {
            vec![Field::new("__all", DataType::Boolean, false)]
        } else {
            spec.keys
                .iter()
                .enumerate()
                .map(|(i, k)| Ok(Field::new(format!("k{i}"), k.data_type(&spec.input_schema)?, true)))
                .collect::<Result<_>>()?
        };
        Ok(WindowAggregateOperator {
            size_us,
            slide_us,
            time_column: spec.time_column,
            time_type,
            window_position: spec.window_position,
            keys: spec.keys.clone(),
            key_schema: Arc::new(Schema::new(key_fields)),
            aggregates: spec.aggregates.clone(),
            out_schema,
            windows: BTreeMap::new(),
            watermark: i64::MIN,
            reported_entries: 0,
            chain: Chain::new(CHAIN_ROWS_PER_LIVE),
            floors: None,
            ctx,
        })
    }

    /// Columns of the `windows` state part: window start, keys, key group, then each aggregate's state.
    fn state_schema(&self) -> Result<SchemaRef> {
        let mut fields = vec![Field::new("window_start", DataType::Int64, false)];
        fields.extend(self.key_schema.fields().iter().map(|f| f.as_ref().clone().with_nullable(true)));
        fields.push(Field::new(crate::state::KEY_GROUP, DataType::UInt16, false));
        for (a, spec) in self.aggregates.iter().enumerate() {
            for (i, f) in spec.expr.state_fields()?.iter().enumerate() {
                fields.push(Field::new(format!("s{a}_{i}"), f.data_type().clone(), true));
            }
        }
        Ok(Arc::new(Schema::new(fields)))
    }

    /// The last event time of the window starting at `start`: it closes when the watermark reaches it.
    fn closes_at(&self, start: i64) -> i64 {
        start.saturating_add(self.size_us).saturating_sub(1)
    }

    /// State rows of window `start`: keys `keys` with aggregate states `states`.
    fn state_rows(
        &self,
        schema: &SchemaRef,
        start: i64,
        keys: Vec<ArrayRef>,
        states: Vec<Vec<ArrayRef>>,
    ) -> Result<RecordBatch> {
        let n = keys.first().map_or(0, |k| k.len());
        let key_groups = key_groups_of(&keys, n, self.ctx.max_parallelism)?;
        let mut cols: Vec<ArrayRef> = vec![Arc::new(arrow::array::Int64Array::from_value(start, n))];
        cols.extend(keys);
        cols.push(Arc::new(arrow::array::UInt16Array::from(key_groups)));
        cols.extend(states.into_iter().flatten());
        Ok(RecordBatch::try_new(schema.clone(), cols)?)
    }

    /// The windows (starts) containing `t`.
    fn window_starts(&self, t: i64, out: &mut Vec<i64>) {
        out.clear();
        let last = t - t.rem_euclid(self.slide_us);
        let mut start = last;
        while start > t - self.size_us {
            out.push(start);
            start -= self.slide_us;
        }
    }

    fn emit(&self, start: i64, window: &mut Groups) -> Result<Option<RecordBatch>> {
        let n = window.groups.len();
        if n == 0 {
            return Ok(None);
        }
        let keys = window.groups.emit(EmitTo::All)?;
        let DataType::Timestamp(unit, _) = &self.time_type else {
            return Err(EngineError::Internal("window time column is not a timestamp".into()));
        };
        let bound = |us: i64| -> Result<ArrayRef> {
            let v = nagare_core::keys::from_micros(us, *unit);
            let a: ArrayRef = Arc::new(arrow::array::Int64Array::from_value(v, n));
            Ok(arrow::compute::cast(&a, &self.time_type)?)
        };
        let window_field = self.out_schema.field(self.window_position);
        let DataType::Struct(fields) = window_field.data_type() else {
            return Err(EngineError::Internal("window column is not a struct".into()));
        };
        let window_col: ArrayRef = Arc::new(StructArray::try_new(
            fields.clone(),
            vec![bound(start)?, bound(start.saturating_add(self.size_us))?],
            None,
        )?);
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(self.out_schema.fields().len());
        let mut key_iter = keys.into_iter();
        let key_count = if self.keys.is_empty() { 0 } else { self.keys.len() };
        if self.keys.is_empty() {
            key_iter.next();
        }
        for i in 0..=key_count {
            if i == self.window_position {
                cols.push(window_col.clone());
            } else {
                cols.push(key_iter.next().ok_or_else(|| EngineError::Internal("missing key column".into()))?);
            }
        }
        for acc in &mut window.accumulators {
            cols.push(acc.evaluate(EmitTo::All)?);
        }
        // Cast where DataFusion's accumulator output differs only in representation from the planned schema.
        let cols = cols
            .into_iter()
            .zip(self.out_schema.fields())
            .map(|(c, f)| if c.data_type() == f.data_type() { Ok(c) } else { arrow::compute::cast(&c, f.data_type()) })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(RecordBatch::try_new(self.out_schema.clone(), cols)?))
    }

    fn report_state(&mut self) {
        let entries = self.state_entries() as i64;
        self.ctx.metrics.state_entries.fetch_add(entries - self.reported_entries, std::sync::atomic::Ordering::Relaxed);
        self.reported_entries = entries;
    }
}

/// A vectorised accumulator for an aggregate, adapting row-wise ones.
pub fn new_accumulator(
    expr: &Arc<datafusion::physical_expr::aggregate::AggregateFunctionExpr>,
) -> Result<Box<dyn GroupsAccumulator>> {
    if expr.groups_accumulator_supported() {
        Ok(expr.create_groups_accumulator()?)
    } else {
        let e = expr.clone();
        Ok(Box::new(GroupsAccumulatorAdapter::new(move || e.create_accumulator())))
    }
}

/// Evaluates an aggregate's argument expressions and its FILTER over a batch.
pub fn aggregate_inputs(spec: &AggregateSpec, batch: &RecordBatch) -> Result<(Vec<ArrayRef>, Option<BooleanArray>)> {
    let n = batch.num_rows();
    let args = spec
        .expr
        .expressions()
        .iter()
        .map(|e| e.evaluate(batch).and_then(|v| v.into_array(n)))
        .collect::<Result<Vec<_>, _>>()?;
    let filter = match &spec.filter {
        Some(f) => {
            let a = f.evaluate(batch)?.into_array(n)?;
            Some(
                a.as_boolean_opt()
                    .ok_or_else(|| EngineError::Internal("aggregate FILTER is not boolean".into()))?
                    .clone(),
            )
        }
        None => None,
    };
    Ok((args, filter))
}

fn take_all(cols: &[ArrayRef], idx: &UInt32Array) -> Result<Vec<ArrayRef>> {
    Ok(cols.iter().map(|c| take(c, idx, None)).collect::<Result<Vec<_>, _>>()?)
}

impl Operator for WindowAggregateOperator {
    fn process(&mut self, batch: RecordBatch, _out: &mut Vec<RecordBatch>) -> Result<()> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let (times, nulls) = event_times(batch.column(self.time_column))?;
        let keys: Vec<ArrayRef> = if self.keys.is_empty() {
            vec![Arc::new(BooleanArray::from(vec![true; n]))]
        } else {
            self.keys.iter().map(|k| k.evaluate(&batch).and_then(|v| v.into_array(n))).collect::<Result<Vec<_>, _>>()?
        };
        let inputs = self.aggregates.iter().map(|a| aggregate_inputs(a, &batch)).collect::<Result<Vec<_>>>()?;

        // Each row's watermark: this subtask's, or (after a restore, until that passes them) its key's origin's.
        if self.floors.as_ref().and_then(Origins::max_watermark).is_none_or(|w| w <= self.watermark) {
            self.floors = None;
        }
        let floors: Option<Vec<i64>> = match &self.floors {
            Some(origins) => Some(
                key_groups_of(&keys, n, self.ctx.max_parallelism)?
                    .into_iter()
                    .map(|g| origins.watermark_of(g).map_or(self.watermark, |w| w.max(self.watermark)))
                    .collect(),
            ),
            None => None,
        };
        // Rows per window start; rows whose every window has closed are late.
        let mut by_window: HashMap<i64, Vec<u32>> = HashMap::new();
        let mut late: Vec<u32> = Vec::new();
        let mut starts = Vec::new();
        for (i, t) in times.iter().enumerate() {
            if nulls.as_ref().is_some_and(|nb| nb.is_null(i)) {
                late.push(i as u32);
                continue;
            }
            let watermark = floors.as_ref().map_or(self.watermark, |f| f[i]);
            self.window_starts(*t, &mut starts);
            let mut placed = false;
            for s in &starts {
                if s.saturating_add(self.size_us).saturating_sub(1) > watermark {
                    by_window.entry(*s).or_default().push(i as u32);
                    placed = true;
                }
            }
            if !placed {
                late.push(i as u32);
            }
        }
        if !late.is_empty() {
            let rows = arrow::compute::take_record_batch(&batch, &UInt32Array::from(late))?;
            self.ctx.late(&rows, self.watermark)?;
        }
        let mut group_ids = Vec::new();
        for (start, rows) in by_window {
            let window = self.windows.entry(start).or_insert(OpenWindow { base: None, fresh: None });
            if window.fresh.is_none() {
                window.fresh = Some(Groups::new(&self.key_schema, &self.aggregates)?);
            }
            let window = window.fresh.as_mut().ok_or_else(|| EngineError::Internal("window vanished".into()))?;
            let all = rows.len() == n;
            let idx = UInt32Array::from(rows);
            let key_cols = if all { keys.clone() } else { take_all(&keys, &idx)? };
            window.groups.intern(&key_cols, &mut group_ids)?;
            let total = window.groups.len();
            for (acc, (args, filter)) in window.accumulators.iter_mut().zip(&inputs) {
                let (args, filter) = if all {
                    (args.clone(), filter.clone())
                } else {
                    let f = match filter {
                        Some(f) => Some(take(f, &idx, None)?.as_boolean().clone()),
                        None => None,
                    };
                    (take_all(args, &idx)?, f)
                };
                acc.update_batch(&args, &group_ids, filter.as_ref(), total)?;
            }
        }
        self.report_state();
        Ok(())
    }

    fn on_watermark(&mut self, watermark: i64, out: &mut Vec<RecordBatch>) -> Result<()> {
        if watermark <= self.watermark {
            return Ok(());
        }
        self.watermark = watermark;
        while let Some((&start, _)) = self.windows.first_key_value() {
            if start.saturating_add(self.size_us).saturating_sub(1) > watermark {
                break;
            }
            let Some((start, mut window)) = self.windows.pop_first() else { break };
            if let Some(groups) = window.fold()?
                && let Some(batch) = self.emit(start, groups)?
            {
                out.push(batch);
            }
        }
        self.report_state();
        Ok(())
    }

    fn state_entries(&self) -> usize {
        self.windows.values().map(OpenWindow::len).sum()
    }

    fn snapshot(&mut self, force_full: bool) -> Result<Vec<StatePart>> {
        let schema = self.state_schema()?;
        let touched: usize = self.windows.values().filter_map(|w| w.fresh.as_ref()).map(Groups::len).sum();
        let kind = self.chain.next_kind(force_full, touched, self.state_entries());
        let mut windows = std::mem::take(&mut self.windows);
        let mut batches = Vec::new();
        let mut write = |start: i64, window: &mut OpenWindow| -> Result<()> {
            match kind {
                // The rows since the last snapshot, as partial aggregates; then part of the base.
                PartKind::Delta => {
                    let Some(mut fresh) = window.fresh.take() else { return Ok(()) };
                    if fresh.len() == 0 {
                        return Ok(());
                    }
                    let (keys, states) = fresh.take()?;
                    match window.base.as_mut() {
                        Some(base) => base.merge(&keys, &states)?,
                        None => {
                            let mut base = Groups::new(&self.key_schema, &self.aggregates)?;
                            base.merge(&keys, &states)?;
                            window.base = Some(base);
                        }
                    }
                    batches.push(self.state_rows(&schema, start, keys, states)?);
                }
                // Every group; emitting empties them, so the same values are merged straight back.
                PartKind::Base | PartKind::Whole => {
                    let Some(groups) = window.fold()? else { return Ok(()) };
                    if groups.len() == 0 {
                        return Ok(());
                    }
                    let (keys, states) = groups.take()?;
                    groups.merge(&keys, &states)?;
                    batches.push(self.state_rows(&schema, start, keys, states)?);
                }
            }
            Ok(())
        };
        let written = windows.iter_mut().try_for_each(|(start, window)| write(*start, window));
        self.windows = windows;
        written?;
        let rows = arrow::compute::concat_batches(&schema, &batches)?;
        self.chain.wrote(kind, rows.num_rows());
        Ok(vec![StatePart::chained("windows", rows, kind), chained_meta(self.watermark, self.ctx.key_groups, &[])?])
    }

    fn restore(&mut self, mut parts: Vec<StatePart>) -> Result<()> {
        let mut origins = Origins::default();
        if let Some(meta) = take_part(&mut parts, "meta") {
            self.watermark = meta_value(&meta, "watermark")?.unwrap_or(i64::MIN);
            origins = Origins::from_meta(&meta)?;
        }
        if let Some(state) = take_part(&mut parts, "windows") {
            // By name and type, this subtask's key groups only; then in the operator's own column order.
            let state = StateRows::mine(state, self.ctx.key_groups, "window state")?.columns(&self.state_schema()?)?;
            // A chain's base and deltas may hold windows that closed (and were emitted) after they were written.
            let starts = state.column(0).as_primitive::<arrow::datatypes::Int64Type>();
            let closes: Vec<i64> = starts.values().iter().map(|s| self.closes_at(*s)).collect();
            let state = origins.keep_open(&state, &closes)?;
            let n_keys = self.key_schema.fields().len();
            let starts = state.column(0).as_primitive::<arrow::datatypes::Int64Type>().clone();
            let mut by_window: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
            for i in 0..state.num_rows() {
                by_window.entry(starts.value(i)).or_default().push(i as u32);
            }
            let mut widths = Vec::new();
            for spec in &self.aggregates {
                widths.push(spec.expr.state_fields()?.len());
            }
            // Partial aggregates of one key (a base's and deltas') merge into one group, in any order.
            for (start, rows) in by_window {
                let idx = UInt32Array::from(rows);
                let rows = arrow::compute::take_record_batch(&state, &idx)?;
                let keys: Vec<ArrayRef> = rows.columns()[1..1 + n_keys].to_vec();
                let mut states = Vec::with_capacity(widths.len());
                let mut col = 2 + n_keys;
                for width in &widths {
                    states.push(rows.columns()[col..col + width].to_vec());
                    col += width;
                }
                let mut window = Groups::new(&self.key_schema, &self.aggregates)?;
                window.merge(&keys, &states)?;
                self.windows.insert(start, OpenWindow { base: Some(window), fresh: None });
            }
        }
        if let Some(p) = parts.first() {
            return Err(EngineError::Internal(format!("unknown window state part '{}'", p.name)));
        }
        if origins.max_watermark().is_some_and(|w| w > self.watermark) {
            self.floors = Some(origins);
        }
        self.reported_entries = 0;
        self.report_state();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, TimestampMicrosecondArray};
    use datafusion::common::DFSchema;
    use datafusion::functions_aggregate::expr_fn::{count, sum};
    use datafusion::logical_expr::col;
    use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
    use datafusion::physical_expr::aggregate::LoweredAggregateBuilder;
    use datafusion::physical_expr::execution_props::ExecutionProps;
    use datafusion::physical_expr::expressions::Column;

    use super::*;
    use crate::metrics::NodeMetrics;
    use crate::state::testing::{self, ALL, Rng, Shape, Step, Stored};

    fn input_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("t", DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None), true),
            Field::new("v", DataType::Int64, true),
        ]))
    }

    fn aggregates(schema: &SchemaRef) -> Vec<AggregateSpec> {
        let df = DFSchema::try_from(schema.as_ref().clone()).unwrap();
        [count(col("v")), sum(col("v"))]
            .iter()
            .map(|e| {
                let l = LoweredAggregateBuilder::new(
                    e,
                    &df,
                    schema,
                    &ExecutionProps::new(),
                    &PhysicalPlanningContext::default(),
                )
                .build()
                .unwrap();
                AggregateSpec { expr: l.aggregate, filter: None }
            })
            .collect()
    }

    fn op(window: WindowKind) -> (WindowAggregateOperator, SchemaRef, Arc<NodeMetrics>) {
        op_in(window, ALL)
    }

    fn op_in(
        window: WindowKind,
        key_groups: nagare_core::KeyGroupRange,
    ) -> (WindowAggregateOperator, SchemaRef, Arc<NodeMetrics>) {
        let input = input_schema();
        let ts = input.field(1).data_type().clone();
        let out = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("w", nagare_sql::window::window_struct_type(&ts), true),
            Field::new("n", DataType::Int64, false),
            Field::new("s", DataType::Int64, true),
        ]));
        let spec = WindowAggregateSpec {
            window,
            time_column: 1,
            window_position: 1,
            keys: vec![Arc::new(Column::new("k", 0))],
            aggregates: aggregates(&input),
            input_schema: input.clone(),
        };
        let metrics = Arc::new(NodeMetrics::new(0, "w".into(), "window", 1));
        let ctx = OperatorContext {
            label: "w".into(),
            metrics: metrics.clone(),
            late_rows: nagare_sql::LateRowPolicy::Drop,
            dead_letter: None,
            max_parallelism: 128,
            key_groups,
        };
        (WindowAggregateOperator::new(&spec, out, ctx).unwrap(), input, metrics)
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

    /// (key, window start, count, sum) of emitted rows.
    fn rows(out: &[RecordBatch]) -> Vec<(i64, i64, i64, i64)> {
        let mut v = Vec::new();
        for b in out {
            let k = b.column(0).as_primitive::<arrow::datatypes::Int64Type>();
            let w = b.column(1).as_struct();
            let start = w.column(0).as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
            let n = b.column(2).as_primitive::<arrow::datatypes::Int64Type>();
            let s = b.column(3).as_primitive::<arrow::datatypes::Int64Type>();
            for i in 0..b.num_rows() {
                v.push((k.value(i), start.value(i), n.value(i), s.value(i)));
            }
        }
        v.sort();
        v
    }

    #[test]
    fn tumble_fires_at_end_minus_one_and_drops_late_rows() {
        let (mut w, s, m) = op(WindowKind::Tumble { size_us: 100 });
        let mut out = Vec::new();
        w.process(batch(&s, &[(1, 0, 1), (1, 99, 2), (2, 50, 10), (1, 100, 5)]), &mut out).unwrap();
        w.on_watermark(98, &mut out).unwrap();
        assert!(out.is_empty());
        w.on_watermark(99, &mut out).unwrap();
        assert_eq!(rows(&out), vec![(1, 0, 2, 3), (2, 0, 1, 10)]);
        out.clear();
        w.process(batch(&s, &[(1, 20, 100), (1, 150, 7)]), &mut out).unwrap();
        assert_eq!(NodeMetrics::get(&m.late_rows), 1, "t=20 belongs to a closed window");
        w.on_watermark(i64::MAX, &mut out).unwrap();
        assert_eq!(rows(&out), vec![(1, 100, 2, 12)]);
        assert_eq!(w.state_entries(), 0);
    }

    #[test]
    fn hop_counts_a_row_in_every_window_that_contains_it() {
        let (mut w, s, m) = op(WindowKind::Hop { slide_us: 50, size_us: 150 });
        let mut out = Vec::new();
        w.process(batch(&s, &[(1, 120, 1)]), &mut out).unwrap();
        w.on_watermark(i64::MAX, &mut out).unwrap();
        // Windows [0,150), [50,200), [100,250) contain 120.
        assert_eq!(rows(&out), vec![(1, 0, 1, 1), (1, 50, 1, 1), (1, 100, 1, 1)]);
        assert_eq!(NodeMetrics::get(&m.late_rows), 0);
    }

    #[test]
    fn hop_row_with_some_windows_closed_counts_in_the_open_ones() {
        let (mut w, s, m) = op(WindowKind::Hop { slide_us: 50, size_us: 100 });
        let mut out = Vec::new();
        w.on_watermark(100, &mut out).unwrap();
        // 80 is in [0,100) (closed at 99) and [50,150) (open).
        w.process(batch(&s, &[(1, 80, 3)]), &mut out).unwrap();
        w.on_watermark(i64::MAX, &mut out).unwrap();
        assert_eq!(rows(&out), vec![(1, 50, 1, 3)]);
        assert_eq!(NodeMetrics::get(&m.late_rows), 0);
    }

    #[test]
    fn window_state_survives_a_snapshot_and_restore() {
        for window in [WindowKind::Tumble { size_us: 100 }, WindowKind::Hop { slide_us: 50, size_us: 100 }] {
            let input = [vec![(1, 10, 1), (2, 20, 2), (1, 120, 3)], vec![(1, 30, 4), (2, 130, 5)], vec![(1, 250, 6)]];
            let run = |cut: Option<usize>| {
                let (mut w, s, _) = op(window);
                let mut out = Vec::new();
                for (i, rows) in input.iter().enumerate() {
                    if Some(i) == cut {
                        let parts = w.snapshot(false).unwrap();
                        let (mut fresh, _, _) = op(window);
                        fresh.restore(parts).unwrap();
                        w = fresh;
                    }
                    w.process(batch(&s, rows), &mut out).unwrap();
                    w.on_watermark(rows.iter().map(|r| r.1).max().unwrap() - 60, &mut out).unwrap();
                }
                w.on_watermark(i64::MAX, &mut out).unwrap();
                rows(&out)
            };
            let whole = run(None);
            assert!(!whole.is_empty());
            for cut in 1..3 {
                assert_eq!(run(Some(cut)), whole, "{window:?} restored before batch {cut}");
            }
        }
    }

    const WINDOWS: [WindowKind; 2] =
        [WindowKind::Tumble { size_us: 100 }, WindowKind::Hop { slide_us: 50, size_us: 150 }];

    fn make(window: WindowKind) -> impl Fn(nagare_core::KeyGroupRange) -> Box<dyn Operator> {
        move |range| Box::new(op_in(window, range).0)
    }

    fn input(rows: &[(i64, i64, i64)]) -> RecordBatch {
        batch(&input_schema(), rows)
    }

    /// Steps of 20 µs: rows of 12 keys up to 50 behind and 30 ahead of the step, watermark 40 behind (so some rows
    /// are late, and a window gets rows over several steps).
    fn random_steps(rng: &mut Rng, from: i64, steps: usize) -> Vec<Step> {
        Shape { every: 20, max_rows: 10, keys: 12, behind: 50, span: 80, lag: 40 }.steps(rng, from, steps)
    }

    #[test]
    fn base_and_deltas_restore_like_an_uninterrupted_run() {
        for window in WINDOWS {
            let mut deltas = 0;
            for seed in 0..30 {
                let steps = random_steps(&mut Rng::new(seed), 0, 40);
                let plain = rows(&testing::run_plain(&make(window), &input, &steps));
                assert!(!plain.is_empty());
                let (got, restored_deltas) = testing::run_with_restores(&make(window), &input, &steps, seed);
                assert_eq!(rows(&got), plain, "{window:?} seed {seed}");
                deltas += restored_deltas;
            }
            assert!(deltas > 30, "{window:?}: restores read chains with deltas ({deltas})");
        }
    }

    #[test]
    fn a_window_closed_after_its_base_was_written_is_not_emitted_again() {
        for window in WINDOWS {
            let (mut w, s, _) = op(window);
            let mut stored = Stored::default();
            let mut out = Vec::new();
            w.process(batch(&s, &[(1, 10, 1), (2, 20, 2), (3, 160, 3)]), &mut out).unwrap();
            let base = w.snapshot(false).unwrap();
            let base_rows = base[0].batch.num_rows();
            assert_eq!(stored.store(base), PartKind::Base);
            w.on_watermark(149, &mut out).unwrap();
            assert!(!out.is_empty(), "{window:?}: windows before 150 have closed");
            let before = rows(&out);
            w.process(batch(&s, &[(3, 170, 4)]), &mut out).unwrap();
            let delta = w.snapshot(false).unwrap();
            assert!(delta[0].batch.num_rows() < base_rows, "{window:?}: the delta holds the touched windows only");
            assert_eq!(stored.store(delta), PartKind::Delta);
            let (mut restored, _, _) = op(window);
            restored.restore(Stored::parts(&[&stored])).unwrap();
            let mut after = Vec::new();
            restored.on_watermark(i64::MAX, &mut after).unwrap();
            w.on_watermark(i64::MAX, &mut out).unwrap();
            let after = rows(&after);
            assert!(after.iter().all(|r| !before.contains(r)), "{window:?}: emitted again: {after:?}");
            assert_eq!([before, after].concat(), rows(&out), "{window:?}");
            assert_eq!(restored.snapshot(false).unwrap()[0].kind, PartKind::Base, "a restore starts a new chain");
        }
    }

    #[test]
    fn chains_of_two_subtasks_rescale_to_other_ranges_with_every_window_once() {
        let ranges = |cuts: &[u32]| -> Vec<nagare_core::KeyGroupRange> {
            cuts.windows(2).map(|c| nagare_core::KeyGroupRange { start: c[0], end: c[1] }).collect()
        };
        for window in WINDOWS {
            for seed in 0..10 {
                let mut rng = Rng::new(seed);
                // The second subtask's watermark lags 100 µs behind the first's.
                let before: Vec<_> =
                    random_steps(&mut rng, 0, 30).into_iter().map(|(rows, w)| (rows, w, w - 100)).collect();
                let cut = before.last().unwrap().1;
                // After the restore, rows late at the first old subtask but not at the second, whose watermark a
                // merged subtask starts from: late all the same, never opening an emitted window again.
                let after: Vec<Step> = random_steps(&mut rng, cut - 40, 20);
                for cuts in [&[0, 128][..], &[0, 40, 128], &[0, 100, 128]] {
                    let (got, want) =
                        testing::run_rescaled(&make(window), &input, &before, &after, &ranges(cuts), seed);
                    assert_eq!(rows(&got), rows(&want), "{window:?} seed {seed} into {cuts:?}");
                }
            }
        }
    }

    #[test]
    fn checkpoints_of_whole_window_state_still_restore() {
        for window in WINDOWS {
            let steps = random_steps(&mut Rng::new(7), 0, 30);
            let plain = rows(&testing::run_plain(&make(window), &input, &steps));
            let (mut w, s, _) = op(window);
            let mut out = Vec::new();
            for (rows, wm) in &steps[..15] {
                w.process(batch(&s, rows), &mut out).unwrap();
                w.on_watermark(*wm, &mut out).unwrap();
            }
            // The layout before chains: every open window in a whole part, meta with the watermark only.
            let parts: Vec<StatePart> = w
                .snapshot(true)
                .unwrap()
                .into_iter()
                .map(|p| match p.name.as_str() {
                    "meta" => crate::operators::meta_part(&[("watermark", w.watermark)]).unwrap(),
                    _ => StatePart::new(&p.name, p.batch),
                })
                .collect();
            assert!(parts.iter().any(|p| p.name == "windows" && p.batch.num_rows() > 0));
            let (mut restored, _, _) = op(window);
            restored.restore(parts).unwrap();
            for (rows, wm) in &steps[15..] {
                restored.process(batch(&s, rows), &mut out).unwrap();
                restored.on_watermark(*wm, &mut out).unwrap();
            }
            restored.on_watermark(i64::MAX, &mut out).unwrap();
            assert_eq!(rows(&out), plain, "{window:?}");
        }
    }
}
