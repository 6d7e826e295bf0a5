"""Random tree ensembles of the three ONNX-ML tree ops, with onnxruntime's answers (
onnxruntime 1.32 reads opset 5's SOFTMAX and LOGISTIC codes swapped, so it is asked with
the other code): the fixture `tests/fixtures/random_trees.json`
that the tree engine is compared with.

Called by generate_exported.py. Each case is one model (its bytes, base64) with rows that
hit thresholds exactly, carry NaN, and sit on set members. The cases cover every node mode
(MEMBER on opset 5), missing directions, targets, aggregates, post-transforms, base values,
and classifiers of 2 and more classes (binary with one class's weights, all positive or
mixed, and with both classes' weights).
"""

import base64

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

FEATURES = 4
MODES = ["BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT", "BRANCH_EQ", "BRANCH_NEQ"]
POSTS = ["NONE", "SOFTMAX", "LOGISTIC", "SOFTMAX_ZERO", "PROBIT"]
AGGREGATES = ["AVERAGE", "SUM", "MIN", "MAX"]


def grid(rng):
    return float((rng.integers(0, 9) - 4) / 2.0)


def random_trees(rng, member):
    """Trees as lists of nodes: (mode, feature, value or set, true, false, missing) for
    branches, ("LEAF",) for leaves; children by index into the tree's list."""
    trees = []
    for _ in range(int(rng.integers(1, 6))):
        depth = int(rng.integers(0, 5))
        count = 2 ** (depth + 1) - 1
        nodes = []
        for k in range(count):
            if k >= count // 2:
                nodes.append(("LEAF",))
                continue
            modes = MODES + (["BRANCH_MEMBER"] if member else [])
            mode = modes[int(rng.integers(0, len(modes)))]
            value = (
                # onnxruntime takes integral members only (categories).
                sorted({float(rng.integers(-2, 3)) for _ in range(int(rng.integers(1, 4)))})
                if mode == "BRANCH_MEMBER"
                else grid(rng)
            )
            nodes.append((mode, int(rng.integers(0, FEATURES)), value, 2 * k + 1, 2 * k + 2, int(rng.integers(0, 2))))
        trees.append(nodes)
    return trees


def classic(op, trees, rng, targets, extra):
    """TreeEnsembleRegressor or TreeEnsembleClassifier (ai.onnx.ml opset 3) of `trees`, the
    node ids of each tree shuffled."""
    a = {k: [] for k in ("treeids", "nodeids", "featureids", "modes", "values", "true", "false", "missing")}
    w = {k: [] for k in ("tree", "node", "id", "weight")}
    classes = extra.pop("weight_classes")
    positive = extra.pop("positive")
    for t, nodes in enumerate(trees):
        ids = list(rng.permutation(len(nodes)))
        for k, n in enumerate(nodes):
            a["treeids"].append(t)
            a["nodeids"].append(int(ids[k]))
            if n[0] == "LEAF":
                a["featureids"].append(0)
                a["modes"].append("LEAF")
                a["values"].append(0.0)
                a["true"].append(0)
                a["false"].append(0)
                a["missing"].append(0)
                for c in classes:
                    if rng.random() < 0.8 or c == classes[0]:
                        w["tree"].append(t)
                        w["node"].append(int(ids[k]))
                        w["id"].append(c)
                        v = grid(rng) + float(rng.random())
                        w["weight"].append(abs(v) / 4 if positive else v)
                continue
            mode, feature, value, tt, ff, missing = n
            a["featureids"].append(feature)
            a["modes"].append(mode)
            a["values"].append(value)
            a["true"].append(int(ids[tt]))
            a["false"].append(int(ids[ff]))
            a["missing"].append(missing)
    prefix = "target" if op == "TreeEnsembleRegressor" else "class"
    attrs = dict(
        nodes_treeids=a["treeids"],
        nodes_nodeids=a["nodeids"],
        nodes_featureids=a["featureids"],
        nodes_modes=a["modes"],
        nodes_values=a["values"],
        nodes_truenodeids=a["true"],
        nodes_falsenodeids=a["false"],
        nodes_missing_value_tracks_true=a["missing"],
        **{
            f"{prefix}_treeids": w["tree"],
            f"{prefix}_nodeids": w["node"],
            f"{prefix}_ids": w["id"],
            f"{prefix}_weights": w["weight"],
        },
        **extra,
    )
    return helper.make_node(op, ["X"], ["Y"] if op == "TreeEnsembleRegressor" else ["L", "Y"], domain="ai.onnx.ml", **attrs)


