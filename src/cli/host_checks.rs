//! `tie doctor`: checks the host against the deployment guide (deploy/README.md) and says what
//! is fine, what is not, and the fix. Every value is read from the kernel's files (or the
//! driver); one that cannot be read is reported as unknown, never guessed.
#![forbid(unsafe_code)]

use std::path::Path;

use serde::Serialize;

use tie::config::ServiceConfig;
use tie::host::{parse_cpu_list, read_trimmed as read};

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// As the guide recommends.
    Ok,
    /// Works, but costs latency or predictability.
    Warn,
    /// Cannot be read on this host.
    Unknown,
    /// `tie serve` would refuse to start (an invalid config, or a setting this host cannot
    /// honour).
    Fail,
}

/// One check.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// The verdict.
    pub verdict: Verdict,
    /// What was read.
    pub value: String,
    /// What to do about a warning (empty when fine).
    pub fix: String,
}

fn check(name: &'static str, verdict: Verdict, value: impl Into<String>, fix: &str) -> Check {
    Check {
        name,
        verdict,
        value: value.into(),
        fix: if verdict == Verdict::Ok {
            String::new()
        } else {
            fix.to_string()
        },
    }
}

/// The config check: `Ok` naming what was read, or `Fail` with why `tie serve` would refuse
/// it; with the config to check the host against (the defaults when the file could not be
/// parsed, the file's values when only a value is out of range) and whether it is the file's.
pub fn config_check(path: Option<&Path>) -> (Check, ServiceConfig, bool) {
    let name = "config";
    let shown = path.map_or("the defaults (no --config)".to_string(), |p| {
        p.display().to_string()
    });
    let fail = |e: tie::config::ConfigLoadError| {
        let fix = "correct the config: tie serve refuses it";
        check(name, Verdict::Fail, e.to_string().trim_end(), fix)
    };
    match ServiceConfig::read(path) {
        Err(e) => (fail(e), ServiceConfig::default(), false),
        Ok(config) => match config.validate() {
            Ok(()) => (
                check(name, Verdict::Ok, format!("{shown}: valid"), ""),
                config,
                true,
            ),
            Err(e) => (fail(e), config, true),
        },
    }
}

/// Runs every check for a server configured by `config`.
pub fn run(config: &ServiceConfig) -> Vec<Check> {
    let pinned = &config.server.poller_cores;
    let mut out = vec![
        isolated_cores(pinned),
        nohz_full(pinned),
        governor(pinned),
        transparent_huge_pages(),
        segment_huge_pages(config.server.huge_pages),
        memlock(config.server.lock_memory),
        clock_source(),
    ];
    if !pinned.is_empty() {
        out.push(smt_siblings(pinned));
    }
    if config.server.api_token_file.is_some() {
        out.push(api_token(config));
    }
    out.push(gpus(config));
    out
}

/// The kernel's CPU directory in sysfs.
fn cpu_dir() -> &'static Path {
    Path::new("/sys/devices/system/cpu")
}

/// Isolated cores: the pollers' cores should be isolated from the scheduler.
fn isolated_cores(pinned: &[usize]) -> Check {
    let isolated = read(cpu_dir().join("isolated")).map(|l| parse_cpu_list(&l));
    match (&isolated, pinned.is_empty()) {
        (None, _) => check("isolated cores", Verdict::Unknown, "unreadable", ""),
        (Some(_), true) => check(
            "isolated cores",
            Verdict::Warn,
            "server.poller_cores is empty (pollers unpinned)",
            "pin the pollers: server.poller_cores = [..] on isolated cores",
        ),
        (Some(iso), false) => {
            let missing: Vec<usize> = pinned
                .iter()
                .filter(|c| !iso.contains(c))
                .copied()
                .collect();
            let value = format!("isolated {iso:?}, poller cores {pinned:?}");
            if missing.is_empty() {
                check("isolated cores", Verdict::Ok, value, "")
            } else {
                check(
                    "isolated cores",
                    Verdict::Warn,
                    value,
                    "boot with isolcpus=<poller cores> nohz_full=<same> rcu_nocbs=<same> (deploy/README.md)",
                )
            }
        }
    }
}

