//! `JobService`: the public API, answered from the metadata store by any coordinator.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use nagare_engine::connector::Registry;
use std::time::Duration;

use futures::Stream;
use nagare_rpc::v1 as pb;
use nagare_rpc::v1::job_service_server::JobService;
use tonic::{Request, Response, Status};

use crate::model::{JobRecord, JobRequest, JobState, get_job, list_jobs, list_workers, put_job, put_request};
use crate::store::{MetadataStore, StoreError};

/// The service; `checkpoint_base` is where jobs' checkpoints go (`<base>/<job id>`).
#[derive(Clone)]
pub struct Jobs {
    store: Arc<dyn MetadataStore>,
    registry: Arc<Registry>,
    checkpoint_base: String,
    /// Serving one `nagare run` (embedded store): its job can be watched and stopped, nothing submitted.
    embedded: bool,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs").field("checkpoint_base", &self.checkpoint_base).finish()
    }
}

impl Jobs {
    /// A service over `store`.
    pub fn new(store: Arc<dyn MetadataStore>, registry: Arc<Registry>, checkpoint_base: &str) -> Self {
        Jobs { store, registry, checkpoint_base: checkpoint_base.trim_end_matches('/').to_string(), embedded: false }
    }

    /// The service of a single `nagare run` over its embedded store: the same API for watching and stopping its
    /// job; submitting and rescaling need a cluster.
    pub fn embedded(store: Arc<dyn MetadataStore>, registry: Arc<Registry>) -> Self {
        Jobs { store, registry, checkpoint_base: String::new(), embedded: true }
    }

    fn refuse_if_embedded(&self, what: &str) -> Result<(), Status> {
        if self.embedded {
            return Err(Status::failed_precondition(format!(
                "this is the API of a single `nagare run`, which cannot {what}; use a cluster (`nagare coordinator`)"
            )));
        }
        Ok(())
    }
}

impl Jobs {
    /// Checks `request` against the job as it is now, queues it for the process that writes the record, and
    /// answers with the job as the request leaves it.
    async fn queue(&self, mut job: JobRecord, request: JobRequest) -> Result<Response<pb::Job>, Status> {
        let id = job.id.clone();
        job.apply(&request).map_err(Status::failed_precondition)?;
        put_request(self.store.as_ref(), &id, &request).await.map_err(unavailable)?;
        tracing::info!(job = id, request = request.describe(), "queued");
        Ok(Response::new(job.to_pb()))
    }
}

fn unavailable(e: StoreError) -> Status {
    Status::unavailable(format!("the cluster's metadata store cannot be used right now ({e}); retry"))
}

fn plan_error(e: &nagare_sql::PlanError) -> Status {
    Status::invalid_argument(match e.location {
        Some(l) => format!("{}:{}: {e}", l.line, l.column),
        None => e.to_string(),
    })
}

