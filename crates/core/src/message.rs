//! What travels on a channel between subtasks.

use std::fmt;

use arrow::record_batch::RecordBatch;

/// A checkpoint's number; increases by one per triggered checkpoint within a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CheckpointId(pub u64);

impl fmt::Display for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A marker that splits the stream into the part before checkpoint `checkpoint` and the part after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Barrier {
    /// The checkpoint this barrier belongs to.
    pub checkpoint: CheckpointId,
    /// When true the job stops after this checkpoint completes (stop-with-checkpoint, rescale).
    pub then_stop: bool,
}

/// Event-time progress of a stream: no row with event time at or before `EventTime(t)` follows it.
///
/// Times are microseconds since the Unix epoch, whatever the unit of the event-time column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watermark {
    /// Event time has reached this instant (µs since epoch).
    EventTime(i64),
    /// The sender has no data for a while; leave it out of the minimum until it sends again.
    Idle,
}

impl Watermark {
    /// The watermark that closes everything: sent when a bounded input ends.
    pub const MAX: Watermark = Watermark::EventTime(i64::MAX);
}

/// One item on a channel. Order matters: everything before a barrier belongs to its checkpoint.
#[derive(Debug, Clone)]
pub enum Message {
    /// Rows, in the schema of the edge.
    Batch(RecordBatch),
    /// Event-time progress.
    Watermark(Watermark),
    /// Checkpoint marker.
    Barrier(Barrier),
    /// The sender will send nothing more.
    EndOfStream,
}

impl Message {
    /// Number of rows carried (0 for control messages).
    pub fn num_rows(&self) -> usize {
        match self {
            Message::Batch(b) => b.num_rows(),
            _ => 0,
        }
    }
}
