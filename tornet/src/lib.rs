//! A private Tor network on 127.0.0.1, for the tests and for
//! `openagi devnet --tor`: development tooling the product links only for
//! `devnet`, kept apart from both the daemon and the test harness.
//!
//! Debian's `tor` processes in `TestingTorNetwork` mode: directory
//! authorities (non-exit relays), exit relays, and client tors with a
//! SocksPort and ControlPort (one per system-tor daemon). It also writes an
//! `arti.toml` that points arti at the network. Startup takes 30–60 s on
//! two cores, mostly waiting for the first consensus.
//!
//! The knobs that are not obvious:
//! - the onion-service time period: C tor with `TestingTorNetwork` uses
//!   `24 * voting interval` seconds and ignores the consensus parameter,
//!   arti uses the `hsdir_interval` consensus parameter (minutes), so the
//!   voting interval is chosen so both agree (15 s → 6 min);
//! - every relay shares 127.0.0.1, so arti's subnet family rules are
//!   disabled with prefixes 33 / 129, and `allow_local_addrs` is set;
//! - authorities vote Stable and Fast for everyone from the first
//!   consensus: arti's onion-service circuits only use such relays;
//! - exits `accept *:*` so their policy summary is not "reject all".
//!
//! Every tor gets `__OwningControllerProcess <pid>` of the process that
//! started the network, and a small watchdog process stops them by PID when
//! that process is gone, so a test binary that exits (or is killed) leaves
//! no tor behind. [`TorNet::stop`] (also on drop) stops them at once.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The coarse class of a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// `tor` or `tor-gencert` is not installed ([`INSTALL_HINT`]).
    Missing,
    /// The options cannot make a network.
    Options,
    /// A file, a port or a process of the network failed.
    Io,
    /// The network did not become ready in time.
    NotReady,
}

/// Why the network could not be built, started or queried.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// The class of the failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl From<std::fmt::Error> for Error {
    fn from(_: std::fmt::Error) -> Self {
        Self::new(ErrorKind::Io, "formatting a configuration file failed")
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self::new(ErrorKind::Io, e.to_string())
    }
}

/// This crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds what was being done to a failure, as `kind`.
trait Context<T> {
    fn context(self, kind: ErrorKind, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, kind: ErrorKind, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::new(kind, format!("{}: {e}", what())))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, kind: ErrorKind, what: impl FnOnce() -> String) -> Result<T> {
        self.ok_or_else(|| Error::new(kind, what()))
    }
}

/// Returns an [`Error`] of `kind` with a formatted message.
macro_rules! fail {
    ($kind:expr, $($arg:tt)*) => {
        return Err(Error::new($kind, format!($($arg)*)))
    };
}

/// How to install what the network needs, for error messages.
pub const INSTALL_HINT: &str = "the private Tor network needs Debian's `tor` package (tor and tor-gencert): apt-get install tor";

/// Shape of the network.
#[derive(Debug, Clone)]
pub struct TorNetOptions {
    /// Directory authorities.
    pub authorities: usize,
    /// Exit relays.
    pub relays: usize,
    /// Client tors with SOCKS and ControlPort.
    pub clients: usize,
    /// Seconds per voting round (15, 20, 25, ...).
    pub voting_secs: u32,
    /// Give up after this long.
    pub timeout: Duration,
}

impl Default for TorNetOptions {
    fn default() -> Self {
        Self {
            authorities: 3,
            relays: 4,
            clients: 2,
            voting_secs: 15,
            timeout: Duration::from_secs(240),
        }
    }
}

/// One client tor of the network.
#[derive(Debug, Clone)]
pub struct TorNetClient {
    /// SOCKS5 address.
    pub socks: SocketAddr,
    /// ControlPort address.
    pub control: SocketAddr,
    /// Its control cookie file.
    pub cookie: PathBuf,
    /// Its torrc.
    pub torrc: PathBuf,
}

