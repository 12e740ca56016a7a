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

use crate::model::{
    JobRecord, JobState, WorkerRecord, apply_requests, delete_requests, list_jobs, list_requests, list_workers, now_ms,
    put_job,
};
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
    tls: Option<tonic::transport::ClientTlsConfig>,
}

impl GrpcWorkers {
    /// Reaches `https://` workers with `tls` (the cluster CA, and the coordinator's identity for workers that
    /// require client certificates).
    pub fn with_tls(tls: Option<tonic::transport::ClientTlsConfig>) -> Self {
        GrpcWorkers { channels: Default::default(), tls }
    }

    async fn client(
        &self,
        w: &WorkerRecord,
    ) -> Result<pb::worker_service_client::WorkerServiceClient<Channel>, String> {
        let mut channels = self.channels.lock().await;
        if let Some(c) = channels.get(&w.address) {
            return Ok(pb::worker_service_client::WorkerServiceClient::new(c.clone()));
        }
        let mut endpoint = tonic::transport::Endpoint::from_shared(w.address.clone())
            .map_err(|e| format!("worker {} address {}: {e}", w.id, w.address))?;
        if w.address.starts_with("https://") {
            let tls = self.tls.clone().ok_or_else(|| {
                format!("worker {} serves TLS ({}): give the coordinator --cluster-ca", w.id, w.address)
            })?;
            endpoint = endpoint.tls_config(tls).map_err(|e| format!("TLS for worker {}: {e}", w.id))?;
        }
        let channel = endpoint.connect_timeout(Duration::from_secs(3)).timeout(Duration::from_secs(10)).connect_lazy();
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

/// How the leader schedules.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// When a worker with nothing to do has joined and a running job would spread over more workers than it runs
    /// on, rescale the job to its own parallelism (stop with a checkpoint, place it again).
    pub rebalance: bool,
    /// A job waiting this long for free slots says so in its status, with the workers the leader sees: waiting
    /// that long is rarely a moment between two jobs.
    pub slot_wait_warning: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { rebalance: false, slot_wait_warning: SLOT_WAIT_WARNING }
    }
}

/// How long a job waits for free slots before its status says so with the workers it sees (see [`Policy`]).
pub const SLOT_WAIT_WARNING: Duration = Duration::from_secs(30);

/// One pass over every job with the default policy. Returns how many job records it changed.
pub async fn reconcile(store: &dyn MetadataStore, workers: &dyn Workers) -> Result<usize, StoreError> {
    reconcile_with(store, workers, Policy::default()).await
}

/// One pass over every job. Returns how many job records it changed.
pub async fn reconcile_with(
    store: &dyn MetadataStore,
    workers: &dyn Workers,
    policy: Policy,
) -> Result<usize, StoreError> {
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
    // What users asked since the last pass: applied here, by the only writer of job records, before the pass.
    let mut requests = list_requests(store, None).await?;
    let mut used: HashMap<String, u32> = HashMap::new();
    for j in jobs.iter().filter(|j| matches!(j.state, JobState::Running | JobState::Stopping | JobState::Rescaling)) {
        for w in &j.workers {
            *used.entry(w.clone()).or_default() += j.slots_on(w);
        }
    }
    let mut changed = 0;
    // One job moves per pass: once it is placed again, the worker it went to is no longer idle.
    let mut may_rebalance = policy.rebalance && !jobs.iter().any(|j| j.state == JobState::Rescaling);
    for job in jobs.iter_mut() {
        let asked = requests.remove(&job.id).unwrap_or_default();
        if job.state.is_terminal() && asked.is_empty() {
            continue;
        }
        let before = job.clone();
        apply_requests(job, &asked);
        if !job.state.is_terminal() {
            step(job, &live, &tasks, &mut used, workers, &policy).await;
            if may_rebalance && rebalance(job, &live, &used) {
                may_rebalance = false;
            }
        }
        if *job != before {
            job.updated_ms = now_ms();
            put_job(store, job).await?;
            changed += 1;
        }
        // Only once the record that carries them out is written.
        delete_requests(store, &asked).await?;
    }
    // Requests for jobs that do not exist (any more).
    for asked in requests.values() {
        delete_requests(store, asked).await?;
    }
    Ok(changed)
}

