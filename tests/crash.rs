//! Exactly once, proven by crashing: the `nagare` binary runs a pipeline with dedup and windows over generated
//! input with checkpoints every 100 ms, is SIGKILLed at random moments (some while state uploads or between the
//! commit point and the sinks' commit, widened by fault-injection delays), restarted each time, and finally allowed
//! to finish. The output must then hold every expected row exactly once, checked against an independent
//! computation. A second test damages checkpoints and checks that an older intact one is used, with a warning.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{RunEnd, files_with, read_json_rows, run_or_kill};

const BASE_MS: i64 = 1_767_225_600_000;

struct Event {
    id: String,
    t_ms: i64,
    tenant: i64,
    cents: i64,
}

/// Originals 20 ms apart, shuffled locally (under the watermark delay), plus re-deliveries up to 3000 arrivals later.
fn input(dir: &Path, n: usize, seed: u64) -> Vec<Event> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let originals: Vec<Event> = (0..n)
        .map(|i| Event {
            id: format!("e{i:07}"),
            t_ms: i as i64 * 20,
            tenant: rng.i64(1..=25),
            cents: rng.i64(1..10_000),
        })
        .collect();
    let mut order: Vec<(f64, usize)> = (0..n).map(|i| (i as f64 + rng.f64() * 60.0, i)).collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut lines: Vec<String> = Vec::new();
    let mut dups: Vec<(usize, usize)> = Vec::new();
    let line = |e: &Event| {
        let t = chrono::DateTime::from_timestamp_millis(BASE_MS + e.t_ms)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        format!(r#"{{"id":"{}","time":"{t}","tenant":{},"cents":{}}}"#, e.id, e.tenant, e.cents)
    };
    for (pos, (_, i)) in order.iter().enumerate() {
        lines.push(line(&originals[*i]));
        if rng.f64() < 0.1 {
            dups.push((pos + 1 + rng.usize(0..3000), *i));
        }
        dups.retain(|(at, d)| {
            if *at <= pos {
                lines.push(line(&originals[*d]));
                false
            } else {
                true
            }
        });
    }
    lines.extend(dups.iter().map(|(_, d)| line(&originals[*d])));
    // Four files, plain and gzip, so splits, offsets in compressed streams and file boundaries are all crossed.
    let per = lines.len().div_ceil(4);
    for (k, chunk) in lines.chunks(per).enumerate() {
        let text: String = chunk.iter().map(|l| format!("{l}\n")).collect();
        if k % 2 == 0 {
            std::fs::write(dir.join(format!("part-{k}.jsonl")), text).unwrap();
        } else {
            let f = std::fs::File::create(dir.join(format!("part-{k}.jsonl.gz"))).unwrap();
            let mut w = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
            std::io::Write::write_all(&mut w, text.as_bytes()).unwrap();
            w.finish().unwrap();
        }
    }
    originals
}

const PIPELINE: &str = r#"
SET parallelism = 2;
SET batch_size = 250;
SET dedup_ttl = '10 minutes';
SET checkpoint_interval = '100ms';
CREATE TABLE events (
  id TEXT, time TIMESTAMP, tenant BIGINT, cents BIGINT,
  WATERMARK FOR time AS time - INTERVAL '3' SECOND
) WITH (connector = 'filesystem', path = '${IN}/*', split_size = '200KB');
CREATE TABLE deduped WITH (connector = 'filesystem', path = '${OUT}/deduped', format = 'json', rollover_rows = 3000);
CREATE TABLE per_tenant WITH (connector = 'filesystem', path = '${OUT}/per_tenant', format = 'json');
INSERT INTO deduped
SELECT id, time, tenant, cents FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events) WHERE rn = 1;
INSERT INTO per_tenant
SELECT tenant, TUMBLE_START(time, INTERVAL '10' SECOND) AS ws, COUNT(*) AS n, SUM(cents) AS total
FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events) WHERE rn = 1
GROUP BY tenant, TUMBLE(time, INTERVAL '10' SECOND);
"#;

fn nagare(dir: &Path, faults: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nagare"));
    c.arg("run")
        .arg(dir.join("pipeline.sql"))
        .args(["--quiet", "--checkpoint-dir"])
        .arg(dir.join("ckpt"))
        .args([
            "--var",
            &format!("IN={}", dir.join("in").display()),
            "--var",
            &format!("OUT={}", dir.join("out").display()),
        ])
        .env("NAGARE_LOG", "error");
    for f in faults {
        c.args(["--test-fault", f]);
    }
    c
}

