//! A worker of a nagare cluster. It registers under `/nagare/workers/<id>` with a lease it keeps alive, serves
//! `WorkerService` (deploy, cancel, list tasks) and runs each deployed job with the engine, checkpointing to the
//! job's checkpoint location and resuming from its newest checkpoint. If it cannot renew its lease before the lease
//! may have expired, it stops every job part at once (the coordinator may have given them to another worker, and two
//! copies must never write), takes no new ones, and registers again with a new lease as soon as etcd answers.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nagare_coordinator::lease::{Backoff, Holding, LeaseEnd, hold};
use nagare_coordinator::model::WorkerRecord;
use nagare_coordinator::{EtcdStore, StoreError};
use nagare_engine::connector::Registry;
use nagare_engine::distribute::Distribution;
use nagare_engine::{CheckpointOptions, JobOptions};
use nagare_rpc::v1 as pb;
use nagare_rpc::v1::worker_service_server::WorkerService;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Default seconds a worker's registration lasts without renewal: how long a lost worker's jobs wait before they
/// restart elsewhere (and how long an etcd outage the worker rides out).
pub const LEASE_TTL: i64 = 3;

/// One deployed job.
struct Task {
    attempt: u32,
    part: u32,
    slots: u32,
    state: pb::TaskState,
    error: String,
    retriable: bool,
    stop: CancellationToken,
    abort: Option<tokio::task::AbortHandle>,
    metrics: Option<Arc<nagare_engine::metrics::JobMetrics>>,
    checkpoints: Option<Arc<Mutex<nagare_engine::checkpoint::coordinator::CheckpointStats>>>,
}

/// The worker's jobs and its `WorkerService`.
#[derive(Clone, Default)]
pub struct Worker {
    tasks: Arc<Mutex<HashMap<String, Task>>>,
    exchange: Arc<nagare_exchange::Exchange>,
    /// The connectors jobs may use.
    registry: Arc<Registry>,
    /// Whether it holds a lease now: without one it takes no job (the leader may be giving its work elsewhere).
    registered: Arc<AtomicBool>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").finish()
    }
}

/// Why a job ended here, and whether a restart from its last checkpoint may get past it.
struct Failure {
    message: String,
    retriable: bool,
}

impl Failure {
    fn of(error: &nagare_engine::EngineError, message: String) -> Self {
        let retriable = matches!(error, nagare_engine::EngineError::External { retriable: true, .. });
        Failure { message, retriable }
    }

    fn fatal(message: String) -> Self {
        Failure { message, retriable: false }
    }
}

