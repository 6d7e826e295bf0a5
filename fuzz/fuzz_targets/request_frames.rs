//! A session's request ring holding arbitrary bytes (indices, stamps, headers, features), read
//! the way the server reads it: frames taken by their stamp, each checked by
//! `tie_layouts::check::decode_request`. Nothing may panic or read out of bounds; a taken
//! frame is either refused with a status or carries exactly the session's feature count, all
//! finite unless the layout allows otherwise.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tie_layouts::abi::{Status, REQUEST_HEADER_WORDS};
use tie_layouts::check::decode_request;
use tie_layouts::ring::{Consumer, RingView};
use tie_layouts::sync::{AtomicU64, Ordering};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    // The session's shape from the first bytes: capacity 1..=16 slots, 1..=9 features.
    let capacity = 1u32 << (data[0] % 5);
    let feature_count = usize::from(data[1] % 9) + 1;
    let allow_non_finite = data[2] & 1 == 1;
    let stamped = data[2] & 2 == 2;
    let slot_words = REQUEST_HEADER_WORDS + feature_count.div_ceil(2);
    let words: Vec<u64> = data[3..]
        .chunks(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect();
    let word = |i: usize| words.get(i).copied().unwrap_or(0);
    // Tail and head as the client left them, then the slots.
    let tail = AtomicU64::new(word(0));
    let head = AtomicU64::new(0);
    let slots: Vec<AtomicU64> = (0..capacity as usize * slot_words)
        .map(|i| AtomicU64::new(word(2 + i)))
        .collect();
    let ring = RingView::new(&tail, &head, &slots, capacity, slot_words).expect("valid geometry");
    let mut consumer = Consumer::new(ring);
    let mut frame = vec![0u64; slot_words];
    let mut expected_seq = 0u64;
    // At most two laps, as the credits would allow.
    for _ in 0..2 * capacity {
        let taken = if stamped {
            consumer.try_pop_stamped(expected_seq, &mut frame)
        } else {
            consumer.try_pop(&mut frame)
        };
        match taken {
            Ok(true) => {}
            Ok(false) | Err(_) => break,
        }
        let decoded = decode_request(&frame, expected_seq, feature_count, allow_non_finite);
        match decoded.features {
            Ok(features) => {
                assert_eq!(features.len(), feature_count);
                assert!(allow_non_finite || features.iter().all(|f| f.is_finite()));
                assert_eq!(decoded.header.seq, expected_seq);
            }
            Err((status, _, _)) => assert!(status != Status::OK && status.name().is_some()),
        }
        expected_seq = expected_seq.wrapping_add(1);
        consumer.release();
        // What the consumer publishes as read is what it took.
        assert_eq!(head.load(Ordering::Relaxed), consumer.popped());
    }
});
