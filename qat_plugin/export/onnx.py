"""ONNX export: Q/DQ pairs where the target runtime looks for them, weights stored as int8.

`export_onnx` converts with tf2onnx, then `_qdq_graph.rewrite_qdq` stores
every quantized weight as int8 on its Conv/MatMul weight input and makes every
activation pair adjacent; the file is then run in onnxruntime and compared
with the Keras model (`verify_onnx`).

Two runtimes read the same pairs differently. TensorRT wants int8 with zero
point 0 everywhere, which `check_tensorrt` verifies. onnxruntime's x86
integer kernels want uint8 activations, so for `runtime="onnxruntime"` every
int8 activation pair is stored as uint8 with zero point 128 (exact), and the
report counts the kernels onnxruntime actually fused (`ort_kernels`).

tf2onnx ignores `num_bits`: whatever the bits, it writes scale amax/127.
Weights of 4 to 7 bits are exported exactly anyway (their int8 values are
computed on their own grid, scale amax/(2**(bits-1) - 1)). Activations of
other than 8 bits raise `ExportError`: an int8 QuantizeLinear clips at
-128/127, not at the low-bit grid's edge, and TensorRT runs activations in
int8 only.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from qat_plugin.errors import ExportError
from qat_plugin.export._agreement import MAX_REL_DIFF, check_validation_args, default_check_inputs, judge
from qat_plugin.export._qdq_graph import (
    QDQPair,
    _Graph,
    _require,
    average_pools_as_depthwise_convs,
    average_pools_in_float,
    biases_into_convs,
    channel_constants_on_rows,
    clips_into_quantize,
    concats_as_qlinear,
    constants_as_dequantized,
    fold_image_convs,
    identity_reshapes,
    implied_weight_zero_points,
    max_pools_before_dequantize,
    pads_before_dequantize,
    pooled_squeezes_channels_last,
    qdq_pairs,
    quantize_like_onnx,
    rewrite_qdq,
    scales_into_qdq,
    to_uint8_activations,
    widen_depthwise_convs,
    widen_narrow_convs,
)
from qat_plugin.export._tf2onnx_compat import CUSTOM_OP_HANDLERS, traceable_grouped_convs
from qat_plugin.export.tensorrt import TensorRTCheck, check_tensorrt

__all__ = [
    "OnnxExportReport", "QDQPair", "cpu_has_vnni", "export_onnx", "ort_kernels", "qdq_pairs", "quantize_like_onnx",
    "run_onnx", "verify_onnx",
]

_FAKE_QUANT_OPS = ("QuantizeAndDequantizeV2", "QuantizeAndDequantizeV3", "QuantizeAndDequantizeV4")
# Per-channel Q/DQ needs opset 13; tf2onnx 1.17 writes up to 18.
MIN_OPSET, MAX_OPSET = 13, 18
RUNTIMES = ("tensorrt", "onnxruntime")
DEFAULT_AGREEMENT = {"tensorrt": 0.999, "onnxruntime": 0.99}
# What onnxruntime runs a quantized Conv/MatMul/Add/pool with once it has fused the Q/DQ around it.
INTEGER_KERNELS = (
    "QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "QLinearAdd",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearMul", "ConvInteger", "MatMulInteger",
)


@dataclasses.dataclass(frozen=True)
class OnnxExportReport:
    """What `export_onnx` wrote, and how closely it matches the Keras model.

    Attributes:
        path: the ONNX file.
        opset: its ONNX opset.
        num_qdq_inputs: DequantizeLinear nodes fed by a QuantizeLinear (activations).
        num_qdq_weights: DequantizeLinear nodes fed by an int8 initializer (weights).
        file_bytes: the file's size.
        agreement: share of argmax predictions (last axis) equal to Keras's,
            the lowest over outputs, on the inputs named by `checked_on`;
            `None` when no output has a last axis longer than 1.
        max_abs_diff: largest |onnxruntime - Keras| over all outputs.
        num_samples: how many samples were compared.
        input_names, output_names: the graph's inputs and outputs, in order.
        runtime: the runtime the file's Q/DQ layout is for.
        ort_kernels: for `runtime="onnxruntime"`, how many nodes of each type
            onnxruntime runs after fusing Q/DQ (e.g. `{"QLinearConv": 9, ...}`);
            a float `Conv` or `MatMul` here did not get an integer kernel
            (but for a MatMul that widens the input, see `widened_convs`;
            `float_compute` leaves those out).
        tensorrt: for `runtime="tensorrt"`, the `check_tensorrt` result
            (export raises if it found a problem).
        folded_convs: for `runtime="onnxruntime"`, the Convs that read the
            model image (1 to 3 channels; as it comes in, or after float
            preprocessing such as a `Rescaling`) on blocks of F columns taken as
            F times the channels, and F (see `fold_image_convs`): exact;
            onnxruntime's integer conv pays per output pixel, and the folded
            conv has F/stride times fewer, each with that many more channels.
        widened_convs: for `runtime="onnxruntime"`, the other Convs with fewer than
            4 input channels that got zero-weight extra ones (onnxruntime's
            integer convs are slow below 4), and how: `"MatMul"` (a float
            `[I | 0]` on the model input) or `"Pad"` (of the quantized tensor).
        widened_depthwise: for `runtime="onnxruntime"`, the depthwise Convs
            whose channel count was not a multiple of 16 and that got
            zero-weight channels up to one (with the convs before and after
            them), and their new count: onnxruntime's integer depthwise conv
            takes a slow path otherwise (see `widen_depthwise_convs`).
        checked_on: where the inputs the file was checked on came from:
            `"validation_data"`; `"calibration sample"` (the first 64 inputs
            `calibrate` saw, kept with the model in this process);
            `"synthetic"` (32 fixed-seed inputs in the model input's calibrated
            range, for a model loaded from a file or never calibrated; judged
            only by how far the outputs are from Keras's); `"none"` (inputs
            that can't be synthesized, e.g. integer ones: not checked).

    Example:

    >>> report = export_onnx(qmodel, "model_int8.onnx")  # doctest: +SKIP
    >>> report.checked_on, report.num_samples, report.agreement  # doctest: +SKIP
    ('calibration sample', 64, 1.0)
    """

    path: str
    opset: int
    num_qdq_inputs: int
    num_qdq_weights: int
    file_bytes: int
    agreement: float | None = None
    max_abs_diff: float | None = None
    num_samples: int = 0
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    runtime: str = "tensorrt"
    ort_kernels: dict[str, int] | None = None
    tensorrt: TensorRTCheck | None = None
    checked_on: str = "validation_data"
    folded_convs: dict[str, int] = dataclasses.field(default_factory=dict)
    widened_convs: dict[str, str] = dataclasses.field(default_factory=dict)
    widened_depthwise: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def float_compute(self) -> list[str]:
        """Conv/MatMul/Gemm/Add nodes onnxruntime still runs in float (empty when every one fused)."""
        if not self.ort_kernels:
            return []
        # The MatMuls that only widen an image input (`widened_convs`) are data movement, not compute.
        widening = sum(how == "MatMul" for how in self.widened_convs.values())
        counts = {**self.ort_kernels, "MatMul": self.ort_kernels.get("MatMul", 0) - widening}
        return [op for op in ("Conv", "MatMul", "Gemm", "Add") if counts.get(op, 0) > 0]

    @property
    def num_integer_kernels(self) -> int:
        """How many nodes onnxruntime runs as integer kernels (QLinearConv, QGemm, ...)."""
        return sum(n for op, n in (self.ort_kernels or {}).items() if op in INTEGER_KERNELS)


def ort_kernels(path: str | os.PathLike) -> dict[str, int]:
    """How many nodes of each type onnxruntime runs for `path`, after its graph optimizations.

    Example:

    >>> ort_kernels("model_int8.onnx")["QLinearConv"]  # doctest: +SKIP
    9
    """
    import collections
    import tempfile

    ort, onnx = _require("onnxruntime", "onnxruntime"), _require("onnx", "onnx")
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.log_severity_level = 3  # its "hardware specific" warning is about this very file
        ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    return dict(collections.Counter(n.op_type for n in graph.node))


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI (AVX512_VNNI, AVX_VNNI or AMX): None when it can't tell.

    Without VNNI, onnxruntime's uint8 x int8 kernels (AVX2's `vpmaddubsw`)
    add pairs of products in int16, which saturates for 8-bit weights; 7-bit
    weights (`QuantizationSpec(weight_bits=7)`, onnxruntime's "reduce_range")
    can't saturate. With VNNI the products go straight to int32.

    >>> cpu_has_vnni()  # doctest: +SKIP
    True
    """
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    if flags is None:
        return None
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def _warn_if_saturating(model) -> None:
    from qat_plugin.wrappers import quantize_wrappers

    eight_bit = [w.name for w in quantize_wrappers(model) if any(q.bits == 8 for q in w.weight_quantizers.values())]
    if eight_bit and cpu_has_vnni() is False:
        warnings.warn(
            f"This CPU has no VNNI: onnxruntime's uint8 x int8 kernels can saturate with 8-bit weights "
            f"({len(eight_bit)} layers, e.g. {eight_bit[:3]}). If you deploy on such a CPU, quantize with "
            "QuantizationSpec(weight_bits=7); CPUs with AVX512_VNNI/AVX_VNNI run 8-bit weights exactly.",
            stacklevel=3,
        )


def _default_runtime(model) -> str:
    from qat_plugin.wrappers import quantize_wrappers

    # Output quantizers only come from the tensor-by-tensor (CPU) placements.
    return "onnxruntime" if any(w.output_quantizer is not None for w in quantize_wrappers(model)) else "tensorrt"


# ------------------------------------------------------------------ checking a file


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_,
}


