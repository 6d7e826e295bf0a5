//! `tie_client._native`: tie's shared-memory client (`tie-client`) for Python. The package's
//! `__init__.py` wraps it (numpy conversion, docs); see `tie_client/_native.pyi` for the API.
//!
//! Frames are written into the ring straight from the caller's numpy buffer while the GIL is
//! held (a copy into shared memory, nothing else); every wait for an answer runs with the GIL
//! released.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use tie_client::{
    Backoff, ConnectError, ConnectOptions, PredictError, Priority, ServerError, Status, SubmitError,
};

create_exception!(
    tie_client,
    TieError,
    PyException,
    "Every error of the client."
);
create_exception!(
    tie_client,
    ConnectFailed,
    TieError,
    "The session could not be opened."
);
create_exception!(
    tie_client,
    ServerNotRunning,
    ConnectFailed,
    "No server listens at the endpoint."
);
create_exception!(
    tie_client,
    PermissionDenied,
    ConnectFailed,
    "The socket may not be opened by this user."
);
create_exception!(
    tie_client,
    UntrustedServer,
    ConnectFailed,
    "The server runs as a user this client does not trust."
);
create_exception!(
    tie_client,
    Refused,
    ConnectFailed,
    "The server refused the session (unknown model, layout, limits)."
);
create_exception!(
    tie_client,
    WrongFeatureCount,
    TieError,
    "A row's width is not the model's."
);
create_exception!(
    tie_client,
    NonFinite,
    TieError,
    "A feature is NaN or infinite and the layout refuses it."
);
create_exception!(
    tie_client,
    QueueFull,
    TieError,
    "The ring or the server's queue is full."
);
create_exception!(
    tie_client,
    Disconnected,
    TieError,
    "The server went away (a reconnect is tried on the next call when enabled)."
);
create_exception!(
    tie_client,
    Timeout,
    TieError,
    "No answer in time, or the request's deadline passed at the server."
);
create_exception!(
    tie_client,
    RequestsInFlight,
    TieError,
    "predict() while submitted requests are unanswered."
);
create_exception!(
    tie_client,
    ModelNotFound,
    TieError,
    "The server answered ModelNotFound."
);
create_exception!(
    tie_client,
    InvalidInputShape,
    TieError,
    "The server answered InvalidInputShape."
);
create_exception!(
    tie_client,
    ExecutionFailed,
    TieError,
    "The server answered ExecutionFailed."
);
create_exception!(
    tie_client,
    OutOfMemory,
    TieError,
    "The server answered OutOfMemory."
);
create_exception!(
    tie_client,
    BatchProcessingError,
    TieError,
    "The server answered BatchProcessingError."
);
create_exception!(
    tie_client,
    BackendError,
    TieError,
    "The server answered BackendError."
);
create_exception!(
    tie_client,
    Rejected,
    TieError,
    "The server rejected the frame (a non-finite feature, a bad sequence)."
);
create_exception!(
    tie_client,
    NotReady,
    TieError,
    "The model is not ready (loading, or failed its health check)."
);
create_exception!(tie_client, ClosedError, TieError, "The client was closed.");
create_exception!(
    tie_client,
    ClientBusy,
    TieError,
    "Another thread's call on this client is in progress."
);

/// The exception of a server's error answer.
fn server_error(e: &ServerError) -> PyErr {
    let message = e.to_string();
    match e.status {
        Status::MODEL_NOT_FOUND => ModelNotFound::new_err(message),
        Status::INVALID_INPUT_SHAPE => InvalidInputShape::new_err(message),
        Status::EXECUTION_FAILED => ExecutionFailed::new_err(message),
        Status::OUT_OF_MEMORY => OutOfMemory::new_err(message),
        Status::BATCH_PROCESSING_ERROR => BatchProcessingError::new_err(message),
        Status::BACKEND_ERROR => BackendError::new_err(message),
        Status::TIMEOUT => Timeout::new_err(message),
        Status::QUEUE_FULL => QueueFull::new_err(message),
        Status::REJECTED => Rejected::new_err(message),
        Status::NOT_READY => NotReady::new_err(message),
        Status::DISCONNECTED => Disconnected::new_err(message),
        _ => TieError::new_err(message),
    }
}

