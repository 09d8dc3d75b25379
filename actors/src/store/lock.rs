//! One writer per event log: an exclusive advisory lock on a file beside the database.
//!
//! `gridweaver run` and `gridweaver migrate` take it before they open the log for writing
//! and hold it until the process ends; the operating system releases it then, however the
//! process ends (`kill -9` and power loss included), so there is never a stale lock to
//! clean up. Readers (`events`, `replay`, `audit`) do not take it, and neither does
//! `compact`, which is made to run beside a live gateway. The lock file is left in place.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use super::StoreError;

/// The lock file of the log at `log`: the log's path with `.lock` appended
/// (`events.db` -> `events.db.lock`).
pub fn lock_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// The held lock of one event log; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct LogLock {
    _file: File,
    path: PathBuf,
}

impl LogLock {
    /// Takes the lock of the log at `log` without waiting, creating the lock file if needed,
    /// and writes this process's id into it (for the operator who finds it held).
    /// [`StoreError::Locked`] when another process holds it.
    pub fn acquire(log: &Path) -> Result<LogLock, StoreError> {
        let path = lock_path(log);
        let io = |error| StoreError::Lock { path: path.clone(), error };
        // Never truncate on open: the holder's pid is in the file.
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let holder = file.read_to_string(&mut text).ok().and_then(|_| text.trim().parse::<u32>().ok());
                return Err(StoreError::Locked { path, holder });
            }
            Err(TryLockError::Error(error)) => return Err(io(error)),
        }
        // The pid is a hint for people; the lock is what counts, so a failed write is not fatal.
        let written =
            file.set_len(0).and_then(|()| file.rewind()).and_then(|()| writeln!(file, "{}", std::process::id()));
        if let Err(error) = written {
            tracing::warn!(lock = %path.display(), %error, "cannot write the pid into the lock file");
        }
        Ok(LogLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_file_is_the_log_path_with_lock_appended() {
        assert_eq!(lock_path(Path::new("/var/lib/gw/events.db")), Path::new("/var/lib/gw/events.db.lock"));
        assert_eq!(lock_path(Path::new("gridweaver.db")), Path::new("gridweaver.db.lock"));
    }

    #[test]
    fn a_second_lock_on_the_same_log_is_refused_until_the_first_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("events.db");
        let first = LogLock::acquire(&log).unwrap();
        assert_eq!(first.path(), lock_path(&log));
        match LogLock::acquire(&log) {
            Err(StoreError::Locked { path, holder }) => {
                assert_eq!(path, lock_path(&log));
                assert_eq!(holder, Some(std::process::id()), "the holder's pid is read back");
            }
            other => panic!("a second lock was not refused: {other:?}"),
        }
        let other_log = LogLock::acquire(&dir.path().join("other.db"));
        assert!(other_log.is_ok(), "another log has its own lock");
        drop(first);
        assert!(LogLock::acquire(&log).is_ok(), "released when the holder drops it");
    }

    #[test]
    fn a_lock_in_a_missing_directory_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("nope").join("events.db");
        let e = LogLock::acquire(&log).unwrap_err();
        assert!(matches!(e, StoreError::Lock { .. }), "{e:?}");
        assert!(e.to_string().contains(&lock_path(&log).display().to_string()), "{e}");
    }
}
