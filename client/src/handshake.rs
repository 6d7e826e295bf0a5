//! The client side of the session handshake: connect, send a hello, receive the reply and the
//! segment's fd.

use std::io::{IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use bytemuck::Zeroable;
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use tie_layouts::abi::ABI_VERSION;
use tie_layouts::hello::{Hello, HelloReply, HelloStatus, HELLO_MAGIC, REPLY_MAGIC};

use crate::error::ConnectError;

/// What the client asks for.
pub(crate) struct HelloParams<'a> {
    pub model: &'a str,
    /// A uid trusted as the server's besides this process's and root's.
    pub server_uid: Option<u32>,
    pub model_version: u32,
    pub layout_hash: u64,
    pub request_capacity: u32,
    pub response_capacity: u32,
}

/// Connects to `path`, performs the handshake and returns the socket (kept open: its hang-up
/// tells each side the other is gone), the reply and the segment fd.
pub(crate) fn handshake(
    path: &Path,
    params: &HelloParams<'_>,
    timeout: Duration,
) -> Result<(UnixStream, HelloReply, OwnedFd), ConnectError> {
    let mut hello = Hello::zeroed();
    hello.layout_hash = params.layout_hash;
    hello.model_version = params.model_version;
    hello.request_capacity = params.request_capacity;
    hello.response_capacity = params.response_capacity;
    if !hello.set_model_name(params.model) {
        return Err(ConnectError::InvalidOptions(format!(
            "model name {:?} is longer than {} bytes",
            params.model,
            tie_layouts::hello::MODEL_NAME_LEN - 1
        )));
    }
    let (stream, reply, fd) =
        exchange_hello(path, hello, timeout, params.layout_hash, params.server_uid)?;
    let fd = fd.ok_or(ConnectError::BadReply(
        "no segment fd with an accepting reply",
    ))?;
    stream
        .set_read_timeout(None)
        .map_err(|source| ConnectError::Io {
            op: "set_read_timeout",
            source,
        })?;
    Ok((stream, reply, fd))
}

/// Connects, checks whom it reached ([`check_server`]), sends `hello` (magic, ABI version
/// and pid filled in), and reads an accepting reply with the fd that came with it, if any. The
/// socket keeps `timeout` for reads.
pub(crate) fn exchange_hello(
    path: &Path,
    mut hello: Hello,
    timeout: Duration,
    layout_hash: u64,
    server_uid: Option<u32>,
) -> Result<(UnixStream, HelloReply, Option<OwnedFd>), ConnectError> {
    let mut stream = connect(path, timeout)?;
    check_server(&stream, path, server_uid)?;
    let io = |op| move |source| ConnectError::Io { op, source };
    stream
        .set_read_timeout(Some(timeout))
        .map_err(io("set_read_timeout"))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(io("set_write_timeout"))?;
    hello.magic = HELLO_MAGIC;
    hello.abi_version = ABI_VERSION;
    hello.client_pid = std::process::id();
    stream
        .write_all(bytemuck::bytes_of(&hello))
        .map_err(io("send hello"))?;
    let mut reply = HelloReply::zeroed();
    let fd = receive_with_fd(
        &mut stream,
        bytemuck::bytes_of_mut(&mut reply),
        "receive hello reply",
    )?;
    if reply.magic != REPLY_MAGIC {
        return Err(ConnectError::BadReply("bad magic"));
    }
    let status = HelloStatus::from_code(reply.status).ok_or(ConnectError::BadReply("status"))?;
    match status {
        HelloStatus::Accepted => Ok((stream, reply, fd)),
        HelloStatus::VersionMismatch => Err(ConnectError::VersionMismatch {
            ours: ABI_VERSION,
            theirs: reply.abi_version,
        }),
        HelloStatus::LayoutMismatch => Err(ConnectError::LayoutMismatch {
            ours: layout_hash,
            theirs: reply.server_layout_hash,
        }),
        HelloStatus::PermissionDenied => Err(ConnectError::PermissionDenied {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, reply.message()),
        }),
        status => Err(ConnectError::Refused {
            status,
            message: reply.message().to_string(),
        }),
    }
}

/// Checks the credentials of the process that bound the socket (SO_PEERCRED, set by the
/// kernel at `listen`): this process's effective uid, root, or `trusted`. Anyone else could
/// have put a socket at the path; nothing is sent to it.
pub(crate) fn check_server(
    stream: &UnixStream,
    path: &Path,
    trusted: Option<u32>,
) -> Result<(), ConnectError> {
    let cred = rustix::net::sockopt::socket_peercred(stream).map_err(|e| ConnectError::Io {
        op: "read the server's credentials (SO_PEERCRED)",
        source: e.into(),
    })?;
    crate::endpoint::check_server_uid(path, cred.uid.as_raw(), trusted)
}

/// Reads exactly `buf.len()` bytes, keeping the first fd passed with them (others are closed).
pub(crate) fn receive_with_fd(
    stream: &mut UnixStream,
    buf: &mut [u8],
    op: &'static str,
) -> Result<Option<OwnedFd>, ConnectError> {
    let mut fd = None;
    let received = {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = rustix::net::recvmsg(
            &*stream,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(|e| ConnectError::Io {
            op,
            source: e.into(),
        })?;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = message {
                for received in fds {
                    fd.get_or_insert(received);
                }
            }
        }
        msg.bytes
    };
    if received == 0 {
        return Err(ConnectError::BadReply("server closed the socket"));
    }
    if received < buf.len() {
        stream
            .read_exact(&mut buf[received..])
            .map_err(|source| ConnectError::Io { op, source })?;
    }
    Ok(fd)
}

/// Connects within `timeout`: a server whose backlog is full makes a non-blocking connect
/// fail with EAGAIN, so it is retried until the timeout instead of blocking for ever.
fn connect(path: &Path, timeout: Duration) -> Result<UnixStream, ConnectError> {
    use rustix::io::Errno;
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let os = |op: &'static str| {
        move |e: Errno| ConnectError::Io {
            op,
            source: e.into(),
        }
    };
    let addr = SocketAddrUnix::new(path).map_err(os("socket path"))?;
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(os("socket"))?;
    let started = std::time::Instant::now();
    loop {
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => break,
            Err(Errno::AGAIN | Errno::INTR) if started.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(Errno::AGAIN) => {
                return Err(ConnectError::Io {
                    op: "connect (the server accepts no connection)",
                    source: std::io::ErrorKind::TimedOut.into(),
                })
            }
            Err(e @ (Errno::ACCESS | Errno::PERM)) => {
                return Err(ConnectError::PermissionDenied {
                    path: path.to_path_buf(),
                    source: e.into(),
                })
            }
            Err(e) => {
                return Err(ConnectError::ServerNotRunning {
                    path: path.to_path_buf(),
                    source: e.into(),
                })
            }
        }
    }
    let stream = UnixStream::from(fd);
    stream
        .set_nonblocking(false)
        .map_err(|source| ConnectError::Io {
            op: "set_nonblocking",
            source,
        })?;
    Ok(stream)
}
