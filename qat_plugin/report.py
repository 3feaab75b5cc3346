"""`describe`: a readable table of every quantizer in a quantized model."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from qat_plugin.wrappers import quantize_wrappers


@dataclasses.dataclass(frozen=True)
class QuantizerInfo:
    """One quantizer: where it sits and its current range(s)."""

    layer: str
    class_name: str
    label: str  # input, input_1, weight, weight_<attr>, output
    bits: int
    per_channel: bool
    amax: np.ndarray

    @property
    def key(self) -> str:
        """`<layer>/<label>`, the name used in logs and MLflow metrics."""
        return f"{self.layer}/{self.label}"

    @property
    def calibrated(self) -> bool:
        return bool(np.all(self.amax > 0))


def list_quantizers(qmodel: keras.Model) -> list[QuantizerInfo]:
    """Every quantizer in `qmodel` (nested models included), in graph order.

    >>> import keras
    >>> from qat_plugin import quantize_model
    >>> q = quantize_model(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="fc")]))
    >>> [i.key for i in list_quantizers(q)]
    ['fc/input', 'fc/weight']
    """
    infos = []
    for w in quantize_wrappers(qmodel):
        for row in w.quantizer_ranges():
            q = row["quantizer"]
            infos.append(QuantizerInfo(w.inner_name, type(w.layer).__name__, row["label"], q.bits, q.per_channel, row["amax"]))
    return infos


def _amax_text(amax: np.ndarray) -> str:
    if amax.ndim == 0:
        return f"{float(amax):.4g}" if amax > 0 else "uncalibrated"
    return f"[{amax.min():.3g} .. {amax.max():.3g}] x{amax.size}"


def describe(qmodel: keras.Model) -> str:
    """A table of every quantizer: layer, kind, input or weight, bits, per-channel, amax.

    >>> import keras
    >>> from qat_plugin import quantize_model
    >>> q = quantize_model(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="fc")]))
    >>> print(describe(q).splitlines()[0])
    layer | kind  | tensor | bits | per-channel | amax
    """
    infos = list_quantizers(qmodel)
    rows = [("layer", "kind", "tensor", "bits", "per-channel", "amax")]
    rows += [(i.layer, i.class_name, i.label, str(i.bits), "yes" if i.per_channel else "no", _amax_text(i.amax)) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    uncalibrated = sum(not i.calibrated for i in infos)
    lines.append(f"{len(infos)} quantizers in {len({i.layer for i in infos})} layers" + (f"; {uncalibrated} uncalibrated (call qat_plugin.calibrate)" if uncalibrated else ""))
    return "\n".join(lines)
