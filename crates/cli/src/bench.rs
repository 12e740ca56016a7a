//! `nagare bench`: fixed workloads run through nagare and through a baseline in the same run, each in its own
//! process (so peak memory is measured per run), with the figures printed as ratios.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use arrow::datatypes::{DataType, Field, Fields, Schema, TimeUnit};
use clap::Subcommand;
use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::datasource::file_format::options::JsonReadOptions;
use datafusion::prelude::{SessionConfig, SessionContext};
use nagare_connectors::generator::{EventStream, w1_config};

/// The W1 pipeline, with `${INPUT}` and `${OUTPUT}` for paths.
pub const W1_SQL: &str = include_str!("../../../sql/bench/w1.sql");

/// The same job for DuckDB (optional reference, `--duckdb`).
const W1_DUCKDB: &str = include_str!("../../../sql/bench/w1_duckdb.py");

/// The same job as a DataFusion batch query.
const W1_BATCH_SQL: &str = r#"
SELECT id, "detail-type", time,
       detail['tenant_id'] AS tenant_id, detail['document_id'] AS document_id,
       detail['amount'] AS amount, detail['currency'] AS currency, detail['status'] AS status
FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events)
WHERE rn = 1"#;

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// W1: keep the first event per id, project, write Parquet; nagare streaming vs DataFusion batch.
    W1 {
        /// Input events (generated once per size and kept in --dir).
        #[arg(long, default_value_t = 2_200_000)]
        rows: u64,
        /// Working directory for input and outputs.
        #[arg(long, default_value = "target/bench-w1")]
        dir: PathBuf,
        /// Threads for both engines (default: CPU cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Repetitions of each run; the best time counts.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Also run the job in DuckDB (python3 with `pip install duckdb==2.0.0`).
        #[arg(long)]
        duckdb: bool,
        /// Also run it with checkpoints at these intervals (e.g. 10s,1s) to measure their overhead.
        #[arg(long, value_delimiter = ',')]
        checkpoint_intervals: Vec<String>,
    },
    /// JSON decoding alone: W1's events into the columns its query reads, projected decoder vs arrow-json.
    Json {
        /// Input events (generated once per size and kept in --dir).
        #[arg(long, default_value_t = 2_200_000)]
        rows: u64,
        /// Working directory for the input.
        #[arg(long, default_value = "target/bench-w1")]
        dir: PathBuf,
        /// Repetitions of each decoder, alternating; the best time counts.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
    },
    /// Checkpoint state: a dedup holding --keys keys is snapshotted to Parquet and restored; compared with
    /// writing and reading the same keys as a plain Parquet file. Then --new-keys more arrive and an incremental
    /// snapshot stores only those.
    State {
        /// Keys in the dedup's state.
        #[arg(long, default_value_t = 10_000_000)]
        keys: usize,
        /// Keys added after the full snapshot, before the incremental one.
        #[arg(long, default_value_t = 100_000)]
        new_keys: usize,
        /// Working directory (the checkpoint store).
        #[arg(long, default_value = "target/bench-state")]
        dir: PathBuf,
    },
    /// Window checkpoint state: a TUMBLE COUNT/SUM aggregate holding --keys keys in each of --windows open windows
    /// takes --checkpoints checkpoints, each after --touched rows (random keys, random windows). Each checkpoint is
    /// taken incrementally (base, then deltas) and, by a second operator fed the same rows, whole (every open window,
    /// as before chains); then both are restored and their windows compared.
    WindowState {
        /// Keys in each window.
        #[arg(long, default_value_t = 100_000)]
        keys: usize,
        /// Open windows.
        #[arg(long, default_value_t = 10)]
        windows: usize,
        /// Rows between checkpoints.
        #[arg(long, default_value_t = 10_000)]
        touched: usize,
        /// Checkpoints after the first.
        #[arg(long, default_value_t = 10)]
        checkpoints: usize,
        /// Working directory (the checkpoint store).
        #[arg(long, default_value = "target/bench-window-state")]
        dir: PathBuf,
    },
    /// W1 into BigQuery (`append`, exactly once, checkpoints) vs the same job into the Parquet sink, in the same run;
    /// the sinks' own CPU per row is measured against a run whose sink receives nothing.
    Bigquery {
        /// Input events.
        #[arg(long, default_value_t = 500_000)]
        rows: u64,
        /// Working directory.
        #[arg(long, default_value = "target/bench-bq")]
        dir: PathBuf,
        #[command(flatten)]
        bq: BqTarget,
        /// Sink and pipeline parallelism.
        #[arg(long, default_value_t = 2)]
        parallelism: usize,
        /// Checkpoint interval of every run.
        #[arg(long, default_value = "10s")]
        checkpoint_interval: String,
        /// Instead: commit→visible and source→visible latency of `commit = 'per_subtask'` and `'atomic'` side by
        /// side, at checkpoint intervals of 1 s, 2 s and 10 s (generated rows carrying their creation time; the
        /// table polled with `jobs.query`).
        #[arg(long)]
        latency: bool,
        /// Latency runs: seconds of input per run.
        #[arg(long, default_value_t = 30)]
        latency_seconds: u64,
        /// Latency runs: rows per second.
        #[arg(long, default_value_t = 500)]
        latency_rate: u64,
    },
    /// The sqs source: decoding EventBridge bodies into Arrow vs the filesystem JSON source on the same events; then
    /// end to end against an SQS server (moto) into BigQuery, events/s at parallelism 1 and 4 and send→visible
    /// latency, each against the SQS server alone with the same receive pattern.
    Sqs(crate::bench_sqs::SqsArgs),
    /// Shuffle-heavy W1 (dedup by id, then a per-tenant window) in one process, in one worker process and split
    /// over two worker processes exchanging rows over Arrow Flight; then the exchange alone vs the in-process
    /// channel, in MB/s.
    Cluster {
        /// Input events.
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        /// Working directory.
        #[arg(long, default_value = "target/bench-cluster")]
        dir: PathBuf,
        /// Job parallelism (slots), split evenly over the worker processes.
        #[arg(long, default_value_t = 2)]
        parallelism: u32,
        /// Megabytes of decoded batches pushed through each channel in the exchange-alone measurement.
        #[arg(long, default_value_t = 2000)]
        exchange_mb: usize,
    },
    /// One part of a job split over processes (run by `bench cluster`, one process per worker).
    #[command(hide = true)]
    Part {
        #[arg(long)]
        sql: PathBuf,
        #[arg(long = "var")]
        vars: Vec<String>,
        #[arg(long)]
        parallelism: u32,
        #[arg(long)]
        part: usize,
        #[arg(long, value_delimiter = ',')]
        peers: Vec<String>,
        #[arg(long, value_delimiter = ',')]
        slot_parts: Vec<usize>,
        #[arg(long)]
        threads: usize,
        #[arg(long)]
        stats_json: PathBuf,
    },
    /// The DataFusion batch baseline of W1 (run by `bench w1` as a child process).
    #[command(hide = true)]
    W1Batch {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        #[arg(long)]
        threads: usize,
        #[arg(long)]
        stats_json: PathBuf,
    },
}