/// Slots to workers: each slot goes to the worker with the most free slots left, so a job spreads over workers
/// (and so over their cores and network) rather than filling one. Returns the workers in part order (the first
/// slot's worker is part 0) and the part of each slot, or `None` when the free slots do not suffice.
pub fn place(slots: u32, free: &[(String, u32)]) -> Option<(Vec<String>, Vec<u32>)> {
    let mut left: Vec<(String, u32)> = free.to_vec();
    let mut parts: Vec<String> = Vec::new();
    let mut slot_parts = Vec::with_capacity(slots as usize);
    for _ in 0..slots {
        let best = left.iter_mut().filter(|(_, f)| *f > 0).max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))?;
        best.1 -= 1;
        let part = match parts.iter().position(|w| *w == best.0) {
            Some(p) => p,
            None => {
                parts.push(best.0.clone());
                parts.len() - 1
            }
        };
        slot_parts.push(part as u32);
    }
    Some((parts, slot_parts))
}

/// `--rebalance`: a running job that a worker with nothing to do would spread wider is rescaled to its own
/// parallelism, so that it is placed again over more workers (from a checkpoint; nothing lost or repeated).
fn rebalance(job: &mut JobRecord, live: &[WorkerRecord], used: &HashMap<String, u32>) -> bool {
    if job.state != JobState::Running || job.workers.is_empty() {
        return false;
    }
    let idle = |w: &&WorkerRecord| used.get(&w.id).copied().unwrap_or(0) == 0;
    if !live.iter().any(|w| idle(&w) && !job.workers.contains(&w.id)) {
        return false;
    }
    // Free slots as if this job were not placed.
    let free: Vec<(String, u32)> = live
        .iter()
        .map(|w| {
            let u = used.get(&w.id).copied().unwrap_or(0).saturating_sub(job.slots_on(&w.id));
            (w.id.clone(), w.slots.saturating_sub(u))
        })
        .collect();
    if let Some((parts, _)) = place(job.parallelism, &free)
        && parts.len() > job.workers.len()
    {
        tracing::info!(job = job.id, from = job.workers.len(), to = parts.len(), "rebalancing over more workers");
        job.last_error = format!("rebalancing from {} to {} workers", job.workers.len(), parts.len());
        job.rescale_to = Some(job.parallelism);
        job.state = JobState::Rescaling;
        return true;
    }
    false
}

/// Takes a placed job off its workers (they are told to stop their parts at once) and queues it to be deployed
/// again from its last checkpoint, or records it stopped if it was stopping.
async fn unplace(
    job: &mut JobRecord,
    live: &[WorkerRecord],
    used: &mut HashMap<String, u32>,
    workers: &dyn Workers,
    why: String,
) {
    for id in job.workers.clone().iter() {
        if let Some(u) = used.get_mut(id) {
            *u = u.saturating_sub(job.slots_on(id));
        }
        if let Some(w) = live.iter().find(|w| &w.id == id)
            && let Err(e) = workers.cancel(w, &job.id, false).await
        {
            tracing::debug!(job = job.id, worker = id, error = e, "cancelling a part failed");
        }
    }
    job.workers.clear();
    job.slot_parts.clear();
    tracing::warn!(job = job.id, "{why}");
    job.last_error = why;
    settle(job);
}

/// A job none of whose parts runs any more goes where its state was heading: stopped, or (rescaling) back to
/// scheduling at its new parallelism, to restore from its last checkpoint; a running one is scheduled again.
fn settle(job: &mut JobRecord) {
    job.state = match job.state {
        JobState::Stopping => JobState::Stopped,
        JobState::Rescaling => {
            if let Some(p) = job.rescale_to.take() {
                tracing::info!(job = job.id, from = job.parallelism, to = p, "rescaling from the last checkpoint");
                job.parallelism = p;
                if let Some(plan) = job.rescale_plan.take() {
                    job.plan = plan;
                }
            }
            JobState::Scheduling
        }
        _ => JobState::Scheduling,
    };
}

