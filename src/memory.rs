//! The allocator's settings for a process with spinning pollers: memory freed stays in the
//! process instead of going back to the kernel.
//!
//! Giving memory back (glibc trims a heap's top, and unmaps a large block when it is freed)
//! changes the process's page tables, and the kernel then interrupts every CPU running one of
//! its threads to flush its TLB. A spinning poller takes every one of those interrupts. The
//! journal's writer frees a row group's buffers (megabytes) every few thousand rows: with it
//! writing 64-feature rows at up to 400,000 a second, the poller's CPU took 14,000–40,000 TLB
//! shootdowns in a load sweep of 4–15 seconds, against 20–160 without the journal or with
//! these settings (BENCHMARKS.md).

/// glibc: blocks of up to 32 MiB come from the heap instead of mappings of their own, and no
/// heap is trimmed, so freeing memory never changes the page tables. The process's resident
/// memory then stays at its peak. Logged when the allocator refuses; nothing to do on other C
/// libraries.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only sets the allocator's thresholds (it takes the allocator's own
        // lock); no memory is touched.
        let set = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        };
        if !set {
            tracing::warn!("the allocator keeps its thresholds: freed memory may go back to the kernel, and spinning pollers take TLB shootdowns");
        }
    }
}

/// The finite locked-memory limit, in bytes, under which `tie serve` refuses
/// `server.lock_memory = true`: every later mapping (session segments, stacks, GPU staging)
/// counts against it and would fail mid-service. `None` when the limit is unlimited or the
/// process runs as root (exempt: it holds CAP_IPC_LOCK). `tie doctor` reads the same rule.
pub fn lock_memory_refused_under() -> Option<u64> {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Memlock).current;
    limit.filter(|_| !rustix::process::geteuid().is_root())
}
