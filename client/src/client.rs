//! [`Client`]: one session with a tie server.

use std::collections::VecDeque;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tie_layouts::abi::{
    self, RequestHeader, ResponseFrame, ServerState, Status, MAX_OUTPUTS, REQUEST_HEADER_WORDS,
    RESPONSE_WORDS,
};
use tie_layouts::hello::REPLY_ALLOW_NON_FINITE;
use tie_layouts::ring::PushError;
use tie_layouts::FeatureLayout;

use crate::clock::monotonic_ns;
use crate::error::{ConnectError, PredictError, ServerError, SubmitError};
use crate::handshake::{handshake, HelloParams};
use crate::segment::{RingEnds, Segment, Side};
use crate::wait::WaitStrategy;

/// Priority of a request: higher is served first by the batcher.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum Priority {
    /// Background work.
    Low = 0,
    /// The default.
    #[default]
    Normal = 1,
    /// Ahead of normal work.
    High = 2,
    /// Never waits for a batch to fill.
    Critical = 3,
}

/// Id of a submitted request, unique within its client (new sessions opened by a reconnect go
/// on from the last id).
pub type RequestId = u64;

/// Options of [`Client::connect`]. `Default` gives 64-slot rings, busy-spin waiting, a 1 s
/// timeout and reconnecting with the default [`Backoff`].
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Model version to pin; `None` for the server's default (the highest).
    pub version: Option<u32>,
    /// The layout the client writes; checked against the model's at connect. `None` takes the
    /// model's layout as it is (its feature count is still enforced).
    pub layout: Option<FeatureLayout>,
    /// Request ring slots (a power of two).
    pub request_capacity: u32,
    /// Response ring slots (a power of two): also the most requests in flight at once.
    pub response_capacity: u32,
    /// How `predict` waits.
    pub wait: WaitStrategy,
    /// How long `predict` waits for an answer.
    pub timeout: Duration,
    /// How long connecting may take, including waiting for a model the server is loading
    /// again after unloading it for going unused (refused with `HelloStatus::Loading` until
    /// then).
    pub connect_timeout: Duration,
    /// Socket directory; `None` for `$TIE_SOCKET_DIR`, else `$XDG_RUNTIME_DIR/tie` then
    /// `/run/tie` (the first that holds the endpoint's socket).
    pub socket_dir: Option<PathBuf>,
    /// A uid trusted as the server's besides this process's own and root's; `None` for
    /// `$TIE_SERVER_UID` if set. The server's uid is read from the socket (SO_PEERCRED) before
    /// anything is sent; any other is refused with [`ConnectError::UntrustedServer`].
    pub server_uid: Option<u32>,
    /// Whether and how often the client opens a new session once its session has ended (the
    /// server was restarted, or it closed the session): see [`Client::submit`]. `None` leaves
    /// it to [`Client::reconnect`].
    pub reconnect: Option<Backoff>,
}

/// Delays between reconnect attempts: the first attempt once the session is seen to have
/// ended and every request in flight has been answered, then after `initial`, doubling up to
/// `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failed attempt.
    pub initial: Duration,
    /// Longest delay between two attempts.
    pub max: Duration,
}

impl Default for Backoff {
    /// 10 ms, doubling up to 1 s.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(10),
            max: Duration::from_secs(1),
        }
    }
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            version: None,
            layout: None,
            request_capacity: 64,
            response_capacity: 64,
            wait: WaitStrategy::BusySpin,
            timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(5),
            socket_dir: None,
            server_uid: None,
            reconnect: Some(Backoff::default()),
        }
    }
}

/// A response to one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Response {
    /// The request's id.
    pub request_id: RequestId,
    /// OK, an error status from the server, or [`Status::DISCONNECTED`] made by the client.
    pub status: Status,
    /// Version of the model that answered (0 when none did).
    pub model_version: u32,
    /// Confidence of the prediction.
    pub confidence: f32,
    /// Status details (see [`Status`]).
    pub detail_a: u32,
    /// Second status detail.
    pub detail_b: u32,
    /// Server-side queueing time.
    pub queue_ns: u64,
    /// Server-side compute time of the batch.
    pub compute_ns: u64,
    /// From submit to this response being read, measured by the client (CLOCK_MONOTONIC);
    /// 0 for a response made by the client ([`Status::DISCONNECTED`]).
    pub round_trip_ns: u64,
    output_count: u32,
    outputs: [f32; MAX_OUTPUTS],
}

