//! Loom models of the ring protocol: every interleaving of one producer and one consumer.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p tie-layouts --test loom --release`.
//!
//! Weakening the tail's Release/Acquire pair makes every model here fail (checked by hand).
//! The head's pair (slot reuse) is modelled by `slot_is_not_reused_before_release`, but loom
//! does not model load buffering, so a weakened head load is not caught: that edge rests on the
//! reasoning in `ring.rs`.
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use tie_layouts::ring::{Consumer, HeapRing, Producer, PushError};
use tie_layouts::sync::spin_hint;

fn ring(capacity: u32, slot_words: usize) -> Arc<HeapRing> {
    Arc::new(HeapRing::new(capacity, slot_words))
}

/// Frames pushed into a ring smaller than their number arrive whole and in order, across
/// full and empty states and wrap-around.
#[test]
fn frames_arrive_whole_and_in_order() {
    loom::model(|| {
        const FRAMES: u64 = 3;
        let mem = ring(2, 2);
        let producer_mem = mem.clone();
        let producer = thread::spawn(move || {
            let mut p = Producer::new(producer_mem.view());
            for i in 0..FRAMES {
                loop {
                    match p.push(&[i, !i]) {
                        Ok(()) => break,
                        Err(PushError::Full) => spin_hint(),
                        Err(PushError::Corrupt(c)) => panic!("corrupt: {c:?}"),
                    }
                }
            }
        });
        let mut c = Consumer::new(mem.view());
        let mut out = [0u64; 2];
        for i in 0..FRAMES {
            while !c.try_pop(&mut out).unwrap() {
                spin_hint();
            }
            assert_eq!(out, [i, !i], "torn or reordered frame");
            c.release();
        }
        producer.join().unwrap();
    });
}

/// Publishing a batch at once makes all of it visible together.
#[test]
fn a_published_batch_is_seen_whole() {
    loom::model(|| {
        let mem = ring(4, 1);
        let producer_mem = mem.clone();
        let producer = thread::spawn(move || {
            let mut p = Producer::new(producer_mem.view());
            p.try_push(&[10]).unwrap();
            p.try_push(&[11]).unwrap();
            p.publish();
        });
        let mut c = Consumer::new(mem.view());
        let n = c.available().unwrap();
        assert!(n == 0 || n == 2, "saw {n} frames of a batch of 2");
        let mut out = [0u64];
        for expected in [10, 11].into_iter().take(n as usize) {
            assert!(c.try_pop(&mut out).unwrap());
            assert_eq!(out[0], expected);
        }
        producer.join().unwrap();
    });
}

/// The producer never overwrites a slot the consumer is still copying.
#[test]
fn slot_is_not_reused_before_release() {
    loom::model(|| {
        let mem = ring(1, 2);
        let consumer_mem = mem.clone();
        let consumer = thread::spawn(move || {
            let mut c = Consumer::new(consumer_mem.view());
            let mut out = [0u64; 2];
            for i in 0..2u64 {
                while !c.try_pop(&mut out).unwrap() {
                    spin_hint();
                }
                assert_eq!(out, [i, i]);
                c.release();
            }
        });
        let mut p = Producer::new(mem.view());
        for i in 0..2u64 {
            while p.push(&[i, i]).is_err() {
                spin_hint();
            }
        }
        consumer.join().unwrap();
    });
}

/// A consumer that takes frames on their stamp sees them whole, in order.
#[test]
fn stamped_frames_arrive_whole_and_in_order() {
    loom::model(|| {
        const FRAMES: u64 = 3;
        let mem = ring(2, 2);
        mem.view().clear_stamps(u64::MAX);
        let producer_mem = mem.clone();
        let producer = thread::spawn(move || {
            let mut p = Producer::new(producer_mem.view());
            for i in 0..FRAMES {
                loop {
                    // Pushed, published only every other frame: the consumer goes by stamps.
                    match p.try_push(&[i, !i]) {
                        Ok(()) => break,
                        Err(PushError::Full) => spin_hint(),
                        Err(PushError::Corrupt(c)) => panic!("corrupt: {c:?}"),
                    }
                }
                if i % 2 == 1 {
                    p.publish();
                }
            }
            p.publish();
        });
        let mut c = Consumer::new(mem.view());
        let mut out = [0u64; 2];
        for i in 0..FRAMES {
            while !c.try_pop_stamped(i, &mut out).unwrap() {
                spin_hint();
            }
            assert_eq!(out, [i, !i], "torn or reordered frame");
            c.release();
        }
        producer.join().unwrap();
    });
}
