//! Segment header, frames and status codes: the bytes both processes read and write.
//!
//! # What every shared type must meet
//!
//! A type placed in shared memory or sent over the session socket:
//! 1. is `#[repr(C)]` with fixed-width integer or float fields only (no `bool`, enum, `usize` or
//!    pointer: a peer may write any bit pattern, and every bit pattern must be a valid value);
//! 2. has no padding (checked by `bytemuck::Pod`'s derive) and a `const` assert of its size and
//!    of each field's offset, so a change to the ABI cannot go unnoticed;
//! 3. is only ever copied out of shared memory word by word through atomics (see [`crate::ring`]),
//!    never referenced in place: the peer may change it while it is read.
//!
//! Values with a meaning beyond their bits (status codes, priorities) are decoded from the copy,
//! and an unknown value is an error of the frame, never undefined behaviour.

use bytemuck::{Pod, Zeroable};
use core::mem::{offset_of, size_of};

/// First word of every segment: `b"TIESEG\0\x01"` read as a little-endian u64.
pub const SEGMENT_MAGIC: u64 = u64::from_le_bytes(*b"TIESEG\0\x01");
/// Version of this ABI (segment, frames, handshake). Bumped on any incompatible change.
pub const ABI_VERSION: u32 = 2;
/// Value of the ready word once the server has initialised the whole segment.
pub const READY: u64 = u64::from_le_bytes(*b"READY\0\0\0");
/// First word of every slot of a new segment: no frame carries it (a request's first word is
/// its sequence number, a response's its request id), so an unwritten slot never passes for a
/// frame (see [`crate::ring`]'s "Stamps").
pub const EMPTY_STAMP: u64 = u64::MAX;
/// A cache line on the platforms tie runs on.
pub const CACHE_LINE: usize = 64;
/// Spacing of the two indices of a ring: two cache lines, so adjacent-line prefetch does not
/// make producer and consumer share one.
pub const INDEX_SPACING: usize = 128;
/// Most output values a response frame carries.
pub const MAX_OUTPUTS: usize = 16;
/// Most features a request frame may carry.
pub const MAX_FEATURES: u32 = 4096;
/// Largest ring a session may ask for (slots).
pub const MAX_RING_CAPACITY: u32 = 1 << 16;
/// Size of the huge pages a server may place segments on (`server.huge_pages`); such a
/// segment's size is a multiple of it.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// Bytes of the segment header: [`SegmentInfo`], then the control words.
pub const HEADER_SIZE: usize = 256;
/// Byte offset of the ready word (u64, stored last with Release by the server).
pub const READY_OFFSET: usize = 128;
/// Byte offset of the server-state word (u64, a [`ServerState`] value).
pub const SERVER_STATE_OFFSET: usize = 136;
/// Byte offset of the server-state detail word (u64: the reason of a fault).
pub const SERVER_DETAIL_OFFSET: usize = 144;
/// Byte offset of the server's error counter (u64: responses sent with an error status),
/// for observers.
pub const SERVER_ERRORS_OFFSET: usize = 152;
/// Byte offset of the client's ring-full counter (u64: submits refused because the rings were
/// full), written by the client for observers; the server never reads it.
pub const CLIENT_QUEUE_FULL_OFFSET: usize = 160;
/// Bytes of a ring's index block: tail at 0, head at [`INDEX_SPACING`].
pub const RING_INDEX_SIZE: usize = 2 * INDEX_SPACING;

