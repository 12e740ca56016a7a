//! The records a cluster keeps: jobs and workers, as JSON values in the metadata store.

use std::collections::BTreeMap;

use nagare_rpc::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::store::{MetadataStore, StoreError};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Submitted; waiting for a worker with enough free slots.
    #[default]
    Scheduling,
    /// Deployed on a worker.
    Running,
    /// Asked to stop; the worker is stopping it.
    Stopping,
    /// Stopping with a checkpoint, to be deployed again at `rescale_to` from it.
    Rescaling,
    /// Stopped on request.
    Stopped,
    /// Its input ended and everything was written.
    Finished,
    /// Failed; `last_error` says why.
    Failed,
}

impl JobState {
    /// Whether the job is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Stopped | JobState::Finished | JobState::Failed)
    }

    fn to_pb(self) -> pb::JobState {
        match self {
            JobState::Scheduling => pb::JobState::Scheduling,
            JobState::Running => pb::JobState::Running,
            JobState::Stopping => pb::JobState::Stopping,
            JobState::Rescaling => pb::JobState::Rescaling,
            JobState::Stopped => pb::JobState::Stopped,
            JobState::Finished => pb::JobState::Finished,
            JobState::Failed => pb::JobState::Failed,
        }
    }
}

/// A job, as stored under `/nagare/jobs/<id>`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub name: String,
    pub sql: String,
    pub parallelism: u32,
    pub settings: BTreeMap<String, String>,
    pub variables: BTreeMap<String, String>,
    pub state: JobState,
    /// The workers running its parts, in part order (while running or stopping).
    #[serde(default)]
    pub workers: Vec<String>,
    /// The part running each slot (subtask index).
    #[serde(default)]
    pub slot_parts: Vec<u32>,
    /// Deployments so far.
    pub attempt: u32,
    /// The parallelism a rescaling job restarts with.
    #[serde(default)]
    pub rescale_to: Option<u32>,
    /// The plan every part of the job runs (`nagare_sql::wire`), made once by the coordinator at `parallelism`.
    /// Records written before plans were stored have none; their workers plan `sql` themselves.
    #[serde(default)]
    pub plan: String,
    /// The plan at `rescale_to`, made when the rescale was asked for; it becomes `plan` with the new parallelism.
    #[serde(default)]
    pub rescale_plan: Option<String>,
    /// Stop with a final checkpoint (true) or at once, once stopping.
    pub stop_with_checkpoint: bool,
    pub operators: Vec<(u32, String, u32)>,
    pub rows_in: u64,
    pub rows_out: u64,
    pub last_checkpoint: u64,
    pub last_error: String,
    /// Since when (ms since the epoch) it has been waiting for free slots; 0 while it is not waiting.
    #[serde(default)]
    pub waiting_since_ms: i64,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub checkpoint_url: String,
    /// Per-operator counters, summed over the workers' reports (by operator id).
    #[serde(default)]
    pub stats: BTreeMap<u32, OperatorStats>,
    /// The last completed checkpoint's duration and size.
    #[serde(default)]
    pub last_checkpoint_duration_ms: u64,
    #[serde(default)]
    pub last_checkpoint_bytes: u64,
}

/// An operator's counters over all its subtasks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OperatorStats {
    pub rows_in: u64,
    pub rows_out: u64,
    pub bytes: u64,
    pub backpressure_us: u64,
    /// Lowest over the subtasks that have one, µs.
    pub watermark_us: Option<i64>,
    pub state_entries: i64,
    pub late_rows: u64,
    pub duplicates: u64,
    pub bad_records: u64,
    /// Records written before this counter existed have none.
    #[serde(default)]
    pub late_kept: u64,
    #[serde(default)]
    pub streams_created: u64,
    /// The connector's own figures, combined over the workers' reports.
    #[serde(default)]
    pub connector: Vec<ConnectorFigure>,
}

/// One figure a connector keeps beyond the common counters (see [`pb::ConnectorFigure`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectorFigure {
    pub name: String,
    pub label: String,
    pub value: f64,
    /// Combined by maximum (ages), else summed.
    pub max: bool,
}