/// This worker's share of each operator's counters.
pub fn operator_statuses(m: &nagare_engine::metrics::JobMetrics) -> Vec<pb::OperatorStatus> {
    use nagare_engine::metrics::NodeMetrics;
    m.nodes
        .iter()
        .map(|n| pb::OperatorStatus {
            id: n.node as u32,
            rows_in: NodeMetrics::get(&n.rows_in),
            rows_out: NodeMetrics::get(&n.rows_out),
            bytes: NodeMetrics::get(&n.bytes),
            backpressure_us: NodeMetrics::get(&n.backpressure_us),
            watermark_us: n.watermark_reached(),
            state_entries: n.state_entries.load(std::sync::atomic::Ordering::Relaxed),
            late_rows: NodeMetrics::get(&n.late_rows),
            duplicates: NodeMetrics::get(&n.duplicates),
            bad_records: NodeMetrics::get(&n.bad_records),
            late_kept: NodeMetrics::get(&n.late_kept),
            streams_created: NodeMetrics::get(&n.streams_created),
            connector: n
                .connector_samples()
                .into_iter()
                .map(|s| pb::ConnectorFigure {
                    name: s.name.into(),
                    label: s.label.into(),
                    value: s.value,
                    max: s.kind == nagare_engine::metrics::SampleKind::MaxGauge,
                })
                .collect(),
        })
        .collect()
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Worker {
    /// A worker whose jobs exchange data through `exchange` (built with the cluster's TLS settings, if any).
    pub fn new(exchange: Arc<nagare_exchange::Exchange>, registry: Arc<Registry>) -> Self {
        Worker { tasks: Default::default(), exchange, registry, registered: Default::default() }
    }

    /// The Arrow Flight service through which the parts of a job on different workers exchange data; served
    /// next to `WorkerService`.
    pub fn flight_service(
        &self,
    ) -> arrow_flight::flight_service_server::FlightServiceServer<nagare_exchange::FlightEndpoint> {
        self.exchange.service()
    }

    /// The counters of every job that ran here, in Prometheus text format (labelled by job id).
    pub fn prometheus(&self) -> String {
        let tasks = locked(&self.tasks);
        let jobs: Vec<(&str, &nagare_engine::metrics::JobMetrics)> =
            tasks.iter().filter_map(|(id, t)| Some((id.as_str(), t.metrics.as_deref()?))).collect();
        nagare_engine::metrics::prometheus(&jobs)
    }

    /// Stops every job part at once and takes no new one until it registers again: the worker's lease is gone
    /// (or may be), so the leader may already have given its parts to other workers, and two copies must never
    /// write. Each part is reported failed and retriable, so that the leader restarts its job from the last
    /// checkpoint instead of taking it for stopped.
    pub fn fence(&self, why: &str) {
        self.registered.store(false, Ordering::SeqCst);
        let mut tasks = locked(&self.tasks);
        for (id, t) in tasks.iter_mut().filter(|(_, t)| t.state == pb::TaskState::Running) {
            tracing::warn!(job = id, attempt = t.attempt, "stopping the job part at once: {why}");
            match t.abort.take() {
                Some(a) => a.abort(),
                // Still starting: ends its wait for the other parts (see `start`).
                None => t.stop.cancel(),
            }
            t.state = pb::TaskState::Failed;
            t.error = format!("the worker lost its lease: {why}");
            t.retriable = true;
            self.exchange.forget(&format!("{id}/{}", t.attempt));
        }
    }

    async fn start(&self, req: pb::DeployRequest) -> Result<(), Status> {
        let settings: BTreeMap<String, String> = req.settings.into_iter().collect();
        let variables: BTreeMap<String, String> = req.variables.into_iter().collect();
        let pipeline = if req.plan.is_empty() {
            tracing::warn!(
                job = req.job_id,
                "the deployment carries no plan (an older coordinator): planning its SQL here"
            );
            self.registry.plan(&req.sql, req.parallelism, &settings, &variables).await
        } else {
            // The coordinator's plan, as it is: this worker's environment and `${VAR}`s play no part.
            nagare_sql::wire::decode(&req.plan)
        }
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let store = nagare_engine::checkpoint::store::CheckpointStore::open(&req.checkpoint_url)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let options = JobOptions {
            checkpoints: Some(CheckpointOptions {
                store,
                settings: nagare_engine::checkpoint::coordinator::CheckpointSettings {
                    interval: pipeline.settings.checkpoint_interval,
                    timeout: pipeline.settings.checkpoint_timeout,
                    retained: pipeline.settings.checkpoints_retained,
                    tolerable_failures: pipeline.settings.checkpoint_tolerable_failures,
                },
                from_scratch: false,
            }),
            // Part numbers keep the output and dead-letter file names of parts apart.
            run_id: format!("{}-p{}", nagare_engine::job::new_run_id(), req.part),
            distribution: (req.peers.len() > 1).then(|| Distribution {
                part: req.part as usize,
                slot_parts: req.slot_parts.iter().map(|p| *p as usize).collect(),
                network: self.exchange.network(format!("{}/{}", req.job_id, req.attempt), req.peers.clone()),
            }),
            ..JobOptions::default()
        };
        let id = req.job_id.clone();
        // Starting can wait (up to a minute) for the job's other parts; a cancel meanwhile ends the wait.
        let cancelled = locked(&self.tasks).get(&id).map(|t| t.stop.clone()).unwrap_or_default();
        let started = tokio::select! {
            started = nagare_engine::start(&pipeline, self.registry.clone(), options) => started,
            _ = cancelled.cancelled() => {
                self.finished(&id, req.attempt, Ok(()));
                return Ok(());
            }
        };
        let job = match started {
            Ok(j) => j,
            Err(e) => {
                self.finished(&id, req.attempt, Err(Failure::of(&e, e.to_string())));
                return Ok(());
            }
        };
        if let Some(from) = job.checkpoint_stats().lock().ok().and_then(|s| s.restored_from) {
            tracing::info!(job = id, checkpoint = from, "resuming from checkpoint");
        }
        let stop = job.stop_token();
        let metrics = job.metrics();
        let checkpoints = job.checkpoint_stats();
        let me = self.clone();
        let attempt = req.attempt;
        let job_id = id.clone();
        let handle = tokio::spawn(async move {
            let result = job.wait().await.map(|_| ()).map_err(|e| Failure::of(&e.error, e.to_string()));
            me.finished(&job_id, attempt, result);
        });
        let mut tasks = locked(&self.tasks);
        match tasks.get_mut(&id).filter(|t| t.attempt == attempt) {
            // Fenced or cancelled while it started: it must not run.
            Some(t) if t.state != pb::TaskState::Running => handle.abort(),
            Some(t) => {
                t.stop = stop;
                t.abort = Some(handle.abort_handle());
                t.metrics = Some(metrics);
                t.checkpoints = Some(checkpoints);
            }
            // A newer attempt replaced it meanwhile.
            None => handle.abort(),
        }
        Ok(())
    }

    fn finished(&self, id: &str, attempt: u32, result: Result<(), Failure>) {
        self.exchange.forget(&format!("{id}/{attempt}"));
        if let Some(t) = locked(&self.tasks).get_mut(id).filter(|t| t.attempt == attempt) {
            if t.state != pb::TaskState::Running {
                return;
            }
            match result {
                Ok(()) if t.stop.is_cancelled() => t.state = pb::TaskState::Cancelled,
                Ok(()) => t.state = pb::TaskState::Finished,
                Err(f) => {
                    tracing::error!(job = id, error = f.message, "job failed");
                    t.state = pb::TaskState::Failed;
                    t.error = f.message;
                    t.retriable = f.retriable;
                }
            }
        }
    }
}

#[tonic::async_trait]
impl WorkerService for Worker {
    async fn deploy(&self, request: Request<pb::DeployRequest>) -> Result<Response<pb::DeployResponse>, Status> {
        let req = request.into_inner();
        if !self.registered.load(Ordering::SeqCst) {
            return Err(Status::unavailable(
                "this worker holds no lease in etcd right now (it lost it and is registering again); it takes no job",
            ));
        }
        {
            let mut tasks = locked(&self.tasks);
            if let Some(t) = tasks.get(&req.job_id) {
                if t.attempt >= req.attempt {
                    return Err(Status::already_exists(format!(
                        "job {} attempt {} is already here (asked for attempt {})",
                        req.job_id, t.attempt, req.attempt
                    )));
                }
                if t.state == pb::TaskState::Running {
                    return Err(Status::failed_precondition(format!("job {} still runs here", req.job_id)));
                }
            }
            tasks.insert(
                req.job_id.clone(),
                Task {
                    attempt: req.attempt,
                    part: req.part,
                    slots: if req.slot_parts.is_empty() {
                        req.parallelism
                    } else {
                        req.slot_parts.iter().filter(|p| **p == req.part).count() as u32
                    },
                    state: pb::TaskState::Running,
                    error: String::new(),
                    retriable: false,
                    stop: CancellationToken::new(),
                    abort: None,
                    metrics: None,
                    checkpoints: None,
                },
            );
        }
        tracing::info!(job = req.job_id, attempt = req.attempt, "deploying job");
        // Restoring state can take a while: the coordinator is answered at once and follows progress in ListTasks.
        let me = self.clone();
        tokio::spawn(async move {
            let (id, attempt) = (req.job_id.clone(), req.attempt);
            if let Err(e) = me.start(req).await {
                me.finished(&id, attempt, Err(Failure::fatal(e.message().to_string())));
            }
        });
        Ok(Response::new(pb::DeployResponse {}))
    }

    async fn cancel(&self, request: Request<pb::CancelRequest>) -> Result<Response<pb::CancelResponse>, Status> {
        let req = request.into_inner();
        let mut tasks = locked(&self.tasks);
        let t =
            tasks.get_mut(&req.job_id).ok_or_else(|| Status::not_found(format!("job {} is not here", req.job_id)))?;
        if req.checkpoint {
            // A final checkpoint, then the job ends (reported as cancelled).
            t.stop.cancel();
        } else if let Some(a) = t.abort.take() {
            a.abort();
            t.state = pb::TaskState::Cancelled;
        } else if t.state == pb::TaskState::Running {
            // Still starting: stop waiting for the other parts.
            t.stop.cancel();
            t.state = pb::TaskState::Cancelled;
        }
        Ok(Response::new(pb::CancelResponse {}))
    }

    async fn list_tasks(
        &self,
        _request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let tasks = locked(&self.tasks);
        Ok(Response::new(pb::ListTasksResponse {
            tasks: tasks
                .iter()
                .map(|(id, t)| {
                    let last = t.checkpoints.as_ref().and_then(|c| c.lock().ok().and_then(|s| s.last.clone()));
                    pb::TaskStatus {
                        job_id: id.clone(),
                        attempt: t.attempt,
                        state: t.state as i32,
                        rows_in: t.metrics.as_ref().map_or(0, |m| m.rows_read()),
                        rows_out: t.metrics.as_ref().map_or(0, |m| m.rows_written()),
                        last_checkpoint: t
                            .checkpoints
                            .as_ref()
                            .and_then(|c| c.lock().ok().and_then(|s| s.last.as_ref().map(|l| l.id)))
                            .unwrap_or(0),
                        error: t.error.clone(),
                        retriable: t.retriable,
                        slots: t.slots,
                        part: t.part,
                        operators: t.metrics.as_ref().map(|m| operator_statuses(m)).unwrap_or_default(),
                        last_checkpoint_duration_ms: last.as_ref().map_or(0, |l| l.duration.as_millis() as u64),
                        last_checkpoint_bytes: last.as_ref().map_or(0, |l| l.bytes),
                    }
                })
                .collect(),
        }))
    }
}

/// Registers `record` under a lease and renews it until `stop`. While etcd cannot be reached the worker's jobs go on
/// as long as the lease may still hold (nobody can reschedule them meanwhile); once it may have expired — no renewal
/// answered within its TTL, or etcd says it is gone — the worker is fenced ([`Worker::fence`]: its job parts stop
/// at once, it takes no new ones) and registers again with a new lease as soon as etcd answers, retrying with
/// backoff; then it takes jobs again.
pub async fn keep_registered(
    etcd: EtcdStore,
    record: WorkerRecord,
    lease_ttl: i64,
    stop: CancellationToken,
    worker: Worker,
) -> Result<(), StoreError> {
    let key = etcd.key(&format!("{}{}", nagare_coordinator::keys::WORKERS, record.id));
    let value =
        serde_json::to_vec(&record).map_err(|e| StoreError::Corrupt { key: key.clone(), reason: e.to_string() })?;
    let ttl = lease_ttl.max(2);
    let mut client = etcd.client();
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    // The lease given up last, and when.
    let mut lost: Option<(i64, std::time::Instant)> = None;
    let mut failing = false;
    loop {
        let asked = tokio::time::Instant::now();
        let registering = async {
            if let Some((old, _)) = lost {
                // Its registration must not outlive it, should etcd still hold it (a renewal may have been queued).
                let _ = client.lease_revoke(old).await;
            }
            register(&mut client, &key, &value, ttl, &worker).await
        };
        let lease = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            lease = registering => lease,
        };
        let lease = match lease {
            Ok(lease) => lease,
            Err(e) => {
                if failing {
                    tracing::debug!(worker = record.id, error = %e, "cannot register in etcd yet; retrying");
                } else {
                    tracing::warn!(worker = record.id, error = %e, "cannot register in etcd; retrying with backoff");
                    failing = true;
                }
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff.next_wait()) => continue,
                }
            }
        };
        failing = false;
        backoff.reset();
        match lost.take() {
            Some((_, since)) => tracing::info!(
                worker = record.id,
                address = record.address,
                after_ms = since.elapsed().as_millis() as u64,
                "registered again with a new lease; taking jobs again"
            ),
            None => tracing::info!(worker = record.id, address = record.address, "registered"),
        }
        let ttl_d = Duration::from_secs(ttl as u64);
        let holding = Holding { ttl: ttl_d, give_up_after: ttl_d };
        let meanwhile = "its job parts go on";
        match hold(&mut client, lease, holding, asked, &stop, &record.id, meanwhile).await {
            LeaseEnd::Stopped => {
                let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await;
                return Ok(());
            }
            LeaseEnd::Lost(why) => {
                tracing::warn!(worker = record.id, "{why}; stopping this worker's job parts, registering again");
                worker.fence(&why);
                lost = Some((lease, std::time::Instant::now()));
            }
        }
    }
}

