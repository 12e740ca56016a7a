//! BigQuery for nagare: the Storage Write API (gRPC) and REST v2 clients, credentials, type mapping, and the
//! `bigquery` sink connector.

pub mod adc;
pub mod auth;
/// Test doubles of the Storage Write API (test code; the `test-double` feature lets end-to-end tests use them).
#[cfg(any(test, feature = "test-double"))]
pub mod cdc_double;
pub mod error;
pub mod load;
pub mod proto;
pub mod rest;
pub mod sink;
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

pub use error::BqError;
pub use sink::{BigQuerySink, BigQuerySpec};
