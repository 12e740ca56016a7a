//! Pipeline settings: what `SET` (and `--set`) may change, checked and applied in order.

use std::collections::BTreeMap;
use std::time::Duration;

use datafusion::sql::sqlparser::ast::{self as sql, Expr as SqlExpr, Value};

use crate::catalog::Variables;
use crate::error::{Location, PlanError, Result};
use crate::graph::{LateRowPolicy, Settings};
use crate::options::{OptionKind, OptionValue, closest, parse_option_value};

/// Pipeline settings a `SET` statement (or `--set`) may change, with their types.
pub const SETTINGS: &[(&str, OptionKind, &str)] = &[
    ("parallelism", OptionKind::Int { min: 1, max: 4096 }, "subtasks per parallel operator (default: CPU cores)"),
    (
        "max_parallelism",
        OptionKind::Int { min: 1, max: 32768 },
        "key groups; fixed for the life of a job's state (default 128)",
    ),
    (
        "dedup_ttl",
        OptionKind::Duration,
        "how long (event time) a dedup remembers a key when no window bounds it: from its first row, or from the \
         watermark a late first row arrived at",
    ),
    (
        "late_rows",
        OptionKind::Enum(&["drop", "dead_letter"]),
        "what windows do with rows whose windows have closed (a dedup keeps the late rows it receives)",
    ),
    ("dead_letter_path", OptionKind::String, "directory for dead-letter records (bad input, late rows)"),
    ("batch_size", OptionKind::Int { min: 1, max: 1 << 20 }, "rows per batch sources aim for (default 8192)"),
    (
        "source_rate_limit",
        OptionKind::Int { min: 0, max: i64::MAX },
        "rows per second each source table reads at most, over all its subtasks (default 0: no limit); for \
         backfills that must not outrun a sink's quota",
    ),
    ("checkpoint_interval", OptionKind::Duration, "time between checkpoints, when the job takes them (default 10s)"),
    (
        "checkpoint_timeout",
        OptionKind::Duration,
        "a checkpoint not complete after this long is aborted (default 10 minutes)",
    ),
    ("checkpoints_retained", OptionKind::Int { min: 1, max: 1000 }, "completed checkpoints kept (default 3)"),
    (
        "checkpoint_tolerable_failures",
        OptionKind::Int { min: 0, max: 1000 },
        "checkpoints that may fail in a row before the job fails (default 3)",
    ),
];

/// Settings as they are applied, in order.
pub(super) struct SettingsBuilder {
    pub(super) values: BTreeMap<&'static str, OptionValue>,
    pub(super) default_parallelism: usize,
}

impl SettingsBuilder {
    pub(super) fn new(default_parallelism: usize) -> Self {
        SettingsBuilder { values: BTreeMap::new(), default_parallelism }
    }

    pub(super) fn apply_statement(
        &mut self,
        set: &sql::Set,
        location: Option<Location>,
        variables: &Variables,
    ) -> Result<()> {
        let sql::Set::SingleAssignment { variable, values, .. } = set else {
            return Err(PlanError::unsupported(format!("{set} is not supported; write SET key = 'value'")).at(location));
        };
        let key = variable.to_string().to_ascii_lowercase();
        let [value] = values.as_slice() else {
            return Err(PlanError::invalid(format!("SET {key} takes one value")).at(location));
        };
        let text = match value {
            SqlExpr::Value(v) => match &v.value {
                Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => s.clone(),
                Value::Number(n, _) => n.clone(),
                Value::Boolean(b) => b.to_string(),
                other => other.to_string(),
            },
            SqlExpr::Identifier(id) => id.value.clone(),
            other => other.to_string(),
        };
        let text = variables.substitute(&text).map_err(|e| e.at(location))?;
        self.apply(&key, &text, location)
    }

    pub(super) fn apply(&mut self, key: &str, value: &str, location: Option<Location>) -> Result<()> {
        let key = key.trim().to_ascii_lowercase();
        let Some((name, kind, _)) = SETTINGS.iter().find(|(n, _, _)| *n == key) else {
            let names: Vec<&str> = SETTINGS.iter().map(|(n, _, _)| *n).collect();
            let mut err = PlanError::unknown(format!("unknown setting '{key}'")).at(location);
            err = match closest(&key, &names) {
                Some(c) => err.hint(format!("did you mean '{c}'? settings: {}", names.join(", "))),
                None => err.hint(format!("settings: {}", names.join(", "))),
            };
            return Err(err);
        };
        let v = parse_option_value(*kind, value)
            .map_err(|reason| PlanError::invalid(format!("setting '{key}': {reason}")).at(location))?;
        self.values.insert(name, v);
        Ok(())
    }