/// Fixed description of a session segment, written once by the server before the ready word.
///
/// The client checks it; the server never reads it back (it keeps its own copy), so a client
/// that overwrites it harms only itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SegmentInfo {
    /// [`SEGMENT_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`] of the server that made the segment.
    pub abi_version: u32,
    /// `size_of::<SegmentInfo>()`, for a reader of another version.
    pub info_size: u32,
    /// Hash of the feature layout the model reads ([`crate::FeatureLayout::hash`]).
    pub layout_hash: u64,
    /// Server-assigned id of this session.
    pub session_id: u64,
    /// Total bytes of the segment.
    pub segment_size: u64,
    /// Byte offset of the request ring's index block.
    pub request_offset: u64,
    /// Byte offset of the response ring's index block.
    pub response_offset: u64,
    /// Slots of the request ring (a power of two).
    pub request_capacity: u32,
    /// Bytes of one request slot: the 48-byte header and the features, padded to cache lines.
    pub request_slot_size: u32,
    /// Slots of the response ring (a power of two).
    pub response_capacity: u32,
    /// Bytes of one response slot (`size_of::<ResponseFrame>()`).
    pub response_slot_size: u32,
    /// Features in every request frame.
    pub feature_count: u32,
    /// Output values in every successful response.
    pub output_count: u32,
    /// Version of the model that serves this session.
    pub model_version: u32,
    /// [`MAX_OUTPUTS`].
    pub max_outputs: u32,
    /// Zero.
    pub reserved: [u64; 5],
}

const _: () = {
    assert!(size_of::<SegmentInfo>() == 128);
    assert!(offset_of!(SegmentInfo, magic) == 0);
    assert!(offset_of!(SegmentInfo, abi_version) == 8);
    assert!(offset_of!(SegmentInfo, info_size) == 12);
    assert!(offset_of!(SegmentInfo, layout_hash) == 16);
    assert!(offset_of!(SegmentInfo, session_id) == 24);
    assert!(offset_of!(SegmentInfo, segment_size) == 32);
    assert!(offset_of!(SegmentInfo, request_offset) == 40);
    assert!(offset_of!(SegmentInfo, response_offset) == 48);
    assert!(offset_of!(SegmentInfo, request_capacity) == 56);
    assert!(offset_of!(SegmentInfo, request_slot_size) == 60);
    assert!(offset_of!(SegmentInfo, response_capacity) == 64);
    assert!(offset_of!(SegmentInfo, response_slot_size) == 68);
    assert!(offset_of!(SegmentInfo, feature_count) == 72);
    assert!(offset_of!(SegmentInfo, output_count) == 76);
    assert!(offset_of!(SegmentInfo, model_version) == 80);
    assert!(offset_of!(SegmentInfo, max_outputs) == 84);
    assert!(offset_of!(SegmentInfo, reserved) == 88);
    assert!(size_of::<SegmentInfo>() <= READY_OFFSET);
    assert!(CLIENT_QUEUE_FULL_OFFSET + 8 <= HEADER_SIZE);
};

/// Header of a request frame; the frame's features (f32) follow it in the same slot.
///
/// 48 bytes, so that a frame of up to 4 features fits one cache line with its header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RequestHeader {
    /// Per-session sequence number: 0, 1, 2, ... in submission order. The slot's stamp.
    pub seq: u64,
    /// Client-chosen id, echoed in the response.
    pub request_id: u64,
    /// CLOCK_MONOTONIC nanoseconds after which the answer is useless; 0 for none.
    pub deadline_ns: u64,
    /// CLOCK_MONOTONIC nanoseconds at which the client submitted the frame.
    pub send_ts_ns: u64,
    /// Which of the session's models serves the frame; 0 is the model named in the hello.
    pub model_slot: u32,
    /// 0 Low, 1 Normal, 2 High, 3 Critical.
    pub priority: u32,
    /// Features that follow the header; must equal the layout's count.
    pub feature_count: u32,
    /// The round trip (ns, saturated) the client measured for the latest response it read
    /// since its previous frame; 0 for none. The server records it as the session's
    /// end-to-end latency, so that figure needs no traffic of its own.
    pub reported_round_trip_ns: u32,
}

