"""Search which layers stay FP32 with keras-tuner; each trial a nested MLflow run.

`PartialQuantizationHyperModel` wraps the user's model-building function. Its
hyperparameters choose the FP32 layers (per-layer booleans `fp32/<layer>`,
or `keep_fp32_k`: keep the k first layers of a sensitivity ranking FP32) and
the QAT knobs (`switch_epoch`, `lr_multiplier`, `calibrator`). `fit` trains
with a `QATCallback` and returns one number to maximize, `score`
(see `PartialQuantizationObjective`), with the measurements beside it.

This and `qat_plugin.integrations.mlflow` are the only modules that import
keras_tuner / mlflow.

Example (slow: trains three small models):

>>> import keras_tuner as kt  # doctest: +SKIP
>>> hm = PartialQuantizationHyperModel(build_fn, fp32_epochs=2, qat_epochs=1)  # doctest: +SKIP
>>> tuner = kt.RandomSearch(hm, objective=OBJECTIVE, max_trials=3, directory="kt")  # doctest: +SKIP
>>> with mlflow.start_run(run_name="search"):  # doctest: +SKIP
...     tuner.search(x, y, validation_data=(xv, yv), batch_size=64)
...     spec = get_best_spec(tuner); log_search_summary(tuner)
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np

from qat_plugin.callback import QATCallback
from qat_plugin.config import CALIBRATORS, PlacementPolicy, QuantizationSpec, get_policy
from qat_plugin.errors import SpecError
from qat_plugin.models import compile_classifier
from qat_plugin.sensitivity import SensitivityReport, accuracy, layer_macs
from qat_plugin.transform import _all_layers, plan_quantization

try:
    import keras_tuner as kt
    import mlflow
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"qat_plugin.integrations.tuner needs keras-tuner and mlflow: pip install keras-tuner mlflow ({e})") from e

MODES = ("per_layer", "top_k")
#: The objective to give the tuner: `score` is what `fit` returns to maximize.
OBJECTIVE = kt.Objective("score", "max")


@dataclasses.dataclass(frozen=True)
class PartialQuantizationObjective:
    """Turn (quantized accuracy, FP32 share) into one number to maximize.

    A trial is *feasible* when its quantized accuracy is at most `max_drop`
    below the FP32 reference. Every feasible trial scores above every
    infeasible one: feasible `2 - fp32_share + 0.01 * accuracy` (fewest FP32
    layers first, accuracy breaks ties), infeasible `accuracy` (so the search
    still climbs towards feasibility).

    Args:
        max_drop: allowed accuracy drop below FP32 (0.003 = 0.3 points).
        reference_accuracy: the FP32 accuracy to compare against; None: each
            trial's own FP32 accuracy (its final weights without quantizers).
        cost: what the FP32 share counts: `"layers"` (share of candidate
            layers kept FP32) or `"macs"` (share of their multiply-accumulates).

    >>> o = PartialQuantizationObjective(max_drop=0.01, reference_accuracy=0.95)
    >>> o.score(0.945, 0.25) > o.score(0.95, 0.5) > o.score(0.93, 0.0)
    True
    """

    max_drop: float = 0.003
    reference_accuracy: float | None = None
    cost: str = "layers"

    def __post_init__(self):
        if not isinstance(self.max_drop, (int, float)) or isinstance(self.max_drop, bool) or not 0 <= self.max_drop < 1:
            raise SpecError(f"`max_drop` must be a number in [0, 1) (0.003 = 0.3 points). Received: max_drop={self.max_drop!r}")
        if self.reference_accuracy is not None and not 0 <= self.reference_accuracy <= 1:
            raise SpecError(f"`reference_accuracy` must be in [0, 1] or None. Received: {self.reference_accuracy!r}")
        if self.cost not in ("layers", "macs"):
            raise SpecError(f"`cost` must be 'layers' or 'macs'. Received: cost={self.cost!r}")

    def feasible(self, quantized_accuracy: float, fp32_accuracy: float) -> bool:
        ref = self.reference_accuracy if self.reference_accuracy is not None else fp32_accuracy
        return quantized_accuracy >= ref - self.max_drop - 1e-9

    def score(self, quantized_accuracy: float, fp32_share: float, fp32_accuracy: float | None = None) -> float:
        ref = fp32_accuracy if fp32_accuracy is not None else self.reference_accuracy
        if ref is None:
            raise SpecError("No FP32 reference accuracy: set `reference_accuracy` or pass `fp32_accuracy`.")
        if self.feasible(quantized_accuracy, ref):
            return 2.0 - fp32_share + 0.01 * quantized_accuracy
        return float(quantized_accuracy)


def _takes_hp(fn: Callable) -> bool:
    try:
        return len(inspect.signature(fn).parameters) >= 1
    except (TypeError, ValueError):
        return True


class PartialQuantizationHyperModel(kt.HyperModel):
    """A keras-tuner `HyperModel`: which layers stay FP32, and the QAT knobs.

    Args:
        build_fn: the user's function `build_fn(hp)` (or `build_fn()`)
            returning an FP32 model; compiled with `compile_classifier` if
            it comes back uncompiled.
        fp32_epochs: FP32 epochs before the switch (the default switch epoch).
        qat_epochs: QAT epochs after it; `fit` runs `fp32_epochs + qat_epochs`
            epochs unless the tuner (Hyperband) sets `epochs`.
        layers: the candidate layers to keep FP32. `mode="per_layer"`: any
            order; None: every layer `spec` quantizes. `mode="top_k"`: a
            ranking, most sensitive first (a list or a `SensitivityReport`).
        mode: `"per_layer"` (a boolean `fp32/<layer>` each; small models) or
            `"top_k"` (`keep_fp32_k` in 0..`max_fp32_layers`; large models).
        objective: a `PartialQuantizationObjective`.
        spec: the base `QuantizationSpec` (bits, per-channel, ...).
        policy: the placement policy.
        switch_epochs, lr_multipliers, calibrators: the values searched for
            `switch_epoch`, `lr_multiplier`, `calibrator` (one value: fixed).
        max_fp32_layers: the largest `keep_fp32_k` (top_k mode).
        tracking_uri: MLflow tracking URI; None: MLflow's own setting.
        experiment: MLflow experiment of a parent run created when none is active.
        parent_run_id: the parent MLflow run of the trials (distributed
            workers pass the chief's); default: the active run, else a new one.
        mlflow_logger: also log each trial's epochs with `MlflowLogger`.
        artifact_dir: where per-trial files are written before upload.
        eval_batch_size: batch size of the validation predictions.

    Example:

    >>> hm = PartialQuantizationHyperModel(lambda: keras.Sequential([  # doctest: +SKIP
    ...     keras.Input((4,)), keras.layers.Dense(3, name="fc")]), fp32_epochs=1, qat_epochs=1)
    """

    def __init__(
        self,
        build_fn: Callable,
        fp32_epochs: int,
        qat_epochs: int,
        layers: Sequence[str] | SensitivityReport | None = None,
        mode: str = "per_layer",
        objective: PartialQuantizationObjective | None = None,
        spec: QuantizationSpec | None = None,
        policy: str | PlacementPolicy = "tensorrt",
        switch_epochs: Sequence[int] | None = None,
        lr_multipliers: Sequence[float] = (1.0,),
        calibrators: Sequence[str] = ("max",),
        max_fp32_layers: int | None = None,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        parent_run_id: str | None = None,
        mlflow_logger: bool = True,
        artifact_dir: str | None = None,
        eval_batch_size: int = 512,
        name: str | None = None,
        tunable: bool = True,
    ):
        super().__init__(name=name, tunable=tunable)
        if not callable(build_fn):
            raise TypeError(f"`build_fn` must be a function returning a Keras model. Received: {build_fn!r}")
        for what, value, low in (("fp32_epochs", fp32_epochs, 0), ("qat_epochs", qat_epochs, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{what}` must be an int >= {low}. Received: {what}={value!r}")
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}. Received: mode={mode!r}")
        if isinstance(layers, SensitivityReport):
            layers = layers.ranking
        if mode == "top_k" and layers is None:
            raise ValueError("`mode='top_k'` needs `layers=` a ranking, most sensitive first, e.g. `sensitivity_analysis(...).ranking`.")
        bad = [c for c in calibrators if c not in CALIBRATORS]
        if not calibrators or bad:
            raise SpecError(f"`calibrators` must be a non-empty list of {CALIBRATORS}. Received: {list(calibrators)}")
        if not lr_multipliers or any(not isinstance(m, (int, float)) or m <= 0 for m in lr_multipliers):
            raise ValueError(f"`lr_multipliers` must be a non-empty list of numbers > 0. Received: {list(lr_multipliers)}")
        self.switch_epochs = tuple(switch_epochs) if switch_epochs else (fp32_epochs,)
        if any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < fp32_epochs + qat_epochs for s in self.switch_epochs):
            raise ValueError(f"`switch_epochs` must be ints in [0, {fp32_epochs + qat_epochs}). Received: {list(self.switch_epochs)}")
        self.build_fn, self.fp32_epochs, self.qat_epochs, self.mode = build_fn, fp32_epochs, qat_epochs, mode
        self.layers = None if layers is None else tuple(layers)
        self.objective = objective or PartialQuantizationObjective()
        self.spec = spec or QuantizationSpec()
        self.policy = get_policy(policy)
        self.lr_multipliers, self.calibrators = tuple(float(m) for m in lr_multipliers), tuple(calibrators)
        self.max_fp32_layers = max_fp32_layers
        self.tracking_uri, self.experiment, self.parent_run_id = tracking_uri, experiment, parent_run_id
        self.mlflow_logger = mlflow_logger
        self.artifact_dir = artifact_dir
        self.eval_batch_size = eval_batch_size
        self._macs: dict[str, int] | None = None
        self._own_parent = False

    # ------------------------------------------------------------ hyperparameters

    def _candidates(self, model) -> tuple[str, ...]:
        _, report = plan_quantization(model, self.spec, self.policy)
        quantized = report.quantized
        if self.layers is None:
            return tuple(quantized)
        unknown = [n for n in self.layers if n not in quantized]
        if unknown:
            raise SpecError(f"`layers` {unknown} are not layers the spec quantizes in model {model.name!r}. Quantized layers: {quantized}")
        return self.layers

    def _declare(self, hp) -> None:
        """Register every hyperparameter (idempotent: keras-tuner returns the current value)."""
        if self.mode == "per_layer":
            for name in self.layers:
                hp.Boolean(f"fp32/{name}", default=False)
        else:
            k_max = len(self.layers) if self.max_fp32_layers is None else min(self.max_fp32_layers, len(self.layers))
            hp.Int("keep_fp32_k", 0, k_max, default=0)
        for hp_name, values in (("switch_epoch", self.switch_epochs), ("lr_multiplier", self.lr_multipliers), ("calibrator", self.calibrators)):
            if len(values) == 1:
                hp.Fixed(hp_name, values[0])
            else:
                hp.Choice(hp_name, list(values), default=values[0])

    def fp32_layers(self, hp) -> list[str]:
        """The layers this trial's hyperparameters keep in FP32."""
        if self.mode == "per_layer":
            # Read from the hyperparameters themselves: a distributed chief never builds a model.
            return [k[len("fp32/"):] for k, v in hp.values.items() if k.startswith("fp32/") and v]
        return list(self.layers[: hp.values.get("keep_fp32_k", 0)])

    def spec_for(self, hp) -> QuantizationSpec:
        """The `QuantizationSpec` (for `QATCallback`) these hyperparameters describe."""
        return self.spec.replace(exclude=(*self.spec.exclude, *self.fp32_layers(hp)), calibrator=hp.values.get("calibrator", self.calibrators[0]))

    def _build_user_model(self, hp) -> keras.Model:
        model = self.build_fn(hp) if _takes_hp(self.build_fn) else self.build_fn()
        if not isinstance(model, keras.Model):
            raise kt.errors.FatalError(f"`build_fn` must return a keras.Model. Received: {type(model).__name__}")
        return model

    def build(self, hp) -> keras.Model:
        model = self._build_user_model(hp)
        if self.layers is None or self._macs is None:
            self.layers = self._candidates(model)
            self._macs = layer_macs(model)
        self._declare(hp)
        if not getattr(model, "compiled", False):
            compile_classifier(model)
        return model

    # ------------------------------------------------------------ a trial

    def _parent(self) -> str:
        if self.tracking_uri:
            mlflow.set_tracking_uri(self.tracking_uri)
        active = mlflow.active_run()
        if active is not None and self.parent_run_id is None:
            self.parent_run_id = active.info.run_id
        if self.parent_run_id is None:
            client = mlflow.MlflowClient()
            exp_id = "0"
            if self.experiment:
                exp = client.get_experiment_by_name(self.experiment)
                exp_id = exp.experiment_id if exp else client.create_experiment(self.experiment)
            self.parent_run_id = client.create_run(exp_id, run_name="partial-quantization-search").info.run_id
            self._own_parent = True  # log_search_summary ends it
        return self.parent_run_id

    def fit(self, hp, model, *args, **kwargs):
        """Train FP32 then QAT with this trial's FP32 layers; returns `score` and the measurements."""
        validation = kwargs.get("validation_data")
        if not (isinstance(validation, (tuple, list)) and len(validation) >= 2):
            raise kt.errors.FatalError("Pass `validation_data=(x, y)` (arrays) to `tuner.search`: the objective is quantized validation accuracy.")
        xv, yv = validation[0], validation[1]
        kwargs.setdefault("epochs", self.fp32_epochs + self.qat_epochs)
        epochs = kwargs["epochs"]
        # Hyperband runs short brackets: switch no later than the last epoch.
        start = min(int(hp.values.get("switch_epoch", self.fp32_epochs)), epochs - 1)
        fp32 = self.fp32_layers(hp)
        spec = self.spec_for(hp)
        quantized = [n for n in self.layers if n not in fp32]
        callbacks = list(kwargs.pop("callbacks", None) or [])
        # keras-tuner's checkpoint would save the swapped (quantized) graph, which the FP32 model
        # that Hyperband rebuilds can't load: save FP32-shaped weights ourselves after fit.
        checkpoints = [c for c in callbacks if type(c).__name__ == "SaveBestEpoch"]
        callbacks = [c for c in callbacks if c not in checkpoints]
        # An FP32 twin of the model: after QAT it holds the trained weights without quantizers,
        # giving the reference accuracy of the very weights that were quantized.
        twin = keras.models.clone_model(model)
        parent = self._parent()
        trial_id = next((c.trial.trial_id for c in callbacks if type(c).__name__ == "TunerCallback"), None)
        experiment_id = mlflow.MlflowClient().get_run(parent).info.experiment_id
        with mlflow.start_run(run_name=f"trial-{trial_id or ''}", nested=True, parent_run_id=parent, experiment_id=experiment_id):
            mlflow.log_params({
                "fp32_layers": json.dumps(fp32),
                "switch_epoch": start,
                "lr_multiplier": hp.values.get("lr_multiplier", self.lr_multipliers[0]),
                "calibrator": spec.calibrator,
                "mode": self.mode,
            })
            loggers = []
            if self.mlflow_logger:
                from qat_plugin.integrations.mlflow import MlflowLogger

                artifacts = self.artifact_dir or tempfile.mkdtemp(prefix="qat_tuner_")
                loggers.append(MlflowLogger(tracking_uri=self.tracking_uri, export_onnx=False, log_model=False, artifact_dir=artifacts))
            if quantized:
                callbacks.insert(0, QATCallback(start_epoch=start, spec=spec, policy=self.policy,
                                                lr_multiplier=float(hp.values.get("lr_multiplier", 1.0)), loggers=loggers, verbose=0))
            model.fit(*args, callbacks=callbacks, **kwargs)
            q_acc = accuracy(yv, model.predict(xv, batch_size=self.eval_batch_size, verbose=0))
            self._copy_weights(model, twin)
            fp32_acc = accuracy(yv, twin.predict(xv, batch_size=self.eval_batch_size, verbose=0))
            results = self._measure(fp32, q_acc, fp32_acc)
            mlflow.log_metrics(results)
            if trial_id is not None:
                mlflow.set_tag("keras_tuner.trial_id", trial_id)
        for c in checkpoints:
            twin.save_weights(c.filepath)
        return results

    def _measure(self, fp32: list[str], q_acc: float, fp32_acc: float) -> dict[str, float]:
        macs = self._macs or {}
        total = sum(macs.get(n, 0) for n in self.layers) or 1
        fp32_macs = sum(macs.get(n, 0) for n in fp32)
        layer_share = len(fp32) / max(1, len(self.layers))
        share = layer_share if self.objective.cost == "layers" else fp32_macs / total
        return {
            "score": self.objective.score(q_acc, share, fp32_acc),
            "quantized_accuracy": q_acc,
            # Not `fp32_accuracy`: MlflowLogger logs that name (the FP32 phase's val accuracy).
            "fp32_reference_accuracy": fp32_acc,
            "accuracy_drop": fp32_acc - q_acc,
            "n_fp32_layers": float(len(fp32)),
            "fp32_share": share,
            "quantized_mac_share": 1.0 - fp32_macs / total,
            "feasible": float(self.objective.feasible(q_acc, fp32_acc)),
        }

    @staticmethod
    def _copy_weights(trained: keras.Model, twin: keras.Model) -> None:
        """Copy trained weights (looking inside QuantizeWrappers) into the FP32 twin."""
        inner = {getattr(l, "inner_name", l.name): getattr(l, "layer", l) for l in _all_layers(trained)}
        for layer in _all_layers(twin):
            if layer.weights:
                layer.set_weights(inner[layer.name].get_weights())


# ---------------------------------------------------------------- after the search


def get_best_spec(tuner) -> QuantizationSpec:
    """The best trial's `QuantizationSpec`, ready for `QATCallback(spec=...)`.

    >>> spec = get_best_spec(tuner)  # doctest: +SKIP
    """
    hm = tuner.hypermodel
    if not isinstance(hm, PartialQuantizationHyperModel):
        raise TypeError(f"The tuner's hypermodel is a {type(hm).__name__}, not a PartialQuantizationHyperModel.")
    best = tuner.get_best_hyperparameters(1)
    if not best:
        raise ValueError("The tuner has no completed trial yet: run `tuner.search(...)` first.")
    return hm.spec_for(best[0])


def trial_table(tuner) -> list[dict]:
    """One row per completed trial: FP32 layers, accuracies, shares and score."""
    hm = tuner.hypermodel
    rows = []
    for trial in tuner.oracle.trials.values():
        if trial.status != "COMPLETED":
            continue
        metrics = trial.metrics
        rows.append({
            "trial_id": trial.trial_id,
            "fp32_layers": hm.fp32_layers(trial.hyperparameters),
            **{k: metrics.get_last_value(k) if metrics.exists(k) else float("nan") for k in ("score", "quantized_accuracy", "fp32_reference_accuracy", "fp32_share", "quantized_mac_share", "n_fp32_layers")},
        })
    return sorted(rows, key=lambda r: -r["score"])


def _pareto_plot(rows: list[dict], path: Path, reference: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = np.array([r["fp32_share"] for r in rows])
    acc = np.array([r["quantized_accuracy"] for r in rows])
    order = np.lexsort((-acc, share))
    front, best = [], -np.inf
    for i in order:  # the best accuracy reachable at each FP32 share or less
        if acc[i] > best:
            front.append(i)
            best = acc[i]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter(share, acc, label="trials", alpha=0.6)
    ax.plot(share[front], acc[front], "r.-", label="Pareto front")
    if reference is None:  # each trial's weights without quantizers: show their median
        reference, what = float(np.nanmedian([r["fp32_reference_accuracy"] for r in rows])), "FP32 (median of trials)"
    else:
        what = "FP32 reference"
    ax.axhline(reference, color="gray", linestyle="--", linewidth=0.8, label=f"{what} {reference:.4f}")
    ax.set_xlabel("FP32 share")
    ax.set_ylabel("quantized validation accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def log_search_summary(tuner, run_id: str | None = None, artifact_dir: str | None = None) -> dict[str, Path]:
    """Log the Pareto plot (accuracy vs FP32 share) and the best spec to the parent run.

    The run: `run_id`, else the hypermodel's parent run, else the active run.
    Artifacts: `search/pareto.png`, `search/best_spec.json` (read it back with
    `QuantizationSpec.from_json`), `search/trials.json`. Returns the local files.
    """
    hm = tuner.hypermodel
    run_id = run_id or hm.parent_run_id or (mlflow.active_run().info.run_id if mlflow.active_run() else None)
    if run_id is None:
        raise ValueError("No MLflow run to log to: pass `run_id`, or call this inside `mlflow.start_run()`.")
    rows = trial_table(tuner)
    if not rows:
        raise ValueError("The tuner has no completed trial yet: run `tuner.search(...)` first.")
    out = Path(artifact_dir or tempfile.mkdtemp(prefix="qat_search_"))
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "pareto": _pareto_plot(rows, out / "pareto.png", hm.objective.reference_accuracy),
        "best_spec": out / "best_spec.json",
        "trials": out / "trials.json",
    }
    files["best_spec"].write_text(get_best_spec(tuner).to_json(indent=1))
    files["trials"].write_text(json.dumps(rows, indent=1, default=float))
    if hm.tracking_uri:
        mlflow.set_tracking_uri(hm.tracking_uri)
    client = mlflow.MlflowClient()
    for path in files.values():
        client.log_artifact(run_id, str(path), "search")
    best = rows[0]
    for key in ("score", "quantized_accuracy", "fp32_share", "quantized_mac_share", "n_fp32_layers"):
        client.log_metric(run_id, f"best_{key}", float(best[key]))
    client.set_tag(run_id, "qat.best_fp32_layers", json.dumps(best["fp32_layers"]))
    if hm._own_parent and run_id == hm.parent_run_id:
        client.set_terminated(run_id)
    return files
