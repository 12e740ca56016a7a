//! SQL column types to Arrow types. The mapping follows BigQuery's so a schema survives the trip to the warehouse:
//! TIMESTAMP is an instant in µs UTC, DATETIME a wall-clock time, NUMERIC is DECIMAL(38, 9), JSON is text tagged with
//! the canonical `arrow.json` extension.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, TimeUnit};
use datafusion::sql::sqlparser::ast::{self, ArrayElemTypeDef, ExactNumberInfo, TimezoneInfo};

use crate::error::{PlanError, PlanErrorKind, Result};

/// Field metadata key of Arrow extension types.
pub const EXTENSION_NAME_KEY: &str = "ARROW:extension:name";
/// Extension name of JSON text columns.
pub const JSON_EXTENSION: &str = "arrow.json";

/// The time zone nagare gives TIMESTAMP columns.
pub const UTC: &str = "UTC";

/// The Arrow type of a declared SQL type.
pub fn sql_to_arrow(sql: &ast::DataType) -> Result<DataType> {
    Ok(sql_to_field("item", sql, true)?.data_type().clone())
}

/// A field for a declared column: name, type (with JSON tagged) and nullability.
pub fn sql_to_field(name: &str, sql: &ast::DataType, nullable: bool) -> Result<Field> {
    use ast::DataType as S;
    let unsupported = || {
        PlanError::new(PlanErrorKind::Unsupported, format!("column type {sql} is not supported"))
            .hint("use BOOLEAN, INT, BIGINT, DOUBLE, DECIMAL(p,s), TEXT, BYTES, DATE, TIMESTAMP, DATETIME, JSON, STRUCT<...> or ARRAY<...>")
    };
    let dt = match sql {
        S::Bool | S::Boolean => DataType::Boolean,
        S::TinyInt(_) => DataType::Int8,
        S::SmallInt(_) | S::Int2(_) => DataType::Int16,
        S::Int(_) | S::Integer(_) | S::Int4(_) | S::Int32 => DataType::Int32,
        S::BigInt(_) | S::Int8(_) | S::Int64 => DataType::Int64,
        S::TinyIntUnsigned(_) | S::UTinyInt | S::UInt8 => DataType::UInt8,
        S::SmallIntUnsigned(_) | S::USmallInt | S::UInt16 => DataType::UInt16,
        S::IntUnsigned(_) | S::IntegerUnsigned(_) | S::UInt32 => DataType::UInt32,
        S::BigIntUnsigned(_) | S::UBigInt | S::UInt64 => DataType::UInt64,
        S::Real | S::Float4 | S::Float32 => DataType::Float32,
        S::Float(info) => match info {
            ExactNumberInfo::Precision(p) | ExactNumberInfo::PrecisionAndScale(p, _) if *p <= 24 => DataType::Float32,
            _ => DataType::Float64,
        },
        S::Double(_) | S::DoublePrecision | S::Float8 | S::Float64 => DataType::Float64,
        S::Numeric(info) | S::Decimal(info) | S::Dec(info) => decimal(info, 38, 9, false)?,
        S::BigNumeric(info) | S::BigDecimal(info) => decimal(info, 76, 38, true)?,
        S::Text
        | S::String(_)
        | S::Varchar(_)
        | S::Char(_)
        | S::Character(_)
        | S::CharacterVarying(_)
        | S::CharVarying(_)
        | S::Nvarchar(_)
        | S::Uuid => DataType::Utf8,
        S::Bytes(_) | S::Bytea | S::Binary(_) | S::Varbinary(_) | S::Blob(_) => DataType::Binary,
        S::Date => DataType::Date32,
        S::Time(_, _) => DataType::Time64(TimeUnit::Microsecond),
        S::Timestamp(precision, tz) => {
            let unit = time_unit(*precision)?;
            match tz {
                TimezoneInfo::WithoutTimeZone => DataType::Timestamp(unit, None),
                _ => DataType::Timestamp(unit, Some(UTC.into())),
            }
        }
        S::Datetime(precision) | S::TimestampNtz(precision) => DataType::Timestamp(time_unit(*precision)?, None),
        S::JSON | S::JSONB => {
            let mut meta = HashMap::new();
            meta.insert(EXTENSION_NAME_KEY.to_string(), JSON_EXTENSION.to_string());
            return Ok(Field::new(name, DataType::Utf8, nullable).with_metadata(meta));
        }
        S::Array(elem) => {
            let inner = match elem {
                ArrayElemTypeDef::AngleBracket(t)
                | ArrayElemTypeDef::SquareBracket(t, None)
                | ArrayElemTypeDef::Parenthesis(t) => t,
                ArrayElemTypeDef::SquareBracket(_, Some(_)) => {
                    return Err(PlanError::unsupported("fixed-size arrays are not supported; use ARRAY<T>"));
                }
                ArrayElemTypeDef::None => {
                    return Err(PlanError::invalid("ARRAY needs an element type, e.g. ARRAY<TEXT>"));
                }
            };
            DataType::List(Arc::new(sql_to_field("item", inner, true)?))
        }
        S::Struct(fields, _) => {
            let mut out = Vec::with_capacity(fields.len());
            for (i, f) in fields.iter().enumerate() {
                let fname = f.field_name.as_ref().map(|n| n.value.clone()).ok_or_else(|| {
                    PlanError::invalid(format!("field {} of {sql} needs a name, e.g. STRUCT<tenant_id BIGINT>", i + 1))
                })?;
                out.push(sql_to_field(&fname, &f.field_type, true)?);
            }
            DataType::Struct(Fields::from(out))
        }
        S::Custom(name, args) if args.is_empty() => match name.to_string().to_ascii_lowercase().as_str() {
            "int64" => DataType::Int64,
            "float64" => DataType::Float64,
            "bytes" => DataType::Binary,
            "datetime" => DataType::Timestamp(TimeUnit::Microsecond, None),
            _ => return Err(unsupported()),
        },
        _ => return Err(unsupported()),
    };
    Ok(Field::new(name, dt, nullable))
}

