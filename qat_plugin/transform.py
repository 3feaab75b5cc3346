"""`quantize_model`: clone a Keras model and wrap the layers a spec selects.

Planning (which layers, which inputs, which bits) is done on the original
model first and checked in full, so every mistake in a spec is reported before
anything is built. The clone then swaps each selected layer for a
`QuantizeWrapper`; nested Functional/Sequential models are cloned recursively
and shared layers stay shared.
"""

from __future__ import annotations

import dataclasses
import difflib

import keras

from qat_plugin.calibration import calibrate
from qat_plugin.config import (
    PlacementPolicy,
    QuantizationSpec,
    class_matches,
    get_policy,
    name_matches,
)
from qat_plugin.errors import AlreadyQuantizedError, SpecError, UnsupportedModelError
from qat_plugin.quantizers import TensorQuantizer, sigmoid_amax
from qat_plugin.wrappers import (
    CROPPINGS,
    ON_GRID_LAYERS,
    SEPARABLE_CONVS,
    Absorbed,
    GATED_ACTIVATIONS,
    QuantizeWrapper,
    activation_name,
    elementwise_problem,
    foldable_attr,
    is_relu,
    layer_kind,
    quantize_wrappers,
    standalone_batchnorm_problem,
    supported_types,
)

# Layers between a conv and an add that TensorRT fuses through.
_FUSE_THROUGH = ("BatchNormalization", "Activation", "ReLU")


@dataclasses.dataclass(frozen=True)
class LayerDecision:
    """What the transform did with one layer, and why."""

    name: str
    class_name: str
    quantized: bool
    reason: str


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
    """Every layer the transform looked at: quantized or kept in FP32, with the reason.

    >>> report = QuantizationReport((LayerDecision("d", "Dense", True, "selected"),))
    >>> report.quantized
    ['d']
    """

    layers: tuple[LayerDecision, ...]

    @property
    def quantized(self) -> list[str]:
        return [d.name for d in self.layers if d.quantized]

    @property
    def skipped(self) -> dict[str, str]:
        return {d.name: d.reason for d in self.layers if not d.quantized}


def _is_graph_model(model) -> bool:
    from keras.src.models.functional import Functional

    return isinstance(model, (Functional, keras.Sequential))


def check_model(model) -> None:
    """Raise a clear error if `model` can't be cloned and wrapped."""
    if keras.backend.backend() != "tensorflow":
        raise UnsupportedModelError(
            f"qat-plugin needs the TensorFlow backend; this process uses {keras.backend.backend()!r}. "
            "Set KERAS_BACKEND=tensorflow before importing keras."
        )
    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(f"Expected a keras.Model. Received: {type(model).__name__}")
    if not _is_graph_model(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} is a subclassed model: its layer graph is hidden in Python code, so it "
            "can't be cloned and wrapped. Build it as a Functional or Sequential model (a subclassed "
            "model used as a layer inside one is kept in FP32), or wrap its layers yourself with QuantizeWrapper."
        )
    if isinstance(model, keras.Sequential) and not model.built:
        raise UnsupportedModelError(
            "This Sequential model is not built: give it a `keras.Input(shape)` first layer, "
            "or call it once on data, then quantize it."
        )
    if quantize_wrappers(model):
        raise AlreadyQuantizedError(
            f"Model {model.name!r} is already quantized (it holds QuantizeWrapper layers). "
            "Quantize the original FP32 model instead, or use this one as it is."
        )


def _all_layers(model) -> list:
    """Every leaf layer of `model` in graph order, descending into nested models, once each."""
    out, seen = [], set()

    def walk(m):
        for layer in m.layers:
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            if _is_graph_model(layer):
                walk(layer)
            elif not isinstance(layer, keras.layers.InputLayer):
                out.append(layer)

    walk(model)
    return out


def _num_inputs(layer) -> int:
    if not layer._inbound_nodes:
        return 1
    return len(layer._inbound_nodes[0].input_tensors)


def _producer(tensor):
    """The layer that made `tensor`, looking through BatchNorm/activations."""
    while True:
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            return None
        op = history.operation
        if not class_matches(_FUSE_THROUGH, op):
            return op
        inputs = op._inbound_nodes[history.node_index].input_tensors
        if not inputs:
            return op
        tensor = inputs[0]


