//! `connector = 'stdout'`: rows printed as JSON lines (or as a table), for trying pipelines out.

use std::io::Write;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use nagare_engine::EngineError;
use nagare_engine::connector::{Connector, Sink, SinkContext, config};
use nagare_sql::SinkSpec;
use nagare_sql::catalog::{ConnectorSpec, TableDef, TableRole};
use nagare_sql::error::PlanError;
use nagare_sql::options::{OptionKind, OptionSpec};

/// Options of the stdout sink.
pub const OPTIONS: &[OptionSpec] = &[OptionSpec::optional(
    "format",
    OptionKind::Enum(&["json", "table"]),
    Some("json"),
    "JSON lines, or a text table per batch",
)];

/// The stdout connector's spec.
#[derive(Debug)]
pub struct StdoutSpec;

impl ConnectorSpec for StdoutSpec {
    fn name(&self) -> &'static str {
        "stdout"
    }

    fn description(&self) -> &'static str {
        "prints rows to standard output"
    }

    fn options(&self, role: TableRole) -> Option<&'static [OptionSpec]> {
        (role == TableRole::Sink).then_some(OPTIONS)
    }

    fn validate(&self, _table: &TableDef, _role: TableRole) -> Result<(), PlanError> {
        Ok(())
    }

    fn configure(&self, table: &TableDef, _role: TableRole) -> Result<serde_json::Value, PlanError> {
        let config = StdoutConfig { table: table.options.get_str("format").as_deref() == Some("table") };
        serde_json::to_value(config).map_err(|e| PlanError::internal(format!("stdout configuration: {e}")))
    }
}

impl Connector for StdoutSpec {
    fn create_sink(&self, spec: &SinkSpec, schema: SchemaRef, _ctx: SinkContext) -> Result<Box<dyn Sink>, EngineError> {
        let c: StdoutConfig = config(&spec.table)?;
        Ok(Box::new(StdoutSink { schema, table: c.table }))
    }
}

/// A stdout table's configuration, parsed once at plan time.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StdoutConfig {
    /// A text table per batch instead of JSON lines.
    pub table: bool,
}

/// Prints rows.
pub struct StdoutSink {
    schema: SchemaRef,
    table: bool,
}

#[async_trait]
impl Sink for StdoutSink {
    async fn write(&mut self, batch: RecordBatch) -> Result<(), EngineError> {
        let batch = RecordBatch::try_new(self.schema.clone(), batch.columns().to_vec())?;
        let mut buf = Vec::new();
        if self.table {
            let text = arrow::util::pretty::pretty_format_batches(&[batch])?;
            writeln!(buf, "{text}").map_err(|e| EngineError::io("formatting", e))?;
        } else {
            let mut w = arrow_json::LineDelimitedWriter::new(&mut buf);
            w.write(&batch)?;
            w.finish()?;
        }
        let mut out = std::io::stdout().lock();
        out.write_all(&buf).map_err(|e| EngineError::io("writing to stdout", e))?;
        Ok(())
    }

    /// Standard output cannot take back what it printed: across a restart rows may print twice.
    async fn pre_commit(
        &mut self,
        _checkpoint: nagare_core::CheckpointId,
        _last: bool,
    ) -> Result<serde_json::Value, EngineError> {
        std::io::stdout().flush().map_err(|e| EngineError::io("flushing stdout", e))?;
        Ok(serde_json::Value::Null)
    }

    async fn commit(&mut self, _checkpoint: nagare_core::CheckpointId) -> Result<(), EngineError> {
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), EngineError> {
        std::io::stdout().flush().map_err(|e| EngineError::io("flushing stdout", e))
    }
}
