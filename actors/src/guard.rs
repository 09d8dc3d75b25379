//! Panic containment for actor handlers.
//!
//! The core is written not to panic, and bad input is an error value; this is the second
//! line. A handler runs its core call through [`guarded`]; a panic is logged and turned into
//! `None`, and the handler then stops its actor, which actix's supervision restarts with a
//! core value rebuilt from what is durable (see `Supervised::restarting` on each actor).

use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `f`; a panic becomes `None` (and an error log naming `what`).
pub fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Option<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            tracing::error!(%what, panic = %msg, "a core call panicked; restarting the actor");
            None
        }
    }
}
