#!/usr/bin/env python3
"""Generate the fixtures of sequence and convolution models, exported by PyTorch's exporter
the way desks export window models: the row of a request is a window of 8 steps of 4
features (32 values, step-major), reshaped in the graph.

What it writes (paths relative to the repository root, or to --out):

  tests/fixtures/sequence/<model>/1/model.onnx
      gru        Reshape -> GRU(4 -> 16) -> last step -> Linear(16 -> 2)
      gru_bi     bidirectional GRU(4 -> 12), mean over the steps -> Linear(24 -> 2)
      lstm       2-layer LSTM(4 -> 16), the last layer's final state -> Linear(16 -> 2)
      rnn        RNN(4 -> 8, relu) -> last step -> Linear(8 -> 1)
      conv_ln    Conv1d(4 -> 8, k=3) over the steps -> LayerNorm(8) -> GELU -> Linear(64 -> 2)
      attention  one attention head over the window (MatMul, Softmax) -> mean -> Linear(16 -> 3)
  tests/fixtures/sequence/<model>.json
      inputs, onnxruntime's answers (the oracle) and PyTorch's own (the library)

Each model is exported with the TorchScript exporter (`dynamo=False`, opset 17, batch
dimension symbolic), which writes GRU, LSTM and RNN as ONNX's recurrent ops. Rows: 16 drawn
from N(0, 1), and rows of +-8 and 0 (saturating the gates). Deterministic (fixed seeds).
Needs torch, onnx and onnxruntime; run from the repository root:

    python3 models/generate_sequence.py [--out DIR]
"""

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

STEPS, FEATURES = 8, 4
WIDTH = STEPS * FEATURES


class Window(nn.Module):
    """The row as [batch, steps, features]."""

    def window(self, x):
        return x.reshape(-1, STEPS, FEATURES)


class Gru(Window):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(FEATURES, 16, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        out, _ = self.rnn(self.window(x))
        return self.head(out[:, -1])


class GruBi(Window):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(FEATURES, 12, batch_first=True, bidirectional=True)
        self.head = nn.Linear(24, 2)

    def forward(self, x):
        out, _ = self.rnn(self.window(x))
        return self.head(out.mean(dim=1))


class Lstm(Window):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(FEATURES, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        _, (h, _) = self.rnn(self.window(x))
        return self.head(h[-1])


class Rnn(Window):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(FEATURES, 8, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        out, _ = self.rnn(self.window(x))
        return self.head(out[:, -1])


class ConvLn(Window):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(FEATURES, 8, kernel_size=3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8 * STEPS, 2)

    def forward(self, x):
        h = self.conv(self.window(x).transpose(1, 2))  # [batch, channels, steps]
        h = nn.functional.gelu(self.norm(h.transpose(1, 2)))  # [batch, steps, channels]
        return self.head(h.flatten(1))


class Attention(Window):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(FEATURES, 16)
        self.k = nn.Linear(FEATURES, 16)
        self.v = nn.Linear(FEATURES, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        w = self.window(x)
        scores = torch.matmul(self.q(w), self.k(w).transpose(1, 2)) / 4.0
        mixed = torch.matmul(torch.softmax(scores, dim=-1), self.v(w))
        return self.head(mixed.mean(dim=1))


MODELS = {
    "gru": Gru,
    "gru_bi": GruBi,
    "lstm": Lstm,
    "rnn": Rnn,
    "conv_ln": ConvLn,
    "attention": Attention,
}


def rows(seed):
    rng = np.random.default_rng(seed)
    x = list(rng.normal(size=(16, WIDTH)).astype(np.float32))
    x += [np.full(WIDTH, 8.0, np.float32), np.full(WIDTH, -8.0, np.float32), np.zeros(WIDTH, np.float32)]
    return np.stack(x)


def floats(row):
    return [float(np.float32(v)) for v in row]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent)
    out = parser.parse_args().out / "tests" / "fixtures" / "sequence"
    out.mkdir(parents=True, exist_ok=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    for seed, (name, make) in enumerate(MODELS.items(), start=300):
        torch.manual_seed(seed)
        model = make().eval()
        version = out / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        path = version / "model.onnx"
        torch.onnx.export(
            model,
            (torch.zeros(1, WIDTH),),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
            opset_version=17,
            dynamo=False,
        )
        x = rows(seed)
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        (expected,) = sess.run(None, {"x": x})
        with torch.no_grad():
            library = model(torch.from_numpy(x)).numpy()
        fixture = {
            "model": name,
            "inputs": [floats(r) for r in x],
            "oracle": "onnxruntime",
            "expected": [floats(r) for r in expected],
            "library": [floats(r) for r in library],
        }
        (out / f"{name}.json").write_text(json.dumps(fixture, indent=0) + "\n")
        ops = sorted({n.op_type for n in onnx.load(path).graph.node})
        print(name, ops, expected.shape, float(np.abs(expected - library).max()))


if __name__ == "__main__":
    main()
