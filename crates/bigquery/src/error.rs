//! Errors, and how to react to them (Google's guidance for the Storage Write API): retry with backoff on transient
//! codes, resend from the last acknowledged offset on `OUT_OF_RANGE`, count `ALREADY_EXISTS` as written, and stop on
//! everything else with the server's message.

use nagare_engine::EngineError;
use tonic::Code;

/// What went wrong talking to BigQuery.
#[derive(Debug, thiserror::Error)]
pub enum BqError {
    /// A gRPC call failed.
    #[error("BigQuery Storage API {call}: {code:?}: {message}")]
    Grpc {
        /// Which call.
        call: &'static str,
        /// Status code.
        code: Code,
        /// The server's message.
        message: String,
    },
    /// A REST call failed.
    #[error("BigQuery REST {call}: HTTP {status}: {message}")]
    Rest {
        /// Which call.
        call: String,
        /// HTTP status (0 when no response arrived).
        status: u16,
        /// The server's message.
        message: String,
    },
    /// The table's schema and the pipeline's columns do not fit together, or a type has no BigQuery equivalent.
    #[error("{0}")]
    Schema(String),
    /// Bad or missing configuration (endpoint, credentials).
    #[error("{0}")]
    Config(String),
    /// The service answered something the protocol does not allow.
    #[error("BigQuery: {0}")]
    Protocol(String),
    /// Arrow failed (casting or serialising rows).
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaction {
    /// Transient: wait and try again (from the last acknowledged offset, on a new connection).
    Retry,
    /// The rows at that offset are already in the stream (a resend after a lost acknowledgement): done.
    AlreadyWritten,
    /// The stream's offset is not where we think: resend from the last acknowledged offset.
    Resend,
    /// Permanent: stop and report.
    Fail,
}

/// Classifies a gRPC status code of an append.
pub fn append_reaction(code: Code) -> Reaction {
    match code {
        Code::AlreadyExists => Reaction::AlreadyWritten,
        Code::OutOfRange => Reaction::Resend,
        Code::Unavailable
        | Code::Internal
        | Code::Aborted
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::ResourceExhausted => Reaction::Retry,
        _ => Reaction::Fail,
    }
}

/// Whether a unary gRPC call failing with `code` may be retried.
pub fn retriable_code(code: Code) -> bool {
    append_reaction(code) == Reaction::Retry
}

/// Whether a REST call failing with `status` may be retried (0: no response at all).
pub fn retriable_status(status: u16) -> bool {
    matches!(status, 0 | 408 | 429 | 500 | 502 | 503 | 504)
}

impl BqError {
    /// Whether trying again later can help.
    pub fn retriable(&self) -> bool {
        match self {
            BqError::Grpc { code, .. } => retriable_code(*code),
            BqError::Rest { status, .. } => retriable_status(*status),
            _ => false,
        }
    }

    pub(crate) fn grpc(call: &'static str, status: &tonic::Status) -> Self {
        BqError::Grpc { call, code: status.code(), message: status.message().to_string() }
    }
}

impl From<BqError> for EngineError {
    fn from(e: BqError) -> Self {
        match e {
            BqError::Schema(m) | BqError::Config(m) => EngineError::Config(m),
            other => EngineError::External {
                system: "bigquery".into(),
                retriable: other.retriable(),
                message: other.to_string(),
            },
        }
    }
}

/// Results of this crate.
pub type Result<T, E = BqError> = std::result::Result<T, E>;

pub use nagare_core::backoff::Backoff;

/// Runs `call` until it succeeds, fails permanently, or the backoff gives up; logs each retry.
pub async fn with_retries<T, F, Fut>(what: &str, mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut backoff = Backoff::default();
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if e.retriable() => match backoff.next_delay() {
                Some(d) => {
                    tracing::warn!(call = what, error = %e, retry_in_ms = d.as_millis() as u64, "BigQuery call failed; retrying");
                    tokio::time::sleep(d).await;
                }
                None => return Err(e),
            },
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn codes_are_classified_as_google_documents() {
        assert_eq!(append_reaction(Code::AlreadyExists), Reaction::AlreadyWritten);
        assert_eq!(append_reaction(Code::OutOfRange), Reaction::Resend);
        for c in [Code::Unavailable, Code::Internal, Code::Aborted, Code::DeadlineExceeded, Code::ResourceExhausted] {
            assert_eq!(append_reaction(c), Reaction::Retry, "{c:?}");
        }
        for c in [Code::InvalidArgument, Code::NotFound, Code::PermissionDenied, Code::FailedPrecondition] {
            assert_eq!(append_reaction(c), Reaction::Fail, "{c:?}");
        }
        assert!(retriable_status(503) && retriable_status(429) && !retriable_status(404) && !retriable_status(400));
        let e: EngineError = BqError::Rest { call: "x".into(), status: 503, message: "busy".into() }.into();
        assert!(matches!(e, EngineError::External { retriable: true, .. }));
    }

    #[test]
    fn backoff_grows_and_gives_up() {
        let mut b = Backoff::default();
        let delays: Vec<Duration> = std::iter::from_fn(|| b.next_delay()).collect();
        assert_eq!(delays.len(), 10);
        assert!(delays[0] <= Duration::from_millis(100) && delays[0] >= Duration::from_millis(50));
        assert!(delays[9] <= Duration::from_secs(10) && delays[9] >= Duration::from_secs(5));
        b.reset();
        assert!(b.next_delay().is_some());
    }
}