/// Tickless poller cores (the kernel also moves RCU callbacks off nohz_full cores).
fn nohz_full(pinned: &[usize]) -> Check {
    let nohz = read(cpu_dir().join("nohz_full"))
        .filter(|s| !s.is_empty() && s != "(null)")
        .map(|l| parse_cpu_list(&l))
        .unwrap_or_default();
    let covered = !pinned.is_empty() && pinned.iter().all(|c| nohz.contains(c));
    check(
        "nohz_full",
        if covered { Verdict::Ok } else { Verdict::Warn },
        format!("nohz_full {nohz:?}, poller cores {pinned:?}"),
        "add nohz_full=<poller cores> (and rcu_nocbs=<same>) to the kernel command line",
    )
}

/// CPU frequency governor of the pinned cores (all cores when none are pinned).
fn governor(pinned: &[usize]) -> Check {
    let cpu = cpu_dir();
    let cores: Vec<usize> = if pinned.is_empty() {
        read(cpu.join("online"))
            .map(|l| parse_cpu_list(&l))
            .unwrap_or_default()
    } else {
        pinned.to_vec()
    };
    let governors: Vec<String> = cores
        .iter()
        .filter_map(|c| read(cpu.join(format!("cpu{c}/cpufreq/scaling_governor"))))
        .collect();
    if governors.is_empty() {
        check(
            "CPU governor",
            Verdict::Unknown,
            "no cpufreq (a VM, or the BIOS controls frequency)",
            "",
        )
    } else if governors.iter().all(|g| g == "performance") {
        check("CPU governor", Verdict::Ok, "performance", "")
    } else {
        let mut g = governors.clone();
        g.sort();
        g.dedup();
        check(
            "CPU governor",
            Verdict::Warn,
            g.join(","),
            "cpupower frequency-set -g performance (or the governor in deploy/README.md)",
        )
    }
}

/// Transparent huge pages: khugepaged compaction stalls; madvise or never.
fn transparent_huge_pages() -> Check {
    match read("/sys/kernel/mm/transparent_hugepage/enabled") {
        None => check("transparent huge pages", Verdict::Unknown, "unreadable", ""),
        Some(v) => {
            let mode = v
                .split_whitespace()
                .find(|w| w.starts_with('['))
                .unwrap_or(&v)
                .trim_matches(|c| c == '[' || c == ']')
                .to_string();
            if mode == "always" {
                check(
                    "transparent huge pages",
                    Verdict::Warn,
                    mode,
                    "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled",
                )
            } else {
                check("transparent huge pages", Verdict::Ok, mode, "")
            }
        }
    }
}

/// 2 MB huge pages for session segments (`server.huge_pages`): one free page per session.
/// With them asked for and none free, `tie serve` refuses to start (read, not tried: a page
/// taken here would be one a session could not have).
fn segment_huge_pages(used: bool) -> Check {
    let name = "huge pages for segments";
    if !used {
        return check(
            name,
            Verdict::Ok,
            "not used (server.huge_pages = false)",
            "",
        );
    }
    let huge = Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB");
    let free = read(huge.join("free_hugepages")).and_then(|v| v.parse::<u64>().ok());
    let total = read(huge.join("nr_hugepages")).and_then(|v| v.parse::<u64>().ok());
    let fix = "reserve one 2 MB page per session: echo N > /proc/sys/vm/nr_hugepages (or hugepages=N on the kernel command line)";
    match (free, total) {
        (Some(0), Some(total)) => check(
            name,
            Verdict::Fail,
            format!("0 of {total} 2 MB pages free: tie serve refuses to start with server.huge_pages = true"),
            fix,
        ),
        (Some(free), Some(total)) => check(
            name,
            Verdict::Ok,
            format!("{free} of {total} 2 MB pages free"),
            fix,
        ),
        _ => check(name, Verdict::Unknown, "unreadable", ""),
    }
}

