//! The checkpoint coordinator of a job running in one process: a task that triggers checkpoints on an interval,
//! collects reports, writes metadata (the commit point), fans out commits and removes old checkpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nagare_core::CheckpointId;
use nagare_core::checkpoint::{
    AckOutcome, CheckpointMetadata, PendingCheckpoint, TaskKey, retention, shared_to_delete, to_delete,
};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use super::store::CheckpointStore;
use super::{Control, Report};
use crate::connector::Committer;
use crate::error::{EngineError, Result};

/// How often and how long.
#[derive(Debug, Clone)]
pub struct CheckpointSettings {
    /// Time between checkpoints.
    pub interval: Duration,
    /// A checkpoint not complete after this long is aborted.
    pub timeout: Duration,
    /// Completed checkpoints to keep.
    pub retained: usize,
    /// Checkpoints that may fail in a row before the job fails (it could never commit its output otherwise).
    pub tolerable_failures: u32,
}

/// What the progress line and `nagare checkpoints` show about the running job's checkpoints.
#[derive(Debug, Clone, Default)]
pub struct CheckpointStats {
    /// Checkpoints completed in this run.
    pub completed: u64,
    /// Checkpoints aborted (timed out or declined) in this run.
    pub aborted: u64,
    /// The last completed one: id, duration, alignment, bytes.
    pub last: Option<LastCheckpoint>,
    /// The checkpoint this run restored from.
    pub restored_from: Option<u64>,
}

/// Figures of one completed checkpoint.
#[derive(Debug, Clone)]
pub struct LastCheckpoint {
    /// Id.
    pub id: u64,
    /// Trigger to completion.
    pub duration: Duration,
    /// Largest barrier alignment time.
    pub alignment: Duration,
    /// State bytes it refers to (what a restore reads).
    pub bytes: u64,
    /// State bytes it wrote (less with incremental state).
    pub bytes_written: u64,
}

/// The coordinator's fixed inputs.
pub struct Coordinator {
    /// Where checkpoints go.
    pub store: CheckpointStore,
    /// When.
    pub settings: CheckpointSettings,
    /// Every task that reports (chain heads × subtasks).
    pub tasks: BTreeSet<TaskKey>,
    /// The source tasks among them.
    pub sources: BTreeSet<TaskKey>,
    /// Control channel of each task.
    pub controls: BTreeMap<TaskKey, ControlTarget>,
    /// Fingerprints of nodes with state, for the metadata.
    pub fingerprints: BTreeMap<usize, String>,
    /// Parallelism of each node, for the metadata.
    pub parallelism: BTreeMap<usize, usize>,
    /// The next checkpoint id.
    pub next_id: u64,
    /// Shared figures.
    pub stats: Arc<Mutex<CheckpointStats>>,
    /// Aborted checkpoints since the last completed one.
    pub failures_in_a_row: u32,
    /// Each sink table's committer, with the head node of its chain (whose tasks carry its commit handles).
    pub sinks: Vec<(usize, Arc<dyn Committer>)>,
}