    pub(super) fn build(self) -> Settings {
        let int = |k: &str| match self.values.get(k) {
            Some(OptionValue::Int(i)) => Some(*i),
            _ => None,
        };
        let duration = |k: &str| match self.values.get(k) {
            Some(OptionValue::Duration(d)) => Some(*d),
            _ => None,
        };
        Settings {
            parallelism: int("parallelism").map(|i| i as usize).unwrap_or(self.default_parallelism).max(1),
            max_parallelism: int("max_parallelism").map(|i| i as u32).unwrap_or(nagare_core::DEFAULT_MAX_PARALLELISM),
            dedup_ttl: match self.values.get("dedup_ttl") {
                Some(OptionValue::Duration(d)) => Some(*d),
                _ => None,
            },
            late_rows: match self.values.get("late_rows") {
                Some(OptionValue::String(s)) if s == "dead_letter" => LateRowPolicy::DeadLetter,
                _ => LateRowPolicy::Drop,
            },
            dead_letter_path: match self.values.get("dead_letter_path") {
                Some(OptionValue::String(s)) => Some(s.clone()),
                _ => None,
            },
            batch_size: int("batch_size").map(|i| i as usize).unwrap_or(8192),
            source_rate_limit: int("source_rate_limit").filter(|r| *r > 0).map(|r| r as u64),
            checkpoint_interval: duration("checkpoint_interval").unwrap_or(Duration::from_secs(10)),
            checkpoint_timeout: duration("checkpoint_timeout").unwrap_or(Duration::from_secs(600)),
            checkpoints_retained: int("checkpoints_retained").map(|i| i as usize).unwrap_or(3),
            checkpoint_tolerable_failures: int("checkpoint_tolerable_failures").map(|i| i as u32).unwrap_or(3),
        }
    }
}

#[cfg(test)]
mod tests {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    use super::*;
    use crate::error::PlanErrorKind;

    fn set_statement(sql: &str) -> sql::Set {
        match Parser::parse_sql(&GenericDialect {}, sql).unwrap().remove(0) {
            sql::Statement::Set(s) => s,
            other => panic!("not a SET: {other}"),
        }
    }

    #[test]
    fn defaults_then_statements_then_overrides_in_order() {
        let mut b = SettingsBuilder::new(4);
        let s = SettingsBuilder::new(4).build();
        assert_eq!((s.parallelism, s.batch_size, s.checkpoint_interval), (4, 8192, Duration::from_secs(10)));
        assert_eq!(s.late_rows, LateRowPolicy::Drop);
        let vars = Variables::new([("N".to_string(), "3".to_string())].into(), false);
        b.apply_statement(&set_statement("SET parallelism = '${N}'"), None, &vars).unwrap();
        b.apply_statement(&set_statement("SET late_rows = dead_letter"), None, &vars).unwrap();
        b.apply_statement(&set_statement("SET dedup_ttl = '10 minutes'"), None, &vars).unwrap();
        b.apply("PARALLELISM", "6", None).unwrap();
        let s = b.build();
        assert_eq!(s.parallelism, 6, "the override, applied last, wins");
        assert_eq!(s.late_rows, LateRowPolicy::DeadLetter);
        assert_eq!(s.dedup_ttl, Some(Duration::from_secs(600)));
    }

    #[test]
    fn unknown_names_and_bad_values_are_refused_where_they_are() {
        let at = Some(Location { line: 3, column: 1 });
        let e = SettingsBuilder::new(1).apply("dedup_tl", "1m", at).unwrap_err();
        assert_eq!((e.kind, e.location), (PlanErrorKind::Unknown, at));
        assert!(e.hint.unwrap_or_default().contains("did you mean 'dedup_ttl'"));
        let e = SettingsBuilder::new(1).apply("parallelism", "0", at).unwrap_err();
        assert_eq!((e.kind, e.location), (PlanErrorKind::InvalidValue, at));
        assert!(e.message.starts_with("setting 'parallelism'"), "{e}");
        let e = SettingsBuilder::new(1)
            .apply_statement(&set_statement("SET batch_size = 1, 2"), at, &Variables::none())
            .unwrap_err();
        assert!(e.message.contains("takes one value"), "{e}");
    }
}
