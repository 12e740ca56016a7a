//! Cluster commands: `coordinator`, `worker`, and the JobService clients (`submit`, `jobs`, `status`, `stop`,
//! `workers`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;
use nagare_coordinator::EtcdStore;
use nagare_rpc::v1 as pb;
use tokio_util::sync::CancellationToken;

/// Where the JobService is and how to call it.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// The coordinator (any of them).
    #[arg(long, env = "NAGARE_COORDINATOR", default_value = "http://127.0.0.1:7400")]
    coordinator: String,
    /// Bearer token of the cluster.
    #[arg(long, env = "NAGARE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) to trust for an https:// coordinator (default: the system's roots).
    #[arg(long, env = "NAGARE_CA_CERT")]
    ca_cert: Option<PathBuf>,
}

/// Cluster subcommands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Runs a coordinator: serves JobService, and schedules jobs while it leads.
    Coordinator {
        /// etcd endpoints (comma-separated).
        #[arg(long, env = "NAGARE_ETCD")]
        etcd: String,
        /// Key prefix of this cluster in etcd (several clusters can share one etcd).
        #[arg(long, env = "NAGARE_ETCD_PREFIX", default_value = "/nagare")]
        etcd_prefix: String,
        /// Address to serve JobService on.
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: String,
        /// Where jobs' checkpoints go (`<url>/<job id>`): a directory every worker sees, s3:// or gs://.
        #[arg(long, env = "NAGARE_CHECKPOINT_URL")]
        checkpoint_url: String,
        /// Bearer token clients must send.
        #[arg(long, env = "NAGARE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// TLS certificate chain (PEM) for the API.
        #[arg(long, env = "NAGARE_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// TLS private key (PEM) for the API.
        #[arg(long, env = "NAGARE_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Serve the API without TLS and/or without a token (local use only).
        #[arg(long)]
        insecure: bool,
        /// This coordinator's name in the election (default: its address).
        #[arg(long)]
        id: Option<String>,
        /// CA certificate (PEM) of the workers' certificates: needed when workers serve TLS; the coordinator then
        /// presents its --tls-cert to them (mTLS).
        #[arg(long, env = "NAGARE_CLUSTER_CA")]
        cluster_ca: Option<PathBuf>,
        /// When a worker with nothing to do joins, move running jobs that would spread over more workers onto it
        /// (each is stopped with a checkpoint and placed again).
        #[arg(long)]
        rebalance: bool,
    },
    /// Runs a worker: registers in etcd and runs the jobs the leading coordinator gives it.
    Worker {
        /// etcd endpoints (comma-separated).
        #[arg(long, env = "NAGARE_ETCD")]
        etcd: String,
        /// Key prefix of this cluster in etcd (several clusters can share one etcd).
        #[arg(long, env = "NAGARE_ETCD_PREFIX", default_value = "/nagare")]
        etcd_prefix: String,
        /// Address to serve WorkerService on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Subtasks this worker runs at once.
        #[arg(long, default_value_t = 4)]
        slots: u32,
        /// Seconds its registration outlives its last renewal: a lost worker's jobs restart elsewhere after this,
        /// and an etcd outage shorter than this does not disturb its jobs.
        #[arg(long, default_value_t = nagare_worker::LEASE_TTL)]
        lease_ttl: i64,
        /// Serve the counters of this worker's jobs in Prometheus format here (e.g. 127.0.0.1:9464).
        #[arg(long)]
        metrics_addr: Option<String>,
        /// This worker's id (default: host and port).
        #[arg(long)]
        id: Option<String>,
        /// TLS certificate (PEM) the worker serves WorkerService and job data with, and presents to other workers.
        #[arg(long, env = "NAGARE_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// TLS private key (PEM).
        #[arg(long, env = "NAGARE_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// CA certificate (PEM) of the cluster: clients (the coordinator, other workers) must present a certificate
        /// it signed (mTLS), and other workers are verified with it.
        #[arg(long, env = "NAGARE_CLUSTER_CA")]
        cluster_ca: Option<PathBuf>,
        /// Serve without TLS (local use only).
        #[arg(long)]
        insecure: bool,
        /// The host:port the coordinator and other workers reach this worker at (default: the bound --listen
        /// address; set it when listening on 0.0.0.0). A TLS certificate must name this host.
        #[arg(long, env = "NAGARE_ADVERTISE")]
        advertise: Option<String>,
    },
    /// Submits a pipeline as a job; prints its id.
    Submit {
        /// The pipeline's SQL file.
        file: PathBuf,
        /// The job's name.
        #[arg(long)]
        name: Option<String>,
        /// Subtasks per parallel operator.
        #[arg(long, short = 'p', default_value_t = 0)]
        parallelism: u32,
        /// Pipeline settings (repeatable KEY=VALUE).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        settings: Vec<String>,
        /// Values for ${NAME} (repeatable NAME=VALUE).
        #[arg(long = "var", value_name = "NAME=VALUE")]
        vars: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Checks a pipeline on the coordinator without running it; prints its plan, or the problem with
    /// `file:line:column`.
    Validate {
        /// The pipeline's SQL file.
        file: PathBuf,
        /// Values for ${NAME} (repeatable NAME=VALUE).
        #[arg(long = "var", value_name = "NAME=VALUE")]
        vars: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Lists jobs.
    Jobs {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Shows a job (`--json` for every field; `--watch` prints it again at each change until it ends).
    Status {
        job: String,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stops a job, by default with a final checkpoint.
    Stop {
        job: String,
        /// Stop at once, without a final checkpoint.
        #[arg(long)]
        immediate: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Changes a job's parallelism: it stops with a checkpoint and restarts from it with its keyed state split or
    /// merged by key group.
    Rescale {
        job: String,
        /// The new parallelism (1 to the pipeline's max_parallelism).
        parallelism: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Lists live workers and their free slots.
    Workers {
        #[command(flatten)]
        client: ClientArgs,
    },
}

type JobClient = pb::job_service_client::JobServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>,
>;

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

async fn client(args: &ClientArgs) -> Result<JobClient> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(args.coordinator.clone())
        .with_context(|| format!("coordinator address '{}'", args.coordinator))?;
    if args.coordinator.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = &args.ca_cert {
            let pem = std::fs::read(ca).with_context(|| format!("reading --ca-cert {}", ca.display()))?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls).context("TLS configuration")?;
    }
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("connecting to the coordinator at {}", args.coordinator))?;
    let token = args
        .token
        .as_ref()
        .map(|t| format!("Bearer {t}").parse())
        .transpose()
        .map_err(|_| anyhow!("the token has characters a header cannot carry"))?;
    Ok(pb::job_service_client::JobServiceClient::with_interceptor(channel, BearerToken(token)))
}

fn status_error(e: tonic::Status) -> anyhow::Error {
    anyhow!("{} ({:?})", e.message(), e.code())
}

fn pairs(list: &[String], what: &str) -> Result<HashMap<String, String>> {
    Ok(crate::parse_pairs(list, what)?.into_iter().collect())
}

fn state_name(state: i32) -> String {
    pb::JobState::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("JOB_STATE_").to_lowercase())
        .unwrap_or_else(|_| state.to_string())
}

/// A TLS identity from `--tls-cert` and `--tls-key`.
fn identity(cert: Option<&Path>, key: Option<&Path>) -> Result<Option<tonic::transport::Identity>> {
    let (Some(c), Some(k)) = (cert, key) else { return Ok(None) };
    Ok(Some(tonic::transport::Identity::from_pem(
        std::fs::read(c).with_context(|| format!("reading --tls-cert {}", c.display()))?,
        std::fs::read(k).with_context(|| format!("reading --tls-key {}", k.display()))?,
    )))
}

/// How to reach TLS workers: trusting the cluster CA, presenting `identity` (mTLS) when there is one.
fn client_tls(
    ca: Option<&Path>,
    identity: Option<tonic::transport::Identity>,
) -> Result<Option<tonic::transport::ClientTlsConfig>> {
    let Some(ca) = ca else { return Ok(None) };
    let pem = std::fs::read(ca).with_context(|| format!("reading --cluster-ca {}", ca.display()))?;
    let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(pem));
    Ok(Some(match identity {
        Some(i) => tls.identity(i),
        None => tls,
    }))
}

