//! A cluster on one machine: etcd (started by scripts/services/start-etcd.sh), two coordinators and three worker
//! processes. A job is submitted over gRPC; the worker running it is SIGKILLed, then the leading coordinator, then
//! the next worker; the job moves each time and its output is checked row by row: nothing lost, nothing twice.
//! The API's errors (bad SQL with its position, unknown job, missing token) are checked on the way.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::procs::{Proc, free_port, insecure_coordinator, insecure_worker};
use common::services::etcd;

const TOKEN: &str = "test-token-7f3a";

/// The CA certificate clients trust (the coordinators' self-signed certificate).
static CA: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// A test CA and a server certificate it signed for 127.0.0.1 and localhost: (CA certificate, certificate, key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let p = |n: &str| dir.join(n);
    std::fs::write(p("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl").current_dir(dir).args(args).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=nagare-test-ca"]
        .iter()
        .copied()
        .chain(["-keyout", "ca.key", "-out", "ca.pem"])
        .collect::<Vec<_>>());
    run(&["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "key.pem", "-out", "leaf.csr"]);
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "cert.pem",
    ]);
    (p("ca.pem"), p("cert.pem"), p("key.pem"))
}

fn spawn(dir: &Path, name: &str, args: &[&str]) -> Proc {
    common::procs::spawn(dir, name, TOKEN, args)
}

