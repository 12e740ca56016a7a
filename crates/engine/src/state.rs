//! Keyed operator state as rows, the layout the keyed operators (dedup, windows, sessions) share: named, typed
//! columns plus a `_key_group` column, so that a restore reads columns by name (a missing or retyped column is a
//! clear refusal, never a misread by position) and a rescaled job keeps only its own key groups.
//!
//! Also what incremental snapshots share: [`Chain`] decides when a delta may extend the chain and when a new base is
//! due, and [`Origins`] tells a restore, for each restored row, the watermark of the subtask that wrote it (a chain's
//! base still holds windows and sessions that closed after it was written; they are dropped on restore instead of
//! being written out as tombstones).

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Int64Type, SchemaRef, UInt16Type};
use nagare_core::KeyGroupRange;

use crate::operator::{PartKind, StatePart};

use crate::error::{EngineError, Result};

/// The column every keyed state part carries: the key group of the row's key.
pub const KEY_GROUP: &str = "_key_group";

/// The rows of a keyed state part that belong to this subtask, read by column name.
pub struct StateRows {
    batch: RecordBatch,
    what: String,
}

impl StateRows {
    /// The rows of `part` (which `what` names in errors, e.g. "window state") in the key groups `mine`.
    pub fn mine(part: RecordBatch, mine: KeyGroupRange, what: &str) -> Result<StateRows> {
        let rows = StateRows { batch: part, what: what.to_string() };
        let groups = rows.column(KEY_GROUP, &DataType::UInt16)?;
        let groups = groups.as_primitive::<UInt16Type>();
        let keep: BooleanArray = groups.values().iter().map(|g| Some(mine.contains(u32::from(*g)))).collect();
        Ok(StateRows { batch: filter_record_batch(&rows.batch, &keep)?, what: rows.what })
    }

    /// Column `name`, which must have type `data_type`; a checkpoint without it, or with another type, was written
    /// by another version of nagare or of the pipeline and is refused, naming the column.
    pub fn column(&self, name: &str, data_type: &DataType) -> Result<ArrayRef> {
        let Some(c) = self.batch.column_by_name(name) else {
            return Err(incompatible(&self.what, &format!("has no column '{name}'")));
        };
        if c.data_type() != data_type {
            return Err(incompatible(&self.what, &format!("has '{name}' as {}, not {data_type}", c.data_type())));
        }
        Ok(c.clone())
    }

    /// Columns `names` with the types of `schema`'s fields of the same names, as one batch of that schema.
    pub fn columns(&self, schema: &SchemaRef) -> Result<RecordBatch> {
        let cols = schema.fields().iter().map(|f| self.column(f.name(), f.data_type())).collect::<Result<Vec<_>>>()?;
        Ok(RecordBatch::try_new(schema.clone(), cols)?)
    }

    /// Rows held.
    pub fn num_rows(&self) -> usize {
        self.batch.num_rows()
    }

    /// Whether the part has column `name` (for columns that checkpoints of earlier versions lack).
    pub fn has(&self, name: &str) -> bool {
        self.batch.column_by_name(name).is_some()
    }
}

/// A chain of incremental snapshots is compacted into a new base after more than this many deltas ...
pub const MAX_DELTAS: usize = 50;
/// ... or once it holds more rows (base and deltas) than some multiple of the live state (a restore would read
/// mostly rows that later deltas supersede or that have closed), counting live state as at least this many rows
/// (small state would otherwise be rewritten whole every time).
pub const MIN_LIVE_ROWS: usize = 1024;

/// The bookkeeping of one operator's chain of incremental snapshots: whether it has a base, and how many deltas
/// follow it and rows the chain holds. A new operator (and so every restored one) has no base, so its first snapshot
/// is one: a chain then always belongs to one subtask with one key-group range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    rows_per_live: usize,
    based: bool,
    deltas: usize,
    rows: usize,
}

impl Chain {
    /// A chain that holds at most `rows_per_live` rows per live row of state. A base holds about one per live row,
    /// so 1 allows deltas only while the state grows, 2 until the deltas hold as many rows as the state.
    pub fn new(rows_per_live: usize) -> Chain {
        Chain { rows_per_live, based: false, deltas: 0, rows: 0 }
    }

