//! [`CudaPipeline`]: batches in flight on one GPU instance for one caller (a poller's lane).
//!
//! A pipeline owns a stream, `depth` slots (pinned input and output staging buffers, a
//! completion flag, an event, and one captured graph per bucket that reads and writes that
//! slot's buffers) and the device buffers its graphs share (its one stream runs them in launch
//! order, so the slots can share them). A batch is gathered into a free slot and its bucket's
//! graph launched; the caller goes on and polls for completion, never waits.
//!
//! Completion: each slot's graph ends by writing 1 to the slot's flag, a word of mapped host
//! memory the poller cleared before the launch (a stream memory write, fenced behind the
//! outputs: see `enqueue`). A batch is done when its flag reads 1: a load from the poller's own
//! cache until the device writes it, with no call into the driver, so a poller checking its
//! batches makes no driver call while other pollers launch theirs.
//! A batch whose flag is still 0 [`QUERY_AFTER`] after its first check has its stream queried
//! as well, and again each `QUERY_AFTER`, so a device that failed (and will never write the
//! flag) is found; on an instance out of rotation the stream is queried at every check.
//!
//! Where the driver cannot capture the flag's write into a graph, completion falls back to the
//! driver's queries, logged when the pipeline is built: the last batch launched is done when
//! the stream is idle (`cuStreamQuery`, as the synchronous path waits); a batch with another
//! launched behind it has its slot's event recorded just before that launch, and is done when
//! the event is.
//!
//! When the device fails a batch, its instance leaves rotation and the batch runs again on
//! another instance through the backend's synchronous failover; so do the pipeline's later
//! batches.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::sys::CUresult;
use cudarc::driver::{result as cu, CudaEvent, CudaGraph, CudaStream, DriverError};

use super::{
    done, query_stream, DeviceBuffer, Engine, HostBuffer, Instance, Io, Reservation, Shared,
    WORKSPACE_BYTES,
};
use crate::{BackendError, Pipeline};

/// How long a batch's flag is checked alone before its stream is queried too, and then between
/// two queries (see the module's notes): a failed device is found within about this, while a
/// batch done sooner costs the driver no call at all.
const QUERY_AFTER: Duration = Duration::from_millis(1);

enum SlotState {
    Free,
    /// Launched; `event` says whether its event was recorded behind it.
    Running {
        event: bool,
    },
    /// Done: outputs in `host_out`, or why it failed.
    Done(Result<(), String>),
}

struct Slot {
    // The graphs first: they are dropped before the buffers they read and write.
    /// One per bucket, reading `host_in`, writing `host_out`, then 1 to `flag`.
    graphs: Vec<CudaGraph>,
    event: CudaEvent,
    host_in: HostBuffer,
    host_out: HostBuffer,
    /// Its completion flag: the first word, 0 from the launch until the graph is done (by
    /// flag only).
    flag: HostBuffer,
    rows: usize,
    state: SlotState,
}

/// Batches in flight on one instance of a [`super::CudaBackend`] (see the module's notes).
pub(super) struct CudaPipeline {
    shared: Arc<Shared>,
    instance: Arc<Instance>,
    /// Bucket sizes, ascending: the index of a slot's graph.
    buckets: Vec<usize>,
    slots: Vec<Slot>,
    /// The oldest batch in flight.
    head: usize,
    /// Batches in flight.
    len: usize,
    /// Completion is read from the slots' flags (else from the driver's queries).
    by_flag: bool,
    /// When the stream is next queried, while the oldest batch's flag is not set (by flag
    /// only; `None`: set at its first check).
    query_at: Option<Instant>,
    /// Device input, output, activations and workspace the slots' graphs share.
    _device: Vec<DeviceBuffer>,
    stream: Arc<CudaStream>,
    _reservation: Reservation,
}

// SAFETY: the raw pointers in the slots' buffers are CUDA allocations valid in any thread once
// the context is bound (every entry point binds it); a pipeline has one owner at a time.
unsafe impl Send for CudaPipeline {}

