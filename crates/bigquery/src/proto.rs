//! Rows as protocol buffers for the Storage Write API's `proto_rows`: a descriptor built from the Arrow schema (with
//! BigQuery's CDC pseudo-columns `_CHANGE_TYPE` and `_CHANGE_SEQUENCE_NUMBER` when upserting) and rows encoded
//! against it. Types as BigQuery documents for proto input: INT64 int64, FLOAT64 double, BOOL bool, STRING/JSON/
//! NUMERIC/BIGNUMERIC/DATETIME/TIME string, BYTES bytes, TIMESTAMP int64 µs since the epoch, DATE int32 days,
//! STRUCT a nested message, ARRAY repeated.

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Date32Type, Field, Float64Type, Int64Type, TimeUnit, TimestampMicrosecondType};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use prost::bytes::BufMut;
use prost::encoding::{WireType, encode_key, encode_varint};
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto};

use crate::error::{BqError, Result};

/// A CDC change (the `_CHANGE_TYPE` pseudo-column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChangeType {
    /// Insert or replace the row with this primary key.
    Upsert,
    /// Delete the row with this primary key.
    Delete,
}

impl ChangeType {
    /// The pseudo-column's value.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::Upsert => "UPSERT",
            ChangeType::Delete => "DELETE",
        }
    }
}

/// `_CHANGE_SEQUENCE_NUMBER` for a source position: up to four unsigned 64-bit sections, written as upper-case hex
/// separated by `/`. BigQuery orders changes to a key by comparing sections numerically, left to right, so a source
/// sequence such as (binlog file index, position) maps to two sections and replays after a recovery compare equal.
pub fn sequence_number(sections: &[u64]) -> Result<String> {
    if sections.is_empty() || sections.len() > 4 {
        return Err(BqError::Protocol(format!("a change sequence number has 1 to 4 sections, not {}", sections.len())));
    }
    Ok(sections.iter().map(|s| format!("{s:X}")).collect::<Vec<_>>().join("/"))
}

/// Parses a sequence number back into its sections (for comparing, as BigQuery does).
pub fn parse_sequence_number(text: &str) -> Result<Vec<u64>> {
    let parts: Vec<&str> = text.split('/').collect();
    if parts.is_empty() || parts.len() > 4 {
        return Err(BqError::Protocol(format!("bad change sequence number '{text}'")));
    }
    parts
        .iter()
        .map(|p| {
            if p.is_empty() || p.len() > 16 {
                return Err(BqError::Protocol(format!("bad change sequence number '{text}'")));
            }
            u64::from_str_radix(p, 16).map_err(|_| BqError::Protocol(format!("bad change sequence number '{text}'")))
        })
        .collect()
}

fn proto_type(dt: &DataType) -> Type {
    match dt {
        DataType::Int64 => Type::Int64,
        DataType::Float64 => Type::Double,
        DataType::Boolean => Type::Bool,
        DataType::Binary => Type::Bytes,
        DataType::Date32 => Type::Int32,
        DataType::Timestamp(_, Some(_)) => Type::Int64,
        DataType::Struct(_) => Type::Message,
        _ => Type::String,
    }
}

fn message(name: &str, fields: &[arrow::datatypes::FieldRef], cdc: bool) -> DescriptorProto {
    let mut d = DescriptorProto { name: Some(name.into()), ..Default::default() };
    for (i, f) in fields.iter().enumerate() {
        let (inner, repeated) = match f.data_type() {
            DataType::List(inner) => (inner.as_ref(), true),
            _ => (f.as_ref(), false),
        };
        let t = proto_type(inner.data_type());
        let mut fd = FieldDescriptorProto {
            name: Some(f.name().clone()),
            number: Some(i as i32 + 1),
            label: Some(if repeated { Label::Repeated } else { Label::Optional } as i32),
            r#type: Some(t as i32),
            ..Default::default()
        };
        if let DataType::Struct(children) = inner.data_type() {
            let nested = format!("{}_{}", f.name(), i + 1);
            d.nested_type.push(message(&nested, children, false));
            fd.type_name = Some(nested);
        }
        d.field.push(fd);
    }
    if cdc {
        for (k, name) in ["_CHANGE_TYPE", "_CHANGE_SEQUENCE_NUMBER"].iter().enumerate() {
            d.field.push(FieldDescriptorProto {
                name: Some((*name).into()),
                number: Some((fields.len() + k + 1) as i32),
                label: Some(Label::Optional as i32),
                r#type: Some(Type::String as i32),
                ..Default::default()
            });
        }
    }
    d
}

