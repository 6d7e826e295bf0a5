//! The Open Inference Protocol (KServe v2) over REST, beside tie's own API: server and model
//! metadata, health and readiness, inference with JSON tensors or the binary tensor data
//! extension (what `tritonclient` sends by default), and Triton's statistics and model
//! repository extensions. Requests run through the same sessions, batcher and backends as
//! tie's own HTTP predictions; errors take the protocol's form, `{"error": "…"}`, with the
//! status of their kind.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::http::api::{InferenceError, InferenceRequest, RequestPriority};
use crate::models::{ChangeReport, LoadedModel};

use super::{admin::*, app::*, error::*, health::*, pool::*, predict::*};

/// The binary tensor data extension's header: the length of the JSON at the body's start.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The only tensor data type tie's models read and write.
const FP32: &str = "FP32";

/// An error in the protocol's form, counted by kind like every error answer.
pub(super) struct V2Error(InferenceError);

impl From<InferenceError> for V2Error {
    fn from(e: InferenceError) -> Self {
        Self(e)
    }
}

impl From<ApiError> for V2Error {
    fn from(e: ApiError) -> Self {
        Self(e.0)
    }
}

impl IntoResponse for V2Error {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(json!({"error": self.0.to_string()}))).into_response();
        response.extensions_mut().insert(CountedKind(self.0.kind()));
        response
    }
}

/// An error answer in the form of the API `path` belongs to: the protocol's under `/v2`, tie's
/// elsewhere.
pub(super) fn error_response(path: &str, e: InferenceError) -> Response {
    if path.starts_with("/v2") {
        V2Error(e).into_response()
    } else {
        ApiError(e).into_response()
    }
}

fn invalid(message: String) -> V2Error {
    V2Error(InferenceError::InvalidRequest { message })
}

/// A model and an optional version (a number or a label) from the route.
fn model_of(params: &HashMap<String, String>) -> (String, Option<String>) {
    (
        params.get("name").cloned().unwrap_or_default(),
        params.get("version").cloned(),
    )
}

/// The server's metadata.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ServerMetadata {
    /// `tie`.
    pub name: String,
    /// The server's version.
    pub version: String,
    /// Protocol extensions served.
    pub extensions: Vec<String>,
}

/// Server metadata (Open Inference Protocol).
#[utoipa::path(get, path = "/v2", tag = "open-inference-protocol",
    operation_id = "v2_server_metadata",
    responses((status = 200, description = "Name, version and extensions", body = ServerMetadata)))]
pub(super) async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata {
        name: "tie".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        extensions: ["binary_tensor_data", "statistics", "model_repository"]
            .map(String::from)
            .to_vec(),
    })
}

/// Liveness (Open Inference Protocol): 200 while the process answers.
#[utoipa::path(get, path = "/v2/health/live", tag = "open-inference-protocol",
    operation_id = "v2_live",
    responses((status = 200, description = "Alive")))]
pub(super) async fn live() -> StatusCode {
    StatusCode::OK
}

/// Readiness (Open Inference Protocol): as `/health/ready`, without the report.
#[utoipa::path(get, path = "/v2/health/ready", tag = "open-inference-protocol",
    operation_id = "v2_ready",
    responses((status = 200, description = "Ready"), (status = 503, description = "Not ready")))]
pub(super) async fn ready(State(state): State<Arc<HttpState>>) -> StatusCode {
    if ready_report(&state).await.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// A tensor's metadata.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TensorMetadata {
    /// The graph's tensor name.
    pub name: String,
    /// `FP32`.
    pub datatype: String,
    /// `[-1, width]`: any number of rows.
    pub shape: Vec<i64>,
}

/// A model's metadata.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelMetadata {
    /// The model's name.
    pub name: String,
    /// Its versions loaded now.
    pub versions: Vec<String>,
    /// The engine that runs the version asked for (`cpu-mlp`, `tract`, `cuda-graph`, …).
    pub platform: String,
    /// What it reads: one tensor of rows.
    pub inputs: Vec<TensorMetadata>,
    /// What it writes: one tensor of rows.
    pub outputs: Vec<TensorMetadata>,
}

