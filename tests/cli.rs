//! The `nagare` binary end to end: run, explain, errors and exit codes, Ctrl-C, metrics, gen.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use arrow::array::{AsArray, Int64Array};
use common::{files_with, read_parquet, repo_root};

fn nagare() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nagare"));
    c.env("NAGARE_LOG", "warn");
    c
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A copy of the quickstart (SQL and sample data) in a fresh directory.
fn quickstart_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = repo_root();
    std::fs::create_dir_all(dir.path().join("sql/examples/data")).unwrap();
    for f in ["sql/examples/quickstart.sql", "sql/examples/data/events.jsonl"] {
        std::fs::copy(root.join(f), dir.path().join(f)).unwrap();
    }
    dir
}

/// Waits (up to a minute) for a run told to stop by `what` to exit; its exit status and stderr.
fn wait_exit(child: &mut std::process::Child, what: &str) -> (std::process::ExitStatus, String) {
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "did not stop after {what}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (status, stderr)
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn quickstart_runs_and_its_results_add_up() {
    let dir = quickstart_dir();
    let out = nagare().arg("run").arg("sql/examples/quickstart.sql").current_dir(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("done in"), "final summary: {stderr}");

    // Independent: distinct ids in the input.
    let input = std::fs::read_to_string(dir.path().join("sql/examples/data/events.jsonl")).unwrap();
    let ids: BTreeSet<String> = input
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.len() < input.lines().count(), "the sample has re-deliveries");

    let events = read_parquet(&dir.path().join("target/quickstart/events"));
    let got: Vec<String> = events
        .iter()
        .flat_map(|b| b.column(0).as_string::<i32>().iter().map(|s| s.unwrap().to_string()).collect::<Vec<_>>())
        .collect();
    assert_eq!(got.len(), ids.len(), "each event once");
    assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), ids);

    let minutes = read_parquet(&dir.path().join("target/quickstart/tenant_minutes"));
    let total: i64 = minutes
        .iter()
        .map(|b| {
            b.column_by_name("events")
                .unwrap()
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .iter()
                .map(|v| v.unwrap())
                .sum::<i64>()
        })
        .sum();
    assert_eq!(total as usize, ids.len(), "per-minute counts add up to the unique events");
    assert!(files_with(&dir.path().join("target/quickstart"), &[".inprogress"]).is_empty());
}

#[test]
fn explain_prints_operators_parallelism_and_keys() {
    let root = repo_root();
    let out = nagare().args(["explain", "sql/examples/quickstart.sql", "-p", "3"]).current_dir(&root).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let s = String::from_utf8_lossy(&out.stdout);
    for want in [
        "source events (filesystem)  x3",
        "dedup keep-first by (events.id) ttl 10m",
        "hash(id@0) over 128 key groups",
        "window TUMBLE(1m)",
        "sink tenant_minutes (filesystem)",
        "(event time)",
    ] {
        assert!(s.contains(want), "missing '{want}' in:\n{s}");
    }
}

#[test]
fn a_bad_option_fails_before_running_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let sql = dir.path().join("bad.sql");
    std::fs::write(&sql, "CREATE TABLE e (id TEXT) WITH (connector = 'generator', count = '10', rat = '5');\nCREATE TABLE o WITH (connector = 'stdout');\nINSERT INTO o SELECT id FROM e;\n").unwrap();
    let out = nagare().arg("run").arg(&sql).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.sql:1:71: unknown option 'rat' for connector 'generator'"), "{stderr}");
    assert!(stderr.contains("did you mean 'rate'"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

#[test]
fn a_bad_record_stops_the_job_naming_file_and_line() {
    let root = repo_root();
    let dir = tempfile::tempdir().unwrap();
    let sql = dir.path().join("p.sql");
    std::fs::write(
        &sql,
        format!(
            "CREATE TABLE e (id TEXT, time TIMESTAMP) WITH (connector = 'filesystem', path = '{}');\nCREATE TABLE o WITH (connector = 'stdout');\nINSERT INTO o SELECT id, time FROM e;\n",
            root.join("sql/tests/data/bad-lines.jsonl").display()
        ),
    )
    .unwrap();
    let out = nagare().arg("run").arg(&sql).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad-lines.jsonl:3"), "{stderr}");
    assert!(stderr.contains("bad_records = 'dead_letter'"), "says how to continue: {stderr}");
}

/// A watching pipeline runs until Ctrl-C, then stops cleanly: what was read is written and files are closed.
#[test]
fn ctrl_c_stops_a_watching_pipeline_cleanly_and_metrics_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::write(input.join("a.jsonl"), "{\"id\":\"x1\"}\n{\"id\":\"x2\"}\n").unwrap();
    let sql = dir.path().join("watch.sql");
    std::fs::write(
        &sql,
        "CREATE TABLE e (id TEXT) WITH (connector = 'filesystem', path = '${IN}', watch = true, watch_interval = '200ms');\n\
         CREATE TABLE o WITH (connector = 'filesystem', path = '${OUT}', format = 'json');\n\
         INSERT INTO o SELECT id FROM e;\n",
    )
    .unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let out_dir = dir.path().join("out");
    let mut child = nagare()
        .arg("run")
        .arg(&sql)
        .args(["--var", &format!("IN={}", input.display()), "--var", &format!("OUT={}", out_dir.display())])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}"), "-p", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A file that appears later is picked up.
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(input.join(".b.tmp"), "{\"id\":\"x3\"}\n").unwrap();
    std::fs::rename(input.join(".b.tmp"), input.join("b.jsonl")).unwrap();

    let mut metrics = String::new();
    wait_for("3 rows in the metrics", Duration::from_secs(60), || {
        metrics.clear();
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
            let _ = s.read_to_string(&mut metrics);
        }
        metrics
            .lines()
            .any(|l| l.starts_with("nagare_rows_out_total") && l.contains("kind=\"source\"") && l.ends_with(" 3"))
    });
    assert!(metrics.contains("# TYPE nagare_rows_in_total counter"), "{metrics}");

    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let (status, stderr) = wait_exit(&mut child, "Ctrl-C");
    assert!(status.success(), "exit {status}: {stderr}");
    assert!(stderr.contains("stopping"), "{stderr}");
    let rows = common::read_json_rows(&out_dir);
    let ids: BTreeSet<String> = rows.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, ["x1", "x2", "x3"].iter().map(|s| s.to_string()).collect());
    assert!(files_with(&out_dir, &[".inprogress"]).is_empty(), "files are closed");
}

