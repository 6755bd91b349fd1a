//! `openagi bench crypto --openssl`: measures OpenSSL on this machine with
//! `openssl speed`, so the table's ratios compare the two libraries on the
//! same CPU instead of against figures from another machine.
//!
//! The measurement is OpenSSL's own: `-aead` runs the full TLS-like
//! sequence per message (init, associated data, update, tag), which is what
//! our rows do too; `-mr` gives machine-readable lines.

use std::process::Command;

use anyhow::{Context, Result, bail};
use openagi_crypto::bench::Reference;

/// Runs `openssl speed` (about `seconds` × 4 seconds) and returns its figures.
pub fn measure(seconds: u64) -> Result<Reference> {
    let seconds = seconds.max(1).to_string();
    let chacha = |bytes: &str| -> Result<f64> {
        let out = speed(&[
            "-mr",
            "-seconds",
            &seconds,
            "-aead",
            "-bytes",
            bytes,
            "-evp",
            "chacha20-poly1305",
        ])?;
        parse_cipher(&out).map(|bytes_per_sec| bytes_per_sec / 1e6)
    };
    let chacha_64 = chacha("64")?;
    let chacha_1k = chacha("1024")?;
    let (ed25519_sign, ed25519_verify) =
        parse_ed25519(&speed(&["-mr", "-seconds", &seconds, "ed25519"])?)?;
    Ok(Reference {
        source: format!("{} on this machine (`openssl speed -aead`)", version()),
        chacha_64,
        chacha_1k,
        ed25519_sign,
        ed25519_verify,
    })
}

fn speed(args: &[&str]) -> Result<String> {
    let output = Command::new("openssl")
        .arg("speed")
        .args(args)
        .output()
        .context("running `openssl speed` (is the openssl command installed?)")?;
    if !output.status.success() {
        bail!(
            "`openssl speed {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn version() -> String {
    Command::new("openssl")
        .arg("version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "OpenSSL".into())
}

/// `+F:<n>:<cipher>:<bytes per second>` for the one size asked for.
fn parse_cipher(out: &str) -> Result<f64> {
    out.lines()
        .find_map(|line| {
            let mut fields = line.strip_prefix("+F:")?.split(':');
            fields.next()?;
            fields.next()?;
            fields.next()?.trim().parse::<f64>().ok()
        })
        .with_context(|| format!("no `+F:` line in openssl output:\n{out}"))
}

/// `+F6:<n>:<bits>:Ed25519:<sign/s>:<verify/s>`.
fn parse_ed25519(out: &str) -> Result<(f64, f64)> {
    out.lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.strip_prefix("+F6:")?.split(':').collect();
            if fields.get(2)? != &"Ed25519" {
                return None;
            }
            Some((
                fields.get(3)?.parse().ok()?,
                fields.get(4)?.trim().parse().ok()?,
            ))
        })
        .with_context(|| format!("no Ed25519 `+F6:` line in openssl output:\n{out}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_machine_readable_speed_output() {
        let cipher = "+DT:ChaCha20-Poly1305:1:1024\n+R:2824869:ChaCha20-Poly1305:1.000000\n\
                      +H:1024\n+F:25:ChaCha20-Poly1305:2892666880.00\n";
        assert_eq!(parse_cipher(cipher).expect("parses"), 2_892_666_880.0);
        let ed = "+DTP:253:Ed25519:sign:1\n+F6:0:253:Ed25519:23698.000000:8604.000000\n";
        assert_eq!(parse_ed25519(ed).expect("parses"), (23698.0, 8604.0));
        assert!(parse_cipher("garbage").is_err());
        assert!(parse_ed25519("+F6:0:256:Ed448:1:2\n").is_err());
    }
}
