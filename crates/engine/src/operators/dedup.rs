//! Dedup: `ROW_NUMBER() OVER (PARTITION BY key ORDER BY time [DESC]) = 1` on an unbounded stream.
//!
//! Semantics (event time): rows are held until the watermark passes them, then processed in event-time order (ties in
//! arrival order). A key's *group* starts at its first row and lasts for the TTL (`[t, t + ttl]`) or to the end of the
//! enclosing tumbling window. Keep-first emits the first row of each group as soon as it is processed; keep-last emits
//! the last row of a group when the group closes (the watermark passes its end). For rows that are not late this
//! equals the batch query over the same rows.
//!
//! Lateness is not loss: a row that arrives already behind the watermark is a duplicate when the key's remembered
//! group covers its time (keep-last may still take it as the new last), and otherwise the first of a new group:
//! keep-first emits it at once, keep-last when its group ends (at once if that has passed). A group started late is
//! remembered for the scope's length (`dedup_ttl`, or the window's size) counted from the watermark it arrived at,
//! so later copies of it are still recognised however late they come.
//!
//! Cost: held rows are never copied until emitted (one `interleave` per watermark); a table entry is 32 bytes (the
//! key's full hash, the group's end and where its bytes are in an append-only key arena), so a probe touches one cache
//! line and compares key bytes only when the 64-bit hashes agree; keep-first reclaims expired keys lazily, sweeping
//! the table only when it would grow, and the arena is compacted once most of it is dead.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::BuildHasher;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BinaryBuilder, BinaryViewArray, BooleanArray, Int64Array, LargeBinaryArray,
    LargeStringArray, StringArray, StringViewArray, StructArray, UInt16Array, UInt32Array, UInt64Array,
};
use arrow::compute::{concat_batches, filter_record_batch, interleave_record_batch, take_record_batch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow_row::{OwnedRow, RowConverter, Rows, SortField};
use datafusion::common::ScalarValue;
use datafusion::physical_expr::PhysicalExpr;
use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
use nagare_sql::{DedupScope, DedupSpec, Keep};

use super::{OperatorContext, event_times, key_groups_of, meta_part, meta_value};
use crate::error::{EngineError, Result};
use crate::metrics::NodeMetrics;
use crate::operator::{Operator, PartKind, StatePart, take_part};
use crate::state::Chain;

/// Input rows not yet behind the watermark, with their keys evaluated once at arrival.
struct Pending {
    batch: RecordBatch,
    keys: KeyColumns,
    /// The keys' hashes, taken on arrival while the batch is still in cache: by the time the watermark passes the
    /// rows it usually is not, and the table probe would wait for the key bytes first.
    hashes: Vec<u64>,
    times: Vec<i64>,
    min_t: i64,
    max_t: i64,
}

/// Where a keep-last group's current last row is.
enum Best {
    /// Row `(pending batch, row)` of the step being processed.
    InBatch(usize, usize),
    /// Saved from an earlier step.
    Stored(OwnedRow),
}

/// A key's current group: 32 bytes, two to a cache line.
struct Group {
    /// The key's full hash: rehashing never reads the arena, and most unequal keys differ here.
    hash: u64,
    key: KeyRef,
    /// Exclusive: rows at or after `end` start a new group (the start follows from the scope).
    end: i64,
    /// Keep-last's last row, and how long a group started late is remembered; `None` for keep-first groups started
    /// on time (most of them), so those cost no allocation.
    extra: Option<Box<Extra>>,
}

impl Group {
    /// Exclusive: the group is forgotten once the watermark reaches `until - 1`. `grace` is how long the scope
    /// keeps every group past its end (see [`DedupOperator::grace`]).
    fn until(&self, grace: i64) -> i64 {
        let until = self.end.saturating_add(grace);
        self.extra.as_ref().map_or(until, |e| e.keep_until.max(until))
    }

    /// Keep-last: whether this is group `generation`.
    fn is_generation(&self, generation: u64) -> bool {
        self.extra.as_ref().is_some_and(|e| e.generation == generation)
    }
}

/// What a group holds besides its span.
struct Extra {
    /// Keep-last: tells a group apart from a later group of the same key (expiry entries refer to it).
    generation: u64,
    /// Keep-last: the last row so far, its event time and where it is; `None` once it was emitted.
    best: Option<(i64, Best)>,
    /// Exclusive, like `end` and never before it: a group started by a late row is remembered past its end.
    keep_until: i64,
}

/// What a row behind the watermark is to the group its key has.
enum LateVerdict {
    /// The remembered group covers it.
    Duplicate,
    /// The first of a new group (the key is not remembered, or its group ended before the row).
    NewGroup,
    /// Older than the remembered group and outside it: emitted, but not remembered (one group per key is kept).
    Older,
}

/// Where a key's bytes are in the [`KeyArena`]: offset (high 40 bits) and length (low 24 bits).
#[derive(Clone, Copy)]
struct KeyRef(u64);

/// Keys longer than this are refused (the length has 24 bits in a [`KeyRef`]).
const MAX_KEY_BYTES: usize = (1 << 24) - 1;

impl KeyRef {
    fn new(start: usize, len: usize) -> KeyRef {
        KeyRef((start as u64) << 24 | len as u64)
    }

    fn len(self) -> usize {
        (self.0 & MAX_KEY_BYTES as u64) as usize
    }

    fn range(self) -> std::ops::Range<usize> {
        let start = (self.0 >> 24) as usize;
        start..start + self.len()
    }
}

/// The groups' keys back to back, so that table entries stay small; removed keys leave dead bytes until the
/// next compaction.
#[derive(Default)]
struct KeyArena {
    bytes: Vec<u8>,
    dead: usize,
}

impl KeyArena {
    fn push(&mut self, key: &[u8]) -> Result<KeyRef> {
        let start = self.bytes.len();
        if key.len() > MAX_KEY_BYTES || start >= 1 << 40 {
            return Err(EngineError::Internal(format!(
                "dedup key of {} bytes (or {start} bytes of keys) is beyond what one subtask holds",
                key.len()
            )));
        }
        self.bytes.extend_from_slice(key);
        Ok(KeyRef::new(start, key.len()))
    }

    fn get(&self, key: KeyRef) -> &[u8] {
        &self.bytes[key.range()]
    }

    /// The table's equality for `key` hashed to `hash`: the stored hash first, the bytes only when it agrees.
    fn is<'s>(&'s self, hash: u64, key: &'s [u8]) -> impl Fn(&Group) -> bool + 's {
        move |g| g.hash == hash && self.get(g.key) == key
    }

    /// Worth compacting: over 1 MiB dead and over half of the arena.
    fn mostly_dead(&self) -> bool {
        self.dead > 1 << 20 && self.dead * 2 > self.bytes.len()
    }
}

/// Copies the keys of the live groups into a fresh arena.
fn compact(groups: &mut HashTable<Group>, arena: &mut KeyArena) {
    // Room to grow back (up to the old capacity, at most 4x the live keys): with exactly the live bytes, the first
    // push after a compaction would copy them all again into fresh, page-faulted memory.
    let live = arena.bytes.len() - arena.dead;
    let mut bytes = Vec::with_capacity(arena.bytes.capacity().min(4 * live).max(live));
    for g in groups.iter_mut() {
        let key = &arena.bytes[g.key.range()];
        g.key = KeyRef::new(bytes.len(), key.len());
        bytes.extend_from_slice(key);
    }
    *arena = KeyArena { bytes, dead: 0 };
}

/// A batch's key column(s), read as bytes for hashing and equality.
enum KeyColumns {
    Utf8(StringArray),
    LargeUtf8(LargeStringArray),
    Utf8View(StringViewArray),
    Binary(BinaryArray),
    LargeBinary(LargeBinaryArray),
    BinaryView(BinaryViewArray),
    /// Several columns (or other types): arrow-row's encoding.
    Rows(Rows),
}

impl KeyColumns {
    /// Writes the key of `row` to `buf` (cleared first): the window's start when a window bounds the dedup (each
    /// window of a key is a group of its own), then a null tag and the bytes.
    fn encode_into(&self, row: usize, window: Option<i64>, buf: &mut Vec<u8>) {
        buf.clear();
        if let Some(start) = window {
            buf.extend_from_slice(&start.to_be_bytes());
        }
        let bytes: &[u8] = match self {
            KeyColumns::Rows(rows) => {
                buf.extend_from_slice(rows.row(row).as_ref());
                return;
            }
            KeyColumns::Utf8(a) if a.is_valid(row) => a.value(row).as_bytes(),
            KeyColumns::LargeUtf8(a) if a.is_valid(row) => a.value(row).as_bytes(),
            KeyColumns::Utf8View(a) if a.is_valid(row) => a.value(row).as_bytes(),
            KeyColumns::Binary(a) if a.is_valid(row) => a.value(row),
            KeyColumns::LargeBinary(a) if a.is_valid(row) => a.value(row),
            KeyColumns::BinaryView(a) if a.is_valid(row) => a.value(row),
            _ => {
                buf.push(0);
                return;
            }
        };
        buf.push(1);
        buf.extend_from_slice(bytes);
    }
}

/// The dedup operator of one subtask.
pub struct DedupOperator {
    keys: Vec<Arc<dyn PhysicalExpr>>,
    time_column: usize,
    keep: Keep,
    scope: DedupScope,
    in_schema: SchemaRef,
    out_schema: SchemaRef,
    key_converter: Option<RowConverter>,
    row_converter: Option<RowConverter>,
    watermark: i64,
    pending: Vec<Pending>,
    groups: HashTable<Group>,
    arena: KeyArena,
    hasher: hashbrown::DefaultHashBuilder,
    /// Keep-last only: (end, hash, generation), earliest end first. Groups started late may end before groups
    /// already queued, hence a heap.
    expiry: BinaryHeap<Reverse<(i64, u64, u64)>>,
    next_generation: u64,
    reported_entries: i64,
    scratch: Vec<u8>,
    /// Keep-first, after the first snapshot: groups started since the last snapshot, for an incremental one.
    changes: Option<Changes>,
    /// The current chain of snapshots (base and deltas).
    chain: Chain,
    /// Restoring window-bounded state written before keys began with their window.
    legacy_window_keys: bool,
    ctx: OperatorContext,
}

/// Groups started since the last snapshot: their keys, ends and how long they are remembered (about key length +
/// 20 bytes each).
struct Changes {
    keys: BinaryBuilder,
    ends: Vec<i64>,
    keep_until: Vec<i64>,
}

impl Changes {
    fn new() -> Self {
        Changes { keys: BinaryBuilder::new(), ends: Vec::new(), keep_until: Vec::new() }
    }

    fn push(&mut self, key: &[u8], end: i64, keep_until: i64) {
        self.keys.append_value(key);
        self.ends.push(end);
        self.keep_until.push(keep_until);
    }
}

/// A chain of snapshots holds at most this many rows per group in the table (see [`Chain::new`]). The table counts
/// expired groups until a sweep and a base leaves them out, so even at 1 a dedup whose keys expire as fast as new
/// ones come (its usual steady state) writes several deltas per base (tested below).
const CHAIN_ROWS_PER_GROUP: usize = 1;

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
            in_schema,
            out_schema,
            key_converter,
            row_converter,
            watermark: i64::MIN,
            pending: Vec::new(),
            groups: HashTable::new(),
            arena: KeyArena::default(),
            hasher: hashbrown::DefaultHashBuilder::default(),
            expiry: BinaryHeap::new(),
            next_generation: 0,
            reported_entries: 0,
            scratch: Vec::with_capacity(64),
            changes: None,
            chain: Chain::new(CHAIN_ROWS_PER_GROUP),
            legacy_window_keys: false,
            ctx,
        })
    }

    fn key_columns(&self, batch: &RecordBatch) -> Result<KeyColumns> {
        let n = batch.num_rows();
        let cols =
            self.keys.iter().map(|k| k.evaluate(batch).and_then(|v| v.into_array(n))).collect::<Result<Vec<_>, _>>()?;
        if let Some(conv) = &self.key_converter {
            return Ok(KeyColumns::Rows(conv.convert_columns(&cols)?));
        }
        let c: ArrayRef = cols.into_iter().next().ok_or_else(|| EngineError::Internal("dedup without key".into()))?;
        Ok(match c.data_type() {
            DataType::Utf8 => KeyColumns::Utf8(c.as_string::<i32>().clone()),
            DataType::LargeUtf8 => KeyColumns::LargeUtf8(c.as_string::<i64>().clone()),
            DataType::Utf8View => KeyColumns::Utf8View(c.as_string_view().clone()),
            DataType::Binary => KeyColumns::Binary(c.as_binary::<i32>().clone()),
            DataType::LargeBinary => KeyColumns::LargeBinary(c.as_binary::<i64>().clone()),
            DataType::BinaryView => KeyColumns::BinaryView(c.as_binary_view().clone()),
            other => return Err(EngineError::Internal(format!("unexpected key type {other}"))),
        })
    }

    /// Key groups of keys as stored in the table ([window start,] tag + bytes, or arrow-row encoding).
    fn key_groups_of_encoded(&self, keys: &BinaryArray) -> Result<Vec<u16>> {
        let n = keys.len();
        let without_window: BinaryArray;
        let keys = if matches!(self.scope, DedupScope::Window { .. }) {
            without_window = keys.iter().map(|k| k.map(|k| &k[WINDOW_PREFIX.min(k.len())..])).collect();
            &without_window
        } else {
            keys
        };
        let cols: Vec<ArrayRef> = match &self.key_converter {
            None => {
                // Tag byte 0 is NULL; otherwise the value's bytes follow the tag.
                let values: BinaryArray = keys
                    .iter()
                    .map(|k| k.and_then(|k| if k.first() == Some(&1) { Some(&k[1..]) } else { None }))
                    .collect();
                vec![Arc::new(values)]
            }
            Some(conv) => {
                let parser = conv.parser();
                conv.convert_rows(keys.iter().flatten().map(|k| parser.parse(k)))?
            }
        };
        key_groups_of(&cols, n, self.ctx.max_parallelism)
    }

    /// The group a row starting a new group at `t` gets: its start and exclusive end.
    fn group_bounds(&self, t: i64) -> (i64, i64) {
        match self.scope {
            DedupScope::Ttl { ttl_us } => (t, t.saturating_add(ttl_us).saturating_add(1)),
            DedupScope::Window { size_us } => {
                let start = window_of(self.scope, t).unwrap_or(t);
                (start, start.saturating_add(size_us))
            }
        }
    }

    /// How long every group is remembered past its end. A window's copies may come after the window closed (a
    /// queue's re-delivery): its keys are kept for one more window, so those are still recognised. A TTL group is
    /// remembered for exactly its span, which already is the TTL.
    fn grace(&self) -> i64 {
        match self.scope {
            DedupScope::Ttl { .. } => 0,
            DedupScope::Window { size_us } => size_us,
        }
    }

    /// How long a group lasts: the TTL (its span is `ttl + 1` µs, both ends included) or the window's size.
    fn scope_len(&self) -> i64 {
        match self.scope {
            DedupScope::Ttl { ttl_us } => ttl_us.saturating_add(1),
            DedupScope::Window { size_us } => size_us,
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

    /// The hash of every row's key, as the table hashes it.
    fn hash_keys(&mut self, keys: &KeyColumns, times: &[i64]) -> Vec<u64> {
        let scope = self.scope;
        (0..times.len())
            .map(|r| {
                keys.encode_into(r, window_of(scope, times[r]), &mut self.scratch);
                self.hasher.hash_one(&self.scratch[..])
            })
            .collect()
    }

    /// Rows at or behind the watermark: duplicates when their key's remembered group covers them, otherwise first
    /// occurrences, which are never dropped for being late. Keep-first emits them at once; keep-last holds them as
    /// its group's last until the group ends (emitting at once when that has passed). A group started here is
    /// remembered for the scope's length counted from the current watermark.
    #[allow(clippy::too_many_arguments)]
    fn handle_late(
        &mut self,
        batch: &RecordBatch,
        keys: &KeyColumns,
        hashes: &[u64],
        times: &[i64],
        late_rows: &[u32],
        out: &mut Vec<RecordBatch>,
    ) -> Result<()> {
        let watermark = self.watermark;
        let keep_last = self.keep == Keep::Last;
        let mut emit_now: Vec<u32> = Vec::new();
        let mut stored_rows: Option<Rows> = None;
        let mut kept = 0;
        let grace = self.grace();
        for &r in late_rows {
            let t = times[r as usize];
            let h = hashes[r as usize];
            keys.encode_into(r as usize, window_of(self.scope, t), &mut self.scratch);
            let scope = self.scope;
            let verdict = match self.groups.find_mut(h, self.arena.is(h, &self.scratch)) {
                None => LateVerdict::NewGroup,
                // Forgotten (even if not swept yet: what is remembered must not depend on when sweeps ran).
                Some(g) if g.until(grace).saturating_sub(1) <= watermark => LateVerdict::NewGroup,
                Some(g) if t >= g.end => LateVerdict::NewGroup,
                Some(g) => {
                    let start = group_start(scope, g.end);
                    // Under a TTL an older copy within the TTL of the group's start would have started the group
                    // itself: the group's first row is already out, so this one is the duplicate.
                    let covered =
                        t >= start || matches!(scope, DedupScope::Ttl { ttl_us } if t.saturating_add(ttl_us) >= start);
                    if !covered {
                        LateVerdict::Older
                    } else {
                        if let Some(extra) = g.extra.as_mut()
                            && let Some(best) = extra.best.as_mut()
                            && t >= best.0
                        {
                            let row = stored_row(self.row_converter.as_ref(), &mut stored_rows, batch, r as usize)?;
                            *best = (t, Best::Stored(row));
                        }
                        LateVerdict::Duplicate
                    }
                }
            };
            match verdict {
                LateVerdict::Duplicate => NodeMetrics::add(&self.ctx.metrics.duplicates, 1),
                LateVerdict::Older => {
                    kept += 1;
                    emit_now.push(r);
                }
                LateVerdict::NewGroup => {
                    kept += 1;
                    let (_, end) = self.group_bounds(t);
                    let keep_until = end.max(watermark.saturating_add(self.scope_len()).saturating_add(1));
                    let generation = self.next_generation;
                    self.next_generation += 1;
                    let extra = if keep_last {
                        // Its group has already ended: out at once, and remembered as emitted.
                        let best = if end.saturating_sub(1) <= watermark {
                            emit_now.push(r);
                            None
                        } else {
                            let row = stored_row(self.row_converter.as_ref(), &mut stored_rows, batch, r as usize)?;
                            Some((t, Best::Stored(row)))
                        };
                        self.expiry.push(Reverse((end, h, generation)));
                        Some(Box::new(Extra { generation, best, keep_until }))
                    } else {
                        emit_now.push(r);
                        let with_grace = end.saturating_add(self.grace());
                        (keep_until > with_grace).then(|| Box::new(Extra { generation, best: None, keep_until }))
                    };
                    self.sweep_if_full(watermark);
                    let scratch = &self.scratch;
                    match self.groups.entry(h, self.arena.is(h, scratch), |g| g.hash) {
                        Entry::Occupied(mut e) => {
                            let g = e.get_mut();
                            g.end = end;
                            g.extra = extra;
                        }
                        Entry::Vacant(v) => {
                            let key = self.arena.push(scratch)?;
                            v.insert(Group { hash: h, key, end, extra });
                        }
                    }
                    if let Some(changes) = self.changes.as_mut() {
                        changes.push(&self.scratch, end, keep_until);
                    }
                }
            }
        }
        NodeMetrics::add(&self.ctx.metrics.late_kept, kept);
        if !emit_now.is_empty() {
            out.push(self.with_row_number(take_record_batch(batch, &UInt32Array::from(emit_now))?)?);
        }
        Ok(())
    }

    /// Keep-first: drops closed groups when the table is about to grow, so memory follows the live keys.
    ///
    /// `now` is the event time of the row being processed: rows are processed in event-time order, so a group
    /// ending at or before it can never be joined again. (Not the target watermark: rows up to it are still to be
    /// processed and may belong to groups that end before it.)
    fn sweep_if_full(&mut self, now: i64) {
        if self.keep == Keep::First && self.groups.len() == self.groups.capacity() && self.groups.len() > 1024 {
            let grace = self.grace();
            let dead = &mut self.arena.dead;
            self.groups.retain(|g| {
                let open = g.until(grace) > now;
                if !open {
                    *dead += g.key.len();
                }
                open
            });
            if self.arena.mostly_dead() {
                compact(&mut self.groups, &mut self.arena);
            }
        }
    }

    /// A snapshot part of groups: key, key group, end, until when it is remembered and (keep-last) generation.
    fn groups_batch(
        &self,
        keys: BinaryArray,
        ends: ArrayRef,
        keep_until: ArrayRef,
        generations: Vec<u64>,
    ) -> Result<RecordBatch> {
        let key_groups = self.key_groups_of_encoded(&keys)?;
        let mut fields = vec![
            Field::new("key", DataType::Binary, false),
            Field::new(crate::state::KEY_GROUP, DataType::UInt16, false),
            Field::new("end", DataType::Int64, false),
            Field::new("keep_until", DataType::Int64, false),
        ];
        let mut cols: Vec<ArrayRef> = vec![Arc::new(keys), Arc::new(UInt16Array::from(key_groups)), ends, keep_until];
        if self.keep == Keep::Last {
            fields.push(Field::new("generation", DataType::UInt64, false));
            cols.push(Arc::new(UInt64Array::from(generations)));
        }
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
    }

    /// Restores a part of groups of this subtask's key groups: with their keep-last rows (`with_rows`), or
    /// keep-last groups whose row is out and whose key is still remembered. State written before `keep_until`
    /// existed is remembered to its end, as it was then.
    fn restore_groups(
        &mut self,
        groups: &RecordBatch,
        with_rows: bool,
        expiry: &mut Vec<(i64, u64, u64)>,
    ) -> Result<()> {
        let col = |name: &str| {
            groups
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| EngineError::Internal(format!("dedup state has no '{name}'")))
        };
        let keys = col("key")?;
        let keys = keys.as_binary_opt::<i32>().ok_or_else(|| EngineError::Internal("dedup key column".into()))?;
        let kg = col(crate::state::KEY_GROUP)?;
        let kg = kg
            .as_primitive_opt::<arrow::datatypes::UInt16Type>()
            .ok_or_else(|| EngineError::Internal("key group column".into()))?;
        let ends = col("end")?;
        let ends = ends.as_primitive_opt::<Int64Type>().ok_or_else(|| EngineError::Internal("end column".into()))?;
        let keep_until = match groups.column_by_name("keep_until") {
            Some(c) => c
                .as_primitive_opt::<Int64Type>()
                .ok_or_else(|| EngineError::Internal("keep_until column".into()))?
                .clone(),
            None => ends.clone(),
        };
        let keep_last = if self.keep == Keep::Last {
            let generation = col("generation")?;
            let generation = generation
                .as_primitive_opt::<arrow::datatypes::UInt64Type>()
                .ok_or_else(|| EngineError::Internal("generation column".into()))?
                .clone();
            let rows = if with_rows {
                let last_t = col("last_t")?;
                let last_t = last_t
                    .as_primitive_opt::<Int64Type>()
                    .ok_or_else(|| EngineError::Internal("last_t column".into()))?
                    .clone();
                let last = col("last")?;
                let conv =
                    self.row_converter.as_ref().ok_or_else(|| EngineError::Internal("no row converter".into()))?;
                let last = last.as_struct_opt().ok_or_else(|| EngineError::Internal("last column".into()))?;
                Some((last_t, conv.convert_columns(last.columns())?))
            } else {
                None
            };
            Some((generation, rows))
        } else {
            None
        };
        // One allocation instead of a rehash at every doubling (10 M keys: 7.6 s -> see `bench state`).
        self.groups.reserve(groups.num_rows(), |g| g.hash);
        let mut with_window = Vec::new();
        for i in 0..groups.num_rows() {
            if !self.ctx.key_groups.contains(u32::from(kg.value(i))) {
                continue;
            }
            let end = ends.value(i);
            let mut key = keys.value(i);
            if self.legacy_window_keys
                && let DedupScope::Window { size_us } = self.scope
            {
                // Written before keys began with their window: a group's window ends where the group does.
                with_window.clear();
                with_window.extend_from_slice(&end.saturating_sub(size_us).to_be_bytes());
                with_window.extend_from_slice(key);
                key = &with_window;
            }
            let h = self.hasher.hash_one(key);
            let until = keep_until.value(i).max(end);
            let Some((generation, rows)) = &keep_last else {
                // Keep-first state may come as a base and deltas: a key's latest group (largest end) wins.
                let with_grace = end.saturating_add(self.grace());
                if until.max(with_grace).saturating_sub(1) <= self.watermark {
                    continue;
                }
                let extra = |until: i64| {
                    (until > with_grace).then(|| Box::new(Extra { generation: 0, best: None, keep_until: until }))
                };
                match self.groups.entry(h, self.arena.is(h, key), |g| g.hash) {
                    Entry::Occupied(mut e) => {
                        let g = e.get_mut();
                        if end > g.end {
                            g.end = end;
                            g.extra = extra(until);
                        } else if end == g.end && until > g.until(0) {
                            g.extra = extra(until);
                        }
                    }
                    Entry::Vacant(v) => {
                        let key = self.arena.push(key)?;
                        v.insert(Group { hash: h, key, end, extra: extra(until) });
                    }
                }
                continue;
            };
            let generation = generation.value(i);
            let best = rows.as_ref().map(|(last_t, rows)| (last_t.value(i), Best::Stored(rows.row(i).owned())));
            // A group whose row is out is forgotten (or queued again) when this entry comes up.
            expiry.push((end, h, generation));
            let extra = Some(Box::new(Extra { generation, best, keep_until: until }));
            let key = self.arena.push(key)?;
            self.groups.insert_unique(h, Group { hash: h, key, end, extra }, |g| g.hash);
        }
        Ok(())
    }

    /// Held rows not yet behind the watermark, for a snapshot.
    fn pending_part(&self) -> Result<StatePart> {
        let mut held = Vec::new();
        for p in &self.pending {
            let mask: BooleanArray = p.times.iter().map(|t| Some(*t > self.watermark)).collect();
            held.push(filter_record_batch(&p.batch, &mask)?);
        }
        Ok(StatePart::new("pending", concat_batches(&self.in_schema, &held)?))
    }

    fn meta_part(&self) -> Result<StatePart> {
        // `window_keys`: keys start with their window (state written before that is converted on restore).
        meta_part(&[
            ("watermark", self.watermark),
            ("next_generation", self.next_generation as i64),
            ("window_keys", i64::from(matches!(self.scope, DedupScope::Window { .. }))),
        ])
    }

    /// Processes held rows with event time in `(previous watermark, watermark]` in event-time order, then closes
    /// keep-last groups that end.
    fn advance(&mut self, watermark: i64, out: &mut Vec<RecordBatch>) -> Result<()> {
        let previous = self.watermark;
        // (time, batch, row): batches are in arrival order, so sorting gives event time, then arrival.
        let mut ready: Vec<(i64, usize, usize)> = Vec::new();
        for (b, p) in self.pending.iter().enumerate() {
            if p.min_t > watermark {
                continue;
            }
            for (r, t) in p.times.iter().enumerate() {
                if *t > previous && *t <= watermark {
                    ready.push((*t, b, r));
                }
            }
        }
        ready.sort_unstable();

        let mut emit: Vec<(usize, usize)> = Vec::new();
        let mut emitted_stored: Vec<OwnedRow> = Vec::new();
        let mut touched: Vec<(u64, u64)> = Vec::new();
        let keep_last = self.keep == Keep::Last;
        for &(t, b, r) in &ready {
            let pending = &self.pending[b];
            pending.keys.encode_into(r, window_of(self.scope, t), &mut self.scratch);
            let h = pending.hashes[r];
            let (_, end) = self.group_bounds(t);
            self.sweep_if_full(t);
            let generation = self.next_generation;
            let scratch = &self.scratch;
            let mut new_group = false;
            match self.groups.entry(h, self.arena.is(h, scratch), |g| g.hash) {
                Entry::Occupied(mut e) => {
                    let g = e.get_mut();
                    if t < g.end {
                        NodeMetrics::add(&self.ctx.metrics.duplicates, 1);
                        // (A keep-last group whose row is out already, `best: None`, only remembers the key.)
                        if let Some(extra) = g.extra.as_mut()
                            && extra.best.is_some()
                        {
                            extra.best = Some((t, Best::InBatch(b, r)));
                            touched.push((h, extra.generation));
                        }
                    } else {
                        if let Some(extra) = g.extra.as_mut() {
                            match extra.best.take().map(|x| x.1) {
                                Some(Best::InBatch(bb, rr)) => emit.push((bb, rr)),
                                Some(Best::Stored(row)) => emitted_stored.push(row),
                                None => {}
                            }
                        }
                        g.extra = keep_last.then(|| {
                            touched.push((h, generation));
                            Box::new(Extra { generation, best: Some((t, Best::InBatch(b, r))), keep_until: end })
                        });
                        g.end = end;
                        new_group = true;
                    }
                }
                Entry::Vacant(v) => {
                    let extra = keep_last.then(|| {
                        touched.push((h, generation));
                        Box::new(Extra { generation, best: Some((t, Best::InBatch(b, r))), keep_until: end })
                    });
                    let key = self.arena.push(scratch)?;
                    v.insert(Group { hash: h, key, end, extra });
                    new_group = true;
                }
            }
            if new_group {
                self.next_generation += 1;
                match self.keep {
                    Keep::First => {
                        emit.push((b, r));
                        if let Some(changes) = self.changes.as_mut() {
                            changes.push(&self.scratch, end, end);
                        }
                    }
                    Keep::Last => self.expiry.push(Reverse((end, h, generation))),
                }
            }
        }

        // Keep-last: rows that are still a group's last move out of the batches before those are dropped.
        if !touched.is_empty() {
            let mut refs: Vec<(usize, usize)> = Vec::new();
            let mut owners: Vec<(u64, u64)> = Vec::new();
            for (h, generation) in touched {
                let found = self.groups.find(h, |g| g.is_generation(generation));
                if let Some(Some((_, Best::InBatch(b, r)))) = found.and_then(|g| g.extra.as_ref()).map(|l| &l.best) {
                    refs.push((*b, *r));
                    owners.push((h, generation));
                }
            }
            if !refs.is_empty() {
                let batches: Vec<&RecordBatch> = self.pending.iter().map(|p| &p.batch).collect();
                let rows_batch = interleave_record_batch(&batches, &refs)?;
                let conv =
                    self.row_converter.as_ref().ok_or_else(|| EngineError::Internal("no row converter".into()))?;
                let rows = conv.convert_columns(rows_batch.columns())?;
                for (i, (h, generation)) in owners.into_iter().enumerate() {
                    let found = self.groups.find_mut(h, |g| g.is_generation(generation));
                    if let Some(Some((_, best))) = found.and_then(|g| g.extra.as_mut()).map(|l| &mut l.best)
                        && matches!(best, Best::InBatch(..))
                    {
                        *best = Best::Stored(rows.row(i).owned());
                    }
                }
            }
        }
        if !emit.is_empty() {
            let batches: Vec<&RecordBatch> = self.pending.iter().map(|p| &p.batch).collect();
            out.push(self.with_row_number(interleave_record_batch(&batches, &emit)?)?);
        }
        self.pending.retain(|p| p.max_t > watermark);

        // Keep-last: close groups whose end the watermark has passed (their row goes out), and forget them once
        // they are not remembered any longer (groups started late are remembered past their end).
        let grace = self.grace();
        while let Some(&Reverse((end, h, generation))) = self.expiry.peek() {
            if end.saturating_sub(1) > watermark {
                break;
            }
            self.expiry.pop();
            let Ok(mut e) = self.groups.find_entry(h, |g| g.is_generation(generation)) else { continue };
            let g = e.get_mut();
            if let Some(Some((_, Best::Stored(row)))) = g.extra.as_mut().map(|x| x.best.take()) {
                emitted_stored.push(row);
            }
            let until = g.until(grace);
            if until.saturating_sub(1) > watermark {
                self.expiry.push(Reverse((until, h, generation)));
            } else {
                let (g, _) = e.remove();
                self.arena.dead += g.key.len();
            }
        }
        if self.arena.mostly_dead() {
            compact(&mut self.groups, &mut self.arena);
        }
        if !emitted_stored.is_empty() {
            let conv = self.row_converter.as_ref().ok_or_else(|| EngineError::Internal("no row converter".into()))?;
            let cols = conv.convert_rows(emitted_stored.iter().map(|r| r.row()))?;
            out.push(self.with_row_number(RecordBatch::try_new(self.in_schema.clone(), cols)?)?);
        }
        let entries = self.groups.len() as i64;
        self.ctx.metrics.state_entries.fetch_add(entries - self.reported_entries, std::sync::atomic::Ordering::Relaxed);
        self.reported_entries = entries;
        Ok(())
    }
}