/// The descriptor of rows of `schema` (already in wire types, see `types::wire_schema`).
pub fn descriptor(schema: &arrow::datatypes::Schema, cdc: bool) -> DescriptorProto {
    message("Row", schema.fields(), cdc)
}

/// Encodes one value of `array` at `row` as field `tag` (nothing for NULL: proto2 optional).
fn encode_value(array: &ArrayRef, field: &Field, row: usize, tag: u32, buf: &mut Vec<u8>) -> Result<()> {
    if array.is_null(row) {
        return Ok(());
    }
    let bytes = |buf: &mut Vec<u8>, b: &[u8]| {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(b.len() as u64, buf);
        buf.put_slice(b);
    };
    match array.data_type() {
        DataType::Int64 => {
            encode_key(tag, WireType::Varint, buf);
            encode_varint(array.as_primitive::<Int64Type>().value(row) as u64, buf);
        }
        DataType::Float64 => {
            encode_key(tag, WireType::SixtyFourBit, buf);
            buf.put_f64_le(array.as_primitive::<Float64Type>().value(row));
        }
        DataType::Boolean => {
            encode_key(tag, WireType::Varint, buf);
            encode_varint(u64::from(array.as_boolean().value(row)), buf);
        }
        DataType::Date32 => {
            encode_key(tag, WireType::Varint, buf);
            encode_varint(array.as_primitive::<Date32Type>().value(row) as i64 as u64, buf);
        }
        DataType::Timestamp(TimeUnit::Microsecond, Some(_)) => {
            encode_key(tag, WireType::Varint, buf);
            encode_varint(array.as_primitive::<TimestampMicrosecondType>().value(row) as u64, buf);
        }
        DataType::Utf8 => bytes(buf, array.as_string::<i32>().value(row).as_bytes()),
        DataType::Binary => bytes(buf, array.as_binary::<i32>().value(row)),
        DataType::Struct(children) => {
            let s = array.as_struct();
            let mut inner = Vec::new();
            for (i, (child, f)) in s.columns().iter().zip(children.iter()).enumerate() {
                encode_value(child, f, row, i as u32 + 1, &mut inner)?;
            }
            bytes(buf, &inner);
        }
        DataType::List(inner_field) => {
            let values = array.as_list::<i32>().value(row);
            for i in 0..values.len() {
                if values.is_null(i) {
                    return Err(BqError::Schema(format!(
                        "column '{}' has a NULL element in an array, which BigQuery does not store",
                        field.name()
                    )));
                }
                encode_value(&values, inner_field, i, tag, buf)?;
            }
        }
        // DATETIME, TIME, NUMERIC, BIGNUMERIC: BigQuery takes their canonical text.
        DataType::Timestamp(TimeUnit::Microsecond, None)
        | DataType::Time64(_)
        | DataType::Decimal128(..)
        | DataType::Decimal256(..) => {
            let opts = FormatOptions::default()
                .with_timestamp_format(Some("%Y-%m-%d %H:%M:%S%.6f"))
                .with_time_format(Some("%H:%M:%S%.6f"));
            let text = ArrayFormatter::try_new(array.as_ref(), &opts)?.value(row).to_string();
            bytes(buf, text.as_bytes());
        }
        other => {
            return Err(BqError::Schema(format!("column '{}': {other} cannot be sent as a proto row", field.name())));
        }
    }
    Ok(())
}

