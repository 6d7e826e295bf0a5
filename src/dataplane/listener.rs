//! `listener_task`: accepts connections, performs handshakes, watches session sockets.

use std::io::{IoSlice, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use std::time::Instant;

use bytemuck::Zeroable;
use rustix::event::{PollFd, PollFlags};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tie_client::segment::Segment;
use tie_layouts::hello::{Hello, HelloReply, HelloStatus, SessionRecord};

use super::poller::NewSession;
use super::session::open_session;
use super::socket_file::{SocketFile, SocketState};
use super::SessionLink;
use crate::models::Models;

/// How long a connecting client has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the listener wakes to check for shutdown and faulted sessions.
const TICK: Duration = Duration::from_millis(50);
/// How long accepting pauses after an accept failed (out of file descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How often the listener checks that the socket file is still its own.
const SOCKET_CHECK_INTERVAL: Duration = Duration::from_secs(1);

pub(super) struct ListenerContext {
    pub listener: UnixListener,
    pub models: Arc<Models>,
    pub workers: Vec<mpsc::Sender<NewSession>>,
    pub stopping: Arc<AtomicBool>,
    pub allowed_gid: Option<u32>,
    pub max_sessions: usize,
    /// The largest segment a session may ask for (`server.max_segment_mb`).
    pub max_segment_bytes: usize,
    /// Inspectors being served.
    pub inspectors: Arc<std::sync::atomic::AtomicUsize>,
    /// Place segments on 2 MB huge pages (`server.huge_pages`).
    pub huge_pages: bool,
    /// The pollers of each model name.
    pub pollers_by_model: std::sync::Mutex<PollerPlacement>,
    /// The socket file, checked every [`SOCKET_CHECK_INTERVAL`] while serving.
    pub socket_file: Arc<SocketFile>,
    /// Each poller's count of its sessions' hang-ups (given to each session's link).
    pub hangups: Vec<Arc<std::sync::atomic::AtomicU64>>,
}

/// Which pollers serve each model name: a model's sessions share its pollers across versions
/// and reloads (one lane per poller, batches filled from its sessions); models get their
/// pollers in turn, in the order they are first asked for; a model's sessions go to its
/// pollers in turn.
#[derive(Debug, Default)]
pub(super) struct PollerPlacement {
    /// Per model name and poller count (versions of one name may ask for different counts
    /// while a reload replaces one): its pollers and the one its next session goes to.
    models: std::collections::HashMap<(String, usize), (Vec<usize>, usize)>,
    /// The poller the next group starts at.
    next: usize,
}

impl PollerPlacement {
    /// The poller of a new session of `model`, which asks for `wanted` pollers, of `pollers`.
    /// A model asking for more than there are gets them all (logged when its group is made);
    /// a count it did not ask for before (a reload) gets a group of its own, its open
    /// sessions staying where they are.
    pub fn place(&mut self, model: &str, wanted: usize, pollers: usize) -> usize {
        let pollers = pollers.max(1);
        let n = wanted.clamp(1, pollers);
        let key = (model.to_string(), n);
        if !self.models.contains_key(&key) {
            if wanted > n {
                tracing::warn!(
                    model,
                    pollers = wanted,
                    server_pollers = pollers,
                    "the model asks for more pollers than the server has: its sessions go to all {n}"
                );
            }
            let start = self.next;
            self.next = (start + n) % pollers;
            let group = (0..n).map(|k| (start + k) % pollers).collect();
            self.models.insert(key.clone(), (group, 0));
        }
        let (group, turn) = self.models.get_mut(&key).expect("placed above");
        let poller = group[*turn % group.len()];
        *turn = (*turn + 1) % group.len();
        poller
    }
}

/// An open session as the listener keeps it: its socket (closed when dropped), its segment
/// and what an inspector is told of it.
pub(super) struct OpenSession {
    pub link: Arc<SessionLink>,
    pub socket: UnixStream,
    pub segment: Arc<Segment>,
    pub record: SessionRecord,
    /// The control plane's own session (not counted against `server.max_sessions`).
    pub control: bool,
}

/// Open sessions.
pub(super) type Sessions = Vec<OpenSession>;

/// Connections whose hello is still arriving, at most this many at once: a new connection
/// beyond it closes the oldest (once that is `MIN_HANDSHAKE_AGE` old), so a flood of silent
/// connections cannot lock out a client that sends its hello at once.
const MAX_HANDSHAKES: usize = 64;
/// How long a connection keeps its place before a newer one may close it.
const MIN_HANDSHAKE_AGE: Duration = Duration::from_millis(10);
/// The least time between two warnings about closed handshakes (a flood is counted, not
/// logged line by line).
const FLOOD_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// A connection whose hello has not fully arrived.
struct Handshake {
    stream: UnixStream,
    hello: Hello,
    received: usize,
    deadline: Instant,
}

impl Handshake {
    /// Reads what has arrived of the hello; `false` when the connection closed or failed.
    fn read(&mut self) -> bool {
        let buf = &mut bytemuck::bytes_of_mut(&mut self.hello)[self.received..];
        if buf.is_empty() {
            return true;
        }
        match self.stream.read(buf) {
            Ok(0) => false,
            Ok(n) => {
                self.received += n;
                true
            }
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        }
    }
}

pub(super) fn listener_task(ctx: ListenerContext) -> Sessions {
    let mut state = ListenerState {
        // The session sockets are watched through epoll: a pass costs the sockets that hung
        // up, not every session's.
        watch: match rustix::event::epoll::create(rustix::event::epoll::CreateFlags::CLOEXEC) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!(error = %e, "no epoll instance: session sockets are polled one by one");
                None
            }
        },
        events: Vec::with_capacity(EPOLL_EVENTS),
        sessions: Vec::new(),
        handshakes: Vec::new(),
        next_id: AtomicU64::new(1),
        dropped: 0,
        last_flood_log: None,
        accept_after: None,
        socket_checked: Instant::now(),
        socket_state: SocketState::Ours,
        reserve_fd: reserve_fd(),
        accept_errors: 0,
        refused_for_fds: 0,
        last_accept_log: None,
    };
    while !ctx.stopping.load(Ordering::SeqCst) {
        let Some(ready) = state.poll(&ctx) else {
            continue;
        };
        state.close_hung(&ready.hung);
        state.advance_handshakes(&ctx, &ready.hello_ready);
        state.log_flood();
        state.check_socket(&ctx);
        if ready.accept {
            state.accept(&ctx);
        }
    }
    state.sessions
}

