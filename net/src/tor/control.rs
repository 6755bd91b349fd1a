//! A minimal tor ControlPort client (control-spec.txt): authentication
//! (SAFECOOKIE, COOKIE, HASHEDPASSWORD, NULL), `ADD_ONION`, `GETINFO`,
//! and asynchronous events (`SETEVENTS`).
//!
//! Replies are read line by line with a length bound, so a misbehaving
//! peer on the control address cannot make the node buffer without limit.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hmac::{KeyInit, Mac};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::TorError;

/// Longest reply line accepted.
const MAX_LINE: usize = 64 * 1024;
/// Most lines in one reply.
const MAX_LINES: usize = 4096;
/// Asynchronous events kept until read; older ones are dropped.
const MAX_EVENTS: usize = 64;

const SERVER_KEY: &[u8] = b"Tor safe cookie authentication server-to-controller hash";
const CLIENT_KEY: &[u8] = b"Tor safe cookie authentication controller-to-server hash";

/// One reply: status code and lines (without the `250-` prefixes).
#[derive(Debug)]
pub(crate) struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    fn ok(&self) -> bool {
        self.code == 250
    }

    fn error(&self, what: &str) -> TorError {
        TorError::Control(format!("{what}: {} {}", self.code, self.lines.join(" / ")))
    }
}

/// An authenticated control connection.
pub(crate) struct Control {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// Asynchronous events (`650` replies) read while waiting for a reply.
    events: std::collections::VecDeque<String>,
    /// A line read in part when a wait for an event timed out; the next
    /// read continues it, so the reply stream never loses its place.
    partial: Vec<u8>,
}

impl Control {
    /// Connects to `addr` and authenticates with the best method tor offers.
    pub(crate) async fn connect(
        addr: SocketAddr,
        password: Option<&str>,
        cookie_override: Option<&Path>,
    ) -> Result<Self, TorError> {
        let stream = TcpStream::connect(addr).await.map_err(|e| {
            TorError::Unavailable(format!(
                "cannot connect to tor's ControlPort at {addr}: {e}"
            ))
        })?;
        let (r, w) = stream.into_split();
        let mut c = Self {
            reader: BufReader::new(r),
            writer: w,
            events: std::collections::VecDeque::new(),
            partial: Vec::new(),
        };
        c.authenticate(password, cookie_override).await?;
        Ok(c)
    }

    async fn authenticate(
        &mut self,
        password: Option<&str>,
        cookie_override: Option<&Path>,
    ) -> Result<(), TorError> {
        let info = self.command("PROTOCOLINFO 1").await?;
        if !info.ok() {
            return Err(info.error("PROTOCOLINFO"));
        }
        let (methods, cookie_file) = parse_protocolinfo(&info.lines);
        let has = |m: &str| methods.iter().any(|x| x == m);
        let cookie_path = cookie_override.map(Path::to_path_buf).or(cookie_file);
        // A password the operator configured wins when tor accepts one;
        // otherwise the cookie (SAFECOOKIE first: it also proves tor read
        // the same cookie), and NULL only when tor asks for nothing.
        let reply = if let (Some(pw), true) = (password, has("HASHEDPASSWORD")) {
            self.command(&format!("AUTHENTICATE {}", quote(pw))).await?
        } else if has("SAFECOOKIE") || has("COOKIE") {
            let path = cookie_path.ok_or_else(|| {
                TorError::Control(
                    "tor offers cookie authentication but names no cookie file; set tor.control_cookie_file"
                        .into(),
                )
            })?;
            let cookie = read_cookie(&path)?;
            if has("SAFECOOKIE") {
                self.safecookie(&cookie).await?
            } else {
                self.command(&format!("AUTHENTICATE {}", hex::encode(&cookie)))
                    .await?
            }
        } else if has("HASHEDPASSWORD") {
            return Err(TorError::Control(
                "tor's ControlPort wants a password (HashedControlPassword); set tor.control_password"
                    .into(),
            ));
        } else if has("NULL") {
            self.command("AUTHENTICATE").await?
        } else {
            return Err(TorError::Control(format!(
                "no supported authentication method offered (tor offers {methods:?})"
            )));
        };
        if reply.ok() {
            Ok(())
        } else {
            Err(reply.error("authentication refused"))
        }
    }

