"""swap_graph: switching a model to a wrapped graph in place, in the middle of `fit`."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import small_cnn

from qat_plugin import _switch
from qat_plugin import _optimizer_state
from qat_plugin._optimizer_state import realign_optimizer
from qat_plugin._switch import swap_graph
from qat_plugin.errors import QuantizationError, SwapError, UnsupportedModelError

L = keras.layers
EPOCHS, SWITCH_EPOCH, BATCH = 4, 2, 64


@keras.saving.register_keras_serializable(package="qat_plugin_test")
class IdentityWrapper(L.Wrapper):
    """Stands in for QuantizeWrapper: `layer(x) * 1.0 + amax`, with amax = 0.

    Owns a non-trainable scalar `amax` and a counter of executed calls, so tests
    can see that the wrapper really runs. `get_config`/`from_config` come from
    `Wrapper` (the inner layer is serialized under "layer").
    """

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.amax = self.add_weight(shape=(), initializer="zeros", trainable=False, name="amax")
        self.calls = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="calls", aggregation="only_first_replica"
        )
        self.built = True

    def call(self, inputs, training=None):
        self.calls.assign_add(1.0)
        return self.layer(inputs) * 1.0 + self.amax

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)


@keras.saving.register_keras_serializable(package="qat_plugin_test")
class ScaleWrapper(L.Wrapper):
    """Adds a *trainable* scalar (init 1.0): the optimizer must give it fresh slots."""

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.scale = self.add_weight(shape=(), initializer="ones", trainable=True, name="scale")
        self.built = True

    def call(self, inputs):
        return self.layer(inputs) * self.scale

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)


def wrap_with(wrapper_cls):
    def clone_function(layer):
        return wrapper_cls(layer) if isinstance(layer, (L.Conv2D, L.Dense)) else layer

    return clone_function


def wrapped_clone(model, wrapper_cls=IdentityWrapper):
    with model.distribute_strategy.scope():
        return keras.models.clone_model(model, clone_function=wrap_with(wrapper_cls), recursive=True)


def functional_cnn():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1), name="image")
    x = L.Conv2D(8, 3, activation="relu", name="conv")(inp)
    return keras.Model(inp, L.Dense(10, name="head")(L.Flatten(name="flatten")(x)), name="cnn")


def sequential_cnn():
    keras.utils.set_random_seed(0)
    layers = [keras.Input((8, 8, 1)), L.Conv2D(8, 3, activation="relu", name="conv")]
    return keras.Sequential(layers + [L.Flatten(name="flatten"), L.Dense(10, name="head")], name="cnn")


def nested_cnn():
    """A Functional backbone (with a nested Sequential block) inside a Functional classifier."""
    keras.utils.set_random_seed(0)
    b_in = keras.Input((8, 8, 1))
    block = keras.Sequential([keras.Input((6, 6, 8)), L.Conv2D(8, 3, padding="same", name="block_conv")], name="block")
    backbone = keras.Model(b_in, block(L.Conv2D(8, 3, activation="relu", name="conv")(b_in)), name="backbone")
    inp = keras.Input((8, 8, 1), name="image")
    out = L.Dense(10, name="head")(L.Flatten(name="flatten")(backbone(inp)))
    return keras.Model(inp, out, name="classifier")


def sequential_of_models():
    """A Sequential whose first layer is a Functional backbone."""
    keras.utils.set_random_seed(0)
    b_in = keras.Input((8, 8, 1))
    backbone = keras.Model(b_in, L.Conv2D(8, 3, activation="relu", name="conv")(b_in), name="backbone")
    return keras.Sequential([keras.Input((8, 8, 1)), backbone, L.Flatten(name="flatten"), L.Dense(10, name="head")])


BUILDERS = {
    "functional": functional_cnn,
    "sequential": sequential_cnn,
    "nested": nested_cnn,
    "sequential_of_models": sequential_of_models,
}
# kind -> (wrapped layers, trainable variables)
SIZES = {"functional": (2, 4), "sequential": (2, 4), "nested": (3, 6), "sequential_of_models": (2, 4)}


def compiled(model, optimizer=None, **kwargs):
    optimizer = optimizer or keras.optimizers.Adam(1e-3)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"], **kwargs)
    return model


def wrappers_in(model, cls=IdentityWrapper):
    return [layer for layer in model._flatten_layers() if isinstance(layer, cls)]


def calls(model):
    return sum(float(w.calls.numpy()) for w in wrappers_in(model))


class SwitchAt(keras.callbacks.Callback):
    """Switches the model at the start of an epoch and records what it saw around the switch."""

    def __init__(self, x, y, epoch=SWITCH_EPOCH, wrapper_cls=IdentityWrapper):
        super().__init__()
        self.x, self.y, self.epoch, self.wrapper_cls = x, y, epoch, wrapper_cls
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def _loss(self):
        return float(self.loss_fn(self.y, self.model(self.x, training=False)))

    def on_epoch_begin(self, epoch, logs=None):
        if epoch != self.epoch:
            return
        optimizer = self.model.optimizer
        self.slots_before = list(optimizer.variables)
        self.values_before = [v.numpy().copy() for v in self.slots_before]
        self.iterations_before = int(optimizer.iterations.numpy())
        self.loss_before = self._loss()
        swap_graph(self.model, wrapped_clone(self.model, self.wrapper_cls))
        self.slots_after = list(optimizer.variables)
        self.values_after = [v.numpy().copy() for v in self.slots_after]
        self.loss_after = self._loss()
        self.calls_at_switch = calls(self.model) if self.wrapper_cls is IdentityWrapper else None


def fit(model, digits, callbacks=(), epochs=EPOCHS):
    x, y = digits[0], digits[1]
    keras.utils.set_random_seed(1)  # Same shuffling for every run.
    return model.fit(x, y, epochs=epochs, batch_size=BATCH, verbose=0, callbacks=list(callbacks))


STEPS = math.ceil(1400 / BATCH)


# ----------------------------------------------------------------- the main scenario


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_switch_mid_fit_runs_the_wrapped_graph(kind, digits, tmp_path):
    model = compiled(BUILDERS[kind]())
    backbone = model.get_layer("backbone") if "backbone" in [layer.name for layer in model.layers] else None
    switch = SwitchAt(digits[2][:200], digits[3][:200])
    history = fit(model, digits, [switch])

    losses = history.history["loss"]
    assert len(losses) == EPOCHS
    assert losses[SWITCH_EPOCH] < losses[SWITCH_EPOCH - 1]  # Training went on, not restarted.
    assert switch.loss_after == pytest.approx(switch.loss_before, rel=1e-6)  # Identity wrapper.
    assert int(model.optimizer.iterations.numpy()) == EPOCHS * STEPS
    assert switch.iterations_before == SWITCH_EPOCH * STEPS
    # Adam's slots are the same objects, with the same values, across the switch.
    assert [id(v) for v in switch.slots_after] == [id(v) for v in switch.slots_before]
    for a, b in zip(switch.values_before, switch.values_after, strict=True):
        np.testing.assert_array_equal(a, b)

    # The wrappers are in the model and ran on every step after the switch.
    wrapped = wrappers_in(model)
    assert len(wrapped) == SIZES[kind][0]
    assert {type(w.layer).__name__ for w in wrapped} == {"Conv2D", "Dense"}
    assert calls(model) - switch.calls_at_switch == (EPOCHS - SWITCH_EPOCH) * STEPS * len(wrapped)
    assert {v.path for w in wrapped for v in (w.amax, w.calls)} <= {v.path for v in model.non_trainable_variables}
    assert len(model.trainable_variables) == SIZES[kind][1]
    if backbone is not None:
        # The user's nested model objects stay in the graph and now run the wrapped graph.
        assert model.get_layer("backbone") is backbone
        assert any(isinstance(layer, IdentityWrapper) for layer in backbone.layers)
    if kind == "nested":
        assert isinstance(backbone.get_layer("block").layers[0], IdentityWrapper)

    # evaluate / predict go through the new graph.
    x_test, y_test = digits[2], digits[3]
    before = calls(model)
    loss, _ = model.evaluate(x_test, y_test, batch_size=BATCH, verbose=0)
    predictions = model.predict(x_test, batch_size=BATCH, verbose=0)
    assert calls(model) - before == 2 * math.ceil(len(x_test) / BATCH) * len(wrapped)
    np.testing.assert_allclose(predictions, model(x_test).numpy(), atol=1e-5)

    # The config and the saved file describe the wrapped graph.
    config = model.get_config()
    assert "IdentityWrapper" in str(config)
    path = tmp_path / "switched.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert len(wrappers_in(loaded)) == len(wrapped)
    np.testing.assert_allclose(loaded.predict(x_test, verbose=0), predictions, atol=1e-6)
    assert loaded.evaluate(x_test, y_test, verbose=0)[0] == pytest.approx(loss, rel=1e-5)
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_identity_switch_leaves_the_training_trajectory_unchanged(digits):
    """A model with BatchNorm and a residual add trains exactly as if it had never switched."""
    reference = fit(compiled(small_cnn()), digits).history
    switched = fit(compiled(small_cnn()), digits, [SwitchAt(digits[2][:64], digits[3][:64], epoch=1)]).history
    for name in ("loss", "accuracy"):
        np.testing.assert_allclose(switched[name], reference[name], rtol=1e-5)


def test_sgd_momentum_slots_carry_over(digits):
    model = compiled(functional_cnn(), keras.optimizers.SGD(0.05, momentum=0.9))
    switch = SwitchAt(digits[2][:64], digits[3][:64])
    fit(model, digits, [switch])
    momentums = [v for v in switch.slots_before if "momentum" in v.name]
    assert len(momentums) == 4 and all(np.abs(v).sum() > 0 for v in switch.values_before[-4:])
    assert [id(v) for v in switch.slots_after] == [id(v) for v in switch.slots_before]
    assert int(model.optimizer.iterations.numpy()) == EPOCHS * STEPS


@pytest.mark.parametrize("steps_per_execution", [3, 100])
def test_steps_per_execution(steps_per_execution, digits):
    model = compiled(sequential_cnn(), steps_per_execution=steps_per_execution)
    switch = SwitchAt(digits[2][:64], digits[3][:64])
    history = fit(model, digits, [switch])
    assert len(history.history["loss"]) == EPOCHS
    assert int(model.optimizer.iterations.numpy()) == EPOCHS * STEPS
    assert calls(model) - switch.calls_at_switch == (EPOCHS - SWITCH_EPOCH) * STEPS * 2


def test_switch_before_the_optimizer_is_built(digits):
    """At the first epoch the optimizer has no slots yet: it builds on the new graph."""
    model = compiled(functional_cnn())
    switch = SwitchAt(digits[2][:64], digits[3][:64], epoch=0)
    fit(model, digits, [switch], epochs=2)
    assert [id(v) for v in switch.slots_after] == [id(v) for v in switch.slots_before]  # Nothing built yet.
    assert len(model.optimizer.variables) == 2 + 2 * 4
    assert calls(model) - switch.calls_at_switch == 2 * STEPS * 2


# ------------------------------------------------------------------- the optimizer


def fresh_layout(optimizer, variables):
    """(name, shape) of every variable of a fresh optimizer of the same kind, built on `variables`."""
    fresh = optimizer.__class__.from_config(optimizer.get_config())
    fresh.build(variables)
    return [(v.name, tuple(v.shape)) for v in fresh.variables]


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda: keras.optimizers.Adam(1e-3),
        lambda: keras.optimizers.SGD(0.05, momentum=0.9),
        lambda: keras.optimizers.AdamW(1e-3, use_ema=True),
        lambda: keras.optimizers.Nadam(1e-3),
        lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-3)),
    ],
    ids=["adam", "sgd_momentum", "adamw_ema", "nadam", "loss_scale"],
)
def test_new_trainable_variables_get_fresh_slots(make_optimizer, digits, tmp_path):
    model = compiled(functional_cnn(), make_optimizer())
    switch = SwitchAt(digits[2][:64], digits[3][:64], epoch=1, wrapper_cls=ScaleWrapper)
    history = fit(model, digits, [switch], epochs=2)
    assert np.isfinite(history.history["loss"]).all()
    optimizer = model.optimizer
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    before_ids = {id(v) for v in switch.slots_before}
    kept = [v for v in switch.slots_after if id(v) in before_ids]
    new = [v for v in switch.slots_after if id(v) not in before_ids]

    # Every old slot is kept with its value; only the two `scale` variables got new ones, at zero.
    assert len(kept) == len(switch.slots_before) - (1 if isinstance(inner, keras.optimizers.Nadam) else 0)
    values_after = dict(zip(map(id, switch.slots_after), switch.values_after))
    for v, value in zip(switch.slots_before, switch.values_before):
        if id(v) in values_after:
            np.testing.assert_array_equal(values_after[id(v)], value)
    scale_slots = [v for v in new if "scale" in v.name]
    assert len(scale_slots) == len(new) - (1 if isinstance(inner, keras.optimizers.Nadam) else 0) > 0
    for v in scale_slots:  # Moments start at zero; an EMA starts at the variable's value.
        assert values_after[id(v)] == (1.0 if "average" in v.name else 0.0), v.name
    # Laid out exactly as a fresh build on the new variables (what loading relies on).
    layout = [(v.name, tuple(v.shape)) for v in inner.variables]
    expected = fresh_layout(inner, model.trainable_variables)
    assert [shape for _, shape in layout] == [shape for _, shape in expected]
    assert [n for n, _ in layout if "scale" in n] == [n for n, _ in expected if "scale" in n]
    assert set(inner._trainable_variables_indices) == {inner._var_key(v) for v in model.trainable_variables}
    assert len(optimizer._trainable_variables) == 6

    path = tmp_path / "scaled.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    for a, b in zip(loaded.optimizer.variables, optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_realign_optimizer_is_a_no_op_for_the_same_variables():
    model = functional_cnn()
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)
    before = list(optimizer.variables)
    realign_optimizer(optimizer, model.trainable_variables)
    assert [id(v) for v in optimizer.variables] == [id(v) for v in before]
    realign_optimizer(optimizer, model.trainable_variables[::-1])  # Reordered: slots follow.
    assert {id(v) for v in optimizer.variables} == {id(v) for v in before}
    kernel = model.trainable_variables[0]
    momentum = optimizer._momentums[optimizer._get_variable_index(kernel)]
    assert momentum is before[2] and optimizer._get_variable_index(kernel) == 3


# ------------------------------------------------------------------------ failures


def state_of(model):
    return {
        "config": model.get_config(),
        "layers": [id(layer) for layer in model._flatten_layers()],
        "weights": [id(v) for v in model.weights],
        "optimizer": [id(v) for v in model.optimizer.variables],
        "indices": dict(model.optimizer._trainable_variables_indices),
        "train_function": model.train_function,
        "tf_dependencies": list(model._self_unconditional_checkpoint_dependencies),
        "inbound": [list(layer._inbound_nodes) for layer in model._flatten_layers()],
        "outbound": [list(layer._outbound_nodes) for layer in model._flatten_layers()],
    }


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("where", ["trainer", "optimizer"])
def test_a_failure_part_way_restores_the_model(kind, where, digits, monkeypatch):
    model = compiled(BUILDERS[kind]())
    x, y = digits[2][:128], digits[3][:128]
    model.fit(x, y, epochs=1, verbose=0)
    expected_output = model.predict(x, verbose=0)
    new_model = wrapped_clone(model, ScaleWrapper)
    before = state_of(model)  # Cloning itself adds outbound nodes to the shared layers.

    def fail(*args, **kwargs):
        raise KeyError("boom")

    if where == "trainer":
        monkeypatch.setattr(_switch, "_refresh_trainer", fail)
    else:  # Fails after some slots were created and the optimizer half rebuilt.
        original = _optimizer_state._ReuseSlots._provide
        count = iter(range(100))
        monkeypatch.setattr(
            _optimizer_state._ReuseSlots, "_provide", lambda self, *a: fail() if next(count) == 5 else original(self, *a)
        )
    with pytest.raises(SwapError, match="restored unchanged.*boom"):
        swap_graph(model, new_model)
    monkeypatch.undo()

    assert state_of(model) == before
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected_output)
    model.fit(x, y, epochs=1, verbose=0)  # Still trains, and can still switch.
    swap_graph(model, wrapped_clone(model))
    assert wrappers_in(model)
    model.fit(x, y, epochs=1, verbose=0)


def test_refuses_models_it_cannot_switch():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(2)

        def call(self, x):
            return self.dense(x)

    subclassed = Subclassed()
    subclassed(np.zeros((1, 3)))
    functional, sequential = functional_cnn(), sequential_cnn()
    with pytest.raises(UnsupportedModelError, match="Received: model of type Subclassed"):
        swap_graph(subclassed, subclassed)
    with pytest.raises(UnsupportedModelError, match="must be a clone of `model`, a Functional model"):
        swap_graph(functional, sequential)
    with pytest.raises(UnsupportedModelError, match="clone of `model`"):
        swap_graph(functional, functional)
    with pytest.raises(UnsupportedModelError, match="without a known input shape"):
        swap_graph(keras.Sequential([L.Dense(2)]), keras.Sequential([L.Dense(2)]))
    other = keras.Model(functional.input, L.Dense(3)(functional.get_layer("flatten").output))
    with pytest.raises(ValueError, match=r"outputs must keep their shapes. Received: shape=\(None, 3\)"):
        swap_graph(functional, other)
    assert not wrappers_in(functional)


# ---------------------------------------------------------------- MirroredStrategy

MIRRORED_SCRIPT = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np, pytest
from sklearn.datasets import load_digits
import test_switch as t
from qat_plugin._switch import swap_graph

d = load_digits()
x, y = (d.images / 16.0).astype("float32")[..., None][:1400], d.target[:1400]
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = t.compiled(t.functional_cnn())
switch = t.SwitchAt(x[:64], y[:64])
history = t.fit(model, (x, y), [switch])
assert len(history.history["loss"]) == t.EPOCHS, history.history
assert history.history["loss"][t.SWITCH_EPOCH] < history.history["loss"][t.SWITCH_EPOCH - 1]
assert switch.loss_after == pytest.approx(switch.loss_before, rel=1e-6)
assert int(model.optimizer.iterations.numpy()) == t.EPOCHS * t.STEPS
assert [id(v) for v in switch.slots_after] == [id(v) for v in switch.slots_before]
assert len(t.wrappers_in(model)) == 2
assert all(type(v.value).__name__ == "MirroredVariable" for v in model.variables)
assert t.calls(model) - switch.calls_at_switch == (t.EPOCHS - t.SWITCH_EPOCH) * t.STEPS * 2

# A clone whose new variables live outside the strategy is refused, before any change.
rewrap = lambda layer: t.ScaleWrapper(layer) if isinstance(layer, t.IdentityWrapper) else layer
plain_clone = keras.models.clone_model(model, clone_function=rewrap, recursive=True)
with pytest.raises(ValueError, match="inside `model.distribute_strategy.scope"):
    swap_graph(model, plain_clone)
assert not t.wrappers_in(model, t.ScaleWrapper)
print("MIRRORED OK", strategy.num_replicas_in_sync)
"""


