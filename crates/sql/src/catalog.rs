//! Declared tables (`CREATE TABLE ... WITH (connector = ...)`) and the connectors that back them.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::sql::sqlparser::ast::{
    ColumnOption, CreateTable, CreateTableOptions, Expr as SqlExpr, Spanned, SqlOption, TableConstraint, Value,
};

use crate::error::{Location, PlanError, PlanErrorKind, Result};
use crate::options::{OptionSpec, Options, closest};
use crate::preprocess::WatermarkClause;
use crate::types::sql_to_field;

/// Whether a table is read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableRole {
    /// Read (`FROM`).
    Source,
    /// Written (`INSERT INTO`).
    Sink,
}

impl std::fmt::Display for TableRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TableRole::Source => "source",
            TableRole::Sink => "sink",
        })
    }
}

/// What a connector tells the planner about itself; implemented next to the connector's code.
pub trait ConnectorSpec: Send + Sync {
    /// The name used in `connector = '...'`.
    fn name(&self) -> &'static str;

    /// One line for listings.
    fn description(&self) -> &'static str;

    /// Options for the role, or `None` if the connector cannot play it.
    fn options(&self, role: TableRole) -> Option<&'static [OptionSpec]>;

    /// Checks beyond option types (option combinations, the declared schema, paths) for a table in `role`.
    fn validate(&self, table: &TableDef, role: TableRole) -> Result<()>;

    /// The connector's typed configuration of a validated table in `role`, parsed once at plan time and carried in
    /// the plan (as JSON, so that it ships with the plan); its sources and sinks are built from it, never from the
    /// option strings again.
    fn configure(&self, table: &TableDef, role: TableRole) -> Result<serde_json::Value>;

    /// Whether the source ends by itself (a bounded read); decides whether windows flush at the end.
    fn is_bounded(&self, _table: &TableDef) -> bool {
        false
    }

    /// Whether rows for a sink table must reach its subtasks partitioned by the table's PRIMARY KEY (so that one
    /// subtask sees every change to a key, in order).
    fn sink_partitioned_by_key(&self, _table: &TableDef) -> bool {
        false
    }

    /// For sinks that write one image per key (upserts): the columns ordering a key's changes. The planner then puts
    /// a collapse operator (last change per key per checkpoint) in front of the sink.
    fn sink_collapse_sequence(&self, _table: &TableDef) -> Option<Vec<String>> {
        None
    }

    /// Whether a sink needs its columns declared, or can take the query's schema.
    fn sink_needs_columns(&self) -> bool {
        false
    }

    /// For sources that deliver at least once (a queue): how long after a first delivery a message may be
    /// delivered again (its visibility timeout, before any restart). The planner warns when such a source reaches
    /// a sink without a dedup, or through one that forgets keys sooner.
    fn redelivery_window(&self, _table: &TableDef) -> Option<std::time::Duration> {
        None
    }
}

/// The connectors a planner knows.
#[derive(Clone, Default)]
pub struct ConnectorCatalog {
    connectors: BTreeMap<&'static str, Arc<dyn ConnectorSpec>>,
}

impl std::fmt::Debug for ConnectorCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.connectors.keys()).finish()
    }
}

impl ConnectorCatalog {
    /// An empty catalog.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a connector.
    pub fn register(&mut self, spec: Arc<dyn ConnectorSpec>) {
        self.connectors.insert(spec.name(), spec);
    }

    /// Looks a connector up by name.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn ConnectorSpec>> {
        self.connectors.get(name)
    }

    /// All connectors, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn ConnectorSpec>> {
        self.connectors.values()
    }
}

