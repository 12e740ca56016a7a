//! `connector = 'bigquery'`: the sink, its options, and recovery.
//!
//! `append` with checkpoints is exactly once, in one of two ways (`commit`).
//!
//! `commit = 'per_subtask'`: each sink subtask appends to one BUFFERED write stream that lives across many
//! checkpoints, with explicit offsets. At the barrier it waits for every acknowledgement and puts
//! `{stream, rows appended}` in the checkpoint; when the checkpoint completes the committer calls `FlushRows` up to
//! that offset (inclusive: rows - 1), which makes exactly those rows visible. Flushing is idempotent, so recovery
//! flushes the restored checkpoint's offsets again, then finalizes those streams (rows appended after the
//! checkpoint stay in their buffers, never visible) and the new run writes to new streams. A stream is replaced
//! after `stream_max_age`. Streams are created about once per subtask per `stream_max_age`, not per checkpoint.
//!
//! `commit = 'atomic'`: each sink subtask writes an epoch's rows to its own PENDING write
//! stream; at the checkpoint barrier it waits for every acknowledgement, finalizes the stream, checks the row count
//! and puts `{table, streams}` in the checkpoint; when the checkpoint completes the coordinator commits every
//! subtask's streams with one `BatchCommitWriteStreams` per table, so the checkpoint's rows appear together. After a crash, the restored checkpoint's streams are committed again (a stream already
//! committed counts as done) and streams of later epochs, never committed, are abandoned: BigQuery drops them.
//! Without checkpoints rows go to the table's `_default` stream and are visible at once (at least once).

use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use nagare_core::CheckpointId;
use nagare_engine::EngineError;
use nagare_engine::connector::{Committer, Connector, Sink, SinkContext};
use nagare_engine::dead_letter::DeadLetterWriter;
use nagare_sql::SinkSpec;
use nagare_sql::catalog::{ConnectorSpec, TableDef, TableRole};
use nagare_sql::error::PlanError;
use nagare_sql::options::{OptionKind, OptionSpec};
use serde::{Deserialize, Serialize};

use crate::auth::Auth;
use crate::config::{BigQueryConfig, WriteMode, columns_of};
use crate::error::BqError;
use crate::rest::{CreateOptions, RestClient, TableRef};
use crate::types::{compatibility, table_schema, to_wire, wire_schema};
use crate::write::{Appender, DEFAULT_MAX_REQUEST_BYTES, Rejected, WriteClient};

/// BigQuery's quota on `CreateWriteStream`: streams per project and region per hour.
pub const STREAMS_PER_HOUR_QUOTA: f64 = 10_000.0;

/// Options of the bigquery sink.
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec::required("project", OptionKind::String, "the project holding the dataset"),
    OptionSpec::required("dataset", OptionKind::String, "the dataset holding the table"),
    OptionSpec::required("table", OptionKind::String, "the table"),
    OptionSpec::optional(
        "write_mode",
        OptionKind::Enum(&["append", "upsert", "merge", "load"]),
        Some("append"),
        "append: Storage Write API, exactly once with checkpoints; merge: exactly once into a staging table, then \
         MERGE into the table by its PRIMARY KEY when the checkpoint completes; load: Parquet files staged at \
         staging_uri, loaded by load jobs every load_interval; upsert: BigQuery CDC, each row the new image of its \
         PRIMARY KEY (or its deletion), ordered by sequence_by",
    ),
    OptionSpec::optional(
        "commit",
        OptionKind::Enum(&["auto", "per_subtask", "atomic"]),
        Some("auto"),
        "append mode with checkpoints: per_subtask: one BUFFERED stream per sink subtask kept across checkpoints, \
         flushed when a checkpoint completes (each subtask's rows appear on their own; one CreateWriteStream per \
         subtask per stream_max_age); atomic: a PENDING stream per subtask per checkpoint, all committed together \
         (a checkpoint's rows appear at once; one CreateWriteStream per subtask per checkpoint); auto: per_subtask \
         when checkpoint_interval is under a minute, else atomic",
    ),
    OptionSpec::optional(
        "stream_max_age",
        OptionKind::Duration,
        Some("1h"),
        "commit = 'per_subtask': a subtask's write stream is replaced by a new one at the first checkpoint after \
         this age",
    ),
    OptionSpec::optional(
        "sequence_by",
        OptionKind::String,
        None,
        "upsert mode: up to four comma-separated integer, timestamp or date columns that order a key's changes \
         (a version, an update time, a binlog position); becomes _CHANGE_SEQUENCE_NUMBER",
    ),
    OptionSpec::optional(
        "change_type_column",
        OptionKind::String,
        None,
        "upsert mode: a TEXT column (not written to the table) saying UPSERT or DELETE (also INSERT, UPDATE and \
         Debezium's c, r, u, d); without it every row is an UPSERT",
    ),
    OptionSpec::optional(
        "staging_uri",
        OptionKind::String,
        None,
        "load mode: where Parquet files are staged before a load job reads them (gs://bucket/prefix; or a \
         directory, file:// or s3:// URL that BigQuery reads as staging_source_uri)",
    ),
    OptionSpec::optional(
        "staging_source_uri",
        OptionKind::String,
        None,
        "load mode: staging_uri as BigQuery addresses it (gs://...), when nagare writes it another way (a gcsfuse \
         mount, an emulator's directory)",
    ),
    OptionSpec::optional(
        "load_interval",
        OptionKind::Duration,
        Some("5m"),
        "load mode: time between load jobs (BigQuery allows 1,500 per table per day; at most one per checkpoint)",
    ),
    OptionSpec::optional(
        "staging_table",
        OptionKind::String,
        None,
        "merge mode: the staging table in the same dataset (default: <table>_nagare_staging)",
    ),
    OptionSpec::optional(
        "create_table",
        OptionKind::Enum(&["never", "if_not_exists"]),
        Some("never"),
        "create the table from the declared columns when it does not exist",
    ),
    OptionSpec::optional(
        "schema_update",
        OptionKind::Enum(&["add_columns", "none"]),
        Some("add_columns"),
        "add columns the pipeline writes but the table lacks (as NULLABLE), or fail",
    ),
    OptionSpec::optional(
        "partition_by",
        OptionKind::String,
        None,
        "a TIMESTAMP, DATETIME or DATE column to partition a created table by",
    ),
    OptionSpec::optional(
        "partition_granularity",
        OptionKind::Enum(&["HOUR", "DAY", "MONTH", "YEAR"]),
        Some("DAY"),
        "partition size of a created table",
    ),
    OptionSpec::optional(
        "cluster_by",
        OptionKind::String,
        None,
        "up to four comma-separated columns to cluster a created table by",
    ),
    OptionSpec::optional(
        "credentials",
        OptionKind::Enum(&["default", "none"]),
        Some("default"),
        "default: Application Default Credentials; none: no credentials (an emulator)",
    ),
    OptionSpec::optional(
        "endpoint",
        OptionKind::String,
        Some("https://bigquerystorage.googleapis.com"),
        "the Storage Write API (gRPC) endpoint",
    ),
    OptionSpec::optional(
        "rest_endpoint",
        OptionKind::String,
        Some("https://bigquery.googleapis.com"),
        "the REST v2 endpoint",
    ),
    OptionSpec::optional(
        "max_request_size",
        OptionKind::ByteSize,
        Some("8MB"),
        "append requests are split to stay under this (BigQuery's limit is 10 MB)",
    ),
    OptionSpec::optional(
        "dead_letter_path",
        OptionKind::String,
        None,
        "directory for rows BigQuery rejects, with the reason",
    ),
];

