//! The SQS source subtask.
//!
//! - `receivers` tasks long-poll `ReceiveMessage`, each only when the hand-over channel to the source has room: a
//!   backpressured pipeline stops receiving instead of buffering.
//! - Every received message is *held* (tracked by receipt handle) until it is deleted; a keeper task extends the
//!   visibility of held messages once half their visibility timeout has passed, so none reappears while its
//!   checkpoint is pending.
//! - With checkpoints, messages whose rows were handed downstream before checkpoint *n*'s barrier are deleted
//!   (`DeleteMessageBatch`) in `notify_checkpoint_complete(n)`, never before. After a crash the undeleted ones come
//!   back and the pipeline's checkpointed dedup drops what was already committed.
//! - A job without checkpoints is refused: nothing would say when a message's rows are written (`nagare run`
//!   without `--checkpoint-dir` keeps checkpoints in memory for this: at least once across a crash).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Int64Array, RecordBatch, RecordBatchOptions, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{Schema, SchemaRef};
use async_trait::async_trait;
use futures::StreamExt;
use nagare_core::CheckpointId;
use nagare_core::backoff::Backoff;
use nagare_engine::EngineError;
use nagare_engine::connector::{Source, SourceContext, SourceEvent};
use nagare_engine::metrics::{ConnectorMetrics, NodeMetrics, Sample, SampleKind};
use nagare_sql::SourceSpec;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::client::{Message, SqsClient, SqsError};
use super::envelope::unwrap_into;
use super::{BadRecordPolicy, SqsConfig};
use crate::decode::{BadRecords, BlockDecoder, TextFormat};

/// Receipt handles kept in a checkpoint position (re-deleted after a restore); the rest come back and are dropped by
/// the dedup. Bounded so positions stay small in the metadata store.
const MAX_POSITION_HANDLES: usize = 256;

/// Concurrent delete / visibility calls per subtask.
const CALLS_IN_FLIGHT: usize = 8;

/// Receipt handles of messages to delete.
type Handles = Vec<Arc<str>>;

/// A metadata column of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Meta {
    MessageId,
    SentTime,
    ReceiveCount,
}

/// A message the source holds (received, not yet deleted).
#[derive(Debug, Clone, Copy)]
struct Held {
    /// When it was sent (ms since the epoch), else received.
    since_ms: i64,
    /// Until when it is hidden, as far as we know.
    hidden_until: Instant,
}

/// Counters of one subtask, shared with its background tasks and the metrics endpoint.
#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    deleted: AtomicU64,
    delete_errors: AtomicU64,
    extensions: AtomicU64,
    receive_errors: AtomicU64,
    returned: AtomicU64,
}

/// What the subtask shares with its background tasks.
#[derive(Debug, Default)]
struct Shared {
    held: Mutex<HashMap<Arc<str>, Held>>,
    counters: Counters,
}

impl Shared {
    fn hold(&self, messages: &[Message], visibility: Duration) {
        let now = Instant::now();
        let now_ms = chrono::Utc::now().timestamp_millis();
        if let Ok(mut held) = self.held.lock() {
            for m in messages {
                let since_ms = m.sent_ms().unwrap_or(now_ms);
                held.insert(m.receipt_handle.as_str().into(), Held { since_ms, hidden_until: now + visibility });
            }
        }
    }

    fn release<'a>(&self, handles: impl Iterator<Item = &'a Arc<str>>) {
        if let Ok(mut held) = self.held.lock() {
            for h in handles {
                held.remove(h);
            }
        }
    }
}

impl ConnectorMetrics for Shared {
    fn samples(&self) -> Vec<Sample> {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let (in_flight, oldest_ms) = match self.held.lock() {
            Ok(h) => (h.len(), h.values().map(|v| v.since_ms).min()),
            Err(_) => (0, None),
        };
        let age = oldest_ms.map_or(0.0, |ms| (chrono::Utc::now().timestamp_millis() - ms).max(0) as f64 / 1000.0);
        let counter = |name, help, label, value| Sample { name, help, label, kind: SampleKind::Counter, value };
        vec![
            counter("nagare_sqs_messages_received_total", "SQS messages received.", "sqs received", get(&c.received)),
            counter(
                "nagare_sqs_messages_deleted_total",
                "SQS messages deleted after their checkpoint.",
                "deleted",
                get(&c.deleted),
            ),
            Sample {
                name: "nagare_sqs_messages_in_flight",
                help: "SQS messages received and not yet deleted.",
                label: "in flight",
                kind: SampleKind::Gauge,
                value: in_flight as f64,
            },
            Sample {
                name: "nagare_sqs_oldest_undeleted_message_age_seconds",
                help: "Age (since sent) of the oldest SQS message not yet deleted.",
                label: "oldest",
                kind: SampleKind::MaxGauge,
                value: age,
            },
            counter(
                "nagare_sqs_visibility_extensions_total",
                "SQS visibility extensions of held messages.",
                "extensions",
                get(&c.extensions),
            ),
            counter(
                "nagare_sqs_receive_errors_total",
                "SQS receive calls that failed and were retried.",
                "receive errors",
                get(&c.receive_errors),
            ),
            counter(
                "nagare_sqs_messages_returned_total",
                "SQS messages received but not handed downstream when the job stopped, made visible again at once.",
                "returned",
                get(&c.returned),
            ),
            counter(
                "nagare_sqs_delete_errors_total",
                "SQS messages whose delete failed (they reappear).",
                "delete errors",
                get(&c.delete_errors),
            ),
        ]
    }
}

