"""The onnxruntime (CPU) placement: BatchNorm folded, ReLU fused, one quantizer per tensor, integer kernels."""

import keras
import numpy as np
import onnx
import pytest

import qat_plugin as qp
from qat_plugin.errors import ExportError
from qat_plugin.models import compile_classifier, depthwise_cnn, resnet8
from qat_plugin.wrappers import Absorbed, QuantizeWrapper, quantize_wrappers

L = keras.layers


def trained_resnet8(digits, epochs=3):
    x, y = digits[0], digits[1]
    model = compile_classifier(resnet8(input_shape=(8, 8, 1), seed=0))
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    return model


@pytest.fixture(scope="module")
def resnet(digits):
    return trained_resnet8(digits)


def test_plan_folds_batchnorm_fuses_relu_and_quantizes_each_tensor_once(resnet, digits):
    qmodel = qp.quantize_model(resnet, policy="onnxruntime", calibration_data=digits[0][:256])
    skipped = qmodel.qat_report.skipped
    assert skipped["bn1"] == "folded into 'conv1'" and skipped["relu1"] == "fused into 'conv1'"
    assert skipped["stack1_relu2"] == "fused into 'stack1_add'"  # the ReLU after a residual add
    assert isinstance(qmodel.get_layer("bn1"), Absorbed)
    by_name = {w.name: w for w in quantize_wrappers(qmodel)}
    # Only the model's input is quantized on the way in; every other input is a producer's output.
    assert [n for n, w in by_name.items() if any(w.input_quantizers)] == ["conv1"]
    assert all(w.output_quantizer is not None for w in by_name.values())
    # Unsigned after a ReLU, signed where the tensor can be negative.
    assert by_name["conv1"].output_quantizer.unsigned and by_name["stack1_add"].output_quantizer.unsigned
    assert not by_name["stack1_conv2"].output_quantizer.unsigned and not by_name["head"].output_quantizer.unsigned
    assert by_name["stack1_conv2"].batchnorm.name == "stack1_bn2" and by_name["stack1_conv2"].activation is None


def test_folded_wrapper_computes_conv_batchnorm_relu_exactly(resnet, digits):
    x = digits[2][:64]
    qmodel = qp.quantize_model(resnet, policy="onnxruntime")
    # With the calibration hook set, wrappers compute in float: the folded
    # conv must then equal the original conv -> BN(inference) -> ReLU.
    for w in quantize_wrappers(qmodel):
        w._calibration_hook = lambda *args: None
    try:
        folded = keras.Model(qmodel.input, qmodel.get_layer("stack2_conv1").output)(x)
    finally:
        for w in quantize_wrappers(qmodel):
            w._calibration_hook = None
    reference = keras.Model(resnet.input, resnet.get_layer("stack2_relu1").output)(x)
    np.testing.assert_allclose(folded, reference, atol=1e-5)
    # The weight quantizer sees the folded kernel (its range is the folded kernel's).
    conv = qmodel.get_layer("stack2_conv1")
    bn = resnet.get_layer("stack2_bn1")
    scale = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    expected = np.abs(resnet.get_layer("stack2_conv1").kernel.numpy() * scale).max(axis=(0, 1, 2))
    row = next(r for r in conv.quantizer_ranges() if r["label"] == "weight")
    np.testing.assert_allclose(row["amax"], expected, rtol=1e-5)


def test_depthwise_kernels_fold_per_output_channel(digits):
    keras.utils.set_random_seed(1)
    inp = keras.Input((8, 8, 4))
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False, name="dw")(inp)
    x = L.BatchNormalization(name="bn")(x)
    model = keras.Model(inp, L.ReLU(name="relu")(x))
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.random.randn(8).astype("float32"))
    bn.moving_variance.assign(np.random.rand(8).astype("float32") + 0.5)
    bn.gamma.assign(np.random.randn(8).astype("float32"))
    data = np.random.rand(16, 8, 8, 4).astype("float32")
    qmodel = qp.quantize_model(model, policy="onnxruntime")
    wrapper = qmodel.get_layer("dw")
    wrapper._calibration_hook = lambda *args: None
    np.testing.assert_allclose(qmodel(data), model(data), atol=1e-5)


def test_onnxruntime_export_runs_every_conv_in_an_integer_kernel(resnet, digits, tmp_path):
    x_train, _, x_test, y_test = digits
    qmodel = qp.quantize_model(resnet, policy="onnxruntime", calibration_data=x_train[:256])
    report = qp.export_onnx(qmodel, tmp_path / "cpu.onnx", validation_data=x_test)
    assert report.runtime == "onnxruntime" and report.agreement >= 0.99
    assert report.ort_kernels["QLinearConv"] == 9 and report.float_compute == [], report.ort_kernels
    assert report.ort_kernels["QLinearAdd"] == 3
    # The 1-channel input conv reads the digits in blocks of 4 columns (a Reshape), as a 4-channel image.
    assert list(report.folded_convs.values()) == [4] and report.widened_convs == {}
    assert "MatMul" not in report.ort_kernels and report.ort_kernels["Reshape"] == 2, report.ort_kernels
    # The pooled features reach the head with no Transpose (pooled_squeezes_channels_last).
    assert "Transpose" not in report.ort_kernels, report.ort_kernels
    # Activations are uint8 (onnxruntime's x86 kernels take no int8 activations); weights int8, zero point 0.
    pairs = qp.qdq_pairs(report.path)
    assert {p.dtype for p in pairs if p.kind == "activation"} == {"uint8"}
    assert {(p.dtype, max(map(abs, p.zero_point))) for p in pairs if p.kind == "weight"} == {("int8", 0)}
    # Conv weights leave their all-zero zero points to ONNX's default (a smaller file), and still fuse (above).
    graph = onnx.load(report.path).graph
    constants = {t.name for t in graph.initializer}
    weight_dqs = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants]
    assert sorted(len(n.input) for n in weight_dqs) == [2] * 9 + [3]  # the head's MatMul keeps its own
    signed = [p for p in pairs if p.kind == "activation" and p.zero_point == (128,)]
    assert signed, "tensors that can be negative keep a signed grid, shifted by 128"
    # The same model through the TensorRT exporter breaks TensorRT's int8-only rule, and says so.
    with pytest.raises(ExportError, match=r"breaks TensorRT's explicit-quantization rules.*int8"):
        qp.export_onnx(qmodel, tmp_path / "trt.onnx", runtime="tensorrt")
    with pytest.raises(ValueError, match="`runtime` must be one of"):
        qp.export_onnx(qmodel, tmp_path / "x.onnx", runtime="tflite")


