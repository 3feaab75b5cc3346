"""Setting activation ranges (amax) from a few batches: max, percentile, MSE.

While calibrating, every wrapper runs in float and hands the tensors its
quantizers would see to a collector; quantization is off so each range is
measured on the activations the FP32 model produces.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import keras
import numpy as np

from qat_plugin.config import CALIBRATORS
from qat_plugin.errors import CalibrationError
from qat_plugin.wrappers import QuantizeWrapper, quantize_wrappers

_BINS = 2048
# A range of exactly zero (a dead channel) would divide by zero at export.
_MIN_AMAX = 1e-6
# How many calibration samples are kept for the exporters' self-check: enough
# to see a broken file, few enough to keep in memory with the model.
SAMPLE_SIZE = 64

# Real inputs seen by `calibrate`, for `export_onnx`/`export_tflite` to check
# their files on when no validation data is given. Held beside the model, not
# on it: an attribute would be tracked by Keras (and saved, cloned, compared in
# configs); weak keys let the model go when the user drops it. Keyed by the
# model and by each of its wrappers, because QATCallback calibrates a clone and
# then moves the clone's wrappers into the user's own model object.
_SAMPLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class RangeCollector:
    """A running max and a histogram of |x| that grows its range as needed.

    >>> c = RangeCollector()
    >>> c.update(np.array([0.5, -2.0, 1.0]))
    >>> c.compute_amax("max")
    2.0
    """

    def __init__(self, bins: int = _BINS):
        self.bins = bins
        self.amax = 0.0
        self.edges: np.ndarray | None = None
        self.counts: np.ndarray | None = None

    def update(self, x) -> None:
        x = np.abs(np.asarray(x, dtype=np.float32)).ravel()
        if x.size == 0:
            return
        m = float(x.max())
        if self.edges is None or m > self.edges[-1]:
            new_edges = np.linspace(0.0, max(m, 1e-12), self.bins + 1)
            counts = np.zeros(self.bins)
            if self.counts is not None:
                # Re-bin the old histogram at its bin centres onto the wider range.
                centers = (self.edges[:-1] + self.edges[1:]) / 2
                counts, _ = np.histogram(centers, bins=new_edges, weights=self.counts)
            self.edges, self.counts = new_edges, counts
        self.counts = self.counts + np.histogram(x, bins=self.edges)[0]
        self.amax = max(self.amax, m)

    def compute_amax(self, method: str = "max", percentile: float = 99.99, bits: int = 8) -> float:
        """The range chosen by `method` from what was collected."""
        if self.counts is None:
            raise CalibrationError("No values were collected for this quantizer; calibrate on at least one batch.")
        if method == "max":
            return self.amax
        if method == "percentile":
            cdf = np.cumsum(self.counts) / self.counts.sum()
            idx = int(np.searchsorted(cdf, percentile / 100.0))
            return float(self.edges[min(idx + 1, self.bins)])
        if method == "mse":
            return self._mse_amax(bits)
        raise CalibrationError(f"Unknown calibrator {method!r}. Use one of {CALIBRATORS}.")

    def _mse_amax(self, bits: int) -> float:
        centers = (self.edges[:-1] + self.edges[1:]) / 2
        qmax = 2 ** (bits - 1) - 1
        # Candidates from an eighth of the observed range up to all of it.
        candidates = self.edges[self.bins // 16 :: 8][:, None]
        step = candidates / qmax
        q = np.clip(np.round(centers[None, :] / step), 0, qmax) * step
        err = ((centers[None, :] - q) ** 2 * self.counts[None, :]).sum(axis=1)
        return float(candidates[int(np.argmin(err)), 0])


def iterate_inputs(data, batch_size: int = 32) -> Iterator:
    """Yield model inputs from arrays, `(x, y)` tuples, `tf.data` or iterables.

    Follows Keras's conventions: a tuple is `(x, y[, sample_weight])` and
    only `x` is used; a list or dict of arrays is one multi-input `x`.

    >>> [b.shape for b in iterate_inputs(np.zeros((5, 2)), batch_size=2)]
    [(2, 2), (2, 2), (1, 2)]
    """
    if isinstance(data, tuple) and 1 <= len(data) <= 3:
        data = data[0]
    if isinstance(data, np.ndarray) or (hasattr(data, "__array__") and hasattr(data, "shape")):  # tf.Tensor too
        data = np.asarray(data)
        for start in range(0, len(data), batch_size):
            yield data[start : start + batch_size]
        return
    if isinstance(data, list) and data and all(isinstance(a, np.ndarray) for a in data):
        for start in range(0, len(data[0]), batch_size):
            yield [a[start : start + batch_size] for a in data]
        return
    if isinstance(data, dict):
        n = len(next(iter(data.values())))
        for start in range(0, n, batch_size):
            yield {k: v[start : start + batch_size] for k, v in data.items()}
        return
    if isinstance(data, keras.utils.PyDataset):
        data = (data[i] for i in range(len(data)))
    for element in data:
        if isinstance(element, tuple) and 1 <= len(element) <= 3:
            element = element[0]
        yield element


def _as_arrays(batch, names: list[str]) -> list[np.ndarray] | None:
    """A batch as one numpy array per model input (in `names` order), or None if it can't be matched."""
    if isinstance(batch, dict):
        if sorted(batch) != sorted(names):
            return None
        batch = [batch[n] for n in names]
    parts = list(batch) if isinstance(batch, (list, tuple)) else [batch]
    arrays = [keras.ops.convert_to_numpy(p) for p in parts]
    if len(arrays) != len(names) or any(a.ndim == 0 for a in arrays):
        return None
    return arrays