/// Group columns being gathered for a snapshot part.
#[derive(Default)]
struct GroupColumns {
    keys: BinaryBuilder,
    ends: Vec<i64>,
    keep_until: Vec<i64>,
    generations: Vec<u64>,
}

impl GroupColumns {
    fn push(&mut self, key: &[u8], g: &Group, generation: Option<u64>) {
        self.keys.append_value(key);
        self.ends.push(g.end);
        // Without the scope's grace, which follows from the end.
        self.keep_until.push(g.until(0));
        self.generations.extend(generation);
    }

    fn finish(mut self, op: &DedupOperator, extra: Vec<(Field, ArrayRef)>) -> Result<RecordBatch> {
        let keys = self.keys.finish();
        op.groups_batch(
            keys,
            Arc::new(Int64Array::from(self.ends)),
            Arc::new(Int64Array::from(self.keep_until)),
            self.generations,
        )
        .and_then(|b| {
            if extra.is_empty() {
                return Ok(b);
            }
            let mut fields: Vec<Field> = b.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
            let mut cols = b.columns().to_vec();
            for (f, c) in extra {
                fields.push(f);
                cols.push(c);
            }
            Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
        })
    }
}

/// Row `r` of `batch` as keep-last stores it; `rows` caches the batch's conversion for the other rows of a call.
fn stored_row(
    converter: Option<&RowConverter>,
    rows: &mut Option<Rows>,
    batch: &RecordBatch,
    r: usize,
) -> Result<OwnedRow> {
    let conv = converter.ok_or_else(|| EngineError::Internal("no row converter".into()))?;
    let rows = match rows {
        Some(rows) => rows,
        None => rows.insert(conv.convert_columns(batch.columns())?),
    };
    Ok(rows.row(r).owned())
}

