//! Connector options: what each connector accepts (its spec), and the typed, validated values a table carries.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use nagare_core::parse_duration;

use crate::error::{Location, PlanError, PlanErrorKind, Result};

/// The type of an option's value, checked at plan time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptionKind {
    /// Any text.
    String,
    /// `true` / `false`.
    Bool,
    /// An integer within bounds (inclusive).
    Int { min: i64, max: i64 },
    /// A number within bounds (inclusive).
    Float { min: f64, max: f64 },
    /// A duration such as `10s` or `5 minutes`.
    Duration,
    /// A byte size such as `128MB` or `1GiB`.
    ByteSize,
    /// One of a fixed set of words.
    Enum(&'static [&'static str]),
}

impl fmt::Display for OptionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptionKind::String => write!(f, "text"),
            OptionKind::Bool => write!(f, "true or false"),
            OptionKind::Int { min, max } if *max == i64::MAX => write!(f, "an integer >= {min}"),
            OptionKind::Int { min, max } => write!(f, "an integer in {min}..={max}"),
            OptionKind::Float { min, max } => write!(f, "a number in {min}..={max}"),
            OptionKind::Duration => write!(f, "a duration such as '10s' or '5 minutes'"),
            OptionKind::ByteSize => write!(f, "a size such as '128MB' or '1GiB'"),
            OptionKind::Enum(values) => write!(f, "one of '{}'", values.join("', '")),
        }
    }
}

/// One option a connector accepts.
#[derive(Debug, Clone, Copy)]
pub struct OptionSpec {
    /// Name as written in `WITH (...)`.
    pub name: &'static str,
    /// Value type.
    pub kind: OptionKind,
    /// Whether the table is refused without it.
    pub required: bool,
    /// Value used when absent (documentation and `Options::get_*` defaults).
    pub default: Option<&'static str>,
    /// One line for `nagare connectors` and error messages.
    pub doc: &'static str,
    /// A credential: its `${VAR}` references are kept as written in the plan (and so in the job record, logs and
    /// checkpoints) and resolved from the environment of the process that uses it, by [`resolve_secret`].
    pub secret: bool,
}

impl OptionSpec {
    /// An optional option with a default.
    pub const fn optional(
        name: &'static str,
        kind: OptionKind,
        default: Option<&'static str>,
        doc: &'static str,
    ) -> Self {
        OptionSpec { name, kind, required: false, default, doc, secret: false }
    }

    /// A required option.
    pub const fn required(name: &'static str, kind: OptionKind, doc: &'static str) -> Self {
        OptionSpec { name, kind, required: true, default: None, doc, secret: false }
    }

    /// The same option, marked as a credential (see [`OptionSpec::secret`]).
    pub const fn as_secret(self) -> Self {
        OptionSpec { secret: true, ..self }
    }
}

/// The value of a secret option, with its `${NAME}` references filled from this process's environment: secrets
/// are resolved where they are used, never in the plan.
pub fn resolve_secret(option: &str, text: &str) -> std::result::Result<String, String> {
    substitute_references(option, text, |name| {
        std::env::var(name).map_err(|_| {
            format!("option '{option}': the environment variable {name} is not set in this process (secrets are read where they are used)")
        })
    })
}

/// `text` with each `${NAME}` replaced by `value(NAME)`.
fn substitute_references(
    option: &str,
    text: &str,
    mut value: impl FnMut(&str) -> std::result::Result<String, String>,
) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| format!("option '{option}': unclosed '${{'"))?;
        out.push_str(&value(&after[..end])?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A validated option value.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum OptionValue {
    /// Text or an enum word.
    String(String),
    /// Boolean.
    Bool(bool),
    /// Integer.
    Int(i64),
    /// Number.
    Float(f64),
    /// Duration.
    Duration(Duration),
    /// Bytes.
    Bytes(u64),
}

impl fmt::Display for OptionValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptionValue::String(s) => write!(f, "'{s}'"),
            OptionValue::Bool(b) => write!(f, "{b}"),
            OptionValue::Int(i) => write!(f, "{i}"),
            OptionValue::Float(x) => write!(f, "{x}"),
            OptionValue::Duration(d) => write!(f, "'{}'", nagare_core::format_duration(*d)),
            OptionValue::Bytes(b) => write!(f, "'{b}B'"),
        }
    }
}