    /// Whether the next snapshot may be a delta of `delta_rows` rows, with `live_rows` rows of state held: not when
    /// the task forces a full one (an upload failed, so the chain is broken), when there is no base yet, after more
    /// than [`MAX_DELTAS`] deltas, or when the chain would hold too many rows.
    pub fn extends(&self, force_full: bool, delta_rows: usize, live_rows: usize) -> bool {
        self.based
            && !force_full
            && self.deltas <= MAX_DELTAS
            && self.rows + delta_rows <= live_rows.max(MIN_LIVE_ROWS) * self.rows_per_live
    }

    /// The part kind the next snapshot writes, by [`Chain::extends`].
    pub fn next_kind(&self, force_full: bool, delta_rows: usize, live_rows: usize) -> PartKind {
        if self.extends(force_full, delta_rows, live_rows) { PartKind::Delta } else { PartKind::Base }
    }

    /// Records a snapshot written: a base (or a whole part) of `rows` rows starts the chain afresh, a delta extends it.
    pub fn wrote(&mut self, kind: PartKind, rows: usize) {
        match kind {
            PartKind::Delta => {
                self.deltas += 1;
                self.rows += rows;
            }
            PartKind::Base | PartKind::Whole => *self = Chain { based: true, deltas: 0, rows, ..*self },
        }
    }

    /// Deltas since the base.
    pub fn deltas(&self) -> usize {
        self.deltas
    }
}

/// Meta column: the first key group of the subtask that wrote the snapshot.
pub const KG_START: &str = "kg_start";
/// Meta column: one past the last key group of the subtask that wrote the snapshot.
pub const KG_END: &str = "kg_end";

/// The `meta` part of a chained operator: its watermark and its key-group range (so a restore can tell, for each row
/// of a chain, the watermark of the subtask that wrote it), plus any other scalars.
pub fn chained_meta(watermark: i64, range: KeyGroupRange, more: &[(&str, i64)]) -> Result<StatePart> {
    let mut values = vec![("watermark", watermark), (KG_START, i64::from(range.start)), (KG_END, i64::from(range.end))];
    values.extend_from_slice(more);
    crate::operators::meta_part(&values)
}

/// The watermarks of the subtasks whose snapshots a restore reads, by key-group range (from their `meta` rows,
/// concatenated when the job was rescaled).
#[derive(Debug, Default, Clone)]
pub struct Origins {
    ranges: Vec<(KeyGroupRange, i64)>,
}

impl Origins {
    /// The origins in `meta`. Meta written before snapshots were chained has no key-group range: its state was whole
    /// and held nothing closed, so there are no origins and nothing is dropped.
    pub fn from_meta(meta: &RecordBatch) -> Result<Origins> {
        let (Some(start), Some(end), Some(watermark)) =
            (meta.column_by_name(KG_START), meta.column_by_name(KG_END), meta.column_by_name("watermark"))
        else {
            return Ok(Origins::default());
        };
        let int = |c: &ArrayRef, name: &str| {
            c.as_primitive_opt::<Int64Type>()
                .cloned()
                .ok_or_else(|| incompatible("meta", &format!("has '{name}' as {}, not Int64", c.data_type())))
        };
        let (start, end, watermark) = (int(start, KG_START)?, int(end, KG_END)?, int(watermark, "watermark")?);
        let ranges = (0..meta.num_rows())
            .map(|i| {
                let range = KeyGroupRange { start: start.value(i) as u32, end: end.value(i) as u32 };
                (range, watermark.value(i))
            })
            .collect();
        Ok(Origins { ranges })
    }

    /// The highest watermark of any origin: once a restored subtask's own watermark passes it, the origins no longer
    /// decide anything.
    pub fn max_watermark(&self) -> Option<i64> {
        self.ranges.iter().map(|(_, w)| *w).max()
    }

    /// The watermark of the subtask that wrote rows of `key_group`; none for state written without ranges.
    pub fn watermark_of(&self, key_group: u16) -> Option<i64> {
        self.ranges.iter().find(|(r, _)| r.contains(u32::from(key_group))).map(|(_, w)| *w)
    }

    /// Whether something of `key_group` that closes when the watermark reaches `closes_at` had closed (and been
    /// emitted) at the subtask that wrote it: the rule the operators' `on_watermark` applies.
    pub fn closed(&self, key_group: u16, closes_at: i64) -> bool {
        self.watermark_of(key_group).is_some_and(|w| closes_at <= w)
    }

