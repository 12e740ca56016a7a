//! The leader's loop: places jobs on workers, follows them, restarts them elsewhere when a worker is lost.
//!
//! Every pass reads the jobs and the live workers (a worker is live while its lease holds its registration), asks
//! each worker what it runs, and moves each job along: `scheduling` → deployed on the worker with the most free
//! slots (at least the job's parallelism) → `running`; a running job whose worker is gone, or no longer runs it,
//! goes back to `scheduling` and is deployed again (attempt + 1), resuming from its last completed checkpoint, so
//! its output stays exactly once; `stopping` → the worker is told to stop it → `stopped`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nagare_rpc::v1 as pb;
use tonic::transport::Channel;

use crate::model::{JobRecord, JobState, WorkerRecord, list_jobs, list_workers, now_ms, put_job};
use crate::store::{MetadataStore, StoreError};

/// What the scheduler asks of workers (gRPC in a cluster; a double in unit tests).
#[async_trait]
pub trait Workers: Send + Sync {
    /// The tasks a worker runs.
    async fn tasks(&self, worker: &WorkerRecord) -> Result<Vec<pb::TaskStatus>, String>;
    /// Starts a job on a worker.
    async fn deploy(&self, worker: &WorkerRecord, request: pb::DeployRequest) -> Result<(), String>;
    /// Stops a job on a worker.
    async fn cancel(&self, worker: &WorkerRecord, job: &str, checkpoint: bool) -> Result<(), String>;
}

/// Workers over gRPC (a channel per address, kept).
#[derive(Debug, Default)]
pub struct GrpcWorkers {
    channels: tokio::sync::Mutex<HashMap<String, Channel>>,
}

impl GrpcWorkers {
    async fn client(
        &self,
        w: &WorkerRecord,
    ) -> Result<pb::worker_service_client::WorkerServiceClient<Channel>, String> {
        let mut channels = self.channels.lock().await;
        if let Some(c) = channels.get(&w.address) {
            return Ok(pb::worker_service_client::WorkerServiceClient::new(c.clone()));
        }
        let channel = tonic::transport::Endpoint::from_shared(w.address.clone())
            .map_err(|e| format!("worker {} address {}: {e}", w.id, w.address))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        channels.insert(w.address.clone(), channel.clone());
        Ok(pb::worker_service_client::WorkerServiceClient::new(channel))
    }
}

#[async_trait]
impl Workers for GrpcWorkers {
    async fn tasks(&self, w: &WorkerRecord) -> Result<Vec<pb::TaskStatus>, String> {
        let mut c = self.client(w).await?;
        Ok(c.list_tasks(pb::ListTasksRequest {}).await.map_err(|e| e.message().to_string())?.into_inner().tasks)
    }

    async fn deploy(&self, w: &WorkerRecord, request: pb::DeployRequest) -> Result<(), String> {
        let mut c = self.client(w).await?;
        c.deploy(request).await.map_err(|e| e.message().to_string())?;
        Ok(())
    }

    async fn cancel(&self, w: &WorkerRecord, job: &str, checkpoint: bool) -> Result<(), String> {
        let mut c = self.client(w).await?;
        c.cancel(pb::CancelRequest { job_id: job.to_string(), checkpoint })
            .await
            .map_err(|e| e.message().to_string())?;
        Ok(())
    }
}

/// One pass over every job. Returns how many job records it changed.
pub async fn reconcile(store: &dyn MetadataStore, workers: &dyn Workers) -> Result<usize, StoreError> {
    let live = list_workers(store).await?;
    let mut tasks: HashMap<String, Vec<pb::TaskStatus>> = HashMap::new();
    for w in &live {
        match workers.tasks(w).await {
            Ok(t) => {
                tasks.insert(w.id.clone(), t);
            }
            // Unreachable now; its lease decides whether it is lost.
            Err(e) => tracing::debug!(worker = w.id, error = e, "worker did not answer"),
        }
    }
    let mut jobs = list_jobs(store).await?;
    let mut used: HashMap<String, u32> = HashMap::new();
    for j in jobs.iter().filter(|j| matches!(j.state, JobState::Running | JobState::Stopping)) {
        if let Some(w) = &j.worker {
            *used.entry(w.clone()).or_default() += j.parallelism;
        }
    }
    let mut changed = 0;
    for job in jobs.iter_mut().filter(|j| !j.state.is_terminal()) {
        let before = job.clone();
        step(job, &live, &tasks, &mut used, workers).await;
        if *job != before {
            job.updated_ms = now_ms();
            put_job(store, job).await?;
            changed += 1;
        }
    }
    Ok(changed)
}

