//! Two exchanges on loopback, as two workers would have: credits bound what is in flight, and a job split over
//! two parts writes exactly what it writes in one process, with checkpoints coordinated across the link.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::Int64Array;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use nagare_core::Message;
use nagare_engine::checkpoint::coordinator::CheckpointSettings;
use nagare_engine::checkpoint::store::CheckpointStore;
use nagare_engine::distribute::{ChannelKey, Distribution, Network};
use nagare_engine::{CheckpointOptions, JobOptions, RunningJob};
use nagare_exchange::Exchange;

async fn serve(exchange: &Arc<Exchange>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ex = exchange.clone();
    tokio::spawn(async move { ex.serve(listener).await });
    format!("http://{addr}")
}

fn batch(v: i64) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
    RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![v]))]).unwrap()
}

async fn recv(rx: &mut Box<dyn nagare_engine::channel::MessageReceiver>) -> Option<Message> {
    std::future::poll_fn(|cx| rx.poll_recv(cx)).await
}

#[tokio::test]
async fn credits_bound_what_is_in_flight_and_order_is_kept() {
    let (a, b) = (Exchange::new(), Exchange::new());
    let peers = vec![serve(&a).await, serve(&b).await];
    let key = ChannelKey { edge: 0, from: 0, to: 1 };
    let tx = a.network("j/1", peers.clone()).sender(key, 1).unwrap();
    let mut rx = b.network("j/1", peers).receiver(key).unwrap();
    let cap = nagare_engine::channel::CHANNEL_CAPACITY as i64;
    for i in 0..cap {
        tx.send(Message::Batch(batch(i))).await.unwrap();
    }
    // The receiver has taken nothing: no credit is left, so the next send waits.
    let blocked = tokio::time::timeout(Duration::from_millis(500), tx.send(Message::Batch(batch(cap)))).await;
    assert!(blocked.is_err(), "a send beyond the receiver's credits must wait");
    let first = recv(&mut rx).await.unwrap();
    assert!(matches!(first, Message::Batch(b) if b == batch(0)));
    tx.send(Message::Batch(batch(cap))).await.unwrap();
    // The queue is full again: end-of-stream waits for the next credit.
    let end = tokio::spawn(async move { tx.send(Message::EndOfStream).await });
    for i in 1..=cap {
        let m = recv(&mut rx).await.unwrap();
        assert!(matches!(m, Message::Batch(b) if b == batch(i)), "message {i} out of order");
    }
    assert!(matches!(recv(&mut rx).await, Some(Message::EndOfStream)));
    end.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_sender_to_an_unreachable_worker_fails_instead_of_hanging() {
    let a = Exchange::new();
    let dead = vec!["http://127.0.0.1:1".to_string(), "http://127.0.0.1:1".to_string()];
    let tx = a.network("j/2", dead).sender(ChannelKey { edge: 0, from: 0, to: 0 }, 1).unwrap();
    let sent = tokio::time::timeout(Duration::from_secs(30), tx.send(Message::EndOfStream)).await.unwrap();
    assert!(sent.is_err());
}

const SQL: &str = "
SET checkpoint_interval = '150ms';
SET dedup_ttl = '10 minutes';
CREATE TABLE events (id TEXT, time TIMESTAMP, detail STRUCT<tenant_id BIGINT, amount DOUBLE>,
    WATERMARK FOR time AS time - INTERVAL '5' SECOND)
WITH (connector = 'generator', count = '30000', rate = '30000', duplicate_rate = '0.2', seed = '11');
CREATE TABLE out WITH (connector = 'filesystem', path = '${OUT}', format = 'json');
INSERT INTO out SELECT id, time, detail.amount AS amount
FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events) WHERE rn = 1;
";

fn options(dir: &Path, distribution: Option<Distribution>) -> JobOptions {
    JobOptions {
        checkpoints: Some(CheckpointOptions {
            store: CheckpointStore::open(dir.to_str().unwrap()).unwrap(),
            settings: CheckpointSettings {
                interval: Duration::from_millis(150),
                timeout: Duration::from_secs(30),
                retained: 2,
                tolerable_failures: 3,
            },
            from_scratch: false,
        }),
        distribution,
        ..JobOptions::default()
    }
}

fn lines(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap().to_str().unwrap().starts_with('.') {
            continue;
        }
        // Event times follow the wall clock; ids and amounts follow the seed.
        out.extend(std::fs::read_to_string(&p).unwrap().lines().map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{} {}", v["id"], v["amount"])
        }));
    }
    out.sort();
    out
}

/// The connectors these jobs use.
fn registry() -> Arc<nagare_engine::connector::Registry> {
    Arc::new(
        nagare_engine::connector::Registry::new()
            .with(Arc::new(nagare_connectors::filesystem::FilesystemSpec))
            .with(Arc::new(nagare_connectors::generator::GeneratorSpec)),
    )
}

