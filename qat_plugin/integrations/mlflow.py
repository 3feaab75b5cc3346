"""MLflow tracking for QAT runs: params, per-epoch metrics of both phases, ranges, artifacts.

`MlflowLogger` is a logger for `QATCallback(loggers=[...])`. Every MLflow call
runs on a background thread, so a slow or dead tracking server never stalls a
training step. If the server can't be reached, the logger warns once and
writes everything it could not send to a JSON-lines journal beside the
artifacts; `replay(journal)` sends it later, so nothing is lost.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import keras
import numpy as np

from qat_plugin.report import list_quantizers
from qat_plugin.sensitivity import accuracy
from qat_plugin.wrappers import quantize_wrappers

JOURNAL = "mlflow_pending.jsonl"


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Sender:
    """Runs MLflow operations in order on one thread; journals them once the server fails."""

    def __init__(self, tracking_uri: str | None, journal: Path):
        self.tracking_uri = tracking_uri
        self.journal = journal
        self.failure: BaseException | None = None
        self.run_id: str | None = None
        self._queue: queue.Queue = queue.Queue()
        self._inflight: dict | None = None
        self._abandoned = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="qat-mlflow", daemon=True)
        self._thread.start()

    def submit(self, op: dict) -> None:
        self._queue.put(op)

    def close(self, timeout: float) -> None:
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():  # still blocked on the server: keep the rest locally
            with self._lock:
                self._abandoned = True
                self.failure = self.failure or TimeoutError(f"MLflow did not answer within {timeout:.0f}s")
                if self._inflight is not None:
                    # It may still arrive; a repeated metric beats a lost one.
                    self._write_journal(self._inflight)
                self._drain_to_journal()

    def _drain_to_journal(self):
        while True:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                return
            if op is not None:
                self._write_journal(op)

    def _write_journal(self, op: dict) -> None:
        if op.get("kind") != "create_run" and "run_id" not in op and self.run_id:
            op = {**op, "run_id": self.run_id}
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        with open(self.journal, "a") as f:
            f.write(json.dumps(op) + "\n")

    def _work(self):
        while True:
            op = self._queue.get()
            if op is None:
                return
            if self.failure is not None:
                self._write_journal(op)
                continue
            if op["kind"] != "create_run" and not op.get("run_id"):
                op = {**op, "run_id": self.run_id}
            self._inflight = op
            try:
                result = execute(op, self.tracking_uri)
                if op["kind"] == "create_run":
                    self.run_id = result
            except Exception as exc:
                with self._lock:
                    if not self._abandoned:  # else `close` journaled it already
                        self.failure = exc
                        self._write_journal(op)
            finally:
                self._inflight = None


def execute(op: dict, tracking_uri: str | None = None) -> Any:
    """Carry out one journaled MLflow operation; returns the run id for `create_run`."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    client = mlflow.MlflowClient(tracking_uri)
    kind = op["kind"]
    if kind == "create_run":
        name = op.get("experiment")
        experiment_id = "0"
        if name:
            exp = client.get_experiment_by_name(name)
            experiment_id = exp.experiment_id if exp else client.create_experiment(name)
        return client.create_run(experiment_id, run_name=op.get("run_name"), tags=op.get("tags") or {}).info.run_id
    run_id = op["run_id"]
    if kind == "batch":
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), ts, int(step)) for k, v, ts, step in op.get("metrics", ())],
            params=[Param(k, str(v)) for k, v in op.get("params", {}).items()],
            tags=[RunTag(k, str(v)) for k, v in op.get("tags", {}).items()],
        )
    elif kind == "artifact":
        client.log_artifact(run_id, op["path"], op.get("artifact_path"))
    elif kind == "model":
        import qat_plugin  # noqa: F401 (registers the custom layers for loading)

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        model = keras.models.load_model(op["keras_path"], safe_mode=True)
        example = np.load(op["example_path"])
        signature = mlflow.models.infer_signature(example, model.predict(example, verbose=0))
        with mlflow.start_run(run_id=run_id):
            mlflow.keras.log_model(
                model, name="model", signature=signature, registered_model_name=op.get("registered_model_name")
            )
    elif kind == "end_run":
        client.set_terminated(run_id, op.get("status", "FINISHED"))
    else:
        raise ValueError(f"Unknown journaled MLflow operation {kind!r}")
    return None


