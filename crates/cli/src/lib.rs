//! What the `nagare` binary puts together, for the binary and its end-to-end tests alike.

use std::sync::Arc;

use nagare_engine::connector::Registry;

/// Every connector this binary has: the one place where connectors are registered.
pub fn registry() -> Arc<Registry> {
    Arc::new(
        Registry::new()
            .with(Arc::new(nagare_connectors::filesystem::FilesystemSpec))
            .with(Arc::new(nagare_connectors::generator::GeneratorSpec))
            .with(Arc::new(nagare_connectors::sqs::SqsSpec))
            .with(Arc::new(nagare_connectors::stdout::StdoutSpec))
            .with(Arc::new(nagare_bigquery::BigQuerySpec)),
    )
}