fn submit_error(e: &SubmitError) -> PyErr {
    let message = e.to_string();
    match e {
        SubmitError::WrongFeatureCount { .. } => WrongFeatureCount::new_err(message),
        SubmitError::NonFinite { .. } => NonFinite::new_err(message),
        SubmitError::QueueFull { .. } => QueueFull::new_err(message),
        SubmitError::Disconnected => Disconnected::new_err(message),
    }
}

fn predict_error(e: &PredictError) -> PyErr {
    match e {
        PredictError::Submit(e) => submit_error(e),
        PredictError::Server(e) => server_error(e),
        PredictError::Timeout { .. } => Timeout::new_err(e.to_string()),
        PredictError::RequestsInFlight { .. } => RequestsInFlight::new_err(e.to_string()),
    }
}

fn connect_error(e: &ConnectError) -> PyErr {
    let message = tie_client::each_cause_once(e);
    match e {
        ConnectError::ServerNotRunning { .. } => ServerNotRunning::new_err(message),
        ConnectError::PermissionDenied { .. } => PermissionDenied::new_err(message),
        ConnectError::UntrustedServer { .. } => UntrustedServer::new_err(message),
        ConnectError::Refused { .. } => Refused::new_err(message),
        _ => ConnectFailed::new_err(message),
    }
}

fn priority(name: &str) -> PyResult<Priority> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "low" => Priority::Low,
        "normal" => Priority::Normal,
        "high" => Priority::High,
        "critical" => Priority::Critical,
        _ => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "priority {name:?}: one of low, normal, high, critical"
            )))
        }
    })
}

/// A session with a tie server for one model. One thread uses it at a time: a call while
/// another thread's call is in progress raises `ClientBusy` (it never waits for the other
/// call, which may be waiting for an answer without the GIL).
#[pyclass(module = "tie_client._native", frozen)]
struct Client {
    inner: Mutex<Option<tie_client::Client>>,
    timeout: Duration,
}

impl Client {
    /// Runs `f` on the open session.
    fn with<R>(&self, f: impl FnOnce(&mut tie_client::Client) -> PyResult<R>) -> PyResult<R> {
        let mut guard = self.lock()?;
        match guard.as_mut() {
            Some(client) => f(client),
            None => Err(ClosedError::new_err("the client is closed")),
        }
    }
}

/// The client's next answer, waited for without the GIL (its wait strategy and timeout,
/// counted from `started`).
fn next_answer(
    py: Python<'_>,
    client: &mut tie_client::Client,
    started: std::time::Instant,
) -> Option<tie_client::Response> {
    py.detach(|| client.poll_within(started))
}

impl Client {
    /// The session's lock, or `ClientBusy` while another thread's call holds it.
    fn lock(&self) -> PyResult<std::sync::MutexGuard<'_, Option<tie_client::Client>>> {
        match self.inner.try_lock() {
            Ok(guard) => Ok(guard),
            Err(std::sync::TryLockError::WouldBlock) => Err(ClientBusy::new_err(
                "the client is in use by another thread: give each thread its own client",
            )),
            Err(std::sync::TryLockError::Poisoned(_)) => Err(TieError::new_err(
                "a call on this client panicked; open a new one",
            )),
        }
    }
}

