//! Checkpoints in S3 (moto on loopback, started by scripts/services/start-moto.sh): a job killed mid-way resumes
//! from its checkpoint in the bucket and the output holds every row exactly once.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::read_json_rows;
use common::services::{create_bucket, moto};

#[test]
fn checkpoints_in_s3_survive_a_kill() {
    let env = moto();
    let bucket = format!("nagare-ckpt-{}", std::process::id());
    create_bucket(&bucket);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let sql = dir.path().join("p.sql");
    std::fs::write(
        &sql,
        r#"
SET parallelism = 2;
SET checkpoint_interval = '100ms';
SET dedup_ttl = '1 minute';
CREATE TABLE events (id TEXT, time TIMESTAMP, WATERMARK FOR time AS time - INTERVAL '5' SECOND)
WITH (connector = 'generator', count = '200000', rate = '10000', duplicate_rate = '0.1', seed = '9', start_time = '2026-01-01T00:00:00Z');
CREATE TABLE out WITH (connector = 'filesystem', path = '${OUT}', format = 'json');
INSERT INTO out SELECT id FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events) WHERE rn = 1;
"#,
    )
    .unwrap();
    let location = format!("s3://{bucket}/jobs/dedup");
    let run = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nagare"));
        c.arg("run")
            .arg(&sql)
            .args(["-q", "--checkpoint-dir", &location, "--var"])
            .arg(format!("OUT={}", out.display()));
        for (k, v) in env {
            c.env(k, v);
        }
        c
    };
    let listing = || {
        let mut list = Command::new(env!("CARGO_BIN_EXE_nagare"));
        list.arg("checkpoints")
            .arg(&sql)
            .args(["--checkpoint-dir", &location, "--var"])
            .arg(format!("OUT={}", out.display()));
        for (k, v) in env {
            list.env(k, v);
        }
        String::from_utf8_lossy(&list.output().unwrap().stdout).into_owned()
    };
    // Kill it once a checkpoint has completed in the bucket (polled, so a slow machine only makes it wait longer).
    let log = dir.path().join("first-run.log");
    let mut child = run().stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let first_log = || std::fs::read_to_string(&log).unwrap_or_default();
        assert!(child.try_wait().unwrap().is_none(), "the job ended before it could be killed: {}", first_log());
        // A line per checkpoint (it starts with the id) that is not "not usable: ... never completed"; the header
        // ("completed (UTC)") must not count either.
        if listing()
            .lines()
            .any(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()) && !l.contains("not usable"))
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no completed checkpoint in the bucket after 60 s: {}",
            first_log()
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let done = run().output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{stderr}");
    assert!(stderr.contains("resuming from checkpoint"), "{stderr}");
    let rows = read_json_rows(&out);
    let ids: BTreeSet<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), rows.len(), "an id twice");
    // 200000 events with ~10% re-deliveries: every original once.
    assert!((175_000..=185_000).contains(&rows.len()), "{} rows", rows.len());
    assert!(start.elapsed() < Duration::from_secs(180));
}
