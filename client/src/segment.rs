//! A session segment mapped into this process: the header and the two rings.
//!
//! The server makes the segment ([`Segment::create`]: a sealed memfd) and passes its fd to the
//! client, which maps it ([`Segment::open`]) and checks every field before use. Both ends see
//! the mapping only as words read and written through atomics, so neither ever holds a
//! reference into bytes the peer may change.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use bytemuck::Zeroable;
use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::{MemfdFlags, SealFlags};
use tie_layouts::abi::{
    self, SegmentGeometry, SegmentInfo, ServerState, ABI_VERSION, READY, READY_OFFSET,
    SEGMENT_MAGIC, SERVER_DETAIL_OFFSET, SERVER_STATE_OFFSET,
};
use tie_layouts::ring::{Consumer, Producer, PushError, RingCorrupt, RingView};
use tie_layouts::sync::{AtomicU64, Ordering};

use crate::words::MappedWords;

/// Why a segment could not be made or opened.
#[derive(Debug, thiserror::Error)]
pub enum SegmentOpenError {
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Os {
        /// The call.
        op: &'static str,
        /// Its error.
        source: std::io::Error,
    },
    /// The fd's size is not what the server announced.
    #[error("segment is {actual} bytes, expected {expected}")]
    SizeMismatch {
        /// Announced.
        expected: u64,
        /// Found.
        actual: u64,
    },
    /// The segment's fd is not sealed against shrinking and growing.
    #[error("segment is not sealed against resizing")]
    NotSealed,
    /// The segment was not initialised (ready word not set).
    #[error("segment is not ready")]
    NotReady,
    /// The header's magic is wrong.
    #[error("segment magic {found:#x} is not tie's")]
    BadMagic {
        /// Found.
        found: u64,
    },
    /// The server speaks another ABI version.
    #[error("ABI version mismatch: ours {ours}, server's {theirs}")]
    VersionMismatch {
        /// This build's.
        ours: u32,
        /// The segment's.
        theirs: u32,
    },
    /// The header's geometry is inconsistent.
    #[error("segment geometry is inconsistent: {0}")]
    BadGeometry(&'static str),
}

fn os(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> SegmentOpenError {
    move |e| SegmentOpenError::Os {
        op,
        source: e.into(),
    }
}

/// A mapped session segment.
#[derive(Debug)]
pub struct Segment {
    map: MappedWords,
    fd: OwnedFd,
    info: SegmentInfo,
    geometry: SegmentGeometry,
}

impl Segment {
    /// Makes a new segment for `info`'s geometry: a memfd sized and sealed against shrinking and
    /// growing, mapped, fully initialised, then marked ready (Release).
    ///
    /// # Errors
    /// [`SegmentOpenError::Os`] when a system call fails.
    pub fn create(
        geometry: SegmentGeometry,
        info: SegmentInfo,
    ) -> Result<Arc<Self>, SegmentOpenError> {
        Self::create_in(geometry, info, false)
    }

    /// [`create`](Self::create), on 2 MB huge pages (hugetlbfs) when `huge_pages` is set:
    /// `geometry` must then be padded to [`abi::HUGE_PAGE_SIZE`], and the host must have a free
    /// huge page per 2 MB (`vm.nr_hugepages`), else this fails (`ENOMEM` from `mmap`).
    ///
    /// # Errors
    /// [`SegmentOpenError::Os`] when a system call fails.
    pub fn create_in(
        geometry: SegmentGeometry,
        info: SegmentInfo,
        huge_pages: bool,
    ) -> Result<Arc<Self>, SegmentOpenError> {
        let mut flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
        if huge_pages {
            flags |= MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB;
        }
        let fd = rustix::fs::memfd_create("tie-session", flags).map_err(os("memfd_create"))?;
        // A memfd's inode starts at mode 0777: anyone holding an fd of it could reopen it
        // writable through /proc. 0600 keeps reopening to the server's own user (the client
        // has its writable fd, an inspector of another uid only its read-only one).
        rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(0o600)).map_err(os("fchmod"))?;
        rustix::fs::ftruncate(&fd, geometry.segment_size as u64).map_err(os("ftruncate"))?;
        if huge_pages {
            // Huge pages are taken now, so a short pool is an error here (and the caller's
            // fallback) rather than a SIGBUS at the first touch.
            rustix::fs::fallocate(
                &fd,
                rustix::fs::FallocateFlags::empty(),
                0,
                geometry.segment_size as u64,
            )
            .map_err(os("fallocate"))?;
        }
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(os("fcntl(F_ADD_SEALS)"))?;
        let map = MappedWords::new(map(&fd, geometry.segment_size)?);
        let segment = Self {
            map,
            fd,
            info,
            geometry,
        };
        // A new memfd reads as zeros: the ring indices start at 0 and need no store. Slots start
        // with a stamp no frame carries, so an unwritten slot never passes for a frame.
        segment.request_ring().clear_stamps(abi::EMPTY_STAMP);
        segment.response_ring().clear_stamps(abi::EMPTY_STAMP);
        let info_words: &[u64] = bytemuck::cast_slice(bytemuck::bytes_of(&info));
        for (i, w) in info_words.iter().enumerate() {
            // Relaxed: published by the Release store of the ready word below.
            segment.words()[i].store(*w, Ordering::Relaxed);
        }
        segment.set_server_state(ServerState::Running, 0);
        // SYNC(ready): Release pairs with the client's Acquire in `Segment::open`: the whole
        // header is visible before the ready word.
        segment.word(READY_OFFSET).store(READY, Ordering::Release);
        Ok(Arc::new(segment))
    }

    /// Maps a segment received from the server and checks its header against what the
    /// handshake announced.
    ///
    /// # Errors
    /// [`SegmentOpenError`] when the fd's size, the ready word, the magic, the ABI version or
    /// the geometry are not as expected.
    pub fn open(fd: OwnedFd, expected_size: u64) -> Result<Arc<Self>, SegmentOpenError> {
        let actual = checked_size(&fd, expected_size)?;
        // The mapping is only safe to read while it cannot shrink under us.
        let seals = rustix::fs::fcntl_get_seals(&fd).map_err(os("fcntl(F_GET_SEALS)"))?;
        if !seals.contains(SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL) {
            return Err(SegmentOpenError::NotSealed);
        }
        let map = MappedWords::new(map(&fd, actual as usize)?);
        let mut segment = Self {
            map,
            fd,
            info: SegmentInfo::zeroed(),
            geometry: SegmentGeometry::new(1, 1, 1).expect("a valid geometry"),
        };
        let (info, geometry) = check_header(segment.words(), actual)?;
        segment.info = info;
        segment.geometry = geometry;
        Ok(Arc::new(segment))
    }

    /// The header, as written at creation (the server's copy on the server; the checked copy
    /// on the client).
    pub fn info(&self) -> &SegmentInfo {
        &self.info
    }

    /// The segment's geometry.
    pub fn geometry(&self) -> &SegmentGeometry {
        &self.geometry
    }

    /// The memfd, to pass to the peer.
    pub fn fd(&self) -> impl AsFd + '_ {
        &self.fd
    }

