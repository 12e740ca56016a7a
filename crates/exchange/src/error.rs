//! What can go wrong between workers.

use nagare_engine::EngineError;

/// An exchange failure.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// Encoding or decoding Arrow IPC.
    #[error("Arrow IPC: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// A frame that does not follow the protocol.
    #[error("exchange protocol: {0}")]
    Protocol(String),
    /// Something the exchange cannot carry.
    #[error("{0}")]
    Unsupported(String),
    /// The other side failed or went away.
    #[error("{0}")]
    Peer(String),
}

impl From<ExchangeError> for EngineError {
    fn from(e: ExchangeError) -> Self {
        match e {
            ExchangeError::Unsupported(m) => EngineError::Config(m),
            e => EngineError::External { system: "exchange".into(), message: e.to_string(), retriable: true },
        }
    }
}
