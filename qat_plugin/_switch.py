"""Make a live Keras model run another graph, in place, even in the middle of `fit`.

`QATCallback` switches a model from FP32 to fake-quantized during training. The
quantized graph comes from `keras.models.clone_model(model, clone_function=...,
recursive=True)`, which reuses the model's own layer objects (selected ones inside
a `QuantizeWrapper`), so the trainable variables are shared. `swap_graph` moves
that graph onto the user's `model` object: afterwards `model.layers`, its
variables, `model(x)`, the running `fit`, `evaluate`, `predict`, `get_config` and
`model.save` all see the new graph, and the compiled loss, metrics and optimizer
state carry over.

This module relies on Keras internals, and is the only one in the package that
does. Tested with Keras 3.15 (TensorFlow backend, TF 2.21); other versions get a
warning. What it touches:

* `Function` graph attributes (`_inputs_struct`, `_outputs_struct`, `_inputs`,
  `_outputs`, `_nodes`, `_nodes_by_depth`, `_operations`, `_operations_by_depth`),
  or, for `Sequential`, `_layers` and `_functional`;
* the Keras `Tracker` "layers" store and TF's checkpoint dependencies
  (`_track_trackable`), so `weights`, `tf.train.Checkpoint` and saving agree;
* for nested models, `Node.operation`, `KerasTensor._keras_history`,
  `_inbound_nodes` and `_outbound_nodes`: the user's nested model objects stay in
  the graph (and run their clones' graphs) instead of the clones;
* the trainer's `train_function` (rebuilt; `fit` looks it up on every step),
  `test_function`, `predict_function`, `_compiled_trainable_state`, `jit_compile`
  (`output_names` is kept: the compiled losses and metrics are keyed by it);
* the optimizer's `_variables`, `_trainable_variables`,
  `_trainable_variables_indices` and the slot lists its `build()` fills;
* to find the training data for calibration, the running `fit` frame's
  `epoch_iterator` and its data adapter (`_inputs`, `_dataset`, `py_dataset`).

Each object's `__dict__` is snapshotted before its first change and no container
that existed before the swap is edited in place, so a failure part-way restores
the original model exactly.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import warnings
from typing import Any

import keras
import tensorflow as tf
from keras.src.models.functional import Functional
from keras.src.models.sequential import Sequential
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
from keras.src.ops.function import map_graph
from keras.src.ops.node import KerasHistory
from keras.src.optimizers.base_optimizer import BaseOptimizer
from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter
from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter
from keras.src.trainers.data_adapters.tf_dataset_adapter import TFDatasetAdapter
from keras.src.utils import tracking

from qat_plugin._journal import Journal
from qat_plugin._optimizer_state import realign
from qat_plugin.errors import QuantizationError, SwapError, UnsupportedModelError

TESTED_KERAS_VERSIONS = ("3.15",)
_FIT_CODE = inspect.unwrap(TensorFlowTrainer.fit).__code__

# `Function.__init__` sets the first four with attribute tracking off (plain
# objects) and the others with TF tracking on (checkpoint dependencies).
_UNTRACKED_GRAPH_ATTRS = ("_inputs_struct", "_outputs_struct", "_inputs", "_outputs")
_TRACKED_GRAPH_ATTRS = ("_nodes", "_nodes_by_depth", "_operations", "_operations_by_depth")


def swap_graph(model: keras.Model, new_model: keras.Model) -> None:
    """Make `model` run `new_model`'s graph, in place, keeping its training state.

    `new_model` must come from `keras.models.clone_model(model, ...,
    recursive=True)` with a clone function that returns each layer itself or a
    wrapper around it, so trainable variables are shared; under a
    `tf.distribute` strategy, clone inside `model.distribute_strategy.scope()`.
    Safe to call from a callback during `model.fit`: the running fit continues on
    the new graph. Nested Functional/Sequential models keep their identity: the
    user's nested objects adopt their clones' graphs. Do not use `new_model`
    afterwards; its graph now belongs to `model`.

    Raises:
        UnsupportedModelError: `model` is not a built Functional or Sequential
            model, or `new_model` is not of the same kind.
        ValueError: the inputs or outputs differ, or new variables were created
            outside the model's distribution strategy.
        SwapError: the swap failed part-way; `model` is unchanged.
    """
    _warn_if_untested_keras()
    _check_swappable(model, new_model)
    journal = Journal()
    try:
        _adopt_graph(model, new_model, journal)
        _refresh_trainer(model, journal)
        optimizer = getattr(model, "optimizer", None)
        if getattr(model, "compiled", False) and optimizer is not None:
            with _strategy_scope(model):
                realign(optimizer, list(model.trainable_weights), journal)
    except BaseException as exc:
        journal.rollback()  # Also on KeyboardInterrupt: never leave a half-switched model.
        if not isinstance(exc, Exception):
            raise
        raise SwapError(
            f"Switching model '{model.name}' to the new graph failed; the model was restored "
            f"unchanged. Cause: {type(exc).__name__}: {exc}"
        ) from exc


def rebuild_functions(model: keras.Model) -> None:
    """Retrace the step functions after a Python-level change, e.g. freezing layers.

    A running `fit` continues with the new train function. The optimizer is laid
    out for the new trainable variables as `_optimizer_state.realign_optimizer` describes, so a
    `.keras` file saved afterwards loads its optimizer state back, and Keras does
    not warn that the trainable state changed since `compile`.
    """
    journal = Journal()
    try:
        _refresh_trainer(model, journal)
        if getattr(model, "compiled", False) and model.optimizer is not None:
            with _strategy_scope(model):
                realign(model.optimizer, list(model.trainable_weights), journal)
    except Exception as exc:
        journal.rollback()
        raise SwapError(f"Could not rebuild the step functions of '{model.name}'; nothing changed. Cause: {exc}") from exc


def check_optimizer(optimizer) -> None:
    """Refuse, before training, an optimizer whose state the switch can't carry over."""
    if not isinstance(optimizer, BaseOptimizer):
        raise QuantizationError(
            "Switching to quantized training in place needs a Keras 3 optimizer. "
            f"Received: optimizer of type {type(optimizer).__name__}"
        )


