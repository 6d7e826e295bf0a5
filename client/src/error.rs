//! Client errors: one small `Copy` enum per hot-path operation, and the connect error.

use std::path::PathBuf;

use tie_layouts::abi::{RejectReason, Status};
use tie_layouts::hello::HelloStatus;

use crate::segment::SegmentOpenError;

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing listens at the endpoint's socket.
    #[error(
        "tie server is not running at {}: {source} (start `tie serve`, or point the client at its socket directory: --socket-dir or TIE_SOCKET_DIR)",
        path.display()
    )]
    ServerNotRunning {
        /// The socket path tried.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The socket exists but this user may not connect to it.
    #[error("permission denied connecting to {}: {source}", path.display())]
    PermissionDenied {
        /// The socket path tried.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The process answering at the socket runs as a user this client does not trust: not
    /// this user, not root, and not the uid named in `ConnectOptions::server_uid` (or
    /// `$TIE_SERVER_UID`). Nothing was sent to it.
    #[error("the server at {} runs as uid {server_uid}; this client trusts only its own uid {own_uid}, root{}: refusing to talk to it (if that uid is the server to trust, name it in ConnectOptions::server_uid or TIE_SERVER_UID)", path.display(), trusted.map_or(String::new(), |u| format!(" and uid {u}")))]
    UntrustedServer {
        /// The socket path.
        path: PathBuf,
        /// The server's uid (SO_PEERCRED).
        server_uid: u32,
        /// This process's effective uid.
        own_uid: u32,
        /// The uid named in the options or the environment.
        trusted: Option<u32>,
    },
    /// The endpoint name is not usable.
    #[error(transparent)]
    Endpoint(#[from] crate::endpoint::EndpointNameError),
    /// The options are not usable (message says which and why).
    #[error("invalid connect options: {0}")]
    InvalidOptions(String),
    /// A reconnect was asked for while requests of the ended session have not yet come back
    /// from `poll`.
    #[error("{count} requests of the ended session are still to be polled")]
    RequestsInFlight {
        /// Requests not yet returned by `poll`.
        count: u32,
    },
    /// The client's layout differs from the model's.
    #[error(
        "layout mismatch: client layout hash {ours:#018x}, model's layout hash {theirs:#018x}"
    )]
    LayoutMismatch {
        /// The client's hash.
        ours: u64,
        /// The server's hash for the model.
        theirs: u64,
    },
    /// The server speaks another ABI version.
    #[error("ABI version mismatch: client {ours}, server {theirs}")]
    VersionMismatch {
        /// This build's.
        ours: u32,
        /// The server's.
        theirs: u32,
    },
    /// The server refused the session for another reason.
    #[error("server refused the session ({status:?}): {message}")]
    Refused {
        /// The server's status.
        status: HelloStatus,
        /// The server's reason.
        message: String,
    },
    /// The server's answer is malformed.
    #[error("malformed reply from the server: {0}")]
    BadReply(&'static str),
    /// A socket operation failed.
    #[error("{op} failed: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// Its error.
        source: std::io::Error,
    },
    /// The segment passed by the server is unusable.
    #[error(transparent)]
    Segment(#[from] SegmentOpenError),
}

/// Why [`crate::Client::submit`] did not send a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The feature slice's length is not the layout's count.
    #[error("wrong feature count: layout has {expected}, got {got}")]
    WrongFeatureCount {
        /// The layout's count.
        expected: u32,
        /// The slice's length.
        got: usize,
    },
    /// A feature is NaN or infinite and the model's layout does not allow it.
    #[error("feature {index} is not finite and the layout does not allow it")]
    NonFinite {
        /// Its index.
        index: u32,
    },
    /// As many requests are in flight as the response ring holds (or the request ring is
    /// full): poll responses first.
    #[error("queue full: {in_flight} requests in flight")]
    QueueFull {
        /// Requests in flight.
        in_flight: u32,
    },
    /// The server is gone or closed the session.
    #[error("disconnected from the server")]
    Disconnected,
}