def test_int8_to_uint8_shift_is_exact(resnet, digits, tmp_path):
    """The exported file (uint8 pairs, zero point 128 where a tensor can be negative) against the same file
    with those pairs shifted back to int8, zero point 0: with integer kernels disabled, onnxruntime computes
    both with the same float ops, so the shift must change no output at all."""
    import onnxruntime as ort
    from onnx import numpy_helper

    from qat_plugin.export._qdq_graph import to_uint8_activations

    qmodel = qp.quantize_model(resnet, policy="onnxruntime", calibration_data=digits[0][:256])
    path = qp.export_onnx(qmodel, tmp_path / "u8.onnx").path
    proto = onnx.load(path)
    assert to_uint8_activations(proto) == 0  # already shifted: nothing left to change
    shifted = 0
    for init in proto.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.dtype == np.uint8 and value.size == 1 and int(value.reshape(-1)[0]) == 128:
            init.CopyFrom(numpy_helper.from_array(np.zeros(value.shape, np.int8), init.name))
            shifted += 1
    assert shifted, "some activation pairs are signed, stored as uint8 with zero point 128"
    int8_path = tmp_path / "i8.onnx"
    onnx.save(proto, int8_path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = digits[2][:128]
    outs = []
    for p in (path, int8_path):
        session = ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
        outs.append(session.run(None, {session.get_inputs()[0].name: x})[0])
    np.testing.assert_array_equal(outs[0], outs[1])
    # And both are the Keras model up to float rounding: TF and onnxruntime may round a value lying on a
    # step boundary differently, which moves that one output by a step (measured: 1 row of 128).
    keras_out = qmodel.predict(x, verbose=0)
    rows_off = np.any(np.abs(outs[0] - keras_out) > 1e-4, axis=1)
    assert rows_off.mean() <= 0.05 and np.mean(outs[0].argmax(1) == keras_out.argmax(1)) >= 0.99


def test_depthwise_net_fuses_fully(digits, tmp_path):
    x, y = digits[0], digits[1]
    model = compile_classifier(depthwise_cnn(input_shape=(8, 8, 1), seed=0))
    model.fit(x, y, batch_size=64, epochs=2, verbose=0)
    qmodel = qp.quantize_model(model, policy="onnxruntime", calibration_data=x[:256])
    report = qp.export_onnx(qmodel, tmp_path / "dw.onnx", validation_data=digits[2])
    convs = sum(isinstance(w.layer, (L.Conv2D, L.DepthwiseConv2D)) for w in quantize_wrappers(qmodel))
    assert report.ort_kernels.get("QLinearConv") == convs and report.float_compute == [], report.ort_kernels


def test_saturated_relu6_still_fuses(tmp_path):
    # A ReLU6 calibrated at exactly 6 (255 * (6 / 255) in float32): onnxruntime folds the Clip into the conv.
    keras.utils.set_random_seed(2)
    inp = keras.Input((8, 8, 3))
    x = L.ReLU(6.0, name="relu6")(L.Conv2D(8, 3, padding="same", name="conv")(inp))
    model = keras.Model(inp, L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))
    data = 50 * np.random.rand(64, 8, 8, 3).astype("float32")
    qmodel = qp.quantize_model(model, policy="onnxruntime", calibration_data=data)
    assert float(qmodel.get_layer("conv").output_amax.numpy()) == 6.0
    report = qp.export_onnx(qmodel, tmp_path / "relu6.onnx", validation_data=data)
    assert report.ort_kernels.get("QLinearConv") == 1 and "Clip" not in report.ort_kernels, report.ort_kernels
    assert report.agreement >= 0.99


def test_switch_inside_fit_folds_batchnorm_and_keeps_optimizer_state(digits, tmp_path):
    x, y = digits[0], digits[1]
    model = compile_classifier(resnet8(input_shape=(8, 8, 1), seed=0))
    slots_before = {}

    class Slots(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                opt = self.model.optimizer
                slots_before.update({id(v): (v, v.numpy().copy()) for v in opt.variables})
                self.trainable = {id(v) for v in self.model.trainable_variables}

    snap = Slots()
    cb = qp.QATCallback(start_epoch=1, policy="onnxruntime", calibration_data=x[:256], verbose=0)
    history = model.fit(x, y, batch_size=64, epochs=3, callbacks=[cb, snap], verbose=0)
    assert history.history["qat_phase"] == [0, 1, 1]
    assert isinstance(model.get_layer("conv1"), QuantizeWrapper) and model.get_layer("conv1").batchnorm is not None
    # gamma/beta of the folded BatchNorms still train, through the folded kernel: same variables as before.
    assert {id(v) for v in model.trainable_variables} == snap.trainable
    bn = model.get_layer("conv1").batchnorm
    assert any(v is bn.gamma for v in model.trainable_variables)
    assert int(model.optimizer.iterations) == 3 * int(np.ceil(len(x) / 64))
    assert history.history["accuracy"][-1] > 0.8
    # The moving statistics are frozen from the switch on: the folded model trains with them.
    stats = bn.moving_mean.numpy().copy()
    model.fit(x[:128], y[:128], epochs=1, verbose=0)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), stats)

    path = tmp_path / "qat.keras"
    model.save(path)
    restored = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(restored.predict(x[:64], verbose=0), model.predict(x[:64], verbose=0))
    assert restored.get_layer("conv1").batchnorm.name == "bn1"


def test_seven_bit_weights_for_cpus_without_vnni(resnet, digits, tmp_path, monkeypatch):
    import qat_plugin.export.onnx as onnx_export

    x_train, _, x_test, _ = digits
    monkeypatch.setattr(onnx_export, "cpu_has_vnni", lambda: False)
    eight = qp.quantize_model(resnet, policy="onnxruntime", calibration_data=x_train[:256])
    with pytest.warns(UserWarning, match=r"no VNNI.*weight_bits=7"):
        qp.export_onnx(eight, tmp_path / "w8.onnx")
    seven = qp.quantize_model(resnet, qp.QuantizationSpec(weight_bits=7), "onnxruntime", calibration_data=x_train[:256])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 7-bit weights: nothing to warn about
        report = qp.export_onnx(seven, tmp_path / "w7.onnx", validation_data=x_test)
    weights = [init for init in onnx.load(report.path).graph.initializer if init.data_type == onnx.TensorProto.INT8]
    assert max(int(np.abs(onnx.numpy_helper.to_array(w)).max()) for w in weights) == 63
    assert report.float_compute == [] and report.agreement >= 0.99


def test_zero_padding_folds_into_the_strided_conv(tmp_path):
    # MobileNetV2's pattern: ZeroPadding2D before a strided "valid" depthwise conv.
    keras.utils.set_random_seed(3)
    inp = keras.Input((9, 9, 3))
    x = L.ReLU(6.0, name="r0")(L.BatchNormalization(name="bn0")(L.Conv2D(8, 1, use_bias=False, name="expand")(inp)))
    x = L.ZeroPadding2D(((0, 1), (0, 1)), name="pad")(x)
    x = L.ReLU(6.0, name="r1")(L.BatchNormalization(name="bn1")(L.DepthwiseConv2D(3, strides=2, use_bias=False, name="dw")(x)))
    model = keras.Model(inp, L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))
    data = np.random.rand(128, 9, 9, 3).astype("float32")
    model.predict(data, verbose=0)
    qmodel = qp.quantize_model(model, policy="onnxruntime", calibration_data=data)
    # The padded tensor is already quantized by `expand`'s output: the depthwise conv adds no quantizer,
    # so onnxruntime sees DQ -> Pad -> Conv and folds the pad into its integer conv.
    assert not any(qmodel.get_layer("dw").input_quantizers)
    report = qp.export_onnx(qmodel, tmp_path / "pad.onnx", validation_data=data)
    assert "Pad" not in report.ort_kernels and report.ort_kernels["QLinearConv"] == 2, report.ort_kernels
    assert report.float_compute == [] and report.agreement >= 0.99
    np.testing.assert_allclose(qp.run_onnx(report.path, data), qmodel.predict(data, verbose=0), atol=0.05)



