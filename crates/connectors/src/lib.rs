//! Sources and sinks: one module per connector, each with its option spec (checked at plan time) and its runtime
//! implementation. [`Connectors`] puts them together for the planner and the runtime.

pub mod decode;
pub mod filesystem;
pub mod generator;
pub mod stdout;

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use nagare_engine::EngineError;
use nagare_engine::connector::{ConnectorFactory, Sink, SinkContext, Source, SourceContext};
use nagare_sql::{ConnectorCatalog, SinkSpec, SourceSpec};

/// Every built-in connector.
#[derive(Debug, Default, Clone, Copy)]
pub struct Connectors;

impl Connectors {
    /// The specs, for the planner.
    pub fn catalog() -> ConnectorCatalog {
        let mut c = ConnectorCatalog::new();
        c.register(Arc::new(filesystem::FilesystemSpec));
        c.register(Arc::new(generator::GeneratorSpec));
        c.register(Arc::new(stdout::StdoutSpec));
        c
    }
}

impl ConnectorFactory for Connectors {
    fn create_source(
        &self,
        spec: &SourceSpec,
        schema: SchemaRef,
        ctx: SourceContext,
    ) -> Result<Box<dyn Source>, EngineError> {
        match spec.table.connector.as_str() {
            "filesystem" => Ok(Box::new(filesystem::source::FileSource::new(spec, schema, ctx)?)),
            "generator" => Ok(Box::new(generator::GeneratorSource::new(spec, schema, ctx)?)),
            other => Err(EngineError::Config(format!("connector '{other}' cannot be a source"))),
        }
    }

    fn create_sink(&self, spec: &SinkSpec, schema: SchemaRef, ctx: SinkContext) -> Result<Box<dyn Sink>, EngineError> {
        match spec.table.connector.as_str() {
            "filesystem" => Ok(Box::new(filesystem::sink::FileSink::new(spec, schema, ctx)?)),
            "stdout" => Ok(Box::new(stdout::StdoutSink::new(spec, schema, ctx))),
            other => Err(EngineError::Config(format!("connector '{other}' cannot be a sink"))),
        }
    }
}
