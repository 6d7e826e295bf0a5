//! The GPU backend: results against the CPU backend and onnxruntime for every precision and
//! bucket size, memory accounting, failover between devices, and a GPU model served through the
//! rings. Where no GPU is usable each test skips, counted (`common::skip`; `TIE_REQUIRE_GPU=1`
//! makes that a failure); they run on the lent GPU machine through `.gpu-bundle`.
#![cfg(feature = "cuda")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::Need;
use crate::common::{fixtures, rel_err, root, TestServer};
use crate::conformance::{conformance, Tolerance};
use tie_engine::cuda::{CudaBackend, CudaLoadError, Engine, GpuRuntime, MemoryLimits};
use tie_engine::{
    read_mlp, Activation, Backend, BackendHealth, Dense, MlpBackend, MlpPlan, ModelIo, Precision,
};

const NO_LIMITS: MemoryLimits = MemoryLimits {
    pool_bytes: 0,
    fraction_per_model: 0.0,
    max_models: 0,
};

const PRECISIONS: [Precision; 4] = [
    Precision::Fp32,
    Precision::Tf32,
    Precision::Fp16,
    Precision::Bf16,
];

/// The runtime on `ids`, or `None` after saying why the test skips.
fn runtime(ids: &[u32], graphs: bool, limits: MemoryLimits) -> Option<Arc<GpuRuntime>> {
    match GpuRuntime::probe(ids, graphs, limits) {
        Ok(rt) => Some(rt),
        Err(why) => {
            crate::common::skip(Need::Gpus(1), &format!("no usable GPU: {why}"));
            None
        }
    }
}

/// The runtime on GPUs 0 and 1, or `None` after saying why the test skips.
fn two_gpus() -> Option<Arc<GpuRuntime>> {
    let rt = runtime(&[0, 1], true, NO_LIMITS)?;
    if rt.devices().len() < 2 {
        crate::common::skip(Need::Gpus(2), "one GPU present; failover needs two");
        return None;
    }
    Some(rt)
}

/// Bound on ‖gpu − reference‖ / ‖reference‖ over a batch, per precision: f32 differs from the
/// CPU only in summation order; TF32 keeps 10 mantissa bits of each product's operands, f16
/// 10 bits and bf16 7 bits of every weight and activation.
fn tolerance(p: Precision) -> f64 {
    match p {
        Precision::Fp32 => 1e-5,
        Precision::Tf32 => 5e-3,
        Precision::Fp16 => 1e-2,
        Precision::Bf16 => 4e-2,
    }
}

/// How close each precision's answers must be: fp32 element-wise, as tight as the CPU engines
/// are held (a relative norm over a single small output would count summation-order noise
/// against it), the reduced precisions by [`tolerance`].
fn bound(p: Precision) -> Tolerance {
    match p {
        Precision::Fp32 => Tolerance::Elementwise(1e-5),
        _ => Tolerance::RelNorm(tolerance(p)),
    }
}

/// Runs rows on a GPU backend against a reference (see [`crate::conformance::check_rows`]).
fn check_rows(
    backend: &dyn Backend,
    input: &[f32],
    rows: usize,
    reference: &[f32],
    tol: f64,
    what: &str,
) {
    crate::conformance::check_rows(
        backend,
        input,
        rows,
        reference,
        Tolerance::RelNorm(tol),
        what,
    );
}

#[test]
fn example_models_match_onnxruntime_in_every_precision_and_bucket() {
    let Some(rt) = runtime(&[0], true, NO_LIMITS) else {
        return;
    };
    let buckets = [1, 2, 4, 8, 16, 32, 64];
    let mut checked = 0;
    for f in fixtures() {
        let path = root().join(format!("models/{}/{}/model.onnx", f.model, f.version));
        let (io, plan) = read_mlp(&path).unwrap();
        let Ok(plan) = plan else { continue };
        if plan.layers.is_empty() {
            continue;
        }
        for p in PRECISIONS {
            let b = CudaBackend::load(&rt, io.clone(), &plan, p, &buckets).unwrap();
            let what = format!("{} {}", f.model, p.name());
            conformance(&b, &f, bound(p), &what);
            println!("{what}: engines {:?}", b.engines());
        }
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} example models are MLPs");
}

/// A small deterministic generator (xorshift*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

