//! The README's "Quick start for operators" and "Joining a validator set"
//! sections, run as written.
//!
//! The shell blocks are read from README.md at test time, so a README
//! change that no longer works fails here. Each command runs in `bash`
//! with only these substitutions, which stand for "your machine":
//!
//! - `openagi` is the binary under test (first on `PATH`);
//! - `/var/lib/openagi` is a temporary directory, and the relative data
//!   directories (`A`, `B`, ...) live in a temporary working directory;
//! - `<key X>`, `<peer id of X>` come from what the block's own
//!   `openagi keys show --data-dir X` printed, and `<IP of X>/tcp/PORT`
//!   is X's loopback address and port: all daemons share one machine, so
//!   each listens on an ephemeral loopback port
//!   (`OPENAGI_NETWORK_LISTEN`, `OPENAGI_API_LISTEN`) and the network is
//!   `OPENAGI_NETWORK_TRANSPORT=direct` (no Tor network in a test);
//! - `$EDITOR` is `true`, and `cargo build` lines are skipped (the test
//!   runs the binary cargo built for it).
//!
//! A line whose comment says "each operator" runs once per operator
//! (the letters of the `<key X>` placeholders), and "each of B, C and D"
//! once for each letter named, with `--data-dir X` changed accordingly.
//! `openagi run` lines start in the background; the test goes on once
//! the daemon's API answers, as an operator would, and stops every
//! daemon with SIGTERM at the end, expecting exit status 0.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The shell commands of the README section under `heading`: every ```sh
/// block up to the next heading, continuation lines joined, comment-only
/// and blank lines left out.
fn section_commands(readme: &str, heading: &str) -> Vec<String> {
    let mut lines = readme.lines().skip_while(|l| l.trim() != heading);
    assert!(
        lines.next().is_some(),
        "README.md has no section {heading:?}"
    );
    let mut commands = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in lines {
        if !in_block && line.starts_with('#') {
            break;
        }
        if line.trim_start().starts_with("```") {
            in_block = !in_block && line.trim() == "```sh";
            continue;
        }
        if !in_block {
            continue;
        }
        if let Some(start) = line.strip_suffix('\\') {
            pending.push_str(start);
            continue;
        }
        pending.push_str(line);
        let command = std::mem::take(&mut pending);
        let trimmed = command.trim();
        if !trimmed.is_empty() && !trimmed.starts_with('#') {
            commands.push(trimmed.to_string());
        }
    }
    assert!(
        !commands.is_empty(),
        "README.md section {heading:?} has no sh block"
    );
    commands
}

/// The data directory a command names, if any.
fn data_dir_of(command: &str) -> Option<String> {
    let mut words = command.split_whitespace();
    while let Some(word) = words.next() {
        if word == "--data-dir" {
            return words.next().map(str::to_string);
        }
    }
    None
}

/// The comment at the end of a command (after ` #`), or "".
fn comment_of(command: &str) -> &str {
    command.find(" #").map_or("", |i| &command[i + 2..])
}

/// The operators a command runs for: its own data directory, every
/// operator for "each operator", or the letters after "each of".
fn operators_of(command: &str, all: &[String]) -> Vec<Option<String>> {
    let comment = comment_of(command);
    if comment.contains("each operator") {
        return all.iter().cloned().map(Some).collect();
    }
    if let Some(rest) = comment.split("each of ").nth(1) {
        let named: Vec<Option<String>> = rest
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| all.iter().any(|a| a == w))
            .map(|w| Some(w.to_string()))
            .collect();
        assert!(!named.is_empty(), "no operator named in {command:?}");
        return named;
    }
    vec![None]
}

/// `command` with `--data-dir` replaced for `operator`.
fn for_operator(command: &str, operator: &Option<String>) -> String {
    match (operator, data_dir_of(command)) {
        (Some(op), Some(dir)) => {
            command.replacen(&format!("--data-dir {dir}"), &format!("--data-dir {op}"), 1)
        }
        _ => command.to_string(),
    }
}

/// What an operator's node is known by, from its own commands' output.
#[derive(Default, Debug)]
struct Known {
    public_key: Option<String>,
    peer_id: Option<String>,
    port: Option<u16>,
}

struct Runner {
    work: PathBuf,
    bin_dir: PathBuf,
    var_lib: PathBuf,
    known: BTreeMap<String, Known>,
    daemons: Vec<(String, Child)>,
    transcript: String,
}

