//! [`ThreadPipeline`]: a [`Pipeline`] for any backend, computing its batches on a thread of
//! its own, so that the caller (a poller) reads and answers requests while a batch computes.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::Arc;

use crate::{Backend, BackendError, Pipeline};

/// One batch's buffers; they travel to the worker and back.
struct Batch {
    /// Launch number (the worker answers in this order).
    seq: u64,
    input: Vec<f32>,
    output: Vec<f32>,
    rows: usize,
}

/// What the worker sends back: the batch and how it went.
type Answer = (Batch, Result<(), String>);

/// Batches of a backend computed on a worker thread, up to `depth` in flight; answered in
/// launch order. The worker ends when the pipeline is dropped (after the batch it is on).
///
/// Should the worker die (a panic in the backend), the batches it held and every later one
/// are answered as failed; the pipeline keeps its depth, so its caller is never stuck.
pub struct ThreadPipeline {
    input_len: usize,
    output_len: usize,
    output_width: usize,
    /// Buffers not in flight.
    free: Vec<Batch>,
    /// Batches launched and retired, by launch number.
    launched: u64,
    retired: u64,
    /// Answers received and not yet retired, in launch order.
    done: VecDeque<Answer>,
    /// The oldest batch was lost with the worker: answered as failed, its buffers gone.
    lost: bool,
    to_worker: Option<mpsc::Sender<Batch>>,
    from_worker: mpsc::Receiver<Answer>,
    worker: Option<std::thread::JoinHandle<()>>,
}

/// Why a batch of a pipeline whose worker died failed.
const WORKER_GONE: &str = "the batch thread of the model ended (the engine panicked)";

impl ThreadPipeline {
    /// A pipeline `depth` batches deep (at least 1) over `backend`, whose largest batch is
    /// `largest` rows; its worker thread is named `name` and runs `on_start` first (to set
    /// its CPU affinity, say).
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn new(
        backend: Arc<dyn Backend>,
        depth: usize,
        largest: usize,
        name: String,
        on_start: Box<dyn FnOnce() + Send>,
    ) -> std::io::Result<Self> {
        let io = backend.info().io.clone();
        let (to_worker, work) = mpsc::channel::<Batch>();
        let (answer, from_worker) = mpsc::channel();
        let worker = std::thread::Builder::new().name(name).spawn(move || {
            on_start();
            for mut batch in work {
                let rows = batch.rows;
                let result = backend
                    .run_batch(
                        &batch.input[..rows * io.input_width],
                        rows,
                        &mut batch.output[..rows * io.output_width],
                    )
                    .map_err(|e| e.to_string());
                if answer.send((batch, result)).is_err() {
                    break;
                }
            }
        })?;
        let depth = depth.max(1);
        let mut p = Self {
            input_len: largest * io.input_width,
            output_len: largest * io.output_width,
            output_width: io.output_width,
            free: Vec::with_capacity(depth),
            launched: 0,
            retired: 0,
            done: VecDeque::new(),
            lost: false,
            to_worker: Some(to_worker),
            from_worker,
            worker: Some(worker),
        };
        for _ in 0..depth {
            let batch = p.buffers();
            p.free.push(batch);
        }
        Ok(p)
    }

    fn buffers(&self) -> Batch {
        Batch {
            seq: 0,
            input: vec![0.0; self.input_len],
            output: vec![0.0; self.output_len],
            rows: 0,
        }
    }

    /// Takes what the worker sent back; whether it is gone (nothing more will come).
    fn receive(&mut self) -> bool {
        loop {
            match self.from_worker.try_recv() {
                Ok(answer) => self.done.push_back(answer),
                Err(mpsc::TryRecvError::Empty) => return false,
                Err(mpsc::TryRecvError::Disconnected) => return true,
            }
        }
    }
}

