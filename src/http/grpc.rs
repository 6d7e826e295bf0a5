//! The Open Inference Protocol's gRPC service (KServe v2, `inference.GRPCInferenceService`,
//! `proto/inference.proto`) on `server.grpc_addr`: liveness, readiness, metadata and
//! inference with `raw_input_contents`/`raw_output_contents` or typed contents, answered by
//! the same code as the REST routes ([`super::v2`]) under the same rules (the bearer token
//! with `server.http_token_everywhere`, `max_concurrent_requests`, the HTTP row budget). Each
//! answer is counted in `tie_http_responses_total` under its gRPC path (gRPC is HTTP/2), with
//! the HTTP status of its error kind.
#![forbid(unsafe_code)]

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::http::api::InferenceError;

use super::app::HttpState;
use super::v2;

/// The code generated from `proto/inference.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("inference");
}

use proto::grpc_inference_service_server::GrpcInferenceService;
use proto::*;

/// The service, over the control plane's state.
pub(super) struct Inference {
    pub(super) state: Arc<HttpState>,
}

/// The gRPC status of an error kind.
fn status(e: &InferenceError) -> Status {
    let message = e.to_string();
    match e.http_status() {
        400 | 413 | 415 => Status::invalid_argument(message),
        401 => Status::unauthenticated(message),
        403 => Status::permission_denied(message),
        404 => Status::not_found(message),
        409 | 422 => Status::failed_precondition(message),
        429 => Status::resource_exhausted(message),
        503 => Status::unavailable(message),
        504 => Status::deadline_exceeded(message),
        _ => Status::internal(message),
    }
}

impl Inference {
    /// Runs `answer` for a request of `method` (past the token rule) and counts the outcome.
    async fn serve<T, R>(
        &self,
        method: &'static str,
        request: Request<T>,
        answer: impl AsyncFnOnce(T) -> Result<R, InferenceError>,
    ) -> Result<Response<R>, Status> {
        let route = format!("/inference.GRPCInferenceService/{method}");
        // The token rule ran already, in the interceptor (before the message was decoded).
        let result = answer(request.into_inner()).await;
        match result {
            Ok(r) => {
                self.state.counters.response(&route, 200);
                Ok(Response::new(r))
            }
            Err(e) => {
                self.state.counters.response(&route, e.http_status());
                self.state.counters.error(e.kind());
                Err(status(&e))
            }
        }
    }
}

/// A version from a request: empty is none (the default version).
fn version(v: &str) -> Option<&str> {
    (!v.is_empty()).then_some(v)
}

#[tonic::async_trait]
impl GrpcInferenceService for Inference {
    async fn server_live(
        &self,
        request: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        self.serve("ServerLive", request, async |_| {
            Ok(ServerLiveResponse { live: true })
        })
        .await
    }

    async fn server_ready(
        &self,
        request: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        self.serve("ServerReady", request, async |_| {
            Ok(ServerReadyResponse {
                ready: super::health::ready_report(&self.state).await.ready,
            })
        })
        .await
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        self.serve("ModelReady", request, async |r| {
            Ok(ModelReadyResponse {
                ready: v2::is_ready(&self.state, &r.name, version(&r.version))?,
            })
        })
        .await
    }

