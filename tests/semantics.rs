//! Streaming results checked row by row against an independent computation over the same input: dedup (keep first,
//! keep last in a window) and TUMBLE/HOP/SESSION aggregates, with out-of-order input, re-deliveries that cross batch
//! and split boundaries, several source subtasks and hash-partitioned operators.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::{read_json_rows, run_sql};

const BASE_MS: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

#[derive(Clone, Debug)]
struct Event {
    id: String,
    t_ms: i64,
    tenant: i64,
    cents: i64,
}

fn line(e: &Event) -> String {
    let t = chrono::DateTime::from_timestamp_millis(BASE_MS + e.t_ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    format!(
        r#"{{"id":"{}","time":"{t}","tenant":{},"cents":{},"pad":"{}"}}"#,
        e.id,
        e.tenant,
        e.cents,
        "x".repeat(e.cents as usize % 40)
    )
}

/// Arrival order: originals 50 ms apart, locally shuffled (at most 2 s out of order, under the 5 s watermark delay),
/// and re-deliveries of earlier events (same line) inserted up to `lag` arrivals later.
fn arrivals(rng: &mut fastrand::Rng, originals: &[Event], dup_rate: f64, lag: usize) -> Vec<Event> {
    let mut keyed: Vec<(f64, Event)> =
        originals.iter().enumerate().map(|(i, e)| (i as f64 + rng.f64() * 40.0, e.clone())).collect();
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
    let order: Vec<Event> = keyed.into_iter().map(|(_, e)| e).collect();
    let mut out = Vec::with_capacity(order.len() * 2);
    let mut pending: Vec<(usize, Event)> = Vec::new();
    for (pos, e) in order.into_iter().enumerate() {
        out.push(e.clone());
        if rng.f64() < dup_rate {
            pending.push((pos + 1 + rng.usize(0..lag), e));
        }
        pending.retain(|(at, d)| {
            if *at <= pos {
                out.push(d.clone());
                false
            } else {
                true
            }
        });
    }
    out.extend(pending.into_iter().map(|(_, d)| d));
    out
}

fn originals(rng: &mut fastrand::Rng, n: usize, tenants: i64, ids: Option<usize>) -> Vec<Event> {
    (0..n)
        .map(|i| Event {
            id: match ids {
                Some(k) => format!("doc-{}", rng.usize(0..k)),
                None => format!("e{i:07}"),
            },
            t_ms: i as i64 * 50 + rng.i64(0..50),
            tenant: rng.i64(1..=tenants),
            cents: rng.i64(1..10_000),
        })
        .collect()
}

/// Writes the arrival order into `files` files (contiguous pieces, as a producer rolling files would).
fn write_input(dir: &Path, events: &[Event], files: usize) {
    let per = events.len().div_ceil(files);
    for (k, chunk) in events.chunks(per).enumerate() {
        let text: String = chunk.iter().map(|e| line(e) + "\n").collect();
        std::fs::write(dir.join(format!("part-{k}.jsonl")), text).unwrap();
    }
}

fn ts_ms(v: &serde_json::Value) -> i64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a timestamp: {v}"));
    chrono::DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("{s}: {e}")).timestamp_millis() - BASE_MS
}

const SOURCE: &str = r#"
CREATE TABLE events (
  id TEXT,
  time TIMESTAMP,
  tenant BIGINT,
  cents BIGINT,
  WATERMARK FOR time AS time - INTERVAL '5' SECOND
) WITH (connector = 'filesystem', path = '${IN}', format = 'json', split_size = '64KB');
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_and_windows_match_an_independent_computation() {
    let mut rng = fastrand::Rng::with_seed(20261127);
    let orig = originals(&mut rng, 12_000, 40, None);
    let arrived = arrivals(&mut rng, &orig, 0.15, 2_000);
    assert!(arrived.len() > orig.len() + 1_000);
    let input = tempfile::tempdir().unwrap();
    write_input(input.path(), &arrived, 3);
    let out = tempfile::tempdir().unwrap();

    let sql = format!("SET parallelism = 3;\nSET batch_size = 97;\nSET dedup_ttl = '10 minutes';\n{SOURCE}")
        + r#"
CREATE TABLE deduped WITH (connector = 'filesystem', path = '${OUT}/deduped', format = 'json');
CREATE TABLE tumble WITH (connector = 'filesystem', path = '${OUT}/tumble', format = 'json');
CREATE TABLE hop WITH (connector = 'filesystem', path = '${OUT}/hop', format = 'json');
CREATE TABLE session WITH (connector = 'filesystem', path = '${OUT}/session', format = 'json');

INSERT INTO deduped
SELECT id, time, tenant, cents FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events) WHERE rn = 1;