impl OperatorStats {
    /// Adds one worker's report.
    pub fn add(&mut self, o: &pb::OperatorStatus) {
        self.rows_in += o.rows_in;
        self.rows_out += o.rows_out;
        self.bytes += o.bytes;
        self.backpressure_us += o.backpressure_us;
        self.watermark_us = match (self.watermark_us, o.watermark_us) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.state_entries += o.state_entries;
        self.late_rows += o.late_rows;
        self.duplicates += o.duplicates;
        self.bad_records += o.bad_records;
        self.late_kept += o.late_kept;
        self.streams_created += o.streams_created;
        for f in &o.connector {
            match self.connector.iter_mut().find(|c| c.name == f.name) {
                Some(c) if f.max => c.value = c.value.max(f.value),
                Some(c) => c.value += f.value,
                None => self.connector.push(ConnectorFigure {
                    name: f.name.clone(),
                    label: f.label.clone(),
                    value: f.value,
                    max: f.max,
                }),
            }
        }
    }
}

/// What a user asked of a running job. Requests are queued under [`crate::keys::REQUESTS`] and applied by the one
/// process that writes the job's record (the leader's scheduler, or a single `nagare run`), so a stop or a rescale
/// can never be overwritten by a status update read before it (which lost a rescale: the job ran on unrescaled).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum JobRequest {
    /// Stop, with a final checkpoint or at once.
    Stop {
        /// With a final checkpoint.
        checkpoint: bool,
    },
    /// Run at another parallelism, from a checkpoint taken for it.
    Rescale {
        /// The new parallelism.
        parallelism: u32,
        /// The plan at that parallelism (`nagare_sql::wire`), made when the rescale was asked for.
        plan: String,
        /// The graph's operators at that parallelism.
        operators: Vec<(u32, String, u32)>,
    },
}

impl JobRequest {
    /// What the request asks, for messages.
    pub fn describe(&self) -> String {
        match self {
            JobRequest::Stop { checkpoint: true } => "stop (with a checkpoint)".into(),
            JobRequest::Stop { checkpoint: false } => "stop (at once)".into(),
            JobRequest::Rescale { parallelism, .. } => format!("rescale to {parallelism}"),
        }
    }
}

impl JobRecord {
    /// Whether a rescale may be asked of the job now; `Err` says why not.
    pub fn rescalable(&self) -> Result<(), String> {
        if matches!(self.state, JobState::Scheduling | JobState::Running) {
            return Ok(());
        }
        Err(format!("job '{}' is {}: only a scheduling or running job can be rescaled", self.id, self.state_name()))
    }

    /// Carries out `request` on the record; `Err` says why the job's state does not allow it.
    pub fn apply(&mut self, request: &JobRequest) -> Result<(), String> {
        match request {
            JobRequest::Stop { checkpoint } => {
                if self.state.is_terminal() {
                    return Err(format!("job '{}' is already {}", self.id, self.state_name()));
                }
                self.stop_with_checkpoint = *checkpoint;
                self.state = if self.workers.is_empty() { JobState::Stopped } else { JobState::Stopping };
            }
            JobRequest::Rescale { parallelism, plan, operators } => {
                self.rescalable()?;
                self.operators = operators.clone();
                if self.state == JobState::Scheduling {
                    self.parallelism = *parallelism;
                    self.plan = plan.clone();
                } else {
                    // Stop with a checkpoint; the scheduler deploys it again at the new parallelism from that
                    // checkpoint.
                    self.rescale_plan = Some(plan.clone());
                    self.rescale_to = Some(*parallelism);
                    self.stop_with_checkpoint = true;
                    self.state = JobState::Rescaling;
                }
            }
        }
        Ok(())
    }
}

/// Queues `request` for job `id`, after any queued before it.
pub async fn put_request(store: &dyn MetadataStore, id: &str, request: &JobRequest) -> Result<(), StoreError> {
    // Time first, so that requests sort in the order they were made.
    let key = format!("{}{id}/{:016x}-{:08x}", crate::keys::REQUESTS, now_ms(), fastrand::u32(..));
    let bytes =
        serde_json::to_vec(request).map_err(|e| StoreError::Corrupt { key: key.clone(), reason: e.to_string() })?;
    store.put(&key, bytes).await
}

