//! Opening a session from a complete hello, in steps: [`authorize`] the peer, [`resolve`] the
//! model, [`check_geometry`] of the rings, [`create_segment`], then [`register`] the session
//! with its poller. Each step returns one refusal type, [`Refusal`], answered in one place
//! ([`open_session`]).

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytemuck::Zeroable;
use rustix::net::UCred;
use tie_client::segment::Segment;
use tie_layouts::abi::SegmentGeometry;
use tie_layouts::hello::{
    write_name, Hello, HelloReply, HelloStatus, SessionRecord, REPLY_ALLOW_NON_FINITE,
};

use super::listener::{
    peer_allowed, refuse, send_with_fd, serve_inspector, ListenerContext, OpenSession, Sessions,
};
use super::poller::NewSession;
use super::SessionLink;
use crate::models::{LoadedModel, Missing, ModelSet};
use crate::sync::Locked;

/// Why a hello gets no session.
enum Refusal {
    /// Answered with this status and message, and the model's layout hash where known.
    Reply {
        status: HelloStatus,
        message: String,
        model_hash: u64,
    },
    /// The hello asked for the inspector, served on the same connection instead.
    Inspector,
    /// Nothing to answer: the peer left, or its credentials could not be read (logged).
    Dropped,
}

impl Refusal {
    fn reply(status: HelloStatus, message: impl Into<String>, model_hash: u64) -> Self {
        Self::Reply {
            status,
            message: message.into(),
            model_hash,
        }
    }
}

/// Checks a complete hello and opens the session, or answers the refusal.
pub(super) fn open_session(
    ctx: &ListenerContext,
    stream: UnixStream,
    hello: &Hello,
    next_id: &AtomicU64,
    sessions: &Sessions,
) -> Option<OpenSession> {
    let control = sessions.iter().filter(|s| s.control).count();
    let open = Open {
        ring: sessions.len() - control,
        control,
    };
    match admit(ctx, &stream, hello, next_id, open) {
        Ok((link, segment, record, control)) => Some(OpenSession {
            link,
            socket: stream,
            segment,
            record,
            control,
        }),
        Err(Refusal::Reply {
            status,
            message,
            model_hash,
        }) => {
            refuse(&stream, status, &message, model_hash, hello);
            None
        }
        Err(Refusal::Inspector) => {
            serve_inspector(ctx, stream, hello, sessions);
            None
        }
        Err(Refusal::Dropped) => None,
    }
}

/// Sessions open: trading clients', and the control plane's own.
#[derive(Clone, Copy)]
struct Open {
    ring: usize,
    control: usize,
}

/// Sessions the control plane may hold per model version loaded (its pools hold at most
/// `SESSIONS_PER_MODEL` per model and pinned version), besides `server.max_sessions`.
const CONTROL_SESSIONS_PER_SLOT: usize = 4;

/// The steps of [`open_session`]: the session's link, segment and record once its poller has
/// it, and whether it is the control plane's (a session of this very process: the HTTP
/// pools'), which does not count against `server.max_sessions`.
fn admit(
    ctx: &ListenerContext,
    stream: &UnixStream,
    hello: &Hello,
    next_id: &AtomicU64,
    open: Open,
) -> Result<(Arc<SessionLink>, Arc<Segment>, SessionRecord, bool), Refusal> {
    let cred = authorize(ctx, stream)?;
    let control = cred.pid == rustix::process::getpid();
    let (name, version) = match tie_layouts::check::check_hello(hello) {
        Ok(tie_layouts::check::Asked::Inspect) => return Err(Refusal::Inspector),
        Ok(tie_layouts::check::Asked::Session { model, version }) => (model, version),
        Err((status, message)) => return Err(Refusal::reply(status, message, 0)),
    };
    let set = ctx.models.snapshot();
    let slot = resolve(ctx, &set, name, hello)?;
    let model: &Arc<LoadedModel> = set.get(slot).expect("resolved");
    let (count, limit, whose) = if control {
        let limit = CONTROL_SESSIONS_PER_SLOT * set.slots().max(1) + CONTROL_SESSIONS_PER_SLOT;
        (
            open.control,
            limit,
            "the control plane holds its maximum of",
        )
    } else {
        (
            open.ring,
            ctx.max_sessions,
            "the server holds server.max_sessions =",
        )
    };
    if count >= limit {
        let message = format!("{whose} {limit} sessions");
        return Err(Refusal::reply(
            HelloStatus::TooManySessions,
            message,
            model.layout_hash,
        ));
    }
    let geometry = check_geometry(ctx, model, hello)?;
    let id = next_id.fetch_add(1, Ordering::Relaxed);
    let (segment, geometry) = create_segment(ctx, model, geometry, id)?;
    let placed = Placed {
        model,
        slot,
        follows_default: version.is_none(),
        id,
        segment: &segment,
        geometry: &geometry,
    };
    let (link, record) = register(ctx, stream, hello, &cred, placed)?;
    Ok((link, segment, record, control))
}

