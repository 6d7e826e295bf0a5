//! Fault injection (`server.fault_injection`): a [`FaultSwitch`] in front of a model's backend
//! ([`Faulty`]) makes its batches fail or return corrupt values, for drills and tests.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tie_engine::{Backend, BackendError, BackendHealth, BackendInfo, Pipeline};

/// What an injected fault does to a model's batches.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum FaultMode {
    /// No fault.
    None,
    /// Every batch fails (`ExecutionFailed`).
    Fail,
    /// Every batch succeeds with every output shifted by 1.0.
    Corrupt,
}

/// The switch of a model's injected fault.
#[derive(Debug, Default)]
pub struct FaultSwitch(AtomicU8);

impl FaultSwitch {
    /// Sets the fault.
    pub fn set(&self, mode: FaultMode) {
        self.0.store(mode as u8, Ordering::SeqCst);
    }

    /// The fault in effect.
    pub fn get(&self) -> FaultMode {
        match self.0.load(Ordering::Relaxed) {
            1 => FaultMode::Fail,
            2 => FaultMode::Corrupt,
            _ => FaultMode::None,
        }
    }
}

/// A backend with a [`FaultSwitch`] in front of it.
pub struct Faulty {
    inner: Arc<dyn Backend>,
    switch: Arc<FaultSwitch>,
}

impl Faulty {
    /// Wraps `inner`; returns the wrapper and its switch.
    pub fn wrap(inner: Arc<dyn Backend>) -> (Arc<dyn Backend>, Arc<FaultSwitch>) {
        let switch = Arc::new(FaultSwitch::default());
        (Self::with_switch(inner, switch.clone()), switch)
    }

    /// Wraps `inner` behind an existing switch (each engine of a model split by batch size,
    /// so that one switch faults both).
    pub fn with_switch(inner: Arc<dyn Backend>, switch: Arc<FaultSwitch>) -> Arc<dyn Backend> {
        Arc::new(Self { inner, switch })
    }

    fn after(
        &self,
        result: Result<(), BackendError>,
        output: &mut [f32],
        values: usize,
    ) -> Result<(), BackendError> {
        result?;
        match self.switch.get() {
            FaultMode::None => Ok(()),
            FaultMode::Fail => Err(BackendError::Execution("injected fault".into())),
            FaultMode::Corrupt => {
                for v in &mut output[..values] {
                    *v += 1.0;
                }
                Ok(())
            }
        }
    }
}

impl Backend for Faulty {
    fn info(&self) -> &BackendInfo {
        self.inner.info()
    }

    fn run_batch(
        &self,
        input: &[f32],
        rows: usize,
        output: &mut [f32],
    ) -> Result<(), BackendError> {
        let result = self.inner.run_batch(input, rows, output);
        self.after(result, output, rows * self.info().io.output_width)
    }

    fn run_gathered(
        &self,
        gather: &mut dyn FnMut(&mut [f32]) -> usize,
        scratch: &mut [f32],
        output: &mut [f32],
    ) -> Result<usize, BackendError> {
        let result = self.inner.run_gathered(gather, scratch, output);
        let rows = *result.as_ref().unwrap_or(&0);
        let width = self.info().io.output_width;
        self.after(result.map(|_| ()), output, (rows * width).min(output.len()))
            .map(|()| rows)
    }

    fn health(&self) -> BackendHealth {
        self.inner.health()
    }

    fn pipeline(&self, depth: usize) -> Option<Box<dyn Pipeline>> {
        let inner = self.inner.pipeline(depth)?;
        Some(Box::new(FaultyPipeline {
            inner,
            switch: self.switch.clone(),
        }))
    }
}

/// The inner backend's pipeline, with the fault applied to each batch as it completes.
struct FaultyPipeline {
    inner: Box<dyn Pipeline>,
    switch: Arc<FaultSwitch>,
}

impl Pipeline for FaultyPipeline {
    fn has_room(&self) -> bool {
        self.inner.has_room()
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }

    fn launch(&mut self, gather: &mut dyn FnMut(&mut [f32]) -> usize) -> usize {
        self.inner.launch(gather)
    }

    fn ready(&mut self) -> Option<Result<&mut [f32], BackendError>> {
        let mode = self.switch.get();
        Some(self.inner.ready()?.and_then(|output| match mode {
            FaultMode::None => Ok(output),
            FaultMode::Fail => Err(BackendError::Execution("injected fault".into())),
            FaultMode::Corrupt => {
                for v in output.iter_mut() {
                    *v += 1.0;
                }
                Ok(output)
            }
        }))
    }

    fn retire(&mut self) {
        self.inner.retire();
    }
}