/// A checkpoint position: some handles of messages covered by the checkpoint and not yet deleted.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Position {
    handles: Vec<String>,
}

/// One subtask of an SQS source.
pub struct SqsSource {
    cfg: SqsConfig,
    client: SqsClient,
    ctx: SourceContext,
    schema: SchemaRef,
    /// Where each output column comes from: the decoded body (its index there) or the message.
    columns: Vec<Result<usize, Meta>>,
    body_schema: SchemaRef,
    decoder: BlockDecoder,
    policy: BadRecords,
    origin: String,
    shared: Arc<Shared>,
    rx: Option<mpsc::Receiver<Result<Vec<Message>, SqsError>>>,
    /// The receivers, then the visibility keeper.
    background: Vec<JoinHandle<()>>,
    /// Tells the receivers to stop after the receive in progress.
    halt: tokio_util::sync::CancellationToken,
    /// Handles of messages handed downstream since the last checkpoint barrier.
    emitted: Vec<Arc<str>>,
    /// Handles by the checkpoint that covers them, until it completes.
    pending: BTreeMap<CheckpointId, Vec<Arc<str>>>,
    /// The deleter: completed checkpoints' handles go to it, so a slow SQS delays deletes, not checkpoints.
    deleter: Option<(mpsc::UnboundedSender<Handles>, JoinHandle<()>)>,
    /// Handles of the restored checkpoint, deleted when the subtask starts.
    restored: Vec<String>,
    block: Vec<u8>,
}

impl SqsSource {
    /// Subtask `ctx.subtask` of a source reading `cfg`'s queue into `schema` (the projected columns of `spec`).
    pub fn new(spec: &SourceSpec, cfg: &SqsConfig, schema: SchemaRef, ctx: SourceContext) -> Result<Self, EngineError> {
        let origin = format!("source {}", spec.table.name);
        if !ctx.checkpoints {
            return Err(EngineError::Config(format!(
                "{origin}: the sqs source needs checkpoints (a message is deleted once the checkpoint covering its \
                 rows completes); give the job a checkpoint store"
            )));
        }
        let policy: BadRecords = cfg.bad_records.into();
        if cfg.bad_records == BadRecordPolicy::DeadLetter && ctx.dead_letter.is_none() {
            return Err(EngineError::Config(format!(
                "{origin}: bad_records = 'dead_letter' needs a directory: set the table option dead_letter_path or SET dead_letter_path"
            )));
        }
        let mut body_fields = Vec::new();
        let mut columns = Vec::new();
        for f in schema.fields() {
            columns.push(match f.name().as_str() {
                "_message_id" => Err(Meta::MessageId),
                "_sent_time" => Err(Meta::SentTime),
                "_receive_count" => Err(Meta::ReceiveCount),
                _ => {
                    body_fields.push(f.clone());
                    Ok(body_fields.len() - 1)
                }
            });
        }
        let body_schema = Arc::new(Schema::new(body_fields));
        // The decoder only ever decodes all or nothing (`try_decode`); bad records are attributed to messages here.
        let decoder = BlockDecoder::new(
            TextFormat::Json,
            body_schema.clone(),
            body_schema.clone(),
            vec![],
            BadRecords::Fail,
            None,
            ctx.metrics.clone(),
            origin.clone(),
        )?;
        let client = SqsClient::new(cfg)?;
        let shared = Arc::new(Shared::default());
        ctx.metrics.register_connector(shared.clone());
        Ok(SqsSource {
            cfg: cfg.clone(),
            client,
            ctx,
            schema,
            columns,
            body_schema,
            decoder,
            policy,
            origin,
            shared,
            rx: None,
            background: Vec::new(),
            halt: tokio_util::sync::CancellationToken::new(),
            emitted: Vec::new(),
            pending: BTreeMap::new(),
            deleter: None,
            restored: Vec::new(),
            block: Vec::new(),
        })
    }