fn random_plan(rng: &mut Rng) -> MlpPlan {
    let width = |rng: &mut Rng| -> usize {
        // Half small (1..=64), half anywhere up to 1024.
        if rng.below(2) == 0 {
            1 + rng.below(64) as usize
        } else {
            1 + rng.below(1024) as usize
        }
    };
    let acts = [
        Activation::Identity,
        Activation::Relu,
        Activation::LeakyRelu(0.1),
        Activation::Sigmoid,
        Activation::Tanh,
        Activation::Gelu,
        Activation::GeluTanh,
    ];
    let input_width = width(rng);
    let depth = 1 + rng.below(4) as usize;
    let mut inputs = input_width;
    let mut layers = Vec::new();
    for l in 0..depth {
        let outputs = if l + 1 == depth {
            1 + rng.below(16) as usize
        } else {
            width(rng)
        };
        let scale = (3.0 / inputs as f32).sqrt();
        layers.push(Dense {
            inputs,
            outputs,
            weights: (0..inputs * outputs)
                .map(|_| rng.uniform() * scale)
                .collect(),
            bias: (0..outputs).map(|_| rng.uniform() * 0.1).collect(),
            activation: acts[rng.below(acts.len() as u64) as usize],
        });
        inputs = outputs;
    }
    MlpPlan {
        input_width,
        layers,
        input_activation: if rng.below(4) == 0 {
            Activation::Relu
        } else {
            Activation::Identity
        },
    }
}

fn io_of(plan: &MlpPlan) -> ModelIo {
    ModelIo {
        input_name: "x".into(),
        input_width: plan.input_width,
        output_name: "y".into(),
        output_width: plan.output_width(),
        output_note: None,
    }
}

#[test]
fn random_mlps_match_the_cpu_in_every_precision_and_bucket() {
    let Some(rt) = runtime(&[0], true, NO_LIMITS) else {
        return;
    };
    // Odd sizes among the buckets; batches between buckets are padded.
    let buckets = [1, 2, 4, 8, 16, 37, 64, 100];
    let mut rng = Rng(0x7ee5_eed5);
    // Each engine on its own, then the choice among all: every engine must give the same
    // results at every bucket.
    let engines: [(&str, &dyn Fn(Engine) -> bool); 4] = [
        ("fused", &|e| matches!(e, Engine::Fused(_))),
        ("fused-mapped", &|e| matches!(e, Engine::FusedMapped(_))),
        ("cublaslt", &|e| e == Engine::Blaslt),
        ("fastest", &|_| true),
    ];
    for model in 0..8 {
        let plan = random_plan(&mut rng);
        let shape: Vec<usize> = std::iter::once(plan.input_width)
            .chain(plan.layers.iter().map(|l| l.outputs))
            .collect();
        let cpu = MlpBackend::new(io_of(&plan), plan.clone());
        let input: Vec<f32> = (0..100 * plan.input_width).map(|_| rng.uniform()).collect();
        let mut reference = vec![0.0f32; 100 * plan.output_width()];
        cpu.run_batch(&input, 100, &mut reference).unwrap();
        for p in PRECISIONS {
            for (name, allow) in engines {
                let what = format!("random model {model} {shape:?} {p:?} {name}");
                let gpu = match CudaBackend::load_with_engines(
                    &rt,
                    io_of(&plan),
                    &plan,
                    p,
                    &buckets,
                    allow,
                ) {
                    Ok(gpu) => gpu,
                    // Too wide for the fused kernel's shared memory: cuBLASLt serves it.
                    Err(e) if name.starts_with("fused") => {
                        println!("{what}: {e}");
                        continue;
                    }
                    Err(e) => panic!("{what}: {e}"),
                };
                for rows in [1, 2, 3, 8, 15, 37, 50, 64, 99, 100] {
                    check_rows(&gpu, &input, rows, &reference, tolerance(p), &what);
                }
                println!("{what}: engines {:?}", gpu.engines());
            }
        }
    }
}

#[test]
fn eager_execution_without_graphs_gives_the_same_results() {
    let Some(rt) = runtime(&[0], false, NO_LIMITS) else {
        return;
    };
    let mut rng = Rng(42);
    let plan = random_plan(&mut rng);
    let cpu = MlpBackend::new(io_of(&plan), plan.clone());
    let input: Vec<f32> = (0..16 * plan.input_width).map(|_| rng.uniform()).collect();
    let mut reference = vec![0.0f32; 16 * plan.output_width()];
    cpu.run_batch(&input, 16, &mut reference).unwrap();
    let gpu = CudaBackend::load(&rt, io_of(&plan), &plan, Precision::Fp32, &[1, 4, 16]).unwrap();
    for rows in [1, 3, 16] {
        check_rows(&gpu, &input, rows, &reference, 1e-5, "eager");
    }
}

