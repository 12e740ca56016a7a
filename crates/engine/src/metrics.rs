//! Per-operator counters, shared by the subtasks of a node and read by the progress line, the final summary and the
//! Prometheus endpoint.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

/// Counters of one dataflow node, summed over its subtasks.
#[derive(Debug)]
pub struct NodeMetrics {
    /// Node id in the graph.
    pub node: usize,
    /// The node's label.
    pub label: String,
    /// `source`, `sink`, `calc`, `dedup`, `window`, `union`.
    pub kind: &'static str,
    /// Rows received.
    pub rows_in: AtomicU64,
    /// Rows emitted (for sinks: rows written).
    pub rows_out: AtomicU64,
    /// Bytes read from input files or written to output files, where the connector knows.
    pub bytes: AtomicU64,
    /// Rows behind the watermark, dropped or dead-lettered.
    pub late_rows: AtomicU64,
    /// Rows dropped as duplicates by a dedup.
    pub duplicates: AtomicU64,
    /// Rows a dedup received behind the watermark and kept as first occurrences (lateness is not loss).
    pub late_kept: AtomicU64,
    /// Malformed input records.
    pub bad_records: AtomicU64,
    /// Keys or windows held in state right now.
    pub state_entries: AtomicI64,
    /// Time spent blocked on full output channels (backpressure), in µs.
    pub backpressure_us: AtomicU64,
    /// Write streams a sink created (BigQuery `CreateWriteStream`), whose rate a per-hour quota limits.
    pub streams_created: AtomicU64,
    /// Figures particular to a connector (SQS messages in flight, ...), one entry per subtask that registered.
    connector: std::sync::Mutex<Vec<Arc<dyn ConnectorMetrics>>>,
    watermarks: Vec<AtomicI64>,
}

/// Figures a connector keeps beyond the common counters, so that they reach the Prometheus endpoint without the
/// runtime knowing each connector.
pub trait ConnectorMetrics: Send + Sync + std::fmt::Debug {
    /// The current values.
    fn samples(&self) -> Vec<Sample>;
}

/// One value of a connector figure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Prometheus metric name (`nagare_` prefixed).
    pub name: &'static str,
    /// One line of help.
    pub help: &'static str,
    /// What people read in the progress line, the run's summary and `nagare status`, e.g. `sqs in flight`.
    pub label: &'static str,
    /// Counter or gauge, and how subtasks' values combine.
    pub kind: SampleKind,
    /// The value.
    pub value: f64,
}

/// `label value` pairs of connector figures for people: ages (`_seconds`) as `12s`, counts as whole numbers.
pub fn figures_text<'a>(figures: impl IntoIterator<Item = (&'a str, &'a str, f64)>) -> String {
    figures
        .into_iter()
        .map(
            |(name, label, value)| {
                if name.ends_with("_seconds") { format!("{label} {value:.0}s") } else { format!("{label} {value:.0}") }
            },
        )
        .collect::<Vec<_>>()
        .join(", ")
}

/// How a [`Sample`] is exposed and combined over a node's subtasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleKind {
    /// A counter; subtasks' values add up.
    Counter,
    /// A gauge; subtasks' values add up (things held right now).
    Gauge,
    /// A gauge; the largest subtask value counts (ages).
    MaxGauge,
}

impl NodeMetrics {
    /// Counters for a node of `parallelism` subtasks.
    pub fn new(node: usize, label: String, kind: &'static str, parallelism: usize) -> Self {
        NodeMetrics {
            node,
            label,
            kind,
            rows_in: AtomicU64::new(0),
            rows_out: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            late_rows: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            late_kept: AtomicU64::new(0),
            bad_records: AtomicU64::new(0),
            state_entries: AtomicI64::new(0),
            backpressure_us: AtomicU64::new(0),
            streams_created: AtomicU64::new(0),
            connector: std::sync::Mutex::new(Vec::new()),
            watermarks: (0..parallelism).map(|_| AtomicI64::new(i64::MIN)).collect(),
        }
    }

    /// Adds to a counter.
    pub fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Records the watermark a subtask reached.
    pub fn set_watermark(&self, subtask: usize, micros: i64) {
        if let Some(w) = self.watermarks.get(subtask) {
            w.fetch_max(micros, Ordering::Relaxed);
        }
    }

