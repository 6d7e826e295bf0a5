#!/usr/bin/env python3
"""Generate tie's example model repository, its test fixtures and layouts.

What it writes (paths relative to the repository root):

  models/<model>/<version>/model.onnx   small ONNX models (opset 17, IR 8):
      mlp64/1      64 -> 128 -> 64 -> 1, Gemm + Relu        features -> score
      multi/1, 2   16 -> 32 -> 4, MatMul/Add + Tanh/Sigmoid features -> probs
      identity/1   one Identity node, width 4                x -> y
      softmax3/1   8 -> Gemm -> 3 -> Softmax                 features -> probs
      mlp256/1     256 -> 512 -> 512 -> 256 -> 8, Gemm+Relu features -> out
      bnorm/1      12 -> Gemm -> 24 -> BatchNorm -> LeakyRelu -> Gemm -> 2
                                                             features -> out
  models/mlp64/config.toml               the model's server configuration
  tests/fixtures/expected/<model>_v<version>.json
      8 input rows drawn from N(0, 1) and the onnxruntime outputs for them
  layouts/features/mlp64.toml, mlp64_reordered.toml
      the feature layout of mlp64, and a copy with f00/f01 swapped

Every input has a dynamic batch dimension named "batch" and is float32.
Everything is deterministic: each model and each fixture has its own fixed
numpy seed, so rerunning the script reproduces the same files.

Run from the repository root:

    pip install -r models/requirements.txt
    python3 models/generate.py
"""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# The repository root: this file lives in <root>/models/.
ROOT = Path(__file__).resolve().parent.parent

OPSET = 17
# IR 8 is read by onnxruntime and by tract-onnx 0.21/0.22.
IR_VERSION = 8
FIXTURE_ROWS = 8


# ---------------------------------------------------------------------------
# Graph-building helpers
# ---------------------------------------------------------------------------


class GraphBuilder:
    """Collects nodes and initializers of a graph with one input and one output."""

    def __init__(self, name, input_name, input_width, output_name, output_width, rng):
        self.name = name
        self.input_name = input_name
        self.input_width = input_width
        self.output_name = output_name
        self.output_width = output_width
        self.rng = rng
        self.nodes = []
        self.initializers = []

    def const(self, name, array):
        """Add a float32 initializer and return its name."""
        tensor = numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)
        self.initializers.append(tensor)
        return name

    def node(self, op, inputs, output, **attrs):
        """Add a node and return the name of its (single) output."""
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def weights(self, fan_in, fan_out, gain, transposed):
        """He-style weights N(0, gain / fan_in); shape [out, in] if transposed else [in, out].

        gain = 2 keeps the activation scale through a Relu; gain = 1 suits a
        linear (or Tanh / LeakyRelu) layer.
        """
        w = self.rng.normal(0.0, np.sqrt(gain / fan_in), size=(fan_in, fan_out))
        return w.T if transposed else w

    def bias(self, width):
        """Small nonzero biases."""
        return self.rng.uniform(-0.1, 0.1, size=width)

    def gemm(self, x, prefix, fan_in, fan_out, gain):
        """Gemm(transB=1) with weights stored as [out, in]."""
        w = self.const(f"{prefix}.weight", self.weights(fan_in, fan_out, gain, transposed=True))
        b = self.const(f"{prefix}.bias", self.bias(fan_out))
        return self.node("Gemm", [x, w, b], f"{prefix}.gemm", transB=1)

    def matmul_add(self, x, prefix, fan_in, fan_out, gain):
        """MatMul with weights stored as [in, out], then Add of the bias."""
        w = self.const(f"{prefix}.weight", self.weights(fan_in, fan_out, gain, transposed=False))
        b = self.const(f"{prefix}.bias", self.bias(fan_out))
        y = self.node("MatMul", [x, w], f"{prefix}.matmul")
        return self.node("Add", [y, b], f"{prefix}.add")

    def finish(self, last):
        """Build the model whose output is `last`, the output of the last node added."""
        assert self.nodes[-1].output[0] == last
        # The last node writes the graph output directly.
        self.nodes[-1].output[0] = self.output_name
        graph = helper.make_graph(
            self.nodes,
            self.name,
            [
                helper.make_tensor_value_info(
                    self.input_name, TensorProto.FLOAT, ["batch", self.input_width]
                )
            ],
            [
                helper.make_tensor_value_info(
                    self.output_name, TensorProto.FLOAT, ["batch", self.output_width]
                )
            ],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="tie models/generate.py",
        )
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model, full_check=True)
        return model


