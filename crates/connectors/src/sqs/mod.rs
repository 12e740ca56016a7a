//! `connector = 'sqs'`: messages of an Amazon SQS queue (EventBridge events, SNS notifications or raw JSON bodies) as
//! a source, exactly once with a dedup downstream: a message is deleted only after the checkpoint covering its rows
//! has completed, and its visibility is extended until then.

pub mod client;
pub mod envelope;
pub mod source;

use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::datatypes::{DataType, TimeUnit};
use nagare_engine::EngineError;
use nagare_engine::connector::{Connector, Source, SourceContext, SourceRestore, config};
use nagare_sql::SourceSpec;
use nagare_sql::catalog::{ConnectorSpec, TableDef, TableRole};
use nagare_sql::error::PlanError;
use nagare_sql::options::{OptionKind, OptionSpec};
use serde::{Deserialize, Serialize};

use crate::decode::BadRecords;

/// Options of the SQS source.
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec::required(
        "queue_url",
        OptionKind::String,
        "the queue, e.g. 'https://sqs.ap-northeast-1.amazonaws.com/123456789012/events'",
    ),
    OptionSpec::optional(
        "region",
        OptionKind::String,
        None,
        "AWS region (default: from the queue URL, then AWS_REGION)",
    ),
    OptionSpec::optional(
        "endpoint",
        OptionKind::String,
        None,
        "another SQS-compatible endpoint, e.g. a local test server (default: the queue URL's host)",
    ),
    OptionSpec::optional(
        "envelope",
        OptionKind::Enum(&["eventbridge", "sns", "raw"]),
        Some("raw"),
        "eventbridge: the body is an EventBridge event; sns: an SNS notification whose Message is the record; raw: the body is the record",
    ),
    OptionSpec::optional(
        "format",
        OptionKind::Enum(&["json", "json_lines"]),
        Some("json"),
        "json: the record is one JSON object; json_lines: a record may hold several, one per line",
    ),
    OptionSpec::optional("wait_time", OptionKind::Duration, Some("20s"), "long poll of each receive call (0s-20s)"),
    OptionSpec::optional("max_messages", OptionKind::Int { min: 1, max: 10 }, Some("10"), "messages per receive call"),
    OptionSpec::optional(
        "receivers",
        OptionKind::Int { min: 1, max: 64 },
        Some("4"),
        "receive calls in flight per subtask (throughput)",
    ),
    OptionSpec::optional(
        "visibility_timeout",
        OptionKind::Duration,
        Some("30s"),
        "how long a received message stays hidden; extended while its checkpoint is pending",
    ),
    OptionSpec::optional(
        "bad_records",
        OptionKind::Enum(&["fail", "dead_letter", "skip"]),
        Some("fail"),
        "malformed messages: stop the job, dead-letter them (then delete), or skip them (then delete)",
    ),
    OptionSpec::optional(
        "access_key_id",
        OptionKind::String,
        None,
        "with secret_access_key: sign with this key instead of the AWS credential chain (e.g. '${SQS_KEY_ID}')",
    )
    .as_secret(),
    OptionSpec::optional(
        "secret_access_key",
        OptionKind::String,
        None,
        "the key's secret; write '${VARIABLE}': resolved from the environment of the processes that read the queue, never stored",
    )
    .as_secret(),
    OptionSpec::optional(
        "session_token",
        OptionKind::String,
        None,
        "with temporary keys: their session token (a '${VARIABLE}' too)",
    )
    .as_secret(),
    OptionSpec::optional(
        "dead_letter_path",
        OptionKind::String,
        None,
        "directory for dead-letter records of this source (default: SET dead_letter_path)",
    ),
];

/// Metadata columns filled from the message rather than its body, when declared.
pub const METADATA_COLUMNS: &[&str] = &["_message_id", "_sent_time", "_receive_count"];

/// What a message body holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Envelope {
    /// An EventBridge event (rule target): declared columns are the event's fields.
    Eventbridge,
    /// An SNS notification (raw delivery off): the record is its `Message`.
    Sns,
    /// The record itself.
    Raw,
}

/// How the record is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One JSON object.
    Json,
    /// JSON objects, one per line.
    JsonLines,
}

/// What to do with a message that does not decode (serde form of [`BadRecords`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BadRecordPolicy {
    /// Stop the job naming the message id and the reason.
    Fail,
    /// Write the raw body, message id and reason to the dead-letter directory; delete the message with its checkpoint.
    DeadLetter,
    /// Count it; delete the message with its checkpoint.
    Skip,
}