/// Bytes of the window start that keys of a window-bounded dedup begin with.
const WINDOW_PREFIX: usize = 8;

/// The window a row at `t` falls in, when a window bounds the dedup: its start.
fn window_of(scope: DedupScope, t: i64) -> Option<i64> {
    match scope {
        DedupScope::Ttl { .. } => None,
        DedupScope::Window { size_us } => Some(t.saturating_sub(t.rem_euclid(size_us))),
    }
}

/// The start (inclusive) of the group of `scope` that ends at `end`.
fn group_start(scope: DedupScope, end: i64) -> i64 {
    match scope {
        DedupScope::Ttl { ttl_us } => end.saturating_sub(ttl_us).saturating_sub(1),
        DedupScope::Window { size_us } => end.saturating_sub(size_us),
    }
}

impl Operator for DedupOperator {
    fn process(&mut self, batch: RecordBatch, out: &mut Vec<RecordBatch>) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let (mut times, nulls) = event_times(batch.column(self.time_column))?;
        if let Some(nulls) = nulls {
            // Rows without an event time cannot be ordered: they are taken as rows behind the watermark.
            for (i, t) in times.iter_mut().enumerate() {
                if nulls.is_null(i) {
                    *t = i64::MIN;
                }
            }
        }
        let min_t = times.iter().copied().min().unwrap_or(i64::MAX);
        let max_t = times.iter().copied().max().unwrap_or(i64::MIN);
        let keys = self.key_columns(&batch)?;
        let hashes = self.hash_keys(&keys, &times);
        if min_t <= self.watermark {
            let late_rows: Vec<u32> =
                times.iter().enumerate().filter(|(_, t)| **t <= self.watermark).map(|(i, _)| i as u32).collect();
            self.handle_late(&batch, &keys, &hashes, &times, &late_rows, out)?;
            if late_rows.len() == times.len() {
                return Ok(());
            }
        }
        // Late rows stay in the batch but are never picked: only times after the watermark are processed later.
        let min_t = times.iter().copied().filter(|t| *t > self.watermark).min().unwrap_or(i64::MAX);
        self.pending.push(Pending { batch, keys, hashes, times, min_t, max_t });
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