/// Runs a cluster command.
pub async fn dispatch(cmd: ClusterCommand) -> Result<()> {
    match cmd {
        ClusterCommand::Coordinator {
            etcd,
            etcd_prefix,
            listen,
            checkpoint_url,
            token,
            tls_cert,
            tls_key,
            insecure,
            id,
            cluster_ca,
            rebalance,
        } => {
            if (token.is_none() || tls_cert.is_none()) && !insecure {
                bail!(
                    "the coordinator's API needs TLS (--tls-cert and --tls-key) and a bearer token (--token or \
                     NAGARE_TOKEN); --insecure serves it without, for local use"
                );
            }
            let identity = identity(tls_cert.as_deref(), tls_key.as_deref())?;
            let tls = identity.clone().map(|i| tonic::transport::ServerTlsConfig::new().identity(i));
            let workers =
                nagare_coordinator::scheduler::GrpcWorkers::with_tls(client_tls(cluster_ca.as_deref(), identity)?);
            let store = connect_etcd(&etcd, &etcd_prefix).await?;
            let policy = nagare_coordinator::scheduler::Policy { rebalance, ..Default::default() };
            coordinator(
                store,
                &listen,
                &checkpoint_url,
                token,
                tls,
                id,
                Scheduling { policy, workers: Arc::new(workers) },
            )
            .await
        }
        ClusterCommand::Worker {
            etcd,
            etcd_prefix,
            listen,
            slots,
            lease_ttl,
            metrics_addr,
            id,
            tls_cert,
            tls_key,
            cluster_ca,
            insecure,
            advertise,
        } => {
            if (tls_cert.is_none() || cluster_ca.is_none()) && !insecure {
                bail!(
                    "a worker needs TLS (--tls-cert, --tls-key) and the cluster CA (--cluster-ca) for mutual TLS with \
                     the coordinator and other workers; --insecure serves it in plaintext, for local use"
                );
            }
            let identity = identity(tls_cert.as_deref(), tls_key.as_deref())?;
            let ca = match &cluster_ca {
                Some(p) => Some(tonic::transport::Certificate::from_pem(
                    std::fs::read(p).with_context(|| format!("reading --cluster-ca {}", p.display()))?,
                )),
                None => None,
            };
            let server_tls = identity.clone().map(|i| {
                let tls = tonic::transport::ServerTlsConfig::new().identity(i);
                match &ca {
                    Some(ca) => tls.client_ca_root(ca.clone()),
                    None => tls,
                }
            });
            let exchange = match client_tls(cluster_ca.as_deref(), identity)? {
                Some(tls) => nagare_exchange::Exchange::with_tls(tls),
                None => nagare_exchange::Exchange::new(),
            };
            let store = connect_etcd(&etcd, &etcd_prefix).await?;
            let worker = nagare_worker::Worker::new(exchange, nagare_cli::registry());
            let tls = WorkerServing { server: server_tls, advertise };
            run_worker(store, &listen, slots, lease_ttl, metrics_addr, id, worker, tls).await
        }
        ClusterCommand::Validate { file, vars, client: args } => {
            let sql = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let r = client(&args)
                .await?
                .validate_pipeline(pb::ValidatePipelineRequest { sql, variables: pairs(&vars, "--var")? })
                .await
                .map_err(status_error)?
                .into_inner();
            if r.valid {
                print!("{}", r.plan);
                return Ok(());
            }
            for d in &r.diagnostics {
                if d.line > 0 {
                    eprintln!("{}:{}:{}: {}", file.display(), d.line, d.column, d.message);
                } else {
                    eprintln!("{}: {}", file.display(), d.message);
                }
            }
            bail!("{} is not a valid pipeline", file.display())
        }
        ClusterCommand::Submit { file, name, parallelism, settings, vars, client: args } => {
            let sql = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let name = name
                .unwrap_or_else(|| file.file_stem().map_or("pipeline".into(), |s| s.to_string_lossy().into_owned()));
            let job = client(&args)
                .await?
                .submit_pipeline(pb::SubmitPipelineRequest {
                    sql,
                    name,
                    parallelism,
                    settings: pairs(&settings, "--set")?,
                    variables: pairs(&vars, "--var")?,
                })
                .await
                .map_err(|e| match e.code() {
                    tonic::Code::InvalidArgument => anyhow!("{}:{}", file.display(), e.message()),
                    _ => status_error(e),
                })?
                .into_inner();
            println!("{}", job.id);
            Ok(())
        }
        ClusterCommand::Jobs { client: args } => {
            let jobs = client(&args).await?.list_jobs(pb::ListJobsRequest {}).await.map_err(status_error)?.into_inner();
            println!(
                "{:<10} {:<20} {:<11} {:>4} {:>8} {:>12} {:>12}  worker",
                "id", "name", "state", "par", "attempt", "rows in", "rows out"
            );
            for j in jobs.jobs {
                println!(
                    "{:<10} {:<20} {:<11} {:>4} {:>8} {:>12} {:>12}  {}",
                    j.id,
                    j.name,
                    state_name(j.state),
                    j.parallelism,
                    j.attempt,
                    j.rows_in,
                    j.rows_out,
                    j.workers.join(",")
                );
            }
            Ok(())
        }
        ClusterCommand::Status { job, json, watch: true, client: args } => {
            let mut stream =
                client(&args).await?.watch_job(pb::GetJobRequest { id: job }).await.map_err(status_error)?.into_inner();
            while let Some(j) = stream.message().await.map_err(status_error)? {
                print_job(&j, json);
            }
            Ok(())
        }
        ClusterCommand::Status { job, json, watch: false, client: args } => {
            let j =
                client(&args).await?.get_job(pb::GetJobRequest { id: job }).await.map_err(status_error)?.into_inner();
            print_job(&j, json);
            Ok(())
        }
        ClusterCommand::Stop { job, immediate, client: args } => {
            let mode = if immediate { pb::StopMode::Immediate } else { pb::StopMode::Checkpoint };
            let j = client(&args)
                .await?
                .stop_job(pb::StopJobRequest { id: job, mode: mode as i32 })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("job {}: {}", j.id, state_name(j.state));
            Ok(())
        }
        ClusterCommand::Rescale { job, parallelism, client: args } => {
            let j = client(&args)
                .await?
                .rescale_job(pb::RescaleJobRequest { id: job, parallelism })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("job {}: {} (to parallelism {parallelism})", j.id, state_name(j.state));
            Ok(())
        }
        ClusterCommand::Workers { client: args } => {
            let ws =
                client(&args).await?.list_workers(pb::ListWorkersRequest {}).await.map_err(status_error)?.into_inner();
            println!("{:<24} {:<28} {:>5} {:>5}  jobs", "id", "address", "slots", "free");
            for w in ws.workers {
                println!("{:<24} {:<28} {:>5} {:>5}  {}", w.id, w.address, w.slots, w.free_slots, w.jobs.join(","));
            }
            Ok(())
        }
    }
}

