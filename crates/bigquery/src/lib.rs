//! BigQuery for nagare: the Storage Write API (gRPC) and REST v2 clients, credentials, type mapping, and the
//! `bigquery` sink connector.

pub mod adc;
pub mod auth;
/// Test doubles of the Storage Write API (test code; the `test-double` feature lets end-to-end tests use them).
#[cfg(any(test, feature = "test-double"))]
pub mod cdc_double;
pub mod config;
pub mod connector;
pub mod error;
pub mod load;
pub mod proto;
pub mod rest;
pub mod sink;
pub mod target;
#[cfg(any(test, feature = "test-double"))]
mod generated {
    #![allow(clippy::all, clippy::pedantic, missing_docs, unused_qualifications)]
    include!(concat!(env!("OUT_DIR"), "/google.cloud.bigquery.storage.v1.BigQueryWrite.rs"));
}
#[cfg(any(test, feature = "test-double"))]
pub mod testing;
pub mod types;
pub mod upsert;
pub mod write;

pub use connector::BigQuerySpec;
pub use error::BqError;
pub use sink::BigQuerySink;

/// Reads a sink's commit handles back from a checkpoint (`null`s are subtasks that had nothing to commit).
pub(crate) fn parse_handles<T: serde::de::DeserializeOwned>(
    handles: &[serde_json::Value],
    what: &str,
) -> Result<Vec<T>, BqError> {
    handles
        .iter()
        .filter(|h| !h.is_null())
        .map(|h| serde_json::from_value(h.clone()))
        .collect::<Result<_, _>>()
        .map_err(|e| BqError::Protocol(format!("checkpoint has a {what} that is not understood: {e}")))
}

/// Test hook for crash tests (`--test-fault`): waits as long as installed at `point`, to widen a window in which a
/// kill should land.
pub(crate) async fn fault_delay(point: nagare_core::faults::FaultPoint) {
    if let Some(d) = nagare_core::faults::delay(point) {
        tokio::time::sleep(d).await;
    }
}
