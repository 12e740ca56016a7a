//! A running job: the graph turned into chained subtasks and channels, spawned on tokio, and waited for.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nagare_sql::{LateRowPolicy, NodeId, OperatorSpec, Partitioning, Pipeline};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::channel::{InputGate, LocalSender, MessageReceiver, MessageSender, local_channel};
use crate::connector::{ConnectorFactory, SinkContext, SourceContext};
use crate::dead_letter::{DeadLetterWriter, DeadLetters};
use crate::error::{EngineError, Result};
use crate::metrics::{JobMetrics, NodeMetrics};
use crate::operator::{Identity, Operator};
use crate::operators::OperatorContext;
use crate::operators::calc::CalcOperator;
use crate::operators::dedup::DedupOperator;
use crate::operators::session::SessionOperator;
use crate::operators::window::WindowAggregateOperator;
use crate::partition::{OutputEdge, Outputs, Router};
use crate::task::{Chain, Terminal, WatermarkGenerator, run_operator_task, run_source_task};

/// How to run a job.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// Unique per run: part of output and dead-letter file names.
    pub run_id: String,
    /// After how long without data a source subtask stops holding back the watermark.
    pub idle_timeout: Duration,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions { run_id: new_run_id(), idle_timeout: Duration::from_secs(10) }
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
}

/// A job whose tasks are running.
pub struct RunningJob {
    tasks: JoinSet<(String, Result<()>)>,
    metrics: Arc<JobMetrics>,
    stop: CancellationToken,
    dead_letters: Arc<DeadLetters>,
}

impl RunningJob {
    /// Live counters.
    pub fn metrics(&self) -> Arc<JobMetrics> {
        self.metrics.clone()
    }

    /// Cancelling this token stops the job cleanly: sources stop reading, everything in flight is written, files
    /// are closed; windows that are still open are not emitted.
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
        OperatorSpec::Sink(_) => "sink",
    }
}

