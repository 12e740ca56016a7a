//! Where a bigquery sink writes (table, endpoints, credentials, merge staging) and where rows BigQuery refuses go.

use std::sync::Arc;
use std::time::Duration;

use nagare_engine::EngineError;
use nagare_engine::connector::SinkContext;
use nagare_engine::dead_letter::DeadLetterWriter;
use nagare_sql::SinkSpec;

use crate::auth::Auth;
use crate::config::{BigQueryConfig, WriteMode};
use crate::error::BqError;
use crate::rest::{RestClient, TableRef};
use crate::write::{Rejected, WriteClient};

/// Connection settings of one bigquery table, from its options.
#[derive(Debug, Clone)]
pub struct Target {
    /// The table.
    pub table: TableRef,
    /// Credentials.
    pub auth: Auth,
    /// gRPC endpoint.
    pub endpoint: String,
    /// REST endpoint.
    pub rest_endpoint: String,
    /// Request size limit.
    pub max_request_bytes: usize,
    /// Merge mode: the staging table and the key.
    pub merge: Option<MergeTarget>,
    /// The `commit` option (`auto`, `per_subtask`, `atomic`).
    pub commit: String,
    /// `stream_max_age`.
    pub stream_max_age: Duration,
    /// `stream_max_bytes`.
    pub stream_max_bytes: u64,
}

/// Where the merge mode stages rows, and what it matches on.
#[derive(Debug, Clone)]
pub struct MergeTarget {
    /// The staging table.
    pub staging: TableRef,
    /// PRIMARY KEY columns.
    pub key: Vec<String>,
}

impl Target {
    /// The target a sink's configuration names.
    pub fn from_spec(spec: &SinkSpec) -> Result<Self, BqError> {
        Self::from_config(&BigQueryConfig::of(spec)?)
    }

    /// The target `c` names.
    pub fn from_config(c: &BigQueryConfig) -> Result<Self, BqError> {
        let table = TableRef { project: c.project.clone(), dataset: c.dataset.clone(), table: c.table.clone() };
        let merge = (c.mode == WriteMode::Merge).then(|| MergeTarget {
            staging: TableRef { table: c.staging_table.clone(), ..table.clone() },
            key: c.primary_key.clone(),
        });
        Ok(Target {
            commit: c.commit.clone(),
            stream_max_age: c.stream_max_age,
            stream_max_bytes: c.stream_max_bytes,
            merge,
            table,
            auth: Auth::from_option(&c.credentials)?,
            endpoint: c.endpoint.clone(),
            rest_endpoint: c.rest_endpoint.clone(),
            max_request_bytes: c.max_request_bytes,
        })
    }

    /// The table write streams go to: the staging table in merge mode.
    pub fn stream_table(&self) -> &TableRef {
        self.merge.as_ref().map_or(&self.table, |m| &m.staging)
    }

    /// Whether append-mode checkpoints write long-lived BUFFERED streams (else a PENDING stream per checkpoint),
    /// given the job's checkpoint interval: `auto` picks them under a minute, where per-checkpoint streams would
    /// meet BigQuery's `CreateWriteStream` quota.
    pub fn buffered(&self, checkpoint_interval: Option<Duration>) -> bool {
        if self.merge.is_some() {
            return false;
        }
        match self.commit.as_str() {
            "per_subtask" => true,
            "atomic" => false,
            _ => checkpoint_interval.is_some_and(|i| i < Duration::from_secs(60)),
        }
    }

    /// A Storage Write client.
    pub fn write_client(&self) -> Result<WriteClient, BqError> {
        WriteClient::new(&self.endpoint, self.auth.clone())
    }

    /// A REST client.
    pub fn rest_client(&self) -> Result<RestClient, BqError> {
        RestClient::new(&self.rest_endpoint, self.auth.clone())
    }
}

/// Sends rows that cannot be written to the dead-letter output with their reasons, or fails the job naming the
/// first reason when there is none (`what` says who refused them).
pub(crate) fn dead_letter(
    ctx: &SinkContext,
    name: &str,
    what: &str,
    rejected: Vec<Rejected>,
) -> Result<(), EngineError> {
    for r in rejected {
        let dl: Option<&Arc<DeadLetterWriter>> = ctx.dead_letter.as_ref();
        let Some(dl) = dl else {
            return Err(EngineError::External {
                system: "bigquery".into(),
                message: format!(
                    "{what} {} row(s) of sink '{name}' (first: {}); set dead_letter_path to keep them and go on",
                    r.batch.num_rows(),
                    r.reasons.first().cloned().unwrap_or_default()
                ),
                retriable: false,
            });
        };
        for (i, reason) in r.reasons.iter().enumerate() {
            dl.write_rows(&format!("bigquery sink '{name}'"), reason, &r.batch.slice(i, 1))?;
        }
        nagare_engine::metrics::NodeMetrics::add(&ctx.metrics.bad_records, r.batch.num_rows());
    }
    Ok(())
}