/// Where a task listens: in this process, or in another part of the job (through its ordered link).
#[derive(Debug, Clone)]
pub enum ControlTarget {
    /// A task of this process.
    Local(UnboundedSender<Control>),
    /// A task of another part.
    Remote(crate::distribute::ControlRoute),
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Coordinator {
    fn send(&self, task: &TaskKey, control: Control) {
        // A task that has already ended no longer listens; that is fine.
        match self.controls.get(task) {
            Some(ControlTarget::Local(tx)) => {
                let _ = tx.send(control);
            }
            Some(ControlTarget::Remote(route)) => {
                let _ = route.send((*task, control));
            }
            None => {}
        }
    }

    fn trigger(&mut self, last: bool) -> PendingCheckpoint {
        let id = CheckpointId(self.next_id);
        self.next_id += 1;
        tracing::debug!(checkpoint = id.0, last, "triggering checkpoint");
        for s in &self.sources {
            self.send(s, Control::Trigger { id, last });
        }
        PendingCheckpoint::new(id, self.tasks.clone(), now_ms(), last)
    }

    async fn complete(&mut self, pending: PendingCheckpoint) -> Result<CheckpointMetadata> {
        let metadata = pending.complete(now_ms(), self.fingerprints.clone(), self.parallelism.clone());
        self.failures_in_a_row = 0;
        // The commit point: retried a few times, because failing here loses the checkpoint, not data.
        let mut attempt = 0;
        loop {
            match self.store.write_metadata(&metadata).await {
                Ok(()) => break,
                Err(e) if attempt < 4 => {
                    attempt += 1;
                    tracing::warn!(checkpoint = metadata.id, error = %e, attempt, "writing checkpoint metadata failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
        // Test hook (`--test-fault commit=...`): widens the window between the commit point and the commits.
        if let Some(d) = nagare_core::faults::delay(nagare_core::faults::FaultPoint::Commit) {
            tokio::time::sleep(d).await;
        }
        // Per-table commits first; the subtasks' commits follow.
        for (head, committer) in &self.sinks {
            let handles: Vec<serde_json::Value> =
                metadata.tasks.iter().filter(|t| t.task.node == *head).filter_map(|t| t.sink_commit.clone()).collect();
            committer.commit(&handles).await?;
        }
        let id = CheckpointId(metadata.id);
        let last = metadata.final_checkpoint;
        // Non-source tasks first: a sink has its commit queued before any source can end the stream.
        for t in self.tasks.iter().filter(|t| !self.sources.contains(t)) {
            self.send(t, Control::Complete { id, last });
        }
        for t in &self.sources {
            self.send(t, Control::Complete { id, last });
        }
        if let Ok(mut s) = self.stats.lock() {
            s.completed += 1;
            s.last = Some(LastCheckpoint {
                id: metadata.id,
                duration: Duration::from_millis((metadata.completed_ms - metadata.triggered_ms).max(0) as u64),
                alignment: Duration::from_micros(metadata.alignment_us),
                bytes: metadata.bytes,
                bytes_written: metadata.bytes_written,
            });
        }
        tracing::info!(
            checkpoint = metadata.id,
            bytes = metadata.bytes,
            bytes_written = metadata.bytes_written,
            "checkpoint complete"
        );
        self.clean_up(&metadata).await;
        Ok(metadata)
    }

    /// Deletes checkpoints beyond retention, leftovers of crashed attempts, and shared state files no kept
    /// checkpoint refers to; failures only warn.
    async fn clean_up(&self, newest: &CheckpointMetadata) {
        let all = match self.store.list().await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "listing checkpoints for clean-up failed");
                return;
            }
        };
        let mut completed = BTreeMap::new();
        for id in &all {
            if *id == newest.id {
                completed.insert(*id, newest.clone());
            } else if let Ok(m) = self.store.load(*id).await.metadata {
                completed.insert(*id, m);
            }
        }
        let (kept, _) = retention(completed.keys().copied().collect(), self.settings.retained);
        for id in to_delete(&all, &kept, None) {
            if let Err(e) = self.store.delete(id).await {
                tracing::warn!(checkpoint = id, error = %e, "deleting an old checkpoint failed");
            }
        }
        let shared = match self.store.list_shared().await {
            Ok(files) => files,
            Err(e) => {
                tracing::warn!(error = %e, "listing shared state for clean-up failed");
                return;
            }
        };
        let kept: Vec<CheckpointMetadata> = kept.iter().filter_map(|id| completed.remove(id)).collect();
        for path in shared_to_delete(&shared, &kept, newest.id) {
            if let Err(e) = self.store.delete_file(path).await {
                tracing::warn!(file = path, error = %e, "deleting an unreferenced state file failed");
            }
        }
    }

    fn abort(&mut self, pending: &PendingCheckpoint, reason: &str) -> Result<()> {
        tracing::warn!(checkpoint = pending.id.0, reason, "checkpoint aborted; the next one proceeds");
        if let Ok(mut s) = self.stats.lock() {
            s.aborted += 1;
        }
        self.failures_in_a_row += 1;
        if self.failures_in_a_row > self.settings.tolerable_failures {
            return Err(EngineError::External {
                system: "checkpoints".into(),
                message: format!(
                    "{} checkpoints in a row failed, the last ({}) {reason}; output cannot be committed",
                    self.failures_in_a_row, pending.id
                ),
                retriable: false,
            });
        }
        Ok(())
    }

    /// Runs until the final checkpoint has completed (or every task has gone).
    pub async fn run(mut self, mut reports: UnboundedReceiver<Report>) -> Result<()> {
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + self.settings.interval, self.settings.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending: Option<PendingCheckpoint> = None;
        let mut finished: BTreeSet<TaskKey> = BTreeSet::new();
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if let Some(p) = &pending {
                        if p.timed_out(now_ms(), self.settings.timeout.as_millis() as i64) {
                            let missing: Vec<String> = p.missing().iter().map(|t| t.to_string()).collect();
                            let last = p.final_checkpoint;
                            let p = p.clone();
                            self.abort(&p, &format!("timed out waiting for {}", missing.join(", ")))?;
                            pending = Some(self.trigger(last));
                        }
                    } else {
                        pending = Some(self.trigger(false));
                    }
                }
                report = reports.recv() => {
                    let Some(report) = report else { return Ok(()) };
                    match report {
                        Report::Ack { id, snapshot } => {
                            let outcome = match pending.as_mut() {
                                Some(p) => p.ack(id, snapshot),
                                None => AckOutcome::Ignored,
                            };
                            if outcome == AckOutcome::Complete {
                                let p = pending.take().ok_or_else(|| EngineError::Internal("pending vanished".into()))?;
                                let metadata = self.complete(p).await?;
                                if metadata.final_checkpoint {
                                    return Ok(());
                                }
                                if finished.len() == self.sources.len() {
                                    pending = Some(self.trigger(true));
                                }
                            }
                        }
                        Report::Declined { id, task, reason } => {
                            if let Some(p) = pending.take_if(|p| p.id == id) {
                                self.abort(&p, &format!("was declined by {task}: {reason}"))?;
                                let last = p.final_checkpoint;
                                if last {
                                    pending = Some(self.trigger(true));
                                }
                            }
                        }
                        Report::SourceFinished(task) => {
                            finished.insert(task);
                            if finished.len() == self.sources.len() && pending.is_none() {
                                pending = Some(self.trigger(true));
                            }
                        }
                    }
                }
            }
        }
    }
}