async fn step(
    job: &mut JobRecord,
    live: &[WorkerRecord],
    tasks: &HashMap<String, Vec<pb::TaskStatus>>,
    used: &mut HashMap<String, u32>,
    workers: &dyn Workers,
    policy: &Policy,
) {
    match job.state {
        JobState::Scheduling => {
            let free: Vec<(String, u32)> = live
                .iter()
                .map(|w| (w.id.clone(), w.slots.saturating_sub(used.get(&w.id).copied().unwrap_or(0))))
                .collect();
            let Some((parts, slot_parts)) = place(job.parallelism, &free) else {
                return wait_for_slots(job, live, &free, policy);
            };
            let addresses: Vec<String> = parts
                .iter()
                .map(|id| live.iter().find(|w| &w.id == id).map(|w| w.address.clone()).unwrap_or_default())
                .collect();
            let attempt = job.attempt + 1;
            let mut deployed = Vec::new();
            for (part, id) in parts.iter().enumerate() {
                let Some(w) = live.iter().find(|w| &w.id == id) else { continue };
                let request = pb::DeployRequest {
                    job_id: job.id.clone(),
                    sql: job.sql.clone(),
                    parallelism: job.parallelism,
                    settings: job.settings.clone().into_iter().collect(),
                    variables: job.variables.clone().into_iter().collect(),
                    checkpoint_url: job.checkpoint_url.clone(),
                    attempt,
                    part: part as u32,
                    peers: addresses.clone(),
                    slot_parts: slot_parts.clone(),
                    plan: job.plan.clone(),
                };
                if let Err(e) = workers.deploy(w, request).await {
                    job.last_error = format!("deploying part {part} on worker {id}: {e}");
                    // The parts already deployed cannot run without it.
                    for d in &deployed {
                        let _ = workers.cancel(d, &job.id, false).await;
                    }
                    job.attempt = attempt;
                    return;
                }
                deployed.push(w.clone());
            }
            job.attempt = attempt;
            job.workers = parts;
            job.slot_parts = slot_parts;
            job.state = JobState::Running;
            job.waiting_since_ms = 0;
            if job.last_error.starts_with("waiting") || job.last_error.starts_with("deploying") {
                job.last_error.clear();
            }
            for w in &job.workers {
                *used.entry(w.clone()).or_default() += job.slots_on(w);
            }
            tracing::info!(job = job.id, workers = ?job.workers, attempt = job.attempt, "job deployed");
        }
        JobState::Running | JobState::Stopping | JobState::Rescaling => {
            if job.workers.is_empty() {
                settle(job);
                return;
            }
            let mut statuses = Vec::with_capacity(job.workers.len());
            for id in &job.workers {
                let Some(w) = live.iter().find(|w| &w.id == id) else {
                    // Its lease expired: restart the job elsewhere from the last checkpoint (or stop, if asked to).
                    let why = format!("worker {id} was lost; restarted from the last checkpoint");
                    return unplace(job, live, used, workers, why).await;
                };
                let Some(answer) = tasks.get(id) else {
                    // Unreachable this pass; its lease decides.
                    return;
                };
                let Some(s) = answer.iter().find(|s| s.job_id == job.id && s.attempt == job.attempt) else {
                    // The worker answered but does not run its part (it restarted): deploy again.
                    let why = format!("worker {id} no longer runs its part of the job; restarting it");
                    return unplace(job, live, used, workers, why).await;
                };
                statuses.push((w, s));
            }
            job.rows_in = statuses.iter().map(|(_, s)| s.rows_in).sum();
            job.rows_out = statuses.iter().map(|(_, s)| s.rows_out).sum();
            let mut stats: std::collections::BTreeMap<u32, crate::model::OperatorStats> = Default::default();
            for (_, s) in &statuses {
                if s.last_checkpoint > 0 && s.last_checkpoint >= job.last_checkpoint {
                    job.last_checkpoint_duration_ms = s.last_checkpoint_duration_ms;
                    job.last_checkpoint_bytes = s.last_checkpoint_bytes;
                }
                job.last_checkpoint = job.last_checkpoint.max(s.last_checkpoint);
                for o in &s.operators {
                    stats.entry(o.id).or_default().add(o);
                }
            }
            job.stats = stats;
            let state = |s: &pb::TaskStatus| pb::TaskState::try_from(s.state).unwrap_or(pb::TaskState::Unspecified);
            if let Some((w, s)) = statuses.iter().find(|(_, s)| state(s) == pb::TaskState::Failed) {
                // A failure a restart may get past (a lost peer worker, an external system away) restarts the job
                // from its last checkpoint; one of the job itself (bad input, configuration) fails it.
                if s.retriable && job.state != JobState::Stopping {
                    let why =
                        format!("the part on worker {} failed ({}); restarted from the last checkpoint", w.id, s.error);
                    return unplace(job, live, used, workers, why).await;
                }
                // The other parts cannot go on without it.
                for (other, o) in &statuses {
                    if state(o) == pb::TaskState::Running {
                        let _ = workers.cancel(other, &job.id, false).await;
                    }
                }
                job.state = JobState::Failed;
                job.last_error = s.error.clone();
                job.workers.clear();
                job.slot_parts.clear();
                return;
            }
            let running: Vec<&WorkerRecord> = statuses
                .iter()
                .filter(|(_, s)| matches!(state(s), pb::TaskState::Running | pb::TaskState::Unspecified))
                .map(|(w, _)| *w)
                .collect();
            if !running.is_empty() {
                if matches!(job.state, JobState::Stopping | JobState::Rescaling) {
                    let checkpoint = job.stop_with_checkpoint || job.state == JobState::Rescaling;
                    for w in running {
                        if let Err(e) = workers.cancel(w, &job.id, checkpoint).await {
                            job.last_error = format!("stopping on worker {}: {e}", w.id);
                        }
                    }
                }
                return;
            }
            // Every part has ended.
            let cancelled = statuses.iter().any(|(_, s)| state(s) == pb::TaskState::Cancelled);
            job.state = match job.state {
                JobState::Rescaling if cancelled => {
                    settle(job);
                    job.state
                }
                // A bounded job may finish before the rescale's checkpoint is taken: nothing is left to rescale.
                JobState::Rescaling => {
                    if let Some(p) = job.rescale_to.take() {
                        job.last_error = format!("the input ended before the rescale to {p} took effect");
                        tracing::info!(job = job.id, "{}", job.last_error);
                    }
                    job.rescale_plan = None;
                    JobState::Finished
                }
                _ if cancelled || job.state == JobState::Stopping => JobState::Stopped,
                _ => JobState::Finished,
            };
            for w in job.workers.clone() {
                if let Some(u) = used.get_mut(&w) {
                    *u = u.saturating_sub(job.slots_on(&w));
                }
            }
            job.workers.clear();
            job.slot_parts.clear();
        }
        JobState::Stopped | JobState::Finished | JobState::Failed => {}
    }
}