def _residual_inputs(layer, weighted_ids: set[int], policy: PlacementPolicy) -> tuple[int, ...]:
    """Which inputs of an add to quantize (TensorRT's residual recipe).

    TensorRT fuses an add into the conv that produces one of its inputs, so
    that input stays high-precision and the others (the residual) are
    quantized. With no conv input, every input is quantized.
    """
    n = _num_inputs(layer)
    if policy.residual_add == "all" or not layer._inbound_nodes:
        return tuple(range(n))
    tensors = layer._inbound_nodes[0].input_tensors
    fusible = [i for i, t in enumerate(tensors) if id(_producer(t)) in weighted_ids]
    if not fusible:
        return tuple(range(n))
    keep_float = fusible[-1]
    return tuple(i for i in range(n) if i != keep_float)


def _sole_consumer(layer, model_outputs: set[int]):
    """The one layer that reads `layer`'s one output, if exactly one does and it isn't a model output."""
    if len(layer._inbound_nodes) != 1 or len(layer._outbound_nodes) != 1:
        return None  # shared layers and forks keep their own tensors
    outputs = layer._inbound_nodes[0].output_tensors
    if len(outputs) != 1 or id(outputs[0]) in model_outputs:
        return None
    consumer = layer._outbound_nodes[0].operation
    if len(consumer._inbound_nodes) != 1 or len(consumer._inbound_nodes[0].input_tensors) != 1:
        return None
    return consumer


def _model_outputs(model) -> set[int]:
    ids = set()

    def walk(m):
        ids.update(id(t) for t in m.outputs)
        for layer in m.layers:
            if _is_graph_model(layer):
                walk(layer)

    walk(model)
    return ids


def _absorbed(layer, policy: PlacementPolicy, model_outputs: set[int]) -> dict:
    """The BatchNorm and ReLU right after `layer` that its wrapper takes over."""
    found, tail = {}, layer
    nxt = _sole_consumer(tail, model_outputs)
    if (
        policy.fold_batchnorm
        and isinstance(nxt, keras.layers.BatchNormalization)
        and foldable_attr(layer) is not None
        and nxt.axis in (-1, len(nxt._inbound_nodes[0].input_tensors[0].shape) - 1)
    ):
        found["batchnorm"], tail = nxt, nxt
        nxt = _sole_consumer(tail, model_outputs)
    if policy.fuse_activations and is_relu(nxt) and isinstance(nxt, (keras.layers.ReLU, keras.layers.Activation)):
        found["activation"] = nxt
    return found


# The pools `PlacementPolicy.average_pools_on_input_grid` is about (a global one is TFLite's MEAN, which rescales).
AVERAGE_POOLS = (keras.layers.AveragePooling1D, keras.layers.AveragePooling2D, keras.layers.AveragePooling3D)
# Zero padding and max pooling (`ON_GRID_LAYERS`) need no Q/DQ of their own:
# onnxruntime folds the padding into its integer conv's own, and runs the
# pooling on the producer's uint8 (a second quantizer there, signed where the
# producer's is a ReLU's unsigned one, made ResNet50's stem dequantize, pad
# and requantize 26 M values in float per batch).


def _owner(tensor, owners: dict[int, object], policy: PlacementPolicy):
    """The wrapped layer whose output (after what it absorbed, then zero padding or max pooling, and under
    `policy.standalone_relus` cropping) is `tensor`."""
    through = (*ON_GRID_LAYERS, *CROPPINGS) if policy.standalone_relus else ON_GRID_LAYERS
    while True:
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            return None
        op = history.operation
        if id(op) in owners or not isinstance(op, through):
            return owners.get(id(op))
        tensor = op._inbound_nodes[history.node_index].input_tensors[0]


def _never_negative(tensor) -> bool:
    """Whether `tensor` is a ReLU's output, or that times a positive number (`relu6(x + 3) * (1 / 6)`).

    Zero padding, max pooling and cropping in between keep it so: NASNet pads and crops a ReLU's output, and
    a signed grid there, beside the unsigned one on the ReLU's other reader, made TFLite's converter refuse it.
    """
    while True:
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            return False
        op = history.operation
        if is_relu(op):
            return True
        if isinstance(op, (*ON_GRID_LAYERS, *CROPPINGS)):
            tensor = op._inbound_nodes[history.node_index].input_tensors[0]
            continue
        if type(op).__name__ not in ("Multiply", "Divide", "TrueDivide") or isinstance(op, keras.layers.Layer):
            return False
        args = op._inbound_nodes[history.node_index].arguments.args
        if len(args) != 2 or not isinstance(args[1], (int, float)) or args[1] <= 0:
            return False
        tensor = args[0]