impl Response {
    /// The output values (empty on error).
    pub fn outputs(&self) -> &[f32] {
        &self.outputs[..self.output_count as usize]
    }

    /// The error, if the status is not OK.
    pub fn error(&self) -> Option<ServerError> {
        (!self.status.is_ok()).then_some(ServerError {
            status: self.status,
            detail_a: self.detail_a,
            detail_b: self.detail_b,
        })
    }

    fn disconnected(request_id: RequestId) -> Self {
        Self {
            request_id,
            status: Status::DISCONNECTED,
            model_version: 0,
            confidence: 0.0,
            detail_a: 0,
            detail_b: 0,
            queue_ns: 0,
            compute_ns: 0,
            round_trip_ns: 0,
            output_count: 0,
            outputs: [0.0; MAX_OUTPUTS],
        }
    }

    fn from_frame(frame: &ResponseFrame) -> Self {
        let output_count = if frame.status == Status::OK.0 {
            frame.output_count.min(MAX_OUTPUTS as u32)
        } else {
            0
        };
        Self {
            request_id: frame.request_id,
            status: Status(frame.status),
            model_version: frame.model_version,
            confidence: frame.confidence,
            detail_a: frame.detail_a,
            detail_b: frame.detail_b,
            queue_ns: u64::from(frame.queue_ns),
            compute_ns: u64::from(frame.compute_ns),
            round_trip_ns: 0,
            output_count,
            outputs: frame.outputs,
        }
    }
}

/// A successful answer of [`Client::predict`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    /// The response it came in.
    pub response: Response,
    /// Nanoseconds from submit to the response being read.
    pub round_trip_ns: u64,
}

impl Prediction {
    /// The output values.
    pub fn outputs(&self) -> &[f32] {
        self.response.outputs()
    }
}

/// A request sent and not yet answered.
#[derive(Clone, Copy, Debug)]
struct Pending {
    id: RequestId,
    /// CLOCK_MONOTONIC ns at submit.
    sent_ns: u64,
    /// Given up by a `predict` that timed out: its answer is dropped, not returned by `poll`.
    abandoned: bool,
}

/// How often an idle `poll` with requests in flight checks that the server is still there.
const LIVENESS_CHECK_INTERVAL: Duration = Duration::from_millis(1);
/// Empty polls between two looks at the clock for the liveness check (keeps the clock off the
/// spin loop).
const POLLS_PER_CLOCK_CHECK: u32 = 256;

/// A session with a tie server: submit feature frames, poll responses.
///
/// Not `Sync`: one thread drives a session (the rings are single-producer, single-consumer).
/// Every submitted request gets exactly one [`Response`] from [`Client::poll`], in submission
/// order; if the server goes away, the requests still in flight come back with
/// [`Status::DISCONNECTED`].
#[derive(Debug)]
pub struct Client {
    rings: RingEnds,
    socket: UnixStream,
    feature_count: u32,
    output_count: u32,
    model_version: u32,
    layout_hash: u64,
    /// The server's description of the model's backend (`<architecture> <device>`).
    description: String,
    allow_non_finite: bool,
    /// Requests in flight in submission order; never more than the response ring holds.
    pending: VecDeque<Pending>,
    max_in_flight: usize,
    next_seq: u64,
    next_request_id: RequestId,
    /// One request slot, reused for every frame.
    frame: Vec<u64>,
    wait: WaitStrategy,
    timeout: Duration,
    /// The server is gone or closed the session.
    disconnected: bool,
    /// Round trip of the latest response read and not yet reported in a frame (ns, 0: none).
    unreported_round_trip_ns: u32,
    /// Submits refused because the rings were full.
    queue_full_count: u64,
    /// Empty polls with requests in flight since the last liveness check.
    empty_polls: u32,
    last_liveness_check: Instant,
    /// How the session was opened, to open the next one.
    origin: Origin,
    /// Sessions opened after the first.
    reconnects: u64,
    /// When the automatic reconnect may try again (`None`: at once).
    next_attempt: Option<Instant>,
    /// The delay before the next attempt after this one fails (zero: `initial`).
    backoff: Duration,
    /// Why the latest reconnect attempt failed.
    last_reconnect_error: Option<String>,
}