/// Why [`crate::Client::predict`] returned no prediction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PredictError {
    /// The request was not sent.
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// No answer came within the client's timeout (the answer, if it comes, is dropped).
    #[error("no response within {timeout_ms} ms")]
    Timeout {
        /// The timeout.
        timeout_ms: u64,
    },
    /// The server answered with an error status.
    #[error("{0}")]
    Server(ServerError),
    /// Requests sent with `submit` are still in flight; `predict` would mix their answers
    /// with its own.
    #[error("{count} submitted requests are still in flight: poll them first")]
    RequestsInFlight {
        /// How many.
        count: u32,
    },
}

/// An error status from the server, with its details.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerError {
    /// The status (never OK).
    pub status: Status,
    /// First detail word.
    pub detail_a: u32,
    /// Second detail word.
    pub detail_b: u32,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (a, b) = (self.detail_a, self.detail_b);
        match self.status {
            Status::MODEL_NOT_FOUND => write!(f, "model not found (model slot {a})"),
            Status::INVALID_INPUT_SHAPE => {
                write!(f, "invalid input shape: expected {a} features, got {b}")
            }
            Status::EXECUTION_FAILED if a == tie_layouts::abi::EXECUTION_FAILED_NON_FINITE => {
                write!(f, "execution failed: output {b} is NaN or infinite")
            }
            Status::EXECUTION_FAILED => write!(f, "execution failed"),
            Status::OUT_OF_MEMORY => write!(f, "out of memory: requested {a} MB"),
            Status::BATCH_PROCESSING_ERROR => write!(f, "batch processing error"),
            Status::BACKEND_ERROR => write!(f, "backend error"),
            Status::TIMEOUT => write!(f, "deadline passed before execution ({a} ns late)"),
            Status::QUEUE_FULL => write!(f, "server queue full (limit {a})"),
            Status::NOT_READY => write!(f, "model not ready: it failed its last health check"),
            Status::REJECTED => match RejectReason::from_code(a) {
                Some(RejectReason::NonFinite) => {
                    write!(f, "rejected: feature {b} is not finite")
                }
                Some(RejectReason::BadSequence) => {
                    write!(f, "rejected: bad sequence number (expected {b})")
                }
                Some(RejectReason::BadPriority) => write!(f, "rejected: bad priority {b}"),
                Some(RejectReason::BadReserved) => {
                    write!(f, "rejected: flags are not zero")
                }
                None => write!(f, "rejected (reason {a}, detail {b})"),
            },
            Status::DISCONNECTED => write!(f, "disconnected from the server"),
            s => write!(f, "unknown status {} ({a}, {b})", s.0),
        }
    }
}

/// `error` and its causes (its `source()` chain), joined by `: `, leaving out a cause whose
/// text the one before it already holds (an error that prints its source in its own
/// message). How the tools print an error.
pub fn each_cause_once(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    let mut before = String::new();
    let mut next = Some(error);
    while let Some(cause) = next {
        let line = cause.to_string();
        if !before.contains(&line) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&line);
        }
        before = line;
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod each_cause_once_tests {
    use super::each_cause_once;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let os = Layer("No such file or directory (os error 2)", None);
        let read = Layer(
            "cannot read models: No such file or directory (os error 2)",
            Some(Box::new(os)),
        );
        let top = Layer("model repository", Some(Box::new(read)));
        assert_eq!(
            each_cause_once(&top),
            "model repository: cannot read models: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn a_cause_an_earlier_layer_happens_to_contain_is_kept() {
        let cause = Layer("timed out", None);
        let middle = Layer("no answer", Some(Box::new(cause)));
        let top = Layer("model timed out-v2", Some(Box::new(middle)));
        assert_eq!(
            each_cause_once(&top),
            "model timed out-v2: no answer: timed out"
        );
    }
}
