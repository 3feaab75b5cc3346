"""The wrapper layer that fake-quantizes a Keras layer, and the table of layer kinds.

Supporting a new layer kind is one `register_layer` call: which weight
attributes it has (with their output-channel axis) and which of its inputs get
a quantizer. `QuantizeWrapper` does the rest for every kind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import keras
import numpy as np
from keras import ops

from qat_plugin.quantizers import TensorQuantizer

INPUT_RULES = ("first", "all", "residual")
# Zero padding and max pooling keep a tensor on its quantization grid (a
# padded 0 is a level, the max of levels is a level).
ON_GRID_LAYERS = (
    keras.layers.ZeroPadding1D, keras.layers.ZeroPadding2D, keras.layers.ZeroPadding3D,
    keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D,
)
# Cropping only selects values, so its output is on its input's grid too; only policies with
# `standalone_relus` pass a grid through it (onnxruntime reads each crop's reader through a Q/DQ of its own).
CROPPINGS = (keras.layers.Cropping1D, keras.layers.Cropping2D, keras.layers.Cropping3D)
SEPARABLE_CONVS = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
# Moving-average factor for activation ranges while `track_ranges` is on.
RANGE_MOMENTUM = 0.99


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """How one Keras layer class is quantized.

    Attributes:
        weights: `(attribute, channel_axis)` for each weight the layer's
            `call` reads; the wrapper swaps in the fake-quantized tensor.
        inputs: `"first"` quantizes input 0, `"all"` every input,
            `"residual"` the inputs of an add that don't come straight from a
            quantized conv (TensorRT fuses that one into the conv).
    """

    weights: tuple[tuple[str, int], ...] = ()
    inputs: str = "first"


_KINDS: dict[type, LayerKind] = {}


def register_layer(layer_class: type, weights: Sequence[tuple[str, int]] = (), inputs: str = "first") -> None:
    """Teach qat-plugin to quantize `layer_class`.

    Args:
        layer_class: a `keras.layers.Layer` subclass.
        weights: `(attribute, channel_axis)` pairs, e.g. `[("kernel", -1)]`.
            The layer's `call` must read each weight from that attribute.
        inputs: `"first"`, `"all"` or `"residual"`.

    Example:

    >>> register_layer(keras.layers.MaxPooling2D, inputs="first")
    >>> layer_kind(keras.layers.MaxPooling2D()).inputs
    'first'
    >>> _ = _KINDS.pop(keras.layers.MaxPooling2D)
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise TypeError(f"`layer_class` must be a keras.layers.Layer subclass. Received: {layer_class!r}")
    if inputs not in INPUT_RULES:
        raise ValueError(f"`inputs` must be one of {INPUT_RULES}. Received: inputs={inputs!r}")
    _KINDS[layer_class] = LayerKind(tuple((str(a), int(x)) for a, x in weights), inputs)


def layer_kind(layer) -> LayerKind | None:
    """The registered kind of `layer` (its own class first, then base classes)."""
    for cls in type(layer).__mro__:
        if cls in _KINDS:
            return _KINDS[cls]
    return None


def supported_types() -> list[str]:
    """Names of the layer classes qat-plugin knows how to quantize."""
    return sorted(c.__name__ for c in _KINDS)


L = keras.layers
# Keras keeps conv/dense kernels behind a `kernel` property that reads `_kernel`.
for _cls in (L.Conv1D, L.Conv2D, L.Conv3D, L.Dense, L.EinsumDense):
    register_layer(_cls, [("_kernel", -1)])
# Depthwise kernels are (h, w, in, multiplier): channel = input channel.
register_layer(L.DepthwiseConv2D, [("kernel", 2)])
register_layer(L.DepthwiseConv1D, [("kernel", 1)])
register_layer(L.SeparableConv2D, [("depthwise_kernel", 2), ("pointwise_kernel", -1)])
register_layer(L.SeparableConv1D, [("depthwise_kernel", 1), ("pointwise_kernel", -1)])
# Transposed kernels are (..., out, in).
for _cls in (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose):
    register_layer(_cls, [("kernel", -2)])
