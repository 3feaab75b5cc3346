"""Swish, hard swish, sigmoid and Multiply layers as integer ops (`PlacementPolicy.quantize_elementwise`)."""

import keras
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qat_plugin as qp
from qat_plugin.models import compile_classifier
from qat_plugin.export._qdq_graph import (
    clips_into_quantize,
    constants_as_dequantized,
    identity_reshapes,
    scales_into_qdq,
)
from qat_plugin.quantizers import TensorQuantizer
from qat_plugin.wrappers import QuantizeWrapper, quantize_wrappers

L = keras.layers


def gated_net(seed=0, bare_hard_sigmoid=True, input_shape=(16, 16, 3)):
    """MobileNetV3 and EfficientNet in small: hard swish, swish, squeeze-and-excite, a sigmoid gate."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input(input_shape)
    x = L.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="c0")(inp)
    x = L.Activation("hard_swish", name="hswish")(L.BatchNormalization(name="bn0")(x))
    x = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = L.Activation("swish", name="swish")(L.BatchNormalization(name="bn1")(x))
    if bare_hard_sigmoid:  # MobileNetV3's squeeze-and-excite: its hard sigmoid is bare ops on a 1x1 map
        s = L.GlobalAveragePooling2D(keepdims=True, name="se_pool")(x)
        s = L.ReLU(name="se_relu")(L.Conv2D(8, 1, name="se_reduce")(s))
        s = L.ReLU(6.0, name="se_relu6")(L.Conv2D(16, 1, name="se_expand")(s) + 3.0) * (1.0 / 6.0)
        x = L.Multiply(name="se_mul")([x, s])
    gate = L.Activation("sigmoid", name="sigmoid")(L.Conv2D(16, 1, name="c1")(x))
    x = L.Conv2D(16, 1, name="c2")(L.Multiply(name="gate_mul")([x, gate]))
    model = keras.Model(inp, L.Dense(10, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))
    data = np.random.default_rng(seed).normal(size=(256, *input_shape)).astype(np.float32)
    for _ in range(3):  # BatchNorm statistics that are not the identity
        model(data[:64], training=True)
    return model, data


@pytest.fixture(scope="module")
def gated():
    model, data = gated_net()
    return model, data, qp.quantize_model(model, policy="onnxruntime", calibration_data=data[:64])


def labels(wrapper):
    return [r["label"] for r in wrapper.quantizer_ranges()]


def test_activations_and_multiplies_get_their_own_grids(gated):
    model, data, qmodel = gated
    for name in ("hswish", "swish", "sigmoid", "se_mul", "gate_mul"):
        assert isinstance(qmodel.get_layer(name), QuantizeWrapper), name
    hswish, swish, sigmoid = (qmodel.get_layer(n) for n in ("hswish", "swish", "sigmoid"))
    # The input is the conv's output grid, reused; the gate gets an unsigned grid of its own.
    assert labels(hswish) == labels(swish) == ["gate", "output"] and labels(sigmoid) == ["output"]
    assert hswish.gate_quantizer.unsigned and swish.gate_quantizer.unsigned
    assert 0 < float(hswish.gate_amax) <= 6
    assert sigmoid.output_quantizer.unsigned and not hswish.output_quantizer.unsigned
    # A sigmoid's grid is fixed, steps of 1/256 (TFLite's LOGISTIC's), through calibration.
    assert float(sigmoid.output_amax) == float(swish.gate_amax) == 255 / 256 == sigmoid.output_quantizer.fixed_amax
    # Input 0 is the swish's output grid; input 1 (the bare-op hard sigmoid) has none, so it gets one.
    assert labels(qmodel.get_layer("se_mul")) == ["input_1", "output"] and labels(qmodel.get_layer("gate_mul")) == ["output"]
    assert qmodel.qat_report.skipped["se_relu6"] == "not a quantizable kind"

    # With the quantizers off (as while calibrating), the split activations are Keras's own.
    for w in quantize_wrappers(qmodel):
        w._calibration_hook = lambda *args: None
    try:
        np.testing.assert_allclose(qmodel(data[:64]), model(data[:64], training=False), atol=1e-5)
    finally:
        for w in quantize_wrappers(qmodel):
            w._calibration_hook = None
    # With them on, the gate's grid is in the computation.
    x = np.random.default_rng(1).uniform(-5, 5, (1, 1, 200, 1)).astype(np.float32)
    wrapper = QuantizeWrapper(L.Activation("hard_swish"), gate_quantizer=TensorQuantizer(8, unsigned=True))
    wrapper(x)
    wrapper.gate_amax.assign(6.0)
    gate = np.clip(np.round(np.clip(x + 3, 0, 6) / (6 / 255)) * (6 / 255), 0, 6)
    np.testing.assert_allclose(wrapper(x), x * gate / 6, atol=1e-6)


def test_onnxruntime_runs_them_as_integer_ops(gated, tmp_path, monkeypatch):
    model, data, qmodel = gated
    report = qp.export_onnx(qmodel, tmp_path / "gated.onnx", validation_data=data)
    kernels = report.ort_kernels
    # hard swish: QLinearAdd + QLinearMul; swish: QLinearSigmoid + QLinearMul; two multiplies; one sigmoid.
    assert kernels["QLinearMul"] == 4 and kernels["QLinearSigmoid"] == 2, kernels
    assert report.float_compute == [] and kernels["QLinearConv"] == 6, kernels
    # The squeeze-and-excite's bare-op hard sigmoid too: its / 6 goes into a grid's scale, its ReLU6 into the grid.
    assert kernels["QLinearAdd"] == 2, kernels
    assert not {"Add", "Mul", "Clip", "Sigmoid", "QuickGelu", "Div"} & set(kernels), kernels
    # No layout change around the squeeze-and-excite's 1x1 maps (`identity_reshapes`); the only Reshapes
    # are the two around the folded stem conv (`fold_image_convs`).
    assert kernels.get("Transpose", 0) <= 1 and kernels.get("Reshape", 0) == 2 * len(report.folded_convs) == 2, kernels
    assert report.agreement == 1.0
    out = qp.run_onnx(report.path, data)
    step = float(qmodel.get_layer("head").output_amax) / 127
    off = np.abs(out - qmodel.predict(data, verbose=0)) / step
    assert off.max() <= 1.01 and (off > 0.5).mean() < 0.01, (off.max(), (off > 0.5).mean())

    # Without the three graph rewrites the same grids leave the activations in float, one step from the same output.
    import qat_plugin.export.onnx as onnx_export

    for name in ("clips_into_quantize", "scales_into_qdq", "constants_as_dequantized"):
        monkeypatch.setattr(onnx_export, name, lambda proto: 0)
    plain = qp.export_onnx(qmodel, tmp_path / "plain.onnx", validation_data=data)
    assert "QLinearAdd" not in plain.ort_kernels and plain.ort_kernels.get("Mul", 0) > 1, plain.ort_kernels
    assert np.abs(qp.run_onnx(plain.path, data) - out).max() <= 1.01 * step

    path = tmp_path / "gated.keras"
    qmodel.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(data[:32], verbose=0), qmodel.predict(data[:32], verbose=0))
    assert float(loaded.get_layer("hswish").gate_amax) == float(qmodel.get_layer("hswish").gate_amax)


def test_a_layers_own_swish_or_sigmoid_runs_after_an_integer_conv(tmp_path):
    # `Conv2D(..., activation="swish")`, EfficientNet's squeeze-and-excite convs: the conv ran in float, since
    # its output had a grid only after the activation.
    keras.utils.set_random_seed(2)
    inp = keras.Input((12, 12, 3))
    x = L.Conv2D(16, 3, padding="same", activation="swish", name="c0")(inp)
    x = L.Conv2D(16, 1, activation="hard_swish", name="c1")(x)
    x = L.Multiply(name="mul")([x, L.Conv2D(16, 1, activation="sigmoid", name="c2")(x)])
    x = L.Dense(16, activation="swish", name="d1")(L.GlobalAveragePooling2D(name="gap")(x))
    model = keras.Model(inp, L.Dense(10, name="head")(x))
    data = np.random.default_rng(2).normal(size=(128, 12, 12, 3)).astype(np.float32)
    qmodel = qp.quantize_model(model, policy="onnxruntime", calibration_data=data[:64])
    assert labels(qmodel.get_layer("c1")) == ["weight", "intermediate", "gate", "output"]
    assert labels(qmodel.get_layer("c2")) == ["weight", "intermediate", "output"]
    for w in quantize_wrappers(qmodel):  # quantizers off: the layers' own activations, split or not
        w._calibration_hook = lambda *args: None
    try:
        np.testing.assert_allclose(qmodel(data), model(data), atol=1e-5)
    finally:
        for w in quantize_wrappers(qmodel):
            w._calibration_hook = None
    report = qp.export_onnx(qmodel, tmp_path / "acts.onnx", validation_data=data)
    kernels = report.ort_kernels
    assert report.float_compute == [] and kernels["QLinearConv"] == 3 and kernels["QLinearMatMul"] == 2, kernels
    assert kernels["QLinearSigmoid"] == 3 and kernels["QLinearMul"] == 4 and kernels["QLinearAdd"] == 1, kernels
    assert report.agreement == 1.0

    tflite = qp.export_tflite(
        qp.quantize_model(model, policy="tflite", calibration_data=data[:64]), tmp_path / "acts.tflite", validation_data=data
    )
    ops = tflite.op_histogram
    assert tflite.fully_int8 and ops["HARD_SWISH"] == 1 and ops["LOGISTIC"] == 3, ops


def test_tflite_gets_int8_hard_swish_logistic_and_mul(tmp_path, digits):
    model, _ = gated_net(bare_hard_sigmoid=False, input_shape=(8, 8, 1))
    compile_classifier(model).fit(digits[0], digits[1], batch_size=32, epochs=5, verbose=0)
    data = digits[2]
    qmodel = qp.quantize_model(model, policy="tflite", calibration_data=digits[0][:256])
    # TFLite fuses a hard swish into its own op: no grid on the gate there.
    assert labels(qmodel.get_layer("hswish")) == ["output"]
    report = qp.export_tflite(qmodel, tmp_path / "gated.tflite", validation_data=data)
    ops = report.op_histogram
    assert report.fully_int8 and report.agreement == 1.0, report
    assert ops["HARD_SWISH"] == 1 and ops["LOGISTIC"] == 2 and ops["MUL"] == 2, ops
    # LOGISTIC writes our sigmoid grid: no requantize after it, only the input's QUANTIZE.
    assert ops["QUANTIZE"] == 1, ops


def test_switch_inside_fit_calibrates_the_gates():
    model, data = gated_net()
    labels_ = np.random.default_rng(0).integers(0, 10, len(data))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = qp.QATCallback(start_epoch=1, policy="onnxruntime", calibration_data=data[:64], verbose=0)
    history = model.fit(data, labels_, batch_size=32, epochs=2, callbacks=[cb], verbose=0)
    assert history.history["qat_phase"] == [0, 1] and np.isfinite(history.history["loss"]).all()
    assert 0 < float(model.get_layer("hswish").gate_amax) <= 6


def test_tensorrt_keeps_them_float_and_unsupported_ones_say_why():
    model, data = gated_net()
    report = qp.quantize_model(model, policy="tensorrt").qat_report
    assert report.skipped["hswish"] == "policy 'tensorrt' leaves Activation layers in float"
    assert report.skipped["se_mul"] == "policy 'tensorrt' leaves Multiply layers in float"
    with pytest.raises(qp.SpecError, match=r"'hswish' \(Activation\) is selected.*policy 'tensorrt'.*quantize_elementwise"):
        qp.quantize_model(model, qp.QuantizationSpec(layers=["c0", "hswish"]), policy="tensorrt")
    with pytest.raises(qp.SpecError, match=r"quantize_elementwise=True.*quantize_outputs=True"):
        qp.PlacementPolicy("mine", quantize_elementwise=True)
    with pytest.raises(ValueError, match="separable convs and for layers whose own activation is one of"):
        QuantizeWrapper(L.Dense(3), intermediate_quantizer=TensorQuantizer(8))
    with pytest.raises(ValueError, match="`gate_quantizer` is for swish activations"):
        QuantizeWrapper(L.Activation("sigmoid"), gate_quantizer=TensorQuantizer(8))

    inp = keras.Input((8, 8, 4))
    x = L.Conv2D(4, 1, name="conv")(inp)
    y = L.Multiply(name="mul3")([x, x, inp])
    net = keras.Model(inp, L.Activation("gelu", name="gelu")(y))
    skipped = qp.quantize_model(net, policy="onnxruntime").qat_report.skipped
    assert skipped["mul3"] == "it multiplies 3 tensors, and integer runtimes multiply two at a time"
    assert skipped["gelu"].startswith("it computes 'gelu', and only ['hard_silu', 'sigmoid', 'silu'] run as integer ops")
    with pytest.raises(qp.SpecError, match=r"'gelu' \(Activation\) is selected.*computes 'gelu'"):
        qp.quantize_model(net, qp.QuantizationSpec(layers=["gelu"]), policy="onnxruntime")


# ------------------------------------------------------------------ the graph rewrites, on hand-built graphs


def graph(nodes, inits, out_type=TensorProto.UINT8):
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", out_type, [4])], [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def run(model, x):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def clip_then_q(high, scale, zero_point):
    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["c"]), helper.make_node("QuantizeLinear", ["c", "s", "z"], ["y"])]
    return graph(nodes, {"lo": np.float32(0), "hi": np.float32(high), "s": np.float32(scale), "z": np.uint8(zero_point)})


@pytest.mark.parametrize("high,scale,zero_point,dropped", [
    (6.0, 6 / 255, 0, True),  # the grid's top is the clip's (to a float rounding)
    (6.0, 4 / 255, 0, True),  # inside it: the grid saturates first
    (6.0, 8 / 255, 0, False),  # beyond it: the clip cuts levels off
    (6.0, 6 / 255, 128, False),  # a signed grid: the clip at 0 cuts levels off
])
def test_clips_into_quantize_drops_only_clips_the_grid_makes_redundant(high, scale, zero_point, dropped):
    model = clip_then_q(high, scale, zero_point)
    x = np.array([-7.0, 2.9, 5.99, 9.0], np.float32)
    before = run(model, x)
    assert clips_into_quantize(model) == int(dropped)
    assert any(n.op_type == "Clip" for n in model.graph.node) != dropped
    if dropped:
        np.testing.assert_array_equal(run(model, x), before)


@pytest.mark.parametrize("constant", [3.0, -0.5, 0.0])
def test_constants_as_dequantized_keeps_the_constants_value(constant):
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
        helper.make_node("Add", ["d", "c"], ["a"]),
        helper.make_node("QuantizeLinear", ["a", "s", "z"], ["y"]),
    ]
    model = graph(nodes, {"s": np.float32(0.05), "z": np.uint8(128), "c": np.array([constant], np.float32)})
    x = np.array([-3.0, -0.1, 0.7, 2.0], np.float32)
    before = run(model, x)
    assert constants_as_dequantized(model) == 1
    add = next(n for n in model.graph.node if n.op_type == "Add")
    dq = next(n for n in model.graph.node if n.output[0] == add.input[1])
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    codes, scale, zp = (values[name] for name in dq.input)
    assert codes.dtype == zp.dtype == np.uint8  # the other input's type, as QLinearAdd needs
    assert ((codes.astype(np.float32) - zp.astype(np.float32)) * scale).tolist() == [constant]
    np.testing.assert_array_equal(run(model, x), before)


def test_scales_into_qdq_folds_positive_scalar_scales_only():
    def dq_then(op, constant, constant_first=False):
        inputs = ["c", "d"] if constant_first else ["d", "c"]
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
            helper.make_node(op, inputs, ["m"]),
            helper.make_node("QuantizeLinear", ["m", "s", "z"], ["y"]),
        ]
        return graph(nodes, {"s": np.float32(0.05), "z": np.uint8(0), "c": np.float32(constant)})

    x = np.array([0.0, 0.5, 3.0, 6.0], np.float32)
    for op, constant, first in (("Div", 6.0, False), ("Mul", 1 / 6, True), ("Mul", 2.5, False)):
        model = dq_then(op, constant, first)
        before = run(model, x)
        assert scales_into_qdq(model) == 1 and op not in [n.op_type for n in model.graph.node]
        np.testing.assert_array_equal(run(model, x), before)
    for op, constant, first in (("Div", 6.0, True), ("Mul", -2.0, False)):  # 6 / x and a sign flip stay
        assert scales_into_qdq(dq_then(op, constant, first)) == 0
    # No DequantizeLinear before it: the scale goes into the QuantizeLinear after it, whose DQs keep theirs.
    nodes = [helper.make_node("Mul", ["x", "c"], ["m"]), helper.make_node("QuantizeLinear", ["m", "s", "z"], ["y"])]
    model = graph(nodes, {"s": np.float32(0.05), "z": np.uint8(0), "c": np.float32(1 / 6)})
    before = run(model, x * 5)
    assert scales_into_qdq(model) == 1 and [n.op_type for n in model.graph.node] == ["QuantizeLinear"]
    np.testing.assert_array_equal(run(model, x * 5), before)


def test_identity_reshapes_bypasses_only_chains_that_give_back_their_shape():
    def squeeze_then_reshape(target):
        nodes = [
            helper.make_node("Squeeze", ["x", "axes"], ["s"]),
            helper.make_node("Reshape", ["s", "shape"], ["r"]),
            helper.make_node("Relu", ["r"], ["y"]),
        ]
        g = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 1, 1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(np.array([2, 3], np.int64), "axes"), numpy_helper.from_array(np.array(target, np.int64), "shape")],
        )
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    x = np.random.default_rng(0).normal(size=(2, 3, 1, 1)).astype(np.float32)
    model = squeeze_then_reshape([-1, 3, 1, 1])  # EfficientNet's pooled vector made a map again
    before = run(model, x)
    assert identity_reshapes(model) == 1 and [n.op_type for n in model.graph.node] == ["Relu"]
    np.testing.assert_array_equal(run(model, x), before)
    assert identity_reshapes(squeeze_then_reshape([-1, 1, 1, 3])) == 0  # a real layout change stays