fn tensors(model: &LoadedModel) -> (TensorMetadata, TensorMetadata) {
    let io = &model.backend.info().io;
    let tensor = |name: &str, width: usize| TensorMetadata {
        name: name.to_string(),
        datatype: FP32.into(),
        shape: vec![-1, width as i64],
    };
    (
        tensor(&io.input_name, io.input_width),
        tensor(&io.output_name, io.output_width),
    )
}

/// A model's metadata (Open Inference Protocol); without a version, the default version's.
#[utoipa::path(get, path = "/v2/models/{name}", tag = "open-inference-protocol",
    operation_id = "v2_model_metadata",
    params(("name" = String, Path, description = "The model (`…/versions/{version}/…` names a version: a number or a label)")),
    responses((status = 200, description = "The model's tensors", body = ModelMetadata),
        (status = 404, description = "No such model or version")))]
pub(super) async fn model_metadata(
    State(state): State<Arc<HttpState>>,
    Path(params): Path<HashMap<String, String>>,
) -> Result<Json<ModelMetadata>, V2Error> {
    let (name, version) = model_of(&params);
    Ok(Json(metadata_of(&state, name, version.as_deref()).await?))
}

/// A model's metadata: its versions loaded, and the version asked for's engine and tensors (a
/// version unloaded for going unused is loaded again, as for an inference).
pub(super) async fn metadata_of(
    state: &HttpState,
    name: String,
    version: Option<&str>,
) -> Result<ModelMetadata, InferenceError> {
    let serving = state.serving().map_err(|e| e.0)?.clone();
    let model = resolve_loading(&serving, &name, version).await?.0.model;
    let set = serving.models.snapshot();
    let versions = set
        .versions_of(&name)
        .iter()
        .map(|m| m.version.to_string())
        .collect();
    let (input, output) = tensors(&model);
    Ok(ModelMetadata {
        name,
        versions,
        platform: model.backend.info().engine.to_string(),
        inputs: vec![input],
        outputs: vec![output],
    })
}

/// Whether the model (a version, when named) passed its last health check; a version unloaded
/// for going unused is not ready (an inference loads it again).
pub(super) fn is_ready(
    state: &HttpState,
    name: &str,
    version: Option<&str>,
) -> Result<bool, InferenceError> {
    let serving = state.serving().map_err(|e| e.0)?;
    match serving.resolve(name, version) {
        Ok(target) => Ok(target.model.health.is_ready()),
        Err(InferenceError::ModelNotFound { .. }) if serving.manager.can_restore(name, version) => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// A model's readiness (Open Inference Protocol): 200 when it passed its last health check.
#[utoipa::path(get, path = "/v2/models/{name}/ready", tag = "open-inference-protocol",
    operation_id = "v2_model_ready",
    params(("name" = String, Path, description = "The model (`…/versions/{version}/…` names a version: a number or a label)")),
    responses((status = 200, description = "Ready"), (status = 503, description = "Not ready"),
        (status = 404, description = "No such model or version")))]
pub(super) async fn model_ready(
    State(state): State<Arc<HttpState>>,
    Path(params): Path<HashMap<String, String>>,
) -> Result<StatusCode, V2Error> {
    let (name, version) = model_of(&params);
    Ok(if is_ready(&state, &name, version.as_deref())? {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    })
}

/// A tensor of an inference request.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct InferInput {
    /// The model's input tensor's name.
    pub name: String,
    /// `[rows, width]`.
    pub shape: Vec<i64>,
    /// `FP32`.
    pub datatype: String,
    /// `binary_data_size`: the tensor's bytes follow the JSON (binary tensor data extension).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub parameters: HashMap<String, Value>,
    /// The values, row-major, flat or nested (absent with `binary_data_size`).
    #[serde(default)]
    #[schema(value_type = Option<Vec<f32>>)]
    pub data: Option<Value>,
}