    /// Resumes after a restore: the checkpoint's messages are committed, so those still listed are deleted at start
    /// (a crash between the checkpoint's completion and its deletes leaves them). Everything else undeleted comes
    /// back from the queue by itself.
    pub fn restore(&mut self, mine: &[&serde_json::Value]) -> Result<(), EngineError> {
        for p in mine {
            let p: Position = serde_json::from_value((*p).clone())
                .map_err(|e| EngineError::Config(format!("checkpoint position of an SQS source is not valid: {e}")))?;
            self.restored.extend(p.handles);
        }
        Ok(())
    }

    /// Starts the receivers and the visibility keeper.
    fn start(&mut self) {
        let (tx, rx) = mpsc::channel(self.cfg.receivers * 2);
        for _ in 0..self.cfg.receivers {
            let (client, shared, cfg, stop, tx) =
                (self.client.clone(), self.shared.clone(), self.cfg.clone(), self.ctx.stop.clone(), tx.clone());
            self.background.push(tokio::spawn(receive_loop(client, shared, cfg, stop, self.halt.clone(), tx)));
        }
        let (client, shared, vis) = (self.client.clone(), self.shared.clone(), self.cfg.visibility_timeout);
        self.background.push(tokio::spawn(keep_hidden(client, shared, vis)));
        self.rx = Some(rx);
        self.delete_restored();
    }

    /// Ends the receivers (each after the receive in progress, which may hand out messages that are then ours to
    /// give back) and the visibility keeper; messages they received stay held. Waiting for a receive in progress
    /// pays only when its messages would stay hidden longer than it lasts, so the wait is up to the long poll plus
    /// 10 s when the visibility timeout is longer than that, else 1 s; a receiver still out after the wait gives its
    /// messages back itself when its answer comes.
    async fn stop_receiving(&mut self) {
        self.halt.cancel();
        let deadline = tokio::time::Instant::now() + receive_grace(&self.cfg);
        // `start` pushed the receivers, then the keeper.
        let mut receivers = std::mem::take(&mut self.background);
        let keeper = receivers.pop();
        for t in &mut receivers {
            let _ = tokio::time::timeout_at(deadline, t).await;
        }
        if let Some(keeper) = keeper {
            keeper.abort();
        }
        self.rx = None;
    }

    /// Makes the messages still held (received after the final barrier, never handed downstream) visible again at
    /// once, instead of hidden until their visibility timeout: after a stop or a rescale the next run, or another
    /// consumer, gets them straight away. One that fails reappears after its timeout as it would have.
    async fn return_unread(&mut self) {
        let held: Vec<Arc<str>> = match self.shared.held.lock() {
            Ok(held) => held.keys().cloned().collect(),
            Err(_) => return,
        };
        give_back(&self.client, &self.shared, held).await;
        let returned = self.shared.counters.returned.load(Ordering::Relaxed);
        tracing::info!(returned, queue = %self.cfg.queue_url, "returned messages not handed downstream to the queue");
    }

    /// Hands the restored checkpoint's handles to the deleter (once).
    fn delete_restored(&mut self) {
        let restored: Vec<Arc<str>> = self.restored.drain(..).map(Arc::from).collect();
        if !restored.is_empty() {
            tracing::info!(messages = restored.len(), queue = %self.cfg.queue_url, "deleting messages of the restored checkpoint");
            self.delete(restored);
        }
    }

