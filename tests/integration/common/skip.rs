//! Skips that are counted and can be forbidden.
//!
//! A test that cannot run here (no GPU, not root, no huge page) calls [`skip`] and returns. The
//! skip is printed to stderr and appended to the file named by `TIE_SKIP_LOG` (`.ci/run` sets
//! it, prints the count and lists each skip), so a skip never passes unseen. Where the
//! hardware or privilege must be there, the matching variable turns the skip into a failure:
//! `TIE_REQUIRE_GPU=N` (N GPUs; `gpu-bundle`'s run.sh sets 1), `TIE_REQUIRE_ROOT=1`,
//! `TIE_REQUIRE_HUGE_PAGES=1`.

use std::io::Write as _;

/// What a test needs that this machine may lack. (Each binary that includes this file uses
/// some of the variants.)
#[allow(dead_code)]
#[derive(Clone, Copy, Debug)]
pub enum Need {
    /// This many usable GPUs.
    Gpus(u32),
    /// Root (to run clients as other users, to reserve huge pages).
    Root,
    /// A free 2 MB huge page.
    HugePages,
    /// A machine without a usable GPU (the no-GPU paths; never required).
    NoGpu,
}

impl Need {
    /// Whether the environment says this need must be met here.
    fn required(self) -> bool {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty() && v != "0")
        };
        match self {
            Self::Gpus(n) => var("TIE_REQUIRE_GPU")
                .and_then(|v| v.parse::<u32>().ok())
                .is_some_and(|required| required >= n),
            Self::Root => var("TIE_REQUIRE_ROOT").is_some(),
            Self::HugePages => var("TIE_REQUIRE_HUGE_PAGES").is_some(),
            Self::NoGpu => false,
        }
    }
}

/// Records that the calling test skips for lack of `need`, saying `why`; the test then
/// returns.
///
/// # Panics
/// When the environment requires `need` (see the module docs): the test fails instead.
pub fn skip(need: Need, why: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_string();
    assert!(
        !need.required(),
        "{test}: {need:?} is required here (TIE_REQUIRE_*), but: {why}"
    );
    let line = format!("SKIPPED {test} ({need:?}): {why}");
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("TIE_SKIP_LOG") {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path);
        if let Ok(mut f) = file {
            let _ = writeln!(f, "{line}");
        }
    }
}