/// Hang-ups taken from epoll per pass.
const EPOLL_EVENTS: usize = 256;

/// What the listener holds between passes.
struct ListenerState {
    /// The epoll instance watching every open session's socket (by session id); `None`: the
    /// sockets are polled one by one.
    watch: Option<OwnedFd>,
    /// Its events, reused.
    events: Vec<rustix::event::epoll::Event>,
    sessions: Sessions,
    /// Connections whose hello is not complete yet, oldest first.
    handshakes: Vec<Handshake>,
    next_id: AtomicU64,
    /// Handshakes closed unfinished (timed out, or pushed out by newer ones) since the last
    /// warning, and when that was.
    dropped: u64,
    last_flood_log: Option<Instant>,
    /// When accepting goes on (`None`: now), after all kept handshakes were too young to close.
    accept_after: Option<Instant>,
    /// When the socket file was last checked, and what was found.
    socket_checked: Instant,
    socket_state: SocketState,
    /// A descriptor held in reserve, given up when the process runs out of them so the
    /// waiting connection can be accepted and closed.
    reserve_fd: Option<OwnedFd>,
    /// Accepts that failed, and connections closed unserved for want of descriptors, since
    /// the last warning, and when that was.
    accept_errors: u64,
    refused_for_fds: u64,
    last_accept_log: Option<Instant>,
}

