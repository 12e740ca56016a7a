//! The seams between the runtime and connectors: what a source and a sink implement, and the factory that builds
//! them from a table definition.

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use nagare_core::CheckpointId;
use nagare_sql::{SinkSpec, SourceSpec};
use tokio_util::sync::CancellationToken;

use crate::dead_letter::DeadLetterWriter;
use crate::error::Result;
use crate::metrics::NodeMetrics;

/// What a source has for the runtime.
#[derive(Debug)]
pub enum SourceEvent {
    /// Rows in the source's output schema.
    Batch(RecordBatch),
    /// Nothing right now; ask again after about this long.
    Idle(Duration),
    /// The input is exhausted (bounded sources only).
    End,
}

/// Where and how a source subtask runs.
#[derive(Debug, Clone)]
pub struct SourceContext {
    /// This subtask's index.
    pub subtask: usize,
    /// Subtasks of the source.
    pub parallelism: usize,
    /// Rows per batch to aim for.
    pub batch_size: usize,
    /// Where malformed records go when the source is configured to dead-letter them.
    pub dead_letter: Option<Arc<DeadLetterWriter>>,
    /// The node's counters.
    pub metrics: Arc<NodeMetrics>,
    /// Set when the job is stopping; long waits should end early.
    pub stop: CancellationToken,
    /// Whether the job takes checkpoints: input is then acknowledged upstream only in
    /// [`Source::notify_checkpoint_complete`]; without them a source acknowledges what it handed downstream.
    pub checkpoints: bool,
}

/// Where and how a sink subtask runs.
#[derive(Debug, Clone)]
pub struct SinkContext {
    /// This subtask's index.
    pub subtask: usize,
    /// Subtasks of the sink.
    pub parallelism: usize,
    /// A token unique to this run of the job, for output names that never collide.
    pub run_id: String,
    /// The node's counters.
    pub metrics: Arc<NodeMetrics>,
    /// Whether output is committed by checkpoints (two-phase) rather than made visible as it is written.
    pub exactly_once: bool,
    /// Time between checkpoints, when there are checkpoints (for quota estimates).
    pub checkpoint_interval: Option<Duration>,
    /// Where rows the destination rejects go (the sink's `dead_letter_path`, or the pipeline's).
    pub dead_letter: Option<Arc<DeadLetterWriter>>,
}

/// A parallel reader of one source table: each subtask reads its share of the input.
#[async_trait]
pub trait Source: Send {
    /// The next batch, or that there is nothing for now, or that the input has ended.
    ///
    /// Called again only after the previous call returned; a call may be abandoned only when the job stops.
    async fn next(&mut self) -> Result<SourceEvent>;

    /// The position to restart from if the job fails after checkpoint `checkpoint`: everything returned by `next`
    /// so far is before it. Called between `next` calls; the factory gets it back to resume.
    fn snapshot_position(&mut self, checkpoint: CheckpointId) -> Result<serde_json::Value>;

    /// Checkpoint `checkpoint` is durable: input before it may be acknowledged upstream.
    async fn notify_checkpoint_complete(&mut self, _checkpoint: CheckpointId) -> Result<()> {
        Ok(())
    }
}

/// A parallel writer of one sink table.
#[async_trait]
pub trait Sink: Send {
    /// Writes rows (in the sink's schema).
    async fn write(&mut self, batch: RecordBatch) -> Result<()>;

    /// Called about once a second, for time-based work such as rolling files.
    async fn tick(&mut self) -> Result<()> {
        Ok(())
    }

    /// Makes everything written so far durable but not yet visible (first phase of two-phase commit). Returns
    /// what recovery needs to make it visible if the job fails after the checkpoint completes; it covers every
    /// pre-committed write not yet committed, so an aborted checkpoint's writes ride with the next one. `last` marks
    /// the job's final checkpoint (input ended or stop-with-checkpoint). A sink's `commit` of an earlier completed
    /// checkpoint always comes before its `pre_commit` of a later one.
    async fn pre_commit(&mut self, checkpoint: CheckpointId, last: bool) -> Result<serde_json::Value>;

