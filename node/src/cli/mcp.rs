//! `openagi mcp`: a Model Context Protocol server over stdio, so that AI
//! agents can use a node the way its operator does.
//!
//! It is a client of the running daemon's authenticated API (the token
//! from the data directory), built on the official `rmcp` SDK. Tools that
//! only read are always offered; tools that change anything (submit a
//! transaction or a training job, send a message) are listed too, so an
//! agent knows they exist, but refuse unless the server was started with
//! `--allow-writes`, and each write is logged (on stderr, which MCP leaves
//! to the server). Errors reach the agent as tool errors carrying the
//! daemon's message. Standard output belongs to the protocol: nothing else
//! is printed there.

use std::sync::Arc;

use anyhow::Result;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ErrorData, ServerHandler, ServiceExt, schemars, tool, tool_handler, tool_router};
use serde::Deserialize;

use crate::cli::client::ApiClient;
use crate::common::datadir::DataDir;

/// The MCP server: the API client and whether writes are allowed.
#[derive(Clone)]
pub struct NodeTools {
    client: Arc<ApiClient>,
    allow_writes: bool,
    tool_router: ToolRouter<Self>,
}

/// `ledger_block`'s parameters.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct BlockParams {
    /// Block height, from 1 (0 is the genesis state and has no block).
    pub height: u64,
}

/// `transaction_status`'s parameters.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct TxParams {
    /// The transaction hash: 64 hexadecimal digits, as `submit_transaction`
    /// returns it.
    pub hash: String,
}

/// `learning_job`'s parameters.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct JobParams {
    /// The job id (64 hexadecimal digits) or an unambiguous prefix of it,
    /// as `learning_jobs` lists them.
    pub job: String,
}

/// `inbox`'s parameters.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct InboxParams {
    /// How many of the newest messages to return (1 to 1000; default 20).
    pub limit: Option<u32>,
}

/// `submit_transaction`'s parameters.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct SubmitParams {
    /// The transaction's payload, as UTF-8 text (at most 64 KiB).
    pub payload: String,
    /// Wait until it commits (up to 30 s) and return its height.
    pub wait: Option<bool>,
}

/// `submit_learning_job`'s parameters.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct JobSpecParams {
    /// The job spec as JSON, the format of `configs/digits-job.toml` in
    /// JSON form: name, architecture, rounds, min_clients,
    /// round_deadline_secs, join_window_secs, participation, train,
    /// aggregator, privacy, compression, seed.
    pub spec: serde_json::Value,
}

/// `send_message`'s parameters.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct MessageParams {
    /// The recipient's libp2p peer id (`12D3KooW...`), as `peers` lists
    /// them.
    pub to: String,
    /// The message text.
    pub text: String,
}

fn ok_json(value: serde_json::Value) -> Result<CallToolResult, ErrorData> {
    Ok(CallToolResult::success(vec![ContentBlock::json(value)?]))
}

fn tool_error(message: String) -> Result<CallToolResult, ErrorData> {
    Ok(CallToolResult::error(vec![ContentBlock::text(message)]))
}

impl NodeTools {
    /// Tools over the daemon `client` talks to.
    pub fn new(client: ApiClient, allow_writes: bool) -> Self {
        Self {
            client: Arc::new(client),
            allow_writes,
            tool_router: Self::tool_router(),
        }
    }

    /// GETs `path` from the daemon, off the async workers.
    async fn get(&self, path: String) -> Result<CallToolResult, ErrorData> {
        let client = self.client.clone();
        match tokio::task::spawn_blocking(move || client.get_json(&path)).await {
            Ok(Ok(value)) => ok_json(value),
            Ok(Err(e)) => tool_error(format!("{e:#}")),
            Err(e) => tool_error(format!("the request failed: {e}")),
        }
    }

