"""How closely an exported file matches the Keras model it came from: shared by every exporter."""

from __future__ import annotations

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