    /// The rows of `batch` (with a [`KEY_GROUP`] column) still open at their origin, `closes_at[i]` being when row
    /// `i` closes.
    pub fn keep_open(&self, batch: &RecordBatch, closes_at: &[i64]) -> Result<RecordBatch> {
        if self.ranges.is_empty() {
            return Ok(batch.clone());
        }
        let groups = batch
            .column_by_name(KEY_GROUP)
            .and_then(|c| c.as_primitive_opt::<UInt16Type>().cloned())
            .ok_or_else(|| EngineError::Internal(format!("state rows without a {KEY_GROUP} column")))?;
        let keep: BooleanArray =
            groups.values().iter().zip(closes_at).map(|(g, c)| Some(!self.closed(*g, *c))).collect();
        Ok(filter_record_batch(batch, &keep)?)
    }
}

/// State a restore cannot read.
fn incompatible(what: &str, problem: &str) -> EngineError {
    EngineError::Config(format!(
        "the checkpoint's {what} {problem}: it was written by another version of nagare or of the pipeline; restore \
         it with the version that wrote it, or start the job without it"
    ))
}

/// Rows of `batch` whose keys (`keys`, one array per key column) fall in the key groups `mine`.
pub fn rows_in(
    batch: &RecordBatch,
    keys: &[ArrayRef],
    mine: KeyGroupRange,
    max_parallelism: u32,
) -> Result<RecordBatch> {
    let groups = crate::operators::key_groups_of(keys, batch.num_rows(), max_parallelism)?;
    let keep: BooleanArray = groups.iter().map(|g| Some(mine.contains(u32::from(*g)))).collect();
    Ok(filter_record_batch(batch, &keep)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    use super::*;

    /// A part as the operators write it: keys, key group, values.
    fn part() -> RecordBatch {
        let keys: ArrayRef = Arc::new(StringArray::from((0..100).map(|i| format!("k{i}")).collect::<Vec<_>>()));
        let groups = crate::operators::key_groups_of(std::slice::from_ref(&keys), 100, 128).unwrap();
        let schema = Schema::new(vec![
            Field::new("k0", DataType::Utf8, true),
            Field::new(KEY_GROUP, DataType::UInt16, false),
            Field::new("n", DataType::Int64, false),
        ]);
        let columns: Vec<ArrayRef> = vec![
            keys,
            Arc::new(arrow::array::UInt16Array::from(groups)),
            Arc::new(Int64Array::from_iter_values(0..100)),
        ];
        RecordBatch::try_new(Arc::new(schema), columns).unwrap()
    }

    #[test]
    fn subtasks_split_the_rows_by_key_group_and_read_by_name() {
        let p = part();
        assert_eq!(p.schema().field(1).name(), KEY_GROUP);
        let halves = [KeyGroupRange { start: 0, end: 64 }, KeyGroupRange { start: 64, end: 128 }];
        let mut total = 0;
        for range in halves {
            let rows = StateRows::mine(p.clone(), range, "test state").unwrap();
            total += rows.num_rows();
            let n = rows.column("n", &DataType::Int64).unwrap();
            assert_eq!(n.len(), rows.num_rows());
            // The same split as routing the keys.
            let keys = rows.column("k0", &DataType::Utf8).unwrap();
            assert_eq!(rows_in(&rows.batch, &[keys], range, 128).unwrap().num_rows(), rows.num_rows());
        }
        assert_eq!(total, 100, "every row in exactly one subtask");
    }

    #[test]
    fn a_chain_takes_deltas_until_it_is_long_or_large() {
        let mut chain = Chain::new(2);
        assert_eq!(chain.next_kind(false, 0, 0), PartKind::Base, "no base yet");
        chain.wrote(PartKind::Base, 5_000);
        assert_eq!(chain.next_kind(false, 10, 5_000), PartKind::Delta);
        assert_eq!(chain.next_kind(true, 10, 5_000), PartKind::Base, "forced");
        assert_eq!(chain.next_kind(false, 5_001, 5_000), PartKind::Base, "more delta rows than live rows");
        let mut small = Chain::new(2);
        small.wrote(PartKind::Base, 10);
        assert_eq!(small.next_kind(false, 2_000, 10), PartKind::Delta, "small state counts as {MIN_LIVE_ROWS}");
        for _ in 0..=MAX_DELTAS {
            assert_eq!(chain.next_kind(false, 1, 5_000), PartKind::Delta);
            chain.wrote(PartKind::Delta, 1);
        }
        assert_eq!(chain.deltas(), MAX_DELTAS + 1);
        assert_eq!(chain.next_kind(false, 1, 5_000), PartKind::Base, "long");
        chain.wrote(PartKind::Base, 5_000);
        chain.wrote(PartKind::Delta, 4_000);
        assert_eq!(chain.next_kind(false, 1_001, 5_000), PartKind::Base, "the deltas' rows add up");
        // One row per live row: deltas only while the state grows (dedup's rule).
        let mut growing = Chain::new(1);
        growing.wrote(PartKind::Base, 5_000);
        assert_eq!(growing.next_kind(false, 100, 5_000), PartKind::Base);
        assert_eq!(growing.next_kind(false, 100, 5_100), PartKind::Delta);
    }

    #[test]
    fn origins_give_each_key_group_the_watermark_of_the_subtask_that_wrote_it() {
        let halves = [KeyGroupRange { start: 0, end: 64 }, KeyGroupRange { start: 64, end: 128 }];
        let metas: Vec<RecordBatch> =
            halves.iter().zip([100, 50]).map(|(r, w)| chained_meta(w, *r, &[]).unwrap().batch).collect();
        let meta = arrow::compute::concat_batches(&metas[0].schema(), &metas).unwrap();
        assert_eq!(crate::operators::meta_value(&meta, "watermark").unwrap(), Some(50), "the operator's own");
        let origins = Origins::from_meta(&meta).unwrap();
        assert_eq!(
            (origins.watermark_of(3), origins.watermark_of(64), origins.watermark_of(127)),
            (Some(100), Some(50), Some(50))
        );
        assert!(origins.closed(3, 100) && !origins.closed(3, 101) && !origins.closed(70, 51));
        let kept = origins.keep_open(&part(), &[75; 100]).unwrap();
        let rows = StateRows::mine(kept, KeyGroupRange { start: 0, end: 128 }, "test state").unwrap();
        let groups = rows.column(KEY_GROUP, &DataType::UInt16).unwrap();
        let groups = groups.as_primitive::<UInt16Type>().values();
        assert!(!groups.is_empty() && groups.iter().all(|g| *g >= 64), "75 has closed at 100, not at 50");
        // Meta written before chains: whole state, nothing to drop.
        let old = crate::operators::meta_part(&[("watermark", 100)]).unwrap().batch;
        assert_eq!(Origins::from_meta(&old).unwrap().keep_open(&part(), &[0; 100]).unwrap().num_rows(), 100);
    }

    #[test]
    fn a_missing_or_retyped_column_is_refused_by_name() {
        let rows = StateRows::mine(part(), KeyGroupRange { start: 0, end: 128 }, "window state").unwrap();
        let e = rows.column("s0_0", &DataType::Int64).err().unwrap().to_string();
        assert!(e.contains("window state has no column 's0_0'"), "{e}");
        let e = rows.column("n", &DataType::Utf8).err().unwrap().to_string();
        assert!(e.contains("'n' as Int64, not Utf8"), "{e}");
        let no_groups = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)])),
            vec![Arc::new(Int64Array::from(vec![1]))],
        )
        .unwrap();
        let e = StateRows::mine(no_groups, KeyGroupRange { start: 0, end: 128 }, "session state").err().unwrap();
        assert!(e.to_string().contains("has no column '_key_group'"), "{e}");
    }
}