/// The longest an automatic reconnect attempt (in `submit`) waits for the server's reply.
const AUTO_RECONNECT_TIMEOUT: Duration = Duration::from_millis(100);

/// What a session was opened with.
#[derive(Debug)]
struct Origin {
    path: PathBuf,
    model: String,
    /// A uid trusted as the server's besides this process's and root's.
    server_uid: Option<u32>,
    /// The version asked for (0: the default).
    version: u32,
    request_capacity: u32,
    response_capacity: u32,
    connect_timeout: Duration,
    reconnect: Option<Backoff>,
}

/// A session as a handshake opened it.
struct Opened {
    rings: RingEnds,
    socket: UnixStream,
    description: String,
    allow_non_finite: bool,
}

impl Origin {
    /// Handshakes (waiting out `Loading` within `timeout`) and maps the segment.
    fn open(&self, layout_hash: u64, timeout: Duration) -> Result<Opened, ConnectError> {
        let params = HelloParams {
            model: &self.model,
            server_uid: self.server_uid,
            model_version: self.version,
            layout_hash,
            request_capacity: self.request_capacity,
            response_capacity: self.response_capacity,
        };
        // A model loading again after going unused is waited for, within the timeout.
        let deadline = Instant::now() + timeout;
        let (socket, reply, fd) = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match handshake(&self.path, &params, left.max(Duration::from_millis(1))) {
                Err(ConnectError::Refused {
                    status: tie_layouts::HelloStatus::Loading,
                    ..
                }) if left > Duration::from_millis(20) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        let segment = Segment::open(fd, reply.segment_size)?;
        let info = *segment.info();
        if info.request_capacity != self.request_capacity
            || info.response_capacity != self.response_capacity
            || info.feature_count != reply.feature_count
            || info.output_count != reply.output_count
            || info.session_id != reply.session_id
        {
            return Err(ConnectError::BadReply("segment differs from the reply"));
        }
        if layout_hash != 0 && info.layout_hash != layout_hash {
            return Err(ConnectError::LayoutMismatch {
                ours: layout_hash,
                theirs: info.layout_hash,
            });
        }
        socket
            .set_nonblocking(true)
            .map_err(|source| ConnectError::Io {
                op: "set_nonblocking",
                source,
            })?;
        Ok(Opened {
            rings: RingEnds::new(segment, Side::Client),
            socket,
            description: reply.message().to_string(),
            allow_non_finite: reply.flags & REPLY_ALLOW_NON_FINITE != 0,
        })
    }
}

impl Client {
    /// Opens a session with the server at `endpoint` for `model`.
    ///
    /// # Errors
    /// [`ConnectError`]: the server is not running, the layout or ABI version differs, the
    /// model is unknown, or the options are invalid.
    pub fn connect(
        endpoint: &str,
        model: &str,
        options: ConnectOptions,
    ) -> Result<Self, ConnectError> {
        let path = crate::endpoint::client_socket_path(options.socket_dir.as_deref(), endpoint)?;
        let server_uid = crate::endpoint::trusted_server_uid(options.server_uid)
            .map_err(ConnectError::InvalidOptions)?;
        for (what, capacity) in [
            ("request_capacity", options.request_capacity),
            ("response_capacity", options.response_capacity),
        ] {
            if !capacity.is_power_of_two() || capacity > abi::MAX_RING_CAPACITY {
                return Err(ConnectError::InvalidOptions(format!(
                    "{what} {capacity} is not a power of two in 1..={}",
                    abi::MAX_RING_CAPACITY
                )));
            }
        }
        if let Some(b) = options.reconnect {
            if b.initial.is_zero() || b.max < b.initial {
                return Err(ConnectError::InvalidOptions(format!(
                    "reconnect backoff {b:?}: initial must be positive and at most max"
                )));
            }
        }
        let origin = Origin {
            path,
            model: model.to_string(),
            server_uid,
            version: options.version.unwrap_or(0),
            request_capacity: options.request_capacity,
            response_capacity: options.response_capacity,
            connect_timeout: options.connect_timeout,
            reconnect: options.reconnect,
        };
        let layout_hash = options.layout.as_ref().map_or(0, FeatureLayout::hash);
        let opened = origin.open(layout_hash, options.connect_timeout)?;
        let info = *opened.rings.segment().info();
        let slot_words = opened.rings.segment().geometry().request_slot_size / 8;
        Ok(Self {
            rings: opened.rings,
            socket: opened.socket,
            feature_count: info.feature_count,
            output_count: info.output_count,
            model_version: info.model_version,
            layout_hash: info.layout_hash,
            description: opened.description,
            allow_non_finite: opened.allow_non_finite,
            pending: VecDeque::with_capacity(info.response_capacity as usize),
            max_in_flight: info.response_capacity as usize,
            next_seq: 0,
            next_request_id: 1,
            frame: vec![0; slot_words],
            wait: options.wait,
            timeout: options.timeout,
            disconnected: false,
            empty_polls: 0,
            unreported_round_trip_ns: 0,
            queue_full_count: 0,
            last_liveness_check: Instant::now(),
            origin,
            reconnects: 0,
            next_attempt: None,
            backoff: Duration::ZERO,
            last_reconnect_error: None,
        })
    }

