//! An in-process test double of the Storage Write API (BigQueryWrite) with the semantics Google documents for
//! PENDING and BUFFERED streams, offsets and `FlushRows` (the offset is inclusive; a flush at or behind the flushed
//! offset changes nothing; a finalized stream takes no appends), and faults to inject: dropped connections, lost acknowledgements, OUT_OF_RANGE and
//! row errors, which bqemulator never produces. Test code only.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs, dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use futures::Stream;
use googleapis_tonic_google_cloud_bigquery_storage_v1::google::cloud::bigquery::storage::v1 as pb;
use googleapis_tonic_google_cloud_bigquery_storage_v1::google::rpc::Status as RpcStatus;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::generated::big_query_write_server::{BigQueryWrite, BigQueryWriteServer};

/// A fault applied to the next append request that arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The connection breaks before the request is looked at.
    DropConnection,
    /// The rows are written, then the connection breaks before the acknowledgement.
    AckLost,
    /// The request is answered OUT_OF_RANGE without writing.
    OutOfRange,
}

#[derive(Debug, Default)]
pub struct StreamState {
    pub rows: Vec<RecordBatch>,
    pub row_count: i64,
    pub finalized: bool,
    pub committed: bool,
    /// BUFFERED (else PENDING).
    pub buffered: bool,
    /// BUFFERED: rows `0..flushed` are visible.
    pub flushed: i64,
    /// The table's schema version when the stream was created.
    pub schema_version: u64,
}

impl StreamState {
    /// Rows a reader of the table sees: a committed PENDING stream's, a BUFFERED stream's up to its flush.
    fn visible(&self) -> i64 {
        match (self.buffered, self.committed) {
            (true, _) => self.flushed,
            (false, true) => self.row_count,
            (false, false) => 0,
        }
    }
}

#[derive(Debug, Default)]
pub struct State {
    pub streams: HashMap<String, StreamState>,
    pub faults: VecDeque<Fault>,
    /// Rows whose first (INT64) column holds this value are refused with a row error.
    pub reject: Option<i64>,
    pub append_requests: usize,
    /// `CreateWriteStream` calls answered.
    pub streams_created: usize,
    /// `FlushRows` calls answered.
    pub flushes: usize,
    /// Answer a flush at or behind the flushed offset ALREADY_EXISTS and a flush of a finalized stream
    /// INVALID_ARGUMENT, as Google's Beam connector expects of BigQuery (the default is the documented no-op).
    pub strict_flush: bool,
    /// Bumped by [`Fake::change_schema`]: appends to streams created before answer with `updated_schema`, as
    /// BigQuery does once it notices a table's schema changed.
    pub schema_version: u64,
    /// After a schema change, refuse appends on connections opened before it to streams created before it with
    /// `SCHEMA_MISMATCH_EXTRA_FIELDS` (rows with a new column, sent where BigQuery has not seen the column yet); a
    /// new connection takes them.
    pub refuse_stale_schema: bool,
    next_id: u64,
}

#[derive(Clone, Default)]
pub struct Fake {
    pub state: Arc<Mutex<State>>,
}

/// Serves a BigQueryWrite implementation on a free loopback port (on the current tokio runtime); returns its
/// `http://` endpoint.
pub async fn serve_write<S: BigQueryWrite>(service: S) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(BigQueryWriteServer::new(service))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    format!("http://{addr}")
}

fn error_response(code: tonic::Code, message: &str, row_errors: Vec<pb::RowError>) -> pb::AppendRowsResponse {
    pb::AppendRowsResponse {
        response: Some(pb::append_rows_response::Response::Error(RpcStatus {
            code: code as i32,
            message: message.into(),
            details: Vec::new(),
        })),
        row_errors,
        ..Default::default()
    }
}

