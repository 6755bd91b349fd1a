//! The dashboard page, embedded in the binary: one HTML page, its script
//! and its style sheet, written for this node (no third-party code, no
//! CDN), so `cargo build` alone builds it and it works offline.
//!
//! The script draws its charts as SVG and talks only to the daemon that
//! served it (the policy in [`CONTENT_SECURITY_POLICY`] enforces that).

/// The page.
pub const INDEX_HTML: &str = include_str!("../web/index.html");
/// Its script.
pub const APP_JS: &str = include_str!("../web/app.js");
/// Its style sheet.
pub const APP_CSS: &str = include_str!("../web/app.css");

/// The Content-Security-Policy of every dashboard response: scripts,
/// styles and requests only to this origin, no inline script, no frames,
/// no forms posting elsewhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// A static file of the page: its body and content type, by request path.
pub fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/dashboard/app.js" => Some((APP_JS, "text/javascript; charset=utf-8")),
        "/dashboard/app.css" => Some((APP_CSS, "text/css; charset=utf-8")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_files() {
        for needle in [
            "http://", "https://", "<script>", "style=", "onclick", "onload",
        ] {
            assert!(!INDEX_HTML.contains(needle), "index.html contains {needle}");
        }
        assert!(INDEX_HTML.contains("src=\"/dashboard/app.js\""));
        assert!(INDEX_HTML.contains("href=\"/dashboard/app.css\""));
        assert!(asset("/dashboard/app.js").is_some());
        assert!(asset("/dashboard/../secret").is_none());
        // Only the SVG namespace URI, which is a name, not a request.
        let urls: Vec<&str> = APP_JS
            .match_indices("http")
            .map(|(i, _)| &APP_JS[i..i + 30])
            .collect();
        assert!(
            urls.iter()
                .all(|u| u.starts_with("http://www.w3.org/2000/svg")),
            "{urls:?}"
        );
    }
}