def _input_arrays(data, specs) -> list[np.ndarray]:
    names = [s.name for s in specs]
    if isinstance(data, dict):
        missing = sorted(set(names) - set(data))
        if missing:
            raise ExportError(f"`validation_data` has no array for ONNX input(s) {missing}. Inputs: {names}")
        arrays = [np.asarray(data[n]) for n in names]
    else:
        arrays = [np.asarray(a) for a in (data if isinstance(data, (list, tuple)) else [data])]
    if len(arrays) != len(names) or len({len(a) for a in arrays}) != 1 or len(arrays[0]) == 0:
        raise ExportError(
            f"`validation_data` must hold one non-empty array per model input ({len(names)}: {names}), all "
            f"with the same number of samples. Received shapes: {[a.shape for a in arrays]}"
        )
    return [a.astype(_ORT_TYPES.get(s.type, a.dtype), copy=False) for a, s in zip(arrays, specs)]


def _as_list(outputs, names: Sequence[str]) -> list[np.ndarray]:
    if isinstance(outputs, dict):
        keys = names if set(names) <= set(outputs) else list(outputs)
        return [np.asarray(outputs[k]) for k in keys]
    return [np.asarray(o) for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]


def _session(path):
    ort = _require("onnxruntime", "onnxruntime")
    return ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])


