//! The server's checks of what a client writes: the request frames it reads from a session's
//! ring and the hello a client sends. Both are untrusted input; these functions are pure (no
//! I/O, no state beyond their arguments), so the fuzz targets in `fuzz/` drive exactly the
//! code the server runs.

use crate::abi::{
    RejectReason, RequestHeader, SegmentGeometry, Status, ABI_VERSION, REQUEST_HEADER_WORDS,
};
use crate::hello::{Hello, HelloStatus, HELLO_FLAG_INSPECT, HELLO_MAGIC};

/// A request frame as checked: its header and either its features or why it is refused.
#[derive(Debug)]
pub struct Decoded<'f> {
    /// The header as the client wrote it.
    pub header: RequestHeader,
    /// `Ok`: the features (exactly the session's count). `Err`: the refusal's status and its
    /// two details.
    pub features: Result<&'f [f32], (Status, u32, u32)>,
}

/// Checks the frame `frame` (a request slot: header, then features) of a session whose next
/// frame must carry `expected_seq` and exactly `feature_count` features.
///
/// A frame shorter than its header plus `feature_count` features is refused as a wrong
/// shape; the server's slots are always long enough.
#[inline]
pub fn decode_request(
    frame: &[u64],
    expected_seq: u64,
    feature_count: usize,
    allow_non_finite: bool,
) -> Decoded<'_> {
    let header = read_header(frame);
    let body: &[f32] = bytemuck::cast_slice(frame.get(REQUEST_HEADER_WORDS..).unwrap_or(&[]));
    let features = check_header(&header, expected_seq, feature_count)
        .and_then(|()| check_body(frame.len(), body, feature_count, allow_non_finite));
    Decoded { header, features }
}

/// The checks of a request's features read apart from its header (which passed
/// [`check_header`]): `words` is how much of the frame was read in all, `body` what was read
/// after its header. The first `feature_count` values, or the refusal [`decode_request`]
/// gives (a frame shorter than its header, or than its features, is a wrong shape).
#[inline]
pub fn check_body(
    words: usize,
    body: &[f32],
    feature_count: usize,
    allow_non_finite: bool,
) -> Result<&[f32], (Status, u32, u32)> {
    let features = body
        .get(..feature_count)
        .filter(|_| words >= REQUEST_HEADER_WORDS);
    let Some(features) = features else {
        let n = feature_count as u32;
        return Err((Status::INVALID_INPUT_SHAPE, n, n));
    };
    match first_non_finite(features) {
        Some(i) if !allow_non_finite => {
            Err((Status::REJECTED, RejectReason::NonFinite as u32, i as u32))
        }
        _ => Ok(features),
    }
}

/// The index of the first NaN or infinite value in `values`, if any. The common case (none) is
/// checked a chunk at a time with no early exit, which the compiler vectorises; only a chunk
/// that holds one is searched value by value.
#[inline]
pub fn first_non_finite(values: &[f32]) -> Option<usize> {
    const EXPONENT: u32 = 0x7f80_0000;
    const CHUNK: usize = 64;
    values.chunks(CHUNK).enumerate().find_map(|(i, chunk)| {
        let any = chunk
            .iter()
            .fold(false, |any, v| any | (v.to_bits() & EXPONENT == EXPONENT));
        any.then(|| i * CHUNK + chunk.iter().position(|v| !v.is_finite()).expect("one is"))
    })
}

/// The header at the start of `frame` (fields past a short frame's end are zero).
#[inline]
pub fn read_header(frame: &[u64]) -> RequestHeader {
    let mut header = RequestHeader::default();
    let head = frame.len().min(REQUEST_HEADER_WORDS);
    bytemuck::cast_slice_mut::<RequestHeader, u64>(core::slice::from_mut(&mut header))[..head]
        .copy_from_slice(&frame[..head]);
    header
}

/// The checks of [`decode_request`] that need only the header, in its order: sequence, model
/// slot, feature count, priority. `Err`: the refusal's status and its two details.
///
/// # Errors
/// The first check the header fails.
#[inline]
pub fn check_header(
    header: &RequestHeader,
    expected_seq: u64,
    feature_count: usize,
) -> Result<(), (Status, u32, u32)> {
    if header.seq != expected_seq {
        Err((
            Status::REJECTED,
            RejectReason::BadSequence as u32,
            expected_seq as u32,
        ))
    } else if header.model_slot != 0 {
        Err((Status::MODEL_NOT_FOUND, header.model_slot, 0))
    } else if header.feature_count as usize != feature_count {
        Err((
            Status::INVALID_INPUT_SHAPE,
            feature_count as u32,
            header.feature_count,
        ))
    } else if header.priority > 3 {
        Err((
            Status::REJECTED,
            RejectReason::BadPriority as u32,
            header.priority,
        ))
    } else {
        Ok(())
    }
}

/// What a well-formed hello asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Asked<'h> {
    /// A read-only view of the sessions (`tie-inspect`).
    Inspect,
    /// A session with `model`, at `version` (`None`: the default).
    Session {
        /// The model's name.
        model: &'h str,
        /// The version pinned.
        version: Option<u32>,
    },
}

/// Why a hello is refused: the reply's status and message.
pub type Refusal = (HelloStatus, String);

