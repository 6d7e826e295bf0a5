//! `tie-inspect`: a live view of a running tie server's sessions, for operators.
//!
//! [`snapshot`] reads every session's rings from read-only mappings the server hands over
//! ([`tie_client::inspect`]) into a [`snapshot::Snapshot`] (printable as JSON or a table);
//! [`view`] renders it as a terminal UI with ratatui. Nothing here writes to a segment, and
//! nothing takes a lock the server could wait on: every read is an atomic load.
#![forbid(unsafe_code)]

pub mod snapshot;
pub mod view;
