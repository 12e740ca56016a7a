//! `connector = 'filesystem'`: files on a local disk as a source or a sink.

pub mod listing;
pub mod sink;
pub mod source;

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use nagare_engine::EngineError;
use nagare_engine::connector::{Committer, Connector, Sink, SinkContext, Source, SourceContext, SourceRestore, config};
use nagare_sql::catalog::{ConnectorSpec, TableDef, TableRole};
use nagare_sql::error::{PlanError, PlanErrorKind};
use nagare_sql::options::{OptionKind, OptionSpec};
use nagare_sql::{SinkSpec, SourceSpec};
use serde::{Deserialize, Serialize};

use crate::decode::BadRecords;
use source::Format;

const BAD_RECORDS: OptionKind = OptionKind::Enum(&["fail", "dead_letter", "skip"]);

/// Options of the filesystem source.
pub const SOURCE_OPTIONS: &[OptionSpec] = &[
    OptionSpec::required(
        "path",
        OptionKind::String,
        "a file, a directory (read recursively) or a glob such as '/data/*.json.gz'",
    ),
    OptionSpec::optional("format", OptionKind::Enum(&["json", "csv", "parquet"]), Some("json"), "file encoding"),
    OptionSpec::optional(
        "compression",
        OptionKind::Enum(&["auto", "none", "gzip", "zstd"]),
        Some("auto"),
        "text file compression; auto goes by extension (.gz, .zst)",
    ),
    OptionSpec::optional("watch", OptionKind::Bool, Some("false"), "keep running and read files that appear later"),
    OptionSpec::optional(
        "watch_interval",
        OptionKind::Duration,
        Some("5s"),
        "how often to look for new files when watching",
    ),
    OptionSpec::optional(
        "split_size",
        OptionKind::ByteSize,
        Some("32MB"),
        "uncompressed JSON files larger than this are read in parallel pieces",
    ),
    OptionSpec::optional("csv_header", OptionKind::Bool, Some("true"), "CSV files start with a header line"),
    OptionSpec::optional("csv_delimiter", OptionKind::String, Some(","), "CSV field separator (one character)"),
    OptionSpec::optional(
        "bad_records",
        BAD_RECORDS,
        Some("fail"),
        "malformed records: stop the job, dead-letter them, or skip them",
    ),
    OptionSpec::optional(
        "dead_letter_path",
        OptionKind::String,
        None,
        "directory for dead-letter records of this source (default: SET dead_letter_path)",
    ),
];

/// Options of the filesystem sink.
pub const SINK_OPTIONS: &[OptionSpec] = &[
    OptionSpec::required("path", OptionKind::String, "the output directory"),
    OptionSpec::optional("format", OptionKind::Enum(&["parquet", "json"]), Some("parquet"), "file encoding"),
    OptionSpec::optional(
        "compression",
        OptionKind::Enum(&["snappy", "zstd", "gzip", "none"]),
        None,
        "Parquet: snappy (default), zstd, none; JSON: none (default), gzip, zstd",
    ),
    OptionSpec::optional(
        "rollover_rows",
        OptionKind::Int { min: 0, max: i64::MAX },
        Some("0"),
        "start a new file after this many rows (0: no limit)",
    ),
    OptionSpec::optional(
        "rollover_bytes",
        OptionKind::ByteSize,
        Some("128MB"),
        "start a new file after about this many bytes (0: no limit)",
    ),
    OptionSpec::optional(
        "rollover_interval",
        OptionKind::Duration,
        None,
        "start a new file after this long (default: no limit)",
    ),
];

/// The filesystem connector.
#[derive(Debug)]
pub struct FilesystemSpec;

/// A filesystem source's configuration, parsed once at plan time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceConfig {
    /// A file, a directory or a glob.
    pub path: String,
    /// File encoding.
    pub format: Format,
    /// `auto`, `none`, `gzip` or `zstd`.
    pub compression: String,
    /// How often to look for new files, when watching.
    pub watch_interval: Option<Duration>,
    /// Uncompressed JSON files larger than this are read in pieces.
    pub split_size: u64,
    /// CSV files start with a header line.
    pub csv_header: bool,
    /// CSV field separator.
    pub csv_delimiter: u8,
    /// What malformed records do.
    pub bad_records: BadRecords,
}

/// Output encoding of the filesystem sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutFormat {
    /// Parquet files.
    Parquet,
    /// JSON lines.
    Json,
}

/// A filesystem sink's configuration, parsed once at plan time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SinkConfig {
    /// The output directory.
    pub path: String,
    /// File encoding.
    pub format: OutFormat,
    /// `snappy`, `zstd`, `gzip` or `none`, as the format allows.
    pub compression: String,
    /// Rows per file, when limited.
    pub rollover_rows: Option<u64>,
    /// Bytes per file (about), when limited.
    pub rollover_bytes: Option<u64>,
    /// Time per file, when limited.
    pub rollover_interval: Option<Duration>,
}

impl SourceConfig {
    fn from_table(table: &TableDef) -> SourceConfig {
        let o = &table.options;
        SourceConfig {
            path: o.get_str("path").unwrap_or_default(),
            format: Format::parse(&o.get_str("format").unwrap_or_default()),
            compression: o.get_str("compression").unwrap_or_else(|| "auto".into()),
            watch_interval: o
                .get_bool("watch")
                .unwrap_or(false)
                .then(|| o.get_duration("watch_interval").unwrap_or(Duration::from_secs(5))),
            split_size: o.get_bytes("split_size").unwrap_or(32 << 20),
            csv_header: o.get_bool("csv_header").unwrap_or(true),
            csv_delimiter: o.get_str("csv_delimiter").and_then(|d| d.bytes().next()).unwrap_or(b','),
            bad_records: BadRecords::parse(o.get_str("bad_records")),
        }
    }
}