/// Checks a hello's magic, ABI version, flags and model name.
///
/// # Errors
/// The refusal to send.
pub fn check_hello(hello: &Hello) -> Result<Asked<'_>, Refusal> {
    if hello.magic != HELLO_MAGIC {
        return Err((HelloStatus::BadRequest, "bad hello magic".into()));
    }
    if hello.abi_version != ABI_VERSION {
        return Err((
            HelloStatus::VersionMismatch,
            format!(
                "ABI version mismatch: server {ABI_VERSION}, client {}",
                hello.abi_version
            ),
        ));
    }
    if hello.flags == HELLO_FLAG_INSPECT {
        return Ok(Asked::Inspect);
    }
    if hello.flags != 0 {
        return Err((
            HelloStatus::BadRequest,
            format!("unknown hello flags {:#x}", hello.flags),
        ));
    }
    let Some(model) = hello.model_name() else {
        return Err((HelloStatus::BadRequest, "invalid model name".into()));
    };
    let version = (hello.model_version != 0).then_some(hello.model_version);
    Ok(Asked::Session { model, version })
}

/// The segment a hello's ring sizes make for a model of `feature_count` features, if it is
/// valid and at most `max_bytes`.
///
/// # Errors
/// The refusal to send.
pub fn session_geometry(
    hello: &Hello,
    feature_count: u32,
    max_bytes: usize,
) -> Result<SegmentGeometry, Refusal> {
    let geometry = SegmentGeometry::new(
        hello.request_capacity,
        hello.response_capacity,
        feature_count,
    )
    .map_err(|e| (HelloStatus::BadRequest, e.to_string()))?;
    if geometry.segment_size > max_bytes {
        return Err((
            HelloStatus::BadRequest,
            format!(
                "rings of {} and {} slots make a {} byte segment; the server allows {} (server.max_segment_mb)",
                hello.request_capacity,
                hello.response_capacity,
                geometry.segment_size,
                max_bytes
            ),
        ));
    }
    Ok(geometry)
}

#[cfg(test)]
mod tests {
    #[test]
    fn first_non_finite_finds_the_first_in_any_chunk() {
        extern crate std;
        use std::vec;
        for len in [0usize, 1, 63, 64, 65, 200, 256] {
            let mut v = vec![1.5f32; len];
            assert_eq!(super::first_non_finite(&v), None, "len {len}");
            for at in (0..len).step_by(7).chain(len.checked_sub(1)) {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    v[at] = bad;
                    if at + 3 < len {
                        v[at + 3] = f32::NAN;
                    }
                    assert_eq!(super::first_non_finite(&v), Some(at), "len {len} at {at}");
                    v[at] = -0.0;
                    if at + 3 < len {
                        v[at + 3] = f32::MAX;
                    }
                    assert_eq!(super::first_non_finite(&v), None, "len {len} at {at}");
                }
            }
        }
    }

    use super::*;
    use bytemuck::Zeroable;

    fn frame(header: RequestHeader, features: &[f32]) -> Vec<u64> {
        let mut words = bytemuck::cast_slice::<RequestHeader, u64>(&[header]).to_vec();
        // Two features a word, in memory order (a `Vec<f32>` need not be aligned for u64).
        for pair in features.chunks(2) {
            let mut bytes = [0u8; 8];
            bytes[..4].copy_from_slice(&pair[0].to_ne_bytes());
            bytes[4..].copy_from_slice(&pair.get(1).copied().unwrap_or(0.0).to_ne_bytes());
            words.push(u64::from_ne_bytes(bytes));
        }
        words
    }

    #[test]
    fn frames_are_checked_in_order_of_the_header() {
        let good = RequestHeader {
            seq: 4,
            feature_count: 3,
            priority: 1,
            ..RequestHeader::default()
        };
        let ok = frame(good, &[1.0, 2.0, 3.0]);
        let nan = frame(good, &[1.0, f32::NAN, 3.0]);
        let d = decode_request(&ok, 4, 3, false);
        assert_eq!(d.features.unwrap(), &[1.0, 2.0, 3.0]);
        let d = decode_request(&ok, 5, 3, false);
        assert_eq!(
            d.features.unwrap_err(),
            (Status::REJECTED, RejectReason::BadSequence as u32, 5)
        );
        let d = decode_request(&nan, 4, 3, false);
        assert_eq!(
            d.features.unwrap_err(),
            (Status::REJECTED, RejectReason::NonFinite as u32, 1)
        );
        assert!(
            decode_request(&frame(good, &[1.0, f32::NAN, 3.0]), 4, 3, true)
                .features
                .is_ok()
        );
        // Too short for its features, or for its header: a wrong shape, never a panic.
        let short = frame(good, &[1.0]);
        assert_eq!(
            decode_request(&short, 4, 3, false).features.unwrap_err().0,
            Status::INVALID_INPUT_SHAPE
        );
        assert_eq!(
            decode_request(&short[..2], 4, 3, false)
                .features
                .unwrap_err()
                .0,
            Status::INVALID_INPUT_SHAPE
        );
    }

    #[test]
    fn hellos_are_checked_and_segments_bounded() {
        let mut hello = Hello::zeroed();
        assert_eq!(check_hello(&hello).unwrap_err().0, HelloStatus::BadRequest);
        hello.magic = HELLO_MAGIC;
        hello.abi_version = ABI_VERSION;
        assert!(hello.set_model_name("mlp64"));
        hello.model_version = 2;
        assert_eq!(
            check_hello(&hello).unwrap(),
            Asked::Session {
                model: "mlp64",
                version: Some(2)
            }
        );
        hello.request_capacity = 1 << 16;
        hello.response_capacity = 1 << 16;
        let refused = session_geometry(&hello, 4096, 64 << 20).unwrap_err();
        assert!(refused.1.contains("server.max_segment_mb"), "{}", refused.1);
        hello.request_capacity = 64;
        hello.response_capacity = 64;
        assert!(session_geometry(&hello, 4096, 64 << 20).is_ok());
        hello.request_capacity = 3;
        assert_eq!(
            session_geometry(&hello, 4, 64 << 20).unwrap_err().0,
            HelloStatus::BadRequest
        );
    }
}