/// The bigquery connector's spec.
#[derive(Debug)]
pub struct BigQuerySpec;

impl ConnectorSpec for BigQuerySpec {
    fn name(&self) -> &'static str {
        "bigquery"
    }

    fn description(&self) -> &'static str {
        "writes to a BigQuery table with the Storage Write API (exactly once with checkpoints)"
    }

    fn options(&self, role: TableRole) -> Option<&'static [OptionSpec]> {
        (role == TableRole::Sink).then_some(OPTIONS)
    }

    fn validate(&self, table: &TableDef, _role: TableRole) -> Result<(), PlanError> {
        let o = &table.options;
        let mode = o.get_str("write_mode").unwrap_or_default();
        match mode.as_str() {
            "append" => {}
            "upsert" => {
                if table.primary_key.is_empty() || !table.has_columns {
                    return Err(o.error(
                        "write_mode",
                        "write_mode = 'upsert' needs declared columns and a PRIMARY KEY (BigQuery applies changes by \
                         it), e.g. PRIMARY KEY (id) NOT ENFORCED",
                    ));
                }
                let seq = crate::upsert::sequence_columns(o);
                if seq.is_empty() || seq.len() > 4 {
                    return Err(o.error(
                        if seq.is_empty() { "write_mode" } else { "sequence_by" },
                        "write_mode = 'upsert' needs sequence_by: one to four integer, timestamp or date columns that \
                         order a key's changes, so a change replayed after a recovery is applied once",
                    ));
                }
                for c in &seq {
                    match table.schema.field_with_name(c) {
                        Ok(f) if crate::upsert::is_sequence_type(f.data_type()) => {}
                        Ok(f) => {
                            return Err(o.error(
                                "sequence_by",
                                format!(
                                    "column '{c}' is {}, not an integer, timestamp or date",
                                    nagare_sql::types::arrow_to_sql(f.data_type())
                                ),
                            ));
                        }
                        Err(_) => {
                            return Err(o.error("sequence_by", format!("no column '{c}' in table {}", table.name)));
                        }
                    }
                }
                if let Some(c) = o.get_str("change_type_column") {
                    match table.schema.field_with_name(&c) {
                        Ok(f) if matches!(f.data_type(), arrow::datatypes::DataType::Utf8) => {}
                        Ok(f) => {
                            return Err(o.error(
                                "change_type_column",
                                format!("column '{c}' is {}, not TEXT", nagare_sql::types::arrow_to_sql(f.data_type())),
                            ));
                        }
                        Err(_) => {
                            return Err(
                                o.error("change_type_column", format!("no column '{c}' in table {}", table.name))
                            );
                        }
                    }
                    if table.primary_key.contains(&c) {
                        return Err(o.error("change_type_column", "the change type cannot be part of the PRIMARY KEY"));
                    }
                }
            }
            "load" => {
                let Some(staging) = o.get_str("staging_uri") else {
                    return Err(o.error(
                        "write_mode",
                        "write_mode = 'load' needs staging_uri, where Parquet files wait for the load job (e.g. \
                         gs://bucket/nagare-staging)",
                    ));
                };
                let source = o.get_str("staging_source_uri").unwrap_or_else(|| staging.clone());
                if !source.starts_with("gs://") {
                    let name = if o.is_set("staging_source_uri") { "staging_source_uri" } else { "staging_uri" };
                    return Err(o.error(
                        name,
                        format!(
                            "BigQuery loads files from Cloud Storage: '{source}' is not a gs:// URL (stage at \
                             gs://..., or set staging_source_uri to the gs:// address of staging_uri)"
                        ),
                    ));
                }
                if !table.has_columns {
                    return Err(o.error("write_mode", "write_mode = 'load' needs declared columns"));
                }
            }
            "merge" => {
                if table.primary_key.is_empty() || !table.has_columns {
                    return Err(o.error(
                        "write_mode",
                        "write_mode = 'merge' needs declared columns and a PRIMARY KEY (the columns the MERGE \
                         matches on), e.g. PRIMARY KEY (id) NOT ENFORCED",
                    ));
                }
            }
            other => {
                return Err(o.error(
                    "write_mode",
                    format!(
                        "write_mode = '{other}' is not known; use 'append' (exactly once with checkpoints), \
                         'upsert', 'merge' or 'load'"
                    ),
                ));
            }
        }
        if o.is_set("staging_table") && mode != "merge" {
            return Err(o.error("staging_table", "only used with write_mode = 'merge'"));
        }
        for name in ["staging_uri", "staging_source_uri", "load_interval"] {
            if o.is_set(name) && mode != "load" {
                return Err(o.error(name, "only used with write_mode = 'load'"));
            }
        }
        for name in ["commit", "stream_max_age"] {
            if o.is_set(name) && mode != "append" {
                return Err(o.error(
                    name,
                    format!("only used with write_mode = 'append' (write_mode = '{mode}' commits its own way)"),
                ));
            }
        }
        if let Some(age) = o.get_duration("stream_max_age")
            && age < Duration::from_secs(1)
        {
            return Err(o.error("stream_max_age", "must be at least 1s"));
        }
        for name in ["sequence_by", "change_type_column"] {
            if o.is_set(name) && mode != "upsert" {
                return Err(o.error(name, "only used with write_mode = 'upsert'"));
            }
        }
        if table.has_columns {
            table_schema(&table.schema).map_err(|e| o.error("connector", e.to_string()))?;
            if let Some(p) = o.get_str("partition_by") {
                match table.schema.field_with_name(&p) {
                    Ok(f)
                        if matches!(
                            f.data_type(),
                            arrow::datatypes::DataType::Timestamp(..) | arrow::datatypes::DataType::Date32
                        ) => {}
                    Ok(f) => {
                        return Err(o.error(
                            "partition_by",
                            format!("column '{p}' is {}, not TIMESTAMP, DATETIME or DATE", f.data_type()),
                        ));
                    }
                    Err(_) => return Err(o.error("partition_by", format!("no column '{p}' in table {}", table.name))),
                }
            }
            let cluster = columns_of(o, "cluster_by");
            if cluster.len() > 4 {
                return Err(o.error("cluster_by", "BigQuery clusters by at most four columns"));
            }
            for c in &cluster {
                if table.schema.field_with_name(c).is_err() {
                    return Err(o.error("cluster_by", format!("no column '{c}' in table {}", table.name)));
                }
            }
        }
        for name in ["endpoint", "rest_endpoint"] {
            let v = o.get_str(name).unwrap_or_default();
            if !(v.starts_with("https://") || v.starts_with("http://")) {
                return Err(o.error(name, format!("'{v}' is not an http:// or https:// URL")));
            }
        }
        let max = o.get_bytes("max_request_size").unwrap_or(DEFAULT_MAX_REQUEST_BYTES as u64);
        if !(64 * 1024..=10_000_000).contains(&max) {
            return Err(o.error("max_request_size", "must be between 64KB and 10MB (BigQuery's request limit)"));
        }
        Ok(())
    }

    fn sink_needs_columns(&self) -> bool {
        false
    }

    fn sink_partitioned_by_key(&self, table: &TableDef) -> bool {
        // A key's rows all reach one subtask, so "the last row of a key" within a checkpoint is well defined.
        matches!(table.options.get_str("write_mode").as_deref(), Some("merge" | "upsert"))
    }

    fn configure(&self, table: &TableDef, _role: TableRole) -> Result<serde_json::Value, PlanError> {
        serde_json::to_value(BigQueryConfig::from_table(table))
            .map_err(|e| PlanError::internal(format!("bigquery configuration: {e}")))
    }

    fn sink_collapse_sequence(&self, table: &TableDef) -> Option<Vec<String>> {
        // One image per key per checkpoint goes to BigQuery, not every intermediate change.
        (table.options.get_str("write_mode").as_deref() == Some("upsert"))
            .then(|| crate::upsert::sequence_columns(&table.options))
    }
}