impl From<BadRecordPolicy> for BadRecords {
    fn from(p: BadRecordPolicy) -> Self {
        match p {
            BadRecordPolicy::Fail => BadRecords::Fail,
            BadRecordPolicy::DeadLetter => BadRecords::DeadLetter,
            BadRecordPolicy::Skip => BadRecords::Skip,
        }
    }
}

/// An SQS source table's settings, parsed once from its validated options (what the runtime builds sources from).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SqsConfig {
    /// The queue's URL (requests name it in `QueueUrl`).
    pub queue_url: String,
    /// Region requests are signed for.
    pub region: String,
    /// Where requests go: the `endpoint` option, else the queue URL's scheme and host.
    pub endpoint: String,
    /// What a body holds.
    pub envelope: Envelope,
    /// How the record is encoded.
    pub format: Format,
    /// Long poll per receive call.
    #[serde(with = "millis")]
    pub wait_time: Duration,
    /// Messages per receive call (1-10).
    pub max_messages: u32,
    /// Receive calls in flight per subtask.
    pub receivers: usize,
    /// Visibility timeout given to received messages and renewed while they are held.
    #[serde(with = "millis")]
    pub visibility_timeout: Duration,
    /// Malformed messages.
    pub bad_records: BadRecordPolicy,
    /// Dead-letter directory of this source, when set on the table.
    pub dead_letter_path: Option<String>,
    /// Keys given as options, as written (`${VARIABLE}` references): resolved by the process that signs with them.
    #[serde(default)]
    pub keys: Option<StaticKeys>,
}

/// An access key given in the pipeline rather than found by the credential chain: a job reading a queue of another
/// account than the one the workers' own credentials are for. Each field keeps its `${VARIABLE}` references.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct StaticKeys {
    /// `access_key_id`, as written.
    pub access_key_id: String,
    /// `secret_access_key`, as written.
    pub secret_access_key: String,
    /// `session_token`, as written.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for StaticKeys {
    // A secret written into the SQL text (against the planner's warning) is still never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StaticKeys(..)")
    }
}