impl Drop for ThreadPipeline {
    fn drop(&mut self) {
        // The worker's channel closes: it ends after the batch it is on.
        self.to_worker = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl Pipeline for ThreadPipeline {
    fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    fn in_flight(&self) -> usize {
        (self.launched - self.retired) as usize
    }

    fn launch(&mut self, gather: &mut dyn FnMut(&mut [f32]) -> usize) -> usize {
        let mut batch = self.free.pop().expect("launch with every batch in flight");
        let rows = gather(&mut batch.input);
        if rows == 0 {
            self.free.push(batch);
            return 0;
        }
        batch.rows = rows;
        batch.seq = self.launched;
        self.launched += 1;
        let sent = self
            .to_worker
            .as_ref()
            .expect("the sender lives as long as the pipeline")
            .send(batch);
        if let Err(mpsc::SendError(batch)) = sent {
            // The worker is gone: what it still sent comes first, then this batch, failed.
            self.receive();
            self.done.push_back((batch, Err(WORKER_GONE.into())));
        }
        rows
    }

    fn ready(&mut self) -> Option<Result<&mut [f32], BackendError>> {
        if self.in_flight() == 0 {
            return None;
        }
        let want = self.retired;
        if self.done.front().is_none_or(|(b, _)| b.seq != want) {
            let gone = self.receive();
            // Answers come in launch order: the oldest's is first or not there yet.
            if self.done.front().is_none_or(|(b, _)| b.seq != want) {
                if !gone {
                    return None;
                }
                // The worker died holding it.
                self.lost = true;
                return Some(Err(BackendError::Execution(WORKER_GONE.into())));
            }
        }
        let ow = self.output_width;
        let (batch, result) = self.done.front_mut().expect("the oldest's answer");
        Some(match result {
            Ok(()) => Ok(&mut batch.output[..batch.rows * ow]),
            Err(why) => Err(BackendError::Execution(why.clone())),
        })
    }

    fn retire(&mut self) {
        assert!(self.in_flight() > 0, "retire with nothing in flight");
        self.retired += 1;
        if std::mem::take(&mut self.lost) {
            // Its buffers went with the worker: new ones keep the depth.
            let batch = self.buffers();
            self.free.push(batch);
        } else {
            let (batch, _) = self.done.pop_front().expect("retire after ready");
            self.free.push(batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BackendInfo;

    /// Doubles each input; fails a batch whose first value is negative, panics on a NaN.
    struct Double(BackendInfo);

    impl Backend for Double {
        fn info(&self) -> &BackendInfo {
            &self.0
        }

        fn run_batch(
            &self,
            input: &[f32],
            rows: usize,
            output: &mut [f32],
        ) -> Result<(), BackendError> {
            assert!(!input[0].is_nan(), "a NaN");
            if input[0] < 0.0 {
                return Err(BackendError::Execution("negative".into()));
            }
            for (o, i) in output[..rows].iter_mut().zip(input) {
                *o = i * 2.0;
            }
            Ok(())
        }
    }

    fn double() -> Arc<dyn Backend> {
        Arc::new(Double(BackendInfo::cpu(
            crate::fixtures::io(1, 1),
            "test",
            "test",
        )))
    }

    fn ready(p: &mut ThreadPipeline) -> Result<Vec<f32>, String> {
        loop {
            if let Some(r) = p.ready() {
                let r = r.map(|o| o.to_vec()).map_err(|e| e.to_string());
                p.retire();
                return r;
            }
            std::thread::yield_now();
        }
    }

    #[test]
    fn batches_come_back_in_launch_order_with_their_failures() {
        let mut p = ThreadPipeline::new(double(), 3, 4, "test".into(), Box::new(|| ())).unwrap();
        assert!(p.ready().is_none());
        for first in [1.0, -1.0, 3.0] {
            let rows = p.launch(&mut |input| {
                input[..2].copy_from_slice(&[first, first + 1.0]);
                2
            });
            assert_eq!(rows, 2);
        }
        assert!(!p.has_room());
        assert_eq!(p.in_flight(), 3);
        assert_eq!(ready(&mut p), Ok(vec![2.0, 4.0]));
        assert!(ready(&mut p).unwrap_err().contains("negative"));
        assert!(p.has_room());
        assert_eq!(ready(&mut p), Ok(vec![6.0, 8.0]));
        assert_eq!(p.in_flight(), 0);
        assert_eq!(
            p.launch(&mut |_| 0),
            0,
            "nothing gathered, nothing launched"
        );
        assert_eq!(p.in_flight(), 0);
    }

    #[test]
    fn a_worker_that_dies_fails_its_batches_and_every_later_one_in_order() {
        let mut p = ThreadPipeline::new(double(), 3, 4, "test".into(), Box::new(|| ())).unwrap();
        let launch = |p: &mut ThreadPipeline, first: f32| {
            p.launch(&mut |input| {
                input[0] = first;
                1
            })
        };
        launch(&mut p, 1.0);
        launch(&mut p, f32::NAN);
        // The worker answers the first, then panics on the second.
        std::thread::sleep(std::time::Duration::from_millis(100));
        launch(&mut p, 3.0);
        assert_eq!(
            ready(&mut p),
            Ok(vec![2.0]),
            "the answer sent before it died"
        );
        assert!(ready(&mut p).unwrap_err().contains("ended"), "lost with it");
        assert!(
            ready(&mut p).unwrap_err().contains("ended"),
            "launched after"
        );
        // The depth is kept: launches go on, each answered as failed.
        for _ in 0..5 {
            assert!(p.has_room());
            launch(&mut p, 1.0);
            assert!(ready(&mut p).unwrap_err().contains("ended"));
        }
        assert_eq!(p.in_flight(), 0);
    }
}