impl Connector for BigQuerySpec {
    fn create_sink(&self, spec: &SinkSpec, schema: SchemaRef, ctx: SinkContext) -> Result<Box<dyn Sink>, EngineError> {
        Ok(create(spec, schema, ctx)?)
    }

    fn committer(&self, spec: &SinkSpec) -> Result<Arc<dyn Committer>, EngineError> {
        let config = BigQueryConfig::of(spec)?;
        let target = Target::from_config(&config)?;
        let client = target.write_client()?;
        Ok(Arc::new(TableCommitter { spec: spec.clone(), mode: config.mode, target, client }))
    }
}

/// A bigquery sink table's committer for one run of a job: prepares the table, recovers it, and commits each
/// checkpoint (one `BatchCommitWriteStreams`, flushes, MERGE or load job per table) with one client throughout.
pub struct TableCommitter {
    spec: SinkSpec,
    mode: WriteMode,
    target: Target,
    client: WriteClient,
}

#[async_trait]
impl Committer for TableCommitter {
    async fn prepare(&self, schema: SchemaRef) -> Result<(), EngineError> {
        Ok(prepare(&self.spec, &schema).await?)
    }

    async fn recover(&self, handles: &[serde_json::Value]) -> Result<(), EngineError> {
        Ok(recover_table(self, handles).await?)
    }

