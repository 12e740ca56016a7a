//! The collapse operator in front of upsert sinks: per key, only the last change of each checkpoint interval goes
//! on, so the destination applies one image per key per checkpoint instead of every intermediate change.
//!
//! "Last" is the greatest sequence (the sink's `sequence_by` columns, compared as a tuple); on a tie, the change
//! that arrived last. Changes are held until the checkpoint barrier passes (`on_barrier`), then emitted; nothing is
//! held across a checkpoint, so the operator has no state to snapshot. Without checkpoints each input batch is
//! collapsed on its own.

use std::collections::HashMap;

use arrow::array::RecordBatch;
use arrow::compute::interleave_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::row::{OwnedRow, RowConverter, SortField};
use nagare_sql::CollapseSpec;

use crate::error::Result;
use crate::operator::Operator;

/// Held batches are compacted to the winning rows when they hold this many more rows than there are keys.
const COMPACT_SLACK: usize = 64 * 1024;

/// See the module docs.
pub struct CollapseOperator {
    spec: CollapseSpec,
    keys: RowConverter,
    sequence: RowConverter,
    /// Per key (its row-format bytes): its greatest sequence so far and where that row is (batch, row).
    winners: HashMap<Box<[u8]>, (OwnedRow, usize, usize)>,
    held: Vec<RecordBatch>,
    held_rows: usize,
    /// Whether barriers come (checkpoints); without them every batch is emitted collapsed at once.
    hold_until_barrier: bool,
}

impl std::fmt::Debug for CollapseOperator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollapseOperator").field("keys", &self.winners.len()).field("held", &self.held_rows).finish()
    }
}

impl CollapseOperator {
    /// A collapse over rows of `schema`; `hold_until_barrier` when the job takes checkpoints.
    pub fn new(spec: &CollapseSpec, schema: &SchemaRef, hold_until_barrier: bool) -> Result<Self> {
        let fields = |cols: &[usize]| -> Vec<SortField> {
            cols.iter().map(|i| SortField::new(schema.field(*i).data_type().clone())).collect()
        };
        Ok(CollapseOperator {
            keys: RowConverter::new(fields(&spec.keys))?,
            sequence: RowConverter::new(fields(&spec.sequence))?,
            spec: spec.clone(),
            winners: HashMap::new(),
            held: Vec::new(),
            held_rows: 0,
            hold_until_barrier,
        })
    }

    fn take(&mut self, out: &mut Vec<RecordBatch>) -> Result<()> {
        if self.winners.is_empty() {
            self.held.clear();
            self.held_rows = 0;
            return Ok(());
        }
        // Winners in arrival order of their rows, so the output keeps the input's order.
        let mut at: Vec<(usize, usize)> = self.winners.drain().map(|(_, (_, b, r))| (b, r)).collect();
        at.sort_unstable();
        let held: Vec<&RecordBatch> = self.held.iter().collect();
        out.push(interleave_record_batch(&held, &at)?);
        self.held.clear();
        self.held_rows = 0;
        Ok(())
    }

    /// Replaces the held batches by one holding only the current winners.
    fn compact(&mut self) -> Result<()> {
        let mut out = Vec::new();
        let winners: Vec<(Box<[u8]>, OwnedRow)> = {
            let mut w: Vec<_> = self.winners.iter().map(|(k, (s, b, r))| (k.clone(), s.clone(), *b, *r)).collect();
            w.sort_unstable_by_key(|(_, _, b, r)| (*b, *r));
            w.into_iter().map(|(k, s, _, _)| (k, s)).collect()
        };
        self.take(&mut out)?;
        if let Some(batch) = out.pop() {
            for (row, (k, s)) in winners.into_iter().enumerate() {
                self.winners.insert(k, (s, 0, row));
            }
            self.held_rows = batch.num_rows();
            self.held.push(batch);
        }
        Ok(())
    }
}