def _run(session, arrays: list[np.ndarray], batch_size: int) -> list[np.ndarray]:
    specs, n = session.get_inputs(), len(arrays[0])
    feeds = ({s.name: a[i : i + batch_size] for s, a in zip(specs, arrays)} for i in range(0, n, batch_size))
    batches = [session.run(None, feed) for feed in feeds]
    return [np.concatenate([b[j] for b in batches]) for j in range(len(session.get_outputs()))]


def run_onnx(path: str | os.PathLike, data, *, batch_size: int = 32):
    """Run an ONNX file in onnxruntime (CPU) on `data`, in batches.

    Args:
        path: the ONNX file.
        data: an array, a list of arrays (one per input), or a dict keyed by input name.
        batch_size: rows per `session.run`.

    Returns:
        The output array, or a list of arrays for a model with several outputs.

    Example:

    >>> logits = run_onnx("model_int8.onnx", x_test)  # doctest: +SKIP
    >>> (logits.argmax(-1) == y_test).mean()  # doctest: +SKIP
    0.9765
    """
    check_validation_args(0.0, batch_size)
    session = _session(path)
    outputs = _run(session, _input_arrays(data, session.get_inputs()), batch_size)
    return outputs[0] if len(outputs) == 1 else outputs


def verify_onnx(
    model, path: str | os.PathLike, data, *, min_agreement: float = 0.999, batch_size: int = 32
) -> tuple[float | None, float, int]:
    """Run an ONNX file in onnxruntime (CPU) and `model.predict` on the same inputs.

    onnxruntime runs with its default graph optimizations, as deployed: it
    fuses Q/DQ pairs into integer kernels (QLinearConv...), whose own
    requantization accounts for most of `max_abs_diff`.

    Args:
        model: the Keras model the file was exported from.
        path: the ONNX file.
        data: an array, a list of arrays (one per input, in order), or a
            dict keyed by input name.
        min_agreement: the lowest share of matching argmax predictions accepted.
        batch_size: batch size for both runtimes.

    Returns:
        `(agreement, max_abs_diff, num_samples)`. `agreement` is the share of
        argmax predictions over the last axis that match, the lowest over
        outputs; `None` when no output has a last axis longer than 1 (then
        only `max_abs_diff` says how close the file is).

    Raises:
        ExportError: the agreement is below `min_agreement` (the message
            names the file and the numbers), or inputs or outputs don't line up.

    Example:

    >>> verify_onnx(qmodel, "model_int8.onnx", x_test[:256])  # doctest: +SKIP
    (1.0, 0.0041, 256)
    """
    check_validation_args(min_agreement, batch_size)
    keras_out, onnx_out = _keras_and_onnx_outputs(model, path, data, batch_size)
    return judge(keras_out, onnx_out, f"The ONNX file {path}", "validation_data", min_agreement, None)