/// Locked-memory limit of this process (the unit's LimitMEMLOCK applies to the server):
/// `server.lock_memory` needs it unlimited, and `tie serve` refuses to start under a finite one
/// unless it runs as root. Root's exemption is said but does not lift the warning: the server
/// usually runs as another user.
fn memlock(lock_memory: bool) -> Check {
    let name = "memlock limit (this process)";
    let fix = "LimitMEMLOCK=infinity in the unit (deploy/tie.service), or ulimit -l unlimited";
    let limit = rustix::process::getrlimit(rustix::process::Resource::Memlock).current;
    // tie serve's own rule: refused under a finite limit, unless root.
    let refused = tie::memory::lock_memory_refused_under().is_some();
    match limit {
        None => check(name, Verdict::Ok, "unlimited", ""),
        Some(bytes) if lock_memory && refused => check(
            name,
            Verdict::Fail,
            format!(
                "{} MB: tie serve refuses server.lock_memory = true under it",
                bytes >> 20
            ),
            fix,
        ),
        Some(bytes) if !refused => check(
            name,
            Verdict::Warn,
            format!(
                "{} MB (root, as this process runs, is exempt; a server run as another user is not)",
                bytes >> 20
            ),
            fix,
        ),
        Some(bytes) => check(name, Verdict::Warn, format!("{} MB", bytes >> 20), fix),
    }
}

/// `server.model_repository`, when it is a local directory: each model's directory,
/// `config.toml`, version policy, labels and layout file, and `routing.toml`, read as
/// `tie serve` reads them before it loads (the model files themselves are not built, so what
/// only building finds, an input width the layout does not match, say, is not seen). A model
/// refused on what was read fails the check, unless `model_deployment.exit_on_error = false`
/// and another model would load. Read as this process's user, from its working directory.
/// `None`: the config could not be read, and the repository it names is not known.
pub fn model_repository(config: Option<&ServiceConfig>) -> Check {
    use tie::models::repository::Skipped;
    use tie::models::{plan_each, read_layout, RepositoryLoadError};
    let name = "model repository";
    let Some(config) = config else {
        return check(
            name,
            Verdict::Unknown,
            "not read: the config that names it could not be read",
            "",
        );
    };
    let repo = &config.server.model_repository;
    let shown = repo.display();
    if tie::models::remote::Remote::configured(config) {
        return check(
            name,
            Verdict::Unknown,
            format!("{shown}: read from the object store or registry by tie serve, not here"),
            "",
        );
    }
    let fix = "correct the model's directory or config.toml (tie serve refuses the model)";
    let plans = match plan_each(repo, Skipped::Quiet) {
        Ok(plans) => plans,
        Err(e) => {
            return check(
                name,
                Verdict::Fail,
                e.to_string(),
                "set server.model_repository to the repository tie serve reads (a relative path is from the working directory)",
            )
        }
    };
    let (mut ready, mut refused, mut unavailable) = (0, Vec::new(), Vec::new());
    for (_, planned) in plans {
        match planned {
            Ok(plan) => match &plan.config.layout {
                Some(layout) => match read_layout(&config.server.layouts_dir, &plan.name, layout) {
                    Ok(_) => ready += 1,
                    Err(e) => refused.push(e.to_string()),
                },
                None => ready += 1,
            },
            Err(e @ RepositoryLoadError::NoVersion { .. }) => unavailable.push(e.to_string()),
            Err(e) => refused.push(e.to_string()),
        }
    }
    let relative = if repo.is_relative() || config.server.layouts_dir.is_relative() {
        ", paths relative to this working directory"
    } else {
        ""
    };
    let found = format!(
        "{shown}: {ready} model{} to load (configs, layouts and routing read as this user{relative}; model files not built)",
        if ready == 1 { "" } else { "s" }
    );
    if ready == 0 && refused.is_empty() {
        let why = unavailable
            .first()
            .map_or(String::new(), |e| format!("; {e}"));
        return check(
            name,
            Verdict::Fail,
            format!("{shown}: no model to serve{why}"),
            "put each model at <model_repository>/<name>/<version>/model.onnx",
        );
    }
    // The routing is read at start too: a bad routing.toml stops it, whatever exit_on_error says.
    if let Err(e) = tie::models::routing::Routing::load(repo) {
        return check(
            name,
            Verdict::Fail,
            format!("{found}; {e}"),
            "correct routing.toml (tie serve refuses to start with it)",
        );
    }
    if !refused.is_empty() {
        let verdict = if config.model_deployment.exit_on_error || ready == 0 {
            Verdict::Fail
        } else {
            Verdict::Warn
        };
        return check(
            name,
            verdict,
            format!("{found}; {}", refused.join("; ")),
            fix,
        );
    }
    if !unavailable.is_empty() {
        return check(
            name,
            Verdict::Warn,
            format!("{found}; {}", unavailable.join("; ")),
            "a directory without a version is listed unavailable: remove it or add a version",
        );
    }
    check(name, Verdict::Ok, found, "")
}