/// A declared table.
#[derive(Debug, Clone)]
pub struct TableDef {
    /// Name (as normalised by the SQL front end: unquoted names lower-cased).
    pub name: String,
    /// Connector name.
    pub connector: String,
    /// Declared columns; empty when declared without columns (a sink that takes its query's schema).
    pub schema: SchemaRef,
    /// Whether columns were declared.
    pub has_columns: bool,
    /// `WATERMARK FOR`.
    pub watermark: Option<WatermarkClause>,
    /// `PRIMARY KEY` columns.
    pub primary_key: Vec<String>,
    /// Validated options (without `connector`).
    pub options: Options,
    /// Raw options, kept to validate again for the role the table turns out to play.
    pub raw_options: Vec<(String, String, Option<Location>)>,
    /// The connector's typed configuration for the role the table plays (null until validated for one).
    pub config: serde_json::Value,
    /// Where the statement starts.
    pub location: Option<Location>,
}

impl TableDef {
    /// Builds a table from its statement, validating the connector and option names and types.
    pub fn from_statement(
        ct: &CreateTable,
        watermark: Option<WatermarkClause>,
        connectors: &ConnectorCatalog,
        location: Option<Location>,
        variables: &Variables,
    ) -> Result<TableDef> {
        let name = normalize_object_name(&ct.name.to_string());
        if ct.query.is_some() || ct.like.is_some() || ct.clone.is_some() {
            return Err(PlanError::unsupported("CREATE TABLE ... AS / LIKE / CLONE is not supported")
                .at(location)
                .hint("declare columns and WITH (connector = ...)"));
        }
        let raw_list = match &ct.table_options {
            CreateTableOptions::With(opts) => opts.clone(),
            CreateTableOptions::None => Vec::new(),
            _ => {
                return Err(
                    PlanError::unsupported("table options must be given as WITH (key = 'value', ...)").at(location)
                );
            }
        };
        let mut connector: Option<String> = None;
        let mut raw = Vec::new();
        for opt in &raw_list {
            let SqlOption::KeyValue { key, value } = opt else {
                return Err(PlanError::invalid(format!("option {opt} must be written key = 'value'"))
                    .at(Location::from_span(opt.span()).or(location)));
            };
            let key_loc = Location::from_span(key.span).or(location);
            let value_text = option_value_text(value).ok_or_else(|| {
                PlanError::invalid(format!("option '{}': value must be a literal, got {value}", key.value)).at(key_loc)
            })?;
            let key_name = key.value.to_ascii_lowercase();
            if key_name == "connector" {
                let value_text = variables.substitute(&value_text).map_err(|e| e.at(key_loc))?;
                connector = Some(value_text.to_ascii_lowercase());
            } else {
                // `${VAR}`s are filled below, once the connector says which options are secrets.
                raw.push((key_name, value_text, key_loc));
            }
        }
        let connector = connector.ok_or_else(|| {
            PlanError::invalid(format!("table '{name}' needs a connector")).at(location).hint(format!(
                "add WITH (connector = '...'); known connectors: {}",
                connectors.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ")
            ))
        })?;
        let Some(spec) = connectors.get(&connector) else {
            let names: Vec<&str> = connectors.iter().map(|c| c.name()).collect();
            let loc = raw_list
                .iter()
                .find_map(|o| match o {
                    SqlOption::KeyValue { key, .. } if key.value.eq_ignore_ascii_case("connector") => {
                        Location::from_span(key.span)
                    }
                    _ => None,
                })
                .or(location);
            let mut err = PlanError::unknown(format!("unknown connector '{connector}'")).at(loc);
            err = match closest(&connector, &names) {
                Some(c) => err.hint(format!("did you mean '{c}'? known connectors: {}", names.join(", "))),
                None => err.hint(format!("known connectors: {}", names.join(", "))),
            };
            return Err(err);
        };

        // Columns.
        let mut fields = Vec::with_capacity(ct.columns.len());
        let mut primary_key = Vec::new();
        for col in &ct.columns {
            let col_loc = Location::from_span(col.name.span).or(location);
            let cname = normalize_ident(&col.name.value, col.name.quote_style.is_some());
            if fields.iter().any(|f: &Field| f.name() == &cname) {
                return Err(PlanError::invalid(format!("column '{cname}' is declared twice")).at(col_loc));
            }
            let mut nullable = true;
            for opt in &col.options {
                match &opt.option {
                    ColumnOption::NotNull => nullable = false,
                    ColumnOption::Null => nullable = true,
                    ColumnOption::PrimaryKey(_) => {
                        nullable = false;
                        primary_key.push(cname.clone());
                    }
                    other => {
                        return Err(
                            PlanError::unsupported(format!("column option {other} is not supported")).at(col_loc)
                        );
                    }
                }
            }
            let field = sql_to_field(&cname, &col.data_type, nullable).map_err(|e| e.at(col_loc))?;
            fields.push(field);
        }
        for c in &ct.constraints {
            match c {
                TableConstraint::PrimaryKey(pk) => {
                    if !primary_key.is_empty() {
                        return Err(PlanError::invalid("PRIMARY KEY is declared twice").at(location));
                    }
                    for ic in &pk.columns {
                        let col = match &ic.column.expr {
                            SqlExpr::Identifier(id) => normalize_ident(&id.value, id.quote_style.is_some()),
                            other => {
                                return Err(PlanError::invalid(format!("PRIMARY KEY lists columns, got {other}"))
                                    .at(Location::from_span(other.span()).or(location)));
                            }
                        };
                        let Some(idx) = fields.iter().position(|f| f.name() == &col) else {
                            return Err(PlanError::unknown(format!(
                                "PRIMARY KEY column '{col}' is not a column of '{name}'"
                            ))
                            .at(Location::from_span(ic.column.expr.span()).or(location)));
                        };
                        fields[idx] = fields[idx].clone().with_nullable(false);
                        primary_key.push(col);
                    }
                }
                other => {
                    return Err(PlanError::unsupported(format!("table constraint {other} is not supported"))
                        .at(Location::from_span(other.span()).or(location)));
                }
            }
        }

        // Variables: filled now, except in secrets, which keep their references (resolved where they are used).
        let secret = |name: &str| {
            [TableRole::Source, TableRole::Sink]
                .iter()
                .any(|r| spec.options(*r).unwrap_or_default().iter().any(|s| s.name == name && s.secret))
        };
        for (option, value, loc) in &mut raw {
            if secret(option) {
                if !value.contains("${") {
                    tracing::warn!(
                        table = %name,
                        "option '{option}' is a secret written in the SQL text; write '${{VARIABLE}}' and set the \
                         variable in the environment of the processes that run the job"
                    );
                }
            } else {
                *value = variables.substitute(value).map_err(|e| e.at(*loc))?;
            }
        }
        // Options: names and types against everything the connector accepts in any role.
        let mut all_specs: Vec<OptionSpec> = Vec::new();
        for role in [TableRole::Source, TableRole::Sink] {
            for s in spec.options(role).unwrap_or_default() {
                match all_specs.iter_mut().find(|x| x.name == s.name) {
                    // Same name, different meaning per role: the value is checked once the role is known.
                    Some(existing) if existing.kind != s.kind => existing.kind = crate::options::OptionKind::String,
                    Some(_) => {}
                    None => all_specs.push(OptionSpec { required: false, ..*s }),
                }
            }
        }
        let options = Options::validate(&connector, &all_specs, &raw, location)?;

        if let Some(w) = &watermark
            && !fields.iter().any(|f| f.name() == &w.column)
        {
            return Err(PlanError::unknown(format!("WATERMARK FOR '{}': no such column in '{name}'", w.column))
                .at(Some(w.location)));
        }
        Ok(TableDef {
            name,
            connector,
            has_columns: !fields.is_empty(),
            schema: Arc::new(Schema::new(fields)),
            watermark,
            primary_key,
            options,
            raw_options: raw,
            config: serde_json::Value::Null,
            location,
        })
    }