def _keras_and_onnx_outputs(model, path, data, batch_size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    session = _session(path)
    out_names = [o.name for o in session.get_outputs()]
    arrays = _input_arrays(data, session.get_inputs())
    onnx_out = _run(session, arrays, batch_size)
    x = data if isinstance(data, dict) else arrays[0] if len(arrays) == 1 else arrays
    return _as_list(model.predict(x, batch_size=batch_size, verbose=0), out_names), onnx_out


# ------------------------------------------------------------------ export


@dataclasses.dataclass(frozen=True)
class _FakeQuantOp:
    output: str  # TF tensor names: tf2onnx keeps them in the graph it writes
    input: str
    bits: int
    weight: bool


def _reads_weight(tensor) -> bool:
    """True if `tensor` is computed from variables and constants only (a kernel, or one folded with a BatchNorm)."""
    import tensorflow as tf

    seen, todo = set(), [tensor.op]
    while todo:
        op = todo.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        # Variables reach a traced function as resource placeholders; data as any other kind.
        if op.type == "Placeholder" and op.outputs[0].dtype != tf.resource:
            return False
        todo.extend(i.op for i in op.inputs)
    return True


def _fake_quant_ops(model, signature) -> list[_FakeQuantOp]:
    """Every fake-quant op of the traced model, with its bits (which tf2onnx drops)."""
    import tensorflow as tf

    # Called the way tf2onnx calls it (TF's `trace_model_call`), so op names match.
    call = lambda *args: model(args[0] if len(args) == 1 else list(args), training=False)  # noqa: E731
    ops = []
    # autograph=False: a Functional model's call has no Python control flow to convert, and autograph
    # can't read a lambda's source (it warned on every export).
    traced = tf.function(call, input_signature=signature, autograph=False).get_concrete_function()
    for op in traced.graph.get_operations():
        if op.type not in _FAKE_QUANT_OPS:
            continue
        # V3 takes num_bits as an input tensor, V2/V4 as an attribute.
        bits = tf.get_static_value(op.inputs[3]) if op.type == "QuantizeAndDequantizeV3" else op.get_attr("num_bits")
        if bits is None:
            raise ExportError(f"Fake-quant op {op.name!r} has a num_bits that is not constant; ONNX needs fixed bits.")
        ops.append(_FakeQuantOp(op.outputs[0].name, op.inputs[0].name, int(bits), _reads_weight(op.inputs[0])))
    return ops


def _signature(model, input_signature) -> list:
    import tensorflow as tf

    if input_signature is not None:
        sig = list(input_signature) if isinstance(input_signature, (list, tuple)) else [input_signature]
        if not all(isinstance(s, tf.TensorSpec) for s in sig):
            raise ValueError(
                f"`input_signature` must be a tf.TensorSpec or a list of them. Received: {input_signature!r}"
            )
        return sig
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ExportError(
            f"Model {model.name!r} has no symbolic inputs (subclassed or not built). Pass "
            "input_signature=[tf.TensorSpec((None, ...), tf.float32, name='input')]."
        )
    # A free batch dimension: the file serves any batch size.
    return [tf.TensorSpec((None,) + tuple(i.shape[1:]), i.dtype, name=i.name) for i in inputs]


def _for_tf2onnx(model):
    """A Sequential model as the same Functional one (same layers, same weights).

    tf2onnx names outputs after `model.output_names`, which Sequential lacks.
    """
    import keras

    if not isinstance(model, keras.Sequential):
        return model
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError) as e:
        raise ExportError(f"Sequential model {model.name!r} is not built: give it a keras.Input first. ({e})") from e
    one = lambda xs: xs[0] if len(xs) == 1 else xs  # noqa: E731
    return keras.Model(one(inputs), one(outputs), name=model.name)