impl Drop for CudaPipeline {
    fn drop(&mut self) {
        // Nothing may run into the buffers once they are freed.
        super::device_change(|| {
            let _ = self.stream.context().bind_to_thread();
            let _ = self.stream.synchronize();
            self.slots.clear();
        });
        self.instance.pipelines.fetch_sub(1, Ordering::Relaxed);
        self.instance
            .outstanding
            .fetch_sub(self.len, Ordering::Relaxed);
    }
}

impl CudaPipeline {
    /// A pipeline on the healthy instance with the fewest pipelines, each bucket captured with
    /// the engine the instance chose for it. `None` (logged) when executions are not captured
    /// as graphs, or the device refuses the memory or a step fails: the caller then runs its
    /// batches synchronously.
    pub(super) fn build(shared: &Arc<Shared>, depth: usize) -> Option<Self> {
        if !shared.graphs || depth == 0 {
            return None;
        }
        let instance = shared
            .instances
            .iter()
            .filter(|i| i.healthy.load(Ordering::Relaxed))
            .min_by_key(|i| i.pipelines.load(Ordering::Relaxed))?
            .clone();
        let started = Instant::now();
        // One change to the device's state: a failed build's buffers and graphs are freed
        // under it too.
        match super::device_change(|| Self::build_on(shared, &instance, depth)) {
            Ok(p) => {
                if p.by_flag {
                    shared.pipelines_by_flag.fetch_add(1, Ordering::Relaxed);
                }
                tracing::info!(
                    device = instance.device.ordinal(),
                    depth,
                    graphs = p.buckets.len() * depth,
                    completion = if p.by_flag { "flag" } else { "driver queries" },
                    ms = started.elapsed().as_millis() as u64,
                    "GPU pipeline built"
                );
                Some(p)
            }
            Err(e) => {
                tracing::warn!(
                    device = instance.device.ordinal(),
                    error = %e,
                    "no GPU pipeline for this poller"
                );
                None
            }
        }
    }

