//! `write_mode = 'upsert'`: BigQuery CDC. Each row is the new image of its key (or its deletion), written as a
//! protobuf row to the table's `_default` stream with `_CHANGE_TYPE` (`UPSERT` or `DELETE`) and
//! `_CHANGE_SEQUENCE_NUMBER`; BigQuery keeps, per PRIMARY KEY, the change with the greatest sequence number.
//!
//! The sequence comes from the rows themselves (`sequence_by`: a version, an update time, a binlog position), so a
//! change replayed after a recovery carries the same number as before and applying it again changes nothing: with
//! checkpoints the sink waits at each barrier until every change is acknowledged, and what the source replays
//! after a crash is idempotent. The planner puts a collapse operator in front of the sink, so only the last change
//! per key per checkpoint is sent.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::datatypes::{Int64Type, UInt64Type};
use async_trait::async_trait;
use nagare_core::CheckpointId;
use nagare_engine::EngineError;
use nagare_engine::connector::{Sink, SinkContext};
use nagare_sql::SinkSpec;
use nagare_sql::options::Options;

use crate::error::BqError;
use crate::proto::{ChangeType, sequence_number};
use crate::target::{Target, dead_letter};
use crate::types::{to_wire, wire_schema};
use crate::write::{Appender, Rejected, WriteClient};

/// The columns ordering a key's changes (`sequence_by`).
pub fn sequence_columns(o: &Options) -> Vec<String> {
    crate::config::columns_of(o, "sequence_by")
}

/// Whether a column type can be a sequence section (an integer, a timestamp or a date).
pub fn is_sequence_type(t: &DataType) -> bool {
    t.is_integer() || matches!(t, DataType::Timestamp(..) | DataType::Date32 | DataType::Date64)
}

/// The schema written to BigQuery: the sink's columns without `change_type_column`.
pub fn table_columns(spec: &SinkSpec, schema: &SchemaRef) -> SchemaRef {
    match crate::config::BigQueryConfig::of(spec).ok().and_then(|c| c.change_type_column) {
        Some(c) => {
            Arc::new(Schema::new(schema.fields().iter().filter(|f| f.name() != &c).cloned().collect::<Vec<_>>()))
        }
        None => schema.clone(),
    }
}

/// The sequence columns as order-preserving unsigned values (signed values have their sign bit flipped), cast
/// once per batch; NULLs stay NULL.
fn section_columns(columns: &[ArrayRef]) -> Result<Vec<UInt64Array>, BqError> {
    columns
        .iter()
        .map(|c| {
            if c.data_type().is_unsigned_integer() {
                Ok(arrow::compute::cast(c, &DataType::UInt64)?.as_primitive::<UInt64Type>().clone())
            } else {
                let signed = arrow::compute::cast(c, &DataType::Int64)?;
                Ok(signed.as_primitive::<Int64Type>().unary(|v| (v as u64) ^ (1 << 63)))
            }
        })
        .collect()
}

/// One section per sequence column for `row`; `None` if any is NULL.
fn sections(columns: &[UInt64Array], row: usize) -> Option<Vec<u64>> {
    columns.iter().map(|c| c.is_valid(row).then(|| c.value(row))).collect()
}

/// The change a row stands for, from `change_type_column` (Debezium's one-letter ops too); `None` if unknown.
fn change_type(value: Option<&str>) -> Option<ChangeType> {
    match value.map(str::trim).map(str::to_ascii_uppercase).as_deref() {
        None | Some("UPSERT" | "INSERT" | "UPDATE" | "C" | "R" | "U") => Some(ChangeType::Upsert),
        Some("DELETE" | "D") => Some(ChangeType::Delete),
        _ => None,
    }
}

/// One subtask of an upsert-mode bigquery sink.
pub struct UpsertSink {
    target: Target,
    client: WriteClient,
    name: String,
    ctx: SinkContext,
    /// Table columns: indices in the input, and their wire schema.
    data: Vec<usize>,
    data_wire: SchemaRef,
    /// `data_wire` plus `_CHANGE_TYPE` and `_CHANGE_SEQUENCE_NUMBER`.
    wire: SchemaRef,
    sequence: Vec<usize>,
    change: Option<usize>,
    appender: Option<Appender>,
}

impl std::fmt::Debug for UpsertSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpsertSink").field("table", &self.target.table).finish()
    }
}

impl UpsertSink {
    /// A subtask writing changes of `schema`.
    pub fn new(spec: &SinkSpec, schema: SchemaRef, ctx: SinkContext) -> Result<Self, BqError> {
        let config = crate::config::BigQueryConfig::of(spec)?;
        let target = Target::from_config(&config)?;
        let index = |c: &str| {
            schema.index_of(c).map_err(|_| BqError::Config(format!("sink '{}' has no column '{c}'", spec.table.name)))
        };
        let change = config.change_type_column.as_deref().map(index).transpose()?;
        let sequence = config.sequence_by.iter().map(|c| index(c)).collect::<Result<Vec<_>, _>>()?;
        let data: Vec<usize> = (0..schema.fields().len()).filter(|i| Some(*i) != change).collect();
        let data_wire = wire_schema(&schema.project(&data)?);
        let mut fields: Vec<Arc<Field>> = data_wire.fields().iter().cloned().collect();
        for n in ["_CHANGE_TYPE", "_CHANGE_SEQUENCE_NUMBER"] {
            fields.push(Arc::new(Field::new(n, DataType::Utf8, false)));
        }
        Ok(UpsertSink {
            client: target.write_client()?,
            target,
            name: spec.table.name.clone(),
            ctx,
            data,
            data_wire,
            wire: Arc::new(Schema::new(fields)),
            sequence,
            change,
            appender: None,
        })
    }

