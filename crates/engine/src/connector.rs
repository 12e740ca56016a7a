//! The seams between the runtime and connectors: what a source and a sink implement, and the factory that builds
//! them from a table definition.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use nagare_core::CheckpointId;
use nagare_sql::{
    ConnectorCatalog, ConnectorSpec, Pipeline, PlanError, Planner, SinkSpec, SourceSpec, TableDef, Variables,
};
use tokio_util::sync::CancellationToken;

use crate::dead_letter::DeadLetterWriter;
use crate::error::{EngineError, Result};
use crate::metrics::NodeMetrics;

/// What a source has for the runtime.
#[derive(Debug)]
pub enum SourceEvent {
    /// Rows in the source's output schema.
    Batch(RecordBatch),
    /// Nothing right now; ask again after about this long.
    Idle(Duration),
    /// Rows are on their way but not here yet (e.g. a reading thread is busy): ask again at once. Unlike `Idle`,
    /// this never makes the source count as idle for watermarks.
    Pending,
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

    /// Checkpoint `checkpoint` is durable: input before it may be acknowledged upstream. `last` marks the job's
    /// final checkpoint: acknowledgements still in flight must be done when this returns, since the task ends.
    async fn notify_checkpoint_complete(&mut self, _checkpoint: CheckpointId, _last: bool) -> Result<()> {
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

/// One connector kind, whole: what the planner checks (its [`ConnectorSpec`]: option schema, validation, typed
/// configuration) and what the runtime builds from the configuration the plan carries. Adding a connector is one
/// implementation of this trait and one line in the [`Registry`].
#[async_trait]
pub trait Connector: ConnectorSpec {
    /// A source subtask reading `spec.table`, producing `schema` (the projected columns); when restoring, resuming
    /// from what the checkpointed subtasks' `snapshot_position` returned.
    fn create_source(
        &self,
        _spec: &SourceSpec,
        _schema: SchemaRef,
        _ctx: SourceContext,
        _restore: Option<&SourceRestore>,
    ) -> Result<Box<dyn Source>> {
        Err(EngineError::Config(format!("connector '{}' cannot be a source", self.name())))
    }

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

    /// A sink subtask writing `spec.table` with rows of `schema`.
    fn create_sink(&self, _spec: &SinkSpec, _schema: SchemaRef, _ctx: SinkContext) -> Result<Box<dyn Sink>> {
        Err(EngineError::Config(format!("connector '{}' cannot be a sink", self.name())))
    }

    /// The table-wide side of a sink for one run of a job: made once, so that its clients live across checkpoints.
    fn committer(&self, _spec: &SinkSpec) -> Result<Arc<dyn Committer>> {
        Ok(Arc::new(NothingToCommit))
    }
}

/// What a sink does once per table rather than per subtask: prepare the destination, recover after a crash, and
/// commit each completed checkpoint.
#[async_trait]
pub trait Committer: Send + Sync {
    /// Before any task starts: makes the destination ready for rows of `schema` (creates or checks a table), so a
    /// mismatch fails the job before it reads anything.
    async fn prepare(&self, _schema: SchemaRef) -> Result<()> {
        Ok(())
    }

    /// Before an exactly-once job starts: makes visible what the restored checkpoint's subtasks pre-committed
    /// (`handles`, from `pre_commit`; idempotent) and discards output written after it.
    async fn recover(&self, _handles: &[serde_json::Value]) -> Result<()> {
        Ok(())
    }

    /// A checkpoint completed: commits what every subtask pre-committed for it (`handles`), once per table, before
    /// the subtasks' own `commit`. Destinations that can commit many writers' work atomically do it here (one
    /// BigQuery `BatchCommitWriteStreams` per table, so a checkpoint's rows appear together); others leave it to
    /// `Sink::commit`. Idempotent, like `recover`.
    async fn commit(&self, _handles: &[serde_json::Value]) -> Result<()> {
        Ok(())
    }
}

/// The committer of sinks whose subtasks do all their committing themselves.
#[derive(Debug)]
pub struct NothingToCommit;

impl Committer for NothingToCommit {}

/// The connectors a process knows, by name: built in one place (the binary) and used by the planner, the runtime
/// and the coordinator alike.
#[derive(Clone, Default)]
pub struct Registry {
    connectors: BTreeMap<&'static str, Arc<dyn Connector>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.connectors.keys()).finish()
    }
}

impl Registry {
    /// A registry without connectors.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a connector (replacing one of the same name).
    pub fn with(mut self, connector: Arc<dyn Connector>) -> Self {
        self.connectors.insert(connector.name(), connector);
        self
    }

    /// The connector named `name`.
    pub fn get(&self, name: &str) -> Result<&Arc<dyn Connector>> {
        self.connectors.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.connectors.keys().copied().collect();
            EngineError::Config(format!("no connector '{name}' in this build (it has: {})", known.join(", ")))
        })
    }

    /// Every connector, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Connector>> {
        self.connectors.values()
    }

    /// The planner's view of the same connectors.
    pub fn catalog(&self) -> ConnectorCatalog {
        let mut c = ConnectorCatalog::new();
        for connector in self.connectors.values() {
            c.register(connector.clone());
        }
        c
    }

    /// Plans a pipeline against these connectors, as a cluster does for a submitted job: `parallelism` (when not
    /// 0) overrides `SET parallelism`, `settings` override `SET`s, `variables` fill `${NAME}` (then the
    /// environment).
    pub async fn plan(
        &self,
        sql: &str,
        parallelism: u32,
        settings: &BTreeMap<String, String>,
        variables: &BTreeMap<String, String>,
    ) -> std::result::Result<Pipeline, PlanError> {
        let mut planner = Planner::new(self.catalog()).with_variables(Variables::new(variables.clone(), true));
        for (k, v) in settings {
            planner = planner.with_setting(k.clone(), v.clone());
        }
        if parallelism > 0 {
            planner = planner.with_setting("parallelism", parallelism.to_string());
        }
        planner.plan(sql).await
    }

    /// A source subtask (see [`Connector::create_source`]).
    pub fn create_source(
        &self,
        spec: &SourceSpec,
        schema: SchemaRef,
        ctx: SourceContext,
        restore: Option<&SourceRestore>,
    ) -> Result<Box<dyn Source>> {
        self.get(&spec.table.connector)?.create_source(spec, schema, ctx, restore)
    }
}

/// The typed configuration the plan carries for a table (see [`ConnectorSpec::configure`]).
pub fn config<T: serde::de::DeserializeOwned>(table: &TableDef) -> Result<T> {
    table.config().map_err(EngineError::Config)
}