    /// Queues handles for deletion, starting the deleter on first use.
    fn delete(&mut self, handles: Vec<Arc<str>>) {
        let (client, shared) = (self.client.clone(), self.shared.clone());
        let (tx, _) = self.deleter.get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            (tx, tokio::spawn(delete_in_order(client, shared, rx)))
        });
        // The deleter ends only when its sender is dropped, so this send cannot fail while we hold it.
        let _ = tx.send(handles);
    }

    /// A malformed message: fail, dead-letter or skip it, per `bad_records`.
    fn bad(&self, m: &Message, reason: &str) -> Result<(), EngineError> {
        NodeMetrics::add(&self.ctx.metrics.bad_records, 1);
        let location = format!("SQS message {}", m.message_id);
        match self.policy {
            BadRecords::Fail => Err(EngineError::BadRecord {
                location: format!("{location} of {}", self.cfg.queue_url),
                reason: format!("{reason} (set bad_records = 'dead_letter' or 'skip' to continue past bad messages)"),
            }),
            BadRecords::DeadLetter => match &self.ctx.dead_letter {
                Some(dl) => dl.write_raw(&self.origin, &location, reason, &m.body),
                None => Ok(()),
            },
            BadRecords::Skip => {
                tracing::debug!(%location, %reason, "skipping bad message");
                Ok(())
            }
        }
    }

    /// Decodes `messages` into one batch of the output schema (None when none of them holds a good record); public
    /// so that the decoding path can be measured without a queue (`nagare bench sqs`).
    pub fn decode(&mut self, messages: &[Message]) -> Result<Option<RecordBatch>, EngineError> {
        let mut block = std::mem::take(&mut self.block);
        block.clear();
        // Per message: rows it gives, and where its lines are in the block.
        let mut rows = Vec::with_capacity(messages.len());
        let mut spans = Vec::with_capacity(messages.len());
        for m in messages {
            let start = block.len();
            match unwrap_into(self.cfg.envelope, self.cfg.format, &m.body, &mut block) {
                Ok(n) => rows.push(n),
                Err(reason) => {
                    block.truncate(start);
                    self.bad(m, &reason)?;
                    rows.push(0);
                }
            }
            spans.push(start..block.len());
        }
        let total: usize = rows.iter().sum();
        let body = match self.decode_body(&block, total)? {
            Some(b) => Some(b),
            None if total == 0 => None,
            None => {
                // Some message has a record that does not fit the columns: find which, one message at a time.
                let mut parts = Vec::new();
                for (i, m) in messages.iter().enumerate() {
                    if rows[i] == 0 {
                        continue;
                    }
                    match self.decoder.try_decode(&block[spans[i].clone()]) {
                        Ok(Some(b)) if b.num_rows() == rows[i] => parts.push(b),
                        Ok(_) => {
                            rows[i] = 0;
                            self.bad(m, "a record of the body is not a JSON object")?;
                        }
                        Err(e) => {
                            rows[i] = 0;
                            let reason = match e {
                                EngineError::BadRecord { reason, .. } => reason,
                                other => other.to_string(),
                            };
                            self.bad(m, &reason)?;
                        }
                    }
                }
                if parts.is_empty() { None } else { Some(arrow::compute::concat_batches(&self.body_schema, &parts)?) }
            }
        };
        self.block = block;
        let Some(body) = body else { return Ok(None) };
        Ok(Some(self.assemble(body, messages, &rows)?))
    }

    /// The whole block at once, when every record decodes (the common case).
    fn decode_body(&mut self, block: &[u8], total: usize) -> Result<Option<RecordBatch>, EngineError> {
        if total == 0 {
            return Ok(None);
        }
        if self.body_schema.fields().is_empty() {
            return Ok(Some(RecordBatch::try_new_with_options(
                self.body_schema.clone(),
                vec![],
                &RecordBatchOptions::new().with_row_count(Some(total)),
            )?));
        }
        match self.decoder.try_decode(block) {
            Ok(Some(b)) if b.num_rows() == total => Ok(Some(b)),
            _ => Ok(None),
        }
    }

    /// The output batch: body columns, and metadata columns repeated over each message's rows.
    fn assemble(&self, body: RecordBatch, messages: &[Message], rows: &[usize]) -> Result<RecordBatch, EngineError> {
        let n = body.num_rows();
        let repeat = |f: &dyn Fn(&Message) -> Option<ArrayValue>| -> Vec<Option<ArrayValue>> {
            let mut out = Vec::with_capacity(n);
            for (m, r) in messages.iter().zip(rows) {
                for _ in 0..*r {
                    out.push(f(m));
                }
            }
            out
        };
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(self.columns.len());
        for (field, source) in self.schema.fields().iter().zip(&self.columns) {
            let col: ArrayRef = match source {
                Ok(i) => body.column(*i).clone(),
                Err(Meta::MessageId) => {
                    let v = repeat(&|m| Some(ArrayValue::Text(m.message_id.clone())));
                    Arc::new(StringArray::from_iter(v.into_iter().map(|x| match x {
                        Some(ArrayValue::Text(t)) => Some(t),
                        _ => None,
                    })))
                }
                Err(Meta::SentTime) => {
                    let v = repeat(&|m| m.sent_ms().map(ArrayValue::Int));
                    Arc::new(TimestampMillisecondArray::from_iter(v.into_iter().map(|x| match x {
                        Some(ArrayValue::Int(t)) => Some(t),
                        _ => None,
                    })))
                }
                Err(Meta::ReceiveCount) => {
                    let v = repeat(&|m| m.receive_count().map(ArrayValue::Int));
                    Arc::new(Int64Array::from_iter(v.into_iter().map(|x| match x {
                        Some(ArrayValue::Int(t)) => Some(t),
                        _ => None,
                    })))
                }
            };
            let col =
                if col.data_type() == field.data_type() { col } else { arrow::compute::cast(&col, field.data_type())? };
            cols.push(col);
        }
        Ok(RecordBatch::try_new_with_options(
            self.schema.clone(),
            cols,
            &RecordBatchOptions::new().with_row_count(Some(n)),
        )?)
    }
}

/// Takes the handles of messages covered by `checkpoint` (and by earlier checkpoints, whose completion may never be
/// notified when a later one completes first).
fn completed(pending: &mut BTreeMap<CheckpointId, Vec<Arc<str>>>, checkpoint: CheckpointId) -> Vec<Arc<str>> {
    let later = pending.split_off(&CheckpointId(checkpoint.0.saturating_add(1)));
    std::mem::replace(pending, later).into_values().flatten().collect()
}