async fn plan(out: &Path) -> nagare_sql::Pipeline {
    let vars = BTreeMap::from([("OUT".to_string(), out.to_str().unwrap().to_string())]);
    registry().plan(SQL, 2, &BTreeMap::new(), &vars).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_split_over_two_workers_writes_what_one_process_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let factory = registry();

    let pipeline = plan(&one).await;
    let job = nagare_engine::start(&pipeline, factory.clone(), options(&tmp.path().join("ck1"), None)).await.unwrap();
    job.wait().await.unwrap();
    let expected = lines(&one);

    let pipeline = plan(&two).await;
    let mut parts = start_parts(&pipeline, &tmp.path().join("ck2"), &[0, 1]).await;
    let (p1, p0) = (parts.pop().unwrap(), parts.pop().unwrap());
    let (m0, m1) = (p0.metrics(), p1.metrics());
    let stats = p0.checkpoint_stats();
    let (r0, r1) = tokio::join!(p0.wait(), p1.wait());
    let (s0, s1) = (r0.unwrap(), r1.unwrap());
    assert!(m0.rows_read() > 0 && m1.rows_read() > 0, "both parts read: {} and {}", m0.rows_read(), m1.rows_read());
    assert_eq!(s0.rows_read + s1.rows_read, 30_000);
    assert!(stats.lock().unwrap().completed >= 2, "checkpoints completed across the link");
    let got = lines(&two);
    assert_eq!(got.len(), expected.len());
    let differing = got.iter().zip(&expected).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "rows differ from the single-process run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_part_fails_the_other() {
    let tmp = tempfile::tempdir().unwrap();
    let sql_out = tmp.path().join("out");
    let vars = BTreeMap::from([("OUT".to_string(), sql_out.to_str().unwrap().to_string())]);
    let unbounded = SQL.replace("count = '30000', ", "");
    let pipeline = registry().plan(&unbounded, 2, &BTreeMap::new(), &vars).await.unwrap();
    let mut parts = start_parts(&pipeline, &tmp.path().join("ck"), &[0, 1]).await;
    let (p1, p0) = (parts.pop().unwrap(), parts.pop().unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(p1); // its tasks are aborted: the link and its channels break
    let err = tokio::time::timeout(Duration::from_secs(30), p0.wait()).await.expect("part 0 must fail, not hang");
    let err = err.expect_err("part 0 must fail when part 1 is lost").to_string();
    assert!(err.contains("part 1") || err.contains("receiving") || err.contains("went away"), "{err}");
}

/// Starts the job split as `slot_parts` says, each part with its own exchange (as on its own worker).
async fn start_parts(pipeline: &nagare_sql::Pipeline, ck: &Path, slot_parts: &[usize]) -> Vec<RunningJob> {
    let factory = registry();
    let n = slot_parts.iter().max().unwrap() + 1;
    let exchanges: Vec<Arc<Exchange>> = (0..n).map(|_| Exchange::new()).collect();
    let mut peers = Vec::new();
    for ex in &exchanges {
        peers.push(serve(ex).await);
    }
    let starts = exchanges.iter().enumerate().map(|(p, ex)| {
        let d = Distribution { part: p, slot_parts: slot_parts.to_vec(), network: ex.network("job/1", peers.clone()) };
        nagare_engine::start(pipeline, factory.clone(), options(ck, Some(d)))
    });
    futures::future::join_all(starts).await.into_iter().map(Result::unwrap).collect()
}

/// Stops the job with a final checkpoint after `after`, or lets it finish when `after` is `None`.
/// Returns the rows its sources read.
async fn run_until(
    pipeline: &nagare_sql::Pipeline,
    ck: &Path,
    parts: Option<Vec<usize>>,
    after: Option<Duration>,
) -> u64 {
    let jobs = match parts {
        None => {
            let factory = registry();
            vec![nagare_engine::start(pipeline, factory, options(ck, None)).await.unwrap()]
        }
        Some(slot_parts) => start_parts(pipeline, ck, &slot_parts).await,
    };
    if let Some(after) = after {
        tokio::time::sleep(after).await;
        for j in &jobs {
            j.stop_token().cancel();
        }
    }
    let mut read = 0;
    for r in futures::future::join_all(jobs.into_iter().map(|j| j.wait())).await {
        read += r.unwrap().rows_read;
    }
    read
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescaling_2_to_4_to_1_keeps_every_row_once() {
    let tmp = tempfile::tempdir().unwrap();
    let sql = SQL.replace("rate = '30000'", "rate = '15000'");
    let plan_at = |p: u32, out: PathBuf| {
        let sql = sql.clone();
        async move {
            let vars = BTreeMap::from([("OUT".to_string(), out.to_str().unwrap().to_string())]);
            registry().plan(&sql, p, &BTreeMap::new(), &vars).await.unwrap()
        }
    };
    let reference = tmp.path().join("reference");
    run_until(&plan_at(2, reference.clone()).await, &tmp.path().join("ck-ref"), None, None).await;
    let expected = lines(&reference);

    let out = tmp.path().join("out");
    let ck = tmp.path().join("ck");
    // (rows wait in the dedup's state for the watermark, 5 s behind: what is read before a stop is all state)
    let first = run_until(&plan_at(2, out.clone()).await, &ck, None, Some(Duration::from_millis(700))).await;
    assert!(first > 0 && first < 30_000, "stopped part-way: read {first}");
    // 4 subtasks over two workers: dedup state split by key group, the generator's 2 lanes on 2 of 4 subtasks.
    let parts = Some(vec![0, 1, 0, 1]);
    let second = run_until(&plan_at(4, out.clone()).await, &ck, parts, Some(Duration::from_millis(700))).await;
    assert!(second > 0 && first + second < 30_000, "went on at 4: read {second} more");
    // Back to 1: all state and both lanes in one subtask.
    let third = run_until(&plan_at(1, out.clone()).await, &ck, None, None).await;
    assert_eq!(first + second + third, 30_000, "every generated event read once");
    let got = lines(&out);
    let unique: std::collections::BTreeSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "no row twice");
    assert_eq!(got.len(), expected.len());
    assert_eq!(got.iter().zip(&expected).filter(|(a, b)| a != b).count(), 0, "the reference's rows, no other");
}
