//! The control plane's listener: TCP, or a Unix socket checked by peer credentials; a cap on
//! open connections, a header timeout, and a pause (not a spin) when accepting fails.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};

/// How long a client has to send a request's headers (on a new connection, or the next
/// request on a kept-alive one) before the connection is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long accepting pauses after an accept failed (out of file descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The least time between two warnings about refused connections or failed accepts.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// How long requests in progress may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Where the control plane listens.
pub(super) enum Listener {
    /// `server.http_addr`.
    Tcp(tokio::net::TcpListener),
    /// `<socket_dir>/<endpoint>.http.sock`: peers are admitted as on the ring socket (this
    /// server's user, or a member of `allowed_gid`).
    Unix {
        listener: tokio::net::UnixListener,
        allowed_gid: Option<u32>,
        /// The socket file, removed at shutdown if still this server's.
        file: crate::dataplane::SocketFile,
    },
}

/// Where the control plane listens, for logs and callers.
#[derive(Clone, Debug)]
pub enum HttpEndpoint {
    /// A TCP address.
    Tcp(std::net::SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for HttpEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Counts what is refused or fails, and warns at most once per [`LOG_INTERVAL`].
#[derive(Default)]
struct Refusals {
    over_cap: u64,
    not_allowed: u64,
    accept_failed: u64,
    last_log: Option<Instant>,
}

impl Refusals {
    fn log(&mut self, max_connections: usize, error: Option<&std::io::Error>) {
        if self.last_log.is_some_and(|t| t.elapsed() < LOG_INTERVAL) {
            return;
        }
        tracing::warn!(
            over_cap = self.over_cap,
            peer_not_allowed = self.not_allowed,
            accept_failed = self.accept_failed,
            error = error.map(tracing::field::display),
            max_connections,
            "HTTP connections closed unserved since the last warning (over server.http_max_connections, a peer the socket does not admit, or accept failing: then accepting pauses 100 ms)"
        );
        *self = Self {
            last_log: Some(Instant::now()),
            ..Self::default()
        };
    }
}

/// Serves `app` on `listener` until `stop` resolves: at most `max_connections` connections
/// at once (more are closed at once), each with [`HEADER_TIMEOUT`]. At stop, requests in
/// progress get [`SHUTDOWN_GRACE`] to finish.
pub(super) async fn serve(
    listener: Listener,
    app: Router,
    max_connections: usize,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let graceful = GracefulShutdown::new();
    let mut refusals = Refusals::default();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            a = accept(&listener) => a,
            _ = &mut stop => break,
        };
        let io = match accepted {
            Ok(Some(io)) => io,
            Ok(None) => {
                refusals.not_allowed += 1;
                refusals.log(max_connections, None);
                continue;
            }
            Err(e) => {
                refusals.accept_failed += 1;
                refusals.log(max_connections, Some(&e));
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(io);
            refusals.over_cap += 1;
            refusals.log(max_connections, None);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(io, service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // Errors here are the client's (reset, bad request, header timeout).
            let _ = connection.await;
            drop(slot);
        });
    }
    if let Listener::Unix { file, .. } = &listener {
        file.remove();
    }
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
}

/// A connection's stream, TCP or Unix.
type Io = TokioIo<Box<dyn Stream>>;

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// The next connection; `None` when its peer is not admitted (closed at once).
async fn accept(listener: &Listener) -> std::io::Result<Option<Io>> {
    match listener {
        Listener::Tcp(l) => {
            let (stream, _) = l.accept().await?;
            let _ = stream.set_nodelay(true);
            Ok(Some(TokioIo::new(Box::new(stream))))
        }
        Listener::Unix {
            listener,
            allowed_gid,
            ..
        } => {
            let (stream, _) = listener.accept().await?;
            // The ring socket's rule.
            let admitted = stream.peer_cred().is_ok_and(|c| {
                let pid = c.pid().and_then(rustix::process::Pid::from_raw);
                crate::dataplane::peer_allowed(c.uid(), c.gid(), pid, *allowed_gid)
            });
            Ok(admitted.then(|| TokioIo::new(Box::new(stream) as Box<dyn Stream>)))
        }
    }
}
