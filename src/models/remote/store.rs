//! A model repository in object storage (`s3://bucket/prefix`, `gs://…`, `az://…`, through
//! the `object_store` crate), laid out as a local one: `<name>/<version>/model.onnx` (or
//! `model.txt`, `model.json`), optional `<name>/<version>/model.onnx.sha256`,
//! `<name>/config.toml` and `routing.toml`.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use futures::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};

use super::cache::ArtifactCache;
use super::mirror::{Wanted, WantedFile};
use super::RemoteError;
use crate::models::repository::{version_number, MODEL_FILES};

/// Files this large or smaller (configs, digests, routing) are read whole on every sync.
const SMALL: u64 = 1 << 20;

/// The option keys `scheme`'s builder knows (`endpoint`, `region`, `allow_http`, …), checked
/// so that a misspelt key is an error rather than ignored.
fn known_key(scheme: &str, key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    match scheme {
        "s3" | "s3a" => key.parse::<object_store::aws::AmazonS3ConfigKey>().is_ok(),
        "gs" => key.parse::<object_store::gcp::GoogleConfigKey>().is_ok(),
        "az" | "adl" | "azure" | "abfs" | "abfss" => {
            key.parse::<object_store::azure::AzureConfigKey>().is_ok()
        }
        _ => false,
    }
}

/// Whether `repository` names an object store rather than a local directory.
pub fn is_store_url(repository: &str) -> bool {
    [
        "s3://", "s3a://", "gs://", "az://", "adl://", "azure://", "abfs://", "abfss://",
    ]
    .iter()
    .any(|s| repository.starts_with(s))
}

/// A repository in an object store.
pub struct StoreRepository {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: StorePath,
    rt: tokio::runtime::Runtime,
}

/// How long the client retries a request that failed (a store that is down fails a sync
/// within about this, rather than the client's default of minutes).
const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens the store `url` names, with the standard credential chain (the scheme's variables,
/// `AWS_*`, `GOOGLE_*`, `AZURE_*`, then the builder's own chain: instance metadata, web
/// identity…) and `options` over it.
///
/// # Errors
/// [`RemoteError::Config`]: an unknown scheme or option, a malformed URL.
pub fn open_store(
    url: &str,
    options: &BTreeMap<String, String>,
) -> Result<(Arc<dyn ObjectStore>, StorePath), RemoteError> {
    use object_store::{ObjectStoreScheme, RetryConfig};
    let parsed = url::Url::parse(url)
        .map_err(|e| RemoteError::Config(format!("object store URL {url:?}: {e}")))?;
    let scheme = parsed.scheme().to_string();
    for key in options.keys() {
        if !known_key(&scheme, key) {
            return Err(RemoteError::Config(format!(
                "[object_store] {key}: not an option of {scheme}:// stores (see the object_store crate's configuration keys: endpoint, region, allow_http, …)"
            )));
        }
    }
    let env_prefix = match scheme.as_str() {
        "s3" | "s3a" => "AWS_",
        "gs" => "GOOGLE_",
        _ => "AZURE_",
    };
    let mut all: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with(env_prefix))
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .filter(|(k, _)| known_key(&scheme, k))
        .collect();
    all.extend(
        options
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone())),
    );
    let retry = RetryConfig {
        max_retries: 3,
        retry_timeout: RETRY_FOR,
        ..RetryConfig::default()
    };
    // A model file may take minutes to arrive: no limit on a whole request, only on a stall
    // (the options of the config, `timeout` and the like, still apply over these).
    let client = object_store::ClientOptions::new()
        .with_timeout_disabled()
        .with_connect_timeout(std::time::Duration::from_secs(5))
        .with_read_timeout(std::time::Duration::from_secs(30));
    let bad = |e: object_store::Error| RemoteError::Config(format!("object store {url}: {e}"));
    let (kind, path) = ObjectStoreScheme::parse(&parsed)
        .map_err(|e| RemoteError::Config(format!("object store {url}: {e}")))?;
    let store: Arc<dyn ObjectStore> = match kind {
        ObjectStoreScheme::AmazonS3 => {
            let mut b = object_store::aws::AmazonS3Builder::new()
                .with_url(url)
                .with_client_options(client.clone());
            for (k, v) in all {
                b = b.with_config(k.parse().map_err(&bad)?, v);
            }
            Arc::new(b.with_retry(retry).build().map_err(&bad)?)
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            let mut b = object_store::gcp::GoogleCloudStorageBuilder::new()
                .with_url(url)
                .with_client_options(client.clone());
            for (k, v) in all {
                b = b.with_config(k.parse().map_err(&bad)?, v);
            }
            Arc::new(b.with_retry(retry).build().map_err(&bad)?)
        }
        ObjectStoreScheme::MicrosoftAzure => {
            let mut b = object_store::azure::MicrosoftAzureBuilder::new()
                .with_url(url)
                .with_client_options(client.clone());
            for (k, v) in all {
                b = b.with_config(k.parse().map_err(&bad)?, v);
            }
            Arc::new(b.with_retry(retry).build().map_err(&bad)?)
        }
        other => {
            return Err(RemoteError::Config(format!(
                "{url}: a {other:?} store cannot hold a model repository (s3://, gs://, az://)"
            )))
        }
    };
    Ok((store, path))
}