fn ts_ms(v: &serde_json::Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap().timestamp_millis() - BASE_MS
}

/// Events as (id, time, tenant, cents), to compare with what a sink wrote.
fn event_set(events: &[Event]) -> BTreeSet<(String, i64, i64, i64)> {
    events.iter().map(|e| (e.id.clone(), e.t_ms, e.tenant, e.cents)).collect()
}

/// Written rows as (id, time, tenant, cents).
fn row_set(rows: &[serde_json::Value]) -> BTreeSet<(String, i64, i64, i64)> {
    rows.iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                ts_ms(&r["time"]),
                r["tenant"].as_i64().unwrap(),
                r["cents"].as_i64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("in")).unwrap();
    let originals = input(&dir.path().join("in"), 100_000, 99);
    // Paced to some 2.5 s a run, so that kills land in runs that have checkpointed, on a quiet machine (where the
    // input took about a second) and a loaded one alike.
    let sql = PIPELINE.replace(
        "SET checkpoint_interval = '100ms';",
        "SET checkpoint_interval = '100ms';\nSET source_rate_limit = 40000;",
    );
    std::fs::write(dir.path().join("pipeline.sql"), sql).unwrap();

    let mut rng = fastrand::Rng::with_seed(4242);
    let mut kills = 0;
    let mut resumed: Vec<u64> = Vec::new();
    let mut restarts_from_scratch = 0;
    let mut finished = false;
    let faults: [&[&str]; 3] = [&[], &["upload=120ms"], &["commit=150ms"]];
    for round in 0..40 {
        // Kill within a run (about 2.5 s), mostly after its first checkpoints.
        let after = Duration::from_millis(rng.u64(300..2_200));
        match run_or_kill(nagare(dir.path(), faults[round % 3]), after) {
            (RunEnd::Exited(status), err) => {
                assert!(status.success(), "run {round} failed: {err}");
                finished = true;
                if kills >= 10 {
                    break;
                }
                // Finished before being killed: start over from scratch to get more kills in.
                std::fs::remove_dir_all(dir.path().join("ckpt")).unwrap();
                std::fs::remove_dir_all(dir.path().join("out")).unwrap();
                finished = false;
                restarts_from_scratch += 1;
            }
            (RunEnd::Killed, err) => {
                kills += 1;
                if let Some(id) =
                    err.split("resuming from checkpoint ").nth(1).and_then(|t| t.split_whitespace().next())
                {
                    resumed.push(id.parse::<u64>().unwrap());
                }
            }
        }
        if kills >= 12 {
            break;
        }
    }
    assert!(kills >= 10, "only {kills} kills landed");
    // The kills must have hit a job that had made progress: most restarts resumed from a checkpoint.
    assert!(
        resumed.len() >= 6,
        "only {} of {kills} killed runs had resumed from a checkpoint: {resumed:?}",
        resumed.len()
    );
    eprintln!(
        "{kills} kills, {restarts_from_scratch} runs finished early; killed runs had resumed from checkpoints {resumed:?}"
    );
    if !finished {
        let out = nagare(dir.path(), &[]).output().unwrap();
        assert!(out.status.success(), "final run failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    // Nothing half-written is visible, and nothing in progress is left behind.
    assert!(files_with(&dir.path().join("out"), &[".inprogress"]).is_empty());
    let rows = read_json_rows(&dir.path().join("out/deduped"));
    let mut seen = BTreeMap::new();
    for r in &rows {
        *seen.entry(r["id"].as_str().unwrap().to_string()).or_insert(0) += 1;
    }
    let dup: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(dup.is_empty(), "duplicated ids after {kills} kills: {dup:?}");
    let want = event_set(&originals);
    let got = row_set(&rows);
    let missing: Vec<_> = want.difference(&got).take(5).collect();
    assert!(
        missing.is_empty(),
        "missing rows after {kills} kills: {missing:?} ({} of {})",
        want.len() - got.len(),
        want.len()
    );
    assert_eq!(rows.len(), originals.len());

    let mut want: BTreeMap<(i64, i64), (i64, i64)> = BTreeMap::new();
    for e in &originals {
        let s = want.entry((e.tenant, e.t_ms - e.t_ms.rem_euclid(10_000))).or_default();
        s.0 += 1;
        s.1 += e.cents;
    }
    let windows = read_json_rows(&dir.path().join("out/per_tenant"));
    let got: BTreeMap<(i64, i64), (i64, i64)> = windows
        .iter()
        .map(|r| {
            ((r["tenant"].as_i64().unwrap(), ts_ms(&r["ws"])), (r["n"].as_i64().unwrap(), r["total"].as_i64().unwrap()))
        })
        .collect();
    assert_eq!(windows.len(), got.len(), "a window emitted twice");
    assert_eq!(got, want);
}

#[test]
fn a_damaged_checkpoint_is_skipped_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("in")).unwrap();
    // Enough input and checkpoints often enough for at least four, even when the machine is fast.
    input(&dir.path().join("in"), 40_000, 5);
    std::fs::write(
        dir.path().join("pipeline.sql"),
        PIPELINE.replace(
            "SET checkpoint_interval = '100ms';",
            "SET checkpoint_interval = '20ms';\nSET checkpoints_retained = 10;",
        ),
    )
    .unwrap();
    let out = nagare(dir.path(), &[]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ckpt = dir.path().join("ckpt");
    let mut ids: Vec<u64> = std::fs::read_dir(&ckpt)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_string_lossy().strip_prefix("chk-").and_then(|n| n.parse().ok()))
        .collect();
    ids.sort();
    assert!(ids.len() >= 4, "expected several checkpoints, got {ids:?}");
    let chk = |id: u64| ckpt.join(format!("chk-{id:010}"));
    let n = ids.len();
    // Newest: a truncated state file. Next: a missing state file. Next: metadata that is not JSON.
    let truncate = files_with(&chk(ids[n - 1]), &[".parquet"])
        .into_iter()
        .max_by_key(|f| std::fs::metadata(f).unwrap().len())
        .unwrap();
    let len = std::fs::metadata(&truncate).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&truncate).unwrap().set_len(len / 2).unwrap();
    std::fs::remove_file(&files_with(&chk(ids[n - 2]), &[".parquet"])[0]).unwrap();
    std::fs::write(chk(ids[n - 3]).join("_metadata.json"), b"{ not json").unwrap();

    let listing = Command::new(env!("CARGO_BIN_EXE_nagare"))
        .arg("checkpoints")
        .arg(dir.path().join("pipeline.sql"))
        .arg("--checkpoint-dir")
        .arg(&ckpt)
        .args([
            "--var",
            &format!("IN={}", dir.path().join("in").display()),
            "--var",
            &format!("OUT={}", dir.path().join("out").display()),
        ])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.contains("not usable"), "{listing}");

    let out = nagare(dir.path(), &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for (id, why) in [(ids[n - 1], "truncated"), (ids[n - 2], "missing"), (ids[n - 3], "not valid")] {
        assert!(
            stderr.contains(&format!("checkpoint {id} in")) && stderr.contains(why),
            "warning about {id} ({why}): {stderr}"
        );
    }
    assert!(stderr.contains(&format!("resuming from checkpoint {}", ids[n - 4])), "{stderr}");
}

