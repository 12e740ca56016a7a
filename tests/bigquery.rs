//! The bigquery sink against bqemulator (started by scripts/services/start-bqemulator.sh): tables created from the
//! SQL schema, mismatches refused before the job starts, and `append` exactly once across SIGKILLs.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::bq::{count, finish, nagare};
use common::services::{bigquery, bq_dataset, bq_query, bq_rest};
use common::{RunEnd, run_or_kill};

/// A pipeline writing `count` generated events to `dataset.table`; `${...}` filled in by [`nagare`].
fn pipeline(count: usize, rate: usize, extra: &str) -> String {
    pipeline_with(count, rate, extra, "0", "", "")
}

/// [`pipeline`] with re-deliveries, and extra sink columns/constraints and options.
fn pipeline_with(count: usize, rate: usize, extra: &str, dup: &str, sink_extra: &str, sink_opts: &str) -> String {
    format!(
        r#"
SET parallelism = 2;
{extra}
CREATE TABLE events (id TEXT, time TIMESTAMP, source TEXT, account TEXT,
  WATERMARK FOR time AS time - INTERVAL '5' SECOND)
WITH (connector = 'generator', count = '{count}', rate = '{rate}', duplicate_rate = '{dup}', seed = '11',
      start_time = '2026-01-01T00:00:00Z');
CREATE TABLE bq (id TEXT NOT NULL, event_time TIMESTAMP, source TEXT, account BIGINT{sink_extra})
WITH (connector = 'bigquery', project = '${{PROJECT}}', dataset = '${{DATASET}}', table = '${{TABLE}}',
      credentials = 'none', endpoint = '${{GRPC}}', rest_endpoint = '${{REST}}', create_table = 'if_not_exists',
      partition_by = 'event_time', cluster_by = 'source'{sink_opts});
INSERT INTO bq SELECT id, time, source, CAST(account AS BIGINT) FROM events;
"#
    )
}

#[test]
fn tables_are_created_from_the_sql_schema_and_mismatches_refused() {
    let dataset = format!("schema_{}", std::process::id());
    bq_dataset(&dataset);
    let dir = tempfile::tempdir().unwrap();
    let sql = dir.path().join("p.sql");
    std::fs::write(&sql, pipeline(500, 0, "")).unwrap();

    // Without checkpoints: the _default stream, rows visible as written.
    let (status, err) = finish(nagare(&sql, &dataset, "events", &[]));
    assert!(status.success(), "{err}");
    assert_eq!(count(&dataset, "events"), (500, 500));
    let t = bq_rest("GET", &format!("datasets/{dataset}/tables/events"), None);
    let fields: Vec<(String, String, String)> = t["schema"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let s = |k: &str| f[k].as_str().unwrap_or("NULLABLE").to_string();
            (s("name"), s("type"), s("mode"))
        })
        .collect();
    let fields: Vec<(&str, &str, &str)> = fields.iter().map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str())).collect();
    assert_eq!(fields.len(), 4, "{t}");
    assert_eq!(fields[0].0, "id");
    assert_eq!(fields[0].2, "REQUIRED");
    assert!(["TIMESTAMP"].contains(&fields[1].1), "{fields:?}");
    assert!(["INT64", "INTEGER"].contains(&fields[3].1), "{fields:?}");

    // A table whose column has another type: refused before anything runs, naming the column.
    bq_rest(
        "POST",
        &format!("datasets/{dataset}/tables"),
        Some(serde_json::json!({
            "tableReference": {"projectId": bigquery()["BIGQUERY_PROJECT"], "datasetId": dataset, "tableId": "wrong"},
            "schema": {"fields": [{"name": "id", "type": "STRING", "mode": "REQUIRED"}, {"name": "account", "type": "STRING"}]}
        })),
    );
    let (status, err) = finish(nagare(&sql, &dataset, "wrong", &[]));
    assert!(!status.success());
    assert!(err.contains("column 'account' is STRING in the table but INT64 in the pipeline"), "{err}");
    assert_eq!(count(&dataset, "wrong"), (0, 0), "nothing was written");

    // A missing table without create_table: refused, saying how to create it.
    std::fs::write(&sql, pipeline(10, 0, "").replace("create_table = 'if_not_exists',", "")).unwrap();
    let (status, err) = finish(nagare(&sql, &dataset, "missing", &[]));
    assert!(!status.success());
    assert!(err.contains("does not exist") && err.contains("create_table = 'if_not_exists'"), "{err}");

    // A table lacking a column gets it (NULLABLE). (bqemulator's tables.patch changes the schema but not its
    // storage, so no rows are written here; with real BigQuery they would be.)
    bq_rest(
        "POST",
        &format!("datasets/{dataset}/tables"),
        Some(serde_json::json!({
            "tableReference": {"projectId": bigquery()["BIGQUERY_PROJECT"], "datasetId": dataset, "tableId": "narrow"},
            "schema": {"fields": [{"name": "id", "type": "STRING"}, {"name": "event_time", "type": "TIMESTAMP"}]}
        })),
    );
    std::fs::write(&sql, pipeline(10, 0, "").replace("FROM events;", "FROM events WHERE id = 'no such id';")).unwrap();
    let (status, err) = finish(nagare(&sql, &dataset, "narrow", &[]));
    assert!(status.success(), "{err}");
    let t = bq_rest("GET", &format!("datasets/{dataset}/tables/narrow"), None);
    let fields = t["schema"]["fields"].as_array().unwrap();
    assert_eq!(fields.len(), 4, "{t}");
    assert_eq!(fields[3]["name"], "account");
    assert_eq!(fields[3]["mode"], "NULLABLE", "added columns are NULLABLE even if declared NOT NULL");
}

