//! A running job: the graph turned into chained subtasks and channels, spawned on tokio, and waited for; with
//! checkpoints, restored from the last complete one first.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nagare_core::KeyGroupRange;
use nagare_core::checkpoint::{CheckpointMetadata, TaskKey, incompatibilities};
use nagare_sql::{LateRowPolicy, Node, NodeId, OperatorSpec, Partitioning, Pipeline};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::channel::{InputGate, MessageReceiver, MessageSender, local_channel};
use crate::checkpoint::coordinator::{CheckpointSettings, CheckpointStats, ControlTarget, Coordinator};
use crate::checkpoint::store::CheckpointStore;
use crate::checkpoint::{Control, Report};
use crate::connector::{Committer, Registry, SinkContext, SourceContext, SourceRestore};
use crate::dead_letter::{DeadLetterWriter, DeadLetters};
use crate::distribute::{ChannelKey, Distribution};
use crate::error::{EngineError, Result};
use crate::metrics::{JobMetrics, NodeMetrics};
use crate::operator::{Identity, Operator, StatePart};
use crate::operators::OperatorContext;
use crate::operators::calc::CalcOperator;
use crate::operators::collapse::CollapseOperator;
use crate::operators::dedup::DedupOperator;
use crate::operators::session::SessionOperator;
use crate::operators::window::WindowAggregateOperator;
use crate::partition::{OutputEdge, Outputs, Router};
use crate::task::{
    Chain, CheckpointLink, SourceDriver, Terminal, WatermarkGenerator, run_operator_task, run_source_task,
};

/// Exactly-once operation: where checkpoints go and how often.
#[derive(Debug, Clone)]
pub struct CheckpointOptions {
    /// The store.
    pub store: CheckpointStore,
    /// Interval, timeout, retention.
    pub settings: CheckpointSettings,
    /// Ignore existing checkpoints and start over.
    pub from_scratch: bool,
}

/// How to run a job.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// Unique per run: part of output and dead-letter file names.
    pub run_id: String,
    /// After how long without data a source subtask stops holding back the watermark.
    pub idle_timeout: Duration,
    /// Checkpoints; `None` runs without (output becomes visible as it is written, nothing survives a crash).
    pub checkpoints: Option<CheckpointOptions>,
    /// When the job runs in several processes: which share is this one's. `None` runs every subtask here.
    pub distribution: Option<Distribution>,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            run_id: new_run_id(),
            idle_timeout: Duration::from_secs(10),
            checkpoints: None,
            distribution: None,
        }
    }
}

/// A run id: UTC start time and a random suffix, sortable and unique.
pub fn new_run_id() -> String {
    let now = chrono::Utc::now().format("%Y%m%dT%H%M%S");
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{now}-{:06x}", (nanos ^ std::process::id().rotate_left(13)) & 0xff_ffff)
}

/// A failed job: which task failed first, and why.
#[derive(Debug)]
pub struct JobError {
    /// The task, e.g. `dedup keep-first by (id) [1/2]`.
    pub task: String,
    /// The root cause.
    pub error: EngineError,
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.error {
            // Errors about the input or configuration read best on their own.
            EngineError::BadRecord { .. } | EngineError::Config(_) | EngineError::Plan(_) => {
                write!(f, "{}", self.error)
            }
            e => write!(f, "{}: {e}", self.task),
        }
    }
}

impl std::error::Error for JobError {}

/// What a finished job did.
#[derive(Debug, Clone)]
pub struct JobSummary {
    /// Wall time.
    pub elapsed: Duration,
    /// Rows read by sources.
    pub rows_read: u64,
    /// Rows written by sinks.
    pub rows_written: u64,
    /// Rows dropped as duplicates.
    pub duplicates: u64,
    /// Late rows.
    pub late_rows: u64,
    /// Malformed input records.
    pub bad_records: u64,
    /// Dead-letter files written.
    pub dead_letter_files: Vec<PathBuf>,
    /// Checkpoints of this run.
    pub checkpoints: CheckpointStats,
}

/// A job whose tasks are running.
pub struct RunningJob {
    tasks: JoinSet<(String, Result<()>)>,
    metrics: Arc<JobMetrics>,
    stop: CancellationToken,
    dead_letters: Arc<DeadLetters>,
    checkpoints: Arc<Mutex<CheckpointStats>>,
}