def _check_model(model, ops: Sequence[_FakeQuantOp]) -> None:
    from qat_plugin.report import list_quantizers

    missing = [i.key for i in list_quantizers(model) if not i.label.startswith("weight") and not i.calibrated]
    if missing:
        raise ExportError(
            f"Activation ranges {missing[:10]}{'...' if len(missing) > 10 else ''} are not calibrated, so their "
            "scales would be meaningless: call qat_plugin.calibrate(qmodel, data) before exporting."
        )
    low = sorted({(op.output.split(":")[0], op.bits) for op in ops if not op.weight and op.bits != 8})
    if low:
        raise ExportError(
            f"Activation quantizers of other than 8 bits can't be exported to ONNX: {low[:10]}. An int8 "
            "QuantizeLinear clips at -128/127, not at +-(2**(bits-1) - 1), tf2onnx ignores num_bits, and "
            "TensorRT runs activations in int8 only. Quantize activations with 8 bits (weights may keep 4 to 8 "
            "bits: they are exported exactly)."
        )


def export_onnx(
    model,
    path: str | os.PathLike,
    *,
    opset: int = 17,
    input_signature: Sequence[Any] | None = None,
    validation_data=None,
    min_agreement: float | None = None,
    batch_size: int = 32,
    runtime: str | None = None,
) -> OnnxExportReport:
    """Write `model` to an ONNX file with Q/DQ pairs and int8 weights, and check it.

    Works on quantized models (from `quantize_model` or `QATCallback`) and on
    FP32 ones (no Q/DQ; useful as the size and accuracy baseline). Every
    quantized weight is an int8 initializer feeding a DequantizeLinear on the
    weight input of its Conv/ConvTranspose/MatMul, zero point 0, per-channel
    scales on the output-channel axis as ONNX sees it (0 for Conv, 1 for
    ConvTranspose and MatMul); every activation gets an adjacent Q/DQ pair.
    For every runtime, float ops with a per-channel constant on a narrow
    channels-last tensor (a `Rescaling` or `Normalization` of the image) run
    on its rows, which onnxruntime broadcasts faster
    (`channel_constants_on_rows`): the same numbers.

    Args:
        model: a Keras model: Sequential, Functional, or any model with an
            `input_signature`.
        path: where to write the `.onnx` file (parent folders are created).
        opset: ONNX opset, 13 to 18.
        input_signature: `tf.TensorSpec`s, one per input; default: the
            model's inputs with a free batch dimension.
        validation_data: inputs (an array, a list of arrays, or a dict by
            input name) the file is run on in onnxruntime and compared with
            `model.predict` (see `verify_onnx`). Without it the file is still
            checked: on the model's calibration sample (the first 64 inputs
            `calibrate` saw in this process), else on 32 synthetic inputs with
            a `UserWarning` (a model loaded from a `.keras` file, an FP32
            model); `report.checked_on` says which. Without `validation_data`
            the file must also stay within 5% of the largest Keras output
            (a correct file is within a few output steps), and on synthetic
            inputs only that is checked: random inputs give near-tied logits.
        min_agreement: the lowest share of matching argmax predictions
            accepted on `validation_data`; below it `ExportError` is raised
            and the file is kept. On a calibration sample (at most 64 inputs)
            only more mismatches than this allows by chance raise. Default:
            0.999 for `runtime="tensorrt"` (onnxruntime computes it in float,
            like Keras), 0.99 for `runtime="onnxruntime"` (integer kernels
            requantize every output with their own rounding).
        batch_size: batch size for the comparison.
        runtime: `"tensorrt"` (int8 Q/DQ, zero point 0, checked against
            TensorRT's rules by `check_tensorrt`) or `"onnxruntime"`
            (uint8 activations, for onnxruntime's integer kernels). Default:
            `"onnxruntime"` for models quantized with the `"onnxruntime"` or
            `"tflite"` policy (they have output quantizers), else `"tensorrt"`.

    Returns:
        An `OnnxExportReport`.

    Raises:
        ExportError: an activation range is uncalibrated or has fewer than 8
            bits, tf2onnx failed, a weight could not be stored as int8, the
            file breaks TensorRT's rules (`runtime="tensorrt"`), or it
            disagrees with the Keras model (the file is kept for inspection).

    Warns:
        UserWarning: no `validation_data` and no calibration sample, so the
            file was checked on synthetic inputs only.

    Example:

    >>> qmodel = qat_plugin.quantize_model(model, calibration_data=x_train[:512])  # doctest: +SKIP
    >>> report = export_onnx(qmodel, "model_int8.onnx", validation_data=x_test)  # doctest: +SKIP
    >>> report.agreement, report.num_qdq_weights  # doctest: +SKIP
    (1.0, 5)
    >>> export_onnx(qmodel, "model_int8.onnx").checked_on  # no validation_data  # doctest: +SKIP
    'calibration sample'
    """
    onnx = _require("onnx", "onnx")
    tf2onnx = _require("tf2onnx", "tf2onnx")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(
            f"`opset` must be an int in [{MIN_OPSET}, {MAX_OPSET}] (per-channel Q/DQ needs 13; tf2onnx "
            f"writes up to {MAX_OPSET}). Received: opset={opset!r}"
        )
    runtime = _default_runtime(model) if runtime is None else runtime
    if runtime not in RUNTIMES:
        raise ValueError(
            f"`runtime` must be one of {RUNTIMES} (TFLite has its own exporter, `export_tflite`). "
            f"Received: runtime={runtime!r}"
        )
    if min_agreement is None:
        min_agreement = DEFAULT_AGREEMENT[runtime]
    check_validation_args(min_agreement, batch_size)  # before the slow conversion
    with traceable_grouped_convs():
        traced = _for_tf2onnx(model)
        signature = _signature(traced, input_signature)
        ops = _fake_quant_ops(traced, signature)
        _check_model(model, ops)
        low_bit = {name: op.bits for op in ops if op.weight and op.bits < 8 for name in (op.output, op.input)}
        try:
            proto, _ = tf2onnx.convert.from_keras(
                traced, input_signature=signature, opset=opset, custom_op_handlers=dict(CUSTOM_OP_HANDLERS)
            )
        except Exception as e:  # tf2onnx raises anything from KeyError to ValueError
            raise ExportError(f"tf2onnx could not convert model {model.name!r}: {type(e).__name__}: {e}") from e
    found = rewrite_qdq(proto, low_bit)
    lost = sorted(op.output for op in ops if op.weight and op.bits < 8 and not {op.output, op.input} & set(found))
    if lost:
        raise ExportError(f"Low-bit weights {lost[:5]} were not found in tf2onnx's graph, so their bits would be lost.")
    g = _Graph(proto.graph)
    floats = [n.input[0] for n in g.graph.node if n.op_type == "QuantizeLinear" and g.const(n.input[0]) is not None]
    if floats:
        raise ExportError(f"Weights {floats[:5]} could not be stored as int8 (an unexpected layout between Q and DQ).")
    folded: dict[str, int] = {}
    widened: dict[str, str] = {}
    widened_depthwise: dict[str, int] = {}
    if runtime == "onnxruntime":
        to_uint8_activations(proto)
        identity_reshapes(proto)
        scales_into_qdq(proto)
        clips_into_quantize(proto)
        constants_as_dequantized(proto)
        pads_before_dequantize(proto)
        max_pools_before_dequantize(proto)
        biases_into_convs(proto)
        concats_as_qlinear(proto)
        average_pools_as_depthwise_convs(proto)
        average_pools_in_float(proto)
        widened_depthwise = widen_depthwise_convs(proto)  # first: it follows plain conv -> Q/DQ -> conv chains
        folded = fold_image_convs(proto)
        widened = widen_narrow_convs(proto)
        pooled_squeezes_channels_last(proto)
        implied_weight_zero_points(proto)
        _warn_if_saturating(model)
    channel_constants_on_rows(proto)  # float preprocessing, for every runtime
    try:
        onnx.checker.check_model(proto)  # tf2onnx leaves ops it couldn't convert in place
    except onnx.checker.ValidationError as e:
        raise ExportError(f"tf2onnx produced an invalid ONNX graph for model {model.name!r}: {e}") from e

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx.save(proto, path)
    kernels = ort_kernels(path) if runtime == "onnxruntime" else None
    trt = check_tensorrt(path).raise_if_failed() if runtime == "tensorrt" else None
    what = f"The ONNX file {path}"
    data, checked_on = validation_data, "validation_data"
    if data is None:
        data, checked_on = default_check_inputs(model, what)
        if data is not None:
            data = data[0] if len(data) == 1 else list(data)
    agreement, diff, n = None, None, 0
    if data is not None:
        keras_out, onnx_out = _keras_and_onnx_outputs(model, path, data, batch_size)
        # Without validation_data, also bound the logits: ONNX files have no
        # ranges of their own (unlike TFLite's converter), so a correct one is
        # within a few output steps of Keras on any input.
        max_rel = None if checked_on == "validation_data" else MAX_REL_DIFF
        agreement, diff, n = judge(keras_out, onnx_out, what, checked_on, min_agreement, max_rel)
    pairs = qdq_pairs(proto)
    return OnnxExportReport(
        path=path,
        opset=opset,
        num_qdq_inputs=sum(p.producer == "QuantizeLinear" for p in pairs),
        num_qdq_weights=sum(p.kind == "weight" for p in pairs),
        file_bytes=os.path.getsize(path),
        agreement=agreement,
        max_abs_diff=diff,
        num_samples=n,
        input_names=tuple(i.name for i in proto.graph.input),
        output_names=tuple(o.name for o in proto.graph.output),
        runtime=runtime,
        ort_kernels=kernels,
        tensorrt=trt,
        checked_on=checked_on,
        folded_convs=folded,
        widened_convs=widened,
        widened_depthwise=widened_depthwise,
    )
