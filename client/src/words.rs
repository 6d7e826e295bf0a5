//! [`MappedWords`]: a mapped session segment as atomic words, and its two rings. The one
//! place a mapping becomes `&[AtomicU64]`, shared by the read-write [`crate::segment::Segment`]
//! and the read-only [`crate::inspect::SegmentView`].

use memmap2::MmapRaw;
use tie_layouts::abi::{SegmentGeometry, RESPONSE_WORDS};
use tie_layouts::ring::RingView;
use tie_layouts::sync::AtomicU64;

use crate::segment::ring_at;

/// A mapping of a session segment, seen as words.
///
/// Invariants (upheld by whoever builds one): the mapping is page-aligned, its length is a
/// multiple of 8, and it is of a memfd sealed against shrinking (the server seals it when it
/// creates it; an opener refuses an fd without the seals), so its pages cannot go away while
/// it is mapped.
#[derive(Debug)]
pub(crate) struct MappedWords {
    map: MmapRaw,
}

impl MappedWords {
    /// Wraps a mapping that meets the type's invariants.
    pub(crate) fn new(map: MmapRaw) -> Self {
        debug_assert_eq!(map.len() % size_of::<u64>(), 0);
        Self { map }
    }

    /// The whole segment as words.
    pub(crate) fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page-aligned, a multiple of 8 bytes long and lives as long as
        // `self`, its pages cannot be shrunk away (sealed memfd: the type's invariants). Every
        // bit pattern is a valid `AtomicU64`, and every access through the slice is atomic, so
        // a peer's writes are never a data race of ours. A read-only mapping is only ever
        // loaded from (its users, the inspector's `RingView` observers, only load).
        unsafe {
            std::slice::from_raw_parts(
                self.map.as_ptr() as *const AtomicU64,
                self.map.len() / size_of::<u64>(),
            )
        }
    }

    /// The request ring of a segment of `geometry`.
    pub(crate) fn request_ring(&self, geometry: &SegmentGeometry) -> RingView<'_> {
        ring_at(
            self.words(),
            geometry.request_offset,
            geometry.request_capacity,
            geometry.request_slot_size / 8,
        )
    }

    /// The response ring of a segment of `geometry`.
    pub(crate) fn response_ring(&self, geometry: &SegmentGeometry) -> RingView<'_> {
        ring_at(
            self.words(),
            geometry.response_offset,
            geometry.response_capacity,
            RESPONSE_WORDS,
        )
    }
}
