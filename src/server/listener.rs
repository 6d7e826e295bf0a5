//! `listener_task`: accepts connections, performs handshakes, watches session sockets.

use std::io::{IoSlice, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use std::time::Instant;

use bytemuck::Zeroable;
use rustix::event::{PollFd, PollFlags};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tie_client::segment::Segment;
use tie_layouts::abi::SegmentGeometry;
use tie_layouts::hello::{
    write_name, Hello, HelloReply, HelloStatus, SessionRecord, REPLY_ALLOW_NON_FINITE,
};

use super::worker::NewSession;
use super::{ServerStartError, SessionLink};
use crate::manager::Models;
use crate::repository::LoadedModel;

/// How long a connecting client has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the listener wakes to check for shutdown and faulted sessions.
const TICK: Duration = Duration::from_millis(50);

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
    /// The poller of each model name.
    pub pollers_by_model: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// An open session as the listener keeps it: its socket (closed when dropped), its segment
/// and what an inspector is told of it.
pub(super) struct OpenSession {
    link: Arc<SessionLink>,
    socket: UnixStream,
    segment: Arc<Segment>,
    record: SessionRecord,
}

/// Open sessions.
pub(super) type Sessions = Vec<OpenSession>;

/// Binds the endpoint's socket, removing a stale one left by a server that is gone.
pub(super) fn bind(
    path: &Path,
    allowed_gid: Option<u32>,
) -> Result<UnixListener, ServerStartError> {
    let listen_err = |source| ServerStartError::Listen {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(listen_err)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ServerStartError::AlreadyRunning { path: path.into() });
        }
        std::fs::remove_file(path).map_err(listen_err)?;
    }
    let listener = UnixListener::bind(path).map_err(listen_err)?;
    let mode = match allowed_gid {
        Some(gid) => {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(listen_err)?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(listen_err)?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    Ok(listener)
}

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
    let mut sessions: Sessions = Vec::new();
    let mut handshakes: Vec<Handshake> = Vec::new();
    let next_id = AtomicU64::new(1);
    // Handshakes closed unfinished (timed out, or pushed out by newer ones) since the last
    // warning, and when that was.
    let mut dropped = 0u64;
    let mut last_flood_log: Option<Instant> = None;
    // When accepting goes on (`None`: now), after all kept handshakes were too young to close.
    let mut accept_after: Option<Instant> = None;
    while !ctx.stopping.load(Ordering::SeqCst) {
        let now = Instant::now();
        let mut wait = handshakes
            .iter()
            .map(|h| h.deadline.saturating_duration_since(now))
            .fold(TICK, Duration::min);
        // While every kept handshake is too young to close, new connections wait in the
        // backlog (the listener is not polled, so it does not spin on them).
        let accepting = accept_after.is_none_or(|t| now >= t);
        if let Some(t) = accept_after.filter(|_| !accepting) {
            wait = wait.min(t - now);
        }
        let (accept, hung, hello_ready) = {
            let mut fds: Vec<PollFd<'_>> =
                Vec::with_capacity(1 + sessions.len() + handshakes.len());
            let events = if accepting {
                PollFlags::IN
            } else {
                PollFlags::empty()
            };
            fds.push(PollFd::new(&ctx.listener, events));
            for s in &sessions {
                fds.push(PollFd::new(&s.socket, PollFlags::IN | PollFlags::RDHUP));
            }
            for h in &handshakes {
                fds.push(PollFd::new(&h.stream, PollFlags::IN | PollFlags::RDHUP));
            }
            let timeout = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: wait.as_nanos() as _,
            };
            if rustix::event::poll(&mut fds, Some(&timeout)).is_err() {
                continue;
            }
            let ready = |f: &PollFd<'_>| !f.revents().is_empty();
            let n = sessions.len();
            (
                ready(&fds[0]),
                fds[1..1 + n].iter().map(ready).collect::<Vec<_>>(),
                fds[1 + n..].iter().map(ready).collect::<Vec<_>>(),
            )
        };
        // Clients never send after the hello: a readable session socket has hung up.
        let mut i = 0;
        sessions.retain(|OpenSession { link, .. }| {
            let gone = hung[i] || link.dead.load(Ordering::SeqCst);
            i += 1;
            if gone {
                link.dead.store(true, Ordering::SeqCst);
                tracing::info!(session = link.id, "session closed");
            }
            !gone
        });
        // Hellos: read what has arrived; a complete one opens (or refuses) a session.
        let now = Instant::now();
        let mut waiting = Vec::with_capacity(handshakes.len());
        for (mut h, readable) in handshakes.drain(..).zip(hello_ready) {
            if readable && !h.read() {
                continue;
            }
            if h.received == size_of::<Hello>() {
                if let Some(s) = open_session(&ctx, h.stream, &h.hello, &next_id, &sessions) {
                    sessions.push(s);
                }
            } else if now >= h.deadline {
                dropped += 1;
            } else {
                waiting.push(h);
            }
        }
        handshakes = waiting;
        if dropped > 0 && last_flood_log.is_none_or(|t| t.elapsed() >= FLOOD_LOG_INTERVAL) {
            tracing::warn!(
                closed = dropped,
                in_progress = handshakes.len(),
                limit = MAX_HANDSHAKES,
                "connections closed without a complete hello (timed out after 1 s, or pushed out by newer ones)"
            );
            dropped = 0;
            last_flood_log = Some(Instant::now());
        }
        if accept {
            accept_after = None;
            // A bounded number per pass, and a kept handshake is closed for a newer one only
            // once it is `MIN_HANDSHAKE_AGE` old: a client's hello, written right after its
            // connect, is read before a flood can push it out.
            for _ in 0..MAX_HANDSHAKES / 2 {
                if handshakes.len() >= MAX_HANDSHAKES {
                    let oldest = handshakes[0].deadline - HELLO_TIMEOUT;
                    let old_enough = oldest + MIN_HANDSHAKE_AGE;
                    if Instant::now() < old_enough {
                        accept_after = Some(old_enough);
                        break;
                    }
                    handshakes.remove(0);
                    dropped += 1;
                }
                match ctx.listener.accept() {
                    Ok((stream, _)) => {
                        if stream.set_nonblocking(true).is_err() {
                            continue;
                        }
                        let mut h = Handshake {
                            stream,
                            hello: Hello::zeroed(),
                            received: 0,
                            deadline: Instant::now() + HELLO_TIMEOUT,
                        };
                        // A client writes its hello right after connecting: often it is here.
                        if !h.read() {
                            continue;
                        }
                        if h.received == size_of::<Hello>() {
                            if let Some(s) =
                                open_session(&ctx, h.stream, &h.hello, &next_id, &sessions)
                            {
                                sessions.push(s);
                            }
                            continue;
                        }
                        handshakes.push(h);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        break;
                    }
                }
            }
        }
    }
    sessions
}