const _: () = {
    assert!(size_of::<RequestHeader>() == 48);
    assert!(offset_of!(RequestHeader, seq) == 0);
    assert!(offset_of!(RequestHeader, request_id) == 8);
    assert!(offset_of!(RequestHeader, deadline_ns) == 16);
    assert!(offset_of!(RequestHeader, send_ts_ns) == 24);
    assert!(offset_of!(RequestHeader, model_slot) == 32);
    assert!(offset_of!(RequestHeader, priority) == 36);
    assert!(offset_of!(RequestHeader, feature_count) == 40);
    assert!(offset_of!(RequestHeader, reported_round_trip_ns) == 44);
};

/// A response frame: one per accepted request.
///
/// The header is 48 bytes, so a response of up to 4 outputs fits one cache line; a writer
/// writes, and a reader reads, only the words up to the last output (see
/// [`response_words`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct ResponseFrame {
    /// The request's id. The slot's stamp.
    pub request_id: u64,
    /// The request's sequence number.
    pub seq: u64,
    /// A [`Status`] code.
    pub status: u32,
    /// Version of the model that answered.
    pub model_version: u32,
    /// Valid values in `outputs` (0 on error).
    pub output_count: u32,
    /// Status detail: see [`Status`] for what it holds per code.
    pub detail_a: u32,
    /// Confidence of the prediction, in 0..=1.
    pub confidence: f32,
    /// Second status detail.
    pub detail_b: u32,
    /// Nanoseconds from the server accepting the frame to its batch starting (saturated).
    pub queue_ns: u32,
    /// Nanoseconds the batch that held the request took to compute (saturated).
    pub compute_ns: u32,
    /// Output values, row-major, `output_count` of them valid.
    pub outputs: [f32; MAX_OUTPUTS],
    /// Zero.
    pub reserved: [u64; 2],
}

const _: () = {
    assert!(size_of::<ResponseFrame>() == 128);
    assert!(offset_of!(ResponseFrame, request_id) == 0);
    assert!(offset_of!(ResponseFrame, seq) == 8);
    assert!(offset_of!(ResponseFrame, status) == 16);
    assert!(offset_of!(ResponseFrame, model_version) == 20);
    assert!(offset_of!(ResponseFrame, output_count) == 24);
    assert!(offset_of!(ResponseFrame, detail_a) == 28);
    assert!(offset_of!(ResponseFrame, confidence) == 32);
    assert!(offset_of!(ResponseFrame, detail_b) == 36);
    assert!(offset_of!(ResponseFrame, queue_ns) == 40);
    assert!(offset_of!(ResponseFrame, compute_ns) == 44);
    assert!(offset_of!(ResponseFrame, outputs) == 48);
    assert!(offset_of!(ResponseFrame, reserved) == 112);
};

/// Words (u64) of a response header.
pub const RESPONSE_HEADER_WORDS: usize = offset_of!(ResponseFrame, outputs) / 8;

/// Words of a response frame that matter for `output_count` outputs: the header and the
/// outputs, rounded up to a word.
pub const fn response_words(output_count: u32) -> usize {
    let outputs = if output_count as usize > MAX_OUTPUTS {
        MAX_OUTPUTS
    } else {
        output_count as usize
    };
    RESPONSE_HEADER_WORDS + outputs.div_ceil(2)
}

/// Words (u64) of a response slot.
pub const RESPONSE_WORDS: usize = size_of::<ResponseFrame>() / 8;
/// Words (u64) of a request header.
pub const REQUEST_HEADER_WORDS: usize = size_of::<RequestHeader>() / 8;

/// Bytes of a request slot carrying `feature_count` features: the header and the features,
/// padded to whole cache lines.
pub const fn request_slot_size(feature_count: u32) -> usize {
    let bytes = size_of::<RequestHeader>() + feature_count as usize * 4;
    bytes.div_ceil(CACHE_LINE) * CACHE_LINE
}

/// Words of a request frame carrying `feature_count` features (header and features).
pub const fn request_words(feature_count: u32) -> usize {
    REQUEST_HEADER_WORDS + (feature_count as usize).div_ceil(2)
}