/// The peer's credentials, when it may connect: this server's user, or a member of
/// `server.allowed_gid`.
fn authorize(ctx: &ListenerContext, stream: &UnixStream) -> Result<UCred, Refusal> {
    let cred = rustix::net::sockopt::socket_peercred(stream).map_err(|e| {
        tracing::warn!(error = %e, "cannot read peer credentials");
        Refusal::Dropped
    })?;
    let allowed = peer_allowed(
        cred.uid.as_raw(),
        cred.gid.as_raw(),
        Some(cred.pid),
        ctx.allowed_gid,
    );
    if !allowed {
        tracing::warn!(
            pid = cred.pid.as_raw_nonzero().get(),
            uid = cred.uid.as_raw(),
            gid = cred.gid.as_raw(),
            allowed_gid = ?ctx.allowed_gid,
            "connection refused: credentials not allowed"
        );
        return Err(Refusal::reply(
            HelloStatus::PermissionDenied,
            "this user may not connect to the server",
            0,
        ));
    }
    Ok(cred)
}

/// The slot of the version `hello` asks for; a model unloaded as unused starts loading again.
fn resolve(
    ctx: &ListenerContext,
    set: &ModelSet,
    name: &str,
    hello: &Hello,
) -> Result<usize, Refusal> {
    let latest = hello.model_version == tie_layouts::hello::VERSION_LATEST;
    let version = match hello.model_version {
        0 => None,
        tie_layouts::hello::VERSION_LATEST => ctx.models.latest(name),
        v => Some(v),
    };
    // `latest` resolves once, at connect: the session is pinned to that version.
    let found = match (version, latest) {
        (Some(v), _) => set.resolve(name, Some(v)),
        (None, false) => set.resolve(name, None),
        (None, true) => None,
    };
    if let Some(slot) = found {
        return Ok(slot);
    }
    let asked = if latest {
        Some(crate::models::set::LATEST.to_string())
    } else {
        version.map(|v| v.to_string())
    };
    let (status, message) = match ctx.models.missing(name, asked.as_deref()) {
        Some(Missing::Loading(why)) => (HelloStatus::Loading, why),
        Some(Missing::Failed(why)) => (HelloStatus::ModelNotFound, why),
        None => (
            HelloStatus::ModelNotFound,
            format!(
                "model {name}{} is not served; served: {}",
                version.map_or(String::new(), |v| format!(" version {v}")),
                set.keys().join(", ")
            ),
        ),
    };
    tracing::info!(
        model = name,
        version = hello.model_version,
        ?status,
        "session refused: model not loaded"
    );
    Err(Refusal::reply(status, message, 0))
}

/// The session's rings for `model`: its layout, the ring sizes and the segment limit.
fn check_geometry(
    ctx: &ListenerContext,
    model: &LoadedModel,
    hello: &Hello,
) -> Result<SegmentGeometry, Refusal> {
    if hello.layout_hash != 0 && hello.layout_hash != model.layout_hash {
        tracing::info!(model = %model.key(), client = hello.layout_hash, server = model.layout_hash, "session refused: layout mismatch");
        let message = format!(
            "layout mismatch: client {:#018x}, model {} layout {:?} {:#018x}",
            hello.layout_hash,
            model.key(),
            model.layout.name,
            model.layout_hash
        );
        return Err(Refusal::reply(
            HelloStatus::LayoutMismatch,
            message,
            model.layout_hash,
        ));
    }
    let geometry = tie_layouts::check::session_geometry(
        hello,
        model.input_width() as u32,
        ctx.max_segment_bytes,
    )
    .map_err(|(status, message)| Refusal::reply(status, message, model.layout_hash))?;
    Ok(geometry)
}