/// An output asked for.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct InferRequestedOutput {
    /// The model's output tensor's name.
    pub name: String,
    /// `binary_data: true` for the values as bytes after the JSON.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub parameters: HashMap<String, Value>,
}

/// An inference request.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct InferRequest {
    /// Echoed in the response.
    #[serde(default)]
    pub id: Option<String>,
    /// `binary_data_output: true` (every output as bytes), `timeout` (µs: the answer is useless
    /// after it, as tie's `timeout_ms`).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub parameters: HashMap<String, Value>,
    /// One tensor: the model's input.
    pub inputs: Vec<InferInput>,
    /// The outputs wanted (absent: all).
    #[serde(default)]
    pub outputs: Option<Vec<InferRequestedOutput>>,
}

fn flag(parameters: &HashMap<String, Value>, key: &str) -> bool {
    parameters
        .get(key)
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// Appends the numbers of `value` (a number, or arrays of them nested) to `out`.
fn flatten(value: &Value, out: &mut Vec<f32>) -> Result<(), V2Error> {
    match value {
        Value::Array(items) => items.iter().try_for_each(|v| flatten(v, out)),
        Value::Number(n) => {
            out.push(n.as_f64().unwrap_or(f64::NAN) as f32);
            Ok(())
        }
        other => Err(invalid(format!("tensor data holds {other}, not a number"))),
    }
}

/// The number of values of a tensor of `shape`, if it is a shape of rows (non-negative
/// dimensions, a product that fits).
pub(super) fn element_count(shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| {
        usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
    })
}

/// The input's values: from `data`, or from the binary part (advanced past them).
fn input_values(input: &InferInput, binary: &mut &[u8]) -> Result<Vec<f32>, V2Error> {
    if input.datatype != FP32 {
        return Err(invalid(format!(
            "input {:?} is {}; tie's models read FP32",
            input.name, input.datatype
        )));
    }
    let values = element_count(&input.shape)
        .filter(|&n| n <= MAX_BODY_BYTES)
        .ok_or_else(|| {
            invalid(format!(
                "input {:?} has shape {:?}",
                input.name, input.shape
            ))
        })?;
    let features = match input.parameters.get("binary_data_size") {
        Some(size) => {
            let size = size
                .as_u64()
                .ok_or_else(|| invalid("binary_data_size is not a number of bytes".into()))?
                as usize;
            if size != values * 4 {
                return Err(invalid(format!(
                    "binary_data_size is {size} bytes; shape {:?} of FP32 is {}",
                    input.shape,
                    values * 4
                )));
            }
            if binary.len() < size {
                return Err(invalid(format!(
                    "binary_data_size is {size} bytes; the body holds {} after the JSON",
                    binary.len()
                )));
            }
            let (bytes, rest) = binary.split_at(size);
            *binary = rest;
            floats(bytes)
        }
        None => {
            let data = input
                .data
                .as_ref()
                .ok_or_else(|| invalid(format!("input {} has no data", input.name)))?;
            // Grown as the data is read: a shape alone reserves nothing.
            let mut out = Vec::new();
            flatten(data, &mut out)?;
            out
        }
    };
    if features.len() != values {
        return Err(V2Error(InferenceError::InvalidInputShape {
            expected: values,
            actual: features.len(),
        }));
    }
    Ok(features)
}

/// Little-endian FP32 values of `bytes` (a whole number of them).
pub(super) fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The request's `timeout` parameter (µs) as tie's deadline in ms: 0 is none, as in Triton.
pub(super) fn timeout_ms(us: u64) -> Result<Option<u64>, InferenceError> {
    if us > MAX_TIMEOUT_MS * 1000 {
        return Err(InferenceError::InvalidRequest {
            message: format!(
                "the timeout parameter is {us} µs; at most {} µs",
                MAX_TIMEOUT_MS * 1000
            ),
        });
    }
    Ok((us > 0).then(|| us.div_ceil(1000)))
}

