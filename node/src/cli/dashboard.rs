//! `openagi dashboard`: a one-time login link to the web dashboard of the
//! daemon running on a data directory.

use anyhow::{Context, Result};

use crate::cli::client::ApiClient;
use crate::common::datadir::DataDir;
use crate::outln;

/// A login link and how long it and the session it opens last.
pub struct LoginLink {
    /// The URL to open.
    pub url: String,
    /// Seconds the link works.
    pub expires_in_secs: u64,
    /// Seconds the browser stays logged in.
    pub session_secs: u64,
}

/// Asks the daemon on `dir` for a login link (authenticated with the API
/// token).
pub fn login_link(dir: &DataDir) -> Result<LoginLink> {
    let client = ApiClient::from_data_dir(dir)?;
    let answer = client.post_json("/api/v1/dashboard/login", &serde_json::json!({}))?;
    Ok(LoginLink {
        url: answer["url"]
            .as_str()
            .map(str::to_string)
            .context("the daemon's answer has no url")?,
        expires_in_secs: answer["expires_in_secs"].as_u64().unwrap_or(0),
        session_secs: answer["session_secs"].as_u64().unwrap_or(0),
    })
}

/// Prints the login link, and how long it works.
pub fn print_login(dir: &DataDir) -> Result<()> {
    let link = login_link(dir)?;
    outln!("{}", link.url)?;
    eprintln!(
        "Open it in a browser on this machine within {} minutes; it works once and logs that browser in for {} hours.",
        link.expires_in_secs / 60,
        link.session_secs / 3600
    );
    Ok(())
}
