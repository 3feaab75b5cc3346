"""ONNX export on real digits: Q/DQ placement, int8 weights, file size, agreement with Keras."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tensorflow as tf
import tf2onnx
from onnx import helper, numpy_helper

import qat_plugin as qp
from qat_plugin import ExportError
from qat_plugin.export.onnx import export_onnx, qdq_pairs, quantize_like_onnx, verify_onnx
from qat_plugin.wrappers import quantize_wrappers

L = keras.layers


def mnist_cnn(seed: int = 0) -> keras.Model:
    """Conv-BN-ReLU, pool, residual add, strided conv, two dense layers: 108k weights."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((28, 28, 1), name="image")
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inp)
    x = L.ReLU(name="relu1")(L.BatchNormalization(name="bn1")(x))
    x = L.MaxPooling2D(name="pool1")(x)
    y = L.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    x = L.Add(name="add")([x, y])
    x = L.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="conv3")(x)
    x = L.Dense(64, activation="relu", name="fc")(L.Flatten(name="flatten")(x))
    return keras.Model(inp, L.Dense(10, name="head")(x), name="mnist_cnn")


def digits_cnn(seed: int = 0) -> keras.Model:
    """For 8x8 digits: conv, conv, dense (Sequential on purpose: tf2onnx alone can't name its outputs)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1), name="image"),
            L.Conv2D(16, 3, activation="relu", name="conv1"),
            L.Conv2D(32, 3, activation="relu", name="conv2"),
            L.Flatten(),
            L.Dense(10, name="head"),
        ]
    )


def train(model: keras.Model, x, y, epochs: int = 1) -> keras.Model:
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    return model


@pytest.fixture(scope="module")
def exported(mnist, tmp_path_factory):
    """A CNN trained on 4,000 MNIST digits, quantized, both versions exported and checked on 2,000 more."""
    x_train, y_train, x_test, _ = mnist
    model = train(mnist_cnn(), x_train[:4000], y_train[:4000])
    qmodel = qp.quantize_model(model, calibration_data=x_train[:512])
    folder = tmp_path_factory.mktemp("onnx")
    fp32 = export_onnx(model, folder / "fp32.onnx", validation_data=x_test)
    int8 = export_onnx(qmodel, folder / "int8.onnx", validation_data=x_test)
    return {"model": model, "qmodel": qmodel, "fp32": fp32, "int8": int8, "x_test": x_test}


def int8_weight(pair, proto) -> np.ndarray:
    """The int8 initializer a weight pair dequantizes."""
    dq = next(n for n in proto.graph.node if n.name == pair.name)
    return next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == dq.input[0])


def dequantized(pair, proto) -> np.ndarray:
    """The float weight the consumer of a weight pair sees."""
    q = int8_weight(pair, proto).astype(np.float32)
    scale = np.asarray(pair.scale, np.float32)
    return q * (scale[0] if pair.axis is None else scale.reshape([-1 if i == pair.axis else 1 for i in range(q.ndim)]))


def channel_max(q: np.ndarray, axis: int) -> list[int]:
    """Largest |level| of every channel along `axis`."""
    return np.abs(q.astype(int)).max(axis=tuple(i for i in range(q.ndim) if i != axis)).tolist()


# ------------------------------------------------------------------ the MNIST model


def test_int8_file_runs_like_the_keras_model(exported):
    report, qmodel = exported["int8"], exported["qmodel"]
    assert report.num_samples == 2000
    assert report.agreement >= 0.999, report
    # Logits span about +-15. onnxruntime runs the pairs as integer kernels
    # (QLinearConv...) that requantize on their own, which moves them by much less.
    assert report.max_abs_diff < 0.05, report
    n_weights = sum(i.label.startswith("weight") for i in qp.list_quantizers(qmodel))
    assert report.num_qdq_weights == n_weights == 5
    assert report.input_names == ("image",) and report.output_names == ("head",)
    assert report.opset == 17 and report.file_bytes == Path(report.path).stat().st_size


def test_int8_file_is_under_0_3_of_fp32(exported):
    fp32, int8 = exported["fp32"], exported["int8"]
    assert fp32.num_qdq_inputs == fp32.num_qdq_weights == 0
    assert fp32.agreement == 1.0 and fp32.max_abs_diff < 1e-4
    assert int8.file_bytes / fp32.file_bytes <= 0.3, (int8.file_bytes, fp32.file_bytes)
    # No float copy of any kernel is left (the smallest has 144 weights; biases and BN 64 at most).
    proto = onnx.load(int8.path)
    big = [t for t in proto.graph.initializer if np.prod(t.dims) > 100]
    assert [t.name for t in big if t.data_type != onnx.TensorProto.INT8] == []


def test_weights_are_int8_per_channel_on_the_output_axis(exported):
    proto, qmodel = onnx.load(exported["int8"].path), exported["qmodel"]
    weights = [p for p in qdq_pairs(proto) if p.kind == "weight"]
    for p in weights:
        assert p.producer == "initializer" and p.dtype == "int8" and set(p.zero_point) == {0}
        assert len(p.consumers) == 1 and p.consumers[0][1] == 1  # the consumer's weight input itself
        assert p.axis == {"Conv": 0, "MatMul": 1}[p.consumers[0][0]]
        assert p.scale_shape == (p.weight_shape[p.axis],)
        # Each channel's largest weight lands on 127: the scale is that channel's amax / 127.
        assert channel_max(int8_weight(p, proto), p.axis) == [127] * p.scale_shape[0]
    # One scale per output channel of each Keras layer.
    layers = [w.layer for w in quantize_wrappers(qmodel) if w.weight_quantizers]
    channels = sorted(getattr(layer, "filters", None) or layer.units for layer in layers)
    assert sorted(p.scale_shape[0] for p in weights) == channels == [10, 16, 16, 32, 64]


def test_dequantized_weights_equal_the_keras_fake_quantized_kernels(exported):
    proto, qmodel = onnx.load(exported["int8"].path), exported["qmodel"]
    pairs = {p.weight_shape: p for p in qdq_pairs(proto) if p.kind == "weight"}
    for w in quantize_wrappers(qmodel):
        for attr, quantizer in w.weight_quantizers.items():
            kernel = np.asarray(quantizer(np.asarray(getattr(w.layer, attr))))
            expected = kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel  # HWIO -> OIHW
            np.testing.assert_allclose(dequantized(pairs[expected.shape], proto), expected, atol=1e-6)


def test_activation_pairs_are_adjacent_with_the_calibrated_scales(exported):
    proto, qmodel = onnx.load(exported["int8"].path), exported["qmodel"]
    acts = [p for p in qdq_pairs(proto) if p.kind == "activation"]
    for p in acts:
        assert p.producer == "QuantizeLinear" and p.dtype == "int8" and p.zero_point == (0,) and p.scale_shape == ()
    amax = [float(i.amax) for i in qp.list_quantizers(qmodel) if not i.label.startswith("weight")]
    # tf2onnx merges the two pairs on the pooled tensor (read by conv2 and by
    # the add, same range) into one: 6 quantizers, 5 pairs.
    assert len(amax) == 6 and len(acts) == 5
    ranges = np.array([p.scale[0] * 127 for p in acts])
    for a in amax:  # every calibrated range is in the file, as scale = amax / 127
        assert np.min(np.abs(ranges - a)) <= 1e-5 * a, (a, ranges)
    consumers = sorted(op for p in acts for op in p.consumer_types)
    assert consumers == ["Add", "Conv", "Conv", "Conv", "MatMul", "MatMul"]


# ------------------------------------------------------------------ errors


def test_a_tampered_scale_is_caught(exported, tmp_path):
    proto = onnx.load(exported["int8"].path)
    head = next(p for p in qdq_pairs(proto) if p.weight_shape == (64, 10))
    dq = next(n for n in proto.graph.node if n.name == head.name)
    scale = next(t for t in proto.graph.initializer if t.name == dq.input[1])
    scale.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(scale), scale.name))
    bad = tmp_path / "tampered.onnx"
    onnx.save(proto, bad)
    with pytest.raises(ExportError, match=r"tampered\.onnx \(kept for inspection\) agrees .* on \d+\.\d+%") as info:
        verify_onnx(exported["qmodel"], bad, exported["x_test"][:500])
    agreement = float(str(info.value).split(" on ")[1].split("%")[0]) / 100
    assert agreement < 0.5


def test_export_raises_and_keeps_the_file_when_onnx_disagrees(exported, tmp_path, monkeypatch):
    import qat_plugin.export.onnx as onnx_export

    real = onnx_export.rewrite_qdq

    def rewrite_then_reverse_channel_scales(proto, weight_bits=None):
        found = real(proto, weight_bits)
        for t in proto.graph.initializer:
            a = numpy_helper.to_array(t)
            if t.data_type == onnx.TensorProto.FLOAT and t.name.endswith("_scale") and a.size > 1:
                t.CopyFrom(numpy_helper.from_array(a[::-1].copy(), t.name))
        return found

    monkeypatch.setattr(onnx_export, "rewrite_qdq", rewrite_then_reverse_channel_scales)
    path = tmp_path / "wrong.onnx"
    with pytest.raises(ExportError, match="wrong.onnx \\(kept for inspection\\)"):
        export_onnx(exported["qmodel"], path, validation_data=exported["x_test"][:500])
    assert path.stat().st_size > 0


def test_uncalibrated_model_is_refused(tmp_path):
    model = keras.Sequential([keras.Input((8, 8, 1)), L.Flatten(), L.Dense(10, name="fc")])
    with pytest.raises(ExportError, match="calibrate"):
        export_onnx(qp.quantize_model(model), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_bad_arguments_fail_before_converting(tmp_path):
    model = keras.Sequential([keras.Input((4,)), L.Dense(2)])
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "m.onnx", opset=11)
    with pytest.raises(ValueError, match="min_agreement"):
        export_onnx(model, tmp_path / "m.onnx", min_agreement=99)
    with pytest.raises(ValueError, match="batch_size"):
        export_onnx(model, tmp_path / "m.onnx", batch_size=0)
    with pytest.raises(ValueError, match="input_signature"):
        export_onnx(model, tmp_path / "m.onnx", input_signature=[(None, 4)])
    assert not (tmp_path / "m.onnx").exists()


def test_missing_converter_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # makes `import tf2onnx` fail
    with pytest.raises(ImportError, match="pip install tf2onnx"):
        export_onnx(keras.Sequential([keras.Input((4,)), L.Dense(2)]), tmp_path / "m.onnx")


def test_no_module_imports_the_converters_at_import_time():
    # Only module-level imports count: inside functions they load when exporting.
    heavy = {"tf2onnx", "onnx", "onnxruntime"}
    offenders = []
    for path in Path(qp.__file__).parent.rglob("*.py"):
        for stmt in ast.parse(path.read_text()).body:
            if isinstance(stmt, ast.Import):
                names = [a.name for a in stmt.names]
            elif isinstance(stmt, ast.ImportFrom):
                names = [stmt.module or ""]
            else:
                continue
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in heavy]
    assert offenders == []


# ------------------------------------------------------------------ bits, signatures, inputs


def test_4_bit_weights_are_exact(digits, tmp_path):
    x_train, y_train, x_test, _ = digits
    model = train(digits_cnn(), x_train, y_train, epochs=3)
    qmodel = qp.quantize_model(model, qp.QuantizationSpec(weight_bits=4), calibration_data=x_train[:256])
    report = export_onnx(qmodel, tmp_path / "w4.onnx", validation_data=x_test)
    assert report.agreement >= 0.999 and report.max_abs_diff < 0.05, report
    proto = onnx.load(report.path)
    weights = [p for p in qdq_pairs(proto) if p.kind == "weight"]
    assert len(weights) == 3
    for p in weights:  # the 4-bit grid, -7..7, stored as int8; every channel reaches 7
        assert channel_max(int8_weight(p, proto), p.axis) == [7] * p.scale_shape[0]
    # What tf2onnx alone writes ignores num_bits: an 8-bit grid, far off the Keras model.
    functional = keras.Model(qmodel.inputs[0], qmodel.outputs[0])
    raw, _ = tf2onnx.convert.from_keras(functional, opset=17)
    session = ort.InferenceSession(raw.SerializeToString(), providers=["CPUExecutionProvider"])
    raw_out = session.run(None, {session.get_inputs()[0].name: x_test})[0]
    assert np.abs(raw_out - qmodel.predict(x_test, verbose=0)).max() > 10 * report.max_abs_diff


def test_low_bit_activations_are_refused(digits, tmp_path):
    x_train = digits[0]
    qmodel = qp.quantize_model(digits_cnn(), qp.QuantizationSpec(activation_bits=6), calibration_data=x_train[:256])
    with pytest.raises(ExportError, match="8 bits"):
        export_onnx(qmodel, tmp_path / "a6.onnx")


def test_per_tensor_weights_have_one_scale(digits, tmp_path):
    x_train, y_train, x_test, _ = digits
    model = train(digits_cnn(), x_train, y_train, epochs=2)
    qmodel = qp.quantize_model(model, qp.QuantizationSpec(per_channel=False), calibration_data=x_train[:256])
    report = export_onnx(qmodel, tmp_path / "pt.onnx", validation_data=x_test)
    assert report.agreement >= 0.999, report
    weights = [p for p in qdq_pairs(report.path) if p.kind == "weight"]
    assert len(weights) == 3
    assert all(p.scale_shape == () and p.axis is None and p.dtype == "int8" and p.zero_point == (0,) for p in weights)


def test_a_given_input_signature_fixes_the_batch(digits, tmp_path):
    x_train = digits[0]
    qmodel = qp.quantize_model(digits_cnn(), calibration_data=x_train[:256])
    signature = [tf.TensorSpec((4, 8, 8, 1), tf.float32, name="pixels")]
    report = export_onnx(
        qmodel, tmp_path / "b4.onnx", input_signature=signature, validation_data=x_train[:64], batch_size=4
    )
    assert report.input_names == ("pixels",) and report.num_samples == 64
    dims = onnx.load(report.path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [4, 8, 8, 1]


def test_quantize_like_onnx_matches_onnxruntime():
    rng = np.random.default_rng(0)
    scale = np.array([0.1, 0.25, 0.02], np.float32)
    # Near half-way points (k + 0.5) * scale test the rounding, +-300 the saturation.
    halves = (np.arange(-8, 8)[:, None] + 0.5) * scale
    w = np.concatenate([rng.normal(0, 3, (50, 3)), halves, [[300, -300, 3]]]).astype(np.float32)
    zp = np.zeros(3, np.int8)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"], axis=1)],
        "q",
        [helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, w.shape)],
        [helper.make_tensor_value_info("q", onnx.TensorProto.INT8, w.shape)],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(quantize_like_onnx(w, scale, zp, axis=1), session.run(None, {"w": w})[0])


def test_multi_input_model(digits, tmp_path):
    x_train, y_train, x_test, _ = digits
    keras.utils.set_random_seed(0)
    image, flat = keras.Input((8, 8, 1), name="image"), keras.Input((64,), name="pixels")
    a = L.Flatten()(L.Conv2D(8, 3, activation="relu", name="conv")(image))
    b = L.Dense(16, activation="relu", name="fc")(flat)
    model = keras.Model([image, flat], L.Dense(10, name="head")(L.Concatenate(name="cat")([a, b])))

    def data(x):
        return [x, x.reshape(len(x), 64)]

    train(model, data(x_train), y_train, epochs=2)
    qmodel = qp.quantize_model(model, calibration_data=data(x_train[:256]))
    report = export_onnx(qmodel, tmp_path / "two.onnx", validation_data=data(x_test))
    assert report.input_names == ("image", "pixels") and report.num_qdq_weights == 3
    assert report.agreement >= 0.999 and report.num_samples == len(x_test), report
    by_name = verify_onnx(qmodel, report.path, dict(zip(report.input_names, data(x_test))))
    assert by_name == (report.agreement, report.max_abs_diff, report.num_samples)
    with pytest.raises(ExportError, match="one non-empty array per model input"):
        verify_onnx(qmodel, report.path, x_test)


# ------------------------------------------------------------------ every layer kind


def _kinds():
    """(name, layer, {weight attribute: its layout in ONNX from the Keras kernel}, consumer, axis)."""
    oihw = lambda k: k.transpose(3, 2, 0, 1)  # noqa: E731  HWIO -> OIHW
    # (h, w, in, multiplier) -> (in * multiplier, 1, h, w): each input channel's
    # scale is repeated for its `multiplier` output channels.
    depthwise = lambda k: oihw(k.reshape(3, 3, 1, -1))  # noqa: E731
    same = lambda k: k  # noqa: E731
    # (k, in, out) -> (out, in, 1, k): tf2onnx runs Conv1D as a Conv2D of height 1.
    conv1d = lambda k: k.transpose(2, 1, 0)[:, :, None]  # noqa: E731
    return [
        ("conv1d", lambda: L.Conv1D(8, 3, name="k"), {"_kernel": conv1d}, "Conv", 0),
        ("conv2d", lambda: L.Conv2D(8, 3, name="k"), {"_kernel": oihw}, "Conv", 0),
        ("depthwise", lambda: L.DepthwiseConv2D(3, depth_multiplier=2, name="k"), {"kernel": depthwise}, "Conv", 0),
        (
            "separable",
            lambda: L.SeparableConv2D(8, 3, depth_multiplier=2, name="k"),
            {"depthwise_kernel": depthwise, "pointwise_kernel": oihw},
            "Conv",
            0,
        ),
        # (h, w, out, in) -> (in, out, h, w): the output channel is axis 1.
        ("conv2d_transpose", lambda: L.Conv2DTranspose(8, 3, 2, name="k"), {"kernel": oihw}, "ConvTranspose", 1),
        ("dense", lambda: L.Dense(8, name="k"), {"_kernel": same}, "MatMul", 1),
        ("einsum_dense", lambda: L.EinsumDense("abc,cd->abd", (8, 8), name="k"), {"_kernel": same}, "MatMul", 1),
    ]


@pytest.mark.parametrize("name,make,layouts,op,axis", _kinds(), ids=[k[0] for k in _kinds()])
def test_every_layer_kind_gets_its_dq_on_the_weight_input(name, make, layouts, op, axis, digits, tmp_path):
    x_train, y_train, x_test, _ = digits
    keras.utils.set_random_seed(0)
    if op == "MatMul":  # rows of the image as a sequence of 8 vectors
        shape, x, x_val, first = (8, 8), x_train[..., 0], x_test[..., 0], []
    elif name == "conv1d":
        shape, x, x_val, first = (64, 1), x_train.reshape(-1, 64, 1), x_test.reshape(-1, 64, 1), []
    else:  # four channels in, so a depthwise kernel has four scales to place
        shape, x, x_val, first = (8, 8, 1), x_train, x_test, [L.Conv2D(4, 1, name="pre")]
    model = keras.Sequential([keras.Input(shape), *first, make(), L.Flatten(), L.Dense(10, name="head")])
    qmodel = qp.quantize_model(train(model, x, y_train, epochs=2), calibration_data=x[:256])
    report = export_onnx(qmodel, tmp_path / f"{name}.onnx", validation_data=x_val)
    assert report.agreement >= 0.999 and report.max_abs_diff < 0.05, report

    proto = onnx.load(report.path)
    pairs = qdq_pairs(proto)
    assert all(p.producer in ("initializer", "QuantizeLinear") for p in pairs), pairs
    wrapper = qmodel.get_layer("k")
    assert sorted(wrapper.weight_quantizers) == sorted(layouts)
    for attr, quantizer in wrapper.weight_quantizers.items():
        expected = layouts[attr](np.asarray(quantizer(np.asarray(getattr(wrapper.layer, attr)))))
        pair = next(p for p in pairs if p.weight_shape == expected.shape and p.consumer_types == (op,))
        assert pair.consumers == ((op, 1),) and pair.axis == axis and pair.dtype == "int8"
        assert pair.scale_shape == (expected.shape[axis],) and set(pair.zero_point) == {0}
        np.testing.assert_allclose(dequantized(pair, proto), expected, atol=1e-6)


def test_grouped_convs_and_exact_gelu_export(digits, tmp_path):
    """ConvNeXt's two blockers in tf2onnx: Keras traces a grouped conv inside an XLA function, which tf2onnx left as
    a StatefulPartitionedCall, and the exact GELU is TensorFlow's Erfc, which tf2onnx can't convert."""
    from keras.src.backend.tensorflow import nn as tf_nn

    x_train, _, x_test, _ = digits
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1), name="image")
    h = L.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inp)
    h = L.Conv2D(8, 3, padding="same", groups=4, name="grouped")(h)
    h = L.Activation("gelu", name="gelu")(h)  # approximate=False, Keras's default
    model = keras.Model(inp, L.Dense(10, name="head")(L.GlobalAveragePooling2D(name="gap")(h)))
    original = tf_nn.conv

    report = export_onnx(model, tmp_path / "fp32.onnx", validation_data=x_test)
    graph = onnx.load(report.path).graph
    assert not [n.op_type for n in graph.node if "Call" in n.op_type]
    groups = [a.i for n in graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
    assert 4 in groups and "Erf" in {n.op_type for n in graph.node}
    assert report.agreement == 1.0 and report.max_abs_diff < 1e-4
    assert tf_nn.conv is original  # Keras traces grouped convs with XLA again after the export
    assert model.predict(x_test[:4], verbose=0).shape == (4, 10)

    qmodel = qp.quantize_model(model, policy="onnxruntime", calibration_data=x_train[:256])
    report = export_onnx(qmodel, tmp_path / "int8.onnx", validation_data=x_test)
    assert report.ort_kernels["QLinearConv"] == 2 and report.agreement >= 0.99
