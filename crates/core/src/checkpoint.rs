//! Checkpoints as data, and the decisions about them as pure functions: which acknowledgements complete a
//! checkpoint, which stored checkpoint to restore from, which to delete. Storage and messaging live elsewhere; this
//! module does no I/O, so the protocol can be tested exhaustively.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::CheckpointId;

/// Format version of [`CheckpointMetadata`].
pub const METADATA_VERSION: u32 = 1;

/// A subtask: node id in the graph and subtask index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskKey {
    /// Node id.
    pub node: usize,
    /// Subtask index.
    pub subtask: usize,
}

impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {} subtask {}", self.node, self.subtask)
    }
}

/// A state file written for a checkpoint, relative to the checkpoint root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    /// Path relative to the checkpoint root.
    pub path: String,
    /// Which part of the operator's state it holds (`groups`, `pending`, ...).
    pub part: String,
    /// Size, checked on restore.
    pub bytes: u64,
    /// Rows.
    pub rows: u64,
    /// The checkpoint that wrote it: incremental state refers to files written by earlier checkpoints.
    #[serde(default)]
    pub checkpoint: u64,
}

/// What one subtask contributed to a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSnapshot {
    /// Which subtask.
    pub task: TaskKey,
    /// State files of its operators, by node id (a chain has several operators).
    pub state: BTreeMap<usize, Vec<StateFile>>,
    /// Where a source restarts (connector-defined).
    pub source_position: Option<serde_json::Value>,
    /// What a sink commits when the checkpoint completes (connector-defined).
    pub sink_commit: Option<serde_json::Value>,
    /// Time from the first barrier to alignment, µs.
    pub alignment_us: u64,
}

/// A completed checkpoint; writing it is the commit point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMetadata {
    /// Format version.
    pub version: u32,
    /// Checkpoint id.
    pub id: u64,
    /// Fingerprint of each stateful node (label, operator and schema), by node id: restoring into a changed
    /// pipeline is refused.
    pub fingerprints: BTreeMap<usize, String>,
    /// Parallelism of each node when the checkpoint was taken.
    pub parallelism: BTreeMap<usize, usize>,
    /// Every subtask's contribution.
    pub tasks: Vec<TaskSnapshot>,
    /// When it was triggered (ms since epoch).
    pub triggered_ms: i64,
    /// When it completed (ms since epoch).
    pub completed_ms: i64,
    /// Largest alignment time over subtasks, µs.
    pub alignment_us: u64,
    /// Bytes of state it refers to: what a restore reads.
    pub bytes: u64,
    /// Bytes of state this checkpoint wrote (less than `bytes` when state is incremental).
    #[serde(default)]
    pub bytes_written: u64,
    /// Whether the job ended with this checkpoint (its input was exhausted or it was stopped).
    pub final_checkpoint: bool,
}

impl CheckpointMetadata {
    /// Every state file the checkpoint refers to.
    pub fn files(&self) -> impl Iterator<Item = &StateFile> {
        self.tasks.iter().flat_map(|t| t.state.values().flatten())
    }

    /// The snapshot of one subtask.
    pub fn task(&self, key: TaskKey) -> Option<&TaskSnapshot> {
        self.tasks.iter().find(|t| t.task == key)
    }
}

/// What an acknowledgement did to the checkpoint in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckOutcome {
    /// Recorded; more are expected.
    Recorded,
    /// The last one: the checkpoint is complete.
    Complete,
    /// For another checkpoint (aborted or unknown), or a duplicate: ignored.
    Ignored,
}

/// A checkpoint that has been triggered and is collecting acknowledgements.
#[derive(Debug, Clone)]
pub struct PendingCheckpoint {
    /// Its id.
    pub id: CheckpointId,
    /// When it was triggered (ms since epoch).
    pub triggered_ms: i64,
    /// Whether the job ends with it.
    pub final_checkpoint: bool,
    expected: BTreeSet<TaskKey>,
    acks: BTreeMap<TaskKey, TaskSnapshot>,
}

impl PendingCheckpoint {
    /// A checkpoint waiting for every task in `expected`.
    pub fn new(id: CheckpointId, expected: BTreeSet<TaskKey>, triggered_ms: i64, final_checkpoint: bool) -> Self {
        PendingCheckpoint { id, triggered_ms, final_checkpoint, expected, acks: BTreeMap::new() }
    }

