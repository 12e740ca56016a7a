//! The sqs source against moto (SQS + EventBridge, scripts/services/start-moto.sh) into the BigQuery emulator
//! (scripts/services/start-bqemulator.sh): events put on the bus land once with their fields, every event exactly
//! once across SIGKILLs with re-deliveries, poison messages dead-lettered and deleted, a missing queue refused.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::bq::{count, finish, nagare, rows_so_far, run_until};
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

/// `(visible, in flight)` messages of a queue.
fn queue_counts(queue: &str) -> (u64, u64) {
    let out = aws(&["counts", queue]);
    let mut it = out.split_whitespace().map(|v| v.parse::<u64>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

/// An event (n = -1) years after the others. Rows wait in the dedup until the watermark passes them, and each
/// source subtask holds the watermark back until it has seen a later event (an idle subtask stops holding it only
/// while another one is active), so a test that sends a fixed set of events ends it with ticks.
fn tick_event(source: &str) -> String {
    serde_json::json!({"Source": source, "DetailType": "Tick", "Detail": {"n": -1}, "Time": "2030-01-01T00:00:00Z"})
        .to_string()
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
