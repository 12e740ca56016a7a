//! A test double of BigQuery's CDC on the `_default` stream, as Google documents it ("Stream table updates with
//! change data capture"): protobuf rows carrying `_CHANGE_TYPE` (`UPSERT` or `DELETE`) and, optionally,
//! `_CHANGE_SEQUENCE_NUMBER` (one to four `/`-separated hexadecimal sections of at most 16 digits, compared section
//! by section as unsigned numbers). Per PRIMARY KEY the change with the greatest sequence number is applied; on equal
//! numbers the one written last wins; a deletion is remembered with its number, so an older upsert arriving later
//! does not bring the row back. bqemulator has no CDC, hence this double. Test code only: it decodes rows with its
//! own reading of the descriptor, independently of nagare's encoder.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use googleapis_tonic_google_cloud_bigquery_storage_v1::google::cloud::bigquery::storage::v1 as pb;
use googleapis_tonic_google_cloud_bigquery_storage_v1::google::rpc::Status as RpcStatus;
use prost_types::field_descriptor_proto::Type;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::generated::big_query_write_server::BigQueryWrite;

/// A decoded field value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
    Bytes(Vec<u8>),
}

/// A row: column name to value (absent: NULL).
pub type Row = BTreeMap<String, Value>;

/// One key's latest change: its sequence sections (empty without one) and the row, `None` once deleted.
#[derive(Debug, Clone)]
pub struct Entry {
    pub sequence: Vec<u64>,
    pub row: Option<Row>,
}

#[derive(Debug, Default)]
pub struct State {
    /// Per table path (`projects/p/datasets/d/tables/t`): its PRIMARY KEY columns.
    pub keys: HashMap<String, Vec<String>>,
    /// Per table path: key (the key columns' values, debug-printed) to its latest change.
    pub tables: HashMap<String, HashMap<String, Entry>>,
    /// Changes received (including replays and ones that lost to a newer sequence).
    pub changes_received: usize,
}

/// The CDC double; clone it to keep a handle on its state.
#[derive(Clone, Default)]
pub struct CdcDouble {
    pub state: Arc<Mutex<State>>,
}

impl CdcDouble {
    /// Declares a table (its path as in stream names) and its PRIMARY KEY.
    pub fn add_table(&self, table: &str, key: &[&str]) {
        let mut st = self.state.lock().unwrap();
        st.keys.insert(table.to_string(), key.iter().map(|k| k.to_string()).collect());
        st.tables.entry(table.to_string()).or_default();
    }

    /// The rows a query of the table would return now.
    pub fn rows(&self, table: &str) -> Vec<Row> {
        let st = self.state.lock().unwrap();
        st.tables.get(table).map(|t| t.values().filter_map(|e| e.row.clone()).collect()).unwrap_or_default()
    }

    /// Serves on a free loopback port (on the current tokio runtime); returns its `http://` endpoint.
    pub async fn serve(&self) -> String {
        crate::testing::serve_write(self.clone()).await
    }

    /// Applies the rows of one request; the errors of rows that cannot be applied (none is applied then, as
    /// BigQuery refuses a request with row errors).
    fn apply(&self, table: &str, descriptor: &prost_types::DescriptorProto, rows: &[Vec<u8>]) -> Vec<pb::RowError> {
        let mut st = self.state.lock().unwrap();
        let Some(key_cols) = st.keys.get(table).cloned() else {
            return vec![row_error(0, format!("table {table} has no PRIMARY KEY: CDC writes are refused"))];
        };
        let mut changes = Vec::new();
        let mut errors = Vec::new();
        for (i, bytes) in rows.iter().enumerate() {
            match change(descriptor, bytes, &key_cols) {
                Ok(c) => changes.push(c),
                Err(e) => errors.push(row_error(i, e)),
            }
        }
        if !errors.is_empty() {
            return errors;
        }
        st.changes_received += changes.len();
        let t = st.tables.entry(table.to_string()).or_default();
        for (key, sequence, row) in changes {
            match t.get(&key) {
                // Greater wins; equal: the later write wins.
                Some(e) if e.sequence > sequence => {}
                _ => {
                    t.insert(key, Entry { sequence, row });
                }
            }
        }
        Vec::new()
    }
}

fn row_error(index: usize, message: String) -> pb::RowError {
    pb::RowError { index: index as i64, code: pb::row_error::RowErrorCode::FieldsError as i32, message }
}

