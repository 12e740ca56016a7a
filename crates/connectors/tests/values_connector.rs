//! A connector written outside the connectors crate, as a new one would be: one module (below) and one
//! registration line. It plans, runs and writes through the same seams as the built-in ones.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch};
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use nagare_core::CheckpointId;
use nagare_engine::EngineError;
use nagare_engine::connector::{Connector, Registry, Source, SourceContext, SourceEvent, SourceRestore, config};
use nagare_sql::{ConnectorSpec, OptionKind, OptionSpec, PlanError, SourceSpec, TableDef, TableRole};

mod values {
    use super::*;

    const OPTIONS: &[OptionSpec] = &[
        OptionSpec::required("numbers", OptionKind::String, "comma-separated integers, read in order"),
        OptionSpec::optional("token", OptionKind::String, None, "a credential the source checks").as_secret(),
    ];

    /// `connector = 'values'`: a fixed list of numbers as column `n`.
    pub struct Values;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct ValuesConfig {
        numbers: Vec<i64>,
        /// As written (a secret): resolved when the source is made.
        token: Option<String>,
    }

    impl ConnectorSpec for Values {
        fn name(&self) -> &'static str {
            "values"
        }

        fn description(&self) -> &'static str {
            "a fixed list of numbers"
        }

        fn options(&self, role: TableRole) -> Option<&'static [OptionSpec]> {
            (role == TableRole::Source).then_some(OPTIONS)
        }

        fn validate(&self, _table: &TableDef, _role: TableRole) -> Result<(), PlanError> {
            Ok(())
        }

        fn configure(&self, table: &TableDef, _role: TableRole) -> Result<serde_json::Value, PlanError> {
            let text = table.options.get_str("numbers").unwrap_or_default();
            let numbers = text
                .split(',')
                .map(|n| n.trim().parse::<i64>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| table.options.error("numbers", format!("'{text}': {e}")))?;
            Ok(serde_json::to_value(ValuesConfig { numbers, token: table.options.get_str("token") }).unwrap())
        }

        fn is_bounded(&self, _table: &TableDef) -> bool {
            true
        }
    }

    impl Connector for Values {
        fn create_source(
            &self,
            spec: &SourceSpec,
            schema: SchemaRef,
            ctx: SourceContext,
            _restore: Option<&SourceRestore>,
        ) -> Result<Box<dyn Source>, EngineError> {
            let c: ValuesConfig = config(&spec.table)?;
            if let Some(t) = &c.token {
                let token = nagare_sql::options::resolve_secret("token", t).map_err(EngineError::Config)?;
                // The test's secret is this process's HOME.
                if Some(token) != std::env::var("HOME").ok() {
                    return Err(EngineError::Config("token: wrong secret".into()));
                }
            }
            // Subtask 0 reads everything.
            let numbers = if ctx.subtask == 0 { c.numbers } else { Vec::new() };
            Ok(Box::new(ValuesSource { schema, numbers: Some(numbers) }))
        }
    }

    struct ValuesSource {
        schema: SchemaRef,
        numbers: Option<Vec<i64>>,
    }

    #[async_trait]
    impl Source for ValuesSource {
        async fn next(&mut self) -> Result<SourceEvent, EngineError> {
            Ok(match self.numbers.take() {
                Some(n) => {
                    SourceEvent::Batch(RecordBatch::try_new(self.schema.clone(), vec![Arc::new(Int64Array::from(n))])?)
                }
                None => SourceEvent::End,
            })
        }

        fn snapshot_position(&mut self, _checkpoint: CheckpointId) -> Result<serde_json::Value, EngineError> {
            Ok(serde_json::json!({ "done": self.numbers.is_none() }))
        }
    }
}

fn registry() -> Registry {
    Registry::new().with(Arc::new(nagare_connectors::filesystem::FilesystemSpec)).with(Arc::new(values::Values))
}

#[tokio::test]
async fn a_connector_added_in_one_module_plans_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let sql = format!(
        "CREATE TABLE v (n BIGINT) WITH (connector = 'values', numbers = '3, 1, 4, 1, 5');\n\
         CREATE TABLE o WITH (connector = 'filesystem', path = '{}', format = 'json');\n\
         INSERT INTO o SELECT n * 10 AS n FROM v WHERE n > 1;\n",
        out.display()
    );
    let registry = Arc::new(registry());
    let pipeline = registry.plan(&sql, 1, &BTreeMap::new(), &BTreeMap::new()).await.unwrap();
    let summary =
        nagare_engine::start(&pipeline, registry.clone(), Default::default()).await.unwrap().wait().await.unwrap();
    assert_eq!(summary.rows_read, 5);
    let mut got: Vec<i64> = std::fs::read_dir(&out)
        .unwrap()
        .flat_map(|f| {
            std::fs::read_to_string(f.unwrap().path()).unwrap().lines().map(str::to_string).collect::<Vec<_>>()
        })
        .map(|l| serde_json::from_str::<serde_json::Value>(&l).unwrap()["n"].as_i64().unwrap())
        .collect();
    got.sort();
    assert_eq!(got, vec![30, 40, 50]);

    // A secret keeps its reference in the plan and in what is shipped, even when a --var of that name is given;
    // the source resolves it from its own environment.
    let with_token = sql.replace("numbers = '3, 1, 4, 1, 5'", "numbers = '3, 1, 4, 1, 5', token = '${HOME}'");
    let vars = BTreeMap::from([("HOME".to_string(), "/not/the/secret".to_string())]);
    let pipeline = registry.plan(&with_token, 1, &BTreeMap::new(), &vars).await.unwrap();
    let shipped = nagare_sql::wire::encode(&pipeline).unwrap();
    assert!(shipped.contains(r#""token":"${HOME}""#) && !shipped.contains("/not/the/secret"), "{shipped}");
    std::fs::remove_dir_all(&out).unwrap();
    let pipeline = nagare_sql::wire::decode(&shipped).unwrap();
    let summary =
        nagare_engine::start(&pipeline, registry.clone(), Default::default()).await.unwrap().wait().await.unwrap();
    assert_eq!(summary.rows_read, 5);

    // Its options are checked at plan time like any connector's, with the position.
    let bad = sql.replace("'3, 1, 4, 1, 5'", "'3, x'");
    let err = registry.plan(&bad, 1, &BTreeMap::new(), &BTreeMap::new()).await.unwrap_err();
    assert!(err.to_string().contains("numbers") && err.location.is_some(), "{err}");
}