    async fn commit(&self, handles: &[serde_json::Value]) -> Result<(), EngineError> {
        Ok(commit_table(self, handles).await?)
    }
}

/// Columns the merge mode adds to staging rows: which write stream, and the row's offset in it.
const STREAM_COLUMN: &str = "_nagare_stream";
const OFFSET_COLUMN: &str = "_nagare_offset";

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

/// Creates the table if asked and missing, checks that it can take the pipeline's rows, and adds columns it lacks.
pub async fn prepare(spec: &SinkSpec, schema: &SchemaRef) -> Result<(), BqError> {
    let target = Target::from_spec(spec)?;
    if is_load(spec) {
        // The staging location must open before anything runs.
        crate::load::check_staging(spec)?;
    }
    prepare_target(spec, &crate::upsert::table_columns(spec, schema), &target).await?;
    if is_upsert(spec) {
        let key = target.rest_client()?.primary_key(&target.table).await?.unwrap_or_default();
        if key != spec.table.primary_key {
            // Not an error: some servers (emulators) do not report constraints.
            tracing::warn!(
                table = %target.table,
                table_key = ?key,
                pipeline_key = ?spec.table.primary_key,
                "BigQuery applies CDC upserts by the table's PRIMARY KEY, which differs from the sink's (or is not \
                 reported): set it with ALTER TABLE ... ADD PRIMARY KEY (...) NOT ENFORCED"
            );
        }
    }
    if let Some(m) = &target.merge {
        // The staging table: the same columns, all NULLABLE (rows are checked by the target's MERGE), plus where
        // each row came from.
        let rest = target.rest_client()?;
        let mut fields = table_schema(&staging_schema(schema))?;
        for f in &mut fields {
            if f.mode.as_deref() == Some("REQUIRED") {
                f.mode = Some("NULLABLE".into());
            }
        }
        match rest.get_table(&m.staging).await? {
            None => rest.create_table(&m.staging, &fields, &CreateOptions::default()).await?,
            Some(existing) => {
                let c = compatibility(&existing, &fields);
                if !c.conflicts.is_empty() || !c.missing.is_empty() {
                    return Err(BqError::Schema(format!(
                        "staging table {} does not match the pipeline ({}); drop it or name another with \
                         staging_table",
                        m.staging,
                        c.conflicts
                            .iter()
                            .cloned()
                            .chain(c.missing.iter().map(|f| format!("no column '{}'", f.name)))
                            .collect::<Vec<_>>()
                            .join("; ")
                    )));
                }
            }
        }
    }
    Ok(())
}

/// The wire schema of staging rows: the pipeline's columns, then the stream and offset.
fn staging_schema(schema: &SchemaRef) -> SchemaRef {
    let wire = wire_schema(schema);
    let mut fields: Vec<arrow::datatypes::FieldRef> = wire.fields().iter().cloned().collect();
    fields.push(Arc::new(arrow::datatypes::Field::new(STREAM_COLUMN, arrow::datatypes::DataType::Utf8, false)));
    fields.push(Arc::new(arrow::datatypes::Field::new(OFFSET_COLUMN, arrow::datatypes::DataType::Int64, false)));
    Arc::new(arrow::datatypes::Schema::new(fields))
}

async fn prepare_target(spec: &SinkSpec, schema: &SchemaRef, target: &Target) -> Result<(), BqError> {
    let config = BigQueryConfig::of(spec)?;
    let ours = table_schema(&wire_schema(schema))?;
    let rest = target.rest_client()?;
    let t = &target.table;
    let Some(existing) = rest.get_table(t).await? else {
        if !config.create_if_missing {
            return Err(BqError::Config(format!(
                "table {t} does not exist (set create_table = 'if_not_exists' to create it from the declared columns)"
            )));
        }
        let opts = CreateOptions {
            partition: config.partition.clone(),
            cluster_by: config.cluster_by.clone(),
            primary_key: spec.table.primary_key.clone(),
        };
        rest.create_table(t, &ours, &opts).await?;
        tracing::info!(table = %t, "created BigQuery table");
        return Ok(());
    };
    let c = compatibility(&existing, &ours);
    if !c.conflicts.is_empty() {
        return Err(BqError::Schema(format!(
            "table {t} cannot take the rows of sink '{}': {}",
            spec.table.name,
            c.conflicts.join("; ")
        )));
    }
    if !c.missing.is_empty() {
        let names: Vec<&str> = c.missing.iter().map(|f| f.name.as_str()).collect();
        if !config.add_columns {
            return Err(BqError::Schema(format!(
                "table {t} has no column(s) {} (set schema_update = 'add_columns' to add them)",
                names.join(", ")
            )));
        }
        let mut fields = existing.clone();
        fields.extend(c.missing.iter().cloned());
        rest.set_schema(t, &fields).await?;
        tracing::info!(table = %t, columns = ?names, "added NULLABLE columns to the BigQuery table");
    }
    Ok(())
}