    /// Opens a new session in place of one that has ended (the server went away and came
    /// back, or closed the session), with the same model, version (or the default), layout
    /// and ring sizes; waits up to the connect timeout for a model that is loading. Request
    /// ids go on from the old session's, so no id is answered twice. Does nothing while the
    /// session stands.
    ///
    /// # Errors
    /// [`ConnectError::RequestsInFlight`] until every request of the old session has come
    /// back from [`Client::poll`] (as `DISCONNECTED`, or answered); otherwise the errors of
    /// [`Client::connect`], among them [`ConnectError::LayoutMismatch`] when the model's
    /// layout is no longer the session's.
    pub fn reconnect(&mut self) -> Result<(), ConnectError> {
        if !self.disconnected && !self.server_gone() {
            return Ok(());
        }
        self.disconnected = true;
        self.reopen(self.origin.connect_timeout)
    }

    /// Why the latest reconnect attempt failed (cleared when one succeeds): the automatic
    /// attempts of `submit` report only `Disconnected`.
    pub fn last_reconnect_error(&self) -> Option<&str> {
        self.last_reconnect_error.as_deref()
    }

    /// Replaces the ended session with a new one, once every request of it has come back;
    /// a failure to open one is kept for [`Client::last_reconnect_error`].
    fn reopen(&mut self, timeout: Duration) -> Result<(), ConnectError> {
        // The answers of requests a `predict` gave up on are dropped anyway.
        self.pending.retain(|p| !p.abandoned);
        if !self.pending.is_empty() {
            return Err(ConnectError::RequestsInFlight {
                count: self.pending.len() as u32,
            });
        }
        // The old session ends here for the server too (it may not know yet, when this side
        // found the ring corrupt), so it does not hold a place while the new one is asked for.
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        let opened = self.origin.open(self.layout_hash, timeout).and_then(|o| {
            let info = o.rings.segment().info();
            if info.feature_count != self.feature_count || info.output_count != self.output_count {
                return Err(ConnectError::BadReply(
                    "the model's feature or output count changed",
                ));
            }
            Ok(o)
        });
        let opened = match opened {
            Ok(o) => o,
            Err(e) => {
                self.last_reconnect_error = Some(e.to_string());
                return Err(e);
            }
        };
        let info = *opened.rings.segment().info();
        self.rings = opened.rings;
        self.socket = opened.socket;
        self.model_version = info.model_version;
        self.description = opened.description;
        self.allow_non_finite = opened.allow_non_finite;
        self.next_seq = 0;
        self.disconnected = false;
        self.unreported_round_trip_ns = 0;
        self.empty_polls = 0;
        self.last_liveness_check = Instant::now();
        self.reconnects += 1;
        self.next_attempt = None;
        self.backoff = Duration::ZERO;
        self.last_reconnect_error = None;
        Ok(())
    }