# ---------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------


def mlp64(seed):
    """64 -> 128 -> 64 -> 1: Gemm + Relu, Gemm + Relu, Gemm."""
    g = GraphBuilder("mlp64", "features", 64, "score", 1, np.random.default_rng(seed))
    x = g.node("Relu", [g.gemm("features", "fc1", 64, 128, gain=2.0)], "fc1.relu")
    x = g.node("Relu", [g.gemm(x, "fc2", 128, 64, gain=2.0)], "fc2.relu")
    x = g.gemm(x, "fc3", 64, 1, gain=1.0)
    return g.finish(x)


def multi(seed):
    """16 -> 32 -> 4: MatMul + Add + Tanh, MatMul + Add + Sigmoid."""
    g = GraphBuilder("multi", "features", 16, "probs", 4, np.random.default_rng(seed))
    x = g.node("Tanh", [g.matmul_add("features", "fc1", 16, 32, gain=1.0)], "fc1.tanh")
    # Tanh outputs are below 1 in magnitude: a larger gain keeps the logits of order 1.
    x = g.node("Sigmoid", [g.matmul_add(x, "fc2", 32, 4, gain=2.0)], "fc2.sigmoid")
    return g.finish(x)


def identity(seed):
    """y = x, width 4: the cheapest possible model, for round-trip benchmarks."""
    g = GraphBuilder("identity", "x", 4, "y", 4, np.random.default_rng(seed))
    return g.finish(g.node("Identity", ["x"], "identity"))


def softmax3(seed):
    """8 -> Gemm -> 3 -> Softmax(axis=-1): a graph outside the MLP op set."""
    g = GraphBuilder("softmax3", "features", 8, "probs", 3, np.random.default_rng(seed))
    x = g.gemm("features", "fc1", 8, 3, gain=1.0)
    return g.finish(g.node("Softmax", [x], "softmax", axis=-1))


def mlp256(seed):
    """256 -> 512 -> 512 -> 256 -> 8: Gemm + Relu between layers, none after the last."""
    g = GraphBuilder("mlp256", "features", 256, "out", 8, np.random.default_rng(seed))
    widths = [256, 512, 512, 256, 8]
    x = "features"
    for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:]), start=1):
        last = i == len(widths) - 1
        x = g.gemm(x, f"fc{i}", fan_in, fan_out, gain=1.0 if last else 2.0)
        if not last:
            x = g.node("Relu", [x], f"fc{i}.relu")
    return g.finish(x)


def bnorm(seed):
    """12 -> Gemm -> 24 -> BatchNormalization -> LeakyRelu(0.1) -> Gemm -> 2."""
    g = GraphBuilder("bnorm", "features", 12, "out", 2, np.random.default_rng(seed))
    x = g.gemm("features", "fc1", 12, 24, gain=1.0)
    # Inference-mode statistics: mean/var roughly those of the Gemm output,
    # scale/bias close to (1, 0), so the normalised values stay of order 1.
    scale = g.const("bn.scale", g.rng.uniform(0.5, 1.5, size=24))
    beta = g.const("bn.bias", g.rng.uniform(-0.2, 0.2, size=24))
    mean = g.const("bn.mean", g.rng.uniform(-0.1, 0.1, size=24))
    var = g.const("bn.var", g.rng.uniform(0.5, 1.5, size=24))
    x = g.node("BatchNormalization", [x, scale, beta, mean, var], "bn", epsilon=1e-5)
    x = g.node("LeakyRelu", [x], "bn.leaky_relu", alpha=0.1)
    x = g.gemm(x, "fc2", 24, 2, gain=2.0)
    return g.finish(x)


# (model name, version, builder, model seed, fixture seed)
MODELS = [
    ("mlp64", 1, mlp64, 6401, 16401),
    ("multi", 1, multi, 1601, 11601),
    ("multi", 2, multi, 1602, 11602),
    ("identity", 1, identity, 401, 10401),
    ("softmax3", 1, softmax3, 801, 10801),
    ("mlp256", 1, mlp256, 25601, 125601),
    ("bnorm", 1, bnorm, 1201, 11201),
]