def _fit_locals(model: keras.Model) -> dict | None:
    """The local variables of the running `model.fit`, or None outside `fit`.

    Keras keeps neither the epoch iterator nor the callback list on the model,
    so they are read from the `fit` frame.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _FIT_CODE and frame.f_locals.get("self") is model:
            return frame.f_locals
        frame = frame.f_back
    return None


def training_data(model: keras.Model):
    """The data the running `model.fit` trains on, readable again, or None.

    Arrays come back as the `(x, y[, sample_weight])` tuple `fit` uses (after
    `validation_split`), datasets and `PyDataset`s as themselves. A Python
    generator can't be read twice without stealing training batches: None, as
    outside `fit`.
    """
    local = _fit_locals(model) or {}
    adapter = getattr(local.get("epoch_iterator"), "data_adapter", None)
    if isinstance(adapter, ArrayDataAdapter):
        return adapter._inputs
    if isinstance(adapter, TFDatasetAdapter):
        dataset = adapter._dataset
        return None if isinstance(dataset, tf.distribute.DistributedDataset) else dataset
    if isinstance(adapter, PyDatasetAdapter):
        return adapter.py_dataset
    return None


def fit_callbacks(model: keras.Model) -> list:
    """The callbacks of the running `model.fit`, in call order ([] outside `fit`)."""
    callbacks = (_fit_locals(model) or {}).get("callbacks")
    return list(getattr(callbacks, "callbacks", ()))


# --------------------------------------------------------------------------- checks


def _warn_if_untested_keras() -> None:
    version = ".".join(keras.__version__.split(".")[:2])
    if version not in TESTED_KERAS_VERSIONS:
        warnings.warn(
            "qat_plugin's in-place graph switch relies on Keras internals and was tested with "
            f"Keras {', '.join(TESTED_KERAS_VERSIONS)}; you have {keras.__version__}. If switching "
            "fails, quantize the model before `fit` instead.",
            stacklevel=3,
        )


def _kind(model: Any) -> str | None:
    if isinstance(model, Sequential):
        return "Sequential"
    return "Functional" if isinstance(model, Functional) else None


def _graph_of(model: keras.Model) -> Functional:
    """The object holding the Function graph: the model, or a Sequential's `_functional`."""
    return model._functional if isinstance(model, Sequential) else model


