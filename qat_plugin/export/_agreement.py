"""How closely an exported file matches the Keras model it came from: shared by every exporter."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from qat_plugin.errors import ExportError


def check_validation_args(min_agreement, batch_size) -> None:
    """Raise a clear ValueError for a bad `min_agreement` or `batch_size`, before any slow work."""
    if isinstance(min_agreement, bool) or not isinstance(min_agreement, (int, float)) or not 0 <= min_agreement <= 1:
        raise ValueError(f"`min_agreement` must be a number in [0, 1]. Received: min_agreement={min_agreement!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1. Received: batch_size={batch_size!r}")


def compare(
    keras_out: Sequence[np.ndarray], file_out: Sequence[np.ndarray], what: str, min_agreement: float
) -> tuple[float | None, float, int]:
    """`(agreement, max_abs_diff, num_samples)` of a file's outputs against Keras's; raises below `min_agreement`.

    `what` names the file in messages, e.g. "The ONNX file model.onnx".

    >>> a = [np.array([[1.0, 0.0], [0.0, 1.0]])]
    >>> compare(a, [np.array([[0.9, 0.1], [0.2, 0.8]])], "The file f", 0.5)
    (1.0, 0.2, 2)
    """
    if [k.shape for k in keras_out] != [o.shape for o in file_out]:
        raise ExportError(
            f"{what} and the Keras model give outputs of different shapes: "
            f"{[o.shape for o in file_out]} vs {[k.shape for k in keras_out]}."
        )
    pairs = list(zip(keras_out, file_out))
    diff = max(float(np.max(np.abs(k.astype(np.float64) - o))) for k, o in pairs)
    agree = [float(np.mean(k.argmax(-1) == o.argmax(-1))) for k, o in pairs if k.ndim >= 2 and k.shape[-1] > 1]
    agreement = min(agree) if agree else None
    n = len(file_out[0])
    if agreement is not None and agreement < min_agreement:
        raise ExportError(
            f"{what} (kept for inspection) agrees with the Keras model on {agreement:.4%} of "
            f"argmax predictions over {n} samples, below min_agreement={min_agreement}; max abs diff {diff:.4g}."
        )
    return agreement, diff, n


# ------------------------------------------------------------------ checking without validation_data

SYNTHETIC_SAMPLES = 32
# On synthetic inputs a file is judged by how far its outputs are from Keras's,
# not by argmax: random inputs give near-tied logits, so a correct file can
# flip a few (measured: a correct TFLite file agreed on 31 of 32). Measured on
# the small residual CNN (MNIST) and an 8x8-digits CNN, max |file - Keras| as a
# share of max |Keras output|: correct files 0 to 1.7% (ONNX for TensorRT and
# for onnxruntime's integer kernels, TFLite; one or two output steps), on real
# and synthetic inputs alike; broken files 11% to 44% with one channel's weight
# scale off by 1.5x, 58% to 127% with the per-channel scales reversed. 5% sits
# three times above the one and twice below the other.
MAX_REL_DIFF = 0.05
# A calibration sample has at most 64 inputs: too few to hold a file to 99.9%
# agreement (one flip costs 1.6%). Raise only when there are more mismatches
# than `min_agreement` would produce by chance once in a thousand exports.
_ALPHA = 1e-3


def _float_dtype(dtype) -> bool:
    try:
        return np.dtype(str(dtype)).kind == "f"
    except TypeError:
        return False


def _input_range(model, tensor) -> tuple[float, float]:
    """The range the quantizer reading model input `tensor` was calibrated to; (0, 1) if there is none."""
    from qat_plugin.wrappers import quantize_wrappers

    for w in quantize_wrappers(model):
        for node in w._inbound_nodes:
            for i, t in enumerate(node.input_tensors):
                q = w.input_quantizers[i] if i < len(w.input_quantizers) else None
                if t is tensor and q is not None:
                    amax = float(np.asarray(w.input_amax[i]))
                    if amax > 0:
                        return (0.0, amax) if q.unsigned else (-amax, amax)
    return 0.0, 1.0


def synthetic_inputs(model, num_samples: int = SYNTHETIC_SAMPLES, seed: int = 0) -> list[np.ndarray] | None:
    """A fixed-seed batch shaped like each model input, uniform in its quantizer's range (else [0, 1]).

    `None` when an input is not float or has a free dimension besides the batch.

    >>> import keras
    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> [(a.shape, float(a.min()) >= 0, float(a.max()) <= 1) for a in synthetic_inputs(m)]
    [((32, 3), True, True)]
    """
    inputs = list(getattr(model, "inputs", None) or [])
    if not inputs or not all(_float_dtype(t.dtype) for t in inputs):
        return None
    if any(d is None for t in inputs for d in t.shape[1:]):
        return None
    rng = np.random.default_rng(seed)
    arrays = []
    for t in inputs:
        low, high = _input_range(model, t)
        arrays.append(rng.uniform(low, high, (num_samples,) + tuple(t.shape[1:])).astype(np.float32))
    return arrays


def default_check_inputs(model, what: str, representative: list[np.ndarray] | None = None):
    """`(arrays, checked_on)`: the inputs an export is checked on when no `validation_data` is given.

    In order: the model's calibration sample (`qat_plugin.calibration.calibration_sample`),
    `representative` (real inputs an exporter already has), else synthetic
    inputs with a `UserWarning`. `(None, "none")` with a warning when none can
    be made (an integer input, or a free dimension besides the batch).
    """
    from qat_plugin.calibration import calibration_sample

    sample = calibration_sample(model)
    if sample is not None:
        return sample, "calibration sample"
    if representative is not None:
        return representative, "representative_data"
    arrays = synthetic_inputs(model)
    name = getattr(model, "name", "model")
    if arrays is None:
        warnings.warn(
            f"{what} was not checked against the Keras model: model {name!r} has no calibration sample (it "
            "was not calibrated in this process) and its inputs are not fixed-shape float tensors, so no "
            "synthetic inputs could be made; pass validation_data=x_test[:256] to check on real ones.",
            UserWarning,
            stacklevel=3,
        )
        return None, "none"
    warnings.warn(
        f"{what} was checked on {len(arrays[0])} synthetic inputs: model {name!r} has no calibration sample "
        "(it was loaded from a file, or not calibrated in this process), and synthetic inputs catch a broken "
        "file but not a small loss of accuracy; pass validation_data=x_test[:256] to check on real ones.",
        UserWarning,
        stacklevel=3,
    )
    return arrays, "synthetic"


def _binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p).

    >>> round(_binomial_tail(2, 64, 0.01), 3)
    0.135
    """
    if k <= 0 or p >= 1:
        return 1.0
    if p <= 0:
        return 0.0

    def log_term(i: int) -> float:  # in logs: comb(n, i) overflows a float for n in the thousands
        return math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)

    return min(1.0, sum(math.exp(log_term(i)) for i in range(k, n + 1)))


