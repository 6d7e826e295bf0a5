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
use tie_layouts::ring::{Consumer, Producer, PushError, RingView};
use tie_layouts::sync::{spin_hint, AtomicU64};

struct Mem {
    tail: AtomicU64,
    head: AtomicU64,
    slots: Vec<AtomicU64>,
}

impl Mem {
    fn new(capacity: u32, slot_words: usize) -> Arc<Self> {
        Arc::new(Self {
            tail: AtomicU64::new(0),
            head: AtomicU64::new(0),
            slots: (0..capacity as usize * slot_words)
                .map(|_| AtomicU64::new(0))
                .collect(),
        })
    }

    fn view(&self, capacity: u32, slot_words: usize) -> RingView<'_> {
        RingView::new(&self.tail, &self.head, &self.slots, capacity, slot_words).unwrap()
    }
}

/// Frames pushed into a ring smaller than their number arrive whole and in order, across
/// full and empty states and wrap-around.
#[test]
fn frames_arrive_whole_and_in_order() {
    loom::model(|| {
        const FRAMES: u64 = 3;
        let mem = Mem::new(2, 2);
        let producer_mem = mem.clone();
        let producer = thread::spawn(move || {
            let mut p = Producer::new(producer_mem.view(2, 2));
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
        let mut c = Consumer::new(mem.view(2, 2));
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
        let mem = Mem::new(4, 1);
        let producer_mem = mem.clone();
        let producer = thread::spawn(move || {
            let mut p = Producer::new(producer_mem.view(4, 1));
            p.try_push(&[10]).unwrap();
            p.try_push(&[11]).unwrap();
            p.publish();
        });
        let mut c = Consumer::new(mem.view(4, 1));
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
        let mem = Mem::new(1, 2);
        let consumer_mem = mem.clone();
        let consumer = thread::spawn(move || {
            let mut c = Consumer::new(consumer_mem.view(1, 2));
            let mut out = [0u64; 2];
            for i in 0..2u64 {
                while !c.try_pop(&mut out).unwrap() {
                    spin_hint();
                }
                assert_eq!(out, [i, i]);
                c.release();
            }
        });
        let mut p = Producer::new(mem.view(1, 2));
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
        let mem = Mem::new(2, 2);
        mem.view(2, 2).clear_stamps(u64::MAX);
        let producer_mem = mem.clone();
        let producer = thread::spawn(move || {
            let mut p = Producer::new(producer_mem.view(2, 2));
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
        let mut c = Consumer::new(mem.view(2, 2));
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