def replay(journal: str | os.PathLike, tracking_uri: str | None = None) -> str | None:
    """Send what a run could not send to MLflow (its `mlflow_pending.jsonl`); returns the run id.

    >>> replay("no-such-journal.jsonl") is None
    True
    """
    path = Path(journal)
    if not path.exists():
        return None
    run_id = None
    for line in path.read_text().splitlines():
        op = json.loads(line)
        if op["kind"] == "create_run":
            run_id = execute(op, tracking_uri)
            continue
        if run_id is not None and not op.get("run_id"):
            op["run_id"] = run_id
        run_id = op.get("run_id", run_id)
        execute(op, tracking_uri)
    path.rename(path.with_suffix(".sent"))
    return run_id


def _flatten_params(prefix: str, config: dict) -> dict[str, str]:
    out = {}
    for key, value in config.items():
        out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value)
    return out


@dataclasses.dataclass
class MlflowLogger:
    """Logs a `QATCallback` run to MLflow.

    The run: the active MLflow run if there is one, else a new run in
    `experiment` (MLflow's default store is `sqlite:///mlflow.db`; pass
    `tracking_uri` for a server).

    Logged: params (spec, policy, switch point, optimizer, learning rate, model,
    quantized layers and parameters); tags `qat.policy`, `qat.switch_epoch`,
    `qat.partial`; every `logs` key per epoch (`step=epoch`) with `qat_phase`;
    `calibration_seconds`; `amax/<layer>/<input|weight>` at the switch and at
    the end (per-channel weights: the largest channel); JSON of every range and
    a PNG of the activation histograms with the chosen ranges; with
    `eval_data=(x, y)`: `fp32_accuracy` (just before the switch),
    `quantized_accuracy` (Keras) and `onnx_accuracy` (onnxruntime);
    `onnx_agreement` (argmax, file vs Keras) with tag `qat.onnx_checked_on`
    (what the export checked itself on; `tflite_*` likewise); the `.keras`
    and `.onnx` files, and an MLflow Keras model with a signature.

    Args:
        experiment: experiment name (created if missing); None: the default.
        run_name: name of the run it creates.
        tracking_uri: MLflow tracking URI; None: MLflow's own setting.
        eval_data: `(x, y)` to measure FP32 / quantized / ONNX accuracy on.
        export_onnx: export the final model to ONNX and check it in onnxruntime
            (laid out for the policy's runtime: TensorRT or onnxruntime).
        export_tflite: also export an int8 TFLite file, checked in LiteRT.
        log_model: log an MLflow model (Keras flavour) with a signature.
        registered_model_name: also register that model under this name.
        artifact_dir: where files are written before upload (they stay there).
        flush_timeout: seconds to wait at the end for MLflow before journaling the rest.

    Example:

    >>> import numpy as np, keras, qat_plugin, tempfile, mlflow
    >>> tmp = tempfile.mkdtemp()
    >>> logger = MlflowLogger(tracking_uri=f"sqlite:///{tmp}/mlflow.db", artifact_dir=tmp,
    ...                       export_onnx=False, log_model=False)
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> model.compile("adam", "mse")
    >>> cb = qat_plugin.QATCallback(start_epoch=1, verbose=0, loggers=[logger])
    >>> _ = model.fit(np.ones((8, 4)), np.ones((8, 3)), epochs=2, callbacks=[cb], verbose=0)
    >>> run = mlflow.MlflowClient(f"sqlite:///{tmp}/mlflow.db").search_runs(["0"])[0]
    >>> run.data.params["qat.switch_epoch"], run.data.metrics["qat_phase"]
    ('1', 1.0)
    """

    experiment: str | None = None
    run_name: str | None = None
    tracking_uri: str | None = None
    eval_data: tuple | None = None
    export_onnx: bool = True
    export_tflite: bool = False
    log_model: bool = True
    registered_model_name: str | None = None
    artifact_dir: str = "qat_artifacts"
    flush_timeout: float = 60.0

    @property
    def run_id(self) -> str | None:
        """The MLflow run this logger writes to (None before training or if it could not be created)."""
        sender = getattr(self, "_sender", None)
        return None if sender is None else sender.run_id

    @property
    def tracking_uri_used(self) -> str | None:
        return getattr(self, "_uri", None)

    # ---------------------------------------------------------------- events

    def on_train_begin(self, cb) -> None:
        import mlflow

        if self.tracking_uri:
            mlflow.set_tracking_uri(self.tracking_uri)
        self._uri = mlflow.get_tracking_uri()
        self._dir = Path(self.artifact_dir) / time.strftime("%Y%m%d-%H%M%S")
        self._dir.mkdir(parents=True, exist_ok=True)
        self._sender = _Sender(self._uri, self._dir / JOURNAL)
        self._warned = False
        self._fp32_logs: dict = {}
        self._fp32_accuracy: float | None = None
        self.files: dict[str, Path] = {}
        self._last_epoch = 0
        active = mlflow.active_run()
        self._own_run = active is None
        tags = {"qat.policy": cb.policy.name, "qat.partial": str(cb.spec.partial).lower()}
        if active is None:
            self._sender.submit({"kind": "create_run", "experiment": self.experiment, "run_name": self.run_name, "tags": tags})
        else:
            self._sender.run_id = active.info.run_id
        model, opt = cb.model, cb.model.optimizer
        try:
            spec_config = cb.spec.get_config()
        except Exception:  # a `filters` callable: log what can be named
            spec_config = {k: v for k, v in dataclasses.asdict(cb.spec).items() if k not in ("filters", "patterns", "overrides")}
        params = _flatten_params("qat.spec.", spec_config)
        lr = opt._learning_rate
        params.update({
            "qat.policy": cb.policy.name,
            "qat.start_epoch": cb.start_epoch,
            "qat.start_step": cb.start_step,
            "qat.lr_multiplier": cb.lr_multiplier,
            "optimizer": type(opt).__name__,
            "learning_rate": type(lr).__name__ if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule) else float(lr),
            "model_name": model.name,
            "epochs": (cb.params or {}).get("epochs"),
        })
        self._submit_batch(params=params, tags=tags)

    def before_switch(self, cb) -> None:
        if self.eval_data is not None:
            x, y = self.eval_data
            self._fp32_accuracy = accuracy(y, cb.model.predict(x, verbose=0))
            self._submit_batch(metrics={"fp32_accuracy": self._fp32_accuracy}, step=cb._epoch)

    def on_switch(self, cb) -> None:
        wrappers = quantize_wrappers(cb.model)
        n_params = sum(w.layer.count_params() for w in wrappers)
        params = {
            "qat.switch_epoch": cb.switch_epoch,
            "qat.switch_step": cb.switch_step,
            "qat.quantized_layers": len(wrappers),
            "qat.quantized_params": n_params,
        }
        metrics = {"calibration_seconds": cb.calibration_seconds or 0.0, **self._amax_metrics(cb.model)}
        self._submit_batch(metrics=metrics, params=params, tags={"qat.switch_epoch": cb.switch_epoch}, step=cb.switch_epoch)
        self._log_ranges(cb.model, "ranges_at_switch.json")
        if cb.calibration_histograms:
            self._log_file(self._plot_histograms(cb.calibration_histograms, cb.calibrated_ranges), "plots")

    def on_epoch_end(self, cb, epoch: int, logs: dict) -> None:
        self._last_epoch = epoch
        if not logs.get("qat_phase"):
            self._fp32_logs = logs
        metrics = {k: v for k, v in logs.items() if isinstance(v, (int, float, np.number))}
        self._submit_batch(metrics=metrics, step=epoch)

    def on_train_end(self, cb, logs: dict) -> None:
        try:
            self._final(cb)
        finally:
            if self._own_run:
                self._sender.submit({"kind": "end_run"})
            self._sender.close(self.flush_timeout)
            self._check_failure(final=True)

    # ---------------------------------------------------------------- the end of the run

    def _final(self, cb) -> None:
        model, step = cb.model, self._last_epoch
        metrics = {}
        if self._fp32_accuracy is None:
            for key in ("val_accuracy", "accuracy", "val_sparse_categorical_accuracy", "sparse_categorical_accuracy"):
                if key in self._fp32_logs:
                    metrics["fp32_accuracy"] = self._fp32_logs[key]
                    break
        x = y = None
        if self.eval_data is not None:
            x, y = self.eval_data
            metrics["quantized_accuracy" if cb._quantized else "fp32_accuracy"] = accuracy(y, model.predict(x, verbose=0))
        if cb._quantized:
            metrics.update(self._amax_metrics(model))
            self._log_ranges(model, "ranges_final.json")
        self._submit_batch(metrics=metrics, step=step)
        keras_path = self._dir / f"{model.name}.keras"
        model.save(keras_path)
        self.files["keras"] = keras_path
        self._log_file(keras_path, "model_files")
        if self.log_model:
            example = np.asarray(x[:4] if x is not None else np.zeros((1, *model.inputs[0].shape[1:]), "float32"))
            example_path = self._dir / "input_example.npy"
            np.save(example_path, example)
            self._sender.submit({
                "kind": "model",
                "keras_path": str(keras_path.resolve()),
                "example_path": str(example_path.resolve()),
                "registered_model_name": self.registered_model_name,
            })
        if self.export_onnx and cb._quantized:
            # Last: an export failure (reported by QATCallback) must not cost the rest of the run's record.
            from qat_plugin.export.onnx import export_onnx, run_onnx

            onnx_path = self._dir / f"{model.name}.onnx"
            report = export_onnx(model, onnx_path, validation_data=None if x is None else x[:256])
            self.files["onnx"] = onnx_path
            self._log_file(onnx_path, "model_files")
            metrics = {} if report.agreement is None else {"onnx_agreement": report.agreement}
            if x is not None:
                metrics["onnx_accuracy"] = accuracy(y, run_onnx(onnx_path, x))
            self._submit_batch(metrics=metrics, tags={"qat.onnx_checked_on": report.checked_on}, step=step)
        if self.export_tflite and cb._quantized:
            from qat_plugin.export.tflite import export_tflite, run_tflite

            tflite_path = self._dir / f"{model.name}_int8.tflite"
            sample = None if x is None else x[:256]
            report = export_tflite(model, tflite_path, representative_data=sample, validation_data=sample)
            self.files["tflite"] = tflite_path
            self._log_file(tflite_path, "model_files")
            metrics = {} if report.agreement is None else {"tflite_agreement": report.agreement}
            if x is not None:
                metrics["tflite_accuracy"] = accuracy(y, run_tflite(tflite_path, x))
            self._submit_batch(metrics=metrics, tags={"qat.tflite_checked_on": report.checked_on}, step=step)

    # ---------------------------------------------------------------- helpers

    def _submit_batch(self, metrics: dict | None = None, params: dict | None = None, tags: dict | None = None, step: int = 0):
        ts = _now_ms()
        self._sender.submit({
            "kind": "batch",
            "metrics": [[k, float(v), ts, int(step)] for k, v in (metrics or {}).items()],
            "params": {k: str(v) for k, v in (params or {}).items() if v is not None},
            "tags": {k: str(v) for k, v in (tags or {}).items()},
        })
        self._check_failure()

    def _check_failure(self, final: bool = False):
        failure = self._sender.failure
        if failure is not None and not self._warned:
            self._warned = True
            warnings.warn(
                f"MLflow at {self._uri} is unreachable ({type(failure).__name__}: {str(failure)[:200]}). Training goes on; "
                f"everything not yet sent is kept in {self._sender.journal}. Send it later with "
                f"`qat_plugin.integrations.mlflow.replay({str(self._sender.journal)!r}, tracking_uri=...)`.",
                stacklevel=3,
            )

    @staticmethod
    def _amax_metrics(model) -> dict[str, float]:
        return {f"amax/{i.key}": float(np.max(i.amax)) for i in list_quantizers(model)}

    def _log_ranges(self, model, name: str) -> None:
        ranges = {i.key: np.asarray(i.amax).tolist() for i in list_quantizers(model)}
        path = self._dir / name
        path.write_text(json.dumps(ranges, indent=1))
        self._log_file(path, "ranges")

    def _log_file(self, path: Path, artifact_path: str | None = None) -> None:
        self._sender.submit({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def _plot_histograms(self, histograms: dict, ranges: dict) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = list(histograms)
        cols = min(4, len(keys))
        rows = -(-len(keys) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            edges, counts = histograms[key]
            ax.bar(edges[:-1], np.maximum(counts, 0.5), width=np.diff(edges), align="edge", log=True)
            ax.axvline(ranges[key], color="red", linestyle="--", label=f"amax {ranges[key]:.3g}")
            ax.set_title(key, fontsize=8)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.suptitle("|activation| histograms at the QAT switch; red: chosen range")
        fig.tight_layout()
        path = self._dir / "activation_histograms.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return path