    /// The node's watermark: the minimum over its subtasks (None before all have one).
    pub fn watermark(&self) -> Option<i64> {
        let min = self.watermarks.iter().map(|w| w.load(Ordering::Relaxed)).min()?;
        (min != i64::MIN).then_some(min)
    }

    /// The lowest watermark over the subtasks that have one (in a job split over workers, a worker sees only its
    /// own subtasks; the coordinator takes the minimum over workers).
    pub fn watermark_reached(&self) -> Option<i64> {
        self.watermarks.iter().map(|w| w.load(Ordering::Relaxed)).filter(|w| *w != i64::MIN).min()
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Adds a subtask's connector figures to the node's.
    pub fn register_connector(&self, metrics: Arc<dyn ConnectorMetrics>) {
        if let Ok(mut m) = self.connector.lock() {
            m.push(metrics);
        }
    }

    /// The connector figures of the node, combined over its subtasks, in the order the connector gives them.
    pub fn connector_samples(&self) -> Vec<Sample> {
        let Ok(registered) = self.connector.lock() else { return Vec::new() };
        let mut out: Vec<Sample> = Vec::new();
        for s in registered.iter().flat_map(|m| m.samples()) {
            match out.iter_mut().find(|o| o.name == s.name) {
                Some(o) if s.kind == SampleKind::MaxGauge => o.value = o.value.max(s.value),
                Some(o) => o.value += s.value,
                None => out.push(s),
            }
        }
        out
    }
}

/// Counters of a whole job.
#[derive(Debug)]
pub struct JobMetrics {
    /// One entry per graph node, by node id.
    pub nodes: Vec<Arc<NodeMetrics>>,
    /// When the job started.
    pub started: Instant,
}

impl JobMetrics {
    /// Rows read by all sources.
    pub fn rows_read(&self) -> u64 {
        self.sum("source", |m| &m.rows_out)
    }

    /// Rows written by all sinks.
    pub fn rows_written(&self) -> u64 {
        self.sum("sink", |m| &m.rows_out)
    }

    /// Sum of a counter over nodes of a kind (`""` for all).
    pub fn sum(&self, kind: &str, f: impl Fn(&NodeMetrics) -> &AtomicU64) -> u64 {
        self.nodes.iter().filter(|m| kind.is_empty() || m.kind == kind).map(|m| NodeMetrics::get(f(m))).sum()
    }

    /// The lowest watermark over the sinks' inputs (how far event time has been completely processed).
    pub fn sink_watermark(&self) -> Option<i64> {
        self.nodes.iter().filter(|m| m.kind == "sink").filter_map(|m| m.watermark()).min()
    }

