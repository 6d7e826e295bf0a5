"""Drives a running tie server's gRPC service with Triton's own gRPC client
(tritonclient[grpc]) and writes what it saw as JSON for the Rust test to check.

usage: oip_grpc.py ADDRESS MODEL FIXTURE.json OUT.json
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

address, model, fixture, out = sys.argv[1:5]
rows = np.array(json.load(open(fixture))["inputs"], dtype=np.float32)
client = grpcclient.InferenceServerClient(url=address)
metadata = client.get_model_metadata(model, as_json=True)
seen = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready(model),
    "version_ready": client.is_model_ready(model, model_version="1"),
    "server": client.get_server_metadata(as_json=True),
    "metadata": metadata,
}
input_name = metadata["inputs"][0]["name"]
output_name = metadata["outputs"][0]["name"]


def tensor(values):
    t = grpcclient.InferInput(input_name, list(values.shape), "FP32")
    t.set_data_from_numpy(values)
    return t


result = client.infer(
    model,
    [tensor(rows)],
    outputs=[grpcclient.InferRequestedOutput(output_name)],
    request_id="grpc-1",
)
seen["outputs"] = result.as_numpy(output_name).tolist()
seen["response"] = result.get_response(as_json=True)
seen["one_row"] = client.infer(model, [tensor(rows[:1])], model_version="1").as_numpy(output_name).tolist()


def error(call):
    try:
        call()
        return None
    except InferenceServerException as e:
        return {"status": e.status(), "message": e.message()}


seen["unknown_model"] = error(lambda: client.infer("no-such-model", [tensor(rows)]))
wide = np.zeros((2, rows.shape[1] + 1), dtype=np.float32)
seen["wrong_shape"] = error(lambda: client.infer(model, [tensor(wide)]))
seen["unknown_model_ready"] = error(lambda: client.is_model_ready("no-such-model"))
json.dump(seen, open(out, "w"))
