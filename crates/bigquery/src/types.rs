//! Types between nagare (Arrow) and BigQuery: the table schema a pipeline's columns ask for, whether an existing
//! table can take them, and the Arrow shape the Storage Write API's `arrow_rows` expects (BigQuery documents it as
//! "TIMESTAMP: timestamp[us, UTC], DATETIME: timestamp[us], NUMERIC: decimal128(38, 9), BIGNUMERIC:
//! decimal256(76, 38), JSON: string").

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{DataType, Field, FieldRef, Fields, Schema, SchemaRef, TimeUnit};
use nagare_sql::types::is_json_field;
use serde::{Deserialize, Serialize};

use crate::error::{BqError, Result};

/// A column of a BigQuery table schema, as the REST API spells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TableField {
    /// Column name.
    pub name: String,
    /// `STRING`, `INTEGER`/`INT64`, `FLOAT`/`FLOAT64`, `BOOLEAN`/`BOOL`, `BYTES`, `TIMESTAMP`, `DATETIME`, `DATE`,
    /// `TIME`, `NUMERIC`, `BIGNUMERIC`, `JSON`, `RECORD`/`STRUCT`, ...
    #[serde(rename = "type")]
    pub field_type: String,
    /// `NULLABLE` (default), `REQUIRED` or `REPEATED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Sub-columns of a RECORD.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<TableField>,
}

impl TableField {
    fn mode(&self) -> &str {
        self.mode.as_deref().unwrap_or("NULLABLE")
    }

    /// The canonical (standard SQL) name of the type: legacy names are accepted from the API.
    pub fn canonical_type(&self) -> &str {
        canonical(&self.field_type)
    }
}

fn canonical(t: &str) -> &str {
    match t {
        "INTEGER" => "INT64",
        "FLOAT" => "FLOAT64",
        "BOOLEAN" => "BOOL",
        "STRUCT" => "RECORD",
        "DECIMAL" => "NUMERIC",
        "BIGDECIMAL" => "BIGNUMERIC",
        other => other,
    }
}

fn bq_type_of(field: &Field, path: &str) -> Result<(String, Vec<TableField>)> {
    if is_json_field(field) {
        return Ok(("JSON".into(), Vec::new()));
    }
    let t = match field.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "STRING",
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => "INT64",
        DataType::UInt8 | DataType::UInt16 | DataType::UInt32 => "INT64",
        DataType::Float16 | DataType::Float32 | DataType::Float64 => "FLOAT64",
        DataType::Boolean => "BOOL",
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) => "BYTES",
        DataType::Date32 | DataType::Date64 => "DATE",
        DataType::Timestamp(_, Some(_)) => "TIMESTAMP",
        DataType::Timestamp(_, None) => "DATETIME",
        DataType::Time32(_) | DataType::Time64(_) => "TIME",
        DataType::Decimal128(p, s) if *p <= 38 && *s >= 0 && *s <= 9 && (*p as i16 - *s as i16) <= 29 => "NUMERIC",
        DataType::Decimal128(_, s) | DataType::Decimal256(_, s) if *s >= 0 && *s <= 38 => "BIGNUMERIC",
        DataType::Struct(fields) => {
            let sub = fields.iter().map(|f| table_field(f, &format!("{path}."))).collect::<Result<Vec<_>>>()?;
            return Ok(("RECORD".into(), sub));
        }
        other => {
            return Err(BqError::Schema(format!(
                "column '{path}' has type {other}, which BigQuery cannot hold (UInt64 does not fit INT64: cast it to \
                 DECIMAL(20,0) or BIGINT; intervals and maps have no BigQuery type)"
            )));
        }
    };
    Ok((t.into(), Vec::new()))
}

fn table_field(field: &Field, prefix: &str) -> Result<TableField> {
    let path = format!("{prefix}{}", field.name());
    let (element, repeated) = match field.data_type() {
        DataType::List(inner) | DataType::LargeList(inner) | DataType::ListView(inner) => {
            if matches!(inner.data_type(), DataType::List(_) | DataType::LargeList(_) | DataType::ListView(_)) {
                return Err(BqError::Schema(format!(
                    "column '{path}' is an array of arrays, which BigQuery does not allow: wrap the inner array in a \
                     STRUCT"
                )));
            }
            (inner.as_ref(), true)
        }
        _ => (field, false),
    };
    let (field_type, fields) = bq_type_of(element, &path)?;
    let mode = if repeated {
        "REPEATED"
    } else if field.is_nullable() {
        "NULLABLE"
    } else {
        "REQUIRED"
    };
    Ok(TableField { name: field.name().clone(), field_type, mode: Some(mode.into()), fields })
}

/// The BigQuery schema for rows of `schema`.
pub fn table_schema(schema: &Schema) -> Result<Vec<TableField>> {
    schema.fields().iter().map(|f| table_field(f, "")).collect()
}