/// Decodes one row and reads its key, sequence and change.
#[allow(clippy::type_complexity)]
fn change(
    descriptor: &prost_types::DescriptorProto,
    bytes: &[u8],
    key_cols: &[String],
) -> Result<(String, Vec<u64>, Option<Row>), String> {
    let mut row = decode(descriptor, bytes)?;
    let kind = match row.remove("_CHANGE_TYPE") {
        Some(Value::Text(t)) if t == "UPSERT" || t == "DELETE" => t,
        other => return Err(format!("_CHANGE_TYPE must be UPSERT or DELETE, not {other:?}")),
    };
    let sequence = match row.remove("_CHANGE_SEQUENCE_NUMBER") {
        None => Vec::new(),
        Some(Value::Text(s)) => {
            let parts: Vec<&str> = s.split('/').collect();
            if parts.len() > 4 || parts.iter().any(|p| p.is_empty() || p.len() > 16) {
                return Err(format!("bad _CHANGE_SEQUENCE_NUMBER '{s}'"));
            }
            parts
                .iter()
                .map(|p| u64::from_str_radix(p, 16).map_err(|_| format!("bad _CHANGE_SEQUENCE_NUMBER '{s}'")))
                .collect::<Result<Vec<u64>, String>>()?
        }
        Some(other) => return Err(format!("_CHANGE_SEQUENCE_NUMBER is not a string: {other:?}")),
    };
    let mut key = Vec::new();
    for k in key_cols {
        match row.get(k) {
            Some(v) => key.push(format!("{v:?}")),
            None => return Err(format!("primary key column '{k}' is missing")),
        }
    }
    let row = (kind == "UPSERT").then_some(row);
    Ok((key.join("|"), sequence, row))
}

/// Reads a protobuf message with the descriptor's scalar fields (what upsert tests write).
fn decode(descriptor: &prost_types::DescriptorProto, mut buf: &[u8]) -> Result<Row, String> {
    use prost::encoding::{WireType, decode_key, decode_varint};
    let mut row = Row::new();
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf).map_err(|e| e.to_string())?;
        let field = descriptor
            .field
            .iter()
            .find(|f| f.number() == tag as i32)
            .ok_or_else(|| format!("field number {tag} is not in the writer schema"))?;
        let value = match wire {
            WireType::Varint => {
                let v = decode_varint(&mut buf).map_err(|e| e.to_string())?;
                match field.r#type() {
                    Type::Bool => Value::Bool(v != 0),
                    Type::Int32 => Value::Int(i64::from(v as i32)),
                    _ => Value::Int(v as i64),
                }
            }
            WireType::SixtyFourBit => {
                let (b, rest) = buf.split_at_checked(8).ok_or("truncated double")?;
                buf = rest;
                Value::Float(f64::from_le_bytes(b.try_into().map_err(|_| "truncated double")?))
            }
            WireType::LengthDelimited => {
                let n = decode_varint(&mut buf).map_err(|e| e.to_string())? as usize;
                let (b, rest) = buf.split_at_checked(n).ok_or("truncated field")?;
                buf = rest;
                match field.r#type() {
                    Type::String => Value::Text(String::from_utf8(b.to_vec()).map_err(|e| e.to_string())?),
                    _ => Value::Bytes(b.to_vec()),
                }
            }
            other => return Err(format!("wire type {other:?} is not used by BigQuery rows")),
        };
        row.insert(field.name().to_string(), value);
    }
    Ok(row)
}