    /// The server-state word and its detail, as they are now (`None` for a value the server
    /// never writes).
    pub fn server_state(&self) -> (Option<ServerState>, u64) {
        // SYNC(state): Acquire pairs with the Release in `set_server_state`.
        let state = self.word(SERVER_STATE_OFFSET).load(Ordering::Acquire);
        let detail = self.word(SERVER_DETAIL_OFFSET).load(Ordering::Relaxed);
        (ServerState::from_code(state), detail)
    }

    /// Sets the server-state word (server only).
    pub fn set_server_state(&self, state: ServerState, detail: u64) {
        // Relaxed: published by the Release store of the state word.
        self.word(SERVER_DETAIL_OFFSET)
            .store(detail, Ordering::Relaxed);
        // SYNC(state): Release, so a client that sees Closing also sees every response pushed
        // before it.
        self.word(SERVER_STATE_OFFSET)
            .store(state.code(), Ordering::Release);
    }

    /// The request ring.
    pub fn request_ring(&self) -> RingView<'_> {
        self.map.request_ring(&self.geometry)
    }

    /// The response ring.
    pub fn response_ring(&self) -> RingView<'_> {
        self.map.response_ring(&self.geometry)
    }

    /// Stores the server's error counter (observers read it).
    pub fn set_server_errors(&self, errors: u64) {
        // Relaxed: a statistic; nothing is ordered by it.
        self.word(abi::SERVER_ERRORS_OFFSET)
            .store(errors, Ordering::Relaxed);
    }

    /// Stores the client's ring-full counter (observers read it).
    pub fn set_client_queue_full(&self, count: u64) {
        // Relaxed: a statistic; nothing is ordered by it.
        self.word(abi::CLIENT_QUEUE_FULL_OFFSET)
            .store(count, Ordering::Relaxed);
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        &self.words()[offset / 8]
    }

    /// The whole segment as words.
    pub fn words(&self) -> &[AtomicU64] {
        self.map.words()
    }
}