/// A descriptor to hold in reserve (of /dev/null).
fn reserve_fd() -> Option<OwnedFd> {
    rustix::fs::open(
        "/dev/null",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()
}

/// What one poll found ready.
struct Ready {
    accept: bool,
    /// The ids of the open sessions whose socket is readable (hung up), in no order.
    hung: Vec<u64>,
    /// Per handshake: more of its hello has arrived.
    hello_ready: Vec<bool>,
}

impl ListenerState {
    /// Waits for the listener, a session socket or a handshake, at most until the next
    /// deadline or tick; `None` when the poll failed.
    fn poll(&mut self, ctx: &ListenerContext) -> Option<Ready> {
        let now = Instant::now();
        let mut wait = self
            .handshakes
            .iter()
            .map(|h| h.deadline.saturating_duration_since(now))
            .fold(TICK, Duration::min);
        // While every kept handshake is too young to close, new connections wait in the
        // backlog (the listener is not polled, so it does not spin on them).
        let accepting = self.accept_after.is_none_or(|t| now >= t);
        if let Some(t) = self.accept_after.filter(|_| !accepting) {
            wait = wait.min(t - now);
        }
        let mut fds: Vec<PollFd<'_>> =
            Vec::with_capacity(1 + self.sessions.len() + self.handshakes.len());
        let events = if accepting {
            PollFlags::IN
        } else {
            PollFlags::empty()
        };
        fds.push(PollFd::new(&ctx.listener, events));
        let polled = match &self.watch {
            Some(watch) => {
                fds.push(PollFd::new(watch, PollFlags::IN));
                &[][..]
            }
            None => &self.sessions[..],
        };
        for s in polled {
            fds.push(PollFd::new(&s.socket, PollFlags::IN | PollFlags::RDHUP));
        }
        for h in &self.handshakes {
            fds.push(PollFd::new(&h.stream, PollFlags::IN | PollFlags::RDHUP));
        }
        let timeout = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: wait.as_nanos() as _,
        };
        rustix::event::poll(&mut fds, Some(&timeout)).ok()?;
        let ready = |f: &PollFd<'_>| !f.revents().is_empty();
        let watched = usize::from(self.watch.is_some());
        let n = watched + polled.len();
        let mut hung: Vec<u64> = polled
            .iter()
            .zip(&fds[1..1 + n])
            .filter(|(_, f)| ready(f))
            .map(|(s, _)| s.link.id)
            .collect();
        let accept = ready(&fds[0]);
        let hello_ready = fds[1 + n..].iter().map(ready).collect();
        if watched == 1 && ready(&fds[1]) {
            let watch = self.watch.as_ref().expect("watched");
            self.events.clear();
            let zero = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // What is not taken now is taken on the next pass.
            if rustix::event::epoll::wait(
                watch,
                rustix::buffer::spare_capacity(&mut self.events),
                Some(&zero),
            )
            .is_ok()
            {
                hung.extend(self.events.iter().map(|e| e.data.u64()));
            }
        }
        Some(Ready {
            accept,
            hung,
            hello_ready,
        })
    }

    /// Watches a new session's socket for its hang-up, and keeps it among `sessions`.
    fn watch(watch: Option<&OwnedFd>, sessions: &mut Sessions, s: OpenSession) {
        if let Some(watch) = watch {
            use rustix::event::epoll;
            if let Err(e) = epoll::add(
                watch,
                &s.socket,
                epoll::EventData::new_u64(s.link.id),
                epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
            ) {
                // Its hang-up could not be seen: closed now rather than never reclaimed.
                tracing::warn!(session = s.link.id, error = %e, "session closed: its socket cannot be watched");
                s.link.hang_up();
                return;
            }
        }
        sessions.push(s);
    }

    /// Drops the sessions whose client hung up (clients never send after the hello: a
    /// readable session socket has hung up) or that a poller faulted. A dropped session's
    /// socket closes, which takes it out of the epoll instance.
    fn close_hung(&mut self, hung: &[u64]) {
        self.sessions.retain(|OpenSession { link, .. }| {
            let gone = hung.contains(&link.id) || link.dead.load(Ordering::SeqCst);
            if gone {
                link.hang_up();
                tracing::info!(session = link.id, "session closed");
            }
            !gone
        });
    }

    /// Reads what has arrived of each hello; a complete one opens (or refuses) a session, one
    /// past its deadline is closed.
    fn advance_handshakes(&mut self, ctx: &ListenerContext, hello_ready: &[bool]) {
        let now = Instant::now();
        let mut waiting = Vec::with_capacity(self.handshakes.len());
        for (mut h, &readable) in self.handshakes.drain(..).zip(hello_ready) {
            if readable && !h.read() {
                continue;
            }
            if h.received == size_of::<Hello>() {
                if let Some(s) =
                    open_session(ctx, h.stream, &h.hello, &self.next_id, &self.sessions)
                {
                    Self::watch(self.watch.as_ref(), &mut self.sessions, s);
                }
            } else if now >= h.deadline {
                self.dropped += 1;
            } else {
                waiting.push(h);
            }
        }
        self.handshakes = waiting;
    }

    /// Checks, every [`SOCKET_CHECK_INTERVAL`], that the socket file is still this server's,
    /// and says so when that changes: without it no new client can reach the server.
    fn check_socket(&mut self, ctx: &ListenerContext) {
        if self.socket_checked.elapsed() < SOCKET_CHECK_INTERVAL {
            return;
        }
        self.socket_checked = Instant::now();
        let state = ctx.socket_file.check();
        if state == self.socket_state {
            return;
        }
        let path = ctx.socket_file.path().display();
        match state {
            SocketState::Ours => tracing::info!(socket = %path, "the socket file is back"),
            SocketState::Missing => tracing::error!(
                socket = %path,
                "the socket file was removed: sessions open go on, new clients cannot connect; restart the server to serve new clients"
            ),
            SocketState::Replaced => tracing::error!(
                socket = %path,
                "the socket file was replaced by another: sessions open go on, new clients reach the other file; restart the server to serve new clients"
            ),
        }
        self.socket_state = state;
    }

    /// Warns, at most once per [`FLOOD_LOG_INTERVAL`], of handshakes closed unfinished.
    fn log_flood(&mut self) {
        if self.dropped > 0
            && self
                .last_flood_log
                .is_none_or(|t| t.elapsed() >= FLOOD_LOG_INTERVAL)
        {
            tracing::warn!(
                closed = self.dropped,
                in_progress = self.handshakes.len(),
                limit = MAX_HANDSHAKES,
                "connections closed without a complete hello (timed out after 1 s, or pushed out by newer ones)"
            );
            self.dropped = 0;
            self.last_flood_log = Some(Instant::now());
        }
    }

    /// Accepts new connections: a bounded number per pass, and a kept handshake is closed for
    /// a newer one only once it is [`MIN_HANDSHAKE_AGE`] old, so a client's hello, written
    /// right after its connect, is read before a flood can push it out.
    fn accept(&mut self, ctx: &ListenerContext) {
        self.accept_after = None;
        for _ in 0..MAX_HANDSHAKES / 2 {
            if self.handshakes.len() >= MAX_HANDSHAKES {
                let oldest = self.handshakes[0].deadline - HELLO_TIMEOUT;
                let old_enough = oldest + MIN_HANDSHAKE_AGE;
                if Instant::now() < old_enough {
                    self.accept_after = Some(old_enough);
                    break;
                }
                self.handshakes.remove(0);
                self.dropped += 1;
            }
            match ctx.listener.accept() {
                Ok((stream, _)) => self.start_handshake(ctx, stream),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.accept_failed(ctx, &e);
                    break;
                }
            }
        }
    }

    /// After a failed accept: when the process is out of file descriptors, the reserve
    /// descriptor is given up for a moment to accept and close the waiting connection (its
    /// client sees the server close instead of waiting in the backlog), and accepting pauses
    /// for [`ACCEPT_BACKOFF`]; the warning is logged at most once per [`FLOOD_LOG_INTERVAL`]
    /// with the count.
    fn accept_failed(&mut self, ctx: &ListenerContext, e: &std::io::Error) {
        let out_of_fds = matches!(
            e.raw_os_error(),
            Some(c) if c == rustix::io::Errno::MFILE.raw_os_error()
                || c == rustix::io::Errno::NFILE.raw_os_error()
        );
        self.accept_after = Some(Instant::now() + ACCEPT_BACKOFF);
        if out_of_fds {
            self.reserve_fd = None;
            if let Ok((stream, _)) = ctx.listener.accept() {
                drop(stream);
                self.refused_for_fds += 1;
            }
            self.reserve_fd = reserve_fd();
        }
        self.accept_errors += 1;
        if self
            .last_accept_log
            .is_none_or(|t| t.elapsed() >= FLOOD_LOG_INTERVAL)
        {
            tracing::warn!(
                error = %e,
                failures = self.accept_errors,
                closed_unserved = self.refused_for_fds,
                sessions = self.sessions.len(),
                "accept failed (counted since the last warning; accepting pauses 100 ms after each){}",
                if out_of_fds {
                    ": the process is out of file descriptors; raise its RLIMIT_NOFILE (LimitNOFILE=) or lower server.max_sessions"
                } else {
                    ""
                }
            );
            self.accept_errors = 0;
            self.refused_for_fds = 0;
            self.last_accept_log = Some(Instant::now());
        }
    }

    /// Reads a new connection's hello as far as it has come (a client writes it right after
    /// connecting: often it is all here) and opens the session, or keeps the handshake.
    fn start_handshake(&mut self, ctx: &ListenerContext, stream: UnixStream) {
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let mut h = Handshake {
            stream,
            hello: Hello::zeroed(),
            received: 0,
            deadline: Instant::now() + HELLO_TIMEOUT,
        };
        if !h.read() {
            return;
        }
        if h.received == size_of::<Hello>() {
            if let Some(s) = open_session(ctx, h.stream, &h.hello, &self.next_id, &self.sessions) {
                Self::watch(self.watch.as_ref(), &mut self.sessions, s);
            }
            return;
        }
        self.handshakes.push(h);
    }
}