/// An input tensor, decoded from whichever form it came in.
pub(super) struct TensorIn {
    pub(super) name: String,
    pub(super) datatype: String,
    pub(super) shape: Vec<i64>,
    pub(super) values: Vec<f32>,
}

/// An inference request, decoded from REST or gRPC.
pub(super) struct Call {
    pub(super) id: Option<String>,
    pub(super) model: String,
    pub(super) version: Option<String>,
    pub(super) inputs: Vec<TensorIn>,
    /// The outputs asked for by name (empty: all).
    pub(super) outputs: Vec<String>,
    pub(super) timeout_ms: Option<u64>,
}

/// The answer to a [`Call`]: the model's one output.
pub(super) struct Answer {
    pub(super) model_name: String,
    pub(super) model_version: String,
    pub(super) output_name: String,
    pub(super) shape: Vec<i64>,
    pub(super) values: Vec<f32>,
}

/// Runs a call: its tensor checked against the model's, then its rows through the model's
/// sessions as tie's own HTTP predictions run.
pub(super) async fn run_call(state: &HttpState, call: Call) -> Result<Answer, InferenceError> {
    let serving = state.serving().map_err(|e| e.0)?.clone();
    let _permit = state.limit_permit()?;
    let (target, _) = resolve_loading(&serving, &call.model, call.version.as_deref()).await?;
    let model = target.model.clone();
    let (input_meta, output_meta) = tensors(&model);
    let refuse = |message: String| InferenceError::InvalidRequest { message };
    let [input] = call.inputs.as_slice() else {
        return Err(refuse(format!(
            "{} reads one input, {:?}; the request has {}",
            model.key(),
            input_meta.name,
            call.inputs.len()
        )));
    };
    if input.name != input_meta.name {
        return Err(refuse(format!(
            "{} has no input {:?}: its input is {:?}",
            model.key(),
            input.name,
            input_meta.name
        )));
    }
    if input.datatype != FP32 {
        return Err(refuse(format!(
            "input {:?} is {}; {} reads FP32",
            input.name,
            input.datatype,
            model.key()
        )));
    }
    let width = model.input_width();
    let rows = match input.shape.as_slice() {
        [rows, w] if *w == width as i64 && (1..=MAX_ROWS as i64).contains(rows) => *rows as usize,
        _ => {
            return Err(refuse(format!(
                "input {:?} has shape {:?}; {} reads [rows, {width}], 1 to {MAX_ROWS} rows",
                input.name,
                input.shape,
                model.key()
            )))
        }
    };
    if call.outputs.iter().any(|o| *o != output_meta.name) {
        return Err(refuse(format!(
            "{} has one output, {:?}; the request asks for {:?}",
            model.key(),
            output_meta.name,
            call.outputs
        )));
    }
    // The input's values move into the request (one input: checked above).
    let features = call
        .inputs
        .into_iter()
        .next()
        .map(|i| i.values)
        .unwrap_or_default();
    let shaped = InferenceRequest {
        request_id: call.id.unwrap_or_default(),
        model_name: call.model.clone(),
        model_version: call.version,
        input_features: features,
        feature_names: Vec::new(),
        batch_size: rows,
        priority: RequestPriority::Normal,
        timeout_ms: call.timeout_ms,
        strategy_context: None,
    };
    validate(&shaped, &model)?;
    serving.take_rows(rows)?;
    let (deadline_ns, wait_until) = timing(call.timeout_ms);
    let prio = priority(shaped.priority);
    let responses = run_rows(
        &serving,
        &target,
        shaped.input_features,
        rows,
        prio,
        deadline_ns,
        wait_until,
    )
    .await?;
    let (_, versions) = answering_version(&serving, &model, &responses);
    Ok(Answer {
        model_name: call.model,
        // The version of the last row (a reload may have moved the default between rows).
        model_version: versions.last().unwrap_or(&model.version).to_string(),
        output_name: output_meta.name,
        shape: vec![rows as i64, model.output_width() as i64],
        values: responses
            .iter()
            .flat_map(|r| r.outputs().iter().copied())
            .collect(),
    })
}

