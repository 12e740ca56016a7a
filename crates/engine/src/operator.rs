//! The operator interface: whole Arrow batches in, whole batches out, driven by a task.

use arrow::record_batch::RecordBatch;

use crate::error::{EngineError, Result};

/// A named piece of an operator's state, as rows: what a checkpoint stores (as Parquet) and a restore reads back.
#[derive(Debug, Clone)]
pub struct StatePart {
    /// Which piece (`groups`, `pending`, `meta`, ...), unique within the operator.
    pub name: String,
    /// The rows.
    pub batch: RecordBatch,
}

impl StatePart {
    /// A part.
    pub fn new(name: &str, batch: RecordBatch) -> Self {
        StatePart { name: name.to_string(), batch }
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

    /// The input has ended; emit anything still held that the end of input completes.
    fn on_end(&mut self, _out: &mut Vec<RecordBatch>) -> Result<()> {
        Ok(())
    }

    /// The number of keys or windows held, for metrics.
    fn state_entries(&self) -> usize {
        0
    }

    /// Everything the operator holds, for a checkpoint; called between `process` calls when the barrier is aligned.
    /// Keyed state carries a `_key_group` column so it can be split when the job is rescaled.
    fn snapshot(&mut self) -> Result<Vec<StatePart>> {
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