def _check_names(spec: QuantizationSpec, layers: list) -> None:
    names = [layer.name for layer in layers]
    groups = [("layers", spec.layers or ()), ("exclude", spec.exclude), ("overrides", tuple(spec.overrides))]
    for field, patterns in groups:
        for pattern in patterns:
            if not any(name_matches(pattern, n) for n in names):
                close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
                hint = f" Close matches: {close}." if close else f" Layers in the model: {names[:20]}{'...' if len(names) > 20 else ''}."
                raise SpecError(f"`{field}` entry {pattern!r} matches no layer of the model.{hint}")
    known = set(dir(keras.layers)) | set(supported_types()) | {c.__name__ for l in layers for c in type(l).__mro__}
    for field, classes in (("layer_types", spec.layer_types), ("exclude_types", spec.exclude_types)):
        for cls in classes:
            if cls not in known:
                close = difflib.get_close_matches(cls, sorted(known), n=5, cutoff=0.6)
                raise SpecError(f"`{field}` entry {cls!r} is not a Keras layer class.{' Did you mean ' + str(close) + '?' if close else ''}")


def _batchnorm_problem(layer, policy: PlacementPolicy) -> str | None:
    """Why a BatchNormalization no conv folds stays in float under `policy`; None if it is quantized."""
    if not policy.standalone_batchnorm:
        return f"policy {policy.name!r} leaves a BatchNormalization that no conv folds in float"
    if len(layer._inbound_nodes) != 1:
        return "a shared BatchNormalization stays in float"
    tensor = layer._inbound_nodes[0].input_tensors[0]
    history = getattr(tensor, "_keras_history", None)
    producer = None if history is None else history.operation
    folds = policy.fold_batchnorm and producer is not None and foldable_attr(producer) is not None
    if folds and len(producer._inbound_nodes) == 1 and len(producer._outbound_nodes) == 1:
        # Kept out of a partial quantization with its conv: a float conv, then an integer BatchNorm, helps no runtime.
        return f"it follows {producer.name!r}, and folds into it where that is quantized"
    problem = standalone_batchnorm_problem(layer, tensor.shape)
    return None if problem is None else f"it {problem}"


def _elementwise_problem(layer, policy: PlacementPolicy) -> str | None:
    """Why an Activation or Multiply layer stays in float under `policy`; None if it is quantized."""
    what = type(layer).__name__
    if not policy.quantize_elementwise:
        return f"policy {policy.name!r} leaves {what} layers in float"
    if len(layer._inbound_nodes) != 1:
        return f"a shared {what} layer stays in float"
    problem = elementwise_problem(layer, _num_inputs(layer), relus=policy.standalone_relus)
    return None if problem is None else f"it {problem}"


def _activation_split(layer) -> bool:
    """Whether a weighted layer's own activation is one that runs as integer ops after the layer."""
    return not isinstance(layer, SEPARABLE_CONVS) and activation_name(layer) in GATED_ACTIVATIONS


def _gate_quantized(layer, policy: PlacementPolicy) -> bool:
    """Whether a swish (an Activation's, or a conv's own) gets a grid on its gate: onnxruntime runs its halves as two integer ops.

    TFLite's converter fuses a hard swish with none into its own int8
    HARD_SWISH op, and leaves the product in float with one.
    """
    if not policy.quantize_elementwise:
        return False
    if not isinstance(layer, keras.layers.Activation) and not (layer_kind(layer).weights and _activation_split(layer)):
        return False
    name = activation_name(layer)
    return bool(GATED_ACTIVATIONS.get(name)) and not (name == "hard_silu" and policy.runtime == "tflite")


def _policy_problem(layer, policy: PlacementPolicy) -> str | None:
    """Why `policy` keeps a layer of a kind it quantizes only in some places in float; None otherwise."""
    if isinstance(layer, keras.layers.BatchNormalization):
        return _batchnorm_problem(layer, policy)
    if isinstance(layer, (keras.layers.Activation, keras.layers.Multiply)):
        return _elementwise_problem(layer, policy)
    return None