impl SinkConfig {
    fn from_table(table: &TableDef) -> SinkConfig {
        let o = &table.options;
        let format = match o.get_str("format").as_deref() {
            Some("json") => OutFormat::Json,
            _ => OutFormat::Parquet,
        };
        let default_compression = if format == OutFormat::Parquet { "snappy" } else { "none" };
        let positive = |v: Option<u64>| v.filter(|n| *n > 0);
        SinkConfig {
            path: o.get_str("path").unwrap_or_default(),
            format,
            compression: o.get_str("compression").unwrap_or_else(|| default_compression.into()),
            rollover_rows: positive(o.get_int("rollover_rows").map(|i| i as u64)),
            rollover_bytes: positive(o.get_bytes("rollover_bytes")),
            rollover_interval: o.get_duration("rollover_interval").filter(|d| !d.is_zero()),
        }
    }
}

impl ConnectorSpec for FilesystemSpec {
    fn name(&self) -> &'static str {
        "filesystem"
    }

    fn description(&self) -> &'static str {
        "local files: JSON lines, CSV or Parquet in; Parquet or JSON lines out"
    }

    fn options(&self, role: TableRole) -> Option<&'static [OptionSpec]> {
        Some(match role {
            TableRole::Source => SOURCE_OPTIONS,
            TableRole::Sink => SINK_OPTIONS,
        })
    }

    fn validate(&self, table: &TableDef, role: TableRole) -> Result<(), PlanError> {
        let o = &table.options;
        let path = o.get_str("path").unwrap_or_default();
        if path.trim().is_empty() {
            return Err(o.error("path", "must not be empty"));
        }
        match role {
            TableRole::Source => {
                if !table.has_columns {
                    return Err(PlanError::invalid(format!("source '{}' needs its columns declared", table.name))
                        .at(table.location)
                        .hint("list the fields to read: CREATE TABLE t (id TEXT, time TIMESTAMP, ...) WITH (...)"));
                }
                let format = o.get_str("format").unwrap_or_default();
                for name in ["csv_header", "csv_delimiter"] {
                    if o.is_set(name) && format != "csv" {
                        return Err(o.error(name, "applies only to format = 'csv'"));
                    }
                }
                if format == "parquet" && o.is_set("compression") {
                    return Err(o.error("compression", "Parquet files carry their own compression; remove this option"));
                }
                if o.is_set("watch_interval") && !o.get_bool("watch").unwrap_or(false) {
                    return Err(o.error("watch_interval", "applies only with watch = true"));
                }
                if let Some(d) = o.get_str("csv_delimiter")
                    && d.len() != 1
                {
                    return Err(o.error("csv_delimiter", format!("must be one ASCII character, got '{d}'")));
                }
                let watch = o.get_bool("watch").unwrap_or(false);
                match listing::list_files(&path) {
                    Ok(files) if files.is_empty() && !watch => Err(PlanError::new(
                        PlanErrorKind::Environment,
                        format!("option 'path': '{path}' matches no files"),
                    )
                    .at(o.location("path"))
                    .hint("set watch = true to wait for files to appear")),
                    Err(e) if !watch => {
                        Err(PlanError::new(PlanErrorKind::Environment, e.to_string()).at(o.location("path")))
                    }
                    _ => Ok(()),
                }
            }
            TableRole::Sink => {
                let format = o.get_str("format").unwrap_or_default();
                if let Some(c) = o.get_str("compression") {
                    let ok = match format.as_str() {
                        "json" => ["none", "gzip", "zstd"].contains(&c.as_str()),
                        _ => ["none", "snappy", "zstd"].contains(&c.as_str()),
                    };
                    if !ok {
                        return Err(o.error("compression", format!("'{c}' is not available for format '{format}'")));
                    }
                }
                let p = std::path::Path::new(&path);
                if p.is_file() {
                    return Err(
                        o.error("path", format!("'{path}' is a file; the filesystem sink writes into a directory"))
                    );
                }
                Ok(())
            }
        }
    }

    fn configure(&self, table: &TableDef, role: TableRole) -> Result<serde_json::Value, PlanError> {
        let value = match role {
            TableRole::Source => serde_json::to_value(SourceConfig::from_table(table)),
            TableRole::Sink => serde_json::to_value(SinkConfig::from_table(table)),
        };
        value.map_err(|e| PlanError::internal(format!("filesystem configuration: {e}")))
    }

    fn is_bounded(&self, table: &TableDef) -> bool {
        !table.options.get_bool("watch").unwrap_or(false)
    }
}

impl Connector for FilesystemSpec {
    fn create_source(
        &self,
        spec: &SourceSpec,
        schema: SchemaRef,
        ctx: SourceContext,
        restore: Option<&SourceRestore>,
    ) -> Result<Box<dyn Source>, EngineError> {
        let (subtask, parallelism) = (ctx.subtask, ctx.parallelism);
        let mut s = source::FileSource::new(&config(&spec.table)?, spec, schema, ctx)?;
        if let Some(r) = restore {
            s.restore(&r.mine(subtask, parallelism), r.all())?;
        }
        Ok(Box::new(s))
    }

    fn create_sink(&self, spec: &SinkSpec, schema: SchemaRef, ctx: SinkContext) -> Result<Box<dyn Sink>, EngineError> {
        Ok(Box::new(sink::FileSink::new(config(&spec.table)?, schema, ctx)?))
    }

    fn committer(&self, spec: &SinkSpec) -> Result<Arc<dyn Committer>, EngineError> {
        let c: SinkConfig = config(&spec.table)?;
        Ok(Arc::new(sink::Recovery { dir: c.path.into() }))
    }
}