def _check_swappable(model: keras.Model, new_model: keras.Model) -> None:
    if _kind(model) is None:
        raise UnsupportedModelError(
            "Only Functional and Sequential models can switch graphs in place. "
            f"Received: model of type {type(model).__name__}"
        )
    if _kind(new_model) != _kind(model) or new_model is model:
        raise UnsupportedModelError(
            f"`new_model` must be a clone of `model`, a {_kind(model)} model. "
            f"Received: new_model={new_model!r}"
        )
    for arg, m in (("model", model), ("new_model", new_model)):
        if isinstance(m, Sequential) and m._functional is None:
            raise UnsupportedModelError(
                f"`{arg}` is a Sequential model without a known input shape; build it first. "
                f"Received: {arg}={m.name!r}"
            )
    if tf.inside_function():
        raise RuntimeError("`swap_graph` must run eagerly, not inside a `tf.function`.")
    old, new = _graph_of(model), _graph_of(new_model)
    for what in ("inputs", "outputs"):
        expected, received = getattr(old, f"_{what}_struct"), getattr(new, f"_{what}_struct")
        try:
            keras.tree.assert_same_structure(expected, received)
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"`new_model` must have the {what} structure of `model`. Received: {what}={received}, "
                f"expected {expected}"
            ) from exc
        for a, b in zip(getattr(old, f"_{what}"), getattr(new, f"_{what}")):
            if tuple(a.shape) != tuple(b.shape):
                raise ValueError(
                    f"`new_model` {what} must keep their shapes. Received: shape={b.shape} for "
                    f"'{b.name}', expected {a.shape}"
                )
    strategy = getattr(model, "_distribute_strategy", None)
    if strategy is not None:
        outside = [v.path for v in new_model.variables if not strategy.extended.variable_created_in_scope(v.value)]
        if outside:
            raise ValueError(
                "The model trains under a tf.distribute strategy, so the new graph's variables must be "
                "created inside `model.distribute_strategy.scope()` (clone the model there). "
                f"Received variables created outside it: {outside[:5]}"
            )


# ------------------------------------------------------------------------ the graph


def _adopt_graph(model: keras.Model, new_model: keras.Model, journal: Journal) -> None:
    """Move `new_model`'s graph onto `model`, nested models first."""
    for old_nested, new_nested in _matching_nested_models(model, new_model):
        _adopt_graph(old_nested, new_nested, journal)
        _reset_step_functions(old_nested, journal)
        _substitute_operation(new_model, new_nested, old_nested, journal)
    if isinstance(model, Sequential):
        _adopt_sequential(model, new_model, journal)
    else:
        _adopt_function_graph(model, new_model, journal)


def _matching_nested_models(model: keras.Model, new_model: keras.Model) -> list[tuple]:
    """(user's nested model, its clone) pairs, matched by name (`clone_model` keeps names)."""

    def nested(m: keras.Model) -> list:
        return [op for op in (m._layers if isinstance(m, Sequential) else m._operations) if _kind(op)]

    old_by_name = {m.name: m for m in nested(model)}
    pairs = []
    for new_nested in nested(new_model):
        old_nested = old_by_name.get(new_nested.name)
        if old_nested is not None and old_nested is not new_nested and _kind(old_nested) == _kind(new_nested):
            pairs.append((old_nested, new_nested))
    return pairs