/// Runs `sql` into `dataset.<prefix>_<g>`, SIGKILLing it at random moments (at least 10 times, some while a
/// checkpoint commits), restarting each time; a run that finishes before enough kills starts over on a new table.
/// Returns the table the last, completed run filled.
fn crash_loop(sql: &std::path::Path, dataset: &str, prefix: &str, ckpt: &std::path::Path, seed: u64) -> String {
    let ckpt_arg = ckpt.to_string_lossy().to_string();
    let args = ["--checkpoint-dir", ckpt_arg.as_str()];
    let mut rng = fastrand::Rng::with_seed(seed);
    let faults: [&[&str]; 4] = [
        &[],
        // Between the checkpoint's metadata and the commit: recovery must commit (flush) the streams.
        &["commit=400ms"],
        // In the middle of the table's commit.
        &["bq_commit=200ms"],
        // commit = 'per_subtask': after the flush, while the subtasks append the next checkpoint's rows.
        &["bq_flushed=300ms"],
    ];
    let (mut kills, mut resumed) = (0, 0);
    let mut generation = 0;
    let table = |g: usize| format!("{prefix}_{g}");
    let mut finished = false;
    for round in 0..60 {
        let mut c = nagare(sql, dataset, &table(generation), &args);
        for f in faults[round % faults.len()] {
            c.args(["--test-fault", f]);
        }
        match run_or_kill(c, Duration::from_millis(rng.u64(300..2_500))) {
            (RunEnd::Exited(status), err) => {
                assert!(status.success(), "run {round} failed: {err}");
                finished = true;
                if kills >= 10 {
                    break;
                }
                generation += 1;
                finished = false;
                std::fs::remove_dir_all(ckpt).unwrap();
            }
            (RunEnd::Killed, err) => {
                kills += 1;
                assert!(!err.contains("panicked"), "{err}");
                resumed += usize::from(err.contains("resuming from checkpoint"));
            }
        }
        if kills >= 12 {
            break;
        }
    }
    assert!(kills >= 10, "only {kills} kills landed");
    assert!(resumed >= 6, "only {resumed} of {kills} killed runs had resumed from a checkpoint");
    if !finished {
        let (status, err) = finish(nagare(sql, dataset, &table(generation), &args));
        assert!(status.success(), "final run: {err}");
    }
    table(generation)
}

#[test]
fn append_atomic_is_exactly_once_across_sigkills() {
    const N: usize = 40_000;
    let dataset = format!("crash_{}", std::process::id());
    bq_dataset(&dataset);
    let dir = tempfile::tempdir().unwrap();
    let sql = dir.path().join("p.sql");
    let text = pipeline_with(N, 4_000, "SET checkpoint_interval = '300ms';", "0", "", ", commit = 'atomic'");
    std::fs::write(&sql, text).unwrap();
    let table = crash_loop(&sql, &dataset, "events", &dir.path().join("ckpt"), 77);
    // Every generated event exactly once (the generator emits N distinct ids).
    assert_eq!(count(&dataset, &table), (N as i64, N as i64));
}

