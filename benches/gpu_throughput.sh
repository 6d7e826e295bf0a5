#!/usr/bin/env bash
# GPU throughput under load, end to end: `wide16` (models/mlp256, 256→512→512→256→8, fp16 on
# the GPU, batch_timeout_us = 20, max_batch_size = 256 by default) served by `tie serve` with
# pinned, spinning pollers; tie-loadgen open loop from several worker processes at each rate;
# NVML's GPU utilisation sampled by nvidia-smi during each run; the server's own figures for each
# rate (from /metrics before and after it: batches, mean rows per batch, mean time per stage);
# PyTorch's CUDA-graph anchor in the same call. Prints two lines per rate and the anchor.
#
#   bash benches/gpu_throughput.sh OUT_DIR     # on the lent GPU machine, from the bundle
#                                              # (../shared/tools/gpu-bundle --features cuda;
#                                              #  carry [".gpu-bundle", ".anchors"])
#
# Environment: POLLER_CORES (default 2,3,4,5), POLLERS (the model's `pollers`: how many of them
# its sessions are spread over; default 4), WORKER_CORES (default 8-15, one worker each),
# RATES (requests per second, all workers together; default 2000000,4000000,5000000,6000000,
# 7000000), SECONDS_PER_RATE (default 4), PIPELINE_DEPTH (the model's pipeline_depth, default
# 3; 0: the poller waits for each batch), BATCH_TIMEOUT_US (the model's batch_timeout_us, default
# 20), BACKEND (the model's backend, default cuda; auto: each batch on the engine measured
# faster for its size), DETERMINISTIC (the model's `deterministic`, default false; true: the
# fused kernels only), MAX_BATCH_SIZE (the model's `max_batch_size`, default 256: the largest
# batch, and so the largest graph bucket), MAX_QUEUE_SIZE (the model's `max_queue_size`, default
# the server's 1024), ANCHORS (default .anchors), NVML_SAMPLE_MS (how often nvidia-smi samples
# the GPU's utilisation during a rate, default 100; 0: not at all, to see whether the sampling
# itself disturbs the run), BIN_DIR (a folder holding release builds of tie and tie-loadgen made
# with --features cuda, used instead of the bundle or a build here).
set -u
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-gpu-throughput-out}")
mkdir -p "$out"
anchors=$(realpath -m "${ANCHORS:-.anchors}")
poller_cores=${POLLER_CORES:-2,3,4,5}
worker_cores=${WORKER_CORES:-8,9,10,11,12,13,14,15}
workers=$(echo "$worker_cores" | tr ',' '\n' | wc -l)
rates=${RATES:-2000000,4000000,5000000,6000000,7000000}
seconds=${SECONDS_PER_RATE:-4}
nvml_ms=${NVML_SAMPLE_MS:-100}

if [ -n "${BIN_DIR:-}" ]; then
  root=$(pwd)
  tie_bin=$(realpath -m "$BIN_DIR/tie"); loadgen=$(realpath -m "$BIN_DIR/tie-loadgen")
  [ -x "$tie_bin" ] && [ -x "$loadgen" ] || { echo "BIN_DIR=$BIN_DIR holds no executable tie and tie-loadgen"; exit 1; }
elif [ -d .gpu-bundle ]; then
  bash .gpu-bundle/run.sh exec true >/dev/null
  root=$(cat .gpu-bundle/ROOT)
  tie_bin=$root/$(grep '^bin tie ' .gpu-bundle/manifest | awk '{print $3}')
  loadgen=$root/$(grep '^bin tie-loadgen ' .gpu-bundle/manifest | awk '{print $3}')
else
  cargo build --release --features cuda --bins >&2 || exit 1
  root=$(pwd)
  tie_bin=$root/target/release/tie; loadgen=$root/target/release/tie-loadgen
fi

work=$(mktemp -d)
mkdir -p "$work/models/wide16/1"
cp "$root/models/mlp256/1/model.onnx" "$work/models/wide16/1/model.onnx"
printf 'backend = "%s"\nprecision = "fp16"\nbatch_timeout_us = %s\nmax_batch_size = %s\npipeline_depth = %s\npollers = %s\ndeterministic = %s\n' \
  "${BACKEND:-cuda}" "${BATCH_TIMEOUT_US:-20}" "${MAX_BATCH_SIZE:-256}" "${PIPELINE_DEPTH:-3}" "${POLLERS:-4}" "${DETERMINISTIC:-false}" > "$work/models/wide16/config.toml"
[ -n "${MAX_QUEUE_SIZE:-}" ] && printf 'max_queue_size = %s\n' "$MAX_QUEUE_SIZE" >> "$work/models/wide16/config.toml"
printf '[server]\npoller_cores = [%s]\nidle = "spin"\n' "$poller_cores" > "$out/serve.toml"
"$tie_bin" serve --config "$out/serve.toml" --model-repository "$work/models" --socket-dir "$work" \
  --endpoint gpu --http-addr 127.0.0.1:0 > "$out/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 1 600); do [ -S "$work/gpu.sock" ] && break; kill -0 $serve_pid 2>/dev/null || break; sleep 0.2; done
if [ ! -S "$work/gpu.sock" ]; then
  echo "the server did not start: see $out/serve.log"; tail -20 "$out/serve.log"; exit 1
fi

# The control plane's address, for /metrics (the server logs it once listening).
http_addr=
for _ in $(seq 1 50); do
  http_addr=$(grep -o 'addr=[0-9.]*:[0-9]*' "$out/serve.log" | head -1 | cut -d= -f2)
  [ -n "$http_addr" ] && break; sleep 0.1
