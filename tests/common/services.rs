//! Real services for tests, started by the project's scripts (scripts/services/) — never assumed present.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::OnceLock;

/// Where the service scripts keep their state and logs.
fn svc_dir() -> String {
    std::env::var("SVC_DIR").unwrap_or_else(|_| format!("{}/nagare-services", std::env::temp_dir().display()))
}

/// Runs `scripts/services/<script>` under a lock (tests run in parallel processes) and returns the `KEY=value`
/// lines it prints. Panics with how to start the service by hand if it cannot be started.
pub fn start(script: &str) -> BTreeMap<String, String> {
    let root = super::repo_root();
    let svc_dir = svc_dir();
    std::fs::create_dir_all(&svc_dir).unwrap();
    let path = root.join("scripts/services").join(script);
    // -o: the lock is not inherited by the service the script leaves running.
    let out = Command::new("flock")
        .arg("-o")
        .arg(format!("{svc_dir}/{script}.lock"))
        .arg(&path)
        .env("SVC_DIR", &svc_dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; start it by hand: {}", path.display(), path.display()));
    assert!(
        out.status.success(),
        "{} failed ({}); start it by hand and rerun the tests:\n  {}\nstderr:\n{}",
        script,
        out.status,
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.split_whitespace().next().unwrap_or("").to_string()))
        .collect()
}

/// moto (S3, SQS, ...) on loopback: the environment variables an AWS client needs.
pub fn moto() -> &'static BTreeMap<String, String> {
    static MOTO: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    MOTO.get_or_init(|| {
        let mut env = start("start-moto.sh");
        env.insert("AWS_ALLOW_HTTP".into(), "true".into());
        env
    })
}

/// Runs `scripts/services/moto-aws.py <args>` (boto3 against moto: queues, EventBridge rules, events, message
/// batches) and returns its output, trimmed.
pub fn aws(args: &[&str]) -> String {
    aws_at(moto(), args)
}

/// moto in IAM-auth mode with an HTTPS STS front (scripts/services/start-moto-iam.sh): signatures are checked, and
/// `AWS_ROLE_ARN` + `AWS_ENDPOINT_URL_STS` serve web identity credentials.
pub fn moto_iam() -> &'static BTreeMap<String, String> {
    static MOTO_IAM: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    MOTO_IAM.get_or_init(|| start("start-moto-iam.sh"))
}

/// [`aws`] against the moto whose variables are `env`.
pub fn aws_at(env: &BTreeMap<String, String>, args: &[&str]) -> String {
    let script = super::repo_root().join("scripts/services/moto-aws.py");
    let python = env.get("MOTO_PYTHON").cloned().unwrap_or_else(|| "python3".into());
    let out = Command::new(&python)
        .arg(&script)
        .args(args)
        .envs(env.iter().filter(|(k, _)| k.starts_with("AWS_")))
        .output()
        .unwrap();
    assert!(out.status.success(), "moto-aws.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Creates an S3 bucket on moto (path-style PUT).
pub fn create_bucket(name: &str) {
    let endpoint = &moto()["AWS_ENDPOINT_URL"];
    let status = Command::new("curl")
        .args(["-sf", "--max-time", "60", "-X", "PUT", &format!("{endpoint}/{name}")])
        .status()
        .unwrap();
    assert!(status.success(), "creating bucket {name} on {endpoint}");
}

/// bqemulator (BigQuery REST v2 + Storage Write gRPC) on loopback: `BIGQUERY_REST_URL`, `BIGQUERY_GRPC_ENDPOINT`,
/// `BIGQUERY_PROJECT`.
pub fn bigquery() -> &'static BTreeMap<String, String> {
    static BQ: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    BQ.get_or_init(|| start("start-bqemulator.sh"))
}

/// Calls the emulator's REST API (independently of nagare's client) and returns the JSON answer.
pub fn bq_rest(method: &str, path: &str, body: Option<serde_json::Value>) -> serde_json::Value {
    let url =
        format!("{}/bigquery/v2/projects/{}/{path}", bigquery()["BIGQUERY_REST_URL"], bigquery()["BIGQUERY_PROJECT"]);
    let mut cmd = Command::new("curl");
    // A bounded wait: a wedged emulator fails the test with the emulator's log instead of hanging CI.
    cmd.args(["-s", "--max-time", "60", "-X", method, &url, "-H", "content-type: application/json"]);
    if let Some(b) = body {
        cmd.args(["--data-binary", &b.to_string()]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "curl {method} {url}: {}\n{}", out.status, bq_log_tail());
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Creates a dataset (a fresh name per test keeps tests apart).
pub fn bq_dataset(name: &str) {
    bq_rest("POST", "datasets", Some(serde_json::json!({"datasetReference": {"datasetId": name}})));
}

/// Runs a query and returns the rows' cell values as text.
pub fn bq_query(sql: &str) -> Vec<Vec<Option<String>>> {
    let v = bq_rest("POST", "queries", Some(serde_json::json!({"query": sql, "useLegacySql": false})));
    let rows = v["rows"].as_array().unwrap_or_else(|| panic!("query {sql} failed: {v}"));
    rows.iter()
        .map(|r| r["f"].as_array().unwrap().iter().map(|c| c["v"].as_str().map(str::to_string)).collect())
        .collect()
}

/// The last lines of the emulator's log, for failure messages.
pub fn bq_log_tail() -> String {
    let log = format!("{}/bqemulator/bqemulator.log", svc_dir());
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!("last lines of {log}:\n{}", lines[lines.len().saturating_sub(30)..].join("\n"))
}

/// etcd on loopback: `ETCD_ENDPOINTS`.
pub fn etcd() -> &'static BTreeMap<String, String> {
    static ETCD: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    ETCD.get_or_init(|| start("start-etcd.sh"))
}
