"""What to quantize and where the Q/DQ nodes go: small frozen, validated configs.

`QuantizationSpec` says *which* layers are quantized and how (bits,
per-channel, calibrator); `PlacementPolicy` says *where* quantizers sit for the
runtime the model ships to. Both are validated when built, so a mistake fails
before any training time is spent, and both serialize to JSON.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import keras

from qat_plugin.errors import SpecError
from qat_plugin.quantizers import check_bits

CALIBRATORS = ("max", "percentile", "mse")


def _as_tuple(value, what: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, type)):
        return (value,)
    if isinstance(value, Iterable):
        return tuple(value)
    raise SpecError(f"`{what}` must be a string, a class or a list of them. Received: {what}={value!r}")


def _class_names(value, what: str) -> tuple[str, ...]:
    names = []
    for item in _as_tuple(value, what):
        if isinstance(item, type):
            names.append(item.__name__)
        elif isinstance(item, str):
            names.append(item)
        else:
            raise SpecError(f"`{what}` entries must be layer classes or class names. Received: {item!r}")
    return tuple(names)


_TYPE_FIELD = {"layers": "layer_types", "exclude": "exclude_types"}


def _patterns(value, what: str) -> tuple[str, ...]:
    out = _as_tuple(value, what)
    for item in out:
        if not isinstance(item, str):
            raise SpecError(
                f"`{what}` entries must be layer names or regular expressions (strings); "
                f"select by class with `{_TYPE_FIELD.get(what, 'layer_types')}`. "
                f"Received: {item!r}"
            )
        try:
            re.compile(item)
        except re.error as e:
            raise SpecError(f"`{what}` entry {item!r} is not a valid regular expression: {e}") from None
    return out


def name_matches(pattern: str, name: str) -> bool:
    """Exact name, or a regular expression that matches the whole name."""
    return pattern == name or re.fullmatch(pattern, name) is not None


def class_matches(class_names: Iterable[str], layer) -> bool:
    """True if the layer's class or one of its base classes has one of the names."""
    mro = {c.__name__ for c in type(layer).__mro__}
    return any(n in mro for n in class_names)