/// What a checkpoint records for a sink subtask: finalized streams to commit, or BUFFERED streams to flush.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommitHandle {
    /// `projects/p/datasets/d/tables/t`.
    pub table: String,
    /// Finalized streams not yet known to be committed, oldest first.
    pub streams: Vec<PendingStream>,
    /// `commit = 'per_subtask'`: BUFFERED streams and how many of their rows the checkpoint covers, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buffered: Vec<BufferedStream>,
}

/// A BUFFERED stream and the rows of it a checkpoint makes visible.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BufferedStream {
    /// Stream name.
    pub name: String,
    /// Rows `0..rows` are covered: the flush offset is `rows - 1` (FlushRows' offset is inclusive).
    pub rows: i64,
    /// The checkpoint that last recorded it.
    pub checkpoint: u64,
    /// Whether the subtask has moved on to another stream (this one takes no more rows).
    pub retired: bool,
    /// Rows an earlier completed checkpoint already flushed: a stream with nothing new is not flushed again (each
    /// FlushRows is a call, and a flush is needed only when the offset moves).
    #[serde(default)]
    pub flushed: i64,
}

/// A finalized PENDING stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingStream {
    /// Stream name.
    pub name: String,
    /// Rows in it.
    pub rows: i64,
    /// The checkpoint it was finalized for.
    pub checkpoint: u64,
}

/// `CreateWriteStream` calls per hour of an append sink with checkpoints: one per subtask per checkpoint for
/// PENDING streams, one per subtask per `max_age` for BUFFERED ones (`Some(max_age)`), the planner's quota check.
pub fn streams_per_hour(parallelism: usize, checkpoint_interval: Duration, buffered_max_age: Option<Duration>) -> f64 {
    let every = match buffered_max_age {
        // A stream is replaced at the first checkpoint after its age.
        Some(age) => age.max(checkpoint_interval),
        None => checkpoint_interval,
    };
    parallelism as f64 * 3600.0 / every.as_secs_f64().max(0.001)
}

/// Whether the sink writes CDC changes.
pub fn is_upsert(spec: &SinkSpec) -> bool {
    BigQueryConfig::of(spec).is_ok_and(|c| c.mode == WriteMode::Upsert)
}

/// Whether the sink stages files for load jobs.
pub fn is_load(spec: &SinkSpec) -> bool {
    BigQueryConfig::of(spec).is_ok_and(|c| c.mode == WriteMode::Load)
}

/// Commits what every subtask recorded in a checkpoint: write streams (one `BatchCommitWriteStreams` per table, so
/// the checkpoint's rows appear together), or sealed staged files (one load job). Idempotent.
async fn commit_table(t: &TableCommitter, handles: &[serde_json::Value]) -> Result<(), BqError> {
    tracing::debug!(sink = %t.spec.table.name, "committing a completed checkpoint's bigquery writes");
    if t.mode == WriteMode::Load {
        return crate::load::commit(&t.spec, handles).await;
    }
    commit_streams(t, handles, false).await
}

/// After a crash, before the job starts: commits what the restored checkpoint recorded (streams, or every staged
/// file) and discards later epochs' output.
async fn recover_table(t: &TableCommitter, handles: &[serde_json::Value]) -> Result<(), BqError> {
    if t.mode == WriteMode::Load {
        return crate::load::recover(&t.spec, handles).await;
    }
    // Streams of later epochs were never committed: BigQuery drops them.
    commit_streams(t, handles, true).await?;
    // BUFFERED streams now show exactly the checkpoint's rows; rows appended after it may sit in their buffers.
    // Finalizing ends them (no flush past the checkpoint can follow, no zombie writer can append): the new run
    // writes to new streams.
    let buffered: Vec<BufferedStream> = parse_handles(handles)?.into_iter().flat_map(|h| h.buffered).collect();
    if !buffered.is_empty() {
        // `commit_streams` flushed them above: a stream named here that is already finalized was finalized only
        // after being flushed to this checkpoint's offset (by an earlier recovery, or by its subtask after the
        // flush that retired it), so the flush is done either way.
        for b in &buffered {
            t.client.finalize(&b.name).await?;
        }
        tracing::info!(streams = buffered.len(), "recovery flushed and finalized the checkpoint's BUFFERED streams");
    }
    Ok(())
}

fn parse_handles(handles: &[serde_json::Value]) -> Result<Vec<CommitHandle>, BqError> {
    crate::parse_handles(handles, "bigquery handle")
}

/// Makes the rows each handle's BUFFERED streams were checkpointed with visible. Idempotent: a flush at or behind
/// an earlier one changes nothing.
async fn flush_buffered(client: &WriteClient, handles: &[CommitHandle], recovering: bool) -> Result<(), BqError> {
    let streams: Vec<&BufferedStream> =
        handles.iter().flat_map(|h| &h.buffered).filter(|b| b.rows > b.flushed.max(0)).collect();
    if streams.is_empty() {
        return Ok(());
    }
    crate::fault_delay(nagare_core::faults::FaultPoint::BqCommit).await;
    for b in &streams {
        match client.flush_rows(&b.name, b.rows - 1).await {
            Ok(()) => {}
            // Recovering, a stream already finalized was flushed to this offset before (see `recover_table`);
            // Google's Beam connector reads INVALID_ARGUMENT on FlushRows as "already finalized" too.
            Err(BqError::Grpc { code: tonic::Code::InvalidArgument, message, .. }) if recovering => {
                tracing::debug!(stream = %b.name, error = %message, "FlushRows on a finalized stream: already flushed");
            }
            Err(e) => return Err(e),
        }
    }
    crate::fault_delay(nagare_core::faults::FaultPoint::BqFlushed).await;
    tracing::debug!(streams = streams.len(), "flushed BUFFERED streams");
    Ok(())
}

