"""`QATCallback`: switch a model from FP32 to fake-quantized inside `model.fit`.

At the switch the callback clones the model with `QuantizeWrapper`s around the
layers the spec selects (reusing the layers themselves, so weights and
optimizer slots are the very same variables), calibrates the activation ranges
on a few batches, and swaps the quantized graph into the user's model object.
The running `fit` goes on with the quantized graph; so do `evaluate`,
`predict`, `save` and `export_onnx` afterwards.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence

import keras

from qat_plugin import _switch
from qat_plugin.calibration import calibrate
from qat_plugin.config import PlacementPolicy, QuantizationSpec, get_policy
from qat_plugin.errors import CalibrationError, QuantizationError, SpecError
from qat_plugin.transform import check_model, clone_and_wrap, plan_quantization
from qat_plugin.wrappers import quantize_wrappers


# Written beside BackupAndRestore's files once the model has switched.
_BACKUP_STATE = "qat_switch.json"


def _positive_int(value, name: str, allow_zero: bool = True) -> int | None:
    if value is None:
        return None
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an int >= {low} or None. Received: {name}={value!r}")
    return value


@keras.saving.register_keras_serializable(package="qat_plugin")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A learning-rate schedule multiplied by a constant (the QAT-phase multiplier).

    >>> s = ScaledSchedule(keras.optimizers.schedules.ExponentialDecay(1.0, 10, 0.5), 0.1)
    >>> round(float(s(10)), 4)
    0.05
    """

    def __init__(self, schedule, multiplier: float):
        self.schedule = schedule
        self.multiplier = float(multiplier)

    def __call__(self, step):
        return self.schedule(step) * self.multiplier

    def get_config(self):
        return {"schedule": keras.saving.serialize_keras_object(self.schedule), "multiplier": self.multiplier}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config["schedule"]), config["multiplier"])