    /// The counters in Prometheus text exposition format.
    pub fn prometheus(&self, job: &str) -> String {
        prometheus(&[(job, self)])
    }
}

/// The counters of several jobs (a worker's) in Prometheus text exposition format, each metric family once.
pub fn prometheus(jobs: &[(&str, &JobMetrics)]) -> String {
    let mut out = String::new();
    let counters: [Counter; 9] = [
        ("nagare_rows_in_total", "Rows received by the operator.", |m| NodeMetrics::get(&m.rows_in)),
        ("nagare_rows_out_total", "Rows emitted (sinks: written) by the operator.", |m| NodeMetrics::get(&m.rows_out)),
        ("nagare_bytes_total", "Bytes read (sources) or written (sinks).", |m| NodeMetrics::get(&m.bytes)),
        ("nagare_late_rows_total", "Rows behind the watermark, dropped or dead-lettered.", |m| {
            NodeMetrics::get(&m.late_rows)
        }),
        ("nagare_duplicates_total", "Rows dropped as duplicates.", |m| NodeMetrics::get(&m.duplicates)),
        ("nagare_late_kept_total", "Rows a dedup received behind the watermark and kept as first occurrences.", |m| {
            NodeMetrics::get(&m.late_kept)
        }),
        ("nagare_bad_records_total", "Malformed input records.", |m| NodeMetrics::get(&m.bad_records)),
        ("nagare_backpressure_seconds_total", "Time blocked on full output channels.", |m| {
            NodeMetrics::get(&m.backpressure_us) / 1_000_000
        }),
        ("nagare_write_streams_created_total", "Write streams a sink created (BigQuery: quota per hour).", |m| {
            NodeMetrics::get(&m.streams_created)
        }),
    ];
    let nodes = || jobs.iter().flat_map(|(job, metrics)| metrics.nodes.iter().map(move |m| (escape(job), m)));
    for (name, help, get) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (job, m) in nodes() {
            let _ = writeln!(out, "{name}{{job=\"{job}\",node=\"{}\",kind=\"{}\"}} {}", m.node, m.kind, get(m));
        }
    }
    let _ = writeln!(
        out,
        "# HELP nagare_state_entries Keys or windows held in operator state.\n# TYPE nagare_state_entries gauge"
    );
    for (job, m) in nodes() {
        let entries = m.state_entries.load(Ordering::Relaxed);
        let _ =
            writeln!(out, "nagare_state_entries{{job=\"{job}\",node=\"{}\",kind=\"{}\"}} {entries}", m.node, m.kind);
    }
    let _ = writeln!(
        out,
        "# HELP nagare_watermark_seconds Event-time watermark of the operator.\n# TYPE nagare_watermark_seconds gauge"
    );
    for (job, m) in nodes() {
        if let Some(w) = m.watermark() {
            let _ = writeln!(
                out,
                "nagare_watermark_seconds{{job=\"{job}\",node=\"{}\",kind=\"{}\"}} {}",
                m.node,
                m.kind,
                w as f64 / 1e6
            );
        }
    }
    // Connector figures: each metric family once, with every node that has it.
    let mut families: Vec<(Sample, Vec<SampleRow>)> = Vec::new();
    for (job, m) in nodes() {
        for s in m.connector_samples() {
            let row = (job.clone(), m.node, m.kind, s.value);
            match families.iter_mut().find(|(f, _)| f.name == s.name) {
                Some((_, rows)) => rows.push(row),
                None => families.push((s, vec![row])),
            }
        }
    }
    for (s, rows) in families {
        let kind = if s.kind == SampleKind::Counter { "counter" } else { "gauge" };
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} {kind}", s.name, s.help, s.name);
        for (job, node, node_kind, value) in rows {
            let _ = writeln!(out, "{}{{job=\"{job}\",node=\"{node}\",kind=\"{node_kind}\"}} {value}", s.name);
        }
    }
    out
}

/// One node's value of a connector figure: job, node id, node kind, value.
type SampleRow = (String, usize, &'static str, f64);

/// A Prometheus counter: name, help, and how to read it from a node.
type Counter = (&'static str, &'static str, fn(&NodeMetrics) -> u64);

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed(f64, f64);

    impl ConnectorMetrics for Fixed {
        fn samples(&self) -> Vec<Sample> {
            vec![
                Sample { name: "nagare_x_total", help: "X.", label: "x", kind: SampleKind::Counter, value: self.0 },
                Sample {
                    name: "nagare_x_age_seconds",
                    help: "Age.",
                    label: "x age",
                    kind: SampleKind::MaxGauge,
                    value: self.1,
                },
            ]
        }
    }

    #[test]
    fn connector_figures_combine_over_subtasks_and_reach_prometheus() {
        let node = Arc::new(NodeMetrics::new(0, "q".into(), "source", 2));
        node.register_connector(Arc::new(Fixed(3.0, 5.0)));
        node.register_connector(Arc::new(Fixed(4.0, 2.0)));
        let samples = node.connector_samples();
        assert_eq!(
            samples.iter().map(|s| (s.name, s.value)).collect::<Vec<_>>(),
            vec![("nagare_x_total", 7.0), ("nagare_x_age_seconds", 5.0)]
        );
        let text = JobMetrics { nodes: vec![node], started: Instant::now() }.prometheus("j");
        assert!(
            text.contains("# TYPE nagare_x_total counter\nnagare_x_total{job=\"j\",node=\"0\",kind=\"source\"} 7"),
            "{text}"
        );
        assert!(text.contains("# TYPE nagare_x_age_seconds gauge"), "{text}");
        let shown = figures_text(samples.iter().map(|s| (s.name, s.label, s.value)));
        assert_eq!(shown, "x 7, x age 5s");
    }
}