INSERT INTO tumble
SELECT tenant, TUMBLE_START(time, INTERVAL '10' SECOND) AS ws, COUNT(*) AS n, SUM(cents) AS total, MIN(cents) AS lo, MAX(cents) AS hi
FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events) WHERE rn = 1
GROUP BY tenant, TUMBLE(time, INTERVAL '10' SECOND);

INSERT INTO hop
SELECT tenant, HOP_START(time, INTERVAL '5' SECOND, INTERVAL '15' SECOND) AS ws, COUNT(*) AS n, SUM(cents) AS total
FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events) WHERE rn = 1
GROUP BY tenant, HOP(time, INTERVAL '5' SECOND, INTERVAL '15' SECOND);

INSERT INTO session
SELECT tenant, SESSION_START(time, INTERVAL '3' SECOND) AS ws, SESSION_END(time, INTERVAL '3' SECOND) AS we, COUNT(*) AS n, SUM(cents) AS total
FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events) WHERE rn = 1
GROUP BY tenant, SESSION(time, INTERVAL '3' SECOND);
"#;
    let in_glob = format!("{}/*.jsonl", input.path().display());
    let summary = run_sql(&sql, &[("IN", &in_glob), ("OUT", out.path().to_str().unwrap())])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(summary.rows_read as usize, arrived.len());
    assert_eq!(summary.late_rows, 0, "no original is later than the watermark delay");

    // Dedup: every original exactly once.
    let got: BTreeSet<(String, i64, i64, i64)> = read_json_rows(&out.path().join("deduped"))
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                ts_ms(&r["time"]),
                r["tenant"].as_i64().unwrap(),
                r["cents"].as_i64().unwrap(),
            )
        })
        .collect();
    let rows = read_json_rows(&out.path().join("deduped"));
    assert_eq!(rows.len(), orig.len(), "one row per id");
    let want: BTreeSet<(String, i64, i64, i64)> =
        orig.iter().map(|e| (e.id.clone(), e.t_ms, e.tenant, e.cents)).collect();
    assert_eq!(got, want);

    // TUMBLE(10 s) per tenant.
    let mut want: BTreeMap<(i64, i64), (i64, i64, i64, i64)> = BTreeMap::new();
    for e in &orig {
        let ws = e.t_ms - e.t_ms.rem_euclid(10_000);
        let s = want.entry((e.tenant, ws)).or_insert((0, 0, i64::MAX, i64::MIN));
        s.0 += 1;
        s.1 += e.cents;
        s.2 = s.2.min(e.cents);
        s.3 = s.3.max(e.cents);
    }
    let got: BTreeMap<(i64, i64), (i64, i64, i64, i64)> = read_json_rows(&out.path().join("tumble"))
        .iter()
        .map(|r| {
            (
                (r["tenant"].as_i64().unwrap(), ts_ms(&r["ws"])),
                (
                    r["n"].as_i64().unwrap(),
                    r["total"].as_i64().unwrap(),
                    r["lo"].as_i64().unwrap(),
                    r["hi"].as_i64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(got.len(), read_json_rows(&out.path().join("tumble")).len(), "one row per window and key");
    assert_eq!(got, want);

    // HOP(slide 5 s, size 15 s) per tenant.
    let mut want: BTreeMap<(i64, i64), (i64, i64)> = BTreeMap::new();
    for e in &orig {
        let last = e.t_ms - e.t_ms.rem_euclid(5_000);
        for k in 0..3 {
            let ws = last - k * 5_000;
            let s = want.entry((e.tenant, ws)).or_default();
            s.0 += 1;
            s.1 += e.cents;
        }
    }
    let got: BTreeMap<(i64, i64), (i64, i64)> = read_json_rows(&out.path().join("hop"))
        .iter()
        .map(|r| {
            ((r["tenant"].as_i64().unwrap(), ts_ms(&r["ws"])), (r["n"].as_i64().unwrap(), r["total"].as_i64().unwrap()))
        })
        .collect();
    assert_eq!(got, want);

    // SESSION(gap 3 s) per tenant.
    let mut by_tenant: BTreeMap<i64, Vec<&Event>> = BTreeMap::new();
    for e in &orig {
        by_tenant.entry(e.tenant).or_default().push(e);
    }
    let mut want: BTreeSet<(i64, i64, i64, i64, i64)> = BTreeSet::new();
    for (tenant, mut evs) in by_tenant {
        evs.sort_by_key(|e| e.t_ms);
        let (mut start, mut last, mut n, mut total) = (evs[0].t_ms, evs[0].t_ms, 0, 0);
        for e in evs {
            if e.t_ms >= last + 3_000 {
                want.insert((tenant, start, last + 3_000, n, total));
                (start, n, total) = (e.t_ms, 0, 0);
            }
            last = e.t_ms;
            n += 1;
            total += e.cents;
        }
        want.insert((tenant, start, last + 3_000, n, total));
    }
    let got: BTreeSet<(i64, i64, i64, i64, i64)> = read_json_rows(&out.path().join("session"))
        .iter()
        .map(|r| {
            (
                r["tenant"].as_i64().unwrap(),
                ts_ms(&r["ws"]),
                ts_ms(&r["we"]),
                r["n"].as_i64().unwrap(),
                r["total"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_last_per_window_matches_an_independent_computation() {
    let mut rng = fastrand::Rng::with_seed(7);
    // 300 documents updated many times: the latest version per document and minute wins.
    let orig = originals(&mut rng, 8_000, 5, Some(300));
    let arrived = arrivals(&mut rng, &orig, 0.05, 500);
    let input = tempfile::tempdir().unwrap();
    write_input(input.path(), &arrived, 2);
    let out = tempfile::tempdir().unwrap();
    let sql = format!(
        "SET parallelism = 2;\nSET batch_size = 50;\n{SOURCE}\n{}",
        r#"
CREATE TABLE latest WITH (connector = 'filesystem', path = '${OUT}/latest', format = 'json');
INSERT INTO latest
SELECT id, time, cents FROM (
  SELECT *, ROW_NUMBER() OVER (PARTITION BY id, TUMBLE(time, INTERVAL '1' MINUTE) ORDER BY time DESC) AS rn FROM events)
WHERE rn = 1;
"#
    );
    let in_glob = format!("{}/*.jsonl", input.path().display());
    run_sql(&sql, &[("IN", &in_glob), ("OUT", out.path().to_str().unwrap())]).await.unwrap_or_else(|e| panic!("{e}"));
    let mut want: BTreeMap<(String, i64), (i64, i64)> = BTreeMap::new();
    for e in &orig {
        let ws = e.t_ms - e.t_ms.rem_euclid(60_000);
        let slot = want.entry((e.id.clone(), ws)).or_insert((i64::MIN, 0));
        if e.t_ms > slot.0 {
            *slot = (e.t_ms, e.cents);
        }
    }
    let rows = read_json_rows(&out.path().join("latest"));
    let got: BTreeMap<(String, i64), (i64, i64)> = rows
        .iter()
        .map(|r| {
            let t = ts_ms(&r["time"]);
            ((r["id"].as_str().unwrap().to_string(), t - t.rem_euclid(60_000)), (t, r["cents"].as_i64().unwrap()))
        })
        .collect();
    assert_eq!(rows.len(), got.len(), "one row per id and window");
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generator_redeliveries_are_removed_exactly() {
    use nagare_connectors::generator::{EventStream, w1_config};
    let out = tempfile::tempdir().unwrap();
    let sql = r#"
SET parallelism = 2;
SET batch_size = 500;
SET dedup_ttl = '10 minutes';
CREATE TABLE events (id TEXT, time TIMESTAMP, WATERMARK FOR time AS time - INTERVAL '5' SECOND)
WITH (connector = 'generator', count = '20000', duplicate_rate = '0.2', seed = '5');
CREATE TABLE out WITH (connector = 'filesystem', path = '${OUT}/out', format = 'json');
INSERT INTO out SELECT id FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events) WHERE rn = 1;
"#;
    let summary = run_sql(sql, &[("OUT", out.path().to_str().unwrap())]).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(summary.rows_read, 20_000);
    // The same streams, replayed: the ids of the originals each subtask emitted.
    let mut want = BTreeSet::new();
    for subtask in 0..2u64 {
        let mut cfg = w1_config(5, 0.2);
        cfg.start_us = 1_767_225_600_000_000;
        let mut s = EventStream::new(cfg, subtask, 2);
        let mut text = String::new();
        for _ in 0..10_000 {
            text.clear();
            if !s.next_line(&mut text) {
                let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
                want.insert(v["id"].as_str().unwrap().to_string());
            }
        }
    }
    let rows = read_json_rows(&out.path().join("out"));
    let got: BTreeSet<String> = rows.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(rows.len(), got.len(), "no id twice");
    assert_eq!(got, want);
    assert_eq!(summary.duplicates as usize, 20_000 - want.len());
}
