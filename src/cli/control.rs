//! `tie reload` and `tie unload`: requests to a running server's control plane.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use tie::config::ServiceConfig;

/// How to reach a running server's control plane.
#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    /// The server's config (TOML): its `server.http_addr` and `server.api_token_file`.
    #[arg(long, env = "TIE_CONFIG")]
    pub config: Option<PathBuf>,
    /// The control plane's address (overrides the config's).
    #[arg(long, env = "TIE_HTTP_ADDR")]
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
/// is printed and fails the command. With `server.http_unix_socket` (and no `--http-addr`) it
/// goes over the server's HTTP socket, checked like a ring client checks its server.
pub(super) fn control(args: &ControlArgs, path: &str) -> anyhow::Result<ExitCode> {
    let mut config = ServiceConfig::load(args.config.as_deref())?;
    let token = tie::http::read_api_token(&config).context("cannot read the API token")?;
    let (code, body) = if let Some(a) = args.http_addr {
        config.server.http_addr = Some(a);
        post_tcp(&config, path, token.as_deref())?
    } else if config.server.http_unix_socket {
        let socket = tie_client::endpoint::client_socket_path(
            config.server.socket_dir.as_deref(),
            &format!("{}.http", config.server.endpoint),
        )?;
        post_unix(&socket, path, token.as_deref())?
    } else {
        post_tcp(&config, path, token.as_deref())?
    };
    if code == 200 {
        println!("{body}");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("refused ({code}): {body}");
        Ok(ExitCode::FAILURE)
    }
}

/// POSTs over TCP to `server.http_addr`; the status and body.
fn post_tcp(
    config: &ServiceConfig,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, String)> {
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
    if let Some(t) = token {
        request = request.header("Authorization", &format!("Bearer {t}"));
    }
    let mut response = request
        .send_empty()
        .with_context(|| format!("cannot reach the server's control plane at {url}"))?;
    let code = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .context("reading the control plane's answer")?;
    Ok((code, body))
}

/// POSTs over the server's HTTP Unix socket, after checking that the process listening there
/// runs as this user, root, or `$TIE_SERVER_UID` (the token goes to no one else); the status
/// and body.
fn post_unix(socket: &Path, path: &str, token: Option<&str>) -> anyhow::Result<(u16, String)> {
    use http_body_util::BodyExt;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let reach = || {
            format!(
                "cannot reach the server's control plane at {}",
                socket.display()
            )
        };
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .with_context(reach)?;
        // The token goes to no one this command does not trust, as a ring client would.
        let server_uid = stream.peer_cred().with_context(reach)?.uid();
        let trusted = tie_client::endpoint::trusted_server_uid(None).map_err(anyhow::Error::msg)?;
        tie_client::endpoint::check_server_uid(socket, server_uid, trusted)?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .with_context(reach)?;
        tokio::spawn(connection);
        let mut request = hyper::Request::post(format!("/api/v1/internal/inference/{path}"))
            .header(hyper::header::HOST, "tie");
        if let Some(t) = token {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let request = request.body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let response = tokio::time::timeout(Duration::from_secs(600), sender.send_request(request))
            .await
            .context("no answer from the control plane within 600 s")?
            .with_context(reach)?;
        let code = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .context("reading the control plane's answer")?
            .to_bytes();
        Ok((code, String::from_utf8_lossy(&body).into_owned()))
    })
}