/// The size of a segment's fd, checked against the size the server announced.
pub(crate) fn checked_size(fd: &OwnedFd, expected_size: u64) -> Result<u64, SegmentOpenError> {
    let stat = rustix::fs::fstat(fd).map_err(os("fstat"))?;
    let actual = stat.st_size as u64;
    if actual != expected_size || actual < abi::HEADER_SIZE as u64 {
        return Err(SegmentOpenError::SizeMismatch {
            expected: expected_size,
            actual,
        });
    }
    Ok(actual)
}

/// Checks a mapped segment's header: ready word, magic, ABI version, and that the geometry
/// recomputed from the capacities and feature count matches every offset and `actual` size.
pub(crate) fn check_header(
    words: &[AtomicU64],
    actual: u64,
) -> Result<(SegmentInfo, SegmentGeometry), SegmentOpenError> {
    // SYNC(ready): Acquire pairs with the server's Release in `Segment::create`.
    if words[READY_OFFSET / 8].load(Ordering::Acquire) != READY {
        return Err(SegmentOpenError::NotReady);
    }
    let mut info_words = [0u64; size_of::<SegmentInfo>() / 8];
    for (dst, src) in info_words.iter_mut().zip(words) {
        *dst = src.load(Ordering::Relaxed);
    }
    let info: SegmentInfo = bytemuck::cast(info_words);
    if info.magic != SEGMENT_MAGIC {
        return Err(SegmentOpenError::BadMagic { found: info.magic });
    }
    if info.abi_version != ABI_VERSION {
        return Err(SegmentOpenError::VersionMismatch {
            ours: ABI_VERSION,
            theirs: info.abi_version,
        });
    }
    // The server may pad the segment past its rings (to a multiple of its page size).
    let geometry = SegmentGeometry::new(
        info.request_capacity,
        info.response_capacity,
        info.feature_count,
    )
    .map_err(|_| SegmentOpenError::BadGeometry("ring sizes or feature count"))?
    .with_size(usize::try_from(info.segment_size).unwrap_or(0))
    .ok_or(SegmentOpenError::BadGeometry("segment size"))?;
    // The rings' end, or that rounded up to huge pages: nothing larger is mapped.
    let end = geometry.rings_end();
    if geometry.segment_size != end
        && geometry.segment_size != end.next_multiple_of(abi::HUGE_PAGE_SIZE)
    {
        return Err(SegmentOpenError::BadGeometry("segment size"));
    }
    if geometry.info(
        info.layout_hash,
        info.session_id,
        info.output_count,
        info.model_version,
    ) != info
    {
        return Err(SegmentOpenError::BadGeometry("offsets or sizes"));
    }
    if geometry.segment_size as u64 != actual {
        return Err(SegmentOpenError::BadGeometry("segment size"));
    }
    if info.output_count as usize > abi::MAX_OUTPUTS {
        return Err(SegmentOpenError::BadGeometry("output count"));
    }
    Ok((info, geometry))
}

/// The ring at `offset` of a segment's words.
pub(crate) fn ring_at(
    words: &[AtomicU64],
    offset: usize,
    capacity: u32,
    slot_words: usize,
) -> RingView<'_> {
    let base = offset / 8;
    let slots_start = base + abi::RING_INDEX_SIZE / 8;
    let slots = &words[slots_start..slots_start + capacity as usize * slot_words];
    RingView::new(
        &words[base],
        &words[base + abi::INDEX_SPACING / 8],
        slots,
        capacity,
        slot_words,
    )
    .expect("geometry was checked")
}

fn map(fd: &OwnedFd, len: usize) -> Result<MmapRaw, SegmentOpenError> {
    MmapOptions::new()
        .len(len)
        .map_raw(fd)
        .map_err(|source| SegmentOpenError::Os { op: "mmap", source })
}

/// The two ring ends one side of a session holds, kept together with the segment they point
/// into. `P` is the side's producer, `C` its consumer; their lifetimes are tied to the
/// segment held here, and they never leave this struct.
pub struct RingEnds {
    // Field order is drop order: the ends go before the segment they point into.
    producer: Producer<'static>,
    consumer: Consumer<'static>,
    segment: Arc<Segment>,
}

impl std::fmt::Debug for RingEnds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingEnds")
            .field("producer", &self.producer)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

/// A look at the tail of a ring (see [`RingEnds::peer_tail_watch`]): one load of one cache
/// line, with nothing else of the session touched.
pub struct TailWatch {
    // Field order is drop order: the word goes before the segment it points into.
    tail: &'static AtomicU64,
    _segment: Arc<Segment>,
}

impl TailWatch {
    /// The tail as it is now, unchecked (see [`Consumer::peer_tail`]).
    #[inline]
    pub fn load(&self) -> u64 {
        // SYNC(tail): Acquire pairs with the producer's Release in `Producer::publish`.
        self.tail.load(Ordering::Acquire)
    }
}

