//! Fault injection for crash tests: delays at named points of the checkpoint path that widen the windows a test's
//! SIGKILL aims at. Installed once, only by the binary's hidden `--test-fault POINT=DURATION` flag; nothing reads
//! the environment or a pipeline for it, so a production run cannot pick a delay up by accident.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

/// Where a delay can be put.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultPoint {
    /// Before a task's state snapshot is uploaded.
    Upload,
    /// Between writing a checkpoint's metadata and telling sinks to commit.
    Commit,
    /// Inside a BigQuery table's commit (before its flushes or its BatchCommit).
    BqCommit,
    /// After a BigQuery table's BUFFERED streams were flushed.
    BqFlushed,
}

impl FaultPoint {
    const ALL: [(&'static str, FaultPoint); 4] = [
        ("upload", FaultPoint::Upload),
        ("commit", FaultPoint::Commit),
        ("bq_commit", FaultPoint::BqCommit),
        ("bq_flushed", FaultPoint::BqFlushed),
    ];
}

static DELAYS: OnceLock<BTreeMap<FaultPoint, Duration>> = OnceLock::new();

/// Parses `POINT=DURATION` flags (e.g. `commit=400ms`) and installs them for this process.
pub fn install(flags: &[String]) -> Result<(), String> {
    let mut delays = BTreeMap::new();
    for f in flags {
        let (name, value) = f.split_once('=').ok_or_else(|| format!("--test-fault '{f}': write POINT=DURATION"))?;
        let point = FaultPoint::ALL.iter().find(|(n, _)| *n == name.trim()).map(|(_, p)| *p).ok_or_else(|| {
            let names: Vec<&str> = FaultPoint::ALL.iter().map(|(n, _)| *n).collect();
            format!("--test-fault '{f}': no fault point '{name}' (points: {})", names.join(", "))
        })?;
        let d = crate::parse_duration(value.trim()).map_err(|e| format!("--test-fault '{f}': {e}"))?;
        delays.insert(point, d);
    }
    if delays.is_empty() {
        return Ok(());
    }
    DELAYS.set(delays).map_err(|_| "test faults are installed once per process".to_string())
}

/// The delay installed at `point`, if any.
pub fn delay(point: FaultPoint) -> Option<Duration> {
    DELAYS.get().and_then(|d| d.get(&point).copied())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn flags_name_a_point_and_a_duration() {
        assert!(install(&["nowhere=1s".into()]).unwrap_err().contains("points: upload, commit, bq_commit"));
        assert!(install(&["commit".into()]).unwrap_err().contains("POINT=DURATION"));
        assert!(install(&["commit=soon".into()]).is_err());
        assert_eq!(delay(FaultPoint::Commit), None, "nothing is installed by default");
        install(&["commit=400ms".into(), "bq_flushed=1s".into()]).unwrap();
        assert_eq!(delay(FaultPoint::Commit), Some(Duration::from_millis(400)));
        assert_eq!(delay(FaultPoint::BqFlushed), Some(Duration::from_secs(1)));
        assert_eq!(delay(FaultPoint::Upload), None);
    }
}