    async fn safecookie(&mut self, cookie: &[u8]) -> Result<Reply, TorError> {
        let mut client_nonce = [0u8; 32];
        getrandom::fill(&mut client_nonce)
            .map_err(|e| TorError::Io(std::io::Error::other(e.to_string())))?;
        let reply = self
            .command(&format!(
                "AUTHCHALLENGE SAFECOOKIE {}",
                hex::encode(client_nonce)
            ))
            .await?;
        if !reply.ok() {
            return Err(reply.error("AUTHCHALLENGE"));
        }
        let line = reply.lines.first().cloned().unwrap_or_default();
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name))
                .and_then(|v| hex::decode(v).ok())
        };
        let (Some(server_hash), Some(server_nonce)) = (field("SERVERHASH="), field("SERVERNONCE="))
        else {
            return Err(TorError::Control(format!(
                "malformed AUTHCHALLENGE reply: {line}"
            )));
        };
        let mut msg = Vec::with_capacity(cookie.len() + 64);
        msg.extend_from_slice(cookie);
        msg.extend_from_slice(&client_nonce);
        msg.extend_from_slice(&server_nonce);
        // Checking tor's hash first proves it read the same cookie, so we do
        // not hand our proof to something impersonating the ControlPort.
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SERVER_KEY)
            .map_err(|_| TorError::Control("hmac key".into()))?;
        mac.update(&msg);
        mac.verify_slice(&server_hash).map_err(|_| {
            TorError::Control(
                "tor's SAFECOOKIE server hash does not match the cookie: wrong cookie file?".into(),
            )
        })?;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(CLIENT_KEY)
            .map_err(|_| TorError::Control("hmac key".into()))?;
        mac.update(&msg);
        let proof = mac.finalize().into_bytes();
        self.command(&format!("AUTHENTICATE {}", hex::encode(proof)))
            .await
    }

    /// Sends one command line and reads its reply.
    pub(crate) async fn command(&mut self, line: &str) -> Result<Reply, TorError> {
        self.writer.write_all(line.as_bytes()).await?;
        self.writer.write_all(b"\r\n").await?;
        self.writer.flush().await?;
        self.read_reply().await
    }

    /// Reads the reply to the last command; asynchronous events that
    /// arrive first are kept for [`Self::wait_event`].
    pub(crate) async fn read_reply(&mut self) -> Result<Reply, TorError> {
        loop {
            let reply = self.read_any_reply().await?;
            if reply.code != 650 {
                return Ok(reply);
            }
            self.keep_event(reply);
        }
    }

    fn keep_event(&mut self, reply: Reply) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(reply.lines.join(" "));
    }

    /// Waits up to `limit` for an asynchronous event (its text after
    /// `650 `) that `wanted` accepts and returns it; `Ok(None)` when none
    /// came in time.
    /// Only call it with no command outstanding. Lines are never lost to
    /// the timeout, but a multi-line event cut by it would be: subscribe
    /// only to single-line events (such as `HS_DESC`).
    pub(crate) async fn wait_event(
        &mut self,
        wanted: impl Fn(&str) -> bool,
        limit: std::time::Duration,
    ) -> Result<Option<String>, TorError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(at) = self.events.iter().position(|e| wanted(e)) {
                let event = self.events.drain(..=at).next_back();
                return Ok(event);
            }
            self.events.clear();
            let reply = match tokio::time::timeout_at(deadline, self.read_any_reply()).await {
                Ok(reply) => reply?,
                Err(_) => return Ok(None),
            };
            if reply.code != 650 {
                return Err(reply.error("unexpected reply while waiting for an event"));
            }
            self.keep_event(reply);
        }
    }

    /// `SETEVENTS` with `events` (space separated; empty: none).
    pub(crate) async fn set_events(&mut self, events: &str) -> Result<(), TorError> {
        let reply = self
            .command(format!("SETEVENTS {events}").trim_end())
            .await?;
        if !reply.ok() {
            return Err(reply.error("SETEVENTS"));
        }
        Ok(())
    }

    /// Reads one reply (possibly multi-line) from tor.
    async fn read_any_reply(&mut self) -> Result<Reply, TorError> {
        let mut lines = Vec::new();
        loop {
            let line = self.read_line().await?;
            if line.len() < 4 {
                return Err(TorError::Control(format!("malformed reply line {line:?}")));
            }
            let code: u16 = line[..3]
                .parse()
                .map_err(|_| TorError::Control(format!("malformed reply line {line:?}")))?;
            let sep = line.as_bytes()[3];
            lines.push(line[4..].to_string());
            if lines.len() > MAX_LINES {
                return Err(TorError::Control("reply too long".into()));
            }
            match sep {
                b' ' => return Ok(Reply { code, lines }),
                b'-' => {}
                b'+' => loop {
                    // Data block, ends with a lone ".".
                    let data = self.read_line().await?;
                    if data == "." {
                        break;
                    }
                    lines.push(data);
                    if lines.len() > MAX_LINES {
                        return Err(TorError::Control("reply too long".into()));
                    }
                },
                _ => return Err(TorError::Control(format!("malformed reply line {line:?}"))),
            }
        }
    }

    /// Reads one line. Cancel safe: bytes read before a cancellation stay
    /// in `partial` and the next call completes the line.
    async fn read_line(&mut self) -> Result<String, TorError> {
        let room = MAX_LINE.saturating_sub(self.partial.len()) as u64;
        let n = (&mut self.reader)
            .take(room)
            .read_until(b'\n', &mut self.partial)
            .await?;
        let mut buf = std::mem::take(&mut self.partial);
        if n == 0 && buf.last() != Some(&b'\n') {
            return Err(TorError::Unavailable(
                "tor closed the control connection".into(),
            ));
        }
        if buf.last() != Some(&b'\n') {
            return Err(TorError::Control("reply line too long".into()));
        }
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        String::from_utf8(buf).map_err(|_| TorError::Control("reply is not UTF-8".into()))
    }

    /// `GETINFO key` → the value.
    pub(crate) async fn getinfo(&mut self, key: &str) -> Result<String, TorError> {
        let reply = self.command(&format!("GETINFO {key}")).await?;
        if !reply.ok() {
            return Err(reply.error("GETINFO"));
        }
        let prefix = format!("{key}=");
        Ok(reply
            .lines
            .iter()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
            .unwrap_or_default())
    }

    /// Creates the onion service `key` (the ADD_ONION key argument),
    /// forwarding virtual port `port` to `target`. Returns the service id.
    /// The service lives as long as this control connection.
    pub(crate) async fn add_onion(
        &mut self,
        key: &str,
        port: u16,
        target: SocketAddr,
    ) -> Result<String, TorError> {
        let reply = self
            .command(&format!(
                "ADD_ONION {key} Flags=DiscardPK Port={port},{target}"
            ))
            .await?;
        if !reply.ok() {
            return Err(reply.error("ADD_ONION"));
        }
        reply
            .lines
            .iter()
            .find_map(|l| l.strip_prefix("ServiceID=").map(str::to_string))
            .ok_or_else(|| TorError::Control("ADD_ONION reply has no ServiceID".into()))
    }
}

