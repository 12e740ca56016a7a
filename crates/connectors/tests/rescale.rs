//! Source positions handed on across a rescale: what old subtasks had left is read once by the new ones.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::array::{Array, StringArray};
use nagare_core::CheckpointId;
use nagare_engine::connector::{Registry, Source, SourceContext, SourceEvent, SourceRestore};
use nagare_engine::metrics::NodeMetrics;
use nagare_sql::{OperatorSpec, SourceSpec};

fn registry() -> Registry {
    Registry::new()
        .with(Arc::new(nagare_connectors::filesystem::FilesystemSpec))
        .with(Arc::new(nagare_connectors::generator::GeneratorSpec))
        .with(Arc::new(nagare_connectors::stdout::StdoutSpec))
}

async fn source_spec(sql: &str, parallelism: u32) -> (SourceSpec, arrow::datatypes::SchemaRef) {
    let pipeline = registry().plan(sql, parallelism, &BTreeMap::new(), &BTreeMap::new()).await.unwrap();
    let node = pipeline.graph.nodes.iter().find(|n| matches!(n.operator, OperatorSpec::Source(_))).unwrap();
    let OperatorSpec::Source(spec) = &node.operator else { unreachable!() };
    (spec.clone(), node.schema.clone())
}

fn open(
    spec: &SourceSpec,
    schema: &arrow::datatypes::SchemaRef,
    subtask: usize,
    parallelism: usize,
    restore: Option<&SourceRestore>,
) -> Box<dyn Source> {
    let ctx = SourceContext {
        subtask,
        parallelism,
        batch_size: 100,
        dead_letter: None,
        metrics: Arc::new(NodeMetrics::new(0, "source".into(), "source", parallelism)),
        stop: Default::default(),
        checkpoints: true,
    };
    registry().create_source(spec, schema.clone(), ctx, restore).unwrap()
}

/// Reads up to `batches` batches (all, when `None`); returns the ids.
async fn read(source: &mut Box<dyn Source>, batches: Option<usize>, ids: &mut Vec<String>) {
    let mut n = 0;
    while batches.is_none_or(|b| n < b) {
        match source.next().await.unwrap() {
            SourceEvent::Batch(b) => {
                let col = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
                ids.extend((0..col.len()).map(|i| col.value(i).to_string()));
                n += 1;
            }
            SourceEvent::Idle(_) | SourceEvent::Pending => {}
            SourceEvent::End => return,
        }
    }
}

async fn rescale_reads_everything_once(sql: &str, total: usize) {
    let (spec, schema) = source_spec(sql, 2).await;
    let mut ids = Vec::new();
    let mut positions = Vec::new();
    for s in 0..2 {
        let mut src = open(&spec, &schema, s, 2, None);
        read(&mut src, Some(3), &mut ids).await;
        positions.push(Some(src.snapshot_position(CheckpointId(1)).unwrap()));
    }
    assert!(!ids.is_empty() && ids.len() < total, "read part-way: {}", ids.len());
    // 2 -> 3: old subtask k's rest goes to new subtask k % 3 (the third has nothing to do).
    let restore = SourceRestore { positions: positions.clone() };
    let (spec3, schema3) = source_spec(sql, 3).await;
    let mut at3 = Vec::new();
    for s in 0..3 {
        let mut src = open(&spec3, &schema3, s, 3, Some(&restore));
        read(&mut src, Some(2), &mut at3).await;
        positions.push(Some(src.snapshot_position(CheckpointId(2)).unwrap()));
    }
    ids.extend(at3);
    // 3 -> 1: everything left, in one subtask.
    let restore = SourceRestore { positions: positions[2..].to_vec() };
    let (spec1, schema1) = source_spec(sql, 1).await;
    let mut src = open(&spec1, &schema1, 0, 1, Some(&restore));
    read(&mut src, None, &mut ids).await;
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "no row twice");
    assert_eq!(ids.len(), total, "every row");
}

#[tokio::test]
async fn a_filesystem_source_hands_its_splits_on() {
    let dir = tempfile::tempdir().unwrap();
    for f in 0..4 {
        let lines: String = (0..1000).map(|n| format!("{{\"id\":\"f{f}-{n}\"}}\n")).collect();
        std::fs::write(dir.path().join(format!("part-{f}.jsonl")), lines).unwrap();
    }
    let sql = format!(
        "CREATE TABLE t (id TEXT) WITH (connector = 'filesystem', path = '{}/*.jsonl', format = 'json');\n\
         CREATE TABLE o WITH (connector = 'stdout');\nINSERT INTO o SELECT id FROM t;\n",
        dir.path().display()
    );
    rescale_reads_everything_once(&sql, 4000).await;
}

#[tokio::test]
async fn a_generator_hands_its_lanes_on() {
    let sql = "CREATE TABLE t (id TEXT) WITH (connector = 'generator', count = '5000', seed = '3');\n\
               CREATE TABLE o WITH (connector = 'stdout');\nINSERT INTO o SELECT id FROM t;\n";
    rescale_reads_everything_once(sql, 5000).await;
}

/// Reads everything left; returns column `col` of every row as text, in the order read.
async fn read_column(source: &mut Box<dyn Source>, col: usize) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        match source.next().await.unwrap() {
            SourceEvent::Batch(b) => {
                let c = b.column(col);
                if let Some(s) = c.as_any().downcast_ref::<StringArray>() {
                    out.extend((0..s.len()).map(|i| s.value(i).to_string()));
                } else {
                    // Timestamps as zero-padded numbers, so that text order is time order.
                    let n = arrow::compute::cast(c, &arrow::datatypes::DataType::Int64).unwrap();
                    let n = n.as_any().downcast_ref::<arrow::array::Int64Array>().unwrap();
                    out.extend((0..n.len()).map(|i| format!("{:020}", n.value(i))));
                }
            }
            SourceEvent::Idle(_) | SourceEvent::Pending => {}
            SourceEvent::End => return out,
        }
    }
}

