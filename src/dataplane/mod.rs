//! The data plane: a listener that opens sessions, and pollers that serve them.
//!
//! - `listener`: binds the endpoint's socket, performs handshakes (credentials, model,
//!   layout, ring sizes), creates each session's sealed segment and passes its fd; watches
//!   every session socket and marks a session dead when its client hangs up.
//! - `socket_file`: the socket's directory (checked: only the server's user can change it)
//!   and file (bound privately, then linked into place; removed at shutdown only if unchanged).
//! - [`poller`]: poller threads (pinned when configured) that drain request rings, validate
//!   frames, batch them per model, run the backend and write responses. Every accepted frame
//!   gets exactly one response, in order per session.
//!
//! [`Server::start`] starts both, with the performance monitor's thread ([`crate::monitor`])
//! and the health monitor's ([`crate::models::health`]); [`Server::shutdown`] stops them gracefully:
//! frames already in the rings are answered, sessions are marked closing, then the sockets
//! close.

//!
//! [`batch`] holds the batching policy's queue, a plain struct the poller drives.

pub mod batch;
mod listener;
pub mod poller;
mod server;
mod session;
mod socket_file;

pub(crate) use listener::peer_allowed;
pub use poller::{
    confidence, confidence_from_uncertainty, move_off_poller_cores, row_confidence, IdlePolicy,
    OffPollerCores, SharedStats, WorkerStats,
};
pub(crate) use server::SessionLink;
pub use server::{check_socket_dir, Server, ServerStartError};
pub(crate) use socket_file::{bind as bind_socket, SocketFile};