_POLICY_HINT = {
    "BatchNormalization": (
        "A BatchNorm right after a conv folds into it under the 'onnxruntime' and 'tflite' policies; one after a "
        "concat or an add is quantized on its own there (`PlacementPolicy.standalone_batchnorm`)."
    ),
    "Activation": (
        f"Activations {sorted(GATED_ACTIVATIONS)} and two-input multiplies are quantized under the 'onnxruntime' "
        "and 'tflite' policies (`PlacementPolicy.quantize_elementwise`); a ReLU fuses into the layer before it."
    ),
}
_POLICY_HINT["Multiply"] = _POLICY_HINT["Activation"]


def _named_by_spec(layer, spec: QuantizationSpec) -> bool:
    """Whether the spec picks `layer` out by name (`layers`) or class (`layer_types`)."""
    named = spec.layers is not None and any(name_matches(p, layer.name) for p in spec.layers)
    return named or class_matches(spec.layer_types, layer)


def _selected(layer, spec: QuantizationSpec, policy: PlacementPolicy) -> tuple[bool, str]:
    name = layer.name
    if any(name_matches(p, name) for p in spec.exclude) or class_matches(spec.exclude_types, layer):
        return False, "excluded by the spec"
    if spec.filters is not None and not spec.filters(layer):
        return False, "rejected by `filters`"
    problem = _policy_problem(layer, policy)
    if spec.layers is None and not spec.layer_types:
        if layer_kind(layer) is None:
            return False, "not a quantizable kind"
        return (True, "selected") if problem is None else (False, problem)
    if _named_by_spec(layer, spec):
        if layer_kind(layer) is None:
            raise SpecError(
                f"Layer {name!r} ({type(layer).__name__}) is selected by the spec but is not a kind qat-plugin "
                f"quantizes (supported: {supported_types()}). Quantize its inputs with a pattern hook, "
                "or teach qat-plugin the kind with `qat_plugin.register_layer`."
            )
        if problem is not None:
            kind = next(k for k in _POLICY_HINT if class_matches((k,), layer))
            raise SpecError(f"Layer {name!r} ({kind}) is selected by the spec, but {problem}. {_POLICY_HINT[kind]}")
        return True, "selected"
    return False, "not selected by the spec"


def _hook_inputs(model, spec: QuantizationSpec, by_name: dict) -> dict[str, tuple[int, ...] | None]:
    extra: dict[str, tuple[int, ...] | None] = {}
    for hook in spec.patterns:
        for item in hook(model, spec) or ():
            name, positions = (item, None) if isinstance(item, str) else (item[0], tuple(item[1]))
            if name not in by_name:
                close = difflib.get_close_matches(name, list(by_name), n=5, cutoff=0.5)
                raise SpecError(f"Pattern hook {getattr(hook, '__name__', hook)!r} returned {name!r}, which is not a layer of the model. Close matches: {close}.")
            extra[name] = positions
    return extra