/// A running private Tor network.
#[derive(Debug)]
pub struct TorNet {
    /// The network's directory.
    pub dir: PathBuf,
    /// arti configuration for the network.
    pub arti_toml: PathBuf,
    /// torrc lines (`DirAuthority ...`) for any extra tor.
    pub dirauthority_torrc: PathBuf,
    /// Client tors.
    pub clients: Vec<TorNetClient>,
    /// How long start-up took.
    pub ready_after: Duration,
    pids: Mutex<Vec<(i32, PathBuf)>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Authority,
    Relay,
    Client,
}

struct NodeSpec {
    nick: String,
    role: Role,
    dir: PathBuf,
    or_port: u16,
    dir_port: u16,
    control_port: u16,
    socks_port: u16,
}

/// Checks that `tor` and `tor-gencert` can be run.
pub fn tor_available() -> Result<()> {
    for bin in ["tor", "tor-gencert"] {
        let found = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|p| p.join(bin).is_file()))
            .unwrap_or(false)
            || Path::new("/usr/sbin").join(bin).is_file();
        if !found {
            fail!(ErrorKind::Missing, "`{bin}` not found: {INSTALL_HINT}");
        }
    }
    Ok(())
}

fn tor_bin(name: &str) -> PathBuf {
    let sbin = Path::new("/usr/sbin").join(name);
    let in_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    in_path.unwrap_or(sbin)
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Finds `count` consecutive free ports starting at a random base.
fn free_block(count: u16) -> Result<u16> {
    for _ in 0..50 {
        let seed = std::process::id() as u64
            ^ Instant::now().elapsed().as_nanos() as u64
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() as u64)
                .unwrap_or(0);
        let base = 20000 + (seed % 30000) as u16;
        if (base..base + count).all(port_free) {
            return Ok(base);
        }
    }
    fail!(
        ErrorKind::Io,
        "no block of {count} free loopback ports found"
    )
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context(ErrorKind::Missing, || {
            format!("running {what}: {INSTALL_HINT}")
        })?;
    if !out.status.success() {
        fail!(
            ErrorKind::Io,
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn first_word_after(path: &Path, prefix: &str) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .context(ErrorKind::Io, || format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .context(ErrorKind::Io, || {
            format!("no `{prefix}` in {}", path.display())
        })
}

/// The second word of a `<nickname> <fingerprint>` file.
fn second_word(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .context(ErrorKind::Io, || format!("reading {}", path.display()))?;
    text.split_whitespace()
        .nth(1)
        .map(str::to_string)
        .context(ErrorKind::Io, || {
            format!("no fingerprint in {}", path.display())
        })
}

impl TorNet {
    /// Builds and starts a network in `dir` (created; must not hold an
    /// earlier network) and waits until the clients are bootstrapped with
    /// every relay in their consensus.
    pub fn start(dir: &Path, options: &TorNetOptions) -> Result<TorNet> {
        tor_available()?;
        let voting = options.voting_secs;
        if !(24 * voting).is_multiple_of(60) || 24 * voting / 60 < 5 {
            fail!(
                ErrorKind::Options,
                "voting interval {voting}s: 24 * voting must be a multiple of 60 and >= 300 (use 15 or 20)"
            );
        }
        let hsdir_interval = 24 * voting / 60;
        let started = Instant::now();
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let n = options.authorities + options.relays + options.clients;
        let n16 = u16::try_from(n).context(ErrorKind::Options, || "too many nodes".into())?;
        let base = free_block(4 * n16)?;
        let mut nodes = Vec::new();
        for i in 0..n {
            let i16 = i as u16;
            let role = if i < options.authorities {
                Role::Authority
            } else if i < options.authorities + options.relays {
                Role::Relay
            } else {
                Role::Client
            };
            let nick = match role {
                Role::Authority => format!("auth{i}"),
                Role::Relay => format!("exit{i}"),
                Role::Client => format!("client{i}"),
            };
            let node_dir = dir.join("nodes").join(&nick);
            std::fs::create_dir_all(node_dir.join("keys"))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&node_dir, std::fs::Permissions::from_mode(0o700))?;
            nodes.push(NodeSpec {
                nick,
                role,
                dir: node_dir,
                or_port: base + i16,
                dir_port: base + n16 + i16,
                control_port: base + 2 * n16 + i16,
                socks_port: base + 3 * n16 + i16,
            });
        }

        // 1. keys, in parallel: authority v3 keys and relay identities
        let tor = tor_bin("tor");
        let gencert = tor_bin("tor-gencert");
        let mut jobs = Vec::new();
        for node in &nodes {
            if node.role == Role::Client {
                continue;
            }
            let (tor, gencert) = (tor.clone(), gencert.clone());
            let (d, role, dir_port) = (node.dir.clone(), node.role, node.dir_port);
            jobs.push(std::thread::spawn(move || -> Result<()> {
                if role == Role::Authority {
                    let mut child = Command::new(&gencert)
                        .args(["--create-identity-key", "--passphrase-fd", "0", "-i"])
                        .arg(d.join("keys/authority_identity_key"))
                        .arg("-s")
                        .arg(d.join("keys/authority_signing_key"))
                        .arg("-c")
                        .arg(d.join("keys/authority_certificate"))
                        .args(["-m", "12", "-a", &format!("127.0.0.1:{dir_port}")])
                        .stdin(Stdio::piped())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .context(ErrorKind::Missing, || {
                            format!("running tor-gencert: {INSTALL_HINT}")
                        })?;
                    if let Some(mut stdin) = child.stdin.take() {
                        stdin.write_all(b"localnet\n")?;
                    }
                    if !child.wait()?.success() {
                        fail!(ErrorKind::Io, "tor-gencert failed for {}", d.display());
                    }
                }
                run(
                    Command::new(&tor)
                        .args([
                            "--ignore-missing-torrc",
                            "-f",
                            "/nonexistent",
                            "--list-fingerprint",
                            "--orport",
                            "1",
                            "--datadirectory",
                        ])
                        .arg(&d),
                    "tor --list-fingerprint",
                )?;
                Ok(())
            }));
        }
        for job in jobs {
            job.join()
                .map_err(|_| Error::new(ErrorKind::Io, "key generation panicked"))??;
        }

        // 2. DirAuthority lines and the arti configuration
        let mut auth_lines = String::new();
        let mut fallbacks = String::new();
        let mut v3idents = String::new();
        let mut dir_addrs = String::new();
        for node in nodes.iter().filter(|n| n.role == Role::Authority) {
            let v3 =
                first_word_after(&node.dir.join("keys/authority_certificate"), "fingerprint ")?;
            let fp = second_word(&node.dir.join("fingerprint"))?;
            let ed = second_word(&node.dir.join("fingerprint-ed25519"))?;
            writeln!(
                auth_lines,
                "DirAuthority {} orport={} no-v2 v3ident={v3} 127.0.0.1:{} {fp}",
                node.nick, node.or_port, node.dir_port
            )?;
            writeln!(
                fallbacks,
                "  {{ rsa_identity = \"{fp}\", ed_identity = \"{ed}\", orports = [\"127.0.0.1:{}\"] }},",
                node.or_port
            )?;
            writeln!(v3idents, "  \"{v3}\",")?;
            write!(dir_addrs, "[\"127.0.0.1:{}\"], ", node.dir_port)?;
        }
        let dirauthority_torrc = dir.join("dirauthority.torrc");
        std::fs::write(&dirauthority_torrc, &auth_lines)?;
        let arti_toml = dir.join("arti.toml");
        std::fs::write(
            &arti_toml,
            format!(
                "# arti TorClientConfig for the private Tor network in {dir}\n\
                 # (storage is set by the node: <data dir>/tor/arti)\n\
                 [path_rules]\n\
                 # all relays share 127.0.0.1: no same-subnet path restrictions\n\
                 ipv4_subnet_family_prefix = 33\n\
                 ipv6_subnet_family_prefix = 129\n\n\
                 [address_filter]\n\
                 allow_local_addrs = true\n\n\
                 [override_net_params]\n\
                 # the onion-service time period C tor uses with TestingTorNetwork\n\
                 hsdir_interval = {hsdir_interval}\n\n\
                 [tor_network]\n\
                 fallback_caches = [\n{fallbacks}]\n\n\
                 [tor_network.authorities]\n\
                 v3idents = [\n{v3idents}]\n\
                 uploads = [ {dir_addrs}]\n\
                 downloads = [ {dir_addrs}]\n\
                 votes = [ {dir_addrs}]\n",
                dir = dir.display()
            ),
        )?;

        // 3. torrc files
        let owner = std::process::id();
        let half = (voting / 5).max(2);
        for node in &nodes {
            let d = node.dir.display();
            let mut rc = format!(
                "# {nick} - private test network\n\
                 TestingTorNetwork 1\n\
                 PathsNeededToBuildCircuits 0.67\n\
                 TestingDirAuthVoteExit *\n\
                 TestingDirAuthVoteHSDir *\n\
                 TestingDirAuthVoteGuard *\n\
                 TestingMinExitFlagThreshold 0\n\
                 V3AuthNIntervalsValid 2\n\
                 DataDirectory {d}\n\
                 PidFile {d}/pid\n\
                 RunAsDaemon 1\n\
                 Nickname {nick}\n\
                 ConnLimit 60\n\
                 ShutdownWaitLength 0\n\
                 ControlPort 127.0.0.1:{control}\n\
                 CookieAuthentication 1\n\
                 Log notice file {d}/notice.log\n\
                 SafeLogging 0\n\
                 LogTimeGranularity 1\n\
                 __OwningControllerProcess {owner}\n\
                 {auth_lines}",
                nick = node.nick,
                control = node.control_port,
            );
            match node.role {
                Role::Authority | Role::Relay => {
                    write!(
                        rc,
                        "SocksPort 0\n\
                         Address 127.0.0.1\n\
                         ORPort 127.0.0.1:{}\n\
                         DirPort 127.0.0.1:{}\n\
                         AssumeReachable 1\n\
                         ServerDNSDetectHijacking 0\n\
                         ServerDNSTestAddresses\n\
                         ServerDNSResolvConfFile /dev/null\n",
                        node.or_port, node.dir_port
                    )?;
                }
                Role::Client => writeln!(rc, "SocksPort 127.0.0.1:{}", node.socks_port)?,
            }
            match node.role {
                Role::Authority => write!(
                    rc,
                    "ExitRelay 0\n\
                     ExitPolicy reject *:*\n\
                     AuthoritativeDirectory 1\n\
                     V3AuthoritativeDirectory 1\n\
                     ContactInfo {nick}@localnet.test\n\
                     TestingV3AuthInitialVotingInterval {voting}\n\
                     TestingV3AuthInitialVoteDelay {half}\n\
                     TestingV3AuthInitialDistDelay {half}\n\
                     V3AuthVotingInterval {voting}\n\
                     V3AuthVoteDelay {half}\n\
                     V3AuthDistDelay {half}\n\
                     ConsensusParams hsdir_interval={hsdir_interval}\n\
                     AuthDirVoteStableGuaranteeMinUptime 0\n\
                     AuthDirVoteStableGuaranteeMTBF 0\n\
                     AuthDirFastGuarantee 1\n",
                    nick = node.nick
                )?,
                Role::Relay => rc.push_str(
                    "ExitRelay 1\n\
                     ExitPolicyRejectPrivate 0\n\
                     ExitPolicyRejectLocalInterfaces 0\n\
                     ExitPolicy accept 127.0.0.0/8:*\n\
                     ExitPolicy accept private:*\n\
                     ExitPolicy accept *:*\n",
                ),
                Role::Client => {}
            }
            std::fs::write(node.dir.join("torrc"), rc)?;
        }

        // 4. launch; RunAsDaemon returns once the daemon started
        let mut net = TorNet {
            dir: dir.clone(),
            arti_toml,
            dirauthority_torrc,
            clients: nodes
                .iter()
                .filter(|n| n.role == Role::Client)
                .map(|n| TorNetClient {
                    socks: SocketAddr::from(([127, 0, 0, 1], n.socks_port)),
                    control: SocketAddr::from(([127, 0, 0, 1], n.control_port)),
                    cookie: n.dir.join("control_auth_cookie"),
                    torrc: n.dir.join("torrc"),
                })
                .collect(),
            ready_after: Duration::ZERO,
            pids: Mutex::new(Vec::new()),
        };
        for node in &nodes {
            if let Err(e) = net.launch(&tor, &node.dir.join("torrc"), &node.nick) {
                net.stop();
                return Err(e);
            }
        }
        let pids = net.pid_list();
        std::fs::write(
            dir.join("pids"),
            pids.iter()
                .map(|(p, _)| format!("{p}\n"))
                .collect::<String>(),
        )?;
        start_watchdog(owner, &pids);

        // 5. wait: every client bootstrapped with all relays in consensus
        let deadline = started + options.timeout;
        let relays = options.authorities + options.relays;
        for client in &net.clients.clone() {
            let mut last = String::new();
            loop {
                match client_ready(client, relays, options.relays) {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => last = e.to_string(),
                }
                if Instant::now() > deadline {
                    let tails = net.log_tails();
                    net.stop();
                    fail!(
                        ErrorKind::NotReady,
                        "private Tor network not ready after {}s ({last}); logs:\n{tails}",
                        options.timeout.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        net.ready_after = started.elapsed();
        Ok(net)
    }

    fn log_tails(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.join("nodes")) {
            for entry in entries.flatten() {
                let log =
                    std::fs::read_to_string(entry.path().join("notice.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(4).collect();
                let _ = writeln!(out, "-- {}", entry.path().display());
                for line in tail.into_iter().rev() {
                    let _ = writeln!(out, "{line}");
                }
            }
        }
        out
    }

    /// Starts one tor (`RunAsDaemon`: returns once it runs) and records
    /// its PID.
    fn launch(&self, tor: &Path, torrc: &Path, nick: &str) -> Result<()> {
        let pid_file = torrc.with_file_name("pid");
        let _ = std::fs::remove_file(&pid_file);
        let launched = run(
            Command::new(tor).arg("-f").arg(torrc),
            &format!("tor {nick}"),
        );
        // tor removes its PidFile when it starts exiting; read it now
        let pid = (0..50).find_map(|_| {
            let pid = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            if pid.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            pid
        });
        if let Some(pid) = pid {
            self.pids_mut().push((pid, torrc.to_path_buf()));
        }
        launched.map(|_| ())
    }

    fn pids_mut(&self) -> std::sync::MutexGuard<'_, Vec<(i32, PathBuf)>> {
        match self.pids.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn pid_list(&self) -> Vec<(i32, PathBuf)> {
        self.pids_mut().clone()
    }

    /// Stops client `index`'s tor, as if it crashed or was restarted.
    pub fn stop_client(&self, index: usize) -> Result<()> {
        let torrc = &self
            .clients
            .get(index)
            .context(ErrorKind::Options, || format!("no client {index}"))?
            .torrc;
        let mut pids = self.pids_mut();
        let mine: Vec<_> = pids.iter().filter(|(_, t)| t == torrc).cloned().collect();
        pids.retain(|(_, t)| t != torrc);
        drop(pids);
        for (pid, torrc) in mine {
            stop_tor(pid, &torrc);
        }
        Ok(())
    }

    /// Starts client `index`'s tor again (same state and ports) and waits
    /// until it is bootstrapped.
    pub fn start_client(&self, index: usize) -> Result<()> {
        let client = self
            .clients
            .get(index)
            .context(ErrorKind::Options, || format!("no client {index}"))?;
        self.launch(&tor_bin("tor"), &client.torrc, &format!("client {index}"))?;
        // The network's watchdog only knows the first PIDs; give the new
        // tor its own, so it too stops with this process.
        let new: Vec<_> = self
            .pid_list()
            .into_iter()
            .filter(|(_, t)| *t == client.torrc)
            .collect();
        start_watchdog(std::process::id(), &new);
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let boot = control_query(client, &["GETINFO status/bootstrap-phase"]);
            if boot.as_deref().is_ok_and(|b| b.contains("PROGRESS=100")) {
                return Ok(());
            }
            if Instant::now() > until {
                fail!(
                    ErrorKind::NotReady,
                    "client {index} did not bootstrap again within 60 s"
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops every tor of the network (by PID, only if the process is
    /// still the tor started with our torrc).
    pub fn stop(&self) {
        let pids: Vec<_> = self.pids_mut().drain(..).collect();
        for (pid, torrc) in pids {
            stop_tor(pid, &torrc);
        }
    }
}

fn stop_tor(pid: i32, torrc: &Path) {
    if is_our_tor(pid, torrc) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        for _ in 0..50 {
            if !is_our_tor(pid, torrc) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if is_our_tor(pid, torrc) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

impl Drop for TorNet {
    fn drop(&mut self) {
        self.stop();
    }
}

fn is_our_tor(pid: i32, torrc: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let text = String::from_utf8_lossy(&c).replace('\0', " ");
            text.contains(&*torrc.to_string_lossy())
        })
        .unwrap_or(false)
}

/// A detached shell that stops the tors once `owner` has exited: tor's own
/// `__OwningControllerProcess` check can hang on its exit path, and a
/// killed test binary runs no destructors.
fn start_watchdog(owner: u32, pids: &[(i32, PathBuf)]) {
    let mut script = format!("while kill -0 {owner} 2>/dev/null; do sleep 2; done\n");
    for (pid, torrc) in pids {
        let _ = writeln!(
            script,
            "if tr '\\0' ' ' </proc/{pid}/cmdline 2>/dev/null | grep -qF -- '{}'; then kill -TERM {pid}; fi",
            torrc.display()
        );
    }
    script.push_str("sleep 3\n");
    for (pid, torrc) in pids {
        let _ = writeln!(
            script,
            "if tr '\\0' ' ' </proc/{pid}/cmdline 2>/dev/null | grep -qF -- '{}'; then kill -KILL {pid}; fi",
            torrc.display()
        );
    }
    let _ = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

/// Whether `client` is bootstrapped and sees `relays` relays (`exits` of
/// them exits) in its consensus.
fn client_ready(client: &TorNetClient, relays: usize, exits: usize) -> Result<bool> {
    let replies = control_query(
        client,
        &["GETINFO status/bootstrap-phase", "GETINFO ns/all"],
    )?;
    let boot_done = replies.contains("PROGRESS=100");
    let n_relays = replies.lines().filter(|l| l.starts_with("r ")).count();
    let n_exits = replies
        .lines()
        .filter(|l| l.starts_with("s ") && l.contains(" Exit"))
        .count();
    if !boot_done || n_relays < relays || n_exits < exits {
        fail!(
            ErrorKind::NotReady,
            "bootstrap done: {boot_done}, relays {n_relays}/{relays}, exits {n_exits}/{exits}"
        );
    }
    Ok(true)
}

/// Sends `commands` on the client's ControlPort (cookie auth) and returns
/// the raw replies.
pub fn control_query(client: &TorNetClient, commands: &[&str]) -> Result<String> {
    let cookie =
        std::fs::read(&client.cookie).context(ErrorKind::Io, || "reading control cookie".into())?;
    let mut stream = TcpStream::connect_timeout(&client.control, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut text = format!("AUTHENTICATE {}\r\n", hex::encode(&cookie));
    for c in commands {
        text.push_str(c);
        text.push_str("\r\n");
    }
    text.push_str("QUIT\r\n");
    stream.write_all(text.as_bytes())?;
    let mut out = String::new();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap_or(0) > 0 {
        out.push_str(line.trim_end_matches(['\r', '\n']));
        out.push('\n');
        line.clear();
    }
    Ok(out)
}
