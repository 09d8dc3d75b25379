//! What a config names on this machine: the files and directories it points to.
//!
//! The core validates a config's text ([`Config::from_yaml`]) and never touches the file
//! system; this module does, before anything starts. `gridweaver check-config` and
//! `gridweaver run` both call [`check_environment`], and a failure is a config error
//! (exit 2) naming the key: `mqtt.password_file` must be a readable file, the directory of
//! `store.path` must exist. What happens later (a file removed while the gateway runs) is a
//! runtime failure of whoever reads it.

use std::io;
use std::path::{Path, PathBuf};

use gridweaver_core::config::Config;

/// A file or directory the config names is not usable.
#[derive(Debug, thiserror::Error)]
pub enum EnvironmentError {
    /// `mqtt.password_file` cannot be read.
    #[error("mqtt.password_file: cannot read {}: {error}", file.display())]
    PasswordFile {
        /// The configured file.
        file: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// The directory of `store.path` does not exist.
    #[error("store.path: directory {} does not exist (the event log would be {})", dir.display(), log.display())]
    StoreDirMissing {
        /// The directory.
        dir: PathBuf,
        /// The configured log.
        log: PathBuf,
    },
    /// The directory of `store.path` is something else, or cannot be looked at.
    #[error("store.path: {} cannot hold the event log {}: {reason}", dir.display(), log.display())]
    StoreDirUnusable {
        /// The directory.
        dir: PathBuf,
        /// The configured log.
        log: PathBuf,
        /// Why.
        reason: String,
    },
    /// `store.path` is a directory.
    #[error("store.path: {} is a directory, not the event log's file", .0.display())]
    StoreIsADirectory(PathBuf),
}

/// Checks what `cfg` names on this machine: the password file is readable, the event log's
/// directory exists (the log itself is created on first start).
pub fn check_environment(cfg: &Config) -> Result<(), EnvironmentError> {
    if let Some(file) = &cfg.mqtt.password_file {
        password(Path::new(file))?;
    }
    check_store_path(Path::new(&cfg.store.path))
}

/// The password in `file`: its first line (empty for an empty file).
pub fn password(file: &Path) -> Result<String, EnvironmentError> {
    let text = std::fs::read_to_string(file)
        .map_err(|error| EnvironmentError::PasswordFile { file: file.to_owned(), error })?;
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

fn check_store_path(log: &Path) -> Result<(), EnvironmentError> {
    if log.is_dir() {
        return Err(EnvironmentError::StoreIsADirectory(log.to_owned()));
    }
    // A bare file name lives in the working directory, which exists.
    let Some(dir) = log.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    let unusable =
        |reason: String| EnvironmentError::StoreDirUnusable { dir: dir.to_owned(), log: log.to_owned(), reason };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(unusable("not a directory".into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(EnvironmentError::StoreDirMissing { dir: dir.to_owned(), log: log.to_owned() })
        }
        Err(e) => Err(unusable(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mqtt: &str, log: &Path) -> Config {
        let yaml = format!("site: a\nmqtt: {{ {mqtt} }}\nstore: {{ path: {:?} }}\n", log.display().to_string());
        Config::from_yaml(&yaml).unwrap()
    }

    #[test]
    fn a_readable_password_file_and_an_existing_directory_pass() {
        let dir = tempfile::tempdir().unwrap();
        let pass = dir.path().join("pass");
        std::fs::write(&pass, "s3cret\nignored\n").unwrap();
        let mqtt = format!("username: gw, password_file: {:?}", pass.display().to_string());
        check_environment(&config(&mqtt, &dir.path().join("events.db"))).unwrap();
        assert_eq!(password(&pass).unwrap(), "s3cret", "the first line");
        check_environment(&config("", Path::new("events.db"))).unwrap();
    }

    #[test]
    fn a_missing_or_unreadable_password_file_names_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        // A directory cannot be read as a file, even by root.
        for file in [dir.path().join("missing"), dir.path().to_owned()] {
            let mqtt = format!("username: gw, password_file: {:?}", file.display().to_string());
            let e = check_environment(&config(&mqtt, &dir.path().join("events.db"))).unwrap_err();
            assert!(matches!(e, EnvironmentError::PasswordFile { .. }), "{e:?}");
            let text = e.to_string();
            assert!(text.starts_with("mqtt.password_file: ") && text.contains(&file.display().to_string()), "{text}");
        }
    }

    #[test]
    fn a_log_in_a_missing_directory_names_the_key_and_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope").join("deeper");
        let e = check_environment(&config("", &missing.join("events.db"))).unwrap_err();
        assert!(matches!(e, EnvironmentError::StoreDirMissing { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.starts_with("store.path: ") && text.contains(&missing.display().to_string()), "{text}");
        assert!(!missing.exists(), "nothing is created");
    }

    #[test]
    fn a_log_under_a_file_or_at_a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, "").unwrap();
        let e = check_environment(&config("", &file.join("events.db"))).unwrap_err();
        assert!(matches!(e, EnvironmentError::StoreDirUnusable { .. }), "{e:?}");
        assert!(e.to_string().contains("not a directory"), "{e}");
        let e = check_environment(&config("", dir.path())).unwrap_err();
        assert!(matches!(e, EnvironmentError::StoreIsADirectory(_)), "{e:?}");
    }
}