impl Operator for CollapseOperator {
    fn process(&mut self, batch: RecordBatch, out: &mut Vec<RecordBatch>) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let cols = |idx: &[usize]| idx.iter().map(|i| batch.column(*i).clone()).collect::<Vec<_>>();
        let keys = self.keys.convert_columns(&cols(&self.spec.keys))?;
        let seqs = self.sequence.convert_columns(&cols(&self.spec.sequence))?;
        let b = self.held.len();
        for r in 0..batch.num_rows() {
            let seq = seqs.row(r);
            let key = keys.row(r);
            match self.winners.get_mut(key.as_ref()) {
                // Later arrivals win ties.
                Some(w) if w.0.row() > seq => {}
                Some(w) => *w = (seq.owned(), b, r),
                None => {
                    self.winners.insert(key.as_ref().into(), (seq.owned(), b, r));
                }
            }
        }
        self.held_rows += batch.num_rows();
        self.held.push(batch);
        if !self.hold_until_barrier {
            return self.take(out);
        }
        if self.held_rows > 2 * self.winners.len() + COMPACT_SLACK {
            self.compact()?;
        }
        Ok(())
    }

    fn on_barrier(&mut self, out: &mut Vec<RecordBatch>) -> Result<()> {
        self.take(out)
    }

    fn on_end(&mut self, out: &mut Vec<RecordBatch>) -> Result<()> {
        self.take(out)
    }

    fn state_entries(&self) -> usize {
        self.winners.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use arrow::array::{AsArray, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};

    use super::*;

    fn batch(rows: &[(&str, i64, i64)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("seq", DataType::Int64, false),
            Field::new("v", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())),
                Arc::new(Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
                Arc::new(Int64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())),
            ],
        )
        .unwrap()
    }

    fn rows(out: &[RecordBatch]) -> Vec<(String, i64, i64)> {
        out.iter()
            .flat_map(|b| {
                (0..b.num_rows()).map(move |i| {
                    (
                        b.column(0).as_string::<i32>().value(i).to_string(),
                        b.column(1).as_primitive::<Int64Type>().value(i),
                        b.column(2).as_primitive::<Int64Type>().value(i),
                    )
                })
            })
            .collect()
    }

    fn op(hold: bool) -> CollapseOperator {
        let b = batch(&[]);
        CollapseOperator::new(&CollapseSpec { keys: vec![0], sequence: vec![1] }, &b.schema(), hold).unwrap()
    }

    #[test]
    fn the_greatest_sequence_wins_and_ties_go_to_the_later_arrival() {
        let mut c = op(true);
        let mut out = Vec::new();
        c.process(batch(&[("a", 2, 20), ("b", 1, 10), ("a", 1, 11)]), &mut out).unwrap();
        c.process(batch(&[("b", 1, 12), ("c", 5, 50), ("a", 3, 30), ("c", 4, 40)]), &mut out).unwrap();
        assert!(out.is_empty(), "held until the barrier");
        assert_eq!(c.state_entries(), 3);
        c.on_barrier(&mut out).unwrap();
        assert_eq!(rows(&out), vec![("b".into(), 1, 12), ("c".into(), 5, 50), ("a".into(), 3, 30)]);
        out.clear();
        // After the barrier a key starts over: an older sequence is still emitted (the sink's destination orders).
        c.process(batch(&[("a", 1, 1)]), &mut out).unwrap();
        c.on_end(&mut out).unwrap();
        assert_eq!(rows(&out), vec![("a".into(), 1, 1)]);
    }

    #[test]
    fn compaction_keeps_the_same_winners() {
        let mut c = op(true);
        let mut out = Vec::new();
        let mut expected = std::collections::BTreeMap::new();
        for round in 0..40i64 {
            let rows: Vec<(String, i64, i64)> = (0..5_000i64)
                .map(|i| (format!("k{}", (i * 7 + round) % 1_000), (i + round) % 97, round * 10_000 + i))
                .collect();
            for (k, s, v) in &rows {
                let e = expected.entry(k.clone()).or_insert((*s, *v));
                if *s >= e.0 {
                    *e = (*s, *v);
                }
            }
            let refs: Vec<(&str, i64, i64)> = rows.iter().map(|(k, s, v)| (k.as_str(), *s, *v)).collect();
            c.process(batch(&refs), &mut out).unwrap();
        }
        assert!(c.held_rows < 100_000, "held batches were compacted: {}", c.held_rows);
        c.on_barrier(&mut out).unwrap();
        let mut got = rows(&out);
        got.sort();
        let want: Vec<(String, i64, i64)> = expected.into_iter().map(|(k, (s, v))| (k, s, v)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn without_checkpoints_each_batch_is_collapsed_at_once() {
        let mut c = op(false);
        let mut out = Vec::new();
        c.process(batch(&[("a", 1, 1), ("a", 2, 2), ("b", 1, 3)]), &mut out).unwrap();
        assert_eq!(rows(&out), vec![("a".into(), 2, 2), ("b".into(), 1, 3)]);
    }
}