/// Status of a response, as the `status` word of a [`ResponseFrame`].
///
/// Codes 1..=6 are the error kinds of the spec's `InferenceError`; `detail_a`/`detail_b` of the
/// frame carry the numbers that go with each:
///
/// | code | name | detail_a | detail_b |
/// |---|---|---|---|
/// | 0 | Ok | | |
/// | 1 | ModelNotFound | model slot | |
/// | 2 | InvalidInputShape | expected features | features given |
/// | 3 | ExecutionFailed | 0: the backend failed; [`EXECUTION_FAILED_NON_FINITE`]: an output was NaN or infinite | that output's index |
/// | 4 | OutOfMemory | requested MB | |
/// | 5 | BatchProcessingError | | |
/// | 6 | BackendError (the spec's TensorRTError) | | |
/// | 7 | Timeout | ns late (saturated) | |
/// | 8 | QueueFull | queue limit | |
/// | 9 | Rejected | a [`RejectReason`] | reason detail |
/// | 10 | NotReady (the model failed its health check) | | |
/// | 100 | Disconnected (made by the client, never sent) | | |
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Status(pub u32);

/// `detail_a` of an `ExecutionFailed` answer: the model's output `detail_b` was NaN or
/// infinite for this row (and its layout does not allow non-finite values).
pub const EXECUTION_FAILED_NON_FINITE: u32 = 1;

impl Status {
    /// A prediction.
    pub const OK: Status = Status(0);
    /// The frame names a model slot the session does not have.
    pub const MODEL_NOT_FOUND: Status = Status(1);
    /// The feature count differs from the layout's.
    pub const INVALID_INPUT_SHAPE: Status = Status(2);
    /// The backend failed to run the batch.
    pub const EXECUTION_FAILED: Status = Status(3);
    /// The model could not get the memory it needs.
    pub const OUT_OF_MEMORY: Status = Status(4);
    /// The batcher failed to form or split the batch.
    pub const BATCH_PROCESSING_ERROR: Status = Status(5);
    /// The backend engine reported an error of its own.
    pub const BACKEND_ERROR: Status = Status(6);
    /// The deadline passed before the request was executed; it was not executed.
    pub const TIMEOUT: Status = Status(7);
    /// The model's queue was full; the request was not admitted.
    pub const QUEUE_FULL: Status = Status(8);
    /// The frame was malformed; see [`RejectReason`].
    pub const REJECTED: Status = Status(9);
    /// The model failed its last health check and serves no request until it passes again.
    pub const NOT_READY: Status = Status(10);
    /// The server went away before answering (made by the client for its pending requests).
    pub const DISCONNECTED: Status = Status(100);

    /// Whether this is a prediction.
    pub const fn is_ok(self) -> bool {
        self.0 == 0
    }

    /// Name of the status, `None` for a code this ABI version does not know.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0 => "Ok",
            1 => "ModelNotFound",
            2 => "InvalidInputShape",
            3 => "ExecutionFailed",
            4 => "OutOfMemory",
            5 => "BatchProcessingError",
            6 => "BackendError",
            7 => "Timeout",
            8 => "QueueFull",
            9 => "Rejected",
            10 => "NotReady",
            100 => "Disconnected",
            _ => return None,
        })
    }
}

/// Why a frame was [`Status::REJECTED`]; carried in `detail_a`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// A feature is NaN or infinite and the layout does not allow it; `detail_b` is its index.
    NonFinite = 1,
    /// The sequence number is not the next one; `detail_b` is the expected one (low 32 bits).
    BadSequence = 2,
    /// The priority is not 0..=3; `detail_b` is the value given.
    BadPriority = 3,
    /// A reserved field is not zero (ABI version 1's `flags`; not sent since version 2).
    BadReserved = 4,
}

impl RejectReason {
    /// Decodes `detail_a` of a rejected frame.
    pub const fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            1 => Self::NonFinite,
            2 => Self::BadSequence,
            3 => Self::BadPriority,
            4 => Self::BadReserved,
            _ => return None,
        })
    }
}