/// An output tensor of a response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InferOutput {
    /// The model's output tensor's name.
    pub name: String,
    /// `FP32`.
    pub datatype: String,
    /// `[rows, width]`.
    pub shape: Vec<i64>,
    /// `binary_data_size` when its values follow the JSON.
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    #[schema(value_type = Object)]
    pub parameters: HashMap<String, Value>,
    /// The values, row-major (absent when they are bytes after the JSON).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Vec<f32>>,
}

/// An inference response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InferResponse {
    /// The model.
    pub model_name: String,
    /// The version that answered (versions in order, comma-separated, when a reload moved the
    /// default between rows).
    pub model_version: String,
    /// The request's id, when it gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The model's output.
    pub outputs: Vec<InferOutput>,
}

/// Inference (Open Inference Protocol), JSON tensors or the binary tensor data extension.
///
/// The body is the request's JSON, or with `Inference-Header-Content-Length: n` its first `n`
/// bytes, the input's bytes (little-endian FP32) following. Outputs asked for with
/// `binary_data` (or all, with the request's `binary_data_output`) come back as bytes after the
/// response's JSON, whose length is then in the same header.
#[utoipa::path(post, path = "/v2/models/{name}/infer", tag = "open-inference-protocol",
    operation_id = "v2_infer",
    params(("name" = String, Path, description = "The model (`…/versions/{version}/…` names a version: a number or a label)")),
    request_body = InferRequest,
    responses((status = 200, description = "The outputs", body = InferResponse),
        (status = 400, description = "A malformed request, or a tensor of the wrong name, type or shape"),
        (status = 404, description = "No such model or version"),
        (status = 429, description = "Queue full or too many requests in progress"),
        (status = 503, description = "Not ready"),
        (status = 504, description = "The timeout passed")))]
pub(super) async fn infer(
    State(state): State<Arc<HttpState>>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, V2Error> {
    let (model, version) = model_of(&params);
    let json_length = match headers.get(HEADER_LENGTH) {
        None => body.len(),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n <= body.len())
            .ok_or_else(|| {
                invalid(format!(
                    "{HEADER_LENGTH} must be a length within the body's {} bytes",
                    body.len()
                ))
            })?,
    };
    let request: InferRequest = serde_json::from_slice(&body[..json_length])
        .map_err(|e| invalid(format!("the request's JSON: {e}")))?;
    let mut binary = &body[json_length..];
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in &request.inputs {
        inputs.push(TensorIn {
            name: input.name.clone(),
            datatype: input.datatype.clone(),
            shape: input.shape.clone(),
            values: input_values(input, &mut binary)?,
        });
    }
    if !binary.is_empty() {
        return Err(invalid(format!(
            "{} bytes after the inputs' binary data belong to no input",
            binary.len()
        )));
    }
    // Each output as JSON, or as bytes after it.
    let outputs = request.outputs.unwrap_or_default();
    // An output's own `binary_data`, else the request's `binary_data_output`.
    let all_binary = flag(&request.parameters, "binary_data_output");
    let binary_output = match outputs.as_slice() {
        [] => all_binary,
        outputs => outputs.iter().any(|o| {
            o.parameters
                .get("binary_data")
                .and_then(Value::as_bool)
                .unwrap_or(all_binary)
        }),
    };
    let timeout_ms = match request.parameters.get("timeout") {
        None => None,
        Some(us) => timeout_ms(
            us.as_u64()
                .ok_or_else(|| invalid("the timeout parameter is not a number of µs".into()))?,
        )?,
    };
    let answer = run_call(
        &state,
        Call {
            id: request.id.clone(),
            model,
            version,
            inputs,
            outputs: outputs.into_iter().map(|o| o.name).collect(),
            timeout_ms,
        },
    )
    .await?;
    let mut output = InferOutput {
        name: answer.output_name,
        datatype: FP32.into(),
        shape: answer.shape,
        parameters: HashMap::new(),
        data: None,
    };
    let bytes: Option<Vec<u8>> =
        binary_output.then(|| answer.values.iter().flat_map(|v| v.to_le_bytes()).collect());
    match &bytes {
        Some(b) => {
            output
                .parameters
                .insert("binary_data_size".into(), json!(b.len()));
        }
        None => output.data = Some(answer.values),
    }
    let response = InferResponse {
        model_name: answer.model_name,
        model_version: answer.model_version,
        id: request.id,
        outputs: vec![output],
    };
    let json = serde_json::to_vec(&response).map_err(|e| {
        V2Error(InferenceError::BatchProcessingError {
            operation: format!("writing the response: {e}"),
        })
    })?;
    Ok(match bytes {
        None => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Some(b) => {
            let length = json.len();
            let mut body = json;
            body.extend_from_slice(&b);
            (
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                    (
                        header::HeaderName::from_static(HEADER_LENGTH),
                        length.to_string(),
                    ),
                ],
                body,
            )
                .into_response()
        }
    })
}