/// A sink subtask for the sink's write mode.
pub fn create(spec: &SinkSpec, schema: SchemaRef, ctx: SinkContext) -> Result<Box<dyn Sink>, BqError> {
    if is_load(spec) {
        return Ok(Box::new(crate::load::LoadSink::new(spec, schema, ctx)?));
    }
    if is_upsert(spec) {
        return Ok(Box::new(crate::upsert::UpsertSink::new(spec, schema, ctx)?));
    }
    Ok(Box::new(BigQuerySink::new(spec, schema, ctx)?))
}

async fn commit_streams(t: &TableCommitter, handles: &[serde_json::Value], recovering: bool) -> Result<(), BqError> {
    let handles = parse_handles(handles)?;
    flush_buffered(&t.client, &handles, recovering).await?;
    let mut by_table: std::collections::BTreeMap<&str, Vec<String>> = std::collections::BTreeMap::new();
    for h in &handles {
        by_table.entry(&h.table).or_default().extend(h.streams.iter().map(|s| s.name.clone()));
    }
    by_table.retain(|_, streams| !streams.is_empty());
    if by_table.is_empty() {
        return Ok(());
    }
    crate::fault_delay(nagare_core::faults::FaultPoint::BqCommit).await;
    for (table, streams) in by_table {
        t.client.commit_streams(table, &streams).await?;
        if let Some(m) = &t.target.merge {
            merge_streams(&t.target, m, &t.spec.table.schema, &streams).await?;
        }
        let rows: i64 = handles.iter().filter(|h| h.table == table).flat_map(|h| &h.streams).map(|s| s.rows).sum();
        tracing::debug!(table, streams = streams.len(), rows, "committed write streams");
    }
    Ok(())
}

