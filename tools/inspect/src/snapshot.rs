//! A point-in-time picture of every session of a server.

use std::time::Instant;

use serde::Serialize;
use tie_client::clock::monotonic_ns;
use tie_client::inspect::InspectedSession;
use tie_layouts::abi::{
    RequestHeader, ResponseFrame, ServerState, Status, REQUEST_HEADER_WORDS, RESPONSE_WORDS,
};
use tie_layouts::hello::read_name;

/// One ring's indices as loaded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RingState {
    /// Frames the consumer has released.
    pub head: u64,
    /// Frames the producer has published.
    pub tail: u64,
    /// `tail - head` (a corrupt pair shows as more than `capacity`).
    pub occupancy: u64,
    /// Slots.
    pub capacity: u64,
}

/// One session.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SessionSnapshot {
    /// Server-assigned id.
    pub session_id: u64,
    /// The client's pid.
    pub client_pid: u32,
    /// The client's process name.
    pub process: String,
    /// Model name.
    pub model: String,
    /// Model version.
    pub model_version: u32,
    /// Layout name.
    pub layout: String,
    /// When the session opened, seconds since the Unix epoch.
    pub connected_unix_s: f64,
    /// `running`, `closing`, `faulted` or `unknown`.
    pub state: String,
    /// Request ring.
    pub requests: RingState,
    /// Response ring.
    pub responses: RingState,
    /// Requests published by the client per second since the previous snapshot (absent on
    /// the first).
    pub request_rate: Option<f64>,
    /// Responses published by the server per second since the previous snapshot.
    pub response_rate: Option<f64>,
    /// Responses sent with an error status.
    pub errors: u64,
    /// Submits the client reported refused because its rings were full.
    pub ring_full: u64,
    /// Requests sent and not yet answered.
    pub unanswered: u64,
    /// Age of the oldest unanswered request, in microseconds (absent when none waits, or its
    /// slot was reused).
    pub lag_us: Option<f64>,
}

/// Every session at one moment.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Snapshot {
    /// Wall time of the snapshot, seconds since the Unix epoch.
    pub taken_unix_s: f64,
    /// The sessions, by id.
    pub sessions: Vec<SessionSnapshot>,
}

fn ring_state((tail, head): (u64, u64), capacity: u64) -> RingState {
    RingState {
        head,
        tail,
        occupancy: tail.wrapping_sub(head),
        capacity,
    }
}

fn unix_now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Snapshot {
    /// Reads every session; rates come from `previous` and the time it was taken.
    pub fn take(sessions: &[InspectedSession], previous: Option<(&Snapshot, Instant)>) -> Self {
        let mut out: Vec<SessionSnapshot> = sessions.iter().map(read_session).collect();
        out.sort_by_key(|s| s.session_id);
        if let Some((prev, at)) = previous {
            let secs = at.elapsed().as_secs_f64().max(1e-9);
            for s in &mut out {
                if let Some(p) = prev.sessions.iter().find(|p| p.session_id == s.session_id) {
                    s.request_rate =
                        Some(s.requests.tail.wrapping_sub(p.requests.tail) as f64 / secs);
                    s.response_rate =
                        Some(s.responses.tail.wrapping_sub(p.responses.tail) as f64 / secs);
                }
            }
        }
        Self {
            taken_unix_s: unix_now_s(),
            sessions: out,
        }
    }

    /// A plain-text table, one line per session.
    pub fn table(&self) -> String {
        let mut t = format!(
            "{:>7} {:>8} {:<16} {:<14} {:<14} {:>7} {:<9} {:>11} {:>11} {:>9} {:>9} {:>9} {:>7} {:>9} {:>10}\n",
            "session",
            "pid",
            "process",
            "model",
            "layout",
            "since",
            "state",
            "req q/cap",
            "resp q/cap",
            "req/s",
            "resp/s",
            "unanswered",
            "errors",
            "ring-full",
            "lag us"
        );
        let rate = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.0}"));
        for s in &self.sessions {
            t.push_str(&format!(
                "{:>7} {:>8} {:<16} {:<14} {:<14} {:>7} {:<9} {:>11} {:>11} {:>9} {:>9} {:>9} {:>7} {:>9} {:>10}\n",
                s.session_id,
                s.client_pid,
                s.process,
                format!("{}:{}", s.model, s.model_version),
                s.layout,
                crate::view::age(self.taken_unix_s - s.connected_unix_s),
                s.state,
                format!("{}/{}", s.requests.occupancy, s.requests.capacity),
                format!("{}/{}", s.responses.occupancy, s.responses.capacity),
                rate(s.request_rate),
                rate(s.response_rate),
                s.unanswered,
                s.errors,
                s.ring_full,
                s.lag_us.map_or("-".to_string(), |l| format!("{l:.1}")),
            ));
        }
        t
    }
}

