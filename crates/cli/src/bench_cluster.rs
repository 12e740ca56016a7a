//! `nagare bench cluster`: the shuffle-heavy W1 job (dedup by id, then a per-tenant window) in one process, in one
//! worker process, and split over two worker processes that exchange rows over Arrow Flight, in the same run; then
//! the exchange alone, in MB/s, against the in-process channel.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use arrow::record_batch::RecordBatch;
use nagare_core::Message;
use nagare_engine::channel::{MessageReceiver, MessageSender, local_channel};
use nagare_engine::distribute::{ChannelKey, Distribution, Network};
use nagare_engine::{JobOptions, JobSummary};
use nagare_exchange::Exchange;

use crate::bench::{parquet_rows, w1_input, w1_schema};

/// The shuffle-heavy W1 pipeline, with `${INPUT}` and `${OUTPUT}` for paths.
const W1_SHUFFLE_SQL: &str = include_str!("../../../sql/bench/w1_shuffle.sql");

/// One part of a job, as a worker would run it (what `bench cluster` starts per worker process).
pub struct PartArgs {
    /// Pipeline file.
    pub sql: PathBuf,
    /// `${NAME}` values.
    pub vars: Vec<String>,
    /// Job parallelism.
    pub parallelism: u32,
    /// This part.
    pub part: usize,
    /// Address of every part's exchange (`host:port`), in part order.
    pub peers: Vec<String>,
    /// The part of each slot.
    pub slot_parts: Vec<usize>,
    /// Statistics file.
    pub stats_json: PathBuf,
}

/// Runs one part until the job ends.
pub async fn run_part(args: PartArgs) -> Result<()> {
    let exchange = Exchange::new();
    let me = args.peers.get(args.part).context("--part is not in --peers")?;
    let listener = tokio::net::TcpListener::bind(me).await.with_context(|| format!("listening on {me}"))?;
    let ex = exchange.clone();
    tokio::spawn(async move { ex.serve(listener).await });
    let mut vars = BTreeMap::new();
    for v in &args.vars {
        let (k, val) = v.split_once('=').context("--var takes NAME=VALUE")?;
        vars.insert(k.to_string(), val.to_string());
    }
    let sql = std::fs::read_to_string(&args.sql).with_context(|| format!("reading {}", args.sql.display()))?;
    let pipeline = nagare_cli::registry().plan(&sql, args.parallelism, &BTreeMap::new(), &vars).await?;
    let peers: Vec<String> = args.peers.iter().map(|p| format!("http://{p}")).collect();
    let options = JobOptions {
        run_id: format!("{}-p{}", nagare_engine::job::new_run_id(), args.part),
        distribution: Some(Distribution {
            part: args.part,
            slot_parts: args.slot_parts.clone(),
            network: exchange.network("bench/1", peers),
        }),
        ..JobOptions::default()
    };
    let job = nagare_engine::start(&pipeline, nagare_cli::registry(), options).await?;
    let summary: JobSummary = job.wait().await?;
    crate::write_stats(&args.stats_json, &summary)
}

/// The pipeline's paths and the statistics file, as arguments of `run` and `bench part`.
fn io_args(input: &Path, output: &Path, stats: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "--var".into(),
        format!("INPUT={}", input.display()).into(),
        "--var".into(),
        format!("OUTPUT={}", output.display()).into(),
        "--stats-json".into(),
        stats.as_os_str().to_owned(),
    ]
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Run {
    label: String,
    seconds: f64,
    rows_read: u64,
    rows_out: u64,
    peak_rss: Vec<u64>,
}

