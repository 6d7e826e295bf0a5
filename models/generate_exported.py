#!/usr/bin/env python3
"""Generate the fixtures of exported models: trained and exported the way desks export them
(tree ensembles, scaler pipelines), with onnxruntime's answers (and the library's own
predict) on rows chosen to hit the engines' edges.

What it writes (paths relative to the repository root):

  tests/fixtures/exported/<model>/1/model.onnx   exported by the real exporters:
      skl_gbr      scikit-learn GradientBoostingRegressor, 40 trees, depth 4     (skl2onnx)
      skl_rf2      scikit-learn RandomForestRegressor, 2 targets (AVERAGE)       (skl2onnx)
      lgbm         LightGBM LGBMRegressor, 60 trees, 15 leaves, NaN in training  (onnxmltools)
      xgb          XGBoost XGBRegressor, 60 trees, depth 4, NaN in training      (onnxmltools)
      pipe_ridge   StandardScaler + Ridge (Scaler -> LinearRegressor)          (skl2onnx)
      pipe_mlp     StandardScaler + MLPRegressor(32, 16) (Scaler -> MatMul/Add/Relu -> Reshape)
      skl_gbc2     scikit-learn GradientBoostingClassifier, 2 classes (label + ZipMap)
      skl_rfc5     scikit-learn RandomForestClassifier, 5 classes (zipmap=False)
      lgbm_c2      LightGBM LGBMClassifier, 2 classes (label + ZipMap)    (onnxmltools)
      lgbm_c5      LightGBM LGBMClassifier, 5 classes (label + ZipMap)    (onnxmltools)
      xgb_c2       XGBoost XGBClassifier, 2 classes                        (onnxmltools)
      xgb_c5       XGBoost XGBClassifier, 5 classes                        (onnxmltools)
      lin_c2       LogisticRegression, 2 classes (LinearClassifier LOGISTIC, ZipMap)  (skl2onnx)
      lin_c5       LogisticRegression, 5 classes (SOFTMAX, Normalizer L1, ZipMap)
      svc_c2       LinearSVC, 2 classes (scores [1 - s, s], the graph picks s; no ZipMap)
      svc_c5       LinearSVC, 5 classes
      prep_impute_c5  SimpleImputer + StandardScaler + LogisticRegression (Imputer, Scaler)
      prep_norm    Normalizer (L2) + Ridge
      prep_binar   SimpleImputer + Binarizer + Ridge
      prep_mixed   ColumnTransformer (SimpleImputer, then StandardScaler, Binarizer or
                   Normalizer L1 on column groups: ArrayFeatureExtractor, Concat) + Ridge
      cb           CatBoost CatBoostRegressor, 60 trees, depth 4 (CatBoost's ONNX export)
      cb_c2        CatBoost CatBoostClassifier, 2 classes (label + ZipMap)
      cb_c5        CatBoost CatBoostClassifier, 5 classes (MultiClass)
  tests/fixtures/exported/<model>/1/model.txt    LightGBM's own file (Booster.save_model):
      lgbm_native     the lgbm regressor;  lgbm_native_c5  the 5-class classifier
  tests/fixtures/exported/<model>/1/model.json   XGBoost's own file (save_model):
      xgb_native      the xgb regressor;   xgb_native_c2   the 2-class classifier
  tests/fixtures/exported/<model>/config.toml    layout "exported10" (NaN allowed)
  tests/fixtures/exported/<model>.json           inputs, the oracle's outputs (onnxruntime's
                                                 for ONNX files, Booster.predict's for the
                                                 native ones), the library's own predict
  tests/fixtures/random_trees.json               random ensembles of the three tree ops with
                                                 onnxruntime's answers (random_trees.py)
  layouts/features/exported10.toml               10 features, non-finite values allowed

Rows: 16 drawn from N(0, 1); rows with NaN in some or all features; rows of +-1e30; and
rows whose features sit exactly on split thresholds of the model. Deterministic (fixed
seeds). Run from the repository root:

    pip install -r models/requirements-exported.txt
    python3 models/generate_exported.py
"""

import json
from pathlib import Path