#[test]
fn checkpoints_that_keep_failing_fail_the_job_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("in")).unwrap();
    input(&dir.path().join("in"), 5_000, 3);
    let sql = PIPELINE.replace(
        "SET checkpoint_interval = '100ms';",
        "SET checkpoint_interval = '50ms';\nSET checkpoint_timeout = '100ms';\nSET checkpoint_tolerable_failures = 2;",
    );
    std::fs::write(dir.path().join("pipeline.sql"), sql).unwrap();
    // Every state upload takes longer than the timeout.
    let out = nagare(dir.path(), &["upload=400ms"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("3 checkpoints in a row failed") && stderr.contains("timed out waiting for"), "{stderr}");
}

#[test]
fn dedup_state_is_incremental_and_a_damaged_chain_is_not_silently_dropped() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("in")).unwrap();
    input(&dir.path().join("in"), 20_000, 7);
    // Every 100 ms over input paced to half a second: several checkpoints however fast the machine (unpaced, a quiet
    // one read it all before the first), and few enough (under the 50 deltas after which a new base is written) that
    // the last one extends a chain even on a slow one.
    let sql = PIPELINE.replace(
        "SET checkpoint_interval = '100ms';",
        "SET checkpoint_interval = '100ms';\nSET checkpoints_retained = 1;\nSET source_rate_limit = 40000;",
    );
    std::fs::write(dir.path().join("pipeline.sql"), sql).unwrap();
    let out = nagare(dir.path(), &[]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let ckpt = dir.path().join("ckpt");
    let dirs = files_with(&ckpt, &["_metadata.json"]);
    assert_eq!(dirs.len(), 1, "one checkpoint retained: {dirs:?}");
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&dirs[0]).unwrap()).unwrap();
    let id = meta["id"].as_u64().unwrap();
    let files: Vec<&serde_json::Value> =
        meta["tasks"].as_array().unwrap().iter().flat_map(|t| t["state"].as_object().unwrap().values()).collect();
    let files: Vec<&serde_json::Value> = files.iter().flat_map(|f| f.as_array().unwrap()).collect();
    // The dedup's keys are a chain: files written by earlier checkpoints are still referred to.
    assert!(files.iter().any(|f| f["checkpoint"].as_u64().unwrap() < id), "no incremental state: {meta}");
    assert!(meta["bytes_written"].as_u64().unwrap() < meta["bytes"].as_u64().unwrap(), "{meta}");
    // Shared files nothing refers to any more were deleted.
    let referenced: BTreeSet<String> = files.iter().map(|f| f["path"].as_str().unwrap().to_string()).collect();
    let shared: BTreeSet<String> = std::fs::read_dir(ckpt.join("shared"))
        .unwrap()
        .map(|e| format!("shared/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    assert!(!shared.is_empty() && shared.is_subset(&referenced), "{shared:?} vs {referenced:?}");

    // The only checkpoint loses a file of its chain: starting over would write committed output again, so the run
    // is refused unless asked for.
    std::fs::remove_file(ckpt.join(shared.iter().next().unwrap())).unwrap();
    let out = nagare(dir.path(), &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("no usable checkpoint") && stderr.contains("--from-scratch"), "{stderr}");
}

/// Out-of-order input through keep-first and keep-last dedup with a two-hour TTL. `order` gives the arrival order
/// of the deliveries (index into `originals`, one entry per delivery).
fn write_deliveries(dir: &Path, originals: &[Event], order: &[usize]) {
    let text: Vec<String> = order
        .iter()
        .map(|i| {
            let e = &originals[*i];
            let t = chrono::DateTime::from_timestamp_millis(BASE_MS + e.t_ms)
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            format!("{{\"id\":\"{}\",\"time\":\"{t}\",\"tenant\":{},\"cents\":{}}}\n", e.id, e.tenant, e.cents)
        })
        .collect();
    let half = text.len() / 2;
    std::fs::write(dir.join("part-0.jsonl"), text[..half].concat()).unwrap();
    std::fs::write(dir.join("part-1.jsonl"), text[half..].concat()).unwrap();
}

const OUT_OF_ORDER: &str = r#"
SET parallelism = 2;
SET batch_size = 250;
SET dedup_ttl = '2 hours';
SET checkpoint_interval = '100ms';
CREATE TABLE events (
  id TEXT, time TIMESTAMP, tenant BIGINT, cents BIGINT,
  WATERMARK FOR time AS time - INTERVAL '5' SECOND
) WITH (connector = 'filesystem', path = '${IN}/*', split_size = '200KB');
CREATE TABLE kept_first WITH (connector = 'filesystem', path = '${OUT}/first', format = 'json', rollover_rows = 3000);
CREATE TABLE kept_last WITH (connector = 'filesystem', path = '${OUT}/last', format = 'json', rollover_rows = 3000);
INSERT INTO kept_first
SELECT id, time, tenant, cents FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events) WHERE rn = 1;
INSERT INTO kept_last
SELECT id, time, tenant, cents FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time DESC) AS rn FROM events) WHERE rn = 1;
"#;

