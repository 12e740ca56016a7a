//! The streaming operators: row-wise calc, dedup, windowed aggregates.

pub mod calc;
pub mod collapse;
pub mod dedup;
pub mod session;
pub mod window;

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Int64Type, TimeUnit};
use arrow::record_batch::RecordBatch;
use nagare_sql::LateRowPolicy;

use crate::dead_letter::DeadLetterWriter;
use crate::error::{EngineError, Result};
use crate::metrics::NodeMetrics;

/// What a stateful operator needs besides its spec.
#[derive(Debug, Clone)]
pub struct OperatorContext {
    /// The node's label, for dead-letter records and errors.
    pub label: String,
    /// The node's counters.
    pub metrics: Arc<NodeMetrics>,
    /// Late rows policy.
    pub late_rows: LateRowPolicy,
    /// Where late rows go when the policy says so.
    pub dead_letter: Option<Arc<DeadLetterWriter>>,
    /// Key groups of the job.
    pub max_parallelism: u32,
    /// The key groups this subtask owns (restored state outside it belongs to other subtasks).
    pub key_groups: nagare_core::KeyGroupRange,
}

impl OperatorContext {
    /// Counts late rows and dead-letters them if configured.
    pub fn late(&self, rows: &RecordBatch, watermark: i64) -> Result<()> {
        if rows.num_rows() == 0 {
            return Ok(());
        }
        NodeMetrics::add(&self.metrics.late_rows, rows.num_rows());
        if self.late_rows == LateRowPolicy::DeadLetter
            && let Some(dl) = &self.dead_letter
        {
            let reason = format!("late: event time at or before the watermark {}", format_micros(watermark));
            dl.write_rows(&self.label, &reason, rows)?;
        }
        Ok(())
    }
}

/// The key group of each row of `keys` (the same hash the partitioner routes by).
pub fn key_groups_of(keys: &[ArrayRef], rows: usize, max_parallelism: u32) -> Result<Vec<u16>> {
    let hashes = nagare_core::hash_columns(keys, rows)?;
    Ok(hashes.iter().map(|h| nagare_core::keys::key_group_of(*h, max_parallelism) as u16).collect())
}

/// A one-row batch holding the operator's watermark (and any other scalars), for the `meta` state part.
pub fn meta_part(values: &[(&str, i64)]) -> Result<crate::operator::StatePart> {
    use arrow::datatypes::{Field, Schema};
    let schema =
        Arc::new(Schema::new(values.iter().map(|(n, _)| Field::new(*n, DataType::Int64, false)).collect::<Vec<_>>()));
    let cols: Vec<ArrayRef> =
        values.iter().map(|(_, v)| Arc::new(arrow::array::Int64Array::from(vec![*v])) as ArrayRef).collect();
    Ok(crate::operator::StatePart::new("meta", RecordBatch::try_new(schema, cols)?))
}

/// Reads a scalar of the `meta` part; with several subtasks' parts concatenated, the smallest (the most cautious
/// watermark).
pub fn meta_value(meta: &RecordBatch, name: &str) -> Result<Option<i64>> {
    let Some(col) = meta.column_by_name(name) else { return Ok(None) };
    let col = col
        .as_primitive_opt::<Int64Type>()
        .ok_or_else(|| EngineError::Internal(format!("meta {name} is not Int64")))?;
    Ok(arrow::compute::min(col))
}

/// Event times of a timestamp column in µs since the epoch (nulls as `None`).
pub fn event_times(column: &ArrayRef) -> Result<(Vec<i64>, Option<arrow::buffer::NullBuffer>)> {
    let DataType::Timestamp(unit, _) = column.data_type() else {
        return Err(EngineError::Internal(format!("event-time column has type {}", column.data_type())));
    };
    let unit = *unit;
    let raw = arrow::compute::cast(column, &DataType::Int64)?;
    let raw = raw.as_primitive::<Int64Type>();
    let values = match unit {
        TimeUnit::Microsecond => raw.values().to_vec(),
        _ => raw.values().iter().map(|v| nagare_core::keys::to_micros(*v, unit)).collect(),
    };
    Ok((values, column.logical_nulls()))
}

/// A µs timestamp as RFC 3339, for messages.
pub fn format_micros(us: i64) -> String {
    if us == i64::MAX {
        return "end of input".into();
    }
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("{us}us"))
}