def opset5(trees, rng, targets, post, aggregate):
    """TreeEnsemble (ai.onnx.ml opset 5): leaves in their own arrays, one target each."""
    a = {k: [] for k in ("feature", "mode", "split", "true", "trueleaf", "false", "falseleaf", "missing")}
    leaves = {"target": [], "weight": []}
    members = []
    roots = []
    for nodes in trees:
        if nodes[0][0] == "LEAF":
            # A one-leaf tree has no branch to be the root of: two leaves, equal.
            nodes = [("BRANCH_LEQ", 0, 0.0, 1, 2, 0), ("LEAF",), ("LEAF",)]
        leaf_index = {}
        for k, n in enumerate(nodes):
            if n[0] == "LEAF":
                leaf_index[k] = len(leaves["target"])
                leaves["target"].append(int(rng.integers(0, targets)))
                leaves["weight"].append(grid(rng) + float(rng.random()))
        base = len(a["feature"])
        branch_ids = {k: base + i for i, k in enumerate(k for k, n in enumerate(nodes) if n[0] != "LEAF")}
        roots.append(branch_ids[0])
        for k, n in enumerate(nodes):
            if n[0] == "LEAF":
                continue
            mode, feature, value, tt, ff, missing = n
            a["feature"].append(feature)
            a["mode"].append(6 if mode == "BRANCH_MEMBER" else MODES.index(mode))
            if mode == "BRANCH_MEMBER":
                members += value + [float("nan")]
                a["split"].append(0.0)
            else:
                a["split"].append(value)
            for child, ids, leafs in ((tt, "true", "trueleaf"), (ff, "false", "falseleaf")):
                if nodes[child][0] == "LEAF":
                    a[ids].append(leaf_index[child])
                    a[leafs].append(1)
                else:
                    a[ids].append(branch_ids[child])
                    a[leafs].append(0)
            a["missing"].append(missing)
    attrs = dict(
        nodes_featureids=a["feature"],
        nodes_modes=numpy_helper.from_array(np.array(a["mode"], np.uint8)),
        nodes_splits=numpy_helper.from_array(np.array(a["split"], np.float32)),
        nodes_truenodeids=a["true"],
        nodes_trueleafs=a["trueleaf"],
        nodes_falsenodeids=a["false"],
        nodes_falseleafs=a["falseleaf"],
        nodes_missing_value_tracks_true=a["missing"],
        leaf_targetids=leaves["target"],
        leaf_weights=numpy_helper.from_array(np.array(leaves["weight"], np.float32)),
        tree_roots=roots,
        n_targets=targets,
        post_transform=POSTS.index(post),
        aggregate_function=AGGREGATES.index(aggregate),
    )
    if members:
        attrs["membership_values"] = numpy_helper.from_array(np.array(members, np.float32))
    return helper.make_node("TreeEnsemble", ["X"], ["Y"], domain="ai.onnx.ml", **attrs)


def case(rng):
    kind = ["regressor", "classifier", "opset5"][int(rng.integers(0, 3))]
    post = POSTS[int(rng.integers(0, len(POSTS)))]
    trees = random_trees(rng, member=kind == "opset5")
    if kind == "regressor":
        targets = int(rng.integers(1, 4))
        extra = dict(
            n_targets=targets,
            aggregate_function=AGGREGATES[int(rng.integers(0, 4))],
            post_transform=post,
            weight_classes=list(range(targets)),
            positive=False,
        )
        if rng.random() < 0.7:
            extra["base_values"] = [grid(rng) for _ in range(targets)]
        node = classic("TreeEnsembleRegressor", trees, rng, targets, extra)
        opsets = [("", 17), ("ai.onnx.ml", 3)]
        width = targets
    elif kind == "classifier":
        classes = [2, 3, 5][int(rng.integers(0, 3))]
        if classes == 2 and rng.random() < 0.6:
            # One class's weights: onnxruntime's "binary case".
            weight_classes = [0]
            positive = bool(rng.random() < 0.5)
            if post == "PROBIT":
                post = "LOGISTIC"
            bases = [None, 1]
        else:
            weight_classes = list(range(classes))
            positive = False
            # Two classes with two base values: onnxruntime adds class 1's base value to
            # class 0's score (the engine refuses such a model).
            bases = [None, 1 if classes == 2 else classes]
        extra = dict(
            classlabels_int64s=list(range(classes)),
            post_transform=post,
            weight_classes=weight_classes,
            positive=positive,
        )
        base = bases[int(rng.integers(0, 2))]
        if base:
            extra["base_values"] = [grid(rng) / 4 for _ in range(base)]
        node = classic("TreeEnsembleClassifier", trees, rng, classes, extra)
        opsets = [("", 17), ("ai.onnx.ml", 3)]
        width = classes
    else:
        targets = int(rng.integers(1, 4))
        node = opset5(trees, rng, targets, post, AGGREGATES[int(rng.integers(0, 4))])
        opsets = [("", 21), ("ai.onnx.ml", 5)]
        width = targets
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, width])]
    if kind == "classifier":
        outputs.insert(0, helper.make_tensor_value_info("L", TensorProto.INT64, [None]))
    graph = helper.make_graph(
        [node], "random", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, FEATURES])], outputs
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 10 if kind == "opset5" else 8
    def value():
        if rng.random() < 0.15:
            return np.nan
        if kind == "opset5":
            # Integers only: onnxruntime tests a set of several members on the value
            # truncated to an integer (a set of one, exactly), where ONNX says "in the set".
            return float(rng.integers(-3, 4))
        return grid(rng) if rng.random() < 0.6 else rng.normal() * 2

    rows = np.array([[value() for _ in range(FEATURES)] for _ in range(12)], np.float32)
    oracle = "onnxruntime"
    asked = model
    if kind == "opset5" and post in ("SOFTMAX", "LOGISTIC"):
        # onnxruntime 1.32 reads TreeEnsemble's post_transform codes 1 (SOFTMAX) and 2
        # (LOGISTIC) swapped: it is asked with the other code, to apply the one meant.
        asked = onnx.ModelProto()
        asked.CopyFrom(model)
        for a in asked.graph.node[0].attribute:
            if a.name == "post_transform":
                a.i = 3 - a.i
        oracle = "onnxruntime (post_transform code swapped)"
    session = ort.InferenceSession(asked.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(["Y"], {"X": rows})[0]
    expected = np.asarray(expected, np.float32).reshape(len(rows), width)
    return {
        "kind": kind,
        "post": post,
        "model": base64.b64encode(model.SerializeToString()).decode(),
        "width": width,
        "inputs": [[None if np.isnan(v) else float(v) for v in r] for r in rows],
        # Non-finite answers as strings ("nan", "inf", "-inf"): JSON has no such numbers.
        "oracle": oracle,
        "expected": [[float(v) if np.isfinite(v) else str(v) for v in r] for r in expected],
    }


def random_cases(count=120, seed=5):
    rng = np.random.default_rng(seed)
    return [case(rng) for _ in range(count)]