/// Peak resident memory of this process (VmHWM), in bytes.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The benchmark's working directory (created, absolute) and its W1 input of `rows` events, generated once per
/// size and kept there.
pub(crate) fn w1_input(dir: &Path, rows: u64) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let input = dir.join(format!("w1-{rows}.jsonl"));
    if !input.exists() {
        eprintln!("generating {} ...", input.display());
        write_w1(&input, rows, 42, 0.1)?;
    }
    Ok((dir, input))
}

/// Writes `rows` W1 events to `out` (gzip or zstd by extension); returns bytes written before compression.
pub fn write_w1(out: &Path, rows: u64, seed: u64, duplicate_rate: f64) -> Result<u64> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = out.with_extension("partial");
    let file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let name = out.to_string_lossy().to_string();
    let mut w: Box<dyn Write> = if name.ends_with(".gz") {
        Box::new(flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::fast()))
    } else if name.ends_with(".zst") {
        Box::new(zstd::stream::write::Encoder::new(std::io::BufWriter::new(file), 3)?.auto_finish())
    } else {
        Box::new(std::io::BufWriter::with_capacity(1 << 20, file))
    };
    let mut stream = EventStream::new(w1_config(seed, duplicate_rate), 0, 1);
    let mut buf = String::with_capacity(1 << 20);
    let mut bytes = 0u64;
    for i in 0..rows {
        stream.next_line(&mut buf);
        if buf.len() > (1 << 20) - 1024 || i + 1 == rows {
            bytes += buf.len() as u64;
            w.write_all(buf.as_bytes())?;
            buf.clear();
        }
    }
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, out)?;
    Ok(bytes)
}

pub(crate) fn w1_schema() -> Arc<Schema> {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("version", DataType::Utf8, true),
        Field::new("id", DataType::Utf8, true),
        Field::new("detail-type", DataType::Utf8, true),
        Field::new("source", DataType::Utf8, true),
        Field::new("account", DataType::Utf8, true),
        Field::new("time", ts, true),
        Field::new("region", DataType::Utf8, true),
        Field::new("resources", DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))), true),
        Field::new(
            "detail",
            DataType::Struct(Fields::from(vec![
                Field::new("tenant_id", DataType::Int64, true),
                Field::new("document_id", DataType::Utf8, true),
                Field::new("amount", DataType::Float64, true),
                Field::new("currency", DataType::Utf8, true),
                Field::new("status", DataType::Utf8, true),
            ])),
            true,
        ),
    ]))
}

async fn w1_batch(input: &Path, output: &Path, threads: usize) -> Result<()> {
    let config = SessionConfig::new().with_target_partitions(threads.max(1));
    let ctx = SessionContext::new_with_config(config);
    let schema = w1_schema();
    let ext = input.extension().and_then(|e| e.to_str()).map(|e| format!(".{e}")).unwrap_or_default();
    let opts = JsonReadOptions::default().schema(&schema).file_extension(&ext);
    ctx.register_json("events", input.to_string_lossy().as_ref(), opts).await?;
    let df = ctx.sql(W1_BATCH_SQL).await?;
    let mut parquet = datafusion::config::TableParquetOptions::default();
    parquet.global.compression = Some("snappy".into());
    df.write_parquet(&format!("{}/", output.display()), DataFrameWriteOptions::new(), Some(parquet)).await?;
    Ok(())
}

struct Measured {
    label: String,
    seconds: f64,
    peak_rss: u64,
    rows_out: u64,
    checkpoints: u64,
}

fn run_child(label: &str, args: &[String], stats: &Path, output: &Path, repeat: usize) -> Result<Measured> {
    let exe = std::env::current_exe().context("locating the nagare binary")?;
    run_program(&exe, label, args, stats, output, repeat)
}

fn run_program(
    exe: &Path,
    label: &str,
    args: &[String],
    stats: &Path,
    output: &Path,
    repeat: usize,
) -> Result<Measured> {
    let mut best: Option<Measured> = None;
    for _ in 0..repeat.max(1) {
        let _ = std::fs::remove_dir_all(output);
        std::fs::create_dir_all(output)?;
        let started = Instant::now();
        let status = Command::new(exe).args(args).status().with_context(|| format!("running {label}"))?;
        let seconds = started.elapsed().as_secs_f64();
        if !status.success() {
            bail!("{label} failed ({status})");
        }
        let stats: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(stats)?)?;
        let peak_rss = stats["peak_rss_bytes"].as_u64().unwrap_or(0);
        let checkpoints = stats["checkpoints_completed"].as_u64().unwrap_or(0);
        let rows_out = parquet_rows(output)?;
        if best.as_ref().is_none_or(|b| seconds < b.seconds) {
            best = Some(Measured { label: label.to_string(), seconds, peak_rss, rows_out, checkpoints });
        }
    }
    best.context("no run")
}

/// Rows in all Parquet files under `dir` (from their footers).
pub(crate) fn parquet_rows(dir: &Path) -> Result<u64> {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let p = entry?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "parquet") {
                let f = std::fs::File::open(&p)?;
                let reader = parquet::file::reader::SerializedFileReader::new(f)?;
                use parquet::file::reader::FileReader;
                total += reader.metadata().file_metadata().num_rows() as u64;
            }
        }
    }
    Ok(total)
}

/// The dedup of W1 (keep the first event per id, TTL 10 minutes) holding `keys` keys.
fn dedup_with_keys(keys: usize) -> Result<(nagare_engine::operators::dedup::DedupOperator, Arc<Schema>)> {
    use datafusion::physical_expr::expressions::Column;
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let input = Arc::new(Schema::new(vec![Field::new("id", DataType::Utf8, true), Field::new("time", ts, true)]));
    let mut out_fields = input.fields().to_vec();
    out_fields.push(Arc::new(Field::new("rn", DataType::UInt64, false)));
    let output = Arc::new(Schema::new(out_fields));
    let spec = nagare_sql::DedupSpec {
        keys: vec![Arc::new(Column::new("id", 0))],
        key_names: vec!["id".into()],
        time_column: 1,
        keep: nagare_sql::Keep::First,
        scope: nagare_sql::DedupScope::Ttl { ttl_us: 600_000_000 },
    };
    let ctx = whole_range_context("dedup");
    let mut op = nagare_engine::operators::dedup::DedupOperator::new(&spec, input.clone(), output, ctx.clone())?;
    add_keys(&mut op, &input, 0..keys)?;
    Ok((op, input))
}

