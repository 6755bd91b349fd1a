//! `openagi status`: what a running daemon reports about itself.

use anyhow::Result;
use serde_json::Value;

use crate::cli::client::ApiClient;
use crate::common::datadir::DataDir;
use crate::{out, outln};

/// Prints the status of the daemon running on `dir`, as JSON or text.
pub fn print_status(dir: &DataDir, json: bool) -> Result<()> {
    let client = ApiClient::from_data_dir(dir)?;
    let status = client.get_json("/api/v1/status")?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&status)?)?;
        return Ok(());
    }
    out!("{}", render(&status))?;
    Ok(())
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Renders the status document for people.
pub fn render(status: &Value) -> String {
    let node = &status["node"];
    let net = &status["network"];
    let mut out = String::new();
    out.push_str(&format!("peer id      {}\n", text(&node["peer_id"])));
    out.push_str(&format!("version      {}\n", text(&node["version"])));
    out.push_str(&format!("uptime       {}s\n", text(&node["uptime_secs"])));
    out.push_str(&format!(
        "api          http://{}\n",
        text(&node["api_addr"])
    ));
    out.push_str(&format!(
        "network      {} ({})\n",
        text(&net["network_id"]),
        text(&net["transport"])
    ));
    let listen = net["listen_addrs"].as_array().cloned().unwrap_or_default();
    out.push_str("listening on ");
    if listen.is_empty() {
        out.push_str("-\n");
    }
    for (i, addr) in listen.iter().enumerate() {
        let prefix = if i == 0 { "" } else { "             " };
        out.push_str(&format!("{prefix}{}\n", text(addr)));
    }
    let peers = net["peers"].as_array().cloned().unwrap_or_default();
    out.push_str(&format!("peers        {}\n", peers.len()));
    for peer in peers {
        out.push_str(&format!("             {}\n", text(&peer)));
    }
    out.push_str(&format!("gossip rx    {}\n", text(&net["gossip_received"])));
    let consensus = &status["consensus"];
    if consensus.is_object() {
        out.push_str(&format!(
            "ledger       height {} ({}, {} validators, epoch {})\n",
            text(&status["ledger"]["height"]),
            text(&consensus["role"]),
            text(&consensus["validators"]),
            text(&consensus["epoch"])
        ));
        if let Some(primary) = consensus["primary_index"].as_u64() {
            let skipped: Vec<String> = consensus["skipped_validators"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i.as_u64())
                .map(|i| (i + 1).to_string())
                .collect();
            let why = if skipped.is_empty() {
                "rotation".to_string()
            } else {
                format!("rotation skipping {}", skipped.join(", "))
            };
            out.push_str(&format!(
                "primary      validator {} of view {} ({why})\n",
                primary + 1,
                text(&consensus["view"])
            ));
        }
    }
    let tor = &status["tor"];
    if tor.is_object() {
        let boot = if tor["bootstrapped"] == true {
            "bootstrapped".to_string()
        } else {
            format!(
                "bootstrapping {}% ({})",
                text(&tor["bootstrap_percent"]),
                text(&tor["bootstrap_summary"])
            )
        };
        out.push_str(&format!("tor          {} {boot}\n", text(&tor["mode"])));
        out.push_str(&format!(
            "onion        {} (service {})\n",
            text(&tor["onion_address"]),
            text(&tor["onion_service"])
        ));
        if !tor["last_error"].is_null() {
            out.push_str(&format!("tor problem  {}\n", text(&tor["last_error"])));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_section() {
        let doc = serde_json::json!({
            "node": {"peer_id": "12D3KooWabc", "version": "0.1.0", "uptime_secs": 5, "api_addr": "127.0.0.1:1"},
            "network": {"network_id": "devnet", "transport": "direct", "listen_addrs": ["/ip4/127.0.0.1/tcp/1"],
                        "connected_peers": 1, "peers": ["12D3KooWdef"], "gossip_received": 3},
            "consensus": {"role": "validator", "validators": 4, "epoch": 0, "view": 5,
                          "primary_index": 2, "skipped_validators": [1]},
            "ledger": {"height": 12, "head_hash": "ab"},
            "tor": {"mode": "tor", "bootstrapped": false, "bootstrap_percent": 40, "bootstrap_summary": "loading",
                    "onion_address": "abc.onion", "onion_service": "bootstrapping", "last_error": null}
        });
        let text = render(&doc);
        for needle in [
            "12D3KooWabc",
            "devnet (direct)",
            "/ip4/127.0.0.1/tcp/1",
            "12D3KooWdef",
            "gossip rx    3",
            "ledger       height 12 (validator, 4 validators, epoch 0)",
            "primary      validator 3 of view 5 (rotation skipping 2)",
            "tor          tor bootstrapping 40% (loading)",
            "abc.onion (service bootstrapping)",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
