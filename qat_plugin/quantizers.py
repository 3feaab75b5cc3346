"""Symmetric fake quantization: the ops and their serializable descriptors.

Both ops are chosen because tf2onnx turns them into clean
QuantizeLinear/DequantizeLinear pairs (int8, zero point 0):

* activations, per tensor: `QuantizeAndDequantizeV4` with a given range;
* weights, per channel: `QuantizeAndDequantizeV3` with `axis` (V2/V4 fail
  inside TF when given a per-channel range).

Gradients are straight-through: V4 passes the gradient inside the range and
zeroes it outside (clipped STE); V3 passes it unchanged, which is exact for
weights because their range is their own absolute maximum.
"""

from __future__ import annotations

import keras
import tensorflow as tf

MIN_BITS, MAX_BITS = 4, 8
# amax below this is treated as "no range yet" and would divide by zero.
_TINY = 1e-12


def qmax(bits: int) -> int:
    """Largest level of a narrow-range signed grid: 127 for 8 bits.

    >>> qmax(8), qmax(4)
    (127, 7)
    """
    return 2 ** (bits - 1) - 1


def check_bits(bits, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"`{what}` must be an int in [{MIN_BITS}, {MAX_BITS}]. Received: {what}={bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"`{what}` must be in [{MIN_BITS}, {MAX_BITS}]. Received: {what}={bits}")
    return bits


def fake_quant_per_tensor(x, amax, bits: int = 8):
    """Quantize-dequantize `x` to a symmetric grid of `bits` in [-amax, amax].

    >>> import tensorflow as tf
    >>> float(fake_quant_per_tensor(tf.constant([0.3]), tf.constant(1.0), 8)[0])  # doctest: +ELLIPSIS
    0.29921...
    """
    amax = tf.stop_gradient(tf.maximum(tf.cast(amax, x.dtype), _TINY))
    return tf.quantization.quantize_and_dequantize_v2(
        x, -amax, amax, signed_input=True, num_bits=bits, range_given=True, narrow_range=True
    )


def fake_quant_unsigned(x, amax, bits: int = 8):
    """Quantize-dequantize a non-negative `x` to `2**bits` levels in [0, amax].

    For a ReLU's output: all levels are usable (a signed grid wastes half),
    and tf2onnx writes it as uint8 with zero point 0, the type onnxruntime's
    integer kernels take.

    >>> import tensorflow as tf
    >>> [round(float(v), 4) for v in fake_quant_unsigned(tf.constant([0.3, -1.0, 9.0]), tf.constant(1.0), 8)]
    [0.298, 0.0, 1.0]
    """
    amax = tf.stop_gradient(tf.maximum(tf.cast(amax, x.dtype), _TINY))
    return tf.quantization.quantize_and_dequantize_v2(
        x, tf.zeros_like(amax), amax, signed_input=False, num_bits=bits, range_given=True, narrow_range=False
    )


def fake_quant_per_channel(w, amax, axis: int, bits: int = 8):
    """Quantize-dequantize `w` with one symmetric range per slice along `axis`."""
    amax = tf.stop_gradient(tf.maximum(tf.cast(amax, w.dtype), _TINY))
    return tf.raw_ops.QuantizeAndDequantizeV3(
        input=w,
        input_min=-amax,
        input_max=amax,
        num_bits=bits,
        signed_input=True,
        range_given=True,
        narrow_range=True,
        axis=axis,
    )


def sigmoid_amax(bits: int = 8) -> float:
    """The range of a sigmoid's unsigned grid: steps of `2**-bits`, TFLite's LOGISTIC output grid.

    >>> sigmoid_amax(8) * 256
    255.0
    """
    return (2**bits - 1) / 2**bits


@keras.saving.register_keras_serializable(package="qat_plugin")
class TensorQuantizer(keras.quantizers.Quantizer):
    """Describes one fake quantizer: bit width and (for weights) channel axis.

    It holds no state. Activation ranges live in the wrapper's non-trainable
    `amax` variables; weight ranges are recomputed from the kernel on every
    call, so they are never stale when the model is exported.

    Args:
        bits: bit width, 4 to 8. The grid is narrow and symmetric:
            [-(2**(bits-1) - 1), 2**(bits-1) - 1], zero point 0.
        axis: channel axis for a per-channel quantizer, or `None` for one
            range for the whole tensor.
        unsigned: for tensors that are never negative (after a ReLU): the
            grid is [0, 2**bits - 1] over [0, amax]. Per tensor only.
        fixed_amax: a range the function sets, kept through calibration and
            training: `sigmoid_amax(bits)` for a sigmoid's output, the grid
            TFLite's int8 LOGISTIC writes (with a calibrated one the
            converter adds a requantize, and the file drifts a step).

    Example:

    >>> import numpy as np
    >>> q = TensorQuantizer(bits=8, axis=-1)
    >>> w = np.array([[1.0, -0.5], [0.25, 0.1]], "float32")
    >>> np.asarray(q.compute_amax(w)).tolist()
    [1.0, 0.5]
    >>> np.allclose(q(w), w, atol=1 / 127)
    True
    """

    def __init__(
        self,
        bits: int = 8,
        axis: int | None = None,
        output_dtype: str | None = None,
        unsigned: bool = False,
        fixed_amax: float | None = None,
    ):
        super().__init__(output_dtype=output_dtype or ("uint8" if unsigned else "int8"))
        self.bits = check_bits(bits)
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise ValueError(f"`axis` must be an int or None. Received: axis={axis!r}")
        if unsigned and axis is not None:
            raise ValueError("An unsigned quantizer is per tensor (for activations); pass axis=None.")
        self.axis = axis
        self.unsigned = bool(unsigned)
        if fixed_amax is not None and (axis is not None or not float(fixed_amax) > 0):
            raise ValueError(f"`fixed_amax` is a positive per-tensor range. Received: fixed_amax={fixed_amax!r}, axis={axis!r}")
        self.fixed_amax = None if fixed_amax is None else float(fixed_amax)

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def compute_amax(self, w):
        """The absolute maximum of `w`, per channel along `axis` or overall."""
        w = tf.convert_to_tensor(w)
        if self.axis is None:
            return tf.stop_gradient(tf.reduce_max(tf.abs(w)))
        axis = self.axis % w.shape.rank
        reduce = [i for i in range(w.shape.rank) if i != axis]
        return tf.stop_gradient(tf.reduce_max(tf.abs(w), axis=reduce))

    def step(self, amax):
        """The grid's spacing for range `amax`: the scale an exported file stores.

        >>> round(float(TensorQuantizer(8).step(1.27)), 6), round(float(TensorQuantizer(8, unsigned=True).step(2.55)), 6)
        (0.01, 0.01)
        """
        levels = 2**self.bits - 1 if self.unsigned else qmax(self.bits)
        return tf.maximum(tf.cast(amax, tf.float32), _TINY) / levels

    def quantize(self, x, amax):
        """Fake-quantize `x` with the given range(s)."""
        if self.unsigned:
            return fake_quant_unsigned(x, amax, self.bits)
        if self.axis is None:
            return fake_quant_per_tensor(x, amax, self.bits)
        return fake_quant_per_channel(x, amax, self.axis % x.shape.rank, self.bits)

    def __call__(self, x, amax=None):
        x = tf.convert_to_tensor(x)
        return self.quantize(x, self.compute_amax(x) if amax is None else amax)

    def get_config(self) -> dict:
        return {
            "bits": self.bits, "axis": self.axis, "output_dtype": self.output_dtype, "unsigned": self.unsigned,
            "fixed_amax": self.fixed_amax,
        }

    def __eq__(self, other):
        return isinstance(other, TensorQuantizer) and self.get_config() == other.get_config()

    def __repr__(self):
        unsigned = ", unsigned=True" if self.unsigned else ""
        fixed = f", fixed_amax={self.fixed_amax}" if self.fixed_amax is not None else ""
        return f"TensorQuantizer(bits={self.bits}, axis={self.axis}{unsigned}{fixed})"
