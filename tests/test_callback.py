"""QATCallback: the FP32 -> quantized switch inside model.fit, with Keras's own callbacks."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import qat_plugin as qp
from qat_plugin.models import compile_classifier, small_residual_cnn
from qat_plugin.wrappers import QuantizeWrapper, quantize_wrappers

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def digits_model(optimizer="adam", **compile_kwargs):
    model = small_residual_cnn(input_shape=(8, 8, 1), seed=0)
    model.compile(optimizer, LOSS, metrics=["accuracy"], **compile_kwargs)
    return model


class Snapshot(keras.callbacks.Callback):
    """Records model and optimizer variables (objects and values) at the start of one epoch."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            opt = self.model.optimizer
            self.weights = [(v, v.numpy().copy()) for v in self.model.trainable_variables]
            self.slots = [(v, v.numpy().copy()) for v in opt.variables]
            self.lr = float(opt.learning_rate)
            self.wrappers = len(quantize_wrappers(self.model))


class BatchLosses(keras.callbacks.Callback):
    """Per-batch losses, recovered from Keras's running epoch mean."""

    def on_train_begin(self, logs=None):
        self.losses = []

    def on_epoch_begin(self, epoch, logs=None):
        self._prev = 0.0

    def on_train_batch_end(self, batch, logs=None):
        mean = logs["loss"]
        self.losses.append((batch + 1) * mean - batch * self._prev)
        self._prev = mean


def test_mnist_switch_is_seamless_and_ends_within_a_point_of_fp32(mnist, capsys):
    x_train, y_train, x_test, y_test = mnist
    model = compile_classifier(small_residual_cnn(seed=0))
    before, after, losses = Snapshot(2), Snapshot(2), BatchLosses()
    qat = qp.QATCallback(start_epoch=2)
    history = model.fit(
        x_train, y_train, batch_size=32, epochs=4, validation_data=(x_test, y_test),
        callbacks=[before, qat, after, losses], verbose=0,
    )
    steps = len(x_train) // 32
    assert history.history["qat_phase"] == [0, 0, 1, 1]
    assert history.history["qat_switch_step"] == [-1, -1, 2 * steps, 2 * steps]
    assert (qat.switch_epoch, qat.switch_step) == (2, 2 * steps)
    assert "QATCallback: epoch 2, step 500: switched to quantized training: 5 layers wrapped" in capsys.readouterr().out

    # Same variable objects with the same values on both sides of the switch.
    assert before.wrappers == 0 and after.wrappers == 5
    for (v0, a), (v1, b) in zip(before.weights + before.slots, after.weights + after.slots, strict=True):
        assert v0 is v1
        np.testing.assert_array_equal(a, b)
    assert int(model.optimizer.iterations) == 4 * steps

    # No spike: the first 20 quantized steps train as well as the last 20 FP32 ones.
    last_fp32 = np.mean(losses.losses[2 * steps - 20 : 2 * steps])
    first_qat = np.mean(losses.losses[2 * steps : 2 * steps + 20])
    assert first_qat < 1.5 * last_fp32 + 0.02, (last_fp32, first_qat)

    fp32_acc, final_acc = history.history["val_accuracy"][1], history.history["val_accuracy"][3]
    assert fp32_acc > 0.94
    assert final_acc >= fp32_acc - 0.01, (fp32_acc, final_acc)
    # The user's own model object is the quantized one now, for evaluate and predict too.
    assert isinstance(model.get_layer("conv1"), QuantizeWrapper)
    assert model.evaluate(x_test, y_test, verbose=0)[1] == pytest.approx(final_acc, abs=1e-6)


