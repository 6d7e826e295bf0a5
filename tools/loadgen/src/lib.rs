//! `tie-loadgen`: load from real client processes, timed the way users see it.
//!
//! Each worker is a process of its own (pinned to a configured core) with one `tie-client`
//! session. In open-loop mode a worker sends request *i* at its scheduled time
//! `start + i / rate` whatever happened to the ones before, and times each answer from that
//! scheduled time, not from when it could actually be sent: a server that stalls for S at rate R
//! shows about R × S late answers, not one (no coordinated omission). A request that cannot be
//! sent on time (its session's in-flight limit reached) is sent as soon as it can and still timed
//! from its schedule. In closed-loop mode a worker keeps `concurrency` requests in flight and
//! times each from its submit.
//!
//! Every worker writes an HdrHistogram interval log (`worker-<i>.hlog`, one interval a second,
//! tag `latency`, values in ns) and reports its totals to the parent, which writes
//! `summary.json` ([`Summary`]). A sweep runs the open loop at rising rates until p99 crosses a
//! bound and reports the highest rate that kept under it ([`SweepReport`]).
//!
//! [`report`] prints interval logs, summaries and sweeps as tables and draws them as a PNG
//! chart (`tie report`).
#![forbid(unsafe_code)]

pub mod report;
mod run;
mod text;

pub use run::{
    read_rows, run, run_worker, shortfalls, sweep, IdleSessions, RunSpec, Summary, SweepPoint,
    SweepReport, WorkerResult, WorkerSpec,
};