    /// Checkpoint `checkpoint` is complete: makes the writes pre-committed up to it visible. Idempotent.
    async fn commit(&mut self, checkpoint: CheckpointId) -> Result<()>;

    /// The input has ended: without checkpoints, flush and make everything visible; with checkpoints everything has
    /// been committed by the final checkpoint and this only releases resources.
    async fn finish(&mut self) -> Result<()>;
}

/// What a restored source resumes from: the position each subtask of the checkpointed run stored, by subtask.
/// With the same parallelism a subtask takes its own; after a rescale, old subtask `k`'s remaining work goes to new
/// subtask `k % parallelism` (so a source with fewer old subtasks than new ones leaves some new ones without work).
#[derive(Debug, Clone, Default)]
pub struct SourceRestore {
    /// Position of each old subtask (`None` where one stored nothing).
    pub positions: Vec<Option<serde_json::Value>>,
}

impl SourceRestore {
    /// The positions subtask `subtask` of `parallelism` continues.
    pub fn mine(&self, subtask: usize, parallelism: usize) -> Vec<&serde_json::Value> {
        self.positions
            .iter()
            .enumerate()
            .filter(|(k, _)| k % parallelism.max(1) == subtask)
            .filter_map(|(_, p)| p.as_ref())
            .collect()
    }

    /// Every old subtask's position (for what all subtasks must know, like files already seen).
    pub fn all(&self) -> impl Iterator<Item = &serde_json::Value> {
        self.positions.iter().flatten()
    }
}

/// Builds sources and sinks from planned table definitions.
#[async_trait]
pub trait ConnectorFactory: Send + Sync {
    /// A source subtask reading `spec.table`, producing `schema` (the projected columns); when restoring, resuming
    /// from what the checkpointed subtasks' `snapshot_position` returned.
    fn create_source(
        &self,
        spec: &SourceSpec,
        schema: SchemaRef,
        ctx: SourceContext,
        restore: Option<&SourceRestore>,
    ) -> Result<Box<dyn Source>>;

    /// A sink subtask writing `spec.table` with rows of `schema`.
    fn create_sink(&self, spec: &SinkSpec, schema: SchemaRef, ctx: SinkContext) -> Result<Box<dyn Sink>>;

    /// Checks that can only be done on the machine that runs the job (paths exist, credentials resolve), before
    /// any task starts.
    fn check_source(&self, _spec: &SourceSpec) -> Result<()> {
        Ok(())
    }

    /// Before any task starts: checks that the input exists and can be read with the credentials at hand (a queue
    /// that does not exist fails the job here, with the service's error, rather than in a running task).
    async fn prepare_source(&self, _spec: &SourceSpec) -> Result<()> {
        Ok(())
    }

    /// Before any task starts: makes the destination ready for rows of `schema` (creates or checks a table), so a
    /// mismatch fails the job before it reads anything.
    async fn prepare_sink(&self, _spec: &SinkSpec, _schema: SchemaRef) -> Result<()> {
        Ok(())
    }

    /// A checkpoint completed: commits what every subtask of the sink pre-committed for it (`handles`, from
    /// `pre_commit`), once per table, before the subtasks' own `commit`. Sinks whose destination can commit many
    /// writers' work atomically do it here (one BigQuery `BatchCommitWriteStreams` per table, so a checkpoint's rows
    /// appear together); others leave it to `Sink::commit`. Idempotent, like `recover_sink`.
    async fn commit_sink(&self, _spec: &SinkSpec, _handles: &[serde_json::Value]) -> Result<()> {
        Ok(())
    }

    /// Before an exactly-once job starts: makes visible what the restored checkpoint's sinks pre-committed
    /// (`handles`, from `pre_commit`; idempotent) and discards output written after it.
    async fn recover_sink(&self, spec: &SinkSpec, handles: &[serde_json::Value]) -> Result<()>;
}
