//! [`Server`]: starts the listener, the pollers and the monitors, and stops them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use crate::config::ServiceConfig;
use crate::models::LoadedModel;
use crate::models::Models;
use crate::monitor::Monitor;

use super::poller::{self, IdlePolicy, SharedStats, WorkerStats};
use super::{listener, socket_file};

/// State shared by the listener and a poller for one session.
#[derive(Debug)]
pub(crate) struct SessionLink {
    pub id: u64,
    /// Set by the listener when the client hangs up, or by a poller that faulted the session.
    pub dead: AtomicBool,
    /// The hang-ups its poller was told of, counted (see `SessionLink::hang_up`).
    pub hangups: Arc<std::sync::atomic::AtomicU64>,
    /// Who the client is, for the journal.
    pub client: crate::journal::SessionInfo,
}

impl SessionLink {
    /// Marks the session dead for its client hung up, and counts it for its poller (which
    /// then looks for the dead among its cold sessions).
    pub fn hang_up(&self) {
        if !self.dead.swap(true, Ordering::SeqCst) {
            // SYNC(hangups): Release pairs with the poller's Acquire: it sees `dead` set.
            self.hangups
                .fetch_add(1, std::sync::atomic::Ordering::Release);
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerStartError {
    /// The endpoint's socket could not be set up.
    #[error("cannot listen on {}: {source}", path.display())]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The socket directory is not safe to use, or cannot be created.
    #[error("socket directory {}: {reason}", dir.display())]
    SocketDir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong with it, and what to do.
        reason: String,
    },
    /// The file descriptor limit is too low for `server.max_sessions`.
    #[error("server.max_sessions = {max_sessions} needs about {need} file descriptors (two per session, one per HTTP connection of server.http_max_connections, and {FDS_BESIDES_SESSIONS} besides), and RLIMIT_NOFILE allows {soft} (hard limit {hard}): raise the limit (LimitNOFILE= in the unit, ulimit -n), or lower server.max_sessions")]
    FdLimit {
        /// `server.max_sessions`.
        max_sessions: u32,
        /// Descriptors needed.
        need: u64,
        /// The soft limit.
        soft: u64,
        /// The hard limit.
        hard: u64,
    },
    /// Another server answers on the endpoint.
    #[error("another tie server is already listening on {}", path.display())]
    AlreadyRunning {
        /// The socket path.
        path: PathBuf,
    },
    /// The endpoint name is invalid.
    #[error(transparent)]
    Endpoint(#[from] tie_client::endpoint::EndpointNameError),
    /// A thread could not be started.
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
    /// The ClickHouse sink could not start.
    #[error(transparent)]
    ClickHouse(#[from] crate::monitor::clickhouse::ClickHouseStartError),
    /// The journal could not start.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalStartError),
    /// `server.huge_pages` is set and no segment can be placed on huge pages.
    #[error("server.huge_pages = true but a session segment cannot be placed on 2 MB huge pages ({0}): reserve them with vm.nr_hugepages (one per session), or set huge_pages = false")]
    HugePages(tie_client::segment::SegmentOpenError),
}

/// File descriptors the server keeps besides its sessions' and its HTTP connections': the
/// control plane's sessions, interval logs, model files and the runtimes.
pub const FDS_BESIDES_SESSIONS: u64 = 256;

/// Makes sure `max_sessions` sessions (a socket and a segment each) fit under `RLIMIT_NOFILE`:
/// raises the soft limit to what is needed when the hard one allows it, else refuses.
fn ensure_fd_limit(server: &crate::config::ServerSection) -> Result<(), ServerStartError> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let max_sessions = server.max_sessions;
    let need =
        2 * u64::from(max_sessions) + u64::from(server.http_max_connections) + FDS_BESIDES_SESSIONS;
    let limit = getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(u64::MAX);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    if soft >= need {
        return Ok(());
    }
    let refused = ServerStartError::FdLimit {
        max_sessions,
        need,
        soft,
        hard,
    };
    if hard < need {
        return Err(refused);
    }
    let raised = Rlimit {
        current: Some(need),
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::info!(
                from = soft,
                to = need,
                need,
                "raised the file descriptor limit (RLIMIT_NOFILE) for server.max_sessions"
            );
            Ok(())
        }
        Err(_) => Err(refused),
    }
}

/// Checks the endpoint's socket directory as [`Server::start`] will (creating it if missing),
/// and that no server answers at the endpoint, so that either is refused before the models
/// load.
///
/// # Errors
/// [`ServerStartError::SocketDir`], [`ServerStartError::Endpoint`] or
/// [`ServerStartError::AlreadyRunning`].
pub fn check_socket_dir(config: &ServiceConfig) -> Result<(), ServerStartError> {
    let path = tie_client::endpoint::socket_path(
        config.server.socket_dir.as_deref(),
        &config.server.endpoint,
    )?;
    let dir = path.parent().unwrap_or(std::path::Path::new("/"));
    socket_file::open_socket_dir(dir, config.server.allowed_gid)?;
    // A server answering at the endpoint already: said now, not after the models load.
    if socket_file::server_answers(&path) {
        return Err(ServerStartError::AlreadyRunning { path });
    }
    Ok(())
}

/// Whether a segment can be made on huge pages: one is made and dropped.
fn huge_pages_usable() -> Result<(), tie_client::segment::SegmentOpenError> {
    use tie_client::layouts::abi::{SegmentGeometry, HUGE_PAGE_SIZE};
    let geometry = SegmentGeometry::new(1, 1, 1)
        .expect("a valid geometry")
        .padded_to(HUGE_PAGE_SIZE);
    tie_client::segment::Segment::create_in(geometry, geometry.info(0, 0, 1, 0), true).map(drop)
}

/// A running server.
pub struct Server {
    /// Tells the pollers to answer what they hold and stop.
    stopping: Arc<AtomicBool>,
    /// Tells the listener to stop accepting.
    listener_stopping: Arc<AtomicBool>,
    workers: Vec<JoinHandle<WorkerStats>>,
    stats: Vec<Arc<SharedStats>>,
    models: Arc<Models>,
    listener: Option<JoinHandle<listener::Sessions>>,
    socket_path: PathBuf,
    /// The socket file as bound: removed at shutdown if it is still this server's.
    socket_file: Arc<socket_file::SocketFile>,
    monitor: Arc<Monitor>,
    /// Stops the monitor and health threads.
    background_stopping: Arc<AtomicBool>,
    background: Vec<JoinHandle<()>>,
}

impl Server {
    /// Starts the listener and the pollers for `models`.
    ///
    /// # Errors
    /// [`ServerStartError`] when the socket cannot be bound (or another server holds it) or a
    /// thread cannot start.
    pub fn start(
        config: &ServiceConfig,
        models: Vec<LoadedModel>,
    ) -> Result<Self, ServerStartError> {
        let socket_path = tie_client::endpoint::socket_path(
            config.server.socket_dir.as_deref(),
            &config.server.endpoint,
        )?;
        ensure_fd_limit(&config.server)?;
        if config.server.huge_pages {
            huge_pages_usable().map_err(ServerStartError::HugePages)?;
        }
        let (listen, socket_file) = socket_file::bind(&socket_path, config.server.allowed_gid)?;
        let socket_file = Arc::new(socket_file);
        let monitor = Arc::new(Monitor::new(
            Vec::new(),
            config.performance_thresholds.clone(),
            config.monitoring.clone(),
        ));
        // The sink first (its password file is the likelier mistake), stopped if what follows
        // fails, as the journal is.
        let clickhouse = crate::monitor::clickhouse::ClickHouse::start(&config.clickhouse)?;
        let mut sink_started = crate::monitor::clickhouse::FinishOnDrop(clickhouse.clone());
        let journal = crate::journal::Journal::start(&config.journal, &config.server.poller_cores)?;
        if let Some(j) = &journal {
            let _ = monitor.journal.set(j.clone());
        }
        let mut started = crate::journal::FinishOnDrop(journal.clone());
        if let Some(ch) = clickhouse {
            if let Some(j) = journal.as_ref().filter(|_| ch.wants_journal()) {
                let _ = j.clickhouse.set(ch.clone());
            }
            let _ = monitor.clickhouse.set(ch);
        }
        let models = Arc::new(Models::new(models, monitor.clone()));
        let all_models = models.clone();
        let stopping = Arc::new(AtomicBool::new(false));

        let pollers = start_pollers(config, &models, &monitor, &stopping, &journal)?;
        let listener_stopping = Arc::new(AtomicBool::new(false));
        let ctx = listener::ListenerContext {
            listener: listen,
            models,
            workers: pollers.senders,
            stopping: listener_stopping.clone(),
            allowed_gid: config.server.allowed_gid,
            max_sessions: config.server.max_sessions as usize,
            max_segment_bytes: (config.server.max_segment_mb as usize) << 20,
            inspectors: Arc::default(),
            huge_pages: config.server.huge_pages,
            pollers_by_model: Default::default(),
            socket_file: socket_file.clone(),
            hangups: pollers.hangups,
        };
        let listener = std::thread::Builder::new()
            .name("tie-listener".into())
            .spawn(move || listener::listener_task(ctx))
            .map_err(ServerStartError::Thread)?;
        let background_stopping = Arc::new(AtomicBool::new(false));
        let background = start_monitors(config, &monitor, &all_models, &background_stopping)?;
        // The pollers' lanes tap the shadows at their next flush.
        let shadows = crate::journal::shadow::Shadows::start(
            all_models.clone(),
            journal.clone(),
            &config.server.poller_cores,
        )
        .map_err(ServerStartError::Thread)?;
        let _ = monitor.shadows.set(shadows);
        let workers = pollers.handles;
        let stats = pollers.stats;
        tracing::debug!(socket = %socket_path.display(), pollers = workers.len(), "rings accepting");
        started.0 = None;
        sink_started.0 = None;
        Ok(Self {
            stopping,
            listener_stopping,
            workers,
            stats,
            models: all_models,
            listener: Some(listener),
            socket_path,
            socket_file,
            monitor,
            background_stopping,
            background,
        })
    }

    /// The performance monitor.
    pub fn monitor(&self) -> &Arc<Monitor> {
        &self.monitor
    }

    /// The models served (slots as the monitor indexes them); a
    /// [`crate::models::ModelManager`] changes them while the server runs.
    pub fn models(&self) -> &Arc<Models> {
        &self.models
    }

    /// Counters of all pollers, summed (as of each poller's last busy round).
    pub fn stats(&self) -> WorkerStats {
        self.stats
            .iter()
            .map(|s| s.load())
            .fold(WorkerStats::default(), |a, b| WorkerStats {
                requests: a.requests + b.requests,
                responses: a.responses + b.responses,
                batches: a.batches + b.batches,
                rows: a.rows + b.rows,
            })
    }

    /// Batch counters per model (`name:version`), summed over pollers: timeouts, rejections,
    /// executed requests and their queueing time per priority, batches and rows.
    pub fn batch_stats(&self) -> Vec<(String, crate::dataplane::batch::BatchStats)> {
        let set = self.models.snapshot();
        let mut total: Vec<crate::dataplane::batch::BatchStats> =
            vec![Default::default(); set.slots()];
        for shared in &self.stats {
            for (t, s) in total.iter_mut().zip(shared.load_batch()) {
                for p in 0..crate::models::PRIORITIES {
                    t.timeouts[p] += s.timeouts[p];
                    t.rejections[p] += s.rejections[p];
                    t.executed[p] += s.executed[p];
                    t.queue_ns[p] += s.queue_ns[p];
                }
                t.batches += s.batches;
                t.padded_rows += s.padded_rows;
            }
        }
        total
            .into_iter()
            .enumerate()
            .filter_map(|(slot, t)| Some((set.get(slot)?.key(), t)))
            .collect()
    }

    /// The endpoint's socket path.
    pub fn socket_path(&self) -> &std::path::Path {
        &self.socket_path
    }

    /// Poller threads running.
    pub fn pollers(&self) -> usize {
        self.workers.len()
    }

    /// Stops accepting, answers every frame already submitted, marks sessions closing, then
    /// closes their sockets and removes the endpoint's socket file (if it is still this
    /// server's: another server's socket at the same path is left alone).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if self.listener.is_none() && self.workers.is_empty() {
            return;
        }
        // First no new session, then the pollers answer every frame already in the rings and
        // mark their sessions closing, then the sockets close.
        self.listener_stopping.store(true, Ordering::SeqCst);
        let sessions = self.listener.take().map(|l| l.join());
        self.socket_file.remove();
        self.stopping.store(true, Ordering::SeqCst);
        for w in self.workers.drain(..) {
            match w.join() {
                Ok(stats) => tracing::info!(
                    requests = stats.requests,
                    responses = stats.responses,
                    batches = stats.batches,
                    "poller stopped"
                ),
                Err(_) => tracing::error!("a poller panicked"),
            }
        }
        // The sessions' sockets close here, after every response was written.
        drop(sessions);
        // The pollers handed their last rows over: the shadow runs what is queued (its journal
        // rows handed over in turn), and they reach the files.
        if let Some(s) = self.monitor.shadows.get() {
            s.finish();
        }
        if let Some(j) = self.monitor.journal.get() {
            j.finish();
        }
        self.background_stopping.store(true, Ordering::SeqCst);
        for b in self.background.drain(..) {
            let _ = b.join();
        }
        // The monitor's last interval and the journal's last rows are buffered: sent now.
        if let Some(ch) = self.monitor.clickhouse.get() {
            ch.finish();
        }
        tracing::info!("server stopped");
    }
}

