"""TFLite int8 export: the quantized model goes to the converter as it is.

Why no float twin: TFLite's converter reads our fake-quant ops as QAT ranges.
Measured on this stack (TF 2.21, Keras 3.15): every per-tensor
QuantizeAndDequantizeV4 becomes its tensor's int8 scale (amax/127, zero
point 0; an unsigned one amax/255, zero point -128), and every per-channel
QuantizeAndDequantizeV3 on a weight becomes exactly our int8 values and
scales. Converting the quantized model directly agreed with it on 100% of
397 held-out digits (max |logit diff| 0.17, a few output steps) and 99.8% of
2,000 MNIST digits (0.044); the alternative, a float twin holding the
fake-quantized weights with activation ranges calibrated by the converter,
agreed on only 97.2% of the digits (max diff 3.0): the converter's own
asymmetric min/max ranges are not the ones the model was trained with.

Representative data is still passed when given: the converter calibrates
the tensors that have no quantizer of ours (the model input under a policy
that quantizes only outputs, a BatchNorm or ReLU left outside a wrapper,
layers kept in FP32 by a spec). For an FP32 model it sets every range: plain
post-training quantization, the baseline QAT is measured against.

Files are checked in LiteRT's interpreter (`ai-edge-litert`), the one
TensorFlow tells users to move to, when it is installed; `tf.lite.Interpreter`
(same kernels, deprecated) otherwise.

Activation quantizers must have 8 bits: TFLite's int8 tensors clip at the
8-bit grid, whatever the fake-quant op said. Weights of 4 to 7 bits are
stored as int8 on the 8-bit grid of their own range, so their levels are kept
to within half an int8 step; the comparison with the Keras model
(`verify_tflite`) says how close that is.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import os
import re
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from qat_plugin.errors import ExportError
from qat_plugin.export._agreement import MAX_REL_DIFF, check_validation_args, default_check_inputs, judge

__all__ = ["TFLiteExportReport", "export_tflite", "run_tflite", "verify_tflite"]

# Ops that only change a tensor's encoding: at the file's float inputs and
# outputs they are the int8 model's boundary, not float compute.
_CONVERSION_OPS = ("QUANTIZE", "DEQUANTIZE")
_FLOAT_TYPES = (np.float16, np.float32, np.float64)
# tf.lite.Interpreter warns on every construction (ours, and the converter's
# calibrator's) that it is deprecated in favour of ai-edge-litert: noise here.
_DEPRECATION = r".*tf\.lite\.Interpreter is deprecated"
# Without validation_data or a calibration sample, check on this many
# representative samples: real inputs, and enough for the check.
_REPRESENTATIVE_CHECK = 256


@dataclasses.dataclass(frozen=True)
class TFLiteExportReport:
    """What `export_tflite` wrote, and how closely it matches the Keras model.

    Attributes:
        path: the `.tflite` file.
        file_bytes: its size.
        quantized: whether the model held qat-plugin quantizers (False: FP32
            model, ranges from `representative_data` only).
        input_dtype, output_dtype: the file's input and output types
            (`"int8"` with `int8_io=True`, else `"float32"`).
        num_ops: operators in the file.
        num_int8_ops: operators that read and write no float tensor.
        float_ops: operators (other than QUANTIZE/DEQUANTIZE) that compute in
            float; empty when the model is fully int8.
        op_counts: `(op name, count)` for every operator kind, most frequent first.
        agreement: share of argmax predictions (last axis) equal to Keras's,
            the lowest over outputs, on the inputs named by `checked_on`;
            `None` when no output has a last axis longer than 1.
        max_abs_diff: largest |TFLite - Keras| over all outputs.
        num_samples: how many samples were compared.
        interpreter: the interpreter that checked the file.
        checked_on: where the inputs the file was checked on came from:
            `"validation_data"`; `"calibration sample"` (the first 64 inputs
            `calibrate` saw, kept with the model in this process);
            `"representative_data"` (its first 256 samples, when there is no
            calibration sample); `"synthetic"` (32 fixed-seed inputs in the
            model input's calibrated range, for a model loaded from a file;
            judged only by how far the outputs are from Keras's); `"none"`
            (inputs that can't be synthesized, e.g. integer ones: not checked).
        ranges_from: where the int8 ranges came from: `"quantizers"` (the
            model's own, every one); `"representative_data"` (the converter's
            calibration on it, for tensors without a quantizer); `"calibration
            sample"` (the same, on the inputs the model was calibrated on in
            this process, when some tensors had no quantizer and no
            `representative_data` was given: e.g. the input Rescaling of
            keras.applications' EfficientNet and MobileNetV3).

    Example:

    >>> report = export_tflite(qmodel, "model_int8.tflite", validation_data=x_test)  # doctest: +SKIP
    >>> report.fully_int8, report.op_histogram  # doctest: +SKIP
    (True, {'CONV_2D': 2, 'ADD': 1, 'MEAN': 1, 'FULLY_CONNECTED': 1, 'QUANTIZE': 1, 'DEQUANTIZE': 1})
    """

    path: str
    file_bytes: int
    quantized: bool
    input_dtype: str
    output_dtype: str
    num_ops: int
    num_int8_ops: int
    float_ops: tuple[str, ...] = ()
    op_counts: tuple[tuple[str, int], ...] = ()
    agreement: float | None = None
    max_abs_diff: float | None = None
    num_samples: int = 0
    interpreter: str = ""
    checked_on: str = "validation_data"
    ranges_from: str = "quantizers"

    @property
    def fully_int8(self) -> bool:
        """True when every operator but the input/output conversions runs in int8."""
        return not self.float_ops

    @property
    def op_histogram(self) -> dict[str, int]:
        """`op_counts` as a dict."""
        return dict(self.op_counts)


# ------------------------------------------------------------------ interpreter


def _interpreter(path: str, num_threads: int | None = None, *, allocate: bool = True):
    """LiteRT's interpreter (`ai-edge-litert`), else TensorFlow's own copy of it.

    `allocate=False` leaves the file's operators as written: allocating
    applies the default XNNPACK delegate, which replaces operators by
    DELEGATE nodes.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DEPRECATION, category=UserWarning)
            interpreter = tf.lite.Interpreter(model_path=path, num_threads=num_threads)
    else:
        interpreter = Interpreter(model_path=path, num_threads=num_threads)
    if allocate:
        interpreter.allocate_tensors()
    return interpreter


def _interpreter_name(interpreter) -> str:
    return type(interpreter).__module__.split(".")[0]


def _op_summary(interpreter) -> tuple[int, int, tuple[str, ...], tuple[tuple[str, int], ...]]:
    """(num_ops, num_int8_ops, float_ops, op_counts) of the file's main subgraph."""
    dtypes = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    # Only the private `_get_ops_details` lists operators with their tensors
    # (both interpreters have it); tf.lite.experimental.Analyzer prints text.
    ops = interpreter._get_ops_details()
    num_int8, floats = 0, []
    for op in ops:
        tensors = [i for i in list(op["inputs"]) + list(op["outputs"]) if i >= 0]
        if any(dtypes.get(i) in _FLOAT_TYPES for i in tensors):
            if op["op_name"] not in _CONVERSION_OPS:
                floats.append(op["op_name"])
        else:
            num_int8 += 1
    counts = collections.Counter(op["op_name"] for op in ops).most_common()
    return len(ops), num_int8, tuple(floats), tuple(counts)


def _output_order(name: str):
    # Keras names the outputs of a converted model output_0, output_1, ...
    match = re.fullmatch(r"output_(\d+)", name)
    return (0, int(match.group(1)), "") if match else (1, 0, name)


def _feeds(data, input_details: dict, order: Sequence[str]) -> dict[str, np.ndarray]:
    """`data` as {input name: float array}, checked against the file's inputs."""
    names = list(input_details)
    if isinstance(data, dict):
        missing = sorted(set(names) - set(data))
        if missing:
            raise ExportError(f"The data has no array for TFLite input(s) {missing}. Inputs: {names}")
        feeds = {n: np.asarray(data[n]) for n in names}
    else:
        arrays = [np.asarray(a) for a in (data if isinstance(data, (list, tuple)) else [data])]
        if len(arrays) != len(names):
            raise ExportError(
                f"The data must hold one array per TFLite input ({len(names)}: {names}). Received "
                f"{len(arrays)} array(s) of shapes {[a.shape for a in arrays]}."
            )
        feeds = dict(zip(order, arrays))
    counts = {len(a) if a.ndim else 0 for a in feeds.values()}
    if len(counts) != 1 or 0 in counts:
        shapes = {n: a.shape for n, a in feeds.items()}
        raise ExportError(f"Every input array must hold the same, non-zero number of samples. Received: {shapes}")
    for n, a in feeds.items():
        expected = tuple(int(d) for d in input_details[n]["shape_signature"])[1:]
        if a.ndim != len(expected) + 1 or any(e not in (-1, s) for e, s in zip(expected, a.shape[1:])):
            raise ExportError(
                f"Input {n!r} of the TFLite file takes samples of shape {expected}; received {a.shape[1:]}."
            )
    return feeds


def _quantize_input(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return x.astype(dtype, copy=False)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(dtype)


def _dequantize_output(y: np.ndarray, detail: dict) -> np.ndarray:
    if np.dtype(detail["dtype"]).kind == "f":
        return y
    scale, zero_point = detail["quantization"]
    return ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)


def _run(interpreter, data, batch_size: int, order: Sequence[str] | None = None) -> list[np.ndarray]:
    runner = interpreter.get_signature_runner()
    in_details, out_details = runner.get_input_details(), runner.get_output_details()
    feeds = _feeds(data, in_details, order or list(in_details))
    feeds = {n: _quantize_input(a, in_details[n]) for n, a in feeds.items()}
    n = len(next(iter(feeds.values())))
    out_names = sorted(out_details, key=_output_order)
    batches = collections.defaultdict(list)
    for start in range(0, n, batch_size):
        # The signature runner resizes the inputs when the batch size changes.
        result = runner(**{k: v[start : start + batch_size] for k, v in feeds.items()})
        for name in out_names:
            batches[name].append(result[name])
    return [_dequantize_output(np.concatenate(batches[name]), out_details[name]) for name in out_names]


def _existing_file(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"`path` must be a str or os.PathLike. Received: path={path!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ExportError(f"No TFLite file at {path!r}.")
    return path


def run_tflite(path: str | os.PathLike, data, *, batch_size: int = 32, num_threads: int | None = None):
    """Run a `.tflite` file on `data` (float), in batches.

    int8 inputs are quantized with the input tensor's scale and zero point,
    int8 outputs dequantized with the output's, so a file exported with
    `int8_io=True` takes and gives the same float arrays as the Keras model.
    Runs in LiteRT (`ai-edge-litert`) when installed, else `tf.lite.Interpreter`.

    Args:
        path: the `.tflite` file.
        data: an array, a list of arrays (one per input, in the file's
            signature order), or a dict keyed by input name.
        batch_size: rows per invocation.
        num_threads: interpreter threads (`None`: the interpreter's default).

    Returns:
        The output array (float32), or a list of arrays for a model with
        several outputs, in the Keras model's output order.

    Raises:
        ExportError: no file at `path`, or `data` doesn't fit its inputs.

    Example:

    >>> logits = run_tflite("model_int8.tflite", x_test)  # doctest: +SKIP
    >>> (logits.argmax(-1) == y_test).mean()  # doctest: +SKIP
    0.9765
    """
    check_validation_args(0.0, batch_size)
    outputs = _run(_interpreter(_existing_file(path), num_threads), data, batch_size)
    return outputs[0] if len(outputs) == 1 else outputs


def _as_list(outputs) -> list[np.ndarray]:
    if isinstance(outputs, dict):
        return [np.asarray(o) for o in outputs.values()]
    return [np.asarray(o) for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]


def _input_order(model, in_names: Sequence[str]) -> list[str]:
    """The file's input names in the order of the Keras model's inputs."""
    names = [getattr(t, "name", "") for t in (getattr(model, "inputs", None) or [])]
    return names if sorted(names) == sorted(in_names) else list(in_names)


def verify_tflite(
    model, path: str | os.PathLike, data, *, min_agreement: float = 0.99, batch_size: int = 32
) -> tuple[float | None, float, int]:
    """Run a `.tflite` file and `model.predict` on the same inputs and compare.

    Args:
        model: the Keras model the file was exported from.
        path: the `.tflite` file.
        data: an array, a list of arrays (one per input, in the model's
            order), or a dict keyed by input name.
        min_agreement: the lowest share of matching argmax predictions accepted.
        batch_size: batch size for both runtimes.

    Returns:
        `(agreement, max_abs_diff, num_samples)`. `agreement` is the share of
        argmax predictions over the last axis that match, the lowest over
        outputs; `None` when no output has a last axis longer than 1.

    Raises:
        ExportError: the agreement is below `min_agreement` (the message
            names the file and the numbers; the file is kept), or the inputs
            or outputs don't line up.

    Example:

    >>> verify_tflite(qmodel, "model_int8.tflite", x_test[:256])  # doctest: +SKIP
    (1.0, 0.168, 256)
    """
    check_validation_args(min_agreement, batch_size)
    path = _existing_file(path)
    keras_out, lite_out = _keras_and_tflite_outputs(model, path, data, batch_size)
    return judge(keras_out, lite_out, f"The TFLite file {path}", "validation_data", min_agreement, None)


def _keras_and_tflite_outputs(model, path: str, data, batch_size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    interpreter = _interpreter(path)
    in_names = list(interpreter.get_signature_runner().get_input_details())
    order = _input_order(model, in_names)
    lite_out = _run(interpreter, data, batch_size, order)
    feeds = data if isinstance(data, dict) or not isinstance(data, (list, tuple)) else list(data)
    return _as_list(model.predict(feeds, batch_size=batch_size, verbose=0)), lite_out


# ------------------------------------------------------------------ export


def _model_inputs(model) -> list:
    import keras

    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a keras.Model. Received: {type(model).__name__}")
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise ValueError(
            f"Model {model.name!r} has no symbolic inputs (subclassed, or a Sequential model without "
            "keras.Input): build it as a Functional or Sequential model with a keras.Input first."
        )
    return list(inputs)


def _sample_arrays(data, inputs, what: str) -> list[np.ndarray]:
    """`data` as one float32 array per model input, checked against the model's input shapes."""
    names = [t.name for t in inputs]
    if isinstance(data, dict):
        missing = sorted(set(names) - set(data))
        if missing:
            raise ValueError(f"`{what}` has no array for model input(s) {missing}. Inputs: {names}")
        arrays = [np.asarray(data[n]) for n in names]
    else:
        arrays = [np.asarray(a) for a in (data if isinstance(data, (list, tuple)) else [data])]
    counts = {len(a) if a.ndim else 0 for a in arrays}
    if len(arrays) != len(names) or len(counts) != 1 or 0 in counts:
        raise ValueError(
            f"`{what}` must hold one non-empty array per model input ({len(names)}: {names}), all with the "
            f"same number of samples. Received shapes: {[a.shape for a in arrays]}"
        )
    for a, t in zip(arrays, inputs):
        expected = tuple(t.shape[1:])
        if a.ndim != len(expected) + 1 or any(e is not None and e != s for e, s in zip(expected, a.shape[1:])):
            raise ValueError(
                f"`{what}` for input {t.name!r} must have samples of shape {expected}. Received: {a.shape[1:]}"
            )
        if a.dtype.kind not in "fiub":
            raise ValueError(f"`{what}` for input {t.name!r} must be numeric. Received dtype {a.dtype}.")
    return [a.astype(np.float32, copy=False) for a in arrays]


def _check_quantizers(model) -> bool:
    """Whether `model` is quantized; raises if its quantizers can't become TFLite int8."""
    from qat_plugin.report import list_quantizers

    infos = list_quantizers(model)
    missing = [i.key for i in infos if not i.label.startswith("weight") and not i.calibrated]
    if missing:
        raise ExportError(
            f"Activation ranges {missing[:10]}{'...' if len(missing) > 10 else ''} are not calibrated, so their "
            "int8 scales would be meaningless: call qat_plugin.calibrate(qmodel, data) before exporting."
        )
    low = [(i.key, i.bits) for i in infos if not i.label.startswith("weight") and i.bits != 8]
    if low:
        raise ExportError(
            f"Activation quantizers of other than 8 bits can't be exported to TFLite int8: {low[:10]}. TFLite "
            "clips int8 tensors at the 8-bit grid, not at the low-bit one the model was trained with. Quantize "
            "activations with 8 bits (weights may keep 4 to 8 bits)."
        )
    return bool(infos)


def _write(model, path: str, representative, int8_io: bool, batch_size: int):
    """Convert `model` into `path`; its interpreter (not allocated) and `_op_summary`."""
    flatbuffer = _convert(model, representative, int8_io, batch_size)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(flatbuffer)
    interpreter = _interpreter(path, allocate=False)
    return interpreter, _op_summary(interpreter)


def _representative(arrays: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    # Keyed by input name: a list would be matched to the file's inputs in
    # signature order, which is not the Keras model's. Batches, not single
    # samples: the calibrator takes min/max over whatever it is given.
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        yield {name: a[start : start + batch_size] for name, a in arrays.items()}


def _convert(model, representative: dict[str, np.ndarray] | None, int8_io: bool, batch_size: int) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if representative is not None:
        converter.representative_dataset = lambda: _representative(representative, batch_size)
    if int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    # Keras's export prints every captured variable; keep it for the error only.
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            # Emitted for every float-input file; the input's range comes from
            # our quantizer or the representative data, so it says nothing.
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
            warnings.filterwarnings("ignore", message=_DEPRECATION, category=UserWarning)
            return converter.convert()
    except Exception as e:  # the converter raises anything from ConverterError to ValueError
        tail = log.getvalue()[-1000:]
        raise ExportError(
            f"TFLite's converter could not convert model {model.name!r}: {type(e).__name__}: {e}"
            + (f"\nConverter output (end):\n{tail}" if tail else "")
        ) from e


def export_tflite(
    model,
    path: str | os.PathLike,
    *,
    representative_data=None,
    validation_data=None,
    int8_io: bool = False,
    min_agreement: float = 0.99,
    batch_size: int = 32,
) -> TFLiteExportReport:
    """Write `model` to an int8 `.tflite` file and check it.

    A quantized model (from `quantize_model(..., policy="tflite")` or
    `QATCallback`) keeps its own ranges: each activation quantizer becomes
    its tensor's int8 scale and each weight is stored as the int8 values it
    was trained with. An FP32 model is quantized after training from
    `representative_data` alone, the baseline QAT should beat.

    Args:
        model: a Functional or Sequential Keras model, quantized or FP32.
        path: where to write the `.tflite` file (parent folders are created).
        representative_data: inputs (an array, a list of arrays, or a dict by
            input name; a few hundred real samples) from which the converter
            sets the ranges of tensors without a quantizer. Required for an
            FP32 model. A quantized one whose input or some layers have no
            quantizer (keras.applications' EfficientNet and MobileNetV3 scale
            their input in a Rescaling layer) takes those ranges from its
            calibration sample when this is None (`report.ranges_from`), and
            needs it only when loaded from a file.
        validation_data: inputs in the same forms the file is run on and
            compared with `model.predict` (see `verify_tflite`). Without it
            the file is still checked: on the model's calibration sample (the
            first 64 inputs `calibrate` saw in this process), else on the first
            256 samples of `representative_data`, else on 32 synthetic inputs
            with a `UserWarning` (a quantized model loaded from a `.keras`
            file); `report.checked_on` says which. When every int8 range is
            the model's own (no `representative_data`), the outputs must also
            stay within 5% of the largest Keras output, and on synthetic inputs
            only that is checked: random inputs give near-tied logits.
        int8_io: give the file int8 inputs and outputs (for microcontrollers
            and accelerators); otherwise float ones, converted inside the file.
            `run_tflite` handles both.
        min_agreement: the lowest share of matching argmax predictions
            accepted on `validation_data`; below it `ExportError` is raised and
            the file is kept. On a calibration sample or representative data
            only more mismatches than this allows by chance raise.
        batch_size: batch size for calibration and for the comparison.

    Returns:
        A `TFLiteExportReport`.

    Raises:
        ValueError: a bad argument, or an FP32 model without `representative_data`.
        ExportError: an activation range is uncalibrated or has fewer than 8
            bits, the converter failed, ops stayed in float for lack of
            `representative_data` or a calibration sample, or the file
            disagrees with the Keras model
            (the file is kept for inspection).

    Warns:
        UserWarning: no `validation_data`, no calibration sample and no
            `representative_data`, so the file was checked on synthetic inputs.

    Example:

    >>> qmodel = qat_plugin.quantize_model(model, policy="tflite", calibration_data=x_train[:512])  # doctest: +SKIP
    >>> report = export_tflite(qmodel, "model_int8.tflite", representative_data=x_train[:512],
    ...                        validation_data=x_test)  # doctest: +SKIP
    >>> report.agreement, report.fully_int8, report.file_bytes  # doctest: +SKIP
    (1.0, True, 7440)
    >>> export_tflite(qmodel, "model_int8.tflite").checked_on  # no validation_data  # doctest: +SKIP
    'calibration sample'
    """
    # Every argument is checked before the slow conversion.
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"`path` must be a str or os.PathLike. Received: path={path!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"`path` is a folder; give a file name such as {os.path.join(path, 'model_int8.tflite')!r}.")
    if not isinstance(int8_io, bool):
        raise ValueError(f"`int8_io` must be True or False. Received: int8_io={int8_io!r}")
    check_validation_args(min_agreement, batch_size)
    inputs = _model_inputs(model)
    representative = None
    if representative_data is not None:
        arrays = _sample_arrays(representative_data, inputs, "representative_data")
        representative = {t.name: a for t, a in zip(inputs, arrays)}
    if validation_data is not None:
        _sample_arrays(validation_data, inputs, "validation_data")
    quantized = _check_quantizers(model)
    if not quantized and representative is None:
        raise ValueError(
            f"Model {model.name!r} has no quantizers, so TFLite's converter has no ranges for its int8 tensors: "
            "pass representative_data=x_train[:500] (post-training quantization), or quantize it first with "
            "qat_plugin.quantize_model(model, policy='tflite', calibration_data=...)."
        )

    ranges_from = "quantizers" if representative is None else "representative_data"
    interpreter, (num_ops, num_int8, float_ops, counts) = _write(model, path, representative, int8_io, batch_size)
    if float_ops and representative is None:
        from qat_plugin.calibration import calibration_sample

        sample = calibration_sample(model)
        if sample is None:
            raise ExportError(
                f"The TFLite file {path} (kept for inspection) still computes {sorted(set(float_ops))} in float: "
                "some tensors have no quantizer (the model input, or layers outside a QuantizeWrapper, such as "
                "a Rescaling or Normalization layer at the input), so the converter had no range for them, and "
                f"model {model.name!r} keeps no calibration sample to take them from (it was loaded from a file, "
                "or never calibrated in this process). Pass representative_data=x_train[:500]."
            )
        # Those tensors (e.g. keras.applications' own input Rescaling) take their ranges from the inputs the
        # model was calibrated on, as every other tensor did.
        representative, ranges_from = {t.name: a for t, a in zip(inputs, sample)}, "calibration sample"
        interpreter, (num_ops, num_int8, float_ops, counts) = _write(model, path, representative, int8_io, batch_size)
    in_dtypes = {np.dtype(d["dtype"]).name for d in interpreter.get_input_details()}
    out_dtypes = {np.dtype(d["dtype"]).name for d in interpreter.get_output_details()}
    what = f"The TFLite file {path}"
    data, checked_on = validation_data, "validation_data"
    if data is None:
        rep = None if representative is None else [a[:_REPRESENTATIVE_CHECK] for a in representative.values()]
        data, checked_on = default_check_inputs(model, what, rep)
        if data is not None:
            data = data[0] if len(data) == 1 else list(data)
    # The logit bound only holds when every int8 range is the model's own:
    # ranges the converter sets from representative_data (asymmetric min/max,
    # plain PTQ for an FP32 model) measured 6-7% of the largest logit off on
    # real digits and up to 39% on synthetic inputs, with the file correct.
    max_rel = MAX_REL_DIFF if representative is None and checked_on != "validation_data" else None
    agreement, diff, n = None, None, 0
    if data is not None:
        keras_out, lite_out = _keras_and_tflite_outputs(model, path, data, batch_size)
        agreement, diff, n = judge(keras_out, lite_out, what, checked_on, min_agreement, max_rel)
    return TFLiteExportReport(
        path=path,
        file_bytes=os.path.getsize(path),
        quantized=quantized,
        input_dtype="/".join(sorted(in_dtypes)),
        output_dtype="/".join(sorted(out_dtypes)),
        num_ops=num_ops,
        num_int8_ops=num_int8,
        float_ops=float_ops,
        op_counts=counts,
        agreement=agreement,
        max_abs_diff=diff,
        num_samples=n,
        interpreter=_interpreter_name(interpreter),
        checked_on=checked_on,
        ranges_from=ranges_from,
    )
