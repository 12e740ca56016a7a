//! `nagare run --serve`: the run's job behind the cluster's `JobService`, over an embedded metadata store (a local
//! file with `--state-file`, else memory), so `nagare status`, `jobs`, `stop` and `status --watch` work on a single
//! process as on a cluster.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nagare_coordinator::model::{
    JobRecord, JobState, OperatorStats, apply_requests, delete_requests, get_job, list_requests, now_ms, put_job,
};
use nagare_coordinator::{FileStore, MemoryStore, MetadataStore};
use nagare_engine::checkpoint::coordinator::CheckpointStats;
use nagare_engine::metrics::JobMetrics;
use nagare_rpc::v1 as pb;
use nagare_sql::Pipeline;
use tokio_util::sync::CancellationToken;

/// The served job of this run.
pub struct LocalApi {
    store: Arc<dyn MetadataStore>,
    id: String,
    updater: tokio::task::JoinHandle<()>,
}

/// What the run shares with its API.
#[derive(Clone)]
pub struct RunHandles {
    /// Its counters.
    pub metrics: Arc<JobMetrics>,
    /// Its checkpoints.
    pub checkpoints: Arc<Mutex<CheckpointStats>>,
    /// Stops it with a final checkpoint.
    pub stop: CancellationToken,
}

/// Records the job and serves the API on `addr` (loopback only: it has neither TLS nor a token).
pub async fn start(
    addr: &str,
    state_file: Option<&Path>,
    pipeline: &Pipeline,
    file: &Path,
    checkpoint_url: &str,
    run: RunHandles,
) -> Result<LocalApi> {
    let socket: std::net::SocketAddr = addr.parse().with_context(|| format!("--serve '{addr}'"))?;
    if !socket.ip().is_loopback() {
        bail!("--serve {addr}: the API of a single run has no TLS or token, so it listens on loopback addresses only");
    }
    let store: Arc<dyn MetadataStore> = match state_file {
        Some(p) => Arc::new(FileStore::open(p)?),
        None => Arc::new(MemoryStore::default()),
    };
    let name = file.file_stem().map_or("pipeline".into(), |s| s.to_string_lossy().into_owned());
    let id = format!("local-{name}");
    let attempt = get_job(store.as_ref(), &id).await?.map_or(0, |j| j.attempt) + 1;
    let sql = std::fs::read_to_string(file).unwrap_or_default();
    let mut job = JobRecord::new(pipeline, id.clone(), name, sql, checkpoint_url.to_string());
    job.state = JobState::Running;
    job.workers = vec!["local".into()];
    job.attempt = attempt;
    put_job(store.as_ref(), &job).await?;
    // Asked of an earlier run of this job, which ended before carrying it out: not for this one.
    if let Some(stale) = list_requests(store.as_ref(), Some(&id)).await?.remove(&id) {
        delete_requests(store.as_ref(), &stale).await?;
    }
    let listener = tokio::net::TcpListener::bind(socket).await.with_context(|| format!("listening on {addr}"))?;
    eprintln!("serving JobService on http://{} (job {id})", listener.local_addr()?);
    let service = nagare_coordinator::service::Jobs::embedded(store.clone(), nagare_cli::registry());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::job_service_server::JobServiceServer::new(service))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let updater = tokio::spawn(follow(store.clone(), id.clone(), run));
    Ok(LocalApi { store, id, updater })
}

/// Keeps the record's counters current and carries out a StopJob.
async fn follow(store: Arc<dyn MetadataStore>, id: String, run: RunHandles) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(Some(mut job)) = get_job(store.as_ref(), &id).await else { continue };
        // A StopJob is queued as a request: carried out here, where the record is written.
        let asked = list_requests(store.as_ref(), Some(&id)).await.ok().and_then(|mut r| r.remove(&id));
        let asked = asked.unwrap_or_default();
        apply_requests(&mut job, &asked);
        if job.state == JobState::Stopping && !run.stop.is_cancelled() {
            if !job.stop_with_checkpoint {
                // Not left queued for the next run of this job.
                let _ = delete_requests(store.as_ref(), &asked).await;
                eprintln!("\nstopped at once (StopJob)");
                std::process::exit(130);
            }
            eprintln!("\nstopping (StopJob)...");
            run.stop.cancel();
        }
        refresh(&mut job, &run);
        if let Err(e) = put_job(store.as_ref(), &job).await {
            tracing::warn!(error = %e, "updating the job record failed");
            continue;
        }
        if let Err(e) = delete_requests(store.as_ref(), &asked).await {
            tracing::warn!(error = %e, "removing applied requests failed");
        }
    }
}

fn refresh(job: &mut JobRecord, run: &RunHandles) {
    job.rows_in = run.metrics.rows_read();
    job.rows_out = run.metrics.rows_written();
    let mut stats = std::collections::BTreeMap::<u32, OperatorStats>::new();
    for o in nagare_worker::operator_statuses(&run.metrics) {
        stats.entry(o.id).or_default().add(&o);
    }
    job.stats = stats;
    if let Some(last) = run.checkpoints.lock().ok().and_then(|s| s.last.clone()) {
        job.last_checkpoint = last.id;
        job.last_checkpoint_duration_ms = last.duration.as_millis() as u64;
        job.last_checkpoint_bytes = last.bytes;
    }
    job.updated_ms = now_ms();
}

impl LocalApi {
    /// Records how the run ended.
    pub async fn finish(self, run: &RunHandles, result: &Result<nagare_engine::JobSummary, String>) {
        self.updater.abort();
        let Ok(Some(mut job)) = get_job(self.store.as_ref(), &self.id).await else { return };
        refresh(&mut job, run);
        match result {
            Ok(_) if run.stop.is_cancelled() => job.state = JobState::Stopped,
            Ok(_) => job.state = JobState::Finished,
            Err(e) => {
                job.state = JobState::Failed;
                job.last_error = e.clone();
            }
        }
        job.workers.clear();
        if let Err(e) = put_job(self.store.as_ref(), &job).await {
            tracing::warn!(error = %e, "recording the end of the job failed");
        }
    }
}