type AppendStream = Pin<Box<dyn Stream<Item = Result<pb::AppendRowsResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl BigQueryWrite for CdcDouble {
    async fn create_write_stream(
        &self,
        _request: Request<pb::CreateWriteStreamRequest>,
    ) -> Result<Response<pb::WriteStream>, Status> {
        Err(Status::unimplemented("the CDC double has only _default streams"))
    }

    type AppendRowsStream = AppendStream;

    async fn append_rows(
        &self,
        request: Request<Streaming<pb::AppendRowsRequest>>,
    ) -> Result<Response<Self::AppendRowsStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let double = self.clone();
        tokio::spawn(async move {
            let mut descriptor: Option<prost_types::DescriptorProto> = None;
            while let Ok(Some(req)) = inbound.message().await {
                let Some(table) = req.write_stream.strip_suffix("/streams/_default").map(str::to_string) else {
                    let _ = tx.send(Err(Status::invalid_argument("CDC writes go to the _default stream"))).await;
                    return;
                };
                let Some(pb::append_rows_request::Rows::ProtoRows(data)) = req.rows else {
                    let _ = tx.send(Err(Status::invalid_argument("CDC writes use proto_rows"))).await;
                    return;
                };
                if let Some(d) = data.writer_schema.and_then(|s| s.proto_descriptor) {
                    descriptor = Some(d);
                }
                let (Some(d), Some(rows)) = (&descriptor, data.rows) else {
                    let _ = tx.send(Err(Status::invalid_argument("no writer schema"))).await;
                    return;
                };
                let errors = double.apply(&table, d, &rows.serialized_rows);
                let response = if errors.is_empty() {
                    pb::AppendRowsResponse {
                        response: Some(pb::append_rows_response::Response::AppendResult(
                            pb::append_rows_response::AppendResult { offset: None },
                        )),
                        ..Default::default()
                    }
                } else {
                    pb::AppendRowsResponse {
                        response: Some(pb::append_rows_response::Response::Error(RpcStatus {
                            code: tonic::Code::InvalidArgument as i32,
                            message: "rows have errors".into(),
                            details: Vec::new(),
                        })),
                        row_errors: errors,
                        ..Default::default()
                    }
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn get_write_stream(
        &self,
        _request: Request<pb::GetWriteStreamRequest>,
    ) -> Result<Response<pb::WriteStream>, Status> {
        Err(Status::unimplemented("the CDC double has only _default streams"))
    }

    async fn finalize_write_stream(
        &self,
        _request: Request<pb::FinalizeWriteStreamRequest>,
    ) -> Result<Response<pb::FinalizeWriteStreamResponse>, Status> {
        Err(Status::unimplemented("the CDC double has only _default streams"))
    }

    async fn batch_commit_write_streams(
        &self,
        _request: Request<pb::BatchCommitWriteStreamsRequest>,
    ) -> Result<Response<pb::BatchCommitWriteStreamsResponse>, Status> {
        Err(Status::unimplemented("the CDC double has only _default streams"))
    }

    async fn flush_rows(
        &self,
        _request: Request<pb::FlushRowsRequest>,
    ) -> Result<Response<pb::FlushRowsResponse>, Status> {
        Err(Status::unimplemented("the CDC double has only _default streams"))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;
    use crate::auth::Auth;
    use crate::write::WriteClient;

    const TABLE: &str = "projects/p/datasets/d/tables/t";

    fn changes(rows: &[(i64, &str, &str, &str)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Utf8, false),
            Field::new("_CHANGE_TYPE", DataType::Utf8, false),
            Field::new("_CHANGE_SEQUENCE_NUMBER", DataType::Utf8, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())),
                Arc::new(StringArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
                Arc::new(StringArray::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())),
                Arc::new(StringArray::from(rows.iter().map(|r| r.3).collect::<Vec<_>>())),
            ],
        )
        .unwrap()
    }

    fn values(double: &CdcDouble) -> Vec<(i64, String)> {
        let mut out: Vec<(i64, String)> = double
            .rows(TABLE)
            .iter()
            .map(|r| match (&r["k"], &r["v"]) {
                (Value::Int(k), Value::Text(v)) => (*k, v.clone()),
                other => panic!("{other:?}"),
            })
            .collect();
        out.sort();
        out
    }

    #[tokio::test]
    async fn the_greatest_sequence_wins_deletes_stick_and_replays_change_nothing() {
        let double = CdcDouble::default();
        double.add_table(TABLE, &["k"]);
        let endpoint = double.serve().await;
        let client = WriteClient::new(&endpoint, Auth::None).unwrap();
        let batch = changes(&[
            (1, "a", "UPSERT", "1/A"),
            (1, "old", "UPSERT", "1/9"), // older: ignored
            (2, "b", "UPSERT", "2"),
            (2, "gone", "DELETE", "3"),    // deleted ...
            (2, "back?", "UPSERT", "2/F"), // ... and an older upsert does not bring it back (2/F < 3)
            (3, "c", "UPSERT", "5"),
            (3, "tie", "UPSERT", "5"), // equal: the later write wins
        ]);
        let mut a = client.default_stream_proto_appender(TABLE, &batch.schema(), 1 << 20).unwrap();
        assert!(a.append(&batch).await.unwrap().is_empty());
        assert!(a.flush().await.unwrap().is_empty());
        assert_eq!(values(&double), vec![(1, "a".into()), (3, "tie".into())]);
        // The same changes again (a replay after a crash): nothing changes.
        a.append(&batch).await.unwrap();
        a.flush().await.unwrap();
        assert_eq!(values(&double), vec![(1, "a".into()), (3, "tie".into())]);
        // A bad change type is a row error for the writer to dead-letter.
        let mut rejected = a.append(&changes(&[(4, "x", "MERGE", "1"), (5, "y", "UPSERT", "1")])).await.unwrap();
        rejected.extend(a.flush().await.unwrap());
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert!(rejected[0].reasons[0].contains("UPSERT or DELETE"), "{:?}", rejected[0].reasons);
        assert_eq!(values(&double), vec![(1, "a".into()), (3, "tie".into()), (5, "y".into())]);
    }
}