/// BigQuery's answer to rows with a column its view of the table lacks.
fn stale_schema_response() -> pb::AppendRowsResponse {
    use prost::Message;
    let detail = pb::StorageError {
        code: pb::storage_error::StorageErrorCode::SchemaMismatchExtraFields as i32,
        entity: String::new(),
        error_message: "Input schema has more fields than BigQuery schema".into(),
    };
    let mut r =
        error_response(tonic::Code::InvalidArgument, "Input schema has more fields than BigQuery schema", Vec::new());
    if let Some(pb::append_rows_response::Response::Error(status)) = r.response.as_mut() {
        status.details.push(prost_types::Any {
            type_url: "type.googleapis.com/google.cloud.bigquery.storage.v1.StorageError".into(),
            value: detail.encode_to_vec(),
        });
    }
    r
}

fn decode(schema: &[u8], batch: &[u8]) -> RecordBatch {
    let mut bytes = schema.to_vec();
    bytes.extend_from_slice(batch);
    let mut reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None).unwrap();
    reader.next().unwrap().unwrap()
}

impl Fake {
    /// Serves on a free loopback port; returns its `http://` endpoint.
    pub async fn serve(&self) -> String {
        serve_write(self.clone()).await
    }

    /// Someone altered the table (e.g. added a column): streams opened before now report `updated_schema`.
    pub fn change_schema(&self) {
        self.state.lock().unwrap().schema_version += 1;
    }

    /// Every row of a stream, in offset order.
    pub fn rows_of(&self, stream: &str) -> Vec<i64> {
        let st = self.state.lock().unwrap();
        let s = &st.streams[stream];
        s.rows.iter().flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec()).collect()
    }

    /// The first column of every row a reader of `table` sees (committed or flushed), as text, in stream-creation
    /// and offset order.
    pub fn visible_keys(&self, table: &str) -> Vec<String> {
        let st = self.state.lock().unwrap();
        let prefix = format!("{table}/streams/");
        let mut names: Vec<(&String, &StreamState)> =
            st.streams.iter().filter(|(n, _)| n.starts_with(&prefix)).collect();
        names.sort_by_key(|(n, _)| n[prefix.len() + 1..].parse::<u64>().unwrap_or(0));
        let mut out = Vec::new();
        for (_, s) in names {
            let mut left = s.visible();
            for b in &s.rows {
                if left <= 0 {
                    break;
                }
                let take = (b.num_rows() as i64).min(left);
                let col = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
                let col = col.as_string::<i32>();
                out.extend((0..take as usize).map(|i| col.value(i).to_string()));
                left -= take;
            }
        }
        out
    }
}