    fn snapshot(&mut self, force_full: bool) -> Result<Vec<StatePart>> {
        let watermark = self.watermark;
        let open = |until: i64| until.saturating_sub(1) > watermark;
        // Keep-first state is written incrementally: the groups started since the last snapshot, until the chain
        // is long or mostly dead rows, then a new base.
        let mut kind = PartKind::Whole;
        if self.keep == Keep::First {
            kind = PartKind::Base;
            if let Some(changes) = self.changes.as_mut()
                && self.chain.extends(force_full, changes.ends.len(), self.groups.len())
            {
                let keys = changes.keys.finish();
                let ends = std::mem::take(&mut changes.ends);
                let keep_until = std::mem::take(&mut changes.keep_until);
                let live: BooleanArray = keep_until.iter().map(|u| Some(open(*u))).collect();
                let keys = arrow::compute::filter(&keys, &live)?;
                let keys = keys.as_binary::<i32>().clone();
                let ends = arrow::compute::filter(&Int64Array::from(ends), &live)?;
                let keep_until = arrow::compute::filter(&Int64Array::from(keep_until), &live)?;
                let delta = self.groups_batch(keys, ends, keep_until, Vec::new())?;
                self.chain.wrote(PartKind::Delta, delta.num_rows());
                return Ok(vec![
                    StatePart::chained("groups", delta, PartKind::Delta),
                    self.pending_part()?,
                    self.meta_part()?,
                ]);
            }
            self.changes = Some(Changes::new());
        }
        // Groups with their keep-last row, and (keep-last) groups whose row is out but whose key is still remembered.
        let mut held = GroupColumns::default();
        let mut remembered = GroupColumns::default();
        let mut last_t = Vec::new();
        let mut last_rows: Vec<OwnedRow> = Vec::new();
        // Groups no longer remembered (not yet swept) can never be joined again: they are left out.
        let grace = self.grace();
        for g in self.groups.iter().filter(|g| open(g.until(grace))) {
            let key = self.arena.get(g.key);
            match (self.keep, g.extra.as_deref()) {
                (Keep::First, _) => held.push(key, g, None),
                (Keep::Last, Some(Extra { best: Some((t, Best::Stored(row))), generation, .. })) => {
                    held.push(key, g, Some(*generation));
                    last_t.push(*t);
                    last_rows.push(row.clone());
                }
                (Keep::Last, Some(Extra { best: None, generation, .. })) => remembered.push(key, g, Some(*generation)),
                (Keep::Last, _) => {
                    return Err(EngineError::Internal("keep-last group without a stored row at a barrier".into()));
                }
            }
        }
        let mut extra_cols: Vec<(Field, ArrayRef)> = Vec::new();
        if self.keep == Keep::Last {
            let conv = self.row_converter.as_ref().ok_or_else(|| EngineError::Internal("no row converter".into()))?;
            let rows = conv.convert_rows(last_rows.iter().map(|r| r.row()))?;
            let last = StructArray::try_new(self.in_schema.fields().clone(), rows, None)?;
            extra_cols.push((Field::new("last_t", DataType::Int64, false), Arc::new(Int64Array::from(last_t))));
            extra_cols.push((Field::new("last", last.data_type().clone(), false), Arc::new(last)));
        }
        let groups = held.finish(self, extra_cols)?;
        self.chain.wrote(kind, groups.num_rows());
        let mut parts = vec![StatePart::chained("groups", groups, kind), self.pending_part()?, self.meta_part()?];
        if self.keep == Keep::Last {
            parts.push(StatePart::new("remembered", remembered.finish(self, Vec::new())?));
        }
        Ok(parts)
    }

