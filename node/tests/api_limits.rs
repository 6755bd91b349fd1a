//! The local API against clients that misbehave at the HTTP level: a
//! slowloris client is cut off, an oversized body is answered 413 (at
//! once when its length is declared), and the daemon keeps serving; and
//! against more transactions than a validator may hold: "busy" (503 with
//! `Retry-After`) at the door, before anything is queued.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use openagi_consensus::{ClientId, Transaction};
use openagi_tests::{Daemon, DaemonOptions, env_vars, init, init_validators, use_binary};

fn daemon() -> (tempfile::TempDir, Daemon) {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("node");
    init(&dir).expect("init");
    let daemon = Daemon::start(&dir, &DaemonOptions::default()).expect("starts");
    (root, daemon)
}

/// A network of `validators`, of which only the first is started, with
/// `env`.
fn first_validator_of(validators: usize, env: &[(&str, &str)]) -> (tempfile::TempDir, Daemon) {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let dirs = init_validators(root.path(), validators).expect("validators");
    let options = DaemonOptions {
        env: env_vars(env),
        ..DaemonOptions::default()
    };
    let daemon = Daemon::start(&dirs[0], &options).expect("starts");
    (root, daemon)
}

/// POSTs a postcard batch of `count` transactions (sequence numbers from
/// `first_seq`) to `/api/v1/tx/batch`: status, `Retry-After`, answer.
fn post_batch(
    daemon: &Daemon,
    client: [u8; 32],
    first_seq: u64,
    count: u64,
) -> (u16, Option<String>, serde_json::Value) {
    let txs: Vec<Transaction> = (first_seq..first_seq + count)
        .map(|seq| Transaction {
            client: ClientId(client),
            seq,
            payload: seq.to_le_bytes().to_vec().into(),
        })
        .collect();
    let body = postcard::to_stdvec(&txs).expect("encode");
    daemon.post_bytes("/api/v1/tx/batch", &body).expect("post")
}

/// Admission at the door, on a validator of four started alone (nothing
/// commits, so what it holds stays put): a batch larger than the cap is
/// refused for good (413), one that would overflow what is held is "busy"
/// (503 with `Retry-After`, saying how full it is), and one that exactly
/// fills the room is taken.
#[test]
fn a_validator_offered_more_than_it_may_hold_answers_busy() {
    let (_root, daemon) = first_validator_of(4, &[("OPENAGI_CONSENSUS_MAX_PENDING", "64")]);
    let client = [7u8; 32];

    let (code, retry, answer) = post_batch(&daemon, client, 1, 65);
    assert_eq!(code, 413, "{answer}");
    assert_eq!(retry, None, "{answer}");

    let (code, _, answer) = post_batch(&daemon, client, 1, 40);
    assert_eq!(code, 202, "{answer}");
    assert_eq!(answer["queued"], 40, "{answer}");
    // Admission sees the forty once the replica has taken them in.
    openagi_tests::wait_for("forty held", Duration::from_secs(10), || {
        let (code, retry, answer) = post_batch(&daemon, client, 41, 30);
        (code == 503).then_some((retry, answer))
    })
    .map(|(retry, answer)| {
        assert_eq!(retry.as_deref(), Some("1"), "{answer}");
        let text = answer["error"].as_str().unwrap_or_default().to_string();
        assert!(
            text.contains("busy") && text.contains("at most 64"),
            "{text}"
        );
    })
    .expect("busy");
    let (code, _, answer) = post_batch(&daemon, client, 41, 24);
    assert_eq!(code, 202, "{answer}");
    assert_eq!(answer["queued"], 24, "{answer}");
}

/// A batch that fits is queued and commits, and the same batch again is
/// dropped as duplicates inside: never committed twice.
#[test]
fn a_repeated_batch_commits_once() {
    let (_root, daemon) = first_validator_of(1, &[("OPENAGI_CONSENSUS_MAX_PENDING", "64")]);
    let client = [7u8; 32];
    let (code, _, answer) = post_batch(&daemon, client, 1, 10);
    assert_eq!(code, 202, "{answer}");
    assert_eq!(answer["queued"], 10, "{answer}");
    let (code, _, answer) = post_batch(&daemon, client, 1, 10);
    assert_eq!(code, 202, "{answer}");
    openagi_tests::wait_for(
        "ten transactions committed",
        Duration::from_secs(30),
        || {
            let status = daemon.status().ok()?;
            (status["consensus"]["committed_txs"].as_u64()? >= 10).then_some(())
        },
    )
    .expect("commits");
    std::thread::sleep(Duration::from_millis(500));
    let status = daemon.status().expect("status");
    assert_eq!(status["consensus"]["committed_txs"], 10, "{status}");
}

/// Sends `head` (request line and headers) and returns the status line.
fn status_line(api: &str, head: &str) -> String {
    let mut stream = TcpStream::connect(api).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(head.as_bytes()).expect("write");
    let mut buf = [0u8; 256];
    let n = stream.read(&mut buf).expect("answer");
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_client_trickling_its_headers_is_cut_off() {
    let (_root, daemon) = daemon();
    let mut stream = TcpStream::connect(daemon.api_addr()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .expect("request line");
    let started = Instant::now();
    let mut closed = false;
    // One header line every 2 s, as slowloris does, for up to 40 s.
    while started.elapsed() < Duration::from_secs(40) {
        let mut buf = [0u8; 512];
        match stream.read(&mut buf) {
            // Closed, or answered with an error status and then closed.
            Ok(0) | Err(_) if !is_timeout(&stream) => {
                closed = true;
                break;
            }
            Ok(n) if n > 0 => {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                assert!(!text.contains("200 OK"), "never completed: {text}");
                closed = true;
                break;
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(1800));
        if stream.write_all(b"X-Slow: 1\r\n").is_err() {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "a connection still sending headers after {:?} must be closed",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "closed after the header timeout, not much later: {:?}",
        started.elapsed()
    );
    // The daemon still answers others.
    let (code, _) = daemon.get("/health", None).expect("health");
    assert_eq!(code, 200);
}

fn is_timeout(stream: &TcpStream) -> bool {
    // A read that timed out leaves the socket open; peek tells them apart.
    let mut one = [0u8; 1];
    match stream.peek(&mut one) {
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        Ok(_) => false,
    }
}

#[test]
fn oversized_bodies_are_answered_413() {
    let (_root, daemon) = daemon();
    let token = daemon.token().to_string();
    // Declared far over any limit: refused before a body byte is sent.
    let line = status_line(
        daemon.api_addr(),
        &format!(
            "POST /api/v1/tx HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
        ),
    );
    assert!(line.contains("413"), "{line}");

    // Over the route's own limit, sent in full: 413, not 400.
    let body = format!("{{\"payload\":\"{}\"}}", "a".repeat(3 * 1024 * 1024));
    let mut stream = TcpStream::connect(daemon.api_addr()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let head = format!(
        "POST /api/v1/tx HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).expect("head");
    let _ = stream.write_all(body.as_bytes());
    let mut buf = [0u8; 256];
    let n = stream.read(&mut buf).expect("answer");
    let answer = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    let (code, _) = daemon.get("/health", None).expect("health");
    assert_eq!(code, 200);
}
