//! GridWeaver Edge runtime.
