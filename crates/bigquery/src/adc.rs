//! Application Default Credentials through Google's own `google-cloud-auth`: service account keys,
//! `external_account` (Workload Identity Federation from AWS or an OIDC token file, with service account
//! impersonation), gcloud user credentials and the GCE/GKE metadata server. It caches tokens and refreshes them
//! before they expire; tokens never reach our logs or errors.

use std::sync::Arc;

use google_cloud_auth::credentials::{AccessTokenCredentials, Builder};

use crate::auth::{Auth, TokenSource};
use crate::error::{BqError, Result};

/// BigQuery's OAuth scope (covers the Storage Write API).
const SCOPE: &str = "https://www.googleapis.com/auth/bigquery";

struct Adc(AccessTokenCredentials);

#[async_trait::async_trait]
impl TokenSource for Adc {
    async fn token(&self) -> Result<String> {
        let token = self.0.access_token().await.map_err(|e| BqError::Rest {
            call: "fetching an access token (Application Default Credentials)".into(),
            status: if e.is_transient() { 503 } else { 401 },
            message: e.to_string(),
        })?;
        Ok(token.token)
    }
}

/// Finds Application Default Credentials the way Google's client libraries do.
pub fn application_default() -> Result<Auth> {
    // google-cloud-auth is built without a bundled TLS crypto provider: use ring, which the rest of the tree uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let creds = Builder::default().with_scopes([SCOPE]).build_access_token_credentials().map_err(|e| {
        BqError::Config(format!(
            "credentials = 'default': no usable Application Default Credentials ({e}); set \
             GOOGLE_APPLICATION_CREDENTIALS to a service account key or external_account file, run `gcloud auth \
             application-default login`, or run on GCP with a service account"
        ))
    })?;
    Ok(Auth::Token(Arc::new(Adc(creds))))
}
