//! A producer and a consumer thread on one ring, many laps: every frame arrives whole and in
//! order, taken both by the tail and by the stamp. Small enough for Miri, and the target of
//! ThreadSanitizer (README, Development).
#![cfg(not(loom))]

use std::sync::Arc;

use tie_layouts::ring::{Consumer, HeapRing, Producer};

/// Frames per run: fewer under Miri, which interprets every access.
fn frames() -> u64 {
    if cfg!(miri) {
        300
    } else {
        200_000
    }
}

fn run(stamped: bool) {
    const CAPACITY: u32 = 8;
    const WORDS: usize = 4;
    let ring = Arc::new(HeapRing::new(CAPACITY, WORDS));
    if stamped {
        ring.view().clear_stamps(u64::MAX);
    }
    let total = frames();
    let producer = {
        let ring = ring.clone();
        std::thread::spawn(move || {
            let mut p = Producer::new(ring.view());
            let mut next = 0u64;
            while next < total {
                // Frames published in batches of up to 3, as the server does.
                let mut pushed = 0;
                while pushed < 3 && next < total {
                    match p.try_push(&[next, next ^ 0xABCD, next.wrapping_mul(31), !next]) {
                        Ok(()) => {
                            next += 1;
                            pushed += 1;
                        }
                        Err(_) => break,
                    }
                }
                p.publish();
                if pushed == 0 {
                    std::thread::yield_now();
                }
            }
        })
    };
    let mut c = Consumer::new(ring.view());
    let mut out = [0u64; WORDS];
    let mut expected = 0u64;
    while expected < total {
        let got = if stamped {
            c.try_pop_stamped(expected, &mut out).unwrap()
        } else {
            c.try_pop(&mut out).unwrap()
        };
        if got {
            assert_eq!(
                out,
                [
                    expected,
                    expected ^ 0xABCD,
                    expected.wrapping_mul(31),
                    !expected
                ]
            );
            expected += 1;
            if expected.is_multiple_of(2) {
                c.release();
            }
        } else {
            c.release();
            std::thread::yield_now();
        }
    }
    c.release();
    producer.join().unwrap();
}

#[test]
fn frames_cross_threads_whole_and_in_order() {
    run(false);
}

#[test]
fn stamped_frames_cross_threads_whole_and_in_order() {
    run(true);
}