/// Parses `value` (as the user wrote it, quotes removed) as `kind`.
pub fn parse_option_value(kind: OptionKind, value: &str) -> std::result::Result<OptionValue, String> {
    let v = value.trim();
    match kind {
        OptionKind::String => Ok(OptionValue::String(value.to_string())),
        OptionKind::Bool => match v.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Ok(OptionValue::Bool(true)),
            "false" | "no" | "off" | "0" => Ok(OptionValue::Bool(false)),
            _ => Err(format!("expected {kind}, got '{value}'")),
        },
        OptionKind::Int { min, max } => {
            let i: i64 = v.replace('_', "").parse().map_err(|_| format!("expected {kind}, got '{value}'"))?;
            if i < min || i > max {
                return Err(format!("expected {kind}, got {i}"));
            }
            Ok(OptionValue::Int(i))
        }
        OptionKind::Float { min, max } => {
            let x: f64 = v.parse().map_err(|_| format!("expected {kind}, got '{value}'"))?;
            if !(x >= min && x <= max) {
                return Err(format!("expected {kind}, got {x}"));
            }
            Ok(OptionValue::Float(x))
        }
        OptionKind::Duration => parse_duration(v).map(OptionValue::Duration).map_err(|e| e.to_string()),
        OptionKind::ByteSize => parse_byte_size(v).map(OptionValue::Bytes),
        OptionKind::Enum(values) => {
            let lower = v.to_ascii_lowercase();
            values
                .iter()
                .find(|w| **w == lower)
                .map(|w| OptionValue::String((*w).to_string()))
                .ok_or_else(|| format!("expected {kind}, got '{value}'"))
        }
    }
}

/// Parses `128MB`, `64 MiB`, `1GB`, `4096` (bytes).
pub fn parse_byte_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid size '{text}' (examples: '64MB', '1GiB', '4096')"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "tib" => 1024f64.powi(4),
        other => return Err(format!("invalid size '{text}': unknown unit '{other}'")),
    };
    let bytes = n * scale;
    if !bytes.is_finite() || bytes < 0.0 {
        return Err(format!("invalid size '{text}'"));
    }
    Ok(bytes as u64)
}

/// The validated options of one table, each with where it was written.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Options {
    values: BTreeMap<String, (OptionValue, Option<Location>)>,
    /// The connector's specs, for defaults; not carried in a shipped plan (its runtime reads the typed config).
    #[serde(skip)]
    specs: Vec<OptionSpec>,
}

impl Options {
    /// Validates raw `(name, value, location)` triples against `specs`: unknown names, bad values and missing
    /// required options are errors naming the option.
    pub fn validate(
        connector: &str,
        specs: &[OptionSpec],
        raw: &[(String, String, Option<Location>)],
        table_location: Option<Location>,
    ) -> Result<Options> {
        let mut values = BTreeMap::new();
        for (name, value, loc) in raw {
            let Some(spec) = specs.iter().find(|s| s.name == name) else {
                let known: Vec<&str> = specs.iter().map(|s| s.name).collect();
                let mut err = PlanError::unknown(format!("unknown option '{name}' for connector '{connector}'"))
                    .at(*loc)
                    .hint(format!("it accepts: {}", known.join(", ")));
                if let Some(close) = closest(name, &known) {
                    err = err.hint(format!("did you mean '{close}'? it accepts: {}", known.join(", ")));
                }
                return Err(err);
            };
            if values.contains_key(name) {
                return Err(PlanError::invalid(format!("option '{name}' is given twice")).at(*loc));
            }
            let parsed = parse_option_value(spec.kind, value).map_err(|reason| {
                PlanError::new(PlanErrorKind::InvalidValue, format!("option '{name}': {reason}")).at(*loc)
            })?;
            values.insert(name.clone(), (parsed, *loc));
        }
        for spec in specs.iter().filter(|s| s.required) {
            if !values.contains_key(spec.name) {
                return Err(PlanError::invalid(format!(
                    "connector '{connector}' needs option '{}' ({})",
                    spec.name, spec.doc
                ))
                .at(table_location));
            }
        }
        Ok(Options { values, specs: specs.to_vec() })
    }

    /// The value given, or the spec's default parsed.
    pub fn get(&self, name: &str) -> Option<OptionValue> {
        if let Some((v, _)) = self.values.get(name) {
            return Some(v.clone());
        }
        let spec = self.specs.iter().find(|s| s.name == name)?;
        parse_option_value(spec.kind, spec.default?).ok()
    }

    /// Whether the user wrote this option.
    pub fn is_set(&self, name: &str) -> bool {
        self.values.contains_key(name)
    }

    /// Where the option was written.
    pub fn location(&self, name: &str) -> Option<Location> {
        self.values.get(name).and_then(|(_, l)| *l)
    }