def plan_quantization(model: keras.Model, spec: QuantizationSpec, policy: PlacementPolicy):
    """Decide, for every layer, which quantizers it gets.

    Returns `(plan, report)`: `plan` maps `id(layer)` to the keyword
    arguments of its `QuantizeWrapper`, and the id of every layer a wrapper
    absorbs (a folded BatchNorm, a fused ReLU) to `None`.
    """
    layers = _all_layers(model)
    _check_names(spec, layers)
    by_name = {layer.name: layer for layer in layers}
    extra = _hook_inputs(model, spec, by_name)
    selection = {id(l): _selected(l, spec, policy) for l in layers}
    weighted = {id(l) for l in layers if selection[id(l)][0] and layer_kind(l).weights and policy.quantize_weights}

    # First pass: what each chosen layer absorbs, so the second knows which
    # tensors are already quantized by their producer's output quantizer.
    outputs = _model_outputs(model)
    absorbed: dict[int, dict] = {}
    absorbed_by: dict[int, str] = {}
    for layer in layers:
        if id(layer) in absorbed_by:  # a BatchNorm a conv folds: the conv's wrapper also takes its ReLU
            continue
        if selection[id(layer)][0] and layer_kind(layer) is not None and policy.quantize_outputs:
            # Folding wins over quantizing a BatchNorm on its own, and fusing over a standalone ReLU's own
            # grid; a ReLU the spec selects by name or type keeps its own wrapper.
            found = {
                k: v for k, v in _absorbed(layer, policy, outputs).items()
                if k == "batchnorm" or not selection.get(id(v), (False,))[0]
                or (policy.standalone_relus and not _named_by_spec(v, spec))
            }
            absorbed[id(layer)] = found
            absorbed_by.update({id(v): layer.name for v in found.values()})
    # Which layer's (absorbed) output is quantized: the last absorbed layer, or the layer itself.
    quantized_tail = {}
    for layer in layers:
        if id(layer) in absorbed:
            found = absorbed[id(layer)]
            tail = found.get("activation") or found.get("batchnorm") or layer
            quantized_tail[id(tail)] = layer

    plan, decisions = {}, []
    for layer in layers:
        if id(layer) in absorbed_by:
            owner = absorbed_by[id(layer)]
            verb = "folded into" if isinstance(layer, keras.layers.BatchNormalization) else "fused into"
            plan[id(layer)] = None
            decisions.append(LayerDecision(layer.name, type(layer).__name__, False, f"{verb} {owner!r}"))
            continue
        chosen, reason = selection[id(layer)]
        kind = layer_kind(layer) if chosen else None
        override = spec.override_for(layer.name)
        a_bits = override.activation_bits or spec.activation_bits
        w_bits = override.weight_bits or spec.weight_bits
        per_channel = spec.per_channel if override.per_channel is None else override.per_channel
        inputs: tuple[int, ...] = ()
        weights = {}
        if kind is not None:
            if policy.quantize_inputs:
                rule = kind.inputs
                n = _num_inputs(layer)
                inputs = (0,) if rule == "first" else tuple(range(n)) if rule == "all" else _residual_inputs(layer, weighted, policy)
            if policy.quantize_weights:
                weights = {attr: TensorQuantizer(w_bits, axis if per_channel else None) for attr, axis in kind.weights}
        if layer.name in extra:
            inputs = tuple(sorted(set(inputs) | set(extra[layer.name] if extra[layer.name] is not None else range(_num_inputs(layer)))))
            chosen, reason = True, "selected by a pattern hook"
        if chosen and override.inputs is not None:
            inputs = override.inputs
        if chosen and inputs and max(inputs) >= _num_inputs(layer):
            raise SpecError(f"Layer {layer.name!r} has {_num_inputs(layer)} input(s); the spec asks to quantize input(s) {inputs}.")
        if chosen and policy.reuse_output_ranges and inputs and override.inputs is None and layer._inbound_nodes:
            tensors = layer._inbound_nodes[0].input_tensors
            inputs = tuple(i for i in inputs if _owner(tensors[i], quantized_tail, policy) is None)
        fused = absorbed.get(id(layer), {})
        last = fused.get("activation") or layer
        sigmoid = activation_name(last) == "sigmoid"
        output = (
            TensorQuantizer(a_bits, unsigned=is_relu(last) or sigmoid, fixed_amax=sigmoid_amax(a_bits) if sigmoid else None)
            if chosen and policy.quantize_outputs else None
        )
        on_input_grid = False
        if output is not None and policy.average_pools_on_input_grid and isinstance(layer, AVERAGE_POOLS):
            tensors = layer._inbound_nodes[0].input_tensors if layer._inbound_nodes else []
            # Only where the input is on a grid: its own quantizer, or its producer's output one.
            if inputs or (tensors and _owner(tensors[0], quantized_tail, policy) is not None):
                output, on_input_grid = None, True
        if chosen and not (inputs or weights or output or on_input_grid):
            chosen, reason = False, "no quantizer left after the spec's overrides"
        if chosen:
            # Unsigned where the input is never negative: its grid's floor is then a ReLU's clip.
            tensors = layer._inbound_nodes[0].input_tensors if layer._inbound_nodes else []
            slots = [
                TensorQuantizer(a_bits, unsigned=policy.quantize_elementwise and i < len(tensors) and _never_negative(tensors[i]))
                if i in inputs else None
                for i in range(max(inputs) + 1)
            ] if inputs else []
            plan[id(layer)] = dict(input_quantizers=slots, weight_quantizers=weights, output_quantizer=output, **fused)
            if on_input_grid:
                plan[id(layer)]["output_on_input_grid"] = True
            if policy.quantize_bias and weights:
                plan[id(layer)]["quantize_bias"] = True
            if policy.quantize_outputs and weights and isinstance(layer, SEPARABLE_CONVS):
                # Integer runtimes run the two halves as two convs: the tensor between them needs a grid too.
                plan[id(layer)]["intermediate_quantizer"] = TensorQuantizer(a_bits)
            if policy.quantize_elementwise and weights and _activation_split(layer):
                # The layer's own swish or sigmoid runs after a grid on its linear output, as an integer op.
                plan[id(layer)]["intermediate_quantizer"] = TensorQuantizer(a_bits)
            if _gate_quantized(layer, policy):
                # The gate (relu6(x + 3), sigmoid(x)) is never negative; a sigmoid's grid is fixed.
                fixed = sigmoid_amax(a_bits) if activation_name(layer) == "silu" else None
                plan[id(layer)]["gate_quantizer"] = TensorQuantizer(a_bits, unsigned=True, fixed_amax=fixed)
        decisions.append(LayerDecision(layer.name, type(layer).__name__, chosen, reason))
    if not plan:
        raise SpecError(
            f"The spec selects no quantizable layer in model {model.name!r}. Quantizable kinds: "
            f"{supported_types()}. Check `layers`/`layer_types`/`exclude` in the spec."
        )
    return plan, QuantizationReport(tuple(decisions))