/// Starts `parts` worker processes (each with `threads` runtime threads) for the job and waits for all of them.
fn run_parts(
    label: &str,
    dir: &Path,
    sql: &Path,
    input: &Path,
    parallelism: u32,
    parts: usize,
    threads: usize,
) -> Result<Run> {
    let exe = std::env::current_exe().context("locating the nagare binary")?;
    let output = dir.join(format!("out-{parts}-workers"));
    let _ = std::fs::remove_dir_all(&output);
    std::fs::create_dir_all(&output)?;
    let peers: Vec<String> =
        (0..parts).map(|_| free_port().map(|p| format!("127.0.0.1:{p}"))).collect::<Result<_>>()?;
    let slot_parts: Vec<String> = (0..parallelism as usize).map(|s| (s % parts).to_string()).collect();
    let started = Instant::now();
    let mut children: Vec<(Child, PathBuf)> = Vec::new();
    for part in 0..parts {
        let stats = dir.join(format!("part-{parts}-{part}.json"));
        let child = Command::new(&exe)
            .args(["bench", "part", "--threads", &threads.to_string(), "--part", &part.to_string()])
            .arg("--sql")
            .arg(sql)
            .args(["--parallelism", &parallelism.to_string(), "--peers", &peers.join(",")])
            .args(["--slot-parts", &slot_parts.join(",")])
            .args(io_args(input, &output, &stats))
            .spawn()
            .with_context(|| format!("starting part {part}"))?;
        children.push((child, stats));
    }
    let mut rows_read = 0;
    let mut peak_rss = Vec::new();
    for (mut child, stats) in children {
        let status = child.wait()?;
        if !status.success() {
            bail!("{label}: a worker process failed ({status})");
        }
        let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats)?)?;
        rows_read += s["rows_read"].as_u64().unwrap_or(0);
        peak_rss.push(s["peak_rss_bytes"].as_u64().unwrap_or(0));
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Run { label: label.to_string(), seconds, rows_read, rows_out: parquet_rows(&output)?, peak_rss })
}

/// The job in one plain `nagare run` process.
fn run_single(dir: &Path, sql: &Path, input: &Path, parallelism: u32) -> Result<Run> {
    let exe = std::env::current_exe().context("locating the nagare binary")?;
    let output = dir.join("out-single");
    let _ = std::fs::remove_dir_all(&output);
    std::fs::create_dir_all(&output)?;
    let stats = dir.join("single.json");
    let started = Instant::now();
    let status = Command::new(exe)
        .arg("run")
        .arg(sql)
        .args(["--quiet", "--parallelism", &parallelism.to_string(), "--threads", &parallelism.to_string()])
        .args(io_args(input, &output, &stats))
        .status()?;
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("the single-process run failed ({status})");
    }
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats)?)?;
    Ok(Run {
        label: format!("one process (nagare run), parallelism {parallelism}"),
        seconds,
        rows_read: s["rows_read"].as_u64().unwrap_or(0),
        rows_out: parquet_rows(&output)?,
        peak_rss: vec![s["peak_rss_bytes"].as_u64().unwrap_or(0)],
    })
}

/// W1 events decoded into batches, as the exchange carries them.
fn sample_batches(input: &Path, rows: usize) -> Result<Vec<RecordBatch>> {
    let file = std::io::BufReader::new(std::fs::File::open(input)?);
    let reader = arrow::json::ReaderBuilder::new(w1_schema()).with_batch_size(8192).build(file)?;
    let mut out = Vec::new();
    let mut n = 0;
    for b in reader {
        let b = b?;
        n += b.num_rows();
        out.push(b);
        if n >= rows {
            break;
        }
    }
    Ok(out)
}

async fn pump(
    tx: Box<dyn MessageSender>,
    mut rx: Box<dyn MessageReceiver>,
    batches: &[RecordBatch],
    rounds: usize,
) -> Result<f64> {
    let consumer = tokio::spawn(async move {
        let mut rows = 0usize;
        while let Some(m) = std::future::poll_fn(|cx| rx.poll_recv(cx)).await {
            match m {
                Message::Batch(b) => rows += b.num_rows(),
                Message::EndOfStream => break,
                _ => {}
            }
        }
        rows
    });
    let started = Instant::now();
    for _ in 0..rounds {
        for b in batches {
            tx.send(Message::Batch(b.clone())).await?;
        }
    }
    tx.send(Message::EndOfStream).await?;
    let rows = consumer.await?;
    let seconds = started.elapsed().as_secs_f64();
    let expected: usize = batches.iter().map(RecordBatch::num_rows).sum::<usize>() * rounds;
    if rows != expected {
        bail!("the exchange delivered {rows} rows of {expected}");
    }
    Ok(seconds)
}

