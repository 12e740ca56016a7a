//! The bigquery sink's configuration: parsed once from the table's options at plan time, carried in the plan, and
//! the only thing the runtime reads.

use std::time::Duration;

use nagare_sql::SinkSpec;
use nagare_sql::catalog::TableDef;
use nagare_sql::options::Options;
use serde::{Deserialize, Serialize};

use crate::error::BqError;
use crate::write::DEFAULT_MAX_REQUEST_BYTES;

/// How rows reach the table (`write_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    /// Storage Write API appends.
    Append,
    /// BigQuery CDC upserts by the PRIMARY KEY.
    Upsert,
    /// Appends to a staging table, merged into the table when a checkpoint completes.
    Merge,
    /// Parquet files staged and loaded by load jobs.
    Load,
}

/// A bigquery sink table's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BigQueryConfig {
    /// The project holding the dataset.
    pub project: String,
    /// The dataset holding the table.
    pub dataset: String,
    /// The table.
    pub table: String,
    /// `write_mode`.
    pub mode: WriteMode,
    /// `commit`: `auto`, `per_subtask` or `atomic`.
    pub commit: String,
    /// `stream_max_age`.
    pub stream_max_age: Duration,
    /// `stream_max_bytes`.
    #[serde(default = "default_stream_max_bytes")]
    pub stream_max_bytes: u64,
    /// `sequence_by` (upsert).
    pub sequence_by: Vec<String>,
    /// `change_type_column` (upsert).
    pub change_type_column: Option<String>,
    /// `staging_uri` (load).
    pub staging_uri: Option<String>,
    /// `staging_source_uri` (load; default: `staging_uri`).
    pub staging_source_uri: Option<String>,
    /// `load_interval` (load).
    pub load_interval: Duration,
    /// `staging_table` (merge; default `<table>_nagare_staging`).
    pub staging_table: String,
    /// `create_table = 'if_not_exists'`.
    pub create_if_missing: bool,
    /// `schema_update = 'add_columns'`.
    pub add_columns: bool,
    /// `partition_by` and `partition_granularity`.
    pub partition: Option<(String, String)>,
    /// `cluster_by`.
    pub cluster_by: Vec<String>,
    /// `credentials`, as written (resolved when a client is made).
    pub credentials: String,
    /// `endpoint` (gRPC).
    pub endpoint: String,
    /// `rest_endpoint`.
    pub rest_endpoint: String,
    /// `max_request_size`, bytes.
    pub max_request_bytes: usize,
    /// The table's PRIMARY KEY.
    pub primary_key: Vec<String>,
}

/// `stream_max_bytes` when not set (and in plans made before the option existed).
pub const DEFAULT_STREAM_MAX_BYTES: u64 = 10 * 1000 * 1000 * 1000;

fn default_stream_max_bytes() -> u64 {
    DEFAULT_STREAM_MAX_BYTES
}

/// A comma-separated column list option.
pub(crate) fn columns_of(opts: &Options, name: &str) -> Vec<String> {
    opts.get_str(name)
        .map(|v| v.split(',').map(|c| c.trim().to_string()).filter(|c| !c.is_empty()).collect())
        .unwrap_or_default()
}

impl BigQueryConfig {
    /// Parses a validated table's options.
    pub fn from_table(table: &TableDef) -> BigQueryConfig {
        let o = &table.options;
        let get = |n: &str| o.get_str(n).unwrap_or_default();
        let mode = match get("write_mode").as_str() {
            "upsert" => WriteMode::Upsert,
            "merge" => WriteMode::Merge,
            "load" => WriteMode::Load,
            _ => WriteMode::Append,
        };
        let trim = |s: String| s.trim_end_matches('/').to_string();
        BigQueryConfig {
            project: get("project"),
            dataset: get("dataset"),
            staging_table: o.get_str("staging_table").unwrap_or_else(|| format!("{}_nagare_staging", get("table"))),
            table: get("table"),
            mode,
            commit: o.get_str("commit").unwrap_or_else(|| "auto".into()),
            stream_max_age: o.get_duration("stream_max_age").unwrap_or(Duration::from_secs(3600)),
            stream_max_bytes: o.get_bytes("stream_max_bytes").unwrap_or(DEFAULT_STREAM_MAX_BYTES),
            sequence_by: columns_of(o, "sequence_by"),
            change_type_column: o.get_str("change_type_column"),
            staging_uri: o.get_str("staging_uri").map(trim),
            staging_source_uri: o.get_str("staging_source_uri").map(trim),
            load_interval: o.get_duration("load_interval").unwrap_or(Duration::from_secs(300)),
            create_if_missing: o.get_str("create_table").as_deref() == Some("if_not_exists"),
            add_columns: o.get_str("schema_update").as_deref() == Some("add_columns"),
            partition: o
                .get_str("partition_by")
                .map(|c| (c, o.get_str("partition_granularity").unwrap_or_else(|| "DAY".into()))),
            cluster_by: columns_of(o, "cluster_by"),
            credentials: get("credentials"),
            endpoint: get("endpoint"),
            rest_endpoint: get("rest_endpoint"),
            max_request_bytes: o.get_bytes("max_request_size").map_or(DEFAULT_MAX_REQUEST_BYTES, |b| b as usize),
            primary_key: table.primary_key.clone(),
        }
    }

    /// The configuration the plan carries for a sink.
    pub fn of(spec: &SinkSpec) -> Result<BigQueryConfig, BqError> {
        spec.table.config().map_err(BqError::Config)
    }
}
