//! Helpers shared by the end-to-end tests: running pipelines in-process and reading what sinks wrote.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use nagare_engine::{JobError, JobOptions, JobSummary};
use nagare_sql::{PlanError, Planner, Variables};

/// Why a pipeline did not run to the end.
#[derive(Debug)]
pub enum RunError {
    Plan(PlanError),
    Start(nagare_engine::EngineError),
    Job(JobError),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Plan(e) => write!(f, "{e}"),
            RunError::Start(e) => write!(f, "{e}"),
            RunError::Job(e) => write!(f, "{e}"),
        }
    }
}

/// Plans and runs `sql` in this process with `${NAME}` variables, until its (bounded) sources end. The plan runs
/// as a worker gets it: written with `nagare_sql::wire`, read back (the same graph, checked), and run from that.
pub async fn run_sql(sql: &str, vars: &[(&str, &str)]) -> Result<JobSummary, RunError> {
    let vars: BTreeMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let planned = Planner::new(nagare_cli::registry().catalog())
        .with_variables(Variables::new(vars, false))
        .plan(sql)
        .await
        .map_err(RunError::Plan)?;
    let pipeline = nagare_sql::wire::decode(&nagare_sql::wire::encode(&planned).map_err(RunError::Plan)?)
        .map_err(RunError::Plan)?;
    assert_eq!(pipeline.to_string(), planned.to_string(), "a shipped plan reads back as the same graph");
    assert_eq!(pipeline.settings, planned.settings);
    for (a, b) in pipeline.graph.nodes.iter().zip(&planned.graph.nodes) {
        use nagare_sql::OperatorSpec::{Sink, Source};
        let same = match (&a.operator, &b.operator) {
            (Source(x), Source(y)) => {
                (&x.table.config, &x.table.schema, &x.projection, x.watermark.as_ref().map(|w| format!("{:?}", w.expr)))
                    == (
                        &y.table.config,
                        &y.table.schema,
                        &y.projection,
                        y.watermark.as_ref().map(|w| format!("{:?}", w.expr)),
                    )
            }
            (Sink(x), Sink(y)) => (&x.table.config, &x.table.schema) == (&y.table.config, &y.table.schema),
            (x, y) => format!("{x:?}") == format!("{y:?}"),
        };
        assert!(same, "node {} reads back alike:\n{:?}\n{:?}", a.id, a.operator, b.operator);
    }
    let job = nagare_engine::start(&pipeline, nagare_cli::registry(), JobOptions::default())
        .await
        .map_err(RunError::Start)?;
    job.wait().await.map_err(RunError::Job)
}

/// Every file under `dir` (recursively) with one of the extensions.
pub fn files_with(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if exts.iter().any(|x| p.to_string_lossy().ends_with(x)) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// All JSON-lines rows written under `dir`, as JSON values.
pub fn read_json_rows(dir: &Path) -> Vec<serde_json::Value> {
    let mut rows = Vec::new();
    for f in files_with(dir, &[".jsonl"]) {
        for line in std::fs::read_to_string(&f).unwrap().lines() {
            if !line.trim().is_empty() {
                rows.push(serde_json::from_str(line).unwrap());
            }
        }
    }
    rows
}

/// All Parquet batches written under `dir`.
pub fn read_parquet(dir: &Path) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    for f in files_with(dir, &[".parquet"]) {
        let file = std::fs::File::open(&f).unwrap();
        let reader =
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
        for b in reader {
            out.push(b.unwrap());
        }
    }
    out
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}
pub mod bq;
pub mod procs;
pub mod proxy;
pub mod services;

/// How a run that may be killed ended.
pub enum RunEnd {
    /// It ended by itself, with this status.
    Exited(std::process::ExitStatus),
    /// It was still running at the deadline and was SIGKILLed.
    Killed,
}

/// Starts `cmd` (stderr captured) and SIGKILLs it if it is still running after `after`; returns how it ended and
/// its stderr.
pub fn run_or_kill(mut cmd: std::process::Command, after: std::time::Duration) -> (RunEnd, String) {
    use std::process::Stdio;
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    // Read stderr on a thread, so a chatty child never blocks on a full pipe.
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut pipe, &mut err);
        err
    });
    let deadline = std::time::Instant::now() + after;
    let end = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break RunEnd::Exited(status);
        }
        if std::time::Instant::now() >= deadline {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            break RunEnd::Killed;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    (end, reader.join().unwrap())
}

/// A cluster test's pipeline: generated events with 20 % re-deliveries (seed `seed`), deduplicated by id (keyed
/// state that must move with the job), exactly once into JSON files under `${OUT}`, at `${RATE}` events/s.
pub fn generated_dedup_sql(events: usize, seed: u64) -> String {
    format!(
        "SET parallelism = 2;\nSET checkpoint_interval = '500ms';\nSET dedup_ttl = '1 minute';\n\
         CREATE TABLE events (id TEXT, time TIMESTAMP, WATERMARK FOR time AS time - INTERVAL '5' SECOND)\n\
         WITH (connector = 'generator', count = '{events}', rate = '${{RATE}}', duplicate_rate = '0.2', seed = '{seed}',\n\
               start_time = '2026-01-01T00:00:00Z');\n\
         CREATE TABLE out WITH (connector = 'filesystem', path = '${{OUT}}', format = 'json');\n\
         INSERT INTO out SELECT id, time\n\
         FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events) WHERE rn = 1;\n"
    )
}
