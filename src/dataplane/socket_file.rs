//! The endpoint's socket file and its directory, set up so that no other local user can
//! redirect them.
//!
//! - The directory must belong to the server's user and be writable by no one else (every
//!   directory above it: owned by root or that user, and writable by others only with the
//!   sticky bit); the server creates it 0700, or 0750 with group `server.allowed_gid`.
//! - The socket is bound in a private directory inside it, given its group and mode there, and
//!   linked into place: no owner or mode is ever changed through the public path, and a file an
//!   attacker names cannot be changed.
//! - The server remembers the socket's device and inode: shutdown removes that file only, and
//!   [`SocketFile::check`] notices when it is removed or replaced while serving.

use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::process::{Gid, Uid};

use super::ServerStartError;

/// The socket file a server bound, as it was bound.
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

/// What [`SocketFile::check`] finds at the socket's path.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SocketState {
    /// The file the server bound.
    Ours,
    /// Nothing: new clients cannot connect.
    Missing,
    /// Another file (another server, or a user's): new clients do not reach this server.
    Replaced,
}

impl SocketFile {
    /// The socket's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file at the path is still the one bound.
    pub(crate) fn check(&self) -> SocketState {
        match rustix::fs::lstat(&self.path) {
            Ok(st) if st.st_dev == self.dev && st.st_ino == self.ino => SocketState::Ours,
            Ok(_) => SocketState::Replaced,
            Err(_) => SocketState::Missing,
        }
    }

    /// Removes the socket file if it is still the one bound (another server's is left alone).
    pub(crate) fn remove(&self) {
        match self.check() {
            SocketState::Ours => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the socket file");
                }
            }
            SocketState::Missing => {}
            SocketState::Replaced => tracing::warn!(
                path = %self.path.display(),
                "the socket path holds another file now; left in place"
            ),
        }
    }
}

/// `path` made absolute against the working directory (whose ancestors are then checked too).
fn absolute(path: &Path) -> Result<PathBuf, ServerStartError> {
    std::path::absolute(path).map_err(|e| unsafe_dir(path, format!("cannot make it absolute: {e}")))
}

/// The directory above the socket is unsafe to use: the message says why and what to do.
fn unsafe_dir(dir: &Path, why: String) -> ServerStartError {
    ServerStartError::SocketDir {
        dir: dir.into(),
        reason: why,
    }
}