import lightgbm as lgb
from catboost import CatBoostClassifier, CatBoostRegressor
import numpy as np
import onnx
import onnxruntime as ort
import xgboost as xgb
from onnxmltools import convert_lightgbm, convert_xgboost
from onnxmltools.convert.common.data_types import FloatTensorType
from skl2onnx import to_onnx
from sklearn.ensemble import (
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Binarizer, Normalizer, StandardScaler
from sklearn.svm import LinearSVC

from random_trees import random_cases

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "exported"
FEATURES = 10


def training_data(seed, nan_fraction):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2000, FEATURES)).astype(np.float32)
    y = 2.0 * x[:, 0] + np.sin(3 * x[:, 1]) - x[:, 2] * x[:, 3] + rng.normal(0, 0.1, 2000)
    if nan_fraction:
        x[rng.random(x.shape) < nan_fraction] = np.nan
    return x, y.astype(np.float32)


def thresholds(model):
    """(feature, threshold) of the branch nodes of the exported ensemble (none for others)."""
    if model is None:
        return []
    nodes = [n for n in model.graph.node if n.op_type.startswith("TreeEnsemble")]
    if not nodes:
        return []
    (node,) = nodes
    attrs = {a.name: a for a in node.attribute}
    features = list(attrs["nodes_featureids"].ints)
    values = list(attrs["nodes_values"].floats)
    modes = list(attrs["nodes_modes"].strings)
    return [(f, v) for f, v, m in zip(features, values, modes) if m != b"LEAF"]


def rows_for(model, seed):
    rng = np.random.default_rng(seed)
    rows = [r for r in rng.normal(size=(16, FEATURES)).astype(np.float32)]
    nan_some = rng.normal(size=FEATURES).astype(np.float32)
    nan_some[[0, 2, 5]] = np.nan
    rows += [nan_some, np.full(FEATURES, np.nan, np.float32)]
    rows += [np.full(FEATURES, 1e30, np.float32), np.full(FEATURES, -1e30, np.float32)]
    # Every feature on a split threshold: the first 6 splits, one row each, the rest 0.
    for f, v in thresholds(model)[:6]:
        row = np.zeros(FEATURES, np.float32)
        row[f] = np.float32(v)
        rows.append(row)
    return np.stack(rows).astype(np.float32)