type AppendStream = Pin<Box<dyn Stream<Item = Result<pb::AppendRowsResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl BigQueryWrite for Fake {
    async fn create_write_stream(
        &self,
        request: Request<pb::CreateWriteStreamRequest>,
    ) -> Result<Response<pb::WriteStream>, Status> {
        let req = request.into_inner();
        let kind = req.write_stream.map_or(pb::write_stream::Type::Pending as i32, |w| w.r#type);
        let buffered = kind == pb::write_stream::Type::Buffered as i32;
        if !buffered && kind != pb::write_stream::Type::Pending as i32 {
            return Err(Status::invalid_argument("the double has PENDING and BUFFERED streams only"));
        }
        let mut st = self.state.lock().unwrap();
        st.next_id += 1;
        st.streams_created += 1;
        let name = format!("{}/streams/s{}", req.parent, st.next_id);
        let schema_version = st.schema_version;
        st.streams.insert(name.clone(), StreamState { buffered, schema_version, ..Default::default() });
        Ok(Response::new(pb::WriteStream { name, r#type: kind, ..Default::default() }))
    }

    type AppendRowsStream = AppendStream;

    async fn append_rows(
        &self,
        request: Request<Streaming<pb::AppendRowsRequest>>,
    ) -> Result<Response<Self::AppendRowsStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let state = self.state.clone();
        let opened_at_version = self.state.lock().unwrap().schema_version;
        tokio::spawn(async move {
            let mut schema: Option<Vec<u8>> = None;
            while let Ok(Some(req)) = inbound.message().await {
                let Some(pb::append_rows_request::Rows::ArrowRows(data)) = req.rows else {
                    let _ = tx.send(Err(Status::invalid_argument("only arrow_rows"))).await;
                    return;
                };
                if let Some(s) = data.writer_schema {
                    schema = Some(s.serialized_schema);
                }
                let (Some(schema), Some(rows)) = (&schema, data.rows) else {
                    let _ = tx.send(Err(Status::invalid_argument("no writer schema"))).await;
                    return;
                };
                let batch = decode(schema, &rows.serialized_record_batch);
                // Decided under the lock, sent after it (a guard cannot be held across an await).
                let action: Result<Result<pb::AppendRowsResponse, Status>, Status> = (|| {
                    let mut st = state.lock().unwrap();
                    st.append_requests += 1;
                    let fault = st.faults.pop_front();
                    if fault == Some(Fault::DropConnection) {
                        return Err(Status::unavailable("connection reset (injected)"));
                    }
                    if fault == Some(Fault::OutOfRange) {
                        return Ok(Ok(error_response(tonic::Code::OutOfRange, "injected", Vec::new())));
                    }
                    let reject = st.reject;
                    let schema_version = st.schema_version;
                    let refuse_stale = st.refuse_stale_schema && opened_at_version < schema_version;
                    let Some(stream) = st.streams.get_mut(&req.write_stream) else {
                        return Err(Status::not_found("stream"));
                    };
                    let offset = req.offset.unwrap_or(stream.row_count);
                    let ids = batch.column(0).as_primitive_opt::<Int64Type>().cloned();
                    let bad: Vec<pb::RowError> = (0..batch.num_rows())
                        .filter(|i| ids.as_ref().is_some_and(|ids| ids.is_valid(*i) && Some(ids.value(*i)) == reject))
                        .map(|i| pb::RowError {
                            index: i as i64,
                            code: pb::row_error::RowErrorCode::FieldsError as i32,
                            message: format!("row {i}: value not allowed"),
                        })
                        .collect();
                    if stream.finalized {
                        return Ok(Err(Status::failed_precondition("stream is finalized")));
                    }
                    if offset < stream.row_count {
                        return Ok(Ok(error_response(
                            tonic::Code::AlreadyExists,
                            "offset already written",
                            Vec::new(),
                        )));
                    }
                    if offset > stream.row_count {
                        return Ok(Ok(error_response(tonic::Code::OutOfRange, "offset beyond the end", Vec::new())));
                    }
                    if refuse_stale && stream.schema_version < schema_version {
                        return Ok(Ok(stale_schema_response()));
                    }
                    if !bad.is_empty() {
                        return Ok(Ok(error_response(tonic::Code::InvalidArgument, "rows have errors", bad)));
                    }
                    stream.row_count += batch.num_rows() as i64;
                    stream.rows.push(batch);
                    if fault == Some(Fault::AckLost) {
                        return Err(Status::unavailable("ack lost (injected)"));
                    }
                    // The new schema itself is not modelled: its presence is what a writer reacts to.
                    let updated_schema = (stream.schema_version < schema_version).then(pb::TableSchema::default);
                    Ok(Ok(pb::AppendRowsResponse {
                        response: Some(pb::append_rows_response::Response::AppendResult(
                            pb::append_rows_response::AppendResult { offset: Some(offset) },
                        )),
                        updated_schema,
                        ..Default::default()
                    }))
                })();
                match action {
                    Ok(response) => {
                        if tx.send(response).await.is_err() {
                            return;
                        }
                    }
                    Err(broken) => {
                        let _ = tx.send(Err(broken)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn get_write_stream(
        &self,
        request: Request<pb::GetWriteStreamRequest>,
    ) -> Result<Response<pb::WriteStream>, Status> {
        let name = request.into_inner().name;
        let st = self.state.lock().unwrap();
        let s = st.streams.get(&name).ok_or_else(|| Status::not_found(name.clone()))?;
        let commit_time = s.committed.then_some(prost_types::Timestamp { seconds: 1, nanos: 0 });
        Ok(Response::new(pb::WriteStream { name, commit_time, ..Default::default() }))
    }

    async fn finalize_write_stream(
        &self,
        request: Request<pb::FinalizeWriteStreamRequest>,
    ) -> Result<Response<pb::FinalizeWriteStreamResponse>, Status> {
        let name = request.into_inner().name;
        let mut st = self.state.lock().unwrap();
        let s = st.streams.get_mut(&name).ok_or_else(|| Status::not_found(name.clone()))?;
        s.finalized = true;
        Ok(Response::new(pb::FinalizeWriteStreamResponse { row_count: s.row_count }))
    }

    async fn batch_commit_write_streams(
        &self,
        request: Request<pb::BatchCommitWriteStreamsRequest>,
    ) -> Result<Response<pb::BatchCommitWriteStreamsResponse>, Status> {
        use pb::storage_error::StorageErrorCode as C;
        let req = request.into_inner();
        let mut st = self.state.lock().unwrap();
        let mut errors = Vec::new();
        for name in &req.write_streams {
            let error = match st.streams.get(name) {
                None => Some((C::StreamNotFound, "not found")),
                Some(s) if s.buffered => Some((C::InvalidStreamType, "not a PENDING stream")),
                Some(s) if s.committed => Some((C::StreamAlreadyCommitted, "already committed")),
                Some(s) if !s.finalized => Some((C::InvalidStreamState, "not finalized")),
                Some(_) => None,
            };
            if let Some((code, message)) = error {
                errors.push(pb::StorageError {
                    code: code as i32,
                    entity: name.clone(),
                    error_message: message.into(),
                });
            }
        }
        if !errors.is_empty() {
            return Ok(Response::new(pb::BatchCommitWriteStreamsResponse { commit_time: None, stream_errors: errors }));
        }
        for name in &req.write_streams {
            if let Some(s) = st.streams.get_mut(name) {
                s.committed = true;
            }
        }
        Ok(Response::new(pb::BatchCommitWriteStreamsResponse {
            commit_time: Some(prost_types::Timestamp { seconds: 2, nanos: 0 }),
            stream_errors: Vec::new(),
        }))
    }

    /// Google's semantics: rows up to `offset` *inclusive* become visible; an offset at or behind the flushed one
    /// changes nothing; an offset past the appended rows is OUT_OF_RANGE; only BUFFERED streams flush.
    async fn flush_rows(
        &self,
        request: Request<pb::FlushRowsRequest>,
    ) -> Result<Response<pb::FlushRowsResponse>, Status> {
        let req = request.into_inner();
        let mut st = self.state.lock().unwrap();
        st.flushes += 1;
        let st_strict = st.strict_flush;
        let s = st.streams.get_mut(&req.write_stream).ok_or_else(|| Status::not_found(req.write_stream.clone()))?;
        if !s.buffered {
            return Err(Status::invalid_argument("FlushRows is for BUFFERED streams"));
        }
        let offset = req.offset.ok_or_else(|| Status::invalid_argument("offset is required"))?;
        if st_strict && s.finalized {
            return Err(Status::invalid_argument("stream is finalized"));
        }
        if st_strict && offset < s.flushed {
            return Err(Status::already_exists(format!("offset {offset} is already flushed")));
        }
        if offset < 0 || offset >= s.row_count {
            return Err(Status::out_of_range(format!(
                "offset {offset} is not a row of the stream ({} rows)",
                s.row_count
            )));
        }
        s.flushed = s.flushed.max(offset + 1);
        Ok(Response::new(pb::FlushRowsResponse { offset }))
    }
}

/// Forwards every call to a Storage Write endpoint (bqemulator) unchanged, except `FlushRows`, which it gives
/// Google's documented semantics: bqemulator reads the offset as exclusive (Google: inclusive, see
/// scripts/services/README.md), so the offset goes up by one; and bqemulator refuses a flush at or behind the
/// flushed offset, or on a finalized stream, with OUT_OF_RANGE (Google: a flush behind the flushed offset is a
/// no-op), so such a flush is answered here without reaching it. Tests put it in front of the emulator so the
/// product speaks Google's semantics; it outlives the nagare processes a crash test kills.
#[derive(Clone)]
pub struct InclusiveFlushProxy {
    upstream: pb::big_query_write_client::BigQueryWriteClient<tonic::transport::Channel>,
    /// The highest (inclusive) offset flushed through this proxy, per stream.
    flushed: Arc<Mutex<HashMap<String, i64>>>,
    /// `CreateWriteStream` calls forwarded.
    pub created: Arc<std::sync::atomic::AtomicUsize>,
}

impl InclusiveFlushProxy {
    /// A proxy for `endpoint` (`http://host:port`).
    pub fn new(endpoint: &str) -> Self {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string()).unwrap().connect_lazy();
        InclusiveFlushProxy {
            upstream: pb::big_query_write_client::BigQueryWriteClient::new(channel)
                .max_encoding_message_size(64 * 1024 * 1024)
                .max_decoding_message_size(64 * 1024 * 1024),
            flushed: Arc::default(),
            created: Arc::default(),
        }
    }

    /// Serves on a free loopback port; returns its `http://` endpoint.
    pub async fn serve(&self) -> String {
        serve_write(self.clone()).await
    }
}

#[tonic::async_trait]
impl BigQueryWrite for InclusiveFlushProxy {
    async fn create_write_stream(
        &self,
        request: Request<pb::CreateWriteStreamRequest>,
    ) -> Result<Response<pb::WriteStream>, Status> {
        let r = self.upstream.clone().create_write_stream(request.into_inner()).await;
        if r.is_ok() {
            self.created.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    type AppendRowsStream = AppendStream;

    async fn append_rows(
        &self,
        request: Request<Streaming<pb::AppendRowsRequest>>,
    ) -> Result<Response<Self::AppendRowsStream>, Status> {
        // Requests go up until the client's side ends or breaks; responses (and errors) come back as they are.
        let mut from_client = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok(Some(r)) = from_client.message().await {
                if tx.send(r).await.is_err() {
                    break;
                }
            }
        });
        let inbound = tokio_stream::wrappers::ReceiverStream::new(rx);
        let responses = self.upstream.clone().append_rows(inbound).await?.into_inner();
        Ok(Response::new(Box::pin(responses)))
    }

    async fn get_write_stream(
        &self,
        request: Request<pb::GetWriteStreamRequest>,
    ) -> Result<Response<pb::WriteStream>, Status> {
        self.upstream.clone().get_write_stream(request.into_inner()).await
    }

    async fn finalize_write_stream(
        &self,
        request: Request<pb::FinalizeWriteStreamRequest>,
    ) -> Result<Response<pb::FinalizeWriteStreamResponse>, Status> {
        self.upstream.clone().finalize_write_stream(request.into_inner()).await
    }

    async fn batch_commit_write_streams(
        &self,
        request: Request<pb::BatchCommitWriteStreamsRequest>,
    ) -> Result<Response<pb::BatchCommitWriteStreamsResponse>, Status> {
        self.upstream.clone().batch_commit_write_streams(request.into_inner()).await
    }

    async fn flush_rows(
        &self,
        request: Request<pb::FlushRowsRequest>,
    ) -> Result<Response<pb::FlushRowsResponse>, Status> {
        let mut req = request.into_inner();
        let stream = req.write_stream.clone();
        let Some(offset) = req.offset else { return Err(Status::invalid_argument("offset is required")) };
        if self.flushed.lock().unwrap().get(&stream).is_some_and(|f| *f >= offset) {
            return Ok(Response::new(pb::FlushRowsResponse { offset }));
        }
        req.offset = Some(offset + 1);
        // In a task of its own: a client killed mid-call must not leave a flush done upstream but not recorded.
        let (mut upstream, flushed) = (self.upstream.clone(), self.flushed.clone());
        tokio::spawn(async move {
            upstream.flush_rows(req).await?;
            let mut flushed = flushed.lock().unwrap();
            let f = flushed.entry(stream).or_insert(offset);
            *f = (*f).max(offset);
            Ok(Response::new(pb::FlushRowsResponse { offset }))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;
    use crate::auth::Auth;
    use crate::write::WriteClient;

    const TABLE: &str = "projects/p/datasets/d/tables/t";

    fn batch(ids: std::ops::Range<i64>) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(ids))]).unwrap()
    }

    /// Appends ids 0..n in batches of 10 (16 requests in flight at most), with `faults` queued; returns the
    /// stream's rows and the rejected ids.
    async fn append_with(faults: &[Fault], reject: Option<i64>, n: i64) -> (Fake, Vec<i64>, Vec<i64>) {
        let fake = Fake::default();
        {
            let mut st = fake.state.lock().unwrap();
            st.faults.extend(faults.iter().copied());
            st.reject = reject;
        }
        let endpoint = fake.serve().await;
        let client = WriteClient::new(&endpoint, Auth::None).unwrap();
        let stream = client.create_pending_stream(TABLE).await.unwrap();
        let mut a = client.appender(stream.clone(), &batch(0..0).schema(), 1024 * 1024).unwrap();
        let mut rejected = Vec::new();
        for start in (0..n).step_by(10) {
            for r in a.append(&batch(start..(start + 10).min(n))).await.unwrap() {
                rejected.extend(r.batch.column(0).as_primitive::<Int64Type>().values().iter().copied());
                assert!(r.reasons.iter().all(|m| m.contains("not allowed")), "{:?}", r.reasons);
            }
        }
        for r in a.flush().await.unwrap() {
            rejected.extend(r.batch.column(0).as_primitive::<Int64Type>().values().iter().copied());
        }
        let rows = client.finalize(&stream).await.unwrap();
        assert_eq!(rows, a.rows_sent(), "finalized row count matches what was acknowledged");
        client.commit_streams(TABLE, std::slice::from_ref(&stream)).await.unwrap();
        let got = fake.rows_of(&stream);
        (fake, got, rejected)
    }

    #[tokio::test]
    async fn rows_arrive_once_in_order_without_faults() {
        let (_, rows, rejected) = append_with(&[], None, 200).await;
        assert_eq!(rows, (0..200).collect::<Vec<_>>());
        assert!(rejected.is_empty());
    }

    #[tokio::test]
    async fn a_dropped_connection_resends_from_the_last_acknowledged_offset() {
        let faults = [Fault::DropConnection, Fault::AckLost, Fault::OutOfRange, Fault::AckLost];
        let (fake, rows, _) = append_with(&faults, None, 300).await;
        // Every row exactly once, in order: resent rows already written were answered ALREADY_EXISTS.
        assert_eq!(rows, (0..300).collect::<Vec<_>>());
        assert!(fake.state.lock().unwrap().append_requests > 30, "faults caused resends");
    }

    #[tokio::test]
    async fn rows_the_server_refuses_are_returned_and_the_rest_written() {
        let (_, rows, rejected) = append_with(&[Fault::AckLost], Some(42), 100).await;
        assert_eq!(rejected, vec![42]);
        assert_eq!(rows, (0..100).filter(|i| *i != 42).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn committing_again_after_a_crash_is_a_no_op() {
        let (fake, _, _) = append_with(&[], None, 10).await;
        let endpoint = fake.serve().await;
        let client = WriteClient::new(&endpoint, Auth::None).unwrap();
        let stream = format!("{TABLE}/streams/s1");
        // STREAM_ALREADY_COMMITTED counts as committed.
        client.commit_streams(TABLE, std::slice::from_ref(&stream)).await.unwrap();
        // A stream that was never finalized cannot be committed: a clear error, not success.
        let open = client.create_pending_stream(TABLE).await.unwrap();
        let err = client.commit_streams(TABLE, &[open]).await.unwrap_err().to_string();
        assert!(err.contains("not finalized"), "{err}");
    }

    /// Appends `ids` to a new BUFFERED stream.
    async fn buffered_with(client: &WriteClient, ids: std::ops::Range<i64>) -> String {
        let stream = client.create_buffered_stream(TABLE).await.unwrap();
        let mut a = client.appender(stream.clone(), &batch(0..0).schema(), 1024 * 1024).unwrap();
        a.append(&batch(ids)).await.unwrap();
        assert!(a.flush().await.unwrap().is_empty());
        stream
    }

    #[tokio::test]
    async fn buffered_rows_are_visible_up_to_the_inclusive_flush_offset_only() {
        let fake = Fake::default();
        let client = WriteClient::new(&fake.serve().await, Auth::None).unwrap();
        let stream = buffered_with(&client, 0..10).await;
        let visible = || fake.visible_keys(TABLE).iter().map(|k| k.parse::<i64>().unwrap()).collect::<Vec<_>>();
        assert!(visible().is_empty(), "appended rows of a BUFFERED stream are not visible before a flush");
        client.flush_rows(&stream, 3).await.unwrap();
        assert_eq!(visible(), (0..4).collect::<Vec<_>>(), "offset 3 is included");
        // Behind or at the flushed offset: nothing changes, no error (so recovery may flush again).
        client.flush_rows(&stream, 1).await.unwrap();
        client.flush_rows(&stream, 3).await.unwrap();
        assert_eq!(visible(), (0..4).collect::<Vec<_>>());
        // Past the rows appended: OUT_OF_RANGE, nothing changes.
        let err = client.flush_rows(&stream, 10).await.unwrap_err().to_string();
        assert!(err.contains("OutOfRange") || err.contains("out of range") || err.contains("not a row"), "{err}");
        assert_eq!(visible(), (0..4).collect::<Vec<_>>());
        client.flush_rows(&stream, 9).await.unwrap();
        assert_eq!(visible(), (0..10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn flushing_again_is_done_whether_the_server_says_ok_or_already_exists() {
        let fake = Fake::default();
        fake.state.lock().unwrap().strict_flush = true;
        let client = WriteClient::new(&fake.serve().await, Auth::None).unwrap();
        let stream = buffered_with(&client, 0..10).await;
        client.flush_rows(&stream, 4).await.unwrap();
        client.flush_rows(&stream, 4).await.unwrap();
        client.flush_rows(&stream, 2).await.unwrap();
        assert_eq!(fake.visible_keys(TABLE).len(), 5);
        client.finalize(&stream).await.unwrap();
        // Flushing a finalized stream is an error for the client; only recovery reads it as done.
        let err = client.flush_rows(&stream, 4).await.unwrap_err().to_string();
        assert!(err.contains("finalized"), "{err}");
    }

    #[tokio::test]
    async fn a_finalized_buffered_stream_refuses_appends_and_keeps_unflushed_rows_invisible() {
        let fake = Fake::default();
        let client = WriteClient::new(&fake.serve().await, Auth::None).unwrap();
        let stream = buffered_with(&client, 0..10).await;
        client.flush_rows(&stream, 4).await.unwrap();
        assert_eq!(client.finalize(&stream).await.unwrap(), 10);
        // Flushing what the checkpoint covered again after finalizing (recovery's order) is still fine.
        client.flush_rows(&stream, 4).await.unwrap();
        let mut a = client.appender(stream.clone(), &batch(0..0).schema(), 1024 * 1024).unwrap();
        let err = match a.append(&batch(10..12)).await {
            Err(e) => e,
            Ok(_) => a.flush().await.unwrap_err(),
        };
        assert!(err.to_string().contains("finalized"), "{err}");
        assert_eq!(fake.visible_keys(TABLE).len(), 5, "rows 5..10 were never flushed and never become visible");
        // A BUFFERED stream cannot be committed like a PENDING one.
        let err = client.commit_streams(TABLE, std::slice::from_ref(&stream)).await.unwrap_err().to_string();
        assert!(err.contains("not a PENDING stream"), "{err}");
    }
}
