//! The operator interface: whole Arrow batches in, whole batches out, driven by a task.

use arrow::record_batch::RecordBatch;

use crate::error::{EngineError, Result};

/// How a state part relates to the same part in earlier checkpoints: large state is written incrementally, as a
/// base followed by deltas, so a checkpoint costs what changed rather than everything held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartKind {
    /// Everything, stored with this checkpoint only.
    Whole,
    /// Everything, and the start of a chain that later deltas extend.
    Base,
    /// Only what changed since the previous snapshot; restored by reading the chain's base and every delta after it
    /// (the operator must merge them regardless of order).
    Delta,
}

/// A named piece of an operator's state, as rows: what a checkpoint stores (as Parquet) and a restore reads back.
#[derive(Debug, Clone)]
pub struct StatePart {
    /// Which piece (`groups`, `pending`, `meta`, ...), unique within the operator.
    pub name: String,
    /// The rows.
    pub batch: RecordBatch,
    /// Whole, or part of a chain.
    pub kind: PartKind,
}

impl StatePart {
    /// A part stored whole.
    pub fn new(name: &str, batch: RecordBatch) -> Self {
        StatePart { name: name.to_string(), batch, kind: PartKind::Whole }
    }

    /// A part of a chain (base or delta).
    pub fn chained(name: &str, batch: RecordBatch, kind: PartKind) -> Self {
        StatePart { name: name.to_string(), batch, kind }
    }
}

/// Finds a part by name.
pub fn take_part(parts: &mut Vec<StatePart>, name: &str) -> Option<RecordBatch> {
    let i = parts.iter().position(|p| p.name == name)?;
    Some(parts.remove(i).batch)
}

/// A step of a dataflow that transforms batches; runs inside one subtask, single-threaded.
///
/// Output goes to `out` in order; the task forwards it downstream (through chained operators first).
pub trait Operator: Send {
    /// Processes one batch of input.
    fn process(&mut self, batch: RecordBatch, out: &mut Vec<RecordBatch>) -> Result<()>;

    /// Event time has reached `watermark` (µs) on every input: emit whatever it completes.
    fn on_watermark(&mut self, _watermark: i64, _out: &mut Vec<RecordBatch>) -> Result<()> {
        Ok(())
    }

    /// A checkpoint barrier is about to pass: emit what must reach downstream before it (the checkpoint then holds
    /// no trace of it). Called before `snapshot`.
    fn on_barrier(&mut self, _out: &mut Vec<RecordBatch>) -> Result<()> {
        Ok(())
    }

    /// The input has ended; emit anything still held that the end of input completes.
    fn on_end(&mut self, _out: &mut Vec<RecordBatch>) -> Result<()> {
        Ok(())
    }

    /// The number of keys or windows held, for metrics.
    fn state_entries(&self) -> usize {
        0
    }

    /// Everything the operator holds, for a checkpoint; called between `process` calls when the barrier is aligned.
    /// Keyed state carries a `_key_group` column so it can be split when the job is rescaled. An operator may return
    /// [`PartKind::Delta`] parts (changes since its previous snapshot) unless `force_full` is set, which the task does
    /// when an earlier upload failed and the chain is broken.
    fn snapshot(&mut self, _force_full: bool) -> Result<Vec<StatePart>> {
        Ok(Vec::new())
    }

    /// Loads what `snapshot` produced (possibly several subtasks' parts, concatenated), before any input.
    fn restore(&mut self, parts: Vec<StatePart>) -> Result<()> {
        match parts.first() {
            None => Ok(()),
            Some(p) => {
                Err(EngineError::Internal(format!("operator has no state but the checkpoint has part '{}'", p.name)))
            }
        }
    }
}

/// Passes batches through unchanged (UNION of several inputs).
#[derive(Debug, Default)]
pub struct Identity;

impl Operator for Identity {
    fn process(&mut self, batch: RecordBatch, out: &mut Vec<RecordBatch>) -> Result<()> {
        out.push(batch);
        Ok(())
    }
}