def onnxruntime_outputs(path, x):
    """The regressor's output, or the classifier's probability tensor (what ZipMap reads)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    model = onnx.load(path)
    zipmap = [n for n in model.graph.node if n.op_type == "ZipMap"]
    floats = [o.name for o in model.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    if zipmap:
        # Ask for the tensor ZipMap reads: add it as a graph output.
        name = zipmap[0].input[0]
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        wanted = [name]
    else:
        # A classifier without ZipMap: its float output (the other is the label).
        wanted = floats[-1:]
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    (out,) = sess.run(wanted, {sess.get_inputs()[0].name: x})
    return np.asarray(out, dtype=np.float32).reshape(len(x), -1)


def floats(row):
    return [None if np.isnan(v) else float(np.float32(v)) for v in row]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    x_clean, y = training_data(1, 0.0)
    x_nan, y_nan = training_data(2, 0.05)
    y2 = np.stack([y, -0.5 * y + x_clean[:, 4]], axis=1)
    initial = [("x", FloatTensorType([None, FEATURES]))]
    models = []
    gbr = GradientBoostingRegressor(n_estimators=40, max_depth=4, random_state=0)
    gbr.fit(x_clean, y)
    models.append(("skl_gbr", gbr, to_onnx(gbr, x_clean[:1], target_opset={"": 17, "ai.onnx.ml": 3})))
    rf = RandomForestRegressor(n_estimators=12, max_depth=5, random_state=0)
    rf.fit(x_clean, y2)
    models.append(("skl_rf2", rf, to_onnx(rf, x_clean[:1], target_opset={"": 17, "ai.onnx.ml": 3})))
    lg = lgb.LGBMRegressor(n_estimators=60, num_leaves=15, random_state=0, verbose=-1)
    lg.fit(x_nan, y_nan)
    models.append(("lgbm", lg, convert_lightgbm(lg, initial_types=initial, target_opset=15)))
    xg = xgb.XGBRegressor(n_estimators=60, max_depth=4, random_state=0)
    xg.fit(x_nan, y_nan)
    models.append(("xgb", xg, convert_xgboost(xg, initial_types=initial, target_opset=15)))
    ridge = make_pipeline(StandardScaler(), Ridge(alpha=1.0))
    ridge.fit(x_clean * 3.0 + 1.0, y)
    models.append(("pipe_ridge", ridge, to_onnx(ridge, x_clean[:1], target_opset={"": 17, "ai.onnx.ml": 3})))
    mlp = make_pipeline(
        StandardScaler(), MLPRegressor(hidden_layer_sizes=(32, 16), max_iter=400, random_state=0)
    )
    mlp.fit(x_clean * 3.0 + 1.0, y)
    models.append(("pipe_mlp", mlp, to_onnx(mlp, x_clean[:1], target_opset={"": 17, "ai.onnx.ml": 3})))

    y2c = (y > np.median(y)).astype(int)
    y5c = np.digitize(y, np.quantile(y, [0.2, 0.4, 0.6, 0.8]))
    skl = {"": 17, "ai.onnx.ml": 3}
    gbc = GradientBoostingClassifier(n_estimators=30, max_depth=3, random_state=0).fit(x_clean, y2c)
    models.append(("skl_gbc2", gbc, to_onnx(gbc, x_clean[:1], target_opset=skl)))
    rfc = RandomForestClassifier(n_estimators=10, max_depth=5, random_state=0).fit(x_clean, y5c)
    models.append(("skl_rfc5", rfc, to_onnx(rfc, x_clean[:1], target_opset=skl, options={"zipmap": False})))
    y2n = (y_nan > np.median(y_nan)).astype(int)
    y5n = np.digitize(y_nan, np.quantile(y_nan, [0.2, 0.4, 0.6, 0.8]))
    lgc2 = lgb.LGBMClassifier(n_estimators=40, num_leaves=15, random_state=0, verbose=-1).fit(x_nan, y2n)
    models.append(("lgbm_c2", lgc2, convert_lightgbm(lgc2, initial_types=initial, target_opset=15)))
    lgc5 = lgb.LGBMClassifier(n_estimators=20, num_leaves=15, random_state=0, verbose=-1).fit(x_nan, y5n)
    models.append(("lgbm_c5", lgc5, convert_lightgbm(lgc5, initial_types=initial, target_opset=15)))
    xgc2 = xgb.XGBClassifier(n_estimators=40, max_depth=4, random_state=0).fit(x_nan, y2n)
    models.append(("xgb_c2", xgc2, convert_xgboost(xgc2, initial_types=initial, target_opset=15)))
    xgc5 = xgb.XGBClassifier(n_estimators=20, max_depth=4, random_state=0).fit(x_nan, y5n)
    models.append(("xgb_c5", xgc5, convert_xgboost(xgc5, initial_types=initial, target_opset=15)))
    # Linear classifiers (LinearClassifier, with ZipMap or a tensor) and preprocessing
    # pipelines (Imputer, Normalizer, Binarizer, ArrayFeatureExtractor + Concat) on tract.
    lin_c2 = LogisticRegression().fit(x_clean, y2c)
    models.append(("lin_c2", lin_c2, to_onnx(lin_c2, x_clean[:1], target_opset=skl)))
    lin_c5 = LogisticRegression(max_iter=500).fit(x_clean, y5c)
    models.append(("lin_c5", lin_c5, to_onnx(lin_c5, x_clean[:1], target_opset=skl)))
    svc_c2 = LinearSVC().fit(x_clean, y2c)
    models.append(("svc_c2", svc_c2, to_onnx(svc_c2, x_clean[:1], target_opset=skl)))
    svc_c5 = LinearSVC().fit(x_clean, y5c)
    models.append(("svc_c5", svc_c5, to_onnx(svc_c5, x_clean[:1], target_opset=skl)))
    impute_c5 = make_pipeline(SimpleImputer(), StandardScaler(), LogisticRegression(max_iter=500))
    impute_c5.fit(x_nan, y5n)
    models.append(("prep_impute_c5", impute_c5, to_onnx(impute_c5, x_clean[:1], target_opset=skl)))
    norm = make_pipeline(Normalizer(), Ridge()).fit(x_clean, y)
    models.append(("prep_norm", norm, to_onnx(norm, x_clean[:1], target_opset=skl)))
    binar = make_pipeline(SimpleImputer(), Binarizer(threshold=0.2), Ridge()).fit(x_nan, y_nan)
    models.append(("prep_binar", binar, to_onnx(binar, x_clean[:1], target_opset=skl)))
    columns = ColumnTransformer(
        [
            ("scale", make_pipeline(SimpleImputer(), StandardScaler()), [0, 1, 2, 3, 4]),
            ("bin", make_pipeline(SimpleImputer(strategy="median"), Binarizer()), [5, 6]),
            ("norm", make_pipeline(SimpleImputer(), Normalizer(norm="l1")), [7, 8, 9]),
        ]
    )
    mixed = make_pipeline(columns, Ridge()).fit(x_nan, y_nan)
    models.append(("prep_mixed", mixed, to_onnx(mixed, x_clean[:1], target_opset=skl)))
    # CatBoost's own ONNX export (oblivious trees as TreeEnsembleRegressor/Classifier,
    # ai.onnx.ml opset 2, NaN in training).
    for name, model, target in [
        ("cb", CatBoostRegressor(iterations=60, depth=4, random_seed=0, verbose=0, allow_writing_files=False), y_nan),
        ("cb_c2", CatBoostClassifier(iterations=40, depth=4, random_seed=0, verbose=0, allow_writing_files=False), y2n),
        ("cb_c5", CatBoostClassifier(iterations=20, depth=4, random_seed=0, verbose=0, loss_function="MultiClass", allow_writing_files=False), y5n),
    ]:
        model.fit(x_nan, target)
        path = OUT / f"{name}.catboost.onnx"
        model.save_model(str(path), format="onnx")
        models.append((name, model, onnx.load(path)))
        path.unlink()
    # The libraries' own files: answers are Booster.predict's.
    natives = [
        ("lgbm_native", "model.txt", lambda p: lg.booster_.save_model(str(p)), lambda x: lg.booster_.predict(x)),
        ("lgbm_native_c5", "model.txt", lambda p: lgc5.booster_.save_model(str(p)), lambda x: lgc5.booster_.predict(x)),
        ("xgb_native", "model.json", lambda p: xg.get_booster().save_model(str(p)), lambda x: xg.get_booster().predict(xgb.DMatrix(x))),
        ("xgb_native_c2", "model.json", lambda p: xgc2.get_booster().save_model(str(p)), lambda x: xgc2.get_booster().predict(xgb.DMatrix(x))),
    ]

    (ROOT / "layouts" / "features" / "exported10.toml").write_text(
        "# 10 features of the exported-model fixtures (models/generate_exported.py); NaN marks a missing value.\n"
        'name = "exported10"\ndtype = "f32"\nallow_non_finite = true\n'
        "features = [" + ", ".join(f'"f{i}"' for i in range(FEATURES)) + "]\n"
    )
    for seed, (name, estimator, model) in enumerate(models, start=100):
        model.ir_version = min(model.ir_version, 8)
        version = OUT / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        path = version / "model.onnx"
        onnx.save(model, path)
        (OUT / name / "config.toml").write_text('layout = "exported10"\n')
        x = rows_for(model, seed)
        expected = onnxruntime_outputs(path, x)
        # scikit-learn takes no NaN (but behind an imputer): its models' rows with one have
        # no library answer.
        nan_ok = not name.startswith(("skl_", "pipe_", "lin_", "svc_", "prep_norm"))
        predict = estimator.predict_proba if hasattr(estimator, "predict_proba") else estimator.predict
        if name.startswith("svc_"):
            # The scores are the decision function's (one column for two classes: the
            # graph picks the positive class's score out of [-s, s]).
            def predict(r, e=estimator):
                return np.asarray(e.decision_function(r), dtype=np.float32)
        library = [
            floats(np.asarray(predict(r[None, :]), dtype=np.float32).reshape(-1))
            if nan_ok or not np.isnan(r).any()
            else None
            for r in x
        ]
        fixture = {
            "model": name,
            "inputs": [floats(r) for r in x],
            "oracle": "onnxruntime",
            "expected": [floats(r) for r in expected],
            "library": library,
        }
        (OUT / f"{name}.json").write_text(json.dumps(fixture, indent=0) + "\n")
        print(name, [n.op_type for n in model.graph.node], expected.shape)
    for seed, (name, file, save, predict) in enumerate(natives, start=200):
        version = OUT / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        save(version / file)
        (OUT / name / "config.toml").write_text('layout = "exported10"\n')
        x = rows_for(None, seed)
        expected = np.asarray(predict(x), dtype=np.float32).reshape(len(x), -1)
        fixture = {
            "model": name,
            "inputs": [floats(r) for r in x],
            "oracle": "Booster.predict",
            "expected": [floats(r) for r in expected],
            "library": [floats(r) for r in expected],
        }
        (OUT / f"{name}.json").write_text(json.dumps(fixture, indent=0) + "\n")
        print(name, file, expected.shape)
    cases = random_cases()
    (ROOT / "tests" / "fixtures" / "random_trees.json").write_text(json.dumps(cases) + "\n")
    print("random_trees", len(cases))


if __name__ == "__main__":
    main()
