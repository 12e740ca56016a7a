//! BigQuery for nagare: the Storage Write API (gRPC) and REST v2 clients, credentials, type mapping, and the
//! `bigquery` sink connector.

pub mod adc;
pub mod auth;
pub mod error;
pub mod load;
pub mod proto;
pub mod rest;
pub mod sink;
#[cfg(test)]
mod testing;
pub mod types;
pub mod write;

pub use error::BqError;
pub use sink::{BigQuerySink, BigQuerySpec};
