//! `nagare`: run, explain and benchmark streaming SQL pipelines.

mod bench;
mod bench_cluster;
mod bench_json;
mod bench_sqs;
mod cluster;
mod local_api;
mod progress;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use clap::{Parser, Subcommand};
use nagare_cli::registry;
use nagare_engine::{JobOptions, JobSummary};
use nagare_sql::{Pipeline, Planner, Variables};

/// nagare (流れ): streaming SQL pipelines on Arrow, landing data exactly once.
#[derive(Debug, Parser)]
#[command(name = "nagare", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options shared by commands that plan a pipeline.
#[derive(Debug, clap::Args)]
struct PlanArgs {
    /// The pipeline: a SQL file of SET, CREATE TABLE and INSERT INTO statements.
    file: PathBuf,
    /// Subtasks per parallel operator (default: CPU cores; overrides SET parallelism).
    #[arg(long, short = 'p')]
    parallelism: Option<usize>,
    /// Overrides a pipeline setting, e.g. --set dedup_ttl=5m (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    settings: Vec<String>,
    /// A value for ${NAME} in option values, e.g. --var INPUT=/data/in (repeatable; the environment is used too).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    vars: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs a pipeline until its sources end, or until Ctrl-C.
    Run {
        #[command(flatten)]
        plan: PlanArgs,
        /// Take checkpoints here (file:///dir, a directory, s3://bucket/prefix, gs://bucket/prefix) and resume from
        /// the newest one: output is then exactly once across crashes and restarts.
        #[arg(long, env = "NAGARE_CHECKPOINT_DIR")]
        checkpoint_dir: Option<String>,
        /// Time between checkpoints (overrides SET checkpoint_interval; default 10s).
        #[arg(long)]
        checkpoint_interval: Option<String>,
        /// Ignore existing checkpoints and start over (their state is discarded).
        #[arg(long)]
        from_scratch: bool,
        /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464).
        #[arg(long)]
        metrics_addr: Option<String>,
        /// Serve the cluster's JobService for this run on a loopback address (e.g. 127.0.0.1:7400), so that
        /// `nagare status`, `jobs`, `stop` and `status --watch` work on it.
        #[arg(long)]
        serve: Option<String>,
        /// With --serve: keep the job record in this file (the embedded metadata store), across restarts.
        #[arg(long, requires = "serve")]
        state_file: Option<PathBuf>,
        /// Worker threads (default: CPU cores).
        #[arg(long)]
        threads: Option<usize>,
        /// No progress line.
        #[arg(long, short = 'q')]
        quiet: bool,
        /// Write the final summary (and peak memory) as JSON to this file.
        #[arg(long, hide = true)]
        stats_json: Option<PathBuf>,
        /// Crash tests only: a delay at a point of the checkpoint path, POINT=DURATION (upload, commit, bq_commit,
        /// bq_flushed), to widen the window a kill aims at.
        #[arg(long = "test-fault", hide = true)]
        test_faults: Vec<String>,
    },
    /// Prints the dataflow graph of a pipeline: operators, parallelism, edges and keys.
    Explain {
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// Lists the checkpoints of a pipeline: id, time, duration, size.
    Checkpoints {
        #[command(flatten)]
        plan: PlanArgs,
        /// Where the pipeline's checkpoints are.
        #[arg(long, env = "NAGARE_CHECKPOINT_DIR")]
        checkpoint_dir: String,
    },
    /// Lists connectors and their options.
    Connectors,
    /// Generates input data for benchmarks and tests.
    Gen {
        #[command(subcommand)]
        what: GenCommand,
    },
    /// Runs a benchmark and prints its figures against a baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
    #[command(flatten)]
    Cluster(cluster::ClusterCommand),
}

#[derive(Debug, Subcommand)]
enum GenCommand {
    /// W1: EventBridge-shaped JSON lines, ~315 bytes each, a share of them re-deliveries up to 30 s late.
    W1 {
        /// Lines to write (re-deliveries included).
        #[arg(long, default_value_t = 2_200_000)]
        rows: u64,
        /// Output file (.jsonl; .gz or .zst compresses).
        #[arg(long)]
        out: PathBuf,
        /// Random seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Share of re-deliveries.
        #[arg(long, default_value_t = 0.1)]
        duplicate_rate: f64,
    },
}

