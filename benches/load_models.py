"""The spec's load-time models: a 1 GB fp32 MLP and a 2,000-tree LightGBM ensemble.

    python3 benches/load_models.py OUT_DIR

writes OUT_DIR/mlp1g/1/model.onnx (256 -> 8192 x5 -> 8, ReLU, about 1.08 GB of float32
weights) and OUT_DIR/lgbm2000/1/model.txt (LightGBM, 2,000 trees of up to 63 leaves over 100
features, trained on random data), a model repository for `tie serve`. Needs numpy, onnx and
lightgbm (models/requirements-exported.txt).
"""
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

out = sys.argv[1] if len(sys.argv) > 1 else "target/bench-load"
rng = np.random.default_rng(7)

widths = [256, 8192, 8192, 8192, 8192, 8192, 8]
nodes, inits = [], []
x = "x"
for i, (a, b) in enumerate(zip(widths, widths[1:])):
    w = (rng.standard_normal((a, b), dtype=np.float32) / np.sqrt(a)).astype(np.float32)
    inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}")]
    y = f"h{i}" if i < len(widths) - 2 else "y"
    nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [y if i == len(widths) - 2 else f"g{i}"]))
    if i < len(widths) - 2:
        nodes.append(helper.make_node("Relu", [f"g{i}"], [y]))
    x = y
graph = helper.make_graph(
    nodes, "mlp1g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", widths[0]])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", widths[-1]])],
    inits)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
os.makedirs(f"{out}/mlp1g/1", exist_ok=True)
onnx.save_model(model, f"{out}/mlp1g/1/model.onnx")
params = sum(a * b + b for a, b in zip(widths, widths[1:]))
print(f"mlp1g: {params:,} parameters, {os.path.getsize(f'{out}/mlp1g/1/model.onnx') / 2**30:.2f} GiB")

import lightgbm as lgb

X = rng.standard_normal((20_000, 100)).astype(np.float32)
y = X[:, :10].sum(axis=1) + 0.1 * rng.standard_normal(20_000)
booster = lgb.train(
    {"objective": "regression", "num_leaves": 63, "learning_rate": 0.05, "verbose": -1,
     "num_threads": 2, "min_data_in_leaf": 5},
    lgb.Dataset(X, y), num_boost_round=2000)
os.makedirs(f"{out}/lgbm2000/1", exist_ok=True)
booster.save_model(f"{out}/lgbm2000/1/model.txt")
print(f"lgbm2000: {booster.num_trees()} trees, "
      f"{os.path.getsize(f'{out}/lgbm2000/1/model.txt') / 2**20:.1f} MiB")
