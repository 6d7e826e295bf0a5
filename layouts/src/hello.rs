//! The session handshake, sent over the session's Unix socket.
//!
//! The client sends one [`Hello`]; the server answers with one [`HelloReply`] and, when it
//! accepts, passes the segment's file descriptor alongside it (SCM_RIGHTS). Both are plain
//! fixed-size structs (see [`crate::abi`] for the rules they meet).

use bytemuck::{Pod, Zeroable};
use core::mem::{offset_of, size_of};

/// First word of a hello: `b"TIEHELLO"`.
pub const HELLO_MAGIC: u64 = u64::from_le_bytes(*b"TIEHELLO");
/// First word of a hello reply: `b"TIEREPLY"`.
pub const REPLY_MAGIC: u64 = u64::from_le_bytes(*b"TIEREPLY");
/// Bytes of a model name in a hello.
pub const MODEL_NAME_LEN: usize = 64;
/// [`Hello::flags`] bit: the peer is an inspector. The server answers with a [`HelloReply`]
/// whose `session_id` holds the number of sessions N, then N [`SessionRecord`]s, each sent
/// with a read-only fd of that session's segment; then it closes the connection.
pub const HELLO_FLAG_INSPECT: u32 = 1;
/// [`HelloReply::flags`] bit: the model's layout accepts NaN and infinite features.
pub const REPLY_ALLOW_NON_FINITE: u32 = 1;
/// Bytes of the message in a reply.
pub const MESSAGE_LEN: usize = 192;

/// [`Hello::model_version`] asking for the model's highest version (`latest`): the highest
/// loaded, or with the server's `load_on_demand` the highest the repository holds (loaded
/// first if it is not).
pub const VERSION_LATEST: u32 = u32::MAX;

/// What a client asks for when it opens a session.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Hello {
    /// [`HELLO_MAGIC`].
    pub magic: u64,
    /// The client's [`crate::abi::ABI_VERSION`].
    pub abi_version: u32,
    /// Zero.
    pub flags: u32,
    /// Hash of the layout the client writes; 0 to take the model's layout as it is.
    pub layout_hash: u64,
    /// Model version to pin; 0 for the repository's default; [`VERSION_LATEST`] for the
    /// highest.
    pub model_version: u32,
    /// Request ring slots wanted (a power of two).
    pub request_capacity: u32,
    /// Response ring slots wanted (a power of two).
    pub response_capacity: u32,
    /// The client's process id, for operators (the server trusts SO_PEERCRED, not this).
    pub client_pid: u32,
    /// Zero.
    pub reserved: [u64; 3],
    /// Model name, UTF-8, NUL-padded.
    pub model_name: [u8; MODEL_NAME_LEN],
}

const _: () = {
    assert!(size_of::<Hello>() == 128);
    assert!(offset_of!(Hello, magic) == 0);
    assert!(offset_of!(Hello, abi_version) == 8);
    assert!(offset_of!(Hello, flags) == 12);
    assert!(offset_of!(Hello, layout_hash) == 16);
    assert!(offset_of!(Hello, model_version) == 24);
    assert!(offset_of!(Hello, request_capacity) == 28);
    assert!(offset_of!(Hello, response_capacity) == 32);
    assert!(offset_of!(Hello, client_pid) == 36);
    assert!(offset_of!(Hello, reserved) == 40);
    assert!(offset_of!(Hello, model_name) == 64);
};

impl Hello {
    /// The model name, or `None` when it is empty, not NUL-padded (at least one NUL, as
    /// [`Hello::set_model_name`] writes it) or not UTF-8.
    pub fn model_name(&self) -> Option<&str> {
        let end = self
            .model_name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(MODEL_NAME_LEN);
        if end == 0 || end == MODEL_NAME_LEN || self.model_name[end..].iter().any(|&b| b != 0) {
            return None;
        }
        core::str::from_utf8(&self.model_name[..end]).ok()
    }

