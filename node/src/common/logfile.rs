//! The daemon's optional log file (`log.file`), rotated by size.
//!
//! Written here rather than with `tracing-appender`, which rotates by time
//! only: an operator sizes the disk a node may use for logs, so the bound
//! is in bytes. When a write would take the file past
//! `log.max_file_bytes`, `FILE` becomes `FILE.1`, `FILE.1` becomes
//! `FILE.2`, and so on; the oldest beyond `log.max_files` is deleted. Lines
//! are never split across files (the log layer writes one event per call).
//!
//! The file is attached once the daemon holds the data directory's lock,
//! not when logging starts, so a second daemon refused at the lock never
//! writes to (or rotates) the first one's file. Until then, and when no
//! file is configured, events go to stderr only.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A problem opening or rotating the log file.
#[derive(Debug, thiserror::Error)]
#[error("log file {path}: {source}")]
pub struct LogFileError {
    /// The file involved.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// A file that rotates itself by size.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    max_files: u32,
    file: File,
    /// Bytes in the current file.
    written: u64,
}

impl RotatingFile {
    /// Opens (appending) or creates `path` with mode 0600, and its parent
    /// directories with mode 0700: logs name peers and jobs and belong to
    /// the operator only, like the data directory.
    pub fn open(path: &Path, max_bytes: u64, max_files: u32) -> Result<Self, LogFileError> {
        let fail = |source| LogFileError {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(fail)?;
        }
        let file = open_append(path).map_err(fail)?;
        let written = file.metadata().map_err(fail)?.len();
        Ok(Self {
            path: path.to_path_buf(),
            max_bytes: max_bytes.max(1),
            max_files,
            file,
            written,
        })
    }

    /// The path of rotated file `n` (1 is the newest).
    pub fn rotated_path(path: &Path, n: u32) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        let oldest = Self::rotated_path(&self.path, self.max_files);
        match fs::remove_file(&oldest) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        for n in (1..self.max_files).rev() {
            let from = Self::rotated_path(&self.path, n);
            match fs::rename(&from, Self::rotated_path(&self.path, n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        if self.max_files == 0 {
            fs::remove_file(&self.path)?;
        } else {
            fs::rename(&self.path, Self::rotated_path(&self.path, 1))?;
        }
        self.file = open_append(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // An event larger than the limit still goes into a file of its own
        // rather than being dropped.
        if self.written > 0 && self.written.saturating_add(buf.len() as u64) > self.max_bytes {
            self.rotate()?;
        }
        let n = self.file.write(buf)?;
        self.written = self.written.saturating_add(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// The process's log file, once attached. Global because the `tracing`
/// subscriber it feeds is global and is installed before the data
/// directory is locked.
static ATTACHED: Mutex<Option<RotatingFile>> = Mutex::new(None);

/// Opens `path` and sends every later log event to it too.
pub fn attach(path: &Path, max_bytes: u64, max_files: u32) -> Result<(), LogFileError> {
    let file = RotatingFile::open(path, max_bytes, max_files)?;
    match ATTACHED.lock() {
        Ok(mut slot) => *slot = Some(file),
        Err(poisoned) => *poisoned.into_inner() = Some(file),
    }
    Ok(())
}

/// The `tracing` writer of the log file layer: writes to the attached
/// file, and discards while none is attached.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttachedFile;

impl Write for AttachedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut slot = match ATTACHED.lock() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        match slot.as_mut() {
            Some(file) => file.write(buf),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut slot = match ATTACHED.lock() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        match slot.as_mut() {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for AttachedFile {
    type Writer = AttachedFile;

    fn make_writer(&'a self) -> Self::Writer {
        AttachedFile
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_at_most_max_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("logs/node.log");
        let mut file = RotatingFile::open(&path, 100, 2).expect("opens");
        for i in 0..10 {
            file.write_all(format!("{i:039}\n").as_bytes())
                .expect("writes");
        }
        // 40-byte lines, 100 bytes per file: two lines each.
        let read = |p: PathBuf| fs::read_to_string(p).expect("exists");
        assert_eq!(read(path.clone()), format!("{:039}\n{:039}\n", 8, 9));
        assert_eq!(
            read(RotatingFile::rotated_path(&path, 1)),
            format!("{:039}\n{:039}\n", 6, 7)
        );
        assert_eq!(
            read(RotatingFile::rotated_path(&path, 2)),
            format!("{:039}\n{:039}\n", 4, 5)
        );
        assert!(!RotatingFile::rotated_path(&path, 3).exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).expect("exists").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // Reopened, it counts what is already there.
        drop(file);
        let mut file = RotatingFile::open(&path, 100, 2).expect("reopens");
        file.write_all(&[b'x'; 30]).expect("writes");
        assert_eq!(read(path.clone()), "x".repeat(30));
        assert_eq!(
            read(RotatingFile::rotated_path(&path, 1)),
            format!("{:039}\n{:039}\n", 8, 9)
        );
    }
}