pub(super) fn refuse(
    stream: &UnixStream,
    status: HelloStatus,
    message: &str,
    model_hash: u64,
    hello: &Hello,
) {
    let mut reply = HelloReply::new(status);
    reply.server_layout_hash = model_hash;
    reply.client_layout_hash = hello.layout_hash;
    reply.set_message(message);
    let _ = rustix::net::send(stream, bytemuck::bytes_of(&reply), SendFlags::NOSIGNAL);
}

/// Inspectors served at once; more are refused.
const MAX_INSPECTORS: usize = 4;

/// Answers an inspector: the session count, then each session's record with a read-only fd
/// of its segment (the memfd reopened through /proc with O_RDONLY, so it can only be mapped
/// read-only). The fds are opened here; the sending happens on a thread of its own, so a slow
/// inspector never holds up handshakes and hang-ups.
pub(super) fn serve_inspector(
    ctx: &ListenerContext,
    stream: UnixStream,
    hello: &Hello,
    sessions: &Sessions,
) {
    if ctx.inspectors.load(Ordering::SeqCst) >= MAX_INSPECTORS {
        let msg = format!("{MAX_INSPECTORS} inspectors are being served; try again");
        refuse(&stream, HelloStatus::TooManySessions, &msg, 0, hello);
        return;
    }
    let mut items = Vec::with_capacity(sessions.len());
    for s in sessions {
        let path = format!("/proc/self/fd/{}", s.segment.fd().as_fd().as_raw_fd());
        match rustix::fs::open(
            path.as_str(),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ) {
            Ok(fd) => items.push((s.record, fd)),
            Err(e) => {
                tracing::warn!(session = s.link.id, error = %e, "cannot reopen a segment read-only");
                refuse(
                    &stream,
                    HelloStatus::Internal,
                    "cannot reopen a segment",
                    0,
                    hello,
                );
                return;
            }
        }
    }
    let mut reply = HelloReply::new(HelloStatus::Accepted);
    reply.client_layout_hash = hello.layout_hash;
    reply.session_id = items.len() as u64;
    reply.set_message("inspector");
    let active = ctx.inspectors.clone();
    active.fetch_add(1, Ordering::SeqCst);
    let spawned = std::thread::Builder::new()
        .name("tie-inspector".into())
        .spawn(move || {
            send_inspection(&stream, &reply, &items);
            active.fetch_sub(1, Ordering::SeqCst);
        });
    if spawned.is_err() {
        ctx.inspectors.fetch_sub(1, Ordering::SeqCst);
    }
}

