"""Round trips of one prediction from Python through each HTTP and gRPC way into a running tie
server: tie's own JSON API (one kept-alive connection, http.client), tritonclient.http (binary
tensors, its default) and tritonclient.grpc, for one model at the given batch sizes.

usage: python3 benches/oip_clients.py HTTP_HOST:PORT GRPC_HOST:PORT MODEL WIDTH [BATCHES]
(BATCHES: comma-separated, default 1,64). Prints one line per way and batch: p50, p99 and mean
in µs over 2,000 round trips after 200 not counted. Needs tritonclient[http,grpc] and numpy.
"""

import http.client
import json
import sys
import time

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

http_addr, grpc_addr, model, width = sys.argv[1:5]
width = int(width)
batches = [int(b) for b in (sys.argv[5] if len(sys.argv) > 5 else "1,64").split(",")]
WARMUP, COUNT = 200, 2000


def measure(call):
    for _ in range(WARMUP):
        call()
    times = np.empty(COUNT)
    for i in range(COUNT):
        start = time.perf_counter_ns()
        call()
        times[i] = time.perf_counter_ns() - start
    times /= 1e3
    return np.percentile(times, 50), np.percentile(times, 99), times.mean()


host, port = http_addr.split(":")
connection = http.client.HTTPConnection(host, int(port))
http_triton = httpclient.InferenceServerClient(http_addr)
grpc_triton = grpcclient.InferenceServerClient(grpc_addr)
meta = http_triton.get_model_metadata(model)
input_name = meta["inputs"][0]["name"]
output_name = meta["outputs"][0]["name"]
rng = np.random.default_rng(1)

for batch in batches:
    rows = rng.standard_normal((batch, width)).astype(np.float32)
    body = json.dumps(
        {
            "request_id": "bench",
            "model_name": model,
            "input_features": rows.ravel().tolist(),
            "batch_size": batch,
        }
    )

    def own_json():
        connection.request(
            "POST",
            "/api/v1/internal/inference/predict",
            body,
            {"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        answer = response.read()
        assert response.status == 200, answer

    http_input = httpclient.InferInput(input_name, [batch, width], "FP32")
    http_input.set_data_from_numpy(rows)
    http_output = [httpclient.InferRequestedOutput(output_name)]

    def triton_http():
        http_triton.infer(model, [http_input], outputs=http_output).as_numpy(output_name)

    grpc_input = grpcclient.InferInput(input_name, [batch, width], "FP32")
    grpc_input.set_data_from_numpy(rows)

    def triton_grpc():
        grpc_triton.infer(model, [grpc_input]).as_numpy(output_name)

    for name, call in [
        ("tie JSON API (http.client)", own_json),
        ("tritonclient.http (binary)", triton_http),
        ("tritonclient.grpc", triton_grpc),
    ]:
        p50, p99, mean = measure(call)
        print(f"{model} batch {batch:>3} {name:<28} p50 {p50:8.1f} p99 {p99:8.1f} mean {mean:8.1f} µs")