/// A count and the time it took (Triton's statistics extension).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StatDuration {
    /// Values.
    pub count: u64,
    /// Their sum, ns (absent where not measured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ns: Option<u64>,
}

/// The statistics answer (Triton's statistics extension).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelStatsResponse {
    /// One entry per model version.
    pub model_stats: Vec<ModelStatistics>,
}

/// A model version's figures (Triton's statistics extension).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelStatistics {
    /// The model.
    pub name: String,
    /// The version.
    pub version: String,
    /// When it last got a request, ms since the Unix epoch (0: never).
    pub last_inference: u64,
    /// Predictions made (rows answered with one).
    pub inference_count: u64,
    /// Batches run.
    pub execution_count: u64,
    /// Per stage: `success` (the total stage of requests answered: accepted to outputs ready),
    /// `fail` (count only), `queue`, `compute_input` (rows into staging) and `compute_infer`
    /// (a staged batch run); the last two count the batches timed (1 in 8). A stage not
    /// measured yet is absent.
    pub inference_stats: HashMap<String, StatDuration>,
}

/// Statistics of models (Triton's statistics extension).
///
/// Of every model version (`/v2/models/stats`), or of one model's versions, from the monitor's
/// figures.
#[utoipa::path(get, path = "/v2/models/{name}/stats", tag = "open-inference-protocol",
    operation_id = "v2_model_stats",
    params(("name" = String, Path, description = "The model (`…/versions/{version}/…` names a version: a number or a label)")),
    responses((status = 200, description = "`{\"model_stats\": [...]}`", body = ModelStatsResponse),
        (status = 404, description = "No such model or version")))]
pub(super) async fn model_stats(
    State(state): State<Arc<HttpState>>,
    params: Option<Path<HashMap<String, String>>>,
) -> Result<Json<ModelStatsResponse>, V2Error> {
    let serving = state.serving()?;
    let set = serving.models.snapshot();
    // `/v2/models/stats` has no parameters: every model.
    let params = params.filter(|p| !p.is_empty());
    let models: Vec<Arc<LoadedModel>> = match params.as_ref().map(|p| model_of(p)) {
        None => set.loaded().into_iter().map(|(_, m)| m.clone()).collect(),
        Some((name, Some(version))) => vec![serving.resolve(&name, Some(&version))?.model],
        Some((name, None)) => {
            let versions: Vec<Arc<LoadedModel>> =
                set.versions_of(&name).into_iter().cloned().collect();
            if versions.is_empty() {
                // The same error as any other request naming it.
                serving.resolve(&name, None)?;
            }
            versions
        }
    };
    Ok(Json(ModelStatsResponse {
        model_stats: models.iter().map(|m| statistics(serving, m)).collect(),
    }))
}

