//! `tie reload` and `tie unload`: requests to a running server's control plane.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use tie::config::ServiceConfig;

/// How to reach a running server's control plane.
#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    /// The server's config (TOML): its `server.http_addr` and `server.api_token_file`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The control plane's address (overrides the config's).
    #[arg(long)]
    pub http_addr: Option<std::net::SocketAddr>,
}

/// `tie reload`.
#[derive(Debug, clap::Args)]
pub struct ReloadArgs {
    /// Only this model (default: the whole repository; new models load, removed ones unload).
    pub model: Option<String>,
    /// Check that this version is one the model's version policy loads (refused otherwise);
    /// the reload loads what the policy picks.
    #[arg(long, requires = "model")]
    pub version: Option<u32>,
    /// The server.
    #[command(flatten)]
    pub control: ControlArgs,
}

/// `tie unload`.
#[derive(Debug, clap::Args)]
pub struct UnloadArgs {
    /// `name:version` (a label accepted), or `name` for every version.
    pub key: String,
    /// The server.
    #[command(flatten)]
    pub control: ControlArgs,
}

/// POSTs to the control plane's `path` (under the API prefix) and prints the answer; a refusal
/// is printed and fails the command.
pub(super) fn control(args: &ControlArgs, path: &str) -> anyhow::Result<ExitCode> {
    let mut config = ServiceConfig::load(args.config.as_deref())?;
    if let Some(a) = args.http_addr {
        config.server.http_addr = Some(a);
    } else if config.server.http_unix_socket {
        let socket = tie_client::endpoint::socket_path(
            config.server.socket_dir.as_deref(),
            &format!("{}.http", config.server.endpoint),
        )?;
        anyhow::bail!(
            "the server serves HTTP on the Unix socket {} (server.http_unix_socket = true), which this command cannot reach: POST with curl --unix-socket {} http://tie/api/v1/internal/inference/{path}",
            socket.display(),
            socket.display()
        );
    }
    let url = format!(
        "http://{}/api/v1/internal/inference/{path}",
        config.http_addr()
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        // Loading and warming up a model takes a while.
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into();
    let mut request = agent.post(&url);
    if let Some(file) = &config.server.api_token_file {
        let token = std::fs::read_to_string(file)
            .with_context(|| format!("server.api_token_file {}", file.display()))?;
        request = request.header("Authorization", &format!("Bearer {}", token.trim()));
    }
    let mut response = request
        .send_empty()
        .with_context(|| format!("cannot reach the server's control plane at {url}"))?;
    let code = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .context("reading the control plane's answer")?;
    if code == 200 {
        println!("{body}");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("refused ({code}): {body}");
        Ok(ExitCode::FAILURE)
    }
}