def test_resnet_stem_pads_and_max_pools_in_uint8(tmp_path):
    # ResNet50's stem: conv-BN-ReLU, ZeroPadding2D, MaxPooling2D, then two convs reading the pooled tensor.
    keras.utils.set_random_seed(4)
    inp = keras.Input((16, 16, 3))
    x = L.ReLU(name="r0")(L.BatchNormalization(name="bn0")(L.Conv2D(8, 3, strides=2, padding="same", name="stem")(inp)))
    x = L.MaxPooling2D(3, strides=2, name="pool")(L.ZeroPadding2D(1, name="pool_pad")(x))
    a, b = L.Conv2D(8, 1, name="a")(x), L.Conv2D(8, 3, padding="same", name="b")(x)
    model = keras.Model(inp, L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="gap")(L.Add(name="add")([a, b]))))
    data = np.random.rand(128, 16, 16, 3).astype("float32")
    qmodel = qp.quantize_model(model, policy="onnxruntime", calibration_data=data)
    # The pooled tensor lies on the stem's unsigned grid: neither consumer quantizes it again.
    assert not any(qmodel.get_layer("a").input_quantizers) and not any(qmodel.get_layer("b").input_quantizers)
    report = qp.export_onnx(qmodel, tmp_path / "stem.onnx", validation_data=data)
    # The pad moved in front of its DequantizeLinear (padding with the zero point), so onnxruntime pads and
    # pools uint8: one QuantizeLinear (the input) and one DequantizeLinear (the logits) are all that is float.
    kernels = report.ort_kernels
    assert kernels.get("NhwcMaxPool") == 1 and "MaxPool" not in kernels, kernels
    assert kernels["QuantizeLinear"] == 1 and kernels["DequantizeLinear"] == 1 and kernels["QLinearConv"] == 3, kernels
    assert report.float_compute == [] and report.agreement >= 0.99
    np.testing.assert_allclose(qp.run_onnx(report.path, data), qmodel.predict(data, verbose=0), atol=0.05)