    /// The automatic reconnect of `submit`: one quick attempt when the backoff allows.
    #[cold]
    fn try_reconnect(&mut self) -> bool {
        let Some(policy) = self.origin.reconnect else {
            return false;
        };
        let now = Instant::now();
        if self.next_attempt.is_some_and(|at| now < at) {
            return false;
        }
        // Quick: a server that is up answers a hello in well under a millisecond; one that is
        // loading the model is tried again after the backoff.
        let timeout = self.origin.connect_timeout.min(AUTO_RECONNECT_TIMEOUT);
        match self.reopen(timeout) {
            Ok(()) => return true,
            // Not an attempt: the old session's answers are still to be polled.
            Err(ConnectError::RequestsInFlight { .. }) => return false,
            Err(_) => {}
        }
        self.backoff = if self.backoff.is_zero() {
            policy.initial
        } else {
            self.backoff.saturating_mul(2).min(policy.max)
        };
        // A backoff past what an `Instant` holds: a day.
        let now = Instant::now();
        self.next_attempt = Some(
            now.checked_add(self.backoff)
                .unwrap_or(now + Duration::from_secs(86_400)),
        );
        false
    }

    /// Sessions opened after the first one (by [`Client::reconnect`] or automatically).
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Features every request must carry.
    pub fn feature_count(&self) -> u32 {
        self.feature_count
    }

    /// Output values of every prediction.
    pub fn output_count(&self) -> u32 {
        self.output_count
    }

    /// Version of the model serving this session.
    pub fn model_version(&self) -> u32 {
        self.model_version
    }

    /// Hash of the model's layout.
    pub fn layout_hash(&self) -> u64 {
        self.layout_hash
    }

    /// The server's description of what serves the model: `<architecture> <device>`, e.g.
    /// `mlp cpu`.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Server-assigned session id.
    pub fn session_id(&self) -> u64 {
        self.rings.segment().info().session_id
    }

    /// The session's segment, for tools and tests that look at (or deliberately corrupt) the
    /// shared memory. Writing to it can only harm this session.
    pub fn segment(&self) -> &std::sync::Arc<Segment> {
        self.rings.segment()
    }

    /// Pushes a frame as given, with no checks, and expects a response to `request_id`:
    /// for tests of the server's validation. Takes the next sequence number's place.
    ///
    /// # Errors
    /// [`SubmitError::QueueFull`] when the ring is full or too many requests are in flight,
    /// [`SubmitError::Disconnected`] when the server is gone.
    #[doc(hidden)]
    pub fn submit_raw(&mut self, words: &[u64], request_id: RequestId) -> Result<(), SubmitError> {
        if self.disconnected {
            return Err(SubmitError::Disconnected);
        }
        if self.pending.len() >= self.max_in_flight {
            return Err(SubmitError::QueueFull {
                in_flight: self.pending.len() as u32,
            });
        }
        match self.rings.try_push(words) {
            Ok(()) => {}
            Err(PushError::Full) => {
                return Err(SubmitError::QueueFull {
                    in_flight: self.pending.len() as u32,
                })
            }
            Err(PushError::Corrupt(_)) => {
                self.disconnected = true;
                return Err(SubmitError::Disconnected);
            }
        }
        self.rings.publish();
        self.next_seq += 1;
        self.pending.push_back(Pending {
            id: request_id,
            sent_ns: monotonic_ns(),
            abandoned: false,
        });
        Ok(())
    }

    /// The sequence number the next frame must carry.
    #[doc(hidden)]
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Requests submitted and not yet returned by `poll`.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Requests submitted whose answers `poll` will return: those in flight less the ones a
    /// timed-out `predict` gave up on (their answers are dropped when they come).
    pub fn awaited(&self) -> usize {
        self.pending.iter().filter(|p| !p.abandoned).count()
    }