async fn step(
    job: &mut JobRecord,
    live: &[WorkerRecord],
    tasks: &HashMap<String, Vec<pb::TaskStatus>>,
    used: &mut HashMap<String, u32>,
    workers: &dyn Workers,
) {
    let worker = job.worker.as_ref().and_then(|id| live.iter().find(|w| &w.id == id));
    let status = job
        .worker
        .as_ref()
        .and_then(|id| tasks.get(id))
        .and_then(|t| t.iter().find(|s| s.job_id == job.id && s.attempt == job.attempt));
    match job.state {
        JobState::Scheduling => {
            let Some(w) = live
                .iter()
                .filter(|w| w.slots.saturating_sub(used.get(&w.id).copied().unwrap_or(0)) >= job.parallelism)
                .max_by_key(|w| (w.slots.saturating_sub(used.get(&w.id).copied().unwrap_or(0)), w.id.clone()))
            else {
                let msg = format!("waiting for a worker with {} free slots", job.parallelism);
                if job.last_error.is_empty() || !job.last_error.starts_with("waiting") {
                    tracing::info!(job = job.id, "{msg}");
                }
                job.last_error = msg;
                return;
            };
            let request = pb::DeployRequest {
                job_id: job.id.clone(),
                sql: job.sql.clone(),
                parallelism: job.parallelism,
                settings: job.settings.clone().into_iter().collect(),
                variables: job.variables.clone().into_iter().collect(),
                checkpoint_url: job.checkpoint_url.clone(),
                attempt: job.attempt + 1,
            };
            match workers.deploy(w, request).await {
                Ok(()) => {
                    job.attempt += 1;
                    job.worker = Some(w.id.clone());
                    job.state = JobState::Running;
                    if job.last_error.starts_with("waiting") || job.last_error.starts_with("deploying") {
                        job.last_error.clear();
                    }
                    *used.entry(w.id.clone()).or_default() += job.parallelism;
                    tracing::info!(job = job.id, worker = w.id, attempt = job.attempt, "job deployed");
                }
                Err(e) => job.last_error = format!("deploying on worker {}: {e}", w.id),
            }
        }
        JobState::Running | JobState::Stopping => {
            let Some(w) = worker else {
                // The worker's lease expired: restart elsewhere from the last checkpoint (or stop, if asked to).
                let lost = job.worker.take().unwrap_or_default();
                tracing::warn!(job = job.id, worker = lost, "worker lost; restarting the job from its last checkpoint");
                job.last_error = format!("worker {lost} was lost; restarted from the last checkpoint");
                job.state = if job.state == JobState::Stopping { JobState::Stopped } else { JobState::Scheduling };
                return;
            };
            let Some(s) = status else {
                if tasks.contains_key(&w.id) {
                    // The worker answered but does not run it (it restarted): deploy again.
                    job.worker = None;
                    job.state = if job.state == JobState::Stopping { JobState::Stopped } else { JobState::Scheduling };
                    job.last_error = format!("worker {} no longer runs the job; restarting it", w.id);
                }
                return;
            };
            job.rows_in = s.rows_in;
            job.rows_out = s.rows_out;
            job.last_checkpoint = job.last_checkpoint.max(s.last_checkpoint);
            let state = pb::TaskState::try_from(s.state).unwrap_or(pb::TaskState::Unspecified);
            match state {
                pb::TaskState::Running if job.state == JobState::Stopping => {
                    if let Err(e) = workers.cancel(w, &job.id, job.stop_with_checkpoint).await {
                        job.last_error = format!("stopping on worker {}: {e}", w.id);
                    }
                }
                pb::TaskState::Running | pb::TaskState::Unspecified => {}
                pb::TaskState::Finished => {
                    job.state = if job.state == JobState::Stopping { JobState::Stopped } else { JobState::Finished };
                    job.worker = None;
                }
                pb::TaskState::Cancelled => {
                    job.state = JobState::Stopped;
                    job.worker = None;
                }
                pb::TaskState::Failed => {
                    job.state = JobState::Failed;
                    job.last_error = s.error.clone();
                    job.worker = None;
                }
            }
        }
        JobState::Stopped | JobState::Finished | JobState::Failed => {}
    }
}