def clone_and_wrap(model: keras.Model, plan: dict, *, share_weights: bool) -> keras.Model:
    """Clone `model`, wrapping the planned layers.

    With `share_weights=True` the clone reuses the original layer objects
    (and so their variables): the in-place switch inside `fit` needs that, so
    optimizer slots keep pointing at the same variables. Otherwise every layer
    is rebuilt from its config and its weights are copied.
    """
    copies = []

    def copy(layer):
        new = layer if share_weights else layer.__class__.from_config(layer.get_config())
        # Functional graphs also hold bare ops (`x + 3.0` in MobileNetV3's hard sigmoid): no weights to copy.
        if not share_weights and isinstance(layer, keras.layers.Layer):
            copies.append((layer, new))
        return new

    def clone_function(layer):
        if id(layer) in plan and plan[id(layer)] is None:
            # Absorbed by a wrapper: its place in the graph becomes a no-op.
            return Absorbed(name=layer.name)
        new = copy(layer)
        if id(layer) in plan:
            kwargs = dict(plan[id(layer)])
            for key in ("batchnorm", "activation"):
                if kwargs.get(key) is not None:
                    kwargs[key] = copy(kwargs[key])
            return QuantizeWrapper(new, **kwargs)
        return new

    qmodel = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    for original, new in copies:
        new.set_weights(original.get_weights())
    return qmodel


def quantize_model(
    model: keras.Model,
    spec: QuantizationSpec | None = None,
    policy: str | PlacementPolicy = "tensorrt",
    calibration_data=None,
) -> keras.Model:
    """Return a fake-quantized copy of `model`, ready for QAT or export.

    The copy's float weights equal the original's. If `calibration_data` is
    given, activation ranges are set from it with the spec's calibrator;
    otherwise call `qat_plugin.calibrate` before training or exporting.

    Args:
        model: a built Functional or Sequential model (nested models, shared
            layers and multiple inputs/outputs are fine).
        spec: a `QuantizationSpec`; default: every supported layer, int8.
        policy: where quantizers go: `"tensorrt"` or a `PlacementPolicy`.
        calibration_data: optional inputs to calibrate on (see `calibrate`).

    Returns:
        A new Keras model. `qmodel.qat_report` lists what was quantized and
        what was skipped, with reasons.

    Example:

    >>> import numpy as np, keras
    >>> model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv"),
    ...                           keras.layers.Flatten(), keras.layers.Dense(10, name="head")])
    >>> qmodel = quantize_model(model, calibration_data=np.random.rand(16, 8, 8, 1))
    >>> qmodel.qat_report.quantized
    ['conv', 'head']
    """
    spec = QuantizationSpec() if spec is None else spec
    if not isinstance(spec, QuantizationSpec):
        raise SpecError(f"`spec` must be a QuantizationSpec. Received: {type(spec).__name__}")
    policy = get_policy(policy)
    check_model(model)
    plan, report = plan_quantization(model, spec, policy)
    qmodel = clone_and_wrap(model, plan, share_weights=False)
    qmodel.qat_report = report
    if calibration_data is not None:
        calibrate(
            qmodel,
            calibration_data,
            method=spec.calibrator,
            percentile=spec.percentile,
            num_batches=spec.calibration_batches,
        )
    return qmodel
