//! Exactly-once checkpoints in one process: the coordinator that triggers them and decides when they are complete,
//! the messages between it and the tasks, and the store.
//!
//! Protocol (Flink's asynchronous barrier snapshots): the coordinator asks every source subtask to start checkpoint
//! *n*; a source records its position and sends `Barrier(n)` downstream; tasks align barriers across inputs, snapshot
//! their operators (uploaded in the background) and sinks pre-commit; each task reports back. When every task has
//! reported, the coordinator writes the checkpoint's metadata — the commit point — and then tells sinks to commit
//! and sources that *n* is durable. When every source has run out of input (or the job is stopped), a final
//! checkpoint is taken and the job ends once it has committed.

pub mod coordinator;
pub mod store;

use nagare_core::CheckpointId;
use nagare_core::checkpoint::{TaskKey, TaskSnapshot};

/// From the coordinator to a task.
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    /// Sources only: start checkpoint `id` now; `last` when the job ends with it.
    Trigger {
        /// Checkpoint id.
        id: CheckpointId,
        /// Whether it is the final checkpoint.
        last: bool,
    },
    /// Checkpoint `id` is complete: commit, acknowledge input; a source ends after the final one.
    Complete {
        /// Checkpoint id.
        id: CheckpointId,
        /// Whether it was the final checkpoint.
        last: bool,
    },
}

/// From a task to the coordinator.
#[derive(Debug)]
pub enum Report {
    /// The task's part of checkpoint `id` is stored.
    Ack {
        /// Checkpoint id.
        id: CheckpointId,
        /// What it stored.
        snapshot: TaskSnapshot,
    },
    /// The task could not take part in checkpoint `id` (its state upload failed): abort it.
    Declined {
        /// Checkpoint id.
        id: CheckpointId,
        /// Which task.
        task: TaskKey,
        /// Why.
        reason: String,
    },
    /// A source subtask has no more input (or was told to stop).
    SourceFinished(TaskKey),
}