MLP64_CONFIG = """\
# The 64-input MLP of the examples (64 -> 128 -> 64 -> 1).
layout = "mlp64"
"""


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


def run_onnxruntime(path, input_name, batch):
    """Run the model at `path` on `batch` with a single-threaded CPU session."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {input_name: batch})
    return out


def floats(row):
    """A row as Python floats holding the exact float32 values."""
    return [float(np.float32(v)) for v in row]


def fixture_json(name, version, inputs, outputs):
    """The fixture as JSON, one row per line (json.dumps writes floats by repr)."""

    def rows(matrix):
        return ",\n".join("  " + json.dumps(floats(r)) for r in matrix)

    return (
        "{"
        f'"model": {json.dumps(name)}, "version": {version}, '
        f'"input_width": {inputs.shape[1]}, "output_width": {outputs.shape[1]},\n'
        f' "inputs": [\n{rows(inputs)}],\n'
        f' "outputs": [\n{rows(outputs)}]}}\n'
    )


def make_fixture(name, version, model, model_path, seed):
    input_name = model.graph.input[0].name
    width = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    inputs = np.random.default_rng(seed).standard_normal((FIXTURE_ROWS, width)).astype(np.float32)

    outputs = run_onnxruntime(model_path, input_name, inputs)
    assert outputs.dtype == np.float32 and outputs.shape[0] == FIXTURE_ROWS, outputs.shape

    # The batch of 8 and the rows one by one must agree.
    single = np.concatenate(
        [run_onnxruntime(model_path, input_name, inputs[i : i + 1]) for i in range(FIXTURE_ROWS)]
    )
    max_diff = float(np.max(np.abs(single - outputs)))
    assert np.allclose(single, outputs, rtol=1e-5, atol=1e-6), (name, version, max_diff)

    text = fixture_json(name, version, inputs, outputs)
    # The JSON must read back to exactly the float32 values.
    parsed = json.loads(text)
    assert np.array_equal(np.array(parsed["inputs"], dtype=np.float32), inputs)
    assert np.array_equal(np.array(parsed["outputs"], dtype=np.float32), outputs)
    return text, outputs, max_diff


# ---------------------------------------------------------------------------
# Feature layouts
# ---------------------------------------------------------------------------


def layout_toml(name, features, note="", per_line=8):
    """A feature layout file: its name, dtype and ordered feature names, 8 a line."""
    body = "\n".join(
        "    " + ", ".join(f'"{f}"' for f in features[i : i + per_line]) + ","
        for i in range(0, len(features), per_line)
    )
    return (
        "# Feature layout of the 64-input example MLP: ordered feature names, their dtype.\n"
        + note
        + f'name = "{name}"\n'
        'dtype = "f32"\n'
        f"features = [\n{body}\n]\n"
    )


# ---------------------------------------------------------------------------


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    print(f"  {path.relative_to(ROOT)} ({path.stat().st_size} bytes)")


def main():
    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}")
    for name, version, build, model_seed, fixture_seed in MODELS:
        model = build(model_seed)
        model_path = ROOT / "models" / name / str(version) / "model.onnx"
        write(model_path, model.SerializeToString())
        onnx.checker.check_model(str(model_path), full_check=True)

        text, outputs, max_diff = make_fixture(name, version, model, model_path, fixture_seed)
        write(ROOT / "tests" / "fixtures" / "expected" / f"{name}_v{version}.json", text)
        print(
            f"    outputs: mean |y| {np.mean(np.abs(outputs)):.3f}, "
            f"range [{outputs.min():.3f}, {outputs.max():.3f}], "
            f"batch-8 vs batch-1 max diff {max_diff:.2e}"
        )

    write(ROOT / "models" / "mlp64" / "config.toml", MLP64_CONFIG)

    features = [f"f{i:02d}" for i in range(64)]
    write(ROOT / "layouts" / "features" / "mlp64.toml", layout_toml("mlp64", features))
    reordered = [features[1], features[0]] + features[2:]
    write(
        ROOT / "layouts" / "features" / "mlp64_reordered.toml",
        layout_toml(
            "mlp64_reordered",
            reordered,
            note="# f00 and f01 are swapped: a layout that does not match the model's.\n",
        ),
    )


if __name__ == "__main__":
    main()