/// A job that does not fit in the free slots waits; once it has waited longer than the policy's warning time, its
/// status names the workers the leader sees and their free slots (none, after an etcd outage that no worker has
/// registered again from, says where to look).
fn wait_for_slots(job: &mut JobRecord, live: &[WorkerRecord], free: &[(String, u32)], policy: &Policy) {
    let now = now_ms();
    if job.waiting_since_ms == 0 {
        job.waiting_since_ms = now;
    }
    let mut msg = format!("waiting for {} free slots", job.parallelism);
    let waited = Duration::from_millis(now.saturating_sub(job.waiting_since_ms).max(0) as u64);
    if waited >= policy.slot_wait_warning {
        let seen: Vec<String> =
            live.iter().zip(free).map(|(w, (_, f))| format!("{} ({f} of {} free)", w.id, w.slots)).collect();
        let seen = if seen.is_empty() { "none".to_string() } else { seen.join(", ") };
        msg = format!("{msg} for more than {} s; workers seen: {seen}", policy.slot_wait_warning.as_secs());
        if msg != job.last_error {
            tracing::warn!(job = job.id, "{msg}");
        }
    } else if !job.last_error.starts_with("waiting") {
        tracing::info!(job = job.id, "{msg}");
    }
    job.last_error = msg;
}