/// Feeds keys `range` (distinct ids, all within the TTL) through the dedup.
fn add_keys(
    op: &mut nagare_engine::operators::dedup::DedupOperator,
    input: &Arc<Schema>,
    range: std::ops::Range<usize>,
) -> Result<()> {
    use nagare_engine::operator::Operator;
    let mut out = Vec::new();
    let base = 1_767_225_600_000_000i64;
    let chunk = 100_000;
    for start in range.clone().step_by(chunk) {
        let n = chunk.min(range.end - start);
        let ids = arrow::array::StringArray::from_iter_values(
            (start..start + n).map(|i| format!("{:016x}-{i:020}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15))),
        );
        // All within the TTL: every key stays in the state.
        let times = arrow::array::TimestampMicrosecondArray::from(vec![base + start as i64; n]).with_timezone("UTC");
        let batch = arrow::record_batch::RecordBatch::try_new(input.clone(), vec![Arc::new(ids), Arc::new(times)])?;
        op.process(batch, &mut out)?;
        op.on_watermark(base + start as i64, &mut out)?;
        out.clear();
    }
    Ok(())
}

/// Encodes and writes snapshot parts as checkpoint `id` would; returns the files and bytes.
async fn write_parts(
    store: &nagare_engine::checkpoint::store::CheckpointStore,
    id: u64,
    parts: &[nagare_engine::operator::StatePart],
) -> Result<(Vec<nagare_core::checkpoint::StateFile>, u64)> {
    use nagare_engine::checkpoint::store::CheckpointStore;
    let mut files = Vec::new();
    let mut bytes = 0u64;
    for p in parts {
        let encoded = CheckpointStore::encode(&p.batch)?;
        bytes += encoded.len() as u64;
        let path = CheckpointStore::shared_path(id, 1, 0, &p.name);
        store.put(&path, encoded.clone()).await?;
        files.push(nagare_core::checkpoint::StateFile {
            path,
            part: p.name.clone(),
            bytes: encoded.len() as u64,
            rows: p.batch.num_rows() as u64,
            checkpoint: id,
        });
    }
    Ok((files, bytes))
}

async fn bench_state(keys: usize, new_keys: usize, dir: &Path) -> Result<()> {
    use nagare_engine::checkpoint::store::CheckpointStore;
    use nagare_engine::operator::Operator;
    let _ = std::fs::remove_dir_all(dir);
    let store = CheckpointStore::open(&dir.to_string_lossy())?;
    let t = Instant::now();
    let (mut op, _) = dedup_with_keys(keys)?;
    let fill = t.elapsed();
    println!(
        "dedup state: {} keys (filled in {:.2}s), peak RSS so far {:.0} MB",
        op.state_entries(),
        fill.as_secs_f64(),
        peak_rss_bytes() as f64 / 1e6
    );

    // Snapshot: the synchronous part (on the task) and the background part (encode + write).
    let t = Instant::now();
    let parts = op.snapshot(false)?;
    let snapshot = t.elapsed();
    anyhow::ensure!(parts.iter().any(|p| p.kind == nagare_engine::operator::PartKind::Base), "not a full snapshot");
    let t = Instant::now();
    let (files, bytes) = write_parts(&store, 1, &parts).await?;
    let upload = t.elapsed();

    // Restore into a fresh operator.
    let t = Instant::now();
    let restored_parts = store.read_parts(&files).await?;
    let read = t.elapsed();
    let t = Instant::now();
    let (mut fresh, _) = dedup_with_keys(0)?;
    fresh.restore(restored_parts)?;
    let rebuild = t.elapsed();
    anyhow::ensure!(fresh.state_entries() == keys, "restored {} of {keys} keys", fresh.state_entries());
    drop(fresh);

    // Incremental: new keys arrive, the next snapshot stores only them; a restore reads base + delta.
    let (_, input) = dedup_with_keys(0)?;
    add_keys(&mut op, &input, keys..keys + new_keys)?;
    let t = Instant::now();
    let delta_parts = op.snapshot(false)?;
    let delta_snapshot = t.elapsed();
    let delta_kind = delta_parts.iter().find(|p| p.name == "groups").map(|p| p.kind);
    anyhow::ensure!(delta_kind == Some(nagare_engine::operator::PartKind::Delta), "not incremental: {delta_kind:?}");
    let t = Instant::now();
    let (delta_files, delta_bytes) = write_parts(&store, 2, &delta_parts).await?;
    let delta_upload = t.elapsed();
    let chain: Vec<_> = files.iter().filter(|f| f.part == "groups").chain(&delta_files).cloned().collect();
    let t = Instant::now();
    let (mut fresh, _) = dedup_with_keys(0)?;
    fresh.restore(store.read_parts(&chain).await?)?;
    let chain_restore = t.elapsed();
    anyhow::ensure!(
        fresh.state_entries() == keys + new_keys,
        "restored {} of {} keys from base + delta",
        fresh.state_entries(),
        keys + new_keys
    );
    drop(fresh);

    // Baseline: the same keys written and read as a plain one-column Parquet file.
    let groups = &parts.iter().find(|p| p.name == "groups").context("no groups part")?.batch;
    let key_only = arrow::record_batch::RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new("key", DataType::Binary, false)])),
        vec![groups.column(0).clone()],
    )?;
    let t = Instant::now();
    let encoded = CheckpointStore::encode(&key_only)?;
    let baseline_bytes = encoded.len();
    std::fs::write(dir.join("baseline.parquet"), &encoded)?;
    let baseline_write = t.elapsed();
    let t = Instant::now();
    let data = bytes::Bytes::from(std::fs::read(dir.join("baseline.parquet"))?);
    let n: usize = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(data)?
        .build()?
        .map(|b| b.map(|b| b.num_rows()))
        .sum::<Result<usize, _>>()?;
    anyhow::ensure!(n == keys);
    let baseline_read = t.elapsed();

    let write = snapshot + upload;
    let restore = read + rebuild;
    println!("{:<58} {:>9} {:>12}", "step", "seconds", "MB");
    println!(
        "{:<58} {:>9.2} {:>12}",
        "snapshot: state to Arrow (on the task, blocks processing)",
        snapshot.as_secs_f64(),
        ""
    );
    println!(
        "{:<58} {:>9.2} {:>12.1}",
        "snapshot: encode Parquet + write (background)",
        upload.as_secs_f64(),
        bytes as f64 / 1e6
    );
    println!("{:<58} {:>9.2} {:>12}", "restore: read Parquet", read.as_secs_f64(), "");
    println!("{:<58} {:>9.2} {:>12}", "restore: rebuild the hash table", rebuild.as_secs_f64(), "");
    println!(
        "{:<58} {:>9.2} {:>12.1}",
        "baseline: write the keys as plain Parquet",
        baseline_write.as_secs_f64(),
        baseline_bytes as f64 / 1e6
    );
    println!("{:<58} {:>9.2} {:>12}", "baseline: read them back", baseline_read.as_secs_f64(), "");
    println!(
        "{:<58} {:>9.2} {:>12}",
        format!("incremental: {new_keys} new keys to Arrow (on the task)"),
        delta_snapshot.as_secs_f64(),
        ""
    );
    println!(
        "{:<58} {:>9.2} {:>12.1}",
        "incremental: encode Parquet + write (background)",
        delta_upload.as_secs_f64(),
        delta_bytes as f64 / 1e6
    );
    println!("{:<58} {:>9.2} {:>12}", "incremental: restore base + delta", chain_restore.as_secs_f64(), "");
    println!(
        "incremental snapshot after {new_keys} new keys: {:.2}s, {:.1} MB ({:.1}% of a full snapshot's time)",
        (delta_snapshot + delta_upload).as_secs_f64(),
        delta_bytes as f64 / 1e6,
        100.0 * (delta_snapshot + delta_upload).as_secs_f64() / write.as_secs_f64()
    );
    println!(
        "{keys} keys: write {:.2}s ({:.2}x baseline), restore {:.2}s ({:.2}x baseline), {:.1} MB on disk ({:.1} bytes/key); peak RSS {:.0} MB",
        write.as_secs_f64(),
        write.as_secs_f64() / baseline_write.as_secs_f64(),
        restore.as_secs_f64(),
        restore.as_secs_f64() / baseline_read.as_secs_f64(),
        bytes as f64 / 1e6,
        bytes as f64 / keys as f64,
        peak_rss_bytes() as f64 / 1e6
    );
    Ok(())
}

