//! The dataflow graph a pipeline compiles to: operators with their parallelism, and the edges between them with how
//! rows are routed. Expressions are DataFusion physical expressions, ready to evaluate on Arrow batches.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;

use crate::catalog::TableDef;
use crate::window::WindowKind;

/// Index of a node in [`DataflowGraph::nodes`].
pub type NodeId = usize;

/// A compiled pipeline: settings, tables and the graph.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// Pipeline-wide settings (`SET ...` and command-line overrides).
    pub settings: Settings,
    /// Every declared table, by name.
    pub tables: BTreeMap<String, Arc<TableDef>>,
    /// The operators and edges.
    pub graph: DataflowGraph,
    /// What the planner advises about the pipeline (it runs, but may not do what was meant); printed by `run`,
    /// `validate` and `submit`.
    pub warnings: Vec<String>,
}

/// What happens to rows that arrive after the watermark has passed their window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LateRowPolicy {
    /// Count and drop.
    Drop,
    /// Count and write to the dead-letter output.
    DeadLetter,
}

/// Pipeline-wide settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    /// Subtasks per parallel operator.
    pub parallelism: usize,
    /// Key groups (fixed for the life of a job's state).
    pub max_parallelism: u32,
    /// How long a dedup key is remembered (event time), when no window bounds it.
    pub dedup_ttl: Option<Duration>,
    /// Late rows policy for windows and dedup.
    pub late_rows: LateRowPolicy,
    /// Where dead-letter records go when a source or operator sends them there.
    pub dead_letter_path: Option<String>,
    /// Rows per batch that sources aim for.
    pub batch_size: usize,
    /// Rows per second each source table reads at most (over its subtasks), so a backfill cannot outrun a sink.
    pub source_rate_limit: Option<u64>,
    /// Time between checkpoints (when the job takes them).
    pub checkpoint_interval: Duration,
    /// A checkpoint not complete after this long is aborted.
    pub checkpoint_timeout: Duration,
    /// Completed checkpoints kept.
    pub checkpoints_retained: usize,
    /// Checkpoints that may fail in a row before the job fails.
    pub checkpoint_tolerable_failures: u32,
}

/// Nodes and edges.
#[derive(Debug, Clone, Default)]
pub struct DataflowGraph {
    /// Operators, indexed by [`NodeId`].
    pub nodes: Vec<Node>,
    /// Connections, each from an upstream node's output to a downstream node's input.
    pub edges: Vec<Edge>,
}

/// One logical operator, run as `parallelism` subtasks.
#[derive(Debug, Clone)]
pub struct Node {
    /// Its index.
    pub id: NodeId,
    /// Short description for `explain`, metrics and logs.
    pub label: String,
    /// What it does.
    pub operator: OperatorSpec,
    /// Number of subtasks.
    pub parallelism: usize,
    /// Schema of its output.
    pub schema: SchemaRef,
    /// Which output column is the event time (watermarks refer to it), if any.
    pub event_time: Option<usize>,
}

/// What a node does.
#[derive(Debug, Clone)]
pub enum OperatorSpec {
    /// Reads a source table.
    Source(SourceSpec),
    /// Row-wise filter and projection.
    Calc(CalcSpec),
    /// Keeps the first (or last) row per key.
    Dedup(DedupSpec),
    /// Windowed GROUP BY.
    WindowAggregate(WindowAggregateSpec),
    /// Merges its inputs unchanged.
    Union,
    /// Keeps, per key, the last change of each checkpoint interval (in front of an upsert sink).
    Collapse(CollapseSpec),
    /// Writes a sink table.
    Sink(SinkSpec),
}

impl OperatorSpec {
    /// Whether the operator keeps state between batches (and so is partitioned by key groups).
    pub fn is_stateful(&self) -> bool {
        matches!(self, OperatorSpec::Dedup(_) | OperatorSpec::WindowAggregate(_))
    }
}

/// A source read.
#[derive(Debug, Clone)]
pub struct SourceSpec {
    /// The table.
    pub table: Arc<TableDef>,
    /// Which table columns to produce (indices into the table schema), in order.
    pub projection: Vec<usize>,
    /// How watermarks are computed, when the table declares one.
    pub watermark: Option<WatermarkSpec>,
}

/// Watermark generation at a source.
#[derive(Debug, Clone)]
pub struct WatermarkSpec {
    /// The event-time column in the source's output.
    pub column: usize,
    /// `WATERMARK FOR ... AS <expr>` over the source's output; the watermark is its maximum so far.
    pub expr: Arc<dyn PhysicalExpr>,
    /// The expression as written.
    pub text: String,
}

/// Filter, then project.
#[derive(Debug, Clone)]
pub struct CalcSpec {
    /// Rows where this is true are kept.
    pub filter: Option<Arc<dyn PhysicalExpr>>,
    /// Output columns, evaluated over the filtered input; `None` keeps the input columns.
    pub exprs: Option<Vec<Arc<dyn PhysicalExpr>>>,
}

/// Which row of a key's rows a dedup keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Keep {
    /// The earliest by event time (`ORDER BY t`); emitted as soon as the watermark passes it.
    First,
    /// The latest by event time (`ORDER BY t DESC`); emitted when its TTL or window closes.
    Last,
}

/// What bounds a dedup's memory of keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DedupScope {
    /// Rows of a key within this long (event time) after the first kept one are duplicates.
    Ttl { ttl_us: i64 },
    /// Rows of a key within the same tumbling window are duplicates.
    Window { size_us: i64 },
}

