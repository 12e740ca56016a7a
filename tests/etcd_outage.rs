//! etcd away for longer than every lease (issue 15): two coordinators and three workers on an etcd of their own,
//! started by scripts/services/start-etcd.sh on a free port (pausing the shared one would stall every other test
//! using it). etcd is paused (SIGSTOP) for twice the longest lease — the leader's 5 s, the workers' 3 s — once while
//! the cluster is idle and once while a job runs. Each time every worker must register again and a coordinator
//! lead again; the job must finish with the output of a reference run, id for id, and a job submitted afterwards
//! must run. A job record left behind by the outage (`scheduling` although its work was done) must end `finished`
//! from the final checkpoint, without writing anything again.
#![allow(clippy::unwrap_used)]

mod common;

use common::procs::{Proc, free_port, insecure_coordinator, insecure_worker};

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TOKEN: &str = "test-token-e15";
/// The workers' lease (`nagare worker --lease-ttl`, default) and the leader's (`leader::LEASE_TTL`), in seconds.
const WORKER_LEASE: u64 = 3;
const LEADER_LEASE: u64 = 5;

/// An etcd of this test's own, stopped when dropped.
struct Etcd {
    endpoints: String,
    pid: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    fn start() -> Etcd {
        // The shared instance first: it installs etcd (under the script's lock) if this machine has none yet.
        common::services::etcd();
        let dir = tempfile::tempdir().unwrap();
        let script = common::repo_root().join("scripts/services/start-etcd.sh");
        let out = Command::new(&script)
            .env("ETCD_PORT", free_port().to_string())
            .env("ETCD_PEER_PORT", free_port().to_string())
            .env("SVC_DIR", dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} failed ({}); it starts etcd on a free port for this test:\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8_lossy(&out.stdout).into_owned();
        let value = |key: &str| {
            printed
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .unwrap_or_else(|| panic!("{key} not in {printed}"))
                .to_string()
        };
        Etcd { endpoints: value("ETCD_ENDPOINTS="), pid: value("ETCD_PID="), _dir: dir }
    }

    fn signal(&self, sig: &str) {
        assert!(Command::new("kill").args([sig, &self.pid]).status().unwrap().success(), "kill {sig} {}", self.pid);
    }

    /// Pauses etcd for `pause`; returns when it runs again.
    fn pause(&self, pause: Duration) -> Instant {
        self.signal("-STOP");
        std::thread::sleep(pause);
        self.signal("-CONT");
        Instant::now()
    }

    fn etcdctl(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.pid]).status();
        let _ = Command::new("kill").args(["-TERM", &self.pid]).status();
    }
}

/// Runs a client command against `api`; returns (success, stdout, stderr).
fn cli(api: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nagare"))
        .args(args)
        .env("NAGARE_COORDINATOR", api)
        .env("NAGARE_TOKEN", TOKEN)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// The job's status, or `null` while the API cannot answer (etcd just came back).
fn status(api: &str, job: &str) -> serde_json::Value {
    let (ok, out, _) = cli(api, &["status", job, "--json"]);
    if ok { serde_json::from_str(&out).unwrap() } else { serde_json::Value::Null }
}

/// The ids of the workers `nagare workers` lists (none while the API cannot answer).
fn workers(api: &str) -> BTreeSet<String> {
    let (ok, out, _) = cli(api, &["workers"]);
    if !ok {
        return BTreeSet::new();
    }
    out.lines().skip(1).filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect()
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool, logs: &dyn Fn() -> String) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}\n{}", logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    start.elapsed()
}

fn dedup_sql(events: usize) -> String {
    common::generated_dedup_sql(events, 7)
}

/// The ids written under `out`, checking that none was written twice.
fn ids_once(out: &Path) -> BTreeSet<String> {
    let rows = common::read_json_rows(out);
    let ids: BTreeSet<String> = rows.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(rows.len(), ids.len(), "an event was written twice under {}", out.display());
    ids
}

/// Lines of a log at WARN from the coordinator's election loop.
fn election_warnings(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("WARN") && l.contains("nagare_coordinator::leader")).collect()
}