def test_pads_before_dequantize_is_exact():
    """DQ -> Pad(0) rewritten as Pad(zero point) -> DQ computes the same numbers."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from qat_plugin.export._qdq_graph import pads_before_dequantize

    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(128, np.uint8), "zp"),
        numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "pads"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"]),
        helper.make_node("Pad", ["dq", "pads"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(0).normal(size=(1, 2, 3, 3)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    before = run(proto)
    assert pads_before_dequantize(proto) == 1
    assert [n.op_type for n in proto.graph.node] == ["QuantizeLinear", "Pad", "DequantizeLinear"]
    np.testing.assert_array_equal(run(proto), before)
    assert before.shape == (1, 2, 6, 6) and np.all(before[:, :, 0] == 0)


@pytest.mark.parametrize("size, stem, folded", [
    (12, "same", (16, 12, 3, 2)), (14, "same", None), (12, "zero_pad", (16, 12, 7, 3)),
    (12, "preprocessed", (16, 12, 3, 2)), (14, "preprocessed", None),
])
def test_rgb_input_conv_is_folded_or_else_widened_by_a_matmul(tmp_path, monkeypatch, size, stem, folded):
    """A stride-2 RGB stem reads the image in blocks of 4 columns (12 channels) where 4 divides the width,
    else the image widened to 4 channels by a MatMul with [I | 0]; either way the same numbers as without.
    ResNet's stem, a ZeroPadding2D and a 7x7 conv, folds too: the padding goes into the folded conv's; and
    a stem after float preprocessing (Rescaling and Normalization, as in EfficientNet) reads its output."""
    keras.utils.set_random_seed(5)
    inp = keras.Input((size, size, 3))
    data = np.random.rand(64, size, size, 3).astype("float32")
    if stem == "zero_pad":
        x = L.Conv2D(8, 7, strides=2, name="stem")(L.ZeroPadding2D(3, name="stem_pad")(inp))
    else:
        x = inp
        if stem == "preprocessed":
            data *= 255
            norm = L.Normalization(mean=[0.485, 0.456, 0.406], variance=[0.05, 0.05, 0.06], name="norm")
            x = norm(L.Rescaling(1 / 255, name="rescale")(x))
        x = L.Conv2D(8, 3, strides=2, padding="same", name="stem")(x)
    x = L.ReLU(name="r0")(x)
    model = keras.Model(inp, L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="gap")(L.Conv2D(8, 1, name="c1")(x))))
    qmodel = qp.quantize_model(model, policy="onnxruntime", calibration_data=data)
    report = qp.export_onnx(qmodel, tmp_path / "rgb.onnx", validation_data=data)
    # The preprocessing stays float (its Add is the only float compute), before the fold or the widening.
    assert report.float_compute == (["Add"] if stem == "preprocessed" else []), report.ort_kernels
    assert report.ort_kernels["QLinearConv"] == 2, report
    proto = onnx.load(report.path)
    weights = list(map(onnx.numpy_helper.to_array, proto.graph.initializer))
    if folded:
        assert list(report.folded_convs.values()) == [4] and report.widened_convs == {}
        # The fold's two Reshapes; the preprocessing's rows (`channel_constants_on_rows`) add one, the fold reads them.
        reshapes = 2 + (stem == "preprocessed")
        assert "MatMul" not in report.ort_kernels and report.ort_kernels["Reshape"] == reshapes, report.ort_kernels
        # 2 outputs per block of 4 columns: 3 taps at stride 2 over 2 blocks, or 7 over 3.
        assert any(w.dtype == np.int8 and w.shape == folded for w in weights)
        assert "Pad" not in report.ort_kernels, report.ort_kernels
    else:
        assert report.folded_convs == {} and list(report.widened_convs.values()) == ["MatMul"]
        assert report.ort_kernels["MatMul"] == 1
        eye = next(a for a in weights if a.shape == (3, 4))
        np.testing.assert_array_equal(eye, np.eye(3, 4, dtype=np.float32))
    assert report.agreement == 1.0
    # Exact: the same model exported without these rewrites (nor the channels-last squeeze of the pooled
    # features) computes the very same numbers in onnxruntime.
    import qat_plugin.export.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "fold_image_convs", lambda proto: {})
    monkeypatch.setattr(onnx_export, "widen_narrow_convs", lambda proto: {})
    monkeypatch.setattr(onnx_export, "pooled_squeezes_channels_last", lambda proto: 0)
    narrow = qp.export_onnx(qmodel, tmp_path / "narrow.onnx", validation_data=data)
    assert narrow.widened_convs == narrow.folded_convs == {} and "MatMul" not in narrow.ort_kernels
    # onnxruntime cancels the layout Transposes around the folded conv and the squeeze against its own.
    assert "Transpose" not in report.ort_kernels and narrow.ort_kernels["Transpose"] == 1, narrow.ort_kernels
    np.testing.assert_array_equal(qp.run_onnx(report.path, data), qp.run_onnx(narrow.path, data))


@pytest.mark.parametrize("kernel, stride, pads, fold", [
    (3, 1, (1, 1), 4), (3, 2, (0, 1), 4), (3, 2, (1, 1), 4), (7, 2, (3, 3), 4), (5, 1, (2, 2), 2),
    (3, 1, (0, 0), 2), (1, 1, (0, 0), 4), (2, 2, (0, 0), 2), (3, 3, (0, 0), 6), (4, 2, (1, 2), 4),
])
def test_column_fold_computes_the_same_conv(kernel, stride, pads, fold):
    """A 1-D conv against the same conv run on blocks of `fold` columns, in integers: equal wherever the
    geometry divides, and `column_fold` refuses the rest."""
    from qat_plugin.export._qdq_graph import column_fold, folded_kernel

    rng = np.random.default_rng(kernel * 100 + stride * 10 + fold)
    channels, outs = 3, 5
    w = rng.integers(-127, 128, (outs, channels, 1, kernel))
    tried = 0
    for width in range(fold, 5 * fold + 4):
        x = rng.integers(0, 256, (width, channels))
        padded = np.pad(x, (pads, (0, 0)))
        out_width = (width + sum(pads) - kernel) // stride + 1
        if out_width < 1:
            continue
        expected = np.stack([np.einsum("kc,ock->o", padded[j * stride:j * stride + kernel], w[:, :, 0])
                             for j in range(out_width)])
        plan = column_fold(width, kernel, stride, pads, fold)
        per_block = fold // stride
        if width % fold or fold % stride or out_width % per_block:
            assert plan is None
            continue
        folded_w, pad_begin, pad_end = folded_kernel(w, plan, fold)[:, :, 0], plan[1], plan[2]
        blocks = np.pad(x.reshape(width // fold, fold * channels), ((pad_begin, pad_end), (0, 0)))
        y = np.stack([np.einsum("kc,ock->o", blocks[j:j + plan[0]], folded_w)
                      for j in range(blocks.shape[0] - plan[0] + 1)])
        np.testing.assert_array_equal(y.reshape(out_width, outs), expected)
        tried += 1
    assert tried >= 2


@pytest.mark.parametrize("channels_in", [1, 3])
def test_one_channel_convs_are_widened_exactly(channels_in):
    """A 1-channel integer conv inside the graph gets 3 zero-weight channels by a Pad of its quantized input;
    the outputs, in float and in onnxruntime's integer kernels, are the same numbers. A 3-channel conv that
    does not read the model input is left alone (onnxruntime's NHWC pad would cost more than it saves)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from qat_plugin.export._qdq_graph import widen_narrow_convs

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (8, channels_in, 3, 3)).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.uint8), "zp"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(rng.uniform(0.001, 0.01, 8).astype(np.float32), "ws"),
        numpy_helper.from_array(np.zeros(8, np.int8), "wzp"),
        numpy_helper.from_array(np.array(0.5, np.float32), "ys"),
        numpy_helper.from_array(np.array(128, np.uint8), "yzp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wzp"], ["wdq"], axis=0),
        helper.make_node("Conv", ["dq", "wdq"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c", "ys", "yzp"], ["cq"]),
        helper.make_node("DequantizeLinear", ["cq", "ys", "yzp"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, channels_in, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.uniform(0, 5, (2, channels_in, 6, 6)).astype(np.float32)

    def run(m, level):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        return ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    levels = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    before = [run(proto, level) for level in levels]
    assert list(widen_narrow_convs(proto).values()) == (["Pad"] if channels_in == 1 else [])
    if channels_in == 1:
        weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        wide = next(v for v in weights.values() if v.dtype == np.int8 and v.ndim == 4)
        assert wide.shape == (8, 4, 3, 3) and np.array_equal(wide[:, :1], w) and not wide[:, 1:].any()
    for level, expected in zip(levels, before):
        np.testing.assert_array_equal(run(proto, level), expected)


def test_concat_of_signed_branches_runs_in_integer_kernels(tmp_path):
    # Inception's pattern: branches concatenated, then convs reading the concat. Linear branches are signed,
    # so the int8 Concat between their Qs and its one DQ must shift to uint8 as a whole.
    keras.utils.set_random_seed(6)
    inp = keras.Input((10, 10, 4))
    a = L.Conv2D(8, 1, name="a")(inp)
    b = L.Conv2D(8, 3, padding="same", name="b")(inp)
    x = L.Concatenate(name="cat")([a, b])
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c")(x)
    model = keras.Model(inp, L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))
    data = np.random.rand(64, 10, 10, 4).astype("float32") - 0.5
    qmodel = qp.quantize_model(model, policy="onnxruntime", calibration_data=data)
    report = qp.export_onnx(qmodel, tmp_path / "cat.onnx", validation_data=data)
    assert report.float_compute == [] and report.ort_kernels["QLinearConv"] == 3, report.ort_kernels
    assert {p.dtype for p in qp.qdq_pairs(report.path) if p.kind == "activation"} == {"uint8"}
    assert report.agreement >= 0.99
    np.testing.assert_allclose(qp.run_onnx(report.path, data), qmodel.predict(data, verbose=0), atol=0.05)


def _blank_image_codes(qmodel, path):
    """The quantized outputs of Keras and of the exported file on a blank image, in output steps."""
    blank = np.zeros((2, *qmodel.input_shape[1:]), "float32")
    wrapper = qmodel.get_layer("conv")
    step = float(wrapper.output_quantizer.step(wrapper.output_amax))
    report = qp.export_onnx(qmodel, path, validation_data=blank, min_agreement=0.0)
    return np.round(np.asarray(qmodel(blank)) / step), np.round(qp.run_onnx(report.path, blank) / step)


def test_bias_is_rounded_to_the_integer_kernels_grid(tmp_path):
    # onnxruntime's QLinearConv adds the bias in int32 steps of (input step x weight step). On a blank image a
    # conv's output is its bias, so a float bias just past a rounding boundary of the output grid gives one
    # level more in Keras than in the file, on the whole channel (MobileNetV2's first conv on digits: 2% of
    # its outputs). The onnxruntime policy rounds the bias the same way during QAT: the codes are equal.
    keras.utils.set_random_seed(4)
    inp = keras.Input((6, 6, 1))
    model = keras.Model(inp, L.ReLU(name="relu")(L.Conv2D(32, 3, padding="same", name="conv")(inp)))
    data = np.random.default_rng(0).random((32, 6, 6, 1), dtype=np.float32)
    qmodel = qp.quantize_model(model, policy="onnxruntime", calibration_data=data)
    wrapper = qmodel.get_layer("conv")
    assert wrapper.quantize_bias
    (attr, wq), = wrapper.weight_quantizers.items()
    x_step = wrapper.input_quantizers[0].step(wrapper.input_amax[0])
    bias_step = np.asarray(x_step * wq.step(wq.compute_amax(wrapper.weight_value(attr))))
    y_step = float(wrapper.output_quantizer.step(wrapper.output_amax))
    levels = 5 + np.arange(32) % 7
    wrapper.layer.bias.assign(((levels + 0.5) * y_step + 0.3 * bias_step).astype("float32"))

    keras_codes, onnx_codes = _blank_image_codes(qmodel, tmp_path / "rounded.onnx")
    np.testing.assert_array_equal(keras_codes, onnx_codes)
    assert set(np.unique(keras_codes[0, 0, 0])) <= set(levels) | set(levels + 1)
    # Without the rounding, Keras's float bias lands on the other side of the boundary on some channels.
    wrapper.quantize_bias = False
    keras_codes, onnx_codes = _blank_image_codes(qmodel, tmp_path / "float_bias.onnx")
    assert (keras_codes != onnx_codes).any()


def test_bias_grid_of_a_conv_reading_another_conv_through_padding_and_pooling(tmp_path, digits):
    # The second conv has no input quantizer (its input is the first's uint8 output, padded and max-pooled):
    # its bias's input step is the first conv's output step, and the setting survives a .keras round trip.
    inp = keras.Input((8, 8, 1))
    x = L.ReLU(name="r1")(L.Conv2D(8, 3, padding="same", name="c1")(inp))
    x = L.MaxPooling2D(name="pool")(L.ZeroPadding2D(name="pad")(x))
    x = L.Conv2D(8, 3, padding="same", name="c2")(x)
    model = keras.Model(inp, L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))
    qmodel = qp.quantize_model(model, policy="onnxruntime", calibration_data=digits[0][:64])
    c1, c2 = qmodel.get_layer("c1"), qmodel.get_layer("c2")
    assert not any(c2.input_quantizers) and c2.quantize_bias
    quantizer, amax = c2._input_grid()
    assert quantizer is c1.output_quantizer and amax is c1.output_amax and quantizer.unsigned
    assert not qp.quantize_model(model, policy="tensorrt", calibration_data=digits[0][:64]).get_layer("c2").quantize_bias
    path = tmp_path / "q.keras"
    qmodel.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.get_layer("c2").quantize_bias
    x = digits[2][:16]
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qmodel.predict(x, verbose=0))
    report = qp.export_onnx(qmodel, tmp_path / "q.onnx", validation_data=x)
    assert report.agreement == 1.0 and report.float_compute == []


def test_separable_convs_run_as_two_integer_convs(tmp_path):
    # Xception's and NASNet's SeparableConv2D is one op in Keras but two convs in ONNX: without a quantizer
    # between its depthwise and pointwise halves, onnxruntime ran both in float.
    keras.utils.set_random_seed(1)
    inp = keras.Input((12, 12, 3))
    x = L.ReLU(name="r0")(L.BatchNormalization(name="bn0")(L.Conv2D(16, 3, name="c0")(inp)))
    x = L.SeparableConv2D(32, 3, padding="same", use_bias=False, name="sep1")(x)
    x = L.ReLU(name="r1")(L.BatchNormalization(name="bn1")(x))
    x = L.SeparableConv2D(32, 3, strides=2, padding="same", dilation_rate=1, name="sep2")(x)
    model = keras.Model(inp, L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))
    data = np.random.default_rng(1).random((64, 12, 12, 3), dtype=np.float32)
    model(data, training=True)  # BatchNorm statistics that are not the identity
    qmodel = qp.quantize_model(model, policy="onnxruntime", calibration_data=data)
    sep1 = qmodel.get_layer("sep1")
    assert [r["label"] for r in sep1.quantizer_ranges()] == [
        "weight_depthwise_kernel", "weight_pointwise_kernel", "intermediate", "output"]
    assert float(sep1.intermediate_amax) > 0  # calibrated like any other range
    # With the quantizers off (as while calibrating), the split layer computes what the fused op does.
    for w in quantize_wrappers(qmodel):
        w._calibration_hook = lambda *args: None
    y = keras.Model(qmodel.inputs, sep1.output)(data)
    for w in quantize_wrappers(qmodel):
        w._calibration_hook = None
    reference = keras.Model(model.inputs, model.get_layer("r1").output)(data)
    np.testing.assert_allclose(y, reference, atol=1e-4)

    report = qp.export_onnx(qmodel, tmp_path / "sep.onnx", validation_data=data)
    assert report.float_compute == [] and report.ort_kernels["QLinearConv"] == 5, report.ort_kernels
    assert report.agreement == 1.0
    path = tmp_path / "sep.keras"
    qmodel.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(data, verbose=0), qmodel.predict(data, verbose=0))
    assert qp.quantize_model(model, policy="tensorrt", calibration_data=data).get_layer("sep1").intermediate_quantizer is None
    # TFLite runs the two halves as a DEPTHWISE_CONV_2D and a CONV_2D, both int8.
    tflite = qp.export_tflite(qp.quantize_model(model, policy="tflite", calibration_data=data), tmp_path / "sep.tflite",
                              validation_data=data)
    assert tflite.float_ops == () and dict(tflite.op_counts)["DEPTHWISE_CONV_2D"] == 2 and tflite.agreement == 1.0
    with pytest.raises(ValueError, match="separable convs"):
        QuantizeWrapper(L.Conv2D(4, 3), [qp.TensorQuantizer(8)], intermediate_quantizer=qp.TensorQuantizer(8))


