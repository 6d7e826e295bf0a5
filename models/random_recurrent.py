#!/usr/bin/env python3
"""Random GRU, LSTM and RNN graphs with onnxruntime's answers, for the unrolling of
recurrent ops (crates/engine/src/recurrent.rs).

Each case is a window model: the row [N, steps * features] is reshaped to
[N, steps, features] (and transposed to [steps, N, features] unless the op is batch-first),
run through one recurrent op with random weights, and its outputs Y, Y_h (and Y_c) are
flattened per row and concatenated into the output. Drawn per case: the op, direction
(forward, reverse, bidirectional), layout, hidden size, bias or none, an initial state
computed from the row or none, LSTM peepholes, GRU's linear_before_reset, and the gate
activations (Sigmoid, Tanh, Relu; Relu not as the gate). onnxruntime runs no batch-first (layout 1) recurrent op:
for those cases the answers are its answers for the same op in layout 0.

Writes tests/fixtures/random_recurrent.json; run from the repository root:

    python3 models/random_recurrent.py
"""

import base64
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
GATES = {"GRU": 3, "LSTM": 4, "RNN": 1}
DEFAULTS = {"GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"], "RNN": ["Tanh"]}


def draw(rng, index):
    """The random choices of one case."""
    op = ["GRU", "LSTM", "RNN"][index % 3]
    d = {"op": op, "steps": int(rng.integers(1, 6)), "features": int(rng.integers(1, 5))}
    d["hidden"] = int(rng.integers(1, 7))
    d["direction"] = ["forward", "reverse", "bidirectional"][int(rng.integers(0, 3))]
    dirs = 2 if d["direction"] == "bidirectional" else 1
    g, h, f = GATES[op], d["hidden"], d["features"]
    d["layout"] = int(rng.integers(0, 2))
    d["W"] = rng.normal(0, 0.6, (dirs, g * h, f)).astype(np.float32)
    d["R"] = rng.normal(0, 0.6, (dirs, g * h, h)).astype(np.float32)
    d["B"] = rng.normal(0, 0.3, (dirs, 2 * g * h)).astype(np.float32) if rng.random() < 0.8 else None
    states = ["h0", "c0"] if op == "LSTM" else ["h0"]
    width = d["steps"] * f
    with_state = rng.random() < 0.5
    d["states"] = {s: rng.normal(0, 0.3, (width, dirs * h)).astype(np.float32) for s in states} if with_state else {}
    with_peepholes = op == "LSTM" and rng.random() < 0.5
    d["P"] = rng.normal(0, 0.5, (dirs, 3 * h)).astype(np.float32) if with_peepholes else None
    d["lbr"] = int(op == "GRU" and rng.random() < 0.5)
    d["activations"] = None
    if rng.random() < 0.4:
        # The gate activation (the first of each direction) is Sigmoid or Tanh: with Relu the
        # gates are unbounded, and onnxruntime answered 0.9921875 where the ONNX formula (in
        # numpy) and the unrolled graph give 1.0.
        names = DEFAULTS[op] * dirs
        per_dir = len(DEFAULTS[op])
        choices = ["Sigmoid", "Tanh", "Relu"]
        d["activations"] = [
            a if rng.random() < 0.5 else choices[int(rng.integers(0, 2 if k % per_dir == 0 else 3))]
            for k, a in enumerate(names)
        ]
    d["x"] = rng.normal(0, 1, (5, width)).astype(np.float32)
    return d