/// The I/O and layers of example model `model` (version 1).
fn example_mlp(model: &str) -> (ModelIo, MlpPlan) {
    let (io, plan) = read_mlp(&root().join(format!("models/{model}/1/model.onnx"))).unwrap();
    (io, plan.unwrap())
}

fn mlp256() -> (ModelIo, MlpPlan) {
    example_mlp("mlp256")
}

#[test]
fn models_that_do_not_fit_are_refused_with_the_size_they_asked_for() {
    let (io, plan) = mlp256();
    // A 1 MB pool: mlp256 needs more.
    let tiny = MemoryLimits {
        pool_bytes: 1 << 20,
        ..NO_LIMITS
    };
    let Some(rt) = runtime(&[0], true, tiny) else {
        return;
    };
    match CudaBackend::load(&rt, io.clone(), &plan, Precision::Fp32, &[1, 8]) {
        Err(CudaLoadError::OutOfMemory(e)) => {
            assert!(e.requested_mb >= 1, "{e}");
            assert!(e.to_string().contains("requested"), "{e}");
        }
        Err(e) => panic!("expected OutOfMemory, got {e}"),
        Ok(_) => panic!("a 1 MB pool took mlp256"),
    }
    // One model per GPU: the second is refused until the first is gone.
    let one = MemoryLimits {
        max_models: 1,
        ..NO_LIMITS
    };
    let rt = runtime(&[0], true, one).unwrap();
    let first = CudaBackend::load(&rt, io.clone(), &plan, Precision::Fp16, &[1, 8]).unwrap();
    assert!(rt.devices()[0].booked_bytes() > 0);
    assert!(matches!(
        CudaBackend::load(&rt, io.clone(), &plan, Precision::Fp16, &[1, 8]),
        Err(CudaLoadError::OutOfMemory(_))
    ));
    drop(first);
    assert_eq!(rt.devices()[0].booked_bytes(), 0);
    CudaBackend::load(&rt, io, &plan, Precision::Fp16, &[1, 8]).unwrap();
    // A fraction per model smaller than the model.
    let fraction = MemoryLimits {
        pool_bytes: 64 << 20,
        fraction_per_model: 0.01,
        max_models: 0,
    };
    let rt = runtime(&[0], true, fraction).unwrap();
    let (io, plan) = mlp256();
    let err = CudaBackend::load(&rt, io, &plan, Precision::Fp32, &[1, 256])
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("memory_fraction_per_model"),
        "{err}"
    );
}

#[test]
fn batches_spread_over_devices_and_a_failed_device_leaves_rotation() {
    let Some(rt) = two_gpus() else {
        return;
    };
    let (io, plan) = mlp256();
    let cpu = MlpBackend::new(io.clone(), plan.clone());
    let gpu =
        Arc::new(CudaBackend::load(&rt, io.clone(), &plan, Precision::Fp32, &[1, 8]).unwrap());
    assert_eq!(gpu.devices(), vec![(0, true), (1, true)]);
    assert_eq!(gpu.info().device, "cuda:0,cuda:1");
    let mut rng = Rng(7);
    let input: Vec<f32> = (0..8 * io.input_width).map(|_| rng.uniform()).collect();
    let mut reference = vec![0.0f32; 8 * io.output_width];
    cpu.run_batch(&input, 8, &mut reference).unwrap();
    // Several threads at once: both instances serve (least outstanding first), all correct.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..200 {
                    check_rows(gpu.as_ref(), &input, 8, &reference, 1e-5, "two GPUs");
                }
            });
        }
    });
    // A failure on GPU 0 mid-batch: the batch is retried on GPU 1, GPU 0 leaves rotation.
    assert!(gpu.inject_failure(0));
    check_rows(
        gpu.as_ref(),
        &input,
        8,
        &reference,
        1e-5,
        "retried on GPU 1",
    );
    assert_eq!(gpu.devices(), vec![(0, false), (1, true)]);
    check_rows(gpu.as_ref(), &input, 8, &reference, 1e-5, "GPU 1 alone");
    assert_eq!(gpu.health(), BackendHealth::Healthy);
    gpu.take_out_of_rotation(1);
    let mut out = vec![0.0f32; 8 * io.output_width];
    assert!(gpu.run_batch(&input, 8, &mut out).is_err());
    assert!(matches!(gpu.health(), BackendHealth::Unhealthy(_)));
}