/// [`pipeline`] writing through the Storage Write endpoint `grpc` instead of the emulator's (REST stays the
/// emulator's: tables are created and counted there).
fn pipeline_via(grpc: &str, count: usize, sink_opts: &str) -> String {
    pipeline_with(count, 4_000, "SET checkpoint_interval = '300ms';", "0", "", sink_opts).replace("${GRPC}", grpc)
}

/// `(rows, distinct ids)` a reader of the double's table sees.
fn double_count(fake: &nagare_bigquery::testing::Fake, dataset: &str, table: &str) -> (i64, i64) {
    let path = format!("projects/{}/datasets/{dataset}/tables/{table}", bigquery()["BIGQUERY_PROJECT"]);
    let keys = fake.visible_keys(&path);
    let distinct: std::collections::BTreeSet<&String> = keys.iter().collect();
    (keys.len() as i64, distinct.len() as i64)
}

/// Small enough that each subtask's stream (about 100 KB of rows a second) is replaced every second or third
/// checkpoint: rotations land between and across the kills.
const ROTATE_OFTEN: &str = ", stream_max_bytes = '64KB'";

#[test]
fn append_per_subtask_is_exactly_once_across_sigkills_and_rotations_on_the_emulator() {
    const N: usize = 40_000;
    // The checkpoint interval (300 ms) makes commit = 'auto' choose per_subtask; the proxy adapts the emulator's
    // FlushRows to Google's semantics (its offset is exclusive there).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream = bigquery()["BIGQUERY_GRPC_ENDPOINT"].clone();
    let proxy = rt.block_on(async { nagare_bigquery::testing::InclusiveFlushProxy::new(&upstream) });
    let grpc = rt.block_on(proxy.serve());
    let dataset = format!("buffered_{}", std::process::id());
    bq_dataset(&dataset);
    let dir = tempfile::tempdir().unwrap();
    let sql = dir.path().join("p.sql");
    std::fs::write(&sql, pipeline_via(&grpc, N, ROTATE_OFTEN)).unwrap();
    let table = crash_loop(&sql, &dataset, "events", &dir.path().join("ckpt"), 81);
    assert_eq!(count(&dataset, &table), (N as i64, N as i64));
    let created = proxy.created.load(std::sync::atomic::Ordering::Relaxed);
    // Without rotation: two streams per run, about 30 in all; measured with it: 70 to 150.
    assert!(created >= 45, "streams were rotated many times: {created} created");
    drop(rt);
}

#[test]
fn append_per_subtask_is_exactly_once_across_sigkills_and_rotations_on_the_double() {
    const N: usize = 40_000;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = nagare_bigquery::testing::Fake::default();
    let grpc = rt.block_on(fake.serve());
    let dataset = format!("bufdouble_{}", std::process::id());
    bq_dataset(&dataset);
    let dir = tempfile::tempdir().unwrap();
    let sql = dir.path().join("p.sql");
    std::fs::write(&sql, pipeline_via(&grpc, N, &format!(", commit = 'per_subtask'{ROTATE_OFTEN}"))).unwrap();
    let table = crash_loop(&sql, &dataset, "events", &dir.path().join("ckpt"), 82);
    assert_eq!(double_count(&fake, &dataset, &table), (N as i64, N as i64));
    let st = fake.state.lock().unwrap();
    let finalized = st.streams.values().filter(|s| s.buffered && s.finalized).count();
    assert!(finalized >= 10, "recoveries finalized the restored streams: {finalized}");
    // Without rotation: two streams per run, about 30 in all.
    assert!(st.streams_created >= 45, "streams were rotated many times: {} created", st.streams_created);
    drop(st);
    drop(rt);
}

