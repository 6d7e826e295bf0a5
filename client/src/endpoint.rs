//! Where a server's socket lives, derived from its endpoint name, and which server a client
//! trusts.

use std::path::{Path, PathBuf};

/// Socket directory of a system server (systemd's `RuntimeDirectory=tie`), and of any server
/// when `$XDG_RUNTIME_DIR` is unset.
pub const SYSTEM_SOCKET_DIR: &str = "/run/tie";

/// Environment variable naming a uid a client trusts as its server besides its own and root.
pub const SERVER_UID_ENV: &str = "TIE_SERVER_UID";

/// Why an endpoint name is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid endpoint name {name:?}: use 1 to 64 of A-Z a-z 0-9 . _ -, not starting with '.'")]
pub struct EndpointNameError {
    /// The name given.
    pub name: String,
}

/// The directories where a socket is looked for, first match wins: `dir` if given, else
/// `$TIE_SOCKET_DIR` if set (only that one), else `$XDG_RUNTIME_DIR/tie` (when set) then
/// [`SYSTEM_SOCKET_DIR`].
pub fn socket_dirs(dir: Option<&Path>) -> Vec<PathBuf> {
    if let Some(d) = dir {
        return vec![d.to_path_buf()];
    }
    if let Some(d) = std::env::var_os("TIE_SOCKET_DIR").filter(|d| !d.is_empty()) {
        return vec![PathBuf::from(d)];
    }
    let mut dirs = Vec::with_capacity(2);
    if let Some(run) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        dirs.push(Path::new(&run).join("tie"));
    }
    dirs.push(PathBuf::from(SYSTEM_SOCKET_DIR));
    dirs
}

/// The socket directory a server uses: the first of [`socket_dirs`]`(dir)`.
pub fn socket_dir(dir: Option<&Path>) -> PathBuf {
    socket_dirs(dir).swap_remove(0)
}

fn check_name(name: &str) -> Result<(), EndpointNameError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(EndpointNameError { name: name.into() })
    }
}

/// The socket path a server binds for endpoint `name`: in [`socket_dir`]`(dir)`.
///
/// # Errors
/// [`EndpointNameError`] when the name is empty, longer than 64 bytes, starts with `.` or holds
/// a character other than ASCII letters, digits, `.`, `_` and `-`.
pub fn socket_path(dir: Option<&Path>, name: &str) -> Result<PathBuf, EndpointNameError> {
    check_name(name)?;
    Ok(socket_dir(dir).join(format!("{name}.sock")))
}

/// The socket path a client connects to for endpoint `name`: the first of
/// [`socket_dirs`]`(dir)` that holds the socket, else the first of them.
///
/// # Errors
/// As [`socket_path`].
pub fn client_socket_path(dir: Option<&Path>, name: &str) -> Result<PathBuf, EndpointNameError> {
    check_name(name)?;
    let file = format!("{name}.sock");
    let dirs = socket_dirs(dir);
    Ok(dirs
        .iter()
        .map(|d| d.join(&file))
        .find(|p| p.symlink_metadata().is_ok())
        .unwrap_or_else(|| dirs[0].join(&file)))
}

/// The uid a client trusts as its server besides its own and root's: `uid` if given, else
/// `$TIE_SERVER_UID`.
///
/// # Errors
/// `$TIE_SERVER_UID` is set but is not a uid.
pub fn trusted_server_uid(uid: Option<u32>) -> Result<Option<u32>, String> {
    if uid.is_some() {
        return Ok(uid);
    }
    match std::env::var(SERVER_UID_ENV) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{SERVER_UID_ENV}={v:?} is not a uid (a decimal number)")),
        _ => Ok(None),
    }
}

/// Whether a server running as `server_uid` may be talked to: this process's effective uid,
/// root, or `trusted` (see [`trusted_server_uid`]).
///
/// # Errors
/// [`crate::ConnectError::UntrustedServer`] naming both uids and `path`.
pub fn check_server_uid(
    path: &Path,
    server_uid: u32,
    trusted: Option<u32>,
) -> Result<(), crate::ConnectError> {
    let own_uid = rustix::process::geteuid().as_raw();
    if server_uid == own_uid || server_uid == 0 || Some(server_uid) == trusted {
        return Ok(());
    }
    Err(crate::ConnectError::UntrustedServer {
        path: path.to_path_buf(),
        server_uid,
        own_uid,
        trusted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        let dir = Path::new("/x");
        assert_eq!(
            socket_path(Some(dir), "tie-1.a_b").unwrap(),
            Path::new("/x/tie-1.a_b.sock")
        );
        for bad in ["", "../etc", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(socket_path(Some(dir), bad).is_err(), "{bad:?}");
            assert!(client_socket_path(Some(dir), bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_given_directory_is_the_only_one() {
        assert_eq!(
            socket_dirs(Some(Path::new("/x"))),
            vec![PathBuf::from("/x")]
        );
        assert_eq!(
            client_socket_path(Some(Path::new("/x")), "e").unwrap(),
            Path::new("/x/e.sock")
        );
    }
}