    /// POSTs `body` to `path`, if writes are allowed.
    async fn post(
        &self,
        tool: &str,
        path: &'static str,
        body: serde_json::Value,
    ) -> Result<CallToolResult, ErrorData> {
        if !self.allow_writes {
            return tool_error(format!(
                "{tool} changes the node and this MCP server is read-only: the operator must start it with `openagi mcp --allow-writes`"
            ));
        }
        eprintln!("openagi mcp: write tool {tool} called: POST {path}");
        let client = self.client.clone();
        match tokio::task::spawn_blocking(move || client.post_json(path, &body)).await {
            Ok(Ok(value)) => ok_json(value),
            Ok(Err(e)) => tool_error(format!("{e:#}")),
            Err(e) => tool_error(format!("the request failed: {e}")),
        }
    }
}

#[tool_router]
impl NodeTools {
    #[tool(
        description = "The node's status: peer id, version, uptime, network id and transport, connected peers, Tor state, consensus (view, primary, height, validators) and the ledger head. Read-only."
    )]
    async fn node_status(&self) -> Result<CallToolResult, ErrorData> {
        self.get("/api/v1/status".into()).await
    }

    #[tool(
        description = "The peers this node is connected to: peer id, addresses, round-trip time, agent version, bytes exchanged by protocol. Read-only."
    )]
    async fn peers(&self) -> Result<CallToolResult, ErrorData> {
        self.get("/api/v1/peers".into()).await
    }

    #[tool(description = "The ledger's committed height and head block hash. Read-only.")]
    async fn ledger_head(&self) -> Result<CallToolResult, ErrorData> {
        self.get("/api/v1/ledger/head".into()).await
    }

    #[tool(
        description = "One committed block by height: its hash, previous hash, view, timestamp, transactions (hash, client, sequence number, payload as hex) and commit certificate (the validators that signed it). Read-only."
    )]
    async fn ledger_block(
        &self,
        Parameters(BlockParams { height }): Parameters<BlockParams>,
    ) -> Result<CallToolResult, ErrorData> {
        self.get(format!("/api/v1/ledger/blocks/{height}")).await
    }

    #[tool(
        description = "Whether a transaction committed, and at which height and index in its block. Read-only."
    )]
    async fn transaction_status(
        &self,
        Parameters(TxParams { hash }): Parameters<TxParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let hash = hash.trim().to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return tool_error(format!("{hash:?} is not 64 hexadecimal digits"));
        }
        self.get(format!("/api/v1/tx/{hash}")).await
    }

    #[tool(
        description = "The federated-learning jobs on this node's ledger: id, name, coordinator, model architecture, state (gathering, running, finished, interrupted), rounds, joins, what a gathering job waits for, and each finished round's accuracy and epsilon. Read-only."
    )]
    async fn learning_jobs(&self) -> Result<CallToolResult, ErrorData> {
        self.get("/api/v1/learn/jobs".into()).await
    }

    #[tool(
        description = "The network's models as this node's ledger describes them, one card per model: content id, job, round, parent model, architecture and data schema (inputs, classes), accuracy, epsilon spent and privacy mode, whether it is a job's final model, and whether this node holds its parameters. Read-only."
    )]
    async fn learning_models(&self) -> Result<CallToolResult, ErrorData> {
        self.get("/api/v1/learn/models".into()).await
    }

    #[tool(
        description = "One federated-learning job with all its rounds (model id, whether it aggregated, participants selected and responding, samples, accuracy, epsilon), found by its id or an unambiguous prefix. Read-only."
    )]
    async fn learning_job(
        &self,
        Parameters(JobParams { job }): Parameters<JobParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let client = self.client.clone();
        let listed =
            tokio::task::spawn_blocking(move || client.get_json("/api/v1/learn/jobs")).await;
        let jobs = match listed {
            Ok(Ok(value)) => value["jobs"].as_array().cloned().unwrap_or_default(),
            Ok(Err(e)) => return tool_error(format!("{e:#}")),
            Err(e) => return tool_error(format!("the request failed: {e}")),
        };
        // The CLI's own prefix rules (hex only, ambiguity named).
        let ids: Vec<String> = jobs
            .iter()
            .filter_map(|j| j["job_id"].as_str().map(str::to_string))
            .collect();
        match crate::cli::learn_jobs::resolve_job_prefix(&job, ids.iter().map(String::as_str)) {
            Ok(id) => ok_json(
                jobs.into_iter()
                    .find(|j| j["job_id"].as_str() == Some(id))
                    .unwrap_or_default(),
            ),
            Err(e) => tool_error(e.to_string()),
        }
    }

    #[tool(
        description = "The newest end-to-end encrypted messages this node received (sender peer id and key, time, text). Read-only."
    )]
    async fn inbox(
        &self,
        Parameters(InboxParams { limit }): Parameters<InboxParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let limit = limit.unwrap_or(20).clamp(1, 1000);
        self.get(format!("/api/v1/inbox?limit={limit}")).await
    }

    #[tool(
        description = "The newest private messages this node sent and where each is: queued (waiting in this node's store for a next hop or the recipient's key), relayed (a relay stored it), delivered (the recipient signed a receipt) or expired; with the route (direct or mesh) and text. Read-only."
    )]
    async fn outbox(
        &self,
        Parameters(InboxParams { limit }): Parameters<InboxParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let limit = limit.unwrap_or(20).clamp(1, 1000);
        self.get(format!("/api/v1/outbox?limit={limit}")).await
    }

    #[tool(
        description = "Submits a transaction with a text payload to the ledger (this node numbers it); with wait, returns once it committed. Changes the ledger: refused unless the server runs with --allow-writes."
    )]
    async fn submit_transaction(
        &self,
        Parameters(SubmitParams { payload, wait }): Parameters<SubmitParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let body = serde_json::json!({ "payload": payload, "wait": wait.unwrap_or(false) });
        self.post("submit_transaction", "/api/v1/tx", body).await
    }

    #[tool(
        description = "Submits a federated-learning job (this node coordinates it) from a JSON job spec; the daemon validates it and says what is wrong. Changes the ledger: refused unless the server runs with --allow-writes."
    )]
    async fn submit_learning_job(
        &self,
        Parameters(JobSpecParams { spec }): Parameters<JobSpecParams>,
    ) -> Result<CallToolResult, ErrorData> {
        self.post("submit_learning_job", "/api/v1/learn/jobs", spec)
            .await
    }

    #[tool(
        description = "Sends an end-to-end encrypted private message (Double Ratchet) to a peer: status delivered when the peer is connected and stored it, queued when it goes through the mesh (follow it with outbox). Sends on the operator's behalf: refused unless the server runs with --allow-writes."
    )]
    async fn send_message(
        &self,
        Parameters(MessageParams { to, text }): Parameters<MessageParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let body = serde_json::json!({ "to": to, "text": text });
        self.post("send_message", "/api/v1/msg", body).await
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for NodeTools {
    fn get_info(&self) -> ServerConfig {
        let mode = if self.allow_writes {
            "Write tools are enabled."
        } else {
            "This server is read-only: write tools refuse (the operator can start it with --allow-writes)."
        };
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new(
                "openagi",
                crate::common::version::VERSION,
            ))
            .with_instructions(format!(
                "Tools over one Open-AGI node (a peer-to-peer daemon with a PBFT ledger and federated learning), through its local API. {mode}"
            ))
    }
}

/// Runs the MCP server on stdio for the daemon on `dir` until the client
/// closes the connection.
pub fn run(dir: &DataDir, allow_writes: bool) -> Result<()> {
    let client = ApiClient::from_data_dir(dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let service = NodeTools::new(client, allow_writes)
            .serve(rmcp::transport::stdio())
            .await?;
        service.waiting().await?;
        Ok(())
    })
}
