//! The operator interface: whole Arrow batches in, whole batches out, driven by a task.

use arrow::record_batch::RecordBatch;

use crate::error::Result;

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