/// A metadata value.
enum ArrayValue {
    Text(String),
    Int(i64),
}

impl Drop for SqsSource {
    fn drop(&mut self) {
        // Receivers and the keeper end with the subtask; the deleter finishes what it was handed (its sender goes
        // with us) and ends.
        for t in &self.background {
            t.abort();
        }
    }
}

/// One receiver: long-polls while the hand-over channel has room, holds what it receives, retries transient
/// errors with backoff (counted), and hands a permanent error to the source, which fails the job.
async fn receive_loop(
    client: SqsClient,
    shared: Arc<Shared>,
    cfg: SqsConfig,
    stop: tokio_util::sync::CancellationToken,
    halt: tokio_util::sync::CancellationToken,
    tx: mpsc::Sender<Result<Vec<Message>, SqsError>>,
) {
    let mut backoff = Backoff::default();
    loop {
        if halt.is_cancelled() {
            return;
        }
        // Backpressure: no receive call without room for its answer.
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            _ = halt.cancelled() => return,
            p = tx.reserve() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        // Never abandoned once sent: SQS may already have handed out messages, which would then stay hidden for
        // their visibility timeout. A stopping job waits for it a while (`stop_receiving`); what it brings after
        // that, the receiver gives back itself.
        let answer = client.receive(cfg.max_messages, cfg.wait_time, cfg.visibility_timeout).await;
        match answer {
            Ok(messages) => {
                backoff.reset();
                if messages.is_empty() {
                    continue;
                }
                shared.counters.received.fetch_add(messages.len() as u64, Ordering::Relaxed);
                if halt.is_cancelled() {
                    // The job stopped while this receive was out and no longer reads: give them back now (this task
                    // outlives the source when the stop did not wait for it).
                    give_back(&client, &shared, messages.into_iter().map(|m| Arc::from(m.receipt_handle)).collect())
                        .await;
                    return;
                }
                shared.hold(&messages, cfg.visibility_timeout);
                permit.send(Ok(messages));
            }
            Err(e) if e.retriable() => {
                shared.counters.receive_errors.fetch_add(1, Ordering::Relaxed);
                let delay = backoff.next_delay().unwrap_or_else(|| {
                    backoff.reset();
                    Duration::from_secs(10)
                });
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "SQS receive failed; retrying");
                drop(permit);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => {
                shared.counters.receive_errors.fetch_add(1, Ordering::Relaxed);
                permit.send(Err(e));
                return;
            }
        }
    }
}

/// How long a stopping source waits for a receive in progress (see `SqsSource::stop_receiving`).
fn receive_grace(cfg: &SqsConfig) -> Duration {
    let longest_receive = cfg.wait_time + Duration::from_secs(10);
    if cfg.visibility_timeout > longest_receive { longest_receive } else { Duration::from_secs(1) }
}

