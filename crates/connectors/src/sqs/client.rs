//! The SQS calls the source makes, over SQS's JSON protocol (`X-Amz-Target: AmazonSQS.<Action>`), signed with
//! object_store's SigV4 signer and credentials from its AWS credential chain (environment keys, web identity,
//! ECS/EKS container credentials, EC2 instance metadata). Secrets never reach logs or errors.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AwsAuthorizer, AwsCredentialProvider};
use serde::Deserialize;
use serde_json::json;

use super::SqsConfig;

/// Errors of SQS calls.
#[derive(Debug, thiserror::Error)]
pub enum SqsError {
    /// SQS answered with an error.
    #[error("SQS {action} on {queue_url} failed: {code}: {message} (HTTP {status})")]
    Aws {
        /// The call.
        action: &'static str,
        /// The queue.
        queue_url: String,
        /// AWS error code, e.g. `QueueDoesNotExist`, `AccessDenied`.
        code: String,
        /// AWS's message.
        message: String,
        /// HTTP status.
        status: u16,
    },
    /// No answer (connection refused, timeout, reset).
    #[error("SQS {action} on {queue_url}: no answer from {endpoint}: {reason}")]
    Network {
        /// The call.
        action: &'static str,
        /// The queue.
        queue_url: String,
        /// Where the request went.
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
    /// The credential chain gave no credentials.
    #[error("AWS credentials for SQS queue {queue_url}: {reason}")]
    Credentials {
        /// The queue.
        queue_url: String,
        /// What went wrong (never the secret).
        reason: String,
    },
    /// An answer that is not what SQS sends.
    #[error("SQS {action} on {queue_url}: unexpected answer: {reason}")]
    Protocol {
        /// The call.
        action: &'static str,
        /// The queue.
        queue_url: String,
        /// What was wrong with it.
        reason: String,
    },
}

impl SqsError {
    /// Whether trying again later may succeed (throttling, server errors, no answer).
    pub fn retriable(&self) -> bool {
        match self {
            SqsError::Aws { status, code, .. } => {
                *status >= 500
                    || *status == 429
                    || matches!(
                        code.as_str(),
                        "ThrottlingException"
                            | "RequestThrottled"
                            | "Throttling"
                            | "ServiceUnavailable"
                            | "InternalError"
                            | "KmsThrottled"
                            | "KMSThrottlingException"
                            | "RequestTimeout"
                    )
            }
            SqsError::Network { .. } | SqsError::Credentials { .. } => true,
            SqsError::Protocol { .. } => false,
        }
    }
}

impl From<SqsError> for nagare_engine::EngineError {
    fn from(e: SqsError) -> Self {
        nagare_engine::EngineError::External { system: "sqs".into(), retriable: e.retriable(), message: e.to_string() }
    }
}

/// A received message.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    /// SQS's id of the message.
    #[serde(rename = "MessageId")]
    pub message_id: String,
    /// What deletes it or changes its visibility (this receive's).
    #[serde(rename = "ReceiptHandle")]
    pub receipt_handle: String,
    /// The body.
    #[serde(rename = "Body", default)]
    pub body: String,
    /// System attributes asked for (`SentTimestamp`, `ApproximateReceiveCount`).
    #[serde(rename = "Attributes", default)]
    pub attributes: std::collections::HashMap<String, String>,
}

impl Message {
    /// When the message was sent, in ms since the epoch.
    pub fn sent_ms(&self) -> Option<i64> {
        self.attributes.get("SentTimestamp")?.parse().ok()
    }

    /// How many times it has been received (this time included).
    pub fn receive_count(&self) -> Option<i64> {
        self.attributes.get("ApproximateReceiveCount")?.parse().ok()
    }
}

#[derive(Deserialize)]
struct ReceiveAnswer {
    #[serde(rename = "Messages", default)]
    messages: Vec<Message>,
}

