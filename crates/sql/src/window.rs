//! `TUMBLE`, `HOP` and `SESSION`: the window functions used in `GROUP BY` (and in `PARTITION BY` of a dedup).
//!
//! Each is a DataFusion scalar function returning `STRUCT<start TIMESTAMP, end TIMESTAMP>`, so `TUMBLE_START(...)` is
//! just `TUMBLE(...)['start']`. Only `TUMBLE` can be evaluated row by row; `HOP` and `SESSION` are recognised by the
//! planner and run by the window operators.

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, StructArray};
use arrow::datatypes::{DataType, Field, Fields, IntervalMonthDayNano, TimeUnit};
use datafusion::common::{Result as DFResult, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// Which window a window function describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WindowKind {
    /// Fixed, non-overlapping windows of `size_us`.
    Tumble { size_us: i64 },
    /// Windows of `size_us` starting every `slide_us`.
    Hop { slide_us: i64, size_us: i64 },
    /// Per key, rows closer than `gap_us` to each other share a window.
    Session { gap_us: i64 },
}

impl WindowKind {
    /// Human form for `explain`.
    pub fn describe(&self) -> String {
        let d = |us: i64| nagare_core::format_duration(std::time::Duration::from_micros(us.max(0) as u64));
        match self {
            WindowKind::Tumble { size_us } => format!("TUMBLE({})", d(*size_us)),
            WindowKind::Hop { slide_us, size_us } => format!("HOP(slide {}, size {})", d(*slide_us), d(*size_us)),
            WindowKind::Session { gap_us } => format!("SESSION(gap {})", d(*gap_us)),
        }
    }
}

/// The window-function names nagare registers, lower case.
pub const WINDOW_FUNCTIONS: &[&str] = &["tumble", "hop", "session"];

/// `FN_START(args)` / `FN_END(args)` spellings rewritten to `get_field(FN(args), 'start'|'end')`.
pub fn split_bound_function(name: &str) -> Option<(&'static str, &'static str)> {
    let lower = name.to_ascii_lowercase();
    for f in WINDOW_FUNCTIONS {
        for bound in ["start", "end"] {
            if lower == format!("{f}_{bound}") {
                return Some((f, if bound == "start" { "start" } else { "end" }));
            }
        }
    }
    None
}

/// The struct type a window function returns for a time column of type `ts`.
pub fn window_struct_type(ts: &DataType) -> DataType {
    DataType::Struct(Fields::from(vec![Field::new("start", ts.clone(), true), Field::new("end", ts.clone(), true)]))
}

