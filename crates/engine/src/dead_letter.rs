//! Dead-letter output: records that could not be processed, with the reason, as JSON lines in a directory.
//! Nothing is lost silently: a malformed input line or a late row is written here (or counted and dropped when the
//! pipeline says so).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow::record_batch::RecordBatch;
use serde_json::json;

use crate::error::{EngineError, Result};

/// A JSON-lines file of dead-letter records; shared by every subtask that writes to the same directory.
#[derive(Debug)]
pub struct DeadLetterWriter {
    path: PathBuf,
    file: Mutex<Option<BufWriter<File>>>,
}

impl DeadLetterWriter {
    /// The file this writer appends to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one record: where it came from, why it was rejected, and the record itself (raw text).
    pub fn write_raw(&self, origin: &str, location: &str, reason: &str, record: &str) -> Result<()> {
        let line = json!({
            "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "origin": origin,
            "location": location,
            "reason": reason,
            "record": record,
        });
        self.append(&line.to_string())
    }

    /// Writes rows of a batch (as JSON objects), each with the same reason.
    pub fn write_rows(&self, origin: &str, reason: &str, batch: &RecordBatch) -> Result<()> {
        let mut buf = Vec::new();
        {
            let mut w = arrow_json::LineDelimitedWriter::new(&mut buf);
            w.write(batch)?;
            w.finish()?;
        }
        let text = String::from_utf8_lossy(&buf);
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut out = String::new();
        for row in text.lines() {
            let row: serde_json::Value =
                serde_json::from_str(row).unwrap_or(serde_json::Value::String(row.to_string()));
            out.push_str(&json!({"time": now, "origin": origin, "reason": reason, "row": row}).to_string());
            out.push('\n');
        }
        self.append(out.trim_end_matches('\n'))
    }

    fn append(&self, text: &str) -> Result<()> {
        let mut guard = self.file.lock().map_err(|_| EngineError::Internal("dead-letter lock poisoned".into()))?;
        if guard.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| EngineError::io(format!("creating dead-letter directory {}", dir.display()), e))?;
            }
            let f = File::options()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| EngineError::io(format!("opening dead-letter file {}", self.path.display()), e))?;
            *guard = Some(BufWriter::new(f));
        }
        if let Some(w) = guard.as_mut() {
            writeln!(w, "{text}").map_err(|e| EngineError::io(format!("writing {}", self.path.display()), e))?;
        }
        Ok(())
    }

    /// Flushes buffered records to the file.
    pub fn flush(&self) -> Result<()> {
        let mut guard = self.file.lock().map_err(|_| EngineError::Internal("dead-letter lock poisoned".into()))?;
        if let Some(w) = guard.as_mut() {
            w.flush().map_err(|e| EngineError::io(format!("flushing {}", self.path.display()), e))?;
        }
        Ok(())
    }
}

/// The dead-letter files of a job, one per directory.
#[derive(Debug, Default)]
pub struct DeadLetters {
    run_id: String,
    writers: Mutex<HashMap<PathBuf, Arc<DeadLetterWriter>>>,
}

impl DeadLetters {
    /// Dead letters of run `run_id` (part of the file name, so runs never overwrite each other).
    pub fn new(run_id: impl Into<String>) -> Self {
        DeadLetters { run_id: run_id.into(), writers: Mutex::new(HashMap::new()) }
    }

    /// The writer for a directory.
    pub fn writer(&self, dir: &Path) -> Result<Arc<DeadLetterWriter>> {
        let mut map = self.writers.lock().map_err(|_| EngineError::Internal("dead-letter lock poisoned".into()))?;
        let w = map.entry(dir.to_path_buf()).or_insert_with(|| {
            Arc::new(DeadLetterWriter {
                path: dir.join(format!("dead-letter-{}.jsonl", self.run_id)),
                file: Mutex::new(None),
            })
        });
        Ok(w.clone())
    }

    /// Flushes every file.
    pub fn flush_all(&self) -> Result<()> {
        let writers: Vec<_> = self
            .writers
            .lock()
            .map_err(|_| EngineError::Internal("dead-letter lock poisoned".into()))?
            .values()
            .cloned()
            .collect();
        for w in writers {
            w.flush()?;
        }
        Ok(())
    }

    /// The files written so far.
    pub fn files(&self) -> Vec<PathBuf> {
        self.writers
            .lock()
            .map(|m| m.values().filter(|w| w.path.exists()).map(|w| w.path.clone()).collect())
            .unwrap_or_default()
    }
}