def _adopt_function_graph(model: Functional, new_model: Functional, journal: Journal) -> None:
    old_dag = {id(op) for op in model._operations}
    for name in _UNTRACKED_GRAPH_ATTRS:
        journal.set_raw(model, name, getattr(new_model, name))
    for name in _TRACKED_GRAPH_ATTRS:
        journal.set_tracked(model, name, getattr(new_model, name))
    # Track the DAG's layers, as `Functional.__init__` does; layers attached as
    # plain attributes, outside the DAG, stay tracked after them.
    extras = [x for x in model._tracker.config["layers"][1] if id(x) not in old_dag]
    layers = [op for op in model._operations if isinstance(op, keras.layers.Layer)]
    journal.set_raw(model, "_layers", journal.replace_store(model._tracker, "layers", _unique(layers + extras)))


def _adopt_sequential(model: Sequential, new_model: Sequential, journal: Journal) -> None:
    old_ids = {id(x) for x in model._layers} | {id(model._functional)}
    extras = [x for x in model._tracker.config["layers"][1] if id(x) not in old_ids]
    layers = list(new_model._layers)
    journal.replace_store(model._tracker, "layers", _unique(layers + [new_model._functional] + extras))
    # `Sequential._layers` is a TrackedList of its own, not the tracker store. Its
    # items are in the store already, so binding it to the tracker adds nothing.
    journal.set_raw(model, "_layers", tracking.TrackedList(layers, model._tracker))
    journal.set_tracked(model, "_functional", new_model._functional)


def _substitute_operation(owner: keras.Model, new_op, old_op, journal: Journal) -> None:
    """In `owner`'s graph, turn the calls of `new_op` into calls of `old_op`."""
    graph = _graph_of(owner)
    nodes = [n for depth in graph._nodes_by_depth.values() for n in depth if n.operation is new_op]
    inbound = list(old_op._inbound_nodes)
    for node in nodes:
        journal.set_raw(node, "operation", old_op)
        inbound.append(node)
        for i, tensor in enumerate(node.outputs):
            journal.set_raw(tensor, "_keras_history", KerasHistory(old_op, len(inbound) - 1, i))
    produced = {id(t) for node in nodes for t in node.outputs}
    consumers = [
        n
        for n in new_op._outbound_nodes
        if any(id(t) in produced for t in n.input_tensors) and n not in old_op._outbound_nodes
    ]
    journal.set_tracked(old_op, "_inbound_nodes", inbound)
    journal.set_tracked(old_op, "_outbound_nodes", list(old_op._outbound_nodes) + consumers)
    # Node keys embed `id(operation)`: recompute the bookkeeping with Keras's own code.
    for name, value in zip(_TRACKED_GRAPH_ATTRS, map_graph(graph._inputs, graph._outputs), strict=True):
        journal.set_tracked(graph, name, value)
    if isinstance(owner, Sequential):
        layers = [old_op if layer is new_op else layer for layer in owner._layers]
        journal.set_raw(owner, "_layers", tracking.TrackedList(layers, owner._tracker))


def _unique(items: list) -> list:
    seen: set[int] = set()
    return [x for x in items if not (id(x) in seen or seen.add(id(x)))]


# ---------------------------------------------------------------------- the trainer


def _reset_step_functions(model: keras.Model, journal: Journal) -> None:
    for name in ("train_function", "test_function", "predict_function"):
        if getattr(model, name, None) is not None:
            journal.set_raw(model, name, None)


def _refresh_trainer(model: keras.Model, journal: Journal) -> None:
    journal.snapshot(model)
    if getattr(model, "compiled", False) and hasattr(model, "_compiled_trainable_state"):
        # Otherwise Keras warns at the next fit that the (new) layers' trainable state changed.
        state = {layer: layer.trainable for layer in model._flatten_layers()}
        journal.set_tracked(model, "_compiled_trainable_state", state)
    if getattr(model, "_jit_compile", None):
        model.jit_compile = True  # The setter turns XLA off, with a warning, if a new layer can't jit.
    running = getattr(model, "train_function", None) is not None
    _reset_step_functions(model, journal)
    if running:
        # `fit` looks `self.train_function` up on every step: a new one is what
        # makes the running fit continue on the new graph. The others rebuild lazily.
        model.make_train_function(force=True)


@contextlib.contextmanager
def _strategy_scope(model: keras.Model):
    strategy = getattr(model, "_distribute_strategy", None)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        yield