#[test]
fn a_device_failing_a_batch_leaves_rotation_and_the_model_reports_unhealthy() {
    let Some(rt) = runtime(&[0], true, NO_LIMITS) else {
        return;
    };
    let (io, plan) = mlp256();
    let gpu = CudaBackend::load(&rt, io.clone(), &plan, Precision::Fp32, &[1, 8]).unwrap();
    let input = vec![0.5f32; io.input_width];
    let mut out = vec![0.0f32; io.output_width];
    gpu.run_batch(&input, 1, &mut out).unwrap();
    assert_eq!(gpu.health(), BackendHealth::Healthy);
    assert!(gpu.inject_failure(0));
    let err = gpu.run_batch(&input, 1, &mut out).unwrap_err();
    assert!(err.to_string().contains("no GPU instance"), "{err}");
    assert!(matches!(gpu.health(), BackendHealth::Unhealthy(_)));
    assert_eq!(gpu.devices(), vec![(0, false)]);
}

#[test]
fn a_gpu_model_is_served_through_the_rings() {
    if let Err(why) = GpuRuntime::probe(&[0], true, NO_LIMITS) {
        crate::common::skip(Need::Gpus(1), &format!("no usable GPU: {why}"));
        return;
    }
    let repo = crate::common::scratch_dir("gpu-repo");
    for (name, config) in [
        ("fp32", "backend = \"cuda\"\n"),
        ("fp16", "backend = \"cuda\"\nprecision = \"fp16\"\n"),
    ] {
        crate::common::add_version(&repo, "mlp64", 1, name, 1);
        std::fs::write(repo.join(name).join("config.toml"), config).unwrap();
    }
    let server = TestServer::start_with(crate::common::TEST_CONFIG, &repo);
    let f = crate::common::fixture("mlp64_v1");
    for (model, tol) in [("fp32", 1e-5), ("fp16", 1e-2)] {
        let mut client =
            tie_client::Client::connect(&server.endpoint, model, server.options()).unwrap();
        for (input, expected) in f.inputs.iter().zip(&f.outputs) {
            let r = client.predict(input).unwrap().response;
            assert!(
                rel_err(r.outputs()[0], expected[0]) <= tol,
                "{model}: {} vs {}",
                r.outputs()[0],
                expected[0]
            );
        }
    }
    let log = server.log();
    assert!(log.contains("model built on the GPU"), "{log}");
}

#[test]
fn tie_devices_reports_the_gpu_and_nvml_figures() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tie"))
        .arg("devices")
        .output()
        .unwrap();
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    if report["gpu_usable"] != true {
        // Where there is no GPU the reason is given, and no figure is made up.
        assert!(
            report["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{report}"
        );
        assert!(report["nvml"].is_null(), "{report}");
        crate::common::skip(
            Need::Gpus(1),
            &format!("checked the no-GPU report: {}", report["reason"]),
        );
        return;
    }
    let device = &report["devices"][0];
    assert!(
        device["name"].as_str().is_some_and(|n| !n.is_empty()),
        "{report}"
    );
    assert!(
        device["arch"]
            .as_str()
            .is_some_and(|a| a.starts_with("sm_")),
        "{report}"
    );
    let nvml = &report["nvml"][0];
    assert!(
        nvml["utilization_pct"].as_u64().is_some_and(|u| u <= 100),
        "{report}"
    );
    assert!(
        nvml["memory_total_mb"].as_u64().is_some_and(|m| m > 1000),
        "{report}"
    );
    println!("{report}");
}

