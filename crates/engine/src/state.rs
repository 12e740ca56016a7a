//! Keyed operator state as rows, the layout the keyed operators (dedup, windows, sessions) share: named, typed
//! columns plus a `_key_group` column, so that a restore reads columns by name (a missing or retyped column is a
//! clear refusal, never a misread by position) and a rescaled job keeps only its own key groups.

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, SchemaRef, UInt16Type};
use nagare_core::KeyGroupRange;

use crate::error::{EngineError, Result};

/// The column every keyed state part carries: the key group of the row's key.
pub const KEY_GROUP: &str = "_key_group";

/// The rows of a keyed state part that belong to this subtask, read by column name.
pub struct StateRows {
    batch: RecordBatch,
    what: String,
}

impl StateRows {
    /// The rows of `part` (which `what` names in errors, e.g. "window state") in the key groups `mine`.
    pub fn mine(part: RecordBatch, mine: KeyGroupRange, what: &str) -> Result<StateRows> {
        let rows = StateRows { batch: part, what: what.to_string() };
        let groups = rows.column(KEY_GROUP, &DataType::UInt16)?;
        let groups = groups.as_primitive::<UInt16Type>();
        let keep: BooleanArray = groups.values().iter().map(|g| Some(mine.contains(u32::from(*g)))).collect();
        Ok(StateRows { batch: filter_record_batch(&rows.batch, &keep)?, what: rows.what })
    }

    /// Column `name`, which must have type `data_type`; a checkpoint without it, or with another type, was written
    /// by another version of nagare or of the pipeline and is refused, naming the column.
    pub fn column(&self, name: &str, data_type: &DataType) -> Result<ArrayRef> {
        let Some(c) = self.batch.column_by_name(name) else {
            return Err(incompatible(&self.what, &format!("has no column '{name}'")));
        };
        if c.data_type() != data_type {
            return Err(incompatible(&self.what, &format!("has '{name}' as {}, not {data_type}", c.data_type())));
        }
        Ok(c.clone())
    }

    /// Columns `names` with the types of `schema`'s fields of the same names, as one batch of that schema.
    pub fn columns(&self, schema: &SchemaRef) -> Result<RecordBatch> {
        let cols = schema.fields().iter().map(|f| self.column(f.name(), f.data_type())).collect::<Result<Vec<_>>>()?;
        Ok(RecordBatch::try_new(schema.clone(), cols)?)
    }

    /// Rows held.
    pub fn num_rows(&self) -> usize {
        self.batch.num_rows()
    }
}

/// State a restore cannot read.
fn incompatible(what: &str, problem: &str) -> EngineError {
    EngineError::Config(format!(
        "the checkpoint's {what} {problem}: it was written by another version of nagare or of the pipeline; restore \
         it with the version that wrote it, or start the job without it"
    ))
}

/// Rows of `batch` whose keys (`keys`, one array per key column) fall in the key groups `mine`.
pub fn rows_in(
    batch: &RecordBatch,
    keys: &[ArrayRef],
    mine: KeyGroupRange,
    max_parallelism: u32,
) -> Result<RecordBatch> {
    let groups = crate::operators::key_groups_of(keys, batch.num_rows(), max_parallelism)?;
    let keep: BooleanArray = groups.iter().map(|g| Some(mine.contains(u32::from(*g)))).collect();
    Ok(filter_record_batch(batch, &keep)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    use super::*;

    /// A part as the operators write it: keys, key group, values.
    fn part() -> RecordBatch {
        let keys: ArrayRef = Arc::new(StringArray::from((0..100).map(|i| format!("k{i}")).collect::<Vec<_>>()));
        let groups = crate::operators::key_groups_of(std::slice::from_ref(&keys), 100, 128).unwrap();
        let schema = Schema::new(vec![
            Field::new("k0", DataType::Utf8, true),
            Field::new(KEY_GROUP, DataType::UInt16, false),
            Field::new("n", DataType::Int64, false),
        ]);
        let columns: Vec<ArrayRef> = vec![
            keys,
            Arc::new(arrow::array::UInt16Array::from(groups)),
            Arc::new(Int64Array::from_iter_values(0..100)),
        ];
        RecordBatch::try_new(Arc::new(schema), columns).unwrap()
    }

    #[test]
    fn subtasks_split_the_rows_by_key_group_and_read_by_name() {
        let p = part();
        assert_eq!(p.schema().field(1).name(), KEY_GROUP);
        let halves = [KeyGroupRange { start: 0, end: 64 }, KeyGroupRange { start: 64, end: 128 }];
        let mut total = 0;
        for range in halves {
            let rows = StateRows::mine(p.clone(), range, "test state").unwrap();
            total += rows.num_rows();
            let n = rows.column("n", &DataType::Int64).unwrap();
            assert_eq!(n.len(), rows.num_rows());
            // The same split as routing the keys.
            let keys = rows.column("k0", &DataType::Utf8).unwrap();
            assert_eq!(rows_in(&rows.batch, &[keys], range, 128).unwrap().num_rows(), rows.num_rows());
        }
        assert_eq!(total, 100, "every row in exactly one subtask");
    }

    #[test]
    fn a_missing_or_retyped_column_is_refused_by_name() {
        let rows = StateRows::mine(part(), KeyGroupRange { start: 0, end: 128 }, "window state").unwrap();
        let e = rows.column("s0_0", &DataType::Int64).err().unwrap().to_string();
        assert!(e.contains("window state has no column 's0_0'"), "{e}");
        let e = rows.column("n", &DataType::Utf8).err().unwrap().to_string();
        assert!(e.contains("'n' as Int64, not Utf8"), "{e}");
        let no_groups = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)])),
            vec![Arc::new(Int64Array::from(vec![1]))],
        )
        .unwrap();
        let e = StateRows::mine(no_groups, KeyGroupRange { start: 0, end: 128 }, "session state").err().unwrap();
        assert!(e.to_string().contains("has no column '_key_group'"), "{e}");
    }
}
