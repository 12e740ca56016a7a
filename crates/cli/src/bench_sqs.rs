//! `nagare bench sqs`: the sqs source's decoding of EventBridge message bodies into Arrow against the filesystem
//! JSON source on the same events (one thread, the same process); then end to end against an SQS server (moto) into
//! BigQuery: events/s through one source subtask and through four, and send→visible latency, each against the SQS
//! server alone serving the same receive pattern (receive + delete, same receivers and messages per call).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use futures::StreamExt;
use nagare_connectors::generator::{EventStreamConfig, w1_config, write_event};
use nagare_connectors::sqs::client::{Message, SqsClient};
use nagare_connectors::sqs::source::SqsSource;
use nagare_connectors::sqs::{BadRecordPolicy, Envelope, Format, SqsConfig};
use nagare_core::backoff::Backoff;
use nagare_engine::connector::{SourceContext, SourceEvent};
use nagare_engine::metrics::NodeMetrics;
use nagare_sql::{Pipeline, SourceSpec};
use tokio_util::sync::CancellationToken;

use crate::bench::{BqTarget, Visibility, W1_SQL, quantile, unix_micros, w1_input};

/// W1's source table as the filesystem source reads it; `bench sqs` swaps it for an sqs source.
const W1_FILESYSTEM_SOURCE: &str = "WITH (connector = 'filesystem', path = '${INPUT}', format = 'json')";

/// The same table read from a queue: never contacted, the decode benchmark hands messages to the source itself.
const W1_SQS_SOURCE: &str =
    "WITH (connector = 'sqs', queue_url = 'http://127.0.0.1:9/000000000000/bench', envelope = 'eventbridge')";

/// Dataset of the end-to-end tables.
const DATASET: &str = "nagare_bench";

/// Tick events (sent to keep event time moving, not measured) have this detail-type.
const TICK: &str = "Tick";

/// `nagare bench sqs`.
#[derive(Debug, clap::Args)]
pub struct SqsArgs {
    /// Events decoded by each decoder (W1's, generated once per size and kept in --dir).
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Working directory (input, pipelines, logs, checkpoints).
    #[arg(long, default_value = "target/bench-sqs")]
    dir: PathBuf,
    /// Repetitions of each decoder, alternating; the best time counts.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Only the decode comparison (no SQS server, no BigQuery).
    #[arg(long)]
    decode_only: bool,
    /// End to end: events put on the queue for each throughput run (moto slows as its queue holds more: each
    /// receive scans every message, in flight or not).
    #[arg(long, default_value_t = 400)]
    e2e_events: u64,
    /// End to end: subtask counts of the throughput runs.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    parallelism: Vec<usize>,
    /// Latency run: events sent per second (each in its own SendMessage call, stamped with its send time).
    #[arg(long, default_value_t = 20)]
    latency_rate: u64,
    /// Latency run: seconds of sending.
    #[arg(long, default_value_t = 15)]
    latency_seconds: u64,
    /// Checkpoint interval of the end-to-end runs.
    #[arg(long, default_value = "1s")]
    checkpoint_interval: String,
    /// Receive calls in flight per subtask (the source's `receivers`), for nagare and the baseline alike.
    #[arg(long, default_value_t = 4)]
    receivers: usize,
    /// Messages per receive call (the source's `max_messages`), for nagare and the baseline alike.
    #[arg(long, default_value_t = 10)]
    max_messages: u32,
    /// SQS endpoint (moto: scripts/services/start-moto.sh).
    #[arg(long, env = "AWS_ENDPOINT_URL", default_value = "http://127.0.0.1:45660")]
    aws_endpoint: String,
    /// AWS region of the queues.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    region: String,
    #[command(flatten)]
    bq: BqTarget,
}

/// Runs the benchmark and prints its figures.
pub async fn bench_sqs(args: SqsArgs) -> Result<()> {
    let (dir, input) = w1_input(&args.dir, args.events)?;
    bench_decode(&args, &input).await?;
    if args.decode_only {
        return Ok(());
    }
    let e2e = EndToEnd::new(&args, &dir)?;
    e2e.run().await
}

