"""Anchor for the CPU target: onnxruntime's bare inference latency (1 thread, batch 1) on the
example models, timed as the project times itself (per call, percentiles).

    pip install -r models/requirements.txt
    python3 benches/ort_anchor.py [N]

Prints p50/p99/p99.9/max in microseconds per model.
"""
import os
import sys
import time

import numpy as np
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000


def pct(xs, p):
    return xs[min(len(xs) - 1, int(len(xs) * p))]


for name in ("mlp64", "mlp256"):
    path = os.path.join(ROOT, "models", name, "1", "model.onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = np.sin(np.arange(inp.shape[1], dtype=np.float32) * 0.37).reshape(1, -1)
    feed = {inp.name: x}
    n = N if name == "mlp64" else N // 10
    for _ in range(5000):
        sess.run(None, feed)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        sess.run(None, feed)
        ts.append(time.perf_counter_ns() - t0)
    ts.sort()
    print(
        f"onnxruntime {ort.__version__} {name} batch 1, 1 thread: n={n} "
        f"p50={pct(ts, 0.5) / 1e3:.2f}us p99={pct(ts, 0.99) / 1e3:.2f}us "
        f"p99.9={pct(ts, 0.999) / 1e3:.2f}us max={ts[-1] / 1e3:.2f}us"
    )