/// Checks that `out/first` and `out/last` hold every original exactly once.
fn assert_every_original_once(dir: &Path, originals: &[Event], what: &str) {
    let want = event_set(originals);
    for sink in ["first", "last"] {
        let rows = read_json_rows(&dir.join("out").join(sink));
        let got = row_set(&rows);
        let missing = want.difference(&got).count();
        assert_eq!(missing, 0, "{what}, keep-{sink}: {missing} of {} ids missing", want.len());
        assert_eq!(rows.len(), want.len(), "{what}, keep-{sink}: an id written twice");
    }
}

/// Runs the out-of-order pipeline over `order` without checkpoints, then with checkpoints while SIGKILLing it
/// `kills` times; both must write every original exactly once.
fn out_of_order_exactly_once(originals: &[Event], order: &[usize], kills_wanted: usize, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("in")).unwrap();
    write_deliveries(&dir.path().join("in"), originals, order);
    std::fs::write(dir.path().join("pipeline.sql"), OUT_OF_ORDER).unwrap();

    // Without checkpoints.
    let out = Command::new(env!("CARGO_BIN_EXE_nagare"))
        .arg("run")
        .arg(dir.path().join("pipeline.sql"))
        .arg("--quiet")
        .args(["--var", &format!("IN={}", dir.path().join("in").display())])
        .args(["--var", &format!("OUT={}", dir.path().join("out").display())])
        .env("NAGARE_LOG", "error")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "run without checkpoints failed: {err}");
    assert!(err.contains(" 0 late,"), "a dedup dropped rows as late: {err}");
    assert_every_original_once(dir.path(), originals, "without checkpoints");
    std::fs::remove_dir_all(dir.path().join("out")).unwrap();

    // With checkpoints, killed at random moments.
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut kills = 0;
    let mut finished = false;
    // A run of this input takes well under a second on a quiet machine: kill early and often enough that the kills
    // land, with 100 ms checkpoints so that most killed runs have made progress.
    for round in 0..80 {
        match run_or_kill(nagare(dir.path(), &[]), Duration::from_millis(rng.u64(100..900))) {
            (RunEnd::Exited(status), err) => {
                assert!(status.success(), "run {round} failed: {err}");
                finished = true;
                if kills >= kills_wanted {
                    break;
                }
                std::fs::remove_dir_all(dir.path().join("ckpt")).unwrap();
                std::fs::remove_dir_all(dir.path().join("out")).unwrap();
                finished = false;
            }
            (RunEnd::Killed, _) => kills += 1,
        }
        if kills >= kills_wanted {
            break;
        }
    }
    assert!(kills >= kills_wanted, "only {kills} kills landed");
    if !finished {
        let out = nagare(dir.path(), &[]).output().unwrap();
        assert!(out.status.success(), "final run failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_every_original_once(dir.path(), originals, &format!("after {kills} SIGKILLs"));
}

/// Originals 100 ms apart (about 67 minutes of event time) and a 10 % share delivered twice.
fn out_of_order_events(n: usize, rng: &mut fastrand::Rng) -> (Vec<Event>, Vec<(i64, usize)>) {
    let originals: Vec<Event> = (0..n)
        .map(|i| Event {
            id: format!("e{i:07}"),
            t_ms: i as i64 * 100,
            tenant: rng.i64(1..=25),
            cents: rng.i64(1..10_000),
        })
        .collect();
    // (arrival, original): in event-time order, copies up to 30 s after their original.
    let mut deliveries: Vec<(i64, usize)> = (0..n).map(|i| (i as i64 * 100, i)).collect();
    for i in 0..n {
        if rng.f64() < 0.1 {
            deliveries.push((i as i64 * 100 + rng.i64(0..30_000), i));
        }
    }
    deliveries.sort();
    (originals, deliveries)
}

#[test]
fn input_whose_first_part_comes_last_is_deduplicated_exactly_once_under_sigkill() {
    // The issue's case 1: the first 15 % of the input arrives after the rest, far behind the watermark.
    let mut rng = fastrand::Rng::with_seed(11);
    let (originals, deliveries) = out_of_order_events(40_000, &mut rng);
    let mut order: Vec<usize> = deliveries.iter().map(|d| d.1).collect();
    let moved = order.len() * 15 / 100;
    order.rotate_left(moved);
    out_of_order_exactly_once(&originals, &order, 10, 12);
}

#[test]
fn deliveries_up_to_an_hour_late_are_deduplicated_exactly_once_under_sigkill() {
    // As an SQS queue delivers: 10 % of deliveries (originals or copies) arrive up to an hour late.
    let mut rng = fastrand::Rng::with_seed(21);
    let (originals, mut deliveries) = out_of_order_events(40_000, &mut rng);
    for d in deliveries.iter_mut() {
        if rng.f64() < 0.1 {
            d.0 += rng.i64(0..3_600_000);
        }
    }
    deliveries.sort();
    let order: Vec<usize> = deliveries.iter().map(|d| d.1).collect();
    out_of_order_exactly_once(&originals, &order, 10, 22);
}
