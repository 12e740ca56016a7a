//! The progress line, the final summary, and the Prometheus endpoint of `nagare run`.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nagare_engine::JobSummary;
use nagare_engine::metrics::{JobMetrics, NodeMetrics, figures_text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Human count: 1234567 → 1.23M.
pub fn count(n: f64) -> String {
    if n >= 1e9 {
        format!("{:.2}G", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e4 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

fn watermark_text(m: &JobMetrics) -> String {
    let wm = m.nodes.iter().filter(|n| n.kind == "source").filter_map(|n| n.watermark()).min();
    match wm {
        Some(i64::MAX) => "end".into(),
        Some(us) => chrono::DateTime::from_timestamp_micros(us)
            .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_default(),
        None => "-".into(),
    }
}

/// Redraws a one-line status on stderr twice a second, when stderr is a terminal.
pub fn spawn_progress(
    metrics: Arc<JobMetrics>,
    checkpoints: Arc<std::sync::Mutex<nagare_engine::checkpoint::coordinator::CheckpointStats>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if !std::io::stderr().is_terminal() {
            return;
        }
        let mut last = (Instant::now(), 0u64);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let read = metrics.rows_read();
            let now = Instant::now();
            let rate = (read - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-3);
            last = (now, read);
            let ckpt = checkpoints
                .lock()
                .ok()
                .and_then(|s| s.last.clone())
                .map(|c| format!("  ckpt #{} ({:.1}s, {} new)", c.id, c.duration.as_secs_f64(), bytes(c.bytes_written)))
                .unwrap_or_default();
            let line = format!(
                "in {} ({}/s)  out {}  dup {}  late {}  bad {}  watermark {}{ckpt}{}  {:.0}s",
                count(read as f64),
                count(rate),
                count(metrics.rows_written() as f64),
                count(metrics.sum("", |n| &n.duplicates) as f64),
                count(metrics.sum("", |n| &n.late_rows) as f64),
                count(metrics.sum("", |n| &n.bad_records) as f64),
                watermark_text(&metrics),
                connector_text(&metrics),
                metrics.started.elapsed().as_secs_f64()
            );
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
        }
    })
}

/// Human size: 1234567 → 1.2 MB.
pub fn bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

/// The connectors' own figures (e.g. SQS messages in flight), two spaces ahead of each node's.
fn connector_text(m: &JobMetrics) -> String {
    m.nodes
        .iter()
        .map(|n| n.connector_samples())
        .filter(|s| !s.is_empty())
        .map(|s| format!("  {}", figures_text(s.iter().map(|s| (s.name, s.label, s.value)))))
        .collect()
}

/// Erases the progress line.
pub fn clear_line() {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K");
    }
}

/// The final summary, on stderr.
pub fn print_summary(s: &JobSummary, metrics: &JobMetrics, late_policy: nagare_sql::LateRowPolicy) {
    let secs = s.elapsed.as_secs_f64().max(1e-6);
    eprintln!(
        "done in {secs:.2}s: read {} rows ({}/s), wrote {} rows; {} duplicates dropped, {} late, {} bad records",
        s.rows_read,
        count(s.rows_read as f64 / secs),
        s.rows_written,
        s.duplicates,
        s.late_rows,
        s.bad_records
    );
    if let Some(advice) = late_rows_advice(s.late_rows, Some(late_policy)) {
        eprintln!("{advice}");
    }
    let c = &s.checkpoints;
    if c.completed > 0 || c.aborted > 0 {
        let last = c
            .last
            .as_ref()
            .map(|l| {
                format!(
                    "; last #{} took {:.2}s (alignment {:.1}ms), state {} ({} written)",
                    l.id,
                    l.duration.as_secs_f64(),
                    l.alignment.as_secs_f64() * 1e3,
                    bytes(l.bytes),
                    bytes(l.bytes_written)
                )
            })
            .unwrap_or_default();
        eprintln!("checkpoints: {} completed, {} aborted{last}", c.completed, c.aborted);
    }
    for n in &metrics.nodes {
        let samples = n.connector_samples();
        if !samples.is_empty() {
            eprintln!("[{}] {}: {}", n.node, n.label, figures_text(samples.iter().map(|s| (s.name, s.label, s.value))));
        }
    }
    for f in &s.dead_letter_files {
        eprintln!("dead letters: {}", f.display());
    }
    if std::env::var_os("NAGARE_VERBOSE").is_some() {
        for n in &metrics.nodes {
            eprintln!(
                "  [{}] {}: in {} out {} state {} backpressure {:.2}s",
                n.node,
                n.label,
                NodeMetrics::get(&n.rows_in),
                NodeMetrics::get(&n.rows_out),
                n.state_entries.load(std::sync::atomic::Ordering::Relaxed),
                NodeMetrics::get(&n.backpressure_us) as f64 / 1e6
            );
        }
    }
}

/// Serves the job's metrics in Prometheus text format on `addr`.
pub async fn serve_metrics(addr: &str, render: impl Fn() -> String + Send + 'static) -> Result<()> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr} for metrics"))?;
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { continue };
            let body = render();
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = sock.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(())
}

/// What a run or job that had late rows tells its user: how many, what became of them, and how to keep them.
/// `policy` is `None` where it is not known (a job's status); late rows are counted only by windows, since a dedup
/// keeps the rows it receives late.
pub fn late_rows_advice(late_rows: u64, policy: Option<nagare_sql::LateRowPolicy>) -> Option<String> {
    if late_rows == 0 {
        return None;
    }
    let fate = match policy {
        Some(nagare_sql::LateRowPolicy::Drop) => "they were dropped",
        Some(nagare_sql::LateRowPolicy::DeadLetter) => "they were written to the dead-letter files",
        None => "they were dropped, or dead-lettered with late_rows = 'dead_letter'",
    };
    Some(format!(
        "warning: {late_rows} late rows arrived after their windows had closed and are not in any window's result; \
         {fate}. To keep them, SET late_rows = 'dead_letter' (with dead_letter_path), or give WATERMARK FOR a longer \
         delay (e.g. time - INTERVAL '1' MINUTE)"
    ))
}