def dq_pool_q(kernel, strides, pads, count_include_pad, channels, in_grid, out_grid):
    """A `DQ -> AveragePool -> Q` graph on uint8 NCHW inputs, and random codes for it."""
    from onnx import TensorProto, helper, numpy_helper

    (s, zp), (s_out, zp_out) = in_grid, out_grid
    inits = [numpy_helper.from_array(np.array(v, dtype), name) for v, dtype, name in
             ((s, np.float32, "s"), (zp, np.uint8, "zp"), (s_out, np.float32, "s_out"), (zp_out, np.uint8, "zp_out"))]
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "s", "zp"], ["dq"]),
        helper.make_node("AveragePool", ["dq"], ["pooled"], kernel_shape=[kernel] * 2, strides=[strides] * 2,
                         pads=[pads] * 4, count_include_pad=count_include_pad),
        helper.make_node("QuantizeLinear", ["pooled", "s_out", "zp_out"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, channels, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    x = np.random.default_rng(kernel + strides).integers(0, 256, (2, channels, 9, 9), dtype=np.uint8)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), x


def exact_average_codes(x, kernel, strides, pads, count_include_pad, in_grid, out_grid):
    """Each window's average in float64, in output steps: what a correct file's codes round."""
    (s, zp), (s_out, zp_out) = in_grid, out_grid
    fill = 0.0 if count_include_pad else np.nan  # padding averaged as a zero, or left out (Keras's "same")
    values = np.pad((x.astype(np.float64) - zp) * s, [(0, 0), (0, 0), (pads, pads), (pads, pads)], constant_values=fill)
    windows = np.lib.stride_tricks.sliding_window_view(values, (kernel, kernel), axis=(2, 3))[:, :, ::strides, ::strides]
    return np.nanmean(windows, axis=(4, 5)) / s_out + zp_out


def run_codes(proto, x):
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("kernel, strides, pads", [(3, 1, 1), (2, 2, 0), (3, 2, 1)])
def test_average_pools_stay_in_float_with_the_same_averages(tmp_path, kernel, strides, pads):
    """DQ -> AveragePool -> Q, rewritten to dodge onnxruntime's slow QLinearAveragePool, still averages valid elements."""
    from qat_plugin.export._qdq_graph import average_pools_in_float

    grid = (0.05, 7)
    proto, x = dq_pool_q(kernel, strides, pads, 0, 4, grid, grid)
    assert average_pools_in_float(proto) == 1
    onnx.save(proto, tmp_path / "pool.onnx")
    kernels = qp.ort_kernels(tmp_path / "pool.onnx")
    assert kernels.get("AveragePool") == 1 and "QLinearAveragePool" not in kernels, kernels
    codes, exact = run_codes(proto, x), exact_average_codes(x, kernel, strides, pads, 0, grid, grid)
    assert codes.shape == exact.shape
    assert np.all(np.abs(codes - exact) <= 0.5 + 1e-4), np.abs(codes - exact).max()  # up to a float tie


def test_inception_pool_branch_exports_with_a_float_pool(tmp_path):
    # Inception's pool branch: AveragePooling2D(3, strides=1, padding="same") on a concat, then a 1x1 conv.
    keras.utils.set_random_seed(7)
    inp = keras.Input((10, 10, 4))
    x = L.Concatenate(name="cat")([L.Conv2D(8, 1, activation="relu", name=n)(inp) for n in ("a", "b")])
    pooled = L.Conv2D(8, 1, activation="relu", name="c")(L.AveragePooling2D(3, strides=1, padding="same", name="pool")(x))
    model = keras.Model(inp, L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="gap")(pooled)))
    data = np.random.rand(64, 10, 10, 4).astype("float32")
    qmodel = qp.quantize_model(model, policy="onnxruntime", calibration_data=data)
    report = qp.export_onnx(qmodel, tmp_path / "inception.onnx", validation_data=data)
    assert report.ort_kernels.get("AveragePool") == 1 and "QLinearAveragePool" not in report.ort_kernels, report.ort_kernels
    assert report.float_compute == [] and report.ort_kernels["QLinearConv"] == 3 and report.agreement >= 0.99
    np.testing.assert_allclose(qp.run_onnx(report.path, data), qmodel.predict(data, verbose=0), atol=0.05)