impl StaticKeys {
    /// The key id, secret and token with their references filled from this process's environment.
    pub fn resolve(&self) -> Result<(String, String, Option<String>), String> {
        use nagare_sql::options::resolve_secret;
        Ok((
            resolve_secret("access_key_id", &self.access_key_id)?,
            resolve_secret("secret_access_key", &self.secret_access_key)?,
            self.session_token.as_deref().map(|t| resolve_secret("session_token", t)).transpose()?,
        ))
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// The region in an AWS queue URL's host (`sqs.<region>.amazonaws.com`, legacy `<region>.queue.amazonaws.com`).
pub fn region_from_url(host: &str) -> Option<String> {
    let parts: Vec<&str> = host.split('.').collect();
    match parts.as_slice() {
        ["sqs", region, "amazonaws", ..] => Some((*region).to_string()),
        [region, "queue", "amazonaws", ..] => Some((*region).to_string()),
        _ => None,
    }
}

/// `scheme://host[:port]` and the host of an http(s) URL, or why it is not one.
fn origin_of(url: &str) -> Result<(String, String), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("'{url}' is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("'{url}' is not an http(s) URL"));
    }
    let host = parsed.host_str().ok_or_else(|| format!("'{url}' has no host"))?.to_string();
    let origin = match parsed.port() {
        Some(p) => format!("{}://{host}:{p}", parsed.scheme()),
        None => format!("{}://{host}", parsed.scheme()),
    };
    Ok((origin, host))
}

impl SqsConfig {
    /// Parses and checks a source table's options; errors point at the option.
    pub fn from_table(table: &TableDef) -> Result<SqsConfig, PlanError> {
        let o = &table.options;
        let queue_url = o.get_str("queue_url").unwrap_or_default().trim().to_string();
        let (origin, host) = origin_of(&queue_url).map_err(|m| o.error("queue_url", m))?;
        let path = reqwest::Url::parse(&queue_url).map(|u| u.path().to_string()).unwrap_or_default();
        if path.trim_matches('/').split('/').count() != 2 {
            return Err(o.error(
                "queue_url",
                format!(
                    "'{queue_url}' is not a queue URL; expected https://sqs.<region>.amazonaws.com/<account>/<queue>"
                ),
            ));
        }
        let endpoint = match o.get_str("endpoint") {
            Some(e) => origin_of(e.trim()).map_err(|m| o.error("endpoint", m))?.0,
            None => origin,
        };
        let region = match o.get_str("region").filter(|r| !r.trim().is_empty()) {
            Some(r) => r.trim().to_string(),
            None => region_from_url(&host)
                .or_else(|| std::env::var("AWS_REGION").ok().filter(|r| !r.is_empty()))
                .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok().filter(|r| !r.is_empty()))
                .unwrap_or_else(|| "us-east-1".to_string()),
        };
        let envelope = match o.get_str("envelope").as_deref() {
            Some("eventbridge") => Envelope::Eventbridge,
            Some("sns") => Envelope::Sns,
            _ => Envelope::Raw,
        };
        let format = match o.get_str("format").as_deref() {
            Some("json_lines") => Format::JsonLines,
            _ => Format::Json,
        };
        if envelope == Envelope::Eventbridge && format == Format::JsonLines {
            return Err(o.error("format", "an EventBridge message holds one event; use format = 'json'"));
        }
        let wait_time = o.get_duration("wait_time").unwrap_or(Duration::from_secs(20));
        if wait_time > Duration::from_secs(20) {
            return Err(o.error("wait_time", "SQS long-polls at most 20s"));
        }
        let visibility_timeout = o.get_duration("visibility_timeout").unwrap_or(Duration::from_secs(30));
        if visibility_timeout < Duration::from_secs(2) || visibility_timeout > Duration::from_secs(12 * 3600) {
            return Err(o.error("visibility_timeout", "must be between 2s and 12 hours (SQS's limit)"));
        }
        let bad_records = match o.get_str("bad_records").as_deref() {
            Some("dead_letter") => BadRecordPolicy::DeadLetter,
            Some("skip") => BadRecordPolicy::Skip,
            _ => BadRecordPolicy::Fail,
        };
        let keys = match (o.get_str("access_key_id"), o.get_str("secret_access_key")) {
            (Some(access_key_id), Some(secret_access_key)) => {
                Some(StaticKeys { access_key_id, secret_access_key, session_token: o.get_str("session_token") })
            }
            (None, None) if o.get_str("session_token").is_some() => {
                return Err(o.error("session_token", "goes with access_key_id and secret_access_key"));
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(
                    o.error("access_key_id", "needs secret_access_key too (or neither, for the credential chain)")
                );
            }
            (None, Some(_)) => {
                return Err(
                    o.error("secret_access_key", "needs access_key_id too (or neither, for the credential chain)")
                );
            }
        };
        let cfg = SqsConfig {
            keys,
            queue_url,
            region,
            endpoint,
            envelope,
            format,
            wait_time,
            max_messages: o.get_int("max_messages").unwrap_or(10).clamp(1, 10) as u32,
            receivers: o.get_int("receivers").unwrap_or(4).clamp(1, 64) as usize,
            visibility_timeout,
            bad_records,
            dead_letter_path: o.get_str("dead_letter_path"),
        };
        check_metadata_columns(table)?;
        Ok(cfg)
    }
}

/// Declared metadata columns must have a type their values fit.
fn check_metadata_columns(table: &TableDef) -> Result<(), PlanError> {
    for field in table.schema.fields() {
        let ok = match field.name().as_str() {
            "_message_id" => matches!(field.data_type(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View),
            "_sent_time" => {
                matches!(field.data_type(), DataType::Timestamp(TimeUnit::Microsecond | TimeUnit::Millisecond, _))
            }
            "_receive_count" => matches!(field.data_type(), DataType::Int32 | DataType::Int64),
            _ => true,
        };
        if !ok {
            let want = match field.name().as_str() {
                "_message_id" => "TEXT",
                "_sent_time" => "TIMESTAMP",
                _ => "INT or BIGINT",
            };
            return Err(PlanError::invalid(format!(
                "metadata column '{}' of SQS source '{}' must be {want}",
                field.name(),
                table.name
            ))
            .at(table.location));
        }
    }
    Ok(())
}

/// The SQS connector's spec.
#[derive(Debug)]
pub struct SqsSpec;

impl ConnectorSpec for SqsSpec {
    fn name(&self) -> &'static str {
        "sqs"
    }

    fn description(&self) -> &'static str {
        "an Amazon SQS queue (EventBridge events, SNS notifications, JSON bodies) in, exactly once with a dedup"
    }

    fn options(&self, role: TableRole) -> Option<&'static [OptionSpec]> {
        (role == TableRole::Source).then_some(OPTIONS)
    }

    fn validate(&self, table: &TableDef, _role: TableRole) -> Result<(), PlanError> {
        if !table.has_columns {
            return Err(PlanError::invalid(format!("source '{}' needs its columns declared", table.name))
                .at(table.location)
                .hint("list the event's fields to read: CREATE TABLE t (id TEXT, time TIMESTAMP, detail JSON, ...) WITH (...)"));
        }
        SqsConfig::from_table(table).map(|_| ())
    }

    fn redelivery_window(&self, table: &TableDef) -> Option<Duration> {
        SqsConfig::from_table(table).ok().map(|c| c.visibility_timeout)
    }

    fn configure(&self, table: &TableDef, _role: TableRole) -> Result<serde_json::Value, PlanError> {
        serde_json::to_value(SqsConfig::from_table(table)?)
            .map_err(|e| PlanError::internal(format!("sqs configuration: {e}")))
    }
}