/// A runtime for the object store's client, driven from the calling thread.
pub fn runtime() -> Result<tokio::runtime::Runtime, RemoteError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RemoteError::Config(format!("cannot start the object store client: {e}")))
}

/// Writes object `path` of `store` into `out`, chunk by chunk (the caller is outside any
/// runtime: `rt` drives the download).
pub fn download(
    rt: &tokio::runtime::Runtime,
    store: &dyn ObjectStore,
    path: &StorePath,
    out: &mut dyn Write,
) -> Result<(), String> {
    rt.block_on(async {
        let got = store.get(path).await.map_err(|e| e.to_string())?;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            out.write_all(&chunk).map_err(|e| e.to_string())?;
        }
        Ok(())
    })
}

/// A small object's bytes.
pub fn read_small(
    rt: &tokio::runtime::Runtime,
    store: &dyn ObjectStore,
    path: &StorePath,
) -> Result<Vec<u8>, String> {
    rt.block_on(async {
        let got = store.get(path).await.map_err(|e| e.to_string())?;
        if got.meta.size > SMALL {
            return Err(format!(
                "{path}: {} bytes, more than a config",
                got.meta.size
            ));
        }
        Ok(got.bytes().await.map_err(|e| e.to_string())?.to_vec())
    })
}

/// Every object under `prefix`.
pub fn list(
    rt: &tokio::runtime::Runtime,
    store: &dyn ObjectStore,
    prefix: &StorePath,
) -> Result<Vec<object_store::ObjectMeta>, String> {
    rt.block_on(async {
        let mut objects = Vec::new();
        let mut listing = store.list(Some(prefix));
        while let Some(meta) = listing.next().await {
            objects.push(meta.map_err(|e| e.to_string())?);
        }
        Ok(objects)
    })
}

/// A digest file's digest (`sha256sum`'s format: the hex digest, then maybe the file name).
pub fn digest_of(text: &[u8]) -> Option<String> {
    let first = String::from_utf8_lossy(text)
        .split_whitespace()
        .next()?
        .to_ascii_lowercase();
    (first.len() == 64 && first.bytes().all(|b| b.is_ascii_hexdigit())).then_some(first)
}

impl StoreRepository {
    /// The repository at `url`.
    ///
    /// # Errors
    /// See [`open_store`].
    pub fn open(url: &str, options: &BTreeMap<String, String>) -> Result<Self, RemoteError> {
        let (store, prefix) = open_store(url, options)?;
        Ok(Self {
            url: url.trim_end_matches('/').to_string(),
            store,
            prefix,
            rt: runtime()?,
        })
    }