/// Runs a client command against `coordinator`; returns (success, stdout, stderr).
fn cli(coordinator: &str, token: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nagare"));
    c.args(args).env("NAGARE_COORDINATOR", coordinator).env_remove("NAGARE_TOKEN");
    if let Some(ca) = CA.get() {
        c.env("NAGARE_CA_CERT", ca);
    }
    if let Some(t) = token {
        c.env("NAGARE_TOKEN", t);
    }
    let out = c.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn status(coordinator: &str, job: &str) -> serde_json::Value {
    let (ok, out, err) = cli(coordinator, Some(TOKEN), &["status", job, "--json"]);
    assert!(ok, "status: {err}");
    serde_json::from_str(&out).unwrap()
}

/// The ids the pipeline keeps when `nagare run` runs it alone, as fast as it can, into `out`: the reference.
fn reference_ids(sql: &Path, out: &Path) -> std::collections::BTreeSet<String> {
    let run = Command::new(env!("CARGO_BIN_EXE_nagare"))
        .arg("run")
        .arg(sql)
        .args(["-q", "--var", "RATE=0", "--var"])
        .arg(format!("OUT={}", out.display()))
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    common::read_json_rows(out).iter().map(|r| r["id"].as_str().unwrap().to_string()).collect()
}

/// Submits the pipeline generating `rate` events/s into `out`; returns the job id.
fn submit(api: &str, sql: &Path, name: &str, rate: u32, out: &Path, extra: &[&str]) -> String {
    let (rate, out) = (format!("RATE={rate}"), format!("OUT={}", out.display()));
    let mut args = vec!["submit", sql.to_str().unwrap(), "--name", name, "--var", &rate, "--var", &out];
    args.extend(extra);
    let (ok, job, err) = cli(api, Some(TOKEN), &args);
    assert!(ok, "{err}");
    job.trim().to_string()
}

/// Runs `nagare <args>`, which must fail; its stderr.
fn refused_to_start(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_nagare")).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "nagare {args:?} must refuse to start: {err}");
    err
}

fn dedup_sql(events: usize) -> String {
    common::generated_dedup_sql(events, 5)
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool, logs: &dyn Fn() -> String) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}\n{}", logs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_job_survives_lost_workers_and_a_lost_leader_exactly_once() {
    const N: usize = 80_000;
    let etcd = etcd()["ETCD_ENDPOINTS"].clone();
    let prefix = format!("/nagare-test-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("checkpoints");
    let ckpt = ckpt.to_str().unwrap();
    let (p1, p2) = (free_port(), free_port());
    let (ca, cert, key) = certificates(dir.path());
    let ca_path = ca.to_str().unwrap().to_string();
    CA.set(ca).unwrap();
    let (cert, key) = (cert.to_str().unwrap().to_string(), key.to_str().unwrap().to_string());
    // Every process of the cluster: its certificate, and the CA its peers' certificates come from (mTLS).
    let tls = ["--tls-cert", &cert, "--tls-key", &key, "--cluster-ca", &ca_path];
    let coordinator = |port: u16, name: &str| {
        spawn(
            dir.path(),
            name,
            &[
                "coordinator",
                "--etcd",
                &etcd,
                "--etcd-prefix",
                &prefix,
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--checkpoint-url",
                ckpt,
                "--id",
                name,
            ]
            .iter()
            .chain(&tls)
            .copied()
            .collect::<Vec<_>>(),
        )
    };
    let mut c1 = coordinator(p1, "c1");
    wait_for("c1 to lead", Duration::from_secs(30), || c1.log().contains("leading"), &|| c1.log());
    let c2 = coordinator(p2, "c2");
    let metrics_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    // Each worker listens on a fixed port and registers itself as `localhost:<port>` (--advertise; the certificate
    // names localhost), as a worker on 0.0.0.0 would register its host name.
    let worker_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let start_worker = |i: usize| {
        let id = format!("w{i}");
        let metrics = format!("127.0.0.1:{}", metrics_ports[i - 1]);
        let (listen, advertise) =
            (format!("127.0.0.1:{}", worker_ports[i - 1]), format!("localhost:{}", worker_ports[i - 1]));
        spawn(
            dir.path(),
            &id,
            &[
                "worker",
                "--etcd",
                &etcd,
                "--etcd-prefix",
                &prefix,
                "--slots",
                "2",
                "--id",
                &id,
                "--metrics-addr",
                &metrics,
                "--listen",
                &listen,
                "--advertise",
                &advertise,
            ]
            .iter()
            .chain(&tls)
            .copied()
            .collect::<Vec<_>>(),
        )
    };
    let mut workers: Vec<Proc> = (1..=3).map(start_worker).collect();
    // The follower answers the API as well.
    let api = format!("https://127.0.0.1:{p2}");
    wait_for(
        "three workers",
        Duration::from_secs(30),
        || cli(&api, Some(TOKEN), &["workers"]).1.lines().count() == 4,
        &|| cli(&api, Some(TOKEN), &["workers"]).2,
    );

    // Workers speak mutual TLS: a client without a certificate signed by the cluster CA is turned away (the job
    // below runs, so the coordinator and the workers themselves get through).
    let listing = cli(&api, Some(TOKEN), &["workers"]).1;
    let address = listing.split_whitespace().find(|w| w.starts_with("https://")).expect(&listing).to_string();
    assert!(address.starts_with("https://localhost:"), "workers register their --advertise address: {listing}");
    let anonymous =
        Command::new("curl").args(["-s", "--max-time", "5", "--cacert", &ca_path, &address]).status().unwrap();
    assert!(!anonymous.success(), "a worker must refuse a client without a certificate");
    let err = refused_to_start(&["worker", "--etcd", &etcd, "--etcd-prefix", "/nowhere"]);
    assert!(err.contains("--cluster-ca") && err.contains("--insecure"), "{err}");

    // API errors.
    let bad = dir.path().join("bad.sql");
    std::fs::write(
        &bad,
        "CREATE TABLE t (a INT) WITH (connector = 'generator');\nINSERT INTO nowhere SELECT a FROM t;\n",
    )
    .unwrap();
    let (ok, _, err) = cli(&api, Some(TOKEN), &["submit", bad.to_str().unwrap()]);
    assert!(!ok && err.contains("bad.sql:2:") && err.contains("nowhere"), "{err}");
    let (ok, _, err) = cli(&api, Some(TOKEN), &["validate", bad.to_str().unwrap()]);
    assert!(!ok && err.contains("bad.sql:2:") && err.contains("nowhere"), "{err}");
    let (ok, _, err) = cli(&api, Some(TOKEN), &["status", "nope"]);
    assert!(!ok && err.contains("no job 'nope'") && err.contains("NotFound"), "{err}");
    let (ok, _, err) = cli(&api, None, &["jobs"]);
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    let (ok, _, err) = cli(&api, Some("wrong"), &["jobs"]);
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    // Plaintext to a TLS API fails; a coordinator without TLS refuses to start unless --insecure.
    let (ok, _, _) = cli(&format!("http://127.0.0.1:{p2}"), Some(TOKEN), &["jobs"]);
    assert!(!ok, "a plaintext call to the TLS API must fail");
    let args = ["coordinator", "--etcd", &etcd, "--checkpoint-url", ckpt, "--token", TOKEN, "--listen", "127.0.0.1:0"];
    let err = refused_to_start(&args);
    assert!(err.contains("needs TLS") && err.contains("--insecure"), "{err}");

    // The job: generated events with 20 % re-deliveries, deduplicated by id (keyed state that must move with the
    // job), exactly once into JSON files. The same pipeline run by `nagare run` without failures is the reference.
    let sql = dir.path().join("p.sql");
    std::fs::write(&sql, dedup_sql(N)).unwrap();
    let (ok, plan, err) =
        cli(&api, Some(TOKEN), &["validate", sql.to_str().unwrap(), "--var", "RATE=1", "--var", "OUT=/x"]);
    assert!(ok && plan.contains("dedup"), "{plan} {err}");
    let expected = reference_ids(&sql, &dir.path().join("reference"));
    assert!(expected.len() < N * 9 / 10, "re-deliveries were generated and dropped: {} of {N}", expected.len());
    let out = dir.path().join("out");
    let job = submit(&api, &sql, "moves", 4000, &out, &[]);
    let paths: Vec<PathBuf> = [&c1, &c2].into_iter().chain(workers.iter()).map(|p| p.log.clone()).collect();
    let logs = move || {
        paths
            .iter()
            .map(|p| format!("--- {}\n{}", p.display(), std::fs::read_to_string(p).unwrap_or_default()))
            .collect::<String>()
    };
    let running_with_checkpoint = |attempt: u64| {
        move |s: &serde_json::Value| {
            s["state"] == "running" && s["attempt"].as_u64() >= Some(attempt) && s["last_checkpoint"].as_u64() > Some(0)
        }
    };
    let worker_of = |s: &serde_json::Value| s["workers"][0].as_str().unwrap().to_string();

    // 1. The job spreads over two workers (2 slots each, most free slots first), its dedup input crossing
    // between them over Arrow Flight. The worker running part 0 dies: the job resumes from its last checkpoint.
    wait_for("the job to run", Duration::from_secs(60), || running_with_checkpoint(1)(&status(&api, &job)), &logs);
    let s = status(&api, &job);
    assert_eq!(s["workers"].as_array().map(Vec::len), Some(2), "one part per worker: {s}");
    let first = worker_of(&s);
    workers.iter_mut().find(|w| w.log.ends_with(format!("{first}.log"))).unwrap().kill();
    wait_for(
        "the job on another worker",
        Duration::from_secs(60),
        || running_with_checkpoint(2)(&status(&api, &job)),
        &logs,
    );
    let s = status(&api, &job);
    assert!(!s["workers"].as_array().unwrap().iter().any(|w| w == first.as_str()), "{s}");

    // 2. The leading coordinator dies: the other one takes over (the job keeps running meanwhile).
    c1.kill();
    wait_for("c2 to lead", Duration::from_secs(60), || c2.log().contains("leading"), &logs);
    let s = status(&api, &job);
    assert_eq!(s["state"], "running", "the job kept running while the leader changed: {s}");

    // etcd away for a while (well within the workers' 3 s lease): the job goes on, on the same attempt; scheduling
    // resumes when etcd answers again.
    let attempt = s["attempt"].clone();
    let etcd_pid = common::services::etcd()["ETCD_PID"].clone();
    let signal = |sig: &str| assert!(Command::new("kill").args([sig, &etcd_pid]).status().unwrap().success());
    signal("-STOP");
    std::thread::sleep(Duration::from_millis(1200));
    signal("-CONT");
    wait_for("etcd to answer", Duration::from_secs(30), || cli(&api, Some(TOKEN), &["jobs"]).0, &logs);
    let s = status(&api, &job);
    assert_eq!((s["state"].clone(), s["attempt"].clone()), ("running".into(), attempt), "{s}");

    // 3. Its worker dies again: the new leader moves it to the last worker.
    let second = worker_of(&s);
    workers.iter_mut().find(|w| w.log.ends_with(format!("{second}.log"))).unwrap().kill();
    wait_for(
        "the job on the last worker",
        Duration::from_secs(60),
        || running_with_checkpoint(3)(&status(&api, &job)),
        &logs,
    );
    let s = status(&api, &job);
    assert!(worker_of(&s) != first && worker_of(&s) != second, "{s}");
    let third = worker_of(&s);

    wait_for("the job to finish", Duration::from_secs(120), || status(&api, &job)["state"] == "finished", &logs);
    // The last worker's Prometheus endpoint has the job's counters.
    let port = metrics_ports[third.trim_start_matches('w').parse::<usize>().unwrap() - 1];
    let scrape = Command::new("curl")
        .args(["-s", "--max-time", "10", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .unwrap();
    let scrape = String::from_utf8_lossy(&scrape.stdout);
    assert!(scrape.contains(&format!("nagare_rows_out_total{{job=\"{job}\",node=\"3\",kind=\"sink\"}}")), "{scrape}");
    assert_eq!(scrape.matches("# TYPE nagare_rows_out_total").count(), 1, "{scrape}");

    // WatchJob ends with the job: on a finished job it gives the final state and returns.
    let (ok, watched, err) = cli(&api, Some(TOKEN), &["status", &job, "--watch", "--json"]);
    assert!(ok, "{err}");
    let last: serde_json::Value = serde_json::from_str(watched.lines().last().unwrap()).unwrap();
    assert_eq!(last["state"], "finished");
    let rows = common::read_json_rows(&out);
    let ids: std::collections::BTreeSet<String> = rows.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(rows.len(), ids.len(), "no event twice");
    assert_eq!(ids, expected, "every event the reference run kept, and no other");
    assert!(c2.log().contains("was lost; restarted"), "{}", c2.log());

    // StopJob: an unbounded job stops with a final checkpoint; what it wrote is there once.
    let unbounded = dir.path().join("unbounded");
    let job2 = submit(&api, &sql, "stops", 2000, &unbounded, &["--set", "parallelism=1"]);
    // (its output appears once the watermark, 5 s behind event time, passes the first rows)
    wait_for(
        "the second job to write",
        Duration::from_secs(60),
        || {
            let s = status(&api, &job2);
            running_with_checkpoint(1)(&s) && s["rows_out"].as_u64() > Some(0)
        },
        &logs,
    );
    let (ok, _, err) = cli(&api, Some(TOKEN), &["stop", &job2]);
    assert!(ok, "{err}");
    wait_for("the second job to stop", Duration::from_secs(60), || status(&api, &job2)["state"] == "stopped", &logs);
    let rows = common::read_json_rows(&unbounded);
    let ids: std::collections::BTreeSet<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert!(
        !rows.is_empty() && rows.len() == ids.len(),
        "{} rows, {} distinct; {}; files: {:?}\n{}",
        rows.len(),
        ids.len(),
        status(&api, &job2),
        common::files_with(&unbounded, &[""]),
        logs()
    );
    let (ok, _, err) = cli(&api, Some(TOKEN), &["stop", &job2]);
    assert!(!ok && err.contains("already stopped"), "{err}");

    // Rescale 2 -> 4 -> 1 while a bounded job runs: each time it stops with a checkpoint and restarts from it, its
    // dedup state split or merged by key group and the generator's lanes handed on. The two lost workers come back
    // first (4 slots need two of them).
    for id in [&first, &second] {
        workers.push(start_worker(id.trim_start_matches('w').parse().unwrap()));
    }
    wait_for(
        "three workers again",
        Duration::from_secs(30),
        || cli(&api, Some(TOKEN), &["workers"]).1.lines().count() == 4,
        &|| cli(&api, Some(TOKEN), &["workers"]).2,
    );
    let sql3 = dir.path().join("p3.sql");
    std::fs::write(&sql3, dedup_sql(30_000)).unwrap();
    let expected = reference_ids(&sql3, &dir.path().join("reference3"));
    let rescaled = dir.path().join("rescaled");
    // 30 s of input at 1,000 events a second: time for two rescales before the input ends, on a loaded machine too.
    let job3 = submit(&api, &sql3, "rescales", 1000, &rescaled, &[]);
    let at = |p: u64, attempt: u64| {
        move |s: &serde_json::Value| {
            running_with_checkpoint(attempt)(s)
                && s["parallelism"].as_u64() == Some(p)
                && s["last_checkpoint"].as_u64() > Some(0)
        }
    };
    wait_for("the third job to run", Duration::from_secs(60), || at(2, 1)(&status(&api, &job3)), &logs);
    let before = status(&api, &job3);
    let (ok, said, err) = cli(&api, Some(TOKEN), &["rescale", &job3, "4"]);
    assert!(ok && said.contains("rescaling"), "{said} {err}");
    let next = before["attempt"].as_u64().unwrap() + 1;
    let logs3 = || format!("{}\n{}", status(&api, &job3), logs());
    wait_for("parallelism 4", Duration::from_secs(60), || at(4, next)(&status(&api, &job3)), &logs3);
    let s = status(&api, &job3);
    assert!(s["workers"].as_array().unwrap().len() >= 2, "4 slots over workers of 2: {s}");
    assert!(s["rows_in"].as_u64() < Some(30_000), "rescaled while it ran: {s}");
    // GetJob's graph: per-operator parallelism, placement, counters and watermark, summed over the workers.
    wait_for(
        "operator counters",
        Duration::from_secs(30),
        || {
            let s = status(&api, &job3);
            s["operators"][1]["rows_in"].as_u64() > Some(0) && s["operators"][1]["watermark"].is_string()
        },
        &logs3,
    );
    let s = status(&api, &job3);
    let dedup = &s["operators"][1];
    assert!(dedup["label"].as_str().unwrap().starts_with("dedup"), "{s}");
    assert_eq!(dedup["parallelism"], 4, "{s}");
    assert_eq!(dedup["workers"], s["workers"], "subtasks of every operator on the job's workers: {s}");
    assert!(s["last_checkpoint_bytes"].as_u64() > Some(0), "{s}");
    let (ok, text, _) = cli(&api, Some(TOKEN), &["status", &job3]);
    assert!(ok && text.contains("watermark") && text.contains("dedup keep-first"), "{text}");
    let (ok, _, err) = cli(&api, Some(TOKEN), &["rescale", &job3, "0"]);
    assert!(!ok && err.contains("parallelism must be between 1"), "{err}");
    let (ok, _, err) = cli(&api, Some(TOKEN), &["rescale", &job3, "1"]);
    assert!(ok, "{err}");
    let next = s["attempt"].as_u64().unwrap() + 1;
    wait_for("parallelism 1", Duration::from_secs(60), || at(1, next)(&status(&api, &job3)), &logs3);
    assert_eq!(status(&api, &job3)["workers"].as_array().unwrap().len(), 1);
    wait_for("the third job to finish", Duration::from_secs(120), || status(&api, &job3)["state"] == "finished", &logs);
    let rows = common::read_json_rows(&rescaled);
    let ids: std::collections::BTreeSet<String> = rows.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(rows.len(), ids.len(), "no event twice across rescales");
    assert_eq!(ids, expected, "every event the reference run kept, and no other");
}

#[test]
fn with_rebalance_a_job_spreads_onto_a_worker_that_joins_exactly_once() {
    let etcd = etcd()["ETCD_ENDPOINTS"].clone();
    let prefix = format!("/nagare-rebalance-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    // `${SEED}` is not given with the job: the coordinator fills it from its environment when it plans, and the
    // workers, whose environment says otherwise, must run the coordinator's plan (the output equals the
    // reference's only with seed 5).
    let (api, coordinator) =
        insecure_coordinator(dir.path(), &etcd, &prefix, TOKEN, "c", &["--rebalance"], &[("SEED", "5")]);
    let worker = |id: &str| insecure_worker(dir.path(), &etcd, &prefix, TOKEN, id, &[("SEED", "77")]);
    let _w1 = worker("w1");
    let reference_sql = dir.path().join("reference.sql");
    std::fs::write(&reference_sql, dedup_sql(30_000)).unwrap();
    let expected = reference_ids(&reference_sql, &dir.path().join("reference"));
    let sql = dir.path().join("p.sql");
    let text = dedup_sql(30_000).replace("seed = '5'", "seed = '${SEED}'");
    assert!(text.contains("${SEED}"));
    std::fs::write(&sql, text).unwrap();
    wait_for(
        "the coordinator and w1",
        Duration::from_secs(30),
        || cli(&api, Some(TOKEN), &["workers"]).1.contains("w1"),
        &|| coordinator.log(),
    );
    let out = dir.path().join("out");
    let job = submit(&api, &sql, "spreads", 1500, &out, &[]);
    let logs = || format!("{}\n{}", coordinator.log(), status(&api, &job));
    wait_for(
        "the job on w1 alone",
        Duration::from_secs(60),
        || {
            let s = status(&api, &job);
            s["state"] == "running" && s["last_checkpoint"].as_u64() > Some(0)
        },
        &logs,
    );
    assert_eq!(status(&api, &job)["workers"], serde_json::json!(["w1"]));
    // w2 joins idle: the leader rescales the job to its own parallelism, so it is placed again over both.
    let _w2 = worker("w2");
    wait_for(
        "the job over w1 and w2",
        Duration::from_secs(60),
        || {
            let s = status(&api, &job);
            s["state"] == "running"
                && s["workers"].as_array().map(Vec::len) == Some(2)
                && s["attempt"].as_u64() == Some(2)
        },
        &logs,
    );
    assert!(status(&api, &job)["rows_in"].as_u64() < Some(30_000), "rebalanced while it ran");
    assert!(coordinator.log().contains("rebalancing over more workers"), "{}", coordinator.log());
    wait_for("the job to finish", Duration::from_secs(120), || status(&api, &job)["state"] == "finished", &logs);
    let rows = common::read_json_rows(&out);
    let ids: std::collections::BTreeSet<String> = rows.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(rows.len(), ids.len(), "no event twice across the move");
    assert_eq!(ids, expected, "every event the reference run kept, and no other");
}

/// Events 10 ms apart in one file (with re-deliveries a few rows later), for a filesystem source with many splits
/// per subtask; returns the distinct ids.
fn many_splits_input(path: &Path, n: usize) -> std::collections::BTreeSet<String> {
    use std::io::Write as _;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut again: Vec<(usize, usize)> = Vec::new();
    let line = |i: usize| {
        let t = chrono::DateTime::from_timestamp_millis(1_767_225_600_000 + i as i64 * 10)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        format!("{{\"id\":\"e{i:07}\",\"time\":\"{t}\",\"tenant\":{},\"pad\":\"{}\"}}\n", i % 7, "x".repeat(40))
    };
    for i in 0..n {
        f.write_all(line(i).as_bytes()).unwrap();
        if i % 10 == 3 {
            again.push((i + 5, i));
        }
        while again.first().is_some_and(|(at, _)| *at <= i) {
            f.write_all(line(again.remove(0).1).as_bytes()).unwrap();
        }
    }
    for (_, i) in again {
        f.write_all(line(i).as_bytes()).unwrap();
    }
    f.flush().unwrap();
    (0..n).map(|i| format!("e{i:07}")).collect()
}

/// Dedup by id into `${OUT}/ids`, and events per tenant per minute after the dedup into `${OUT}/windows`.
fn many_splits_sql(input: &Path) -> String {
    format!(
        "SET parallelism = 2;\nSET checkpoint_interval = '300ms';\nSET dedup_ttl = '1 minute';\n\
         CREATE TABLE events (id TEXT, time TIMESTAMP, tenant BIGINT, WATERMARK FOR time AS time - INTERVAL '2' SECOND)\n\
         WITH (connector = 'filesystem', path = '{}', format = 'json', split_size = '512KiB');\n\
         CREATE TABLE ids WITH (connector = 'filesystem', path = '${{OUT}}/ids', format = 'json');\n\
         CREATE TABLE windows WITH (connector = 'filesystem', path = '${{OUT}}/windows', format = 'json');\n\
         INSERT INTO ids SELECT id FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events) WHERE rn = 1;\n\
         INSERT INTO windows SELECT tenant, TUMBLE_START(time, INTERVAL '1' MINUTE) AS minute, COUNT(*) AS n\n\
         FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events) WHERE rn = 1\n\
         GROUP BY tenant, TUMBLE(time, INTERVAL '1' MINUTE);\n",
        input.display()
    )
}

/// The rows of the `windows` output as (tenant, minute, count), sorted.
fn window_counts(out: &Path) -> Vec<(i64, String, i64)> {
    let mut v: Vec<(i64, String, i64)> = common::read_json_rows(&out.join("windows"))
        .iter()
        .map(|r| (r["tenant"].as_i64().unwrap(), r["minute"].as_str().unwrap().to_string(), r["n"].as_i64().unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn rescaling_down_a_job_over_many_splits_keeps_every_row_and_every_window() {
    const N: usize = 400_000;
    let etcd = etcd()["ETCD_ENDPOINTS"].clone();
    let prefix = format!("/nagare-rescale-down-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let (api, coordinator) = insecure_coordinator(dir.path(), &etcd, &prefix, TOKEN, "c", &[], &[]);
    let _workers: Vec<Proc> =
        ["w1", "w2", "w3"].iter().map(|id| insecure_worker(dir.path(), &etcd, &prefix, TOKEN, id, &[])).collect();
    wait_for(
        "the coordinator and three workers",
        Duration::from_secs(30),
        || cli(&api, Some(TOKEN), &["workers"]).1.lines().count() == 4,
        &|| coordinator.log(),
    );
    // About 40 MB in 512 KiB splits: some 40 splits per subtask at parallelism 2.
    let input = dir.path().join("events.jsonl");
    let all_ids = many_splits_input(&input, N);
    let sql = dir.path().join("p.sql");
    std::fs::write(&sql, many_splits_sql(&input)).unwrap();
    // The reference: the same pipeline run alone, never rescaled.
    let reference = dir.path().join("reference");
    let run = Command::new(env!("CARGO_BIN_EXE_nagare"))
        .arg("run")
        .arg(&sql)
        .args(["-q", "--var"])
        .arg(format!("OUT={}", reference.display()))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success() && said.contains(" 0 late,"), "reference run: {said}");
    let expected_windows = window_counts(&reference);
    assert_eq!(expected_windows.iter().map(|w| w.2).sum::<i64>(), N as i64, "the reference counts every event");

    for from in [2u64, 3] {
        let out = dir.path().join(format!("out-{from}"));
        // Paced to some 20 s of input, so that the rescale lands before the input ends on a loaded machine too (at 8 s
        // a busy CI machine once finished the job before the rescale's stop-with-checkpoint was taken).
        let job = submit(
            &api,
            &sql,
            &format!("down-from-{from}"),
            0,
            &out,
            &["--parallelism", &from.to_string(), "--set", "source_rate_limit=22000"],
        );
        let logs = || format!("{}\n{}", coordinator.log(), status(&api, &job));
        wait_for(
            "the job to run with a checkpoint",
            Duration::from_secs(60),
            || {
                let s = status(&api, &job);
                s["state"] == "running"
                    && s["parallelism"].as_u64() == Some(from)
                    && s["last_checkpoint"].as_u64() > Some(0)
            },
            &logs,
        );
        let (ok, _, err) = cli(&api, Some(TOKEN), &["rescale", &job, "1"]);
        assert!(ok, "{err}");
        let s = status(&api, &job);
        assert!(s["rows_in"].as_u64() < Some(N as u64), "rescaled while it ran: {s}");
        wait_for("the job to finish", Duration::from_secs(180), || status(&api, &job)["state"] == "finished", &logs);
        let s = status(&api, &job);
        assert_eq!(s["parallelism"], 1, "{s}");
        assert!(s["attempt"].as_u64() >= Some(2), "restarted at parallelism 1: {s}");
        let late: u64 = s["operators"].as_array().unwrap().iter().map(|o| o["late_rows"].as_u64().unwrap()).sum();
        assert_eq!(late, 0, "a rescale must not make rows late: {s}");
        let rows = common::read_json_rows(&out.join("ids"));
        let ids: std::collections::BTreeSet<String> =
            rows.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
        assert_eq!(rows.len(), ids.len(), "{from} -> 1: no id twice");
        assert_eq!(ids.len(), all_ids.len(), "{from} -> 1: every id ({} missing)", all_ids.difference(&ids).count());
        assert_eq!(window_counts(&out), expected_windows, "{from} -> 1: windows as in the run never rescaled");
    }
}

/// The SQS source given its keys as secret options (`'${VAR}'` references): the workers, whose environment holds
/// them, sign with them (this moto refuses any other signature); the coordinator, which plans, never has them; and
/// the secret is in no value etcd holds, in no checkpoint file, in GetJob or in any log, even when it was also
/// (wrongly) passed with `--var` at submission.
#[test]
fn a_secret_option_is_resolved_by_the_workers_and_never_stored() {
    const N: usize = 40;
    let iam = common::services::moto_iam();
    let (key_id, secret) = (iam["AWS_ACCESS_KEY_ID"].clone(), iam["AWS_SECRET_ACCESS_KEY"].clone());
    let etcd = etcd()["ETCD_ENDPOINTS"].clone();
    let prefix = format!("/nagare-secret-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let name = format!("secret{}x{}", std::process::id(), fastrand::u32(..));
    let queue = common::services::aws_at(iam, &["queue", &name]);
    let bodies = dir.path().join("bodies.txt");
    let body = |n: usize| format!(r#"{{"id": "e{n}", "time": "2026-01-01T00:00:{:02}Z"}}"#, n % 60);
    std::fs::write(&bodies, (0..N).map(body).collect::<Vec<_>>().join("\n")).unwrap();
    assert_eq!(common::services::aws_at(iam, &["send", &queue, bodies.to_str().unwrap()]), N.to_string());

    let plain: &[(&str, &str)] = &[("AWS_REGION", "us-east-1")];
    let (api, coordinator) = insecure_coordinator(dir.path(), &etcd, &prefix, TOKEN, "c", &[], plain);
    let worker_env = [
        ("AWS_REGION", "us-east-1"),
        ("NAGARE_TEST_SQS_KEY_ID", key_id.as_str()),
        ("NAGARE_TEST_SQS_SECRET", secret.as_str()),
    ];
    let worker = insecure_worker(dir.path(), &etcd, &prefix, TOKEN, "w1", &worker_env);
    wait_for(
        "the coordinator and a worker",
        Duration::from_secs(30),
        || cli(&api, Some(TOKEN), &["workers"]).1.lines().count() == 2,
        &|| coordinator.log(),
    );
    let out = dir.path().join("out");
    let sql = dir.path().join("p.sql");
    std::fs::write(
        &sql,
        "SET parallelism = 1;\nSET checkpoint_interval = '1s';\nSET dedup_ttl = '1 hour';\n\
         CREATE TABLE events (id TEXT, time TIMESTAMP, WATERMARK FOR time AS time - INTERVAL '1' SECOND)\n\
         WITH (connector = 'sqs', queue_url = '${QUEUE}', endpoint = '${AWS}', wait_time = '1s', receivers = 1,\n\
               access_key_id = '${NAGARE_TEST_SQS_KEY_ID}', secret_access_key = '${NAGARE_TEST_SQS_SECRET}');\n\
         CREATE TABLE ids WITH (connector = 'filesystem', path = '${OUT}', format = 'json');\n\
         INSERT INTO ids SELECT id FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn\n\
         FROM events) WHERE rn = 1;\n",
    )
    .unwrap();
    let vars = [
        format!("QUEUE={queue}"),
        format!("AWS={}", iam["AWS_ENDPOINT_URL"]),
        format!("OUT={}", out.display()),
        format!("NAGARE_TEST_SQS_SECRET={secret}"),
    ];
    let mut args = vec!["submit", sql.to_str().unwrap(), "--name", "secret"];
    for v in &vars {
        args.extend(["--var", v.as_str()]);
    }
    let (ok, job, err) = cli(&api, Some(TOKEN), &args);
    assert!(ok, "{err}");
    let job = job.trim().to_string();
    let logs = || format!("{}\n{}\n{}", coordinator.log(), worker.log(), status(&api, &job));
    wait_for(
        "every event written and the queue drained",
        Duration::from_secs(120),
        || {
            common::read_json_rows(&out).len() >= N
                && common::services::aws_at(iam, &["counts", &queue]).starts_with("0 ")
        },
        &logs,
    );
    let (ok, _, err) = cli(&api, Some(TOKEN), &["stop", &job]);
    assert!(ok, "{err}");
    wait_for("the job to stop", Duration::from_secs(60), || status(&api, &job)["state"] == "stopped", &logs);
    let rows: Vec<String> =
        common::read_json_rows(&out).iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    let ids: std::collections::BTreeSet<&String> = rows.iter().collect();
    assert_eq!((ids.len(), rows.len()), (N, N), "every event exactly once");

    // Nowhere the cluster keeps or shows things.
    let stored = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={etcd}"))
        .args(["get", &prefix, "--prefix"])
        .output()
        .unwrap();
    assert!(stored.status.success(), "{}", String::from_utf8_lossy(&stored.stderr));
    let stored = String::from_utf8_lossy(&stored.stdout).into_owned();
    assert!(stored.contains("${NAGARE_TEST_SQS_SECRET}"), "the job keeps the reference: {stored}");
    let shown = cli(&api, Some(TOKEN), &["status", &job, "--json"]).1;
    let mut checkpoints = String::new();
    for f in common::files_with(&dir.path().join("checkpoints"), &[""]) {
        checkpoints.push_str(&String::from_utf8_lossy(&std::fs::read(f).unwrap()));
    }
    for (what, text) in [("etcd", &stored), ("GetJob", &shown), ("checkpoints", &checkpoints), ("logs", &logs())] {
        assert!(!text.contains(&secret), "the secret is in {what}");
    }
    assert!(!checkpoints.is_empty(), "checkpoints were read");

    // A secret written into the SQL would be stored with the job: refused at submission, naming the option and
    // where it is, and not stored.
    let literal = std::fs::read_to_string(&sql).unwrap().replace("${NAGARE_TEST_SQS_SECRET}", "wR0ngLiteralSecret");
    std::fs::write(&sql, literal).unwrap();
    let (ok, _, err) = cli(&api, Some(TOKEN), &args[..args.len() - 2]);
    assert!(!ok, "a literal secret was accepted");
    assert!(
        err.contains("6:")
            && err.contains("option 'secret_access_key' of table 'events' is a secret written in the SQL"),
        "{err}"
    );
    let (_, jobs, _) = cli(&api, Some(TOKEN), &["jobs"]);
    assert_eq!(jobs.lines().filter(|l| l.contains("secret")).count(), 1, "not stored: {jobs}");
}