OPTIMIZERS = {
    "sgd_momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(1e-3),
    "adamw": lambda: keras.optimizers.AdamW(1e-3, weight_decay=1e-3),
    "rmsprop": lambda: keras.optimizers.RMSprop(1e-3),
    "adam_schedule": lambda: keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(1e-3, 20, 0.9)),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_state_carries_over(name, digits):
    x, y = digits[0], digits[1]
    model = digits_model(OPTIMIZERS[name]())
    before, after = Snapshot(1), Snapshot(1)
    model.fit(x, y, batch_size=64, epochs=2, callbacks=[before, qp.QATCallback(start_epoch=1, verbose=0), after], verbose=0)
    assert len(before.slots) > 2  # iterations, learning rate and the slots
    for (v0, a), (v1, b) in zip(before.slots, after.slots, strict=True):
        assert v0 is v1
        np.testing.assert_array_equal(a, b)
    assert before.lr == after.lr  # a schedule goes on without a jump
    steps = int(np.ceil(len(x) / 64))
    assert int(model.optimizer.iterations) == 2 * steps
    if name == "adam_schedule":
        expected = float(keras.optimizers.schedules.ExponentialDecay(1e-3, 20, 0.9)(2 * steps))
        assert float(model.optimizer.learning_rate) == pytest.approx(expected)


@pytest.mark.parametrize("schedule", [False, True])
def test_lr_multiplier_scales_the_qat_phase(schedule, digits, tmp_path):
    lr = keras.optimizers.schedules.ExponentialDecay(1e-3, 20, 0.9) if schedule else 1e-3
    model = digits_model(keras.optimizers.Adam(lr))
    x, y = digits[0][:256], digits[1][:256]
    after = Snapshot(1)
    cb = qp.QATCallback(start_epoch=1, lr_multiplier=0.1, verbose=0)
    model.fit(x, y, batch_size=64, epochs=2, callbacks=[cb, after], verbose=0)
    it = int(model.optimizer.iterations)
    base = float(lr(4)) if schedule else 1e-3
    assert after.lr == pytest.approx(0.1 * base, rel=1e-5)
    now = float(lr(it)) if schedule else 1e-3
    assert float(model.optimizer.learning_rate) == pytest.approx(0.1 * now, rel=1e-5)
    model.save(tmp_path / "m.keras")  # the scaled schedule saves and loads back
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    assert float(loaded.optimizer.learning_rate) == pytest.approx(float(model.optimizer.learning_rate), rel=1e-5)


def test_start_step_switches_mid_epoch_with_steps_per_execution(digits):
    x, y = digits[0], digits[1]
    model = digits_model(steps_per_execution=4)
    cb = qp.QATCallback(start_step=30, verbose=0)
    history = model.fit(x, y, batch_size=32, epochs=2, validation_data=(digits[2], digits[3]), callbacks=[cb], verbose=0)
    assert 30 <= cb.switch_step < 34 and cb.switch_epoch == 0
    assert history.history["qat_phase"] == [1, 1]
    assert int(model.optimizer.iterations) == 2 * int(np.ceil(len(x) / 32))
    assert quantize_wrappers(model)


def test_keras_callbacks_work_across_the_switch(digits, tmp_path):
    x, y, xv, yv = digits
    model = digits_model()
    ckpt = tmp_path / "ckpt-{epoch}.keras"
    callbacks = [
        qp.QATCallback(start_epoch=1, verbose=0),
        keras.callbacks.ModelCheckpoint(str(ckpt)),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=5, restore_best_weights=True),
        keras.callbacks.TensorBoard(log_dir=str(tmp_path / "tb")),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", patience=1, factor=0.5),
    ]
    history = model.fit(x, y, batch_size=64, epochs=3, validation_data=(xv, yv), callbacks=callbacks, verbose=0)
    assert history.history["qat_phase"] == [0, 1, 1]
    first = keras.models.load_model(tmp_path / "ckpt-1.keras", safe_mode=True)
    last = keras.models.load_model(tmp_path / "ckpt-3.keras", safe_mode=True)
    assert not quantize_wrappers(first) and len(quantize_wrappers(last)) == 5
    assert all(i.calibrated for i in qp.list_quantizers(last))
    np.testing.assert_allclose(last.predict(xv, verbose=0), model.predict(xv, verbose=0), atol=1e-5)
    assert any(f.startswith("events.out") for _, _, files in os.walk(tmp_path / "tb") for f in files)