impl Runner {
    fn new(root: &Path) -> Runner {
        let work = root.join("work");
        let bin_dir = root.join("bin");
        let var_lib = root.join("var-lib-openagi");
        std::fs::create_dir_all(&work).expect("work dir");
        std::fs::create_dir_all(&bin_dir).expect("bin dir");
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_openagi"), bin_dir.join("openagi"))
            .expect("link the binary");
        Runner {
            work,
            bin_dir,
            var_lib,
            known: BTreeMap::new(),
            daemons: Vec::new(),
            transcript: String::new(),
        }
    }

    /// `command` with the placeholders of the module comment filled in.
    fn substitute(&self, command: &str) -> String {
        let mut text = command.replace(
            "/var/lib/openagi",
            self.var_lib.to_str().expect("utf-8 path"),
        );
        for (op, known) in &self.known {
            if let Some(key) = &known.public_key {
                text = text.replace(&format!("<key {op}>"), key);
            }
            if let Some(peer) = &known.peer_id {
                text = text.replace(&format!("<peer id of {op}>"), peer);
            }
            let ip = format!("<IP of {op}>/tcp/");
            while let Some(at) = text.find(&ip) {
                let port_start = at + ip.len();
                let port_end = text[port_start..]
                    .find(|c: char| !c.is_ascii_digit())
                    .map_or(text.len(), |i| port_start + i);
                let port = known
                    .port
                    .unwrap_or_else(|| panic!("{op} is not listening yet: {command}"));
                text.replace_range(at..port_end, &format!("127.0.0.1/tcp/{port}"));
            }
        }
        assert!(
            !text.contains("<key ") && !text.contains("<peer id") && !text.contains("<IP of"),
            "a placeholder is left in {text:?} (known: {:?})",
            self.known
        );
        text
    }

    fn command(&self, text: &str) -> Command {
        let mut command = Command::new("bash");
        command
            .arg("-c")
            .arg(text)
            .current_dir(&self.work)
            .stdin(Stdio::null());
        for (name, _) in std::env::vars() {
            if name.starts_with("OPENAGI_") {
                command.env_remove(name);
            }
        }
        let path = std::env::var("PATH").unwrap_or_default();
        command
            .env("PATH", format!("{}:{path}", self.bin_dir.display()))
            .env("EDITOR", "true")
            .env("OPENAGI_NETWORK_TRANSPORT", "direct")
            .env("OPENAGI_NETWORK_LISTEN", "/ip4/127.0.0.1/tcp/0")
            .env("OPENAGI_API_LISTEN", "127.0.0.1:0");
        command
    }

    fn data_path(&self, dir: &str) -> PathBuf {
        let dir = dir.replace(
            "/var/lib/openagi",
            self.var_lib.to_str().expect("utf-8 path"),
        );
        self.work.join(dir)
    }

    /// Runs every command of a README section.
    fn run_section(&mut self, commands: &[String]) {
        let operators: Vec<String> = {
            let mut found: Vec<String> = commands
                .iter()
                .flat_map(|c| c.split("<key ").skip(1))
                .filter_map(|rest| rest.split('>').next())
                .map(str::to_string)
                .collect();
            found.dedup();
            found
        };
        for line in commands {
            if line.starts_with("cargo build") {
                continue;
            }
            for operator in operators_of(line, &operators) {
                let command = self.substitute(&for_operator(line, &operator));
                if command.starts_with("openagi run ") {
                    self.start_daemon(&command);
                } else {
                    self.run_once(&command);
                }
            }
        }
    }

