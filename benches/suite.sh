#!/usr/bin/env bash
# The standard benchmark suite, on whatever machine it runs on; prints a dated section for
# BENCHMARKS.md (machine, card, every figure, the anchors measured in the same run).
#
#   benches/suite.sh [OUT_DIR]                      # here: builds with cargo (release)
#   bash benches/suite.sh OUT_DIR                   # on the lent GPU machine, from the bundle:
#                                                   #   ../shared/tools/gpu-bundle --features cuda
#                                                   #   carry [".gpu-bundle", ".anchors"], run with BUNDLE=1
#
# Anchors are read from $ANCHORS (default .anchors, a copy of ../shared/anchors: pingpong.c,
# graph_floor.cu, gpu_mlp_anchor.py); a missing one is reported as not measured. Cores:
# CLIENT_CORE (default 0) and SERVER_CORE (default 1) for the latency runs.
#
# Suite: ring round trip (e2e_latency, identity model), CPU MLP batch 1 (e2e_latency, mlp64),
# GPU MLP batch 1 and throughput at batch 64/256 (bench gpu, when a GPU is usable), and an
# open-loop sweep with tie-loadgen against a served model (latency-throughput knee).
set -u
cd "$(dirname "$0")/.."
out=${1:-bench-out}
mkdir -p "$out"
out=$(realpath "$out")
anchors=$(realpath "${ANCHORS:-.anchors}")
client_core=${CLIENT_CORE:-0}
server_core=${SERVER_CORE:-1}
date=$(date -u +%Y-%m-%d)

if [ "${BUNDLE:-0}" = 1 ]; then
  bash .gpu-bundle/run.sh exec true >/dev/null
  root=$(cat .gpu-bundle/ROOT)
  exe() { echo "$root/$(grep "^$1 $2 " .gpu-bundle/manifest | head -1 | awk '{print $3}')"; }
  e2e=$(exe bench e2e_latency); gpu=$(exe bench gpu)
  tie_bin=$root/$(grep '^bin tie ' .gpu-bundle/manifest | awk '{print $3}')
  loadgen=$root/$(grep '^bin tie-loadgen ' .gpu-bundle/manifest | awk '{print $3}')
else
  cargo build --release --bins >&2 || exit 1
  cargo bench --no-run --bench e2e_latency --bench gpu >&2 || exit 1
  root=$(pwd)
  pick() { ls -t target/release/deps/$1-* | grep -v '\.d$' | head -1; }
  e2e=$root/$(pick e2e_latency); gpu=$root/$(pick gpu)
  tie_bin=$root/target/release/tie; loadgen=$root/target/release/tie-loadgen
fi

{
  echo "## $date — standard suite ($(hostname))"
  echo
  echo "Machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p' | head -1), Linux $(uname -r)."
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "Card: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)."
  else
    echo "Card: none."
  fi
  echo "Method: \`benches/suite.sh\` (release build); client (and the sweep's worker) on core $client_core, server poller on core $server_core (spinning)."
  echo
} > "$out/section.md"

# Anchor: ping-pong between the two cores, before and after the latency runs.
pingpong() {
  if [ -f "$anchors/pingpong.c" ]; then
    gcc -O2 -o "$out/pp" "$anchors/pingpong.c" -lpthread 2>/dev/null && "$out/pp" 1000000 "$client_core" "$server_core" | tail -1 \
      || echo "pingpong: not measured (build or run failed)"
  else
    echo "pingpong: not measured ($anchors/pingpong.c missing)"
  fi
}
pp_before=$(pingpong)
(cd "$root" && ITERS=${ITERS:-300000} CLIENT_CORE=$client_core SERVER_CORE=$server_core "$e2e" --bench) > "$out/e2e_latency.txt" 2>"$out/e2e_latency.err" \
  || echo "e2e_latency failed: see $out/e2e_latency.err" >> "$out/e2e_latency.txt"
pp_after=$(pingpong)

gpu_lines="GPU: not measured (no usable GPU)"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  (cd "$root" && ITERS=${GPU_ITERS:-50000} CLIENT_CORE=$client_core SERVER_CORE=$server_core "$gpu" --bench) > "$out/gpu.txt" 2>"$out/gpu.err" \
    || echo "GPU bench failed: see $out/gpu.err" >> "$out/gpu.txt"
  gpu_lines=$(grep -E -A1 "^(e2e )" "$out/gpu.txt"; grep -E "^(backend gpu64 batch (1|64|256) |backend wide16 batch (64|256) )|failed|SKIP" "$out/gpu.txt")
  [ -n "$gpu_lines" ] || gpu_lines="GPU: not measured (see $out/gpu.txt)"
  if [ -f "$anchors/graph_floor.cu" ] && command -v nvcc >/dev/null; then
    (cd "$out" && nvcc -O2 -arch=sm_90 -o gf "$anchors/graph_floor.cu" 2>/dev/null && taskset -c "$server_core" ./gf) > "$out/anchor-graph.txt" 2>&1
  fi
  if [ -f "$anchors/gpu_mlp_anchor.py" ]; then
    (N=3000 timeout 200 python3 "$anchors/gpu_mlp_anchor.py") > "$out/anchor-torch.txt" 2>&1
  fi
fi

# Open-loop sweep against a served mlp64 (the CPU backend unless a GPU is usable).
sock=$(mktemp -d)
mkdir -p "$sock/models" && ln -s "$root/models/mlp64" "$sock/models/mlp64"
printf '[server]\npoller_cores = [%s]\n' "$server_core" > "$out/serve.toml"
"$tie_bin" serve --config "$out/serve.toml" --model-repository "$sock/models" --socket-dir "$sock" \
  --endpoint suite --http-addr 127.0.0.1:0 > "$out/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 1 300); do [ -S "$sock/suite.sock" ] && break; kill -0 $serve_pid 2>/dev/null || break; sleep 0.2; done
if [ -S "$sock/suite.sock" ]; then
  "$loadgen" sweep --endpoint suite --socket-dir "$sock" --model mlp64 --rates "${SWEEP_RATES:-1000,5000,20000,50000,100000}" \
    --p99-bound-us "${SWEEP_P99_US:-200}" --duration "${SWEEP_SECONDS:-3}" --warmup 0.5 --cores "$client_core" --out "$out/sweep" > "$out/sweep.txt" 2>&1 \
    || echo "sweep failed" >> "$out/sweep.txt"
else
  echo "sweep: not measured (the server did not start: see $out/serve.log)" > "$out/sweep.txt"
fi
kill -TERM $serve_pid; wait $serve_pid 2>/dev/null
# The chart: each rate's latency by percentile (its first worker's log), and the sweep.
"$tie_bin" report --summary "$out/sweep/sweep.json" "$out"/sweep/rate-*/worker-0.hlog --chart "$out/sweep.png" \
  | grep -v "^  " >> "$out/sweep.txt" 2>&1

{
  echo '```text'
  echo "anchor pingpong (before): $pp_before"
  grep -E "^e2e |^backend mlp64 \(cpu-mlp\) batch 1 " "$out/e2e_latency.txt"
  echo "anchor pingpong (after):  $pp_after"
  echo "$gpu_lines"
  [ -s "$out/anchor-graph.txt" ] && sed 's/^/anchor /' "$out/anchor-graph.txt" | grep -E "p50"
  [ -s "$out/anchor-torch.txt" ] && grep cudagraph "$out/anchor-torch.txt" | sed 's/^/anchor torch /'
  cat "$out/sweep.txt"
  echo '```'
  echo
  echo "Chart of the sweep: \`$out/sweep.png\`."
} >> "$out/section.md"
cat "$out/section.md"