def _keep_sample(kept: list[list[np.ndarray]], batch, names: list[str]) -> None:
    """Append copies of the first rows of `batch` until `SAMPLE_SIZE` samples are kept."""
    have = sum(len(b[0]) for b in kept)
    arrays = _as_arrays(batch, names) if have < SAMPLE_SIZE else None
    if arrays:
        # Copies: the user's arrays may be views, reused buffers or edited later.
        kept.append([np.array(a[: SAMPLE_SIZE - have], copy=True) for a in arrays])


def _remember(qmodel: keras.Model, kept: list[list[np.ndarray]], wrappers) -> None:
    if not kept:
        return
    sample = [np.concatenate(parts) for parts in zip(*kept)]
    for key in (qmodel, *wrappers):
        _SAMPLES[key] = sample


def calibration_sample(model: keras.Model) -> list[np.ndarray] | None:
    """Up to `SAMPLE_SIZE` real inputs (one array per model input) that `model` was calibrated on.

    `None` when `model` was not calibrated in this process (e.g. it was loaded
    from a `.keras` file), or the kept inputs don't fit its input shapes.

    >>> import numpy as np, keras
    >>> from qat_plugin import quantize_model
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="dense")])
    >>> qmodel = quantize_model(model, calibration_data=np.ones((100, 4), "float32"))
    >>> [a.shape for a in calibration_sample(qmodel)]
    [(64, 4)]
    >>> calibration_sample(model) is None
    True
    """
    sample = _SAMPLES.get(model)
    if sample is None:
        sample = next((_SAMPLES[w] for w in quantize_wrappers(model) if w in _SAMPLES), None)
    inputs = getattr(model, "inputs", None) or []
    if sample is None or len(sample) != len(inputs):
        return None
    for a, t in zip(sample, inputs):
        expected = tuple(t.shape[1:])
        if a.ndim != len(expected) + 1 or any(e is not None and e != s for e, s in zip(expected, a.shape[1:])):
            return None  # the wrappers were reused in a model with other inputs
    return sample


def calibrate(
    qmodel: keras.Model,
    data,
    *,
    method: str = "max",
    percentile: float = 99.99,
    num_batches: int = 8,
    batch_size: int = 32,
    histograms: dict | None = None,
) -> dict[str, float]:
    """Set every activation range of `qmodel` from a few batches of `data`.

    Args:
        qmodel: a model returned by `quantize_model`.
        data: inputs: an array, `(x, y)`, a list/dict of arrays, a
            `tf.data.Dataset`, a `keras.utils.PyDataset` or any iterable of
            batches.
        method: `"max"`, `"percentile"` or `"mse"`.
        percentile: for `"percentile"`, e.g. 99.99.
        num_batches: how many batches to read.
        batch_size: batch size used to slice arrays.
        histograms: if a dict is given, it is filled with
            `{"<layer>/<label>": (bin_edges, counts)}` of |x| for every range.

    The first `SAMPLE_SIZE` (64) inputs are also kept, as copies, beside
    `qmodel` (not in it: saving and cloning are unaffected), so that
    `export_onnx` and `export_tflite` can check their files on real inputs
    when no `validation_data` is given (see `calibration_sample`).

    Returns:
        `{"<layer>/<input|output>": amax}` for every range that was set.

    Example:

    >>> import numpy as np, keras
    >>> from qat_plugin import quantize_model
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="dense")])
    >>> qmodel = quantize_model(model)
    >>> ranges = calibrate(qmodel, np.full((8, 4), 3.0, "float32"))
    >>> ranges["dense/input"]
    3.0
    """
    if method not in CALIBRATORS:
        raise CalibrationError(f"Unknown calibrator {method!r}. Use one of {CALIBRATORS}.")
    wrappers = quantize_wrappers(qmodel)
    if not wrappers:
        raise CalibrationError("The model has no QuantizeWrapper layers: call `quantize_model` first, then calibrate.")
    collectors: dict[tuple[int, tuple], RangeCollector] = {}

    def hook(wrapper: QuantizeWrapper, slot, tensor):
        collectors.setdefault((id(wrapper), slot), RangeCollector()).update(keras.ops.convert_to_numpy(tensor))

    for w in wrappers:
        w._calibration_hook = hook
    seen = 0
    kept: list[list[np.ndarray]] = []
    names = [t.name for t in (getattr(qmodel, "inputs", None) or [])]
    try:
        for batch in iterate_inputs(data, batch_size):
            if seen >= num_batches:
                break
            qmodel(batch, training=False)
            _keep_sample(kept, batch, names)
            seen += 1
    finally:
        for w in wrappers:
            w._calibration_hook = None
    if seen == 0:
        raise CalibrationError("Calibration data yielded no batches; pass at least one batch of inputs.")

    ranges = {}
    for w in wrappers:
        for row in w.quantizer_ranges():
            if row["slot"][0] == "weight":
                continue
            collector = collectors.get((id(w), row["slot"]))
            if collector is None:
                raise CalibrationError(
                    f"Layer {w.inner_name!r} was not reached by the calibration data, so its "
                    f"{row['label']} range is unknown; calibrate with inputs that reach every layer."
                )
            amax = row["quantizer"].fixed_amax or max(collector.compute_amax(method, percentile, row["quantizer"].bits), _MIN_AMAX)
            w.amax_variable(row["slot"]).assign(amax)
            key = f"{w.inner_name}/{row['label']}"
            ranges[key] = float(amax)
            if histograms is not None:
                histograms[key] = (collector.edges, collector.counts)
    _remember(qmodel, kept, wrappers)
    return ranges