fn send_inspection(stream: &UnixStream, reply: &HelloReply, items: &[(SessionRecord, OwnedFd)]) {
    if stream.set_nonblocking(false).is_err()
        || stream.set_write_timeout(Some(HELLO_TIMEOUT)).is_err()
    {
        return;
    }
    if rustix::net::send(stream, bytemuck::bytes_of(reply), SendFlags::NOSIGNAL).is_err() {
        return;
    }
    for (record, fd) in items {
        if !send_with_fd(stream, bytemuck::bytes_of(record), fd.as_fd()) {
            return;
        }
    }
    tracing::debug!(sessions = items.len(), "inspector served");
}

/// Sends `bytes` with `fd` attached (SCM_RIGHTS); whether all of them went.
pub(super) fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) -> bool {
    let fds = [fd];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    let sent = rustix::net::sendmsg(
        stream,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    );
    matches!(sent, Ok(n) if n == bytes.len())
}

/// Whether a peer with these credentials may connect: the server's own user, or a member of
/// `allowed_gid` (primary, or supplementary as /proc says of `pid`).
pub(crate) fn peer_allowed(
    uid: u32,
    gid: u32,
    pid: Option<rustix::process::Pid>,
    allowed_gid: Option<u32>,
) -> bool {
    uid == rustix::process::geteuid().as_raw()
        || allowed_gid.is_some_and(|g| gid == g || pid.is_some_and(|p| peer_in_group(p, g)))
}