# A BatchNormalization no conv can take in (after a concat or an add, as in
# DenseNet and pre-activation ResNets) runs as a 1x1 depthwise conv: its
# per-channel scale `gamma / sqrt(moving_variance + epsilon)` is the kernel,
# (1, ..., channels, 1), so the channel axis is -2. Placement policies
# decide whether it is quantized (`PlacementPolicy.standalone_batchnorm`).
register_layer(L.BatchNormalization, [("gamma", -2)])
register_layer(L.Add, inputs="residual")
register_layer(L.Concatenate, inputs="all")
# Quantized only where a policy asks for it (`PlacementPolicy.quantize_elementwise`)
# and only what integer runtimes have ops for (`elementwise_problem`).
register_layer(L.Activation)
register_layer(L.Multiply, inputs="all")
for _cls in (
    L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D,
    L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D,
):
    register_layer(_cls)
del L, _cls


def is_relu(layer) -> bool:
    """A ReLU (clipped or not) whose output is never negative: an unsigned quantizer fits it."""
    if isinstance(layer, keras.layers.ReLU):
        return not layer.negative_slope and not layer.threshold
    if isinstance(layer, keras.layers.Activation) or hasattr(layer, "activation"):
        fn = getattr(layer, "activation", None)
        return getattr(fn, "__name__", None) in ("relu", "relu6")
    return False


def is_linear(layer) -> bool:
    fn = getattr(layer, "activation", None)
    return fn is None or getattr(fn, "__name__", None) == "linear"


def foldable_attr(layer) -> str | None:
    """The weight of `layer` whose output channels a following BatchNorm scales, if any."""
    kind = layer_kind(layer)
    if kind is None or not kind.weights or not is_linear(layer):
        return None
    if isinstance(layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)):
        return None  # groups/transposed layouts: not worth the special case
    if isinstance(layer, keras.layers.EinsumDense):
        return None  # its bias follows the equation, not the last axis
    if isinstance(layer, keras.layers.BatchNormalization):
        return None  # two BatchNorms in a row: rare enough to leave the second in float
    return kind.weights[-1][0]  # separable convs: the pointwise kernel makes the output


def standalone_batchnorm_problem(layer, input_shape) -> str | None:
    """Why a BatchNormalization can't run as a 1x1 depthwise conv on inputs of `input_shape`; None if it can."""
    rank = len(input_shape)
    if rank not in (3, 4):
        return f"normalizes a rank-{rank} tensor, and only 1D and 2D feature maps (rank 3 or 4) run as a depthwise conv"
    if layer.axis % rank != rank - 1:
        return f"normalizes axis {layer.axis} of a rank-{rank} tensor, not the channels-last axis"
    return None


# Activation functions an integer runtime computes from integer ops, and
# whether the wrapper puts a grid on their gate (`relu6(x + 3)`, `sigmoid(x)`):
# onnxruntime runs hard swish as QLinearAdd then QLinearMul (the gate's
# ReLU6 is its grid's clip, the / 6 its scale), swish as QLinearSigmoid then
# QLinearMul, sigmoid as QLinearSigmoid.
GATED_ACTIVATIONS = {"hard_silu": True, "silu": True, "sigmoid": False}


def activation_name(layer) -> str | None:
    fn = getattr(layer, "activation", None)
    return getattr(fn, "__name__", None)


def elementwise_problem(layer, num_inputs: int, relus: bool = False) -> str | None:
    """Why an `Activation` or `Multiply` layer can't run as integer ops; None if it can.

    With `relus`, a ReLU (one no layer before it takes in) runs as one too.
    """
    if isinstance(layer, keras.layers.Multiply):
        if num_inputs != 2:
            return f"multiplies {num_inputs} tensors, and integer runtimes multiply two at a time"
        return None
    name = activation_name(layer)
    if relus and is_relu(layer):
        return None
    if name not in GATED_ACTIVATIONS:
        return (
            f"computes {name!r}, and only {sorted(GATED_ACTIVATIONS)} run as integer ops (a ReLU "
            "fuses into the layer before it)"
        )
    return None


def _weight_label(attr: str, n_weights: int) -> str:
    return "weight" if n_weights == 1 else f"weight_{attr.lstrip('_')}"