#[test]
fn per_subtask_creates_streams_per_subtask_and_age_not_per_checkpoint() {
    const N: usize = 16_000;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dataset = format!("rate_{}", std::process::id());
    bq_dataset(&dataset);
    let dir = tempfile::tempdir().unwrap();
    let sql = dir.path().join("p.sql");
    let ckpt = dir.path().join("ckpt");
    let ckpt_arg = ckpt.to_string_lossy().to_string();
    // (commit option, table) -> (streams created, flushes) on a fresh double; ~4 s of input, checkpoints every
    // 300 ms, parallelism 2.
    let run = |opts: &str, table: &str| {
        let fake = nagare_bigquery::testing::Fake::default();
        let grpc = rt.block_on(fake.serve());
        std::fs::write(&sql, pipeline_via(&grpc, N, opts)).unwrap();
        let (status, err) = finish(nagare(&sql, &dataset, table, &["--checkpoint-dir", &ckpt_arg]));
        assert!(status.success(), "{err}");
        std::fs::remove_dir_all(&ckpt).unwrap();
        assert_eq!(double_count(&fake, &dataset, table), (N as i64, N as i64), "{opts}");
        let st = fake.state.lock().unwrap();
        let open = st.streams.values().filter(|s| !s.finalized).count();
        // The quota warning, from the mode's own creation rate.
        let warned = err.contains("CreateWriteStream quota");
        (st.streams_created, st.flushes, open, warned)
    };
    let (created, flushes, open, warned) = run("", "long_lived");
    assert!(!warned, "2 streams an hour per stream_max_age are far under the quota");
    assert_eq!(created, 2, "one BUFFERED stream per sink subtask for the whole run");
    assert!(flushes >= 10, "a flush per subtask per checkpoint: {flushes}");
    assert_eq!(open, 0, "streams are finalized when the job ends");
    let (created, _, open, _) = run(", stream_max_age = '1s'", "rotated");
    assert!((4..40).contains(&created), "streams replaced about every second: {created}");
    assert_eq!(open, 0, "retired streams are finalized once flushed");
    let (created, flushes, _, warned) = run(", commit = 'atomic'", "atomic");
    assert!(created >= 10, "a PENDING stream per subtask per checkpoint: {created}");
    assert!(warned, "2 x 3600 / 0.3 s = 24,000 streams an hour is over BigQuery's 10,000");
    assert_eq!(flushes, 0);
    drop(rt);

    // Refused before anything runs, pointing at the option.
    for (opts, says) in [
        (", commit = 'sometimes'", "commit"),
        (
            ", write_mode = 'load', staging_uri = 'gs://b/p', commit = 'per_subtask'",
            "only used with write_mode = 'append'",
        ),
        (", stream_max_age = '10ms'", "at least 1s"),
        (", stream_max_bytes = '1KB'", "at least 64KB"),
    ] {
        std::fs::write(&sql, pipeline_via("http://127.0.0.1:9", 10, opts)).unwrap();
        let (status, err) = finish(nagare(&sql, &dataset, "refused", &[]));
        assert!(!status.success());
        assert!(err.contains(says) && err.contains("p.sql:"), "{opts}: {err}");
    }
}

#[test]
fn merge_is_exactly_once_across_sigkills() {
    const N: usize = 30_000;
    let dataset = format!("merge_{}", std::process::id());
    bq_dataset(&dataset);
    let dir = tempfile::tempdir().unwrap();
    let sql = dir.path().join("p.sql");
    // 30 % re-deliveries: the same id again, merged into one row by the PRIMARY KEY.
    let text = pipeline_with(
        N,
        4_000,
        "SET checkpoint_interval = '300ms';",
        "0.3",
        ", PRIMARY KEY (id) NOT ENFORCED",
        ", write_mode = 'merge'",
    );
    std::fs::write(&sql, &text).unwrap();
    // A run without kills is the reference.
    let ckpt = dir.path().join("ckpt");
    let ckpt_arg = ckpt.to_string_lossy().to_string();
    let (status, err) = finish(nagare(&sql, &dataset, "reference", &["--checkpoint-dir", &ckpt_arg]));
    assert!(status.success(), "{err}");
    std::fs::remove_dir_all(&ckpt).unwrap();
    let (rows, distinct) = count(&dataset, "reference");
    assert_eq!(rows, distinct, "one row per key");
    assert!(rows > (N as i64) * 6 / 10 && rows < N as i64, "{rows} keys out of {N} events");

    let table = crash_loop(&sql, &dataset, "merged", &ckpt, 78);
    assert_eq!(count(&dataset, &table), (rows, rows));
    let project = &bigquery()["BIGQUERY_PROJECT"];
    let differ = bq_query(&format!(
        "SELECT COUNT(*) FROM `{project}.{dataset}.reference` r FULL OUTER JOIN `{project}.{dataset}.{table}` m \
         ON r.id = m.id WHERE r.id IS NULL OR m.id IS NULL OR r.account IS DISTINCT FROM m.account"
    ));
    assert_eq!(differ[0][0].as_deref(), Some("0"), "the merged table differs from the reference");
    let staged = bq_query(&format!("SELECT COUNT(*) FROM `{project}.{dataset}.{table}_nagare_staging`"));
    assert_eq!(staged[0][0].as_deref(), Some("0"), "merged staging rows are deleted");
}

