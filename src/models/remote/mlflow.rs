//! MLflow's Model Registry, through its REST API: registered models by alias
//! (`name@champion`), by version (`name/3`) or the highest version (`name`, `name@latest`),
//! their artifacts downloaded through the tracking server's artifact proxy
//! (`mlflow-artifacts:`) or straight from object storage (`s3://…` and the other
//! `object_store` schemes).
//!
//! The convention for what tie serves of a version's artifacts (its download URI, as
//! `model-versions/get-download-uri` gives it): one model file, `model.onnx` (what
//! `mlflow.onnx.log_model` writes), `model.txt` (LightGBM's text model) or `model.json`
//! (XGBoost's JSON model), at the top of the artifacts or in one directory below; a
//! `model.onnx.sha256` (`sha256sum`'s format) beside it is checked; a `config.toml` beside it
//! is the model's config when the local repository has none for it.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::cache::{ArtifactCache, Sink};
use super::store::{digest_of, download, list, open_store, read_small};
use super::RemoteError;
use crate::models::repository::MODEL_FILES;

/// Which version of a registered model an entry asks for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ask {
    /// The version an alias names (`name@champion`).
    Alias(String),
    /// A version number (`name/3`).
    Version(u32),
    /// The highest version number (`name` or `name@latest`).
    Latest,
}

impl std::fmt::Display for Ask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ask::Alias(a) => write!(f, "@{a}"),
            Ask::Version(v) => write!(f, "/{v}"),
            Ask::Latest => write!(f, "@latest"),
        }
    }
}

/// One entry of `[registry] models`: a registered model's name and the version asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The registered model's name (also the name tie serves it under).
    pub name: String,
    /// Which version.
    pub ask: Ask,
}

impl std::str::FromStr for Entry {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, ask) = if let Some((name, alias)) = s.split_once('@') {
            let ask = match alias {
                "latest" => Ask::Latest,
                "" => return Err(format!("{s:?}: an empty alias")),
                a => Ask::Alias(a.to_string()),
            };
            (name, ask)
        } else if let Some((name, v)) = s.rsplit_once('/') {
            let v = crate::models::repository::version_number(v)
                .map_err(|why| format!("{s:?}: {why}"))?;
            (name, Ask::Version(v))
        } else {
            (s, Ask::Latest)
        };
        if name.is_empty()
            || name.starts_with('.')
            || name.contains(['/', '\\', '\0', ':'])
            || name.len() >= tie_layouts::hello::MODEL_NAME_LEN
        {
            return Err(format!(
                "{s:?}: a registered model's name must be 1 to {} bytes without /, \\ or : (tie serves it under that name)",
                tie_layouts::hello::MODEL_NAME_LEN - 1
            ));
        }
        Ok(Entry {
            name: name.to_string(),
            ask,
        })
    }
}

/// A version's files as the registry holds them: the model file (its name in tie's
/// layout), its digest when given, and the `config.toml` beside it.
pub struct VersionFiles {
    /// Its name in the mirror (one of [`MODEL_FILES`]).
    pub file_name: &'static str,
    /// Its blob in the cache.
    pub sha256: String,
    /// `config.toml` beside the model file, if any.
    pub config: Option<Vec<u8>>,
}