/// Runs `cycles` rounds on a pipeline of `gpu`: launches batches of the sizes in `sizes` (in
/// turn) while a slot is free, collects the oldest when it is done, and checks every batch
/// against `cpu` in launch order.
fn drive_pipeline(
    gpu: &CudaBackend,
    cpu: &dyn Backend,
    sizes: &[usize],
    batches: usize,
    tol: Tolerance,
) {
    use std::collections::VecDeque;
    let io = gpu.info().io.clone();
    let mut pipeline = gpu.pipeline(3).expect("a pipeline where graphs are on");
    let mut rng = Rng(11);
    let mut launched: VecDeque<(usize, Vec<f32>)> = VecDeque::new();
    let (mut sent, mut checked) = (0, 0);
    while checked < batches {
        if sent < batches && pipeline.has_room() {
            let rows = sizes[sent % sizes.len()];
            let input: Vec<f32> = (0..rows * io.input_width).map(|_| rng.uniform()).collect();
            let n = pipeline.launch(&mut |staging| {
                staging[..input.len()].copy_from_slice(&input);
                rows
            });
            assert_eq!(n, rows);
            launched.push_back((rows, input));
            sent += 1;
            assert_eq!(pipeline.in_flight(), launched.len());
            continue;
        }
        let Some(result) = pipeline.ready() else {
            std::hint::spin_loop();
            continue;
        };
        let output = result.expect("batch ran").to_vec();
        pipeline.retire();
        let (rows, input) = launched.pop_front().unwrap();
        assert_eq!(output.len(), rows * io.output_width);
        let mut reference = vec![0.0f32; rows * io.output_width];
        cpu.run_batch(&input, rows, &mut reference).unwrap();
        if let Err(why) = crate::conformance::compare(&output, &reference, tol) {
            panic!("batch {checked} of {rows} rows: {why}");
        }
        checked += 1;
    }
    assert_eq!(pipeline.in_flight(), 0);
    assert!(pipeline.ready().is_none());
}

#[test]
fn pipelines_keep_batches_in_flight_and_answer_each_in_launch_order() {
    let Some(rt) = runtime(&[0], true, NO_LIMITS) else {
        return;
    };
    let small = example_mlp("mlp64");
    for ((io, plan), what) in [(mlp256(), "mlp256"), (small, "mlp64")] {
        let cpu = MlpBackend::new(io.clone(), plan.clone());
        for precision in [Precision::Fp32, Precision::Fp16] {
            let gpu =
                CudaBackend::load(&rt, io.clone(), &plan, precision, &[1, 8, 64, 256]).unwrap();
            eprintln!("{what} {precision:?}: engines {:?}", gpu.engines());
            // Sizes that land in every bucket, some padded.
            drive_pipeline(&gpu, &cpu, &[1, 8, 37, 256, 3, 64], 300, bound(precision));
            // Two pipelines of one model at once (two pollers), each its own stream.
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| drive_pipeline(&gpu, &cpu, &[256, 200], 100, bound(precision)));
                }
            });
            // Every pipeline above read its batches' completion from the flag its graphs
            // write (CUDA 12's drivers capture that write), not from the driver's queries.
            assert_eq!(gpu.pipelines_by_flag(), 3, "{what} {precision:?}");
        }
    }
}

#[test]
fn a_pipeline_batch_whose_flag_is_never_seen_is_found_done_by_the_stream() {
    let Some(rt) = runtime(&[0], true, NO_LIMITS) else {
        return;
    };
    let (io, plan) = mlp256();
    let cpu = MlpBackend::new(io.clone(), plan.clone());
    let gpu = CudaBackend::load(&rt, io, &plan, Precision::Fp32, &[1, 8, 64]).unwrap();
    // As a device that stopped writing the flags: only the stream's queries see batches done.
    assert!(gpu.hide_completion_flags(0, true));
    let started = Instant::now();
    drive_pipeline(&gpu, &cpu, &[8, 64, 1], 12, bound(Precision::Fp32));
    // Each of the 12 batches was found done by a query, made 1 ms after its first check, not
    // by its flag (which would take microseconds).
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(12), "{waited:?}");
    assert_eq!(gpu.pipelines_by_flag(), 1);
    assert_eq!(gpu.health(), BackendHealth::Healthy);
}

#[test]
fn without_graphs_there_is_no_pipeline() {
    let Some(rt) = runtime(&[0], false, NO_LIMITS) else {
        return;
    };
    let (io, plan) = mlp256();
    let gpu = CudaBackend::load(&rt, io, &plan, Precision::Fp32, &[1, 8]).unwrap();
    assert!(gpu.pipeline(3).is_none());
}