    /// Sends one request without waiting. Never blocks and never allocates while the session
    /// stands.
    ///
    /// `deadline_ns` is a CLOCK_MONOTONIC time ([`crate::monotonic_ns`]) after which the server
    /// answers `Timeout` instead of executing the request.
    ///
    /// Once the session has ended and every request in flight has come back from
    /// [`Client::poll`], `submit` opens a new session (with [`ConnectOptions::reconnect`]):
    /// one attempt per backoff step, each a connect and a handshake in which each step (connect,
    /// send, reply) waits at most 100 ms. Until one succeeds, it returns `Disconnected`
    /// ([`Client::last_reconnect_error`] says why). A session that ended while no request was
    /// in flight is noticed by the next request, which comes back `Disconnected`.
    ///
    /// # Errors
    /// [`SubmitError`]: wrong feature count, a non-finite feature the layout does not allow,
    /// too many requests in flight, or the server gone.
    pub fn submit(
        &mut self,
        features: &[f32],
        priority: Priority,
        deadline_ns: Option<u64>,
    ) -> Result<RequestId, SubmitError> {
        if self.disconnected && !self.try_reconnect() {
            return Err(SubmitError::Disconnected);
        }
        if features.len() != self.feature_count as usize {
            return Err(SubmitError::WrongFeatureCount {
                expected: self.feature_count,
                got: features.len(),
            });
        }
        if !self.allow_non_finite {
            if let Some(index) = features.iter().position(|f| !f.is_finite()) {
                return Err(SubmitError::NonFinite {
                    index: index as u32,
                });
            }
        }
        if self.pending.len() >= self.max_in_flight {
            return Err(self.queue_full());
        }
        let request_id = self.next_request_id;
        let now_ns = monotonic_ns();
        let header = RequestHeader {
            seq: self.next_seq,
            request_id,
            deadline_ns: deadline_ns.unwrap_or(0),
            send_ts_ns: now_ns,
            model_slot: 0,
            priority: priority as u32,
            feature_count: self.feature_count,
            reported_round_trip_ns: self.unreported_round_trip_ns,
        };
        self.frame[..REQUEST_HEADER_WORDS]
            .copy_from_slice(bytemuck::cast_slice(bytemuck::bytes_of(&header)));
        let body: &mut [f32] = bytemuck::cast_slice_mut(&mut self.frame[REQUEST_HEADER_WORDS..]);
        body[..features.len()].copy_from_slice(features);
        let words = abi::request_words(self.feature_count);
        match self.rings.try_push(&self.frame[..words]) {
            Ok(()) => {}
            Err(PushError::Full) => return Err(self.queue_full()),
            Err(PushError::Corrupt(_)) => {
                self.disconnected = true;
                return Err(SubmitError::Disconnected);
            }
        }
        self.rings.publish();
        self.next_seq += 1;
        self.next_request_id += 1;
        self.unreported_round_trip_ns = 0;
        self.pending.push_back(Pending {
            id: request_id,
            sent_ns: now_ns,
            abandoned: false,
        });
        Ok(request_id)
    }

    /// Counts a refused submit (for observers of the segment) and makes its error.
    fn queue_full(&mut self) -> SubmitError {
        self.queue_full_count += 1;
        self.rings
            .segment()
            .set_client_queue_full(self.queue_full_count);
        SubmitError::QueueFull {
            in_flight: self.pending.len() as u32,
        }
    }

    /// Returns the next response, if one is ready. Never blocks and never allocates.
    ///
    /// When the server has gone away, each request still in flight is returned once with
    /// [`Status::DISCONNECTED`].
    pub fn poll(&mut self) -> Option<Response> {
        loop {
            let response = self.poll_any()?;
            let position = self
                .pending
                .iter()
                .position(|p| p.id == response.request_id);
            match position {
                Some(i) => {
                    let pending = self.pending.remove(i).expect("index from position");
                    let mut response = response;
                    if response.status != Status::DISCONNECTED {
                        response.round_trip_ns = monotonic_ns().saturating_sub(pending.sent_ns);
                        self.unreported_round_trip_ns =
                            response.round_trip_ns.clamp(1, u64::from(u32::MAX)) as u32;
                    }
                    if !pending.abandoned {
                        return Some(response);
                    }
                }
                // Not a request of ours in flight: a server fault. Drop it.
                None => continue,
            }
        }
    }