fn refuse(stream: &UnixStream, status: HelloStatus, message: &str, model_hash: u64, hello: &Hello) {
    let mut reply = HelloReply::new(status);
    reply.server_layout_hash = model_hash;
    reply.client_layout_hash = hello.layout_hash;
    reply.set_message(message);
    let _ = rustix::net::send(stream, bytemuck::bytes_of(&reply), SendFlags::NOSIGNAL);
}

/// Checks a complete hello and opens the session, or sends the refusal.
fn open_session(
    ctx: &ListenerContext,
    stream: UnixStream,
    hello: &Hello,
    next_id: &AtomicU64,
    sessions: &Sessions,
) -> Option<OpenSession> {
    let hello = *hello;
    let open = sessions.len();
    let cred = match rustix::net::sockopt::socket_peercred(&stream) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read peer credentials");
            return None;
        }
    };
    let our_uid = rustix::process::geteuid();
    let allowed = cred.uid == our_uid
        || ctx
            .allowed_gid
            .is_some_and(|g| cred.gid.as_raw() == g || peer_in_group(cred.pid, g));
    if !allowed {
        tracing::warn!(
            pid = cred.pid.as_raw_nonzero().get(),
            uid = cred.uid.as_raw(),
            gid = cred.gid.as_raw(),
            allowed_gid = ?ctx.allowed_gid,
            "connection refused: credentials not allowed"
        );
        refuse(
            &stream,
            HelloStatus::PermissionDenied,
            "this user may not connect to the server",
            0,
            &hello,
        );
        return None;
    }
    let (name, version) = match tie_layouts::check::check_hello(&hello) {
        Ok(tie_layouts::check::Asked::Inspect) => {
            serve_inspector(ctx, stream, &hello, sessions);
            return None;
        }
        Ok(tie_layouts::check::Asked::Session { model, version }) => (model, version),
        Err((status, msg)) => {
            refuse(&stream, status, &msg, 0, &hello);
            return None;
        }
    };
    let set = ctx.models.snapshot();
    let Some(model_index) = set.resolve(name, version) else {
        let served = set.keys();
        let version = match hello.model_version {
            0 => String::new(),
            v => format!(" version {v}"),
        };
        let asked = (hello.model_version != 0).then(|| hello.model_version.to_string());
        let (status, msg) = match ctx.models.missing(name, asked.as_deref()) {
            Some(crate::manager::Missing::Loading(why)) => (HelloStatus::Loading, why),
            Some(crate::manager::Missing::Failed(why)) => (HelloStatus::ModelNotFound, why),
            None => (
                HelloStatus::ModelNotFound,
                format!(
                    "model {name}{version} is not served; served: {}",
                    served.join(", ")
                ),
            ),
        };
        tracing::info!(
            model = name,
            version = hello.model_version,
            ?status,
            "session refused: model not loaded"
        );
        refuse(&stream, status, &msg, 0, &hello);
        return None;
    };
    let model: &LoadedModel = set.get(model_index).expect("resolved");
    if hello.layout_hash != 0 && hello.layout_hash != model.layout_hash {
        let msg = format!(
            "layout mismatch: client {:#018x}, model {} layout {:?} {:#018x}",
            hello.layout_hash,
            model.key(),
            model.layout.name,
            model.layout_hash
        );
        tracing::info!(model = %model.key(), client = hello.layout_hash, server = model.layout_hash, "session refused: layout mismatch");
        refuse(
            &stream,
            HelloStatus::LayoutMismatch,
            &msg,
            model.layout_hash,
            &hello,
        );
        return None;
    }
    let geometry = match tie_layouts::check::session_geometry(
        &hello,
        model.input_width() as u32,
        ctx.max_segment_bytes,
    ) {
        Ok(g) => g,
        Err((status, msg)) => {
            refuse(&stream, status, &msg, model.layout_hash, &hello);
            return None;
        }
    };
    if open >= ctx.max_sessions {
        let msg = format!(
            "the server holds its maximum of {} sessions",
            ctx.max_sessions
        );
        refuse(
            &stream,
            HelloStatus::TooManySessions,
            &msg,
            model.layout_hash,
            &hello,
        );
        return None;
    }
    let id = next_id.fetch_add(1, Ordering::Relaxed);
    let info_for = |g: &SegmentGeometry| {
        g.info(
            model.layout_hash,
            id,
            model.output_width() as u32,
            model.version,
        )
    };
    let mut geometry = geometry;
    let mut created = None;
    if ctx.huge_pages {
        let huge = geometry.padded_to(tie_client::layouts::abi::HUGE_PAGE_SIZE);
        match Segment::create_in(huge, info_for(&huge), true) {
            Ok(s) => {
                geometry = huge;
                created = Some(Ok(s));
            }
            // Served on ordinary pages rather than refused: the session works, a little slower.
            // Logged once a minute at most.
            Err(e) => {
                static LAST_WARNED: AtomicU64 = AtomicU64::new(0);
                let now = tie_client::monotonic_ns();
                let last = LAST_WARNED.load(Ordering::Relaxed);
                if last == 0 || now.saturating_sub(last) >= 60_000_000_000 {
                    LAST_WARNED.store(now, Ordering::Relaxed);
                    tracing::warn!(
                        session = id,
                        error = %e,
                        "no huge page for a session segment (vm.nr_hugepages): ordinary pages used"
                    );
                }
            }
        }
    }
    let created = created.unwrap_or_else(|| Segment::create(geometry, info_for(&geometry)));
    let segment = match created {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot create a session segment");
            refuse(
                &stream,
                HelloStatus::Internal,
                &e.to_string(),
                model.layout_hash,
                &hello,
            );
            return None;
        }
    };
    let mut reply = HelloReply::new(HelloStatus::Accepted);
    reply.server_layout_hash = model.layout_hash;
    reply.client_layout_hash = hello.layout_hash;
    reply.segment_size = geometry.segment_size as u64;
    reply.session_id = id;
    reply.model_version = model.version;
    reply.feature_count = model.input_width() as u32;
    reply.output_count = model.output_width() as u32;
    reply.flags = if model.layout.allow_non_finite {
        REPLY_ALLOW_NON_FINITE
    } else {
        0
    };
    let info = model.backend.info();
    reply.set_message(&format!("{} {}", info.architecture, info.device));
    // Counted from the reply on, so the version is in use (never unloaded as unused) from the
    // moment the client is told it is served; the poller moves the count if it places the
    // session elsewhere.
    model.sessions.fetch_add(1, Ordering::SeqCst);
    // (see the unloader: one of the two sees the other)
    if model.unloading.load(Ordering::SeqCst) {
        model.sessions.fetch_sub(1, Ordering::SeqCst);
        tracing::info!(session = id, model = %model.key(), "session refused: the version is being unloaded as unused");
        refuse(
            &stream,
            HelloStatus::Loading,
            &format!("model {} is being unloaded as unused; asking again loads it again: retry in a moment", model.key()),
            model.layout_hash,
            &hello,
        );
        return None;
    }
    let sent = send_with_fd(&stream, bytemuck::bytes_of(&reply), segment.fd().as_fd());
    if !sent {
        model.sessions.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!(session = id, "client left during the handshake");
        return None;
    }
    let link = Arc::new(SessionLink {
        id,
        dead: AtomicBool::new(false),
    });
    // By model name: a model's sessions share one poller (one lane, full batches) across
    // versions and reloads; models are spread over the pollers in the order they are first
    // asked for.
    let worker = {
        let mut pollers = ctx
            .pollers_by_model
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let next = pollers.len() % ctx.workers.len();
        *pollers.entry(model.name.clone()).or_insert(next)
    };
    let mut record = SessionRecord::zeroed();
    record.session_id = id;
    record.connected_unix_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    record.segment_size = geometry.segment_size as u64;
    record.client_pid = cred.pid.as_raw_nonzero().get() as u32;
    record.client_uid = cred.uid.as_raw();
    record.model_version = model.version;
    write_name(&mut record.model_name, &model.name);
    write_name(&mut record.layout_name, &model.layout.name);
    let comm =
        std::fs::read_to_string(format!("/proc/{}/comm", record.client_pid)).unwrap_or_default();
    write_name(&mut record.process_name, comm.trim_end());
    let new = NewSession {
        link: link.clone(),
        segment: segment.clone(),
        model: model_index,
        described: set.get(model_index).expect("resolved").clone(),
        follows_default: version.is_none(),
    };
    if ctx.workers[worker].send(new).is_err() {
        model.sessions.fetch_sub(1, Ordering::AcqRel);
        return None;
    }
    tracing::info!(
        session = id,
        pid = cred.pid.as_raw_nonzero().get(),
        uid = cred.uid.as_raw(),
        model = %model.key(),
        request_capacity = hello.request_capacity,
        response_capacity = hello.response_capacity,
        "session opened"
    );
    Some(OpenSession {
        link,
        socket: stream,
        segment,
        record,
    })
}

/// Inspectors served at once; more are refused.
const MAX_INSPECTORS: usize = 4;

/// Answers an inspector: the session count, then each session's record with a read-only fd
/// of its segment (the memfd reopened through /proc with O_RDONLY, so it can only be mapped
/// read-only). The fds are opened here; the sending happens on a thread of its own, so a slow
/// inspector never holds up handshakes and hang-ups.
fn serve_inspector(ctx: &ListenerContext, stream: UnixStream, hello: &Hello, sessions: &Sessions) {
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
fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) -> bool {
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

/// Whether process `pid` has `gid` among its supplementary groups (from /proc).
fn peer_in_group(pid: rustix::process::Pid, gid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.as_raw_nonzero()));
    status.is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .is_some_and(|groups| groups.split_whitespace().any(|g| g.parse() == Ok(gid)))
    })
}
