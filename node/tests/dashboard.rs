//! The web dashboard's access rules against a real daemon: the page and
//! its data refuse requests without a session or the token, a login link
//! works once and sets a cookie scripts cannot read, a session only reads,
//! no secret reaches the page, and every response carries a restrictive
//! Content-Security-Policy. The page itself is driven in a browser by
//! `node/tests/browser.rs`.

use std::time::Duration;

use openagi_tests::{Daemon, DaemonOptions, init, openagi, use_binary, wait_for};

struct Answer {
    code: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn request(daemon: &Daemon, method: &str, path: &str, cookie: Option<&str>) -> Answer {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let url = format!("http://{}{path}", daemon.api_addr());
    let mut response = match method {
        "GET" => {
            let mut r = agent.get(&url);
            if let Some(c) = cookie {
                r = r.header("Cookie", c);
            }
            r.call()
        }
        _ => {
            let mut r = agent.post(&url);
            if let Some(c) = cookie {
                r = r.header("Cookie", c);
            }
            r.send_json(serde_json::json!({"payload": "from a session"}))
        }
    }
    .expect("request");
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect();
    Answer {
        code: response.status().as_u16(),
        headers,
        body: response.body_mut().read_to_string().unwrap_or_default(),
    }
}

/// The login path of the URL `openagi dashboard` prints.
fn login_path(daemon: &Daemon) -> String {
    let dir = daemon.dir.to_string_lossy().to_string();
    let (status, out, err) = openagi(&["dashboard", "--data-dir", &dir]).expect("runs");
    assert!(status.success(), "{err}");
    let url = out.trim();
    let prefix = format!("http://{}", daemon.api_addr());
    assert!(url.starts_with(&prefix), "{url}");
    assert!(err.contains("works once"), "{err}");
    url[prefix.len()..].to_string()
}

#[test]
fn the_dashboard_needs_a_login_and_a_session_only_reads() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("node");
    init(&dir).expect("init");
    let daemon = Daemon::start(&dir, &DaemonOptions::default()).expect("starts");

    // Nothing without a session or the token.
    for path in ["/", "/dashboard/api/state", "/dashboard/api/events"] {
        let a = request(&daemon, "GET", path, None);
        assert_eq!(a.code, 401, "{path}: {}", a.body);
        assert!(a.header("content-security-policy").is_some(), "{path}");
    }
    let forged = request(&daemon, "GET", "/", Some("openagi_session=00ff"));
    assert_eq!(forged.code, 401);
    assert_eq!(
        request(&daemon, "GET", "/login?code=nonsense", None).code,
        401
    );

    // The login link sets an HttpOnly, SameSite=Strict cookie, once.
    let login = login_path(&daemon);
    let answer = request(&daemon, "GET", &login, None);
    assert_eq!(answer.code, 303, "{}", answer.body);
    assert_eq!(answer.header("location"), Some("/"));
    assert_eq!(answer.header("referrer-policy"), Some("no-referrer"));
    let set_cookie = answer.header("set-cookie").expect("a cookie").to_string();
    assert!(set_cookie.contains("HttpOnly"), "{set_cookie}");
    assert!(set_cookie.contains("SameSite=Strict"), "{set_cookie}");
    let cookie = set_cookie.split(';').next().expect("pair").to_string();
    assert_eq!(
        request(&daemon, "GET", &login, None).code,
        401,
        "a login link works once"
    );

    // With the session: the page, its files and its data.
    let page = request(&daemon, "GET", "/", Some(&cookie));
    assert_eq!(page.code, 200);
    let csp = page.header("content-security-policy").expect("csp");
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert!(page.body.contains("/dashboard/app.js"));
    let script = request(&daemon, "GET", "/dashboard/app.js", None);
    assert_eq!(script.code, 200);
    assert!(
        script
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/javascript"))
    );
    let peer_id = daemon.peer_id().expect("peer id");
    let state = wait_for("history samples", Duration::from_secs(20), || {
        let a = request(&daemon, "GET", "/dashboard/api/state", Some(&cookie));
        assert_eq!(a.code, 200, "{}", a.body);
        let doc: serde_json::Value = serde_json::from_str(&a.body).expect("json");
        let sampled = doc["history"]
            .as_array()
            .expect("history")
            .iter()
            .any(|s| s["name"] == "peers" && !s["fine"].as_array().expect("points").is_empty());
        sampled.then_some(a.body)
    })
    .expect("the sampler fills the history");
    assert!(state.contains(&peer_id));
    assert!(
        state.contains("OpenAgiIsolated"),
        "the alert rules are listed"
    );
    // No secret ever reaches the browser.
    let token = daemon.token().to_string();
    let identity = std::fs::read_to_string(dir.join("node.key")).unwrap_or_default();
    for body in [&page.body, &script.body, &state] {
        assert!(!body.contains(&token), "the API token leaked");
        if !identity.trim().is_empty() {
            assert!(!body.contains(identity.trim()), "the key leaked");
        }
    }
    // The session reads the API's GET routes, but never writes.
    assert_eq!(
        request(&daemon, "GET", "/api/v1/status", Some(&cookie)).code,
        200
    );
    assert_eq!(
        request(&daemon, "GET", "/api/v1/inbox", Some(&cookie)).code,
        401,
        "decrypted private messages need the token"
    );
    assert_eq!(
        request(&daemon, "POST", "/api/v1/tx", Some(&cookie)).code,
        401
    );
    assert_eq!(
        request(&daemon, "POST", "/api/v1/dashboard/login", Some(&cookie)).code,
        401
    );

    // The live stream answers with server-sent events.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut events = agent
        .get(&format!(
            "http://{}/dashboard/api/events",
            daemon.api_addr()
        ))
        .header("Cookie", &cookie)
        .call()
        .expect("stream");
    assert!(
        events
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("text/event-stream"))
    );
    let mut first = [0u8; 6];
    std::io::Read::read_exact(&mut events.body_mut().as_reader(), &mut first).expect("an event");
    assert_eq!(&first, b"data: ");

    // The alert metrics are exported.
    let metrics = daemon.metrics().expect("metrics");
    assert!(metrics.contains("openagi_alerts_firing{alert=\"OpenAgiIsolated\"}"));
    assert!(metrics.contains("openagi_process_resident_memory_bytes"));
}
