"""Tree benchmark: a desk's models and the anchors the tree engine is measured against.

Trains, on synthetic data (100 features, 5% missing), the two models of the benchmark:
  lgbm500   LightGBM LGBMRegressor, 500 trees, 63 leaves      -> model.txt
  xgb300    XGBoost XGBRegressor, 300 trees, depth 6          -> model.json
and their ONNX exports (onnxmltools) as lgbm500_onnx and xgb300_onnx, as a model repository
in OUT (default target/bench-trees). Then times, on one thread, with the rows the Rust
benches use (feature i of row r is 2 sin(0.37 i + 1.7 r), 256 rows in turn):
  onnxruntime in-process on the ONNX exports, batch 1 (per call) and batch 256;
  lleaves (LLVM-compiled LightGBM) on lgbm500, batch 1 and batch 256.

    pip install -r models/requirements-exported.txt lleaves==1.3.0 llvmlite==0.44.0
    python3 benches/trees_anchor.py [OUT] [N]

then, against the same OUT:
    REPO=OUT MODELS=lgbm500,lgbm500_onnx,xgb300,xgb300_onnx BATCHES=1,256 \\
        cargo bench --bench e2e_latency
"""
import os
import sys
import time

import lightgbm as lgb
import numpy as np
import onnx
import onnxruntime as ort
import xgboost as xgb
from onnxmltools import convert_lightgbm, convert_xgboost
from onnxmltools.convert.common.data_types import FloatTensorType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "bench-trees")
N = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
FEATURES = 100


def rows(count):
    r = np.arange(count)[:, None] % 256
    i = np.arange(FEATURES)[None, :]
    return (2.0 * np.sin(0.37 * i + 1.7 * r)).astype(np.float32)


def pct(xs, p):
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def report(name, times_ns, batch):
    times_ns.sort()
    line = (
        f"{name:<40} n={len(times_ns):<7} p50={pct(times_ns, 0.5) / 1e3:8.2f}us "
        f"p99={pct(times_ns, 0.99) / 1e3:8.2f}us p99.9={pct(times_ns, 0.999) / 1e3:8.2f}us "
        f"max={times_ns[-1] / 1e3:9.2f}us"
    )
    if batch > 1:
        line += f"  {batch * 1e9 / pct(times_ns, 0.5):.0f} rows/s"
    print(line, flush=True)


def timed(call, inputs, calls):
    for k in range(min(1000, calls)):
        call(inputs[k % len(inputs)])
    out = []
    for k in range(calls):
        x = inputs[k % len(inputs)]
        t = time.perf_counter_ns()
        call(x)
        out.append(time.perf_counter_ns() - t)
    return out


def save(name, file, write):
    version = os.path.join(OUT, name, "1")
    os.makedirs(version, exist_ok=True)
    path = os.path.join(version, file)
    write(path)
    return path


def main():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, FEATURES)).astype(np.float32)
    y = x[:, 0] * 2 + np.sin(3 * x[:, 1]) - x[:, 2] * x[:, 3] + x[:, 4:20].sum(axis=1) * 0.1
    y += rng.normal(0, 0.1, len(y))
    x[rng.random(x.shape) < 0.05] = np.nan
    initial = [("input", FloatTensorType([None, FEATURES]))]

    lg = lgb.LGBMRegressor(n_estimators=500, num_leaves=63, learning_rate=0.05, random_state=0, verbose=-1)
    lg.fit(x, y)
    lgbm_txt = save("lgbm500", "model.txt", lambda p: lg.booster_.save_model(p))
    lgbm_onnx = save("lgbm500_onnx", "model.onnx", lambda p: onnx.save(convert_lightgbm(lg, initial_types=initial, target_opset=15), p))
    xg = xgb.XGBRegressor(n_estimators=300, max_depth=6, learning_rate=0.05, random_state=0)
    xg.fit(x, y)
    save("xgb300", "model.json", lambda p: xg.get_booster().save_model(p))
    xgb_onnx = save("xgb300_onnx", "model.onnx", lambda p: onnx.save(convert_xgboost(xg, initial_types=initial, target_opset=15), p))

    one = [r[None, :] for r in rows(256)]
    batch = [rows(256)]
    print(f"python {sys.version.split()[0]}, onnxruntime {ort.__version__}, lightgbm {lgb.__version__}, xgboost {xgb.__version__}")
    for name, path in (("lgbm500", lgbm_onnx), ("xgb300", xgb_onnx)):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0].name
        run = lambda v: sess.run(None, {inp: v})  # noqa: E731
        report(f"onnxruntime {name} batch 1", timed(run, one, N), 1)
        report(f"onnxruntime {name} batch 256", timed(run, batch, max(N // 50, 200)), 256)
    try:
        import lleaves
    except ImportError:
        print("NOT RUN: lleaves (pip install lleaves==1.3.0 llvmlite==0.44.0)")
        return
    model = lleaves.Model(model_file=lgbm_txt)
    model.compile(cache=os.path.join(OUT, "lgbm500.lleaves.so"))
    run = lambda v: model.predict(v, n_jobs=1)  # noqa: E731
    report("lleaves lgbm500 batch 1", timed(run, one, N), 1)
    report("lleaves lgbm500 batch 256", timed(run, batch, max(N // 50, 200)), 256)
    # The same rows answer alike: the engines agree on the model.
    want = lg.booster_.predict(batch[0])
    assert np.allclose(model.predict(batch[0], n_jobs=1), want, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    main()