fn statistics(serving: &Serving, m: &LoadedModel) -> ModelStatistics {
    let metrics = serving.monitor.metrics(m.monitor_index);
    let mut inference_stats = HashMap::new();
    let stage = |name: &str| {
        metrics.stages.get(name).map(|s| StatDuration {
            count: s.count,
            ns: Some((s.mean_ms * 1e6 * s.count as f64) as u64),
        })
    };
    for (key, name) in [
        ("success", "total"),
        ("queue", "queue"),
        ("compute_input", "gather"),
        ("compute_infer", "execute"),
    ] {
        if let Some(v) = stage(name) {
            inference_stats.insert(key.to_string(), v);
        }
    }
    let fail = StatDuration {
        count: metrics.failed_requests,
        ns: None,
    };
    inference_stats.insert("fail".into(), fail);
    ModelStatistics {
        name: m.name.clone(),
        version: m.version.to_string(),
        last_inference: serving
            .monitor
            .last_request(m.monitor_index)
            .map_or(0, |t| t.timestamp_millis().max(0) as u64),
        inference_count: metrics.successful_requests,
        execution_count: metrics.batches,
        inference_stats,
    }
}

/// A model of the repository index (Triton's model repository extension).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RepositoryEntry {
    /// The model.
    pub name: String,
    /// The version (empty for a model that has none to load).
    pub version: String,
    /// `READY` or `UNAVAILABLE`.
    pub state: String,
    /// Why it is not ready.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// The repository's models (Triton's model repository extension).
///
/// Every version loaded, and every one that failed to load.
#[utoipa::path(post, path = "/v2/repository/index", tag = "open-inference-protocol",
    operation_id = "v2_repository_index",
    responses((status = 200, description = "The models", body = Vec<RepositoryEntry>)))]
pub(super) async fn repository_index(
    State(state): State<Arc<HttpState>>,
) -> Result<Json<Vec<RepositoryEntry>>, V2Error> {
    let serving = state.serving()?;
    Ok(Json(
        all_models(serving)
            .into_iter()
            .map(|m| RepositoryEntry {
                name: m.model_name,
                version: m.version,
                state: if m.ready { "READY" } else { "UNAVAILABLE" }.into(),
                reason: m.not_ready_reason.unwrap_or_default(),
            })
            .collect(),
    ))
}

/// Loads or reloads a model (Triton's model repository extension).
///
/// As tie's `models/{model_name}/load`, with the same token rules.
#[utoipa::path(post, path = "/v2/repository/models/{name}/load", tag = "open-inference-protocol",
    operation_id = "v2_repository_load",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The model's directory in the repository")),
    responses((status = 200, description = "Loaded: what changed", body = ChangeReport), (status = 401, description = "Bearer token missing or wrong"),
        (status = 404, description = "No such model in the repository"),
        (status = 422, description = "A version failed to load; nothing changed")))]
pub(super) async fn repository_load(
    State(state): State<Arc<HttpState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<ChangeReport>, V2Error> {
    let model = name.clone();
    Ok(change(&state, &headers, &name, move |m| m.reload(&model, None)).await?)
}

/// Unloads every version of a model (Triton's model repository extension).
///
/// As tie's `models/{model_key}/unload` of the name, with the same token rules.
#[utoipa::path(post, path = "/v2/repository/models/{name}/unload", tag = "open-inference-protocol",
    operation_id = "v2_repository_unload",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The model")),
    responses((status = 200, description = "Unloaded: what changed", body = ChangeReport), (status = 401, description = "Bearer token missing or wrong"),
        (status = 404, description = "Not loaded")))]
pub(super) async fn repository_unload(
    State(state): State<Arc<HttpState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<ChangeReport>, V2Error> {
    let model = name.clone();
    Ok(change(&state, &headers, &name, move |m| m.unload(&model)).await?)
}
