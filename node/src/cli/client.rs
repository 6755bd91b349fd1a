//! A small client of a running daemon's local API, used by `status` and
//! `devnet`.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::common::datadir::DataDir;

/// How long connecting to the daemon may take: it is on this machine.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a whole request may take unless the caller says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Connection details of one daemon's API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    token: String,
    agent: ureq::Agent,
    /// The overall limit of one request; `None` for none.
    timeout: Option<Duration>,
}

fn agent(timeout: Option<Duration>) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_global(timeout)
        .http_status_as_error(false)
        .build()
        .into()
}

impl ApiClient {
    /// Reads the API address and token from the data directory.
    pub fn from_data_dir(dir: &DataDir) -> Result<Self> {
        Ok(Self::new(&dir.api_addr()?, dir.token()?))
    }

    /// A client for the API at `addr` (host:port) with `token`.
    pub fn new(addr: &str, token: String) -> Self {
        Self {
            base: format!("http://{addr}"),
            token,
            agent: agent(Some(DEFAULT_TIMEOUT)),
            timeout: Some(DEFAULT_TIMEOUT),
        }
    }

    /// The same client with another overall request timeout (for calls
    /// that wait on the daemon, like a submission waiting for its commit).
    pub fn with_timeout(self, timeout: Duration) -> Self {
        Self {
            agent: agent(Some(timeout)),
            timeout: Some(timeout),
            ..self
        }
    }

    /// The same client without an overall timeout, for work that grows
    /// with the ledger (verifying every block); connecting still times out
    /// after [`CONNECT_TIMEOUT`].
    pub fn without_timeout(self) -> Self {
        Self {
            agent: agent(None),
            timeout: None,
            ..self
        }
    }

    /// Says what failed when a request did not get an answer: a timeout
    /// names what timed out and after how long, a refused connection asks
    /// whether the daemon runs.
    fn failed(&self, url: &str, error: ureq::Error) -> anyhow::Error {
        match error {
            ureq::Error::Timeout(what) => {
                let limit = match what {
                    ureq::Timeout::Connect => Some(CONNECT_TIMEOUT),
                    _ => self.timeout,
                };
                let limit =
                    limit.map_or_else(String::new, |l| format!(" within {} s", l.as_secs()));
                anyhow::anyhow!(
                    "the daemon at {url} did not answer{limit} (timed out: {what}); it may be busy or stuck, see its log"
                )
            }
            ureq::Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                anyhow::anyhow!(
                    "nothing answers at {url}: is `openagi run` running on this data directory?"
                )
            }
            other => anyhow::anyhow!("connecting to the daemon at {url}: {other}"),
        }
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
            .map_err(|e| self.failed(&url, e))?;
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
            .map_err(|e| self.failed(&url, e))?;
        json_answer(&url, response)
    }

    /// GETs a text document (no token needed for `/metrics`).
    pub fn get_text(&self, path: &str) -> Result<String> {
        let url = format!("{}{path}", self.base);
        let mut response = self
            .agent
            .get(&url)
            .call()
            .map_err(|e| self.failed(&url, e))?;
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
            .map_err(|e| self.failed(&url, e))?;
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
            .map_err(|e| self.failed(&url, e))?;
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

/// A non-success answer from the daemon, with its stated reason; callers
/// that treat some answers specially (503 "busy") find it with
/// `anyhow::Error::downcast_ref`.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The URL asked.
    pub url: String,
    /// The HTTP status.
    pub status: u16,
    /// The daemon's `error` text, or the whole answer.
    pub reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = ureq::http::StatusCode::from_u16(self.status)
            .map_or_else(|_| self.status.to_string(), |s| s.to_string());
        write!(f, "{} answered {status}: {}", self.url, self.reason)
    }
}

impl std::error::Error for Refusal {}

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
    anyhow::Error::new(Refusal {
        url: url.to_string(),
        status: status.as_u16(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_that_gets_no_answer_says_what_timed_out() {
        // Accepts and then says nothing.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let _held = std::thread::spawn(move || {
            let held: Vec<_> = listener.incoming().take(1).collect();
            std::thread::sleep(Duration::from_secs(5));
            drop(held);
        });
        let client =
            ApiClient::new(&addr, "token".into()).with_timeout(Duration::from_millis(1500));
        let e = client.get_json("/api/v1/status").expect_err("no answer");
        let text = e.to_string();
        assert!(
            text.contains("did not answer within 1 s") && text.contains("timed out"),
            "{text}"
        );
    }

    #[test]
    fn nothing_listening_asks_whether_the_daemon_runs() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let client = ApiClient::new(&format!("127.0.0.1:{port}"), "token".into());
        let text = client
            .get_json("/api/v1/status")
            .expect_err("refused")
            .to_string();
        assert!(text.contains("is `openagi run` running"), "{text}");
    }
}