    fn restore(&mut self, mut parts: Vec<StatePart>) -> Result<()> {
        if let Some(meta) = take_part(&mut parts, "meta") {
            self.watermark = meta_value(&meta, "watermark")?.unwrap_or(i64::MIN);
            let next = meta.column_by_name("next_generation").and_then(|c| c.as_primitive_opt::<Int64Type>().cloned());
            self.next_generation = next.and_then(|c| arrow::compute::max(&c)).unwrap_or(0).max(0) as u64;
            self.legacy_window_keys =
                matches!(self.scope, DedupScope::Window { .. }) && meta.column_by_name("window_keys").is_none();
        }
        let mut expiry = Vec::new();
        if let Some(groups) = take_part(&mut parts, "groups") {
            self.restore_groups(&groups, true, &mut expiry)?;
        }
        if let Some(remembered) = take_part(&mut parts, "remembered") {
            self.restore_groups(&remembered, false, &mut expiry)?;
        }
        self.expiry = expiry.into_iter().map(Reverse).collect();
        if let Some(pending) = take_part(&mut parts, "pending")
            && pending.num_rows() > 0
        {
            let n = pending.num_rows();
            let key_cols = self
                .keys
                .iter()
                .map(|k| k.evaluate(&pending).and_then(|v| v.into_array(n)))
                .collect::<Result<Vec<_>, _>>()?;
            let batch = crate::state::rows_in(&pending, &key_cols, self.ctx.key_groups, self.ctx.max_parallelism)?;
            if batch.num_rows() > 0 {
                let mut unused = Vec::new();
                self.process(batch, &mut unused)?;
            }
        }
        if let Some(p) = parts.first() {
            return Err(EngineError::Internal(format!("unknown dedup state part '{}'", p.name)));
        }
        self.reported_entries = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{StringArray, TimestampMicrosecondArray, UInt64Array};
    use arrow::datatypes::{Field, Schema, TimeUnit};
    use datafusion::physical_expr::expressions::Column;

    use super::*;
    use crate::metrics::NodeMetrics;
    use crate::state::MAX_DELTAS;

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
            max_parallelism: 128,
            key_groups: nagare_core::KeyGroupRange { start: 0, end: 128 },
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
    }