/// The session's sealed segment, on huge pages when configured and available (else ordinary
/// pages, warned about at most once a minute), and the geometry it was made with.
fn create_segment(
    ctx: &ListenerContext,
    model: &LoadedModel,
    geometry: SegmentGeometry,
    id: u64,
) -> Result<(Arc<Segment>, SegmentGeometry), Refusal> {
    let info_for = |g: &SegmentGeometry| {
        g.info(
            model.layout_hash,
            id,
            model.output_width() as u32,
            model.version,
        )
    };
    if ctx.huge_pages {
        let huge = geometry.padded_to(tie_client::layouts::abi::HUGE_PAGE_SIZE);
        match Segment::create_in(huge, info_for(&huge), true) {
            Ok(s) => return Ok((s, huge)),
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
    match Segment::create(geometry, info_for(&geometry)) {
        Ok(s) => Ok((s, geometry)),
        Err(e) => {
            tracing::error!(error = %e, "cannot create a session segment");
            Err(Refusal::reply(
                HelloStatus::Internal,
                e.to_string(),
                model.layout_hash,
            ))
        }
    }
}

/// Where a session is placed: its model version, slot, id and segment.
struct Placed<'a> {
    model: &'a Arc<LoadedModel>,
    slot: usize,
    follows_default: bool,
    id: u64,
    segment: &'a Arc<Segment>,
    geometry: &'a SegmentGeometry,
}

/// Counts the session on its version, sends the reply with the segment's fd and hands the
/// session to its model's poller.
fn register(
    ctx: &ListenerContext,
    stream: &UnixStream,
    hello: &Hello,
    cred: &UCred,
    placed: Placed<'_>,
) -> Result<(Arc<SessionLink>, SessionRecord), Refusal> {
    let Placed {
        model,
        slot,
        follows_default,
        id,
        segment,
        geometry,
    } = placed;
    let reply = accepted_reply(model, hello, id, geometry);
    // Counted from the reply on, so the version is in use (never unloaded as unused) from the
    // moment the client is told it is served; the poller moves the count if it places the
    // session elsewhere.
    // SYNC(unloading): SeqCst with the unloader's store of `unloading` then load of
    // `sessions`: of the two, at least one sees the other's write.
    model.sessions.fetch_add(1, Ordering::SeqCst);
    // SYNC(unloading): the other half of the pair above.
    if model.unloading.load(Ordering::SeqCst) {
        model.sessions.fetch_sub(1, Ordering::SeqCst);
        tracing::info!(session = id, model = %model.key(), "session refused: the version is being unloaded as unused");
        return Err(Refusal::reply(
            HelloStatus::Loading,
            format!("model {} is being unloaded as unused; asking again loads it again: retry in a moment", model.key()),
            model.layout_hash,
        ));
    }
    if !send_with_fd(stream, bytemuck::bytes_of(&reply), segment.fd().as_fd()) {
        model.sessions.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!(session = id, "client left during the handshake");
        return Err(Refusal::Dropped);
    }
    // By model name: a model's sessions share its pollers (`pollers`, default one: one lane,
    // full batches) across versions and reloads.
    let poller =
        ctx.pollers_by_model
            .locked()
            .place(&model.name, model.config.pollers(), ctx.workers.len());
    let pid = cred.pid.as_raw_nonzero().get() as u32;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let comm = comm.trim_end();
    let link = Arc::new(SessionLink {
        id,
        dead: AtomicBool::new(false),
        hangups: ctx.hangups[poller].clone(),
        client: crate::journal::SessionInfo {
            id,
            pid,
            process: comm.into(),
            // The control plane's predictions come through sessions of its own.
            source: if pid == std::process::id() {
                "http"
            } else {
                "ring"
            },
        },
    });
    let new = NewSession {
        link: link.clone(),
        segment: segment.clone(),
        model: slot,
        described: model.clone(),
        follows_default,
    };
    if ctx.workers[poller].send(new).is_err() {
        model.sessions.fetch_sub(1, Ordering::AcqRel);
        return Err(Refusal::Dropped);
    }
    tracing::info!(
        session = id,
        pid = cred.pid.as_raw_nonzero().get(),
        uid = cred.uid.as_raw(),
        model = %model.key(),
        poller,
        request_capacity = hello.request_capacity,
        response_capacity = hello.response_capacity,
        "session opened"
    );
    Ok((link, session_record(model, cred, comm, id, geometry)))
}

/// The hello reply accepting a session on `model`.
fn accepted_reply(
    model: &LoadedModel,
    hello: &Hello,
    id: u64,
    geometry: &SegmentGeometry,
) -> HelloReply {
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
    reply
}

/// What an inspector is told of the session.
fn session_record(
    model: &LoadedModel,
    cred: &UCred,
    comm: &str,
    id: u64,
    geometry: &SegmentGeometry,
) -> SessionRecord {
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
    write_name(&mut record.process_name, comm);
    record
}