/// `server.api_token_file`: `tie serve` refuses to start when it cannot read a token from it.
/// Read as this process's user, which may not be the server's.
fn api_token(config: &ServiceConfig) -> Check {
    let name = "api token file";
    match tie::http::read_api_token(config) {
        Ok(_) => check(name, Verdict::Ok, "readable, not empty (as this user)", ""),
        Err(e) => check(
            name,
            Verdict::Fail,
            e.to_string(),
            "write the token into the file, readable by the server's user only (chmod 600)",
        ),
    }
}

/// Clock source: the TSC is the cheapest clock read.
fn clock_source() -> Check {
    match read("/sys/devices/system/clocksource/clocksource0/current_clocksource") {
        None => check("clock source", Verdict::Unknown, "unreadable", ""),
        // kvm-clock is read through the vDSO too: the TSC's equal inside a VM.
        Some(c) if c == "tsc" || c == "kvm-clock" => check("clock source", Verdict::Ok, c, ""),
        Some(c) => check(
            "clock source",
            Verdict::Warn,
            c,
            "use the TSC: clocksource=tsc on the kernel command line, on bare metal with an invariant TSC (constant_tsc nonstop_tsc in /proc/cpuinfo)",
        ),
    }
}

/// SMT siblings of the poller cores: a busy sibling steals the core's pipeline.
fn smt_siblings(pinned: &[usize]) -> Check {
    let mut shared = Vec::new();
    for &c in pinned {
        let siblings = tie::host::smt_siblings(c);
        if !siblings.is_empty() {
            shared.push(format!("{c}:{siblings:?}"));
        }
    }
    if shared.is_empty() {
        check("SMT siblings of poller cores", Verdict::Ok, "none", "")
    } else {
        check(
            "SMT siblings of poller cores",
            Verdict::Warn,
            shared.join(" "),
            "keep the siblings idle (tie serve keeps its own threads off them where other CPUs remain; isolate them too and pin nothing else there) or turn SMT off",
        )
    }
}

/// GPUs: present, and their NUMA node against the poller cores'.
fn gpus(config: &ServiceConfig) -> Check {
    let gpus = tie_engine::devices::Gpus::probe(&config.gpu_options());
    match gpus.unavailable() {
        Some(why) => check(
            "GPU",
            Verdict::Warn,
            format!("none usable: {why}"),
            "models run on the CPU; for GPU serving install the NVIDIA driver, or see why the device is not usable (tie devices)",
        ),
        None => gpu_check(&gpus, &config.server.poller_cores),
    }
}

#[cfg(feature = "cuda")]
fn gpu_check(gpus: &tie_engine::devices::Gpus, pinned: &[usize]) -> Check {
    let tie_engine::devices::Gpus::Available(rt) = gpus else {
        unreachable!("called with GPUs");
    };
    let mut value = Vec::new();
    let mut far = false;
    for d in rt.devices() {
        let node = d.numa_node();
        let cores_node: Vec<Option<i64>> = pinned
            .iter()
            .map(|c| tie::host::cpu_numa_node(*c))
            .collect();
        if let Some(n) = node {
            far |= cores_node.iter().any(|c| c.is_some_and(|c| c != n));
        }
        value.push(format!(
            "{} ({}) on NUMA node {}",
            d.ordinal(),
            d.name(),
            node.map_or("unknown".to_string(), |n| n.to_string())
        ));
    }
    check(
        "GPU",
        if far { Verdict::Warn } else { Verdict::Ok },
        value.join(", "),
        "pin the pollers to cores of the GPU's NUMA node (server.poller_cores)",
    )
}

#[cfg(not(feature = "cuda"))]
fn gpu_check(_: &tie_engine::devices::Gpus, _: &[usize]) -> Check {
    unreachable!("without the `cuda` feature no GPU is ever available")
}
