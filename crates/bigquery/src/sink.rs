//! The bigquery sink's append and merge modes: a subtask writing Storage Write API streams, and the per-table
//! commit of those streams (flushes, `BatchCommitWriteStreams`, the merge's MERGE statement).
//!
//! `append` with checkpoints is exactly once, in one of two ways (`commit`).
//!
//! `commit = 'per_subtask'`: each sink subtask appends to one BUFFERED write stream that lives across many
//! checkpoints, with explicit offsets. At the barrier it waits for every acknowledgement and puts
//! `{stream, rows appended}` in the checkpoint; when the checkpoint completes the committer calls `FlushRows` up to
//! that offset (inclusive: rows - 1), which makes exactly those rows visible. Flushing is idempotent, so recovery
//! flushes the restored checkpoint's offsets again, then finalizes those streams (rows appended after the
//! checkpoint stay in their buffers, never visible) and the new run writes to new streams. A stream is replaced at
//! the first barrier after `stream_max_age`, after `stream_max_bytes`, or after BigQuery reported a schema change:
//! the checkpoint lists it (retired, with its final row count) next to the streams still open, so the old stream's
//! last rows flush when that checkpoint completes and the new stream holds only rows after the barrier. Streams are
//! created about once per subtask per `stream_max_age` (or per `stream_max_bytes` written), not per checkpoint.
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
use nagare_engine::connector::{Sink, SinkContext};
use nagare_sql::SinkSpec;
use serde::{Deserialize, Serialize};

use crate::error::BqError;
use crate::rest::TableRef;
use crate::target::{MergeTarget, Target, dead_letter};
use crate::types::{to_wire, wire_schema};
use crate::write::{Appender, Rejected, WriteClient};

/// BigQuery's quota on `CreateWriteStream`: streams per project and region per hour.
pub const STREAMS_PER_HOUR_QUOTA: f64 = 10_000.0;

/// Columns the merge mode adds to staging rows: which write stream, and the row's offset in it.
const STREAM_COLUMN: &str = "_nagare_stream";
const OFFSET_COLUMN: &str = "_nagare_offset";

