//! A small client of a running daemon's local API, used by `status` and
//! `devnet`.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::datadir::DataDir;

/// Connection details of one daemon's API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl ApiClient {
    /// Reads the API address and token from the data directory.
    pub fn from_data_dir(dir: &DataDir) -> Result<Self> {
        Ok(Self::new(&dir.api_addr()?, dir.token()?))
    }

    /// A client for the API at `addr` (host:port) with `token`.
    pub fn new(addr: &str, token: String) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            base: format!("http://{addr}"),
            token,
            agent,
        }
    }

    /// The same client with another overall request timeout (for calls
    /// that wait on the daemon, like a submission waiting for its commit).
    pub fn with_timeout(self, timeout: Duration) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Self { agent, ..self }
    }

    /// The base URL, e.g. `http://127.0.0.1:4611`.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// POSTs `body` as JSON and returns the JSON answer.
    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
        let url = format!("{}{path}", self.base);
        let response = self
            .agent
            .post(&url)
            .header("Authorization", &format!("Bearer {}", self.token))
            .send_json(body)
            .with_context(|| format!("connecting to the daemon at {url}"))?;
        json_answer(&url, response)
    }

    /// POSTs a binary body and returns the JSON answer.
    pub fn post_bytes(&self, path: &str, body: Vec<u8>) -> Result<serde_json::Value> {
        let url = format!("{}{path}", self.base);
        let response = self
            .agent
            .post(&url)
            .header("Authorization", &format!("Bearer {}", self.token))
            .content_type("application/octet-stream")
            .send(&body[..])
            .with_context(|| format!("connecting to the daemon at {url}"))?;
        json_answer(&url, response)
    }

    /// GETs a text document (no token needed for `/metrics`).
    pub fn get_text(&self, path: &str) -> Result<String> {
        let url = format!("{}{path}", self.base);
        let mut response = self
            .agent
            .get(&url)
            .call()
            .with_context(|| format!("connecting to {url}"))?;
        Ok(response.body_mut().read_to_string()?)
    }

    /// GETs authenticated bytes, with the value of `header` if present.
    pub fn get_bytes(&self, path: &str, header: &str) -> Result<(Vec<u8>, Option<String>)> {
        let url = format!("{}{path}", self.base);
        let mut response = self
            .agent
            .get(&url)
            .header("Authorization", &format!("Bearer {}", self.token))
            .call()
            .with_context(|| format!("connecting to the daemon at {url}"))?;
        if !response.status().is_success() {
            return Err(refusal(&url, response));
        }
        let value = response
            .headers()
            .get(header)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let bytes = response
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .with_context(|| format!("reading the answer of {url}"))?;
        Ok((bytes, value))
    }

    /// GETs an authenticated JSON document.
    pub fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        let url = format!("{}{path}", self.base);
        let response = self
            .agent
            .get(&url)
            .header("Authorization", &format!("Bearer {}", self.token))
            .call()
            .with_context(|| format!("connecting to the daemon at {url}"))?;
        json_answer(&url, response)
    }
}

/// Reads a JSON answer; a non-success status becomes an error carrying the
/// daemon's `error` text (or the whole answer when it has none).
fn json_answer(
    url: &str,
    mut response: ureq::http::Response<ureq::Body>,
) -> Result<serde_json::Value> {
    if !response.status().is_success() {
        return Err(refusal(url, response));
    }
    response
        .body_mut()
        .read_json()
        .with_context(|| format!("reading the answer of {url}"))
}

/// The error for a non-success answer, with the daemon's stated reason.
fn refusal(url: &str, mut response: ureq::http::Response<ureq::Body>) -> anyhow::Error {
    let status = response.status();
    let reason = match response.body_mut().read_json::<serde_json::Value>() {
        Ok(answer) => answer["error"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| answer.to_string()),
        Err(e) => format!("(unreadable answer: {e})"),
    };
    anyhow::anyhow!("{url} answered {status}: {reason}")
}
