//! `tie predict`: one request through the shared-memory client, printed as JSON.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tie_client::{Client, ConnectOptions, PredictError, Response, WaitStrategy};

use tie::http::api::{
    InferenceError, InferenceMetrics, InferenceResponse, ModelInferenceMetadata, Prediction,
};

/// `tie predict`.
#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    /// Endpoint name of the server.
    #[arg(long, default_value = "tie")]
    pub endpoint: String,
    /// Model name.
    #[arg(long)]
    pub model: String,
    /// Model version: a number, or `latest` (default: the server's default for the model).
    #[arg(long, value_parser = version_value)]
    pub version: Option<u32>,
    /// Feature values, comma-separated (`0.1,-0.2,3`, spaces allowed around values) or
    /// repeated (`--features 0.1 --features -0.2`); `NaN` and `inf` are passed on (a layout
    /// that refuses them answers with the error).
    #[arg(long, required = true, allow_hyphen_values = true, value_delimiter = ',', value_parser = feature_value)]
    pub features: Vec<f32>,
    /// Socket directory (default: `$TIE_SOCKET_DIR`, else `$XDG_RUNTIME_DIR/tie` then /run/tie).
    #[arg(long)]
    pub socket_dir: Option<PathBuf>,
    /// How long to wait for the answer, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

/// One feature value of `--features`: a number, spaces around it allowed.
fn feature_value(text: &str) -> Result<f32, String> {
    text.trim()
        .parse::<f32>()
        .map_err(|e| format!("not a number ({e})"))
}

pub(super) fn predict(args: PredictArgs) -> anyhow::Result<ExitCode> {
    let features = args.features;
    let options = ConnectOptions {
        version: args.version,
        socket_dir: args.socket_dir,
        timeout: Duration::from_millis(args.timeout_ms),
        wait: WaitStrategy::SpinThenYield {
            spin: Duration::from_micros(100),
        },
        request_capacity: 1,
        response_capacity: 1,
        ..ConnectOptions::default()
    };
    let mut client = Client::connect(&args.endpoint, &args.model, options)?;
    let result = client.predict(&features);
    let (architecture, device) = {
        let mut parts = client.description().split_whitespace();
        (
            parts.next().unwrap_or_default().to_string(),
            parts.next().unwrap_or_default().to_string(),
        )
    };
    let metadata = |rows: usize| ModelInferenceMetadata {
        model_name: args.model.clone(),
        model_version: client.model_version().to_string(),
        architecture: architecture.clone(),
        input_shape: vec![rows as u32, client.feature_count()],
        output_shape: vec![rows as u32, client.output_count()],
        inference_device: device.clone(),
        batch_size_used: rows,
    };
    match result {
        Ok(p) => {
            let now = chrono::Utc::now();
            let total_ms = p.round_trip_ns as f32 / 1e6;
            let r: &Response = &p.response;
            let response = InferenceResponse {
                request_id: r.request_id.to_string(),
                predictions: p
                    .outputs()
                    .iter()
                    .enumerate()
                    .map(|(output, &value)| Prediction {
                        value,
                        row: 0,
                        output: output as u32,
                        confidence: tie::dataplane::confidence(value),
                        timestamp: now,
                        feature_contributions: None,
                    })
                    .collect(),
                model_metadata: metadata(1),
                performance_metrics: InferenceMetrics {
                    preprocessing_time_ms: Some(r.queue_ns as f32 / 1e6),
                    inference_time_ms: Some(r.compute_ns as f32 / 1e6),
                    postprocessing_time_ms: None,
                    total_time_ms: total_ms,
                    gpu_utilization: None,
                    memory_used_mb: None,
                    throughput_samples_per_sec: if total_ms > 0.0 { 1e3 / total_ms } else { 0.0 },
                    model_load_time_ms: None,
                },
                error: None,
            };
            println!("{}", serde_json::to_string_pretty(&response)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let error = to_inference_error(&e, &args.model);
            eprintln!("error: {error}");
            Ok(ExitCode::FAILURE)
        }
    }
}

pub(super) fn to_inference_error(e: &PredictError, model: &str) -> InferenceError {
    use tie_client::SubmitError;
    match e {
        PredictError::Submit(SubmitError::WrongFeatureCount { expected, got }) => {
            InferenceError::InvalidInputShape {
                expected: *expected as usize,
                actual: *got,
            }
        }
        PredictError::Submit(SubmitError::Disconnected) => InferenceError::Disconnected {
            message: e.to_string(),
        },
        PredictError::Submit(_) | PredictError::RequestsInFlight { .. } => {
            InferenceError::Rejected {
                message: e.to_string(),
            }
        }
        PredictError::Timeout { .. } => InferenceError::Timeout {
            message: e.to_string(),
        },
        PredictError::Server(s) => {
            InferenceError::from_server(s, model, || "it failed its last health check".into())
        }
    }
}

/// A `--version`: a number from 1, or `latest` (the hello's `VERSION_LATEST`).
fn version_value(s: &str) -> Result<u32, String> {
    match s {
        "latest" => Ok(tie_layouts::hello::VERSION_LATEST),
        _ => match s.parse::<u32>() {
            Ok(v) if v > 0 && v != tie_layouts::hello::VERSION_LATEST => Ok(v),
            _ => Err(format!("{s:?}: a version number from 1, or latest")),
        },
    }
}

#[cfg(test)]
mod tests {
    use crate::cli::{Cli, Command};
    use clap::Parser;

    #[test]
    fn features_split_on_commas_with_or_without_equals_negative_or_spaced() {
        let parse = |argv: &[&str]| {
            let argv = ["tie", "predict", "--model", "m"].iter().chain(argv);
            Cli::try_parse_from(argv).map(|cli| match cli.command {
                Command::Predict(p) => p.features,
                _ => panic!("not predict"),
            })
        };
        let want = vec![-0.5, 0.25, -3.0];
        assert_eq!(parse(&["--features", "-0.5,0.25,-3"]).unwrap(), want);
        assert_eq!(parse(&["--features=-0.5,0.25,-3"]).unwrap(), want);
        assert_eq!(parse(&["--features", "-0.5, 0.25 ,-3"]).unwrap(), want);
        assert_eq!(
            parse(&["--features", "-0.5", "--features", "0.25,-3"]).unwrap(),
            want
        );
        let error = parse(&["--features", "1,x"]).unwrap_err().to_string();
        assert!(
            error.contains("'x'") && error.contains("not a number"),
            "{error}"
        );
        // Non-finite values reach the client, which applies the layout's rule.
        let nan = parse(&["--features", "NaN,inf"]).unwrap();
        assert!(nan[0].is_nan() && nan[1].is_infinite());
        assert!(parse(&[]).is_err());
    }
}