#[test]
fn a_pipeline_batch_on_a_failed_device_is_answered_with_the_error() {
    let Some(rt) = runtime(&[0], true, NO_LIMITS) else {
        return;
    };
    let (io, plan) = mlp256();
    let gpu = CudaBackend::load(&rt, io.clone(), &plan, Precision::Fp32, &[1, 8]).unwrap();
    let mut pipeline = gpu.pipeline(3).unwrap();
    assert!(gpu.inject_failure(0));
    let input = vec![0.5f32; io.input_width];
    assert_eq!(
        pipeline.launch(&mut |staging| {
            staging[..input.len()].copy_from_slice(&input);
            1
        }),
        1
    );
    let err = loop {
        if let Some(r) = pipeline.ready() {
            break r.map(|_| ()).unwrap_err();
        }
    };
    assert!(err.to_string().contains("no GPU instance"), "{err}");
    pipeline.retire();
    assert!(matches!(gpu.health(), BackendHealth::Unhealthy(_)));
}

#[test]
fn a_pipeline_batch_on_a_failed_device_runs_again_on_another() {
    let Some(rt) = two_gpus() else {
        return;
    };
    let (io, plan) = mlp256();
    let cpu = MlpBackend::new(io.clone(), plan.clone());
    let gpu = CudaBackend::load(&rt, io.clone(), &plan, Precision::Fp32, &[1, 8]).unwrap();
    // The first pipeline goes to GPU 0 (fewest pipelines), the second to GPU 1.
    let mut first = gpu.pipeline(3).unwrap();
    let _second = gpu.pipeline(3).unwrap();
    assert!(gpu.inject_failure(0));
    let mut rng = Rng(3);
    let input: Vec<f32> = (0..8 * io.input_width).map(|_| rng.uniform()).collect();
    first.launch(&mut |staging| {
        staging[..input.len()].copy_from_slice(&input);
        8
    });
    let output = loop {
        if let Some(r) = first.ready() {
            break r.unwrap().to_vec();
        }
    };
    first.retire();
    let mut reference = vec![0.0f32; 8 * io.output_width];
    cpu.run_batch(&input, 8, &mut reference).unwrap();
    assert!(crate::conformance::rel_norm(&output, &reference) <= 1e-5);
    assert_eq!(gpu.devices(), vec![(0, false), (1, true)]);
    assert_eq!(gpu.health(), BackendHealth::Healthy);
}

#[test]
fn a_gpu_model_answers_many_clients_in_flight_each_in_order() {
    if let Err(why) = GpuRuntime::probe(&[0], true, NO_LIMITS) {
        crate::common::skip(Need::Gpus(1), &format!("no usable GPU: {why}"));
        return;
    }
    let repo = crate::common::scratch_dir("gpu-flight-repo");
    crate::common::add_version(&repo, "mlp256", 1, "wide", 1);
    std::fs::write(
        repo.join("wide/config.toml"),
        "backend = \"cuda\"\nbatch_timeout_us = 20\nmax_batch_size = 64\npipeline_depth = 3\n",
    )
    .unwrap();
    let server = TestServer::start_with(crate::common::TEST_CONFIG, &repo);
    let (io, plan) = mlp256();
    let cpu = MlpBackend::new(io.clone(), plan);
    std::thread::scope(|s| {
        for c in 0..4usize {
            let (server, cpu) = (&server, &cpu);
            s.spawn(move || {
                let mut options = server.options();
                options.request_capacity = 64;
                options.response_capacity = 64;
                let mut client =
                    tie_client::Client::connect(&server.endpoint, "wide", options).unwrap();
                crate::common::stream_checked(
                    &mut client,
                    &format!("client {c}"),
                    c,
                    3000,
                    &|_| 48,
                    cpu,
                    Tolerance::Elementwise(1e-5),
                );
            });
        }
    });
    let log = server.log();
    assert!(log.contains("GPU pipeline built"), "{log}");
}

