//! The nagare runtime: operator subtasks on tokio, connected by bounded channels that carry Arrow batches,
//! watermarks, checkpoint barriers and end-of-stream markers.

pub mod channel;
pub mod checkpoint;
pub mod connector;
pub mod dead_letter;
pub mod distribute;
pub mod error;
pub mod metrics;
pub mod operator;
pub mod operators;
pub mod partition;
pub mod state;

pub use error::{EngineError, Result};
pub mod job;
pub mod task;

pub use job::{CheckpointOptions, JobError, JobOptions, JobSummary, RunningJob, start};