    #[test]
    fn keep_first_state_follows_live_keys_not_input_size() {
        let (mut d, s, _) = op(Keep::First, DedupScope::Ttl { ttl_us: 10 });
        let mut out = Vec::new();
        for chunk in 0..200 {
            let ids: Vec<String> = (0..500).map(|i| format!("k{}", chunk * 500 + i)).collect();
            let rows: Vec<(&str, i64, &str)> =
                ids.iter().enumerate().map(|(i, id)| (id.as_str(), (chunk * 500 + i) as i64, "v")).collect();
            d.process(batch(&s, &rows), &mut out).unwrap();
            d.on_watermark((chunk * 500 + 499) as i64, &mut out).unwrap();
        }
        assert_eq!(out.iter().map(|b| b.num_rows()).sum::<usize>(), 100_000);
        assert!(d.state_entries() <= 4096, "expired keys are swept: {} held", d.state_entries());
    }

    #[test]
    fn key_arena_is_compacted_and_keys_stay_findable() {
        for keep in [Keep::First, Keep::Last] {
            let (mut d, s, m) = op(keep, DedupScope::Ttl { ttl_us: 10 });
            let pad = "k".repeat(300);
            let mut out = Vec::new();
            for chunk in 0..100i64 {
                let mut owned: Vec<(String, i64, &str)> =
                    (0..500).map(|i| (format!("{pad}{}", chunk * 500 + i), chunk * 500 + i, "first")).collect();
                if chunk > 0 {
                    // A re-delivery of the previous chunk's last key, inside its TTL: found after compactions.
                    owned.push((format!("{pad}{}", chunk * 500 - 1), chunk * 500 + 4, "again"));
                }
                let rows: Vec<(&str, i64, &str)> = owned.iter().map(|(k, t, v)| (k.as_str(), *t, *v)).collect();
                d.process(batch(&s, &rows), &mut out).unwrap();
                d.on_watermark(chunk * 500 + 499, &mut out).unwrap();
            }
            d.on_watermark(i64::MAX, &mut out).unwrap();
            let got = rows(&out);
            assert_eq!(got.len(), 50_000, "{keep:?}: one row per key");
            assert_eq!(NodeMetrics::get(&m.duplicates), 99, "{keep:?}");
            let again = got.iter().filter(|r| r.2 == "again").count();
            assert_eq!(again, if keep == Keep::Last { 99 } else { 0 }, "{keep:?}");
            // 15 MB of keys went through; the arena holds the live ones and at most about as many dead bytes.
            assert!(d.arena.bytes.len() < 4 << 20, "{keep:?}: arena of {} bytes", d.arena.bytes.len());
            assert!(d.arena.bytes.capacity() < 16 << 20, "{keep:?}: arena capacity {}", d.arena.bytes.capacity());
        }
    }

    #[test]
    fn a_late_first_occurrence_is_kept_and_its_key_remembered_from_when_it_was_seen() {
        let (mut d, s, m) = op(Keep::First, DedupScope::Ttl { ttl_us: 1_000 });
        let mut out = Vec::new();
        d.process(batch(&s, &[("a", 10, "x")]), &mut out).unwrap();
        d.on_watermark(50, &mut out).unwrap();
        out.clear();
        d.process(batch(&s, &[("a", 10, "x"), ("z", 5, "late first")]), &mut out).unwrap();
        assert_eq!(rows(&out), vec![("z".into(), 5, "late first".into())], "emitted at once, not dropped");
        assert_eq!(NodeMetrics::get(&m.duplicates), 1, "a@10 is a re-delivery");
        assert_eq!(NodeMetrics::get(&m.late_kept), 1);
        out.clear();
        // z's own span [5, 1005] has passed, but it was seen at watermark 50: remembered until 50 + TTL.
        d.on_watermark(1_040, &mut out).unwrap();
        d.process(batch(&s, &[("z", 5, "copy")]), &mut out).unwrap();
        assert!(out.is_empty(), "a later copy is still a duplicate");
        assert_eq!(NodeMetrics::get(&m.duplicates), 2);
        d.on_watermark(1_051, &mut out).unwrap();
        d.process(batch(&s, &[("z", 5, "after the TTL")]), &mut out).unwrap();
        assert_eq!(rows(&out), vec![("z".into(), 5, "after the TTL".into())], "forgotten after 50 + TTL");
        assert_eq!(NodeMetrics::get(&m.late_rows), 0, "a dedup drops nothing as late");
    }