#[test]
fn the_fused_kernels_give_each_row_the_same_bits_in_every_batch() {
    // What `deterministic = true` relies on: the fused kernels (any rows per block, mapped or
    // not) sum each row in one fixed order, so a row's bits do not depend on its batch.
    let Some(rt) = runtime(&[0], true, NO_LIMITS) else {
        return;
    };
    let fused = |e: Engine| matches!(e, Engine::Fused(_) | Engine::FusedMapped(_));
    for (io, plan) in [mlp256(), example_mlp("mlp64")] {
        for precision in PRECISIONS {
            let sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256];
            let gpu =
                CudaBackend::load_with_engines(&rt, io.clone(), &plan, precision, &sizes, &fused)
                    .unwrap();
            let mut rng = Rng(5);
            let input: Vec<f32> = (0..256 * io.input_width).map(|_| rng.uniform()).collect();
            let mut alone = vec![0.0f32; 256 * io.output_width];
            for r in 0..256 {
                gpu.run_batch(
                    &input[r * io.input_width..(r + 1) * io.input_width],
                    1,
                    &mut alone[r * io.output_width..(r + 1) * io.output_width],
                )
                .unwrap();
            }
            for n in [2, 3, 7, 16, 33, 64, 100, 256] {
                for start in [0, 256 - n] {
                    let mut out = vec![0.0f32; n * io.output_width];
                    gpu.run_batch(
                        &input[start * io.input_width..(start + n) * io.input_width],
                        n,
                        &mut out,
                    )
                    .unwrap();
                    let want = &alone[start * io.output_width..(start + n) * io.output_width];
                    assert!(
                        out.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{precision:?}, engines {:?}: rows {start}.. in a batch of {n} differ from alone",
                        gpu.engines()
                    );
                }
            }
        }
    }
}

#[test]
fn auto_places_each_batch_on_the_engine_measured_faster_for_its_size() {
    if let Err(why) = GpuRuntime::probe(&[0], true, NO_LIMITS) {
        crate::common::skip(Need::Gpus(1), &format!("no usable GPU: {why}"));
        return;
    }
    let repo = crate::common::scratch_dir("gpu-auto-repo");
    for (name, depth) in [("auto", 0), ("auto_flight", 3)] {
        crate::common::add_version(&repo, "mlp64", 1, name, 1);
        std::fs::write(
            repo.join(name).join("config.toml"),
            format!("backend = \"auto\"\nbatch_timeout_us = 20\nmax_batch_size = 64\npipeline_depth = {depth}\n"),
        )
        .unwrap();
    }
    let server = TestServer::start_with(crate::common::TEST_CONFIG, &repo);
    let (_, loaded) = crate::common::get(&format!(
        "{}/api/v1/internal/inference/models/loaded",
        server.http()
    ));
    for name in ["auto", "auto_flight"] {
        let entry = loaded
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["model_name"] == name)
            .unwrap_or_else(|| panic!("{name} in {loaded}"));
        let placement = &entry["placement"];
        let measured = placement["measured"]
            .as_array()
            .expect("placement measured");
        let sizes: Vec<u64> = measured
            .iter()
            .map(|m| m["batch_size"].as_u64().unwrap())
            .collect();
        assert_eq!(sizes.first(), Some(&1), "{placement}");
        // The split is the measured one: the CPU keeps every size up to the first it does not
        // win, the last one timed (or the largest, 64, when it wins them all).
        let wins = |m: &serde_json::Value| m["cpu_p50_us"].as_f64() < m["gpu_p50_us"].as_f64();
        let up_to = measured
            .iter()
            .take_while(|m| wins(m))
            .last()
            .map_or(0, |m| m["batch_size"].as_u64().unwrap());
        assert_eq!(placement["cpu_up_to_batch_size"], up_to, "{placement}");
        assert!(
            measured.iter().rev().skip(1).all(wins)
                && (!wins(measured.last().unwrap()) || sizes.last() == Some(&64)),
            "{placement}"
        );
        let device = entry["inference_device"].as_str().unwrap();
        assert_eq!(device == "cpu", up_to == 64, "{entry}");
        assert!(!placement["rule"].as_str().unwrap().is_empty());
    }
    assert!(server.log().contains("batches placed by size"));
    // Lone requests and full batches, from clients in flight: every answer the model's, in
    // order, whichever engine ran it.
    let (io, plan) = example_mlp("mlp64");
    let cpu = MlpBackend::new(io, plan);
    for name in ["auto", "auto_flight"] {
        std::thread::scope(|s| {
            for c in 0..3usize {
                let (server, cpu) = (&server, &cpu);
                s.spawn(move || {
                    let mut client =
                        tie_client::Client::connect(&server.endpoint, name, server.options())
                            .unwrap();
                    // Alternately one request at a time and bursts of 40.
                    crate::common::stream_checked(
                        &mut client,
                        &format!("{name}, client {c}"),
                        c,
                        2000,
                        &|next| {
                            if (next / 200).is_multiple_of(2) {
                                1
                            } else {
                                40
                            }
                        },
                        cpu,
                        Tolerance::Elementwise(1e-5),
                    );
                });
            }
        });
    }
}
