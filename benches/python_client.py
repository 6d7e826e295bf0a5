"""One row's round trip from Python: tie's Python client (`predict`, through the ring of a
running `tie serve`) beside onnxruntime's in-process `session.run` on the same model file, in
the same run; and `predict_batch` rows per second.

usage: python3 benches/python_client.py ENDPOINT SOCKET_DIR MODEL MODEL.onnx
Prints p50, p99 and mean (µs) of 20,000 calls after 2,000 not counted, then the batch rates.
Needs the tie_client package (python/, built with maturin --release), onnxruntime and numpy.
"""

import sys
import time

import numpy as np
import onnxruntime as ort

import tie_client

endpoint, socket_dir, model, path = sys.argv[1:5]
WARMUP, COUNT = 2_000, 20_000


def measure(call, rows):
    for i in range(WARMUP):
        call(rows[i % len(rows)])
    times = np.empty(COUNT)
    for i in range(COUNT):
        row = rows[i % len(rows)]
        start = time.perf_counter_ns()
        call(row)
        times[i] = time.perf_counter_ns() - start
    times /= 1e3
    return np.percentile(times, 50), np.percentile(times, 99), times.mean()


options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
input_name = session.get_inputs()[0].name
client = tie_client.Client(endpoint, model, socket_dir=socket_dir)
rows = np.random.default_rng(1).standard_normal((256, client.feature_count)).astype(np.float32)
single = [r.reshape(1, -1) for r in rows]


def ort_run(row):
    session.run(None, {input_name: row})


for name, call, data in [
    ("onnxruntime session.run (in process, 1 thread)", ort_run, single),
    ("tie_client predict (ring)", client.predict, rows),
]:
    p50, p99, mean = measure(call, data)
    print(f"{model} {name:<48} p50 {p50:7.2f} p99 {p99:7.2f} mean {mean:7.2f} µs")

for batch in (256, 10_000):
    data = np.random.default_rng(2).standard_normal((batch, client.feature_count)).astype(np.float32)
    client.predict_batch(data)
    runs = max(1, 200_000 // batch)
    start = time.perf_counter()
    for _ in range(runs):
        client.predict_batch(data)
    rate = runs * batch / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, {input_name: data})
    ort_rate = runs * batch / (time.perf_counter() - start)
    print(f"{model} batch {batch:>6}: tie_client predict_batch {rate:12,.0f} rows/s; onnxruntime session.run {ort_rate:12,.0f} rows/s")
