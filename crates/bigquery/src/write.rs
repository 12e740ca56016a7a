//! The Storage Write API: write streams (create, finalize, batch-commit, get) and appending Arrow rows to a stream
//! with offsets, several requests in flight, resent from the last acknowledged offset after a transient failure.

use std::collections::VecDeque;
use std::time::Duration;

use arrow::array::{RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::Schema;
use arrow::ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteContext, IpcWriteOptions, write_message};
use googleapis_tonic_google_cloud_bigquery_storage_v1::google::cloud::bigquery::storage::v1 as pb;
use pb::big_query_write_client::BigQueryWriteClient;
use tokio::sync::mpsc;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::auth::Auth;
use crate::error::{Backoff, BqError, Reaction, Result, append_reaction, with_retries};
use crate::types::approx_bytes;

/// A request must stay under 10 MB; aim lower since the IPC size is estimated before encoding.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 8 * 1024 * 1024;

/// Deadline of unary calls (create, finalize, commit, get): a server that hangs is retried, not waited for.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an append may wait for its acknowledgement before the connection is replaced and rows resent.
const ACK_TIMEOUT: Duration = Duration::from_secs(120);

/// Percent-encodes a routing header value (slashes stay, as Google's client libraries do).
fn routing_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A Storage Write API client; cheap to clone (one HTTP/2 connection underneath).
#[derive(Clone)]
pub struct WriteClient {
    client: BigQueryWriteClient<Channel>,
    auth: Auth,
}

impl std::fmt::Debug for WriteClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteClient")
    }
}