def build(d, layout):
    """The case's model with the op in `layout` (0: [steps, N, ...], 1: batch-first)."""
    op, steps, features, hidden = d["op"], d["steps"], d["features"], d["hidden"]
    dirs = 2 if d["direction"] == "bidirectional" else 1
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    width = steps * features
    nodes.append(helper.make_node("Reshape", ["x", const("shape", np.array([-1, steps, features], np.int64))], ["seq"]))
    x = "seq"
    if layout == 0:
        nodes.append(helper.make_node("Transpose", ["seq"], ["seq_t"], perm=[1, 0, 2]))
        x = "seq_t"
    inputs = [x, const("W", d["W"]), const("R", d["R"])]
    inputs.append(const("B", d["B"]) if d["B"] is not None else "")
    inputs.append("")  # sequence_lens
    for s in ["h0", "c0"] if op == "LSTM" else ["h0"]:
        if s not in d["states"]:
            inputs.append("")
            continue
        # A state that depends on the row: tanh(x . M), as [dirs, N, hidden] (or [N, dirs, hidden]).
        nodes.append(helper.make_node("MatMul", ["x", const(f"{s}_m", d["states"][s])], [f"{s}_mm"]))
        nodes.append(helper.make_node("Tanh", [f"{s}_mm"], [f"{s}_t"]))
        shape = const(f"{s}_shape", np.array([-1, dirs, hidden], np.int64))
        nodes.append(helper.make_node("Reshape", [f"{s}_t", shape], [f"{s}_b"]))
        if layout == 0:
            nodes.append(helper.make_node("Transpose", [f"{s}_b"], [s], perm=[1, 0, 2]))
        else:
            nodes.append(helper.make_node("Identity", [f"{s}_b"], [s]))
        inputs.append(s)
    if d["P"] is not None:
        inputs.append(const("P", d["P"]))
    while inputs and inputs[-1] == "":
        inputs.pop()
    attrs = {"hidden_size": hidden, "direction": d["direction"]}
    if layout:
        attrs["layout"] = 1
    if d["lbr"]:
        attrs["linear_before_reset"] = 1
    if d["activations"]:
        attrs["activations"] = d["activations"]
    outputs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    nodes.append(helper.make_node(op, inputs, outputs, **attrs))
    # Flatten each output per row: [N, steps * dirs * hidden], [N, dirs * hidden] (twice for LSTM).
    flat = []
    for name in outputs:
        rank = 4 if name == "Y" else 3
        per_row = name
        if layout == 0:
            perm = [2, 0, 1, 3] if rank == 4 else [1, 0, 2]
            nodes.append(helper.make_node("Transpose", [name], [f"{name}_r"], perm=perm))
            per_row = f"{name}_r"
        size = steps * dirs * hidden if rank == 4 else dirs * hidden
        shape = const(f"{name}_flat", np.array([-1, size], np.int64))
        nodes.append(helper.make_node("Reshape", [per_row, shape], [f"{name}_f"]))
        flat.append(f"{name}_f")
    nodes.append(helper.make_node("Concat", flat, ["y"], axis=1))
    out_width = steps * dirs * hidden + (len(outputs) - 1) * dirs * hidden
    graph = helper.make_graph(
        nodes,
        f"random_{op.lower()}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def case(rng, index):
    d = draw(rng, index)
    model = build(d, d["layout"])
    # onnxruntime runs only layout 0: a batch-first case's answers are those of the same op
    # in layout 0 (the graph transposes around it).
    oracle = build(d, 0)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(oracle.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": d["x"]})
    described = (
        f"{d['op']} {d['direction']} layout={d['layout']} hidden={d['hidden']} steps={d['steps']} "
        f"bias={d['B'] is not None} state={bool(d['states'])} peepholes={d['P'] is not None} "
        f"activations={d['activations']} linear_before_reset={d['lbr']}"
    )
    return {
        "description": described,
        "model": base64.b64encode(model.SerializeToString()).decode(),
        "inputs": d["x"].tolist(),
        "expected": np.asarray(y, np.float32).tolist(),
    }


def main():
    rng = np.random.default_rng(7)
    cases = []
    for i in range(60):
        cases.append(case(rng, i))
    (ROOT / "tests" / "fixtures" / "random_recurrent.json").write_text(json.dumps(cases) + "\n")
    print("random_recurrent", len(cases))


if __name__ == "__main__":
    main()