def test_mirrored_strategy_on_two_logical_cpus():
    # Logical devices must be configured before TF initializes: use a fresh process.
    tests_dir = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests_dir.parent), str(tests_dir)])}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MIRRORED_SCRIPT)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tests_dir,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MIRRORED OK 2" in result.stdout


def test_switch_in_the_middle_of_an_epoch_with_validation(digits):
    class SwitchAtBatch(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 9 and not wrappers_in(self.model):
                swap_graph(self.model, wrapped_clone(self.model))

    model = compiled(functional_cnn(), steps_per_execution=3)
    x_val, y_val = digits[2][:128], digits[3][:128]
    keras.utils.set_random_seed(1)
    history = model.fit(
        digits[0], digits[1], epochs=2, batch_size=BATCH, validation_data=(x_val, y_val), verbose=0,
        callbacks=[SwitchAtBatch()],
    )
    assert len(history.history["val_loss"]) == 2
    assert int(model.optimizer.iterations.numpy()) == 2 * STEPS
    train_calls = (STEPS - 9) + STEPS  # From batch 9 of the first epoch on.
    assert calls(model) == 2 * (train_calls + 2 * math.ceil(128 / BATCH))


# ------------------------------------------------------- helpers for QATCallback


class Probe(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.data = _switch.training_data(self.model)


def test_training_data_is_what_the_running_fit_reads(digits):
    import tensorflow as tf

    model = compiled(functional_cnn())
    x, y = digits[2][:100], digits[3][:100]

    probe = Probe()
    model.fit(x, y, validation_split=0.2, epochs=1, verbose=0, callbacks=[probe])
    np.testing.assert_array_equal(probe.data[0], x[:80])  # (x, y) after the validation split.
    np.testing.assert_array_equal(probe.data[1], y[:80])

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    model.fit(dataset, epochs=1, shuffle=False, verbose=0, callbacks=[probe])
    assert probe.data is dataset

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return x[i * 32 : (i + 1) * 32], y[i * 32 : (i + 1) * 32]

    py_dataset = Batches()
    model.fit(py_dataset, epochs=1, verbose=0, callbacks=[probe])
    assert probe.data is py_dataset

    batches = ((x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32))
    model.fit(batches, steps_per_epoch=3, shuffle=False, verbose=0, callbacks=[probe])
    assert probe.data is None  # A one-shot generator can't be read twice.
    assert _switch.training_data(model) is None  # Outside fit.


def test_rebuild_functions_after_freezing_mid_fit(digits, tmp_path):
    """Freeze BatchNorm after the switch: training goes on without it, and saving still round-trips."""

    class FreezeAt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                bn = self.model.get_layer("bn1")
                bn.trainable = False
                _switch.rebuild_functions(self.model)
                self.frozen = [v.numpy().copy() for v in bn.weights]

    model = compiled(small_cnn())
    freeze = FreezeAt()
    history = fit(model, digits, [SwitchAt(digits[2][:64], digits[3][:64], epoch=1), freeze], epochs=3)
    assert len(history.history["loss"]) == 3
    for frozen, variable in zip(freeze.frozen, model.get_layer("bn1").weights, strict=True):
        np.testing.assert_array_equal(variable.numpy(), frozen)  # Neither updated nor moving-averaged.
    optimizer = model.optimizer
    assert [tuple(v.shape) for v in optimizer.variables] == [s for _, s in fresh_layout(optimizer, model.trainable_variables)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # No "trainable state has changed since compile".
        model.evaluate(digits[2], digits[3], verbose=0)
    path = tmp_path / "frozen.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    for a, b in zip(loaded.optimizer.variables, optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_check_optimizer():
    _switch.check_optimizer(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()))
    with pytest.raises(QuantizationError, match="needs a Keras 3 optimizer. Received: optimizer of type str"):
        _switch.check_optimizer("adam")