/// An entry of a batch call that failed.
#[derive(Debug, Clone, Deserialize)]
pub struct BatchFailure {
    /// The entry's id in the request.
    #[serde(rename = "Id")]
    pub id: String,
    /// AWS error code.
    #[serde(rename = "Code", default)]
    pub code: String,
    /// Whether the caller (not SQS) is at fault.
    #[serde(rename = "SenderFault", default)]
    pub sender_fault: bool,
}

#[derive(Deserialize)]
struct BatchAnswer {
    #[serde(rename = "Failed", default)]
    failed: Vec<BatchFailure>,
}

/// A client for one queue.
#[derive(Debug, Clone)]
pub struct SqsClient {
    http: reqwest::Client,
    endpoint: String,
    region: Arc<str>,
    queue_url: Arc<str>,
    credentials: AwsCredentialProvider,
}

impl SqsClient {
    /// A client for `cfg`'s queue, with credentials from the standard AWS chain (as object_store resolves them for
    /// S3: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, `AWS_ROLE_ARN` +
    /// `AWS_WEB_IDENTITY_TOKEN_FILE`, ECS/EKS container credentials, EC2 instance metadata), refreshed as they expire.
    /// Keys given as options (`cfg.keys`) replace the chain; their references are resolved here, where they sign.
    pub fn new(cfg: &SqsConfig) -> Result<SqsClient, SqsError> {
        let Some(keys) = &cfg.keys else { return Self::build(cfg, AmazonS3Builder::from_env()) };
        let (key_id, secret, token) =
            keys.resolve().map_err(|reason| SqsError::Credentials { queue_url: cfg.queue_url.clone(), reason })?;
        let mut builder = AmazonS3Builder::new().with_access_key_id(key_id).with_secret_access_key(secret);
        if let Some(token) = token {
            builder = builder.with_token(token);
        }
        Self::build(cfg, builder)
    }

    /// A client signing with the given keys instead of the credential chain (tools and tests holding keys).
    pub fn with_keys(cfg: &SqsConfig, key_id: &str, secret: &str) -> Result<SqsClient, SqsError> {
        Self::build(cfg, AmazonS3Builder::new().with_access_key_id(key_id).with_secret_access_key(secret))
    }

    fn build(cfg: &SqsConfig, builder: AmazonS3Builder) -> Result<SqsClient, SqsError> {
        let creds_error =
            |e: object_store::Error| SqsError::Credentials { queue_url: cfg.queue_url.clone(), reason: e.to_string() };
        // object_store's S3 builder assembles the chain; the bucket is a placeholder it needs, never contacted.
        let store = builder
            .with_bucket_name("nagare-sqs-credentials")
            .with_region(cfg.region.clone())
            .build()
            .map_err(creds_error)?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // A long poll lasts up to 20 s: leave it room.
            .timeout(cfg.wait_time + Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| SqsError::Network {
                action: "connect",
                queue_url: cfg.queue_url.clone(),
                endpoint: cfg.endpoint.clone(),
                reason: e.to_string(),
            })?;
        Ok(SqsClient {
            http,
            endpoint: format!("{}/", cfg.endpoint.trim_end_matches('/')),
            region: cfg.region.as_str().into(),
            queue_url: cfg.queue_url.as_str().into(),
            credentials: store.credentials().clone(),
        })
    }

    /// The queue this client talks to.
    pub fn queue_url(&self) -> &str {
        &self.queue_url
    }