/// A TUMBLE (1 minute) COUNT(v), SUM(v) by k over (k Int64, t timestamp, v Int64), on all key groups.
fn tumble_count_sum() -> Result<(nagare_engine::operators::window::WindowAggregateOperator, Arc<Schema>)> {
    use datafusion::common::DFSchema;
    use datafusion::functions_aggregate::expr_fn::{count, sum};
    use datafusion::logical_expr::col;
    use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
    use datafusion::physical_expr::aggregate::LoweredAggregateBuilder;
    use datafusion::physical_expr::execution_props::ExecutionProps;
    use datafusion::physical_expr::expressions::Column;
    let ts = DataType::Timestamp(TimeUnit::Microsecond, None);
    let input = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, true),
        Field::new("t", ts.clone(), true),
        Field::new("v", DataType::Int64, true),
    ]));
    let df = DFSchema::try_from(input.as_ref().clone())?;
    let mut aggregates = Vec::new();
    for e in [count(col("v")), sum(col("v"))] {
        let lowered =
            LoweredAggregateBuilder::new(&e, &df, &input, &ExecutionProps::new(), &PhysicalPlanningContext::default())
                .build()?;
        aggregates.push(nagare_sql::AggregateSpec { expr: lowered.aggregate, filter: None });
    }
    let spec = nagare_sql::WindowAggregateSpec {
        window: nagare_sql::window::WindowKind::Tumble { size_us: 60_000_000 },
        time_column: 1,
        window_position: 1,
        keys: vec![Arc::new(Column::new("k", 0))],
        aggregates,
        input_schema: input.clone(),
    };
    let out = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, true),
        Field::new("w", nagare_sql::window::window_struct_type(&ts), true),
        Field::new("n", DataType::Int64, false),
        Field::new("s", DataType::Int64, true),
    ]));
    let ctx = whole_range_context("window");
    Ok((nagare_engine::operators::window::WindowAggregateOperator::new(&spec, out, ctx)?, input))
}

/// Every emitted window row as (key, window start, count, sum), sorted.
fn window_rows(out: &[arrow::record_batch::RecordBatch]) -> Vec<(i64, i64, i64, i64)> {
    use arrow::array::AsArray;
    use arrow::datatypes::{Int64Type, TimestampMicrosecondType};
    let mut rows = Vec::new();
    for b in out {
        let k = b.column(0).as_primitive::<Int64Type>();
        let start = b.column(1).as_struct().column(0).as_primitive::<TimestampMicrosecondType>();
        let (n, s) = (b.column(2).as_primitive::<Int64Type>(), b.column(3).as_primitive::<Int64Type>());
        for i in 0..b.num_rows() {
            rows.push((k.value(i), start.value(i), n.value(i), s.value(i)));
        }
    }
    rows.sort_unstable();
    rows
}