impl std::fmt::Debug for TailWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TailWatch").finish_non_exhaustive()
    }
}

/// Which side of a session a [`RingEnds`] is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Produces requests, consumes responses.
    Client,
    /// Consumes requests, produces responses.
    Server,
}

impl RingEnds {
    /// The ends of `side` over `segment`'s rings, both starting at index 0.
    pub fn new(segment: Arc<Segment>, side: Side) -> Self {
        let (produce, consume) = match side {
            Side::Client => (segment.request_ring(), segment.response_ring()),
            Side::Server => (segment.response_ring(), segment.request_ring()),
        };
        // SAFETY: the views borrow the mapping owned by `segment`, which this struct holds in
        // an `Arc` and drops after them (field order); the mapping's address never changes
        // while it is alive. The 'static views never leave this struct (every method returns
        // plain values) but for a `TailWatch`'s tail word, which the watch keeps beside its own
        // `Arc` of the segment.
        let (produce, consume) = unsafe {
            (
                std::mem::transmute::<RingView<'_>, RingView<'static>>(produce),
                std::mem::transmute::<RingView<'_>, RingView<'static>>(consume),
            )
        };
        Self {
            producer: Producer::new(produce),
            consumer: Consumer::new(consume),
            segment,
        }
    }

    /// The segment.
    pub fn segment(&self) -> &Arc<Segment> {
        &self.segment
    }

    /// See [`Producer::try_push`].
    ///
    /// # Errors
    /// As [`Producer::try_push`].
    #[inline]
    pub fn try_push(&mut self, words: &[u64]) -> Result<(), PushError> {
        self.producer.try_push(words)
    }

    /// See [`Producer::publish`].
    #[inline]
    pub fn publish(&mut self) {
        self.producer.publish();
    }

    /// See [`Producer::free_slots`].
    ///
    /// # Errors
    /// As [`Producer::free_slots`].
    #[inline]
    pub fn free_slots(&mut self) -> Result<u64, RingCorrupt> {
        self.producer.free_slots()
    }

    /// Frames this side has pushed.
    #[inline]
    pub fn pushed(&self) -> u64 {
        self.producer.pushed()
    }

    /// Frames the peer has consumed of ours, reloading its index.
    ///
    /// # Errors
    /// As [`Producer::consumed`].
    #[inline]
    pub fn peer_consumed(&mut self) -> Result<u64, RingCorrupt> {
        self.producer.consumed()
    }

    /// See [`Consumer::try_pop`].
    ///
    /// # Errors
    /// As [`Consumer::try_pop`].
    #[inline]
    pub fn try_pop(&mut self, out: &mut [u64]) -> Result<bool, RingCorrupt> {
        self.consumer.try_pop(out)
    }

    /// See [`Consumer::try_pop_stamped`].
    ///
    /// # Errors
    /// As [`Consumer::try_pop_stamped`].
    #[inline]
    pub fn try_pop_stamped(&mut self, stamp: u64, out: &mut [u64]) -> Result<bool, RingCorrupt> {
        self.consumer.try_pop_stamped(stamp, out)
    }

    /// See [`Consumer::try_pop_stamped_with`].
    ///
    /// # Errors
    /// As [`Consumer::try_pop_stamped_with`].
    #[inline]
    pub fn try_pop_stamped_with<'d>(
        &mut self,
        stamp: u64,
        head: &mut [u64],
        rest: impl FnOnce(&[u64]) -> Option<&'d mut [u64]>,
    ) -> Result<usize, RingCorrupt> {
        self.consumer.try_pop_stamped_with(stamp, head, rest)
    }

    /// See [`Consumer::available`].
    ///
    /// # Errors
    /// As [`Consumer::available`].
    #[inline]
    pub fn available(&mut self) -> Result<u64, RingCorrupt> {
        self.consumer.available()
    }

    /// See [`Consumer::release`].
    #[inline]
    pub fn release(&mut self) {
        self.consumer.release();
    }

    /// Frames this side has popped.
    #[inline]
    pub fn popped(&self) -> u64 {
        self.consumer.popped()
    }

    /// A watch on the tail of the ring this side consumes, which keeps the segment mapped.
    pub fn peer_tail_watch(&self) -> TailWatch {
        TailWatch {
            tail: self.consumer.tail_word(),
            _segment: self.segment.clone(),
        }
    }

    /// See [`Consumer::stamped`].
    #[inline]
    pub fn stamped(&self, stamp: u64) -> bool {
        self.consumer.stamped(stamp)
    }

    /// See [`Consumer::peer_tail`].
    #[inline]
    pub fn peer_tail(&self) -> u64 {
        self.consumer.peer_tail()
    }
}