    fn poll_any(&mut self) -> Option<Response> {
        let mut words = [0u64; RESPONSE_WORDS];
        // Only the header and this model's outputs are read: for up to 4 outputs, one line.
        let read = &mut words[..abi::response_words(self.output_count)];
        // Responses come in submission order: the next one carries the oldest pending id as
        // its stamp, so it can be taken before the server publishes its tail.
        let popped = match self.pending.front() {
            Some(p) => self.rings.try_pop_stamped(p.id, read),
            None => self.rings.try_pop(read),
        };
        match popped {
            Ok(true) => {
                self.rings.release();
                let frame: ResponseFrame = bytemuck::cast(words);
                return Some(Response::from_frame(&frame));
            }
            Ok(false) => {}
            Err(_) => self.disconnected = true,
        }
        if self.pending.is_empty() {
            return None;
        }
        self.empty_polls += 1;
        if !self.disconnected && self.empty_polls >= POLLS_PER_CLOCK_CHECK {
            self.empty_polls = 0;
            if self.last_liveness_check.elapsed() < LIVENESS_CHECK_INTERVAL {
                return None;
            }
            self.last_liveness_check = Instant::now();
            self.disconnected = self.server_gone();
            if self.disconnected {
                // Responses pushed before the server left are visible now: answer from the
                // ring first.
                return self.poll_any();
            }
        }
        if self.disconnected {
            let pending = self.pending.front().expect("not empty");
            return Some(Response::disconnected(pending.id));
        }
        None
    }

    /// Whether the session still stands: the server has not closed or faulted it and its socket
    /// is open. A system call; for pools of idle sessions, not for the hot path.
    pub fn is_connected(&self) -> bool {
        !self.disconnected && !self.server_gone()
    }

    /// Whether the server closed or faulted the session, or its socket hung up.
    fn server_gone(&self) -> bool {
        match self.rings.segment().server_state().0 {
            Some(ServerState::Running) => {}
            _ => return true,
        }
        let mut fds = [rustix::event::PollFd::new(
            &self.socket,
            rustix::event::PollFlags::IN | rustix::event::PollFlags::RDHUP,
        )];
        match rustix::event::poll(&mut fds, Some(&rustix::time::Timespec::default())) {
            Ok(0) => false,
            Ok(_) => {
                let revents = fds[0].revents();
                // The server never sends after the reply: readable means hung up.
                !revents.is_empty()
            }
            Err(_) => true,
        }
    }

    /// Sends one request and waits for its answer (with the wait strategy and timeout of the
    /// connect options).
    ///
    /// # Errors
    /// [`PredictError`]: the request was not sent, the server answered with an error, no
    /// answer came in time, or `submit`ted requests are still in flight.
    pub fn predict(&mut self, features: &[f32]) -> Result<Prediction, PredictError> {
        let count = self.awaited();
        if count > 0 {
            return Err(PredictError::RequestsInFlight {
                count: count as u32,
            });
        }
        let id = self.submit(features, Priority::Normal, None)?;
        self.wait_for(id)
    }

    /// Waits for the answer to `id`, the one request in flight (as [`Client::predict`] does
    /// after submitting it: a binding can submit while it holds the interpreter's lock and wait
    /// without it).
    ///
    /// # Errors
    /// As [`Client::predict`]; `RequestsInFlight` when `id` is not the one request in flight.
    pub fn wait_for(&mut self, id: RequestId) -> Result<Prediction, PredictError> {
        let mut live = self.pending.iter().filter(|p| !p.abandoned).map(|p| p.id);
        if !live.clone().eq([id]) {
            return Err(PredictError::RequestsInFlight {
                count: live.by_ref().count() as u32,
            });
        }
        let Some(response) = self.poll_within(Instant::now()) else {
            if let Some(p) = self.pending.iter_mut().find(|p| p.id == id) {
                p.abandoned = true;
            }
            return Err(PredictError::Timeout {
                timeout_ms: self.timeout.as_millis() as u64,
            });
        };
        debug_assert_eq!(response.request_id, id);
        if let Some(error) = response.error() {
            if error.status == Status::DISCONNECTED {
                return Err(PredictError::Submit(SubmitError::Disconnected));
            }
            return Err(PredictError::Server(error));
        }
        Ok(Prediction {
            round_trip_ns: response.round_trip_ns,
            response,
        })
    }

    /// The next answer, waited for with the connect options' wait strategy until their
    /// timeout has passed since `started`; `None` when none came in time.
    pub fn poll_within(&mut self, started: Instant) -> Option<Response> {
        let mut spins = 0u32;
        loop {
            if let Some(response) = self.poll() {
                return Some(response);
            }
            spins = spins.wrapping_add(1);
            // The clock is read every 64 empty polls, not on every spin.
            if spins.is_multiple_of(64) && started.elapsed() >= self.timeout {
                return None;
            }
            self.wait.pause(started);
        }
    }
}
