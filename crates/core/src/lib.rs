//! The data model every nagare crate shares: what flows on a channel (batches, watermarks, barriers), how keys map to
//! key groups and subtasks, and the duration syntax used by options.

pub mod backoff;
pub mod checkpoint;
pub mod duration;
pub mod faults;
pub mod keys;
pub mod message;

pub use duration::{DurationParseError, format_duration, parse_duration};
pub use keys::{DEFAULT_MAX_PARALLELISM, KeyGroupRange, hash_columns, is_hashable_type};
pub use message::{Barrier, CheckpointId, Message, Watermark};

/// Column added to updating streams: the kind of change a row carries.
pub const OP_COLUMN: &str = "_op";
/// Column added to updating streams: the source-defined, monotonically increasing sequence of a change.
pub const SEQ_COLUMN: &str = "_seq";