#[async_trait::async_trait]
impl Connector for SqsSpec {
    fn create_source(
        &self,
        spec: &SourceSpec,
        schema: SchemaRef,
        ctx: SourceContext,
        restore: Option<&SourceRestore>,
    ) -> Result<Box<dyn Source>, EngineError> {
        let (subtask, parallelism) = (ctx.subtask, ctx.parallelism);
        let mut s = source::SqsSource::new(spec, &config(&spec.table)?, schema, ctx)?;
        if let Some(r) = restore {
            s.restore(&r.mine(subtask, parallelism))?;
        }
        Ok(Box::new(s))
    }

    async fn prepare_source(&self, spec: &SourceSpec) -> Result<(), EngineError> {
        source::prepare(&config(&spec.table)?).await
    }
}

/// The connectors the SQS tests plan with.
#[cfg(test)]
pub(crate) fn test_registry() -> nagare_engine::connector::Registry {
    nagare_engine::connector::Registry::new()
        .with(std::sync::Arc::new(SqsSpec))
        .with(std::sync::Arc::new(crate::stdout::StdoutSpec))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    async fn plan(with: &str, columns: &str) -> Result<SqsConfig, PlanError> {
        let sql = format!(
            "CREATE TABLE q ({columns}) WITH (connector = 'sqs', {with});\n\
             CREATE TABLE o WITH (connector = 'stdout');\nINSERT INTO o SELECT * FROM q;"
        );
        let p = nagare_sql::Planner::new(test_registry().catalog()).plan(&sql).await?;
        let (_, spec) = p.graph.sources().next().unwrap();
        SqsConfig::from_table(&spec.table)
    }

    #[tokio::test]
    async fn options_parse_into_the_typed_config() {
        let c = plan("queue_url = 'https://sqs.ap-northeast-1.amazonaws.com/123456789012/events'", "id TEXT")
            .await
            .unwrap();
        assert_eq!(c.region, "ap-northeast-1");
        assert_eq!(c.endpoint, "https://sqs.ap-northeast-1.amazonaws.com");
        assert_eq!((c.envelope, c.format, c.bad_records), (Envelope::Raw, Format::Json, BadRecordPolicy::Fail));
        assert_eq!((c.wait_time, c.max_messages, c.receivers), (Duration::from_secs(20), 10, 4));
        let c = plan(
            "queue_url = 'http://127.0.0.1:4566/000000000000/q', endpoint = 'http://localhost:9324/', region = 'eu-west-1', \
             envelope = 'sns', format = 'json_lines', wait_time = '1s', max_messages = '3', receivers = '2', \
             visibility_timeout = '10s', bad_records = 'skip'",
            "id TEXT, _message_id TEXT, _sent_time TIMESTAMP, _receive_count INT",
        )
        .await
        .unwrap();
        assert_eq!(c.endpoint, "http://localhost:9324");
        assert_eq!(c.region, "eu-west-1");
        assert_eq!((c.envelope, c.format, c.bad_records), (Envelope::Sns, Format::JsonLines, BadRecordPolicy::Skip));
        assert_eq!((c.wait_time, c.max_messages, c.receivers), (Duration::from_secs(1), 3, 2));
        // The config travels as data (a plan shipped to a worker).
        let back: SqsConfig = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[tokio::test]
    async fn mistakes_are_refused_at_the_option() {
        for (with, columns, says) in [
            ("queue_url = 'not a url'", "id TEXT", "option 'queue_url': 'not a url' is not a URL"),
            ("queue_url = 'https://sqs.us-east-1.amazonaws.com/q'", "id TEXT", "is not a queue URL"),
            ("queue_url = 'http://h/1/q', wait_time = '30s'", "id TEXT", "option 'wait_time'"),
            ("queue_url = 'http://h/1/q', max_messages = '11'", "id TEXT", "max_messages"),
            ("queue_url = 'http://h/1/q', visibility_timeout = '1s'", "id TEXT", "option 'visibility_timeout'"),
            (
                "queue_url = 'http://h/1/q', envelope = 'eventbridge', format = 'json_lines'",
                "id TEXT",
                "option 'format'",
            ),
            ("queue_url = 'http://h/1/q', envelope = 'kinesis'", "id TEXT", "envelope"),
            ("queue_url = 'http://h/1/q', endpoint = 'ftp://x'", "id TEXT", "option 'endpoint'"),
            (
                "queue_url = 'http://h/1/q'",
                "id TEXT, _sent_time TEXT",
                "'_sent_time' of SQS source 'q' must be TIMESTAMP",
            ),
            ("region = 'x'", "id TEXT", "queue_url"),
            ("queue_url = 'http://h/1/q', access_key_id = '${K}'", "id TEXT", "needs secret_access_key too"),
            ("queue_url = 'http://h/1/q', secret_access_key = '${S}'", "id TEXT", "needs access_key_id too"),
            ("queue_url = 'http://h/1/q', session_token = '${T}'", "id TEXT", "option 'session_token'"),
        ] {
            let e = plan(with, columns).await.unwrap_err().to_string();
            assert!(e.contains(says), "{with}: {e}");
        }
        // Positioned: the error carries the option's line and column.
        let e = plan("\n  wait_time = '21s', queue_url = 'http://h/1/q'", "id TEXT").await.unwrap_err();
        assert!(e.to_string().contains("2:"), "{e}");
    }

    #[tokio::test]
    async fn keys_given_as_options_keep_their_references_and_resolve_where_they_sign() {
        let c = plan(
            "queue_url = 'http://h/1/q', access_key_id = '${NAGARE_UNIT_KEY}', secret_access_key = '${HOME}'",
            "id TEXT",
        )
        .await
        .unwrap();
        let keys = c.keys.clone().unwrap();
        assert_eq!((keys.access_key_id.as_str(), keys.secret_access_key.as_str()), ("${NAGARE_UNIT_KEY}", "${HOME}"));
        assert_eq!(format!("{keys:?}"), "StaticKeys(..)");
        // Unset here: the client names the variable, and the queue, not a value.
        let e = client::SqsClient::new(&c).unwrap_err().to_string();
        assert!(e.contains("NAGARE_UNIT_KEY is not set in this process") && e.contains("http://h/1/q"), "{e}");
    }

    #[test]
    fn regions_come_from_aws_queue_hosts() {
        assert_eq!(region_from_url("sqs.eu-central-1.amazonaws.com").as_deref(), Some("eu-central-1"));
        assert_eq!(region_from_url("us-west-2.queue.amazonaws.com").as_deref(), Some("us-west-2"));
        assert_eq!(region_from_url("127.0.0.1"), None);
    }

    #[tokio::test]
    async fn at_least_once_without_a_long_enough_dedup_is_warned_about() {
        let warnings = |body: &str| {
            let sql = format!(
                "CREATE TABLE q (id TEXT, time TIMESTAMP, WATERMARK FOR time AS time - INTERVAL '5' SECOND) WITH \
                 (connector = 'sqs', queue_url = 'https://sqs.ap-northeast-1.amazonaws.com/123456789012/e', \
                 visibility_timeout = '2 minutes');\n\
                 CREATE TABLE o WITH (connector = 'stdout');\n{body}"
            );
            async move {
                let registry = test_registry();
                registry.plan(&sql, 1, &Default::default(), &Default::default()).await.unwrap().warnings
            }
        };
        let dedup = "INSERT INTO o SELECT id FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn \
                     FROM q) WHERE rn = 1;";
        let w = warnings("INSERT INTO o SELECT id FROM q;").await;
        assert!(w.len() == 1 && w[0].contains("reaches sink 'o' without a dedup"), "{w:?}");
        let w = warnings(&format!("SET dedup_ttl = '1 minute';\n{dedup}")).await;
        assert!(w.len() == 1 && w[0].contains("remembers a key for 1m") && w[0].contains("2m"), "{w:?}");
        assert_eq!(warnings(&format!("SET dedup_ttl = '10 minutes';\n{dedup}")).await, Vec::<String>::new());
    }
}