/// The registry's client.
pub struct Mlflow {
    uri: String,
    token: Option<String>,
    agent: ureq::Agent,
    /// Options for artifact stores the registry points at (`[object_store]`).
    store_options: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct VersionReply {
    model_version: VersionInfo,
}

#[derive(Deserialize)]
struct VersionInfo {
    version: String,
}

#[derive(Deserialize)]
struct SearchReply {
    #[serde(default)]
    model_versions: Vec<VersionInfo>,
    next_page_token: Option<String>,
}

#[derive(Deserialize)]
struct DownloadUri {
    artifact_uri: String,
}

#[derive(Deserialize)]
struct Listing {
    #[serde(default)]
    files: Vec<Listed>,
}

#[derive(Deserialize)]
struct Listed {
    path: String,
    #[serde(default)]
    is_dir: bool,
    file_size: Option<serde_json::Value>,
}

/// Where a version's artifacts are.
enum Artifacts {
    /// The tracking server's artifact proxy: a path under
    /// `/api/2.0/mlflow-artifacts/artifacts/`.
    Proxy(String),
    /// An object store URL.
    Store(String),
}

/// One file of a version's artifacts: its path below the artifacts and its size.
struct ArtifactFile {
    path: String,
    size: Option<u64>,
}

impl Mlflow {
    /// A client of the tracking server at `uri`, with `token` (a bearer token) when given.
    pub fn new(
        uri: &str,
        token: Option<String>,
        timeout: Duration,
        store_options: BTreeMap<String, String>,
    ) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_connect(Some(timeout))
            .timeout_recv_response(Some(timeout))
            // A whole download: a stalled one fails rather than hangs (ureq has no limit on a
            // stall alone), and a model file may take a while.
            .timeout_recv_body(Some(timeout * 120))
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            uri: uri.trim_end_matches('/').to_string(),
            token,
            agent,
            store_options,
        }
    }

    /// The tracking server's URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// GETs `path` with `query`: the response, or why not (unreachable, or the server's
    /// error).
    fn get(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<ureq::http::Response<ureq::Body>, RemoteError> {
        let mut request = self.agent.get(format!("{}{path}", self.uri));
        for (k, v) in query {
            request = request.query(*k, *v);
        }
        if let Some(t) = &self.token {
            request = request.header("Authorization", format!("Bearer {t}"));
        }
        let mut response = request
            .call()
            .map_err(|e| RemoteError::Unreachable(format!("MLflow at {}: {e}", self.uri)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text: String = response
            .body_mut()
            .read_to_string()
            .unwrap_or_default()
            .chars()
            .take(500)
            .collect();
        let what = format!(
            "MLflow at {}: {path}: HTTP {}: {}",
            self.uri,
            status.as_u16(),
            text.trim()
        );
        Err(if status.is_server_error() {
            RemoteError::Unreachable(what)
        } else {
            RemoteError::Registry(what)
        })
    }

    fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<T, RemoteError> {
        let mut response = self.get(path, query)?;
        let bytes = response.body_mut().read_to_vec().map_err(|e| {
            RemoteError::Unreachable(format!("MLflow at {}: {path}: {e}", self.uri))
        })?;
        serde_json::from_slice(&bytes).map_err(|e| {
            RemoteError::Registry(format!(
                "MLflow at {}: {path}: an answer tie does not understand: {e}",
                self.uri
            ))
        })
    }

    /// The version number `ask` names of registered model `name` now.
    ///
    /// # Errors
    /// [`RemoteError::Unreachable`], or [`RemoteError::Registry`] (no such model or alias).
    pub fn resolve(&self, name: &str, ask: &Ask) -> Result<u32, RemoteError> {
        let number = |v: &str| {
            v.parse::<u32>().map_err(|_| {
                RemoteError::Registry(format!("MLflow: {name}: version {v:?} is not a number"))
            })
        };
        match ask {
            Ask::Version(v) => Ok(*v),
            Ask::Alias(alias) => {
                let reply: VersionReply = self.get_json(
                    "/api/2.0/mlflow/registered-models/alias",
                    &[("name", name), ("alias", alias)],
                )?;
                number(&reply.model_version.version)
            }
            Ask::Latest => {
                let filter = format!("name='{}'", name.replace('\'', "\\'"));
                let mut highest = None;
                let mut token: Option<String> = None;
                // At most 100 pages of 1,000 versions (a registry that keeps answering with a
                // page token is not followed for ever).
                for _ in 0..100 {
                    let mut query = vec![("filter", filter.as_str()), ("max_results", "1000")];
                    if let Some(t) = &token {
                        query.push(("page_token", t.as_str()));
                    }
                    let reply: SearchReply =
                        self.get_json("/api/2.0/mlflow/model-versions/search", &query)?;
                    for v in &reply.model_versions {
                        let n = number(&v.version)?;
                        highest = highest.max(Some(n));
                    }
                    match reply.next_page_token.filter(|t| !t.is_empty()) {
                        Some(t) => token = Some(t),
                        None => break,
                    }
                }
                highest.ok_or_else(|| {
                    RemoteError::Registry(format!("MLflow: registered model {name} has no version"))
                })
            }
        }
    }

    fn artifacts(&self, name: &str, version: u32) -> Result<Artifacts, RemoteError> {
        let v = version.to_string();
        let reply: DownloadUri = self.get_json(
            "/api/2.0/mlflow/model-versions/get-download-uri",
            &[("name", name), ("version", &v)],
        )?;
        let uri = reply.artifact_uri;
        if let Some(rest) = uri.strip_prefix("mlflow-artifacts:") {
            // `mlflow-artifacts:/path` or `mlflow-artifacts://host:port/path`: through the
            // tracking server tie talks to.
            let path = match rest.strip_prefix("//") {
                Some(hosted) => hosted.split_once('/').map_or("", |(_, p)| p),
                None => rest,
            };
            Ok(Artifacts::Proxy(path.trim_matches('/').to_string()))
        } else if super::store::is_store_url(&uri) {
            Ok(Artifacts::Store(uri))
        } else {
            Err(RemoteError::Registry(format!(
                "MLflow: {name}/{version}: artifacts at {uri:?}, which tie cannot read (it reads the tracking server's artifact proxy, mlflow-artifacts:, and object stores: run mlflow server with --serve-artifacts, or an s3:// artifact root)"
            )))
        }
    }

    /// The files under `dir` of the proxy (one level).
    fn proxy_list(&self, dir: &str) -> Result<Vec<(ArtifactFile, bool)>, RemoteError> {
        let listing: Listing =
            self.get_json("/api/2.0/mlflow-artifacts/artifacts", &[("path", dir)])?;
        Ok(listing
            .files
            .into_iter()
            .map(|f| {
                let size = f.file_size.and_then(|s| match s {
                    serde_json::Value::Number(n) => n.as_u64(),
                    serde_json::Value::String(s) => s.parse().ok(),
                    _ => None,
                });
                (
                    ArtifactFile {
                        path: f.path.rsplit('/').next().unwrap_or_default().to_string(),
                        size,
                    },
                    f.is_dir,
                )
            })
            .collect())
    }

    /// Downloads version `version` of `name` into `cache` (unless there already) by the
    /// convention in the module's docs.
    ///
    /// # Errors
    /// [`RemoteError`]: unreachable, no model file, a digest mismatch.
    pub fn fetch(
        &self,
        name: &str,
        version: u32,
        cache: &ArtifactCache,
    ) -> Result<VersionFiles, RemoteError> {
        let what = format!("{name}:{version}");
        let artifacts = self.artifacts(name, version)?;
        // A registered version's artifacts do not change; a model deleted and registered
        // again numbers its versions from 1 again, with artifacts elsewhere.
        let at = match &artifacts {
            Artifacts::Proxy(dir) => format!("mlflow-artifacts:/{dir}"),
            Artifacts::Store(url) => url.clone(),
        };
        let key = |file: &str| format!("mlflow:{}/{name}/{version}@{at}/{file}", self.uri);
        match artifacts {
            Artifacts::Proxy(dir) => {
                let (dir, files) = self.proxy_model_dir(&dir, &what)?;
                let small = |file: &str| -> Result<Option<Vec<u8>>, RemoteError> {
                    if !files.iter().any(|f| f.path == file) {
                        return Ok(None);
                    }
                    let mut r = self.get(&proxy_path(&dir, file), &[])?;
                    r.body_mut()
                        .with_config()
                        .limit(1 << 20)
                        .read_to_vec()
                        .map(Some)
                        .map_err(|e| {
                            RemoteError::Unreachable(format!("MLflow: {what}: {file}: {e}"))
                        })
                };
                let fetch = |file: &str, sink: &mut Sink<'_>| {
                    let mut r = self
                        .get(&proxy_path(&dir, file), &[])
                        .map_err(|e| e.to_string())?;
                    std::io::copy(&mut r.body_mut().as_reader(), sink)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                };
                let got = Got {
                    what: &what,
                    key: &key,
                    files: &files,
                    source: &self.uri,
                };
                got.fetch_into(cache, small, fetch)
            }
            Artifacts::Store(url) => {
                let (store, prefix) = open_store(&url, &self.store_options)?;
                let rt = super::store::runtime()?;
                let unreachable = |e: String| RemoteError::Unreachable(format!("{url}: {e}"));
                let objects = list(&rt, store.as_ref(), &prefix).map_err(unreachable)?;
                let skip = prefix.parts().count();
                let files: Vec<(Vec<String>, &object_store::ObjectMeta)> = objects
                    .iter()
                    .map(|m| {
                        (
                            m.location
                                .parts()
                                .skip(skip)
                                .map(|p| p.as_ref().to_string())
                                .collect(),
                            m,
                        )
                    })
                    .collect();
                // The model file at the top, else in one directory below (the first such
                // directory); the files beside it.
                let dir_parts: Vec<String> = (1..=2)
                    .find_map(|d| {
                        files
                            .iter()
                            .find(|(p, _)| p.len() == d && MODEL_FILES.contains(&p[d - 1].as_str()))
                    })
                    .map(|(p, _)| p[..p.len() - 1].to_vec())
                    .ok_or_else(|| no_model_file(&what, &url))?;
                let at: Vec<ArtifactFile> = files
                    .iter()
                    .filter(|(p, _)| {
                        p.len() == dir_parts.len() + 1 && p[..dir_parts.len()] == dir_parts[..]
                    })
                    .map(|(p, m)| ArtifactFile {
                        path: p[dir_parts.len()].clone(),
                        size: Some(m.size),
                    })
                    .collect();
                let location = |file: &str| {
                    let mut path = prefix.clone();
                    for part in dir_parts.iter().map(String::as_str).chain([file]) {
                        path = path.join(part);
                    }
                    path
                };
                let small = |file: &str| -> Result<Option<Vec<u8>>, RemoteError> {
                    if !at.iter().any(|f| f.path == file) {
                        return Ok(None);
                    }
                    read_small(&rt, store.as_ref(), &location(file))
                        .map(Some)
                        .map_err(unreachable)
                };
                let fetch = |file: &str, sink: &mut Sink<'_>| {
                    download(&rt, store.as_ref(), &location(file), sink)
                };
                let got = Got {
                    what: &what,
                    key: &key,
                    files: &at,
                    source: &url,
                };
                got.fetch_into(cache, small, fetch)
            }
        }
    }

    /// The proxy directory holding the model file (the artifacts' top, else one directory
    /// below), with its files.
    fn proxy_model_dir(
        &self,
        dir: &str,
        what: &str,
    ) -> Result<(String, Vec<ArtifactFile>), RemoteError> {
        let top = self.proxy_list(dir)?;
        let has_model = |files: &[(ArtifactFile, bool)]| {
            files
                .iter()
                .any(|(f, d)| !d && MODEL_FILES.contains(&f.path.as_str()))
        };
        if has_model(&top) {
            return Ok((dir.to_string(), top.into_iter().map(|(f, _)| f).collect()));
        }
        for (sub, _) in top.iter().filter(|(_, d)| *d) {
            let inner_dir = format!("{dir}/{}", sub.path);
            let inner = self.proxy_list(&inner_dir)?;
            if has_model(&inner) {
                return Ok((inner_dir, inner.into_iter().map(|(f, _)| f).collect()));
            }
        }
        Err(no_model_file(what, &format!("mlflow-artifacts:/{dir}")))
    }
}

