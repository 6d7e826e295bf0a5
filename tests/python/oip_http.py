"""Drives a running tie server with Triton's own HTTP client (tritonclient[http]), the way a
Triton user would, and writes what it saw as JSON for the Rust test to check.

usage: oip_http.py URL MODEL FIXTURE.json TOKEN OUT.json
"""

import json
import sys
import time

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

url, model, fixture, token, out = sys.argv[1:6]
rows = np.array(json.load(open(fixture))["inputs"], dtype=np.float32)
client = httpclient.InferenceServerClient(url=url)
seen = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready(model),
    "version_ready": client.is_model_ready(model, model_version="1"),
    "server": client.get_server_metadata(),
    "metadata": client.get_model_metadata(model),
}
input_name = seen["metadata"]["inputs"][0]["name"]
output_name = seen["metadata"]["outputs"][0]["name"]


def tensor(values, binary):
    t = httpclient.InferInput(input_name, list(values.shape), "FP32")
    t.set_data_from_numpy(values, binary_data=binary)
    return t


for binary in (True, False):
    result = client.infer(
        model,
        [tensor(rows, binary)],
        outputs=[httpclient.InferRequestedOutput(output_name, binary_data=binary)],
        request_id=f"binary-{binary}",
    )
    seen[f"binary_{binary}"] = {
        "outputs": result.as_numpy(output_name).tolist(),
        "response": result.get_response(),
    }
# No outputs named: every output, as binary (the client's default).
result = client.infer(model, [tensor(rows[:1], True)], model_version="1")
seen["default_outputs"] = result.as_numpy(output_name).tolist()
seen["default_response"] = result.get_response()


def error(call):
    try:
        call()
        return None
    except InferenceServerException as e:
        return {"status": e.status(), "message": e.message()}


seen["unknown_model"] = error(lambda: client.infer("no-such-model", [tensor(rows, True)]))
wide = np.zeros((2, rows.shape[1] + 1), dtype=np.float32)
seen["wrong_shape"] = error(lambda: client.infer(model, [tensor(wide, True)]))
wrong_name = httpclient.InferInput("not-the-input", list(rows.shape), "FP32")
wrong_name.set_data_from_numpy(rows)
seen["wrong_input"] = error(lambda: client.infer(model, [wrong_name]))
# The monitor gets a poller's figures when it goes idle (or every 50 ms while busy): on a
# loaded machine they may lag the answers a moment.
deadline = time.monotonic() + 10
while True:
    seen["stats"] = client.get_inference_statistics(model)
    if seen["stats"]["model_stats"][0]["inference_count"] >= 16 or time.monotonic() > deadline:
        break
    time.sleep(0.05)
seen["all_stats"] = client.get_inference_statistics()
# timeout 0 is no timeout, as in Triton.
seen["timeout_0"] = client.infer(model, [tensor(rows[:1], True)], timeout=0).as_numpy(output_name).tolist()
seen["index"] = client.get_model_repository_index()
seen["load_without_token"] = error(lambda: client.load_model(model))
client.load_model(model, headers={"Authorization": f"Bearer {token}"})
seen["ready_after_load"] = client.is_model_ready(model)
json.dump(seen, open(out, "w"))