    fn build_on(
        shared: &Arc<Shared>,
        instance: &Arc<Instance>,
        depth: usize,
    ) -> Result<Self, String> {
        let state = instance.state.lock().unwrap_or_else(|e| e.into_inner());
        let ctx = instance.device.context();
        let err = |what: &'static str| move |e: DriverError| format!("{what}: {e}");
        ctx.bind_to_thread().map_err(err("binding the context"))?;
        let largest = shared.largest;
        let (iw, ow) = shared.plan_shape;
        let blaslt = state.buckets.iter().any(|b| b.engine == Engine::Blaslt);
        let workspace = if blaslt { WORKSPACE_BYTES } else { 0 };
        let sizes = [
            largest * iw * 4,
            largest * ow * 4,
            state.act_bytes,
            state.act_bytes,
            workspace,
        ];
        let reservation = instance
            .device
            .reserve_more(sizes.iter().sum(), shared.limits)
            .map_err(|e| e.to_string())?;
        let device = sizes
            .iter()
            .map(|&bytes| DeviceBuffer::new(bytes))
            .collect::<Result<Vec<_>, _>>()
            .map_err(err("allocating device buffers"))?;
        let stream = ctx.new_stream().map_err(err("creating a stream"))?;
        let mut slots = Vec::with_capacity(depth);
        let mut by_flag = true;
        for _ in 0..depth {
            let host_in = HostBuffer::new(
                largest * iw,
                cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED,
            )
            .map_err(err("allocating pinned input"))?;
            let host_out =
                HostBuffer::new(largest * ow, 0).map_err(err("allocating pinned output"))?;
            // One cache line, read by the poller only.
            let flag = HostBuffer::new(16, 0).map_err(err("allocating a completion flag"))?;
            let io = Io::new(
                &host_in,
                &host_out,
                [device[0].ptr, device[1].ptr],
                [device[2].ptr, device[3].ptr],
                if blaslt { device[4].ptr } else { 0 },
            );
            let capture = |io: &Io| {
                state
                    .buckets
                    .iter()
                    .map(|b| state.capture(io, &stream, b.size, b.engine))
                    .collect::<Result<Vec<_>, _>>()
            };
            let graphs = if by_flag {
                match capture(&io.with_done_flag(flag.device)) {
                    Ok(graphs) => Ok(graphs),
                    // Only the first slot tries: a later one fails as it does.
                    Err(e) if slots.is_empty() => {
                        tracing::info!(
                            device = instance.device.ordinal(),
                            error = %e,
                            "a graph cannot write a completion flag: batches' completion is queried from the driver"
                        );
                        by_flag = false;
                        capture(&io)
                    }
                    Err(e) => Err(e),
                }
            } else {
                capture(&io)
            }
            .map_err(err("capturing a CUDA graph"))?;
            let event = ctx.new_event(None).map_err(err("creating an event"))?;
            slots.push(Slot {
                graphs,
                event,
                host_in,
                host_out,
                flag,
                rows: 0,
                state: SlotState::Free,
            });
        }
        instance.pipelines.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            shared: shared.clone(),
            instance: instance.clone(),
            buckets: state.buckets.iter().map(|b| b.size).collect(),
            slots,
            head: 0,
            len: 0,
            by_flag,
            query_at: None,
            _device: device,
            stream,
            _reservation: reservation,
        })
    }

    /// Launches slot `i`'s batch: clears its flag (by flag), or records the event of the batch
    /// launched before it (it is no longer the last on the stream), then replays the bucket's
    /// graph.
    fn start(&mut self, i: usize) -> Result<(), DriverError> {
        if self.by_flag {
            // The device writes it only from the graph launched below (this slot's earlier
            // batch was retired).
            self.slots[i].flag().store(0, Ordering::Relaxed);
        }
        // The input was written through write-combining buffers: drain them (and the flag's
        // store) before the GPU reads them (a kernel reading mapped memory gets no fence from
        // a copy call).
        std::sync::atomic::fence(Ordering::SeqCst);
        self.stream.context().bind_to_thread()?;
        if self.len > 1 && !self.by_flag {
            let prev = (i + self.slots.len() - 1) % self.slots.len();
            if let SlotState::Running { event: false } = self.slots[prev].state {
                // SAFETY: a live event and stream of the bound context.
                unsafe {
                    cu::event::record(self.slots[prev].event.cu_event(), self.stream.cu_stream())
                }?;
                self.slots[prev].state = SlotState::Running { event: true };
            }
        }
        if self.instance.inject_failure.swap(false, Ordering::Relaxed) {
            return Err(DriverError(CUresult::CUDA_ERROR_LAUNCH_FAILED));
        }
        let rows = self.slots[i].rows;
        let b = self
            .buckets
            .iter()
            .position(|&s| s >= rows)
            .expect("rows <= largest bucket");
        self.slots[i].graphs[b].launch()
    }

    /// Runs slot `i`'s batch on another instance (synchronously), after its device failed.
    fn rerun(&mut self, i: usize) -> SlotState {
        let (iw, ow) = self.shared.plan_shape;
        let Slot {
            host_in,
            host_out,
            rows,
            ..
        } = &mut self.slots[i];
        let rows = *rows;
        let result = self.shared.run_batch(
            host_in.as_slice(rows * iw),
            rows,
            host_out.as_mut_slice(rows * ow),
        );
        SlotState::Done(result.map_err(|e| e.to_string()))
    }

    /// Whether the batch in slot `i` is done: by its flag; else by its event, or, as the last
    /// on the stream, by the stream going idle.
    fn query(&mut self, i: usize, event: bool) -> Result<bool, DriverError> {
        if self.by_flag {
            // The outputs are read after the flag (Acquire): the device wrote them first.
            if self.slots[i].flag().load(Ordering::Acquire) == 1
                && !self.instance.hide_flags.load(Ordering::Relaxed)
            {
                self.query_at = None;
                return Ok(true);
            }
            // An instance out of rotation (its device failed under another batch, or it was
            // drained) is queried at once: a failed device never writes the flag.
            let now = Instant::now();
            if self.instance.healthy.load(Ordering::Relaxed) {
                match self.query_at {
                    Some(at) if now >= at => {}
                    Some(_) => return Ok(false),
                    None => {
                        self.query_at = Some(now + QUERY_AFTER);
                        return Ok(false);
                    }
                }
            }
            // The stream says whether the device failed; an idle one has done this batch too.
            let answer = done(query_stream(&self.stream));
            self.query_at = match answer {
                Ok(false) => Some(now + QUERY_AFTER),
                // The next batch is checked afresh; after a failure, its device is out of
                // rotation, so it is queried at its first check.
                Ok(true) | Err(_) => None,
            };
            return answer;
        }
        done(if event {
            // SAFETY: a live event (owned by the slot).
            unsafe { cudarc::driver::sys::cuEventQuery(self.slots[i].event.cu_event()) }
        } else {
            query_stream(&self.stream)
        })
    }
}

