//! Sources and sinks: one module per connector, each with its option spec (checked at plan time) and its runtime
//! implementation, joined in one [`nagare_engine::connector::Connector`] value per connector.

pub mod decode;
pub mod filesystem;
pub mod generator;
pub mod json_fast;
pub mod sqs;
pub mod stdout;