#[pymethods]
impl Client {
    #[new]
    #[pyo3(signature = (endpoint, model, version=None, socket_dir=None, layout=None,
        expected_server_uid=None, timeout_ms=1000, reconnect=true, capacity=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        endpoint: &str,
        model: &str,
        version: Option<u32>,
        socket_dir: Option<PathBuf>,
        layout: Option<PathBuf>,
        expected_server_uid: Option<u32>,
        timeout_ms: u64,
        reconnect: bool,
        capacity: Option<u32>,
    ) -> PyResult<Self> {
        let layout = match layout {
            None => None,
            Some(path) => Some(
                tie_client::layouts::FeatureLayout::from_file(&path)
                    .map_err(|e| TieError::new_err(format!("layout {}: {e}", path.display())))?,
            ),
        };
        let defaults = ConnectOptions::default();
        let options = ConnectOptions {
            version,
            layout,
            socket_dir,
            server_uid: expected_server_uid,
            timeout: Duration::from_millis(timeout_ms),
            reconnect: reconnect.then(Backoff::default),
            request_capacity: capacity.unwrap_or(defaults.request_capacity),
            response_capacity: capacity.unwrap_or(defaults.response_capacity),
            ..defaults
        };
        let timeout = options.timeout;
        let client = py
            .detach(|| tie_client::Client::connect(endpoint, model, options))
            .map_err(|e| connect_error(&e))?;
        Ok(Self {
            inner: Mutex::new(Some(client)),
            timeout,
        })
    }

    /// Features per row.
    #[getter]
    fn feature_count(&self) -> PyResult<u32> {
        self.with(|c| Ok(c.feature_count()))
    }

    /// Outputs per row.
    #[getter]
    fn output_count(&self) -> PyResult<u32> {
        self.with(|c| Ok(c.output_count()))
    }

    /// The model version the session is bound to.
    #[getter]
    fn model_version(&self) -> PyResult<u32> {
        self.with(|c| Ok(c.model_version()))
    }

    /// Requests submitted whose answers `poll` will return.
    #[getter]
    fn in_flight(&self) -> PyResult<usize> {
        self.with(|c| Ok(c.awaited()))
    }

    /// Sessions opened again after the server went away.
    #[getter]
    fn reconnects(&self) -> PyResult<u64> {
        self.with(|c| Ok(c.reconnects()))
    }

    /// One row's prediction (a contiguous float32 array of `feature_count`).
    fn predict<'py>(
        &self,
        py: Python<'py>,
        features: PyReadonlyArray1<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let row = features.as_slice()?;
        let outputs = self.with(|c| {
            if c.awaited() > 0 {
                return Err(RequestsInFlight::new_err(format!(
                    "{} submitted requests are unanswered: poll them first",
                    c.awaited()
                )));
            }
            let id = c
                .submit(row, Priority::Normal, None)
                .map_err(|e| submit_error(&e))?;
            let prediction = py
                .detach(|| c.wait_for(id))
                .map_err(|e| predict_error(&e))?;
            Ok(prediction.outputs().to_vec())
        })?;
        Ok(outputs.into_pyarray(py))
    }

    /// The predictions of every row of a contiguous (n, feature_count) float32 array, in
    /// order: rows submitted while the ring has room, answers read as they come.
    fn predict_batch<'py>(
        &self,
        py: Python<'py>,
        rows: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let (n_rows, n_cols) = rows.as_array().dim();
        let shape = [n_rows, n_cols];
        // A copy: the waits below run without the GIL, when other Python threads may write
        // into the caller's array.
        let data = rows.as_slice()?.to_vec();
        let timeout = self.timeout;
        let (n, outputs, values) = self.with(|c| {
            let width = c.feature_count() as usize;
            if shape[1] != width {
                return Err(WrongFeatureCount::new_err(format!(
                    "rows of {} features; the model reads {width}",
                    shape[1]
                )));
            }
            if c.awaited() > 0 {
                return Err(RequestsInFlight::new_err(format!(
                    "{} submitted requests are unanswered: poll them first",
                    c.awaited()
                )));
            }
            let (n, outputs) = (shape[0], c.output_count() as usize);
            let mut values = Vec::with_capacity(n * outputs);
            let mut sent = 0;
            while values.len() < n * outputs {
                // Submit while there is room (the GIL held: the rows are read in place).
                while sent < n {
                    match c.submit(
                        &data[sent * width..(sent + 1) * width],
                        Priority::Normal,
                        None,
                    ) {
                        Ok(_) => sent += 1,
                        Err(SubmitError::QueueFull { .. }) => break,
                        Err(e) => {
                            drain(py, c);
                            return Err(submit_error(&e));
                        }
                    }
                }
                let started = std::time::Instant::now();
                let Some(r) = next_answer(py, c, started) else {
                    drain(py, c);
                    return Err(Timeout::new_err(format!(
                        "no answer within {} ms ({} of {n} rows answered)",
                        timeout.as_millis(),
                        values.len() / outputs.max(1)
                    )));
                };
                if let Some(e) = r.error() {
                    drain(py, c);
                    return Err(server_error(&e));
                }
                values.extend_from_slice(r.outputs());
            }
            Ok((n, outputs, values))
        })?;
        let array = Array2::from_shape_vec((n, outputs), values)
            .map_err(|e| TieError::new_err(e.to_string()))?;
        Ok(array.into_pyarray(py))
    }

    /// Submits one row without waiting; returns its request id. Priority: low, normal, high or
    /// critical; `deadline_ns`: CLOCK_MONOTONIC ns after which the server answers Timeout.
    #[pyo3(signature = (features, priority="normal", deadline_ns=None))]
    fn submit(
        &self,
        features: PyReadonlyArray1<'_, f32>,
        priority: &str,
        deadline_ns: Option<u64>,
    ) -> PyResult<u64> {
        let row = features.as_slice()?;
        let priority = self::priority(priority)?;
        self.with(|c| {
            c.submit(row, priority, deadline_ns)
                .map_err(|e| submit_error(&e))
        })
    }

    /// The next answer, in submission order, without waiting: `(request_id, outputs)`, or
    /// `None` when none has come. An error answer raises its exception, with `request_id` set
    /// on it.
    fn poll<'py>(&self, py: Python<'py>) -> PyResult<Option<(u64, Bound<'py, PyArray1<f32>>)>> {
        let answer = self.with(|c| Ok(c.poll()))?;
        let Some(r) = answer else { return Ok(None) };
        if let Some(e) = r.error() {
            let err = server_error(&e);
            err.value(py).setattr("request_id", r.request_id)?;
            return Err(err);
        }
        Ok(Some((r.request_id, r.outputs().to_vec().into_pyarray(py))))
    }

    /// Ends the session; later calls raise `ClosedError` (`ClientBusy` while another thread's
    /// call is in progress).
    fn close(&self) -> PyResult<()> {
        self.lock()?.take();
        Ok(())
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close()?;
        Ok(false)
    }
}