/// Grants a lease and puts the registration under it. The worker takes jobs from just before the leader can see it
/// (a deploy may follow the put at once), and not if the put fails.
async fn register(
    client: &mut etcd_client::Client,
    key: &str,
    value: &[u8],
    lease_ttl: i64,
    worker: &Worker,
) -> Result<i64, StoreError> {
    let lease = client.lease_grant(lease_ttl, None).await?.id();
    worker.registered.store(true, Ordering::SeqCst);
    if let Err(e) = client.put(key, value.to_vec(), Some(etcd_client::PutOptions::new().with_lease(lease))).await {
        worker.registered.store(false, Ordering::SeqCst);
        return Err(e.into());
    }
    Ok(lease)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn deploy_request(attempt: u32, dir: &std::path::Path) -> pb::DeployRequest {
        pb::DeployRequest {
            job_id: "j".into(),
            // Unbounded and slow: still running when the worker is fenced.
            sql: format!(
                "CREATE TABLE e (id TEXT) WITH (connector = 'generator', rate = '100', seed = '1');\n\
                 CREATE TABLE o WITH (connector = 'filesystem', path = '{}', format = 'json');\n\
                 INSERT INTO o SELECT id FROM e;\n",
                dir.join("out").display()
            ),
            parallelism: 1,
            checkpoint_url: dir.join("checkpoints").display().to_string(),
            attempt,
            ..Default::default()
        }
    }

    async fn task(worker: &Worker) -> pb::TaskStatus {
        let tasks = worker.list_tasks(Request::new(pb::ListTasksRequest {})).await.unwrap().into_inner().tasks;
        tasks.into_iter().find(|t| t.job_id == "j").unwrap()
    }

    #[tokio::test]
    async fn a_fenced_worker_stops_its_parts_as_retriable_and_takes_none_until_registered_again() {
        let dir = std::env::temp_dir().join(format!("nagare-worker-fence-{}", std::process::id()));
        let registry = Registry::new()
            .with(Arc::new(nagare_connectors::filesystem::FilesystemSpec))
            .with(Arc::new(nagare_connectors::generator::GeneratorSpec));
        let worker = Worker::new(nagare_exchange::Exchange::new(), Arc::new(registry));
        // Not registered yet: nobody may give it work.
        let refused = worker.deploy(Request::new(deploy_request(1, &dir))).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        worker.registered.store(true, Ordering::SeqCst);
        worker.deploy(Request::new(deploy_request(1, &dir))).await.unwrap();
        let since = std::time::Instant::now();
        while task(&worker).await.rows_in == 0 {
            assert!(since.elapsed() < Duration::from_secs(60), "the job never ran: {:?}", task(&worker).await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        worker.fence("the lease expired (test)");
        let t = task(&worker).await;
        assert_eq!(t.state, pb::TaskState::Failed as i32, "{t:?}");
        assert!(t.retriable && t.error.contains("lost its lease"), "{t:?}");
        // The job itself was aborted, not left running: it reads nothing more.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let read = task(&worker).await.rows_in;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(task(&worker).await.rows_in, read, "the fenced part still reads");
        let refused = worker.deploy(Request::new(deploy_request(2, &dir))).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        // Registered again: the next attempt is taken. Fenced while it starts, it never runs.
        worker.registered.store(true, Ordering::SeqCst);
        worker.deploy(Request::new(deploy_request(2, &dir))).await.unwrap();
        worker.fence("the lease expired again (test)");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t = task(&worker).await;
        assert_eq!((t.attempt, t.state, t.rows_in), (2, pb::TaskState::Failed as i32, 0), "{t:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
