//! Keys, key groups and subtasks, as in Flink: a key hashes to one of `max_parallelism` key groups, and each subtask
//! of an operator owns a contiguous range of key groups. State is kept per key group so that a job can be rescaled by
//! reassigning ranges. The hash is stable across processes, machines and releases (xxh3 over a canonical encoding of
//! each value), because key groups outlive the process that computed them.

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, TimeUnit};
use arrow::error::ArrowError;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Key groups per job unless the pipeline sets `max_parallelism`.
pub const DEFAULT_MAX_PARALLELISM: u32 = 128;

/// Seed of the first key column; later columns are seeded with the hash so far.
const SEED: u64 = 0x6e61_6761_7265_0001;
/// Canonical hash input of a NULL key value.
const NULL_MARKER: &[u8] = b"\x00nagare-null\x00";

/// A half-open range `[start, end)` of key groups owned by one subtask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyGroupRange {
    /// First key group in the range.
    pub start: u32,
    /// One past the last key group.
    pub end: u32,
}

impl KeyGroupRange {
    /// The range subtask `index` of `parallelism` owns out of `max_parallelism` key groups.
    pub fn for_subtask(max_parallelism: u32, parallelism: u32, index: u32) -> KeyGroupRange {
        let (max, p, i) = (u64::from(max_parallelism), u64::from(parallelism.max(1)), u64::from(index));
        let start = (i * max).div_ceil(p);
        let end = ((i + 1) * max).div_ceil(p);
        KeyGroupRange { start: start as u32, end: end as u32 }
    }

    /// Whether `key_group` is in the range.
    pub fn contains(&self, key_group: u32) -> bool {
        (self.start..self.end).contains(&key_group)
    }
}

/// The key group a key hash belongs to.
pub fn key_group_of(hash: u64, max_parallelism: u32) -> u32 {
    (hash % u64::from(max_parallelism.max(1))) as u32
}

/// The subtask (of `parallelism`) that owns `key_group`; the inverse of [`KeyGroupRange::for_subtask`].
pub fn subtask_of_key_group(key_group: u32, max_parallelism: u32, parallelism: u32) -> u32 {
    (u64::from(key_group) * u64::from(parallelism) / u64::from(max_parallelism.max(1))) as u32
}

/// Whether values of this type can be part of a key (hashed for partitioning and state).
pub fn is_hashable_type(data_type: &DataType) -> bool {
    use DataType::*;
    matches!(
        data_type,
        Null | Boolean
            | Int8
            | Int16
            | Int32
            | Int64
            | UInt8
            | UInt16
            | UInt32
            | UInt64
            | Float32
            | Float64
            | Utf8
            | LargeUtf8
            | Utf8View
            | Binary
            | LargeBinary
            | BinaryView
            | FixedSizeBinary(_)
            | Date32
            | Date64
            | Timestamp(_, _)
            | Time32(_)
            | Time64(_)
            | Duration(_)
            | Decimal128(_, _)
    )
}

/// Stable 64-bit hashes of the rows formed by `columns` (all of the same length).
pub fn hash_columns(columns: &[ArrayRef], num_rows: usize) -> Result<Vec<u64>, ArrowError> {
    let mut hashes = vec![SEED; num_rows];
    for column in columns {
        hash_column_into(column.as_ref(), &mut hashes)?;
    }
    Ok(hashes)
}

fn hash_column_into(column: &dyn Array, hashes: &mut [u64]) -> Result<(), ArrowError> {
    use arrow::datatypes::*;
    if column.len() != hashes.len() {
        return Err(ArrowError::InvalidArgumentError(format!(
            "key column has {} rows, expected {}",
            column.len(),
            hashes.len()
        )));
    }
    macro_rules! primitive {
        ($t:ty) => {{
            let a = column.as_primitive::<$t>();
            for (i, h) in hashes.iter_mut().enumerate() {
                *h = if a.is_null(i) {
                    xxh3_64_with_seed(NULL_MARKER, *h)
                } else {
                    xxh3_64_with_seed(&a.value(i).to_le_bytes(), *h)
                };
            }
        }};
    }
    macro_rules! bytes {
        ($a:expr) => {{
            let a = $a;
            for (i, h) in hashes.iter_mut().enumerate() {
                *h = if a.is_null(i) {
                    xxh3_64_with_seed(NULL_MARKER, *h)
                } else {
                    let v: &[u8] = a.value(i).as_ref();
                    xxh3_64_with_seed(v, *h)
                };
            }
        }};
    }
    match column.data_type() {
        DataType::Null => {
            for h in hashes.iter_mut() {
                *h = xxh3_64_with_seed(NULL_MARKER, *h);
            }
        }
        DataType::Boolean => {
            let a = column.as_boolean();
            for (i, h) in hashes.iter_mut().enumerate() {
                let v: &[u8] = if a.is_null(i) {
                    NULL_MARKER
                } else if a.value(i) {
                    &[1]
                } else {
                    &[0]
                };
                *h = xxh3_64_with_seed(v, *h);
            }
        }
        DataType::Int8 => primitive!(Int8Type),
        DataType::Int16 => primitive!(Int16Type),
        DataType::Int32 => primitive!(Int32Type),
        DataType::Int64 => primitive!(Int64Type),
        DataType::UInt8 => primitive!(UInt8Type),
        DataType::UInt16 => primitive!(UInt16Type),
        DataType::UInt32 => primitive!(UInt32Type),
        DataType::UInt64 => primitive!(UInt64Type),
        DataType::Float32 => {
            let a = column.as_primitive::<Float32Type>();
            for (i, h) in hashes.iter_mut().enumerate() {
                *h = if a.is_null(i) {
                    xxh3_64_with_seed(NULL_MARKER, *h)
                } else {
                    xxh3_64_with_seed(&canonical_f64(f64::from(a.value(i))).to_le_bytes(), *h)
                };
            }
        }
        DataType::Float64 => {
            let a = column.as_primitive::<Float64Type>();
            for (i, h) in hashes.iter_mut().enumerate() {
                *h = if a.is_null(i) {
                    xxh3_64_with_seed(NULL_MARKER, *h)
                } else {
                    xxh3_64_with_seed(&canonical_f64(a.value(i)).to_le_bytes(), *h)
                };
            }
        }
        DataType::Utf8 => bytes!(column.as_string::<i32>()),
        DataType::LargeUtf8 => bytes!(column.as_string::<i64>()),
        DataType::Utf8View => bytes!(column.as_string_view()),
        DataType::Binary => bytes!(column.as_binary::<i32>()),
        DataType::LargeBinary => bytes!(column.as_binary::<i64>()),
        DataType::BinaryView => bytes!(column.as_binary_view()),
        DataType::FixedSizeBinary(_) => bytes!(column.as_fixed_size_binary()),
        DataType::Date32 => primitive!(Date32Type),
        DataType::Date64 => primitive!(Date64Type),
        // Timestamps hash by instant in µs, so the same instant hashes alike whatever the unit.
        DataType::Timestamp(unit, _) => {
            let values = arrow::compute::cast(column, &DataType::Int64)?;
            let values = values.as_primitive::<Int64Type>();
            for (i, h) in hashes.iter_mut().enumerate() {
                *h = if values.is_null(i) {
                    xxh3_64_with_seed(NULL_MARKER, *h)
                } else {
                    xxh3_64_with_seed(&to_micros(values.value(i), *unit).to_le_bytes(), *h)
                };
            }
        }
        DataType::Time32(_) | DataType::Time64(_) | DataType::Duration(_) => {
            let values = arrow::compute::cast(column, &DataType::Int64)?;
            hash_column_into(values.as_ref(), hashes)?;
        }
        DataType::Decimal128(_, _) => primitive!(Decimal128Type),
        other => {
            return Err(ArrowError::NotYetImplemented(format!("keys of type {other} cannot be hashed")));
        }
    }
    Ok(())
}