/// What the keyed operators' tests of incremental snapshots share: the task's keeping of chains, a restore's
/// concatenation of parts, and runs with restores and rescales to compare with uninterrupted runs.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod testing {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch};
    use nagare_core::KeyGroupRange;

    use crate::operator::{Operator, PartKind, StatePart};

    /// A small deterministic random generator (xorshift).
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        /// A number in `0..n`.
        pub fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n.max(1)
        }

        /// True with probability `percent`%.
        pub fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    /// How random input steps look: a step every `every` µs with up to `max_rows - 1` rows of `keys` keys, each at
    /// an event time from `behind` µs before the step to `span - behind - 1` after, and the watermark `lag` behind.
    pub struct Shape {
        pub every: i64,
        pub max_rows: u64,
        pub keys: u64,
        pub behind: i64,
        pub span: u64,
        pub lag: i64,
    }

    impl Shape {
        /// `steps` steps from `from`: rows `(key, time, value)` and the watermark after them.
        pub fn steps(&self, rng: &mut Rng, from: i64, steps: usize) -> Vec<Step> {
            (0..steps)
                .map(|i| {
                    let now = from + i as i64 * self.every;
                    let rows = (0..rng.below(self.max_rows))
                        .map(|_| {
                            let key = rng.below(self.keys) as i64;
                            (key, now - self.behind + rng.below(self.span) as i64, rng.below(100) as i64)
                        })
                        .collect();
                    (rows, now - self.lag)
                })
                .collect()
        }
    }

    /// What the task keeps of one subtask's snapshots: the whole parts of the last one, and each chain (base and
    /// deltas) as the uploader extends it.
    #[derive(Default, Clone)]
    pub struct Stored {
        whole: Vec<StatePart>,
        chains: BTreeMap<String, Vec<RecordBatch>>,
        /// Deltas in the chains now kept.
        pub deltas: usize,
    }

    impl Stored {
        /// Keeps a snapshot; returns the kind of its chained parts (or Whole).
        pub fn store(&mut self, parts: Vec<StatePart>) -> PartKind {
            self.whole.clear();
            let mut kind = PartKind::Whole;
            for p in parts {
                match p.kind {
                    PartKind::Whole => self.whole.push(p),
                    PartKind::Base => {
                        self.chains.insert(p.name, vec![p.batch]);
                        self.deltas = 0;
                        kind = PartKind::Base;
                    }
                    PartKind::Delta => {
                        self.chains.get_mut(&p.name).expect("a delta without a base").push(p.batch);
                        self.deltas += 1;
                        kind = PartKind::Delta;
                    }
                }
            }
            kind
        }

        /// The parts a restore reads from `stored` (several subtasks' after a rescale): each part's files
        /// concatenated, a chain's base first, as the checkpoint store reads them.
        pub fn parts(stored: &[&Stored]) -> Vec<StatePart> {
            let mut by_name: BTreeMap<String, Vec<RecordBatch>> = BTreeMap::new();
            for s in stored {
                for p in &s.whole {
                    by_name.entry(p.name.clone()).or_default().push(p.batch.clone());
                }
                for (name, chain) in &s.chains {
                    by_name.entry(name.clone()).or_default().extend(chain.iter().cloned());
                }
            }
            by_name
                .into_iter()
                .map(|(name, batches)| {
                    StatePart::new(&name, arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap())
                })
                .collect()
        }
    }

    /// One step of input: rows (key, event time, value), then a watermark.
    pub type Step = (Vec<(i64, i64, i64)>, i64);
    /// One step of input for two subtasks: rows, then a watermark for each.
    pub type Step2 = (Vec<(i64, i64, i64)>, i64, i64);

    /// Builds an operator owning key groups `range` (of 128).
    pub type Make<'a> = &'a dyn Fn(KeyGroupRange) -> Box<dyn Operator>;
    /// Builds an input batch of rows (key, event time, value).
    pub type Batch<'a> = &'a dyn Fn(&[(i64, i64, i64)]) -> RecordBatch;

    pub const ALL: KeyGroupRange = KeyGroupRange { start: 0, end: 128 };

    /// The key group of an Int64 key (of 128).
    pub fn key_group(key: i64) -> u32 {
        let keys: arrow::array::ArrayRef = Arc::new(Int64Array::from(vec![key]));
        u32::from(crate::operators::key_groups_of(&[keys], 1, 128).unwrap()[0])
    }

    fn step(op: &mut dyn Operator, batch: Batch, rows: &[(i64, i64, i64)], watermark: i64, out: &mut Vec<RecordBatch>) {
        if !rows.is_empty() {
            op.process(batch(rows), out).unwrap();
        }
        op.on_watermark(watermark, out).unwrap();
    }

    /// Output of one subtask over `steps` without checkpoints, up to the end of input.
    pub fn run_plain(make: Make, batch: Batch, steps: &[Step]) -> Vec<RecordBatch> {
        let mut op = make(ALL);
        let mut out = Vec::new();
        for (rows, w) in steps {
            step(op.as_mut(), batch, rows, *w, &mut out);
        }
        op.on_watermark(i64::MAX, &mut out).unwrap();
        out
    }

    /// Output of one subtask over `steps` snapshotting at random steps (now and then forced full, as after a failed
    /// upload) and restoring from what is stored at random snapshots, continuing with the restored operator. Returns
    /// the output and how many deltas the restored chains held in all.
    pub fn run_with_restores(make: Make, batch: Batch, steps: &[Step], seed: u64) -> (Vec<RecordBatch>, usize) {
        let mut rng = Rng::new(seed);
        let mut op = make(ALL);
        let mut stored = Stored::default();
        let mut out = Vec::new();
        let mut restored_deltas = 0;
        let mut just_restored = false;
        for (rows, w) in steps {
            if rng.chance(50) {
                let kind = stored.store(op.snapshot(rng.chance(5)).unwrap());
                if just_restored {
                    assert_eq!(kind, PartKind::Base, "a restored operator's first snapshot starts a chain");
                    just_restored = false;
                }
                if rng.chance(30) {
                    restored_deltas += stored.deltas;
                    op = make(ALL);
                    op.restore(Stored::parts(&[&stored])).unwrap();
                    just_restored = true;
                }
            }
            step(op.as_mut(), batch, rows, *w, &mut out);
        }
        op.on_watermark(i64::MAX, &mut out).unwrap();
        (out, restored_deltas)
    }

    /// Two subtasks (key groups 0..64 and 64..128, each with its own watermarks: `before` gives (rows, watermark of
    /// the first, watermark of the second)) snapshot at the same random steps; then the job is restored from the
    /// last snapshot into subtasks owning `ranges` and runs `after` (rows routed by key group). Returns the output
    /// of that run, and of the two subtasks running on instead.
    pub fn run_rescaled(
        make: Make,
        batch: Batch,
        before: &[Step2],
        after: &[Step],
        ranges: &[KeyGroupRange],
        seed: u64,
    ) -> (Vec<RecordBatch>, Vec<RecordBatch>) {
        let mut rng = Rng::new(seed);
        let old = [KeyGroupRange { start: 0, end: 64 }, KeyGroupRange { start: 64, end: 128 }];
        let mut ops: Vec<Box<dyn Operator>> = old.iter().map(|r| make(*r)).collect();
        let mut stored = vec![Stored::default(), Stored::default()];
        let mut out = Vec::new();
        let routed = |rows: &[(i64, i64, i64)], range: &KeyGroupRange| -> Vec<(i64, i64, i64)> {
            rows.iter().filter(|r| range.contains(key_group(r.0))).copied().collect()
        };
        for (i, (rows, wa, wb)) in before.iter().enumerate() {
            if i > 0 && rng.chance(60) {
                for (op, s) in ops.iter_mut().zip(&mut stored) {
                    s.store(op.snapshot(false).unwrap());
                }
            }
            for ((op, range), w) in ops.iter_mut().zip(&old).zip([wa, wb]) {
                step(op.as_mut(), batch, &routed(rows, range), *w, &mut out);
            }
        }
        // The checkpoint everything is restored from.
        for (op, s) in ops.iter_mut().zip(&mut stored) {
            s.store(op.snapshot(false).unwrap());
        }
        assert!(stored.iter().any(|s| s.deltas > 0), "the test restores chains with deltas");
        let mut rescaled_out = out.clone();
        let mut rescaled: Vec<Box<dyn Operator>> = ranges
            .iter()
            .map(|r| {
                let theirs: Vec<&Stored> = old
                    .iter()
                    .zip(&stored)
                    .filter(|(o, _)| o.start < r.end && r.start < o.end)
                    .map(|(_, s)| s)
                    .collect();
                let mut op = make(*r);
                op.restore(Stored::parts(&theirs)).unwrap();
                op
            })
            .collect();
        for (rows, w) in after {
            for (op, range) in ops.iter_mut().zip(&old) {
                step(op.as_mut(), batch, &routed(rows, range), *w, &mut out);
            }
            for (op, range) in rescaled.iter_mut().zip(ranges) {
                step(op.as_mut(), batch, &routed(rows, range), *w, &mut rescaled_out);
            }
        }
        for op in &mut ops {
            op.on_watermark(i64::MAX, &mut out).unwrap();
        }
        for op in &mut rescaled {
            op.on_watermark(i64::MAX, &mut rescaled_out).unwrap();
        }
        (rescaled_out, out)
    }
}