/// Collapses the changes to each key between two checkpoints into the last one: the row with the greatest
/// sequence (on a tie, the one that arrived last). Emitted when the checkpoint barrier passes, so the sink writes
/// one image per key per checkpoint.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CollapseSpec {
    /// Key columns (the sink's PRIMARY KEY), as input column indices.
    pub keys: Vec<usize>,
    /// Columns that order a key's changes, most significant first.
    pub sequence: Vec<usize>,
}

/// `ROW_NUMBER() OVER (PARTITION BY keys ORDER BY time) = 1`.
#[derive(Debug, Clone)]
pub struct DedupSpec {
    /// Key expressions over the input (without the window).
    pub keys: Vec<Arc<dyn PhysicalExpr>>,
    /// Key expressions as written, for `explain`.
    pub key_names: Vec<String>,
    /// The input's event-time column.
    pub time_column: usize,
    /// First or last.
    pub keep: Keep,
    /// TTL or window.
    pub scope: DedupScope,
}

/// `GROUP BY keys, TUMBLE|HOP|SESSION(time, ...)` with aggregates.
#[derive(Debug, Clone)]
pub struct WindowAggregateSpec {
    /// The window.
    pub window: WindowKind,
    /// The input's event-time column.
    pub time_column: usize,
    /// Position of the window column among the group columns of the output.
    pub window_position: usize,
    /// Group key expressions over the input (without the window), in output order.
    pub keys: Vec<Arc<dyn PhysicalExpr>>,
    /// Aggregates, in output order after the group columns.
    pub aggregates: Vec<AggregateSpec>,
    /// Schema of the input.
    pub input_schema: SchemaRef,
}

/// One aggregate of a window.
#[derive(Debug, Clone)]
pub struct AggregateSpec {
    /// DataFusion's aggregate (COUNT, SUM, ..., with DISTINCT).
    pub expr: Arc<AggregateFunctionExpr>,
    /// `FILTER (WHERE ...)`.
    pub filter: Option<Arc<dyn PhysicalExpr>>,
}

/// A sink write.
#[derive(Debug, Clone)]
pub struct SinkSpec {
    /// The table.
    pub table: Arc<TableDef>,
}

/// How rows move along an edge.
#[derive(Debug, Clone)]
pub enum Partitioning {
    /// Subtask i to subtask i (same parallelism); chained into one task when possible.
    Forward,
    /// By the stable hash of key expressions (evaluated over the upstream output), through key groups.
    Hash { keys: Vec<Arc<dyn PhysicalExpr>> },
    /// Everything to subtask 0.
    Single,
    /// Batches spread evenly over the downstream subtasks.
    RoundRobin,
}

/// A connection between two nodes.
#[derive(Debug, Clone)]
pub struct Edge {
    /// Upstream node.
    pub from: NodeId,
    /// Downstream node.
    pub to: NodeId,
    /// Routing.
    pub partitioning: Partitioning,
}

impl DataflowGraph {
    /// Edges into `node`, in insertion order (the order of its inputs).
    pub fn inputs(&self, node: NodeId) -> impl Iterator<Item = &Edge> {
        self.edges.iter().filter(move |e| e.to == node)
    }

    /// Edges out of `node`.
    pub fn outputs(&self, node: NodeId) -> impl Iterator<Item = &Edge> {
        self.edges.iter().filter(move |e| e.from == node)
    }

    /// The source nodes with their specs, in node order (what runners and tools look for in a plan).
    pub fn sources(&self) -> impl Iterator<Item = (&Node, &SourceSpec)> {
        self.nodes.iter().filter_map(|n| match &n.operator {
            OperatorSpec::Source(s) => Some((n, s)),
            _ => None,
        })
    }
}

impl fmt::Display for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        writeln!(
            f,
            "pipeline: parallelism {}, max_parallelism {} (key groups), late rows: {}{}",
            s.parallelism,
            s.max_parallelism,
            match s.late_rows {
                LateRowPolicy::Drop => "drop",
                LateRowPolicy::DeadLetter => "dead_letter",
            },
            s.dead_letter_path.as_ref().map(|p| format!(", dead letters to {p}")).unwrap_or_default()
        )?;
        for node in &self.graph.nodes {
            writeln!(f)?;
            writeln!(f, "[{}] {}  x{}", node.id, node.label, node.parallelism)?;
            let mut cols = String::new();
            for (i, field) in node.schema.fields().iter().enumerate() {
                if i > 0 {
                    cols.push_str(", ");
                }
                let _ = write!(cols, "{} {}", field.name(), crate::types::arrow_to_sql(field.data_type()));
                if node.event_time == Some(i) {
                    cols.push_str(" (event time)");
                }
            }
            writeln!(f, "    out: {cols}")?;
            for edge in self.graph.inputs(node.id) {
                let how = match &edge.partitioning {
                    Partitioning::Forward => "forward".to_string(),
                    Partitioning::Hash { keys } => format!(
                        "hash({}) over {} key groups",
                        keys.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", "),
                        s.max_parallelism
                    ),
                    Partitioning::Single => "single (all rows to one subtask)".to_string(),
                    Partitioning::RoundRobin => "round-robin".to_string(),
                };
                writeln!(f, "    in:  [{}] {}", edge.from, how)?;
            }
        }
        Ok(())
    }
}