/// Reads what is left in flight after a failed batch, so the session is clean for the next
/// call (each answer waited for at most the client's timeout).
fn drain(py: Python<'_>, client: &mut tie_client::Client) {
    while client.awaited() > 0 {
        if next_answer(py, client, std::time::Instant::now()).is_none() {
            break;
        }
    }
}

/// CLOCK_MONOTONIC now, ns: the clock of `submit`'s `deadline_ns`.
#[pyfunction]
fn monotonic_ns() -> u64 {
    tie_client::monotonic_ns()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Client>()?;
    m.add_function(wrap_pyfunction!(monotonic_ns, m)?)?;
    m.add("TieError", py.get_type::<TieError>())?;
    m.add("ConnectFailed", py.get_type::<ConnectFailed>())?;
    m.add("ServerNotRunning", py.get_type::<ServerNotRunning>())?;
    m.add("PermissionDenied", py.get_type::<PermissionDenied>())?;
    m.add("UntrustedServer", py.get_type::<UntrustedServer>())?;
    m.add("Refused", py.get_type::<Refused>())?;
    m.add("WrongFeatureCount", py.get_type::<WrongFeatureCount>())?;
    m.add("NonFinite", py.get_type::<NonFinite>())?;
    m.add("QueueFull", py.get_type::<QueueFull>())?;
    m.add("Disconnected", py.get_type::<Disconnected>())?;
    m.add("Timeout", py.get_type::<Timeout>())?;
    m.add("RequestsInFlight", py.get_type::<RequestsInFlight>())?;
    m.add("ModelNotFound", py.get_type::<ModelNotFound>())?;
    m.add("InvalidInputShape", py.get_type::<InvalidInputShape>())?;
    m.add("ExecutionFailed", py.get_type::<ExecutionFailed>())?;
    m.add("OutOfMemory", py.get_type::<OutOfMemory>())?;
    m.add(
        "BatchProcessingError",
        py.get_type::<BatchProcessingError>(),
    )?;
    m.add("BackendError", py.get_type::<BackendError>())?;
    m.add("Rejected", py.get_type::<Rejected>())?;
    m.add("NotReady", py.get_type::<NotReady>())?;
    m.add("ClosedError", py.get_type::<ClosedError>())?;
    m.add("ClientBusy", py.get_type::<ClientBusy>())?;
    Ok(())
}