/// Why an existing table cannot take rows of `ours` (one message per column), or what columns it lacks that can be
/// added as NULLABLE. BigQuery column names compare case-insensitively.
#[derive(Debug, Default, PartialEq)]
pub struct Compatibility {
    /// Columns whose type or mode conflicts.
    pub conflicts: Vec<String>,
    /// Columns we write that the table does not have (added when allowed, as NULLABLE or REPEATED).
    pub missing: Vec<TableField>,
}

/// Compares the table's schema with the columns the pipeline writes.
pub fn compatibility(table: &[TableField], ours: &[TableField]) -> Compatibility {
    let mut out = Compatibility::default();
    compare(table, ours, "", &mut out);
    // A REQUIRED column we do not write would reject every row.
    for t in table {
        if t.mode() == "REQUIRED" && !ours.iter().any(|o| o.name.eq_ignore_ascii_case(&t.name)) {
            out.conflicts.push(format!("the table's REQUIRED column '{}' is not written by the pipeline", t.name));
        }
    }
    out
}

fn compare(table: &[TableField], ours: &[TableField], prefix: &str, out: &mut Compatibility) {
    for o in ours {
        let path = format!("{prefix}{}", o.name);
        let Some(t) = table.iter().find(|t| t.name.eq_ignore_ascii_case(&o.name)) else {
            if prefix.is_empty() {
                let mut added = o.clone();
                if added.mode() == "REQUIRED" {
                    added.mode = Some("NULLABLE".into());
                }
                out.missing.push(added);
            } else {
                out.conflicts.push(format!("column '{path}' is not in the table's RECORD"));
            }
            continue;
        };
        let (tt, ot) = (t.canonical_type(), o.canonical_type());
        // Writing a narrower value into a wider column is fine (INT64 into NUMERIC, anything into STRING is not).
        let widening = matches!((ot, tt), ("INT64", "NUMERIC" | "BIGNUMERIC" | "FLOAT64") | ("NUMERIC", "BIGNUMERIC"));
        if tt != ot && !widening {
            out.conflicts.push(format!("column '{path}' is {tt} in the table but {ot} in the pipeline"));
            continue;
        }
        match (t.mode(), o.mode()) {
            ("REPEATED", "REPEATED") => {}
            ("REPEATED", _) | (_, "REPEATED") => {
                out.conflicts.push(format!(
                    "column '{path}' is {} in the table but {} in the pipeline",
                    t.mode(),
                    o.mode()
                ));
                continue;
            }
            ("REQUIRED", "NULLABLE") => out.conflicts.push(format!(
                "column '{path}' is REQUIRED in the table but may be NULL in the pipeline (declare it NOT NULL)"
            )),
            _ => {}
        }
        if tt == "RECORD" {
            compare(&t.fields, &o.fields, &format!("{path}."), out);
        }
    }
}

/// The Arrow type BigQuery's `arrow_rows` takes for a field of ours.
fn wire_type(field: &Field) -> DataType {
    if is_json_field(field) {
        return DataType::Utf8;
    }
    match field.data_type() {
        DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
        DataType::BinaryView | DataType::LargeBinary | DataType::FixedSizeBinary(_) => DataType::Binary,
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::UInt8 | DataType::UInt16 | DataType::UInt32 => {
            DataType::Int64
        }
        DataType::Float16 | DataType::Float32 => DataType::Float64,
        DataType::Date64 => DataType::Date32,
        DataType::Timestamp(_, Some(_)) => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        DataType::Timestamp(_, None) => DataType::Timestamp(TimeUnit::Microsecond, None),
        DataType::Time32(_) | DataType::Time64(_) => DataType::Time64(TimeUnit::Microsecond),
        DataType::Decimal128(p, s) if *p <= 38 && *s >= 0 && *s <= 9 && (*p as i16 - *s as i16) <= 29 => {
            DataType::Decimal128(38, 9)
        }
        DataType::Decimal128(..) | DataType::Decimal256(..) => DataType::Decimal256(76, 38),
        DataType::Struct(fields) => DataType::Struct(wire_fields(fields)),
        DataType::List(inner) | DataType::LargeList(inner) | DataType::ListView(inner) => {
            DataType::List(Arc::new(wire_field(inner)))
        }
        other => other.clone(),
    }
}

fn wire_field(field: &FieldRef) -> Field {
    Field::new(field.name(), wire_type(field), field.is_nullable())
}

fn wire_fields(fields: &Fields) -> Fields {
    fields.iter().map(|f| Arc::new(wire_field(f))).collect()
}

/// The schema rows are sent in.
pub fn wire_schema(schema: &Schema) -> SchemaRef {
    Arc::new(Schema::new(wire_fields(schema.fields())))
}