    /// Validates the table for the role it plays: required options and the connector's own checks.
    pub fn validate_role(&self, connectors: &ConnectorCatalog, role: TableRole) -> Result<TableDef> {
        let spec = connectors
            .get(&self.connector)
            .ok_or_else(|| PlanError::internal(format!("connector '{}' vanished", self.connector)))?;
        let Some(specs) = spec.options(role) else {
            return Err(PlanError::new(
                PlanErrorKind::Unsupported,
                format!("connector '{}' cannot be used as a {role} (table '{}')", self.connector, self.name),
            )
            .at(self.location));
        };
        let options = Options::validate(&self.connector, specs, &self.raw_options, self.location).map_err(|e| {
            if e.kind == PlanErrorKind::Unknown {
                PlanError { message: format!("{} when '{}' is used as a {role}", e.message, self.name), ..e }
            } else {
                e
            }
        })?;
        let table = TableDef { options, ..self.clone() };
        if role == TableRole::Sink && !table.has_columns && spec.sink_needs_columns() {
            return Err(
                PlanError::invalid(format!("sink '{}' needs its columns declared", table.name)).at(table.location)
            );
        }
        if role == TableRole::Sink && table.watermark.is_some() {
            return Err(PlanError::invalid(format!(
                "sink '{}' declares a WATERMARK; watermarks belong to sources",
                table.name
            ))
            .at(table.watermark.as_ref().map(|w| w.location)));
        }
        spec.validate(&table, role)?;
        let config = spec.configure(&table, role)?;
        Ok(TableDef { config, ..table })
    }