/// Values of the server-state word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerState {
    /// Serving.
    Running,
    /// Shutting down: frames already accepted are answered, nothing new is read.
    Closing,
    /// The server closed the session because the client broke the protocol (the detail word
    /// holds a [`FaultReason`] code).
    Faulted,
}

impl ServerState {
    /// The word's value.
    pub const fn code(self) -> u64 {
        match self {
            Self::Running => 1,
            Self::Closing => 2,
            Self::Faulted => 3,
        }
    }

    /// Decodes the word; `None` for a value the server never writes.
    pub const fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            1 => Self::Running,
            2 => Self::Closing,
            3 => Self::Faulted,
            _ => return None,
        })
    }
}

/// Why the server faulted a session (the server-detail word).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultReason {
    /// The request ring's tail index was out of range.
    RequestIndexCorrupt,
    /// The response ring's head index was out of range.
    ResponseIndexCorrupt,
}

impl FaultReason {
    /// The word's value.
    pub const fn code(self) -> u64 {
        match self {
            Self::RequestIndexCorrupt => 1,
            Self::ResponseIndexCorrupt => 2,
        }
    }

    /// Decodes the word.
    pub const fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            1 => Self::RequestIndexCorrupt,
            2 => Self::ResponseIndexCorrupt,
            _ => return None,
        })
    }
}

/// Where everything lies in a session segment, computed from the ring sizes and the layout.
///
/// Both sides compute it from the same inputs; the client also checks that the server's
/// [`SegmentInfo`] agrees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentGeometry {
    /// Slots of the request ring.
    pub request_capacity: u32,
    /// Slots of the response ring.
    pub response_capacity: u32,
    /// Features of a request frame.
    pub feature_count: u32,
    /// Bytes of a request slot.
    pub request_slot_size: usize,
    /// Byte offset of the request ring's index block.
    pub request_offset: usize,
    /// Byte offset of the response ring's index block.
    pub response_offset: usize,
    /// Total bytes: the rings' end, or more (a multiple of the page size the server placed
    /// the segment on); the bytes past the rings are unused.
    pub segment_size: usize,
}

/// Why ring sizes or a feature count cannot make a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeometryError {
    /// A capacity is not a power of two in `1..=MAX_RING_CAPACITY`.
    BadCapacity {
        /// The capacity given.
        capacity: u32,
    },
    /// The feature count is 0 or above [`MAX_FEATURES`].
    BadFeatureCount {
        /// The count given.
        feature_count: u32,
    },
}

impl core::fmt::Display for GeometryError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadCapacity { capacity } => write!(
                f,
                "ring capacity {capacity} is not a power of two in 1..={MAX_RING_CAPACITY}"
            ),
            Self::BadFeatureCount { feature_count } => {
                write!(
                    f,
                    "feature count {feature_count} is not in 1..={MAX_FEATURES}"
                )
            }
        }
    }
}

impl SegmentGeometry {
    /// Bytes the header and the rings take (`segment_size` of an unpadded segment).
    pub const fn rings_end(&self) -> usize {
        self.response_offset
            + RING_INDEX_SIZE
            + self.response_capacity as usize * size_of::<ResponseFrame>()
    }

    /// The same layout in a segment of `size` bytes, or `None` when the rings do not fit.
    pub const fn with_size(mut self, size: usize) -> Option<Self> {
        if size < self.rings_end() {
            return None;
        }
        self.segment_size = size;
        Some(self)
    }

    /// The same layout in a segment padded to a multiple of `page` bytes (a power of two).
    pub const fn padded_to(mut self, page: usize) -> Self {
        self.segment_size = self.rings_end().div_ceil(page) * page;
        self
    }

