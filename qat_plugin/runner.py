"""Carry out a `Recipe`: FP32 training, the QAT switch, export, tracking, a closing summary."""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import keras
import numpy as np

from qat_plugin.callback import QATCallback
from qat_plugin.recipes import Recipe


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What a recipe run produced."""

    recipe: str
    fp32_accuracy: float | None
    qat_accuracy: float
    files: dict[str, Path]
    latency_ms: dict[str, float]
    mlflow_run_id: str | None
    tracking_uri: str | None

    def table(self) -> str:
        """The closing summary printed by `qat-plugin run`."""
        rows = [("recipe", self.recipe)]
        if self.fp32_accuracy is not None:
            rows.append(("FP32 accuracy (before the switch)", f"{self.fp32_accuracy:.4f}"))
        rows.append(("QAT accuracy (Keras, quantized)", f"{self.qat_accuracy:.4f}"))
        for name, path in self.files.items():
            rows.append((f"{name} file", f"{path}  ({path.stat().st_size:,d} bytes)"))
        for name, ms in self.latency_ms.items():
            rows.append((f"{name} latency, batch 1 (onnxruntime)", f"{ms:.3f} ms"))
        if self.mlflow_run_id:
            rows.append(("MLflow run", f"{self.mlflow_run_id} at {self.tracking_uri}"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


class _FP32Probe(keras.callbacks.Callback):
    """Just before the switch: FP32 validation accuracy, and the FP32 ONNX file if asked."""

    def __init__(self, switch_epoch: int, val, onnx_path: Path | None):
        super().__init__()
        self.switch_epoch, self.val, self.onnx_path = switch_epoch, val, onnx_path
        self.accuracy: float | None = None

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.switch_epoch and self.accuracy is None:
            self.accuracy = _accuracy(self.model, self.val)
            if self.onnx_path is not None:
                from qat_plugin.export.onnx import export_onnx

                export_onnx(self.model, self.onnx_path, validation_data=_first_inputs(self.val))


def _first_inputs(val, n: int = 256):
    """Up to `n` validation inputs: from `(x, y)` arrays, or the first batch of a dataset."""
    if isinstance(val, tuple):
        return val[0][:n]
    x = next(iter(val))[0]
    return x[:n] if hasattr(x, "shape") else x


def _accuracy(model, val) -> float:
    args = val if isinstance(val, tuple) else (val,)  # (x, y) arrays, or a dataset of batches
    return float(model.evaluate(*args, verbose=0, return_dict=True)["accuracy"])


def _latency_ms(path: Path, example: np.ndarray, runs: int = 50) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: example}
    for _ in range(5):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _prepared(recipe: Recipe, quick: bool):
    """The recipe's training settings and data; `quick` shrinks both to a smoke run."""
    train_cfg = recipe.train
    data = recipe.data.load(recipe.base_dir, batch_size=train_cfg.batch_size)
    if quick:
        train_cfg = dataclasses.replace(train_cfg, fp32_epochs=min(train_cfg.fp32_epochs, 1), qat_epochs=1)
        data = tuple(a[:512] for a in data) if len(data) == 4 else (data[0].take(4), data[1].take(2))
    return train_cfg, data


def _compiled_model(recipe: Recipe, train_cfg):
    model = recipe.model.build()
    softmax = getattr(model.layers[-1], "activation", None) is keras.activations.softmax
    model.compile(
        train_cfg.make_optimizer(),
        keras.losses.SparseCategoricalCrossentropy(from_logits=not softmax),
        metrics=["accuracy"],
    )
    return model


def run_recipe(recipe: Recipe, out_dir: str | Path = "qat_runs", *, quick: bool = False, verbose: int = 1) -> RunSummary:
    """Train, switch to QAT, export and track as the recipe says.

    `quick=True` trains one FP32 and one QAT epoch on at most 512 samples (a smoke run).

    >>> r = Recipe.from_yaml("recipes/digits_cnn.yaml")  # doctest: +SKIP
    >>> print(run_recipe(r, quick=True).table())  # doctest: +SKIP
    """
    out = Path(out_dir) / recipe.name
    out.mkdir(parents=True, exist_ok=True)
    train_cfg, data = _prepared(recipe, quick)
    if len(data) == 4:
        xt, yt, xv, yv = data
        fit_data, val, example = dict(x=xt, y=yt, batch_size=train_cfg.batch_size), (xv, yv), xv[:1]
    else:
        train_ds, val = data
        fit_data, example = dict(x=train_ds), next(iter(val))[0][:1].numpy()
    model = _compiled_model(recipe, train_cfg)
    loggers = []
    if recipe.mlflow is not None:
        from qat_plugin.integrations.mlflow import MlflowLogger

        logger = MlflowLogger(
            experiment=recipe.mlflow.get("experiment"),
            run_name=recipe.name,
            tracking_uri=recipe.mlflow.get("tracking_uri"),
            eval_data=val if isinstance(val, tuple) else None,
            export_onnx="onnx" in recipe.export,
            export_tflite="tflite" in recipe.export,
            registered_model_name=recipe.mlflow.get("registered_model_name"),
            artifact_dir=str(out / "mlflow"),
        )
        loggers.append(logger)
    fp32_onnx = out / f"{recipe.name}_fp32.onnx" if "onnx" in recipe.export else None
    probe = _FP32Probe(train_cfg.fp32_epochs, val, fp32_onnx)
    qat = QATCallback(
        start_epoch=train_cfg.fp32_epochs, spec=recipe.spec, policy=recipe.policy,
        lr_multiplier=train_cfg.lr_multiplier, freeze_bn_after=train_cfg.freeze_bn_after,
        loggers=loggers, verbose=verbose,
    )
    model.fit(**fit_data, epochs=train_cfg.fp32_epochs + train_cfg.qat_epochs, validation_data=val,
              callbacks=[probe, qat], verbose=verbose)
    qat_accuracy = _accuracy(model, val)

    files: dict[str, Path] = {}
    if loggers and loggers[0].files:
        files.update(loggers[0].files)  # the logger already saved and exported: don't do it twice
    if "keras" in recipe.export and "keras" not in files:
        files["keras"] = out / f"{recipe.name}_qat.keras"
        model.save(files["keras"])
    sample = example if not isinstance(val, tuple) else val[0][:512]  # what each export is checked on
    if "onnx" in recipe.export and "onnx" not in files:
        from qat_plugin.export.onnx import export_onnx

        files["onnx"] = out / f"{recipe.name}_int8.onnx"
        export_onnx(model, files["onnx"], validation_data=sample)
    if "tflite" in recipe.export and "tflite" not in files:
        from qat_plugin.export.tflite import export_tflite

        files["tflite"] = out / f"{recipe.name}_int8.tflite"
        export_tflite(model, files["tflite"], representative_data=sample, validation_data=sample)
    latency = {}
    if fp32_onnx is not None and fp32_onnx.exists():
        files = {"onnx FP32": fp32_onnx, **files}
        latency["FP32 ONNX"] = _latency_ms(fp32_onnx, np.asarray(example, "float32"))
        latency["int8 Q/DQ ONNX"] = _latency_ms(files["onnx"], np.asarray(example, "float32"))
    return RunSummary(
        recipe=recipe.name,
        fp32_accuracy=probe.accuracy,
        qat_accuracy=qat_accuracy,
        files=files,
        latency_ms=latency,
        mlflow_run_id=loggers[0].run_id if loggers else None,
        tracking_uri=loggers[0].tracking_uri_used if loggers else None,
    )


