//! How a blocking call waits for its response.

use std::time::{Duration, Instant};

/// How [`crate::Client::predict`] waits between polls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WaitStrategy {
    /// Spin on the ring: lowest latency, one core busy while waiting.
    #[default]
    BusySpin,
    /// Spin for `spin`, then yield the core between polls.
    SpinThenYield {
        /// How long to spin first.
        spin: Duration,
    },
    /// Spin for `spin`, then sleep `park` between polls.
    SpinThenPark {
        /// How long to spin first.
        spin: Duration,
        /// How long each sleep lasts.
        park: Duration,
    },
}

impl WaitStrategy {
    /// Waits once, given when waiting started.
    #[inline]
    pub(crate) fn pause(&self, started: Instant) {
        match *self {
            // No PAUSE: it costs tens of nanoseconds of reaction time on recent x86 cores.
            Self::BusySpin => {}
            Self::SpinThenYield { spin } => {
                if started.elapsed() < spin {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
            Self::SpinThenPark { spin, park } => {
                if started.elapsed() < spin {
                    std::hint::spin_loop();
                } else {
                    std::thread::sleep(park);
                }
            }
        }
    }
}