    #[test]
    fn keep_last_holds_a_late_first_occurrence_until_its_group_ends() {
        let (mut d, s, m) = op(Keep::Last, DedupScope::Ttl { ttl_us: 100 });
        let mut out = Vec::new();
        d.process(batch(&s, &[("a", 500, "x")]), &mut out).unwrap();
        d.on_watermark(450, &mut out).unwrap();
        // y's group [420, 520] is still open: held as its last row; z's [100, 200] has ended: out at once.
        d.process(batch(&s, &[("y", 420, "y1"), ("z", 100, "z1")]), &mut out).unwrap();
        assert_eq!(rows(&out), vec![("z".into(), 100, "z1".into())]);
        out.clear();
        d.process(batch(&s, &[("y", 430, "y2"), ("z", 100, "z copy")]), &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(NodeMetrics::get(&m.duplicates), 2);
        d.on_watermark(520, &mut out).unwrap();
        assert_eq!(rows(&out), vec![("y".into(), 430, "y2".into())], "the later of y's rows, when its group ends");
        out.clear();
        // z was seen at watermark 450: remembered until 551 although its group ended at 200.
        d.process(batch(&s, &[("z", 100, "z copy 2")]), &mut out).unwrap();
        assert!(out.is_empty());
        d.on_watermark(i64::MAX, &mut out).unwrap();
        assert_eq!(rows(&out), vec![("a".into(), 500, "x".into())]);
        assert_eq!(NodeMetrics::get(&m.late_kept), 2);
    }

    #[test]
    fn a_window_remembers_its_keys_for_one_more_window() {
        for keep in [Keep::First, Keep::Last] {
            let (mut d, s, _) = op(keep, DedupScope::Window { size_us: 100 });
            let mut out = Vec::new();
            d.process(batch(&s, &[("a", 10, "a1"), ("b", 150, "b1")]), &mut out).unwrap();
            d.on_watermark(145, &mut out).unwrap();
            // Window [0, 100) closed at 99: a copy of a@10 within the next window's length is a duplicate, a key the
            // window has not seen is kept, and a row of a in a later window is a new group.
            d.process(batch(&s, &[("a", 10, "a copy"), ("c", 20, "late c"), ("a", 130, "a2")]), &mut out).unwrap();
            // c was seen at watermark 145: remembered until 145 + 100.
            d.on_watermark(240, &mut out).unwrap();
            d.process(batch(&s, &[("c", 20, "c copy")]), &mut out).unwrap();
            d.on_watermark(i64::MAX, &mut out).unwrap();
            let mut got = rows(&out);
            got.sort();
            let expected: Vec<(String, i64, String)> =
                [("a", 10, "a1"), ("a", 130, "a2"), ("b", 150, "b1"), ("c", 20, "late c")]
                    .iter()
                    .map(|(k, t, v)| (k.to_string(), *t, v.to_string()))
                    .collect();
            assert_eq!(got, expected, "{keep:?}");
        }
    }

    #[test]
    fn each_window_of_a_key_is_remembered_on_its_own() {
        for keep in [Keep::First, Keep::Last] {
            let (mut d, s, _) = op(keep, DedupScope::Window { size_us: 100 });
            let mut out = Vec::new();
            d.process(batch(&s, &[("a", 10, "w0"), ("a", 110, "w1")]), &mut out).unwrap();
            d.on_watermark(150, &mut out).unwrap();
            // A late row of a's first window after its second began: still that window's duplicate.
            d.process(batch(&s, &[("a", 20, "w0 again")]), &mut out).unwrap();
            d.on_watermark(i64::MAX, &mut out).unwrap();
            let mut got = rows(&out);
            got.sort();
            // Keep-last: "w0 again" came after w0's group had closed and its row was out; it is a duplicate.
            assert_eq!(got, vec![("a".into(), 10, "w0".into()), ("a".into(), 110, "w1".into())], "{keep:?}");
        }
    }

    #[test]
    fn window_state_written_before_keys_carried_their_window_is_restored() {
        let (mut d, s, _) = op(Keep::First, DedupScope::Window { size_us: 100 });
        let mut out = Vec::new();
        d.process(batch(&s, &[("a", 10, "first")]), &mut out).unwrap();
        d.on_watermark(50, &mut out).unwrap();
        // The previous format: keys without their window, no `window_keys` in meta.
        let mut parts = d.snapshot(true).unwrap();
        for p in parts.iter_mut() {
            if p.name == "groups" {
                let keys = p.batch.column_by_name("key").unwrap().as_binary::<i32>().clone();
                let old: BinaryArray = keys.iter().map(|k| k.map(|k| &k[WINDOW_PREFIX..])).collect();
                let mut cols = p.batch.columns().to_vec();
                cols[0] = Arc::new(old);
                p.batch = RecordBatch::try_new(p.batch.schema(), cols).unwrap();
            } else if p.name == "meta" {
                p.batch = p.batch.project(&[0, 1]).unwrap();
            }
        }
        let (mut restored, _, m) = op(Keep::First, DedupScope::Window { size_us: 100 });
        restored.restore(parts).unwrap();
        restored.process(batch(&s, &[("a", 30, "copy")]), &mut out).unwrap();
        restored.on_watermark(i64::MAX, &mut out).unwrap();
        assert_eq!(rows(&out), vec![("a".into(), 10, "first".into())]);
        assert_eq!(NodeMetrics::get(&m.duplicates), 1, "the old key was found under its window");
    }

    /// Deterministic pseudo-random numbers (xorshift), enough to shuffle test input.
    struct Xorshift(u64);

    impl Xorshift {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n.max(1)
        }
    }

    /// Events one second apart, 10 % of them delivered twice, in the order `reorder` gives; in batches of 50.
    fn out_of_order_input(
        events: usize,
        reorder: impl Fn(&mut Vec<(i64, String, i64)>, &mut Xorshift),
    ) -> (Vec<Vec<(String, i64)>>, usize) {
        let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
        // (arrival time, id, event time)
        let mut deliveries: Vec<(i64, String, i64)> = Vec::new();
        for i in 0..events {
            let t = i as i64 * 1_000_000;
            deliveries.push((t, format!("e{i:05}"), t));
            if rng.below(10) == 0 {
                deliveries.push((t + rng.below(30_000_000) as i64, format!("e{i:05}"), t));
            }
        }
        reorder(&mut deliveries, &mut rng);
        let batches = deliveries.chunks(50).map(|c| c.iter().map(|(_, id, t)| (id.clone(), *t)).collect()).collect();
        (batches, events)
    }

    /// Every id of the input comes out exactly once, for both keeps and scopes, uninterrupted and restored from
    /// snapshots taken at several points.
    fn every_id_exactly_once(batches: &[Vec<(String, i64)>], distinct: usize, scopes: &[DedupScope]) {
        let batches: Vec<Vec<(&str, i64, &str)>> =
            batches.iter().map(|b| b.iter().map(|(id, t)| (id.as_str(), *t, "v")).collect()).collect();
        for keep in [Keep::First, Keep::Last] {
            for scope in scopes {
                for cut in [None, Some(1), Some(batches.len() / 3), Some(batches.len() - 2)] {
                    let got = run(keep, *scope, &batches, cut);
                    let ids: std::collections::BTreeSet<&String> = got.iter().map(|r| &r.0).collect();
                    assert_eq!(ids.len(), distinct, "{keep:?} {scope:?} cut {cut:?}: every id");
                    assert_eq!(got.len(), distinct, "{keep:?} {scope:?} cut {cut:?}: no id twice");
                }
            }
        }
    }

    #[test]
    fn input_whose_first_part_comes_last_loses_nothing() {
        // Case 1 of the issue: the first 15 % of the file moved to its end, far behind the watermark.
        let (batches, distinct) = out_of_order_input(3_000, |d, _| {
            d.sort_by_key(|x| x.0);
            let n = d.len() * 15 / 100;
            d.rotate_left(n);
        });
        let hour = 3_600_000_000;
        every_id_exactly_once(
            &batches,
            distinct,
            &[DedupScope::Ttl { ttl_us: hour }, DedupScope::Window { size_us: hour }],
        );
    }