    /// One signed JSON-protocol call; the answer's JSON bytes.
    async fn call(&self, action: &'static str, body: serde_json::Value) -> Result<bytes::Bytes, SqsError> {
        let queue_url = || self.queue_url.to_string();
        let credential = self
            .credentials
            .get_credential()
            .await
            .map_err(|e| SqsError::Credentials { queue_url: queue_url(), reason: e.to_string() })?;
        let payload = serde_json::to_vec(&body).map_err(|e| SqsError::Protocol {
            action,
            queue_url: queue_url(),
            reason: e.to_string(),
        })?;
        let mut request = http::Request::builder()
            .method(http::Method::POST)
            .uri(self.endpoint.as_str())
            .header("content-type", "application/x-amz-json-1.0")
            .header("x-amz-target", format!("AmazonSQS.{action}"))
            .body(object_store::client::HttpRequestBody::from(payload.clone()))
            .map_err(|e| SqsError::Protocol { action, queue_url: queue_url(), reason: e.to_string() })?;
        AwsAuthorizer::new(&credential, "sqs", &self.region).authorize(&mut request, None);
        let (parts, _) = request.into_parts();
        let answer =
            self.http.post(self.endpoint.as_str()).headers(parts.headers).body(payload).send().await.map_err(|e| {
                SqsError::Network {
                    action,
                    queue_url: queue_url(),
                    endpoint: self.endpoint.clone(),
                    reason: without_url(&e),
                }
            })?;
        let status = answer.status().as_u16();
        let query_error = answer
            .headers()
            .get("x-amzn-query-error")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(str::to_string);
        let bytes = answer.bytes().await.map_err(|e| SqsError::Network {
            action,
            queue_url: queue_url(),
            endpoint: self.endpoint.clone(),
            reason: without_url(&e),
        })?;
        if (200..300).contains(&status) {
            return Ok(bytes);
        }
        #[derive(Deserialize, Default)]
        struct AwsErrorBody {
            #[serde(rename = "__type", default)]
            kind: String,
            #[serde(default, alias = "Message")]
            message: String,
        }
        let parsed: AwsErrorBody = serde_json::from_slice(&bytes).unwrap_or_default();
        // `com.amazonaws.sqs#QueueDoesNotExist` -> `QueueDoesNotExist`; the query-compatible code when given.
        let short = parsed.kind.rsplit('#').next().unwrap_or_default().to_string();
        let code = match (short.is_empty(), query_error) {
            (false, _) => short,
            (true, Some(q)) => q,
            (true, None) => format!("HTTP {status}"),
        };
        let message = if parsed.message.is_empty() {
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned()
        } else {
            parsed.message
        };
        Err(SqsError::Aws { action, queue_url: queue_url(), code, message, status })
    }

    /// Receives up to `max` messages, waiting up to `wait` for the first, hiding them for `visibility`.
    pub async fn receive(&self, max: u32, wait: Duration, visibility: Duration) -> Result<Vec<Message>, SqsError> {
        let body = json!({
            "QueueUrl": &*self.queue_url,
            "MaxNumberOfMessages": max,
            "WaitTimeSeconds": wait.as_secs(),
            "VisibilityTimeout": visibility.as_secs(),
            "MessageSystemAttributeNames": ["SentTimestamp", "ApproximateReceiveCount"],
            "AttributeNames": ["SentTimestamp", "ApproximateReceiveCount"],
        });
        let bytes = self.call("ReceiveMessage", body).await?;
        let answer: ReceiveAnswer = serde_json::from_slice(&bytes).map_err(|e| SqsError::Protocol {
            action: "ReceiveMessage",
            queue_url: self.queue_url.to_string(),
            reason: e.to_string(),
        })?;
        Ok(answer.messages)
    }

    /// Deletes up to 10 messages by receipt handle; returns the entries (by index) that failed.
    pub async fn delete_batch(&self, handles: &[&str]) -> Result<Vec<BatchFailure>, SqsError> {
        let entries: Vec<serde_json::Value> =
            handles.iter().enumerate().map(|(i, h)| json!({"Id": i.to_string(), "ReceiptHandle": h})).collect();
        let bytes = self.call("DeleteMessageBatch", json!({"QueueUrl": &*self.queue_url, "Entries": entries})).await?;
        self.batch_failures("DeleteMessageBatch", &bytes)
    }

