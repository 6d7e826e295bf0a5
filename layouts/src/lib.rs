//! The shared-memory ABI between the tie server and its clients.
//!
//! Everything two processes share lives here, with nothing from the rest of the workspace:
//!
//! - [`abi`]: the segment header ([`SegmentInfo`]), the request and response frames
//!   ([`RequestHeader`], [`ResponseFrame`]), status codes ([`Status`]) and the byte offsets of a
//!   session segment ([`SegmentGeometry`]).
//! - [`ring`]: a single-producer/single-consumer ring over words of shared memory
//!   ([`Producer`], [`Consumer`]) that never trusts the peer's index.
//! - [`hello`]: the handshake sent over the session socket ([`Hello`], [`HelloReply`]).
//! - [`layout`]: feature layouts (ordered feature names and dtype) and their hash.
//! - [`check`]: the server's checks of request frames and hellos (untrusted input; fuzzed).
//!
//! `layouts/README.md` describes the ABI in prose, with a table of byte offsets.
//!
//! # Example
//!
//! A ring over ordinary memory (in a real session the words are a shared mapping):
//!
//! ```
//! use tie_layouts::ring::{Consumer, Producer, RingView};
//! use tie_layouts::sync::AtomicU64;
//!
//! let tail = AtomicU64::new(0);
//! let head = AtomicU64::new(0);
//! let slots: Vec<AtomicU64> = (0..4 * 2).map(|_| AtomicU64::new(0)).collect();
//! let ring = RingView::new(&tail, &head, &slots, 4, 2).unwrap();
//! let mut producer = Producer::new(ring);
//! let mut consumer = Consumer::new(ring);
//! producer.push(&[7, 8]).unwrap();
//! let mut out = [0u64; 2];
//! assert!(consumer.try_pop(&mut out).unwrap());
//! consumer.release();
//! assert_eq!(out, [7, 8]);
//! ```
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod abi;
#[cfg(feature = "std")]
pub mod check;
pub mod hello;
#[cfg(feature = "std")]
pub mod layout;
pub mod ring;
pub mod sync;

pub use abi::{
    RejectReason, RequestHeader, ResponseFrame, SegmentGeometry, SegmentInfo, ServerState, Status,
};
pub use hello::{Hello, HelloReply, HelloStatus};
#[cfg(feature = "std")]
pub use layout::{FeatureLayout, LayoutError};
pub use ring::{Consumer, Producer, RingCorrupt, RingView};

/// FNV-1a, 64 bits: the hash of feature layouts. Stable across platforms and versions, so a
/// hash computed by a client build matches the server's for the same layout.
pub const fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// The FNV-1a offset basis, the starting value of [`fnv1a`].
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