@pytest.mark.parametrize("kernel, strides, pads", [(2, 2, 0), (3, 1, 0), (3, 1, 1)])
def test_unpadded_average_pools_become_integer_depthwise_convs(tmp_path, kernel, strides, pads):
    """A pool that averages no padding (or counts it, as a zero) runs as a depthwise QLinearConv of 1/k."""
    from qat_plugin.export._qdq_graph import average_pools_as_depthwise_convs

    in_grid, out_grid = (0.05, 7), (0.047, 3)  # the pool's own output grid, as in Keras
    proto, x = dq_pool_q(kernel, strides, pads, 1, 16, in_grid, out_grid)
    assert average_pools_as_depthwise_convs(proto) == 1
    onnx.save(proto, tmp_path / "pool.onnx")
    kernels = qp.ort_kernels(tmp_path / "pool.onnx")
    assert kernels.get("QLinearConv") == 1 and not {"AveragePool", "QLinearAveragePool"} & set(kernels), kernels
    codes, exact = run_codes(proto, x), exact_average_codes(x, kernel, strides, pads, 1, in_grid, out_grid)
    assert codes.shape == exact.shape
    assert np.all(np.abs(codes - exact) <= 0.5 + 1e-4), np.abs(codes - exact).max()
    # Keras's padding="same" pools don't count their padding: no integer conv of fixed weights does that.
    assert average_pools_as_depthwise_convs(dq_pool_q(3, 1, 1, 0, 16, in_grid, out_grid)[0]) == 0