impl Slot {
    /// Its completion flag's word, which the device writes (see the module's notes).
    fn flag(&self) -> &AtomicU32 {
        // SAFETY: the buffer's first word: pinned memory allocated for 16 values, aligned for
        // a u32 and alive as long as `self`; the host reaches it only through atomics, the
        // device writes it with a stream memory write.
        unsafe { AtomicU32::from_ptr(self.flag.ptr.cast::<u32>()) }
    }
}

impl Pipeline for CudaPipeline {
    fn has_room(&self) -> bool {
        self.len < self.slots.len()
    }

    fn in_flight(&self) -> usize {
        self.len
    }

    fn launch(&mut self, gather: &mut dyn FnMut(&mut [f32]) -> usize) -> usize {
        assert!(self.has_room(), "launch with every slot in flight");
        let i = (self.head + self.len) % self.slots.len();
        let (iw, _) = self.shared.plan_shape;
        let largest = self.shared.largest;
        let rows = gather(self.slots[i].host_in.as_mut_slice(largest * iw));
        if rows == 0 {
            return 0;
        }
        self.slots[i].rows = rows;
        self.len += 1;
        self.instance.outstanding.fetch_add(1, Ordering::Relaxed);
        self.slots[i].state = if rows > largest {
            SlotState::Done(Err(format!("{rows} rows gathered: at most {largest} fit")))
        } else if !self.instance.healthy.load(Ordering::Relaxed) {
            self.rerun(i)
        } else {
            match self.start(i) {
                Ok(()) => SlotState::Running { event: false },
                Err(e) => {
                    Shared::fail(&self.instance, &e);
                    self.rerun(i)
                }
            }
        };
        rows
    }

    fn ready(&mut self) -> Option<Result<&mut [f32], BackendError>> {
        if self.len == 0 {
            return None;
        }
        let i = self.head;
        if let SlotState::Running { event } = self.slots[i].state {
            self.slots[i].state = match self.query(i, event) {
                Ok(false) => return None,
                Ok(true) => SlotState::Done(Ok(())),
                Err(e) => {
                    Shared::fail(&self.instance, &e);
                    self.rerun(i)
                }
            };
        }
        let ow = self.shared.plan_shape.1;
        let slot = &mut self.slots[i];
        match &slot.state {
            SlotState::Done(Ok(())) => Some(Ok(slot.host_out.as_mut_slice(slot.rows * ow))),
            SlotState::Done(Err(why)) => Some(Err(BackendError::Execution(why.clone()))),
            SlotState::Free | SlotState::Running { .. } => unreachable!("head is in flight"),
        }
    }

    fn retire(&mut self) {
        assert!(self.len > 0, "retire with nothing in flight");
        let slot = &mut self.slots[self.head];
        assert!(
            matches!(slot.state, SlotState::Done(_)),
            "retire before the batch was ready"
        );
        slot.state = SlotState::Free;
        self.head = (self.head + 1) % self.slots.len();
        self.len -= 1;
        self.instance.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}