impl RunningJob {
    /// Live counters.
    pub fn metrics(&self) -> Arc<JobMetrics> {
        self.metrics.clone()
    }

    /// Live checkpoint figures.
    pub fn checkpoint_stats(&self) -> Arc<Mutex<CheckpointStats>> {
        self.checkpoints.clone()
    }

    /// Cancelling this token stops the job cleanly: sources stop reading, everything in flight is written, files
    /// are closed; windows that are still open are not emitted. With checkpoints, a final checkpoint keeps them.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Waits for every task; the first failure stops the others and is returned.
    pub async fn wait(mut self) -> Result<JobSummary, JobError> {
        let mut first: Option<JobError> = None;
        let mut secondary: Option<JobError> = None;
        while let Some(joined) = self.tasks.join_next().await {
            let failure = match joined {
                Ok((_, Ok(()))) => continue,
                Ok((task, Err(error))) => JobError { task, error },
                Err(e) if e.is_cancelled() => continue,
                Err(e) => {
                    JobError { task: "a task".into(), error: EngineError::Internal(format!("task panicked: {e}")) }
                }
            };
            if failure.error.is_secondary() {
                secondary.get_or_insert(failure);
            } else if first.is_none() {
                tracing::debug!(task = %failure.task, error = %failure.error, "task failed; stopping the job");
                first = Some(failure);
                self.stop.cancel();
                self.tasks.abort_all();
            }
        }
        let flushed = self.dead_letters.flush_all();
        if let Some(e) = first.or(secondary) {
            return Err(e);
        }
        if let Err(error) = flushed {
            return Err(JobError { task: "dead-letter output".into(), error });
        }
        let m = &self.metrics;
        Ok(JobSummary {
            elapsed: m.started.elapsed(),
            rows_read: m.rows_read(),
            rows_written: m.rows_written(),
            duplicates: m.sum("", |n| &n.duplicates),
            late_rows: m.sum("", |n| &n.late_rows),
            bad_records: m.sum("", |n| &n.bad_records),
            dead_letter_files: self.dead_letters.files(),
            checkpoints: self.checkpoints.lock().map(|s| s.clone()).unwrap_or_default(),
        })
    }
}

fn node_kind(op: &OperatorSpec) -> &'static str {
    match op {
        OperatorSpec::Source(_) => "source",
        OperatorSpec::Calc(_) => "calc",
        OperatorSpec::Dedup(_) => "dedup",
        OperatorSpec::WindowAggregate(_) => "window",
        OperatorSpec::Union => "union",
        OperatorSpec::Collapse(_) => "collapse",
        OperatorSpec::Sink(_) => "sink",
    }
}

/// What must match between a checkpoint and the pipeline restoring it: every node whose state, position or
/// commits the checkpoint holds, by what it does and the rows it handles.
pub fn fingerprints(pipeline: &Pipeline) -> BTreeMap<usize, String> {
    let mut out = BTreeMap::new();
    for node in &pipeline.graph.nodes {
        let options =
            |t: &nagare_sql::TableDef| t.options.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        let extra = match &node.operator {
            OperatorSpec::Source(s) => options(&s.table),
            OperatorSpec::Sink(s) => options(&s.table),
            OperatorSpec::Dedup(_) | OperatorSpec::WindowAggregate(_) => String::new(),
            _ => continue,
        };
        let schema: Vec<String> =
            node.schema.fields().iter().map(|f| format!("{} {}", f.name(), f.data_type())).collect();
        out.insert(node.id, format!("{} | {} | {}", node.label, schema.join(", "), extra));
    }
    out
}

/// Chains: a node joins its upstream's task when connected 1:1 by a forward edge.
fn chains(pipeline: &Pipeline) -> Vec<Vec<NodeId>> {
    let graph = &pipeline.graph;
    let n = graph.nodes.len();
    let mut chained_into_upstream = vec![false; n];
    for node in &graph.nodes {
        let inputs: Vec<_> = graph.inputs(node.id).collect();
        if let [edge] = inputs.as_slice() {
            let up = &graph.nodes[edge.from];
            if matches!(edge.partitioning, Partitioning::Forward)
                && graph.outputs(up.id).count() == 1
                && up.parallelism == node.parallelism
                && !matches!(up.operator, OperatorSpec::Sink(_))
            {
                chained_into_upstream[node.id] = true;
            }
        }
    }
    let mut out = Vec::new();
    for node in &graph.nodes {
        if chained_into_upstream[node.id] {
            continue;
        }
        let mut chain = vec![node.id];
        let mut cur = node.id;
        loop {
            let outs: Vec<_> = graph.outputs(cur).collect();
            match outs.as_slice() {
                [e] if chained_into_upstream[e.to] => {
                    chain.push(e.to);
                    cur = e.to;
                }
                _ => break,
            }
        }
        out.push(chain);
    }
    out
}