    /// The repository's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Lists the repository and fetches what is not in `cache`: what the mirror should hold.
    /// Entries that are not part of the layout are skipped (logged).
    ///
    /// # Errors
    /// [`RemoteError::Unreachable`] when the store cannot be listed or read;
    /// [`RemoteError::Artifact`] for a file that fails its digest.
    pub fn wanted(&self, cache: &ArtifactCache) -> Result<Wanted, RemoteError> {
        let unreachable = |e: String| RemoteError::Unreachable(format!("{}: {e}", self.url));
        let (rt, store) = (&self.rt, self.store.as_ref());
        let objects = list(rt, store, &self.prefix).map_err(unreachable)?;
        let relative = |p: &StorePath| -> Option<Vec<String>> {
            let parts: Vec<String> = p.parts().map(|s| s.as_ref().to_string()).collect();
            let skip = self.prefix.parts().count();
            (parts.len() > skip).then(|| parts[skip..].to_vec())
        };
        let mut wanted = Wanted::default();
        let mut digests: BTreeMap<(String, u32, String), String> = BTreeMap::new();
        let mut models = Vec::new();
        for meta in &objects {
            let Some(parts) = relative(&meta.location) else {
                continue;
            };
            let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
            match parts.as_slice() {
                ["routing.toml"] => {
                    wanted.routing =
                        Some(read_small(rt, store, &meta.location).map_err(unreachable)?);
                }
                [name, "config.toml"] if !name.starts_with('.') => {
                    let bytes = read_small(rt, store, &meta.location).map_err(unreachable)?;
                    wanted.models.entry(name.to_string()).or_default().config = Some(bytes);
                }
                [name, version, file] if !name.starts_with('.') => {
                    let Ok(v) = version_number(version) else {
                        tracing::warn!(object = %meta.location, "skipped: not a version directory (1, 2, …)");
                        continue;
                    };
                    if let Some(model_file) = file.strip_suffix(".sha256") {
                        let bytes = read_small(rt, store, &meta.location).map_err(unreachable)?;
                        let Some(d) = digest_of(&bytes) else {
                            return Err(RemoteError::Artifact(format!(
                                "{}/{}: not a SHA-256 digest file",
                                self.url,
                                parts.join("/")
                            )));
                        };
                        digests.insert((name.to_string(), v, model_file.to_string()), d);
                    } else if let Some(f) = MODEL_FILES.iter().find(|f| *f == file) {
                        models.push((name.to_string(), v, *f, meta));
                    } else {
                        tracing::warn!(object = %meta.location, "skipped: not a model file (model.onnx, model.txt, model.json)");
                    }
                }
                _ => {}
            }
        }
        for (name, v, file, meta) in models {
            let expected = digests.get(&(name.clone(), v, file.to_string()));
            // The object's identity: its path and its version at the store.
            let key = format!(
                "{}/{name}/{v}/{file}#{}",
                self.url,
                meta.e_tag
                    .clone()
                    .unwrap_or_else(|| format!("{}-{}", meta.size, meta.last_modified))
            );
            let what = format!("{name}:{v}");
            let sha = cache
                .fetch(
                    &key,
                    &what,
                    Some(meta.size),
                    expected.map(String::as_str),
                    |sink| download(rt, store, &meta.location, sink),
                )
                .map_err(|e| RemoteError::from_cache(e, &self.url))?;
            let model = wanted.models.entry(name.clone()).or_default();
            if model.versions.contains_key(&v) {
                return Err(RemoteError::Artifact(format!(
                    "{}/{name}/{v}: more than one model file in it (one of model.onnx, model.txt, model.json)",
                    self.url
                )));
            }
            model.versions.insert(
                v,
                WantedFile {
                    file_name: file,
                    sha256: sha,
                },
            );
        }
        // A directory with a config and no version is not a model.
        wanted.models.retain(|_, m| !m.versions.is_empty());
        Ok(wanted)
    }
}