    /// Stores `name` NUL-padded; `false` when it does not fit.
    pub fn set_model_name(&mut self, name: &str) -> bool {
        if name.len() >= MODEL_NAME_LEN {
            return false;
        }
        self.model_name = [0; MODEL_NAME_LEN];
        self.model_name[..name.len()].copy_from_slice(name.as_bytes());
        true
    }
}

/// The server's answer to a [`Hello`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct HelloReply {
    /// [`REPLY_MAGIC`].
    pub magic: u64,
    /// A [`HelloStatus`] code.
    pub status: u32,
    /// The server's [`crate::abi::ABI_VERSION`].
    pub abi_version: u32,
    /// Hash of the model's layout.
    pub server_layout_hash: u64,
    /// Hash the client sent.
    pub client_layout_hash: u64,
    /// Bytes of the segment whose fd comes with an accepting reply.
    pub segment_size: u64,
    /// Server-assigned session id.
    pub session_id: u64,
    /// Version of the model serving the session.
    pub model_version: u32,
    /// Features per request.
    pub feature_count: u32,
    /// Outputs per response.
    pub output_count: u32,
    /// Bit 0 ([`REPLY_ALLOW_NON_FINITE`]): the layout accepts NaN and infinite features.
    pub flags: u32,
    /// Human-readable reason of a refusal, UTF-8, NUL-padded.
    pub message: [u8; MESSAGE_LEN],
}

const _: () = {
    assert!(size_of::<HelloReply>() == 256);
    assert!(offset_of!(HelloReply, magic) == 0);
    assert!(offset_of!(HelloReply, status) == 8);
    assert!(offset_of!(HelloReply, abi_version) == 12);
    assert!(offset_of!(HelloReply, server_layout_hash) == 16);
    assert!(offset_of!(HelloReply, client_layout_hash) == 24);
    assert!(offset_of!(HelloReply, segment_size) == 32);
    assert!(offset_of!(HelloReply, session_id) == 40);
    assert!(offset_of!(HelloReply, model_version) == 48);
    assert!(offset_of!(HelloReply, feature_count) == 52);
    assert!(offset_of!(HelloReply, output_count) == 56);
    assert!(offset_of!(HelloReply, flags) == 60);
    assert!(offset_of!(HelloReply, message) == 64);
};

impl HelloReply {
    /// The message, cut at the first NUL; invalid UTF-8 is cut where it starts.
    pub fn message(&self) -> &str {
        read_name(&self.message)
    }

    /// Stores `message`, cut to fit on a character boundary.
    pub fn set_message(&mut self, message: &str) {
        write_name(&mut self.message, message);
    }

    /// A reply with the magic, this ABI version and `status`; everything else zero.
    pub fn new(status: HelloStatus) -> Self {
        Self {
            magic: REPLY_MAGIC,
            status: status.code(),
            abi_version: crate::abi::ABI_VERSION,
            ..Self::zeroed()
        }
    }
}

/// What an inspector learns of one session (sent with a read-only fd of its segment).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SessionRecord {
    /// Server-assigned session id.
    pub session_id: u64,
    /// When the session opened, nanoseconds since the Unix epoch.
    pub connected_unix_ns: u64,
    /// Bytes of the segment.
    pub segment_size: u64,
    /// The client's pid (from SO_PEERCRED).
    pub client_pid: u32,
    /// The client's uid.
    pub client_uid: u32,
    /// Version of the model serving the session.
    pub model_version: u32,
    /// Zero.
    pub reserved: u32,
    /// Model name, UTF-8, NUL-padded.
    pub model_name: [u8; 64],
    /// Layout name, UTF-8, NUL-padded.
    pub layout_name: [u8; 64],
    /// The client's process name (`/proc/<pid>/comm`), NUL-padded.
    pub process_name: [u8; 32],
    /// Zero.
    pub reserved2: [u64; 7],
}

