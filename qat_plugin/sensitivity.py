"""`sensitivity_analysis`: which layers cost accuracy when quantized, ranked.

From one trained FP32 model and a calibration set, each quantizable layer is
measured twice, with calibration only (no training):

* *alone*: only that layer quantized (`QuantizationSpec(layers=[name])`);
  the drop below FP32 is the damage the layer does by itself;
* *all but*: every other layer quantized (`exclude=[name]`); the gain over
  full int8 is what keeping that one layer in FP32 wins back.

The ranking sorts by the sum of the two, so a layer that hurts alone *and*
whose exclusion helps comes first. It is the order in which to try keeping
layers FP32 (see `qat_plugin.integrations.tuner`, `mode="top_k"`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import keras
import numpy as np

from qat_plugin.config import PlacementPolicy, QuantizationSpec
from qat_plugin.errors import SpecError
from qat_plugin.calibration import calibrate
from qat_plugin.transform import _all_layers, check_model, quantize_model
from qat_plugin.wrappers import quantize_wrappers


def accuracy(y_true, y_pred) -> float:
    """Top-1 accuracy of logits/probabilities against integer or one-hot labels.

    >>> accuracy(np.array([1, 0]), np.array([[0.1, 0.9], [0.2, 0.8]]))
    0.5
    """
    y_true = np.asarray(y_true)
    pred = np.argmax(np.asarray(y_pred), axis=-1)
    if y_true.ndim == pred.ndim + 1:  # one-hot labels
        y_true = np.argmax(y_true, axis=-1)
    return float(np.mean(pred == y_true.reshape(pred.shape)))


def layer_macs(model: keras.Model) -> dict[str, int]:
    """Multiply-accumulates per inference of every layer with a kernel, by name.

    A kernel holds k_h*k_w*(in_c/groups)*out_c (conv) or in*out (dense)
    numbers, each used once per output position, so MACs = the product of
    the output's spatial dims times the kernel's size. Layers without a
    kernel (adds, pooling, BatchNorm) count 0: they are cheap next to convs.

    >>> m = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="c"),
    ...                       keras.layers.Flatten(), keras.layers.Dense(10, name="d")])
    >>> layer_macs(m)["c"], layer_macs(m)["d"]
    (1296, 1440)
    """
    out = {}
    for layer in _all_layers(model):
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            out[layer.name] = 0
            continue
        nodes = layer._inbound_nodes or []
        shape = tuple(nodes[0].output_tensors[0].shape) if nodes else tuple(layer.output.shape)
        positions = math.prod(int(d) for d in shape[1:-1] if d is not None)
        # Shared layers run once per call site.
        out[layer.name] = positions * math.prod(int(d) for d in kernel.shape) * max(1, len(nodes))
    return out


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    """One layer's two measurements (accuracies on the evaluation data)."""

    name: str
    class_name: str
    alone_accuracy: float  # only this layer quantized
    all_but_accuracy: float  # every quantizable layer but this one quantized
    macs: int