async fn connect_etcd(etcd: &str, prefix: &str) -> Result<EtcdStore> {
    EtcdStore::connect(etcd, prefix).await.with_context(|| format!("connecting to etcd at {etcd}"))
}

/// Binds `--listen` (port 0: any free port) and says where it ended up.
async fn bind(listen: &str) -> Result<(tokio::net::TcpListener, std::net::SocketAddr)> {
    let addr: std::net::SocketAddr = listen.parse().with_context(|| format!("--listen '{listen}'"))?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Resolves on Ctrl-C, after cancelling `stop`.
async fn until_ctrl_c(stop: CancellationToken) {
    let _ = tokio::signal::ctrl_c().await;
    stop.cancel();
}

fn rfc3339_ms(ms: i64) -> String {
    // A finished input's final watermark is the largest µs value (as ms, i64::MAX / 1000): no instant to print.
    if ms >= i64::MAX / 1000 {
        return "end of input".into();
    }
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

fn print_job(j: &pb::Job, json: bool) {
    if json {
        let v = serde_json::json!({
            "id": j.id, "name": j.name, "state": state_name(j.state), "parallelism": j.parallelism,
            "workers": j.workers, "attempt": j.attempt, "rows_in": j.rows_in, "rows_out": j.rows_out,
            "last_checkpoint": j.last_checkpoint, "last_error": j.last_error,
            "checkpoint_url": j.checkpoint_url,
            "last_checkpoint_duration_ms": j.last_checkpoint_duration_ms,
            "last_checkpoint_bytes": j.last_checkpoint_bytes,
            "operators": j.operators.iter().map(|o| serde_json::json!({
                "id": o.id, "label": o.label, "parallelism": o.parallelism, "workers": o.workers,
                "rows_in": o.rows_in, "rows_out": o.rows_out, "bytes": o.bytes, "backpressure_ms": o.backpressure_ms,
                "watermark": o.watermark_ms.map(rfc3339_ms), "state_entries": o.state_entries,
                "late_rows": o.late_rows, "duplicates": o.duplicates, "bad_records": o.bad_records,
                "late_kept": o.late_kept, "streams_created": o.streams_created,
                "connector": o.connector.iter().map(|c| (c.name.clone(), serde_json::json!(c.value))).collect::<serde_json::Map<_, _>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
        return;
    }
    println!("job {} ({}): {}", j.id, j.name, state_name(j.state));
    println!("  workers: {}  attempt: {}  parallelism: {}", j.workers.join(","), j.attempt, j.parallelism);
    println!(
        "  rows in: {}  rows out: {}  last checkpoint: {} ({} ms, {} bytes)",
        j.rows_in, j.rows_out, j.last_checkpoint, j.last_checkpoint_duration_ms, j.last_checkpoint_bytes
    );
    println!("  checkpoints: {}", j.checkpoint_url);
    if !j.last_error.is_empty() {
        println!("  last error: {}", j.last_error);
    }
    println!(
        "  {:<48} {:>3} {:>11} {:>11} {:>10} {:>9}  {:<24} workers",
        "operator", "x", "rows in", "rows out", "state", "backpr.", "watermark"
    );
    for o in &j.operators {
        println!(
            "  {:<48} {:>3} {:>11} {:>11} {:>10} {:>7}ms  {:<24} {}",
            format!("[{}] {}", o.id, o.label),
            o.parallelism,
            o.rows_in,
            o.rows_out,
            o.state_entries,
            o.backpressure_ms,
            o.watermark_ms.map(rfc3339_ms).unwrap_or_else(|| "-".into()),
            o.workers.join(",")
        );
    }
    for o in j.operators.iter().filter(|o| !o.connector.is_empty()) {
        let figures = o.connector.iter().map(|c| (c.name.as_str(), c.label.as_str(), c.value));
        println!("  [{}] {}", o.id, nagare_engine::metrics::figures_text(figures));
    }
    for o in j.operators.iter().filter(|o| o.late_kept > 0) {
        println!("  [{}] kept {} rows that arrived behind the watermark as first occurrences", o.id, o.late_kept);
    }
    for o in j.operators.iter().filter(|o| o.streams_created > 0) {
        println!(
            "  [{}] write streams created this attempt: {} (BigQuery allows 10,000 CreateWriteStream calls per project \
             and region per hour)",
            o.id, o.streams_created
        );
    }
    let late: u64 = j.operators.iter().map(|o| o.late_rows).sum();
    if let Some(advice) = crate::progress::late_rows_advice(late, None) {
        println!("  {advice}");
    }
}

/// How the leader schedules, and how it reaches workers.
struct Scheduling {
    policy: nagare_coordinator::scheduler::Policy,
    workers: Arc<dyn nagare_coordinator::scheduler::Workers>,
}

async fn coordinator(
    store: EtcdStore,
    listen: &str,
    checkpoint_url: &str,
    token: Option<String>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    id: Option<String>,
    scheduling: Scheduling,
) -> Result<()> {
    let (listener, local) = bind(listen).await?;
    let id = id.unwrap_or_else(|| format!("coordinator-{local}"));
    let jobs = nagare_coordinator::service::Jobs::new(Arc::new(store.clone()), nagare_cli::registry(), checkpoint_url);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(nagare_rpc::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("reflection service")?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<pb::job_service_server::JobServiceServer<nagare_coordinator::service::Jobs>>().await;
    let stop = CancellationToken::new();
    let leading = tokio::spawn(nagare_coordinator::leader::run(
        store,
        id.clone(),
        nagare_coordinator::leader::Scheduling {
            workers: scheduling.workers,
            period: Duration::from_millis(500),
            policy: scheduling.policy,
        },
        stop.clone(),
    ));
    let scheme = if tls.is_some() { "https" } else { "http" };
    eprintln!("coordinator {id} serving JobService on {scheme}://{local}");
    let service = pb::job_service_server::JobServiceServer::with_interceptor(
        jobs,
        nagare_coordinator::service::bearer_check(token),
    );
    let shutdown = stop.clone();
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls).context("TLS configuration")?;
    }
    server
        .add_service(service)
        .add_service(reflection)
        .add_service(health)
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), until_ctrl_c(shutdown))
        .await
        .context("serving JobService")?;
    stop.cancel();
    let _ = leading.await;
    Ok(())
}

/// How a worker serves and where it says it can be reached.
struct WorkerServing {
    server: Option<tonic::transport::ServerTlsConfig>,
    /// host:port to register instead of the bound address.
    advertise: Option<String>,
}

#[allow(clippy::too_many_arguments)]
async fn run_worker(
    store: EtcdStore,
    listen: &str,
    slots: u32,
    lease_ttl: i64,
    metrics_addr: Option<String>,
    id: Option<String>,
    worker: nagare_worker::Worker,
    tls: WorkerServing,
) -> Result<()> {
    let (listener, local) = bind(listen).await?;
    let scheme = if tls.server.is_some() { "https" } else { "http" };
    let record = nagare_coordinator::model::WorkerRecord {
        id: id.unwrap_or_else(|| format!("worker-{local}")),
        address: format!("{scheme}://{}", tls.advertise.clone().unwrap_or_else(|| local.to_string())),
        slots,
    };
    eprintln!("worker {} serving WorkerService on {} with {slots} slots", record.id, record.address);
    if let Some(addr) = metrics_addr {
        let w = worker.clone();
        crate::progress::serve_metrics(&addr, move || w.prometheus()).await?;
    }
    let stop = CancellationToken::new();
    let registration = {
        let (w, stop) = (worker.clone(), stop.clone());
        tokio::spawn(nagare_worker::keep_registered(store, record, lease_ttl, stop, w))
    };
    let shutdown = stop.clone();
    // Wide HTTP/2 windows: job data between workers streams through this server.
    let mut server = tonic::transport::Server::builder();
    if let Some(t) = tls.server {
        server = server.tls_config(t).context("worker TLS")?;
    }
    server
        .tcp_nodelay(true)
        .initial_stream_window_size(nagare_exchange::STREAM_WINDOW)
        .initial_connection_window_size(nagare_exchange::CONNECTION_WINDOW)
        .add_service(worker.flight_service())
        .add_service(pb::worker_service_server::WorkerServiceServer::new(worker))
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), until_ctrl_c(shutdown))
        .await
        .context("serving WorkerService")?;
    stop.cancel();
    let _ = registration.await;
    Ok(())
}