/// 2 -> 1 after subtask 0 read five batches and subtask 1 one: the merged subtask reads what is left in the input's
/// order (sortable column `col`), not one old subtask's rest after the other's.
async fn a_merge_keeps_input_order(sql: &str, col: usize) {
    let (spec, schema) = source_spec(sql, 2).await;
    let mut positions = Vec::new();
    for (s, batches) in [(0, 5), (1, 1)] {
        let mut src = open(&spec, &schema, s, 2, None);
        read(&mut src, Some(batches), &mut Vec::new()).await;
        positions.push(Some(src.snapshot_position(CheckpointId(1)).unwrap()));
    }
    let restore = SourceRestore { positions };
    let (spec1, schema1) = source_spec(sql, 1).await;
    let mut src = open(&spec1, &schema1, 0, 1, Some(&restore));
    let values = read_column(&mut src, col).await;
    assert!(values.len() > 1000, "read {}", values.len());
    let back = values.windows(2).filter(|w| w[1] < w[0]).count();
    assert_eq!(back, 0, "the merged subtask went back in input order {back} times");
}

#[tokio::test]
async fn a_merged_filesystem_source_reads_splits_in_file_order() {
    let dir = tempfile::tempdir().unwrap();
    let lines: String = (0..4000).map(|n| format!("{{\"id\":\"{n:06}\"}}\n")).collect();
    std::fs::write(dir.path().join("events.jsonl"), lines).unwrap();
    // About 17 bytes a line: 4 KiB splits give each subtask many.
    let sql = format!(
        "CREATE TABLE t (id TEXT) WITH (connector = 'filesystem', path = '{}/events.jsonl', format = 'json', \
         split_size = '4KiB');\nCREATE TABLE o WITH (connector = 'stdout');\nINSERT INTO o SELECT id FROM t;\n",
        dir.path().display()
    );
    a_merge_keeps_input_order(&sql, 0).await;
}

#[tokio::test]
async fn a_merged_generator_interleaves_its_lanes_in_sequence_order() {
    let sql = "CREATE TABLE t (id TEXT, time TIMESTAMP) WITH (connector = 'generator', count = '5000', seed = '3');\n\
               CREATE TABLE o WITH (connector = 'stdout');\nINSERT INTO o SELECT id, time FROM t;\n";
    a_merge_keeps_input_order(sql, 1).await;
}

/// Reads until `want` ids have come (a watching source never ends), or fails after 20 s.
async fn read_ids(source: &mut Box<dyn Source>, want: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while ids.len() < want {
        assert!(std::time::Instant::now() < deadline, "only {} of {want} rows came", ids.len());
        match source.next().await.unwrap() {
            SourceEvent::Batch(b) => {
                let col = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
                ids.extend((0..col.len()).map(|i| col.value(i).to_string()));
            }
            SourceEvent::Idle(_) | SourceEvent::Pending => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            SourceEvent::End => panic!("a watching source ended"),
        }
    }
    ids
}

#[tokio::test]
async fn a_watching_source_resumes_with_the_files_it_had_seen() {
    let dir = tempfile::tempdir().unwrap();
    let lines = |f: &str, n: usize| (0..n).map(|i| format!("{{\"id\":\"{f}-{i}\"}}\n")).collect::<String>();
    std::fs::write(dir.path().join("a.jsonl"), lines("a", 1000)).unwrap();
    let sql = format!(
        "CREATE TABLE t (id TEXT) WITH (connector = 'filesystem', path = '{}', watch = true, watch_interval = '100ms');\n\
         CREATE TABLE o WITH (connector = 'stdout');\nINSERT INTO o SELECT id FROM t;\n",
        dir.path().display()
    );
    let (spec, schema) = source_spec(&sql, 1).await;
    let mut first = open(&spec, &schema, 0, 1, None);
    // Part of a, a checkpoint, the rest of a (read ahead or not, the position is that of what was handed on).
    let before = read_ids(&mut first, 300).await;
    let position = first.snapshot_position(CheckpointId(1)).unwrap();
    let mut after = read_ids(&mut first, 1000 - before.len()).await;
    drop(first);
    // A file appears; the job restarts from the checkpoint: the rest of a, then b, each row once.
    std::fs::write(dir.path().join("b.jsonl"), lines("b", 500)).unwrap();
    let restore = SourceRestore { positions: vec![Some(position)] };
    let mut second = open(&spec, &schema, 0, 1, Some(&restore));
    let resumed = read_ids(&mut second, 1000 - before.len() + 500).await;
    assert_eq!(resumed[..after.len()], after[..], "the rest of a, as the first run read it");
    after.extend(resumed[after.len()..].iter().cloned());
    let all: BTreeSet<String> = before.iter().chain(&after).cloned().collect();
    assert_eq!(all.len(), 1500, "a and b, each row once");
    assert_eq!(before.len() + after.len(), 1500);
    // Nothing more: a is not read again.
    for _ in 0..5 {
        match second.next().await.unwrap() {
            SourceEvent::Batch(b) => panic!("{} rows read again", b.num_rows()),
            _ => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}