fn read_session(session: &InspectedSession) -> SessionSnapshot {
    let view = &session.segment;
    let record = &session.record;
    let request_ring = view.request_ring();
    let response_ring = view.response_ring();
    let requests = ring_state(request_ring.load_indices(), request_ring.capacity());
    let responses = ring_state(response_ring.load_indices(), response_ring.capacity());
    let state = match view.server_state().0 {
        Some(ServerState::Running) => "running",
        Some(ServerState::Closing) => "closing",
        Some(ServerState::Faulted) => "faulted",
        None => "unknown",
    };
    // Each request gets one response, in order: the oldest unanswered request is the one at
    // the response count, if the client has not reused its slot yet.
    let unanswered = requests.tail.saturating_sub(responses.tail);
    let lag_us = (unanswered > 0 && unanswered <= requests.capacity)
        .then(|| {
            let mut words = [0u64; REQUEST_HEADER_WORDS];
            request_ring.read_slot(responses.tail, &mut words);
            let header: RequestHeader = bytemuck::cast(words);
            (header.seq == responses.tail && header.send_ts_ns != 0)
                .then(|| monotonic_ns().saturating_sub(header.send_ts_ns) as f64 / 1e3)
        })
        .flatten();
    SessionSnapshot {
        session_id: record.session_id,
        client_pid: record.client_pid,
        process: read_name(&record.process_name).to_string(),
        model: read_name(&record.model_name).to_string(),
        model_version: record.model_version,
        layout: read_name(&record.layout_name).to_string(),
        connected_unix_s: record.connected_unix_ns as f64 / 1e9,
        state: state.to_string(),
        requests,
        responses,
        request_rate: None,
        response_rate: None,
        errors: view.server_errors(),
        ring_full: view.client_queue_full(),
        unanswered,
        lag_us,
    }
}

/// A request frame as the detail view shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RequestView {
    /// Sequence number.
    pub seq: u64,
    /// Request id.
    pub request_id: u64,
    /// Priority code.
    pub priority: u32,
    /// Deadline (CLOCK_MONOTONIC ns, 0 none).
    pub deadline_ns: u64,
    /// `(feature name, value)` in layout order.
    pub features: Vec<(String, f32)>,
}

/// A response frame as the detail view shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ResponseView {
    /// Request id.
    pub request_id: u64,
    /// Status name (or code).
    pub status: String,
    /// Output values.
    pub outputs: Vec<f32>,
    /// Server queueing time.
    pub queue_ns: u32,
    /// Batch compute time.
    pub compute_ns: u32,
}

/// The last `n` request and response frames of a session, newest last, decoded with
/// `feature_names` (positional names `f0..` where it is shorter than the frame).
pub fn recent_frames(
    session: &InspectedSession,
    n: u64,
    feature_names: &[String],
) -> (Vec<RequestView>, Vec<ResponseView>) {
    let view = &session.segment;
    let info = view.info();
    let ring = view.request_ring();
    let (tail, _) = ring.load_indices();
    let count = n.min(tail).min(ring.capacity());
    let mut words = vec![0u64; ring.slot_words()];
    let requests = (tail - count..tail)
        .map(|i| {
            ring.read_slot(i, &mut words);
            let header: RequestHeader =
                bytemuck::pod_read_unaligned(bytemuck::cast_slice(&words[..REQUEST_HEADER_WORDS]));
            let values: &[f32] = bytemuck::cast_slice(&words[REQUEST_HEADER_WORDS..]);
            let features = values
                .iter()
                .take(info.feature_count as usize)
                .enumerate()
                .map(|(k, v)| {
                    let name = feature_names
                        .get(k)
                        .cloned()
                        .unwrap_or_else(|| format!("f{k}"));
                    (name, *v)
                })
                .collect();
            RequestView {
                seq: header.seq,
                request_id: header.request_id,
                priority: header.priority,
                deadline_ns: header.deadline_ns,
                features,
            }
        })
        .collect();
    let ring = view.response_ring();
    let (tail, _) = ring.load_indices();
    let count = n.min(tail).min(ring.capacity());
    let responses = (tail - count..tail)
        .map(|i| {
            let mut words = [0u64; RESPONSE_WORDS];
            ring.read_slot(i, &mut words);
            let frame: ResponseFrame = bytemuck::cast(words);
            let status = Status(frame.status);
            let outputs =
                frame.outputs[..(frame.output_count as usize).min(frame.outputs.len())].to_vec();
            ResponseView {
                request_id: frame.request_id,
                status: status
                    .name()
                    .map_or(format!("{}", frame.status), str::to_string),
                outputs,
                queue_ns: frame.queue_ns,
                compute_ns: frame.compute_ns,
            }
        })
        .collect();
    (requests, responses)
}