#[test]
fn the_cluster_recovers_from_etcd_outages_longer_than_every_lease() {
    const N: usize = 60_000;
    let pause = Duration::from_secs(2 * WORKER_LEASE.max(LEADER_LEASE));
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let prefix = "/nagare-outage";
    let coordinator = |name: &str| insecure_coordinator(dir.path(), &etcd.endpoints, prefix, TOKEN, name, &[], &[]);
    let (_, c1) = coordinator("c1");
    wait_for("c1 to lead", Duration::from_secs(30), || c1.log().contains("leading"), &|| c1.log());
    let (api, c2) = coordinator("c2");
    let worker = |id: &str| insecure_worker(dir.path(), &etcd.endpoints, prefix, TOKEN, id, &[]);
    let ws: Vec<Proc> = ["w1", "w2", "w3"].into_iter().map(worker).collect();
    let all: BTreeSet<String> = ["w1", "w2", "w3"].into_iter().map(str::to_string).collect();
    let procs: Vec<(String, PathBuf)> = [&c1, &c2]
        .into_iter()
        .chain(ws.iter())
        .map(|p| (p.log.file_name().unwrap().to_string_lossy().into_owned(), p.log.clone()))
        .collect();
    let logs = move || {
        procs
            .iter()
            .map(|(n, p)| format!("--- {n}\n{}", std::fs::read_to_string(p).unwrap_or_default()))
            .collect::<String>()
    };
    wait_for("three workers", Duration::from_secs(30), || workers(&api) == all, &logs);
    let leading = || c1.log().matches("leading: scheduling").count() + c2.log().matches("leading: scheduling").count();
    // How often each worker has registered again with a new lease; listed by the API, each with a new one.
    let registrations = || ws.iter().map(|w| w.log().matches("registered again with a new lease").count()).collect();
    let registered_again = |before: &Vec<usize>| {
        let now: Vec<usize> = registrations();
        now.iter().zip(before).all(|(n, b)| n > b) && workers(&api) == all
    };

    // 1. While idle: every worker registers again with a new lease, and a coordinator leads again.
    let (led, before) = (leading(), registrations());
    let resumed = etcd.pause(pause);
    let back = wait_for("every worker to register again", Duration::from_secs(60), || registered_again(&before), &logs);
    wait_for("a coordinator to lead again", Duration::from_secs(60), || leading() > led, &logs);
    eprintln!(
        "idle outage of {pause:?}: every worker registered again {:.2} s after etcd resumed, a leader by {:.2} s",
        back.as_secs_f64(),
        resumed.elapsed().as_secs_f64()
    );

    // 2. While a job runs: its parts stop when their workers' leases may have expired (the leader may move them);
    // once etcd answers, the workers register again and the new leader restarts the job from its last checkpoint.
    let sql = dir.path().join("p.sql");
    std::fs::write(&sql, dedup_sql(N)).unwrap();
    let reference = dir.path().join("reference");
    let run = Command::new(env!("CARGO_BIN_EXE_nagare"))
        .arg("run")
        .arg(&sql)
        .args(["-q", "--var", "RATE=0", "--var"])
        .arg(format!("OUT={}", reference.display()))
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let expected = ids_once(&reference);
    assert!(expected.len() < N * 9 / 10, "re-deliveries were generated and dropped: {} of {N}", expected.len());
    let submit = |name: &str, rate: u32, out: &Path| {
        let (rate, out) = (format!("RATE={rate}"), format!("OUT={}", out.display()));
        let (ok, job, err) =
            cli(&api, &["submit", sql.to_str().unwrap(), "--name", name, "--var", &rate, "--var", &out]);
        assert!(ok, "{err}");
        job.trim().to_string()
    };
    let out = dir.path().join("out");
    let job = submit("through-the-outage", 3000, &out);
    wait_for(
        "the job to run with a checkpoint",
        Duration::from_secs(60),
        || {
            let s = status(&api, &job);
            s["state"] == "running" && s["last_checkpoint"].as_u64() > Some(0)
        },
        &logs,
    );
    let (led, before) = (leading(), registrations());
    let resumed = etcd.pause(pause);
    let back = wait_for("every worker to register again", Duration::from_secs(60), || registered_again(&before), &logs);
    wait_for("a coordinator to lead again", Duration::from_secs(60), || leading() > led, &logs);
    let job_logs = || format!("{}\n{}", status(&api, &job), logs());
    wait_for("the job to finish", Duration::from_secs(180), || status(&api, &job)["state"] == "finished", &job_logs);
    eprintln!(
        "outage of {pause:?} during a job: workers registered again {:.2} s after etcd resumed; the job finished \
         {:.2} s after",
        back.as_secs_f64(),
        resumed.elapsed().as_secs_f64()
    );
    let s = status(&api, &job);
    // (at 3000 events/s it needs 20 s: its parts were running when their leases gave out)
    assert!(s["attempt"].as_u64() > Some(1), "the job restarted from a checkpoint after the outage: {s}");
    assert_eq!(ids_once(&out), expected, "every event the reference run kept, and no other");

    // 3. A record the outage left behind: the work is done (the final checkpoint completed) but the record still
    // says `scheduling`, as if its last writes were lost. A restart finds the final checkpoint and finishes at once.
    let key = format!("{prefix}/jobs/{job}");
    let mut record: serde_json::Value =
        serde_json::from_slice(&etcd.etcdctl(&["get", &key, "--print-value-only"])).unwrap();
    let attempt = record["attempt"].as_u64().unwrap();
    record["state"] = "scheduling".into();
    record["workers"] = serde_json::json!([]);
    record["slot_parts"] = serde_json::json!([]);
    etcd.etcdctl(&["put", &key, &record.to_string()]);
    let again = wait_for(
        "the left-behind job to finish again",
        Duration::from_secs(60),
        || {
            let s = status(&api, &job);
            s["state"] == "finished" && s["attempt"].as_u64() > Some(attempt)
        },
        &job_logs,
    );
    eprintln!(
        "a record left `scheduling` after its final checkpoint: finished again within {:.2} s",
        again.as_secs_f64()
    );
    assert_eq!(ids_once(&out), expected, "nothing written again");

    // 4. A job submitted afterwards runs.
    let after = dir.path().join("after");
    let job2 = submit("after-the-outage", 0, &after);
    wait_for(
        "the second job to finish",
        Duration::from_secs(120),
        || status(&api, &job2)["state"] == "finished",
        &logs,
    );
    assert_eq!(ids_once(&after), expected);

    // The etcd outages show in the coordinators' logs once each, not as a warning every few seconds for as long as
    // a coordinator waits behind the leader.
    for c in [&c1, &c2] {
        let log = c.log();
        let warnings = election_warnings(&log);
        assert!(
            warnings.len() <= 2 * 3,
            "{} election warnings for 2 outages:\n{}",
            warnings.len(),
            warnings.join("\n")
        );
        assert!(!log.contains("election failed"), "{log}");
    }
}