/// Queued requests by job id, each with its key, in the order they were made. `job` limits them to one job.
pub async fn list_requests(
    store: &dyn MetadataStore,
    job: Option<&str>,
) -> Result<BTreeMap<String, Vec<(String, JobRequest)>>, StoreError> {
    let prefix = match job {
        Some(id) => format!("{}{id}/", crate::keys::REQUESTS),
        None => crate::keys::REQUESTS.to_string(),
    };
    let mut out: BTreeMap<String, Vec<(String, JobRequest)>> = BTreeMap::new();
    for (key, value) in store.list(&prefix).await? {
        let rest = key.strip_prefix(crate::keys::REQUESTS).unwrap_or(&key);
        let Some((id, _)) = rest.split_once('/') else { continue };
        out.entry(id.to_string()).or_default().push((key.clone(), parse(&key, &value)?));
    }
    Ok(out)
}

/// Applies queued `requests` to `job` in order; one its state no longer allows is recorded in `last_error`.
pub fn apply_requests(job: &mut JobRecord, requests: &[(String, JobRequest)]) {
    for (_, request) in requests {
        match job.apply(request) {
            Ok(()) => tracing::info!(job = job.id, request = request.describe(), "applied"),
            Err(why) => {
                tracing::warn!(job = job.id, request = request.describe(), "not applied: {why}");
                job.last_error = format!("{} was not applied: {why}", request.describe());
            }
        }
    }
}

/// Removes applied requests.
pub async fn delete_requests(store: &dyn MetadataStore, requests: &[(String, JobRequest)]) -> Result<(), StoreError> {
    for (key, _) in requests {
        store.delete(key).await?;
    }
    Ok(())
}

/// What a job record shows of a pipeline's graph: id, label and parallelism per operator.
pub fn operators(pipeline: &nagare_sql::Pipeline) -> Vec<(u32, String, u32)> {
    pipeline.graph.nodes.iter().map(|n| (n.id as u32, n.label.clone(), n.parallelism as u32)).collect()
}

impl JobRecord {
    /// A new job (scheduling, never deployed) running `pipeline`, planned from `sql`.
    pub fn new(pipeline: &nagare_sql::Pipeline, id: String, name: String, sql: String, checkpoint_url: String) -> Self {
        // A plan that cannot be written is an internal error; the record then carries none and workers plan `sql`.
        let plan = nagare_sql::wire::encode(pipeline).unwrap_or_else(|e| {
            tracing::error!(error = %e, "the job's plan could not be written; its workers will plan its SQL");
            String::new()
        });
        let now = now_ms();
        JobRecord {
            id,
            name,
            sql,
            parallelism: pipeline.graph.nodes.iter().map(|n| n.parallelism).max().unwrap_or(1) as u32,
            stop_with_checkpoint: true,
            operators: operators(pipeline),
            created_ms: now,
            updated_ms: now,
            checkpoint_url,
            plan,
            ..Default::default()
        }
    }

    /// The workers running subtasks of an operator of `parallelism` (subtask `s` runs in slot `s`).
    pub fn placement(&self, parallelism: u32) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in 0..parallelism as usize {
            let part = match self.slot_parts.len() {
                0 => 0,
                n => self.slot_parts[s % n] as usize,
            };
            if let Some(w) = self.workers.get(part)
                && !out.contains(w)
            {
                out.push(w.clone());
            }
        }
        out
    }

    /// Slots the job holds on `worker` (while placed).
    pub fn slots_on(&self, worker: &str) -> u32 {
        let Some(part) = self.workers.iter().position(|w| w == worker) else { return 0 };
        self.slot_parts.iter().filter(|p| **p as usize == part).count() as u32
    }

    /// The API's view of it.
    pub fn to_pb(&self) -> pb::Job {
        pb::Job {
            id: self.id.clone(),
            name: self.name.clone(),
            state: self.state.to_pb() as i32,
            parallelism: self.parallelism,
            workers: self.workers.clone(),
            attempt: self.attempt,
            operators: self
                .operators
                .iter()
                .map(|(id, label, p)| {
                    let st = self.stats.get(id).cloned().unwrap_or_default();
                    pb::Operator {
                        id: *id,
                        label: label.clone(),
                        parallelism: *p,
                        rows_in: st.rows_in,
                        rows_out: st.rows_out,
                        bytes: st.bytes,
                        backpressure_ms: st.backpressure_us / 1000,
                        watermark_ms: st.watermark_us.map(|w| w.div_euclid(1000)),
                        state_entries: st.state_entries,
                        late_rows: st.late_rows,
                        duplicates: st.duplicates,
                        bad_records: st.bad_records,
                        workers: self.placement(*p),
                        late_kept: st.late_kept,
                        streams_created: st.streams_created,
                        connector: st
                            .connector
                            .iter()
                            .map(|c| pb::ConnectorFigure {
                                name: c.name.clone(),
                                label: c.label.clone(),
                                value: c.value,
                                max: c.max,
                            })
                            .collect(),
                    }
                })
                .collect(),
            last_checkpoint_duration_ms: self.last_checkpoint_duration_ms,
            last_checkpoint_bytes: self.last_checkpoint_bytes,
            rows_in: self.rows_in,
            rows_out: self.rows_out,
            last_checkpoint: self.last_checkpoint,
            last_error: self.last_error.clone(),
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            checkpoint_url: self.checkpoint_url.clone(),
        }
    }
}

