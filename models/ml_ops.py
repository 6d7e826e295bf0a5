#!/usr/bin/env python3
"""One-op graphs of the ONNX-ML preprocessing and linear ops with onnxruntime's answers, for
their rewriting into ONNX's own ops (crates/engine/src/rewrite/onnx_ml.rs): every norm of
Normalizer, Binarizer, Imputer (NaN and a value replaced, one value or one per feature),
Scaler, LinearRegressor (several targets), LinearClassifier (one score for two classes under
NONE, LOGISTIC and SOFTMAX; several under NONE, LOGISTIC and SOFTMAX; int and string labels, with and
without ZipMap) and ArrayFeatureExtractor (a scalar index and a list).

Rows: random, negative, zero, and (but for Binarizer, which onnxruntime refuses on NaN)
rows with NaN in the first, a middle and the last column. Writes tests/fixtures/ml_ops.json; run from the repository root:

    python3 models/ml_ops.py
"""

import base64
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
WIDTH = 4


def graph(nodes, out_width, inits=(), outputs=None):
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_width])]
    g = helper.make_graph(
        nodes, "ml_op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])], outputs, list(inits)
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def ml(op, inputs=("x",), outputs=("y",), **attrs):
    return helper.make_node(op, list(inputs), list(outputs), domain="ai.onnx.ml", **attrs)


def classifier(rng, classes, post, labels, zipmap):
    """LinearClassifier with `classes` scores; outputs label and scores (or ZipMap's map)."""
    n_scores = 1 if classes == 2 else classes
    attrs = {
        "coefficients": rng.normal(0, 1, n_scores * WIDTH).astype(np.float32).tolist(),
        "intercepts": rng.normal(0, 0.5, n_scores).astype(np.float32).tolist(),
        "post_transform": post,
    }
    if labels == "ints":
        attrs["classlabels_ints"] = list(range(classes))
        label_type = TensorProto.INT64
    else:
        attrs["classlabels_strings"] = [f"c{i}" for i in range(classes)]
        label_type = TensorProto.STRING
    out_width = 2 if n_scores == 1 else classes
    nodes = [ml("LinearClassifier", outputs=("label", "scores"), **attrs)]
    label = helper.make_tensor_value_info("label", label_type, ["N"])
    if zipmap:
        key = "classlabels_int64s" if labels == "ints" else "classlabels_strings"
        nodes.append(ml("ZipMap", inputs=("scores",), outputs=("probs",), **{key: attrs[key.replace("int64s", "ints")]}))
        kind = TensorProto.INT64 if labels == "ints" else TensorProto.STRING
        probs = helper.make_value_info(
            "probs", helper.make_sequence_type_proto(helper.make_map_type_proto(kind, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
        )
        return graph(nodes, out_width, outputs=[label, probs]), out_width, "scores"
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", out_width])
    return graph(nodes, out_width, outputs=[label, scores]), out_width, "scores"


def cases():
    rng = np.random.default_rng(11)
    out = []
    for norm in ["MAX", "L1", "L2"]:
        out.append((f"Normalizer {norm}", graph([ml("Normalizer", norm=norm)], WIDTH), WIDTH, "y", True))
    out.append(("Binarizer 0.3", graph([ml("Binarizer", threshold=0.3)], WIDTH), WIDTH, "y", False))
    out.append(("Imputer NaN per feature", graph([ml("Imputer", imputed_value_floats=[1.0, 2.0, 3.0, 4.0], replaced_value_float=float("nan"))], WIDTH), WIDTH, "y", True))
    out.append(("Imputer 0 one value", graph([ml("Imputer", imputed_value_floats=[9.0], replaced_value_float=0.0)], WIDTH), WIDTH, "y", True))
    out.append(("Scaler per feature", graph([ml("Scaler", offset=[0.5, -1.0, 0.0, 2.0], scale=[2.0, 3.0, 4.0, 5.0])], WIDTH), WIDTH, "y", True))
    out.append(("Scaler one value", graph([ml("Scaler", offset=[0.5], scale=[2.0])], WIDTH), WIDTH, "y", True))
    coef = rng.normal(0, 1, 3 * WIDTH).astype(np.float32).tolist()
    out.append(("LinearRegressor 3 targets", graph([ml("LinearRegressor", coefficients=coef, intercepts=[0.1, 0.2, 0.3], targets=3)], 3), 3, "y", True))
    for classes, post, labels, zipmap in [
        (2, "NONE", "ints", False),
        (2, "LOGISTIC", "strings", True),
        (2, "SOFTMAX", "ints", False),
        (3, "NONE", "ints", False),
        (3, "LOGISTIC", "ints", True),
        (4, "SOFTMAX", "strings", False),
        (4, "SOFTMAX", "ints", True),
    ]:
        model, width, scores = classifier(rng, classes, post, labels, zipmap)
        name = f"LinearClassifier {classes} classes {post} {labels}{' ZipMap' if zipmap else ''}"
        out.append((name, model, width, scores, True))
    idx = helper.make_tensor("idx", TensorProto.INT64, [2], [3, 1])
    out.append(("ArrayFeatureExtractor [3, 1]", graph([ml("ArrayFeatureExtractor", inputs=("x", "idx"))], 2, [idx]), 2, "y", True))
    one = helper.make_tensor("one", TensorProto.INT64, [], [2])
    out.append(("ArrayFeatureExtractor scalar 2", graph([ml("ArrayFeatureExtractor", inputs=("x", "one"))], 1, [one]), 1, "y", True))
    return out


def main():
    rng = np.random.default_rng(5)
    rows = rng.normal(0, 1.5, (5, WIDTH)).astype(np.float32)
    rows = np.concatenate([rows, [[-1, -2, -3, -4], [0, 0, 0, 0], [0.3, 0, -0.5, 2]]]).astype(np.float32)
    nan_row = np.array([[np.nan, 1.0, -2.0, 0.0], [1.0, np.nan, -2.0, 0.5], [1.0, -2.0, 0.5, np.nan]], np.float32)
    fixtures = []
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    for name, model, width, tensor, nan_ok in cases():
        x = np.concatenate([rows, nan_row]) if nan_ok else rows
        oracle = onnx.ModelProto()
        oracle.CopyFrom(model)
        if tensor not in [o.name for o in oracle.graph.output]:
            oracle.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
        sess = ort.InferenceSession(oracle.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        (y,) = sess.run([tensor], {"x": x})
        y = np.asarray(y, np.float32).reshape(len(x), width)
        fixtures.append(
            {
                "description": name,
                "model": base64.b64encode(model.SerializeToString()).decode(),
                "inputs": [[None if np.isnan(v) else float(v) for v in r] for r in x],
                "expected": [[None if np.isnan(v) else float(v) for v in r] for r in y],
            }
        )
        print(name, y.shape)
    (ROOT / "tests" / "fixtures" / "ml_ops.json").write_text(json.dumps(fixtures) + "\n")


if __name__ == "__main__":
    main()