/// The load mode's staging directory for a dataset: inside the emulator's stand-in for Cloud Storage, so the same
/// files are `gs://nagare-staging/<dataset>` to the emulator.
fn staging(dataset: &str) -> (std::path::PathBuf, String) {
    let root = std::path::PathBuf::from(&bigquery()["BIGQUERY_GCS_LOCAL_ROOT"]);
    (root.join("nagare-staging").join(dataset), format!("gs://nagare-staging/{dataset}"))
}

fn load_options(dataset: &str, interval: &str) -> String {
    let (dir, gs) = staging(dataset);
    format!(
        ", write_mode = 'load', staging_uri = '{}', staging_source_uri = '{gs}', load_interval = '{interval}'",
        dir.display()
    )
}

/// Parquet files left in a staging directory.
fn staged_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    common::files_with(dir, &["parquet"])
}

#[test]
fn load_is_exactly_once_across_sigkills() {
    const N: usize = 30_000;
    let dataset = format!("load_{}", std::process::id());
    bq_dataset(&dataset);
    let dir = tempfile::tempdir().unwrap();
    let sql = dir.path().join("p.sql");
    // Checkpoints every 300 ms, loads every 900 ms (every third checkpoint): kills land between staging, sealing,
    // loading and deleting.
    std::fs::write(
        &sql,
        pipeline_with(N, 4_000, "SET checkpoint_interval = '300ms';", "0", "", &load_options(&dataset, "900ms")),
    )
    .unwrap();
    let table = crash_loop(&sql, &dataset, "loaded", &dir.path().join("ckpt"), 79);
    assert_eq!(count(&dataset, &table), (N as i64, N as i64));
    let left = staged_files(&staging(&dataset).0);
    assert!(left.is_empty(), "loaded and abandoned staging files are deleted: {left:?}");
}

#[test]
fn load_without_checkpoints_loads_at_the_end_and_bad_staging_is_refused() {
    let dataset = format!("loadonce_{}", std::process::id());
    bq_dataset(&dataset);
    let dir = tempfile::tempdir().unwrap();
    let sql = dir.path().join("p.sql");
    std::fs::write(&sql, pipeline_with(2_000, 0, "", "0", "", &load_options(&dataset, "1h"))).unwrap();
    let (status, err) = finish(nagare(&sql, &dataset, "events", &[]));
    assert!(status.success(), "{err}");
    assert_eq!(count(&dataset, "events"), (2_000, 2_000));
    assert!(staged_files(&staging(&dataset).0).is_empty());

    // Staging BigQuery cannot read: refused before anything runs, naming the option.
    let local = format!(", write_mode = 'load', staging_uri = '{}'", dir.path().join("s").display());
    std::fs::write(&sql, pipeline_with(10, 0, "", "0", "", &local)).unwrap();
    let (status, err) = finish(nagare(&sql, &dataset, "events", &[]));
    assert!(!status.success());
    assert!(err.contains("staging_uri") && err.contains("not a gs:// URL"), "{err}");
    std::fs::write(&sql, pipeline_with(10, 0, "", "0", "", ", write_mode = 'load'")).unwrap();
    let (status, err) = finish(nagare(&sql, &dataset, "events", &[]));
    assert!(!status.success());
    assert!(err.contains("needs staging_uri"), "{err}");
    assert_eq!(count(&dataset, "events"), (2_000, 2_000), "nothing more was written");
}