    async fn server_metadata(
        &self,
        request: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        self.serve("ServerMetadata", request, async |_| {
            let m = v2::server_metadata().await.0;
            // The REST API's extensions (statistics, repository) have no RPCs here.
            Ok(ServerMetadataResponse {
                name: m.name,
                version: m.version,
                extensions: Vec::new(),
            })
        })
        .await
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        self.serve("ModelMetadata", request, async |r| {
            let m = v2::metadata_of(&self.state, r.name, version(&r.version)).await?;
            let tensor = |t: v2::TensorMetadata| model_metadata_response::TensorMetadata {
                name: t.name,
                datatype: t.datatype,
                shape: t.shape,
            };
            Ok(ModelMetadataResponse {
                name: m.name,
                versions: m.versions,
                platform: m.platform,
                inputs: m.inputs.into_iter().map(tensor).collect(),
                outputs: m.outputs.into_iter().map(tensor).collect(),
            })
        })
        .await
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        self.serve("ModelInfer", request, async |r| {
            let invalid = |message: String| InferenceError::InvalidRequest { message };
            let raw = !r.raw_input_contents.is_empty();
            if raw && r.raw_input_contents.len() != r.inputs.len() {
                return Err(invalid(format!(
                    "{} raw_input_contents for {} inputs",
                    r.raw_input_contents.len(),
                    r.inputs.len()
                )));
            }
            let mut inputs = Vec::with_capacity(r.inputs.len());
            for (i, t) in r.inputs.into_iter().enumerate() {
                if raw && t.contents.is_some() {
                    return Err(invalid(format!(
                        "input {:?} has contents and raw_input_contents: one or the other",
                        t.name
                    )));
                }
                let expected = v2::element_count(&t.shape).ok_or_else(|| {
                    invalid(format!("input {:?} has shape {:?}", t.name, t.shape))
                })?;
                let values = if raw {
                    let bytes = &r.raw_input_contents[i];
                    if bytes.len() % 4 != 0 {
                        return Err(invalid(format!(
                            "raw_input_contents of {:?} is {} bytes, not whole FP32 values",
                            t.name,
                            bytes.len()
                        )));
                    }
                    v2::floats(bytes)
                } else {
                    t.contents.map(|c| c.fp32_contents).unwrap_or_default()
                };
                if values.len() != expected {
                    return Err(InferenceError::InvalidInputShape {
                        expected,
                        actual: values.len(),
                    });
                }
                inputs.push(v2::TensorIn {
                    name: t.name,
                    datatype: t.datatype,
                    shape: t.shape,
                    values,
                });
            }
            let timeout_ms = match r
                .parameters
                .get("timeout")
                .and_then(|p| p.parameter_choice.as_ref())
            {
                None => None,
                Some(infer_parameter::ParameterChoice::Int64Param(us)) if *us >= 0 => {
                    v2::timeout_ms(*us as u64)?
                }
                Some(_) => {
                    return Err(invalid(
                        "the timeout parameter is not a number of µs".into(),
                    ))
                }
            };
            let answer = v2::run_call(
                &self.state,
                v2::Call {
                    id: (!r.id.is_empty()).then(|| r.id.clone()),
                    model: r.model_name,
                    version: version(&r.model_version).map(str::to_string),
                    inputs,
                    outputs: r.outputs.into_iter().map(|o| o.name).collect(),
                    timeout_ms,
                },
            )
            .await?;
            Ok(ModelInferResponse {
                model_name: answer.model_name,
                model_version: answer.model_version,
                id: r.id,
                parameters: Default::default(),
                outputs: vec![model_infer_response::InferOutputTensor {
                    name: answer.output_name,
                    datatype: "FP32".into(),
                    shape: answer.shape,
                    parameters: Default::default(),
                    contents: None,
                }],
                raw_output_contents: vec![answer
                    .values
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect()],
            })
        })
        .await
    }
}

/// Calls a connection may have in progress at once.
const STREAMS_PER_CONNECTION: usize = 64;

/// Serves the service on `listener` until `shutdown`.
pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<HttpState>,
    shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    // No Nagle: a small answer is not held back waiting for the client's ACK (40 ms).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = proto::grpc_inference_service_server::GrpcInferenceServiceServer::new(Inference {
        state: state.clone(),
    })
    .max_decoding_message_size(super::app::MAX_BODY_BYTES);
    // With `server.http_token_everywhere`, a call without the token is refused from its
    // headers, before its message is read.
    let service =
        tonic::service::interceptor::InterceptedService::new(server, move |request: Request<()>| {
            if state.token_everywhere {
                let headers = request.metadata().clone().into_headers();
                if let Err(e) = state.authorize(&headers) {
                    state
                        .counters
                        .response("/inference.GRPCInferenceService", e.http_status());
                    state.counters.error(e.kind());
                    return Err(status(&e));
                }
            }
            Ok(request)
        });
    let served = tonic::transport::Server::builder()
        // Bounds of a connection and a call: streams at once, and the longest call (the
        // longest timeout a request may ask for, and some).
        .concurrency_limit_per_connection(STREAMS_PER_CONNECTION)
        .max_concurrent_streams(STREAMS_PER_CONNECTION as u32)
        .timeout(std::time::Duration::from_millis(
            super::app::MAX_TIMEOUT_MS + 10_000,
        ))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = shutdown.await;
        })
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "the gRPC service stopped");
    }
}
