//! Where a server's socket lives, derived from its endpoint name.

use std::path::{Path, PathBuf};

/// Directory of endpoint sockets when neither the caller nor `TIE_SOCKET_DIR` names one.
pub const DEFAULT_SOCKET_DIR: &str = "/tmp/tie";

/// Why an endpoint name is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid endpoint name {name:?}: use 1 to 64 of A-Z a-z 0-9 . _ -, not starting with '.'")]
pub struct EndpointNameError {
    /// The name given.
    pub name: String,
}

/// The socket directory: `dir` if given, else `$TIE_SOCKET_DIR`, else [`DEFAULT_SOCKET_DIR`].
pub fn socket_dir(dir: Option<&Path>) -> PathBuf {
    match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::var_os("TIE_SOCKET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_DIR)),
    }
}

/// The socket path of endpoint `name` in [`socket_dir`]`(dir)`.
///
/// # Errors
/// [`EndpointNameError`] when the name is empty, longer than 64 bytes, starts with `.` or holds
/// a character other than ASCII letters, digits, `.`, `_` and `-`.
pub fn socket_path(dir: Option<&Path>, name: &str) -> Result<PathBuf, EndpointNameError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !valid {
        return Err(EndpointNameError { name: name.into() });
    }
    Ok(socket_dir(dir).join(format!("{name}.sock")))
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
        }
    }
}