    /// Records a subtask's acknowledgement.
    pub fn ack(&mut self, id: CheckpointId, snapshot: TaskSnapshot) -> AckOutcome {
        if id != self.id || !self.expected.contains(&snapshot.task) || self.acks.contains_key(&snapshot.task) {
            return AckOutcome::Ignored;
        }
        self.acks.insert(snapshot.task, snapshot);
        if self.acks.len() == self.expected.len() { AckOutcome::Complete } else { AckOutcome::Recorded }
    }

    /// Tasks that have not acknowledged yet (for timeout messages).
    pub fn missing(&self) -> Vec<TaskKey> {
        self.expected.iter().filter(|k| !self.acks.contains_key(k)).copied().collect()
    }

    /// Whether the checkpoint has been waiting longer than `timeout_ms`.
    pub fn timed_out(&self, now_ms: i64, timeout_ms: i64) -> bool {
        now_ms - self.triggered_ms > timeout_ms
    }

    /// The metadata of the completed checkpoint (call after [`AckOutcome::Complete`]).
    pub fn complete(
        self,
        completed_ms: i64,
        fingerprints: BTreeMap<usize, String>,
        parallelism: BTreeMap<usize, usize>,
    ) -> CheckpointMetadata {
        let tasks: Vec<TaskSnapshot> = self.acks.into_values().collect();
        let alignment_us = tasks.iter().map(|t| t.alignment_us).max().unwrap_or(0);
        let files = || tasks.iter().flat_map(|t| t.state.values().flatten());
        let bytes = files().map(|f| f.bytes).sum();
        let bytes_written = files().filter(|f| f.checkpoint == self.id.0).map(|f| f.bytes).sum();
        CheckpointMetadata {
            version: METADATA_VERSION,
            id: self.id.0,
            fingerprints,
            parallelism,
            tasks,
            triggered_ms: self.triggered_ms,
            completed_ms,
            alignment_us,
            bytes,
            bytes_written,
            final_checkpoint: self.final_checkpoint,
        }
    }
}

/// A stored checkpoint as found in the store, checked or not.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Its id (from its directory name).
    pub id: u64,
    /// The metadata, or why it could not be read or does not hold together.
    pub metadata: Result<CheckpointMetadata, String>,
}

/// Which checkpoint to restore from, and what was skipped on the way.
#[derive(Debug, Clone, Default)]
pub struct RestoreChoice {
    /// The newest checkpoint that is complete and intact.
    pub restore: Option<CheckpointMetadata>,
    /// Newer checkpoints that were passed over, with the reason.
    pub skipped: Vec<(u64, String)>,
}

/// Picks the newest intact checkpoint; checkpoints without (readable) metadata were never completed or are damaged.
pub fn choose_restore(mut candidates: Vec<Candidate>) -> RestoreChoice {
    candidates.sort_by_key(|c| std::cmp::Reverse(c.id));
    let mut choice = RestoreChoice::default();
    for c in candidates {
        match c.metadata {
            Ok(m) if m.id == c.id => {
                choice.restore = Some(m);
                break;
            }
            Ok(m) => {
                choice.skipped.push((c.id, format!("metadata says checkpoint {} in the directory of {}", m.id, c.id)))
            }
            Err(reason) => choice.skipped.push((c.id, reason)),
        }
    }
    choice
}

/// Checks a restored checkpoint against the current pipeline: every stateful node must have the same fingerprint.
/// Returns the problems, each naming the operator.
pub fn incompatibilities(
    metadata: &CheckpointMetadata,
    current: &BTreeMap<usize, String>,
    labels: &BTreeMap<usize, String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (node, fp) in &metadata.fingerprints {
        let label = labels.get(node).cloned().unwrap_or_else(|| format!("node {node}"));
        match current.get(node) {
            None => problems
                .push(format!("the checkpoint has state for operator [{node}] which the pipeline no longer has")),
            Some(now) if now != fp => problems
                .push(format!("operator [{node}] {label} changed since the checkpoint (state was written for: {fp})")),
            Some(_) => {}
        }
    }
    for (node, fp) in current {
        if !metadata.fingerprints.contains_key(node) {
            let label = labels.get(node).cloned().unwrap_or_default();
            problems
                .push(format!("operator [{node}] {label} is new since the checkpoint and has no state in it ({fp})"));
        }
    }
    problems
}

