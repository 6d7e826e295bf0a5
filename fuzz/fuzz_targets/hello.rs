//! Arbitrary bytes as a hello (whole or cut short, as a client may send them): checked by
//! `tie_layouts::check::check_hello` and, for a session, sized by `session_geometry`. Nothing
//! may panic; an accepted hello names a valid model name and ring sizes whose segment fits
//! the limit.
#![no_main]

use bytemuck::Zeroable;
use libfuzzer_sys::fuzz_target;
use tie_layouts::check::{check_hello, session_geometry, Asked};
use tie_layouts::hello::{Hello, HelloReply, HelloStatus};

fuzz_target!(|data: &[u8]| {
    // The server reads up to a whole hello; a short one stays zero-filled past its end.
    let mut hello = Hello::zeroed();
    let bytes = bytemuck::bytes_of_mut(&mut hello);
    let n = data.len().min(bytes.len());
    bytes[..n].copy_from_slice(&data[..n]);
    let feature_count = data.get(n).map_or(64, |b| u32::from(*b) * 17);
    match check_hello(&hello) {
        Ok(Asked::Inspect) => {}
        Ok(Asked::Session { model, version }) => {
            assert!(!model.is_empty() && model.len() < tie_layouts::hello::MODEL_NAME_LEN);
            assert_ne!(version, Some(0));
            match session_geometry(&hello, feature_count, 64 << 20) {
                Ok(g) => {
                    assert!(g.segment_size <= 64 << 20);
                    assert!(g.request_capacity.is_power_of_two());
                    assert!(g.response_capacity.is_power_of_two());
                }
                Err((status, message)) => {
                    assert_eq!(status, HelloStatus::BadRequest);
                    assert!(!message.is_empty());
                }
            }
        }
        Err((status, message)) => {
            assert_ne!(status, HelloStatus::Accepted);
            // The refusal's message fits a reply and reads back.
            let mut reply = HelloReply::new(status);
            reply.set_message(&message);
            assert!(!reply.message().is_empty());
        }
    }
    // A reply made of the same bytes, as a client reads one: its message never panics.
    let mut reply = HelloReply::zeroed();
    let bytes = bytemuck::bytes_of_mut(&mut reply);
    let n = data.len().min(bytes.len());
    bytes[..n].copy_from_slice(&data[..n]);
    let _ = reply.message();
});
