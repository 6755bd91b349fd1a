//! Harness for multi-process tests: real `openagi` daemons on loopback.
//!
//! Each [`Daemon`] is a child process with its own data directory and
//! ephemeral ports; it is killed when dropped, so a failing test leaves no
//! processes behind.
//!
//! The tests themselves live with the crate that builds the binary
//! (`node/tests/`), because only there does cargo guarantee a fresh
//! `openagi` executable; they hand its path over with [`use_binary`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// Network id used by test daemons.
pub const TEST_NETWORK: &str = "openagi-test";

static BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Tells the harness which `openagi` executable to run; call it with
/// `env!("CARGO_BIN_EXE_openagi")` at the start of each test. The first
/// call wins.
pub fn use_binary(path: &str) {
    let _ = BINARY.set(PathBuf::from(path));
}

/// Path of the `openagi` binary: the one given to [`use_binary`], else
/// `$OPENAGI_BIN`, else `openagi` on the `PATH`.
pub fn openagi_bin() -> PathBuf {
    if let Some(path) = BINARY.get() {
        return path.clone();
    }
    std::env::var_os("OPENAGI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("openagi"))
}

/// Runs `openagi` with `args` to completion, returning status, stdout and
/// stderr.
pub fn openagi(args: &[&str]) -> Result<(ExitStatus, String, String)> {
    let output = Command::new(openagi_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} {args:?}", openagi_bin().display()))?;
    Ok((
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// Creates a data directory with `openagi init`.
pub fn init(dir: &Path) -> Result<()> {
    let path = dir.to_str().context("utf-8 path")?;
    let (status, out, err) = openagi(&["init", "--data-dir", path, "--network-id", TEST_NETWORK])?;
    if !status.success() {
        bail!("init failed: {out}{err}");
    }
    Ok(())
}

/// Initialises `n` data directories under `root` (`v0`, `v1`, ...) that
/// share one genesis listing all of them as validators, using only the
/// operator commands (`init`, `keys show`, `genesis create`, `init
/// --genesis`).
pub fn init_validators(root: &Path, n: usize) -> Result<Vec<PathBuf>> {
    init_validators_with(root, n, &[])
}

/// [`init_validators`] with more `genesis create` arguments (e.g.
/// `--checkpoint-interval 2 --window 4`, which the validators' config must
/// then match).
pub fn init_validators_with(root: &Path, n: usize, genesis_args: &[&str]) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let dir = root.join(format!("v{i}"));
        init(&dir)?;
        let (status, out, err) = openagi(&[
            "keys",
            "show",
            "--json",
            "--data-dir",
            dir.to_str().context("utf-8")?,
        ])?;
        if !status.success() {
            bail!("keys show failed: {err}");
        }
        let shown: Value = serde_json::from_str(&out)?;
        keys.push(
            shown["public_key"]
                .as_str()
                .context("public_key")?
                .to_string(),
        );
        dirs.push(dir);
    }
    let genesis = root.join("genesis.toml");
    let genesis_text = genesis.to_str().context("utf-8")?;
    let mut args = vec![
        "genesis",
        "create",
        "--network-id",
        TEST_NETWORK,
        "--out",
        genesis_text,
        // A join costs a fraction of a second in tests.
        "--join-difficulty",
        "4",
        "--join-memory-kib",
        "64",
    ];
    args.extend_from_slice(genesis_args);
    for key in &keys {
        args.push("--validator");
        args.push(key);
    }
    let (status, out, err) = openagi(&args)?;
    if !status.success() {
        bail!("genesis create failed: {out}{err}");
    }
    for dir in &dirs {
        let d = dir.to_str().context("utf-8")?;
        let (status, out, err) = openagi(&[
            "init",
            "--data-dir",
            d,
            "--network-id",
            TEST_NETWORK,
            "--genesis",
            genesis_text,
        ])?;
        if !status.success() {
            bail!("init --genesis failed: {out}{err}");
        }
    }
    Ok(dirs)
}

/// A started network of validators: their data directories, the running
/// daemons (v0 first) and the options that bootstrap a node from v0.
pub struct Network {
    /// Data directories, `root/v0`, `root/v1`, ...
    pub dirs: Vec<PathBuf>,
    /// The daemons, in the same order.
    pub nodes: Vec<Daemon>,
    /// Options naming v0 as the bootstrap peer, for later nodes.
    pub boot: DaemonOptions,
}

/// Initialises `n` validators under `root` (see [`init_validators`]),
/// starts them, the others bootstrapping from v0, and waits until each
/// is connected to all the others.
pub fn start_validators(root: &Path, n: usize) -> Result<Network> {
    let dirs = init_validators(root, n)?;
    let v0 = Daemon::start(&dirs[0], &DaemonOptions::default())?;
    let boot = DaemonOptions {
        bootstrap: vec![v0.multiaddr()?],
        ..Default::default()
    };
    let mut nodes = vec![v0];
    for dir in &dirs[1..] {
        nodes.push(Daemon::start(dir, &boot)?);
    }
    wait_for("validator mesh", Duration::from_secs(30), || {
        nodes
            .iter()
            .all(|d| d.connected_peers() + 1 >= n)
            .then_some(())
    })?;
    Ok(Network { dirs, nodes, boot })
}

/// Initialises `root/full`, a node of the network `init_validators`
/// created under `root` (its genesis, `root/genesis.toml`, does not list
/// it): a full node.
pub fn init_full_node(root: &Path) -> Result<PathBuf> {
    let full_dir = root.join("full");
    init(&full_dir)?;
    let genesis = root.join("genesis.toml");
    let (status, out, err) = openagi(&[
        "init",
        "--data-dir",
        full_dir.to_str().context("utf-8")?,
        "--network-id",
        TEST_NETWORK,
        "--genesis",
        genesis.to_str().context("utf-8")?,
    ])?;
    if !status.success() {
        bail!("init --genesis failed: {out}{err}");
    }
    Ok(full_dir)
}

/// Every daemon's log, labelled `v0`, `v1`, ... (for failure messages).
pub fn logs(nodes: &[Daemon]) -> String {
    nodes
        .iter()
        .enumerate()
        .map(|(i, d)| format!("--- v{i} ---\n{}", d.log()))
        .collect()
}

/// Polls `check` every 100 ms until it returns `Some` or `limit` passes.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> Result<T> {
    let until = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() > until {
            bail!("timed out after {} s waiting for {what}", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A running daemon.
pub struct Daemon {
    /// Its data directory.
    pub dir: PathBuf,
    child: Child,
    api: String,
    token: String,
}

/// How to start a daemon.
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// Bootstrap multiaddrs.
    pub bootstrap: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Extra arguments after `run`.
    pub args: Vec<String>,
    /// Largest file the daemon may write, in KiB (`ulimit -f`): writes
    /// past it fail as on a full disk.
    pub file_size_limit_kib: Option<u64>,
}

impl Daemon {
    /// Starts `openagi run` on `dir` (which must be initialised) and waits
    /// until its API answers `/health`.
    pub fn start(dir: &Path, options: &DaemonOptions) -> Result<Daemon> {
        let _ = std::fs::remove_file(dir.join("api.addr"));
        let mut child = Self::spawn(dir, options)?;
        let api = match wait_for("api.addr", Duration::from_secs(20), || {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(Err(anyhow::anyhow!(
                    "daemon exited during start-up: {status}"
                )));
            }
            std::fs::read_to_string(dir.join("api.addr"))
                .ok()
                .map(|s| Ok(s.trim().to_string()))
        }) {
            Ok(Ok(api)) => api,
            Ok(Err(e)) | Err(e) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
                bail!("{e}\n--- daemon.log ---\n{log}");
            }
        };
        let token = std::fs::read_to_string(dir.join("api.token"))?
            .trim()
            .to_string();
        let daemon = Daemon {
            dir: dir.to_path_buf(),
            child,
            api,
            token,
        };
        wait_for("/health", Duration::from_secs(10), || {
            daemon
                .get("/health", None)
                .ok()
                .filter(|(code, _)| *code == 200)
        })?;
        Ok(daemon)
    }

    /// Spawns `openagi run` on `dir` without waiting for anything.
    pub fn spawn(dir: &Path, options: &DaemonOptions) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))?;
        // A file-size limit is set by a shell that then becomes the daemon.
        let mut command = match options.file_size_limit_kib {
            Some(kib) => {
                let mut c = Command::new("bash");
                c.args(["-c", "ulimit -f \"$0\" && exec \"$@\""])
                    .arg(kib.to_string())
                    .arg(openagi_bin());
                c
            }
            None => Command::new(openagi_bin()),
        };
        command
            .arg("run")
            .arg("--data-dir")
            .arg(dir)
            .args([
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--api-listen",
                "127.0.0.1:0",
            ])
            .args(["--log-level", "info,openagi_net=debug"])
            // Tor is the default transport of `openagi run`; tests that
            // want it say so through `options.env`.
            .env("OPENAGI_NETWORK_TRANSPORT", "direct")
            .env("OPENAGI_NETWORK_ANNOUNCE_INTERVAL_SECS", "1")
            .env("OPENAGI_NETWORK_REDIAL_MAX_SECS", "2")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for addr in &options.bootstrap {
            command.args(["--bootstrap", addr]);
        }
        command.args(&options.args);
        for (k, v) in &options.env {
            command.env(k, v);
        }
        command.spawn().context("spawning openagi run")
    }

    /// The API address (host:port).
    pub fn api_addr(&self) -> &str {
        &self.api
    }

    /// The API token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// GETs `path`, with `Authorization: Bearer token` when given; returns
    /// the status code and body.
    pub fn get(&self, path: &str, token: Option<&str>) -> Result<(u16, String)> {
        let mut request =
            http_agent(Duration::from_secs(5)).get(&format!("http://{}{path}", self.api));
        if let Some(token) = token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        let mut response = request.call()?;
        let code = response.status().as_u16();
        Ok((code, response.body_mut().read_to_string()?))
    }

    /// The `/api/v1/status` document.
    pub fn status(&self) -> Result<Value> {
        let (code, body) = self.get("/api/v1/status", Some(&self.token))?;
        if code != 200 {
            bail!("status answered {code}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// POSTs JSON to `path` with the token; returns status and body.
    pub fn post(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        post_json(&self.api, &self.token, path, body)
    }

    /// POSTs bytes (`application/octet-stream`) to `path` with the token;
    /// returns the status, the `Retry-After` header if any, and the JSON
    /// answer.
    pub fn post_bytes(&self, path: &str, body: &[u8]) -> Result<(u16, Option<String>, Value)> {
        let mut response = http_agent(Duration::from_secs(40))
            .post(&format!("http://{}{path}", self.api))
            .header("Authorization", &format!("Bearer {}", self.token))
            .content_type("application/octet-stream")
            .send(body)?;
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let code = response.status().as_u16();
        Ok((code, retry_after, response.body_mut().read_json()?))
    }

    /// Committed ledger height, or 0 when unknown.
    pub fn height(&self) -> u64 {
        self.status()
            .ok()
            .and_then(|s| s["ledger"]["height"].as_u64())
            .unwrap_or(0)
    }

    /// The `/api/v1/peers` document.
    pub fn peers(&self) -> Result<Value> {
        let (_, body) = self.get("/api/v1/peers", Some(&self.token))?;
        Ok(serde_json::from_str(&body)?)
    }

    /// The classic-format `/metrics` text.
    pub fn metrics(&self) -> Result<String> {
        Ok(self.get("/metrics", None)?.1)
    }

    /// This daemon's peer id.
    pub fn peer_id(&self) -> Result<String> {
        Ok(self.status()?["node"]["peer_id"]
            .as_str()
            .context("peer_id")?
            .to_string())
    }

    /// A dialable multiaddr of this daemon, ending in `/p2p/<peer id>`.
    pub fn multiaddr(&self) -> Result<String> {
        // The API can answer before the swarm reports its listen address
        // (they start in parallel): wait for it rather than read once.
        wait_for("a listen address", Duration::from_secs(10), || {
            let status = self.status().ok()?;
            let addr = status["network"]["listen_addrs"][0].as_str()?;
            let peer = status["node"]["peer_id"].as_str()?;
            Some(format!("{addr}/p2p/{peer}"))
        })
    }

    /// Number of connected peers.
    pub fn connected_peers(&self) -> usize {
        self.status()
            .ok()
            .and_then(|s| s["network"]["connected_peers"].as_u64())
            .unwrap_or(0) as usize
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the process in bytes (`VmRSS`; 0 if unreadable).
    pub fn rss_bytes(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .map_or(0, |kib| kib * 1024)
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        kill(Pid::from_raw(self.child.id() as i32), signal)?;
        Ok(())
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus> {
        let child = &mut self.child;
        wait_for("daemon exit", limit, || child.try_wait().ok().flatten())
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill_hard(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An `openagi devnet` child process: its standard output arrives line by
/// line on [`DevnetProcess::lines`]; SIGTERM (then SIGKILL) on drop.
pub struct DevnetProcess {
    child: Child,
    /// The devnet's standard output, one line at a time.
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl DevnetProcess {
    /// Starts `openagi devnet --nodes N --duration 10m --dir DIR`.
    pub fn start(dir: &Path, nodes: usize) -> Result<Self> {
        use std::io::BufRead;
        let mut child = Command::new(openagi_bin())
            .args(["devnet", "--nodes", &nodes.to_string(), "--duration", "10m"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting openagi devnet")?;
        let stdout = child.stdout.take().context("devnet stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self { child, lines })
    }

    /// The next line that satisfies `pick`, within `limit`.
    pub fn wait_line<T>(
        &self,
        limit: Duration,
        mut pick: impl FnMut(&str) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .context("the devnet did not print what was waited for")?;
            if let Some(found) = pick(&line) {
                return Ok(found);
            }
        }
    }
}

impl Drop for DevnetProcess {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// Environment variables for [`DaemonOptions::env`] from string pairs.
pub fn env_vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// An HTTP client that returns error statuses as answers, with a global
/// timeout.
/// A TCP port on 127.0.0.1 that was free a moment ago, for a daemon that
/// must listen on the same port across restarts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// POSTs JSON to `path` of the API at `api` (host:port) with `token`, for
/// callers that hold only the address (a load thread); returns status and
/// body.
pub fn post_json(api: &str, token: &str, path: &str, body: &Value) -> Result<(u16, Value)> {
    let mut response = http_agent(Duration::from_secs(40))
        .post(&format!("http://{api}{path}"))
        .header("Authorization", &format!("Bearer {token}"))
        .send_json(body)?;
    let code = response.status().as_u16();
    Ok((code, response.body_mut().read_json()?))
}

fn http_agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into()
}

/// Stops a child process: SIGTERM, up to 10 s to exit, then SIGKILL.
pub fn stop_child(child: &mut Child) {
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    for _ in 0..100 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}