/// MB/s through an in-process channel and through Flight between two exchanges on loopback.
async fn exchange_throughput(batches: &[RecordBatch], rounds: usize) -> Result<(f64, f64, f64)> {
    let bytes: usize = batches.iter().map(RecordBatch::get_array_memory_size).sum::<usize>() * rounds;
    let (tx, rx) = local_channel();
    let local = pump(Box::new(tx), Box::new(rx), batches, rounds).await?;
    let (a, b) = (Exchange::new(), Exchange::new());
    let mut peers = Vec::new();
    for ex in [&a, &b] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        peers.push(format!("http://{}", listener.local_addr()?));
        let ex = ex.clone();
        tokio::spawn(async move { ex.serve(listener).await });
    }
    let key = ChannelKey { edge: 0, from: 0, to: 0 };
    let tx = a.network("bench/x", peers.clone()).sender(key, 1)?;
    let rx = b.network("bench/x", peers).receiver(key)?;
    let flight = pump(tx, rx, batches, rounds).await?;
    let mb = bytes as f64 / 1e6;
    Ok((mb, mb / local, mb / flight))
}

/// `nagare bench cluster`.
pub async fn bench_cluster(rows: u64, dir: &Path, parallelism: u32, exchange_mb: usize) -> Result<()> {
    let (dir, input) = w1_input(dir, rows)?;
    let sql = dir.join("w1_shuffle.sql");
    std::fs::write(&sql, W1_SHUFFLE_SQL)?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "W1 shuffle (dedup by id, then count and sum per tenant per minute): {rows} events, parallelism {parallelism}, \
         {cores} cores"
    );
    let single = run_single(&dir, &sql, &input, parallelism)?;
    let one =
        run_parts(&format!("one worker process, {parallelism} slots"), &dir, &sql, &input, parallelism, 1, cores)?;
    let per_worker = (cores / 2).max(1);
    let two = run_parts(
        &format!("two worker processes ({per_worker} thread(s) each), Flight between them"),
        &dir,
        &sql,
        &input,
        parallelism,
        2,
        per_worker,
    )?;
    for r in [&single, &one, &two] {
        let rss: Vec<String> = r.peak_rss.iter().map(|b| format!("{:.0}", *b as f64 / 1e6)).collect();
        println!(
            "  {:<62} {:>7.2} s  {:>10.0} rows/s  {:>5.2}x the single process  peak RSS {} MB  ({} rows in, {} out)",
            r.label,
            r.seconds,
            r.rows_read as f64 / r.seconds,
            r.seconds / single.seconds,
            rss.join(" + "),
            r.rows_read,
            r.rows_out
        );
    }
    if one.rows_out != single.rows_out || two.rows_out != single.rows_out {
        bail!("the runs wrote different row counts: {} / {} / {}", single.rows_out, one.rows_out, two.rows_out);
    }

    let batches = sample_batches(&input, 200_000)?;
    let sample: usize = batches.iter().map(RecordBatch::get_array_memory_size).sum();
    let rounds = (exchange_mb * 1_000_000 / sample.max(1)).max(1);
    let (mb, local, flight) = exchange_throughput(&batches, rounds).await?;
    println!("Exchange alone: {mb:.0} MB of decoded W1 batches (8192 rows each), one channel");
    println!("  in-process channel                                              {local:>9.0} MB/s");
    println!(
        "  Arrow Flight DoExchange between two exchanges on loopback       {flight:>9.0} MB/s  ({:.3}x the in-process channel)",
        flight / local
    );
    Ok(())
}