/// Builds every task of the pipeline and starts them. Sources and sinks are created (and so configuration is
/// checked) before any task runs.
pub fn start(pipeline: &Pipeline, factory: Arc<dyn ConnectorFactory>, options: JobOptions) -> Result<RunningJob> {
    let graph = &pipeline.graph;
    let settings = &pipeline.settings;
    let metrics = Arc::new(JobMetrics {
        nodes: graph
            .nodes
            .iter()
            .map(|n| Arc::new(NodeMetrics::new(n.id, n.label.clone(), node_kind(&n.operator), n.parallelism)))
            .collect(),
        started: Instant::now(),
    });
    let dead_letters = Arc::new(DeadLetters::new(options.run_id.clone()));
    let default_dead_letter = match &settings.dead_letter_path {
        Some(p) => Some(dead_letters.writer(&PathBuf::from(p))?),
        None => None,
    };
    let stop = CancellationToken::new();

    // Chains: a node joins its upstream's task when connected 1:1 by a forward edge.
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
    let mut chains: Vec<Vec<NodeId>> = Vec::new();
    let mut chain_of = vec![usize::MAX; n];
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
        for id in &chain {
            chain_of[*id] = chains.len();
        }
        chains.push(chain);
    }

    // Channels for edges between chains: receivers per (node, subtask), senders per (edge, upstream subtask).
    let mut receivers: HashMap<(NodeId, usize), Vec<Box<dyn MessageReceiver>>> = HashMap::new();
    let mut senders: HashMap<(usize, usize), Vec<LocalSender>> = HashMap::new();
    for (ei, edge) in graph.edges.iter().enumerate() {
        if chain_of[edge.from] == chain_of[edge.to] {
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
                let (tx, rx) = local_channel();
                list.push(tx);
                receivers.entry((down.id, d)).or_default().push(Box::new(rx));
            }
            senders.insert((ei, u), list);
        }
    }

    let mut tasks = JoinSet::new();
    for chain in &chains {
        let head = &graph.nodes[chain[0]];
        let tail = &graph.nodes[chain[chain.len() - 1]];
        for s in 0..head.parallelism {
            let task_name = if head.id == tail.id {
                format!("{} [{}/{}]", head.label, s + 1, head.parallelism)
            } else {
                format!("{} -> {} [{}/{}]", head.label, tail.label, s + 1, head.parallelism)
            };
            // Operators between head and tail (sources and sinks are handled apart).
            let mut ops: Vec<(Box<dyn Operator>, Arc<NodeMetrics>)> = Vec::new();
            for id in chain {
                let node = &graph.nodes[*id];
                let m = metrics.nodes[*id].clone();
                let input_schema = graph.inputs(*id).next().map(|e| graph.nodes[e.from].schema.clone());
                let late_ctx = || -> Result<OperatorContext> {
                    let dead_letter = match settings.late_rows {
                        LateRowPolicy::DeadLetter => Some(default_dead_letter.clone().ok_or_else(|| {
                            EngineError::Config(
                                "late_rows = 'dead_letter' needs a directory: SET dead_letter_path = '...'".into(),
                            )
                        })?),
                        LateRowPolicy::Drop => None,
                    };
                    Ok(OperatorContext {
                        label: node.label.clone(),
                        metrics: m.clone(),
                        late_rows: settings.late_rows,
                        dead_letter,
                    })
                };
                let op: Box<dyn Operator> = match &node.operator {
                    OperatorSpec::Source(_) | OperatorSpec::Sink(_) => continue,
                    OperatorSpec::Calc(spec) => Box::new(CalcOperator::new(spec, node.schema.clone())),
                    OperatorSpec::Union => Box::new(Identity),
                    OperatorSpec::Dedup(spec) => {
                        let input =
                            input_schema.clone().ok_or_else(|| EngineError::Internal("dedup without input".into()))?;
                        Box::new(DedupOperator::new(spec, input, node.schema.clone(), late_ctx()?)?)
                    }
                    OperatorSpec::WindowAggregate(spec) => match spec.window {
                        nagare_sql::window::WindowKind::Session { .. } => {
                            Box::new(SessionOperator::new(spec, node.schema.clone(), late_ctx()?)?)
                        }
                        _ => Box::new(WindowAggregateOperator::new(spec, node.schema.clone(), late_ctx()?)?),
                    },
                };
                ops.push((op, m));
            }
            let terminal = match &tail.operator {
                OperatorSpec::Sink(spec) => {
                    let ctx = SinkContext {
                        subtask: s,
                        parallelism: tail.parallelism,
                        run_id: options.run_id.clone(),
                        metrics: metrics.nodes[tail.id].clone(),
                    };
                    let sink = factory.create_sink(spec, tail.schema.clone(), ctx)?;
                    Terminal::Sink(sink, metrics.nodes[tail.id].clone())
                }
                _ => {
                    let mut edges = Vec::new();
                    for (ei, edge) in graph.edges.iter().enumerate().filter(|(_, e)| e.from == tail.id) {
                        let targets: Vec<Box<dyn MessageSender>> = senders
                            .remove(&(ei, s))
                            .ok_or_else(|| EngineError::Internal("missing channel".into()))?
                            .into_iter()
                            .map(|t| Box::new(t) as Box<dyn MessageSender>)
                            .collect();
                        let router = match &edge.partitioning {
                            Partitioning::Forward | Partitioning::Single => Router::One,
                            Partitioning::Hash { keys } => {
                                Router::Hash { keys: keys.clone(), max_parallelism: settings.max_parallelism }
                            }
                            Partitioning::RoundRobin => Router::RoundRobin { next: s },
                        };
                        edges.push(OutputEdge { router, targets });
                    }
                    Terminal::Outputs(Outputs::new(edges, metrics.nodes[tail.id].clone()))
                }
            };
            let chain_struct = Chain { ops, terminal, subtask: s };
            match &head.operator {
                OperatorSpec::Source(spec) => {
                    factory.check_source(spec)?;
                    let dead_letter: Option<Arc<DeadLetterWriter>> =
                        match spec.table.options.get_str("dead_letter_path") {
                            Some(p) => Some(dead_letters.writer(&PathBuf::from(p))?),
                            None => default_dead_letter.clone(),
                        };
                    let ctx = SourceContext {
                        subtask: s,
                        parallelism: head.parallelism,
                        batch_size: settings.batch_size,
                        dead_letter,
                        metrics: metrics.nodes[head.id].clone(),
                        stop: stop.clone(),
                    };
                    let source = factory.create_source(spec, head.schema.clone(), ctx)?;
                    let wm = spec.watermark.as_ref().map(|w| WatermarkGenerator::new(w.column, w.expr.clone()));
                    let (m, stop, idle) = (metrics.nodes[head.id].clone(), stop.clone(), options.idle_timeout);
                    tasks.spawn(
                        async move { (task_name, run_source_task(source, wm, m, chain_struct, stop, idle).await) },
                    );
                }
                _ => {
                    let inputs = receivers
                        .remove(&(head.id, s))
                        .ok_or_else(|| EngineError::Internal(format!("no inputs for node {} subtask {s}", head.id)))?;
                    let gate = InputGate::new(inputs);
                    tasks.spawn(async move { (task_name, run_operator_task(gate, chain_struct).await) });
                }
            }
        }
    }
    Ok(RunningJob { tasks, metrics, stop, dead_letters })
}