async fn bench_window_state(keys: usize, windows: usize, touched: usize, checkpoints: usize, dir: &Path) -> Result<()> {
    use nagare_engine::checkpoint::store::CheckpointStore;
    use nagare_engine::operator::{Operator, PartKind};
    let _ = std::fs::remove_dir_all(dir);
    let store = CheckpointStore::open(&dir.to_string_lossy())?;
    let (mut incremental, input) = tumble_count_sum()?;
    let (mut whole, _) = tumble_count_sum()?;
    let minute = 60_000_000i64;
    let batch = |rows: &[(i64, i64, i64)]| -> Result<arrow::record_batch::RecordBatch> {
        Ok(arrow::record_batch::RecordBatch::try_new(
            input.clone(),
            vec![
                Arc::new(arrow::array::Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(arrow::array::TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(arrow::array::Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
            ],
        )?)
    };
    let mut out = Vec::new();
    let t = Instant::now();
    for w in 0..windows {
        for start in (0..keys).step_by(100_000) {
            let rows: Vec<_> = (start..keys.min(start + 100_000)).map(|k| (k as i64, w as i64 * minute, 1)).collect();
            let b = batch(&rows)?;
            incremental.process(b.clone(), &mut out)?;
            whole.process(b, &mut out)?;
        }
    }
    println!(
        "window state: {} windows x {keys} keys = {} groups (filled in {:.2}s)",
        windows,
        whole.state_entries(),
        t.elapsed().as_secs_f64()
    );
    // (time to Arrow, time to encode + write, bytes) per checkpoint, incremental and whole.
    let mut inc = Vec::new();
    let mut full = Vec::new();
    let mut files = Vec::new();
    let mut whole_files = Vec::new();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as i64
    };
    for id in 1..=checkpoints as u64 + 1 {
        if id > 1 {
            let rows: Vec<_> =
                (0..touched).map(|_| (next(keys), next(windows) * minute + next(60) * 1_000_000, 1)).collect();
            let b = batch(&rows)?;
            incremental.process(b.clone(), &mut out)?;
            whole.process(b, &mut out)?;
        }
        for (op, force, times, files) in
            [(&mut incremental, false, &mut inc, &mut files), (&mut whole, true, &mut full, &mut whole_files)]
        {
            let t = Instant::now();
            let parts = op.snapshot(force)?;
            let to_arrow = t.elapsed();
            let kind = parts.iter().find(|p| p.name == "windows").map(|p| p.kind);
            let expected = if force || id == 1 { PartKind::Base } else { PartKind::Delta };
            anyhow::ensure!(kind == Some(expected), "checkpoint {id}: {kind:?}, not {expected:?}");
            let t = Instant::now();
            let (written, bytes) = write_parts(&store, id + if force { 1_000 } else { 0 }, &parts).await?;
            let upload = t.elapsed();
            if id > 1 {
                times.push((to_arrow, upload, bytes));
            }
            // What a restore reads: the chain (base and deltas) and the last meta; or the last whole snapshot.
            if force {
                *files = written;
            } else {
                files.retain(|f: &nagare_core::checkpoint::StateFile| f.part == "windows");
                files.extend(written);
            }
        }
    }
    let mean = |v: &[(Duration, Duration, u64)]| {
        let n = v.len().max(1) as f64;
        (
            v.iter().map(|x| x.0.as_secs_f64()).sum::<f64>() / n,
            v.iter().map(|x| x.1.as_secs_f64()).sum::<f64>() / n,
            v.iter().map(|x| x.2 as f64).sum::<f64>() / n,
        )
    };
    let restore = |files: Vec<nagare_core::checkpoint::StateFile>| {
        let store = &store;
        async move {
            let t = Instant::now();
            let (mut op, _) = tumble_count_sum()?;
            op.restore(store.read_parts(&files).await?)?;
            let took = t.elapsed();
            let mut out = Vec::new();
            op.on_watermark(i64::MAX, &mut out)?;
            anyhow::Ok((took, window_rows(&out)))
        }
    };
    let (inc_restore, inc_rows) = restore(files).await?;
    let (full_restore, full_rows) = restore(whole_files).await?;
    anyhow::ensure!(inc_rows == full_rows, "the chain restored other windows than the whole snapshot");
    let (a, b) = (mean(&inc), mean(&full));
    println!("{:<44} {:>14} {:>16} {:>12}", "per checkpoint (mean)", "to Arrow (ms)", "encode+write (ms)", "MB");
    println!("{:<44} {:>14.1} {:>16.1} {:>12.2}", "whole (every open window)", b.0 * 1e3, b.1 * 1e3, b.2 / 1e6);
    println!("{:<44} {:>14.1} {:>16.1} {:>12.2}", "incremental (delta)", a.0 * 1e3, a.1 * 1e3, a.2 / 1e6);
    println!(
        "restore: whole {:.2}s, base + {} deltas {:.2}s; {} window rows, the same from both",
        full_restore.as_secs_f64(),
        checkpoints,
        inc_restore.as_secs_f64(),
        inc_rows.len()
    );
    Ok(())
}

/// CPU seconds (user + system) used by waited-for child processes so far (`cutime` + `cstime` of
/// /proc/self/stat, in USER_HZ = 100 ticks per second on Linux).
fn children_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // cutime and cstime are fields 16 and 17 (1-based); `rest` starts at field 3.
    (tick(13) + tick(14)) / 100.0
}

async fn bench_bigquery(rows: u64, dir: &Path, bq: &BqTarget, p: usize, interval: &str) -> Result<()> {
    let BqTarget { endpoint, rest_endpoint, project, credentials } = bq;
    let (dir, input) = w1_input(dir, rows)?;
    let dataset = "nagare_bench";
    let table = format!("w1_{}", std::process::id());
    let auth = nagare_bigquery::auth::Auth::from_option(credentials)?;
    let rest = nagare_bigquery::rest::RestClient::new(rest_endpoint, auth)?;
    rest.create_dataset(project, dataset).await?;
    let sink_line = "CREATE TABLE deduped WITH (connector = 'filesystem', path = '${OUTPUT}', format = 'parquet');";
    anyhow::ensure!(W1_SQL.contains(sink_line), "the W1 pipeline changed: update bench bigquery");
    let variants = [
        ("sink receives nothing (baseline CPU)", W1_SQL.replace("WHERE rn = 1;", "WHERE rn = 1 AND id = '';")),
        ("filesystem Parquet sink", W1_SQL.to_string()),
        (
            "bigquery sink, append (Storage Write API, exactly once)",
            W1_SQL.replace(
                sink_line,
                &format!(
                    "CREATE TABLE deduped WITH (connector = 'bigquery', project = '{project}', dataset = '{dataset}', \
                     table = '{table}', credentials = '{credentials}', endpoint = '{endpoint}', \
                     rest_endpoint = '{rest_endpoint}', create_table = 'if_not_exists');"
                ),
            ),
        ),
    ];
    let s = |p: &Path| p.to_string_lossy().to_string();
    let exe = std::env::current_exe().context("locating the nagare binary")?;
    let mut results = Vec::new();
    for (k, (label, sql)) in variants.iter().enumerate() {
        let sql_path = dir.join(format!("bq-{k}.sql"));
        std::fs::write(&sql_path, sql)?;
        let output = dir.join(format!("bq-out-{k}"));
        let ckpt = dir.join(format!("bq-ckpt-{k}"));
        let _ = std::fs::remove_dir_all(&output);
        let _ = std::fs::remove_dir_all(&ckpt);
        std::fs::create_dir_all(&output)?;
        let cpu_before = children_cpu_seconds();
        let started = Instant::now();
        let status = Command::new(&exe)
            .args(["run", &s(&sql_path), "--quiet", "--var", &format!("INPUT={}", s(&input))])
            .args(["--var", &format!("OUTPUT={}", s(&output)), "--parallelism", &p.to_string()])
            .args(["--threads", &p.to_string(), "--checkpoint-dir", &s(&ckpt), "--checkpoint-interval", interval])
            .status()?;
        let seconds = started.elapsed().as_secs_f64();
        let cpu = children_cpu_seconds() - cpu_before;
        anyhow::ensure!(status.success(), "{label} failed ({status})");
        results.push((*label, seconds, cpu, parquet_rows(&output)?));
    }
    let counted = rest.query(project, &format!("SELECT COUNT(*) FROM `{project}.{dataset}.{table}`"), None).await?;
    let bq_rows: u64 = counted
        .first()
        .and_then(|r| r.first())
        .and_then(|v| v.as_str())
        .and_then(|v| v.parse().ok())
        .context("counting the BigQuery table")?;
    let (base, parquet, bq) = (&results[0], &results[1], &results[2]);
    let out_rows = parquet.3;
    anyhow::ensure!(bq_rows == out_rows, "BigQuery holds {bq_rows} rows, the Parquet sink wrote {out_rows}");
    println!("W1 ({rows} events, {out_rows} after dedup), parallelism {p}, checkpoints every {interval}");
    println!("{:<58} {:>8} {:>12} {:>9} {:>16}", "run", "seconds", "rows out/s", "CPU s", "sink CPU µs/row");
    for (label, seconds, cpu, _) in &results {
        let sink_us = (cpu - base.2).max(0.0) / out_rows as f64 * 1e6;
        println!("{label:<58} {seconds:>8.2} {:>12.0} {cpu:>9.2} {sink_us:>16.2}", out_rows as f64 / seconds);
    }
    println!(
        "bigquery/parquet: {:.2}x the time; the bigquery sink's own CPU is {:.1}% of the pipeline's (nagare process \
         only, the emulator excluded); {bq_rows} rows in {project}.{dataset}.{table}",
        bq.1 / parquet.1,
        100.0 * (bq.2 - base.2).max(0.0) / bq.2
    );
    Ok(())
}

/// Where the BigQuery benchmarks write.
#[derive(Debug, clap::Args)]
pub struct BqTarget {
    /// Storage Write API endpoint (an emulator by default).
    #[arg(long, env = "BIGQUERY_GRPC_ENDPOINT", default_value = "http://127.0.0.1:19060")]
    pub endpoint: String,
    /// REST endpoint.
    #[arg(long, env = "BIGQUERY_REST_URL", default_value = "http://127.0.0.1:19050")]
    pub rest_endpoint: String,
    /// Project.
    #[arg(long, env = "BIGQUERY_PROJECT", default_value = "test-project")]
    pub project: String,
    /// `credentials` of the sink (`none` for an emulator).
    #[arg(long, default_value = "none")]
    pub credentials: String,
}

/// The `q` quantile (0..=1) of sorted values (nearest rank).
pub(crate) fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Microseconds since the Unix epoch, now.
pub(crate) fn unix_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// When the rows of a BigQuery table became visible, learnt by polling it with `jobs.query`: the latency benchmarks
/// share it so that their figures mean the same thing.
pub(crate) struct Visibility {
    query: String,
    /// Rows counted so far per bucket of the time column.
    counted: std::collections::HashMap<i64, u64>,
    /// (row's time, first seen), µs since the epoch; a row's time is its bucket's middle.
    seen: Vec<(i64, i64)>,
}

impl Visibility {
    /// Rows visible per 10 ms of the time column: a poll's answer stays small (a query answers at most 10,000 rows
    /// without paging) and a bucket's count going up by k is k rows becoming visible.
    const BUCKET_US: i64 = 10_000;

    /// Rows of `table` (`project.dataset.table`), those matching `filter` (a SQL condition) if given, by their
    /// TIMESTAMP `column`.
    pub(crate) fn new(table: &str, column: &str, filter: Option<&str>) -> Visibility {
        let b = Self::BUCKET_US;
        let filter = filter.map(|f| format!(" WHERE {f}")).unwrap_or_default();
        let query = format!("SELECT DIV(UNIX_MICROS({column}), {b}) AS b, COUNT(*) FROM `{table}`{filter} GROUP BY b");
        Visibility { query, counted: Default::default(), seen: Vec::new() }
    }

    /// Queries the table once; rows it counts for the first time are seen now. A failed query is left out (the
    /// next poll sees those rows).
    pub(crate) async fn poll(&mut self, rest: &nagare_bigquery::rest::RestClient, project: &str) {
        let Ok(rows) = rest.query(project, &self.query, None).await else { return };
        let now = unix_micros();
        let cell = |r: &Vec<serde_json::Value>, i: usize| r.get(i).and_then(|v| v.as_str()?.parse::<i64>().ok());
        for r in rows {
            let (Some(bucket), Some(n)) = (cell(&r, 0), cell(&r, 1)) else { continue };
            let had = self.counted.entry(bucket).or_insert(0);
            let n = n.max(0) as u64;
            for _ in *had..n {
                self.seen.push((bucket * Self::BUCKET_US + Self::BUCKET_US / 2, now));
            }
            *had = (*had).max(n);
        }
    }

    /// Rows seen so far.
    pub(crate) fn count(&self) -> u64 {
        self.seen.len() as u64
    }

    /// (row's time, first seen) of every row seen, µs since the epoch.
    pub(crate) fn seen(&self) -> &[(i64, i64)] {
        &self.seen
    }

    /// Time→visible of every row seen, in ms, sorted.
    pub(crate) fn latencies_ms(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.seen.iter().map(|(t, visible)| (visible - t) as f64 / 1e3).collect();
        v.sort_by(f64::total_cmp);
        v
    }
}

/// Times (µs since the epoch) of nagare's log lines containing `needle` (tracing's default format starts each line
/// with an RFC 3339 time, possibly inside ANSI colour codes).
fn log_times(log: &str, needle: &str) -> Vec<i64> {
    log.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| {
            // Drop ANSI escape sequences (ESC '[' ... 'm'), then read the first word.
            let mut plain = String::with_capacity(l.len());
            let mut chars = l.chars();
            while let Some(c) = chars.next() {
                if c == '\u{1b}' {
                    for e in chars.by_ref() {
                        if e == 'm' {
                            break;
                        }
                    }
                } else {
                    plain.push(c);
                }
            }
            let first = plain.split_whitespace().next()?;
            chrono::DateTime::parse_from_rfc3339(first).ok().map(|t| t.timestamp_micros())
        })
        .collect()
}