def densenet_like(seed=0):
    """DenseNet's pattern in small: pre-activation BatchNorm-ReLU after chained concats, 2x2 transition pools."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((16, 16, 3))
    x = L.ReLU(name="r0")(L.BatchNormalization(name="bn0")(L.Conv2D(16, 3, padding="same", use_bias=False, name="c0")(inp)))
    x = L.MaxPooling2D(3, strides=2, name="pool0")(L.ZeroPadding2D(1, name="pad0")(x))
    for t in range(2):
        for i in range(2):
            y = L.Activation("relu", name=f"t{t}b{i}_relu")(L.BatchNormalization(name=f"t{t}b{i}_bn")(x))
            y = L.Conv2D(16, 3, padding="same", use_bias=False, name=f"t{t}b{i}_conv")(y)
            x = L.Concatenate(name=f"t{t}b{i}_cat")([x, y])
        x = L.Activation("relu", name=f"t{t}_relu")(L.BatchNormalization(name=f"t{t}_bn")(x))
        x = L.AveragePooling2D(2, name=f"t{t}_pool")(L.Conv2D(32, 1, use_bias=False, name=f"t{t}_conv")(x))
    x = L.Activation("relu", name="post_relu")(L.BatchNormalization(name="post_bn")(x))
    model = keras.Model(inp, L.Dense(10, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))
    data = np.random.default_rng(seed).random((256, 16, 16, 3), dtype=np.float32)
    for _ in range(3):  # BatchNorm statistics that are not the identity
        model(data[:64], training=True)
    return model, data


def test_batchnorm_after_a_concat_runs_as_an_integer_depthwise_conv(tmp_path, monkeypatch):
    model, data = densenet_like()
    qmodel = qp.quantize_model(model, policy="onnxruntime", calibration_data=data[:64])
    skipped = qmodel.qat_report.skipped
    assert skipped["bn0"] == "folded into 'c0'" and skipped["t0b0_relu"] == "fused into 't0b0_bn'"
    bn = qmodel.get_layer("t0b0_bn")
    assert isinstance(bn, QuantizeWrapper) and [r["label"] for r in bn.quantizer_ranges()] == ["weight", "output"]
    assert bn.output_quantizer.unsigned and bn.quantize_bias  # the ReLU's output, and the kernel's int32 bias grid
    # One scale per channel, so per-channel int8 holds the BatchNorm's scale exactly: only the bias is rounded.
    scale = bn.weight_value("gamma")
    np.testing.assert_allclose(bn.weight_quantizers["gamma"](scale), scale, rtol=1e-6)
    original = model.get_layer("t0b0_bn")
    expected = original.gamma.numpy() / np.sqrt(original.moving_variance.numpy() + original.epsilon)
    np.testing.assert_allclose(np.asarray(scale).reshape(-1), expected, rtol=1e-6)
    # With the quantizers off (as while calibrating), the wrappers compute the model in inference mode.
    for w in quantize_wrappers(qmodel):
        w._calibration_hook = lambda *args: None
    np.testing.assert_allclose(qmodel(data), model(data, training=False), atol=1e-4)
    for w in quantize_wrappers(qmodel):
        w._calibration_hook = None

    report = qp.export_onnx(qmodel, tmp_path / "dense.onnx", validation_data=data)
    kernels = report.ort_kernels
    # Every BatchNorm, conv and 2x2 pool an integer conv; concats integer, in the convs' layout (one Transpose: the head's).
    assert report.float_compute == [] and kernels["QLinearConv"] == 1 + 4 * 2 + 2 * 3 + 1, kernels
    assert kernels["QLinearConcat"] == 4 and kernels.get("Transpose", 0) <= 1, kernels
    assert not {"AveragePool", "QLinearAveragePool", "MaxPool", "Mul", "Add"} & set(kernels), kernels
    assert report.agreement == 1.0
    onnx_out = qp.run_onnx(report.path, data)

    # The export's graph rewrites change no output: the same file without them computes the same numbers.
    import qat_plugin.export.onnx as onnx_export

    for name in ("max_pools_before_dequantize", "concats_as_qlinear", "average_pools_as_depthwise_convs"):
        monkeypatch.setattr(onnx_export, name, lambda proto: 0)
    plain = qp.export_onnx(qmodel, tmp_path / "plain.onnx", validation_data=data)
    assert plain.ort_kernels.get("Transpose", 0) > 10 and "QLinearConcat" not in plain.ort_kernels
    np.testing.assert_array_equal(qp.run_onnx(plain.path, data), onnx_out)

    path = tmp_path / "dense.keras"
    qmodel.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(data[:32], verbose=0), qmodel.predict(data[:32], verbose=0))


def test_switch_inside_fit_quantizes_a_standalone_batchnorm_that_keeps_training():
    model, data = densenet_like()
    labels = np.random.default_rng(0).integers(0, 10, len(data))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = qp.QATCallback(start_epoch=1, policy="onnxruntime", calibration_data=data[:64], verbose=0)
    history = model.fit(data, labels, batch_size=32, epochs=2, callbacks=[cb], verbose=0)
    assert history.history["qat_phase"] == [0, 1]
    wrapper = model.get_layer("t0b0_bn")
    assert isinstance(wrapper, QuantizeWrapper) and float(wrapper.output_amax) > 0
    bn = wrapper.layer
    assert any(v is bn.gamma for v in model.trainable_variables) and any(v is bn.beta for v in model.trainable_variables)
    # Frozen statistics, trained scale and shift, as for a folded BatchNorm.
    stats, gamma = bn.moving_mean.numpy().copy(), bn.gamma.numpy().copy()
    model.fit(data[:64], labels[:64], epochs=1, verbose=0)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), stats)
    assert not np.array_equal(bn.gamma.numpy(), gamma)


def test_batchnorm_after_a_concat_exports_to_tflite_as_an_int8_depthwise_conv(tmp_path):
    # Without it, TFLite's converter had no range for the float MUL/ADD and asked for representative_data.
    model, data = densenet_like()
    qmodel = qp.quantize_model(model, policy="tflite", calibration_data=data[:64])
    report = qp.export_tflite(qmodel, tmp_path / "dense.tflite", validation_data=data)
    standalone = [w for w in quantize_wrappers(qmodel) if isinstance(w.layer, L.BatchNormalization)]
    assert report.fully_int8 and report.agreement >= 0.99
    assert report.op_histogram["DEPTHWISE_CONV_2D"] == len(standalone) == 7, report.op_histogram


def test_batchnorm_after_a_concat_stays_float_for_tensorrt():
    model, data = densenet_like()
    qmodel = qp.quantize_model(model, policy="tensorrt", calibration_data=data[:32])
    assert qmodel.qat_report.skipped["t0b0_bn"] == "policy 'tensorrt' leaves a BatchNormalization that no conv folds in float"
    assert not isinstance(qmodel.get_layer("t0b0_bn"), QuantizeWrapper)
    with pytest.raises(qp.SpecError, match=r"'t0b0_bn' \(BatchNormalization\) is selected.*policy 'tensorrt'.*standalone_batchnorm"):
        qp.quantize_model(model, qp.QuantizationSpec(layers=["t0b0_bn"]), policy="tensorrt")
    with pytest.raises(qp.SpecError, match=r"standalone_batchnorm=True.*quantize_outputs=True"):
        qp.PlacementPolicy("mine", standalone_batchnorm=True)
    # Only channels-last feature maps run as a depthwise conv; a BatchNorm over a dense layer's features stays float.
    inp = keras.Input((6,))
    flat = keras.Model(inp, L.Dense(3, name="head")(L.BatchNormalization(name="bn")(L.Concatenate(name="cat")([inp, inp]))))
    report = qp.quantize_model(flat, policy="onnxruntime").qat_report
    assert report.skipped["bn"] == "it normalizes a rank-2 tensor, and only 1D and 2D feature maps (rank 3 or 4) run as a depthwise conv"


def test_zero_padded_conv_keeps_its_bias_in_the_integer_kernel(tmp_path):
    # ResNet50V2's 3x3 convs: ZeroPadding2D, then a valid conv without bias whose BatchNorm folds in. tf2onnx
    # merged the pad into the Conv and left the folded bias as an Add after it, which kept the conv in float.
    keras.utils.set_random_seed(3)
    inp = keras.Input((12, 12, 8))
    x = L.ReLU(name="preact_relu")(L.BatchNormalization(name="preact_bn")(inp))
    y = L.Conv2D(8, 3, use_bias=False, name="conv")(L.ZeroPadding2D(1, name="pad")(x))
    y = L.ReLU(name="relu")(L.BatchNormalization(name="bn")(y))
    x = L.Add(name="add")([x, L.Conv2D(8, 1, name="proj")(y)])
    model = keras.Model(inp, L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))
    data = np.random.default_rng(3).random((128, 12, 12, 8), dtype=np.float32)
    model(data, training=True)
    qmodel = qp.quantize_model(model, policy="onnxruntime", calibration_data=data)
    report = qp.export_onnx(qmodel, tmp_path / "v2.onnx", validation_data=data)
    assert report.float_compute == [] and report.ort_kernels["QLinearConv"] == 3, report.ort_kernels
    attrs = lambda node: {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}  # noqa: E731
    padded = [n for n in onnx.load(report.path).graph.node if n.op_type == "Conv" and attrs(n)["kernel_shape"] == [3, 3]]
    assert len(padded) == 1 and attrs(padded[0])["pads"] == [1, 1, 1, 1] and len(padded[0].input) == 3  # with its bias
    assert report.agreement == 1.0


def test_batchnorm_of_a_conv_kept_in_fp32_stays_float_with_it(resnet):
    report = qp.quantize_model(resnet, qp.QuantizationSpec(exclude=["stack1_conv1"]), policy="onnxruntime").qat_report
    assert report.skipped["stack1_bn1"] == "it follows 'stack1_conv1', and folds into it where that is quantized"
    assert report.skipped["stack2_bn1"] == "folded into 'stack2_conv1'"


def test_signed_tensor_through_a_crop_reaches_an_integer_pool(tmp_path):
    # NASNet's "adjust" path: pad, crop (a Slice), then a strided 1x1 average pool on a signed tensor. The
    # int8 -> uint8 shift has to follow the Slice, or the pool's depthwise conv reads int8 and stays in float.
    keras.utils.set_random_seed(5)
    inp = keras.Input((12, 12, 4))
    x = L.Conv2D(16, 3, padding="same", name="c0")(inp)
    x = L.Cropping2D(((1, 0), (1, 0)), name="crop")(L.ZeroPadding2D(((0, 1), (0, 1)), name="pad")(x))
    x = L.Conv2D(16, 1, activation="relu", name="c1")(L.AveragePooling2D(1, strides=2, name="pool")(x))
    model = keras.Model(inp, L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))
    data = np.random.default_rng(5).random((128, 12, 12, 4), dtype=np.float32)
    qmodel = qp.quantize_model(model, policy="onnxruntime", calibration_data=data)
    report = qp.export_onnx(qmodel, tmp_path / "crop.onnx", validation_data=data)
    assert report.float_compute == [] and report.ort_kernels["QLinearConv"] == 3, report.ort_kernels
    assert not {"AveragePool", "QLinearAveragePool"} & set(report.ort_kernels) and report.agreement == 1.0


def test_depthwise_convs_are_widened_to_16_channels_exactly(tmp_path, monkeypatch):
    """onnxruntime's integer depthwise conv is slow unless its channels are a multiple of 16 (NASNet's 11/22/44/88):
    a depthwise conv between two convs gets zero channels, and so do their weights; the file's numbers don't move.
    One whose input no conv writes (here, an add's output) is left alone."""
    import qat_plugin.export.onnx as onnx_export

    keras.utils.set_random_seed(3)
    inp = keras.Input((12, 12, 3))
    x = L.ReLU(name="r0")(L.BatchNormalization(name="bn0")(L.Conv2D(11, 1, name="pw0")(inp)))
    x = L.ReLU(name="r1")(L.DepthwiseConv2D(3, padding="same", name="dw")(x))
    x = L.Conv2D(22, 1, name="pw1")(x)
    x = L.SeparableConv2D(8, 3, padding="same", name="sep")(x)  # its depthwise half reads pw1: 22 -> 32
    y = L.Add(name="add")([x, L.Conv2D(8, 1, name="side")(inp)])
    y = L.Conv2D(4, 1, name="pw2")(L.DepthwiseConv2D(3, padding="same", name="dw_after_add")(y))
    model = keras.Model(inp, L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="gap")(y)))
    data = np.random.default_rng(3).random((64, 12, 12, 3), dtype=np.float32)
    qmodel = qp.quantize_model(model, policy="onnxruntime", calibration_data=data)

    report = qp.export_onnx(qmodel, tmp_path / "wide.onnx", validation_data=data)
    assert sorted(report.widened_depthwise.values()) == [16, 32], report.widened_depthwise
    assert not any("dw_after_add" in name for name in report.widened_depthwise)
    assert report.ort_kernels["QLinearConv"] == 8 and report.float_compute == [], report.ort_kernels
    groups = sorted(a.i for n in onnx.load(report.path).graph.node if n.op_type == "Conv" for a in n.attribute
                    if a.name == "group" and a.i > 1)
    assert groups == [8, 16, 32]

    monkeypatch.setattr(onnx_export, "widen_depthwise_convs", lambda proto: {})
    narrow = qp.export_onnx(qmodel, tmp_path / "narrow.onnx", validation_data=data)
    assert narrow.widened_depthwise == {}
    np.testing.assert_array_equal(qp.run_onnx(report.path, data), qp.run_onnx(narrow.path, data))