/// Makes `handles` visible again at once (ChangeMessageVisibility 0), counted as returned; one that fails reappears
/// after its visibility timeout.
async fn give_back(client: &SqsClient, shared: &Arc<Shared>, handles: Vec<Arc<str>>) {
    if handles.is_empty() {
        return;
    }
    let chunks: Vec<Vec<Arc<str>>> = handles.chunks(10).map(<[Arc<str>]>::to_vec).collect();
    futures::stream::iter(chunks)
        .for_each_concurrent(CALLS_IN_FLIGHT, |chunk| async move {
            let refs: Vec<&str> = chunk.iter().map(|h| &**h).collect();
            match client.change_visibility_batch(&refs, Duration::ZERO).await {
                Ok(failed) => {
                    let returned = (chunk.len() - failed.len()) as u64;
                    shared.counters.returned.fetch_add(returned, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(error = %e, messages = chunk.len(), "returning SQS messages failed; they reappear after their visibility timeout"),
            }
            shared.release(chunk.iter());
        })
        .await;
}

/// Keeps held messages hidden: once half a message's visibility timeout has passed, renews it.
async fn keep_hidden(client: SqsClient, shared: Arc<Shared>, visibility: Duration) {
    let tick = (visibility / 8).clamp(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        tokio::time::sleep(tick).await;
        let now = Instant::now();
        let due: Vec<Arc<str>> = match shared.held.lock() {
            Ok(held) => {
                held.iter().filter(|(_, h)| h.hidden_until < now + visibility / 2).map(|(k, _)| k.clone()).collect()
            }
            Err(_) => return,
        };
        if due.is_empty() {
            continue;
        }
        let chunks: Vec<Vec<Arc<str>>> = due.chunks(10).map(<[Arc<str>]>::to_vec).collect();
        futures::stream::iter(chunks)
            .for_each_concurrent(CALLS_IN_FLIGHT, |chunk| {
                let (client, shared) = (&client, &shared);
                async move {
                    let refs: Vec<&str> = chunk.iter().map(|h| &**h).collect();
                    let at = Instant::now();
                    match client.change_visibility_batch(&refs, visibility).await {
                        Ok(failed) => {
                            let failed: Vec<usize> = failed.iter().filter_map(|f| f.id.parse().ok()).collect();
                            if let Ok(mut held) = shared.held.lock() {
                                for (i, h) in chunk.iter().enumerate() {
                                    if failed.contains(&i) {
                                        // Deleted meanwhile, or its handle expired: it is no longer ours to keep.
                                        held.remove(h);
                                    } else if let Some(e) = held.get_mut(h) {
                                        e.hidden_until = at + visibility;
                                    }
                                }
                            }
                            shared
                                .counters
                                .extensions
                                .fetch_add((chunk.len() - failed.len()) as u64, Ordering::Relaxed);
                        }
                        // Tried again at the next tick.
                        Err(e) => tracing::warn!(error = %e, "extending SQS message visibility failed"),
                    }
                }
            })
            .await;
    }
}

/// Deletes what completed checkpoints hand over, in order, merging whatever queued up while a round was in flight
/// (so a slow SQS makes rounds larger, not checkpoints slower). Ends when the source drops its sender.
async fn delete_in_order(client: SqsClient, shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Handles>) {
    while let Some(mut handles) = rx.recv().await {
        while let Ok(more) = rx.try_recv() {
            handles.extend(more);
        }
        delete_all(client.clone(), shared.clone(), handles).await;
    }
}

/// Deletes messages, ten per call, several calls at once; retries transient errors with backoff. A message whose
/// delete fails for good is released (it reappears and the dedup drops it).
async fn delete_all(client: SqsClient, shared: Arc<Shared>, handles: Vec<Arc<str>>) {
    let chunks: Vec<Vec<Arc<str>>> = handles.chunks(10).map(<[Arc<str>]>::to_vec).collect();
    futures::stream::iter(chunks)
        .for_each_concurrent(CALLS_IN_FLIGHT, |chunk| {
            let (client, shared) = (&client, &shared);
            async move {
                let refs: Vec<&str> = chunk.iter().map(|h| &**h).collect();
                let mut backoff = Backoff::default();
                let failed = loop {
                    match client.delete_batch(&refs).await {
                        Ok(failed) => break failed,
                        Err(e) if e.retriable() => match backoff.next_delay() {
                            Some(d) => {
                                tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64, "SQS delete failed; retrying");
                                tokio::time::sleep(d).await;
                            }
                            None => {
                                tracing::error!(error = %e, messages = chunk.len(), "SQS delete kept failing; the messages will reappear");
                                shared.counters.delete_errors.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                                shared.release(chunk.iter());
                                return;
                            }
                        },
                        Err(e) => {
                            tracing::error!(error = %e, messages = chunk.len(), "SQS delete failed; the messages will reappear");
                            shared.counters.delete_errors.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                            shared.release(chunk.iter());
                            return;
                        }
                    }
                };
                if !failed.is_empty() {
                    let codes: Vec<&str> = failed.iter().map(|f| f.code.as_str()).collect();
                    tracing::debug!(?codes, "some SQS deletes failed (already deleted, or the handle expired)");
                    shared.counters.delete_errors.fetch_add(failed.len() as u64, Ordering::Relaxed);
                }
                shared.counters.deleted.fetch_add((chunk.len() - failed.len()) as u64, Ordering::Relaxed);
                shared.release(chunk.iter());
            }
        })
        .await;
}

/// Checks before the job starts that the queue exists and these credentials may read it; the error names the AWS
/// error code and the queue URL. A missing queue or a refused signature fails at once; an SQS that is unavailable
/// or throttling (5xx, 429, no answer) is retried with backoff for about a minute first, as a running job would.
pub async fn prepare(cfg: &SqsConfig) -> Result<(), EngineError> {
    let client = SqsClient::new(cfg)?;
    let mut backoff = Backoff::default();
    loop {
        match client.queue_attributes(&["VisibilityTimeout"]).await {
            Ok(_) => return Ok(()),
            Err(e @ SqsError::Network { .. }) | Err(e @ SqsError::Aws { .. }) if e.retriable() => {
                let Some(d) = backoff.next_delay() else { return Err(EngineError::Config(e.to_string())) };
                tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64, "checking the SQS queue failed; retrying");
                tokio::time::sleep(d).await;
            }
            Err(e) => return Err(EngineError::Config(e.to_string())),
        }
    }
}