/// A version's artifact directory, listed: what [`Got::fetch_into`] needs.
struct Got<'a> {
    /// `name:version`.
    what: &'a str,
    /// The cache key of a file.
    key: &'a dyn Fn(&str) -> String,
    /// The directory's files.
    files: &'a [ArtifactFile],
    /// Where they are, for errors.
    source: &'a str,
}

impl Got<'_> {
    /// The model file downloaded into `cache` (unless there), checked against the digest file
    /// beside it; with the `config.toml` beside it. `small` reads a small file of the
    /// directory (`None`: not there); `fetch` writes a file into a sink.
    fn fetch_into(
        &self,
        cache: &ArtifactCache,
        small: impl Fn(&str) -> Result<Option<Vec<u8>>, RemoteError>,
        fetch: impl Fn(&str, &mut Sink<'_>) -> Result<(), String>,
    ) -> Result<VersionFiles, RemoteError> {
        let what = self.what;
        let (file_name, size) = model_file(self.files, what)?;
        let expected = small(&format!("{file_name}.sha256"))?
            .map(|b| {
                digest_of(&b).ok_or_else(|| {
                    RemoteError::Artifact(format!(
                        "MLflow: {what}: {file_name}.sha256 is not a SHA-256 digest file"
                    ))
                })
            })
            .transpose()?;
        let config = small("config.toml")?;
        let sha = cache
            .fetch(
                &(self.key)(file_name),
                what,
                size,
                expected.as_deref(),
                |sink| fetch(file_name, sink),
            )
            .map_err(|e| RemoteError::from_cache(e, self.source))?;
        Ok(VersionFiles {
            file_name,
            sha256: sha,
            config,
        })
    }
}