/// The wire schema of staging rows: the pipeline's columns, then the stream and offset.
pub(crate) fn staging_schema(schema: &SchemaRef) -> SchemaRef {
    let wire = wire_schema(schema);
    let mut fields: Vec<arrow::datatypes::FieldRef> = wire.fields().iter().cloned().collect();
    fields.push(Arc::new(arrow::datatypes::Field::new(STREAM_COLUMN, arrow::datatypes::DataType::Utf8, false)));
    fields.push(Arc::new(arrow::datatypes::Field::new(OFFSET_COLUMN, arrow::datatypes::DataType::Int64, false)));
    Arc::new(arrow::datatypes::Schema::new(fields))
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

pub(crate) fn parse_handles(handles: &[serde_json::Value]) -> Result<Vec<CommitHandle>, BqError> {
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

/// Commits the streams the handles name (after flushing their BUFFERED streams), and in merge mode merges the
/// committed staging rows into the table. Idempotent.
pub(crate) async fn commit_streams(
    client: &WriteClient,
    target: &Target,
    schema: &SchemaRef,
    handles: &[serde_json::Value],
    recovering: bool,
) -> Result<(), BqError> {
    let handles = parse_handles(handles)?;
    flush_buffered(client, &handles, recovering).await?;
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
        client.commit_streams(table, &streams).await?;
        if let Some(m) = &target.merge {
            merge_streams(target, m, schema, &streams).await?;
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
                     stream_max_age or stream_max_bytes (raise them)"
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
    /// checkpoint, and a stream due for replacement (see [`BigQuerySink::rotation`]) is retired: its last rows flush
    /// with this checkpoint and rows after the barrier go to a new stream.
    async fn pre_commit_buffered(&mut self, checkpoint: CheckpointId) -> Result<(), EngineError> {
        let Some(a) = self.current.as_mut() else { return Ok(()) };
        let rejected = a.flush().await?;
        let (stream, rows) = (a.stream().to_string(), a.rows_sent());
        self.dead_letter(rejected)?;
        let why = self.rotation();
        let retire = why.is_some();
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
        if let Some(why) = why
            && let Some(mut a) = self.current.take()
        {
            a.close();
            self.opened = None;
            tracing::debug!(stream, rows, reason = why, "write stream retired: the next rows go to a new one");
        }
        Ok(())
    }

    /// Why the current BUFFERED stream should be replaced at this barrier, if it should: its age or size passed
    /// `stream_max_age` / `stream_max_bytes`, or BigQuery reported the table's schema changed under it.
    fn rotation(&self) -> Option<&'static str> {
        let a = self.current.as_ref()?;
        if a.schema_changed() {
            Some("the table's schema changed")
        } else if a.bytes_sent() >= self.target.stream_max_bytes {
            Some("stream_max_bytes")
        } else if self.opened.is_some_and(|t| t.elapsed() >= self.target.stream_max_age) {
            Some("stream_max_age")
        } else {
            None
        }
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
    use crate::auth::Auth;

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
            stream_max_bytes: crate::config::DEFAULT_STREAM_MAX_BYTES,
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

    /// A `per_subtask` sink on the test double, driven the way the engine drives it: writes, barriers, the table's
    /// commit when a checkpoint completes, then the subtask's; a crash drops the sink and recovers the table from the
    /// last completed checkpoint, and the source replays the rows after it.
    struct Job {
        fake: crate::testing::Fake,
        spec: SinkSpec,
        committer: Arc<dyn nagare_engine::connector::Committer>,
        sink: Option<BigQuerySink>,
        /// Ids written so far (the source's position).
        next: i64,
        checkpoint: u64,
        /// The last completed checkpoint's handles, and the source position it holds.
        completed: (Vec<serde_json::Value>, i64),
        /// The last barrier's handle and position, until its checkpoint completes.
        pending: Option<(serde_json::Value, i64)>,
    }

    const TABLE: &str = "projects/p/datasets/d/tables/t";

    fn id_schema() -> SchemaRef {
        Arc::new(arrow::datatypes::Schema::new(vec![arrow::datatypes::Field::new(
            "id",
            arrow::datatypes::DataType::Int64,
            false,
        )]))
    }

    impl Job {
        async fn new(stream_max_bytes: u64) -> Job {
            use nagare_engine::connector::Connector;
            let fake = crate::testing::Fake::default();
            let endpoint = fake.serve().await;
            // The table as planned: its config is what the planner stores.
            let table = |config: serde_json::Value| nagare_sql::TableDef {
                name: "bq".into(),
                connector: "bigquery".into(),
                schema: id_schema(),
                has_columns: true,
                watermark: None,
                primary_key: Vec::new(),
                options: nagare_sql::Options::default(),
                raw_options: Vec::new(),
                config,
                location: None,
            };
            let mut config = crate::config::BigQueryConfig::from_table(&table(serde_json::Value::Null));
            config.project = "p".into();
            config.dataset = "d".into();
            config.table = "t".into();
            config.commit = "per_subtask".into();
            config.credentials = "none".into();
            config.endpoint = endpoint;
            config.rest_endpoint = "http://127.0.0.1:9".into();
            config.stream_max_bytes = stream_max_bytes;
            let table = table(serde_json::to_value(&config).unwrap());
            let spec = SinkSpec { table: Arc::new(table) };
            let committer = crate::BigQuerySpec.committer(&spec).unwrap();
            let mut job = Job {
                fake,
                spec,
                committer,
                sink: None,
                next: 0,
                checkpoint: 0,
                completed: (Vec::new(), 0),
                pending: None,
            };
            job.start();
            job
        }

        fn start(&mut self) {
            let ctx = SinkContext {
                subtask: 0,
                parallelism: 1,
                run_id: "r".into(),
                metrics: Arc::new(nagare_engine::metrics::NodeMetrics::new(0, "bq".into(), "sink", 1)),
                exactly_once: true,
                checkpoint_interval: Some(Duration::from_secs(1)),
                dead_letter: None,
            };
            self.sink = Some(BigQuerySink::new(&self.spec, id_schema(), ctx).unwrap());
        }

        fn sink(&mut self) -> &mut BigQuerySink {
            self.sink.as_mut().unwrap()
        }

        /// Writes the next `n` ids.
        async fn write(&mut self, n: i64) {
            let ids = arrow::array::Int64Array::from_iter_values(self.next..self.next + n);
            let batch = RecordBatch::try_new(id_schema(), vec![Arc::new(ids)]).unwrap();
            self.next += n;
            self.sink().write(batch).await.unwrap();
        }

        /// The barrier of the next checkpoint; returns its handle.
        async fn barrier(&mut self) -> CommitHandle {
            self.checkpoint += 1;
            let id = CheckpointId(self.checkpoint);
            let h = self.sink().pre_commit(id, false).await.unwrap();
            self.pending = Some((h.clone(), self.next));
            serde_json::from_value(h).unwrap()
        }

        /// The checkpoint's metadata is written: the commit point.
        fn complete(&mut self) {
            let (h, at) = self.pending.take().unwrap();
            self.completed = (vec![h], at);
        }

        /// The table's commit of the completed checkpoint (the flushes).
        async fn commit_table(&mut self) {
            self.committer.commit(&self.completed.0).await.unwrap();
        }

        /// The subtask's commit (retired streams are finalized).
        async fn commit_subtask(&mut self) {
            let id = CheckpointId(self.checkpoint);
            self.sink().commit(id).await.unwrap();
        }

        async fn checkpoint(&mut self) -> CommitHandle {
            let h = self.barrier().await;
            self.complete();
            self.commit_table().await;
            self.commit_subtask().await;
            h
        }

        /// SIGKILL: the sink is gone; the next run recovers the table and replays from the completed checkpoint.
        async fn crash_and_recover(&mut self) {
            self.sink = None;
            self.pending = None;
            self.committer.recover(&self.completed.0).await.unwrap();
            self.next = self.completed.1;
            self.start();
        }

        async fn finish(&mut self) {
            self.checkpoint().await;
            self.sink().finish().await.unwrap();
        }

        fn visible(&self) -> Vec<i64> {
            self.fake.visible_keys(TABLE).iter().map(|k| k.parse().unwrap()).collect()
        }

        /// Rows in each stream, in creation order.
        fn stream_rows(&self) -> Vec<i64> {
            let st = self.fake.state.lock().unwrap();
            let mut v: Vec<(u64, i64)> = st
                .streams
                .iter()
                .map(|(n, s)| (n.rsplit("/s").next().unwrap().parse().unwrap(), s.row_count))
                .collect();
            v.sort();
            v.into_iter().map(|(_, r)| r).collect()
        }
    }

    #[tokio::test]
    async fn a_stream_past_stream_max_bytes_is_replaced_at_a_barrier_and_every_row_is_visible_once() {
        // 100 ids are about 900 bytes: a stream passes 2,000 bytes in its third batch, during its second checkpoint.
        let mut job = Job::new(2_000).await;
        let mut rotations = 0;
        for c in 1..=10 {
            job.write(100).await;
            job.write(100).await;
            let h = job.checkpoint().await;
            rotations += h.buffered.iter().filter(|b| b.retired).count();
            assert_eq!(job.visible(), (0..c * 200).collect::<Vec<_>>(), "checkpoint {c}: its rows, once");
        }
        job.finish().await;
        assert_eq!(job.visible(), (0..2_000).collect::<Vec<_>>());
        let per_stream = job.stream_rows();
        // A rotation every second checkpoint; the one at the tenth leaves no rows for another stream.
        assert_eq!(per_stream.len(), rotations, "a new stream after each rotation: {per_stream:?}");
        assert_eq!(rotations, 5, "{per_stream:?}");
        assert!(per_stream.iter().all(|r| r % 200 == 0), "streams change only at barriers: {per_stream:?}");
        let st = job.fake.state.lock().unwrap();
        assert!(st.streams.values().all(|s| s.finalized), "retired streams are finalized once flushed");
        assert_eq!(st.streams_created, per_stream.len(), "each rotation is one CreateWriteStream");
        let metric = nagare_engine::metrics::NodeMetrics::get(&job.sink.as_ref().unwrap().ctx.metrics.streams_created);
        assert_eq!(metric as usize, st.streams_created, "counted in nagare_write_streams_created_total");
    }

    /// Where a SIGKILL lands around a rotation at barrier 3.
    #[derive(Debug, Clone, Copy)]
    enum Kill {
        /// After the barrier decided to rotate, before the checkpoint completed.
        BeforeComplete,
        /// After the commit point, before the old stream's flush.
        BeforeFlush,
        /// After the flush, before the old stream is finalized.
        BeforeFinalize,
        /// After the finalize, before the first append to the new stream.
        BeforeNewAppend,
        /// After appends to the new stream, before the next barrier.
        AfterNewAppend,
    }

    #[tokio::test]
    async fn a_kill_anywhere_around_a_rotation_leaves_every_row_once() {
        use Kill::*;
        for strict in [false, true] {
            for kill in [BeforeComplete, BeforeFlush, BeforeFinalize, BeforeNewAppend, AfterNewAppend] {
                // Every checkpoint's 200 ids pass 1,000 bytes: a rotation at every barrier.
                let mut job = Job::new(1_000).await;
                job.fake.state.lock().unwrap().strict_flush = strict;
                for _ in 0..2 {
                    job.write(200).await;
                    job.checkpoint().await;
                }
                job.write(200).await;
                let h = job.barrier().await;
                assert!(h.buffered.iter().any(|b| b.retired), "barrier 3 rotates");
                if !matches!(kill, BeforeComplete) {
                    job.complete();
                    if !matches!(kill, BeforeFlush) {
                        job.commit_table().await;
                        if !matches!(kill, BeforeFinalize) {
                            job.commit_subtask().await;
                            if matches!(kill, AfterNewAppend) {
                                job.write(150).await;
                            }
                        }
                    }
                }
                job.crash_and_recover().await;
                // A recovered job sees exactly the restored checkpoint's rows; the replay writes the rest once.
                assert_eq!(job.visible(), (0..job.next).collect::<Vec<_>>(), "{kill:?} strict={strict}");
                while job.next < 1_000 {
                    job.write(200.min(1_000 - job.next)).await;
                    job.checkpoint().await;
                }
                job.finish().await;
                assert_eq!(job.visible(), (0..1_000).collect::<Vec<_>>(), "{kill:?} strict={strict}");
            }
        }
    }

    #[tokio::test]
    async fn a_schema_change_replaces_the_stream_at_the_next_barrier() {
        let mut job = Job::new(crate::config::DEFAULT_STREAM_MAX_BYTES).await;
        job.write(100).await;
        job.checkpoint().await;
        job.write(100).await;
        // Someone adds a column: the next acknowledgements carry updated_schema.
        job.fake.change_schema();
        job.write(100).await;
        job.write(100).await;
        let h = job.checkpoint().await;
        assert!(h.buffered.iter().any(|b| b.retired && b.rows == 400), "{h:?}");
        assert_eq!(job.stream_rows(), vec![400], "the stream keeps its checkpoint's rows after the change");
        job.write(100).await;
        job.checkpoint().await;
        job.finish().await;
        assert_eq!(job.stream_rows(), vec![400, 100], "the rows after the barrier went to a new stream");
        assert_eq!(job.visible(), (0..500).collect::<Vec<_>>());
        let st = job.fake.state.lock().unwrap();
        assert!(st.streams.values().all(|s| s.finalized));
    }

    #[tokio::test]
    async fn rows_refused_for_a_column_the_stream_has_not_seen_are_resent_and_the_stream_replaced() {
        let mut job = Job::new(crate::config::DEFAULT_STREAM_MAX_BYTES).await;
        job.fake.state.lock().unwrap().refuse_stale_schema = true;
        job.write(100).await;
        job.checkpoint().await;
        job.write(100).await;
        // The table gains a column: the open connection's next append is refused with SCHEMA_MISMATCH_EXTRA_FIELDS,
        // and a new connection to the same stream takes the rows.
        job.fake.change_schema();
        job.write(100).await;
        let h = job.checkpoint().await;
        assert!(h.buffered.iter().any(|b| b.retired && b.rows == 300), "{h:?}");
        job.write(100).await;
        job.finish().await;
        assert_eq!(job.stream_rows(), vec![300, 100]);
        assert_eq!(job.visible(), (0..400).collect::<Vec<_>>());
        // Everything unacknowledged went again on the new connection: the second batch (answered ALREADY_EXISTS)
        // and the refused third.
        assert_eq!(job.fake.state.lock().unwrap().append_requests, 6);
    }
}