class QATCallback(keras.callbacks.Callback):
    """Switch to quantization-aware training mid-`fit`, in place.

    Args:
        start_epoch: switch at the start of this epoch (0-based).
        start_step: or switch after this many optimizer steps.
        spec: a `QuantizationSpec` (partial quantization, bits, calibrator).
        policy: placement policy: `"tensorrt"` (default), `"onnxruntime"` or
            `"tflite"`, or a `PlacementPolicy`. The CPU policies fold each
            BatchNorm into its conv at the switch: from then on it trains
            with its moving statistics frozen (gamma and beta still train).
        calibration_data: inputs for calibration (array, `(x, y)`,
            `tf.data.Dataset`, ...). Default: batches of the training data.
        calibration_batches: how many batches to calibrate on (default: the
            spec's `calibration_batches`).
        lr_multiplier: multiply the learning rate (or schedule) by this for
            the QAT phase.
        freeze_bn_after: freeze BatchNormalization (statistics, scale and
            offset, as `trainable=False` does in Keras) this many epochs
            after the switch.
        freeze_ranges_after: track activation ranges with a moving average
            during the first K QAT steps, then freeze them; `None` keeps the
            calibrated ranges fixed from the switch on.
        loggers: experiment trackers told about every step of the run, e.g.
            `qat_plugin.integrations.mlflow.MlflowLogger()`. A logger has
            any of `on_train_begin(cb)`, `before_switch(cb)`, `on_switch(cb)`,
            `on_epoch_end(cb, epoch, logs)`, `on_train_end(cb, logs)`; a
            logger that raises is reported once and never stops training.
        verbose: 1 prints what happened at the switch, 0 is silent.

    After `fit`: `switch_epoch`, `switch_step`, `calibration_seconds` and
    `calibrated_ranges` hold what happened, and `history.history` has a
    `qat_phase` entry per epoch (0 = FP32, 1 = quantized).

    Example:

    >>> import numpy as np, keras
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> model.compile("adam", "mse")
    >>> cb = QATCallback(start_epoch=1, verbose=0)
    >>> h = model.fit(np.ones((8, 4)), np.ones((8, 3)), epochs=2, callbacks=[cb], verbose=0)
    >>> h.history["qat_phase"], cb.switch_epoch
    ([0, 1], 1)
    """

    def __init__(
        self,
        start_epoch: int | None = None,
        start_step: int | None = None,
        spec: QuantizationSpec | None = None,
        policy: str | PlacementPolicy = "tensorrt",
        calibration_data=None,
        calibration_batches: int | None = None,
        lr_multiplier: float = 1.0,
        freeze_bn_after: int | None = None,
        freeze_ranges_after: int | None = None,
        loggers: Sequence = (),
        verbose: int = 1,
    ):
        super().__init__()
        if (start_epoch is None) == (start_step is None):
            raise ValueError(
                "Pass exactly one of `start_epoch` or `start_step`. "
                f"Received: start_epoch={start_epoch!r}, start_step={start_step!r}"
            )
        self.start_epoch = _positive_int(start_epoch, "start_epoch")
        self.start_step = _positive_int(start_step, "start_step")
        self.spec = QuantizationSpec() if spec is None else spec
        if not isinstance(self.spec, QuantizationSpec):
            raise SpecError(f"`spec` must be a QuantizationSpec. Received: {type(spec).__name__}")
        self.policy = get_policy(policy)
        self.calibration_data = calibration_data
        self.calibration_batches = _positive_int(calibration_batches, "calibration_batches", allow_zero=False) or self.spec.calibration_batches
        if not isinstance(lr_multiplier, (int, float)) or isinstance(lr_multiplier, bool) or lr_multiplier <= 0:
            raise ValueError(f"`lr_multiplier` must be a number > 0. Received: lr_multiplier={lr_multiplier!r}")
        self.lr_multiplier = float(lr_multiplier)
        self.freeze_bn_after = _positive_int(freeze_bn_after, "freeze_bn_after")
        self.freeze_ranges_after = _positive_int(freeze_ranges_after, "freeze_ranges_after")
        self.loggers = list(loggers)
        self.verbose = verbose

    def _notify(self, event: str, *args) -> None:
        for logger in self.loggers:
            hook = getattr(logger, event, None)
            if hook is None:
                continue
            try:
                hook(self, *args)
            except Exception as exc:  # a tracker must never cost the user their training run
                if id(logger) not in self._failed_loggers:
                    self._failed_loggers.add(id(logger))
                    warnings.warn(f"QATCallback: logger {type(logger).__name__}.{event} failed and is ignored: {exc!r}", stacklevel=2)

    # ------------------------------------------------------------ fit lifecycle

    def on_train_begin(self, logs=None):
        self.switch_epoch: int | None = None
        self.switch_step: int | None = None
        self.calibration_seconds: float | None = None
        self.calibrated_ranges: dict[str, float] = {}
        self.calibration_histograms: dict = {}
        self._failed_loggers: set[int] = set()
        self._epoch = 0
        self._bn_frozen = False
        self._ranges_frozen = False
        self._quantized = bool(quantize_wrappers(self.model))
        if not self._quantized:  # else: a second `fit` on a model that already switched
            self._validate()
        self._notify("on_train_begin")
        resumed = None if self._quantized else self._backup_state()
        if resumed is not None:
            # BackupAndRestore is about to load a quantized backup: give the model
            # the quantized graph first; the backup holds the ranges.
            self._switch(resumed["epoch"], resumed["step"], calibrate_ranges=False)

    def on_train_end(self, logs=None):
        self._notify("on_train_end", logs or {})

    def _validate(self):
        """Everything that can be wrong is checked here, before the first step."""
        model = self.model
        check_model(model)
        if not getattr(model, "compiled", False) or model.optimizer is None:
            raise QuantizationError("The model is not compiled: call `model.compile(optimizer, loss)` before `fit`.")
        _switch.check_optimizer(model.optimizer)
        epochs = (self.params or {}).get("epochs")
        if self.start_epoch is not None and epochs is not None and self.start_epoch >= epochs:
            raise ValueError(
                f"QATCallback(start_epoch={self.start_epoch}) would never switch: fit runs epochs 0..{epochs - 1}. "
                f"Use start_epoch < {epochs}, or train for more epochs."
            )
        steps = (self.params or {}).get("steps")
        if self.start_step is not None and epochs and steps and self.start_step >= epochs * steps:
            raise ValueError(
                f"QATCallback(start_step={self.start_step}) would never switch: fit runs {epochs * steps} steps. "
                "Use a smaller start_step."
            )
        # Plans the whole transform now, so a bad spec fails before training.
        self._plan, _ = plan_quantization(model, self.spec, self.policy)
        if self.calibration_data is None and _switch.training_data(model) is None:
            raise CalibrationError(
                "QATCallback can't read calibration batches from this kind of training data (e.g. a one-shot "
                "Python generator). Pass `calibration_data=` (arrays, (x, y) or a tf.data.Dataset)."
            )
        callbacks = _switch.fit_callbacks(model)
        backups = [c for c in callbacks if isinstance(c, keras.callbacks.BackupAndRestore)]
        if backups and callbacks.index(backups[0]) < callbacks.index(self):
            raise ValueError(
                "List QATCallback before BackupAndRestore in `callbacks`: a resumed run must switch to the "
                "quantized graph before the backup (which holds quantized weights) is loaded."
            )
        self._backups = backups

    def _backup_state(self) -> dict | None:
        for backup in self._backups:
            path = os.path.join(backup.backup_dir, _BACKUP_STATE)
            if os.path.exists(path) and os.path.exists(backup._weights_path):
                with open(path) as f:
                    return json.load(f)
        return None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if not self._quantized and self.start_epoch is not None and epoch >= self.start_epoch:
            self._switch(epoch, self._iterations())
        if (
            self.freeze_bn_after is not None
            and not self._bn_frozen
            and self.switch_epoch is not None
            and epoch >= self.switch_epoch + self.freeze_bn_after
        ):
            self._freeze_batchnorm()

    def on_train_batch_end(self, batch, logs=None):
        if not self._quantized:
            if self.start_step is not None:
                step = self._iterations()
                if step >= self.start_step:
                    self._switch(self._epoch, step)
        elif self.freeze_ranges_after is not None and not self._ranges_frozen and self.switch_step is not None:
            if self._iterations() >= self.switch_step + self.freeze_ranges_after:
                self._set_range_tracking(False)
                self._ranges_frozen = True

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["qat_phase"] = int(self._quantized)
            logs["qat_switch_step"] = -1 if self.switch_step is None else self.switch_step
        self._notify("on_epoch_end", epoch, dict(logs or {}))

    # ------------------------------------------------------------ the switch

    def _iterations(self) -> int:
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def _switch(self, epoch: int, step: int, calibrate_ranges: bool = True):
        model = self.model
        self._notify("before_switch")
        with model.distribute_strategy.scope():
            qmodel = clone_and_wrap(model, self._plan, share_weights=True)
        start = time.perf_counter()
        if calibrate_ranges:
            data = self.calibration_data if self.calibration_data is not None else _switch.training_data(model)
            try:
                self.calibrated_ranges = calibrate(
                    qmodel,
                    data,
                    method=self.spec.calibrator,
                    percentile=self.spec.percentile,
                    num_batches=self.calibration_batches,
                    histograms=self.calibration_histograms,
                )
            except Exception as exc:
                raise CalibrationError(
                    f"Calibration at the QAT switch (epoch {epoch}, step {step}) failed; the FP32 model and its "
                    f"weights are intact. Cause: {exc}"
                ) from exc
        self.calibration_seconds = time.perf_counter() - start
        resumed = not calibrate_ranges
        for w in quantize_wrappers(qmodel):
            w.track_ranges = self.freeze_ranges_after is not None and not resumed
        # Before the swap: the new train function reads the schedule when traced.
        previous_lr = self._scale_learning_rate(resumed)
        try:
            _switch.swap_graph(model, qmodel)
        except Exception:
            if previous_lr is not None:
                model.optimizer.learning_rate = previous_lr
            raise
        self._quantized = True
        self.switch_epoch, self.switch_step = epoch, step
        for backup in self._backups:
            os.makedirs(backup.backup_dir, exist_ok=True)
            with open(os.path.join(backup.backup_dir, _BACKUP_STATE), "w") as f:
                json.dump({"epoch": epoch, "step": step}, f)
        self._notify("on_switch")
        if self.verbose:
            wrappers = quantize_wrappers(model)
            n_q = sum(len(w.quantizer_ranges()) for w in wrappers)
            how = (
                "ranges restored from the BackupAndRestore backup"
                if resumed
                else f"calibrated ({self.spec.calibrator}) on {self.calibration_batches} batches in {self.calibration_seconds:.2f}s"
            )
            print(
                f"\nQATCallback: epoch {epoch}, step {step}: switched to quantized training: {len(wrappers)} layers "
                f"wrapped ({n_q} quantizers, policy {self.policy.name!r}), {how}."
            )

    def _scale_learning_rate(self, resumed: bool):
        """Apply `lr_multiplier`; returns what to restore if the switch fails."""
        if self.lr_multiplier == 1.0:
            return None
        opt = self.model.optimizer
        current = opt._learning_rate  # the schedule object, which Keras exposes no getter for
        if isinstance(current, keras.optimizers.schedules.LearningRateSchedule):
            opt.learning_rate = ScaledSchedule(current, self.lr_multiplier)
            return current
        if resumed:
            return None  # the backup restored the already scaled learning-rate variable
        value = float(keras.ops.convert_to_numpy(current))
        opt.learning_rate = value * self.lr_multiplier
        return value

    def _set_range_tracking(self, on: bool):
        for w in quantize_wrappers(self.model):
            w.track_ranges = on
        _switch.rebuild_functions(self.model)

    def _freeze_batchnorm(self):
        frozen = 0
        for layer in self.model._flatten_layers(include_self=False, recursive=True):
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
                layer.trainable = False
                frozen += 1
        self._bn_frozen = True
        _switch.rebuild_functions(self.model)
        if self.verbose:
            print(f"\nQATCallback: epoch {self._epoch}: froze {frozen} BatchNormalization layers.")
