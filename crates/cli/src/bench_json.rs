//! `nagare bench json`: W1's JSON lines into the columns its pipeline reads, by the projected JSON decoder and by
//! arrow-json (the baseline, and what nagare used before), over the same blocks in the same process.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use nagare_connectors::json_fast::FastJsonDecoder;

/// Lines per block: the filesystem source's default batch size.
const BLOCK_LINES: usize = 8192;

/// The columns W1's query reads from each event (`id`, `detail-type`, `time`, `detail.*`).
fn w1_projection() -> SchemaRef {
    let detail = Fields::from(vec![
        Field::new("tenant_id", DataType::Int64, true),
        Field::new("document_id", DataType::Utf8, true),
        Field::new("amount", DataType::Float64, true),
        Field::new("currency", DataType::Utf8, true),
        Field::new("status", DataType::Utf8, true),
    ]);
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, true),
        Field::new("detail-type", DataType::Utf8, true),
        Field::new("time", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
        Field::new("detail", DataType::Struct(detail), true),
    ]))
}

fn blocks(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut lines = 0;
    for nl in memchr::memchr_iter(b'\n', data) {
        lines += 1;
        if lines == BLOCK_LINES {
            out.push(&data[start..=nl]);
            start = nl + 1;
            lines = 0;
        }
    }
    if start < data.len() {
        out.push(&data[start..]);
    }
    out
}

/// Decodes one block with arrow-json, as the filesystem source did before the projected decoder.
fn arrow_json(decoder: &mut arrow_json::reader::Decoder, block: &[u8]) -> Result<Option<RecordBatch>> {
    let mut rest = block;
    while !rest.is_empty() {
        let n = decoder.decode(rest)?;
        rest = &rest[n..];
    }
    Ok(decoder.flush()?)
}

/// Runs the comparison and prints throughput and the ratio.
pub fn bench_json(rows: u64, dir: &Path, repeat: usize) -> Result<()> {
    let (_, input) = crate::bench::w1_input(dir, rows)?;
    let data = std::fs::read(&input).with_context(|| format!("reading {}", input.display()))?;
    let blocks = blocks(&data);
    let schema = w1_projection();
    let mb = data.len() as f64 / 1e6;
    println!("W1: {rows} events, {mb:.0} MB of JSON lines, {} blocks of {BLOCK_LINES} lines, one thread", blocks.len());
    let mut reference = arrow_json::ReaderBuilder::new(schema.clone())
        .with_batch_size(BLOCK_LINES + 1)
        .with_strict_mode(false)
        .build_decoder()?;
    let raw = vec![false; schema.fields().len()];
    let mut fast = FastJsonDecoder::try_new(schema.clone(), raw).context("W1's schema is one it handles")?;
    let (mut best_arrow, mut best_fast) = (f64::MAX, f64::MAX);
    for _ in 0..repeat.max(1) {
        // Block by block, alternating, so that a machine whose speed drifts treats both alike; the best pass counts.
        let (mut arrow_s, mut fast_s) = (0.0, 0.0);
        for block in &blocks {
            let t = Instant::now();
            let want = arrow_json(&mut reference, block)?;
            arrow_s += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let got = fast.decode(block).map_err(|_| anyhow::anyhow!("the projected decoder declined a W1 block"))?;
            fast_s += t.elapsed().as_secs_f64();
            ensure!(got == want, "the two decoders disagree on W1");
        }
        best_arrow = best_arrow.min(arrow_s);
        best_fast = best_fast.min(fast_s);
    }
    println!("{:<44} {:>8} {:>10} {:>12}", "decoder", "seconds", "MB/s", "events/s");
    for (label, s) in [("arrow-json (whole records)", best_arrow), ("projected (reads only used fields)", best_fast)] {
        println!("{label:<44} {s:>8.2} {:>10.0} {:>12.0}", mb / s, rows as f64 / s);
    }
    println!("ratio projected/arrow-json = {:.2} (time; outputs equal)", best_fast / best_arrow);
    Ok(())
}