/// The source node of a planned pipeline: its spec and output schema.
fn source_of(p: &Pipeline) -> Result<(SourceSpec, SchemaRef)> {
    p.graph.sources().next().map(|(n, s)| (s.clone(), n.schema.clone())).context("the pipeline has no source")
}

/// What a source subtask gets from the runtime, for one subtask running alone.
fn source_context(batch_size: usize) -> SourceContext {
    SourceContext {
        subtask: 0,
        parallelism: 1,
        batch_size,
        dead_letter: None,
        metrics: Arc::new(NodeMetrics::new(0, "events".into(), "source", 1)),
        stop: CancellationToken::new(),
        checkpoints: true,
    }
}

/// One timed pass of a decoder: seconds and the batches it produced.
type Pass = (f64, Vec<RecordBatch>);

/// W1's events through the filesystem source (reading the file, from the page cache) and through the sqs source's
/// decoding (message bodies already in memory), in batches of the pipeline's batch size and of one receive call.
async fn bench_decode(args: &SqsArgs, input: &Path) -> Result<()> {
    let registry = nagare_cli::registry();
    let s = |p: &Path| p.to_string_lossy().to_string();
    let vars: BTreeMap<String, String> =
        [("INPUT".to_string(), s(input)), ("OUTPUT".to_string(), s(&args.dir.join("unused")))].into();
    let fs_plan = registry.plan(W1_SQL, 1, &BTreeMap::new(), &vars).await?;
    ensure!(W1_SQL.contains(W1_FILESYSTEM_SOURCE), "the W1 pipeline changed: update bench sqs");
    let sqs_plan =
        registry.plan(&W1_SQL.replace(W1_FILESYSTEM_SOURCE, W1_SQS_SOURCE), 1, &BTreeMap::new(), &vars).await?;
    let (fs_spec, schema) = source_of(&fs_plan)?;
    let (sqs_spec, sqs_schema) = source_of(&sqs_plan)?;
    ensure!(schema == sqs_schema, "the two sources read different columns");
    let batch_size = fs_plan.settings.batch_size;

    let data = std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let messages: Vec<Message> = data
        .lines()
        .enumerate()
        .map(|(i, line)| Message {
            message_id: format!("m-{i}"),
            receipt_handle: format!("rh-{i}"),
            body: line.to_string(),
            attributes: Default::default(),
        })
        .collect();
    let cfg: SqsConfig = nagare_engine::connector::config(&sqs_spec.table)?;
    let mb = data.len() as f64 / 1e6;
    let n = messages.len();
    println!(
        "decode: {n} W1 events (EventBridge bodies, {:.0} bytes each on average) into the {} columns W1's query \
         reads, one thread, best of {}",
        data.len() as f64 / n as f64,
        schema.fields().len(),
        args.repeat.max(1)
    );

    let filesystem = || async {
        let mut src = registry.create_source(&fs_spec, schema.clone(), source_context(batch_size), None)?;
        let t = Instant::now();
        let mut out = Vec::new();
        loop {
            match src.next().await? {
                SourceEvent::Batch(b) => out.push(b),
                SourceEvent::Idle(_) | SourceEvent::Pending => {}
                SourceEvent::End => break,
            }
        }
        Ok::<Pass, anyhow::Error>((t.elapsed().as_secs_f64(), out))
    };
    let sqs = |per_batch: usize| -> Result<Pass> {
        let mut src = SqsSource::new(&sqs_spec, &cfg, schema.clone(), source_context(batch_size))?;
        let t = Instant::now();
        let mut out = Vec::new();
        for chunk in messages.chunks(per_batch) {
            out.extend(src.decode(chunk)?);
        }
        Ok((t.elapsed().as_secs_f64(), out))
    };
    let receive = args.max_messages.clamp(1, 10) as usize;
    let mut best = [f64::MAX; 3];
    for pass in 0..args.repeat.max(1) {
        // Alternating, so that a machine whose speed drifts treats them alike; the best pass counts.
        let runs = [filesystem().await?, sqs(batch_size)?, sqs(receive)?];
        if pass == 0 {
            let all = |p: &Pass| arrow::compute::concat_batches(&schema, &p.1);
            let want = all(&runs[0])?;
            ensure!(want.num_rows() == n, "the filesystem source gave {} rows of {n}", want.num_rows());
            for r in &runs[1..] {
                ensure!(all(r)? == want, "the sqs source's decoding and the filesystem source disagree on W1");
            }
        }
        for (b, r) in best.iter_mut().zip(&runs) {
            *b = b.min(r.0);
        }
    }
    println!("{:<58} {:>8} {:>8} {:>12} {:>7}", "decoder", "seconds", "MB/s", "events/s", "ratio");
    let labels = [
        format!("filesystem JSON source, {batch_size}-line blocks (baseline)"),
        format!("sqs source decode, {batch_size} messages per batch"),
        format!("sqs source decode, {receive} messages per batch (one receive)"),
    ];
    for (label, s) in labels.iter().zip(best) {
        println!("{label:<58} {s:>8.3} {:>8.0} {:>12.0} {:>7.2}", mb / s, n as f64 / s, s / best[0]);
    }
    println!(
        "ratio sqs/filesystem = {:.2} (time, {batch_size} per batch; goal <= 1.2; outputs equal); {:.2} at {receive} \
         messages per batch",
        best[1] / best[0],
        best[2] / best[0]
    );
    Ok(())
}