/// Splits completed checkpoint ids into those to keep (the newest `keep`) and those to delete.
pub fn retention(mut completed: Vec<u64>, keep: usize) -> (Vec<u64>, Vec<u64>) {
    completed.sort_unstable();
    let split = completed.len().saturating_sub(keep.max(1));
    let delete = completed[..split].to_vec();
    (completed[split..].to_vec(), delete)
}

/// Checkpoint directories that are neither kept nor in flight: left by crashes before completion, or beyond retention.
pub fn to_delete(all_dirs: &[u64], kept: &[u64], in_flight: Option<u64>) -> Vec<u64> {
    let newest_kept = kept.iter().copied().max();
    all_dirs
        .iter()
        .copied()
        .filter(|id| !kept.contains(id) && Some(*id) != in_flight)
        // A directory newer than every completed checkpoint may be one that is still being written.
        .filter(|id| newest_kept.is_none_or(|k| *id < k) || in_flight.is_some_and(|f| *id < f))
        .collect()
}

/// Shared state files (written by checkpoint `id`, found under the shared directory) that no kept checkpoint refers
/// to and no future checkpoint can: those written at or before `newest`, the checkpoint just completed. Later ones may
/// belong to a chain still being built (a delta uploaded for a checkpoint that has not completed yet).
pub fn shared_to_delete<'a>(shared: &'a [(String, u64)], kept: &[CheckpointMetadata], newest: u64) -> Vec<&'a str> {
    let referenced: BTreeSet<&str> = kept.iter().flat_map(|m| m.files()).map(|f| f.path.as_str()).collect();
    shared
        .iter()
        .filter(|(path, id)| *id <= newest && !referenced.contains(path.as_str()))
        .map(|(path, _)| path.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(node: usize, subtask: usize) -> TaskKey {
        TaskKey { node, subtask }
    }

    fn snap(node: usize, subtask: usize) -> TaskSnapshot {
        TaskSnapshot {
            task: key(node, subtask),
            state: BTreeMap::from([(
                node,
                vec![StateFile {
                    path: format!("{node}-{subtask}"),
                    part: "groups".into(),
                    bytes: 10,
                    rows: 1,
                    checkpoint: 7,
                }],
            )]),
            source_position: None,
            sink_commit: None,
            alignment_us: (node * 10 + subtask) as u64,
        }
    }

    fn meta(id: u64) -> CheckpointMetadata {
        PendingCheckpoint::new(CheckpointId(id), BTreeSet::new(), 0, false).complete(
            1,
            BTreeMap::new(),
            BTreeMap::new(),
        )
    }

    #[test]
    fn a_checkpoint_completes_when_every_task_acked_once() {
        let expected = BTreeSet::from([key(0, 0), key(0, 1), key(2, 0)]);
        let mut p = PendingCheckpoint::new(CheckpointId(7), expected, 100, false);
        assert_eq!(p.ack(CheckpointId(7), snap(0, 0)), AckOutcome::Recorded);
        assert_eq!(p.ack(CheckpointId(7), snap(0, 0)), AckOutcome::Ignored, "duplicate");
        assert_eq!(p.ack(CheckpointId(6), snap(0, 1)), AckOutcome::Ignored, "an aborted checkpoint's late ack");
        assert_eq!(p.ack(CheckpointId(7), snap(9, 9)), AckOutcome::Ignored, "unknown task");
        assert_eq!(p.missing(), vec![key(0, 1), key(2, 0)]);
        assert_eq!(p.ack(CheckpointId(7), snap(0, 1)), AckOutcome::Recorded);
        assert_eq!(p.ack(CheckpointId(7), snap(2, 0)), AckOutcome::Complete);
        let m = p.complete(250, BTreeMap::new(), BTreeMap::new());
        assert_eq!((m.id, m.bytes, m.bytes_written, m.alignment_us, m.files().count()), (7, 30, 30, 20, 3));
    }

    #[test]
    fn timeouts_are_relative_to_the_trigger() {
        let p = PendingCheckpoint::new(CheckpointId(1), BTreeSet::from([key(0, 0)]), 1_000, false);
        assert!(!p.timed_out(60_000, 60_000));
        assert!(p.timed_out(61_001, 60_000));
    }

    #[test]
    fn restore_picks_the_newest_intact_checkpoint() {
        let choice = choose_restore(vec![
            Candidate { id: 3, metadata: Ok(meta(3)) },
            Candidate { id: 5, metadata: Err("state file 0-1 is missing".into()) },
            Candidate { id: 4, metadata: Ok(meta(4)) },
            Candidate { id: 6, metadata: Err("no metadata (never completed)".into()) },
        ]);
        assert_eq!(choice.restore.map(|m| m.id), Some(4));
        assert_eq!(choice.skipped.iter().map(|s| s.0).collect::<Vec<_>>(), vec![6, 5]);
        assert!(choose_restore(vec![]).restore.is_none());
    }

    #[test]
    fn incompatible_pipelines_name_the_operator() {
        let mut m = meta(1);
        m.fingerprints = BTreeMap::from([(1, "dedup(id) ttl 10m".to_string()), (3, "window".to_string())]);
        let labels = BTreeMap::from([(1, "dedup".to_string()), (4, "window tumble".to_string())]);
        let same = BTreeMap::from([(1, "dedup(id) ttl 10m".to_string()), (3, "window".to_string())]);
        assert!(incompatibilities(&m, &same, &labels).is_empty());
        let changed = BTreeMap::from([(1, "dedup(id) ttl 5m".to_string()), (4, "window".to_string())]);
        let p = incompatibilities(&m, &changed, &labels);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("[1] dedup changed"), "{p:?}");
        assert!(p[1].contains("[3]") && p[1].contains("no longer has"), "{p:?}");
        assert!(p[2].contains("[4] window tumble is new"), "{p:?}");
    }

    #[test]
    fn retention_keeps_the_newest() {
        assert_eq!(retention(vec![5, 1, 3, 4, 2], 3), (vec![3, 4, 5], vec![1, 2]));
        assert_eq!(retention(vec![1], 3), (vec![1], vec![]));
        assert_eq!(retention(vec![1, 2], 0), (vec![2], vec![1]), "at least one is always kept");
    }

    #[test]
    fn leftovers_are_deleted_but_not_the_one_in_flight() {
        // 2, 4, 5 completed and kept; 3 crashed before completing; 6 is being written.
        assert_eq!(to_delete(&[1, 2, 3, 4, 5, 6], &[2, 4, 5], Some(6)), vec![1, 3]);
        // Without a checkpoint in flight, a directory newer than the newest completed one is left alone
        // (another writer may own it; it is removed once older than a completed checkpoint).
        assert_eq!(to_delete(&[4, 5, 6], &[4, 5], None), Vec::<u64>::new());
    }

    #[test]
    fn shared_files_go_when_no_kept_checkpoint_refers_to_them() {
        let file = |path: &str, checkpoint: u64| StateFile {
            path: path.into(),
            part: "groups".into(),
            bytes: 1,
            rows: 1,
            checkpoint,
        };
        let mut kept = meta(9);
        // Checkpoint 9's chain: a base from 5 and deltas from 7 (8 was aborted, but its delta is in the chain too).
        let mut task = snap(1, 0);
        task.state.insert(
            1,
            vec![file("shared/a-5", 5), file("shared/a-7", 7), file("shared/a-8", 8), file("shared/a-9", 9)],
        );
        kept.tasks.push(task);
        let shared: Vec<(String, u64)> =
            [("shared/a-3", 3), ("shared/a-5", 5), ("shared/a-6", 6), ("shared/a-7", 7), ("shared/a-8", 8)]
                .iter()
                .chain(&[("shared/a-9", 9), ("shared/a-10", 10)])
                .map(|(p, id)| (p.to_string(), *id))
                .collect();
        // 3 and 6 are garbage (an older chain; a delta of a failed upload); 10 may be part of a chain in flight.
        assert_eq!(shared_to_delete(&shared, &[kept], 9), vec!["shared/a-3", "shared/a-6"]);
    }
}