    #[test]
    fn redeliveries_up_to_an_hour_late_lose_nothing_and_repeat_nothing() {
        // As an SQS queue delivers: 10 % of events (originals or copies) come up to an hour late.
        let (batches, distinct) = out_of_order_input(6_000, |d, rng| {
            for x in d.iter_mut() {
                if rng.below(10) == 0 {
                    x.0 += rng.below(3_600_000_000) as i64;
                }
            }
            d.sort_by_key(|x| x.0);
        });
        // The TTL covers the longest gap between two deliveries of one event; a window remembers its keys for one
        // more window, so one of two hours does.
        every_id_exactly_once(
            &batches,
            distinct,
            &[DedupScope::Ttl { ttl_us: 2 * 3_600_000_000 }, DedupScope::Window { size_us: 2 * 3_600_000_000 }],
        );
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

    /// Runs rows through a dedup, optionally snapshotting and restoring into a fresh operator after `cut` batches.
    fn run(
        keep: Keep,
        scope: DedupScope,
        batches: &[Vec<(&str, i64, &str)>],
        cut: Option<usize>,
    ) -> Vec<(String, i64, String)> {
        let (mut d, s, _) = op(keep, scope);
        let mut out = Vec::new();
        for (i, rows) in batches.iter().enumerate() {
            if Some(i) == cut {
                let parts = d.snapshot(false).unwrap();
                // Snapshots go through Parquet in real checkpoints; round-trip them the same way.
                let parts = parts
                    .into_iter()
                    .map(|p| {
                        let bytes = crate::checkpoint::store::CheckpointStore::encode(&p.batch).unwrap();
                        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
                            .unwrap()
                            .build()
                            .unwrap();
                        let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
                        let batch = if batches.is_empty() {
                            RecordBatch::new_empty(p.batch.schema())
                        } else {
                            concat_batches(&batches[0].schema(), &batches).unwrap()
                        };
                        StatePart::new(&p.name, batch)
                    })
                    .collect();
                let (mut fresh, _, _) = op(keep, scope);
                fresh.restore(parts).unwrap();
                d = fresh;
            }
            step(&mut d, &s, rows, &mut out);
        }
        flush(&mut d, &mut out)
    }

    /// One batch in, then the watermark to 5 µs before its latest row.
    fn step(d: &mut DedupOperator, s: &SchemaRef, rows: &[(&str, i64, &str)], out: &mut Vec<RecordBatch>) {
        d.process(batch(s, rows), out).unwrap();
        let wm = rows.iter().map(|r| r.1).max().unwrap() - 5;
        d.on_watermark(wm, out).unwrap();
    }

    /// End of input: every group closes; the rows emitted over the run, sorted.
    fn flush(d: &mut DedupOperator, out: &mut Vec<RecordBatch>) -> Vec<(String, i64, String)> {
        d.on_watermark(i64::MAX, out).unwrap();
        let mut r = rows(out);
        r.sort();
        r
    }

    #[test]
    fn a_restored_snapshot_continues_exactly_like_an_uninterrupted_run() {
        let batches = vec![
            vec![("a", 10, "a1"), ("b", 12, "b1"), ("c", 30, "c1")],
            vec![("a", 14, "a2"), ("d", 20, "d1"), ("b", 40, "b2")],
            vec![("a", 8, "late a"), ("c", 33, "c2"), ("e", 60, "e1"), ("a", 90, "a3")],
            vec![("e", 61, "e2"), ("f", 100, "f1"), ("a", 95, "a4")],
        ];
        for (keep, scope) in [
            (Keep::First, DedupScope::Ttl { ttl_us: 20 }),
            (Keep::Last, DedupScope::Ttl { ttl_us: 20 }),
            (Keep::First, DedupScope::Window { size_us: 50 }),
            (Keep::Last, DedupScope::Window { size_us: 50 }),
        ] {
            let whole = run(keep, scope, &batches, None);
            for cut in 1..batches.len() {
                assert_eq!(
                    run(keep, scope, &batches, Some(cut)),
                    whole,
                    "{keep:?} {scope:?} restored before batch {cut}"
                );
            }
        }
    }

    #[test]
    fn sweeping_during_the_final_flush_keeps_open_groups() {
        // Regression: sweeps during a step once used the step's target watermark, so the flush at the end of input
        // (watermark MAX) forgot every key and let later duplicates through.
        let (mut d, s, m) = op(Keep::First, DedupScope::Ttl { ttl_us: 1_000_000 });
        let ids: Vec<String> = (0..5_000).map(|i| format!("k{i}")).collect();
        let mut rows: Vec<(&str, i64, &str)> = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            rows.push((id.as_str(), i as i64 / 40, "orig"));
            if i >= 100 {
                rows.push((ids[i - 100].as_str(), (i - 100) as i64 / 40, "again"));
            }
        }
        let mut out = Vec::new();
        d.process(batch(&s, &rows), &mut out).unwrap();
        d.on_watermark(i64::MAX, &mut out).unwrap();
        assert_eq!(out.iter().map(|b| b.num_rows()).sum::<usize>(), 5_000);
        assert_eq!(NodeMetrics::get(&m.duplicates), 4_900);
    }

    /// Snapshots before every batch, keeping chains as the uploader does, and restores from the snapshot taken
    /// before batch `cut`: a base plus deltas must restore the same state as a full snapshot.
    fn run_incremental(
        keep: Keep,
        scope: DedupScope,
        batches: &[Vec<(&str, i64, &str)>],
        cut: usize,
    ) -> (Vec<(String, i64, String)>, usize) {
        let (mut d, s, _) = op(keep, scope);
        let mut out = Vec::new();
        let mut chain: Vec<RecordBatch> = Vec::new();
        let mut deltas = 0;
        for (i, rows) in batches.iter().enumerate() {
            if i > 0 {
                let mut parts = d.snapshot(false).unwrap();
                for p in &parts {
                    match p.kind {
                        PartKind::Base => chain = vec![p.batch.clone()],
                        PartKind::Delta => {
                            chain.push(p.batch.clone());
                            // Deltas in the chain that is restored.
                            deltas += usize::from(i <= cut);
                        }
                        PartKind::Whole => {}
                    }
                }
                if i == cut {
                    parts.retain(|p| p.kind == PartKind::Whole);
                    if !chain.is_empty() {
                        let groups = concat_batches(&chain[0].schema(), &chain).unwrap();
                        parts.push(StatePart::new("groups", groups));
                    }
                    let (mut fresh, _, _) = op(keep, scope);
                    fresh.restore(parts).unwrap();
                    d = fresh;
                }
            }
            step(&mut d, &s, rows, &mut out);
        }
        (flush(&mut d, &mut out), deltas)
    }

    #[test]
    fn a_base_and_deltas_restore_like_a_full_snapshot() {
        let batches = vec![
            vec![("a", 10, "a1"), ("b", 12, "b1"), ("c", 30, "c1")],
            vec![("a", 14, "a2"), ("d", 20, "d1"), ("b", 40, "b2")],
            vec![("a", 8, "late a"), ("c", 33, "c2"), ("e", 60, "e1"), ("a", 90, "a3")],
            vec![("e", 61, "e2"), ("f", 100, "f1"), ("a", 95, "a4"), ("b", 99, "b3")],
            vec![("a", 112, "a5"), ("g", 120, "g1"), ("f", 104, "f2")],
            vec![("g", 125, "g2"), ("a", 140, "a6"), ("h", 150, "h1")],
        ];
        for (keep, scope) in [
            (Keep::First, DedupScope::Ttl { ttl_us: 20 }),
            (Keep::First, DedupScope::Window { size_us: 50 }),
            (Keep::Last, DedupScope::Ttl { ttl_us: 20 }),
        ] {
            let whole = run(keep, scope, &batches, None);
            for cut in 1..batches.len() {
                let (got, deltas) = run_incremental(keep, scope, &batches, cut);
                assert_eq!(got, whole, "{keep:?} {scope:?} restored from the chain before batch {cut}");
                // Keep-first writes deltas after its first (full) snapshot; keep-last always writes everything.
                assert_eq!(deltas > 0, keep == Keep::First && cut > 1, "{keep:?} {scope:?} cut {cut}: {deltas}");
            }
        }
    }

    #[test]
    fn a_dedup_whose_keys_expire_as_fast_as_new_ones_come_still_writes_deltas() {
        let (mut d, s, _) = op(Keep::First, DedupScope::Ttl { ttl_us: 4_000 });
        let mut out = Vec::new();
        let kind = |parts: &[StatePart]| parts.iter().find(|p| p.name == "groups").unwrap().kind;
        let mut kinds = Vec::new();
        // 1,000 new keys every 1,000 µs, remembered for 4,000 µs: some 4,000-5,000 live keys once steady.
        for step in 0..40i64 {
            let ids: Vec<String> = (0..1_000).map(|i| format!("k{step}-{i}")).collect();
            let rows: Vec<(&str, i64, &str)> = ids.iter().map(|id| (id.as_str(), step * 1_000 + 500, "x")).collect();
            d.process(batch(&s, &rows), &mut out).unwrap();
            d.on_watermark(step * 1_000 + 999, &mut out).unwrap();
            kinds.push(kind(&d.snapshot(false).unwrap()));
        }
        let steady = &kinds[20..];
        let deltas = steady.iter().filter(|k| **k == PartKind::Delta).count();
        assert!(deltas * 2 >= steady.len(), "steady state: at least every other snapshot a delta: {steady:?}");
        assert!(steady.contains(&PartKind::Base), "and a new base once the deltas hold as many rows as the state");
    }

    #[test]
    fn forced_or_long_chains_start_a_new_base() {
        let (mut d, s, _) = op(Keep::First, DedupScope::Ttl { ttl_us: 1_000_000 });
        let mut out = Vec::new();
        let kind = |parts: &[StatePart]| parts.iter().find(|p| p.name == "groups").unwrap().kind;
        assert_eq!(kind(&d.snapshot(false).unwrap()), PartKind::Base, "the first snapshot is full");
        d.process(batch(&s, &[("a", 10, "x")]), &mut out).unwrap();
        d.on_watermark(20, &mut out).unwrap();
        let parts = d.snapshot(false).unwrap();
        assert_eq!(kind(&parts), PartKind::Delta);
        assert_eq!(parts[0].batch.num_rows(), 1, "only the new group");
        assert_eq!(kind(&d.snapshot(true).unwrap()), PartKind::Base, "forced after a failed upload");
        for _ in 0..=MAX_DELTAS {
            assert_eq!(kind(&d.snapshot(false).unwrap()), PartKind::Delta);
        }
        assert_eq!(kind(&d.snapshot(false).unwrap()), PartKind::Base, "compacted after {MAX_DELTAS} deltas");
    }
}