    /// Lays out a segment.
    ///
    /// # Errors
    /// [`GeometryError`] when a capacity is not a power of two within limits, or the feature
    /// count is 0 or too large.
    pub const fn new(
        request_capacity: u32,
        response_capacity: u32,
        feature_count: u32,
    ) -> Result<Self, GeometryError> {
        if !valid_capacity(request_capacity) {
            return Err(GeometryError::BadCapacity {
                capacity: request_capacity,
            });
        }
        if !valid_capacity(response_capacity) {
            return Err(GeometryError::BadCapacity {
                capacity: response_capacity,
            });
        }
        if feature_count == 0 || feature_count > MAX_FEATURES {
            return Err(GeometryError::BadFeatureCount { feature_count });
        }
        let request_slot_size = request_slot_size(feature_count);
        let request_offset = HEADER_SIZE;
        let response_offset =
            request_offset + RING_INDEX_SIZE + request_capacity as usize * request_slot_size;
        let segment_size = response_offset
            + RING_INDEX_SIZE
            + response_capacity as usize * size_of::<ResponseFrame>();
        Ok(Self {
            request_capacity,
            response_capacity,
            feature_count,
            request_slot_size,
            request_offset,
            response_offset,
            segment_size,
        })
    }

    /// The [`SegmentInfo`] the server writes for this geometry.
    pub const fn info(
        &self,
        layout_hash: u64,
        session_id: u64,
        output_count: u32,
        model_version: u32,
    ) -> SegmentInfo {
        SegmentInfo {
            magic: SEGMENT_MAGIC,
            abi_version: ABI_VERSION,
            info_size: size_of::<SegmentInfo>() as u32,
            layout_hash,
            session_id,
            segment_size: self.segment_size as u64,
            request_offset: self.request_offset as u64,
            response_offset: self.response_offset as u64,
            request_capacity: self.request_capacity,
            request_slot_size: self.request_slot_size as u32,
            response_capacity: self.response_capacity,
            response_slot_size: size_of::<ResponseFrame>() as u32,
            feature_count: self.feature_count,
            output_count,
            model_version,
            max_outputs: MAX_OUTPUTS as u32,
            reserved: [0; 5],
        }
    }
}

const fn valid_capacity(capacity: u32) -> bool {
    capacity.is_power_of_two() && capacity <= MAX_RING_CAPACITY
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_sizes_are_whole_cache_lines() {
        assert_eq!(request_slot_size(1), 64);
        assert_eq!(request_slot_size(4), 64);
        assert_eq!(request_slot_size(5), 128);
        assert_eq!(request_slot_size(64), 320);
        assert_eq!(request_words(4), 8);
        assert_eq!(request_words(3), 8);
        assert_eq!(response_words(1), 7);
        assert_eq!(response_words(4), 8);
        assert_eq!(response_words(99), 14);
    }

    #[test]
    fn geometry_places_rings_after_the_header() {
        let g = SegmentGeometry::new(8, 16, 64).unwrap();
        assert_eq!(g.request_offset, 256);
        assert_eq!(g.response_offset, 256 + 256 + 8 * 320);
        assert_eq!(SegmentGeometry::new(8, 8, 4).unwrap().request_slot_size, 64);
        assert_eq!(g.segment_size, g.response_offset + 256 + 16 * 128);
        assert_eq!(g.segment_size % 64, 0);
    }

    #[test]
    fn geometry_refuses_bad_sizes() {
        assert_eq!(
            SegmentGeometry::new(3, 8, 4),
            Err(GeometryError::BadCapacity { capacity: 3 })
        );
        assert_eq!(
            SegmentGeometry::new(8, 0, 4),
            Err(GeometryError::BadCapacity { capacity: 0 })
        );
        assert_eq!(
            SegmentGeometry::new(8, 8, 0),
            Err(GeometryError::BadFeatureCount { feature_count: 0 })
        );
        assert!(SegmentGeometry::new(MAX_RING_CAPACITY * 2, 8, 4).is_err());
        assert!(SegmentGeometry::new(8, 8, MAX_FEATURES + 1).is_err());
    }

    #[test]
    fn status_names() {
        assert_eq!(Status::TIMEOUT.name(), Some("Timeout"));
        assert_eq!(Status(55).name(), None);
        assert!(Status::OK.is_ok());
    }
}