    /// The connector's typed configuration (see [`ConnectorSpec::configure`]).
    pub fn config<T: serde::de::DeserializeOwned>(&self) -> std::result::Result<T, String> {
        serde_json::from_value(self.config.clone())
            .map_err(|e| format!("the plan's configuration of table '{}' ({}): {e}", self.name, self.connector))
    }
}

/// Values for `${NAME}` references in option and setting values (command-line `--var`, then the environment).
#[derive(Debug, Clone, Default)]
pub struct Variables {
    values: BTreeMap<String, String>,
    from_env: bool,
}

impl Variables {
    /// No variables; any reference is an error.
    pub fn none() -> Self {
        Self::default()
    }

    /// The given values, falling back to environment variables when `from_env`.
    pub fn new(values: BTreeMap<String, String>, from_env: bool) -> Self {
        Variables { values, from_env }
    }

    /// Replaces every `${NAME}` in `text`.
    pub fn substitute(&self, text: &str) -> Result<String> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                return Err(PlanError::invalid(format!("unclosed '${{' in '{text}'")));
            };
            let name = &after[..end];
            let value = self
                .values
                .get(name)
                .cloned()
                .or_else(|| if self.from_env { std::env::var(name).ok() } else { None })
                .ok_or_else(|| {
                    PlanError::unknown(format!("variable '${{{name}}}' is not set"))
                        .hint(format!("pass --var {name}=... or set the environment variable {name}"))
                })?;
            out.push_str(&value);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

fn option_value_text(value: &SqlExpr) -> Option<String> {
    match value {
        SqlExpr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => Some(s.clone()),
            Value::Number(n, _) => Some(n.clone()),
            Value::Boolean(b) => Some(b.to_string()),
            _ => None,
        },
        SqlExpr::Identifier(id) => Some(id.value.clone()),
        SqlExpr::UnaryOp { op, expr } => option_value_text(expr).map(|v| format!("{op}{v}")),
        _ => None,
    }
}

/// Unquoted identifiers are case-insensitive (lower-cased), as DataFusion treats them.
pub fn normalize_ident(value: &str, quoted: bool) -> String {
    if quoted { value.to_string() } else { value.to_ascii_lowercase() }
}

/// Normalises a possibly quoted, possibly dotted name the way DataFusion resolves table names.
pub fn normalize_object_name(text: &str) -> String {
    let t = text.trim();
    if let Some(inner) = t.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        inner.to_string()
    } else {
        t.to_ascii_lowercase()
    }
}