/// Runs passes every `period` until `stop` is cancelled; a failed pass (etcd away) is logged and retried.
pub async fn run(
    store: Arc<dyn MetadataStore>,
    workers: Arc<dyn Workers>,
    period: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut failing = false;
    loop {
        match reconcile(store.as_ref(), workers.as_ref()).await {
            Ok(_) if failing => {
                tracing::info!("metadata store reachable again; scheduling resumed");
                failing = false;
            }
            Ok(_) => {}
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "scheduling pass failed; running jobs go on, retrying");
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::*;
    use crate::model::get_job;
    use crate::store::MemoryStore;

    /// Workers that do what they are told and report it.
    #[derive(Default)]
    struct FakeWorkers {
        tasks: Mutex<HashMap<String, Vec<pb::TaskStatus>>>,
        cancelled: Mutex<Vec<(String, bool)>>,
    }

    #[async_trait]
    impl Workers for FakeWorkers {
        async fn tasks(&self, w: &WorkerRecord) -> Result<Vec<pb::TaskStatus>, String> {
            Ok(self.tasks.lock().unwrap().get(&w.id).cloned().unwrap_or_default())
        }
        async fn deploy(&self, w: &WorkerRecord, r: pb::DeployRequest) -> Result<(), String> {
            let status = pb::TaskStatus {
                job_id: r.job_id,
                attempt: r.attempt,
                state: pb::TaskState::Running as i32,
                slots: r.parallelism,
                ..Default::default()
            };
            self.tasks.lock().unwrap().entry(w.id.clone()).or_default().push(status);
            Ok(())
        }
        async fn cancel(&self, _w: &WorkerRecord, job: &str, checkpoint: bool) -> Result<(), String> {
            self.cancelled.lock().unwrap().push((job.to_string(), checkpoint));
            Ok(())
        }
    }

    async fn add_worker(store: &MemoryStore, id: &str, slots: u32) {
        let w = WorkerRecord { id: id.into(), address: format!("http://{id}"), slots };
        store.put(&format!("{}{id}", crate::keys::WORKERS), serde_json::to_vec(&w).unwrap()).await.unwrap();
    }

    fn job(id: &str, parallelism: u32) -> JobRecord {
        JobRecord {
            id: id.into(),
            name: id.into(),
            sql: String::new(),
            parallelism,
            settings: BTreeMap::new(),
            variables: BTreeMap::new(),
            state: JobState::Scheduling,
            worker: None,
            attempt: 0,
            stop_with_checkpoint: true,
            operators: Vec::new(),
            rows_in: 0,
            rows_out: 0,
            last_checkpoint: 0,
            last_error: String::new(),
            created_ms: 0,
            updated_ms: 0,
            checkpoint_url: String::new(),
        }
    }

    #[tokio::test]
    async fn jobs_go_to_free_slots_and_wait_when_there_are_none() {
        let store = MemoryStore::default();
        let workers = FakeWorkers::default();
        add_worker(&store, "w1", 4).await;
        add_worker(&store, "w2", 2).await;
        for (id, p) in [("a", 3), ("b", 2), ("c", 2)] {
            put_job(&store, &job(id, p)).await.unwrap();
        }
        reconcile(&store, &workers).await.unwrap();
        let get = |id: &'static str| {
            let store = store.clone();
            async move { get_job(&store, id).await.unwrap().unwrap() }
        };
        assert_eq!((get("a").await.state, get("a").await.worker.as_deref()), (JobState::Running, Some("w1")));
        assert_eq!(get("b").await.worker.as_deref(), Some("w2"));
        let c = get("c").await;
        assert_eq!(c.state, JobState::Scheduling);
        assert!(c.last_error.contains("2 free slots"), "{}", c.last_error);
    }

    #[tokio::test]
    async fn a_lost_worker_s_job_is_deployed_again_and_stops_are_passed_on() {
        let store = MemoryStore::default();
        let workers = FakeWorkers::default();
        add_worker(&store, "w1", 4).await;
        put_job(&store, &job("a", 2)).await.unwrap();
        reconcile(&store, &workers).await.unwrap();
        // w1's lease expires; w2 joins.
        store.map_remove(&format!("{}w1", crate::keys::WORKERS));
        add_worker(&store, "w2", 4).await;
        reconcile(&store, &workers).await.unwrap();
        let a = get_job(&store, "a").await.unwrap().unwrap();
        assert_eq!((a.state, a.worker.clone()), (JobState::Scheduling, None));
        assert!(a.last_error.contains("w1 was lost"), "{}", a.last_error);
        reconcile(&store, &workers).await.unwrap();
        let a = get_job(&store, "a").await.unwrap().unwrap();
        assert_eq!((a.state, a.worker.as_deref(), a.attempt), (JobState::Running, Some("w2"), 2));
        // Stop with a checkpoint: the worker is told; when it reports the job cancelled, the job is stopped.
        let mut stopping = a;
        stopping.state = JobState::Stopping;
        put_job(&store, &stopping).await.unwrap();
        reconcile(&store, &workers).await.unwrap();
        assert_eq!(workers.cancelled.lock().unwrap().as_slice(), &[("a".to_string(), true)]);
        workers.tasks.lock().unwrap().get_mut("w2").unwrap()[0].state = pb::TaskState::Cancelled as i32;
        reconcile(&store, &workers).await.unwrap();
        assert_eq!(get_job(&store, "a").await.unwrap().unwrap().state, JobState::Stopped);
    }
}
