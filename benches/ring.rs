//! Criterion: push and pop of request frames on one ring (both ends on one thread, so this
//! is the cost of the ring operations themselves, not of moving cache lines between cores).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use tie_client::layouts::abi::request_slot_size;
use tie_client::layouts::ring::{Consumer, HeapRing, Producer};

fn bench_ring(c: &mut Criterion) {
    let slot_words = request_slot_size(64) / 8; // a 64-feature request frame
    let frame_words = tie_client::layouts::abi::request_words(64);
    let ring = HeapRing::new(1024, slot_words);
    let view = ring.view();
    let mut p = Producer::new(view);
    let mut q = Consumer::new(view);
    let frame: Vec<u64> = (0..frame_words as u64).collect();
    let mut out = vec![0u64; frame_words];

    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1));
    g.bench_function("push_pop_64_features", |b| {
        b.iter(|| {
            p.push(black_box(&frame)).unwrap();
            assert!(q.try_pop(&mut out).unwrap());
            q.release();
            black_box(&out);
        })
    });
    g.throughput(Throughput::Elements(16));
    g.bench_function("push_16_publish_once_pop_16_release_once", |b| {
        b.iter_batched(
            || (),
            |_| {
                for _ in 0..16 {
                    p.try_push(black_box(&frame)).unwrap();
                }
                p.publish();
                for _ in 0..16 {
                    assert!(q.try_pop(&mut out).unwrap());
                }
                q.release();
                black_box(&out);
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench_ring);
criterion_main!(benches);