/// A worker's registration under `/nagare/workers/<id>` (removed with its lease).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: String,
    /// Where its WorkerService listens (`http://host:port`).
    pub address: String,
    pub slots: u32,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn parse<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { key: key.to_string(), reason: e.to_string() })
}

/// Reads one job.
pub async fn get_job(store: &dyn MetadataStore, id: &str) -> Result<Option<JobRecord>, StoreError> {
    let key = format!("{}{id}", crate::keys::JOBS);
    store.get(&key).await?.map(|b| parse(&key, &b)).transpose()
}

/// Writes one job.
pub async fn put_job(store: &dyn MetadataStore, job: &JobRecord) -> Result<(), StoreError> {
    let key = format!("{}{}", crate::keys::JOBS, job.id);
    let bytes = serde_json::to_vec(job).map_err(|e| StoreError::Corrupt { key: key.clone(), reason: e.to_string() })?;
    store.put(&key, bytes).await
}

/// Every job, oldest first.
pub async fn list_jobs(store: &dyn MetadataStore) -> Result<Vec<JobRecord>, StoreError> {
    let mut jobs: Vec<JobRecord> =
        store.list(crate::keys::JOBS).await?.iter().map(|(k, v)| parse(k, v)).collect::<Result<_, _>>()?;
    jobs.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
    Ok(jobs)
}

/// Every registered (live) worker.
pub async fn list_workers(store: &dyn MetadataStore) -> Result<Vec<WorkerRecord>, StoreError> {
    store.list(crate::keys::WORKERS).await?.iter().map(|(k, v)| parse(k, v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_counters_sum_over_workers_and_old_records_still_load() {
        let mut st = OperatorStats::default();
        let figure = |name: &str, value, max| pb::ConnectorFigure { name: name.into(), label: name.into(), value, max };
        let report = |late_kept, streams_created, held, age| pb::OperatorStatus {
            late_kept,
            streams_created,
            late_rows: 1,
            watermark_us: Some(5),
            connector: vec![figure("held", held, false), figure("age", age, true)],
            ..Default::default()
        };
        st.add(&report(3, 2, 10.0, 4.0));
        st.add(&report(4, 1, 5.0, 9.0));
        assert_eq!((st.late_kept, st.streams_created, st.late_rows, st.watermark_us), (7, 3, 2, Some(5)));
        // Held messages add up over workers; the oldest age is the largest.
        let figures: Vec<(&str, f64)> = st.connector.iter().map(|c| (c.name.as_str(), c.value)).collect();
        assert_eq!(figures, vec![("held", 15.0), ("age", 9.0)]);
        // A record written before late_kept and streams_created existed.
        let old = r#"{"rows_in":1,"rows_out":1,"bytes":0,"backpressure_us":0,"watermark_us":null,"state_entries":0,
                      "late_rows":0,"duplicates":0,"bad_records":0}"#;
        let st: OperatorStats = serde_json::from_str(old).unwrap_or_default();
        assert_eq!((st.rows_in, st.late_kept, st.streams_created), (1, 0, 0));
    }
}
