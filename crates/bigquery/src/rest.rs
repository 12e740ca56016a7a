//! The BigQuery REST v2 API, for what the Storage Write API does not do: tables (get, create, add columns) and
//! query jobs (MERGE for the `merge` mode; reading tables back in tests).

use std::time::Duration;

use serde_json::{Value, json};

use crate::auth::Auth;
use crate::error::{BqError, Result, with_retries};
use crate::types::TableField;

/// `project.dataset.table`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRef {
    /// Project id.
    pub project: String,
    /// Dataset id.
    pub dataset: String,
    /// Table id.
    pub table: String,
}

impl TableRef {
    /// The resource name the Storage API uses: `projects/p/datasets/d/tables/t`.
    pub fn path(&self) -> String {
        format!("projects/{}/datasets/{}/tables/{}", self.project, self.dataset, self.table)
    }
}

impl std::fmt::Display for TableRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.project, self.dataset, self.table)
    }
}

/// How to create a table: partitioning and clustering.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Column to partition by (TIMESTAMP, DATETIME or DATE), with `HOUR`, `DAY`, `MONTH` or `YEAR`.
    pub partition: Option<(String, String)>,
    /// Up to four columns to cluster by.
    pub cluster_by: Vec<String>,
    /// Primary key columns (`PRIMARY KEY ... NOT ENFORCED`, required by BigQuery CDC upserts).
    pub primary_key: Vec<String>,
}

/// A REST client for one endpoint.
#[derive(Debug, Clone)]
pub struct RestClient {
    http: reqwest::Client,
    base: String,
    auth: Auth,
}