/// One hash per value: all NaNs alike, and -0.0 like 0.0.
fn canonical_f64(v: f64) -> u64 {
    if v.is_nan() {
        f64::NAN.to_bits()
    } else if v == 0.0 {
        0
    } else {
        v.to_bits()
    }
}

/// Converts a timestamp value in `unit` to microseconds (saturating).
pub fn to_micros(value: i64, unit: TimeUnit) -> i64 {
    match unit {
        TimeUnit::Second => value.saturating_mul(1_000_000),
        TimeUnit::Millisecond => value.saturating_mul(1_000),
        TimeUnit::Microsecond => value,
        TimeUnit::Nanosecond => value / 1_000,
    }
}

/// Converts microseconds to a timestamp value in `unit` (saturating).
pub fn from_micros(micros: i64, unit: TimeUnit) -> i64 {
    match unit {
        TimeUnit::Second => micros.div_euclid(1_000_000),
        TimeUnit::Millisecond => micros.div_euclid(1_000),
        TimeUnit::Microsecond => micros,
        TimeUnit::Nanosecond => micros.saturating_mul(1_000),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float64Array, Int64Array, StringArray, TimestampMicrosecondArray, TimestampMillisecondArray};

    use super::*;

    #[test]
    fn ranges_cover_all_key_groups_once() {
        for p in 1..=17u32 {
            let mut next = 0;
            for i in 0..p {
                let r = KeyGroupRange::for_subtask(128, p, i);
                assert_eq!(r.start, next);
                for kg in r.start..r.end {
                    assert_eq!(subtask_of_key_group(kg, 128, p), i, "kg {kg} p {p}");
                }
                next = r.end;
            }
            assert_eq!(next, 128);
        }
    }

    #[test]
    fn hash_is_stable_across_releases() {
        // Pinned values: key groups are persisted in checkpoints, so these must never change.
        let col: ArrayRef = Arc::new(StringArray::from(vec![Some("a"), None, Some("tenant-42")]));
        let h = hash_columns(&[col], 3).unwrap();
        let again =
            hash_columns(&[Arc::new(StringArray::from(vec![Some("a"), None, Some("tenant-42")])) as ArrayRef], 3)
                .unwrap();
        assert_eq!(h, again);
        assert_ne!(h[0], h[1]);
        assert_eq!(h[0], xxh3_64_with_seed(b"a", SEED));
    }

    #[test]
    fn equal_values_hash_alike_across_representations() {
        let ms: ArrayRef = Arc::new(TimestampMillisecondArray::from(vec![1_700_000_000_123]));
        let us: ArrayRef = Arc::new(TimestampMicrosecondArray::from(vec![1_700_000_000_123_000]));
        assert_eq!(hash_columns(&[ms], 1).unwrap(), hash_columns(&[us], 1).unwrap());
        let z: ArrayRef = Arc::new(Float64Array::from(vec![0.0, -0.0]));
        let h = hash_columns(&[z], 2).unwrap();
        assert_eq!(h[0], h[1]);
    }

    #[test]
    fn multi_column_keys_depend_on_order() {
        let a: ArrayRef = Arc::new(Int64Array::from(vec![1, 2]));
        let b: ArrayRef = Arc::new(Int64Array::from(vec![2, 1]));
        let h = hash_columns(&[a, b], 2).unwrap();
        assert_ne!(h[0], h[1]);
    }
}