def judge(
    keras_out: Sequence[np.ndarray],
    file_out: Sequence[np.ndarray],
    what: str,
    checked_on: str,
    min_agreement: float,
    max_rel_diff: float | None,
) -> tuple[float | None, float, int]:
    """`compare` for every source of check inputs; raises `ExportError` when the file is out of tolerance.

    `validation_data`: argmax agreement >= `min_agreement`. A calibration
    sample or representative data (few real inputs): no more mismatches than
    `min_agreement` plausibly gives on that many (tail probability >= 1e-3).
    Synthetic inputs: agreement is only reported. With `max_rel_diff`, every
    source but `validation_data` also needs max |file - Keras| <= max_rel_diff
    x max |Keras output|.

    >>> k = [np.array([[4.0, 0.0], [0.0, 4.0]])]
    >>> judge(k, [np.array([[3.875, 0.0], [0.0, 4.0]])], "The file f", "synthetic", 0.99, 0.05)
    (1.0, 0.125, 2)
    >>> judge(k, [np.array([[0.0, 4.0], [0.0, 4.0]])], "The file f", "synthetic", 0.99, 0.05)
    Traceback (most recent call last):
    ...
    qat_plugin.errors.ExportError: The file f (kept for inspection) differs from the Keras model by up to 4 on 2 synthetic inputs, 100.0% of the largest output (4); a correct file stays within 5% (a few output steps), so it is broken. Argmax agreement 50.00%; check it on real data with validation_data=x_test[:256] to see how far it is off.
    """
    if checked_on == "validation_data":
        return compare(keras_out, file_out, what, min_agreement)
    agreement, diff, n = compare(keras_out, file_out, what, 0.0)
    inputs = f"{n} {'synthetic inputs' if checked_on == 'synthetic' else checked_on.replace('_', ' ') + ' inputs'}"
    fix = "check it on real data with validation_data=x_test[:256] to see how far it is off"
    if max_rel_diff is not None:
        scale = max(float(np.max(np.abs(k))) for k in keras_out)
        if diff > max_rel_diff * scale:
            raise ExportError(
                f"{what} (kept for inspection) differs from the Keras model by up to {diff:.4g} on {inputs}, "
                f"{diff / max(scale, 1e-30):.1%} of the largest output ({scale:.4g}); a correct file stays within "
                f"{max_rel_diff:.0%} (a few output steps), so it is broken. Argmax agreement "
                f"{'n/a' if agreement is None else f'{agreement:.2%}'}; {fix}."
            )
    if checked_on != "synthetic" and agreement is not None:
        mismatches = int(round((1.0 - agreement) * n))
        if _binomial_tail(mismatches, n, 1.0 - min_agreement) < _ALPHA:
            raise ExportError(
                f"{what} (kept for inspection) agrees with the Keras model on {agreement:.4%} of argmax "
                f"predictions over {inputs} ({mismatches} mismatches): far fewer than min_agreement="
                f"{min_agreement} allows even on so few samples; max abs diff {diff:.4g}. Pass "
                "validation_data=x_test[:256] for a larger check."
            )
    return agreement, diff, n