/// Runs passes every `period` until `stop` is cancelled; a failed pass (etcd away) is logged and retried.
pub async fn run(
    store: Arc<dyn MetadataStore>,
    workers: Arc<dyn Workers>,
    period: Duration,
    policy: Policy,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut failing = false;
    loop {
        match reconcile_with(store.as_ref(), workers.as_ref(), policy).await {
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

    use std::sync::Mutex;

    use super::*;
    use crate::model::{JobRequest, get_job, put_request};
    use crate::store::MemoryStore;

    /// Workers that do what they are told and report it.
    #[derive(Default)]
    struct FakeWorkers {
        tasks: Mutex<HashMap<String, Vec<pb::TaskStatus>>>,
        cancelled: Mutex<Vec<(String, bool)>>,
        deployed: Mutex<Vec<(String, pb::DeployRequest)>>,
        /// A request a user makes while a deploy is under way (in the middle of a pass), once.
        during_deploy: Mutex<Option<(MemoryStore, JobRequest)>>,
    }

    #[async_trait]
    impl Workers for FakeWorkers {
        async fn tasks(&self, w: &WorkerRecord) -> Result<Vec<pb::TaskStatus>, String> {
            Ok(self.tasks.lock().unwrap().get(&w.id).cloned().unwrap_or_default())
        }
        async fn deploy(&self, w: &WorkerRecord, r: pb::DeployRequest) -> Result<(), String> {
            let status = pb::TaskStatus {
                job_id: r.job_id.clone(),
                attempt: r.attempt,
                state: pb::TaskState::Running as i32,
                slots: r.parallelism,
                part: r.part,
                ..Default::default()
            };
            let asked = self.during_deploy.lock().unwrap().take();
            if let Some((store, request)) = asked {
                crate::model::put_request(&store, &r.job_id, &request).await.unwrap();
            }
            self.deployed.lock().unwrap().push((w.id.clone(), r));
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
        JobRecord { id: id.into(), name: id.into(), parallelism, stop_with_checkpoint: true, ..Default::default() }
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
        // Each slot goes where most slots are free: a fits w1; b then spreads over w2 and w1.
        assert_eq!((get("a").await.state, get("a").await.workers), (JobState::Running, vec!["w1".to_string()]));
        let b = get("b").await;
        assert_eq!((b.workers, b.slot_parts), (vec!["w2".to_string(), "w1".to_string()], vec![0, 1]));
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
        store.delete(&format!("{}w1", crate::keys::WORKERS)).await.unwrap();
        add_worker(&store, "w2", 4).await;
        reconcile(&store, &workers).await.unwrap();
        let a = get_job(&store, "a").await.unwrap().unwrap();
        assert_eq!((a.state, a.workers.is_empty()), (JobState::Scheduling, true));
        assert!(a.last_error.contains("w1 was lost"), "{}", a.last_error);
        reconcile(&store, &workers).await.unwrap();
        let a = get_job(&store, "a").await.unwrap().unwrap();
        assert_eq!((a.state, a.workers.clone(), a.attempt), (JobState::Running, vec!["w2".to_string()], 2));
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

    #[tokio::test]
    async fn a_job_waiting_for_slots_too_long_says_so_with_the_workers_it_sees() {
        let store = MemoryStore::default();
        let workers = FakeWorkers::default();
        let now = Policy { slot_wait_warning: Duration::ZERO, ..Policy::default() };
        put_job(&store, &job("a", 3)).await.unwrap();
        reconcile_with(&store, &workers, now).await.unwrap();
        let a = get_job(&store, "a").await.unwrap().unwrap();
        assert_eq!(a.state, JobState::Scheduling);
        assert!(a.waiting_since_ms > 0);
        assert!(a.last_error.ends_with("workers seen: none"), "{}", a.last_error);
        add_worker(&store, "w1", 2).await;
        reconcile_with(&store, &workers, now).await.unwrap();
        let a = get_job(&store, "a").await.unwrap().unwrap();
        assert!(a.last_error.contains("3 free slots") && a.last_error.contains("w1 (2 of 2 free)"), "{}", a.last_error);
        // Not yet as long as the default: only what it waits for.
        put_job(&store, &job("b", 3)).await.unwrap();
        reconcile(&store, &workers).await.unwrap();
        assert_eq!(get_job(&store, "b").await.unwrap().unwrap().last_error, "waiting for 3 free slots");
        // Placed: no longer waiting.
        add_worker(&store, "w2", 2).await;
        reconcile_with(&store, &workers, now).await.unwrap();
        let a = get_job(&store, "a").await.unwrap().unwrap();
        assert_eq!((a.state, a.waiting_since_ms, a.last_error.as_str()), (JobState::Running, 0, ""));
    }

    #[test]
    fn placement_spreads_slots_and_refuses_what_does_not_fit() {
        let free = vec![("w1".to_string(), 2), ("w2".to_string(), 2)];
        let (parts, slots) = place(4, &free).unwrap();
        assert_eq!(parts, vec!["w1".to_string(), "w2".to_string()]);
        assert_eq!(slots, vec![0, 1, 0, 1]);
        assert!(place(5, &free).is_none());
        assert_eq!(place(1, &free).unwrap().0, vec!["w1".to_string()]);
    }

    #[tokio::test]
    async fn a_job_over_two_workers_restarts_when_a_part_loses_its_peer_and_fails_on_its_own_errors() {
        let store = MemoryStore::default();
        let workers = FakeWorkers::default();
        add_worker(&store, "w1", 2).await;
        add_worker(&store, "w2", 2).await;
        put_job(&store, &job("a", 4)).await.unwrap();
        reconcile(&store, &workers).await.unwrap();
        let a = get_job(&store, "a").await.unwrap().unwrap();
        assert_eq!(a.workers, vec!["w1".to_string(), "w2".to_string()]);
        {
            let deployed = workers.deployed.lock().unwrap();
            assert_eq!(deployed.len(), 2);
            assert_eq!((deployed[1].0.as_str(), deployed[1].1.part), ("w2", 1));
            assert_eq!(deployed[1].1.peers, vec!["http://w1".to_string(), "http://w2".to_string()]);
            assert_eq!(deployed[1].1.slot_parts, vec![0, 1, 0, 1]);
        }
        // Part 0 fails because part 1's channels broke: the job restarts, the other part is cancelled.
        let fail = |w: &str, error: &str, retriable: bool| {
            let mut t = workers.tasks.lock().unwrap();
            let s = t.get_mut(w).unwrap().iter_mut().rev().find(|s| s.job_id == "a").unwrap();
            s.state = pb::TaskState::Failed as i32;
            s.error = error.to_string();
            s.retriable = retriable;
        };
        fail("w1", "exchange: lost part 1 of the job: connection reset", true);
        reconcile(&store, &workers).await.unwrap();
        let a = get_job(&store, "a").await.unwrap().unwrap();
        assert_eq!(a.state, JobState::Scheduling);
        assert!(workers.cancelled.lock().unwrap().contains(&("a".to_string(), false)));
        reconcile(&store, &workers).await.unwrap();
        let a = get_job(&store, "a").await.unwrap().unwrap();
        assert_eq!((a.state, a.attempt), (JobState::Running, 2));
        // A part failing on its own (bad input) fails the job.
        fail("w2", "bad record in /data/x.json:3: expected value", false);
        reconcile(&store, &workers).await.unwrap();
        let a = get_job(&store, "a").await.unwrap().unwrap();
        assert_eq!(a.state, JobState::Failed);
        assert!(a.last_error.contains("bad record"));
    }

    #[tokio::test]
    async fn a_rescaling_job_stops_with_a_checkpoint_and_comes_back_at_its_new_parallelism() {
        let store = MemoryStore::default();
        let workers = FakeWorkers::default();
        add_worker(&store, "w1", 2).await;
        add_worker(&store, "w2", 2).await;
        put_job(&store, &job("a", 2)).await.unwrap();
        reconcile(&store, &workers).await.unwrap();
        let mut a = get_job(&store, "a").await.unwrap().unwrap();
        a.state = JobState::Rescaling;
        a.rescale_to = Some(4);
        put_job(&store, &a).await.unwrap();
        reconcile(&store, &workers).await.unwrap();
        assert_eq!(workers.cancelled.lock().unwrap().as_slice(), &[("a".to_string(), true), ("a".to_string(), true)]);
        for t in workers.tasks.lock().unwrap().values_mut() {
            t[0].state = pb::TaskState::Cancelled as i32;
        }
        reconcile(&store, &workers).await.unwrap();
        let a = get_job(&store, "a").await.unwrap().unwrap();
        assert_eq!((a.state, a.parallelism, a.rescale_to), (JobState::Scheduling, 4, None));
        reconcile(&store, &workers).await.unwrap();
        let a = get_job(&store, "a").await.unwrap().unwrap();
        assert_eq!((a.state, a.attempt, a.slot_parts.len()), (JobState::Running, 2, 4));
    }

    #[tokio::test]
    async fn a_stop_asked_while_a_pass_deploys_the_job_is_carried_out_not_overwritten() {
        let store = MemoryStore::default();
        let workers = FakeWorkers::default();
        add_worker(&store, "w1", 2).await;
        put_job(&store, &job("a", 2)).await.unwrap();
        // The pass read the job before the stop was asked, and writes it (deployed) after.
        *workers.during_deploy.lock().unwrap() = Some((store.clone(), JobRequest::Stop { checkpoint: true }));
        reconcile(&store, &workers).await.unwrap();
        assert_eq!(get_job(&store, "a").await.unwrap().unwrap().state, JobState::Running);
        reconcile(&store, &workers).await.unwrap();
        let a = get_job(&store, "a").await.unwrap().unwrap();
        assert_eq!((a.state, a.stop_with_checkpoint), (JobState::Stopping, true));
        assert_eq!(workers.cancelled.lock().unwrap().as_slice(), &[("a".to_string(), true)]);
        assert!(store.list(crate::keys::REQUESTS).await.unwrap().is_empty(), "carried out, then removed");
    }

    #[tokio::test]
    async fn a_rescale_the_input_outran_says_so_and_a_request_too_late_is_recorded() {
        let store = MemoryStore::default();
        let workers = FakeWorkers::default();
        add_worker(&store, "w1", 4).await;
        put_job(&store, &job("a", 2)).await.unwrap();
        reconcile(&store, &workers).await.unwrap();
        let rescale = JobRequest::Rescale { parallelism: 4, plan: String::new(), operators: Vec::new() };
        put_request(&store, "a", &rescale).await.unwrap();
        reconcile(&store, &workers).await.unwrap();
        let a = get_job(&store, "a").await.unwrap().unwrap();
        assert_eq!((a.state, a.rescale_to), (JobState::Rescaling, Some(4)));
        // The input ends before the parts take the rescale's checkpoint.
        workers.tasks.lock().unwrap().get_mut("w1").unwrap()[0].state = pb::TaskState::Finished as i32;
        reconcile(&store, &workers).await.unwrap();
        let a = get_job(&store, "a").await.unwrap().unwrap();
        assert_eq!((a.state, a.parallelism, a.rescale_to), (JobState::Finished, 2, None));
        assert_eq!(a.last_error, "the input ended before the rescale to 4 took effect");
        // A stop that reaches a finished job is not carried out, and says why.
        put_request(&store, "a", &JobRequest::Stop { checkpoint: false }).await.unwrap();
        reconcile(&store, &workers).await.unwrap();
        let a = get_job(&store, "a").await.unwrap().unwrap();
        assert_eq!(a.state, JobState::Finished);
        assert_eq!(a.last_error, "stop (at once) was not applied: job 'a' is already finished");
        assert!(store.list(crate::keys::REQUESTS).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn with_rebalance_a_job_spreads_onto_a_worker_that_joins() {
        let store = MemoryStore::default();
        let workers = FakeWorkers::default();
        add_worker(&store, "w1", 4).await;
        put_job(&store, &job("a", 2)).await.unwrap();
        let policy = Policy { rebalance: true, ..Policy::default() };
        reconcile_with(&store, &workers, policy).await.unwrap();
        assert_eq!(get_job(&store, "a").await.unwrap().unwrap().workers, vec!["w1".to_string()]);
        // Without --rebalance a new worker changes nothing; with it, the job is rescaled in place to spread.
        add_worker(&store, "w2", 4).await;
        reconcile(&store, &workers).await.unwrap();
        assert_eq!(get_job(&store, "a").await.unwrap().unwrap().state, JobState::Running);
        reconcile_with(&store, &workers, policy).await.unwrap();
        let a = get_job(&store, "a").await.unwrap().unwrap();
        assert_eq!((a.state, a.rescale_to), (JobState::Rescaling, Some(2)));
        reconcile_with(&store, &workers, policy).await.unwrap();
        assert_eq!(workers.cancelled.lock().unwrap().as_slice(), &[("a".to_string(), true)]);
        workers.tasks.lock().unwrap().get_mut("w1").unwrap()[0].state = pb::TaskState::Cancelled as i32;
        reconcile_with(&store, &workers, policy).await.unwrap();
        reconcile_with(&store, &workers, policy).await.unwrap();
        let a = get_job(&store, "a").await.unwrap().unwrap();
        assert_eq!((a.state, a.workers.len(), a.attempt), (JobState::Running, 2, 2));
        // Spread as far as it goes: no further rebalancing.
        reconcile_with(&store, &workers, policy).await.unwrap();
        assert_eq!(get_job(&store, "a").await.unwrap().unwrap().state, JobState::Running);
    }
}