fn decimal(info: &ExactNumberInfo, max_precision: u8, default_scale: i8, big: bool) -> Result<DataType> {
    let (p, s) = match info {
        ExactNumberInfo::None => (max_precision, default_scale),
        ExactNumberInfo::Precision(p) => (*p as u8, 0),
        ExactNumberInfo::PrecisionAndScale(p, s) => (*p as u8, *s as i8),
    };
    if p == 0 || p > 76 || i16::from(s) > i16::from(p) {
        return Err(PlanError::invalid(format!(
            "invalid DECIMAL({p}, {s}): need 0 < precision <= 76 and scale <= precision"
        )));
    }
    Ok(if big || p > 38 { DataType::Decimal256(p, s) } else { DataType::Decimal128(p, s) })
}

fn time_unit(precision: Option<u64>) -> Result<TimeUnit> {
    Ok(match precision {
        None => TimeUnit::Microsecond,
        Some(0) => TimeUnit::Second,
        Some(3) => TimeUnit::Millisecond,
        Some(6) => TimeUnit::Microsecond,
        Some(9) => TimeUnit::Nanosecond,
        Some(p) => {
            return Err(PlanError::invalid(format!("timestamp precision {p} is not supported (use 0, 3, 6 or 9)")));
        }
    })
}

/// Whether a field holds JSON text.
pub fn is_json_field(field: &Field) -> bool {
    field.metadata().get(EXTENSION_NAME_KEY).map(String::as_str) == Some(JSON_EXTENSION)
}

/// The SQL spelling of an Arrow type, for messages and `explain`.
pub fn arrow_to_sql(dt: &DataType) -> String {
    match dt {
        DataType::Boolean => "BOOLEAN".into(),
        DataType::Int8 => "TINYINT".into(),
        DataType::Int16 => "SMALLINT".into(),
        DataType::Int32 => "INT".into(),
        DataType::Int64 => "BIGINT".into(),
        DataType::UInt8 => "TINYINT UNSIGNED".into(),
        DataType::UInt16 => "SMALLINT UNSIGNED".into(),
        DataType::UInt32 => "INT UNSIGNED".into(),
        DataType::UInt64 => "BIGINT UNSIGNED".into(),
        DataType::Float32 => "REAL".into(),
        DataType::Float64 => "DOUBLE".into(),
        DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => format!("DECIMAL({p}, {s})"),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "TEXT".into(),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => "BYTES".into(),
        DataType::Date32 | DataType::Date64 => "DATE".into(),
        DataType::Time32(_) | DataType::Time64(_) => "TIME".into(),
        DataType::Timestamp(_, Some(_)) => "TIMESTAMP".into(),
        DataType::Timestamp(_, None) => "DATETIME".into(),
        DataType::List(f) | DataType::LargeList(f) => format!("ARRAY<{}>", arrow_to_sql(f.data_type())),
        DataType::Struct(fields) => format!(
            "STRUCT<{}>",
            fields
                .iter()
                .map(|f| format!("{} {}", f.name(), arrow_to_sql(f.data_type())))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    use super::*;

    fn ty(text: &str) -> Result<Field> {
        let mut p = Parser::new(&GenericDialect {}).try_with_sql(text).unwrap();
        let t = p.parse_data_type().unwrap();
        sql_to_field("c", &t, true)
    }

    #[test]
    fn maps_bigquery_like_types() {
        assert_eq!(ty("TIMESTAMP").unwrap().data_type(), &DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into())));
        assert_eq!(ty("DATETIME").unwrap().data_type(), &DataType::Timestamp(TimeUnit::Microsecond, None));
        assert_eq!(ty("NUMERIC").unwrap().data_type(), &DataType::Decimal128(38, 9));
        assert_eq!(ty("BIGINT").unwrap().data_type(), &DataType::Int64);
        assert!(is_json_field(&ty("JSON").unwrap()));
        let s = ty("STRUCT<tenant_id BIGINT, amount DOUBLE>").unwrap();
        assert_eq!(arrow_to_sql(s.data_type()), "STRUCT<tenant_id BIGINT, amount DOUBLE>");
        let l = ty("ARRAY<TEXT>").unwrap();
        assert_eq!(arrow_to_sql(l.data_type()), "ARRAY<TEXT>");
        assert_eq!(arrow_to_sql(ty("TEXT[]").unwrap().data_type()), "ARRAY<TEXT>");
    }

    #[test]
    fn unsupported_types_fail_with_hint() {
        let e = ty("GEOGRAPHY").unwrap_err();
        assert_eq!(e.kind, PlanErrorKind::Unsupported);
        assert!(e.to_string().contains("GEOGRAPHY"), "{e}");
    }
}