/// The URL path of `file` in proxy directory `dir`.
fn proxy_path(dir: &str, file: &str) -> String {
    format!("/api/2.0/mlflow-artifacts/artifacts/{dir}/{file}")
}

fn no_model_file(what: &str, at: &str) -> RemoteError {
    RemoteError::Artifact(format!(
        "MLflow: {what}: no model file in its artifacts at {at} (tie serves model.onnx, as mlflow.onnx.log_model writes it, or a model.txt / model.json logged as an artifact, at the top or one directory below)"
    ))
}

/// The one model file among `files`, with its size.
fn model_file(
    files: &[ArtifactFile],
    what: &str,
) -> Result<(&'static str, Option<u64>), RemoteError> {
    let found: Vec<(&'static str, Option<u64>)> = MODEL_FILES
        .iter()
        .filter_map(|m| files.iter().find(|f| f.path == *m).map(|f| (*m, f.size)))
        .collect();
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(no_model_file(what, "the registry")),
        _ => Err(RemoteError::Artifact(format!(
            "MLflow: {what}: more than one model file in its artifacts (one of model.onnx, model.txt, model.json)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_name_an_alias_a_version_or_the_latest() {
        let e: Entry = "fraud@champion".parse().unwrap();
        assert_eq!(e.name, "fraud");
        assert_eq!(e.ask, Ask::Alias("champion".into()));
        assert_eq!("fraud/3".parse::<Entry>().unwrap().ask, Ask::Version(3));
        assert_eq!("fraud".parse::<Entry>().unwrap().ask, Ask::Latest);
        assert_eq!("fraud@latest".parse::<Entry>().unwrap().ask, Ask::Latest);
        for bad in [
            "fraud/0", "fraud/03", "@x", "fraud@", "a/b/3", ".x", "x:y/1",
        ] {
            assert!(bad.parse::<Entry>().is_err(), "{bad}");
        }
    }
}
