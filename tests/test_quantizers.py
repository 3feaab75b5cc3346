import keras
import numpy as np
import pytest
import tensorflow as tf

from qat_plugin import TensorQuantizer
from qat_plugin.quantizers import fake_quant_per_channel, fake_quant_per_tensor, qmax


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_per_tensor_values_lie_on_the_symmetric_grid(bits):
    x = np.linspace(-3, 3, 1001).astype("float32")
    y = fake_quant_per_tensor(tf.constant(x), tf.constant(2.0), bits).numpy()
    scale = 2.0 / qmax(bits)
    levels = y / scale
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    assert levels.max() == pytest.approx(qmax(bits)) and levels.min() == pytest.approx(-qmax(bits))
    inside = np.abs(x) <= 2.0
    assert np.abs(y[inside] - x[inside]).max() <= scale / 2 + 1e-6
    assert len(np.unique(np.round(levels))) == 2 * qmax(bits) + 1


def test_per_channel_uses_one_range_per_output_channel():
    w = np.random.default_rng(0).normal(size=(3, 3, 4, 5)).astype("float32")
    w[..., 2] *= 100.0  # one channel with a huge range must not affect the others
    q = TensorQuantizer(8, axis=-1)
    amax = q.compute_amax(w).numpy()
    np.testing.assert_allclose(amax, np.abs(w).reshape(-1, 5).max(0))
    y = q(w).numpy()
    for c in range(5):
        step = amax[c] / 127
        assert np.abs(y[..., c] - w[..., c]).max() <= step / 2 + 1e-5
        np.testing.assert_allclose(y[..., c] / step, np.round(y[..., c] / step), atol=1e-3)


def test_gradients_are_straight_through():
    x = tf.constant([-3.0, -0.5, 0.2, 0.9, 2.5])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fake_quant_per_tensor(x, tf.constant(1.0), 8)
    # Clipped STE: 1 inside the range, 0 where the input saturates.
    np.testing.assert_array_equal(tape.gradient(y, x).numpy(), [0, 1, 1, 1, 0])
    w = tf.Variable(np.random.default_rng(1).normal(size=(4, 3)).astype("float32"))
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(fake_quant_per_channel(w, TensorQuantizer(8, -1).compute_amax(w), 1, 8) * 2.0)
    np.testing.assert_array_equal(tape.gradient(y, w).numpy(), np.full((4, 3), 2.0))


@pytest.mark.parametrize("bad", [3, 9, 8.0, True, "8"])
def test_bits_outside_4_to_8_are_refused(bad):
    with pytest.raises(ValueError, match="bits"):
        TensorQuantizer(bits=bad)


def test_quantizer_serializes_with_keras():
    q = TensorQuantizer(bits=5, axis=2)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(q))
    assert isinstance(restored, TensorQuantizer) and restored == q and restored.per_channel