    /// Hides up to 10 messages for `visibility` from now; returns the entries (by index) that failed.
    pub async fn change_visibility_batch(
        &self,
        handles: &[&str],
        visibility: Duration,
    ) -> Result<Vec<BatchFailure>, SqsError> {
        let entries: Vec<serde_json::Value> = handles
            .iter()
            .enumerate()
            .map(|(i, h)| json!({"Id": i.to_string(), "ReceiptHandle": h, "VisibilityTimeout": visibility.as_secs()}))
            .collect();
        let bytes = self
            .call("ChangeMessageVisibilityBatch", json!({"QueueUrl": &*self.queue_url, "Entries": entries}))
            .await?;
        self.batch_failures("ChangeMessageVisibilityBatch", &bytes)
    }

    /// Sends up to 10 bodies in one call; returns the entries (by index) that failed. The source never sends: this
    /// is for tools and benchmarks that fill a queue.
    pub async fn send_batch(&self, bodies: &[&str]) -> Result<Vec<BatchFailure>, SqsError> {
        let entries: Vec<serde_json::Value> =
            bodies.iter().enumerate().map(|(i, b)| json!({"Id": i.to_string(), "MessageBody": b})).collect();
        let bytes = self.call("SendMessageBatch", json!({"QueueUrl": &*self.queue_url, "Entries": entries})).await?;
        self.batch_failures("SendMessageBatch", &bytes)
    }

    /// Creates a queue named `name` at this client's endpoint (or finds the one of that name) and returns its URL:
    /// for tools and benchmarks that set up their own queues.
    pub async fn create_queue(&self, name: &str) -> Result<String, SqsError> {
        let bytes = self.call("CreateQueue", json!({"QueueName": name})).await?;
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "QueueUrl")]
            queue_url: String,
        }
        let created: Created = serde_json::from_slice(&bytes).map_err(|e| SqsError::Protocol {
            action: "CreateQueue",
            queue_url: name.to_string(),
            reason: e.to_string(),
        })?;
        Ok(created.queue_url)
    }

    /// Deletes this client's queue and its messages (benchmarks clean up after themselves).
    pub async fn delete_queue(&self) -> Result<(), SqsError> {
        self.call("DeleteQueue", json!({"QueueUrl": &*self.queue_url})).await.map(|_| ())
    }

    fn batch_failures(&self, action: &'static str, bytes: &[u8]) -> Result<Vec<BatchFailure>, SqsError> {
        let answer: BatchAnswer = serde_json::from_slice(bytes).map_err(|e| SqsError::Protocol {
            action,
            queue_url: self.queue_url.to_string(),
            reason: e.to_string(),
        })?;
        Ok(answer.failed)
    }

    /// Attributes of the queue, e.g. `ApproximateNumberOfMessages` (also how the source checks, before the job
    /// starts, that the queue exists and may be read with these credentials).
    pub async fn queue_attributes(&self, names: &[&str]) -> Result<serde_json::Value, SqsError> {
        let bytes =
            self.call("GetQueueAttributes", json!({"QueueUrl": &*self.queue_url, "AttributeNames": names})).await?;
        serde_json::from_slice(&bytes).map_err(|e| SqsError::Protocol {
            action: "GetQueueAttributes",
            queue_url: self.queue_url.to_string(),
            reason: e.to_string(),
        })
    }
}

/// A reqwest error's text with its causes (the endpoint is reported apart; requests carry no secret in the URL).
fn without_url(e: &reqwest::Error) -> String {
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_and_server_errors_are_retried_missing_queues_are_not() {
        let aws = |code: &str, status| SqsError::Aws {
            action: "ReceiveMessage",
            queue_url: "q".into(),
            code: code.into(),
            message: String::new(),
            status,
        };
        assert!(aws("ThrottlingException", 400).retriable());
        assert!(aws("InternalError", 500).retriable());
        assert!(aws("Whatever", 503).retriable());
        assert!(!aws("QueueDoesNotExist", 400).retriable());
        assert!(!aws("AccessDenied", 403).retriable());
        let e = aws("QueueDoesNotExist", 400).to_string();
        assert!(e.contains("QueueDoesNotExist") && e.contains(" q "), "{e}");
    }
}