/// Arrow batches come and go in large, short-lived buffers; mimalloc reuses them without the system allocator's
/// trimming and page faults.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    init_tracing();
    let threads = match &cli.command {
        Command::Run { threads, .. } => *threads,
        Command::Bench { what: bench::BenchCommand::Part { threads, .. } } => Some(*threads),
        _ => None,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(t) = threads {
        builder.worker_threads(t.max(1));
    }
    let result = builder.build().context("starting the runtime").and_then(|rt| rt.block_on(dispatch(cli)));
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NAGARE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Sources that acknowledge what they read (a queue: `sqs`), as `'name' (connector)`.
fn acknowledged_sources(pipeline: &nagare_sql::Pipeline) -> Vec<String> {
    let registry = nagare_cli::registry();
    pipeline
        .graph
        .sources()
        .map(|(_, s)| &s.table)
        .filter(|t| registry.get(&t.connector).is_ok_and(|c| c.redelivery_window(t).is_some()))
        .map(|t| format!("'{}' ({})", t.name, t.connector))
        .collect()
}

async fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run {
            mut plan,
            metrics_addr,
            quiet,
            stats_json,
            checkpoint_dir,
            checkpoint_interval,
            from_scratch,
            serve,
            state_file,
            test_faults,
            ..
        } => {
            nagare_core::faults::install(&test_faults).map_err(|e| anyhow!(e))?;
            if let Some(i) = checkpoint_interval {
                plan.settings.push(format!("checkpoint_interval={i}"));
            }
            let pipeline = plan_file(&plan).await?;
            let settings = nagare_engine::checkpoint::coordinator::CheckpointSettings {
                interval: pipeline.settings.checkpoint_interval,
                timeout: pipeline.settings.checkpoint_timeout,
                retained: pipeline.settings.checkpoints_retained,
                tolerable_failures: pipeline.settings.checkpoint_tolerable_failures,
            };
            let acknowledged = acknowledged_sources(&pipeline);
            let checkpoints = match &checkpoint_dir {
                Some(dir) => Some(nagare_engine::CheckpointOptions {
                    store: nagare_engine::checkpoint::store::CheckpointStore::open(dir)?,
                    settings,
                    from_scratch,
                }),
                None if from_scratch => anyhow::bail!("--from-scratch needs --checkpoint-dir"),
                None if !acknowledged.is_empty() => {
                    // A queue's messages go only once their rows are written and committed, which checkpoints mark.
                    eprintln!(
                        "note: no --checkpoint-dir: checkpoints are kept in memory, so that messages of {} are \
                         deleted only after their rows are committed; a crash re-delivers them (at least once). Give \
                         --checkpoint-dir for exactly once across restarts.",
                        acknowledged.join(", ")
                    );
                    Some(nagare_engine::CheckpointOptions {
                        store: nagare_engine::checkpoint::store::CheckpointStore::in_memory(),
                        settings,
                        from_scratch: false,
                    })
                }
                None => None,
            };
            let serve =
                serve.map(|addr| Serve { addr, state_file, checkpoint_url: checkpoint_dir.unwrap_or_default() });
            let summary = run(&pipeline, checkpoints, metrics_addr, serve, quiet, &plan.file).await?;
            if let Some(path) = stats_json {
                write_stats(&path, &summary)?;
            }
            Ok(())
        }
        Command::Explain { plan } => {
            let pipeline = plan_file(&plan).await?;
            print!("{pipeline}");
            Ok(())
        }
        Command::Checkpoints { plan, checkpoint_dir } => {
            let pipeline = plan_file(&plan).await?;
            list_checkpoints(&pipeline, &checkpoint_dir).await
        }
        Command::Connectors => {
            print_connectors();
            Ok(())
        }
        Command::Gen { what: GenCommand::W1 { rows, out, seed, duplicate_rate } } => {
            let started = std::time::Instant::now();
            let bytes = bench::write_w1(&out, rows, seed, duplicate_rate)?;
            eprintln!(
                "wrote {rows} events ({:.1} MB, {:.0} bytes/event) to {} in {:.1}s",
                bytes as f64 / 1e6,
                bytes as f64 / rows.max(1) as f64,
                out.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Bench { what } => bench::run(what).await,
        Command::Cluster(c) => cluster::dispatch(c).await,
    }
}

fn parse_pairs(pairs: &[String], what: &str) -> Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.to_string()))
                .ok_or_else(|| anyhow!("{what} '{p}' must be written KEY=VALUE"))
        })
        .collect()
}