#[async_trait]
impl Source for SqsSource {
    async fn next(&mut self) -> Result<SourceEvent, EngineError> {
        if self.rx.is_none() {
            self.start();
        }
        let batch_size = self.ctx.batch_size.max(1);
        let Some(rx) = self.rx.as_mut() else { return Err(EngineError::Internal("SQS receivers not started".into())) };
        let mut messages: Vec<Message> = Vec::new();
        // Wait briefly for the first messages, so coordinator messages (barriers) are taken between waits.
        match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            Ok(Some(Ok(m))) => messages.extend(m),
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) | Err(_) => return Ok(SourceEvent::Idle(Duration::ZERO)),
        }
        while messages.len() < batch_size {
            match rx.try_recv() {
                Ok(Ok(m)) => messages.extend(m),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => break,
            }
        }
        let batch = self.decode(&messages)?;
        NodeMetrics::add(&self.ctx.metrics.bytes, messages.iter().map(|m| m.body.len()).sum());
        // Every message is acknowledged with the batch's checkpoint, bad ones too (dead-lettered or skipped: a
        // poison message must not come back forever).
        self.emitted.extend(messages.into_iter().map(|m| Arc::<str>::from(m.receipt_handle)));
        Ok(match batch {
            Some(b) => SourceEvent::Batch(b),
            None => SourceEvent::Idle(Duration::ZERO),
        })
    }

    fn snapshot_position(&mut self, checkpoint: CheckpointId) -> Result<serde_json::Value, EngineError> {
        let emitted = std::mem::take(&mut self.emitted);
        if !emitted.is_empty() {
            self.pending.insert(checkpoint, emitted);
        }
        let handles: Vec<String> =
            self.pending.values().flatten().take(MAX_POSITION_HANDLES).map(|h| h.to_string()).collect();
        serde_json::to_value(Position { handles }).map_err(|e| EngineError::Internal(e.to_string()))
    }

    async fn notify_checkpoint_complete(&mut self, checkpoint: CheckpointId, last: bool) -> Result<(), EngineError> {
        let handles = completed(&mut self.pending, checkpoint);
        if !handles.is_empty() {
            // Dead-lettered records of these messages are on disk before the messages go.
            if let Some(dl) = &self.ctx.dead_letter {
                dl.flush()?;
            }
            self.delete(handles);
        }
        if last {
            // The task ends after this: no more receives; every queued delete is done first, so a finished job
            // leaves nothing behind; what was received but never handed downstream goes back to the queue.
            self.stop_receiving().await;
            self.delete_restored();
            if let Some((tx, deleter)) = self.deleter.take() {
                drop(tx);
                deleter.await.map_err(|e| EngineError::Internal(format!("SQS deleter failed: {e}")))?;
            }
            self.return_unread().await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn source() -> SqsSource {
        source_with(true).unwrap()
    }

    fn source_with(checkpoints: bool) -> Result<SqsSource, EngineError> {
        let cfg = SqsConfig {
            queue_url: "http://127.0.0.1:9/1/q".into(),
            region: "us-east-1".into(),
            endpoint: "http://127.0.0.1:9".into(),
            envelope: super::super::Envelope::Eventbridge,
            format: super::super::Format::Json,
            wait_time: Duration::from_secs(1),
            max_messages: 10,
            receivers: 1,
            visibility_timeout: Duration::from_secs(30),
            bad_records: BadRecordPolicy::Skip,
            dead_letter_path: None,
            keys: None,
        };
        use arrow::datatypes::{DataType, Field, TimeUnit};
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("_message_id", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
            Field::new("_sent_time", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
            Field::new("_receive_count", DataType::Int32, true),
        ]));
        let sql = "CREATE TABLE q (id TEXT, n BIGINT) WITH (connector = 'sqs', queue_url = 'http://127.0.0.1:9/1/q');\n\
                   CREATE TABLE o WITH (connector = 'stdout');\nINSERT INTO o SELECT * FROM q;";
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let p = rt.block_on(nagare_sql::Planner::new(crate::sqs::test_registry().catalog()).plan(sql)).unwrap();
        let spec = p.graph.sources().next().unwrap().1.clone();
        let ctx = SourceContext {
            subtask: 0,
            parallelism: 1,
            batch_size: 100,
            dead_letter: None,
            metrics: Arc::new(NodeMetrics::new(0, "q".into(), "source", 1)),
            stop: Default::default(),
            checkpoints,
        };
        SqsSource::new(&spec, &cfg, schema, ctx)
    }

    fn message(id: &str, body: &str) -> Message {
        Message {
            message_id: id.into(),
            receipt_handle: format!("rh-{id}"),
            body: body.into(),
            attributes: [
                ("SentTimestamp".to_string(), "1767225600000".to_string()),
                ("ApproximateReceiveCount".to_string(), "2".to_string()),
            ]
            .into(),
        }
    }

    fn event(id: &str, n: &str) -> String {
        format!(r#"{{"id":"{id}","detail-type":"t","source":"s","n":{n},"detail":{{}}}}"#)
    }

    #[test]
    fn a_job_without_checkpoints_is_refused_since_nothing_would_say_when_to_delete() {
        let e = source_with(false).err().unwrap().to_string();
        assert!(e.contains("source q: the sqs source needs checkpoints"), "{e}");
    }

    #[test]
    fn messages_decode_with_metadata_and_bad_ones_are_left_out() {
        let mut s = source();
        let msgs = vec![
            message("m1", &event("e1", "1")),
            message("m2", "not json"),
            message("m3", &event("e3", "\"not a number\"")),
            message("m4", &event("e4", "4")),
        ];
        let b = s.decode(&msgs).unwrap().unwrap();
        assert_eq!(b.num_rows(), 2);
        let ids = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!((ids.value(0), ids.value(1)), ("e1", "e4"));
        let mids = b.column(1).as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!((mids.value(0), mids.value(1)), ("m1", "m4"));
        let sent = b.column(3).as_any().downcast_ref::<arrow::array::TimestampMicrosecondArray>().unwrap();
        assert_eq!(sent.value(0), 1_767_225_600_000_000);
        let count = b.column(4).as_any().downcast_ref::<arrow::array::Int32Array>().unwrap();
        assert_eq!(count.value(1), 2);
        assert_eq!(NodeMetrics::get(&s.ctx.metrics.bad_records), 2);
        // All good: one block, one decode.
        let b = s.decode(&[message("m5", &event("e5", "5")), message("m6", &event("e6", "6"))]).unwrap().unwrap();
        assert_eq!(b.num_rows(), 2);
    }

    #[test]
    fn a_bad_message_fails_the_job_naming_the_message_when_so_configured() {
        let mut s = source();
        s.policy = BadRecords::Fail;
        let e = s.decode(&[message("m1", &event("e1", "1")), message("m-bad", "{\"x\":")]).unwrap_err().to_string();
        assert!(e.contains("SQS message m-bad") && e.contains("not an EventBridge event"), "{e}");
    }

    #[test]
    fn deletes_run_behind_checkpoints_and_the_final_one_waits_for_them() {
        let s = source();
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(deletes_run_behind(s));
    }

    async fn deletes_run_behind(mut s: SqsSource) {
        // Nothing listens on the endpoint's port: every delete fails and is retried with backoff for ~30 s.
        s.emitted = vec![Arc::from("a")];
        s.snapshot_position(CheckpointId(1)).unwrap();
        let quick = tokio::time::timeout(Duration::from_secs(10), s.notify_checkpoint_complete(CheckpointId(1), false));
        quick.await.expect("a checkpoint's completion does not wait for its deletes").unwrap();
        assert!(s.pending.is_empty() && s.deleter.is_some(), "the handles went to the deleter");
        s.emitted = vec![Arc::from("b")];
        s.snapshot_position(CheckpointId(2)).unwrap();
        let last = tokio::time::timeout(Duration::from_secs(1), s.notify_checkpoint_complete(CheckpointId(2), true));
        assert!(last.await.is_err(), "the final checkpoint's completion waits until the deletes are done");
    }

    #[test]
    fn receipts_are_deleted_with_the_checkpoint_that_covers_them() {
        let mut s = source();
        let rh = |v: &[&str]| v.iter().map(|h| Arc::<str>::from(*h)).collect::<Vec<_>>();
        s.emitted = rh(&["a", "b"]);
        let p1 = s.snapshot_position(CheckpointId(1)).unwrap();
        s.emitted = rh(&["c"]);
        let p2 = s.snapshot_position(CheckpointId(2)).unwrap();
        // Nothing emitted between 2 and 3: no entry.
        let _ = s.snapshot_position(CheckpointId(3)).unwrap();
        s.emitted = rh(&["d"]);
        assert_eq!(p1["handles"], serde_json::json!(["a", "b"]));
        assert_eq!(p2["handles"], serde_json::json!(["a", "b", "c"]), "a position lists what its checkpoint covers");
        assert_eq!(s.pending.keys().copied().collect::<Vec<_>>(), vec![CheckpointId(1), CheckpointId(2)]);
        // Completing 2 (1's completion may be skipped) releases both; "d" waits for a later barrier.
        assert_eq!(completed(&mut s.pending, CheckpointId(2)), rh(&["a", "b", "c"]));
        assert!(s.pending.is_empty());
        assert!(completed(&mut s.pending, CheckpointId(2)).is_empty(), "a repeated notification deletes nothing");
        assert_eq!(s.emitted, rh(&["d"]));
        // After a restore the listed handles are deleted at start.
        let mut r = source();
        r.restore(&[&p2]).unwrap();
        assert_eq!(r.restored, vec!["a", "b", "c"]);
    }
}
