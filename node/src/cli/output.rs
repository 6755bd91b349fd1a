//! The commands' standard output.
//!
//! `println!` panics when the reader has gone away (`openagi status --json
//! | head`). Commands print through [`outln!`](crate::outln) and
//! [`out!`](crate::out) instead, which return an error: a closed pipe is
//! [`OutputError::Closed`], which `main` turns into a quiet exit, because
//! the reader stopped on purpose and got what it wanted.

use std::fmt;
use std::io::{self, Write};

/// Writing a command's answer to standard output failed.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The reader closed the pipe; nobody reads the rest.
    #[error("standard output was closed")]
    Closed,
    /// Any other failure, say a full disk behind a redirection.
    #[error("writing to standard output: {0}")]
    Write(io::Error),
}

impl From<io::Error> for OutputError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::BrokenPipe {
            Self::Closed
        } else {
            Self::Write(e)
        }
    }
}

impl OutputError {
    /// Whether `error`, or any cause under it, is a closed standard output.
    pub fn is_closed(error: &(dyn std::error::Error + 'static)) -> bool {
        let mut level = Some(error);
        while let Some(e) = level {
            if matches!(e.downcast_ref::<Self>(), Some(Self::Closed)) {
                return true;
            }
            level = e.source();
        }
        false
    }
}

/// Writes `args` to standard output (the body of [`out!`](crate::out)).
pub fn write(args: fmt::Arguments<'_>) -> Result<(), OutputError> {
    io::stdout().lock().write_fmt(args)?;
    Ok(())
}

/// Writes `args` and a newline to standard output (the body of
/// [`outln!`](crate::outln)).
pub fn write_line(args: fmt::Arguments<'_>) -> Result<(), OutputError> {
    // One lock for both, so the line stays whole if another thread prints.
    let mut out = io::stdout().lock();
    out.write_fmt(args)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// `print!` that returns `Result<(), OutputError>` instead of panicking.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::output::write(::std::format_args!($($arg)*))
    };
}

/// `println!` that returns `Result<(), OutputError>` instead of panicking.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::cli::output::write(::std::format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::write_line(::std::format_args!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_pipe_is_closed_also_under_context() {
        let closed = OutputError::from(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(matches!(closed, OutputError::Closed));
        let wrapped = anyhow::Error::from(closed).context("printing the status");
        assert!(OutputError::is_closed(wrapped.as_ref()));
        let other = OutputError::from(io::Error::from(io::ErrorKind::StorageFull));
        assert!(!OutputError::is_closed(&other));
        // A broken pipe elsewhere (a socket to the daemon) is a real failure.
        let socket = io::Error::from(io::ErrorKind::BrokenPipe);
        assert!(!OutputError::is_closed(&socket));
    }
}
