"""Each supported layer kind, wrapped: the numbers it computes and its .keras round trip."""

import json

import keras
import numpy as np
import pytest

from qat_plugin import QuantizeWrapper, TensorQuantizer, quantize_model, register_layer, supported_types
from qat_plugin.quantizers import fake_quant_per_tensor
from qat_plugin.wrappers import quantize_wrappers

L = keras.layers
WEIGHTED = [
    (lambda: L.Conv1D(4, 3, padding="causal"), (10, 3), 4),
    (lambda: L.Conv2D(5, 3, padding="same"), (8, 8, 3), 5),
    (lambda: L.Conv3D(3, 2), (4, 4, 4, 2), 3),
    (lambda: L.DepthwiseConv2D(3, depth_multiplier=1), (8, 8, 3), 3),
    (lambda: L.SeparableConv2D(6, 3), (8, 8, 3), None),
    (lambda: L.Conv2DTranspose(4, 3, strides=2), (4, 4, 3), 4),
    (lambda: L.Dense(7), (5,), 7),
    (lambda: L.EinsumDense("abc,cd->abd", output_shape=(3, 6), bias_axes="d"), (3, 5), 6),
]


def _one_layer_model(make, shape, seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input(shape)
    layer = make()
    model = keras.Model(inp, layer(inp))
    # Non-zero biases so a wrong bias path would show.
    for w in layer.weights:
        if "bias" in w.path:
            w.assign(np.random.default_rng(seed).normal(size=w.shape).astype("float32"))
    return model, layer


@pytest.mark.parametrize("make, shape, channels", WEIGHTED, ids=["conv1d_causal", "conv2d", "conv3d", "depthwise", "separable", "conv2d_transpose", "dense", "einsum"])
def test_weighted_kind_computes_layer_of_quantized_input_and_weights(make, shape, channels, tmp_path):
    model, layer = _one_layer_model(make, shape)
    x = np.random.default_rng(1).normal(size=(6, *shape)).astype("float32")
    qmodel = quantize_model(model, calibration_data=x)
    (wrapper,) = quantize_wrappers(qmodel)
    assert isinstance(wrapper.layer, type(layer))
    for attr, q in wrapper.weight_quantizers.items():
        amax = q.compute_amax(getattr(wrapper.layer, attr)).numpy()
        if channels is not None and attr in ("_kernel", "kernel"):
            assert amax.shape == (channels,)
    # Reference: a float copy of the layer holding fake-quantized weights, fed the fake-quantized input.
    ref = layer.__class__.from_config(layer.get_config())
    ref.build(layer._build_shapes_dict["input_shape"] if hasattr(layer, "_build_shapes_dict") else (None, *shape))
    ref.set_weights(layer.get_weights())
    for attr, q in wrapper.weight_quantizers.items():
        getattr(ref, attr).assign(q(getattr(ref, attr)))
    xq = fake_quant_per_tensor(x, wrapper.input_amax[0], 8)
    expected = np.asarray(ref(xq))
    got = qmodel.predict(x, verbose=0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(got - model.predict(x, verbose=0)).max() > 0  # quantization really happened
    assert float(wrapper.input_amax[0].numpy()) == pytest.approx(np.abs(x).max())

    path = tmp_path / "m.keras"
    qmodel.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    (lw,) = quantize_wrappers(loaded)
    as_json = lambda c: json.loads(json.dumps(c))  # noqa: E731 (tuples come back as lists)
    assert as_json(lw.get_config()) == as_json(wrapper.get_config())
    assert float(lw.input_amax[0].numpy()) == float(wrapper.input_amax[0].numpy())
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), got)


def test_every_advertised_kind_is_registered():
    for name in ["Conv1D", "Conv2D", "Conv3D", "DepthwiseConv2D", "SeparableConv2D", "Conv2DTranspose", "Dense",
                 "EinsumDense", "Add", "Concatenate", "AveragePooling2D", "GlobalAveragePooling2D"]:
        assert name in supported_types()


@pytest.mark.parametrize("make", [lambda: L.AveragePooling2D(2), lambda: L.GlobalAveragePooling2D()])
def test_pooling_quantizes_its_input(make):
    inp = keras.Input((4, 4, 2))
    layer = make()
    model = keras.Model(inp, layer(inp))
    x = np.random.default_rng(2).uniform(-1, 1, size=(3, 4, 4, 2)).astype("float32")
    qmodel = quantize_model(model, calibration_data=x)
    (w,) = quantize_wrappers(qmodel)
    expected = np.asarray(layer(fake_quant_per_tensor(x, w.input_amax[0], 8)))
    np.testing.assert_allclose(qmodel.predict(x, verbose=0), expected, atol=1e-6)


def test_concatenate_quantizes_each_input_with_its_own_range(tmp_path):
    a, b = keras.Input((3,)), keras.Input((3,))
    model = keras.Model([a, b], L.Concatenate(name="cat")([a, b]))
    xa = np.full((2, 3), 0.5, "float32")
    xb = np.linspace(-4, 4, 6).reshape(2, 3).astype("float32")
    qmodel = quantize_model(model, calibration_data=[xa, xb])
    (w,) = quantize_wrappers(qmodel)
    assert [float(v.numpy()) for v in w.input_amax] == [0.5, 4.0]
    qmodel.save(tmp_path / "c.keras")
    loaded = keras.models.load_model(tmp_path / "c.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded.predict([xa, xb], verbose=0), qmodel.predict([xa, xb], verbose=0))


def test_wrapper_errors_name_the_fix():
    with pytest.raises(ValueError, match="no quantizer"):
        QuantizeWrapper(L.Dense(2))
    with pytest.raises(ValueError, match="no weight attribute 'kernal'"):
        QuantizeWrapper(L.Dense(2), weight_quantizers={"kernal": TensorQuantizer(8, -1)})(np.ones((1, 3)))
    with pytest.raises(TypeError, match="keras.layers.Layer subclass"):
        register_layer(int)
    with pytest.raises(ValueError, match="`inputs` must be one of"):
        register_layer(L.MaxPooling2D, inputs="some")
