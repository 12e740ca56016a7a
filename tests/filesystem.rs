//! The filesystem connector end to end: Parquet in and out, parallel splits, rolling, compression.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::io::Write;

use arrow::array::AsArray;
use common::{files_with, read_json_rows, read_parquet, repo_root, run_sql};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_written_by_one_pipeline_is_read_by_another() {
    let root = repo_root();
    let dir = tempfile::tempdir().unwrap();
    let pq = dir.path().join("pq");
    let write = r#"
CREATE TABLE events (id TEXT, time TIMESTAMP, detail STRUCT<tenant_id BIGINT, amount DOUBLE>, tags ARRAY<TEXT>)
WITH (connector = 'filesystem', path = '${IN}');
CREATE TABLE pq WITH (connector = 'filesystem', path = '${PQ}', format = 'parquet', compression = 'zstd');
INSERT INTO pq SELECT id, time, detail, tags, CAST(detail.tenant_id AS INT) AS tenant FROM events;
"#;
    let input = root.join("sql/tests/data/events.jsonl");
    run_sql(write, &[("IN", input.to_str().unwrap()), ("PQ", pq.to_str().unwrap())])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let batches = read_parquet(&pq);
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 12);

    // Columns in another order, a column the files do not have (NULL), and INT read as BIGINT.
    let read = r#"
CREATE TABLE pq (tenant BIGINT, id TEXT, missing TEXT, detail STRUCT<tenant_id BIGINT, amount DOUBLE>, tags ARRAY<TEXT>)
WITH (connector = 'filesystem', path = '${PQ}', format = 'parquet');
CREATE TABLE out WITH (connector = 'filesystem', path = '${OUT}', format = 'json');
INSERT INTO out SELECT id, tenant, missing, detail.amount AS amount, tags[1] AS tag FROM pq;
"#;
    let out = dir.path().join("out");
    run_sql(read, &[("PQ", pq.to_str().unwrap()), ("OUT", out.to_str().unwrap())])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let rows = read_json_rows(&out);
    assert_eq!(rows.len(), 12);
    let a9 = rows.iter().find(|r| r["id"] == "a9").unwrap();
    assert_eq!(a9["tenant"], 2);
    assert_eq!(a9["amount"], 100.0);
    assert_eq!(a9["tag"], "x");
    assert!(a9.get("missing").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_files_are_read_in_parallel_splits_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("big.jsonl");
    let mut f = std::fs::File::create(&input).unwrap();
    let n = 40_000;
    for i in 0..n {
        // Lines of varying length so that split boundaries fall anywhere inside lines.
        writeln!(f, r#"{{"id":"r{i:06}","pad":"{}"}}"#, "y".repeat(i % 97)).unwrap();
    }
    // The last line has no newline.
    write!(f, r#"{{"id":"last"}}"#).unwrap();
    drop(f);
    let sql = r#"
SET parallelism = 3;
CREATE TABLE t (id TEXT) WITH (connector = 'filesystem', path = '${IN}', split_size = '50KB');
CREATE TABLE out WITH (connector = 'filesystem', path = '${OUT}', format = 'json', rollover_rows = 5000);
INSERT INTO out SELECT id FROM t;
"#;
    let out = dir.path().join("out");
    let summary = run_sql(sql, &[("IN", input.to_str().unwrap()), ("OUT", out.to_str().unwrap())])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(summary.rows_read, n as u64 + 1);
    let rows = read_json_rows(&out);
    let ids: BTreeSet<String> = rows.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(rows.len(), n + 1, "no line twice");
    assert_eq!(ids.len(), n + 1, "no line lost");
    // Rolled every 5000 rows per subtask.
    let files = files_with(&out, &[".jsonl"]);
    assert!(files.len() >= (n + 1) / 5000, "{} files", files.len());
    for file in &files {
        assert!(std::fs::read_to_string(file).unwrap().lines().count() <= 5000);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_input_and_gzip_json_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl.zst");
    let text: String = (0..1000).map(|i| format!("{{\"id\":\"z{i}\",\"n\":{i}}}\n")).collect();
    std::fs::write(&input, zstd::encode_all(text.as_bytes(), 3).unwrap()).unwrap();
    let sql = r#"
SET parallelism = 2;
CREATE TABLE t (id TEXT, n BIGINT) WITH (connector = 'filesystem', path = '${IN}');
CREATE TABLE out WITH (connector = 'filesystem', path = '${OUT}', format = 'json', compression = 'gzip');
INSERT INTO out SELECT id, n * 2 AS twice FROM t WHERE n % 2 = 0;
"#;
    let out = dir.path().join("out");
    run_sql(sql, &[("IN", input.to_str().unwrap()), ("OUT", out.to_str().unwrap())])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let files = files_with(&out, &[".jsonl.gz"]);
    assert!(!files.is_empty());
    let mut total = 0;
    for f in files {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(std::fs::File::open(f).unwrap()), &mut s)
            .unwrap();
        for line in s.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["twice"].as_i64().unwrap() % 4, 0);
            total += 1;
        }
    }
    assert_eq!(total, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_output_is_readable_and_typed() {
    let root = repo_root();
    let dir = tempfile::tempdir().unwrap();
    let sql = r#"
SET parallelism = 1;
CREATE TABLE events (id TEXT, time TIMESTAMP, payload JSON) WITH (connector = 'filesystem', path = '${IN}');
CREATE TABLE out WITH (connector = 'filesystem', path = '${OUT}');
INSERT INTO out SELECT id, time, payload FROM events WHERE id = 'a1';
"#;
    let input = root.join("sql/tests/data/events.jsonl");
    let out = dir.path().join("out");
    run_sql(sql, &[("IN", input.to_str().unwrap()), ("OUT", out.to_str().unwrap())])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let batches = read_parquet(&out);
    let b = &batches[0];
    assert_eq!(b.num_rows(), 2);
    assert_eq!(
        b.schema().field(1).data_type(),
        &arrow::datatypes::DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, Some("UTC".into()))
    );
    let payload = b.column(2).as_string::<i32>().value(0);
    let v: serde_json::Value = serde_json::from_str(payload).unwrap();
    assert_eq!(v, serde_json::json!({"k": "v1", "n": 1}), "JSON columns keep the raw JSON text");
}