/// Quotes a string literal for GoogleSQL.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Applies committed staging streams to the target: per key, the last row (by stream order, then offset) is
/// inserted or replaces the target's row. The job id is derived from the streams, so a commit retried after a
/// crash finds the job already run; the staging rows are then deleted the same way.
async fn merge_streams(
    target: &Target,
    m: &MergeTarget,
    schema: &SchemaRef,
    streams: &[String],
) -> Result<(), BqError> {
    let rest = target.rest_client()?;
    let q = |t: &TableRef| format!("`{}.{}.{}`", t.project, t.dataset, t.table);
    let col = |c: &str| format!("`{c}`");
    let columns: Vec<String> = schema.fields().iter().map(|f| col(f.name())).collect();
    let in_list = streams.iter().map(|s| literal(s)).collect::<Vec<_>>().join(", ");
    let order =
        streams.iter().enumerate().map(|(i, s)| format!("WHEN {} THEN {i}", literal(s))).collect::<Vec<_>>().join(" ");
    let keys: Vec<String> = m.key.iter().map(|k| col(k)).collect();
    let on =
        m.key.iter().map(|k| format!("T.{0} IS NOT DISTINCT FROM S.{0}", col(k))).collect::<Vec<_>>().join(" AND ");
    let set = columns.iter().map(|c| format!("{c} = S.{c}")).collect::<Vec<_>>().join(", ");
    let values = columns.iter().map(|c| format!("S.{c}")).collect::<Vec<_>>().join(", ");
    let sql = format!(
        "MERGE {target} T USING (SELECT {cols} FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY {keys} ORDER BY \
         CASE {stream} {order} END DESC, {offset} DESC) AS _nagare_rn FROM {staging} WHERE {stream} IN ({in_list})) \
         WHERE _nagare_rn = 1) S ON {on} WHEN MATCHED THEN UPDATE SET {set} WHEN NOT MATCHED THEN INSERT ({cols}) \
         VALUES ({values})",
        target = q(&target.table),
        staging = q(&m.staging),
        cols = columns.join(", "),
        keys = keys.join(", "),
        stream = col(STREAM_COLUMN),
        offset = col(OFFSET_COLUMN),
    );
    let id = xxhash_rust::xxh3::xxh3_128(format!("{}|{}", target.table, streams.join("|")).as_bytes());
    rest.run_job(&target.table.project, &format!("nagare_merge_{id:032x}"), &sql).await?;
    let delete = format!("DELETE FROM {} WHERE {} IN ({in_list})", q(&m.staging), col(STREAM_COLUMN));
    rest.run_job(&target.table.project, &format!("nagare_clean_{id:032x}"), &delete).await?;
    tracing::debug!(table = %target.table, streams = streams.len(), "merged staging streams");
    Ok(())
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

/// One subtask of a bigquery sink.
pub struct BigQuerySink {
    target: Target,
    client: WriteClient,
    /// The pipeline's rows in wire types.
    data_wire: SchemaRef,
    /// What is sent: `data_wire`, plus stream and offset columns in merge mode.
    wire: SchemaRef,
    ctx: SinkContext,
    /// The current epoch's stream (PENDING with checkpoints, `_default` without).
    current: Option<Appender>,
    /// Finalized streams waiting for their checkpoint to complete.
    uncommitted: Vec<PendingStream>,
    /// `commit = 'per_subtask'`: the current stream is BUFFERED and outlives checkpoints.
    buffered: bool,
    /// When the current BUFFERED stream was created (it is replaced at a checkpoint after `stream_max_age`).
    opened: Option<std::time::Instant>,
    /// BUFFERED streams whose checkpointed rows are not yet known to be flushed, oldest first (the current one
    /// last).
    unflushed: Vec<BufferedStream>,
    name: String,
}

impl BigQuerySink {
    /// A sink subtask writing rows of `schema`.
    pub fn new(spec: &SinkSpec, schema: SchemaRef, ctx: SinkContext) -> Result<Self, BqError> {
        let target = Target::from_spec(spec)?;
        let buffered = ctx.exactly_once && target.buffered(ctx.checkpoint_interval);
        if let Some(interval) = ctx.checkpoint_interval
            && ctx.subtask == 0
        {
            let per_hour = streams_per_hour(ctx.parallelism, interval, buffered.then_some(target.stream_max_age));
            tracing::debug!(table = %target.table, streams_per_hour = per_hour as u64, buffered, "write stream rate");
            if per_hour > STREAMS_PER_HOUR_QUOTA / 2.0 {
                tracing::warn!(
                    table = %target.table,
                    streams_per_hour = per_hour as u64,
                    quota = STREAMS_PER_HOUR_QUOTA,
                    "this sink may create write streams near BigQuery's CreateWriteStream quota: with commit = \
                     'atomic' a stream per subtask per checkpoint (use commit = 'per_subtask', a longer \
                     checkpoint_interval or fewer sink subtasks); with 'per_subtask' one per subtask per \
                     stream_max_age (raise it)"
                );
            }
        }
        if target.merge.is_some() && !ctx.exactly_once {
            return Err(BqError::Config(format!(
                "sink '{}': write_mode = 'merge' runs a MERGE per checkpoint and needs checkpoints (--checkpoint-dir)",
                spec.table.name
            )));
        }
        Ok(BigQuerySink {
            client: target.write_client()?,
            data_wire: wire_schema(&schema),
            wire: if target.merge.is_some() { staging_schema(&schema) } else { wire_schema(&schema) },
            name: spec.table.name.clone(),
            target,
            ctx,
            current: None,
            uncommitted: Vec::new(),
            buffered,
            opened: None,
            unflushed: Vec::new(),
        })
    }

    fn handle(&self) -> CommitHandle {
        CommitHandle {
            table: self.target.stream_table().path(),
            streams: self.uncommitted.clone(),
            buffered: self.unflushed.iter().filter(|b| b.rows > 0).cloned().collect(),
        }
    }

    /// `per_subtask` at the barrier: everything sent is acknowledged, the current stream's row count goes in the
    /// checkpoint, and a stream past `stream_max_age` is retired (its last rows flush with this checkpoint).
    async fn pre_commit_buffered(&mut self, checkpoint: CheckpointId) -> Result<(), EngineError> {
        let Some(a) = self.current.as_mut() else { return Ok(()) };
        let rejected = a.flush().await?;
        let (stream, rows) = (a.stream().to_string(), a.rows_sent());
        self.dead_letter(rejected)?;
        let retire = self.opened.is_some_and(|t| t.elapsed() >= self.target.stream_max_age);
        match self.unflushed.iter_mut().find(|b| b.name == stream) {
            Some(b) => {
                b.rows = rows;
                b.checkpoint = checkpoint.0;
                b.retired = retire;
            }
            None => self.unflushed.push(BufferedStream {
                name: stream.clone(),
                rows,
                checkpoint: checkpoint.0,
                retired: retire,
                flushed: 0,
            }),
        }
        if retire && let Some(mut a) = self.current.take() {
            a.close();
            self.opened = None;
            tracing::debug!(stream, rows, "write stream reached stream_max_age: the next rows go to a new one");
        }
        Ok(())
    }

    fn dead_letter(&self, rejected: Vec<Rejected>) -> Result<(), EngineError> {
        dead_letter(&self.ctx, &self.name, "BigQuery rejected", rejected)
    }

    /// Counts a `CreateWriteStream` in the node's metrics (`nagare_write_streams_created_total`).
    fn stream_created(&self, stream: &str) {
        nagare_engine::metrics::NodeMetrics::add(&self.ctx.metrics.streams_created, 1);
        tracing::debug!(stream, subtask = self.ctx.subtask, "created write stream");
    }

    async fn appender(&mut self) -> Result<&mut Appender, BqError> {
        if self.current.is_none() {
            let table = self.target.stream_table().path();
            let a = if self.buffered {
                let stream = self.client.create_buffered_stream(&table).await?;
                self.stream_created(&stream);
                self.opened = Some(std::time::Instant::now());
                self.client.appender(stream, &self.wire, self.target.max_request_bytes)?
            } else if self.ctx.exactly_once {
                let stream = self.client.create_pending_stream(&table).await?;
                self.stream_created(&stream);
                self.client.appender(stream, &self.wire, self.target.max_request_bytes)?
            } else {
                self.client.default_stream_appender(&table, &self.wire, self.target.max_request_bytes)?
            };
            self.current = Some(a);
        }
        self.current.as_mut().ok_or_else(|| BqError::Protocol("no stream".into()))
    }
}

#[async_trait]
impl Sink for BigQuerySink {
    async fn write(&mut self, batch: RecordBatch) -> Result<(), EngineError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let wire = to_wire(&batch, &self.data_wire)?;
        let staging = self.target.merge.is_some().then(|| self.wire.clone());
        let a = self.appender().await?;
        let wire = match staging {
            // Merge mode: each row says which stream and offset it has, for the MERGE's order.
            Some(schema) => {
                let n = wire.num_rows();
                let stream = arrow::array::StringArray::from(vec![a.stream(); n]);
                let base = a.rows_sent();
                let offsets = arrow::array::Int64Array::from_iter_values(base..base + n as i64);
                let mut cols = wire.columns().to_vec();
                cols.push(Arc::new(stream));
                cols.push(Arc::new(offsets));
                RecordBatch::try_new(schema, cols).map_err(BqError::from)?
            }
            None => wire,
        };
        let rejected = a.append(&wire).await?;
        self.dead_letter(rejected)
    }

    async fn pre_commit(&mut self, checkpoint: CheckpointId, _last: bool) -> Result<serde_json::Value, EngineError> {
        if self.buffered {
            self.pre_commit_buffered(checkpoint).await?;
        } else if let Some(mut a) = self.current.take() {
            let rejected = a.flush().await?;
            self.dead_letter(rejected)?;
            a.close();
            let rows = self.client.finalize(a.stream()).await?;
            if rows != a.rows_sent() {
                return Err(BqError::Protocol(format!(
                    "stream {} holds {rows} rows after finalizing, {} were acknowledged",
                    a.stream(),
                    a.rows_sent()
                ))
                .into());
            }
            if rows > 0 {
                self.uncommitted.push(PendingStream { name: a.stream().to_string(), rows, checkpoint: checkpoint.0 });
            }
        }
        serde_json::to_value(self.handle()).map_err(|e| EngineError::Internal(e.to_string()))
    }

    /// The table's committer (`commit_table`, run by the checkpoint coordinator) has committed every subtask's
    /// streams of checkpoints up to `checkpoint`: they leave the list carried in later handles.
    /// `per_subtask`: retired streams flushed by it are finalized and leave the handle.
    async fn commit(&mut self, checkpoint: CheckpointId) -> Result<(), EngineError> {
        self.uncommitted.retain(|s| s.checkpoint > checkpoint.0);
        let (done, mut keep): (Vec<_>, Vec<_>) =
            self.unflushed.drain(..).partition(|b| b.retired && b.checkpoint <= checkpoint.0);
        for b in keep.iter_mut().filter(|b| b.checkpoint <= checkpoint.0) {
            b.flushed = b.rows;
        }
        self.unflushed = keep;
        for b in done {
            self.client.finalize(&b.name).await?;
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), EngineError> {
        if self.buffered {
            // Everything was flushed by the final checkpoint: the stream is ended.
            if let Some(mut a) = self.current.take() {
                a.close();
                self.client.finalize(a.stream()).await?;
            }
            return Ok(());
        }
        if !self.ctx.exactly_once
            && let Some(mut a) = self.current.take()
        {
            let rejected = a.flush().await?;
            self.dead_letter(rejected)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quota_estimate_follows_the_commit_mode() {
        let second = Duration::from_secs(1);
        // atomic: a stream per subtask per checkpoint; 1 s at parallelism 4 is over BigQuery's 10,000 an hour.
        assert_eq!(streams_per_hour(4, second, None), 14_400.0);
        // per_subtask: a stream per subtask per stream_max_age.
        assert_eq!(streams_per_hour(8, second, Some(Duration::from_secs(3600))), 8.0);
        // A stream is replaced at a checkpoint, so never more often than checkpoints come.
        assert_eq!(streams_per_hour(2, Duration::from_secs(60), Some(second)), 120.0);
    }

    #[test]
    fn auto_picks_long_lived_streams_under_a_minute() {
        let target = |commit: &str| Target {
            table: TableRef { project: "p".into(), dataset: "d".into(), table: "t".into() },
            auth: Auth::None,
            endpoint: String::new(),
            rest_endpoint: String::new(),
            max_request_bytes: 1,
            merge: None,
            commit: commit.into(),
            stream_max_age: Duration::from_secs(3600),
        };
        let every = |s: u64| Some(Duration::from_secs(s));
        assert!(target("auto").buffered(every(1)));
        assert!(target("auto").buffered(every(59)));
        assert!(!target("auto").buffered(every(60)));
        assert!(!target("atomic").buffered(every(1)));
        assert!(target("per_subtask").buffered(every(600)));
        let mut merge = target("per_subtask");
        merge.merge = Some(MergeTarget { staging: merge.table.clone(), key: vec!["id".into()] });
        assert!(!merge.buffered(every(1)), "merge reads its staging streams by name: always PENDING");
    }

    #[test]
    fn handles_of_earlier_versions_still_read() {
        let old = serde_json::json!({"table": "projects/p/datasets/d/tables/t", "streams": [
            {"name": "s1", "rows": 3, "checkpoint": 7}]});
        let h: CommitHandle = serde_json::from_value(old).unwrap();
        assert!(h.buffered.is_empty());
        assert_eq!(h.streams.len(), 1);
    }
}