#[test]
fn gen_w1_writes_the_requested_events() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("w1.jsonl");
    let out = nagare().args(["gen", "w1", "--rows", "5000", "--out"]).arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let content = std::fs::read_to_string(&file).unwrap();
    assert_eq!(content.lines().count(), 5000);
    let first: serde_json::Value = serde_json::from_str(content.lines().next().unwrap()).unwrap();
    for field in ["version", "id", "detail-type", "source", "account", "time", "region", "resources", "detail"] {
        assert!(first.get(field).is_some(), "missing {field}");
    }
    let avg = content.len() / 5000;
    assert!((290..=340).contains(&avg), "about 315 bytes per event, got {avg}");
}

/// A client command against a `nagare run --serve` API (plaintext, no token).
fn api(port: u16, args: &[&str]) -> Output {
    nagare()
        .args(args)
        .env("NAGARE_COORDINATOR", format!("http://127.0.0.1:{port}"))
        .env_remove("NAGARE_TOKEN")
        .output()
        .unwrap()
}

#[test]
fn a_single_run_serves_the_job_api_from_its_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let sql = dir.path().join("gen.sql");
    std::fs::write(
        &sql,
        "SET checkpoint_interval = '300ms';\n\
         CREATE TABLE e (id TEXT) WITH (connector = 'generator', rate = '2000', seed = '9');\n\
         CREATE TABLE o WITH (connector = 'filesystem', path = '${OUT}', format = 'json');\n\
         INSERT INTO o SELECT id FROM e;\n",
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (out_dir, state) = (dir.path().join("out"), dir.path().join("state/jobs.json"));
    let serve = format!("127.0.0.1:{port}");
    let start = |extra: &[&str]| {
        nagare()
            .arg("run")
            .arg(&sql)
            .args(["-q", "-p", "1", "--var", &format!("OUT={}", out_dir.display())])
            .args(["--checkpoint-dir", dir.path().join("ckpt").to_str().unwrap()])
            .args(["--serve", &serve, "--state-file", state.to_str().unwrap()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut child = start(&[]);
    let status = |id: &str| -> serde_json::Value {
        let out = api(port, &["status", id, "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    };
    wait_for("the run's job to checkpoint and write", Duration::from_secs(60), || {
        let s = status("local-gen");
        s["state"] == "running"
            && s["last_checkpoint"].as_u64() > Some(0)
            && s["operators"][0]["rows_out"].as_u64() > Some(0)
    });
    let jobs = api(port, &["jobs"]);
    assert!(String::from_utf8_lossy(&jobs.stdout).contains("local-gen"), "{}", text(&jobs));
    let refused = api(port, &["submit", sql.to_str().unwrap()]);
    assert!(!refused.status.success() && text(&refused).contains("single `nagare run`"), "{}", text(&refused));
    // StopJob through the API: a final checkpoint, then the run ends by itself, successfully.
    let stopped = api(port, &["stop", "local-gen"]);
    assert!(stopped.status.success(), "{}", text(&stopped));
    let (exit, stderr) = wait_exit(&mut child, "StopJob");
    assert!(exit.success() && stderr.contains("StopJob"), "exit {exit}: {stderr}");
    let rows = common::read_json_rows(&out_dir);
    let ids: BTreeSet<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert!(!rows.is_empty() && ids.len() == rows.len(), "{} rows, {} distinct", rows.len(), ids.len());
    // The record outlives the run in its state file: a restart is the next attempt of the same job.
    let record = std::fs::read_to_string(&state).unwrap();
    assert!(record.contains("local-gen") && record.contains("stopped"), "{record}");
    let mut again = start(&[]);
    wait_for("the restarted run's API", Duration::from_secs(60), || status("local-gen")["attempt"] == 2);
    let _ = again.kill();
    let _ = again.wait();
    let remote =
        nagare().args(["run", sql.to_str().unwrap(), "--var", "OUT=/x", "--serve", "0.0.0.0:0"]).output().unwrap();
    assert!(!remote.status.success() && text(&remote).contains("loopback"), "{}", text(&remote));
}