/// The poller threads, as [`start_pollers`] leaves them.
struct Pollers {
    /// Where the listener hands each poller its new sessions.
    senders: Vec<mpsc::Sender<poller::NewSession>>,
    handles: Vec<JoinHandle<WorkerStats>>,
    stats: Vec<Arc<SharedStats>>,
    /// Each poller's count of its sessions' hang-ups.
    hangups: Vec<Arc<std::sync::atomic::AtomicU64>>,
}

/// One poller per configured core (one unpinned poller when none is configured).
fn start_pollers(
    config: &ServiceConfig,
    models: &Arc<Models>,
    monitor: &Arc<Monitor>,
    stopping: &Arc<AtomicBool>,
    journal: &Option<Arc<crate::journal::Journal>>,
) -> Result<Pollers, ServerStartError> {
    let cores: Vec<Option<usize>> = if config.server.poller_cores.is_empty() {
        vec![None]
    } else {
        config
            .server
            .poller_cores
            .iter()
            .map(|&c| Some(c))
            .collect()
    };
    let idle = IdlePolicy::from_config(&config.server);
    let mut pollers = Pollers {
        senders: Vec::new(),
        handles: Vec::new(),
        stats: Vec::new(),
        hangups: Vec::new(),
    };
    for (i, core) in cores.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel();
        pollers.senders.push(tx);
        let hangups = Arc::new(std::sync::atomic::AtomicU64::new(0));
        pollers.hangups.push(hangups.clone());
        let shared = Arc::new(SharedStats::default());
        pollers.stats.push(shared.clone());
        let ctx = poller::PollerContext {
            index: i,
            core,
            poller_cores: config.server.poller_cores.clone(),
            hangups,
            models: models.clone(),
            new_sessions: rx,
            stopping: stopping.clone(),
            idle,
            shared,
            monitor: monitor.clone(),
            journal: journal.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("tie-poller-{i}"))
            .spawn(move || poller::poller_task(ctx))
            .map_err(ServerStartError::Thread)?;
        pollers.handles.push(handle);
    }
    Ok(pollers)
}

/// The performance monitor's and the health monitor's threads.
fn start_monitors(
    config: &ServiceConfig,
    monitor: &Arc<Monitor>,
    models: &Arc<Models>,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<JoinHandle<()>>, ServerStartError> {
    let (m, s) = (monitor.clone(), stop.clone());
    let monitor_thread = std::thread::Builder::new()
        .name("tie-monitor".into())
        .spawn(move || crate::monitor::monitor_task(m, s))
        .map_err(ServerStartError::Thread)?;
    let (m, s) = (models.clone(), stop.clone());
    let every = std::time::Duration::from_secs(u64::from(
        config.model_deployment.health_check_interval_sec,
    ));
    let health_thread = std::thread::Builder::new()
        .name("tie-health".into())
        .spawn(move || crate::models::health::health_task(m, every, s))
        .map_err(ServerStartError::Thread)?;
    Ok(vec![monitor_thread, health_thread])
}

impl Drop for Server {
    /// A server dropped without [`Server::shutdown`] stops the same way.
    fn drop(&mut self) {
        self.stop();
    }
}