/// Plans a pipeline file, reporting errors as `file:line:column: message`.
async fn plan_file(args: &PlanArgs) -> Result<Pipeline> {
    let text = std::fs::read_to_string(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let vars: BTreeMap<String, String> = parse_pairs(&args.vars, "--var")?.into_iter().collect();
    let mut planner = Planner::new(registry().catalog()).with_variables(Variables::new(vars, true));
    for (k, v) in parse_pairs(&args.settings, "--set")? {
        planner = planner.with_setting(k, v);
    }
    if let Some(p) = args.parallelism {
        planner = planner.with_setting("parallelism", p.to_string());
    }
    let pipeline = planner.plan(&text).await.map_err(|e| {
        let sep = if e.location.is_some() { ":" } else { ": " };
        anyhow!("{}{sep}{e}", args.file.display())
    })?;
    for w in &pipeline.warnings {
        eprintln!("warning: {}: {w}", args.file.display());
    }
    Ok(pipeline)
}

/// `--serve`: where the run's API listens and keeps its record.
struct Serve {
    addr: String,
    state_file: Option<PathBuf>,
    checkpoint_url: String,
}

async fn run(
    pipeline: &Pipeline,
    checkpoints: Option<nagare_engine::CheckpointOptions>,
    metrics_addr: Option<String>,
    serve: Option<Serve>,
    quiet: bool,
    file: &Path,
) -> Result<JobSummary> {
    let options = JobOptions { checkpoints, ..JobOptions::default() };
    let job =
        nagare_engine::start(pipeline, registry(), options).await.map_err(|e| anyhow!("{}: {e}", file.display()))?;
    let metrics = job.metrics();
    let checkpoint_stats = job.checkpoint_stats();
    if let Some(id) = checkpoint_stats.lock().ok().and_then(|s| s.restored_from) {
        eprintln!("resuming from checkpoint {id}");
    }
    let stop = job.stop_token();
    if let Some(addr) = metrics_addr {
        let (metrics, job) = (metrics.clone(), file.display().to_string());
        progress::serve_metrics(&addr, move || metrics.prometheus(&job)).await?;
    }
    let ctrl_c = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\nstopping (Ctrl-C again to abort)...");
            ctrl_c.cancel();
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("aborted");
                std::process::exit(130);
            }
        }
    });
    let handles =
        local_api::RunHandles { metrics: metrics.clone(), checkpoints: checkpoint_stats.clone(), stop: stop.clone() };
    let api = match &serve {
        Some(s) => {
            let state = s.state_file.as_deref();
            Some(local_api::start(&s.addr, state, pipeline, file, &s.checkpoint_url, handles.clone()).await?)
        }
        None => None,
    };
    let ticker = (!quiet).then(|| progress::spawn_progress(metrics.clone(), checkpoint_stats.clone()));
    let result = job.wait().await.map_err(|e| e.to_string());
    if let Some(t) = ticker {
        t.abort();
        progress::clear_line();
    }
    if let Some(api) = api {
        api.finish(&handles, &result).await;
    }
    let summary = result.map_err(|e| anyhow!("{e}"))?;
    progress::print_summary(&summary, &metrics, pipeline.settings.late_rows);
    Ok(summary)
}

fn write_stats(path: &Path, s: &JobSummary) -> Result<()> {
    let json = serde_json::json!({
        "checkpoints_completed": s.checkpoints.completed,
        "checkpoints_aborted": s.checkpoints.aborted,
        "elapsed_s": s.elapsed.as_secs_f64(),
        "rows_read": s.rows_read,
        "rows_written": s.rows_written,
        "duplicates": s.duplicates,
        "late_rows": s.late_rows,
        "bad_records": s.bad_records,
        "peak_rss_bytes": bench::peak_rss_bytes(),
    });
    std::fs::write(path, json.to_string()).with_context(|| format!("writing {}", path.display()))
}

async fn list_checkpoints(pipeline: &Pipeline, dir: &str) -> Result<()> {
    let store = nagare_engine::checkpoint::store::CheckpointStore::open(dir)?;
    let current = nagare_engine::job::fingerprints(pipeline);
    let labels: std::collections::BTreeMap<usize, String> =
        pipeline.graph.nodes.iter().map(|n| (n.id, n.label.clone())).collect();
    let all = store.completed().await?;
    if all.is_empty() {
        println!("no checkpoints in {}", store.url());
        return Ok(());
    }
    println!(
        "{:>6}  {:<24} {:>10} {:>10} {:>12} {:>12}  status",
        "id", "completed (UTC)", "duration", "alignment", "size", "written"
    );
    for c in all {
        match c {
            Ok(m) => {
                let when = chrono::DateTime::from_timestamp_millis(m.completed_ms)
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
                    .unwrap_or_default();
                let problems = nagare_core::checkpoint::incompatibilities(&m, &current, &labels);
                let status = match (problems.is_empty(), m.final_checkpoint) {
                    (true, true) => "complete (final: the job ended here)".to_string(),
                    (true, false) => "complete".to_string(),
                    (false, _) => format!("complete, but does not match this pipeline: {}", problems.join("; ")),
                };
                println!(
                    "{:>6}  {:<24} {:>9}ms {:>8.1}ms {:>12} {:>12}  {status}",
                    m.id,
                    when,
                    m.completed_ms - m.triggered_ms,
                    m.alignment_us as f64 / 1000.0,
                    format!("{} B", m.bytes),
                    format!("{} B", m.bytes_written)
                );
            }
            Err((id, reason)) => {
                println!("{id:>6}  {:<24} {:>10} {:>10} {:>12} {:>12}  not usable: {reason}", "-", "-", "-", "-", "-")
            }
        }
    }
    Ok(())
}

fn print_connectors() {
    for c in registry().iter() {
        println!("{}: {}", c.name(), c.description());
        for role in [nagare_sql::TableRole::Source, nagare_sql::TableRole::Sink] {
            let Some(opts) = c.options(role) else { continue };
            println!("  as a {role}:");
            for o in opts {
                let req = if o.required {
                    " (required)".to_string()
                } else {
                    o.default.map(|d| format!(" (default '{d}')")).unwrap_or_default()
                };
                let secret = if o.secret { " (secret: '${VAR}' read where it is used)" } else { "" };
                println!("    {:<18} {}{req}{secret}: {}", o.name, o.kind, o.doc);
            }
        }
        println!();
    }
    println!("pipeline settings (SET key = 'value'; or --set key=value):");
    for (name, kind, doc) in nagare_sql::planner::SETTINGS {
        println!("    {name:<18} {kind}: {doc}");
    }
}