async fn job_or_not_found(store: &dyn MetadataStore, id: &str) -> Result<JobRecord, Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("a job id is required (see `nagare jobs`)"));
    }
    get_job(store, id).await.map_err(unavailable)?.ok_or_else(|| Status::not_found(format!("no job '{id}'")))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Job, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl JobService for Jobs {
    async fn submit_pipeline(&self, request: Request<pb::SubmitPipelineRequest>) -> Result<Response<pb::Job>, Status> {
        self.refuse_if_embedded("take other jobs")?;
        let req = request.into_inner();
        let settings: BTreeMap<String, String> = req.settings.into_iter().collect();
        let variables: BTreeMap<String, String> = req.variables.into_iter().collect();
        let pipeline =
            self.registry.plan(&req.sql, req.parallelism, &settings, &variables).await.map_err(|e| plan_error(&e))?;
        // A cluster keeps a job's SQL and plan in etcd: a secret written into them would be stored as written.
        for table in pipeline.tables.values() {
            if let Some((option, at)) = table.options.secret_literals().into_iter().next() {
                let e = nagare_sql::PlanError::invalid(format!(
                    "option '{option}' of table '{}' is a secret written in the SQL text, which a cluster stores with                      the job; write '${{VARIABLE}}' and set the variable in the environment of the workers",
                    table.name
                ))
                .at(at);
                return Err(plan_error(&e));
            }
        }
        let name = if req.name.is_empty() { "pipeline".to_string() } else { req.name };
        let jobs = list_jobs(self.store.as_ref()).await.map_err(unavailable)?;
        if let Some(j) = jobs.iter().find(|j| j.name == name && !j.state.is_terminal()) {
            return Err(Status::already_exists(format!(
                "job '{}' ({}) is already named '{name}'; stop it or choose another --name",
                j.id,
                j.state_name()
            )));
        }
        let id = format!("j{:08x}", fastrand::u32(..));
        let mut job = JobRecord::new(&pipeline, id.clone(), name, req.sql, format!("{}/{id}", self.checkpoint_base));
        if req.parallelism > 0 {
            job.parallelism = req.parallelism;
        }
        job.settings = settings;
        job.variables = variables;
        // A secret option's variable is read from the workers' environment; a value given for it is not stored.
        for name in pipeline.tables.values().flat_map(|t| t.options.secret_references()) {
            if job.variables.remove(&name).is_some() {
                tracing::warn!(
                    job = id,
                    "variable {name} is used by a secret option: it is read from the environment of the workers,                      and the value given for it was not stored"
                );
            }
        }
        put_job(self.store.as_ref(), &job).await.map_err(unavailable)?;
        tracing::info!(job = job.id, name = job.name, plan_bytes = job.plan.len(), "job submitted");
        for w in &pipeline.warnings {
            tracing::warn!(job = job.id, "{w}");
        }
        Ok(Response::new(job.to_pb()))
    }

    async fn validate_pipeline(
        &self,
        request: Request<pb::ValidatePipelineRequest>,
    ) -> Result<Response<pb::ValidatePipelineResponse>, Status> {
        let req = request.into_inner();
        let variables: BTreeMap<String, String> = req.variables.into_iter().collect();
        Ok(Response::new(match self.registry.plan(&req.sql, 0, &BTreeMap::new(), &variables).await {
            Ok(p) => {
                let warnings: String = p.warnings.iter().map(|w| format!("\nwarning: {w}")).collect();
                pb::ValidatePipelineResponse { valid: true, diagnostics: Vec::new(), plan: format!("{p}{warnings}") }
            }
            Err(e) => pb::ValidatePipelineResponse {
                valid: false,
                diagnostics: vec![pb::Diagnostic {
                    message: e.to_string(),
                    line: e.location.map_or(0, |l| l.line as u32),
                    column: e.location.map_or(0, |l| l.column as u32),
                }],
                plan: String::new(),
            },
        }))
    }

    async fn list_jobs(
        &self,
        _request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let jobs = list_jobs(self.store.as_ref()).await.map_err(unavailable)?;
        Ok(Response::new(pb::ListJobsResponse { jobs: jobs.iter().map(JobRecord::to_pb).collect() }))
    }

    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        Ok(Response::new(job_or_not_found(self.store.as_ref(), &request.into_inner().id).await?.to_pb()))
    }

    async fn stop_job(&self, request: Request<pb::StopJobRequest>) -> Result<Response<pb::Job>, Status> {
        let req = request.into_inner();
        let job = job_or_not_found(self.store.as_ref(), &req.id).await?;
        let stop = JobRequest::Stop { checkpoint: req.mode != pb::StopMode::Immediate as i32 };
        self.queue(job, stop).await
    }

    async fn rescale_job(&self, request: Request<pb::RescaleJobRequest>) -> Result<Response<pb::Job>, Status> {
        self.refuse_if_embedded("rescale (restart it with --parallelism from its checkpoints)")?;
        let req = request.into_inner();
        let job = job_or_not_found(self.store.as_ref(), &req.id).await?;
        // Before planning: a job that cannot be rescaled is refused as it would be when the request is applied.
        job.rescalable().map_err(Status::failed_precondition)?;
        // Planned at the new parallelism first, so that a parallelism the pipeline cannot take is refused now.
        let pipeline = self
            .registry
            .plan(&job.sql, req.parallelism, &job.settings, &job.variables)
            .await
            .map_err(|e| plan_error(&e))?;
        let max = pipeline.settings.max_parallelism;
        if req.parallelism == 0 || req.parallelism > max {
            return Err(Status::invalid_argument(format!(
                "parallelism must be between 1 and max_parallelism ({max}), not {}",
                req.parallelism
            )));
        }
        let plan = nagare_sql::wire::encode(&pipeline).map_err(|e| plan_error(&e))?;
        let rescale =
            JobRequest::Rescale { parallelism: req.parallelism, plan, operators: crate::model::operators(&pipeline) };
        self.queue(job, rescale).await
    }

    async fn list_workers(
        &self,
        _request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let workers = list_workers(self.store.as_ref()).await.map_err(unavailable)?;
        let jobs = list_jobs(self.store.as_ref()).await.map_err(unavailable)?;
        Ok(Response::new(pb::ListWorkersResponse {
            workers: workers
                .iter()
                .map(|w| {
                    let mine: Vec<&JobRecord> =
                        jobs.iter().filter(|j| !j.state.is_terminal() && j.workers.contains(&w.id)).collect();
                    let used: u32 = mine.iter().map(|j| j.slots_on(&w.id)).sum();
                    pb::Worker {
                        id: w.id.clone(),
                        address: w.address.clone(),
                        slots: w.slots,
                        free_slots: w.slots.saturating_sub(used),
                        jobs: mine.iter().map(|j| j.id.clone()).collect(),
                    }
                })
                .collect(),
        }))
    }

    type WatchJobStream = WatchStream;

    async fn watch_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = request.into_inner().id;
        let first = job_or_not_found(self.store.as_ref(), &id).await?;
        let store = self.store.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(Ok(last.to_pb())).await.is_err() {
                return;
            }
            while !last.state.is_terminal() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let next = match get_job(store.as_ref(), &id).await {
                    Ok(Some(j)) => j,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(unavailable(e))).await;
                        return;
                    }
                };
                if next != last {
                    if tx.send(Ok(next.to_pb())).await.is_err() {
                        return;
                    }
                    last = next;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

impl JobRecord {
    /// The state in words, for messages.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            JobState::Scheduling => "scheduling",
            JobState::Running => "running",
            JobState::Stopping => "stopping",
            JobState::Rescaling => "rescaling",
            JobState::Stopped => "stopped",
            JobState::Finished => "finished",
            JobState::Failed => "failed",
        }
    }
}

/// Checks `authorization: Bearer <token>` on every call (constant-time comparison); `None` accepts every call
/// (only with `--insecure`).
pub fn bearer_check(token: Option<String>) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        let Some(expected) = &token else { return Ok(req) };
        let given = req.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
        let given = given.strip_prefix("Bearer ").unwrap_or("");
        let same = given.len() == expected.len()
            && given.bytes().zip(expected.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if same {
            Ok(req)
        } else {
            Err(Status::unauthenticated("a valid bearer token is required (--token or NAGARE_TOKEN)"))
        }
    }
}