@keras.saving.register_keras_serializable(package="qat_plugin")
class QuantizeWrapper(keras.layers.Wrapper):
    """Runs a Keras layer with fake-quantized inputs, weights and/or output.

    Activation ranges are non-trainable `amax` variables (set by
    `qat_plugin.calibrate`, saved with the model). Weight ranges are the
    kernel's absolute maximum per output channel, recomputed on every call.
    The wrapped layer keeps its own float weights; training updates them
    through straight-through gradients.

    With `batchnorm`, the BatchNormalization that follows the layer is folded
    into it: the kernel scaled by `gamma / sqrt(moving_variance + epsilon)`
    is what gets fake-quantized, and the bias absorbs the rest, so the
    exported file runs exactly the trained computation. The moving statistics
    are frozen (the folded model is trained with them), `gamma` and `beta`
    keep training. With `activation`, that layer runs after the (folded)
    layer and before the output quantizer.

    A wrapped `BatchNormalization` (channels last, 1D or 2D feature maps)
    runs as a 1x1 depthwise conv with its moving statistics: the kernel is
    `gamma / sqrt(moving_variance + epsilon)` (the `"gamma"` weight
    quantizer's input: one value per channel, so per-channel int8 holds it
    exactly), the bias `beta - moving_mean * kernel`. That is the op integer
    runtimes run as one integer kernel, with a following ReLU; as with a
    folded BatchNorm, the statistics stay frozen and `gamma` and `beta` train.

    Args:
        layer: the layer to wrap.
        input_quantizers: one `TensorQuantizer` or `None` per input position.
        weight_quantizers: `{attribute: TensorQuantizer}` for the layer's weights.
        output_quantizer: a `TensorQuantizer` for the output, or `None`.
        batchnorm: a `BatchNormalization` (last axis) to fold, or `None`.
        activation: an activation layer to run before the output quantizer.
        intermediate_quantizer: for a separable conv, a `TensorQuantizer`
            between its depthwise and pointwise halves (the wrapper then
            runs them as two convs), so integer runtimes run both in
            integer kernels; `None` runs the layer's own fused op. For a
            conv or dense layer whose own activation is a swish or a
            sigmoid (`Conv2D(..., activation="swish")`), the grid of its
            output before that activation, so integer runtimes run the conv
            as an integer kernel and the activation after it.
        gate_quantizer: for a swish (`"swish"`/`"silu"`,
            `"hard_swish"`/`"hard_silu"`: an `Activation` layer's, or a
            layer's own), the grid of its gate: the wrapper then computes
            `x * q(sigmoid(x))` or `x * (q(relu6(x + 3)) / 6)`, Keras's
            formulas with the gate quantized, which integer runtimes run as
            two integer ops.
        quantize_bias: round the (folded) bias to the grid an integer
            kernel adds it on: steps of input scale x weight scale, per
            channel (int32 in onnxruntime's QLinearConv and TFLite). The
            input scale is the first input's quantizer's, or else that of
            the quantized layer whose output it reads (through zero padding
            and max pooling). Without it, a float bias lands between int32
            steps, and where a conv sees only zeros (a digit's background,
            padding) its output is the bias: MobileNetV2's first conv then
            differed from onnxruntime by one level on 2% of its outputs.
        output_on_input_grid: for an average pool, round the output onto the
            grid its first input is on (the same places as `quantize_bias`
            looks), rather than a grid of its own: TFLite's int8
            AVERAGE_POOL_2D takes one scale for its input and output, and
            its converter rejected different ones (NASNet's adjust block) or
            requantized around the pool, a rounding the Keras model did not
            make. The range is the input's: the output does not move it.

    Example:

    >>> import numpy as np
    >>> dense = keras.layers.Dense(4)
    >>> q = QuantizeWrapper(dense, [TensorQuantizer(8)], {"_kernel": TensorQuantizer(8, axis=-1)})
    >>> y = q(np.ones((2, 3), "float32"))
    >>> q.input_amax[0].assign(1.0) and None
    >>> tuple(q(np.ones((2, 3), "float32")).shape)
    (2, 4)
    """

    def __init__(
        self,
        layer: keras.layers.Layer,
        input_quantizers: Sequence[TensorQuantizer | None] = (),
        weight_quantizers: dict[str, TensorQuantizer] | None = None,
        output_quantizer: TensorQuantizer | None = None,
        batchnorm: keras.layers.BatchNormalization | None = None,
        activation: keras.layers.Layer | None = None,
        intermediate_quantizer: TensorQuantizer | None = None,
        gate_quantizer: TensorQuantizer | None = None,
        quantize_bias: bool = False,
        output_on_input_grid: bool = False,
        **kwargs,
    ):
        # Same name as the wrapped layer: `get_layer`, output names (and so
        # dict-keyed losses) and spec names keep working on the quantized model.
        kwargs.setdefault("name", layer.name)
        kwargs.setdefault("dtype", layer.dtype_policy)
        super().__init__(layer, **kwargs)
        self.input_quantizers = [self._quantizer(q) for q in input_quantizers]
        self.weight_quantizers = {k: self._quantizer(q) for k, q in (weight_quantizers or {}).items()}
        self.output_quantizer = self._quantizer(output_quantizer)
        self.intermediate_quantizer = self._quantizer(intermediate_quantizer)
        self.gate_quantizer = self._quantizer(gate_quantizer)
        name = activation_name(layer)
        # A conv or dense layer's own swish or sigmoid, run after a grid on the layer's linear output.
        self._split_activation = (
            self.intermediate_quantizer is not None and not isinstance(layer, (SEPARABLE_CONVS, keras.layers.Activation))
            and name in GATED_ACTIVATIONS
        )
        if self.intermediate_quantizer is not None and not (isinstance(layer, SEPARABLE_CONVS) or self._split_activation):
            raise ValueError(
                f"`intermediate_quantizer` is for separable convs and for layers whose own activation is one of "
                f"{sorted(GATED_ACTIVATIONS)}; {layer.name!r} is a {type(layer).__name__} computing {name!r}."
            )
        gated = GATED_ACTIVATIONS.get(name) and (isinstance(layer, keras.layers.Activation) or self._split_activation)
        if self.gate_quantizer is not None and not gated:
            raise ValueError(
                f"`gate_quantizer` is for swish activations (an `Activation` layer's, or a layer's own with an "
                f"`intermediate_quantizer`); {layer.name!r} is a {type(layer).__name__} computing {name!r}."
            )
        self.output_on_input_grid = bool(output_on_input_grid)
        if self.output_on_input_grid and self.output_quantizer is not None:
            raise ValueError(
                f"{layer.name!r}: pass `output_quantizer` or `output_on_input_grid=True`, not both; the output gets one grid."
            )
        quantizers = (self.output_quantizer, self.intermediate_quantizer, self.gate_quantizer)
        if not (
            any(self.input_quantizers) or self.weight_quantizers or any(q is not None for q in quantizers)
            or self.output_on_input_grid
        ):
            raise ValueError(f"QuantizeWrapper around {layer.name!r} has no quantizer: pass at least one.")
        if getattr(layer, "lora_enabled", False):
            raise ValueError(f"Layer {layer.name!r} has LoRA enabled; merge or disable LoRA before quantizing it.")
        self.batchnorm = self._sublayer(batchnorm)
        self.activation = self._sublayer(activation)
        self.quantize_bias = bool(quantize_bias)
        self._standalone_bn = isinstance(layer, keras.layers.BatchNormalization)
        if self._standalone_bn and (self.batchnorm is not None or self.intermediate_quantizer is not None):
            raise ValueError(f"A wrapped BatchNormalization ({layer.name!r}) takes no `batchnorm` or `intermediate_quantizer`.")
        if self.batchnorm is not None:
            self._fold_attr = foldable_attr(layer)
            if self._fold_attr is None:
                raise ValueError(
                    f"Can't fold BatchNorm {self.batchnorm.name!r} into {layer.name!r} "
                    f"({type(layer).__name__}): only convs and dense layers with a linear activation fold."
                )
        # Set by `qat_plugin.calibrate` while it reads activations; never saved.
        self._calibration_hook: Callable | None = None
        # While True, training steps move activation ranges towards each
        # batch's absolute maximum (moving average). Read when the train step
        # is traced, so changing it needs a new train function.
        self.track_ranges = False

    @staticmethod
    def _quantizer(q):
        if q is None or isinstance(q, TensorQuantizer):
            return q
        if isinstance(q, dict):
            return keras.saving.deserialize_keras_object(q)
        raise TypeError(f"Expected a TensorQuantizer or None. Received: {q!r}")

    @staticmethod
    def _sublayer(layer):
        if layer is None or isinstance(layer, keras.layers.Layer):
            return layer
        if isinstance(layer, dict):
            return keras.saving.deserialize_keras_object(layer)
        raise TypeError(f"Expected a keras.layers.Layer or None. Received: {layer!r}")

    def build(self, input_shape=None):
        if self._standalone_bn:
            problem = standalone_batchnorm_problem(self.layer, input_shape)
            if problem is not None:
                raise ValueError(
                    f"Can't quantize BatchNormalization {self.layer.name!r} on its own: it {problem}. Leave it "
                    "unwrapped (`quantize_model` keeps such a BatchNorm in float and says so in `qat_report`)."
                )
            self._spatial_rank = len(input_shape) - 2
        super().build(input_shape)
        out_shape = self.layer.compute_output_shape(input_shape)
        for sub in (self.batchnorm, self.activation):
            if sub is not None and not sub.built:
                sub.build(out_shape)
        for attr in self.weight_quantizers:
            if not hasattr(self.layer, attr):
                raise ValueError(f"Layer {self.layer.name!r} has no weight attribute {attr!r} to quantize.")
        self.input_amax = [
            None if q is None else self._add_amax(f"input_{i}_amax", q)
            for i, q in enumerate(self.input_quantizers)
        ]
        self.output_amax = None if self.output_quantizer is None else self._add_amax("output_amax", self.output_quantizer)
        self.intermediate_amax = (
            None if self.intermediate_quantizer is None else self._add_amax("intermediate_amax", self.intermediate_quantizer)
        )
        self.gate_amax = None if self.gate_quantizer is None else self._add_amax("gate_amax", self.gate_quantizer)
        self.built = True

    def _add_amax(self, name: str, quantizer: TensorQuantizer):
        fixed = quantizer.fixed_amax
        initializer = "zeros" if fixed is None else keras.initializers.Constant(fixed)
        # "mean" lets replicas update the range under tf.distribute.
        return self.add_weight(name=name, shape=(), initializer=initializer, trainable=False, aggregation="mean")

    def _fake_quant(self, q: TensorQuantizer, amax, x, training):
        if q.fixed_amax is not None:
            return q.quantize(x, ops.cast(q.fixed_amax, x.dtype))
        if self.track_ranges and training:
            batch_amax = ops.max(ops.abs(ops.cast(x, amax.dtype)))
            amax.assign(RANGE_MOMENTUM * amax + (1.0 - RANGE_MOMENTUM) * batch_amax)
        return q.quantize(x, ops.cast(amax, x.dtype))

    @property
    def inner_name(self) -> str:
        """The wrapped layer's name, used to label its quantizers."""
        return self.layer.name

    def _quantize_inputs(self, inputs, training):
        single = not isinstance(inputs, (list, tuple))
        xs = [inputs] if single else list(inputs)
        if len(self.input_quantizers) > len(xs):
            raise ValueError(
                f"{self.name} has {len(self.input_quantizers)} input quantizers but was called on {len(xs)} inputs."
            )
        for i, q in enumerate(self.input_quantizers):
            if q is not None:
                if self._calibration_hook is not None:
                    self._calibration_hook(self, ("input", i), xs[i])
                else:
                    xs[i] = self._fake_quant(q, self.input_amax[i], xs[i], training)
        return xs[0] if single else type(inputs)(xs) if isinstance(inputs, tuple) else xs

    def call(self, inputs, training=None, **kwargs):
        if training is not None and self.layer._call_has_training_arg:
            kwargs["training"] = training
        x = self._quantize_inputs(inputs, training)
        calibrating = self._calibration_hook is not None
        if self._standalone_bn:
            y = self._batchnorm_call(x, calibrating)
        elif self.gate_quantizer is not None and isinstance(self.layer, keras.layers.Activation):
            y = self._own_activation(x, training)
        else:
            y = self._layer_call(x, calibrating, training, kwargs)
            if self._split_activation:
                y = self._own_activation(self._grid("intermediate", y, training), training)
        if self.activation is not None:
            y = self.activation(y)
        if self.output_quantizer is not None:
            if self._calibration_hook is not None:
                self._calibration_hook(self, ("output", 0), y)
            else:
                y = self._fake_quant(self.output_quantizer, self.output_amax, y, training)
        elif self.output_on_input_grid and not calibrating:
            grid = self._input_grid()
            if grid is None:
                raise ValueError(
                    f"{self.name!r} has `output_on_input_grid=True`, but its input is on no grid: give it an input "
                    "quantizer, or have the layer before it quantize its output."
                )
            q, amax = grid
            # Not `_fake_quant`: tracking ranges here would pull the input's range toward the averages.
            y = q.quantize(y, ops.cast(amax if q.fixed_amax is None else q.fixed_amax, y.dtype))
        return y

    def _layer_call(self, x, calibrating: bool, training, kwargs):
        """The wrapped layer's own `call`, with the fake-quantized (folded) weights swapped in."""
        swaps = {}
        attrs = list(self.weight_quantizers)
        if self.batchnorm is not None and self._fold_attr not in attrs:
            attrs.append(self._fold_attr)
        for attr in attrs:
            value = self.weight_value(attr)
            if attr in self.weight_quantizers and not calibrating:
                value = self.weight_quantizers[attr](value)
            swaps[attr] = value
        if self.batchnorm is not None:
            # Through the layer's own bias path even without a bias, so the
            # exported Conv carries it (a separate Add would keep onnxruntime
            # from fusing the conv into an integer kernel).
            swaps["bias"] = self._folded_bias()
            if hasattr(self.layer, "use_bias"):
                swaps["use_bias"] = True
        if self._split_activation:
            swaps["activation"] = keras.activations.linear  # run after the intermediate grid instead
        if self.quantize_bias and not calibrating:
            bias = swaps.get("bias", getattr(self.layer, "bias", None))
            if bias is not None:
                swaps["bias"] = self._rounded_bias(bias)
        # Swap the (folded, fake-quantized) tensors in where the layer's own
        # `call` reads them; restored right after.
        originals = {attr: getattr(self.layer, attr) for attr in swaps}
        try:
            for attr, value in swaps.items():
                object.__setattr__(self.layer, attr, value)
            separable = self.intermediate_quantizer is not None and not self._split_activation
            y = self._separable_call(x, training) if separable else self.layer.call(x, **kwargs)
        finally:
            for attr, var in originals.items():
                object.__setattr__(self.layer, attr, var)
        return y

    def _rounded_bias(self, bias):
        """`bias` on its integer grid (see `quantize_bias`), or as it is where it has none."""
        step = self._bias_step(bias)
        if step is None:
            return bias
        bias = ops.cast(bias, "float32")
        # Straight-through: the bias trains in float.
        rounded = bias + ops.stop_gradient(ops.round(bias / step) * step - bias)
        return ops.cast(rounded, self.layer.compute_dtype)

    def _batchnorm_call(self, x, calibrating: bool):
        """A wrapped BatchNormalization as a 1x1 depthwise conv plus bias (see the class docstring)."""
        bn = self.layer
        kernel = self.weight_value("gamma")
        if "gamma" in self.weight_quantizers and not calibrating:
            kernel = self.weight_quantizers["gamma"](kernel)
        bias = ops.cast(self._bn_shift(bn, self._bn_scale(bn)), bn.compute_dtype)
        if self.quantize_bias and not calibrating:
            bias = self._rounded_bias(bias)
        y = ops.depthwise_conv(ops.cast(x, bn.compute_dtype), kernel, strides=1, padding="valid")
        return ops.add(y, ops.reshape(bias, (1,) * (len(y.shape) - 1) + (-1,)))

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def _separable_call(self, x, training):
        """The separable conv as a depthwise conv, the intermediate quantizer, and a 1x1 conv (what its op computes)."""
        layer = self.layer
        y = ops.depthwise_conv(
            x, layer.depthwise_kernel, strides=layer.strides, padding=layer.padding,
            dilation_rate=layer.dilation_rate, data_format=layer.data_format,
        )
        y = self._grid("intermediate", y, training)
        y = ops.conv(y, layer.pointwise_kernel, strides=1, padding="valid", data_format=layer.data_format)
        if layer.use_bias:
            shape = (1,) * (layer.rank + 1) + (layer.filters,) if layer.data_format == "channels_last" else (1, layer.filters) + (1,) * layer.rank
            y = ops.add(y, ops.reshape(layer.bias, shape))
        return y if layer.activation is None else layer.activation(y)

    def _grid(self, kind: str, y, training):
        """`y` on the `"intermediate"` or `"gate"` grid (left as it is while calibrating, which reads it)."""
        if self._calibration_hook is not None:
            self._calibration_hook(self, (kind, 0), y)
            return y
        return self._fake_quant(getattr(self, f"{kind}_quantizer"), getattr(self, f"{kind}_amax"), y, training)

    def _own_activation(self, x, training):
        """The layer's activation: a swish as its gate, the gate's grid, and the product (Keras's own formulas)."""
        name = activation_name(self.layer)
        if self.gate_quantizer is None:
            return self.layer.activation(x)
        if name == "hard_silu":
            return x * (self._grid("gate", ops.relu6(x + 3.0), training) / 6.0)
        return x * self._grid("gate", ops.sigmoid(x), training)

    def _input_grid(self):
        """`(quantizer, amax)` of the grid the first input is on, or None where it isn't on one."""
        if self.input_quantizers and self.input_quantizers[0] is not None:
            return self.input_quantizers[0], self.input_amax[0]
        if len(self._inbound_nodes) != 1:  # not in a graph yet, or shared: no single producer
            return None
        tensor = self._inbound_nodes[0].input_tensors[0]
        while True:
            history = getattr(tensor, "_keras_history", None)
            op = None if history is None else history.operation
            if isinstance(op, QuantizeWrapper):
                return None if op.output_quantizer is None else (op.output_quantizer, op.output_amax)
            if not isinstance(op, (Absorbed, *ON_GRID_LAYERS, *CROPPINGS)):
                return None
            tensor = op._inbound_nodes[history.node_index].input_tensors[0]

    def _bias_step(self, bias):
        """Input step x weight step, in the bias's shape; None where the product isn't the bias's grid."""
        if self.intermediate_quantizer is not None and not self._split_activation:  # the pointwise half adds the bias
            grid, attr = (self.intermediate_quantizer, self.intermediate_amax), "pointwise_kernel"
        elif len(self.weight_quantizers) == 1:
            grid, attr = self._input_grid(), next(iter(self.weight_quantizers))
        else:
            return None  # a separable conv run whole: its bias follows an unquantized depthwise output
        wq = self.weight_quantizers.get(attr)
        if grid is None or wq is None:
            return None
        w_step = wq.step(wq.compute_amax(self.weight_value(attr)))
        n = int(np.prod(bias.shape))
        if wq.per_channel and w_step.shape[0] != n:
            if n % w_step.shape[0]:
                return None
            w_step = ops.repeat(w_step, n // w_step.shape[0])  # depthwise: channel = in * multiplier + m
        if wq.per_channel and tuple(bias.shape) != (n,):
            return None
        quantizer, amax = grid
        return quantizer.step(amax) * w_step

    @staticmethod
    def _bn_scale(bn):
        inv = ops.rsqrt(ops.cast(bn.moving_variance, "float32") + bn.epsilon)
        return inv * bn.gamma if bn.scale else inv

    @staticmethod
    def _bn_shift(bn, scale):
        """What `bn` adds after scaling by `scale`: `beta - moving_mean * scale`."""
        shift = -ops.cast(bn.moving_mean, "float32") * scale
        return shift + bn.beta if bn.center else shift

    def _folded_bias(self):
        bn, scale = self.batchnorm, self._bn_scale(self.batchnorm)
        bias = self._bn_shift(bn, scale)
        if getattr(self.layer, "bias", None) is not None:
            bias = bias + self.layer.bias * scale
        return ops.cast(bias, self.layer.compute_dtype)

    def weight_value(self, attr: str):
        """The float weight the layer computes with: folded with the BatchNorm if there is one.

        For a wrapped BatchNormalization: its scale as a 1x1 depthwise kernel.
        """
        if self._standalone_bn:
            scale = ops.cast(self._bn_scale(self.layer), self.layer.compute_dtype)
            return ops.reshape(scale, (1,) * self._spatial_rank + (-1, 1))
        w = ops.cast(getattr(self.layer, attr), self.layer.compute_dtype)
        if self.batchnorm is None or attr != self._fold_attr:
            return w
        scale = ops.cast(self._bn_scale(self.batchnorm), w.dtype)
        if isinstance(self.layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
            # (..., in, multiplier): output channel = in * multiplier + m.
            scale = ops.reshape(scale, tuple(w.shape[-2:]))
        return w * scale

    def quantizer_ranges(self) -> list[dict]:
        """Every quantizer of this layer with its current range (numpy).

        Each entry: `label` (`input`, `input_1`, `weight`, `weight_<attr>`, `intermediate`, `gate`,
        `output`), `slot` (`("input", i)`, `("weight", attr)`,
        `("intermediate", 0)`, `("gate", 0)` or `("output", 0)`), `quantizer`, and `amax`.
        """
        rows = []
        n_inputs = sum(q is not None for q in self.input_quantizers)
        for i, q in enumerate(self.input_quantizers):
            if q is not None:
                label = "input" if n_inputs == 1 and i == 0 else f"input_{i}"
                rows.append(dict(label=label, slot=("input", i), quantizer=q, amax=np.asarray(self.input_amax[i])))
        for attr, q in self.weight_quantizers.items():
            amax = np.asarray(q.compute_amax(self.weight_value(attr)))
            rows.append(dict(label=_weight_label(attr, len(self.weight_quantizers)), slot=("weight", attr), quantizer=q, amax=amax))
        for kind in ("intermediate", "gate"):
            q = getattr(self, f"{kind}_quantizer")
            if q is not None:
                rows.append(dict(label=kind, slot=(kind, 0), quantizer=q, amax=np.asarray(getattr(self, f"{kind}_amax"))))
        if self.output_quantizer is not None:
            rows.append(dict(label="output", slot=("output", 0), quantizer=self.output_quantizer, amax=np.asarray(self.output_amax)))
        return rows

    def amax_variable(self, slot):
        """The variable that holds the range of an input or output slot."""
        kind, index = slot
        if kind == "input":
            return self.input_amax[index]
        if kind == "output":
            return self.output_amax
        if kind in ("intermediate", "gate"):
            return getattr(self, f"{kind}_amax")
        raise ValueError(f"Weight ranges are computed from the kernel and have no variable. Received slot={slot!r}")

    def get_config(self):
        config = super().get_config()
        config.update(
            input_quantizers=[None if q is None else keras.saving.serialize_keras_object(q) for q in self.input_quantizers],
            weight_quantizers={k: keras.saving.serialize_keras_object(q) for k, q in self.weight_quantizers.items()},
            output_quantizer=None if self.output_quantizer is None else keras.saving.serialize_keras_object(self.output_quantizer),
            batchnorm=None if self.batchnorm is None else keras.saving.serialize_keras_object(self.batchnorm),
            activation=None if self.activation is None else keras.saving.serialize_keras_object(self.activation),
            intermediate_quantizer=(
                None if self.intermediate_quantizer is None else keras.saving.serialize_keras_object(self.intermediate_quantizer)
            ),
            gate_quantizer=None if self.gate_quantizer is None else keras.saving.serialize_keras_object(self.gate_quantizer),
            quantize_bias=self.quantize_bias,
            output_on_input_grid=self.output_on_input_grid,
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(config.pop("layer"), custom_objects=custom_objects)
        return cls(layer, **config)


@keras.saving.register_keras_serializable(package="qat_plugin")
class Absorbed(keras.layers.Layer):
    """Stands where a BatchNorm or ReLU was before a `QuantizeWrapper` took it over: passes its input on.

    It keeps the absorbed layer's name, so `get_layer` and the graph's shape
    stay as the user built them.

    >>> tuple(Absorbed(name="bn")(np.ones((1, 2), "float32")).shape)
    (1, 2)
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def quantize_wrappers(model: keras.Model) -> list[QuantizeWrapper]:
    """Every `QuantizeWrapper` in `model`, nested models included, once each."""
    found, seen = [], set()

    def walk(layer):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if isinstance(layer, QuantizeWrapper):
            found.append(layer)
        for sub in getattr(layer, "layers", ()) or ():
            walk(sub)

    for layer in model.layers:
        walk(layer)
    return found
