//! Read-only inspection of a running server's sessions, for operators' tools (`tie-inspect`).
//!
//! [`inspect`] asks the server, as an inspector (same uid as the server, or its configured
//! group), for every open session; each comes as a [`SessionRecord`] and a read-only mapping
//! of its segment ([`SegmentView`]). An inspector only ever loads from the mapping (it cannot
//! write: the pages are mapped read-only from a read-only fd), so looking changes nothing.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use bytemuck::Zeroable;
use memmap2::MmapOptions;
use tie_layouts::abi::{
    self, SegmentGeometry, SegmentInfo, ServerState, SERVER_DETAIL_OFFSET, SERVER_STATE_OFFSET,
};
use tie_layouts::hello::{Hello, SessionRecord, HELLO_FLAG_INSPECT};
use tie_layouts::ring::RingView;
use tie_layouts::sync::{AtomicU64, Ordering};

use crate::error::ConnectError;
use crate::handshake::{exchange_hello, receive_with_fd};
use crate::segment::{check_header, checked_size, SegmentOpenError};
use crate::words::MappedWords;

/// Most sessions an inspection returns.
pub const MAX_INSPECTED: u64 = 1 << 20;

/// One open session of the server, as an inspector sees it.
#[derive(Debug)]
pub struct InspectedSession {
    /// What the server knows of it.
    pub record: SessionRecord,
    /// Its segment, mapped read-only.
    pub segment: SegmentView,
}

/// A session segment mapped read-only.
#[derive(Debug)]
pub struct SegmentView {
    map: MappedWords,
    info: SegmentInfo,
    geometry: SegmentGeometry,
}

impl SegmentView {
    /// Maps `fd` read-only and checks its header.
    ///
    /// # Errors
    /// [`SegmentOpenError`] when the size, ready word, magic, ABI version or geometry is off.
    pub fn open(fd: &OwnedFd, expected_size: u64) -> Result<Self, SegmentOpenError> {
        let actual = checked_size(fd, expected_size)?;
        let map = MmapOptions::new()
            .len(actual as usize)
            .map_raw_read_only(fd)
            .map_err(|source| SegmentOpenError::Os { op: "mmap", source })?;
        let map = MappedWords::new(map);
        let mut view = Self {
            map,
            info: SegmentInfo::zeroed(),
            geometry: SegmentGeometry::new(1, 1, 1).expect("a valid geometry"),
        };
        let (info, geometry) = check_header(view.words(), actual)?;
        view.info = info;
        view.geometry = geometry;
        Ok(view)
    }

    /// The whole segment as words, for loads only (the pages are mapped read-only).
    pub fn words(&self) -> &[AtomicU64] {
        self.map.words()
    }

    /// The header.
    pub fn info(&self) -> &SegmentInfo {
        &self.info
    }

    /// The geometry.
    pub fn geometry(&self) -> &SegmentGeometry {
        &self.geometry
    }

    /// The request ring (observe with `load_indices` and `read_slot`).
    pub fn request_ring(&self) -> RingView<'_> {
        self.map.request_ring(&self.geometry)
    }

    /// The response ring (observe with `load_indices` and `read_slot`).
    pub fn response_ring(&self) -> RingView<'_> {
        self.map.response_ring(&self.geometry)
    }

    /// The server-state word and its detail.
    pub fn server_state(&self) -> (Option<ServerState>, u64) {
        let words = self.words();
        (
            ServerState::from_code(words[SERVER_STATE_OFFSET / 8].load(Ordering::Acquire)),
            words[SERVER_DETAIL_OFFSET / 8].load(Ordering::Relaxed),
        )
    }

    /// Responses the server sent with an error status.
    pub fn server_errors(&self) -> u64 {
        self.words()[abi::SERVER_ERRORS_OFFSET / 8].load(Ordering::Relaxed)
    }

    /// Submits the client reported refused because its rings were full.
    pub fn client_queue_full(&self) -> u64 {
        self.words()[abi::CLIENT_QUEUE_FULL_OFFSET / 8].load(Ordering::Relaxed)
    }
}

/// Asks the server at `endpoint` for every open session, mapped read-only.
///
/// Sessions whose segment header their client has overwritten are left out.
///
/// # Errors
/// [`ConnectError`]: the server is not running, this user may not inspect it, it runs as a
/// user not trusted (see [`crate::ConnectOptions::server_uid`]; here only `$TIE_SERVER_UID`
/// names one), or it speaks another ABI version.
pub fn inspect(
    endpoint: &str,
    socket_dir: Option<&Path>,
    timeout: Duration,
) -> Result<Vec<InspectedSession>, ConnectError> {
    let path = crate::endpoint::client_socket_path(socket_dir, endpoint)?;
    let server_uid =
        crate::endpoint::trusted_server_uid(None).map_err(ConnectError::InvalidOptions)?;
    let mut hello = Hello::zeroed();
    hello.flags = HELLO_FLAG_INSPECT;
    let (mut stream, reply, _) = exchange_hello(&path, hello, timeout, 0, server_uid)?;
    let count = reply.session_id;
    if count > MAX_INSPECTED {
        return Err(ConnectError::BadReply("too many sessions"));
    }
    let mut sessions = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let mut record = SessionRecord::zeroed();
        let fd = receive_with_fd(
            &mut stream,
            bytemuck::bytes_of_mut(&mut record),
            "receive session record",
        )?
        .ok_or(ConnectError::BadReply(
            "a session record without its segment",
        ))?;
        // A segment its client has scribbled over is skipped: it must not hide the others.
        if let Ok(segment) = SegmentView::open(&fd, record.segment_size) {
            sessions.push(InspectedSession { record, segment });
        }
    }
    Ok(sessions)
}
