"""Registers ONNX models in an MLflow tracking server through MLflow's own Python API, as an
ML team would: `python mlflow_register.py URI NAME FILE[:HOW] ...` registers each file as the
next version of registered model NAME, in order. HOW is how it is logged:

- `logged` (the default): `mlflow.onnx.log_model(..., registered_model_name=NAME)`, MLflow 3's
  logged model (with `save_as_external_data=False`: tie reads one self-contained file);
- `sha256`: saved with `mlflow.onnx.save_model`, a `model.onnx.sha256` written beside it,
  logged as run artifacts and registered from `runs:/<run>/model`;
- `bad-sha256`: the same with a digest that is not the file's (a corrupt artifact).

`--alias ALIAS=VERSION` sets an alias afterwards. Prints the versions registered, one per
line, as `NAME VERSION`.
"""

import argparse
import hashlib
import os
import tempfile

import mlflow
import onnx
from mlflow import MlflowClient


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("uri")
    parser.add_argument("name")
    parser.add_argument("files", nargs="+")
    parser.add_argument("--alias", action="append", default=[])
    args = parser.parse_args()
    mlflow.set_tracking_uri(args.uri)
    client = MlflowClient()
    for spec in args.files:
        path, _, how = spec.partition(":")
        how = how or "logged"
        model = onnx.load(path)
        with mlflow.start_run() as run:
            if how == "logged":
                info = mlflow.onnx.log_model(
                    model,
                    name="model",
                    registered_model_name=args.name,
                    save_as_external_data=False,
                )
                version = info.registered_model_version
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    local = os.path.join(tmp, "model")
                    mlflow.onnx.save_model(model, local, save_as_external_data=False)
                    with open(os.path.join(local, "model.onnx"), "rb") as f:
                        digest = hashlib.sha256(f.read()).hexdigest()
                    if how == "bad-sha256":
                        digest = hashlib.sha256(b"not the model").hexdigest()
                    elif how != "sha256":
                        raise SystemExit(f"unknown way to log: {how}")
                    with open(os.path.join(local, "model.onnx.sha256"), "w") as f:
                        f.write(f"{digest}  model.onnx\n")
                    mlflow.log_artifacts(local, artifact_path="model")
                mv = mlflow.register_model(f"runs:/{run.info.run_id}/model", args.name)
                version = mv.version
        print(args.name, version, flush=True)
    for alias in args.alias:
        a, _, v = alias.partition("=")
        client.set_registered_model_alias(args.name, a, v)


if __name__ == "__main__":
    main()