/// Whether process `pid` has `gid` among its supplementary groups (from /proc).
fn peer_in_group(pid: rustix::process::Pid, gid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.as_raw_nonzero()));
    status.is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .is_some_and(|groups| groups.split_whitespace().any(|g| g.parse() == Ok(gid)))
    })
}

#[cfg(test)]
mod tests {
    use super::PollerPlacement;

    #[test]
    fn models_get_pollers_in_turn_and_their_sessions_go_round_their_group() {
        let mut p = PollerPlacement::default();
        // One poller each: the models in the order first asked for.
        assert_eq!(p.place("a", 1, 4), 0);
        assert_eq!(p.place("b", 1, 4), 1);
        assert_eq!(p.place("a", 1, 4), 0);
        // Two pollers: the next two, its sessions in turn.
        let wide: Vec<usize> = (0..5).map(|_| p.place("w", 2, 4)).collect();
        assert_eq!(wide, [2, 3, 2, 3, 2]);
        // More than there are: all of them, wrapping.
        let all: Vec<usize> = (0..4).map(|_| p.place("x", 9, 4)).collect();
        assert_eq!(all, [0, 1, 2, 3]);
        // A changed count (a reload) makes a new group; the old one stays for versions that
        // still ask for it, each going on in its own turn; a model asking for 0 gets one.
        assert_eq!(p.place("a", 3, 4), 0);
        assert_eq!(p.place("a", 1, 4), 0);
        assert_eq!(p.place("a", 3, 4), 1);
        assert_eq!(p.place("a", 3, 4), 2);
        assert_eq!(p.place("z", 0, 4), 3);
    }
}