/// The checkpoint to resume from, checked against the pipeline; `None` to start fresh.
async fn choose_checkpoint(pipeline: &Pipeline, options: &CheckpointOptions) -> Result<Option<CheckpointMetadata>> {
    let choice = options.store.latest().await?;
    for (id, reason) in &choice.skipped {
        tracing::warn!(checkpoint = id, reason = %reason, "skipping a damaged or incomplete checkpoint");
        eprintln!("warning: checkpoint {id} in {} is not usable ({reason}); using an older one", options.store.url());
    }
    let damaged: Vec<u64> = choice
        .skipped
        .iter()
        .filter(|(_, reason)| reason != crate::checkpoint::store::NEVER_COMPLETED)
        .map(|(id, _)| *id)
        .collect();
    let Some(metadata) = choice.restore else {
        // Completed checkpoints exist but none is usable: starting fresh would write again what their sinks
        // committed.
        if !damaged.is_empty() && !options.from_scratch {
            return Err(EngineError::Config(format!(
                "no usable checkpoint in {}: {} completed but damaged ({}); run with --from-scratch to start over \
                 (output already committed would be written again)",
                options.store.url(),
                damaged.len(),
                damaged.iter().map(|id| id.to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
        return Ok(None);
    };
    if options.from_scratch {
        tracing::info!(checkpoint = metadata.id, "starting from scratch as asked; existing checkpoints are ignored");
        return Ok(None);
    }
    let labels: BTreeMap<usize, String> = pipeline.graph.nodes.iter().map(|n| (n.id, n.label.clone())).collect();
    // A different parallelism is a rescale: keyed state is split or merged by key group, source positions are
    // handed on (see `restore_parts` and `SourceRestore`).
    let problems = incompatibilities(&metadata, &fingerprints(pipeline), &labels);
    for node in &pipeline.graph.nodes {
        if let Some(p) = metadata.parallelism.get(&node.id)
            && *p != node.parallelism
        {
            tracing::info!(node = node.id, from = p, to = node.parallelism, "rescaling {}", node.label);
        }
    }
    if !problems.is_empty() {
        return Err(EngineError::Config(format!(
            "the pipeline does not match checkpoint {} in {}: {}; run with --from-scratch to start over (its state is discarded)",
            metadata.id,
            options.store.url(),
            problems.join("; ")
        )));
    }
    Ok(Some(metadata))
}

/// Reads a subtask's state for node `node` from the restored checkpoint. At the parallelism it was taken with, a
/// subtask reads its own; after a rescale, it reads every old subtask's whose key groups overlap its own, and its
/// operator keeps the keys of its key groups.
async fn restore_parts(
    store: &CheckpointStore,
    metadata: Option<&CheckpointMetadata>,
    task: TaskKey,
    node: &Node,
    max_parallelism: u32,
) -> Result<Vec<StatePart>> {
    let Some(m) = metadata else { return Ok(Vec::new()) };
    let old = m.parallelism.get(&node.id).copied().unwrap_or(node.parallelism);
    if old == node.parallelism {
        let Some(files) = m.task(task).and_then(|t| t.state.get(&node.id)) else { return Ok(Vec::new()) };
        return store.read_parts(files).await;
    }
    let mine = KeyGroupRange::for_subtask(max_parallelism, node.parallelism as u32, task.subtask as u32);
    let mut files = Vec::new();
    for t in &m.tasks {
        let Some(f) = t.state.get(&node.id) else { continue };
        let theirs = KeyGroupRange::for_subtask(max_parallelism, old as u32, t.task.subtask as u32);
        if theirs.start < mine.end && mine.start < theirs.end {
            files.extend(f.iter().cloned());
        }
    }
    store.read_parts(&files).await
}

/// The positions a restored source node's subtasks continue from.
fn source_restore(m: &CheckpointMetadata, node: NodeId, parallelism: usize) -> SourceRestore {
    let old = m.parallelism.get(&node).copied().unwrap_or(parallelism);
    SourceRestore {
        positions: (0..old)
            .map(|k| m.task(TaskKey { node, subtask: k }).and_then(|t| t.source_position.clone()))
            .collect(),
    }
}

#[allow(clippy::too_many_arguments)]
fn build_operator(
    node: &Node,
    input_schema: Option<arrow::datatypes::SchemaRef>,
    metrics: Arc<NodeMetrics>,
    pipeline: &Pipeline,
    default_dead_letter: &Option<Arc<DeadLetterWriter>>,
    subtask: usize,
    checkpoints: bool,
) -> Result<Option<Box<dyn Operator>>> {
    let settings = &pipeline.settings;
    let ctx = || -> Result<OperatorContext> {
        let dead_letter = match settings.late_rows {
            LateRowPolicy::DeadLetter => Some(default_dead_letter.clone().ok_or_else(|| {
                EngineError::Config("late_rows = 'dead_letter' needs a directory: SET dead_letter_path = '...'".into())
            })?),
            LateRowPolicy::Drop => None,
        };
        Ok(OperatorContext {
            label: node.label.clone(),
            metrics: metrics.clone(),
            late_rows: settings.late_rows,
            dead_letter,
            max_parallelism: settings.max_parallelism,
            key_groups: KeyGroupRange::for_subtask(settings.max_parallelism, node.parallelism as u32, subtask as u32),
        })
    };
    Ok(Some(match &node.operator {
        OperatorSpec::Source(_) | OperatorSpec::Sink(_) => return Ok(None),
        OperatorSpec::Calc(spec) => Box::new(CalcOperator::new(spec, node.schema.clone())),
        OperatorSpec::Union => Box::new(Identity),
        OperatorSpec::Collapse(spec) => Box::new(CollapseOperator::new(spec, &node.schema, checkpoints)?),
        OperatorSpec::Dedup(spec) => {
            let input = input_schema.ok_or_else(|| EngineError::Internal("dedup without input".into()))?;
            Box::new(DedupOperator::new(spec, input, node.schema.clone(), ctx()?)?)
        }
        OperatorSpec::WindowAggregate(spec) => match spec.window {
            nagare_sql::window::WindowKind::Session { .. } => {
                Box::new(SessionOperator::new(spec, node.schema.clone(), ctx()?)?)
            }
            _ => Box::new(WindowAggregateOperator::new(spec, node.schema.clone(), ctx()?)?),
        },
    }))
}

/// Builds every task of the pipeline and starts them. With checkpoints, the newest intact checkpoint is restored
/// first (sinks re-commit what it pre-committed and discard later output). Sources and sinks are created, and so
/// configuration is checked, before any task runs.
pub async fn start(pipeline: &Pipeline, registry: Arc<Registry>, options: JobOptions) -> Result<RunningJob> {
    let graph = &pipeline.graph;
    let metrics = Arc::new(JobMetrics {
        nodes: graph
            .nodes
            .iter()
            .map(|n| Arc::new(NodeMetrics::new(n.id, n.label.clone(), node_kind(&n.operator), n.parallelism)))
            .collect(),
        started: Instant::now(),
    });
    let dead_letters = Arc::new(DeadLetters::new(options.run_id.clone()));
    let default_dead_letter = match &pipeline.settings.dead_letter_path {
        Some(p) => Some(dead_letters.writer(&PathBuf::from(p))?),
        None => None,
    };
    let chains = chains(pipeline);
    let chain_of: HashMap<NodeId, usize> =
        chains.iter().enumerate().flat_map(|(i, c)| c.iter().map(move |n| (*n, i))).collect();
    let dist = options.distribution.as_ref();
    let part = dist.map_or(0, |d| d.part);
    let (reports_tx, reports_rx) = tokio::sync::mpsc::unbounded_channel::<Report>();

    // 1. Restore: the checkpoint to resume from, and sinks made consistent with it before anything runs.
    let follow = match dist {
        Some(d) if d.part > 0 => Some(d.network.follow(d.part).await?),
        _ => None,
    };
    let restored = restore_point(pipeline, &options, follow.as_ref().map(|f| f.restored)).await?;
    let stats =
        Arc::new(Mutex::new(CheckpointStats { restored_from: restored.as_ref().map(|m| m.id), ..Default::default() }));
    for node in &graph.nodes {
        if let OperatorSpec::Source(spec) = &node.operator {
            registry.get(&spec.table.connector)?.prepare_source(spec).await?;
        }
    }
    let committers = prepare_sinks(pipeline, &registry, restored.as_ref(), &options, &chains, &chain_of).await?;
    // Part 0 waits for the other parts to join and tells them what it restored.
    let lead = match dist {
        Some(d) if d.part == 0 && d.parts() > 1 => {
            Some(d.network.lead(d.parts(), restored.as_ref().map(|m| m.id), reports_tx.clone()).await?)
        }
        _ => None,
    };

    // 2. The graph: channels between chains, then each chain's subtasks built and spawned.
    let (mut receivers, mut senders) = channels(pipeline, &chain_of, dist)?;
    let assembly = Assembly {
        pipeline,
        registry: &registry,
        options: &options,
        metrics: &metrics,
        dead_letters: &dead_letters,
        default_dead_letter: &default_dead_letter,
        restored: restored.as_ref(),
        stop: CancellationToken::new(),
    };
    let mut tasks = JoinSet::new();
    let mut controls = BTreeMap::new();
    for chain in &chains {
        let head = &graph.nodes[chain[0]];
        for s in (0..head.parallelism).filter(|s| dist.is_none_or(|d| d.part_of(*s) == part)) {
            let key = TaskKey { node: head.id, subtask: s };
            let link = match &options.checkpoints {
                Some(c) => {
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Control>();
                    controls.insert(key, tx);
                    Some(CheckpointLink::new(key, s, c.store.clone(), rx, reports_tx.clone()))
                }
                None => None,
            };
            assembly.spawn_task(chain, s, link, &mut receivers, &mut senders, &mut tasks).await?;
        }
    }
    drop(reports_tx);
    let stop = assembly.stop.clone();

    // 3. Checkpoints: this part's link to part 0, or (part 0) the links to the others and the coordinator.
    if let Some(follow) = follow {
        tasks.spawn(async move { ("link to part 0".to_string(), (follow.run)(controls, reports_rx).await) });
        return Ok(RunningJob { tasks, metrics, stop, dead_letters, checkpoints: stats });
    }
    let mut controls: BTreeMap<TaskKey, ControlTarget> =
        controls.into_iter().map(|(k, tx)| (k, ControlTarget::Local(tx))).collect();
    if let Some(lead) = lead {
        // Every task of the job reports, wherever it runs.
        for chain in &chains {
            let head = &graph.nodes[chain[0]];
            for s in (0..head.parallelism).filter(|s| dist.is_some_and(|d| d.part_of(*s) != part)) {
                let route = dist.and_then(|d| lead.routes.get(d.part_of(s)).cloned().flatten());
                if let (Some(route), true) = (route, options.checkpoints.is_some()) {
                    controls.insert(TaskKey { node: head.id, subtask: s }, ControlTarget::Remote(route));
                }
            }
        }
        tasks.spawn(async move { ("link to the other parts".to_string(), lead.run.await) });
    }
    if let Some(c) = &options.checkpoints {
        let sinks = committers.iter().map(|(node, c)| (chains[chain_of[node]][0], c.clone())).collect();
        let coordinator =
            checkpoint_coordinator(pipeline, c, &chains, controls, sinks, restored.as_ref(), &stats).await?;
        tasks.spawn(async move { ("checkpoint coordinator".to_string(), coordinator.run(reports_rx).await) });
    }
    Ok(RunningJob { tasks, metrics, stop, dead_letters, checkpoints: stats })
}

/// The checkpoint this run resumes from: its own choice (part 0, or a job in one process), or the one part 0 chose
/// (`part0_restored`, for the other parts), or none.
async fn restore_point(
    pipeline: &Pipeline,
    options: &JobOptions,
    part0_restored: Option<Option<u64>>,
) -> Result<Option<CheckpointMetadata>> {
    match (&options.checkpoints, part0_restored) {
        (Some(c), Some(restored)) => match restored {
            Some(id) => Ok(Some(c.store.load(id).await.metadata.map_err(|reason| {
                EngineError::Config(format!("checkpoint {id} chosen by part 0 is not readable here: {reason}"))
            })?)),
            None => Ok(None),
        },
        (Some(c), None) => choose_checkpoint(pipeline, c).await,
        (None, _) => Ok(None),
    }
}

/// Each sink table's committer, made once for the run: it prepares the table and (part 0, with checkpoints)
/// recovers it to the restored checkpoint; it then commits every checkpoint with the same clients.
async fn prepare_sinks(
    pipeline: &Pipeline,
    registry: &Registry,
    restored: Option<&CheckpointMetadata>,
    options: &JobOptions,
    chains: &[Vec<NodeId>],
    chain_of: &HashMap<NodeId, usize>,
) -> Result<Vec<(NodeId, Arc<dyn Committer>)>> {
    let mut committers: Vec<(NodeId, Arc<dyn Committer>)> = Vec::new();
    for node in &pipeline.graph.nodes {
        if let OperatorSpec::Sink(spec) = &node.operator {
            let committer = registry.get(&spec.table.connector)?.committer(spec)?;
            committer.prepare(node.schema.clone()).await?;
            committers.push((node.id, committer));
        }
    }
    let part = options.distribution.as_ref().map_or(0, |d| d.part);
    if options.checkpoints.is_some() && part == 0 {
        for (node, committer) in &committers {
            let head = chains[chain_of[node]][0];
            let handles: Vec<serde_json::Value> = restored
                .iter()
                .flat_map(|m| m.tasks.iter())
                .filter(|t| t.task.node == head)
                .filter_map(|t| t.sink_commit.clone())
                .collect();
            committer.recover(&handles).await?;
        }
    }
    Ok(committers)
}

/// Receivers per (node, subtask) and senders per (edge, upstream subtask).
type Channels =
    (HashMap<(NodeId, usize), Vec<Box<dyn MessageReceiver>>>, HashMap<(usize, usize), Vec<Box<dyn MessageSender>>>);

/// Channels for the edges between chains (edges inside a chain are calls). A channel whose ends run in different
/// parts of a distributed job goes over the network.
fn channels(pipeline: &Pipeline, chain_of: &HashMap<NodeId, usize>, dist: Option<&Distribution>) -> Result<Channels> {
    let graph = &pipeline.graph;
    let part = dist.map_or(0, |d| d.part);
    let here = |subtask: usize| dist.is_none_or(|d| d.part_of(subtask) == part);
    let mut receivers: HashMap<(NodeId, usize), Vec<Box<dyn MessageReceiver>>> = HashMap::new();
    let mut senders: HashMap<(usize, usize), Vec<Box<dyn MessageSender>>> = HashMap::new();
    for (ei, edge) in graph.edges.iter().enumerate() {
        if chain_of[&edge.from] == chain_of[&edge.to] {
            continue;
        }
        let (up, down) = (&graph.nodes[edge.from], &graph.nodes[edge.to]);
        for u in 0..up.parallelism {
            let targets: Vec<usize> = match &edge.partitioning {
                Partitioning::Forward => {
                    if up.parallelism != down.parallelism {
                        return Err(EngineError::Internal(format!(
                            "forward edge {} -> {} changes parallelism",
                            up.id, down.id
                        )));
                    }
                    vec![u]
                }
                Partitioning::Single => vec![0],
                Partitioning::Hash { .. } | Partitioning::RoundRobin => (0..down.parallelism).collect(),
            };
            let mut list = Vec::with_capacity(targets.len());
            for d in targets {
                let key = ChannelKey { edge: ei, from: u, to: d };
                match (here(u), here(d), dist) {
                    (true, true, _) | (_, _, None) => {
                        let (tx, rx) = local_channel();
                        list.push(Box::new(tx) as Box<dyn MessageSender>);
                        receivers.entry((down.id, d)).or_default().push(Box::new(rx));
                    }
                    (true, false, Some(dist)) => list.push(dist.network.sender(key, dist.part_of(d))?),
                    (false, true, Some(dist)) => {
                        receivers.entry((down.id, d)).or_default().push(dist.network.receiver(key)?)
                    }
                    (false, false, Some(_)) => {}
                }
            }
            if here(u) {
                senders.insert((ei, u), list);
            }
        }
    }
    Ok((receivers, senders))
}

/// The checkpoint coordinator of a job (part 0): every task's control, the sinks' committers, and the next id.
async fn checkpoint_coordinator(
    pipeline: &Pipeline,
    c: &CheckpointOptions,
    chains: &[Vec<NodeId>],
    controls: BTreeMap<TaskKey, ControlTarget>,
    sinks: Vec<(NodeId, Arc<dyn Committer>)>,
    restored: Option<&CheckpointMetadata>,
    stats: &Arc<Mutex<CheckpointStats>>,
) -> Result<Coordinator> {
    let graph = &pipeline.graph;
    let sources: BTreeSet<TaskKey> = chains
        .iter()
        .map(|c| &graph.nodes[c[0]])
        .filter(|n| matches!(n.operator, OperatorSpec::Source(_)))
        .flat_map(|n| (0..n.parallelism).map(|s| TaskKey { node: n.id, subtask: s }))
        .collect();
    let existing = c.store.list().await?;
    let next_id = existing.iter().copied().max().unwrap_or(0).max(restored.map(|m| m.id).unwrap_or(0)) + 1;
    Ok(Coordinator {
        store: c.store.clone(),
        settings: c.settings.clone(),
        tasks: controls.keys().copied().collect(),
        sources,
        controls,
        fingerprints: fingerprints(pipeline),
        parallelism: graph.nodes.iter().map(|n| (n.id, n.parallelism)).collect(),
        next_id,
        stats: stats.clone(),
        failures_in_a_row: 0,
        sinks,
    })
}

/// What building one subtask of a chain needs: the job's shared pieces.
struct Assembly<'a> {
    pipeline: &'a Pipeline,
    registry: &'a Registry,
    options: &'a JobOptions,
    metrics: &'a Arc<JobMetrics>,
    dead_letters: &'a Arc<DeadLetters>,
    default_dead_letter: &'a Option<Arc<DeadLetterWriter>>,
    restored: Option<&'a CheckpointMetadata>,
    stop: CancellationToken,
}

impl Assembly<'_> {
    /// Where a table's bad records go: its own `dead_letter_path`, or the pipeline's.
    fn dead_letter_of(&self, table: &nagare_sql::TableDef) -> Result<Option<Arc<DeadLetterWriter>>> {
        Ok(match table.options.get_str("dead_letter_path") {
            Some(p) => Some(self.dead_letters.writer(&PathBuf::from(p))?),
            None => self.default_dead_letter.clone(),
        })
    }

    /// Subtask `s` of `chain`: its operators (restored), its end (a sink or the outgoing edges), spawned as a
    /// source task (when the chain starts at a source) or an operator task reading its input channels.
    async fn spawn_task(
        &self,
        chain: &[NodeId],
        s: usize,
        link: Option<CheckpointLink>,
        receivers: &mut HashMap<(NodeId, usize), Vec<Box<dyn MessageReceiver>>>,
        senders: &mut HashMap<(usize, usize), Vec<Box<dyn MessageSender>>>,
        tasks: &mut JoinSet<(String, Result<()>)>,
    ) -> Result<()> {
        let graph = &self.pipeline.graph;
        let head = &graph.nodes[chain[0]];
        let tail = &graph.nodes[chain[chain.len() - 1]];
        let task_name = if head.id == tail.id {
            format!("{} [{}/{}]", head.label, s + 1, head.parallelism)
        } else {
            format!("{} -> {} [{}/{}]", head.label, tail.label, s + 1, head.parallelism)
        };
        let key = TaskKey { node: head.id, subtask: s };
        let ops = self.operators(chain, s, key).await?;
        let terminal = self.terminal(tail, s, senders)?;
        let chain_struct = Chain { ops, terminal, subtask: s };
        match &head.operator {
            OperatorSpec::Source(spec) => {
                let settings = &self.pipeline.settings;
                let connector = self.registry.get(&spec.table.connector)?;
                connector.check_source(spec)?;
                let ctx = SourceContext {
                    subtask: s,
                    parallelism: head.parallelism,
                    batch_size: settings.batch_size,
                    dead_letter: self.dead_letter_of(&spec.table)?,
                    metrics: self.metrics.nodes[head.id].clone(),
                    stop: self.stop.clone(),
                    checkpoints: self.options.checkpoints.is_some(),
                };
                let restore = self.restored.map(|m| source_restore(m, head.id, head.parallelism));
                let source = connector.create_source(spec, head.schema.clone(), ctx, restore.as_ref())?;
                let driver = SourceDriver {
                    watermarks: spec.watermark.as_ref().map(|w| WatermarkGenerator::new(w.column, w.expr.clone())),
                    metrics: self.metrics.nodes[head.id].clone(),
                    stop: self.stop.clone(),
                    idle_timeout: self.options.idle_timeout,
                    throttle: settings
                        .source_rate_limit
                        .map(|r| crate::task::Throttle::new(r as f64 / head.parallelism.max(1) as f64)),
                    checkpoints: link,
                };
                tasks.spawn(async move { (task_name, run_source_task(source, driver, chain_struct).await) });
            }
            _ => {
                let inputs = receivers
                    .remove(&(head.id, s))
                    .ok_or_else(|| EngineError::Internal(format!("no inputs for node {} subtask {s}", head.id)))?;
                let gate = InputGate::new(inputs);
                tasks.spawn(async move { (task_name, run_operator_task(gate, chain_struct, link).await) });
            }
        }
        Ok(())
    }

    /// The operators of subtask `s` of a chain, each with its state from the restored checkpoint.
    async fn operators(
        &self,
        chain: &[NodeId],
        s: usize,
        key: TaskKey,
    ) -> Result<Vec<(Box<dyn Operator>, Arc<NodeMetrics>)>> {
        let graph = &self.pipeline.graph;
        let mut ops: Vec<(Box<dyn Operator>, Arc<NodeMetrics>)> = Vec::new();
        for id in chain {
            let node = &graph.nodes[*id];
            let m = self.metrics.nodes[*id].clone();
            let input_schema = graph.inputs(*id).next().map(|e| graph.nodes[e.from].schema.clone());
            let checkpoints = self.options.checkpoints.as_ref();
            let Some(mut op) = build_operator(
                node,
                input_schema,
                m.clone(),
                self.pipeline,
                self.default_dead_letter,
                s,
                checkpoints.is_some(),
            )?
            else {
                continue;
            };
            if let Some(c) = checkpoints {
                let max_parallelism = self.pipeline.settings.max_parallelism;
                op.restore(restore_parts(&c.store, self.restored, key, node, max_parallelism).await?)?;
            }
            ops.push((op, m));
        }
        Ok(ops)
    }

    /// Where subtask `s` of a chain ending at `tail` puts its rows: the sink, or the outgoing edges' channels.
    fn terminal(
        &self,
        tail: &Node,
        s: usize,
        senders: &mut HashMap<(usize, usize), Vec<Box<dyn MessageSender>>>,
    ) -> Result<Terminal> {
        let metrics = self.metrics.nodes[tail.id].clone();
        if let OperatorSpec::Sink(spec) = &tail.operator {
            let checkpoints = self.options.checkpoints.as_ref();
            let ctx = SinkContext {
                subtask: s,
                parallelism: tail.parallelism,
                run_id: self.options.run_id.clone(),
                metrics: metrics.clone(),
                exactly_once: checkpoints.is_some(),
                checkpoint_interval: checkpoints.map(|c| c.settings.interval),
                dead_letter: self.dead_letter_of(&spec.table)?,
            };
            let sink = self.registry.get(&spec.table.connector)?.create_sink(spec, tail.schema.clone(), ctx)?;
            return Ok(Terminal::Sink(sink, metrics));
        }
        let mut edges = Vec::new();
        for (ei, edge) in self.pipeline.graph.edges.iter().enumerate().filter(|(_, e)| e.from == tail.id) {
            let targets = senders.remove(&(ei, s)).ok_or_else(|| EngineError::Internal("missing channel".into()))?;
            let router = match &edge.partitioning {
                Partitioning::Forward | Partitioning::Single => Router::One,
                Partitioning::Hash { keys } => {
                    Router::Hash { keys: keys.clone(), max_parallelism: self.pipeline.settings.max_parallelism }
                }
                Partitioning::RoundRobin => Router::RoundRobin { next: s },
            };
            edges.push(OutputEdge { router, targets });
        }
        Ok(Terminal::Outputs(Outputs::new(edges, metrics)))
    }
}