/// Converts a batch of ours to the wire schema (casts only where the types differ).
pub fn to_wire(batch: &RecordBatch, wire: &SchemaRef) -> Result<RecordBatch> {
    let opts = CastOptions { safe: false, ..Default::default() };
    let columns = batch
        .columns()
        .iter()
        .zip(wire.fields())
        .map(|(c, f)| -> Result<ArrayRef> {
            if c.data_type() == f.data_type() {
                Ok(c.clone())
            } else {
                cast_with_options(c, f.data_type(), &opts)
                    .map_err(|e| BqError::Schema(format!("column '{}': {e}", f.name())))
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(wire.clone(), columns)?)
}

/// Rough bytes of a batch once IPC-serialised, for splitting requests under the API's size limit.
pub fn approx_bytes(batch: &RecordBatch) -> usize {
    batch.columns().iter().map(|c| c.get_array_memory_size()).sum()
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int32Array, StringViewArray, TimestampMillisecondArray};

    use super::*;

    fn ty(sql: &str) -> Field {
        use datafusion::sql::sqlparser::dialect::GenericDialect;
        use datafusion::sql::sqlparser::parser::Parser;
        let t = Parser::new(&GenericDialect {}).try_with_sql(sql).unwrap().parse_data_type().unwrap();
        nagare_sql::types::sql_to_field("c", &t, true).unwrap()
    }

    fn f(name: &str, t: &str, mode: &str) -> TableField {
        TableField { name: name.into(), field_type: t.into(), mode: Some(mode.into()), fields: Vec::new() }
    }

    #[test]
    fn sql_types_map_as_bigquery_documents() {
        let cases = [
            ("TEXT", "STRING"),
            ("BIGINT", "INT64"),
            ("INT", "INT64"),
            ("DOUBLE", "FLOAT64"),
            ("BOOLEAN", "BOOL"),
            ("BYTES", "BYTES"),
            ("DATE", "DATE"),
            ("TIMESTAMP", "TIMESTAMP"),
            ("DATETIME", "DATETIME"),
            ("NUMERIC", "NUMERIC"),
            ("DECIMAL(38, 9)", "NUMERIC"),
            ("DECIMAL(76, 38)", "BIGNUMERIC"),
            ("JSON", "JSON"),
        ];
        for (sql, bq) in cases {
            let field = ty(sql);
            let t = table_field(&field, "").unwrap();
            assert_eq!(t.field_type, bq, "{sql}");
            assert_eq!(t.mode.as_deref(), Some("NULLABLE"));
        }
        let nested = table_field(&ty("ARRAY<STRUCT<a BIGINT, b ARRAY<TEXT>>>"), "").unwrap();
        assert_eq!(nested.mode.as_deref(), Some("REPEATED"));
        assert_eq!(nested.field_type, "RECORD");
        assert_eq!(nested.fields[1].mode.as_deref(), Some("REPEATED"));
        assert_eq!(nested.fields[1].field_type, "STRING");
        let err = table_field(&Field::new("u", DataType::UInt64, true), "").unwrap_err().to_string();
        assert!(err.contains("'u'") && err.contains("UInt64"), "{err}");
    }

    #[test]
    fn compatibility_names_each_conflict_and_the_columns_to_add() {
        let table = vec![f("id", "STRING", "REQUIRED"), f("n", "INTEGER", "NULLABLE"), f("x", "FLOAT", "NULLABLE")];
        let ours = vec![f("ID", "STRING", "REQUIRED"), f("n", "INT64", "NULLABLE"), f("x", "STRING", "NULLABLE")];
        let c = compatibility(&table, &ours);
        assert_eq!(c.conflicts, vec!["column 'x' is FLOAT64 in the table but STRING in the pipeline".to_string()]);
        let ours = vec![f("n", "INT64", "REQUIRED"), f("new", "DATE", "REQUIRED")];
        let c = compatibility(&table, &ours);
        assert_eq!(c.conflicts, vec!["the table's REQUIRED column 'id' is not written by the pipeline".to_string()]);
        assert_eq!(c.missing, vec![f("new", "DATE", "NULLABLE")]);
        let c = compatibility(&[f("n", "NUMERIC", "REQUIRED")], &[f("n", "INT64", "NULLABLE")]);
        assert_eq!(c.conflicts.len(), 1);
        assert!(c.conflicts[0].contains("declare it NOT NULL"), "{:?}", c.conflicts);
    }

    #[test]
    fn batches_are_cast_to_the_wire_types() {
        let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into()));
        let schema = Schema::new(vec![
            Field::new("s", DataType::Utf8View, true),
            Field::new("i", DataType::Int32, true),
            Field::new("t", ts, true),
        ]);
        let batch = RecordBatch::try_new(
            Arc::new(schema.clone()),
            vec![
                Arc::new(StringViewArray::from(vec!["a"])),
                Arc::new(Int32Array::from(vec![7])),
                Arc::new(TimestampMillisecondArray::from(vec![1_000]).with_timezone("+00:00")),
            ],
        )
        .unwrap();
        let wire = wire_schema(&schema);
        let out = to_wire(&batch, &wire).unwrap();
        assert_eq!(out.column(0).data_type(), &DataType::Utf8);
        assert_eq!(out.column(1).data_type(), &DataType::Int64);
        assert_eq!(out.column(2).data_type(), &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())));
        let t = out.column(2).as_any().downcast_ref::<arrow::array::TimestampMicrosecondArray>().unwrap();
        assert_eq!(t.value(0), 1_000_000);
        assert!(out.column(0).is_valid(0));
    }
}