@dataclasses.dataclass(frozen=True)
class LayerOverride:
    """Per-layer exceptions to the spec's defaults.

    Args:
        weight_bits: bits for this layer's weights.
        activation_bits: bits for this layer's inputs.
        per_channel: per-channel (True) or per-tensor (False) weights.
        inputs: which inputs of a multi-input layer (Add, Concatenate) get a
            quantizer, by position; `()` quantizes none of them.

    Example:

    >>> LayerOverride(weight_bits=4).weight_bits
    4
    """

    weight_bits: int | None = None
    activation_bits: int | None = None
    per_channel: bool | None = None
    inputs: tuple[int, ...] | None = None

    def __post_init__(self):
        for field in ("weight_bits", "activation_bits"):
            value = getattr(self, field)
            if value is not None:
                try:
                    check_bits(value, field)
                except ValueError as e:
                    raise SpecError(str(e)) from None
        if self.per_channel is not None and not isinstance(self.per_channel, bool):
            raise SpecError(f"`per_channel` must be True, False or None. Received: per_channel={self.per_channel!r}")
        if self.inputs is not None:
            inputs = tuple(self.inputs)
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in inputs):
                raise SpecError(f"`inputs` must be input positions (ints >= 0). Received: inputs={self.inputs!r}")
            object.__setattr__(self, "inputs", inputs)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class QuantizationSpec:
    """Which layers to quantize, and how.

    The default quantizes every supported layer (full mode) with int8
    per-channel weights and int8 per-tensor activations, calibrated with
    `max`. Partial mode: name layers (exact names or regular expressions that
    match whole names) or classes in `layers`/`layer_types`, or leave some in
    FP32 with `exclude`/`exclude_types`.

    Args:
        layers: names or regexes of the layers to quantize; `None` (with no
            `layer_types`) means every supported layer.
        layer_types: layer classes (or class names) to quantize.
        exclude: names or regexes of layers that stay FP32.
        exclude_types: classes (or class names) that stay FP32.
        weight_bits: default weight bits (4 to 8).
        activation_bits: default activation bits (4 to 8).
        per_channel: per-channel weight ranges (on each kind's output axis).
        calibrator: `"max"`, `"percentile"` or `"mse"`.
        percentile: the percentile used by the `"percentile"` calibrator.
        calibration_batches: how many batches calibration reads.
        overrides: `{name or regex: LayerOverride}` per-layer exceptions.
        patterns: hooks called as `hook(model, spec)`; each returns layer
            names (quantize their inputs) or `(name, input_positions)` pairs.
            Like NVIDIA's `CustomQDQInsertionCase`. To save the spec as JSON,
            register hooks with `keras.saving.register_keras_serializable`.
        filters: a callable `layer -> bool` that must also accept a layer
            (Keras's `model.quantize(filters=...)` convention); not saved to JSON.

    Example:

    >>> spec = QuantizationSpec(exclude=["dense_out"], calibrator="percentile")
    >>> QuantizationSpec.from_json(spec.to_json()) == spec
    True
    """

    layers: tuple[str, ...] | None = None
    layer_types: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    exclude_types: tuple[str, ...] = ()
    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True
    calibrator: str = "max"
    percentile: float = 99.99
    calibration_batches: int = 8
    overrides: Mapping[str, LayerOverride] = dataclasses.field(default_factory=dict)
    patterns: tuple[Callable, ...] = ()
    filters: Callable | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.layers is not None:
            set_("layers", _patterns(self.layers, "layers"))
        set_("exclude", _patterns(self.exclude, "exclude"))
        set_("layer_types", _class_names(self.layer_types, "layer_types"))
        set_("exclude_types", _class_names(self.exclude_types, "exclude_types"))
        for field in ("weight_bits", "activation_bits"):
            try:
                check_bits(getattr(self, field), field)
            except ValueError as e:
                raise SpecError(str(e)) from None
        if not isinstance(self.per_channel, bool):
            raise SpecError(f"`per_channel` must be True or False. Received: per_channel={self.per_channel!r}")
        if self.calibrator not in CALIBRATORS:
            raise SpecError(f"`calibrator` must be one of {CALIBRATORS}. Received: calibrator={self.calibrator!r}")
        if not (isinstance(self.percentile, (int, float)) and 50.0 < self.percentile <= 100.0):
            raise SpecError(f"`percentile` must be in (50, 100]. Received: percentile={self.percentile!r}")
        if isinstance(self.calibration_batches, bool) or not isinstance(self.calibration_batches, int) or self.calibration_batches < 1:
            raise SpecError(f"`calibration_batches` must be an int >= 1. Received: {self.calibration_batches!r}")
        if not isinstance(self.overrides, Mapping):
            raise SpecError(f"`overrides` must be a dict of name -> LayerOverride. Received: {self.overrides!r}")
        overrides = {}
        for key, value in self.overrides.items():
            _patterns(key, "overrides")
            if isinstance(value, Mapping):
                value = LayerOverride(**value)
            if not isinstance(value, LayerOverride):
                raise SpecError(f"`overrides[{key!r}]` must be a LayerOverride or a dict. Received: {value!r}")
            overrides[key] = value
        set_("overrides", overrides)
        patterns = tuple(self.patterns) if isinstance(self.patterns, Iterable) else (self.patterns,)
        if not all(callable(p) for p in patterns):
            raise SpecError(f"`patterns` must be callables `hook(model, spec)`. Received: {self.patterns!r}")
        set_("patterns", patterns)
        if self.filters is not None and not callable(self.filters):
            raise SpecError(f"`filters` must be a callable `layer -> bool`. Received: filters={self.filters!r}")

    @property
    def partial(self) -> bool:
        """True when the spec selects or excludes layers, rather than all."""
        return bool(self.layers is not None or self.layer_types or self.exclude or self.exclude_types or self.filters)

    def override_for(self, name: str) -> LayerOverride:
        """The override that applies to `name` (exact name first, then the first regex)."""
        if name in self.overrides:
            return self.overrides[name]
        for key, value in self.overrides.items():
            if name_matches(key, name):
                return value
        return LayerOverride()

    def replace(self, **changes) -> QuantizationSpec:
        """A copy with some fields changed (validated again).

        >>> QuantizationSpec().replace(weight_bits=4).weight_bits
        4
        """
        return dataclasses.replace(self, **changes)

    def get_config(self) -> dict:
        if self.filters is not None:
            raise SpecError(
                "A spec with a `filters` callable can't be serialized. "
                "Select the layers with `layers`/`layer_types` (names, regexes, classes) instead."
            )
        hooks = []
        for hook in self.patterns:
            name = keras.saving.get_registered_name(hook)
            if keras.saving.get_registered_object(name) is not hook:
                raise SpecError(
                    f"Pattern hook {hook!r} can't be serialized: decorate it with "
                    "`@keras.saving.register_keras_serializable()` so the spec can name it."
                )
            hooks.append(name)
        return {
            "layers": None if self.layers is None else list(self.layers),
            "layer_types": list(self.layer_types),
            "exclude": list(self.exclude),
            "exclude_types": list(self.exclude_types),
            "weight_bits": self.weight_bits,
            "activation_bits": self.activation_bits,
            "per_channel": self.per_channel,
            "calibrator": self.calibrator,
            "percentile": self.percentile,
            "calibration_batches": self.calibration_batches,
            "overrides": {k: v.to_dict() for k, v in self.overrides.items()},
            "patterns": hooks,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> QuantizationSpec:
        config = dict(config)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise SpecError(f"Unknown QuantizationSpec keys {unknown}. Allowed keys: {sorted(known - {'filters'})}")
        hooks = []
        for name in config.get("patterns", ()):
            hook = keras.saving.get_registered_object(name)
            if hook is None:
                raise SpecError(
                    f"Pattern hook {name!r} is not registered in this process: import the module that "
                    "defines it (decorated with `@keras.saving.register_keras_serializable()`) first."
                )
            hooks.append(hook)
        config["patterns"] = tuple(hooks)
        config["overrides"] = {k: LayerOverride(**v) for k, v in config.get("overrides", {}).items()}
        return cls(**config)

    def to_json(self, **kwargs) -> str:
        """The spec as JSON; `QuantizationSpec.from_json` reads it back."""
        return json.dumps(self.get_config(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> QuantizationSpec:
        """Read a spec from JSON text, or from a path to a `.json` file."""
        if not text.lstrip().startswith("{"):
            with open(text) as f:
                text = f.read()
        return cls.from_config(json.loads(text))


RUNTIMES = ("tensorrt", "onnxruntime", "tflite")


@dataclasses.dataclass(frozen=True)
class PlacementPolicy:
    """Where quantizers go, for the runtime the model will ship to.

    Args:
        name: the policy's name.
        quantize_inputs: put a quantizer on the inputs of quantized layers.
        quantize_weights: quantize the weights of weighted layers.
        quantize_outputs: put a quantizer on the outputs of quantized layers.
        residual_add: for an `Add` whose inputs come from quantized weighted
            layers: `"one_unquantized"` leaves one such input in high
            precision so TensorRT fuses the add into that conv (NVIDIA's
            recipe); `"all"` quantizes every input.
        fold_batchnorm: a `BatchNormalization` right after a conv (its only
            consumer) is folded into it during QAT: the folded kernel is what
            gets fake-quantized, with the BatchNorm's moving statistics
            (frozen from the switch on), so the exported file computes
            exactly what was trained.
        standalone_batchnorm: a `BatchNormalization` no conv takes in (after
            a concat or an add: DenseNet, pre-activation ResNets) is
            quantized on its own, as a 1x1 depthwise conv with its moving
            statistics (frozen from the switch on, like a folded one): with
            the ReLU after it, integer runtimes run it as one integer
            kernel, where a float scale and shift cost a dequantize, two
            float ops and a requantize (and, in onnxruntime, layout
            transposes around them).
        quantize_elementwise: `Activation` layers computing hard swish, swish
            or sigmoid, and two-input `Multiply` layers (squeeze-and-excite),
            get quantizers of their own: an output, and for the swishes a
            grid between their two halves (the gate, `relu6(x + 3)` or
            `sigmoid(x)`); a conv or dense layer whose own activation is one
            of these gets a grid before it too. Integer runtimes then run
            them as integer ops (onnxruntime: QLinearAdd, QLinearSigmoid,
            QLinearMul), where a float activation costs a dequantize, three
            or four float ops and a requantize on a whole feature map
            (MobileNetV3, EfficientNet), and a conv with its own swish ran
            in float.
        fuse_activations: a ReLU right after a quantized layer moves into its
            wrapper, so the output quantizer sits after it (unsigned: a
            ReLU's output is never negative). Integer runtimes then drop the
            ReLU into the int8 kernel.
        reuse_output_ranges: an input that its producer's output quantizer
            already quantized is not quantized again (one Q/DQ per tensor).
        quantize_bias: biases are rounded, during QAT, to the int32 grid
            integer kernels add them on (input scale x weight scale), so
            the Keras model computes what the exported file does (see
            `QuantizeWrapper`).
        average_pools_on_input_grid: an average pool's output goes back onto
            its input's grid instead of a grid of its own, since TFLite's
            int8 AVERAGE_POOL_2D takes one scale for both (see
            `QuantizeWrapper`'s `output_on_input_grid`).
        standalone_relus: an `Activation` computing relu that no layer before
            it takes in (that layer's output has other readers: NASNet's
            cells) gets an unsigned output grid of its own, and its readers,
            also through zero padding, max pooling and cropping, read that
            grid. TFLite then runs it as an int8 RELU; without it, each
            reader calibrated a range of its own on the one tensor, and
            TFLite's converter, which wants one scale there, refused
            NASNetMobile.
        runtime: which exporter this placement is meant for:
            `"tensorrt"`, `"onnxruntime"` or `"tflite"`.

    Example:

    >>> get_policy("tensorrt").quantize_outputs
    False
    >>> get_policy("onnxruntime").fold_batchnorm, get_policy("onnxruntime").standalone_batchnorm
    (True, True)
    """

    name: str
    quantize_inputs: bool = True
    quantize_weights: bool = True
    quantize_outputs: bool = False
    residual_add: str = "one_unquantized"
    fold_batchnorm: bool = False
    standalone_batchnorm: bool = False
    quantize_elementwise: bool = False
    fuse_activations: bool = False
    reuse_output_ranges: bool = False
    quantize_bias: bool = False
    average_pools_on_input_grid: bool = False
    standalone_relus: bool = False
    runtime: str = "tensorrt"

    def __post_init__(self):
        if self.residual_add not in ("one_unquantized", "all"):
            raise SpecError(f"`residual_add` must be 'one_unquantized' or 'all'. Received: {self.residual_add!r}")
        if not (self.quantize_inputs or self.quantize_weights or self.quantize_outputs):
            raise SpecError("A placement policy must quantize inputs, weights or outputs; this one quantizes nothing.")
        if self.runtime not in RUNTIMES:
            raise SpecError(f"`runtime` must be one of {RUNTIMES}. Received: runtime={self.runtime!r}")
        if self.fuse_activations and not self.quantize_outputs:
            raise SpecError(
                "`fuse_activations=True` moves the output quantizer after the activation, so it needs "
                "`quantize_outputs=True`."
            )
        if self.standalone_batchnorm and not (self.quantize_weights and self.quantize_outputs):
            raise SpecError(
                "`standalone_batchnorm=True` quantizes a BatchNorm's scale and output, so it needs "
                "`quantize_weights=True` and `quantize_outputs=True`."
            )
        if self.quantize_elementwise and not self.quantize_outputs:
            raise SpecError(
                "`quantize_elementwise=True` gives activations and multiplies their own output grid, so it "
                "needs `quantize_outputs=True`."
            )
        if self.reuse_output_ranges and not self.quantize_outputs:
            raise SpecError("`reuse_output_ranges=True` reuses output quantizers, so it needs `quantize_outputs=True`.")
        if self.standalone_relus and not (self.quantize_outputs and self.reuse_output_ranges):
            raise SpecError(
                "`standalone_relus=True` gives a ReLU an output grid that its readers reuse, so it needs "
                "`quantize_outputs=True` and `reuse_output_ranges=True`."
            )
        if self.average_pools_on_input_grid and not self.quantize_outputs:
            raise SpecError(
                "`average_pools_on_input_grid=True` puts an average pool's output on a grid, so it needs "
                "`quantize_outputs=True`."
            )


# NVIDIA's TensorRT recipe: Q/DQ on the inputs and weights of conv/matmul
# layers, on the residual input of adds, and on pooling and concat inputs.
TENSORRT = PlacementPolicy(name="tensorrt")

# Integer kernels on CPUs (onnxruntime's QLinearConv/QGemm, TFLite's int8
# ops) read a quantized input and write a quantized output, with BatchNorm
# and ReLU folded in: every tensor between quantized layers is quantized once.
ONNXRUNTIME = PlacementPolicy(
    name="onnxruntime",
    quantize_outputs=True,
    residual_add="all",
    fold_batchnorm=True,
    standalone_batchnorm=True,
    quantize_elementwise=True,
    fuse_activations=True,
    reuse_output_ranges=True,
    quantize_bias=True,
    runtime="onnxruntime",
)
# TFMOT's placement (weights and outputs, BatchNorm folded, ReLU fused) is the
# same tensor-by-tensor scheme; the exporter differs, and TFLite's converter wants
# one scale per tensor: an int8 average pool keeps its input's (onnxruntime's
# QLinearAveragePool rescales), and a ReLU no conv takes in gets a grid of its own.
TFLITE = dataclasses.replace(
    ONNXRUNTIME, name="tflite", runtime="tflite", average_pools_on_input_grid=True, standalone_relus=True
)

POLICIES: dict[str, PlacementPolicy] = {p.name: p for p in (TENSORRT, ONNXRUNTIME, TFLITE)}


def get_policy(policy: str | PlacementPolicy) -> PlacementPolicy:
    """Look a policy up by name, or pass a `PlacementPolicy` through.

    >>> get_policy("tensorrt").name
    'tensorrt'
    """
    if isinstance(policy, PlacementPolicy):
        return policy
    if isinstance(policy, str) and policy in POLICIES:
        return POLICIES[policy]
    raise SpecError(f"Unknown placement policy {policy!r}. Available: {sorted(POLICIES)}, or a PlacementPolicy instance.")