def test_channel_constants_run_on_rows(tmp_path):
    """Float ops with a (1, 1, 1, C) constant on a narrow channels-last image (a Rescaling and a
    Normalization) run on its (N, H, W*C) rows, each chain between one Reshape and its inverse, with the
    same results to the bit; wide channels, constants that expand the tensor, and a chain's other readers
    keep theirs."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from qat_plugin.export._qdq_graph import channel_constants_on_rows

    rng = np.random.default_rng(3)
    consts = {
        "scale": np.float32(1 / 255), "mean": rng.normal(size=(1, 1, 1, 3)).astype(np.float32),
        "std": rng.uniform(0.5, 2, (1, 1, 1, 3)).astype(np.float32), "one": np.ones((1, 1, 1, 1), np.float32),
        "rows": rng.normal(size=(1, 6, 1, 1)).astype(np.float32), "wide": rng.normal(size=(32,)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["a"]),
        helper.make_node("Sub", ["mean", "a"], ["b"]),  # the constant first: its order is kept
        helper.make_node("Div", ["b", "std"], ["c"]),
        helper.make_node("Add", ["c", "one"], ["y"]),
        helper.make_node("Mul", ["c", "rows"], ["per_row"]),  # a second reader of `c`: the chain ends there
        helper.make_node("Add", ["w", "wide"], ["w_out"]),  # 32 channels: vector-wide already
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 5, 3]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, ["N", 4, 4, 32])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", "per_row", "w_out")],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": rng.uniform(0, 255, (2, 6, 5, 3)).astype(np.float32), "w": rng.normal(size=(2, 4, 4, 32)).astype(np.float32)}
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)  # noqa: E731
    before = run(proto)
    # Mul, Sub, Div form one chain (`c` has two readers); Add(c, one) starts a chain of only a scalar, left as is.
    assert channel_constants_on_rows(proto) == 3
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Reshape") == 2 and ops.count("Add") == 2, ops
    shapes = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    reshapes = [n for n in proto.graph.node if n.op_type == "Reshape"]
    assert reshapes[0].input[0] == "x" and list(shapes[reshapes[0].input[1]]) == [0, 6, 15]
    assert list(shapes[reshapes[1].input[1]]) == [0, 6, 5, 3]
    sub = next(n for n in proto.graph.node if n.op_type == "Sub")
    np.testing.assert_array_equal(shapes[sub.input[0]], np.tile(consts["mean"].ravel(), 5))
    for got, want in zip(run(proto), before):
        np.testing.assert_array_equal(got, want)
