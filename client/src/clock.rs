//! CLOCK_MONOTONIC in nanoseconds, the clock of frame timestamps and deadlines.

/// Nanoseconds of CLOCK_MONOTONIC (the same clock in every process of the host).
#[inline]
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}