const _: () = {
    assert!(size_of::<SessionRecord>() == 256);
    assert!(offset_of!(SessionRecord, session_id) == 0);
    assert!(offset_of!(SessionRecord, connected_unix_ns) == 8);
    assert!(offset_of!(SessionRecord, segment_size) == 16);
    assert!(offset_of!(SessionRecord, client_pid) == 24);
    assert!(offset_of!(SessionRecord, client_uid) == 28);
    assert!(offset_of!(SessionRecord, model_version) == 32);
    assert!(offset_of!(SessionRecord, reserved) == 36);
    assert!(offset_of!(SessionRecord, model_name) == 40);
    assert!(offset_of!(SessionRecord, layout_name) == 104);
    assert!(offset_of!(SessionRecord, process_name) == 168);
    assert!(offset_of!(SessionRecord, reserved2) == 200);
};

/// Copies `text` NUL-padded into `field`, cut on a character boundary to leave one NUL.
pub fn write_name(field: &mut [u8], text: &str) {
    let mut end = text.len().min(field.len().saturating_sub(1));
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    field.fill(0);
    field[..end].copy_from_slice(&text.as_bytes()[..end]);
}

/// The text of a NUL-padded field, cut at the first NUL or invalid UTF-8.
pub fn read_name(field: &[u8]) -> &str {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    match core::str::from_utf8(&field[..end]) {
        Ok(s) => s,
        // The prefix up to the error is valid UTF-8 by definition of `valid_up_to`.
        Err(e) => core::str::from_utf8(&field[..e.valid_up_to()]).unwrap_or(""),
    }
}

/// Outcome of a hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloStatus {
    /// The session is open; the segment's fd comes with the reply.
    Accepted,
    /// The client's ABI version differs from the server's.
    VersionMismatch,
    /// The client's layout hash differs from the model's.
    LayoutMismatch,
    /// No such model (or version) is served.
    ModelNotFound,
    /// The hello is malformed (bad magic, ring sizes, name).
    BadRequest,
    /// The peer's credentials are not allowed to connect.
    PermissionDenied,
    /// The server holds as many sessions as it is configured for.
    TooManySessions,
    /// The server failed to set the session up.
    Internal,
    /// The model is loading (it had been unloaded for going unused): retry shortly. The
    /// client retries by itself until its connect timeout.
    Loading,
}

impl HelloStatus {
    /// The code sent on the wire.
    pub const fn code(self) -> u32 {
        match self {
            Self::Accepted => 0,
            Self::VersionMismatch => 1,
            Self::LayoutMismatch => 2,
            Self::ModelNotFound => 3,
            Self::BadRequest => 4,
            Self::PermissionDenied => 5,
            Self::TooManySessions => 6,
            Self::Internal => 7,
            Self::Loading => 8,
        }
    }

    /// Decodes a code; `None` for an unknown one.
    pub const fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            0 => Self::Accepted,
            1 => Self::VersionMismatch,
            2 => Self::LayoutMismatch,
            3 => Self::ModelNotFound,
            4 => Self::BadRequest,
            5 => Self::PermissionDenied,
            6 => Self::TooManySessions,
            7 => Self::Internal,
            8 => Self::Loading,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_name_round_trip_and_validation() {
        let mut h = Hello::zeroed();
        assert!(h.set_model_name("mlp64"));
        assert_eq!(h.model_name(), Some("mlp64"));
        assert!(!h.set_model_name(&"x".repeat(64)));
        h.model_name[10] = b'z'; // bytes after the NUL
        assert_eq!(h.model_name(), None);
        assert_eq!(Hello::zeroed().model_name(), None);
        // All 64 bytes a name, no NUL (found by the `hello` fuzz target).
        h.model_name = [b'k'; MODEL_NAME_LEN];
        assert_eq!(h.model_name(), None);
    }

    #[test]
    fn reply_message_is_cut_on_a_char_boundary() {
        let mut r = HelloReply::zeroed();
        let long = "é".repeat(200);
        r.set_message(&long);
        assert!(r.message().len() < MESSAGE_LEN);
        assert!(r.message().chars().all(|c| c == 'é'));
        r.message[0] = 0xff;
        assert_eq!(r.message(), "");
    }
}
