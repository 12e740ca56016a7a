//! The sqs source against moto (SQS + EventBridge, scripts/services/start-moto.sh) into the BigQuery emulator
//! (scripts/services/start-bqemulator.sh): events put on the bus land once with their fields, every event exactly
//! once across SIGKILLs with re-deliveries, poison messages dead-lettered and deleted, a missing queue refused.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::bq::{finish, nagare, rows_so_far, run_until};
use common::services::{aws, bigquery, bq_dataset, bq_query, moto};
use common::{RunEnd, run_or_kill};

/// A pipeline from queue `${QUEUE}` (EventBridge events whose detail has `n`, `tenant_id`, `amount`, `note`),
/// deduplicated by event id, into `${DATASET}.${TABLE}` (append; `commit = 'atomic'`: the emulator's FlushRows,
/// which `per_subtask` uses, leaves a flush's last row invisible); `source_opts` are extra source options.
fn pipeline(settings: &str, source_opts: &str) -> String {
    format!(
        r#"
SET parallelism = 2;
SET dedup_ttl = '1 hour';
{settings}
CREATE TABLE events (
  id TEXT, "detail-type" TEXT, source TEXT, time TIMESTAMP,
  detail STRUCT<n BIGINT, tenant_id BIGINT, amount DOUBLE, note TEXT>,
  _message_id TEXT, _receive_count INT,
  WATERMARK FOR time AS time - INTERVAL '1' SECOND
) WITH (connector = 'sqs', queue_url = '${{QUEUE}}', endpoint = '${{AWS}}', envelope = 'eventbridge',
        wait_time = '1s'{source_opts});
CREATE TABLE bq (id TEXT NOT NULL, detail_type TEXT, source TEXT, time TIMESTAMP, n BIGINT, tenant_id BIGINT,
  amount DOUBLE, note TEXT, message_id TEXT)
WITH (connector = 'bigquery', project = '${{PROJECT}}', dataset = '${{DATASET}}', table = '${{TABLE}}',
      credentials = 'none', endpoint = '${{GRPC}}', rest_endpoint = '${{REST}}', create_table = 'if_not_exists',
      commit = 'atomic');
INSERT INTO bq
SELECT id, "detail-type", source, time, detail.n, detail.tenant_id, detail.amount, detail.note, _message_id
FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events) WHERE rn = 1;
"#
    )
}

/// `nagare run` of `sql` reading `queue` into `dataset.table`, with checkpoints in `ckpt`.
fn run_cmd(sql: &Path, dataset: &str, table: &str, queue: &str, ckpt: &Path) -> std::process::Command {
    let mut c = nagare(sql, dataset, table, &["--checkpoint-dir", ckpt.to_str().unwrap()]);
    let endpoint = moto()["AWS_ENDPOINT_URL"].clone();
    c.args(["--var", &format!("QUEUE={queue}"), "--var", &format!("AWS={endpoint}")]);
    for (k, v) in moto().iter().filter(|(k, _)| k.starts_with("AWS_")) {
        c.env(k, v);
    }
    c.env("NAGARE_LOG", "info");
    c
}