    /// The rows to send (in wire types, with the CDC columns), and the rows that cannot be sent, with reasons.
    fn changes(&self, batch: &RecordBatch) -> Result<(Option<RecordBatch>, Vec<Rejected>), BqError> {
        let seq_cols: Vec<ArrayRef> = self.sequence.iter().map(|i| batch.column(*i).clone()).collect();
        let seq_cols = section_columns(&seq_cols)?;
        let change_col = self.change.map(|i| arrow::compute::cast(batch.column(i), &DataType::Utf8)).transpose()?;
        let (mut good, mut types, mut seqs) = (Vec::new(), Vec::new(), Vec::new());
        let (mut bad, mut reasons) = (Vec::new(), Vec::new());
        for row in 0..batch.num_rows() {
            let text = change_col
                .as_ref()
                .and_then(|c| c.as_string::<i32>().is_valid(row).then(|| c.as_string::<i32>().value(row)));
            let Some(kind) = change_type(text) else {
                bad.push(row as u32);
                reasons.push(format!(
                    "change type '{}' is neither UPSERT (INSERT, UPDATE, c, r, u) nor DELETE (d)",
                    text.unwrap_or_default()
                ));
                continue;
            };
            let Some(s) = sections(&seq_cols, row) else {
                bad.push(row as u32);
                reasons.push("a sequence_by column is NULL: the change cannot be ordered".into());
                continue;
            };
            good.push(row as u32);
            types.push(kind.as_str());
            seqs.push(sequence_number(&s)?);
        }
        let rejected = if bad.is_empty() {
            Vec::new()
        } else {
            vec![Rejected { batch: take_record_batch(batch, &UInt32Array::from(bad))?, reasons }]
        };
        if good.is_empty() {
            return Ok((None, rejected));
        }
        let rows = take_record_batch(&batch.project(&self.data)?, &UInt32Array::from(good))?;
        let mut cols = to_wire(&rows, &self.data_wire)?.columns().to_vec();
        cols.push(Arc::new(StringArray::from(types)));
        cols.push(Arc::new(StringArray::from(seqs)));
        Ok((Some(RecordBatch::try_new(self.wire.clone(), cols)?), rejected))
    }
}

#[async_trait]
impl Sink for UpsertSink {
    async fn write(&mut self, batch: RecordBatch) -> Result<(), EngineError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let (rows, bad) = self.changes(&batch)?;
        dead_letter(&self.ctx, &self.name, "Cannot upsert", bad)?;
        let Some(rows) = rows else { return Ok(()) };
        if self.appender.is_none() {
            let table = self.target.table.path();
            self.appender =
                Some(self.client.default_stream_proto_appender(&table, &self.wire, self.target.max_request_bytes)?);
        }
        let Some(a) = self.appender.as_mut() else { return Ok(()) };
        let rejected = a.append(&rows).await?;
        dead_letter(&self.ctx, &self.name, "BigQuery rejected", rejected)
    }

    /// Every change sent so far is acknowledged before the checkpoint can complete; there is nothing to commit.
    async fn pre_commit(&mut self, _checkpoint: CheckpointId, _last: bool) -> Result<serde_json::Value, EngineError> {
        if let Some(a) = self.appender.as_mut() {
            let rejected = a.flush().await?;
            dead_letter(&self.ctx, &self.name, "BigQuery rejected", rejected)?;
        }
        Ok(serde_json::Value::Null)
    }

    async fn commit(&mut self, _checkpoint: CheckpointId) -> Result<(), EngineError> {
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), EngineError> {
        if let Some(a) = self.appender.as_mut() {
            let rejected = a.flush().await?;
            dead_letter(&self.ctx, &self.name, "BigQuery rejected", rejected)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use arrow::array::{Int64Array, TimestampMicrosecondArray};

    use super::*;

    #[test]
    fn sequence_sections_keep_the_order_of_signed_values() {
        let col: ArrayRef = Arc::new(Int64Array::from(vec![Some(-5), Some(0), Some(7), None]));
        let ts: ArrayRef = Arc::new(TimestampMicrosecondArray::from(vec![1, 1, 2, 3]));
        let cols = section_columns(&[col.clone(), ts.clone()]).unwrap();
        let s = |r| sections(&cols, r);
        assert!(s(0).unwrap() < s(1).unwrap() && s(1).unwrap() < s(2).unwrap());
        assert_eq!(s(3), None, "NULL cannot be ordered");
        assert_eq!(sequence_number(&s(1).unwrap()).unwrap(), "8000000000000000/8000000000000001");
    }

    #[test]
    fn change_types_accept_debezium_ops_and_refuse_others() {
        assert_eq!(change_type(None), Some(ChangeType::Upsert));
        for u in ["UPSERT", "insert", "Update", "c", "r", "u"] {
            assert_eq!(change_type(Some(u)), Some(ChangeType::Upsert), "{u}");
        }
        assert_eq!(change_type(Some("d")), Some(ChangeType::Delete));
        assert_eq!(change_type(Some(" DELETE ")), Some(ChangeType::Delete));
        assert_eq!(change_type(Some("truncate")), None);
    }
}