impl WriteClient {
    /// A client for `endpoint`: `https://bigquerystorage.googleapis.com` (TLS), or `http://host:port` (an emulator).
    pub fn new(endpoint: &str, auth: Auth) -> Result<Self> {
        let bad = |e: &dyn std::fmt::Display| BqError::Config(format!("endpoint '{endpoint}': {e}"));
        let mut ep = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| bad(&e))?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if endpoint.starts_with("https://") {
            ep = ep.tls_config(ClientTlsConfig::new().with_native_roots()).map_err(|e| bad(&e))?;
        }
        let client = BigQueryWriteClient::new(ep.connect_lazy())
            .max_encoding_message_size(20 * 1024 * 1024)
            .max_decoding_message_size(64 * 1024 * 1024);
        Ok(WriteClient { client, auth })
    }

    async fn request<T>(&self, msg: T, param: &str, value: &str) -> Result<tonic::Request<T>> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(CALL_TIMEOUT);
        let md = req.metadata_mut();
        let routing = format!("{param}={}", routing_value(value));
        md.insert(
            "x-goog-request-params",
            routing.parse().map_err(|_| BqError::Config(format!("bad table or stream name '{value}'")))?,
        );
        if let Some(h) = self.auth.header().await? {
            md.insert("authorization", h.parse().map_err(|_| BqError::Config("bad access token".into()))?);
        }
        Ok(req)
    }

    /// Creates a PENDING stream on `table` (`projects/p/datasets/d/tables/t`): rows become visible only when it is
    /// committed.
    pub async fn create_pending_stream(&self, table: &str) -> Result<String> {
        self.create_stream(table, pb::write_stream::Type::Pending).await
    }

    /// Creates a BUFFERED stream on `table`: rows become visible only up to the offset of a `FlushRows`, so one
    /// stream can serve many checkpoints.
    pub async fn create_buffered_stream(&self, table: &str) -> Result<String> {
        self.create_stream(table, pb::write_stream::Type::Buffered).await
    }

    async fn create_stream(&self, table: &str, kind: pb::write_stream::Type) -> Result<String> {
        with_retries("CreateWriteStream", || async {
            let msg = pb::CreateWriteStreamRequest {
                parent: table.to_string(),
                write_stream: Some(pb::WriteStream { r#type: kind as i32, ..Default::default() }),
            };
            let req = self.request(msg, "parent", table).await?;
            let s = self
                .client
                .clone()
                .create_write_stream(req)
                .await
                .map_err(|e| BqError::grpc("CreateWriteStream", &e))?;
            Ok(s.into_inner().name)
        })
        .await
    }

    /// Finalizes a stream (no more appends); returns its row count.
    pub async fn finalize(&self, stream: &str) -> Result<i64> {
        with_retries("FinalizeWriteStream", || async {
            let req = self.request(pb::FinalizeWriteStreamRequest { name: stream.to_string() }, "name", stream).await?;
            let r = self
                .client
                .clone()
                .finalize_write_stream(req)
                .await
                .map_err(|e| BqError::grpc("FinalizeWriteStream", &e))?;
            Ok(r.into_inner().row_count)
        })
        .await
    }

    /// Makes the rows of a BUFFERED stream up to `offset` (inclusive, as Google documents) visible. Idempotent:
    /// a flush at or behind an earlier one changes nothing, whether the server answers OK or ALREADY_EXISTS (which
    /// Google's own Beam connector reads as "already flushed up to here").
    pub async fn flush_rows(&self, stream: &str, offset: i64) -> Result<()> {
        let r = with_retries("FlushRows", || async {
            let msg = pb::FlushRowsRequest { write_stream: stream.to_string(), offset: Some(offset) };
            let req = self.request(msg, "write_stream", stream).await?;
            let r = self.client.clone().flush_rows(req).await.map_err(|e| BqError::grpc("FlushRows", &e))?;
            Ok(r.into_inner().offset)
        })
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(BqError::Grpc { code: tonic::Code::AlreadyExists, .. }) => {
                tracing::debug!(stream, offset, "FlushRows: already flushed to this offset");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Reads a stream's state (commit time, type).
    pub async fn get_stream(&self, stream: &str) -> Result<pb::WriteStream> {
        with_retries("GetWriteStream", || async {
            let msg = pb::GetWriteStreamRequest { name: stream.to_string(), ..Default::default() };
            let req = self.request(msg, "name", stream).await?;
            let r = self.client.clone().get_write_stream(req).await.map_err(|e| BqError::grpc("GetWriteStream", &e))?;
            Ok(r.into_inner())
        })
        .await
    }

    /// Commits finalized PENDING streams of `table` atomically. Idempotent: a stream already committed (by an
    /// earlier attempt before a crash) counts as committed. Errors name the streams that could not be committed.
    pub async fn commit_streams(&self, table: &str, streams: &[String]) -> Result<()> {
        if streams.is_empty() {
            return Ok(());
        }
        let result = with_retries("BatchCommitWriteStreams", || async {
            let msg = pb::BatchCommitWriteStreamsRequest { parent: table.to_string(), write_streams: streams.to_vec() };
            let req = self.request(msg, "parent", table).await?;
            let r = self
                .client
                .clone()
                .batch_commit_write_streams(req)
                .await
                .map_err(|e| BqError::grpc("BatchCommitWriteStreams", &e))?;
            Ok(r.into_inner())
        })
        .await;
        let errors: Vec<pb::StorageError> = match result {
            Ok(r) if r.stream_errors.is_empty() && r.commit_time.is_some() => return Ok(()),
            Ok(r) if r.stream_errors.is_empty() => {
                return Err(BqError::Protocol(
                    "BatchCommitWriteStreams returned neither a commit time nor errors".into(),
                ));
            }
            Ok(r) => r.stream_errors,
            Err(e) => return Err(e),
        };
        // A commit is all-or-nothing: with any error, none of this call's streams were committed. Streams committed
        // by an earlier attempt (before a crash) are done; the rest are tried again on their own.
        let mut pending = Vec::new();
        let mut failures = Vec::new();
        for s in streams {
            let error = errors.iter().find(|e| &e.entity == s);
            if let Some(e) = error
                && self.already_committed(s, e).await?
            {
                continue;
            }
            match error {
                Some(e) => failures.push(format!("{s}: {}", e.error_message)),
                None => pending.push(s.clone()),
            }
        }
        if !failures.is_empty() {
            return Err(BqError::Protocol(format!("could not commit streams of {table}: {}", failures.join("; "))));
        }
        Box::pin(self.commit_streams(table, &pending)).await
    }

    /// Whether a stream a commit failed for had been committed before: `STREAM_ALREADY_COMMITTED`, a commit time
    /// on the stream, or a server saying its state is COMMITTED (bqemulator answers INVALID_STREAM_STATE with
    /// "state=COMMITTED" and no commit time). Only finalized streams from a checkpoint get here, so an invalid
    /// state means committed or gone; gone is an error.
    async fn already_committed(&self, stream: &str, e: &pb::StorageError) -> Result<bool> {
        use pb::storage_error::StorageErrorCode as C;
        if e.code == C::StreamAlreadyCommitted as i32 {
            return Ok(true);
        }
        if e.code != C::InvalidStreamState as i32 {
            return Ok(false);
        }
        if self.get_stream(stream).await?.commit_time.is_some() {
            return Ok(true);
        }
        Ok(e.error_message.contains("state=COMMITTED"))
    }

    /// Opens an appender for `stream` sending rows of `schema` (already in wire types).
    pub fn appender(&self, stream: String, schema: &Schema, max_request_bytes: usize) -> Result<Appender> {
        Ok(Appender {
            client: self.clone(),
            stream,
            format: RowFormat::Arrow(ipc_schema(schema)),
            conn: None,
            inflight: VecDeque::new(),
            next_offset: 0,
            max_inflight: 8,
            max_request_bytes,
            use_offsets: true,
            bytes_sent: 0,
            schema_changed: false,
        })
    }

    /// An appender for the table's `_default` stream (rows visible at once, no offsets: at least once).
    pub fn default_stream_appender(&self, table: &str, schema: &Schema, max_request_bytes: usize) -> Result<Appender> {
        let mut a = self.appender(format!("{table}/streams/_default"), schema, max_request_bytes)?;
        a.use_offsets = false;
        Ok(a)
    }

    /// An appender for the table's `_default` stream sending protobuf rows (what BigQuery's CDC upserts take);
    /// `schema` includes the `_CHANGE_TYPE` and `_CHANGE_SEQUENCE_NUMBER` columns.
    pub fn default_stream_proto_appender(
        &self,
        table: &str,
        schema: &Schema,
        max_request_bytes: usize,
    ) -> Result<Appender> {
        let mut a = self.default_stream_appender(table, schema, max_request_bytes)?;
        a.format = RowFormat::Proto(Box::new(crate::proto::descriptor(schema, false)));
        Ok(a)
    }
}

/// How rows go on the wire, with what describes them on a connection's first request.
enum RowFormat {
    /// `arrow_rows`, with the IPC schema.
    Arrow(Vec<u8>),
    /// `proto_rows`, with the message descriptor.
    Proto(Box<prost_types::DescriptorProto>),
}

/// The IPC encapsulated message of a schema, as `arrow_rows.writer_schema` wants it.
pub fn ipc_schema(schema: &Schema) -> Vec<u8> {
    let opts = IpcWriteOptions::default();
    let data = IpcDataGenerator::default().schema_to_bytes_with_dictionary_tracker(
        schema,
        &mut DictionaryTracker::new(false),
        &opts,
    );
    let mut buf = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = write_message(&mut buf, data, &opts);
    buf
}

/// The IPC encapsulated message of a batch.
pub fn ipc_batch(batch: &RecordBatch) -> Result<Vec<u8>> {
    let opts = IpcWriteOptions::default();
    let (_, data) = IpcDataGenerator::default().encode(
        batch,
        &mut DictionaryTracker::new(false),
        &opts,
        &mut IpcWriteContext::default(),
    )?;
    let mut buf = Vec::new();
    write_message(&mut buf, data, &opts)?;
    Ok(buf)
}

/// Splits a batch into slices whose estimated encoded size stays under `max_bytes` (zero-copy slices).
pub fn split_for_requests(batch: &RecordBatch, max_bytes: usize) -> Vec<RecordBatch> {
    let n = batch.num_rows();
    let bytes = approx_bytes(batch);
    if bytes <= max_bytes || n <= 1 {
        return vec![batch.clone()];
    }
    let parts = bytes.div_ceil(max_bytes).max(2);
    let per = n.div_ceil(parts).max(1);
    (0..n).step_by(per).map(|start| batch.slice(start, per.min(n - start))).collect()
}

/// Whether an append failed because its rows have columns the stream's view of the table lacks
/// (`SCHEMA_MISMATCH_EXTRA_FIELDS`): the table gained them after the stream (or its connection) was opened.
fn stale_schema(status: &googleapis_tonic_google_cloud_bigquery_storage_v1::google::rpc::Status) -> bool {
    use prost::Message;
    status.details.iter().any(|d| {
        d.type_url.ends_with("google.cloud.bigquery.storage.v1.StorageError")
            && pb::StorageError::decode(d.value.as_slice())
                .is_ok_and(|e| e.code == pb::storage_error::StorageErrorCode::SchemaMismatchExtraFields as i32)
    })
}

/// Rows a request carried, kept until acknowledged so they can be resent.
struct Sent {
    offset: i64,
    batch: RecordBatch,
}

struct Conn {
    tx: mpsc::Sender<pb::AppendRowsRequest>,
    rx: tonic::Streaming<pb::AppendRowsResponse>,
}

/// Rows the server rejected, with its reasons (to be dead-lettered by the caller).
#[derive(Debug)]
pub struct Rejected {
    /// The rows.
    pub batch: RecordBatch,
    /// One reason per row.
    pub reasons: Vec<String>,
}

/// Appends to one write stream over a bidirectional `AppendRows` call.
pub struct Appender {
    client: WriteClient,
    stream: String,
    format: RowFormat,
    conn: Option<Conn>,
    inflight: VecDeque<Sent>,
    next_offset: i64,
    max_inflight: usize,
    max_request_bytes: usize,
    use_offsets: bool,
    /// Estimated bytes of every row sent (what stream rotation by size counts).
    bytes_sent: u64,
    /// A response said the table's schema changed since the stream was opened.
    schema_changed: bool,
}

impl Appender {
    /// The stream's name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Rows sent so far (acknowledged or not).
    pub fn rows_sent(&self) -> i64 {
        self.next_offset
    }

    /// Estimated bytes sent so far (Arrow buffer sizes), so a long-lived stream can be replaced past a size.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Whether BigQuery answered with an `updated_schema`: the table changed under the stream, which a new stream
    /// sees (Google: a stream's table schema "could go out of date during the life time of the stream").
    pub fn schema_changed(&self) -> bool {
        self.schema_changed
    }

    fn request(&self, sent: &Sent, with_schema: bool) -> Result<pb::AppendRowsRequest> {
        use pb::append_rows_request::{ArrowData, ProtoData, Rows};
        let rows = match &self.format {
            RowFormat::Arrow(schema) => Rows::ArrowRows(ArrowData {
                writer_schema: with_schema.then(|| pb::ArrowSchema { serialized_schema: schema.clone() }),
                rows: Some(pb::ArrowRecordBatch {
                    serialized_record_batch: ipc_batch(&sent.batch)?,
                    ..Default::default()
                }),
            }),
            RowFormat::Proto(descriptor) => Rows::ProtoRows(ProtoData {
                writer_schema: with_schema
                    .then(|| pb::ProtoSchema { proto_descriptor: Some(descriptor.as_ref().clone()) }),
                rows: Some(pb::ProtoRows { serialized_rows: crate::proto::encode_rows(&sent.batch, None)? }),
            }),
        };
        Ok(pb::AppendRowsRequest {
            // Required on a connection's first request only, but allowed on all (and some servers want it).
            write_stream: self.stream.clone(),
            offset: self.use_offsets.then_some(sent.offset),
            rows: Some(rows),
            ..Default::default()
        })
    }

    /// Opens a connection and sends everything in flight on it.
    async fn connect(&mut self) -> Result<()> {
        self.conn = None;
        let (tx, rx) = mpsc::channel(self.max_inflight + 1);
        let mut first = true;
        let mut pending = Vec::new();
        for s in &self.inflight {
            pending.push(self.request(s, first)?);
            first = false;
        }
        // The server answers the call only once it has a request: queue them before awaiting the call.
        let mut iter = pending.into_iter();
        if let Some(r) = iter.next() {
            tx.send(r).await.map_err(|_| BqError::Protocol("append channel closed".into()))?;
        }
        let req =
            self.client.request(tokio_stream::wrappers::ReceiverStream::new(rx), "write_stream", &self.stream).await?;
        let mut client = self.client.client.clone();
        let call = client.append_rows(req);
        let tx2 = tx.clone();
        let rest: Vec<_> = iter.collect();
        let sender = async move {
            for r in rest {
                if tx2.send(r).await.is_err() {
                    break;
                }
            }
        };
        let opened = tokio::time::timeout(CALL_TIMEOUT, async { tokio::join!(call, sender) }).await;
        let Ok((resp, ())) = opened else {
            return Err(BqError::Grpc {
                call: "AppendRows",
                code: tonic::Code::DeadlineExceeded,
                message: format!("the server did not open the append stream within {}s", CALL_TIMEOUT.as_secs()),
            });
        };
        let rx = resp.map_err(|e| BqError::grpc("AppendRows", &e))?.into_inner();
        self.conn = Some(Conn { tx, rx });
        Ok(())
    }

    /// Appends a batch (in wire types); returns rows the server rejected, if any, for the dead-letter output.
    pub async fn append(&mut self, batch: &RecordBatch) -> Result<Vec<Rejected>> {
        let mut rejected = Vec::new();
        for part in split_for_requests(batch, self.max_request_bytes) {
            while self.inflight.len() >= self.max_inflight {
                rejected.extend(self.await_one().await?);
            }
            self.bytes_sent += approx_bytes(&part) as u64;
            let sent = Sent { offset: self.next_offset, batch: part };
            self.next_offset += sent.batch.num_rows() as i64;
            // Without a connection, connecting sends everything in flight, this request included; encode it once.
            let req = match self.conn {
                Some(_) => Some(self.request(&sent, false)?),
                None => None,
            };
            self.inflight.push_back(sent);
            let sent_ok = match (&self.conn, req) {
                (Some(c), Some(req)) => c.tx.send(req).await.is_ok(),
                _ => false,
            };
            if !sent_ok {
                self.reconnect_with_backoff(&mut Backoff::default(), None).await?;
            }
        }
        Ok(rejected)
    }

    /// Waits until everything sent is acknowledged.
    pub async fn flush(&mut self) -> Result<Vec<Rejected>> {
        let mut rejected = Vec::new();
        while !self.inflight.is_empty() {
            rejected.extend(self.await_one().await?);
        }
        Ok(rejected)
    }

    async fn reconnect_with_backoff(&mut self, backoff: &mut Backoff, cause: Option<&BqError>) -> Result<()> {
        if let Some(cause) = cause {
            let Some(delay) = backoff.next_delay() else {
                return Err(BqError::Protocol(format!(
                    "giving up appending to {} after retries: {cause}",
                    self.stream
                )));
            };
            tracing::warn!(stream = %self.stream, error = %cause, retry_in_ms = delay.as_millis() as u64,
                "append failed; resending from the last acknowledged offset");
            tokio::time::sleep(delay).await;
        }
        loop {
            match self.connect().await {
                Ok(()) => return Ok(()),
                Err(e) if e.retriable() => match backoff.next_delay() {
                    Some(d) => tokio::time::sleep(d).await,
                    None => return Err(e),
                },
                Err(e) => return Err(e),
            }
        }
    }

    /// Handles the next response: the oldest request in flight is acknowledged, already written, rejected in part,
    /// or everything in flight is resent on a new connection.
    async fn await_one(&mut self) -> Result<Vec<Rejected>> {
        let mut backoff = Backoff::default();
        loop {
            let Some(conn) = self.conn.as_mut() else {
                self.reconnect_with_backoff(&mut backoff, None).await?;
                continue;
            };
            let next = match tokio::time::timeout(ACK_TIMEOUT, conn.rx.message()).await {
                Ok(next) => next,
                Err(_) => {
                    let e = BqError::Protocol(format!("no acknowledgement within {}s", ACK_TIMEOUT.as_secs()));
                    self.reconnect_with_backoff(&mut backoff, Some(&e)).await?;
                    continue;
                }
            };
            let outcome = match next {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    let e = BqError::Protocol("the server closed the append stream".into());
                    self.reconnect_with_backoff(&mut backoff, Some(&e)).await?;
                    continue;
                }
                Err(status) => {
                    let e = BqError::grpc("AppendRows", &status);
                    match append_reaction(status.code()) {
                        Reaction::Retry | Reaction::Resend => {
                            self.reconnect_with_backoff(&mut backoff, Some(&e)).await?;
                            continue;
                        }
                        _ => return Err(e),
                    }
                }
            };
            if outcome.updated_schema.is_some() && !self.schema_changed {
                tracing::info!(stream = %self.stream, "BigQuery reports the table's schema changed under this stream");
                self.schema_changed = true;
            }
            let Some(front) = self.inflight.front() else {
                return Err(BqError::Protocol("a response arrived with no request in flight".into()));
            };
            match outcome.response {
                Some(pb::append_rows_response::Response::AppendResult(r)) => {
                    if self.use_offsets && r.offset.is_some_and(|o| o != front.offset) {
                        return Err(BqError::Protocol(format!(
                            "acknowledged offset {:?}, expected {}",
                            r.offset, front.offset
                        )));
                    }
                    self.inflight.pop_front();
                    return Ok(Vec::new());
                }
                Some(pb::append_rows_response::Response::Error(status)) => {
                    let code = tonic::Code::from(status.code);
                    let e = BqError::Grpc { call: "AppendRows", code, message: status.message.clone() };
                    if !outcome.row_errors.is_empty() {
                        return self.reject_rows(&outcome.row_errors).await;
                    }
                    if stale_schema(&status) {
                        // Google: once the Storage Write API has seen the new schema (within minutes), a new
                        // connection takes rows of it. Nothing at this offset was written; the rows are resent, and
                        // the stream is replaced at the next barrier.
                        self.schema_changed = true;
                        self.reconnect_with_backoff(&mut backoff, Some(&e)).await?;
                        continue;
                    }
                    match append_reaction(code) {
                        Reaction::AlreadyWritten => {
                            self.inflight.pop_front();
                            return Ok(Vec::new());
                        }
                        Reaction::Retry | Reaction::Resend => {
                            self.reconnect_with_backoff(&mut backoff, Some(&e)).await?;
                        }
                        Reaction::Fail => return Err(e),
                    }
                }
                None => return Err(BqError::Protocol("an append response with neither a result nor an error".into())),
            }
        }
    }

    /// The oldest request had bad rows: they leave, the rest of it and everything after is renumbered and resent.
    async fn reject_rows(&mut self, errors: &[pb::RowError]) -> Result<Vec<Rejected>> {
        let Some(front) = self.inflight.pop_front() else { return Ok(Vec::new()) };
        let n = front.batch.num_rows();
        let mut reason: Vec<Option<String>> = vec![None; n];
        for e in errors {
            let i = usize::try_from(e.index)
                .ok()
                .filter(|i| *i < n)
                .ok_or_else(|| BqError::Protocol(format!("row error for row {} of a request of {n} rows", e.index)))?;
            reason[i] = Some(e.message.clone());
        }
        let bad: Vec<u32> = (0..n as u32).filter(|i| reason[*i as usize].is_some()).collect();
        let good: Vec<u32> = (0..n as u32).filter(|i| reason[*i as usize].is_none()).collect();
        let rejected = Rejected {
            batch: take_record_batch(&front.batch, &UInt32Array::from(bad.clone()))?,
            reasons: bad.iter().filter_map(|i| reason[*i as usize].clone()).collect(),
        };
        let mut offset = front.offset;
        let mut queue = VecDeque::new();
        if !good.is_empty() {
            queue.push_back(Sent { offset, batch: take_record_batch(&front.batch, &UInt32Array::from(good))? });
        }
        queue.extend(self.inflight.drain(..));
        for s in queue.iter_mut() {
            s.offset = offset;
            offset += s.batch.num_rows() as i64;
        }
        self.next_offset = offset;
        self.inflight = queue;
        self.reconnect_with_backoff(&mut Backoff::default(), None).await?;
        Ok(vec![rejected])
    }

    /// Closes the connection (the stream stays as it is).
    pub fn close(&mut self) {
        self.conn = None;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field};

    use super::*;

    fn batch(n: usize) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("s", DataType::Utf8, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from_iter_values(0..n as i64)),
                Arc::new(StringArray::from_iter_values((0..n).map(|i| format!("row-{i:08}-{}", "x".repeat(100))))),
            ],
        )
        .unwrap()
    }

    #[test]
    fn requests_are_split_under_the_size_limit_and_keep_every_row() {
        let b = batch(100_000);
        let parts = split_for_requests(&b, 1024 * 1024);
        assert!(parts.len() > 5, "{} parts", parts.len());
        assert_eq!(parts.iter().map(|p| p.num_rows()).sum::<usize>(), 100_000);
        for p in &parts {
            assert!(ipc_batch(p).unwrap().len() <= 1024 * 1024 + 64 * 1024, "{}", ipc_batch(p).unwrap().len());
        }
        assert_eq!(split_for_requests(&batch(10), 1024 * 1024).len(), 1);
    }

    #[test]
    fn ipc_messages_read_back() {
        let b = batch(3);
        let mut bytes = ipc_schema(&b.schema());
        bytes.extend(ipc_batch(&b).unwrap());
        let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None).unwrap();
        let got: Vec<RecordBatch> = reader.map(|r| r.unwrap()).collect();
        assert_eq!(got, vec![b]);
    }

    #[test]
    fn routing_header_values_are_encoded() {
        assert_eq!(routing_value("projects/a:b/datasets/d"), "projects/a%3Ab/datasets/d");
    }
}
