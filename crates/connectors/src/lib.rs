//! Sources and sinks: one module per connector, each with its option spec (checked at plan time) and its runtime
//! implementation. [`Connectors`] puts them together for the planner and the runtime.

pub mod decode;
pub mod filesystem;
pub mod generator;
pub mod json_fast;
pub mod sqs;
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
        c.register(Arc::new(sqs::SqsSpec));
        c.register(Arc::new(stdout::StdoutSpec));
        c.register(Arc::new(nagare_bigquery::BigQuerySpec));
        c
    }
}

#[async_trait::async_trait]
impl ConnectorFactory for Connectors {
    fn create_source(
        &self,
        spec: &SourceSpec,
        schema: SchemaRef,
        ctx: SourceContext,
        restore: Option<&nagare_engine::connector::SourceRestore>,
    ) -> Result<Box<dyn Source>, EngineError> {
        let (subtask, parallelism) = (ctx.subtask, ctx.parallelism);
        match spec.table.connector.as_str() {
            "filesystem" => {
                let mut s = filesystem::source::FileSource::new(spec, schema, ctx)?;
                if let Some(r) = restore {
                    s.restore(&r.mine(subtask, parallelism), r.all())?;
                }
                Ok(Box::new(s))
            }
            "generator" => {
                let mut s = generator::GeneratorSource::new(spec, schema, ctx)?;
                if let Some(r) = restore {
                    s.restore(&r.mine(subtask, parallelism))?;
                }
                Ok(Box::new(s))
            }
            "sqs" => {
                let mut s = sqs::source::SqsSource::new(spec, &sqs::SqsConfig::from_table(&spec.table)?, schema, ctx)?;
                if let Some(r) = restore {
                    s.restore(&r.mine(subtask, parallelism))?;
                }
                Ok(Box::new(s))
            }
            other => Err(EngineError::Config(format!("connector '{other}' cannot be a source"))),
        }
    }

    async fn recover_sink(&self, spec: &SinkSpec, handles: &[serde_json::Value]) -> Result<(), EngineError> {
        match spec.table.connector.as_str() {
            "filesystem" => {
                let dir = spec.table.options.get_str("path").unwrap_or_default();
                filesystem::sink::recover(std::path::Path::new(&dir), handles)
            }
            "bigquery" => Ok(nagare_bigquery::sink::recover_table(spec, handles).await?),
            // stdout has nothing to commit or discard.
            _ => Ok(()),
        }
    }

    async fn commit_sink(&self, spec: &SinkSpec, handles: &[serde_json::Value]) -> Result<(), EngineError> {
        match spec.table.connector.as_str() {
            "bigquery" => Ok(nagare_bigquery::sink::commit_table(spec, handles).await?),
            // The filesystem sink renames its files per subtask, in `Sink::commit`.
            _ => Ok(()),
        }
    }

    async fn prepare_source(&self, spec: &SourceSpec) -> Result<(), EngineError> {
        match spec.table.connector.as_str() {
            "sqs" => sqs::source::prepare(&sqs::SqsConfig::from_table(&spec.table)?).await,
            _ => Ok(()),
        }
    }

    async fn prepare_sink(&self, spec: &SinkSpec, schema: SchemaRef) -> Result<(), EngineError> {
        match spec.table.connector.as_str() {
            "bigquery" => Ok(nagare_bigquery::sink::prepare(spec, &schema).await?),
            _ => Ok(()),
        }
    }

    fn create_sink(&self, spec: &SinkSpec, schema: SchemaRef, ctx: SinkContext) -> Result<Box<dyn Sink>, EngineError> {
        match spec.table.connector.as_str() {
            "filesystem" => Ok(Box::new(filesystem::sink::FileSink::new(spec, schema, ctx)?)),
            "stdout" => Ok(Box::new(stdout::StdoutSink::new(spec, schema, ctx))),
            "bigquery" => Ok(nagare_bigquery::sink::create(spec, schema, ctx)?),
            other => Err(EngineError::Config(format!("connector '{other}' cannot be a sink"))),
        }
    }
}

/// Plans a pipeline against the built-in connectors, as a cluster does for a submitted job: `parallelism` (when
/// not 0) overrides `SET parallelism`, `settings` override `SET`s, `variables` fill `${NAME}` (then the environment).
pub async fn plan(
    sql: &str,
    parallelism: u32,
    settings: &std::collections::BTreeMap<String, String>,
    variables: &std::collections::BTreeMap<String, String>,
) -> Result<nagare_sql::Pipeline, nagare_sql::PlanError> {
    let mut planner = nagare_sql::Planner::new(Connectors::catalog())
        .with_variables(nagare_sql::Variables::new(variables.clone(), true));
    for (k, v) in settings {
        planner = planner.with_setting(k.clone(), v.clone());
    }
    if parallelism > 0 {
        planner = planner.with_setting("parallelism", parallelism.to_string());
    }
    planner.plan(sql).await
}