/// Bootstrap progress from a `status/bootstrap-phase` value:
/// `NOTICE BOOTSTRAP PROGRESS=100 TAG=done SUMMARY="Done"`.
pub(crate) fn parse_bootstrap(value: &str) -> (u8, String) {
    let progress = value
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("PROGRESS="))
        .and_then(|v| v.parse::<u8>().ok())
        .unwrap_or(0)
        .min(100);
    let summary = value
        .split_once("SUMMARY=\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(s, _)| s.to_string())
        .unwrap_or_default();
    (progress, summary)
}

fn parse_protocolinfo(lines: &[String]) -> (Vec<String>, Option<PathBuf>) {
    let mut methods = Vec::new();
    let mut cookie = None;
    for line in lines {
        let Some(rest) = line.strip_prefix("AUTH ") else {
            continue;
        };
        if let Some(m) = rest
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("METHODS="))
        {
            methods = m.split(',').map(str::to_string).collect();
        }
        if let Some((_, after)) = rest.split_once("COOKIEFILE=\"")
            && let Some(path) = unquote_until_quote(after)
        {
            cookie = Some(PathBuf::from(path));
        }
    }
    (methods, cookie)
}

/// Reads a control-spec quoted string body up to its closing quote.
fn unquote_until_quote(s: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => out.push(chars.next()?),
            c => out.push(c),
        }
    }
    None
}

fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Reads the 32-byte auth cookie, with an error that says what to do.
fn read_cookie(path: &Path) -> Result<Vec<u8>, TorError> {
    let bytes = std::fs::read(path).map_err(|e| {
        TorError::Control(format!(
            "cannot read tor's control cookie {}: {e}. Run the node as a user in tor's group (Debian: `adduser <user> debian-tor`, with CookieAuthFileGroupReadable 1 in torrc), or set tor.control_cookie_file / tor.control_password",
            path.display()
        ))
    })?;
    if bytes.len() != 32 {
        return Err(TorError::Control(format!(
            "tor's control cookie {} has {} bytes, expected 32",
            path.display(),
            bytes.len()
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::Notify;

    use super::*;

    #[test]
    fn protocolinfo_and_bootstrap_parse() {
        let lines = vec![
            "PROTOCOLINFO 1".to_string(),
            r#"AUTH METHODS=COOKIE,SAFECOOKIE COOKIEFILE="/var/run/tor/control.auth\"cookie""#
                .to_string(),
            "VERSION Tor=\"0.4.9.11\"".to_string(),
            "OK".to_string(),
        ];
        let (m, c) = parse_protocolinfo(&lines);
        assert_eq!(m, vec!["COOKIE", "SAFECOOKIE"]);
        assert_eq!(c, Some(PathBuf::from("/var/run/tor/control.auth\"cookie")));
        let (p, s) = parse_bootstrap(
            r#"NOTICE BOOTSTRAP PROGRESS=85 TAG=ap_conn_done SUMMARY="Connected to a relay to build circuits""#,
        );
        assert_eq!(p, 85);
        assert_eq!(s, "Connected to a relay to build circuits");
        assert_eq!(quote("a\"b\\"), "\"a\\\"b\\\\\"");
    }

    #[test]
    fn unreadable_cookie_says_how_to_fix() {
        let e = read_cookie(Path::new("/nonexistent/control_auth_cookie")).expect_err("missing");
        let text = e.to_string();
        assert!(
            text.contains("/nonexistent/control_auth_cookie") && text.contains("debian-tor"),
            "{text}"
        );
    }

    /// A fake ControlPort: offers `auth_line` in PROTOCOLINFO, accepts
    /// AUTHENTICATE only as `expected_auth`, and records what it was sent.
    async fn fake_tor(
        auth_line: String,
        expected_auth: String,
    ) -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
        let release = Arc::new(Notify::new());
        release.notify_one();
        fake_tor_holding(auth_line, expected_auth, release).await
    }

    /// Like [`fake_tor`], but after `SETEVENTS HS_DESC` it sends only the
    /// first half of our descriptor event and holds the rest back until
    /// `release` is notified.
    async fn fake_tor_holding(
        auth_line: String,
        expected_auth: String,
        release: Arc<Notify>,
    ) -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let fake = tokio::spawn(async move {
            let (s, _) = listener.accept().await.expect("accept");
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r).lines();
            let mut seen = Vec::new();
            while let Ok(Some(line)) = r.next_line().await {
                let reply = if line.starts_with("PROTOCOLINFO") {
                    format!(
                        "250-PROTOCOLINFO 1\r\n250-{auth_line}\r\n250-VERSION Tor=\"0.4.9\"\r\n250 OK\r\n"
                    )
                } else if line.starts_with("AUTHENTICATE") {
                    if line == expected_auth {
                        "250 OK\r\n".to_string()
                    } else {
                        "515 Authentication failed\r\n".to_string()
                    }
                } else if line.starts_with("ADD_ONION") {
                    "250-ServiceID=abc\r\n250 OK\r\n".to_string()
                } else if line == "SETEVENTS HS_DESC" {
                    // Another service's upload, then ours split across
                    // two writes, the second once released.
                    w.write_all(
                        b"250 OK\r\n650 HS_DESC UPLOADED other NO_AUTH x\r\n650 HS_DESC UPLO",
                    )
                    .await
                    .expect("write");
                    release.notified().await;
                    "ADED abc NO_AUTH x\r\n".to_string()
                } else if line == "SETEVENTS" {
                    "250 OK\r\n".to_string()
                } else {
                    "510 Unrecognized command\r\n".to_string()
                };
                seen.push(line);
                w.write_all(reply.as_bytes()).await.expect("write");
            }
            seen
        });
        (addr, fake)
    }

    /// The rest of the line is held back until the first wait has timed
    /// out, so the outcome does not depend on how fast either side runs.
    #[tokio::test]
    async fn an_event_wait_that_times_out_mid_line_keeps_the_stream_in_step() {
        let release = Arc::new(Notify::new());
        let (addr, fake) = fake_tor_holding(
            "AUTH METHODS=NULL".into(),
            "AUTHENTICATE".into(),
            release.clone(),
        )
        .await;
        let mut c = Control::connect(addr, None, None).await.expect("auth");
        c.set_events("HS_DESC").await.expect("subscribe");
        let ours = |e: &str| e == "HS_DESC UPLOADED abc NO_AUTH x";
        let early = c
            .wait_event(ours, std::time::Duration::from_millis(100))
            .await
            .expect("waits");
        assert_eq!(early, None, "our line is not complete yet");
        release.notify_one();
        // Returns as soon as the line is complete; the limit only guards
        // against a hang.
        let late = c
            .wait_event(ours, std::time::Duration::from_secs(60))
            .await
            .expect("the half-read line is completed, not misparsed");
        assert_eq!(late.as_deref(), Some("HS_DESC UPLOADED abc NO_AUTH x"));
        c.set_events("").await.expect("unsubscribe");
        // Still in step: the next reply is the answer to the next command
        // (the fake refuses GETINFO with 510; a misparsed line would not).
        let refused = c.getinfo("version").await.expect_err("refused");
        assert!(refused.to_string().contains("510"), "{refused}");
        drop(c);
        fake.await.expect("fake");
    }

    #[tokio::test]
    async fn authenticates_with_null_and_adds_onion_against_a_fake_tor() {
        let (addr, fake) = fake_tor("AUTH METHODS=NULL".into(), "AUTHENTICATE".into()).await;
        let mut c = Control::connect(addr, None, None).await.expect("auth");
        let id = c
            .add_onion("ED25519-V3:x", 4610, "127.0.0.1:1".parse().expect("addr"))
            .await
            .expect("add");
        assert_eq!(id, "abc");
        assert!(c.getinfo("version").await.is_err());
        drop(c);
        let seen = fake.await.expect("fake");
        assert_eq!(seen[1], "AUTHENTICATE");
        assert!(seen[2].contains("Port=4610,127.0.0.1:1"), "{seen:?}");
    }

    #[tokio::test]
    async fn authenticates_with_cookie_and_password() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cookie = dir.path().join("control_auth_cookie");
        std::fs::write(&cookie, [0xabu8; 32]).expect("cookie");
        let (addr, fake) = fake_tor(
            format!("AUTH METHODS=COOKIE COOKIEFILE=\"{}\"", cookie.display()),
            format!("AUTHENTICATE {}", hex::encode([0xabu8; 32])),
        )
        .await;
        Control::connect(addr, None, None)
            .await
            .expect("cookie auth");
        drop(fake);

        let (addr, _fake) = fake_tor(
            "AUTH METHODS=HASHEDPASSWORD,COOKIE COOKIEFILE=\"/nonexistent\"".into(),
            "AUTHENTICATE \"s\\\"ecret\"".into(),
        )
        .await;
        Control::connect(addr, Some("s\"ecret"), None)
            .await
            .expect("password auth");

        let (addr, _fake) = fake_tor("AUTH METHODS=HASHEDPASSWORD".into(), String::new()).await;
        let e = Control::connect(addr, None, None)
            .await
            .err()
            .expect("needs a password");
        assert!(e.to_string().contains("tor.control_password"), "{e}");

        let (addr, _fake) = fake_tor(
            "AUTH METHODS=COOKIE,SAFECOOKIE COOKIEFILE=\"/nonexistent/cookie\"".into(),
            String::new(),
        )
        .await;
        let e = Control::connect(addr, None, None)
            .await
            .err()
            .expect("unreadable cookie");
        assert!(e.to_string().contains("/nonexistent/cookie"), "{e}");
    }
}