impl RestClient {
    /// A client for `endpoint` (`https://bigquery.googleapis.com`, or an emulator's address).
    pub fn new(endpoint: &str, auth: Auth) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| BqError::Config(format!("HTTP client: {e}")))?;
        Ok(RestClient { http, base: format!("{}/bigquery/v2", endpoint.trim_end_matches('/')), auth })
    }

    async fn call(&self, call: &str, method: reqwest::Method, url: &str, body: Option<&Value>) -> Result<Value> {
        with_retries(call, || async {
            let mut req = self.http.request(method.clone(), url);
            if let Some(h) = self.auth.header().await? {
                req = req.header(reqwest::header::AUTHORIZATION, h);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let failed = |status: u16, message: String| BqError::Rest { call: call.to_string(), status, message };
            let resp = req.send().await.map_err(|e| failed(e.status().map_or(0, |s| s.as_u16()), e.to_string()))?;
            let status = resp.status().as_u16();
            let text = resp.text().await.map_err(|e| failed(status, e.to_string()))?;
            if !(200..300).contains(&status) {
                // Google's error body: {"error": {"message": ...}}; show the message, not the whole body.
                let message = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                    .unwrap_or(text);
                return Err(failed(status, message));
            }
            if text.trim().is_empty() {
                return Ok(Value::Null);
            }
            serde_json::from_str(&text).map_err(|e| failed(status, format!("response is not JSON: {e}")))
        })
        .await
    }

    fn table_url(&self, t: &TableRef) -> String {
        format!("{}/projects/{}/datasets/{}/tables/{}", self.base, t.project, t.dataset, t.table)
    }

    /// Creates a dataset unless it exists (for tools and benchmarks; pipelines expect their dataset to exist).
    pub async fn create_dataset(&self, project: &str, dataset: &str) -> Result<()> {
        let url = format!("{}/projects/{project}/datasets", self.base);
        let body = json!({"datasetReference": {"projectId": project, "datasetId": dataset}});
        match self.call("datasets.insert", reqwest::Method::POST, &url, Some(&body)).await {
            Ok(_) | Err(BqError::Rest { status: 409, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The table's columns, or `None` if it does not exist.
    pub async fn get_table(&self, t: &TableRef) -> Result<Option<Vec<TableField>>> {
        match self.call("tables.get", reqwest::Method::GET, &self.table_url(t), None).await {
            Ok(v) => {
                let fields = v["schema"]["fields"].clone();
                let fields: Vec<TableField> = if fields.is_null() {
                    Vec::new()
                } else {
                    serde_json::from_value(fields)
                        .map_err(|e| BqError::Protocol(format!("schema of {t} is not understood: {e}")))?
                };
                Ok(Some(fields))
            }
            Err(BqError::Rest { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The table's PRIMARY KEY columns (empty without one); `None` if the table does not exist.
    pub async fn primary_key(&self, t: &TableRef) -> Result<Option<Vec<String>>> {
        match self.call("tables.get", reqwest::Method::GET, &self.table_url(t), None).await {
            Ok(v) => Ok(Some(
                v["tableConstraints"]["primaryKey"]["columns"]
                    .as_array()
                    .map(|cols| cols.iter().filter_map(|c| c.as_str().map(str::to_string)).collect())
                    .unwrap_or_default(),
            )),
            Err(BqError::Rest { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates the table; one that appeared meanwhile (HTTP 409) is fine.
    pub async fn create_table(&self, t: &TableRef, fields: &[TableField], opts: &CreateOptions) -> Result<()> {
        let mut body = json!({
            "tableReference": {"projectId": t.project, "datasetId": t.dataset, "tableId": t.table},
            "schema": {"fields": fields},
        });
        if let Some((column, granularity)) = &opts.partition {
            body["timePartitioning"] = json!({"type": granularity, "field": column});
        }
        if !opts.cluster_by.is_empty() {
            body["clustering"] = json!({"fields": opts.cluster_by});
        }
        if !opts.primary_key.is_empty() {
            body["tableConstraints"] = json!({"primaryKey": {"columns": opts.primary_key}});
        }
        let url = format!("{}/projects/{}/datasets/{}/tables", self.base, t.project, t.dataset);
        match self.call("tables.insert", reqwest::Method::POST, &url, Some(&body)).await {
            Ok(_) | Err(BqError::Rest { status: 409, .. }) => Ok(()),
            Err(BqError::Rest { status: 404, message, .. }) => Err(BqError::Config(format!(
                "cannot create table {t}: dataset {}.{} not found ({message})",
                t.project, t.dataset
            ))),
            Err(e) => Err(e),
        }
    }

    /// Replaces the table's schema with `fields`: the existing columns plus new NULLABLE or REPEATED ones (the only
    /// change BigQuery allows this way).
    pub async fn set_schema(&self, t: &TableRef, fields: &[TableField]) -> Result<()> {
        let body = json!({"schema": {"fields": fields}});
        self.call("tables.patch", reqwest::Method::PATCH, &self.table_url(t), Some(&body)).await?;
        Ok(())
    }

    /// Runs a query job with the given id to completion; see [`RestClient::run_job_config`].
    pub async fn run_job(&self, project: &str, job_id: &str, sql: &str) -> Result<()> {
        self.run_job_config(project, job_id, json!({"query": {"query": sql, "useLegacySql": false}})).await
    }

    /// Runs a job (`configuration` as in `jobs.insert`) with the given id to completion. A job id can be used once:
    /// if the job exists (a commit retried after a crash) this waits for that run instead of starting it again. The
    /// job is looked up before it is inserted, so a server that does not refuse a reused id still runs it once.
    pub async fn run_job_config(&self, project: &str, job_id: &str, configuration: Value) -> Result<()> {
        let url = format!("{}/projects/{project}/jobs", self.base);
        let body = json!({"jobReference": {"projectId": project, "jobId": job_id}, "configuration": configuration});
        let existing = match self.call("jobs.get", reqwest::Method::GET, &format!("{url}/{job_id}"), None).await {
            Ok(v) => Some(v),
            Err(BqError::Rest { status: 404, .. }) => None,
            Err(e) => return Err(e),
        };
        let mut job = match existing {
            Some(v) => {
                tracing::info!(job_id, "the job ran before; using its result instead of running it again");
                v
            }
            None => match self.call("jobs.insert", reqwest::Method::POST, &url, Some(&body)).await {
                Ok(v) => v,
                Err(BqError::Rest { status: 409, .. }) => {
                    self.call("jobs.get", reqwest::Method::GET, &format!("{url}/{job_id}"), None).await?
                }
                Err(e) => return Err(e),
            },
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(3600);
        loop {
            if job["status"]["state"].as_str() == Some("DONE") {
                if let Some(err) = job["status"]["errorResult"].as_object() {
                    let message = err.get("message").and_then(Value::as_str).unwrap_or("failed");
                    return Err(BqError::Rest { call: format!("job {job_id}"), status: 400, message: message.into() });
                }
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(BqError::Protocol(format!("job {job_id} did not finish within an hour")));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut get = format!("{url}/{job_id}");
            if let Some(loc) = job["jobReference"]["location"].as_str() {
                get.push_str(&format!("?location={loc}"));
            }
            job = self.call("jobs.get", reqwest::Method::GET, &get, None).await?;
        }
    }

    /// Runs a query (standard SQL) to completion and returns its rows as JSON arrays of cell values (strings,
    /// as the REST API gives them; NULL as null).
    pub async fn query(&self, project: &str, sql: &str, job_id: Option<&str>) -> Result<Vec<Vec<Value>>> {
        let url = format!("{}/projects/{project}/queries", self.base);
        let mut body = json!({"query": sql, "useLegacySql": false, "timeoutMs": 60_000});
        if let Some(id) = job_id {
            body["requestId"] = json!(id);
        }
        let v = self.call("jobs.query", reqwest::Method::POST, &url, Some(&body)).await?;
        if let Some(errors) = v["errors"].as_array().filter(|e| !e.is_empty()) {
            let messages: Vec<&str> = errors.iter().filter_map(|e| e["message"].as_str()).collect();
            return Err(BqError::Rest { call: "jobs.query".into(), status: 400, message: messages.join("; ") });
        }
        if v["jobComplete"].as_bool() == Some(false) {
            return Err(BqError::Protocol(format!("query did not complete within 60 s: {sql}")));
        }
        let rows = v["rows"].as_array().cloned().unwrap_or_default();
        Ok(rows
            .iter()
            .map(|r| r["f"].as_array().map(|cells| cells.iter().map(|c| c["v"].clone()).collect()).unwrap_or_default())
            .collect())
    }
}
