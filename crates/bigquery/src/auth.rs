//! Credentials for BigQuery calls: none (an emulator), or Google's Application Default Credentials.

use std::sync::Arc;

use crate::error::{BqError, Result};

/// Adds credentials to requests; cheap to clone.
#[derive(Clone)]
pub enum Auth {
    /// No credentials: for an emulator on a trusted network.
    None,
    /// Bearer tokens from a provider that refreshes them before they expire.
    Token(Arc<dyn TokenSource>),
}

impl std::fmt::Debug for Auth {
    // Never prints a token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("Auth::None"),
            Auth::Token(_) => f.write_str("Auth::Token(..)"),
        }
    }
}

/// Something that hands out a current access token.
#[async_trait::async_trait]
pub trait TokenSource: Send + Sync {
    /// A token valid for at least a few more minutes.
    async fn token(&self) -> Result<String>;
}

impl Auth {
    /// The `authorization` header value, if any.
    pub async fn header(&self) -> Result<Option<String>> {
        match self {
            Auth::None => Ok(None),
            Auth::Token(t) => Ok(Some(format!("Bearer {}", t.token().await?))),
        }
    }

    /// Resolves the `credentials` option: `none`, or `default` (Application Default Credentials).
    pub fn from_option(value: &str) -> Result<Self> {
        match value {
            "none" => Ok(Auth::None),
            "default" => crate::adc::application_default(),
            other => Err(BqError::Config(format!(
                "credentials = '{other}': use 'default' (Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS \
                 pointing at a service account key or an external_account file, gcloud's user credentials, or the \
                 metadata server) or 'none' (an emulator)"
            ))),
        }
    }
}