/// The scalar UDFs to register.
pub fn window_udfs() -> Vec<ScalarUDF> {
    WINDOW_FUNCTIONS.iter().map(|n| ScalarUDF::new_from_impl(WindowUdf::new(n))).collect()
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct WindowUdf {
    name: &'static str,
    signature: Signature,
}

impl WindowUdf {
    fn new(name: &'static str) -> Self {
        let arity = if name == "hop" { 3 } else { 2 };
        WindowUdf { name, signature: Signature::any(arity, Volatility::Immutable) }
    }
}

impl ScalarUDFImpl for WindowUdf {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> DFResult<DataType> {
        let Some(ts) = arg_types.first() else { return plan_err!("{} needs a time column", self.name.to_uppercase()) };
        if !matches!(ts, DataType::Timestamp(_, _)) {
            return plan_err!(
                "{}() needs a TIMESTAMP column as its first argument, got {}",
                self.name.to_uppercase(),
                crate::types::arrow_to_sql(ts)
            );
        }
        for t in &arg_types[1..] {
            if !matches!(t, DataType::Interval(_)) {
                return plan_err!(
                    "{}() takes INTERVAL arguments after the time column (e.g. INTERVAL '1' MINUTE), got {}",
                    self.name.to_uppercase(),
                    t
                );
            }
        }
        Ok(window_struct_type(ts))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DFResult<ColumnarValue> {
        if self.name != "tumble" {
            return exec_err!("{}() can only be used in GROUP BY", self.name.to_uppercase());
        }
        let DataType::Timestamp(unit, _) = args.arg_fields[0].data_type().clone() else {
            return exec_err!("TUMBLE() needs a timestamp");
        };
        let size_us = match &args.args[1] {
            ColumnarValue::Scalar(s) => interval_scalar_micros(s).map_err(datafusion::error::DataFusionError::Plan)?,
            ColumnarValue::Array(_) => return exec_err!("TUMBLE() size must be a constant INTERVAL"),
        };
        let ts = args.args[0].to_array(args.number_rows)?;
        let (starts, ends) = tumble_bounds(&ts, unit, size_us)?;
        let DataType::Struct(fields) = args.return_type().clone() else { return exec_err!("bad TUMBLE return type") };
        Ok(ColumnarValue::Array(Arc::new(StructArray::new(fields, vec![starts, ends], ts.logical_nulls()))))
    }
}

/// Window start and end of each timestamp in `ts` for tumbling windows of `size_us`.
pub fn tumble_bounds(ts: &ArrayRef, unit: TimeUnit, size_us: i64) -> DFResult<(ArrayRef, ArrayRef)> {
    use arrow::datatypes::Int64Type;
    let size = nagare_core::keys::from_micros(size_us, unit).max(1);
    let raw = arrow::compute::cast(ts, &DataType::Int64)?;
    let raw = raw.as_primitive::<Int64Type>();
    let starts: arrow::array::Int64Array = raw.unary(|t| t - t.rem_euclid(size));
    let ends: arrow::array::Int64Array = starts.unary(|s| s.saturating_add(size));
    let starts = arrow::compute::cast(&(Arc::new(starts) as ArrayRef), ts.data_type())?;
    let ends = arrow::compute::cast(&(Arc::new(ends) as ArrayRef), ts.data_type())?;
    Ok((starts, ends))
}

/// Microseconds of a constant interval; months are refused because their length varies.
pub fn interval_scalar_micros(value: &ScalarValue) -> Result<i64, String> {
    let us = match value {
        ScalarValue::IntervalMonthDayNano(Some(IntervalMonthDayNano { months, days, nanoseconds })) => {
            if *months != 0 {
                return Err("window sizes in months or years are not supported; use days".into());
            }
            i64::from(*days) * 86_400_000_000 + nanoseconds / 1_000
        }
        ScalarValue::IntervalDayTime(Some(v)) => i64::from(v.days) * 86_400_000_000 + i64::from(v.milliseconds) * 1_000,
        ScalarValue::IntervalYearMonth(Some(_)) => {
            return Err("window sizes in months or years are not supported; use days".into());
        }
        ScalarValue::DurationMicrosecond(Some(v)) => *v,
        other => return Err(format!("expected a constant INTERVAL such as INTERVAL '1' MINUTE, got {other}")),
    };
    if us <= 0 {
        return Err("window sizes must be positive".into());
    }
    Ok(us)
}

/// If `expr` is a call to a window function, its kind and time-column argument.
pub fn as_window_call(expr: &Expr) -> Option<Result<(WindowKind, Expr), String>> {
    let Expr::ScalarFunction(f) = strip_alias(expr) else { return None };
    let name = f.func.name();
    if !WINDOW_FUNCTIONS.contains(&name) {
        return None;
    }
    Some(window_call_args(name, &f.args))
}

fn window_call_args(name: &str, args: &[Expr]) -> Result<(WindowKind, Expr), String> {
    let upper = name.to_uppercase();
    let interval = |e: &Expr, what: &str| -> Result<i64, String> {
        match strip_alias(e) {
            Expr::Literal(v, _) => interval_scalar_micros(v).map_err(|m| format!("{upper}() {what}: {m}")),
            _ => Err(format!("{upper}() {what} must be a constant INTERVAL such as INTERVAL '1' MINUTE")),
        }
    };
    let time = args.first().cloned().ok_or_else(|| format!("{upper}() needs a time column"))?;
    let kind = match name {
        "tumble" => WindowKind::Tumble { size_us: interval(&args[1], "size")? },
        "hop" => {
            let slide_us = interval(&args[1], "slide")?;
            let size_us = interval(&args[2], "size")?;
            if size_us < slide_us {
                return Err(format!(
                    "HOP() size must be at least the slide (HOP(time, slide, size)); got slide {slide_us}us > size {size_us}us"
                ));
            }
            if size_us % slide_us != 0 {
                return Err("HOP() size must be a whole multiple of the slide".into());
            }
            WindowKind::Hop { slide_us, size_us }
        }
        "session" => WindowKind::Session { gap_us: interval(&args[1], "gap")? },
        _ => return Err(format!("{upper} is not a window function")),
    };
    Ok((kind, time))
}

/// Removes any aliases around an expression.
pub fn strip_alias(expr: &Expr) -> &Expr {
    match expr {
        Expr::Alias(a) => strip_alias(&a.expr),
        e => e,
    }
}

/// Whether the expression contains a call to any window function.
pub fn contains_window_call(expr: &Expr) -> bool {
    let mut found = false;
    let _ = expr.apply(|e| {
        if let Expr::ScalarFunction(f) = e
            && WINDOW_FUNCTIONS.contains(&f.func.name())
        {
            found = true;
            return Ok(datafusion::common::tree_node::TreeNodeRecursion::Stop);
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    found
}

use datafusion::common::tree_node::TreeNode;

#[cfg(test)]
mod tests {
    use arrow::array::TimestampMicrosecondArray;

    use super::*;

    #[test]
    fn tumble_bounds_floor_negative_and_positive() {
        let ts: ArrayRef = Arc::new(TimestampMicrosecondArray::from(vec![0, 59_999_999, 60_000_000, -1]));
        let (s, e) = tumble_bounds(&ts, TimeUnit::Microsecond, 60_000_000).unwrap();
        let s = s.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        let e = e.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        assert_eq!(s.values().to_vec(), vec![0, 0, 60_000_000, -60_000_000]);
        assert_eq!(e.values().to_vec(), vec![60_000_000, 60_000_000, 120_000_000, 0]);
    }

    #[test]
    fn intervals_in_months_are_refused() {
        let v = ScalarValue::IntervalMonthDayNano(Some(IntervalMonthDayNano { months: 1, days: 0, nanoseconds: 0 }));
        assert!(interval_scalar_micros(&v).unwrap_err().contains("months"));
        let v = ScalarValue::IntervalMonthDayNano(Some(IntervalMonthDayNano {
            months: 0,
            days: 0,
            nanoseconds: 60_000_000_000,
        }));
        assert_eq!(interval_scalar_micros(&v), Ok(60_000_000));
    }

    #[test]
    fn bound_function_names() {
        assert_eq!(split_bound_function("TUMBLE_START"), Some(("tumble", "start")));
        assert_eq!(split_bound_function("hop_end"), Some(("hop", "end")));
        assert_eq!(split_bound_function("tumble"), None);
    }
}