    fn run_once(&mut self, command: &str) {
        let output = self.command(command).output().expect("bash runs");
        let out = String::from_utf8_lossy(&output.stdout).into_owned();
        let err = String::from_utf8_lossy(&output.stderr).into_owned();
        self.transcript
            .push_str(&format!("$ {command}\n{out}{err}"));
        assert!(
            output.status.success(),
            "README command failed ({}): {command}\n{out}{err}\n--- transcript ---\n{}\n{}",
            output.status,
            self.transcript,
            self.daemon_logs()
        );
        if command.starts_with("openagi keys show")
            && let Some(dir) = data_dir_of(command)
        {
            let known = self.known.entry(dir).or_default();
            known.public_key = out
                .split_whitespace()
                .find(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
                .map(str::to_string);
            known.peer_id = out
                .split_whitespace()
                .find(|w| w.starts_with("12D3KooW"))
                .map(str::to_string);
        }
    }

    fn start_daemon(&mut self, command: &str) {
        let dir = data_dir_of(command).expect("`openagi run` names its --data-dir");
        let path = self.data_path(&dir);
        let _ = std::fs::remove_file(path.join("api.addr"));
        let log = std::fs::File::create(path.join("readme-test.log")).expect("log file");
        // `exec`, so that the SIGTERM at the end reaches the daemon itself.
        let child = self
            .command(&format!("exec {command}"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("bash starts");
        self.transcript
            .push_str(&format!("$ {command}\n(started in the background)\n"));
        self.daemons.push((dir.clone(), child));
        let until = Instant::now() + Duration::from_secs(30);
        let status = loop {
            let exited = self
                .daemons
                .last_mut()
                .and_then(|(_, c)| c.try_wait().ok().flatten());
            assert!(
                exited.is_none(),
                "`{command}` exited during start-up ({exited:?})\n{}",
                self.daemon_logs()
            );
            if path.join("api.addr").exists() {
                let output = self
                    .command(&format!("openagi status --json --data-dir {dir}"))
                    .output()
                    .expect("status runs");
                if output.status.success()
                    && let Ok(status) = serde_json::from_slice::<serde_json::Value>(&output.stdout)
                {
                    break status;
                }
            }
            assert!(
                Instant::now() < until,
                "`{command}` did not answer within 30 s\n{}",
                self.daemon_logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let port = status["network"]["listen_addrs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            .find_map(|a| a.strip_prefix("/ip4/127.0.0.1/tcp/"))
            .and_then(|p| p.split('/').next()?.parse().ok());
        self.known.entry(dir).or_default().port = port;
    }

    fn daemon_logs(&self) -> String {
        self.daemons
            .iter()
            .map(|(dir, _)| {
                let log = std::fs::read_to_string(self.data_path(dir).join("readme-test.log"))
                    .unwrap_or_default();
                format!("--- daemon {dir} ---\n{log}")
            })
            .collect()
    }

    /// Stops every daemon with SIGTERM and checks each exits with 0.
    fn stop(&mut self) {
        for (_, child) in &self.daemons {
            let pid = i32::try_from(child.id()).expect("pid");
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let logs = self.daemon_logs();
        for (dir, child) in &mut self.daemons {
            let until = Instant::now() + Duration::from_secs(20);
            let status = loop {
                if let Some(status) = child.try_wait().expect("wait") {
                    break status;
                }
                assert!(
                    Instant::now() < until,
                    "daemon {dir} did not stop within 20 s of SIGTERM\n{logs}"
                );
                std::thread::sleep(Duration::from_millis(100));
            };
            assert!(
                status.success(),
                "daemon {dir} exited with {status} after SIGTERM\n{logs}"
            );
        }
        self.daemons.clear();
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        // A failed test leaves no daemon behind.
        for (_, child) in &mut self.daemons {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
        .expect("README.md")
}

#[test]
fn the_quick_start_works_as_written() {
    let commands = section_commands(&readme(), "## Quick start for operators");
    assert!(
        commands.iter().any(|c| c.contains("--transport")),
        "the quick start names its transport: {commands:?}"
    );
    let root = tempfile::tempdir().expect("tempdir");
    let mut runner = Runner::new(root.path());
    runner.run_section(&commands);
    assert!(
        !runner.daemons.is_empty(),
        "the quick start starts a daemon: {commands:?}"
    );
    runner.stop();
}

#[test]
fn joining_a_validator_set_works_as_written() {
    let commands = section_commands(&readme(), "### Joining a validator set");
    let root = tempfile::tempdir().expect("tempdir");
    let mut runner = Runner::new(root.path());
    runner.run_section(&commands);
    assert!(
        runner.daemons.len() >= 4,
        "the section starts every validator: {commands:?}"
    );
    assert!(
        runner.transcript.contains("committed"),
        "the submitted transaction was committed:\n{}",
        runner.transcript
    );
    runner.stop();
}

#[test]
fn readme_blocks_are_read_as_commands() {
    let text = "## A\n\n```sh\nopenagi one   # each operator\nopenagi two \\\n    --x y\n# a note\n```\n\n## B\n```sh\nopenagi three\n```\n";
    assert_eq!(
        section_commands(text, "## A"),
        ["openagi one   # each operator", "openagi two     --x y"]
    );
    let all = vec!["A".to_string(), "B".to_string(), "C".to_string()];
    assert_eq!(
        operators_of("openagi x --data-dir A # each operator", &all).len(),
        3
    );
    assert_eq!(
        operators_of("openagi x --data-dir B # each of B and C", &all),
        [Some("B".to_string()), Some("C".to_string())]
    );
    assert_eq!(
        for_operator("openagi x --data-dir A # y", &Some("C".into())),
        "openagi x --data-dir C # y"
    );
}