/// Checks the directories above `dir`: each is owned by root or this user, and writable by
/// no one else unless it has the sticky bit (as /tmp has); a symlink among them must belong
/// to root or this user.
fn check_ancestors(dir: &Path, euid: Uid) -> Result<(), ServerStartError> {
    let trusted = |uid: u32| uid == 0 || uid == euid.as_raw();
    for ancestor in dir.ancestors().skip(1) {
        if ancestor.as_os_str().is_empty() {
            continue;
        }
        let link = rustix::fs::lstat(ancestor)
            .map_err(|e| unsafe_dir(dir, format!("cannot inspect {}: {e}", ancestor.display())))?;
        if link.st_mode & 0o170000 == 0o120000 && !trusted(link.st_uid) {
            return Err(unsafe_dir(
                dir,
                format!(
                    "{} is a symlink owned by uid {}",
                    ancestor.display(),
                    link.st_uid
                ),
            ));
        }
        let st = rustix::fs::stat(ancestor)
            .map_err(|e| unsafe_dir(dir, format!("cannot inspect {}: {e}", ancestor.display())))?;
        let others_write = st.st_mode & 0o022 != 0 && st.st_mode & 0o1000 == 0;
        if !trusted(st.st_uid) || others_write {
            return Err(unsafe_dir(
                dir,
                format!(
                    "{} (uid {}, mode {:o}) can be changed by another user, who could replace the socket directory",
                    ancestor.display(),
                    st.st_uid,
                    st.st_mode & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

/// Opens the socket directory, creating it (0700, or 0750 with group `allowed_gid`) when
/// missing, and checks that only this user can change it.
///
/// # Errors
/// [`ServerStartError::SocketDir`] naming the directory and what is wrong with it.
pub(crate) fn open_socket_dir(
    dir: &Path,
    allowed_gid: Option<u32>,
) -> Result<OwnedFd, ServerStartError> {
    let euid = rustix::process::geteuid();
    let dir = &absolute(dir)?;
    if let Some(parent) = dir.parent() {
        if !parent.exists() {
            std::fs::create_dir_all(parent)
                .map_err(|e| unsafe_dir(dir, format!("cannot create {}: {e}", parent.display())))?;
        }
        // The path as given (its symlinks' owners), and where it really leads.
        check_ancestors(dir, euid)?;
        let real = std::fs::canonicalize(parent)
            .map_err(|e| unsafe_dir(dir, format!("cannot resolve {}: {e}", parent.display())))?;
        if real != parent {
            check_ancestors(&real.join(dir.file_name().unwrap_or_default()), euid)?;
        }
    }
    let created = match rustix::fs::mkdir(dir, Mode::from_raw_mode(0o700)) {
        Ok(()) => true,
        Err(rustix::io::Errno::EXIST) => false,
        Err(e) => {
            return Err(unsafe_dir(
                dir,
                format!("cannot create it: {e} (set server.socket_dir or TIE_SOCKET_DIR to a directory this user may create)"),
            ))
        }
    };
    let fd = rustix::fs::open(
        dir,
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => {
            unsafe_dir(dir, "it is a symlink or not a directory".into())
        }
        rustix::io::Errno::ACCESS | rustix::io::Errno::PERM => unsafe_dir(
            dir,
            "this user may not open it (another user's?): set server.socket_dir, --socket-dir or TIE_SOCKET_DIR to a directory of this user's".into(),
        ),
        e => unsafe_dir(dir, format!("cannot open it: {e}")),
    })?;
    let st = rustix::fs::fstat(&fd).map_err(|e| unsafe_dir(dir, format!("cannot stat it: {e}")))?;
    if st.st_uid != euid.as_raw() {
        return Err(unsafe_dir(
            dir,
            format!(
                "it belongs to uid {}, not to this server's uid {}: another user could replace the socket",
                st.st_uid,
                euid.as_raw()
            ),
        ));
    }
    if st.st_mode & 0o022 != 0 {
        return Err(unsafe_dir(
            dir,
            format!(
                "its mode {:o} lets other users write to it: make it 0700 (or 0750)",
                st.st_mode & 0o7777
            ),
        ));
    }
    if created {
        // Through the descriptor: nothing else can be reached this way.
        let (group, mode) = match allowed_gid {
            Some(g) => (Some(Gid::from_raw(g)), 0o750),
            None => (None, 0o700),
        };
        rustix::fs::fchown(&fd, None, group)
            .and_then(|()| rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)))
            .map_err(|e| unsafe_dir(dir, format!("cannot set its group and mode: {e}")))?;
    } else if allowed_gid.is_some_and(|g| st.st_gid != g || st.st_mode & 0o010 == 0) {
        tracing::warn!(
            dir = %dir.display(),
            allowed_gid = ?allowed_gid,
            gid = st.st_gid,
            mode = format!("{:o}", st.st_mode & 0o7777),
            "the socket directory is not searchable by server.allowed_gid: its members cannot reach the socket"
        );
    }
    Ok(fd)
}

/// Whether a server answers at the socket `path` (a connection it accepts and drops before a
/// hello is not logged).
pub(super) fn server_answers(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// Binds the endpoint's socket at `path` (its directory checked by [`open_socket_dir`]),
/// removing a stale one left by a server that is gone. The socket gets mode 0600, or 0660
/// with group `allowed_gid`, before it appears at `path`.
///
/// # Errors
/// [`ServerStartError::AlreadyRunning`] when a server answers there, else a
/// [`ServerStartError::Listen`] or [`ServerStartError::SocketDir`].
pub(crate) fn bind(
    path: &Path,
    allowed_gid: Option<u32>,
) -> Result<(UnixListener, SocketFile), ServerStartError> {
    let path = &absolute(path)?;
    let listen_err = |source| ServerStartError::Listen {
        path: path.into(),
        source,
    };
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(listen_err(std::io::ErrorKind::InvalidInput.into()));
    };
    let dir_fd = open_socket_dir(dir, allowed_gid)?;
    match rustix::fs::statat(&dir_fd, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => {
            if server_answers(path) {
                return Err(ServerStartError::AlreadyRunning { path: path.into() });
            }
            rustix::fs::unlinkat(&dir_fd, name, AtFlags::empty())
                .map_err(|e| listen_err(e.into()))?;
        }
        Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(listen_err(e.into())),
    }
    // A private directory of this server: nobody else can put anything in it.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // Short, so the path fits where the socket's own does (108 bytes).
    let private = format!(
        ".tb{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let make = || rustix::fs::mkdirat(&dir_fd, private.as_str(), Mode::from_raw_mode(0o700));
    match make() {
        Ok(()) => {}
        Err(rustix::io::Errno::EXIST) => {
            // Left by a process of the same pid that died binding (a container's pid 1).
            let _ =
                rustix::fs::unlinkat(&dir_fd, format!("{private}/s").as_str(), AtFlags::empty());
            let _ = rustix::fs::unlinkat(&dir_fd, private.as_str(), AtFlags::REMOVEDIR);
            make().map_err(|e| listen_err(e.into()))?;
        }
        Err(e) => return Err(listen_err(e.into())),
    }
    let bound = bind_in(&dir_fd, dir, &private, name.as_bytes(), allowed_gid);
    let _ = rustix::fs::unlinkat(&dir_fd, format!("{private}/s").as_str(), AtFlags::empty());
    let _ = rustix::fs::unlinkat(&dir_fd, private.as_str(), AtFlags::REMOVEDIR);
    let (listener, dev, ino) = bound.map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => ServerStartError::AlreadyRunning { path: path.into() },
        _ => listen_err(e),
    })?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    Ok((
        listener,
        SocketFile {
            path: path.into(),
            dev,
            ino,
        },
    ))
}

/// Binds `<dir>/<private>/s`, sets its group and mode there, and links it to `<dir>/<name>`
/// (failing with `AlreadyExists` if a file appeared there meanwhile).
fn bind_in(
    dir_fd: &OwnedFd,
    dir: &Path,
    private: &str,
    name: &[u8],
    allowed_gid: Option<u32>,
) -> std::io::Result<(UnixListener, u64, u64)> {
    let inner = format!("{private}/s");
    let listener = UnixListener::bind(dir.join(&inner))?;
    if let Some(g) = allowed_gid {
        rustix::fs::chownat(
            dir_fd,
            inner.as_str(),
            None,
            Some(Gid::from_raw(g)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
    }
    let mode = if allowed_gid.is_some() { 0o660 } else { 0o600 };
    // In the private directory the path cannot lead anywhere else.
    rustix::fs::chmodat(
        dir_fd,
        inner.as_str(),
        Mode::from_raw_mode(mode),
        AtFlags::empty(),
    )?;
    let st = rustix::fs::statat(dir_fd, inner.as_str(), AtFlags::SYMLINK_NOFOLLOW)?;
    rustix::fs::linkat(
        dir_fd,
        inner.as_str(),
        dir_fd,
        std::ffi::OsStr::from_bytes(name),
        AtFlags::empty(),
    )?;
    Ok((listener, st.st_dev, st.st_ino))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tie-socket-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    /// An attacker able to write to the socket directory (the directory check keeps them out;
    /// this is the second line) renames symlinks over the socket path while the server binds
    /// again and again: the file they point at never gets the socket's mode.
    #[test]
    fn a_symlink_swapped_over_the_socket_during_bind_never_has_its_target_changed() {
        let base = scratch("race");
        let dir = base.join("sock");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let victim = base.join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o604)).unwrap();
        let path = dir.join("e.sock");
        let stop = Arc::new(AtomicBool::new(false));
        let attacker = {
            let (stop, dir, victim, path) =
                (stop.clone(), dir.clone(), victim.clone(), path.clone());
            std::thread::spawn(move || {
                let mut swaps = 0u64;
                let link = dir.join("link");
                while !stop.load(Ordering::Relaxed) {
                    let _ = std::fs::remove_file(&link);
                    std::os::unix::fs::symlink(&victim, &link).unwrap();
                    // The moment a socket appears at the path, a symlink replaces it.
                    while !stop.load(Ordering::Relaxed) {
                        let is_socket = std::fs::symlink_metadata(&path).is_ok_and(|m| {
                            std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())
                        });
                        if is_socket {
                            if std::fs::rename(&link, &path).is_ok() {
                                swaps += 1;
                            }
                            break;
                        }
                    }
                }
                swaps
            })
        };
        let own_gid = rustix::process::getegid().as_raw();
        let until = Instant::now() + Duration::from_secs(2);
        let mut binds = 0;
        while Instant::now() < until {
            let gid = (binds % 2 == 1).then_some(own_gid);
            if let Ok((listener, file)) = bind(&path, gid) {
                binds += 1;
                file.remove();
                drop(listener);
            }
        }
        stop.store(true, Ordering::Relaxed);
        let swaps = attacker.join().unwrap();
        assert!(binds > 10 && swaps > 10, "binds {binds}, swaps {swaps}");
        assert_eq!(
            mode(&victim),
            0o604,
            "after {binds} binds and {swaps} swaps"
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_socket_directory_others_can_write_to_or_that_is_a_symlink_is_refused() {
        let base = scratch("dir");
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = open_socket_dir(&open, None).unwrap_err().to_string();
        assert!(err.contains("lets other users write"), "{err}");
        let link = base.join("link");
        std::os::unix::fs::symlink(&open, &link).unwrap();
        let err = open_socket_dir(&link, None).unwrap_err().to_string();
        assert!(err.contains("symlink"), "{err}");
        // A directory under one others can write to (without the sticky bit) is refused too.
        let inner = open.join("tie");
        let err = open_socket_dir(&inner, None).unwrap_err().to_string();
        assert!(err.contains("can be changed by another user"), "{err}");
        // Created by the server: 0700.
        let fresh = base.join("fresh");
        open_socket_dir(&fresh, None).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn shutdown_removes_only_the_socket_it_bound() {
        let base = scratch("own");
        let dir = base.join("sock");
        let path = dir.join("e.sock");
        let (first, file) = bind(&path, None).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(file.check(), SocketState::Ours);
        // Its file is deleted (a tmp cleaner) and another server binds the same path.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(file.check(), SocketState::Missing);
        let (_second, other) = bind(&path, None).unwrap();
        assert_eq!(file.check(), SocketState::Replaced);
        file.remove();
        assert!(path.exists(), "the other server's socket was removed");
        drop(first);
        other.remove();
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&base);
    }
}