class StopAt(keras.callbacks.Callback):
    """Simulates a killed run: raises at the start of an epoch, after recording the state."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            self.weights = [v.numpy().copy() for v in self.model.weights]
            self.slots = [v.numpy().copy() for v in self.model.optimizer.variables]
            raise KeyboardInterrupt("killed")


class FirstEpoch(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if not hasattr(self, "epoch"):
            self.epoch = epoch
            self.weights = [v.numpy().copy() for v in self.model.weights]
            self.slots = [v.numpy().copy() for v in self.model.optimizer.variables]


def test_backup_and_restore_resumes_the_quantized_run(digits, tmp_path):
    x, y = digits[0][:512], digits[1][:512]
    backup = str(tmp_path / "backup")
    model = digits_model()
    stop = StopAt(3)
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, batch_size=64, epochs=5, verbose=0,
                  callbacks=[qp.QATCallback(start_epoch=1, verbose=0), keras.callbacks.BackupAndRestore(backup), stop])
    assert json.load(open(os.path.join(backup, "qat_switch.json"))) == {"epoch": 1, "step": 8}

    fresh = digits_model()  # a new process would rebuild the FP32 model from code
    cb, first = qp.QATCallback(start_epoch=1, verbose=0), FirstEpoch()
    history = fresh.fit(x, y, batch_size=64, epochs=5, verbose=0,
                        callbacks=[cb, keras.callbacks.BackupAndRestore(backup), first])
    assert first.epoch == 3 and history.history["qat_phase"] == [1, 1]
    for a, b in zip(stop.weights + stop.slots, first.weights + first.slots, strict=True):
        np.testing.assert_array_equal(a, b)
    assert cb.switch_epoch == 1 and len(quantize_wrappers(fresh)) == 5


def test_backup_and_restore_must_come_after_the_callback(digits, tmp_path):
    model = digits_model()
    with pytest.raises(ValueError, match="List QATCallback before BackupAndRestore"):
        model.fit(digits[0][:64], digits[1][:64], epochs=2, verbose=0,
                  callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path)), qp.QATCallback(start_epoch=1)])
    assert int(model.optimizer.iterations) == 0


def test_freeze_batchnorm_and_ranges(digits):
    x, y = digits[0][:512], digits[1][:512]
    model = digits_model()
    cb = qp.QATCallback(start_epoch=1, freeze_bn_after=1, freeze_ranges_after=5, verbose=0)

    class Watch(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.amax, self.bn = [], []

        def on_train_batch_end(self, batch, logs=None):
            conv2 = self.model.get_layer("conv2")
            self.amax.append(float(conv2.input_amax[0].numpy()) if isinstance(conv2, QuantizeWrapper) else None)
            self.bn.append(self.model.get_layer("bn1").moving_mean.numpy().copy())

    watch = Watch()
    model.fit(x, y, batch_size=64, epochs=3, callbacks=[cb, watch], verbose=0)
    steps = 8
    qat_amax = watch.amax[steps:]
    assert len(set(qat_amax[:5])) > 1  # ranges follow the batches for 5 steps...
    assert len(set(qat_amax[5:])) == 1  # ...then stay frozen
    assert not model.get_layer("bn1").trainable
    np.testing.assert_array_equal(watch.bn[2 * steps], watch.bn[-1])  # frozen from epoch 2
    assert not np.array_equal(watch.bn[steps], watch.bn[2 * steps - 1])  # still moving in epoch 1


def test_partial_spec_and_calibrator_choice(digits):
    x, y = digits[0][:256], digits[1][:256]
    model = digits_model()
    spec = qp.QuantizationSpec(layer_types=["Conv2D"], calibrator="percentile", percentile=60.0)
    cb = qp.QATCallback(start_epoch=1, spec=spec, calibration_data=x[:128], verbose=0)
    model.fit(x, y, batch_size=64, epochs=2, callbacks=[cb], verbose=0)
    assert sorted(w.inner_name for w in quantize_wrappers(model)) == ["conv1", "conv2", "conv3"]
    assert cb.calibrated_ranges["conv1/input"] < 0.5 * np.abs(x[:128]).max()  # most pixels are 0


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.fc = keras.layers.Dense(10)

    def call(self, x):
        return self.fc(keras.ops.reshape(x, (-1, 64)))


@pytest.mark.parametrize(
    "make, callback, match",
    [
        (lambda: digits_model(), lambda: qp.QATCallback(start_epoch=2), "would never switch"),
        (lambda: digits_model(), lambda: qp.QATCallback(start_epoch=1, spec=qp.QuantizationSpec(layer_types=["LSTM"])), "selects no quantizable layer"),
        (lambda: digits_model(), lambda: qp.QATCallback(start_epoch=1, spec=qp.QuantizationSpec(layers=["conv9"])), "Close matches"),
        (lambda: Subclassed(), lambda: qp.QATCallback(start_epoch=1), "subclassed model"),
    ],
)
def test_errors_come_before_any_training_step(make, callback, match, digits):
    model = make()
    if not model.compiled:
        model.compile("adam", LOSS)
    with pytest.raises(qp.QuantizationError if "switch" not in match else ValueError, match=match):
        model.fit(digits[0][:64], digits[1][:64], epochs=2, callbacks=[callback()], verbose=0)
    assert int(model.optimizer.iterations) == 0


def test_constructor_errors():
    with pytest.raises(ValueError, match="exactly one of `start_epoch` or `start_step`"):
        qp.QATCallback()
    with pytest.raises(ValueError, match="start_epoch"):
        qp.QATCallback(start_epoch=-1)
    with pytest.raises(ValueError, match="lr_multiplier"):
        qp.QATCallback(start_epoch=1, lr_multiplier=0)
    with pytest.raises(qp.SpecError, match="QuantizationSpec"):
        qp.QATCallback(start_epoch=1, spec={"layers": ["x"]})


def test_a_failed_switch_leaves_the_fp32_model_intact(digits, monkeypatch):
    import qat_plugin.callback as callback_module

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(callback_module, "calibrate", broken)
    model = digits_model()
    snap = Snapshot(1)
    with pytest.raises(qp.CalibrationError, match="FP32 model and its weights are intact. Cause: disk on fire"):
        model.fit(digits[0][:128], digits[1][:128], epochs=2, callbacks=[snap, qp.QATCallback(start_epoch=1)], verbose=0)
    assert not quantize_wrappers(model)
    for v, value in snap.weights:
        np.testing.assert_array_equal(v.numpy(), value)
    assert model.evaluate(digits[2], digits[3], verbose=0)[1] > 0.1  # still usable


def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    script = textwrap.dedent(
        """
        import numpy as np, tensorflow as tf, keras
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from sklearn.datasets import load_digits
        import qat_plugin as qp
        from qat_plugin.models import small_residual_cnn
        d = load_digits(); x = (d.images / 16).astype("float32")[..., None][:512]; y = d.target[:512]
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            model = small_residual_cnn(input_shape=(8, 8, 1), seed=0)
            model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        cb = qp.QATCallback(start_epoch=1, verbose=0)
        h = model.fit(x, y, batch_size=64, epochs=3, callbacks=[cb], verbose=0)
        amax = [float(i.amax) for i in qp.list_quantizers(model) if i.label == "input"]
        print("RESULT", h.history["qat_phase"], h.history["loss"][0] > h.history["loss"][-1],
              int(model.optimizer.iterations.numpy()), min(amax) > 0, strategy.num_replicas_in_sync)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")]
    assert line, out.stderr[-3000:]
    assert line[0] == "RESULT [0, 1, 1] True 24 True 2"