    /// Secret options written as literal values (no `${NAME}`), with where: a cluster would store them with the job.
    pub fn secret_literals(&self) -> Vec<(&'static str, Option<Location>)> {
        self.specs
            .iter()
            .filter(|s| s.secret)
            .filter_map(|s| match self.values.get(s.name) {
                Some((OptionValue::String(text), at)) if !text.contains("${") => Some((s.name, *at)),
                _ => None,
            })
            .collect()
    }

    /// The `${NAME}` variables that secret options refer to: they are read from the environment of the processes
    /// that use them, so a value given for one at submission is not stored with the job.
    pub fn secret_references(&self) -> Vec<String> {
        let mut names = Vec::new();
        for spec in self.specs.iter().filter(|s| s.secret) {
            let Some((OptionValue::String(text), _)) = self.values.get(spec.name) else { continue };
            let _ = substitute_references(spec.name, text, |name| {
                names.push(name.to_string());
                Ok(String::new())
            });
        }
        names
    }

    /// Text (or enum) value.
    pub fn get_str(&self, name: &str) -> Option<String> {
        match self.get(name)? {
            OptionValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// Boolean value.
    pub fn get_bool(&self, name: &str) -> Option<bool> {
        match self.get(name)? {
            OptionValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// Integer value.
    pub fn get_int(&self, name: &str) -> Option<i64> {
        match self.get(name)? {
            OptionValue::Int(i) => Some(i),
            _ => None,
        }
    }

    /// Numeric value (integers widen).
    pub fn get_float(&self, name: &str) -> Option<f64> {
        match self.get(name)? {
            OptionValue::Float(x) => Some(x),
            OptionValue::Int(i) => Some(i as f64),
            _ => None,
        }
    }

    /// Duration value.
    pub fn get_duration(&self, name: &str) -> Option<Duration> {
        match self.get(name)? {
            OptionValue::Duration(d) => Some(d),
            _ => None,
        }
    }

    /// Byte-size value.
    pub fn get_bytes(&self, name: &str) -> Option<u64> {
        match self.get(name)? {
            OptionValue::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// The options the user wrote, in name order (for `explain`).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &OptionValue)> {
        self.values.iter().map(|(k, (v, _))| (k.as_str(), v))
    }

    /// An error about option `name`, positioned at it.
    pub fn error(&self, name: &str, message: impl Into<String>) -> PlanError {
        PlanError::invalid(format!("option '{name}': {}", message.into())).at(self.location(name))
    }
}

/// The most similar candidate by edit distance, if reasonably close.
pub fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[OptionSpec] = &[
        OptionSpec::required("path", OptionKind::String, "where the files are"),
        OptionSpec::optional("format", OptionKind::Enum(&["json", "csv"]), Some("json"), "encoding"),
        OptionSpec::optional("rate", OptionKind::Int { min: 0, max: i64::MAX }, Some("0"), "events/s"),
        OptionSpec::optional("rollover_bytes", OptionKind::ByteSize, Some("128MB"), "size"),
    ];

    fn raw(pairs: &[(&str, &str)]) -> Vec<(String, String, Option<Location>)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string(), Some(Location { line: 1, column: 1 }))).collect()
    }

    #[test]
    fn typed_values_and_defaults() {
        let o = Options::validate("fs", SPECS, &raw(&[("path", "/x"), ("format", "CSV")]), None).unwrap();
        assert_eq!(o.get_str("format").as_deref(), Some("csv"));
        assert_eq!(o.get_int("rate"), Some(0));
        assert_eq!(o.get_bytes("rollover_bytes"), Some(128_000_000));
    }

    #[test]
    fn unknown_option_suggests_close_name() {
        let e = Options::validate("fs", SPECS, &raw(&[("path", "/x"), ("fromat", "csv")]), None).unwrap_err();
        assert_eq!(e.kind, PlanErrorKind::Unknown);
        assert!(e.to_string().contains("unknown option 'fromat'"), "{e}");
        assert!(e.to_string().contains("did you mean 'format'"), "{e}");
    }

    #[test]
    fn bad_values_and_missing_required() {
        let e = Options::validate("fs", SPECS, &raw(&[("path", "/x"), ("rate", "-1")]), None).unwrap_err();
        assert!(e.to_string().contains("option 'rate': expected an integer >= 0, got -1"), "{e}");
        let e = Options::validate("fs", SPECS, &raw(&[("format", "json")]), None).unwrap_err();
        assert!(e.to_string().contains("needs option 'path'"), "{e}");
        assert_eq!(parse_byte_size("1GiB"), Ok(1 << 30));
        assert!(parse_byte_size("12 furlongs").is_err());
    }
}