/// Changes per tenant from generated events: the last one (by event time, then document number) is the tenant's
/// image; events whose status is 'sent' delete it. `sinks` are the sink tables' declarations, `inserts` the INSERTs.
fn upsert_pipeline(count: usize, dataset: &str, grpc: &str, table: &str, log: Option<&std::path::Path>) -> String {
    let env = bigquery();
    let select = "SELECT detail.tenant_id, time, CAST(substr(detail.document_id, 5) AS BIGINT), detail.amount, \
                  detail.status, CASE WHEN detail.status = 'sent' THEN 'DELETE' ELSE 'UPSERT' END FROM events";
    let log_part = log.map_or(String::new(), |p| {
        format!(
            "CREATE TABLE log (tenant_id BIGINT, seq BIGINT, doc BIGINT, status TEXT, op TEXT) \
             WITH (connector = 'filesystem', path = '{}', format = 'json');\n\
             INSERT INTO log SELECT detail.tenant_id, CAST(time AS BIGINT), CAST(substr(detail.document_id, 5) AS \
             BIGINT), detail.status, CASE WHEN detail.status = 'sent' THEN 'DELETE' ELSE 'UPSERT' END FROM events;",
            p.display()
        )
    });
    format!(
        r#"
SET parallelism = 2;
SET checkpoint_interval = '300ms';
CREATE TABLE events (id TEXT, time TIMESTAMP,
  detail STRUCT<tenant_id BIGINT, document_id TEXT, amount DOUBLE, status TEXT>,
  WATERMARK FOR time AS time - INTERVAL '5' SECOND)
WITH (connector = 'generator', count = '{count}', rate = '4000', duplicate_rate = '0.1', tenants = '300', seed = '12',
      start_time = '2026-01-01T00:00:00Z');
CREATE TABLE accounts (tenant_id BIGINT NOT NULL, updated TIMESTAMP NOT NULL, doc BIGINT NOT NULL, amount DOUBLE,
  status TEXT, op TEXT, PRIMARY KEY (tenant_id) NOT ENFORCED)
WITH (connector = 'bigquery', project = '{project}', dataset = '{dataset}', table = '{table}', credentials = 'none',
      endpoint = '{grpc}', rest_endpoint = '{rest}', create_table = 'if_not_exists', write_mode = 'upsert',
      sequence_by = 'updated, doc', change_type_column = 'op');
INSERT INTO accounts {select};
{log_part}
"#,
        project = env["BIGQUERY_PROJECT"],
        rest = env["BIGQUERY_REST_URL"],
    )
}

/// The double's rows of a table as (tenant, doc, status), sorted.
fn double_rows(double: &nagare_bigquery::cdc_double::CdcDouble, table: &str) -> Vec<(i64, i64, String)> {
    use nagare_bigquery::cdc_double::Value;
    let mut out: Vec<(i64, i64, String)> = double
        .rows(table)
        .iter()
        .map(|r| match (&r["tenant_id"], &r["doc"], &r["status"]) {
            (Value::Int(t), Value::Int(d), Value::Text(s)) => (*t, *d, s.clone()),
            other => panic!("unexpected row {other:?}"),
        })
        .collect();
    out.sort();
    out
}

#[test]
fn upsert_applies_the_last_change_per_key_exactly_once_across_sigkills() {
    const N: usize = 30_000;
    let double = nagare_bigquery::cdc_double::CdcDouble::default();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let grpc = rt.block_on(double.serve());
    let dataset = format!("upsert_{}", std::process::id());
    bq_dataset(&dataset);
    let project = bigquery()["BIGQUERY_PROJECT"].clone();
    let path = |t: &str| format!("projects/{project}/datasets/{dataset}/tables/{t}");
    for t in ["reference"].into_iter().map(String::from).chain((0..12).map(|g| format!("upserted_{g}"))) {
        double.add_table(&path(&t), &["tenant_id"]);
    }
    let dir = tempfile::tempdir().unwrap();

    // A run without kills, which also logs every change to a file: the expected table is computed from the log.
    let log = dir.path().join("log");
    let sql = dir.path().join("reference.sql");
    std::fs::write(&sql, upsert_pipeline(N, &dataset, &grpc, "reference", Some(&log))).unwrap();
    let ckpt = dir.path().join("ckpt");
    let ckpt_arg = ckpt.to_string_lossy().to_string();
    let (status, err) = finish(nagare(&sql, &dataset, "reference", &["--checkpoint-dir", &ckpt_arg]));
    assert!(status.success(), "{err}");
    std::fs::remove_dir_all(&ckpt).unwrap();
    let mut last: std::collections::BTreeMap<i64, (i64, i64, String, String)> = Default::default();
    let changes = common::read_json_rows(&log);
    assert_eq!(changes.len(), N, "every event (re-deliveries too) is a change");
    for c in &changes {
        let int = |k: &str| c[k].as_i64().unwrap();
        let change =
            (int("seq"), int("doc"), c["status"].as_str().unwrap().to_string(), c["op"].as_str().unwrap().to_string());
        let e = last.entry(int("tenant_id")).or_insert_with(|| change.clone());
        if (change.0, change.1) > (e.0, e.1) {
            *e = change;
        }
    }
    let expected: Vec<(i64, i64, String)> =
        last.iter().filter(|(_, c)| c.3 == "UPSERT").map(|(t, c)| (*t, c.1, c.2.clone())).collect();
    assert!(expected.len() > 100 && expected.len() < last.len(), "{} images, {} keys", expected.len(), last.len());
    assert_eq!(double_rows(&double, &path("reference")), expected);
    let sent = double.state.lock().unwrap().changes_received;
    assert!(sent < N / 2, "changes are collapsed per key per checkpoint before they are sent: {sent} of {N}");

    // The same with SIGKILLs: the source replays from the last checkpoint and the replayed changes carry the same
    // sequence numbers, so BigQuery's table ends the same.
    let sql = dir.path().join("p.sql");
    std::fs::write(&sql, upsert_pipeline(N, &dataset, &grpc, "${TABLE}", None)).unwrap();
    let table = crash_loop(&sql, &dataset, "upserted", &ckpt, 80);
    assert_eq!(double_rows(&double, &path(&table)), expected);
    drop(rt);
}

