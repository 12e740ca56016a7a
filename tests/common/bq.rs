//! Running the `nagare` binary on pipelines into the BigQuery emulator, and counting what landed.
#![allow(dead_code, clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use super::services::{bigquery, bq_log_tail, bq_query};
use super::{RunEnd, run_or_kill};

/// `nagare run <sql> -q <args>` with `${PROJECT}`, `${DATASET}`, `${TABLE}`, `${GRPC}`, `${REST}` filled for the
/// emulator.
pub fn nagare(sql: &std::path::Path, dataset: &str, table: &str, args: &[&str]) -> Command {
    let env = bigquery();
    let mut c = Command::new(env!("CARGO_BIN_EXE_nagare"));
    c.arg("run").arg(sql).arg("-q").args(args);
    for (k, v) in [
        ("PROJECT", env["BIGQUERY_PROJECT"].as_str()),
        ("DATASET", dataset),
        ("TABLE", table),
        ("GRPC", env["BIGQUERY_GRPC_ENDPOINT"].as_str()),
        ("REST", env["BIGQUERY_REST_URL"].as_str()),
    ] {
        c.args(["--var", &format!("{k}={v}")]);
    }
    c.env("NAGARE_LOG", "warn");
    c
}

/// Runs a nagare command to its end, or fails the test (with nagare's and the emulator's logs) if it takes over two
/// minutes: a hang is a failure to diagnose, never a CI timeout.
pub fn finish(cmd: Command) -> (std::process::ExitStatus, String) {
    match run_or_kill(cmd, Duration::from_secs(120)) {
        (RunEnd::Exited(status), stderr) => (status, stderr),
        (RunEnd::Killed, stderr) => panic!("nagare ran over 2 minutes; its stderr:\n{stderr}\n{}", bq_log_tail()),
    }
}

/// `(rows, distinct ids)` of a table in the emulator.
pub fn count(dataset: &str, table: &str) -> (i64, i64) {
    let project = &bigquery()["BIGQUERY_PROJECT"];
    let r = bq_query(&format!("SELECT COUNT(*), COUNT(DISTINCT id) FROM `{project}.{dataset}.{table}`"));
    let n = |i: usize| r[0][i].as_deref().unwrap().parse::<i64>().unwrap();
    (n(0), n(1))
}

/// Rows in a table of the emulator, 0 while it does not exist yet (for polling a running pipeline).
pub fn rows_so_far(dataset: &str, table: &str) -> i64 {
    let project = &bigquery()["BIGQUERY_PROJECT"];
    let v = super::services::bq_rest(
        "POST",
        "queries",
        Some(
            serde_json::json!({"query": format!("SELECT COUNT(*) FROM `{project}.{dataset}.{table}`"), "useLegacySql": false}),
        ),
    );
    v["rows"][0]["f"][0]["v"].as_str().and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// Runs a command that does not end by itself (an unbounded pipeline) until `done()` holds, then stops it as Ctrl-C
/// does (SIGINT: a final checkpoint, then exit); fails the test with its stderr if `done` does not hold within
/// `limit` or it does not exit within a minute after. Returns its exit status and stderr.
pub fn run_until(
    mut cmd: Command,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> (std::process::ExitStatus, String) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = cmd.stdout(std::process::Stdio::null()).stderr(log.reopen().unwrap()).spawn().unwrap();
    let stderr = || std::fs::read_to_string(log.path()).unwrap_or_default();
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, stderr());
        }
        if done() {
            break;
        }
        if std::time::Instant::now() >= deadline {
            // Stopped as Ctrl-C does, so its stderr ends with the run's summary.
            let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
            std::thread::sleep(Duration::from_secs(5));
            let _ = child.kill();
            let _ = child.wait();
            panic!("the pipeline did not get there in {limit:?}; its stderr:\n{}\n{}", stderr(), bq_log_tail());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, stderr());
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the pipeline did not stop within a minute of SIGINT; its stderr:\n{}", stderr());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