/// The end-to-end part: queues on an SQS server, a pipeline into BigQuery, and the server alone as the baseline.
struct EndToEnd<'a> {
    args: &'a SqsArgs,
    dir: PathBuf,
    /// Keys the bench's own clients sign with, and the nagare processes get (moto checks none).
    key_id: String,
    secret: String,
    rest: nagare_bigquery::rest::RestClient,
    pipeline: PathBuf,
}

/// One throughput run.
struct Throughput {
    label: String,
    /// First message received to last event deleted.
    seconds: f64,
    /// First message received to last event received.
    received: f64,
    /// First message received to every event visible in BigQuery (nagare only).
    visible: Option<f64>,
    events: u64,
    /// Events/s at which the queue was filled before the run.
    filled: f64,
}

impl<'a> EndToEnd<'a> {
    fn new(args: &'a SqsArgs, dir: &Path) -> Result<Self> {
        let env_or = |k: &str, d: &str| std::env::var(k).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| d.into());
        let auth = nagare_bigquery::auth::Auth::from_option(&args.bq.credentials)?;
        let rest = nagare_bigquery::rest::RestClient::new(&args.bq.rest_endpoint, auth)?;
        let pipeline = dir.join("sqs-to-bigquery.sql");
        std::fs::write(&pipeline, pipeline_sql(args))?;
        Ok(EndToEnd {
            args,
            dir: dir.to_path_buf(),
            key_id: env_or("AWS_ACCESS_KEY_ID", "test"),
            secret: env_or("AWS_SECRET_ACCESS_KEY", "test"),
            rest,
            pipeline,
        })
    }

    async fn run(&self) -> Result<()> {
        let a = self.args;
        self.rest.create_dataset(&a.bq.project, DATASET).await.context("creating the BigQuery dataset")?;
        println!(
            "end to end: sqs source (envelope 'eventbridge', {} receivers × {} messages per subtask) → dedup by id → \
             bigquery append (commit 'atomic'), checkpoints every {}; SQS at {}, BigQuery at {}",
            a.receivers, a.max_messages, a.checkpoint_interval, a.aws_endpoint, a.bq.rest_endpoint
        );
        println!(
            "throughput: {} W1 events put on a fresh queue before each run; a run is timed from its first message \
             received to its last event deleted (nagare deletes after the checkpoint that covers the event)",
            a.e2e_events
        );
        let mut rows = Vec::new();
        for (round, &p) in a.parallelism.iter().enumerate() {
            let moto = self.moto_alone_throughput(round, p).await?;
            let nagare = self.nagare_throughput(round, p).await?;
            rows.push((p, moto, nagare));
        }
        println!(
            "{:<56} {:>8} {:>10} {:>7} {:>14} {:>13} {:>9}",
            "run", "seconds", "events/s", "ratio", "all received s", "all visible s", "filled/s"
        );
        for (_, moto, nagare) in &rows {
            let base = moto.events as f64 / moto.seconds;
            for t in [moto, nagare] {
                let rate = t.events as f64 / t.seconds;
                let visible = t.visible.map(|v| format!("{v:.2}")).unwrap_or_default();
                println!(
                    "{:<56} {:>8.2} {:>10.1} {:>7.2} {:>14.2} {visible:>13} {:>9.0}",
                    t.label,
                    t.seconds,
                    rate,
                    rate / base,
                    t.received,
                    t.filled
                );
            }
        }
        println!(
            "(all visible: to the last row visible in BigQuery; the dedup emits the last rows once the watermark has \
             passed them: a subtask that has received nothing for its watermark delay moves its watermark to its \
             latest event, and once every subtask is idle (10 s) the furthest watermark holds for all)"
        );
        for (p, moto, nagare) in &rows {
            let (rate, base) = (nagare.events as f64 / nagare.seconds, moto.events as f64 / moto.seconds);
            println!(
                "parallelism {p}: nagare {rate:.1} events/s = {:.2}x the SQS server alone ({base:.1} events/s)",
                rate / base
            );
        }
        self.latency().await
    }

    /// A client for `queue_url` (created or not).
    fn client(&self, queue_url: &str) -> Result<SqsClient> {
        let a = self.args;
        let cfg = SqsConfig {
            queue_url: queue_url.to_string(),
            region: a.region.clone(),
            endpoint: a.aws_endpoint.trim_end_matches('/').to_string(),
            envelope: Envelope::Eventbridge,
            format: Format::Json,
            wait_time: Duration::from_secs(20),
            max_messages: a.max_messages.clamp(1, 10),
            receivers: a.receivers,
            visibility_timeout: Duration::from_secs(30),
            bad_records: BadRecordPolicy::Fail,
            dead_letter_path: None,
            keys: None,
        };
        Ok(SqsClient::with_keys(&cfg, &self.key_id, &self.secret)?)
    }

    /// A new queue of its own for one run.
    async fn queue(&self, label: &str) -> Result<SqsClient> {
        let name = format!("nagare_bench_{}_{label}", std::process::id());
        let placeholder = format!("{}/000000000000/{name}", self.args.aws_endpoint.trim_end_matches('/'));
        let url = self.client(&placeholder)?.create_queue(&name).await.context("creating a queue")?;
        self.client(&url)
    }

    /// Puts `n` W1 events (distinct ids, event time now) on the queue; returns events/s of the filling.
    async fn fill(&self, queue: &SqsClient, n: u64, seed: u64) -> Result<f64> {
        let cfg = EventStreamConfig { seed, ..w1_config(seed, 0.0) };
        let now = unix_micros();
        let bodies: Vec<String> = (0..n)
            .map(|i| {
                let mut b = String::new();
                write_event(&cfg, i, now + i as i64, &mut b);
                b
            })
            .collect();
        let t = Instant::now();
        let chunks: Vec<&[String]> = bodies.chunks(10).collect();
        let results: Vec<Result<()>> =
            futures::stream::iter(chunks).map(|c| send(queue, c)).buffer_unordered(8).collect().await;
        results.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(n as f64 / t.elapsed().as_secs_f64())
    }

    /// The SQS server alone: `p` × receivers loops of receive + delete until every event is deleted; timed from the
    /// first message received to the last event deleted.
    async fn moto_alone_throughput(&self, round: usize, p: usize) -> Result<Throughput> {
        let a = self.args;
        let queue = self.queue(&format!("moto_{round}_p{p}")).await?;
        let filled = self.fill(&queue, a.e2e_events, 1000 + p as u64).await?;
        let (received, done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (first, all_received) = (Arc::new(std::sync::OnceLock::new()), Arc::new(std::sync::OnceLock::new()));
        let stop = CancellationToken::new();
        let loops = (0..p * a.receivers).map(|_| {
            let (queue, received, done, stop, want) =
                (queue.clone(), received.clone(), done.clone(), stop.clone(), a.e2e_events);
            let (first, all_received) = (first.clone(), all_received.clone());
            let max = a.max_messages.clamp(1, 10);
            tokio::spawn(async move {
                loop {
                    let got = tokio::select! {
                        _ = stop.cancelled() => return Ok(None),
                        got = queue.receive(max, Duration::from_secs(20), Duration::from_secs(30)) => got?,
                    };
                    if got.is_empty() {
                        continue;
                    }
                    first.get_or_init(Instant::now);
                    if received.fetch_add(got.len() as u64, Ordering::Relaxed) + got.len() as u64 >= want {
                        all_received.get_or_init(Instant::now);
                    }
                    let handles: Vec<&str> = got.iter().map(|m| m.receipt_handle.as_str()).collect();
                    queue.delete_batch(&handles).await?;
                    let before = done.fetch_add(got.len() as u64, Ordering::Relaxed);
                    if before + got.len() as u64 >= want {
                        // This loop deleted the last event; the others are waiting on an empty queue.
                        stop.cancel();
                        return Ok::<Option<Instant>, anyhow::Error>(Some(Instant::now()));
                    }
                }
            })
        });
        let mut last = None;
        for r in futures::future::join_all(loops).await {
            last = last.or(r??);
        }
        let _ = queue.delete_queue().await;
        let (Some(first), Some(all_received), Some(last)) = (first.get(), all_received.get(), last) else {
            bail!("the SQS server alone: not every event received and deleted")
        };
        Ok(Throughput {
            label: format!("SQS server alone, {p} × {} receive + delete loops", a.receivers),
            seconds: last.duration_since(*first).as_secs_f64(),
            received: all_received.duration_since(*first).as_secs_f64(),
            visible: None,
            events: done.load(Ordering::Relaxed),
            filled,
        })
    }

    /// nagare at parallelism `p`: timed from its first message received to its last deleted (after the checkpoint
    /// covering it), as its metrics endpoint reports them; then until every event is visible in BigQuery.
    async fn nagare_throughput(&self, round: usize, p: usize) -> Result<Throughput> {
        let a = self.args;
        let label = format!("{round}_p{p}");
        let queue = self.queue(&format!("nagare_{label}")).await?;
        let filled = self.fill(&queue, a.e2e_events, 2000 + p as u64).await?;
        let table = format!("sqs_{label}_{}", std::process::id());
        let metrics = format!("127.0.0.1:{}", std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
        let mut run = self.spawn(&label, queue.queue_url(), &table, p, Some(&metrics))?;
        let mut visibility = Visibility::new(&self.full_table(&table), "time", None);
        let measured = async {
            let (mut first, mut all_received, mut deleted) = (None, None, None);
            let mut progress = (0.0, Instant::now());
            while deleted.is_none() {
                if let Some(status) = run.child.try_wait()? {
                    bail!("nagare ended ({status}) before deleting every event; log: {}", run.log.display());
                }
                let [received, gone] =
                    scrape(&metrics, ["nagare_sqs_messages_received_total", "nagare_sqs_messages_deleted_total"]).await;
                if first.is_none() && received > 0.0 {
                    first = Some(Instant::now());
                }
                if all_received.is_none() && received >= a.e2e_events as f64 {
                    all_received = Some(Instant::now());
                }
                if gone >= a.e2e_events as f64 {
                    deleted = Some(Instant::now());
                }
                if received + gone > progress.0 {
                    progress = (received + gone, Instant::now());
                } else if progress.1.elapsed() > Duration::from_secs(60) {
                    bail!(
                        "nagare: {gone} of {} events deleted, no progress for 60 s; log: {}",
                        a.e2e_events,
                        run.log.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            self.wait_visible(&mut run, &mut visibility, a.e2e_events, Duration::from_secs(60)).await?;
            let visible = Instant::now();
            let first = first.context("no message received")?;
            let all_received = all_received.unwrap_or(visible);
            let deleted = deleted.context("not every message deleted")?;
            let since = |t: Instant| t.duration_since(first).as_secs_f64();
            Ok((since(deleted), since(all_received), since(visible)))
        }
        .await;
        run.stop()?;
        let _ = queue.delete_queue().await;
        let (seconds, received, visible) = measured?;
        let rows = visibility.count();
        ensure!(rows == a.e2e_events, "BigQuery holds {rows} rows of {} events sent once each", a.e2e_events);
        Ok(Throughput {
            label: format!("nagare sqs → dedup → bigquery, parallelism {p}"),
            seconds,
            received,
            visible: Some(visible),
            events: rows,
            filled,
        })
    }

    /// Send→visible latency through nagare at parallelism 1 against send→received of the SQS server alone, at the
    /// same pace.
    async fn latency(&self) -> Result<()> {
        let a = self.args;
        let n = a.latency_rate * a.latency_seconds;
        println!(
            "latency: {} events/s for {} s, each sent alone and carrying its send time as its event time; parallelism \
             1, the table polled every 100 ms (a row's visible time is when the first poll that returns it came back)",
            a.latency_rate, a.latency_seconds
        );
        // The SQS server alone: send → received by the same receive loops.
        let queue = self.queue("latency_moto").await?;
        let stop = CancellationToken::new();
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let loops: Vec<_> = (0..a.receivers)
            .map(|_| {
                let (queue, stop, received) = (queue.clone(), stop.clone(), received.clone());
                let max = a.max_messages.clamp(1, 10);
                tokio::spawn(async move {
                    loop {
                        let got = tokio::select! {
                            _ = stop.cancelled() => return Ok::<(), anyhow::Error>(()),
                            got = queue.receive(max, Duration::from_secs(20), Duration::from_secs(30)) => got?,
                        };
                        let now = unix_micros();
                        if got.is_empty() {
                            continue;
                        }
                        let handles: Vec<&str> = got.iter().map(|m| m.receipt_handle.as_str()).collect();
                        queue.delete_batch(&handles).await?;
                        if let Ok(mut r) = received.lock() {
                            r.extend(got.iter().filter_map(|m| event_time_us(&m.body)).map(|t| (now - t) as f64 / 1e3));
                        }
                    }
                })
            })
            .collect();
        pace(&queue, a.latency_rate, a.latency_seconds, 0).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while received.lock().map(|r| r.len() as u64).unwrap_or(0) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.cancel();
        for l in futures::future::join_all(loops).await {
            l??;
        }
        let _ = queue.delete_queue().await;
        let mut moto = received.lock().map(|r| r.clone()).unwrap_or_default();
        moto.sort_by(f64::total_cmp);

        // nagare: started first; sending begins once a first event is visible, so start-up is not measured.
        let queue = self.queue("latency_nagare").await?;
        let table = format!("sqs_latency_{}", std::process::id());
        let mut run = self.spawn("latency", queue.queue_url(), &table, 1, None)?;
        let result = async {
            let mut warm = Visibility::new(&self.full_table(&table), "time", Some(&format!("detail_type = '{TICK}'")));
            send(&queue, &[tick(0)]).await?;
            self.wait_visible(&mut run, &mut warm, 1, Duration::from_secs(60)).await?;
            let mut visibility = Visibility::new(&self.full_table(&table), "time", Some(&events_only()));
            let sending = tokio::spawn({
                let queue = queue.clone();
                let (rate, seconds) = (a.latency_rate, a.latency_seconds);
                async move { pace(&queue, rate, seconds, 1).await }
            });
            let waited = self.wait_visible(&mut run, &mut visibility, n, Duration::from_secs(a.latency_seconds + 30));
            let waited = waited.await;
            sending.await??;
            waited?;
            Ok::<Vec<f64>, anyhow::Error>(visibility.latencies_ms())
        }
        .await;
        run.stop()?;
        let _ = queue.delete_queue().await;
        let nagare = result?;
        let ms = |v: &[f64]| format!("{:.0} / {:.0} ms", quantile(v, 0.5), quantile(v, 0.99));
        println!("{:<64} {:>7} {:>20}", "run", "events", "p50 / p99");
        println!("{:<64} {:>7} {:>20}", "SQS server alone: send → received (receive + delete)", moto.len(), ms(&moto));
        println!("{:<64} {:>7} {:>20}", "nagare: send → visible in BigQuery", nagare.len(), ms(&nagare));
        println!(
            "latency p99 {:.0} ms (goal < 2500 ms at checkpoints every {}); p50 {:.0} ms, of which the SQS server \
             alone takes {:.0} ms",
            quantile(&nagare, 0.99),
            a.checkpoint_interval,
            quantile(&nagare, 0.5),
            quantile(&moto, 0.5)
        );
        Ok(())
    }

    fn full_table(&self, table: &str) -> String {
        format!("{}.{DATASET}.{table}", self.args.bq.project)
    }

    /// Starts `nagare run` of the pipeline on `queue_url` into `table`, with checkpoints (and its Prometheus
    /// endpoint on `metrics`).
    fn spawn(&self, label: &str, queue_url: &str, table: &str, p: usize, metrics: Option<&str>) -> Result<Run> {
        let a = self.args;
        let ckpt = self.dir.join(format!("ckpt-{label}"));
        let _ = std::fs::remove_dir_all(&ckpt);
        let log = self.dir.join(format!("nagare-{label}.log"));
        let s = |p: &Path| p.to_string_lossy().to_string();
        let exe = std::env::current_exe().context("locating the nagare binary")?;
        let mut cmd = Command::new(exe);
        cmd.args(["run", &s(&self.pipeline), "--quiet", "--parallelism", &p.to_string()])
            .args(["--threads", &p.to_string(), "--checkpoint-dir", &s(&ckpt)])
            .args(["--checkpoint-interval", &a.checkpoint_interval])
            .args(["--var", &format!("QUEUE={queue_url}"), "--var", &format!("TABLE={table}")]);
        if let Some(addr) = metrics {
            cmd.args(["--metrics-addr", addr]);
        }
        let child = cmd
            .env("AWS_ACCESS_KEY_ID", &self.key_id)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .env("AWS_REGION", &a.region)
            .env("NAGARE_LOG", "warn")
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        Ok(Run { child, log })
    }

    /// Polls until `want` rows are visible; fails when the job ends or nothing new is seen for `quiet`.
    async fn wait_visible(&self, run: &mut Run, v: &mut Visibility, want: u64, quiet: Duration) -> Result<()> {
        let mut last = (v.count(), Instant::now());
        while v.count() < want {
            if let Some(status) = run.child.try_wait()? {
                bail!("nagare ended ({status}) with {} of {want} rows visible; log: {}", v.count(), run.log.display());
            }
            v.poll(&self.rest, &self.args.bq.project).await;
            if v.count() > last.0 {
                last = (v.count(), Instant::now());
            } else if last.1.elapsed() > quiet {
                bail!("{} of {want} rows visible, none more for {quiet:?}; log: {}", v.count(), run.log.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

/// A running `nagare run`.
struct Run {
    child: Child,
    log: PathBuf,
}

impl Run {
    /// Stops the job as Ctrl-C does (its final checkpoint deletes what it read), killing it after 30 s.
    fn stop(mut self) -> Result<()> {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("nagare did not stop within 30 s of SIGINT; killed (log: {})", self.log.display());
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

/// The end-to-end pipeline, with `${QUEUE}` and `${TABLE}` left for `--var`.
fn pipeline_sql(a: &SqsArgs) -> String {
    let BqTarget { endpoint, rest_endpoint, project, credentials } = &a.bq;
    format!(
        r#"-- nagare bench sqs: the issue's pattern, EventBridge events from a queue into BigQuery exactly once.
SET dedup_ttl = '10 minutes';
CREATE TABLE events (
  id TEXT, "detail-type" TEXT, source TEXT, time TIMESTAMP,
  detail STRUCT<tenant_id BIGINT, document_id TEXT, amount DOUBLE, currency TEXT, status TEXT>,
  WATERMARK FOR time AS time
) WITH (connector = 'sqs', queue_url = '${{QUEUE}}', endpoint = '{aws}', envelope = 'eventbridge',
        receivers = '{receivers}', max_messages = '{max}');
CREATE TABLE bq (id TEXT NOT NULL, detail_type TEXT, source TEXT, time TIMESTAMP, tenant_id BIGINT,
  document_id TEXT, amount DOUBLE, currency TEXT, status TEXT)
WITH (connector = 'bigquery', project = '{project}', dataset = '{DATASET}', table = '${{TABLE}}',
      credentials = '{credentials}', endpoint = '{endpoint}', rest_endpoint = '{rest_endpoint}',
      create_table = 'if_not_exists', commit = 'atomic');
INSERT INTO bq
SELECT id, "detail-type", source, time, detail.tenant_id, detail.document_id, detail.amount, detail.currency,
       detail.status
FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events) WHERE rn = 1;
"#,
        aws = a.aws_endpoint.trim_end_matches('/'),
        receivers = a.receivers,
        max = a.max_messages,
    )
}

/// The measured rows of an end-to-end table (ticks left out).
fn events_only() -> String {
    format!("detail_type <> '{TICK}'")
}

/// An EventBridge event that only moves event time on (its time is now).
fn tick(n: u64) -> String {
    let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    serde_json::json!({
        "version": "0", "id": format!("tick-{}-{n}", std::process::id()), "detail-type": TICK,
        "source": "nagare.bench", "account": "000000000000", "time": time, "region": "us-east-1", "resources": [],
        "detail": {},
    })
    .to_string()
}

/// The `time` of an EventBridge event body, µs since the epoch.
fn event_time_us(body: &str) -> Option<i64> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let t = chrono::DateTime::parse_from_rfc3339(v.get("time")?.as_str()?).ok()?;
    Some(t.timestamp_micros())
}

/// The sums over nodes of counters `names` at a nagare process's Prometheus endpoint (0 while it does not answer).
async fn scrape<const N: usize>(addr: &str, names: [&str; N]) -> [f64; N] {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut text = String::new();
    if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await
        && s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.is_ok()
    {
        let _ = s.read_to_string(&mut text).await;
    }
    names.map(|name| {
        text.lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    })
}

/// Sends up to 10 bodies in one call, retrying what the server refuses for a while (a busy moto times out).
async fn send(queue: &SqsClient, bodies: &[impl AsRef<str>]) -> Result<()> {
    let mut left: Vec<&str> = bodies.iter().map(AsRef::as_ref).collect();
    let mut backoff = Backoff::default();
    loop {
        let failed = match queue.send_batch(&left).await {
            Ok(failed) if failed.is_empty() => return Ok(()),
            Ok(failed) => failed,
            Err(e) if e.retriable() => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        if !failed.is_empty() {
            let again: Vec<usize> = failed.iter().filter_map(|f| f.id.parse().ok()).collect();
            left = again.iter().filter_map(|i| left.get(*i).copied()).collect();
        }
        let delay = backoff.next_delay().context("sending to the queue kept failing")?;
        tokio::time::sleep(delay).await;
    }
}

/// Sends `rate` W1 events a second for `seconds`, each alone, stamped with its send time as its event time; a
/// send is not held up by the ones before it.
async fn pace(queue: &SqsClient, rate: u64, seconds: u64, seed: u64) -> Result<()> {
    let cfg = EventStreamConfig { seed, ..w1_config(seed, 0.0) };
    let started = Instant::now();
    let mut sends = Vec::new();
    for i in 0..rate * seconds {
        let at = started + Duration::from_secs_f64(i as f64 / rate.max(1) as f64);
        tokio::time::sleep_until(at.into()).await;
        let mut body = String::new();
        write_event(&cfg, i, unix_micros(), &mut body);
        let queue = queue.clone();
        sends.push(tokio::spawn(async move { send(&queue, &[body]).await }));
    }
    for s in futures::future::join_all(sends).await {
        s??;
    }
    Ok(())
}
