import keras
import numpy as np
import pytest
import tensorflow as tf

from qat_plugin import CalibrationError, QuantizationSpec, calibrate, list_quantizers, quantize_model
from qat_plugin.calibration import RangeCollector, iterate_inputs


def _laplace_with_outliers(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.laplace(scale=1.0, size=200_000).astype("float32")
    x[:3] = 60.0  # a few outliers
    return x


def test_max_percentile_and_mse_on_a_known_distribution():
    c = RangeCollector()
    for part in np.array_split(_laplace_with_outliers(), 7):  # several batches, range grows
        c.update(part)
    assert c.compute_amax("max") == pytest.approx(60.0)
    # |Laplace(1)| is Exp(1): its 99.9th percentile is ln(1000) = 6.9.
    assert c.compute_amax("percentile", 99.9) == pytest.approx(np.log(1000), rel=0.05)
    assert c.compute_amax("percentile", 99.9) < c.compute_amax("mse") < 60.0


def test_mse_range_has_the_lowest_quantization_error():
    x = _laplace_with_outliers(1)
    c = RangeCollector()
    c.update(x)

    def err(amax):
        s = amax / 127
        return np.mean((x - np.clip(np.round(x / s), -127, 127) * s) ** 2)

    others = [c.compute_amax("max"), c.compute_amax("percentile", 99.99), c.compute_amax("percentile", 99.9)]
    assert err(c.compute_amax("mse")) < 0.9 * min(err(a) for a in others)


def test_iterate_inputs_follows_keras_data_conventions():
    x = np.arange(10, dtype="float32").reshape(5, 2)
    y = np.zeros(5)
    assert [b.shape for b in iterate_inputs((x, y), batch_size=2)] == [(2, 2), (2, 2), (1, 2)]
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    assert [tuple(b.shape) for b in iterate_inputs(ds)] == [(4, 2), (1, 2)]
    assert [tuple(b.shape) for b in iterate_inputs(tf.constant(x), batch_size=4)] == [(4, 2), (1, 2)]
    multi = list(iterate_inputs([x, x + 1], batch_size=5))
    assert len(multi) == 1 and np.array_equal(multi[0][1], x + 1)


def _model():
    inp = keras.Input((4,))
    return keras.Model(inp, keras.layers.Dense(3, name="fc")(keras.layers.Dense(4, name="hidden")(inp)))


@pytest.mark.parametrize("method", ["max", "percentile", "mse"])
def test_calibrate_sets_every_activation_range(method):
    q = quantize_model(_model())
    assert not any(i.calibrated for i in list_quantizers(q) if i.label == "input")
    data = np.random.default_rng(0).normal(size=(256, 4)).astype("float32")
    ranges = calibrate(q, data, method=method, num_batches=4, batch_size=64)
    assert set(ranges) == {"hidden/input", "fc/input"}
    assert all(i.calibrated for i in list_quantizers(q))
    if method == "max":
        assert ranges["hidden/input"] == pytest.approx(np.abs(data).max())
    else:
        assert ranges["hidden/input"] <= np.abs(data).max()


def test_num_batches_limits_what_is_read():
    q = quantize_model(_model())
    data = np.ones((100, 4), "float32")
    data[50:] = 9.0
    assert calibrate(q, data, num_batches=2, batch_size=25)["hidden/input"] == 1.0


def test_spec_calibrator_is_used_by_quantize_model():
    data = np.concatenate([np.full((1, 4), 1000.0), np.random.default_rng(0).normal(size=(2000, 4))]).astype("float32")
    q_max = quantize_model(_model(), calibration_data=data)
    q_pct = quantize_model(_model(), QuantizationSpec(calibrator="percentile", percentile=99.0, calibration_batches=100), calibration_data=data)
    get = lambda q: {i.key: i.amax for i in list_quantizers(q)}["hidden/input"]  # noqa: E731
    assert get(q_max) == pytest.approx(1000.0)
    assert get(q_pct) < 10.0


def test_calibration_errors():
    with pytest.raises(CalibrationError, match="call `quantize_model` first"):
        calibrate(_model(), np.ones((2, 4)))
    q = quantize_model(_model())
    with pytest.raises(CalibrationError, match="no batches"):
        calibrate(q, np.ones((0, 4), "float32"))
    with pytest.raises(CalibrationError, match="Unknown calibrator 'kl'"):
        calibrate(q, np.ones((2, 4)), method="kl")