/// One latency run: a generator paced at `rate` rows/s for `seconds` into `table` with `commit = mode`, checkpoints
/// every `interval`; the table is polled until every row is seen. Returns (source→visible ms, commit→visible ms,
/// write streams created, checkpoints committed, rows never seen).
#[allow(clippy::too_many_arguments)]
async fn latency_run(
    dir: &Path,
    bq: &BqTarget,
    rest: &nagare_bigquery::rest::RestClient,
    p: usize,
    seconds: u64,
    rate: u64,
    interval: &str,
    mode: &str,
) -> Result<(Vec<f64>, Vec<f64>, usize, usize, u64)> {
    let BqTarget { endpoint, rest_endpoint, project, credentials } = bq;
    let dataset = "nagare_bench";
    let table = format!("latency_{mode}_{interval}_{}", std::process::id());
    let count = rate * seconds;
    let sql = format!(
        "CREATE TABLE events (id TEXT, time TIMESTAMP) WITH (connector = 'generator', count = '{count}', \
         rate = '{rate}');\n\
         CREATE TABLE bq (id TEXT NOT NULL, created TIMESTAMP) WITH (connector = 'bigquery', project = '{project}', \
         dataset = '{dataset}', table = '{table}', credentials = '{credentials}', endpoint = '{endpoint}', \
         rest_endpoint = '{rest_endpoint}', create_table = 'if_not_exists', commit = '{mode}');\n\
         INSERT INTO bq SELECT id, time FROM events;\n"
    );
    let sql_path = dir.join(format!("latency-{mode}-{interval}.sql"));
    std::fs::write(&sql_path, sql)?;
    let ckpt = dir.join(format!("latency-ckpt-{mode}-{interval}"));
    let _ = std::fs::remove_dir_all(&ckpt);
    let log_path = dir.join(format!("latency-{mode}-{interval}.log"));
    let s = |p: &Path| p.to_string_lossy().to_string();
    let exe = std::env::current_exe().context("locating the nagare binary")?;
    let started = Instant::now();
    let mut child = Command::new(&exe)
        .args(["run", &s(&sql_path), "--quiet", "--parallelism", &p.to_string(), "--threads", &p.to_string()])
        .args(["--checkpoint-dir", &s(&ckpt), "--checkpoint-interval", interval])
        .env("NAGARE_LOG", "warn,nagare_bigquery=debug")
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()?;
    let mut visibility = Visibility::new(&format!("{project}.{dataset}.{table}"), "created", None);
    let mut ran = None;
    loop {
        let status = child.try_wait()?;
        if let Some(st) = status {
            anyhow::ensure!(st.success(), "{mode} at {interval} failed ({st}); log: {}", log_path.display());
            ran.get_or_insert(started.elapsed().as_secs_f64());
        }
        visibility.poll(rest, project).await;
        if visibility.count() >= count {
            break;
        }
        let since_end = started.elapsed().as_secs_f64() - ran.unwrap_or(f64::INFINITY);
        // bqemulator reads FlushRows' offset as exclusive (Google: inclusive), so each BUFFERED stream's last
        // flushed row stays invisible there: per_subtask may fall short by one row per stream created.
        if mode == "per_subtask" && since_end > 3.0 {
            let log = std::fs::read_to_string(&log_path)?;
            let streams = log.lines().filter(|l| l.contains("created write stream")).count() as u64;
            if count.saturating_sub(visibility.count()) <= streams {
                break;
            }
        }
        if since_end > 30.0 {
            let seen = visibility.count();
            anyhow::bail!("{mode} at {interval}: {seen} of {count} rows visible 30 s after the job ended");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "{mode} at {interval} failed ({status}); log: {}", log_path.display());
    let log = std::fs::read_to_string(&log_path)?;
    let mut commits = log_times(&log, "committing a completed checkpoint's bigquery writes");
    commits.sort_unstable();
    let created = log.lines().filter(|l| l.contains("created write stream")).count();
    let source = visibility.latencies_ms();
    let mut commit = Vec::new();
    for (_, visible_us) in visibility.seen() {
        // The last commit that began before the row was seen is the one that made it visible.
        if let Some(c) = commits.iter().rev().find(|c| **c <= *visible_us) {
            commit.push((visible_us - c) as f64 / 1e3);
        }
    }
    commit.sort_by(f64::total_cmp);
    Ok((source, commit, created, commits.len(), count.saturating_sub(visibility.count())))
}

/// `nagare bench bigquery --latency`.
async fn bench_bigquery_latency(dir: &Path, bq: &BqTarget, p: usize, seconds: u64, rate: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let auth = nagare_bigquery::auth::Auth::from_option(&bq.credentials)?;
    let rest = nagare_bigquery::rest::RestClient::new(&bq.rest_endpoint, auth)?;
    rest.create_dataset(&bq.project, "nagare_bench").await?;
    println!(
        "latency: {rate} rows/s for {seconds} s per run, parallelism {p}; the table polled every 100 ms (a row's \
         visible time is when the first poll that returns it came back)"
    );
    println!(
        "{:<11} {:<12} {:>7} {:>7} {:>24} {:>24} {:>16}",
        "checkpoint", "commit", "rows", "unseen", "source→visible p50/p99", "commit→visible p50/p99", "streams/commits"
    );
    println!(
        "(unseen: rows never visible; on bqemulator per_subtask leaves one per stream, the last row its exclusive \
         FlushRows offset leaves out, and delays the last row of each flush by one checkpoint)"
    );
    for interval in ["1s", "2s", "10s"] {
        for mode in ["per_subtask", "atomic"] {
            let (source, commit, created, commits, unseen) =
                latency_run(dir, bq, &rest, p, seconds, rate, interval, mode).await?;
            let ms = |v: &[f64]| format!("{:.0} / {:.0} ms", quantile(v, 0.5), quantile(v, 0.99));
            println!(
                "{interval:<11} {mode:<12} {:>7} {unseen:>7} {:>24} {:>24} {:>16}",
                source.len(),
                ms(&source),
                ms(&commit),
                format!("{created}/{commits}")
            );
        }
    }
    Ok(())
}

/// Runs a benchmark command.
pub async fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Bigquery {
            rows,
            dir,
            bq,
            parallelism,
            checkpoint_interval,
            latency,
            latency_seconds,
            latency_rate,
        } => {
            if latency {
                return bench_bigquery_latency(&dir, &bq, parallelism, latency_seconds, latency_rate).await;
            }
            bench_bigquery(rows, &dir, &bq, parallelism, &checkpoint_interval).await
        }
        BenchCommand::Sqs(args) => crate::bench_sqs::bench_sqs(args).await,
        BenchCommand::Json { rows, dir, repeat } => crate::bench_json::bench_json(rows, &dir, repeat),
        BenchCommand::State { keys, new_keys, dir } => bench_state(keys, new_keys, &dir).await,
        BenchCommand::WindowState { keys, windows, touched, checkpoints, dir } => {
            bench_window_state(keys, windows, touched, checkpoints, &dir).await
        }
        BenchCommand::Cluster { rows, dir, parallelism, exchange_mb } => {
            crate::bench_cluster::bench_cluster(rows, &dir, parallelism, exchange_mb).await
        }
        BenchCommand::Part { sql, vars, parallelism, part, peers, slot_parts, threads: _, stats_json } => {
            let args = crate::bench_cluster::PartArgs { sql, vars, parallelism, part, peers, slot_parts, stats_json };
            crate::bench_cluster::run_part(args).await
        }
        BenchCommand::W1Batch { input, output, threads, stats_json } => {
            w1_batch(&input, &output, threads).await?;
            std::fs::write(&stats_json, serde_json::json!({"peak_rss_bytes": peak_rss_bytes()}).to_string())?;
            Ok(())
        }
        BenchCommand::W1 { rows, dir, threads, repeat, duckdb, checkpoint_intervals } => {
            let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
            let (dir, input) = w1_input(&dir, rows)?;
            let size = std::fs::metadata(&input)?.len();
            let sql = dir.join("w1.sql");
            std::fs::write(&sql, W1_SQL)?;
            let s = |p: &Path| p.to_string_lossy().to_string();
            let nagare = |label: &str,
                          p: usize,
                          out: &str,
                          interval: Option<&str>,
                          repeat: usize,
                          pinned: bool|
             -> Result<Measured> {
                let output = dir.join(out);
                let stats = dir.join(format!("{out}.json"));
                let mut args = vec![
                    "run".into(),
                    s(&sql),
                    "--quiet".into(),
                    "--var".into(),
                    format!("INPUT={}", s(&input)),
                    "--var".into(),
                    format!("OUTPUT={}", s(&output)),
                    "--parallelism".into(),
                    p.to_string(),
                    "--threads".into(),
                    p.to_string(),
                    "--stats-json".into(),
                    s(&stats),
                ];
                if let Some(i) = interval {
                    let ckpt = dir.join(format!("{out}-ckpt"));
                    let _ = std::fs::remove_dir_all(&ckpt);
                    args.extend(["--checkpoint-dir".into(), s(&ckpt), "--checkpoint-interval".into(), i.to_string()]);
                    // Each repetition starts over: the previous one's final checkpoint refers to output that
                    // the next repetition's clean output directory no longer has.
                    args.push("--from-scratch".into());
                }
                let exe = std::env::current_exe().context("locating the nagare binary")?;
                if pinned && Command::new("taskset").arg("--version").output().is_ok_and(|o| o.status.success()) {
                    let args: Vec<String> = ["-c".to_string(), "0".into(), s(&exe)].into_iter().chain(args).collect();
                    return run_program(Path::new("taskset"), label, &args, &stats, &output, repeat);
                }
                run_program(&exe, label, &args, &stats, &output, repeat)
            };
            let df_out = dir.join("out-datafusion");
            let df_stats = dir.join("out-datafusion.json");
            let df_args = vec![
                "bench".into(),
                "w1-batch".into(),
                "--input".into(),
                s(&input),
                "--output".into(),
                s(&df_out),
                "--threads".into(),
                threads.to_string(),
                "--stats-json".into(),
                s(&df_stats),
            ];
            println!(
                "W1: {rows} events, {:.0} MB of JSON lines ({:.0} bytes/event), {threads} threads",
                size as f64 / 1e6,
                size as f64 / rows as f64
            );
            let baseline = run_child(
                "DataFusion 55 batch (ROW_NUMBER() = 1, JSON in, Parquet out)",
                &df_args,
                &df_stats,
                &df_out,
                repeat,
            )?;
            // One core means one CPU, not one tokio thread: the filesystem source reads on a thread of its own, so
            // the run is pinned to CPU 0 where taskset exists.
            let one_core = nagare("nagare streaming, 1 core", 1, "out-nagare-1", None, repeat, true)?;
            // Runs with and without checkpoints alternate, so that a machine whose speed drifts (shared hosts)
            // treats them alike; the best of each counts.
            let best = |a: Option<Measured>, b: Measured| match a {
                Some(a) if a.seconds <= b.seconds => Some(a),
                _ => Some(b),
            };
            let mut streaming: Option<Measured> = None;
            let mut checkpointed: Vec<Option<Measured>> = checkpoint_intervals.iter().map(|_| None).collect();
            for _ in 0..repeat.max(1) {
                let label = format!("nagare streaming, parallelism {threads}");
                streaming = best(streaming.take(), nagare(&label, threads, "out-nagare", None, 1, false)?);
                for (k, interval) in checkpoint_intervals.iter().enumerate() {
                    let label = format!("nagare streaming, parallelism {threads}, checkpoints every {interval}");
                    let m = nagare(&label, threads, &format!("out-nagare-ckpt{k}"), Some(interval), 1, false)?;
                    checkpointed[k] = best(checkpointed[k].take(), m);
                }
            }
            let streaming = streaming.context("no run")?;
            let checkpointed: Vec<Measured> = checkpointed.into_iter().flatten().collect();
            let duck = if duckdb {
                let script = dir.join("w1_duckdb.py");
                std::fs::write(&script, W1_DUCKDB)?;
                let out = dir.join("out-duckdb");
                let stats = dir.join("out-duckdb.json");
                let args = vec![s(&script), s(&input), s(&out), threads.to_string(), s(&stats)];
                let label = "DuckDB 2.0 batch (QUALIFY row_number() = 1)";
                Some(run_program(Path::new("python3"), label, &args, &stats, &out, repeat)?)
            } else {
                None
            };
            println!(
                "{:<64} {:>8} {:>12} {:>10} {:>10} {:>8}",
                "run", "seconds", "events/s", "peak MB", "rows out", "ratio"
            );
            let runs = [Some(&baseline), Some(&streaming), Some(&one_core), duck.as_ref()]
                .into_iter()
                .flatten()
                .chain(checkpointed.iter());
            for m in runs {
                println!(
                    "{:<64} {:>8.2} {:>12.0} {:>10.0} {:>10} {:>8.2}",
                    m.label,
                    m.seconds,
                    rows as f64 / m.seconds,
                    m.peak_rss as f64 / 1e6,
                    m.rows_out,
                    m.seconds / baseline.seconds
                );
            }
            println!(
                "ratio nagare/DataFusion = {:.2} (target <= 1.25); one core: {:.0} events/s (target >= 400000)",
                streaming.seconds / baseline.seconds,
                rows as f64 / one_core.seconds
            );
            if let Some(d) = &duck {
                println!("ratio nagare/DuckDB = {:.2}", streaming.seconds / d.seconds);
            }
            for (m, interval) in checkpointed.iter().zip(&checkpoint_intervals) {
                println!(
                    "checkpoints every {interval}: {} completed, throughput {:.1}% of the run without ({} rows out)",
                    m.checkpoints,
                    100.0 * streaming.seconds / m.seconds,
                    m.rows_out
                );
                anyhow::ensure!(m.rows_out == baseline.rows_out, "checkpointed run wrote {} rows", m.rows_out);
            }
            if streaming.rows_out != baseline.rows_out || one_core.rows_out != baseline.rows_out {
                bail!(
                    "outputs differ: DataFusion wrote {} rows, nagare {} and {}",
                    baseline.rows_out,
                    streaming.rows_out,
                    one_core.rows_out
                );
            }
            Ok(())
        }
    }
}

/// The context of a lone operator subtask holding every key group, for the state benchmarks.
fn whole_range_context(label: &'static str) -> nagare_engine::operators::OperatorContext {
    nagare_engine::operators::OperatorContext {
        label: label.into(),
        metrics: Arc::new(nagare_engine::metrics::NodeMetrics::new(0, label.into(), label, 1)),
        late_rows: nagare_sql::LateRowPolicy::Drop,
        dead_letter: None,
        max_parallelism: 128,
        key_groups: nagare_core::KeyGroupRange { start: 0, end: 128 },
    }
}