/// Accepts HTTP requests on a loopback port, records their `authorization` headers and answers 403.
fn recording_server() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 2 {
                if let Some(v) = line.strip_prefix("authorization: ").or_else(|| line.strip_prefix("Authorization: ")) {
                    record.lock().unwrap().push(v.trim().to_string());
                }
                line.clear();
            }
            let body = r#"{"error":{"message":"permission denied (test server)"}}"#;
            let _ = write!(
                conn,
                "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (format!("http://{addr}"), seen)
}

#[test]
fn default_credentials_sign_requests_and_never_show_the_token() {
    let dir = tempfile::tempdir().unwrap();
    // A service account key like the ones GCP issues (a fresh RSA key; PKCS#8 PEM).
    let pem = Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
        .output()
        .unwrap();
    assert!(pem.status.success(), "openssl: {}", String::from_utf8_lossy(&pem.stderr));
    let key = serde_json::json!({
        "type": "service_account",
        "project_id": "my-proj",
        "private_key_id": "abc123",
        "private_key": String::from_utf8(pem.stdout).unwrap(),
        "client_email": "nagare-test@my-proj.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    });
    let key_path = dir.path().join("key.json");
    std::fs::write(&key_path, key.to_string()).unwrap();
    let (rest, seen) = recording_server();
    let sql = dir.path().join("p.sql");
    std::fs::write(
        &sql,
        format!(
            r#"
CREATE TABLE events (id TEXT, time TIMESTAMP) WITH (connector = 'generator', count = '10');
CREATE TABLE bq (id TEXT) WITH (connector = 'bigquery', project = 'my-proj', dataset = 'd', table = 't',
  rest_endpoint = '{rest}', endpoint = 'http://127.0.0.1:9');
INSERT INTO bq SELECT id FROM events;
"#
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nagare"))
        .arg("run")
        .arg(&sql)
        .arg("-q")
        .env("GOOGLE_APPLICATION_CREDENTIALS", &key_path)
        .env("NAGARE_LOG", "debug")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("permission denied (test server)"), "{stderr}");
    let headers = seen.lock().unwrap().clone();
    assert!(!headers.is_empty(), "no request reached the server: {stderr}");
    let token = headers[0].strip_prefix("Bearer ").expect("a bearer token");
    // A JWT signed with the key, for BigQuery's scope, issued by the service account.
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    let claims = decode_base64url(parts[1]);
    let claims: serde_json::Value = serde_json::from_slice(&claims).unwrap();
    assert_eq!(claims["iss"], "nagare-test@my-proj.iam.gserviceaccount.com", "{claims}");
    assert!(claims["scope"].as_str().unwrap_or("").contains("auth/bigquery"), "{claims}");
    // Never in logs or errors, even at debug level.
    assert!(!stderr.contains(parts[2]) && !stderr.contains(parts[1]), "the token leaked into the output");
}

fn decode_base64url(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c).unwrap() as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}