/// Serialises each row of `batch` (in wire types); with `changes`, each row also carries its change type and
/// sequence number.
pub fn encode_rows(batch: &RecordBatch, changes: Option<(&[ChangeType], &[String])>) -> Result<Vec<Vec<u8>>> {
    let schema = batch.schema();
    let n = batch.num_rows();
    let mut out = Vec::with_capacity(n);
    for row in 0..n {
        let mut buf = Vec::with_capacity(64);
        for (i, (col, field)) in batch.columns().iter().zip(schema.fields()).enumerate() {
            encode_value(col, field, row, i as u32 + 1, &mut buf)?;
        }
        if let Some((types, seqs)) = changes {
            let tag = schema.fields().len() as u32 + 1;
            for (k, text) in [types[row].as_str(), seqs[row].as_str()].iter().enumerate() {
                encode_key(tag + k as u32, WireType::LengthDelimited, &mut buf);
                encode_varint(text.len() as u64, &mut buf);
                buf.put_slice(text.as_bytes());
            }
        }
        out.push(buf);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{BooleanArray, Float64Array, Int64Array, StringArray, StructArray, TimestampMicrosecondArray};
    use arrow::datatypes::{Fields, Schema};
    use prost::Message;

    use super::*;

    /// The same row as a prost message, to check the hand-written encoding byte for byte.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Expected {
        #[prost(int64, optional, tag = "1")]
        id: Option<i64>,
        #[prost(string, optional, tag = "2")]
        name: Option<String>,
        #[prost(double, optional, tag = "3")]
        amount: Option<f64>,
        #[prost(bool, optional, tag = "4")]
        ok: Option<bool>,
        #[prost(int64, optional, tag = "5")]
        ts: Option<i64>,
        #[prost(string, repeated, tag = "6")]
        tags: Vec<String>,
        #[prost(message, optional, tag = "7")]
        detail: Option<Detail>,
        #[prost(string, optional, tag = "8")]
        change_type: Option<String>,
        #[prost(string, optional, tag = "9")]
        change_seq: Option<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct Detail {
        #[prost(int64, optional, tag = "1")]
        tenant: Option<i64>,
    }

    #[test]
    fn rows_encode_as_their_protobuf_messages() {
        let mut list = arrow::array::ListBuilder::new(arrow::array::StringBuilder::new());
        list.values().append_value("a");
        list.values().append_value("b");
        list.append(true);
        list.append(true);
        let list = list.finish();
        let detail_fields = Fields::from(vec![Field::new("tenant", DataType::Int64, true)]);
        let detail =
            StructArray::new(detail_fields.clone(), vec![Arc::new(Int64Array::from(vec![Some(7), None]))], None);
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
            Field::new("amount", DataType::Float64, true),
            Field::new("ok", DataType::Boolean, true),
            Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
            Field::new("tags", list.data_type().clone(), true),
            Field::new("detail", DataType::Struct(detail_fields), true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![1, -2])),
                Arc::new(StringArray::from(vec![Some("x"), None])),
                Arc::new(Float64Array::from(vec![Some(1.5), None])),
                Arc::new(BooleanArray::from(vec![Some(true), Some(false)])),
                Arc::new(TimestampMicrosecondArray::from(vec![Some(1_700_000_000_000_000), None]).with_timezone("UTC")),
                Arc::new(list),
                Arc::new(detail),
            ],
        )
        .unwrap();
        let seqs = vec!["1/A".to_string(), "1/B".to_string()];
        let rows = encode_rows(&batch, Some((&[ChangeType::Upsert, ChangeType::Delete], &seqs))).unwrap();
        let got = Expected::decode(rows[0].as_slice()).unwrap();
        assert_eq!(
            got,
            Expected {
                id: Some(1),
                name: Some("x".into()),
                amount: Some(1.5),
                ok: Some(true),
                ts: Some(1_700_000_000_000_000),
                tags: vec!["a".into(), "b".into()],
                detail: Some(Detail { tenant: Some(7) }),
                change_type: Some("UPSERT".into()),
                change_seq: Some("1/A".into()),
            }
        );
        let got = Expected::decode(rows[1].as_slice()).unwrap();
        assert_eq!((got.id, got.name, got.ok, got.tags.len()), (Some(-2), None, Some(false), 0));
        assert_eq!(got.change_type.as_deref(), Some("DELETE"));
        let d = descriptor(&schema, true);
        let names: Vec<&str> = d.field.iter().map(|f| f.name()).collect();
        assert_eq!(
            names,
            ["id", "name", "amount", "ok", "ts", "tags", "detail", "_CHANGE_TYPE", "_CHANGE_SEQUENCE_NUMBER"]
        );
        assert_eq!(d.field[5].label(), Label::Repeated);
        assert_eq!(d.nested_type.len(), 1);
    }

    #[test]
    fn sequence_numbers_round_trip_and_order_by_section() {
        let a = sequence_number(&[3, 0x4d2]).unwrap();
        assert_eq!(a, "3/4D2");
        assert_eq!(parse_sequence_number(&a).unwrap(), vec![3, 0x4d2]);
        assert_eq!(sequence_number(&[u64::MAX]).unwrap(), "FFFFFFFFFFFFFFFF");
        // Section-wise numeric order, not text order: 3/4D2 < 3/1000 < 4/0.
        let p = |s: &str| parse_sequence_number(s).unwrap();
        assert!(p("3/4D2") < p("3/1000") && p("3/1000") < p("4/0"));
        assert!(sequence_number(&[]).is_err() && sequence_number(&[1, 2, 3, 4, 5]).is_err());
        assert!(parse_sequence_number("1/2/3/4/5").is_err() && parse_sequence_number("xyz").is_err());
        assert!(parse_sequence_number("11111111111111111").is_err(), "17 hex digits");
    }
}