done
[ -n "$http_addr" ] || echo "warning: the server's HTTP address is not in $out/serve.log: no server figures"
scrape() { : > "$1"; [ -n "$http_addr" ] && curl -sf --max-time 2 "http://$http_addr/metrics" > "$1"; }

echo "machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p' | head -1); card: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
echo "pollers on cores $poller_cores (spinning), the model's sessions over ${POLLERS:-4} of them; backend ${BACKEND:-cuda}; deterministic ${DETERMINISTIC:-false}; max_batch_size ${MAX_BATCH_SIZE:-256}; max_queue_size ${MAX_QUEUE_SIZE:-1024}; pipeline_depth ${PIPELINE_DEPTH:-3}; batch_timeout_us ${BATCH_TIMEOUT_US:-20}; $workers loadgen workers on cores $worker_cores; $seconds s per rate, the first a warm-up; NVML sampled every ${nvml_ms} ms (0: not sampled)"
IFS=',' read -r -a rate_list <<< "$rates"
for rate in "${rate_list[@]}"; do
  : > "$out/nvml-$rate.txt"
  smi=
  if [ "$nvml_ms" -gt 0 ]; then
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms "$nvml_ms" > "$out/nvml-$rate.txt" 2>/dev/null &
    smi=$!
  fi
  scrape "$out/metrics-before-$rate.txt"
  "$loadgen" run --endpoint gpu --socket-dir "$work" --model wide16 --rate "$rate" --workers "$workers" \
    --cores "$worker_cores" --duration "$seconds" --warmup 1 --progress never --out "$out/run-$rate" \
    > "$out/run-$rate.txt" 2>&1
  status=$?
  [ -n "$smi" ] && { kill $smi 2>/dev/null; wait $smi 2>/dev/null; }
  # The monitor publishes its figures once a second: wait for the run's last ones. They
  # include the warm-up second, which the load generator's figures leave out.
  sleep 1.2
  scrape "$out/metrics-after-$rate.txt"
  python3 - "$out/run-$rate/summary.json" "$out/nvml-$rate.txt" "$rate" "$status" \
    "$out/metrics-before-$rate.txt" "$out/metrics-after-$rate.txt" "$nvml_ms" <<'PY'
import json, re, sys
summary, nvml, rate, status, before, after, nvml_ms = sys.argv[1:8]

def server_figures(path):
    # Sums over the model's series: batches, rows, and each stage's latency sum and count.
    d = {}
    try:
        for line in open(path):
            m = re.match(r'(tie_batches_total|tie_batch_rows_total|tie_latency_seconds_sum'
                         r'|tie_latency_seconds_count)\{([^}]*)\} (\S+)', line)
            if m:
                stage = re.search(r'stage="([a-z_]+)"', m.group(2))
                key = (m.group(1), stage.group(1) if stage else '')
                d[key] = d.get(key, 0.0) + float(m.group(3))
    except OSError:
        pass
    return d
try:
    s = json.load(open(summary))
except Exception as e:
    print(f"rate {rate}: no summary ({e}); exit {status}")
    sys.exit(0)
util = [float(l) for l in open(nvml) if l.strip().replace('.', '', 1).isdigit()]
# The middle of the run (the first and last second are warm-up and drain).
per_second = 1000 // max(int(nvml_ms), 1)
mid = util[per_second:-per_second] if len(util) > 3 * per_second else util
nvml_text = (f"mean {sum(mid) / len(mid):.0f}% max {max(mid):.0f}%" if mid else "not sampled")
print(f"rate {int(rate):>9}/s: achieved {s['achieved_rps']/1e6:.3f} M/s, p50 {s['p50_us']:.1f} us, "
      f"p99 {s['p99_us']:.1f} us, p99.9 {s['p99_9_us']:.1f} us, errors {dict(s['errors']) or 0}, "
      f"unanswered {s['unanswered']}, send lag p99 {s['send_lag_p99_us']:.1f} us, "
      f"GPU utilisation (NVML) {nvml_text}; exit {status}")
b, a = server_figures(before), server_figures(after)
delta = lambda k: a.get(k, 0.0) - b.get(k, 0.0)
batches, rows = delta(('tie_batches_total', '')), delta(('tie_batch_rows_total', ''))
if batches > 0:
    stages = []
    for stage in ('queue', 'gather', 'execute', 'compute', 'total'):
        n = delta(('tie_latency_seconds_count', stage))
        if n > 0:
            stages.append(f"{stage} {delta(('tie_latency_seconds_sum', stage)) / n * 1e6:.1f} us")
    print(f"    server: {batches:.0f} batches, mean {rows / batches:.1f} rows; mean per stage: "
          + ', '.join(stages))
else:
    print("    server: no figures (/metrics not read)")
PY
done
kill -TERM $serve_pid; wait $serve_pid 2>/dev/null
grep -E "GPU pipeline built|engines=" "$out/serve.log" | head -8 | cut -c1-400
if [ -f "$anchors/gpu_mlp_anchor.py" ]; then
  (N=3000 timeout 200 python3 "$anchors/gpu_mlp_anchor.py") > "$out/anchor-torch.txt" 2>&1
  grep -i "cudagraph" "$out/anchor-torch.txt" | sed 's/^/anchor torch /'
else
  echo "anchor: not measured ($anchors/gpu_mlp_anchor.py missing)"
fi
rm -rf "$work"