def tune_recipe(recipe: Recipe, out_dir: str | Path = "qat_runs", *, quick: bool = False):
    """Search which layers stay FP32, as the recipe's `tuning` block says; each trial a nested MLflow run.

    Returns `(best_spec, path_of_best_spec_json, trial_rows)`.
    """
    import keras_tuner as kt
    import mlflow

    from qat_plugin.integrations.tuner import (
        OBJECTIVE,
        PartialQuantizationHyperModel,
        PartialQuantizationObjective,
        get_best_spec,
        log_search_summary,
        trial_table,
    )
    from qat_plugin.recipes import RecipeError
    from qat_plugin.sensitivity import sensitivity_analysis

    cfg = recipe.tuning
    if cfg is None:
        raise RecipeError(f"Recipe {recipe.name!r} has no `tuning` block; add one (tuner, max_trials, mode, max_drop) to tune it.")
    train_cfg, data = _prepared(recipe, quick)
    if len(data) != 4:
        raise RecipeError("`qat-plugin tune` needs array data (npz, sklearn_digits or keras_dataset) for its validation score.")
    xt, yt, xv, yv = data
    out = Path(out_dir) / recipe.name
    out.mkdir(parents=True, exist_ok=True)
    build = lambda: _compiled_model(recipe, train_cfg)  # noqa: E731
    ranking = None
    if cfg.mode == "top_k":  # rank the layers on one trained FP32 model first
        model = build()
        model.fit(xt, yt, epochs=max(train_cfg.fp32_epochs, 1), batch_size=train_cfg.batch_size, verbose=0)
        ranking = sensitivity_analysis(model, xt[:256], eval_data=(xv, yv), spec=recipe.spec, policy=recipe.policy)
        print(ranking)
    mlflow_cfg = recipe.mlflow or {}
    if mlflow_cfg.get("tracking_uri"):
        mlflow.set_tracking_uri(mlflow_cfg["tracking_uri"])
    if mlflow_cfg.get("experiment"):
        mlflow.set_experiment(mlflow_cfg["experiment"])
    hypermodel = PartialQuantizationHyperModel(
        build, fp32_epochs=train_cfg.fp32_epochs, qat_epochs=train_cfg.qat_epochs, layers=ranking, mode=cfg.mode,
        objective=PartialQuantizationObjective(max_drop=cfg.max_drop, cost=cfg.cost), spec=recipe.spec,
        policy=recipe.policy, lr_multipliers=cfg.lr_multipliers, calibrators=cfg.calibrators,
        artifact_dir=str(out / "trials"),
    )
    trials = min(cfg.max_trials, 2) if quick else cfg.max_trials
    common = dict(objective=OBJECTIVE, directory=str(out / "keras_tuner"), project_name="search", overwrite=True)
    if cfg.tuner == "hyperband":
        tuner = kt.Hyperband(hypermodel, max_epochs=train_cfg.fp32_epochs + train_cfg.qat_epochs, **common)
    else:
        tuner_cls = kt.RandomSearch if cfg.tuner == "random" else kt.BayesianOptimization
        tuner = tuner_cls(hypermodel, max_trials=trials, **common)
    with mlflow.start_run(run_name=f"{recipe.name}-search"):
        tuner.search(xt, yt, validation_data=(xv, yv), batch_size=train_cfg.batch_size, verbose=0)
        log_search_summary(tuner, artifact_dir=str(out / "search"))
        spec = get_best_spec(tuner)
    path = out / "best_spec.json"
    path.write_text(spec.to_json(indent=1))
    return spec, path, trial_table(tuner)
