//! `connector = 'bigquery'`: its options and checks, its typed configuration, and what the runtime builds from it —
//! a subtask per write mode (`append`/`merge` in [`crate::sink`], `load`, `upsert`) and one committer per table.

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use nagare_engine::EngineError;
use nagare_engine::connector::{Committer, Connector, Sink, SinkContext};
use nagare_sql::SinkSpec;
use nagare_sql::catalog::{ConnectorSpec, TableDef, TableRole};
use nagare_sql::error::PlanError;
use nagare_sql::options::{OptionKind, OptionSpec};

use crate::config::{BigQueryConfig, WriteMode, columns_of};
use crate::error::BqError;
use crate::rest::CreateOptions;
use crate::sink::{BigQuerySink, BufferedStream, staging_schema};
use crate::target::Target;
use crate::types::{compatibility, table_schema, wire_schema};
use crate::write::{DEFAULT_MAX_REQUEST_BYTES, WriteClient};

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
        "stream_max_bytes",
        OptionKind::ByteSize,
        Some("10GB"),
        "commit = 'per_subtask': a subtask's write stream is replaced by a new one at the first checkpoint after \
         this much has been appended to it (also replaced when BigQuery reports the table's schema changed)",
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
        for name in ["commit", "stream_max_age", "stream_max_bytes"] {
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
        if let Some(bytes) = o.get_bytes("stream_max_bytes")
            && bytes < 64_000
        {
            return Err(o.error(
                "stream_max_bytes",
                "must be at least 64KB (a new write stream per checkpoint would meet BigQuery's CreateWriteStream quota)",
            ));
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
    crate::sink::commit_streams(&t.client, &t.target, &t.spec.table.schema, handles, false).await
}

/// After a crash, before the job starts: commits what the restored checkpoint recorded (streams, or every staged
/// file) and discards later epochs' output.
async fn recover_table(t: &TableCommitter, handles: &[serde_json::Value]) -> Result<(), BqError> {
    if t.mode == WriteMode::Load {
        return crate::load::recover(&t.spec, handles).await;
    }
    // Streams of later epochs were never committed: BigQuery drops them.
    crate::sink::commit_streams(&t.client, &t.target, &t.spec.table.schema, handles, true).await?;
    // BUFFERED streams now show exactly the checkpoint's rows; rows appended after it may sit in their buffers.
    // Finalizing ends them (no flush past the checkpoint can follow, no zombie writer can append): the new run
    // writes to new streams.
    let buffered: Vec<BufferedStream> =
        crate::sink::parse_handles(handles)?.into_iter().flat_map(|h| h.buffered).collect();
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