/// `(visible, in flight)` messages of a queue (through the source's own client: no process per poll).
fn queue_counts(queue: &str) -> (u64, u64) {
    use nagare_connectors::sqs::{BadRecordPolicy, Envelope, Format, SqsConfig, client::SqsClient};
    let endpoint = moto()["AWS_ENDPOINT_URL"].clone();
    let cfg = SqsConfig {
        queue_url: queue.to_string(),
        region: moto()["AWS_REGION"].clone(),
        endpoint,
        envelope: Envelope::Raw,
        format: Format::Json,
        wait_time: Duration::ZERO,
        max_messages: 10,
        receivers: 1,
        visibility_timeout: Duration::from_secs(30),
        bad_records: BadRecordPolicy::Fail,
        dead_letter_path: None,
    };
    let client = SqsClient::with_keys(&cfg, &moto()["AWS_ACCESS_KEY_ID"], &moto()["AWS_SECRET_ACCESS_KEY"]).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let attrs = rt
        .block_on(client.queue_attributes(&["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]))
        .unwrap();
    let n = |k: &str| attrs["Attributes"][k].as_str().unwrap().parse::<u64>().unwrap();
    (n("ApproximateNumberOfMessages"), n("ApproximateNumberOfMessagesNotVisible"))
}

/// An event (n = -1) a minute after the others. Rows wait in the dedup until the watermark passes them, and each
/// source subtask holds the watermark back until it has seen a later event (an idle subtask stops holding it only
/// while another one is active), so a test that sends a fixed set of events ends it with ticks.
fn tick_event(source: &str) -> String {
    // A minute ahead: past the events' watermark delay, well within dedup_ttl (a tick beyond the TTL would end
    // the dedup's memory of the events).
    let time = (chrono::Utc::now() + chrono::Duration::minutes(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    serde_json::json!({"Source": source, "DetailType": "Tick", "Detail": {"n": -1}, "Time": time}).to_string()
}

/// `(rows, distinct ids)` of the test's events (not ticks) in a table.
fn events_in(dataset: &str, table: &str) -> (i64, i64) {
    let project = &bigquery()["BIGQUERY_PROJECT"];
    let r = bq_query(&format!("SELECT COUNT(*), COUNT(DISTINCT id) FROM `{project}.{dataset}.{table}` WHERE n >= 0"));
    let n = |i: usize| r[0][i].as_deref().unwrap().parse::<i64>().unwrap();
    (n(0), n(1))
}

/// A unique name for this test run.
fn unique(prefix: &str) -> String {
    format!("{prefix}_{}_{}", std::process::id(), fastrand::u32(..))
}

#[test]
fn eventbridge_events_land_in_bigquery_once_with_their_fields() {
    const N: usize = 150;
    let _ = bigquery();
    let name = unique("eb");
    bq_dataset(&name);
    let queue = aws(&["queue", &name]);
    // Each test its own event source: rules on the (shared) default bus route by it.
    let source = format!("nagare.{name}");
    aws(&["route-eventbridge", &queue, &name, &source]);
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let mut lines = String::new();
    for n in 0..N {
        let detail = serde_json::json!({
            "n": n, "tenant_id": n % 7, "amount": n as f64 * 1.25, "note": format!("é \"{n}\"\n"), "extra": [1, 2],
        });
        let kind = if n % 2 == 0 { "Created" } else { "Paid" };
        lines.push_str(&serde_json::json!({"Source": source, "DetailType": kind, "Detail": detail}).to_string());
        lines.push('\n');
    }
    // An event of another source is not routed to the queue.
    lines.push_str(r#"{"Source": "other", "DetailType": "Created", "Detail": {"n": -2}}"#);
    lines.push('\n');
    std::fs::write(&events, lines).unwrap();
    assert_eq!(aws(&["put-events", events.to_str().unwrap()]), (N + 1).to_string());
    let tick = dir.path().join("tick.jsonl");
    std::fs::write(&tick, tick_event(&source)).unwrap();

    let sql = dir.path().join("p.sql");
    std::fs::write(&sql, pipeline("SET checkpoint_interval = '1s';", "")).unwrap();
    let (status, err) =
        run_until(run_cmd(&sql, &name, "events", &queue, &dir.path().join("ckpt")), Duration::from_secs(60), || {
            // Ticks until every subtask has seen one: the watermark passes the events and the dedup emits them.
            aws(&["put-events", tick.to_str().unwrap()]);
            rows_so_far(&name, "events") >= N as i64
        });
    assert!(status.success(), "{err}");
    assert_eq!(events_in(&name, "events"), (N as i64, N as i64));
    let project = &bigquery()["BIGQUERY_PROJECT"];
    let rows = bq_query(&format!(
        "SELECT n, detail_type, source, tenant_id, amount, note, message_id IS NOT NULL, time IS NOT NULL \
         FROM `{project}.{name}.events` WHERE n >= 0 ORDER BY n"
    ));
    for (n, r) in rows.iter().enumerate() {
        let kind = if n % 2 == 0 { "Created" } else { "Paid" };
        let want = [
            n.to_string(),
            kind.to_string(),
            source.clone(),
            (n % 7).to_string(),
            format!("{:.2}", n as f64 * 1.25),
            format!("é \"{n}\"\n"),
            "true".to_string(),
            "true".to_string(),
        ];
        let mut got: Vec<String> = r.iter().map(|c| c.clone().unwrap_or_default()).collect();
        got[4] = format!("{:.2}", got[4].parse::<f64>().unwrap());
        assert_eq!(got, want, "row {n}");
    }
    // Every message was deleted once its checkpoint completed.
    assert_eq!(queue_counts(&queue), (0, 0));
}

/// An EventBridge event as a queue body (sent with SendMessageBatch, as if a rule had delivered it).
fn event_body(n: usize, source: &str) -> String {
    let time = chrono::DateTime::from_timestamp_millis(1_767_225_600_000 + n as i64).unwrap();
    serde_json::json!({
        "version": "0", "id": format!("ev-{n}"), "detail-type": "Created", "source": source, "account": "123456789012",
        "time": time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true), "region": "us-east-1", "resources": [],
        "detail": {"n": n, "tenant_id": n % 7, "amount": n as f64 * 1.25, "note": "x"},
    })
    .to_string()
}

/// Events of the crash test: 1,000 by default (about a minute), `NAGARE_SQS_CRASH_EVENTS=5000` for issue 13's
/// figure. moto is the limit: it handled 30-100 messages a second on the busy 2-core CI machine, and 5,000 did not
/// finish within nextest's 5 minutes there.
fn crash_events() -> usize {
    std::env::var("NAGARE_SQS_CRASH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000)
}

#[test]
fn every_event_lands_exactly_once_across_sigkills_with_redeliveries() {
    let n_events = crash_events();
    let _ = bigquery();
    let name = unique("sqscrash");
    bq_dataset(&name);
    let queue = aws(&["queue", &name]);
    let dir = tempfile::tempdir().unwrap();
    // Every event once, and 10 % of them again (producers and SQS re-deliver), the copies spread through the rest.
    let mut rng = fastrand::Rng::with_seed(13);
    let mut bodies: Vec<String> = (0..n_events).map(|n| event_body(n, &name)).collect();
    for n in (0..n_events).step_by(10) {
        let at = rng.usize(n..=bodies.len());
        bodies.insert(at, event_body(n, &name));
    }
    // Sent while the pipeline runs, 200 at a time whenever the queue has fewer than 200 waiting: moto's receive and
    // send take time proportional to the messages in the queue (about 0.5 s per receive at 1,000), so a short queue
    // keeps the test quick.
    let sender = {
        let (queue, dir) = (queue.clone(), dir.path().to_path_buf());
        std::thread::spawn(move || {
            let mut sent = 0;
            for (i, chunk) in bodies.chunks(200).enumerate() {
                while queue_counts(&queue).0 > 200 {
                    std::thread::sleep(Duration::from_millis(250));
                }
                let file = dir.join(format!("bodies-{i}.txt"));
                std::fs::write(&file, chunk.join("\n")).unwrap();
                sent += aws(&["send", &queue, file.to_str().unwrap()]).parse::<usize>().unwrap();
            }
            sent
        })
    };
    let tick = dir.path().join("tick.txt");
    // A minute after the events (within dedup_ttl: a tick beyond it would end the dedup's memory of the events,
    // and a re-delivery arriving after it would be emitted again).
    std::fs::write(
        &tick,
        event_body(60_000, &name).replace("\"ev-60000\"", "\"tick\"").replace("\"n\":60000", "\"n\":-1"),
    )
    .unwrap();

    let sql = dir.path().join("p.sql");
    std::fs::write(&sql, pipeline("SET checkpoint_interval = '500ms';", ", visibility_timeout = '5s'")).unwrap();
    let ckpt = dir.path().join("ckpt");
    let t0 = std::time::Instant::now();
    let (mut kills, mut resumed) = (0, 0);
    for round in 0..100 {
        let mut c = run_cmd(&sql, &name, "events", &queue, &ckpt);
        if round % 2 == 1 {
            // Between a checkpoint's completion (metadata written) and its commits and deletes.
            c.args(["--test-fault", "commit=400ms"]);
        }
        match run_or_kill(c, Duration::from_millis(rng.u64(1_500..5_000))) {
            (RunEnd::Exited(status), err) => panic!("run {round} ended by itself ({status}): {err}"),
            (RunEnd::Killed, err) => {
                kills += 1;
                assert!(!err.contains("panicked"), "{err}");
                resumed += usize::from(err.contains("resuming from checkpoint"));
            }
        }
        if kills >= 12 && sender.is_finished() {
            break;
        }
    }
    assert_eq!(sender.join().unwrap(), n_events + n_events / 10);
    eprintln!("{kills} kills in {:?}; {} rows landed", t0.elapsed(), rows_so_far(&name, "events"));
    assert!(resumed >= 4, "only {resumed} of {kills} killed runs had resumed from a checkpoint");

    // A last run to the end: ticks move the watermark until every event has landed, then the queue drains (messages
    // the killed runs held come back after their visibility timeout) and the run stops with a final checkpoint.
    let mut quiet_since: Option<std::time::Instant> = None;
    let (status, err) = run_until(run_cmd(&sql, &name, "events", &queue, &ckpt), Duration::from_secs(120), || {
        if rows_so_far(&name, "events") < n_events as i64 {
            aws(&["send", &queue, tick.to_str().unwrap()]);
            return false;
        }
        let (visible, _) = queue_counts(&queue);
        if visible > 0 {
            quiet_since = None;
            return false;
        }
        quiet_since.get_or_insert_with(std::time::Instant::now).elapsed() > Duration::from_secs(4)
    });
    eprintln!("last run done at {:?}", t0.elapsed());
    assert!(status.success(), "{err}");
    assert!(err.contains("resuming from checkpoint"), "{err}");
    let n = n_events as i64;
    assert_eq!(events_in(&name, "events"), (n, n), "every event exactly once");
    assert_eq!(queue_counts(&queue), (0, 0), "every message deleted");
}

#[test]
fn bad_messages_are_dead_lettered_with_their_id_and_reason_and_deleted() {
    let _ = bigquery();
    let name = unique("sqsbad");
    bq_dataset(&name);
    let queue = aws(&["queue", &name]);
    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join("dead");
    let sns = serde_json::json!({"Type": "Notification", "TopicArn": "arn:aws:sns:us-east-1:1:t", "Message": "{}"});
    let sns = sns.to_string();
    let poison = [("not json at all", "not an EventBridge event"), (sns.as_str(), "SNS notification")];
    let mut bodies: Vec<String> = (0..20).map(|n| event_body(n, &name)).collect();
    bodies.insert(3, poison[0].0.to_string());
    bodies.insert(9, poison[1].0.to_string());
    // A field that does not fit its column (n is BIGINT).
    let misfit = event_body(99, &name).replace("\"n\":99", "\"n\":\"ninety-nine\"");
    bodies.insert(15, misfit.clone());
    let file = dir.path().join("bodies.txt");
    std::fs::write(&file, bodies.join("\n")).unwrap();
    aws(&["send", &queue, file.to_str().unwrap()]);
    let tick = dir.path().join("tick.txt");
    std::fs::write(
        &tick,
        event_body(60_000, &name).replace("\"ev-60000\"", "\"tick\"").replace("\"n\":60000", "\"n\":-1"),
    )
    .unwrap();

    let sql = dir.path().join("p.sql");
    let opts = format!(", bad_records = 'dead_letter', dead_letter_path = '{}'", dead.display());
    std::fs::write(&sql, pipeline("SET checkpoint_interval = '500ms';", &opts)).unwrap();
    let (status, err) =
        run_until(run_cmd(&sql, &name, "events", &queue, &dir.path().join("ckpt")), Duration::from_secs(60), || {
            aws(&["send", &queue, tick.to_str().unwrap()]);
            rows_so_far(&name, "events") >= 20
        });
    assert!(status.success(), "{err}");
    assert!(err.contains("3 bad records"), "the run's summary counts them: {err}");
    assert_eq!(events_in(&name, "events"), (20, 20));
    let records = common::read_json_rows(&dead);
    assert_eq!(records.len(), 3, "{records:?}");
    let find =
        |body: &str| records.iter().find(|r| r["record"] == body).unwrap_or_else(|| panic!("{body}: {records:?}"));
    for (body, says) in [(poison[0].0, poison[0].1), (poison[1].0, poison[1].1), (&*misfit, "ninety-nine")] {
        let r = find(body);
        let location = r["location"].as_str().unwrap();
        let id = location.strip_prefix("SQS message ").unwrap_or_else(|| panic!("{r}"));
        assert_eq!(id.len(), 36, "a message id: {r}");
        assert!(r["reason"].as_str().unwrap().contains(says), "{r}");
    }
    // The poison messages went with their checkpoint: nothing comes back.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(queue_counts(&queue), (0, 0));
}

#[test]
fn a_missing_queue_fails_before_the_job_starts_with_the_aws_error() {
    let _ = bigquery();
    let name = unique("sqsmissing");
    bq_dataset(&name);
    let dir = tempfile::tempdir().unwrap();
    let sql = dir.path().join("p.sql");
    std::fs::write(&sql, pipeline("", "")).unwrap();
    let queue = format!("{}/123456789012/{name}", moto()["AWS_ENDPOINT_URL"]);
    let (status, err) = finish(run_cmd(&sql, &name, "events", &queue, &dir.path().join("ckpt")));
    assert!(!status.success());
    assert!(err.contains("QueueDoesNotExist") && err.contains(&queue), "{err}");
}
