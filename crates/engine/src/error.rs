//! Runtime errors, with who must act: the user (bad input or configuration), an external system, or us (a bug).

use arrow::error::ArrowError;
use datafusion::error::DataFusionError;
use nagare_sql::PlanError;

/// An error while building or running a job.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The pipeline is invalid (found before the job starts).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Configuration that only shows up when the job is built (a missing dead-letter path, an unreadable file).
    #[error("{0}")]
    Config(String),
    /// Input that cannot be decoded, with where it is.
    #[error("bad record at {location}: {reason}")]
    BadRecord {
        /// File and line, or another position in the input.
        location: String,
        /// What is wrong with it.
        reason: String,
    },
    /// File-system or network I/O.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, and to which path.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An external system refused or failed.
    #[error("{system}: {message}")]
    External {
        /// Which system.
        system: String,
        /// What it said.
        message: String,
        /// Whether trying again may succeed.
        retriable: bool,
    },
    /// Arrow compute or IPC.
    #[error("arrow: {0}")]
    Arrow(#[from] ArrowError),
    /// DataFusion expression evaluation.
    #[error("{0}")]
    DataFusion(#[from] DataFusionError),
    /// Parquet reading or writing.
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// A failure of another task ended this one; not the root cause.
    #[error("stopped because another task failed")]
    Aborted,
    /// A bug in nagare.
    #[error("internal error (this is a bug in nagare): {0}")]
    Internal(String),
}

impl EngineError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        EngineError::Io { context: context.into(), source }
    }

    /// Whether the error is the consequence of another task's failure rather than a cause.
    pub fn is_secondary(&self) -> bool {
        matches!(self, EngineError::Aborted)
    }
}

/// Result of runtime operations.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
