//! SQL text to a validated dataflow graph.
//!
//! DataFusion parses, resolves and type-checks queries; this crate adds the streaming parts: connector tables with
//! validated options, `WATERMARK FOR`, windows (`TUMBLE`/`HOP`/`SESSION`), the dedup idiom
//! (`ROW_NUMBER() ... = 1`), and the translation of logical plans into operators partitioned by key.

pub mod catalog;
pub mod error;
pub mod graph;
pub mod options;
pub mod planner;
pub mod preprocess;
pub mod types;
pub mod window;
pub mod wire;

pub use catalog::{ConnectorCatalog, ConnectorSpec, TableDef, TableRole, Variables};
pub use error::{Location, PlanError, PlanErrorKind};
pub use graph::*;
pub use options::{OptionKind, OptionSpec, OptionValue, Options};
pub use planner::Planner;
