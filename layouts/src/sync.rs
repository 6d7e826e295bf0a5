//! The atomics every shared type uses, in one place so that loom can replace them.
//!
//! Built with `RUSTFLAGS="--cfg loom"`, these are loom's model-checked atomics and the ring tests
//! in `layouts/tests/loom.rs` explore every interleaving of the ring protocol.

#[cfg(loom)]
pub use loom::sync::atomic::{fence, AtomicU64, Ordering};

#[cfg(not(loom))]
pub use core::sync::atomic::{fence, AtomicU64, Ordering};

/// Spin-loop hint; under loom a yield so the model checker can schedule the peer.
#[inline]
pub fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    core::hint::spin_loop();
}
