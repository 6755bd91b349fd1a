//! Where the operator's key store passphrase comes from.
//!
//! Never from the command line: arguments are visible to every user in
//! `ps` and end up in shell history. In order of precedence:
//!
//! 1. a file named by a flag (`--passphrase-file`, which clap also fills
//!    from `OPENAGI_PASSPHRASE_FILE`);
//! 2. the environment variable `OPENAGI_PASSPHRASE` (for service managers
//!    that inject secrets into the environment);
//! 3. an interactive prompt with echo off, when stdin is a terminal.
//!
//! A source is only consulted when a passphrase is actually needed, so an
//! unencrypted key (devnet, tests) never asks for one.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use zeroize::Zeroizing;

/// Environment variable holding the passphrase itself.
pub const PASSPHRASE_ENV: &str = "OPENAGI_PASSPHRASE";
/// Environment variable naming a file that holds the passphrase.
pub const PASSPHRASE_FILE_ENV: &str = "OPENAGI_PASSPHRASE_FILE";
/// Environment variable holding the new passphrase (`keys passphrase`).
pub const NEW_PASSPHRASE_ENV: &str = "OPENAGI_NEW_PASSPHRASE";
/// Environment variable naming a file with the new passphrase.
pub const NEW_PASSPHRASE_FILE_ENV: &str = "OPENAGI_NEW_PASSPHRASE_FILE";

/// Longest passphrase accepted; a bound on what is read from a file or a
/// terminal.
const MAX_PASSPHRASE_LEN: usize = 1024;

/// A source of one passphrase, read lazily.
#[derive(Clone)]
pub struct PassphraseSource {
    file: Option<PathBuf>,
    env_var: &'static str,
    what: &'static str,
    confirm: bool,
    /// Already read (so one operation asks the operator only once).
    fixed: Option<Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for PassphraseSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the passphrase itself.
        f.debug_struct("PassphraseSource")
            .field("file", &self.file)
            .field("env_var", &self.env_var)
            .field("fixed", &self.fixed.is_some())
            .finish()
    }
}

impl PassphraseSource {
    /// The passphrase that unlocks the existing key: `file` (from
    /// `--passphrase-file` or `OPENAGI_PASSPHRASE_FILE`), else
    /// `OPENAGI_PASSPHRASE`, else a prompt.
    pub fn current(file: Option<PathBuf>) -> Self {
        Self {
            file,
            env_var: PASSPHRASE_ENV,
            what: "key store passphrase",
            confirm: false,
            fixed: None,
        }
    }

    /// A passphrase already read.
    pub fn fixed(passphrase: Zeroizing<Vec<u8>>) -> Self {
        Self {
            fixed: Some(passphrase),
            ..Self::current(None)
        }
    }

    /// The same source for a key about to be encrypted: a prompt asks
    /// twice, so a typo cannot lock the operator out.
    pub fn for_new_key(&self) -> Self {
        Self {
            confirm: true,
            what: "passphrase for the new key",
            ..self.clone()
        }
    }

    /// The new passphrase of `keys passphrase`: `file` (from
    /// `--new-passphrase-file` or `OPENAGI_NEW_PASSPHRASE_FILE`), else
    /// `OPENAGI_NEW_PASSPHRASE`, else a prompt asked twice.
    pub fn replacement(file: Option<PathBuf>) -> Self {
        Self {
            file,
            env_var: NEW_PASSPHRASE_ENV,
            what: "new key store passphrase",
            confirm: true,
            fixed: None,
        }
    }

    /// Reads the passphrase. Fails with instructions when no source has
    /// one, and refuses an empty passphrase.
    pub fn read(&self) -> Result<Zeroizing<Vec<u8>>> {
        let passphrase = if let Some(fixed) = &self.fixed {
            fixed.clone()
        } else if let Some(path) = &self.file {
            read_file(path)?
        } else if let Some(value) = std::env::var_os(self.env_var) {
            Zeroizing::new(std::os::unix::ffi::OsStrExt::as_bytes(value.as_os_str()).to_vec())
        } else if std::io::stdin().is_terminal() {
            let first = prompt(&format!("{}: ", self.what))?;
            if self.confirm {
                let again = prompt("again: ")?;
                if *first != *again {
                    bail!("the two passphrases differ; nothing was changed");
                }
            }
            first
        } else {
            bail!(
                "a {} is needed: give it with --passphrase-file FILE (or {} / {}), \
                 or run on a terminal to be asked; it is never taken on the command line",
                self.what,
                if self.env_var == PASSPHRASE_ENV {
                    PASSPHRASE_FILE_ENV
                } else {
                    NEW_PASSPHRASE_FILE_ENV
                },
                self.env_var
            );
        };
        if passphrase.is_empty() {
            bail!(
                "the {} is empty; an empty passphrase protects nothing",
                self.what
            );
        }
        if passphrase.len() > MAX_PASSPHRASE_LEN {
            bail!(
                "the {} is longer than {MAX_PASSPHRASE_LEN} bytes",
                self.what
            );
        }
        Ok(passphrase)
    }
}

/// Reads a passphrase file: its first line, without the line ending (an
/// editor's trailing newline is not part of the passphrase).
fn read_file(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("reading passphrase file {}", path.display()))?;
    if meta.len() > MAX_PASSPHRASE_LEN as u64 + 2 {
        bail!(
            "passphrase file {} is larger than {MAX_PASSPHRASE_LEN} bytes",
            path.display()
        );
    }
    let bytes = Zeroizing::new(
        std::fs::read(path)
            .with_context(|| format!("reading passphrase file {}", path.display()))?,
    );
    Ok(Zeroizing::new(first_line(&bytes).to_vec()))
}

fn first_line(bytes: &[u8]) -> &[u8] {
    let line = bytes.split(|b| *b == b'\n').next().unwrap_or(bytes);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Asks on the terminal with echo off, restoring the terminal settings
/// afterwards even when reading fails.
fn prompt(text: &str) -> Result<Zeroizing<Vec<u8>>> {
    use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};

    let stdin = std::io::stdin();
    let mut stderr = std::io::stderr();
    stderr.write_all(text.as_bytes())?;
    stderr.flush()?;
    let saved = tcgetattr(&stdin).context("reading terminal settings")?;
    let mut silent = saved.clone();
    silent.local_flags.remove(LocalFlags::ECHO);
    silent.local_flags.insert(LocalFlags::ECHONL);
    tcsetattr(&stdin, SetArg::TCSANOW, &silent).context("turning terminal echo off")?;
    let mut line = Zeroizing::new(String::new());
    let read = stdin.lock().read_line(&mut line);
    let restored = tcsetattr(&stdin, SetArg::TCSANOW, &saved);
    read.context("reading the passphrase from the terminal")?;
    restored.context("restoring terminal settings")?;
    Ok(Zeroizing::new(first_line(line.as_bytes()).to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_passphrase_drops_only_the_line_ending() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("pass");
        std::fs::write(&path, b" correct horse \r\nignored\n").expect("written");
        let source = PassphraseSource::current(Some(path.clone()));
        assert_eq!(source.read().expect("read").as_slice(), b" correct horse ");
        std::fs::write(&path, b"\n").expect("written");
        assert!(source.read().is_err(), "empty passphrase refused");
    }
}