@dataclasses.dataclass(frozen=True)
class SensitivityReport:
    """Per-layer quantization sensitivity of one model, most sensitive first.

    Attributes:
        fp32_accuracy: the FP32 model's accuracy.
        int8_accuracy: accuracy with every selected layer quantized.
        layers: one `LayerSensitivity` per quantizable layer, ranked.

    Example:

    >>> r = SensitivityReport(0.9, 0.8, (LayerSensitivity("a", "Dense", 0.85, 0.88, 10),))
    >>> r.ranking, round(r.alone_drop("a"), 3), round(r.all_but_gain("a"), 3)
    (['a'], 0.05, 0.08)
    """

    fp32_accuracy: float
    int8_accuracy: float
    layers: tuple[LayerSensitivity, ...]

    def __post_init__(self):
        ranked = sorted(self.layers, key=lambda l: -self._score(l))
        object.__setattr__(self, "layers", tuple(ranked))

    def _score(self, l: LayerSensitivity) -> float:
        return (self.fp32_accuracy - l.alone_accuracy) + (l.all_but_accuracy - self.int8_accuracy)

    def _get(self, name: str) -> LayerSensitivity:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(f"No layer {name!r} in this report. Layers: {self.ranking}")

    @property
    def ranking(self) -> list[str]:
        """Layer names, the one most worth keeping in FP32 first."""
        return [l.name for l in self.layers]

    def alone_drop(self, name: str) -> float:
        """FP32 accuracy minus accuracy with only `name` quantized."""
        return self.fp32_accuracy - self._get(name).alone_accuracy

    def all_but_gain(self, name: str) -> float:
        """Accuracy with all but `name` quantized, minus full int8 accuracy."""
        return self._get(name).all_but_accuracy - self.int8_accuracy

    def __str__(self) -> str:
        rows = [("rank", "layer", "kind", "MACs", "drop alone", "gain if FP32", "score")]
        for i, l in enumerate(self.layers, 1):
            rows.append((str(i), l.name, l.class_name, f"{l.macs:,}", f"{self.alone_drop(l.name):+.4f}",
                         f"{self.all_but_gain(l.name):+.4f}", f"{self._score(l):+.4f}"))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        lines.append(f"FP32 accuracy {self.fp32_accuracy:.4f}, full int8 {self.int8_accuracy:.4f} "
                     f"(drop {self.fp32_accuracy - self.int8_accuracy:+.4f})")
        return "\n".join(lines)

    def plot(self, path) -> str:
        """Save a bar chart (drop alone, gain if FP32, per layer) as a PNG; returns the path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = self.ranking
        x = np.arange(len(names))
        fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(names) + 2), 3.5))
        ax.bar(x - 0.2, [self.alone_drop(n) for n in names], 0.4, label="drop when only this layer is int8")
        ax.bar(x + 0.2, [self.all_but_gain(n) for n in names], 0.4, label="gain when only this layer stays FP32")
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("accuracy")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_title(f"Quantization sensitivity (FP32 {self.fp32_accuracy:.4f}, int8 {self.int8_accuracy:.4f})", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return str(path)

    def log_to_mlflow(self, run_name: str = "sensitivity", artifact_dir: str | None = None) -> str:
        """Log per-layer metrics, the table and a bar chart to MLflow; returns the run id.

        Logs into the active run if there is one, else into a new run (ended
        afterwards). Metrics: `fp32_accuracy`, `int8_accuracy`, and per layer
        `sensitivity/<layer>/drop_alone`, `.../gain_if_fp32`, `.../rank`.
        """
        import tempfile
        from pathlib import Path

        import mlflow

        active = mlflow.active_run()
        run = active or mlflow.start_run(run_name=run_name)
        try:
            metrics = {"fp32_accuracy": self.fp32_accuracy, "int8_accuracy": self.int8_accuracy}
            for rank, name in enumerate(self.ranking, 1):
                metrics[f"sensitivity/{name}/drop_alone"] = self.alone_drop(name)
                metrics[f"sensitivity/{name}/gain_if_fp32"] = self.all_but_gain(name)
                metrics[f"sensitivity/{name}/rank"] = rank
            mlflow.log_metrics(metrics)
            mlflow.log_text(str(self), "sensitivity/sensitivity.txt")
            out = Path(artifact_dir or tempfile.mkdtemp(prefix="qat_sensitivity_"))
            out.mkdir(parents=True, exist_ok=True)
            mlflow.log_artifact(self.plot(out / "sensitivity.png"), "sensitivity")
            return run.info.run_id
        finally:
            if active is None:
                mlflow.end_run()


def _evaluate(model, x, y, metric, batch_size: int) -> float:
    return float(metric(y, model.predict(x, batch_size=batch_size, verbose=0)))


def sensitivity_analysis(
    model: keras.Model,
    x_cal,
    eval_data: tuple,
    spec: QuantizationSpec | None = None,
    metric: Callable = accuracy,
    policy: str | PlacementPolicy = "tensorrt",
    layers: Sequence[str] | None = None,
    batch_size: int = 256,
) -> SensitivityReport:
    """Measure how much each quantizable layer costs, with calibration only.

    Args:
        model: a trained FP32 Functional or Sequential model.
        x_cal: calibration inputs (anything `quantize_model` calibrates on).
        eval_data: `(x, y)` to measure `metric` on.
        spec: the base spec (bits, calibrator, ...); its `exclude` stays
            excluded. Default: int8 everywhere.
        metric: `metric(y_true, y_pred) -> float`, higher is better.
        policy: the placement policy.
        layers: the layers to measure; default: every layer `spec` quantizes.
        batch_size: prediction batch size.

    Returns:
        A `SensitivityReport` (2 quantized models per layer were evaluated).

    Example:

    >>> import numpy as np, keras
    >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="a"), keras.layers.Dense(3, name="b")])
    >>> x = np.random.rand(64, 4).astype("float32"); y = np.argmax(m.predict(x, verbose=0), -1)
    >>> sorted(sensitivity_analysis(m, x, (x, y)).ranking)
    ['a', 'b']
    """
    spec = QuantizationSpec() if spec is None else spec
    if not isinstance(spec, QuantizationSpec):
        raise SpecError(f"`spec` must be a QuantizationSpec. Received: {type(spec).__name__}")
    if not (isinstance(eval_data, (tuple, list)) and len(eval_data) == 2):
        raise ValueError(f"`eval_data` must be a pair `(x, y)`. Received: {type(eval_data).__name__}")
    check_model(model)
    x, y = eval_data
    fp32 = _evaluate(model, x, y, metric, batch_size)
    full = quantize_model(model, spec, policy, calibration_data=x_cal)
    int8 = _evaluate(full, x, y, metric, batch_size)
    quantized = full.qat_report.quantized
    if layers is None:
        layers = quantized
    unknown = [n for n in layers if n not in quantized]
    if unknown:
        raise SpecError(f"`layers` {unknown} are not quantized by the spec, so they can't be measured. Quantized layers: {quantized}")
    kinds = {d.name: d.class_name for d in full.qat_report.layers}
    macs = layer_macs(model)

    # Calibration runs the model in float, so a quantizer's range doesn't depend on which other
    # layers are quantized: measure once on the full model, reuse for every partial one.
    ranges = {f"{w.inner_name}/{r['label']}": r["amax"] for w in quantize_wrappers(full)
              for r in w.quantizer_ranges() if r["slot"][0] != "weight"}

    def measured(s: QuantizationSpec, fallback: float) -> float:
        try:
            q = quantize_model(model, s, policy)
        except SpecError:  # nothing left to quantize (e.g. an add with no quantizer of its own)
            return fallback
        slots = [(w, r) for w in quantize_wrappers(q) for r in w.quantizer_ranges() if r["slot"][0] != "weight"]
        if all(f"{w.inner_name}/{r['label']}" in ranges for w, r in slots):
            for w, r in slots:
                w.amax_variable(r["slot"]).assign(ranges[f"{w.inner_name}/{r['label']}"])
        else:  # e.g. an add whose quantized inputs change with its neighbours: calibrate this one
            calibrate(q, x_cal, method=s.calibrator, percentile=s.percentile, num_batches=s.calibration_batches)
        return _evaluate(q, x, y, metric, batch_size)

    rows = []
    for name in layers:
        # `layers` narrows the base spec's selection; its exclusions still apply.
        alone = measured(spec.replace(layers=(name,), layer_types=()), fp32)
        all_but = measured(spec.replace(exclude=(*spec.exclude, name)), fp32)
        rows.append(LayerSensitivity(name, kinds.get(name, "?"), alone, all_but, macs.get(name, 0)))
    return SensitivityReport(fp32, int8, tuple(rows))
