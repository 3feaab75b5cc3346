"""TFLite int8 export on real digits: int8 ops and tensors, the model's own ranges, agreement, refusals."""

from __future__ import annotations

import sys
import warnings

import keras
import numpy as np
import pytest

import qat_plugin as qp
from conftest import small_cnn
from qat_plugin import ExportError
from qat_plugin.export import tflite as tflite_module
from qat_plugin.export.tflite import export_tflite, run_tflite, verify_tflite
from qat_plugin.wrappers import quantize_wrappers

L = keras.layers


def trained_small_cnn(digits) -> keras.Model:
    x_train, y_train, _, _ = digits
    model = small_cnn()
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, batch_size=16, epochs=8, verbose=0)
    return model


def tensors(path) -> list[dict]:
    interpreter = tflite_module._interpreter(str(path), allocate=False)
    return interpreter.get_tensor_details()


@pytest.fixture(scope="module")
def exported(digits, tmp_path_factory):
    """The conftest CNN trained on 1,400 digits, quantized for TFLite, exported three ways, checked on 397 more."""
    x_train, _, x_test, _ = digits
    model = trained_small_cnn(digits)
    qmodel = qp.quantize_model(model, policy="tflite", calibration_data=x_train[:256])
    folder = tmp_path_factory.mktemp("tflite")
    rep = x_train[:256]
    return {
        "model": model,
        "qmodel": qmodel,
        "folder": folder,
        "int8": export_tflite(qmodel, folder / "int8.tflite", representative_data=rep, validation_data=x_test),
        "int8_io": export_tflite(
            qmodel, folder / "int8_io.tflite", representative_data=rep, validation_data=x_test, int8_io=True
        ),
        "ptq": export_tflite(
            model, folder / "ptq.tflite", representative_data=rep, validation_data=x_test, min_agreement=0.9
        ),
    }


def test_quantized_export_is_fully_int8_and_agrees_with_keras(exported, digits):
    report, qmodel = exported["int8"], exported["qmodel"]
    _, _, x_test, y_test = digits
    assert report.quantized
    assert report.file_bytes == (exported["folder"] / "int8.tflite").stat().st_size > 0
    assert report.fully_int8 and report.float_ops == ()
    # Every operator but the float input's QUANTIZE and the float output's DEQUANTIZE is int8.
    assert report.op_histogram["QUANTIZE"] == report.op_histogram["DEQUANTIZE"] == 1
    assert report.num_int8_ops == report.num_ops - 2
    assert report.op_histogram["CONV_2D"] == 2 and report.op_histogram["FULLY_CONNECTED"] == 1
    assert (report.input_dtype, report.output_dtype) == ("float32", "float32")
    assert report.num_samples == len(x_test)
    assert report.agreement >= 0.99
    lite = run_tflite(report.path, x_test)
    keras_out = qmodel.predict(x_test, verbose=0)
    assert float(np.max(np.abs(lite - keras_out))) == pytest.approx(report.max_abs_diff)
    # The file is as accurate as the Keras model it came from.
    assert abs(np.mean(lite.argmax(-1) == y_test) - np.mean(keras_out.argmax(-1) == y_test)) <= 0.01


def test_every_activation_range_is_a_tensor_scale_in_the_file(exported):
    """The converter took the ranges the model was trained with instead of calibrating its own."""
    details = [d for d in tensors(exported["int8"].path) if d["dtype"] == np.int8]
    params = [(d["quantization_parameters"]["scales"], d["quantization_parameters"]["zero_points"]) for d in details]
    per_tensor = [(float(s[0]), int(z[0])) for s, z in params if len(s) == 1]
    checked = 0
    for wrapper in quantize_wrappers(exported["qmodel"]):
        for row in wrapper.quantizer_ranges():
            if row["slot"][0] == "weight":
                continue
            unsigned = getattr(row["quantizer"], "unsigned", False)  # after a ReLU: [0, amax] on 0..255
            scale = float(row["amax"]) / (255 if unsigned else 127)
            zero_point = -128 if unsigned else 0
            assert any(z == zero_point and s == pytest.approx(scale, rel=1e-5) for s, z in per_tensor), (
                f"{wrapper.name}/{row['label']}: no int8 tensor with scale {scale:.6g}, zero point {zero_point}"
            )
            checked += 1
    assert checked >= 4


def test_the_file_uses_the_models_own_ranges_and_int8_weights(exported):
    qmodel, path = exported["qmodel"], exported["folder"] / "int8_io.tflite"
    infos = {i.key: i for i in qp.list_quantizers(qmodel)}
    details = tensors(path)
    # The int8 output tensor's scale is the head's output range / 127, zero point 0: the converter
    # took the range the model was trained with instead of calibrating its own.
    interpreter = tflite_module._interpreter(str(path))
    (out,) = interpreter.get_output_details()
    scale, zero_point = out["quantization"]
    assert zero_point == 0 and scale == pytest.approx(float(infos["head/output"].amax) / 127, rel=1e-5)
    # The head's weights are exactly the int8 values of its per-channel fake quantizer.
    kernel = np.asarray(qmodel.get_layer("head").layer.kernel)
    amax = infos["head/weight"].amax
    expected = np.round(kernel / amax * 127).astype(np.int8).T  # FULLY_CONNECTED stores (out, in)
    weights = [d for d in details if d["dtype"] == np.int8 and tuple(d["shape"]) == expected.shape]
    assert len(weights) == 1
    np.testing.assert_array_equal(interpreter.get_tensor(weights[0]["index"]), expected)
    np.testing.assert_allclose(weights[0]["quantization_parameters"]["scales"], amax / 127, rtol=1e-5)


def test_int8_io_file_takes_and_gives_int8(exported, digits):
    report, qmodel = exported["int8_io"], exported["qmodel"]
    _, _, x_test, _ = digits
    assert (report.input_dtype, report.output_dtype) == ("int8", "int8")
    assert report.fully_int8 and report.num_int8_ops == report.num_ops
    assert "QUANTIZE" not in report.op_histogram and "DEQUANTIZE" not in report.op_histogram
    assert report.agreement >= 0.99
    interpreter = tflite_module._interpreter(report.path)
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    # run_tflite quantizes the floats in and dequantizes the logits out: same answers as the float-io file.
    lite_io, lite = run_tflite(report.path, x_test[:64]), run_tflite(exported["int8"].path, x_test[:64])
    assert lite_io.dtype == np.float32 and lite_io.shape == (64, 10)
    assert np.mean(lite_io.argmax(-1) == lite.argmax(-1)) >= 0.98
    agreement, diff, n = verify_tflite(qmodel, report.path, x_test[:64])
    assert n == 64 and agreement >= 0.98 and diff < 1.0


def test_fp32_model_is_post_training_quantized(exported):
    report = exported["ptq"]
    assert not report.quantized
    assert report.fully_int8 and report.op_histogram["CONV_2D"] == 2
    assert report.agreement >= 0.9  # plain PTQ against the FP32 model
    # Both conv kernels and the dense kernel are stored as int8, as in the QAT file.
    shapes = {(16, 3, 3, 1), (16, 3, 3, 16), (10, 16)}
    kernels = [d for d in tensors(report.path) if d["dtype"] == np.int8 and tuple(d["shape"]) in shapes]
    assert len(kernels) == 3


def test_disagreeing_file_raises_and_is_kept(exported, digits, tmp_path, monkeypatch):
    """A file that computes something else than the model (here: another model's file) fails the self-check."""
    _, _, x_test, _ = digits
    other = qp.quantize_model(small_cnn(seed=7), policy="tflite", calibration_data=x_test[:64])
    export_tflite(other, tmp_path / "other.tflite", representative_data=x_test[:64])
    wrong = (tmp_path / "other.tflite").read_bytes()
    monkeypatch.setattr(tflite_module, "_convert", lambda *args: wrong)
    path = tmp_path / "tampered.tflite"
    kept = r"tampered\.tflite \(kept for inspection\) agrees .* on \d+\.\d+% .* 397 samples"
    with pytest.raises(ExportError, match=kept):
        export_tflite(exported["qmodel"], path, representative_data=x_test[:64], validation_data=x_test)
    assert path.read_bytes() == wrong
    # verify_tflite holds the file to the model it is given: a corrupted model fails, naming the numbers.
    corrupted = keras.models.clone_model(exported["qmodel"])
    corrupted.set_weights([-w if w.ndim == 2 else w for w in exported["qmodel"].get_weights()])
    with pytest.raises(ExportError, match=r"int8\.tflite .*min_agreement=1\.0; max abs diff"):
        verify_tflite(corrupted, exported["int8"].path, x_test, min_agreement=1.0)


def test_layers_without_ranges_take_them_from_the_calibration_sample(digits, tmp_path):
    """An input Rescaling (as keras.applications' EfficientNet and MobileNetV3 have) and an excluded head have no
    quantizer: in the process that calibrated the model, their ranges come from its calibration sample; a model
    loaded from a file has none, and the error says to pass representative_data."""
    x_train, _, x_test, _ = digits
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1), name="image")
    x = L.Rescaling(2.0, offset=-1.0, name="rescaling")(inp)
    x = L.Conv2D(8, 3, activation="relu", name="conv")(x)
    model = keras.Model(inp, L.Dense(10, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))
    spec = qp.QuantizationSpec(exclude=["head"])
    qmodel = qp.quantize_model(model, spec, policy="tflite", calibration_data=x_train[:64])
    assert not isinstance(qmodel.get_layer("rescaling"), qp.QuantizeWrapper)
    report = export_tflite(qmodel, tmp_path / "partial.tflite", validation_data=x_test)
    assert report.ranges_from == "calibration sample" and report.fully_int8, report.op_counts
    assert report.op_histogram["FULLY_CONNECTED"] == 1 and report.agreement >= 0.95, report

    qmodel.save(tmp_path / "partial.keras")
    loaded = keras.saving.load_model(tmp_path / "partial.keras", safe_mode=True)
    path = tmp_path / "loaded.tflite"
    with pytest.raises(ExportError, match=r"FULLY_CONNECTED.*in float.*no calibration sample.*representative_data"):
        export_tflite(loaded, path)
    assert path.exists()
    report = export_tflite(loaded, path, representative_data=x_train[:64], validation_data=x_test, min_agreement=0.9)
    assert report.ranges_from == "representative_data" and report.fully_int8

    full = qp.quantize_model(small_cnn(), policy="tflite", calibration_data=x_train[:64])
    assert export_tflite(full, tmp_path / "full.tflite").ranges_from == "quantizers"


def test_multi_output_sequential_and_order(digits, tmp_path):
    """Outputs come back in the Keras model's order; a Sequential model exports too."""
    x_train, *_ = digits
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1), name="image")
    h = L.GlobalAveragePooling2D(name="gap")(L.Conv2D(8, 3, activation="relu", name="conv")(inp))
    model = keras.Model(inp, [L.Dense(10, name="z_logits")(h), L.Dense(3, name="a_aux")(h)])
    qmodel = qp.quantize_model(model, policy="tflite", calibration_data=x_train[:64])
    report = export_tflite(qmodel, tmp_path / "two.tflite", representative_data=x_train[:64],
                           validation_data=x_train[:100], int8_io=True)
    outs = run_tflite(report.path, x_train[:100], batch_size=7)  # batches that don't divide the data
    assert [o.shape for o in outs] == [(100, 10), (100, 3)]
    assert report.agreement >= 0.95 and report.max_abs_diff < 0.5

    seq = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(4, 3, activation="relu"), L.Flatten(), L.Dense(10)])
    qseq = qp.quantize_model(seq, policy="tflite", calibration_data=x_train[:64])
    report = export_tflite(
        qseq, tmp_path / "seq.tflite", representative_data=x_train[:64], validation_data=x_train[:100]
    )
    assert report.fully_int8 and report.agreement >= 0.95


def test_multi_input_model_matches_inputs_by_name(digits, tmp_path):
    """The file orders its inputs by name; data in the Keras model's order still lands on the right input."""
    x_train, *_ = digits
    keras.utils.set_random_seed(0)
    image, vec = keras.Input((8, 8, 1), name="z_image"), keras.Input((5,), name="a_vec")
    h = L.GlobalAveragePooling2D(name="gap")(L.Conv2D(8, 3, activation="relu", name="conv")(image))
    out = L.Dense(10, name="head")(L.Concatenate(name="cat")([h, L.Dense(4, name="vec")(vec)]))
    data = [x_train[:128], np.random.default_rng(0).random((128, 5), np.float32)]
    qmodel = qp.quantize_model(keras.Model([image, vec], out), policy="tflite", calibration_data=data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_tflite(qmodel, tmp_path / "two_in.tflite", representative_data=data, validation_data=data)
    assert not [w for w in caught if "Interpreter is deprecated" in str(w.message)]
    assert report.fully_int8 and report.agreement >= 0.95
    by_name = run_tflite(report.path, {"a_vec": data[1], "z_image": data[0]})
    np.testing.assert_array_equal(by_name, run_tflite(report.path, data[::-1]))  # the file's own order


def test_fallback_interpreter_runs_without_deprecation_noise(exported, digits, monkeypatch):
    _, _, x_test, _ = digits
    path = exported["int8"].path
    preferred = run_tflite(path, x_test[:32])
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # import fails: tf.lite.Interpreter is used
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        interpreter = tflite_module._interpreter(path)
        fallback = run_tflite(path, x_test[:32])
    assert tflite_module._interpreter_name(interpreter) == "tensorflow"
    assert not [w for w in caught if "Interpreter is deprecated" in str(w.message)]
    np.testing.assert_allclose(fallback, preferred, atol=1e-6)


# ------------------------------------------------------------------ refusals, before any conversion


@pytest.fixture
def no_conversion(monkeypatch):
    def fail(*args):
        raise AssertionError("the converter ran although the arguments are wrong")

    monkeypatch.setattr(tflite_module, "_convert", fail)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(min_agreement=1.5), r"min_agreement.*\[0, 1\].*1\.5"),
        (dict(min_agreement=True), r"min_agreement"),
        (dict(batch_size=0), r"batch_size.*>= 1.*0"),
        (dict(int8_io="yes"), r"int8_io.*True or False.*'yes'"),
        (dict(representative_data=np.zeros((4, 28, 28, 1))), r"representative_data.*\(8, 8, 1\).*\(28, 28, 1\)"),
        (dict(representative_data=np.zeros((0, 8, 8, 1))), r"representative_data.*non-empty"),
        (dict(validation_data=[np.zeros((4, 8, 8, 1))] * 2), r"validation_data.*one non-empty array per model input"),
        (dict(validation_data={"other": np.zeros((4, 8, 8, 1))}), r"validation_data.*no array for model input.*image"),
    ],
)
def test_bad_arguments_are_refused_before_converting(exported, tmp_path, no_conversion, kwargs, match):
    kwargs.setdefault("representative_data", np.zeros((4, 8, 8, 1), "float32"))
    with pytest.raises(ValueError, match=match):
        export_tflite(exported["qmodel"], tmp_path / "m.tflite", **kwargs)
    assert not (tmp_path / "m.tflite").exists()


def test_bad_paths_and_models_are_refused(exported, tmp_path, no_conversion):
    with pytest.raises(ValueError, match=r"`path` must be a str"):
        export_tflite(exported["qmodel"], 42)
    with pytest.raises(ValueError, match=r"`path` is a folder.*model_int8\.tflite"):
        export_tflite(exported["qmodel"], tmp_path)
    with pytest.raises(ValueError, match=r"must be a keras.Model.*str"):
        export_tflite("model.keras", tmp_path / "m.tflite")
    with pytest.raises(ValueError, match=r"no quantizers.*representative_data=.*quantize_model"):
        export_tflite(exported["model"], tmp_path / "m.tflite")
    uncalibrated = qp.quantize_model(small_cnn(), policy="tflite")
    with pytest.raises(ExportError, match=r"not calibrated.*qat_plugin\.calibrate"):
        export_tflite(uncalibrated, tmp_path / "m.tflite", representative_data=np.zeros((4, 8, 8, 1), "float32"))


def test_low_bit_activations_are_refused(digits, tmp_path, no_conversion):
    x_train, *_ = digits
    spec = qp.QuantizationSpec(overrides={"conv2": qp.LayerOverride(activation_bits=4)})
    qmodel = qp.quantize_model(small_cnn(), spec, policy="tflite", calibration_data=x_train[:64])
    with pytest.raises(ExportError, match=r"other than 8 bits.*conv2.*4"):
        export_tflite(qmodel, tmp_path / "m.tflite", representative_data=x_train[:64])


def test_running_a_missing_or_mismatched_file_fails_clearly(exported, tmp_path):
    with pytest.raises(ExportError, match=r"No TFLite file at .*missing\.tflite"):
        run_tflite(tmp_path / "missing.tflite", np.zeros((1, 8, 8, 1)))
    with pytest.raises(ExportError, match=r"takes samples of shape \(8, 8, 1\); received \(28, 28, 1\)"):
        run_tflite(exported["int8"].path, np.zeros((2, 28, 28, 1)))
    with pytest.raises(ExportError, match=r"one array per TFLite input \(1"):
        run_tflite(exported["int8"].path, [np.zeros((2, 8, 8, 1))] * 2)
    with pytest.raises(ValueError, match=r"batch_size"):
        run_tflite(exported["int8"].path, np.zeros((2, 8, 8, 1)), batch_size=-1)


def nasnet_adjust_block(seed: int = 0) -> keras.Model:
    """NASNet's `_adjust_block` on 8x8 digits: a ReLU that no conv absorbs, read by two strided 1x1 average pools,
    one after pad-and-crop, and a third pool right after an add."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1), name="image")
    a = L.Conv2D(8, 3, padding="same", name="c1")(inp)
    h = L.Add(name="add")([a, L.Conv2D(8, 1, name="c2")(inp)])
    p = L.Activation("relu", name="relu")(h)
    p1 = L.Conv2D(4, 1, name="c3")(L.AveragePooling2D(1, strides=2, name="pool_1")(p))
    p2 = L.Cropping2D(((1, 0), (1, 0)), name="crop")(L.ZeroPadding2D(((0, 1), (0, 1)), name="pad")(p))
    p2 = L.Conv2D(4, 1, name="c4")(L.AveragePooling2D(1, strides=2, name="pool_2")(p2))
    p3 = L.Conv2D(8, 1, name="c5")(L.AveragePooling2D(2, name="pool_3")(h))
    h = L.Concatenate(name="cat")([p1, p2])
    h = L.Add(name="add2")([h, p3])
    return keras.Model(inp, L.Dense(10, name="head")(L.GlobalAveragePooling2D(name="gap")(h)))


def test_average_pools_keep_their_input_grid_for_tflite(digits, tmp_path):
    """TFLite's int8 AVERAGE_POOL_2D takes one scale in and out: the tflite policy puts a pool's output back on its
    input's grid, so the converter neither refuses the model (NASNetMobile did) nor requantizes around the pool."""
    x_train, _, x_test, _ = digits
    model = nasnet_adjust_block()
    qmodel = qp.quantize_model(model, policy="tflite", calibration_data=x_train[:256])
    pools = {w.inner_name: w for w in quantize_wrappers(qmodel) if w.inner_name.startswith("pool_")}
    assert sorted(pools) == ["pool_1", "pool_2", "pool_3"]
    for w in pools.values():
        assert w.output_quantizer is None and w.output_on_input_grid
    # One grid on the ReLU's output, which both pools read, one of them through pad-and-crop: each pool
    # calibrating its own (the crop drops a row, so a smaller range) made the converter refuse NASNetMobile.
    relu = qmodel.get_layer("relu")
    assert relu.output_quantizer.unsigned and not any(relu.input_quantizers)  # the add's grid is its input
    assert not any(pools["pool_1"].input_quantizers) and not any(pools["pool_2"].input_quantizers)
    assert pools["pool_2"]._input_grid()[1] is relu.output_amax

    # In Keras: pool_3 averages 2x2 windows of the add's output grid and lands back on that grid.
    add = qmodel.get_layer("add")
    step = float(add.output_amax.numpy()) / 127
    probe = keras.Model(qmodel.inputs, [qmodel.get_layer("pool_3").output, add.output])
    pooled, added = probe.predict(x_test[:32], verbose=0)
    assert np.allclose(pooled / step, np.round(pooled / step), atol=1e-3)
    mean = added.reshape(32, 4, 2, 4, 2, 8).mean(axis=(2, 4))
    assert np.abs(pooled - mean).max() <= step / 2 + 1e-6 and np.abs(pooled - mean).max() > 0

    report = export_tflite(qmodel, tmp_path / "adjust.tflite", representative_data=x_train[:256], validation_data=x_test)
    ops = dict(report.op_counts)
    assert ops["AVERAGE_POOL_2D"] == 3 and ops["RELU"] == 1 and report.fully_int8
    assert ops["QUANTIZE"] == 1  # the image's: no requantize around a pool
    assert report.agreement >= 0.99

    # The flag survives saving. The onnxruntime policy, whose QLinearAveragePool rescales, keeps a grid per pool,
    # and leaves the ReLU to its readers' Q/DQ pairs.
    qmodel.save(tmp_path / "adjust.keras")
    loaded = keras.saving.load_model(tmp_path / "adjust.keras", safe_mode=True)
    assert loaded.get_layer("pool_1").output_on_input_grid
    assert np.array_equal(loaded.predict(x_test[:16], verbose=0), qmodel.predict(x_test[:16], verbose=0))
    ort_model = qp.quantize_model(model, policy="onnxruntime", calibration_data=x_train[:256])
    assert all(not ort_model.get_layer(n).output_on_input_grid and ort_model.get_layer(n).output_quantizer for n in pools)
    assert not isinstance(ort_model.get_layer("relu"), qp.QuantizeWrapper)


def test_grid_sharing_options_are_refused_without_what_they_need():
    with pytest.raises(qp.SpecError, match=r"average_pools_on_input_grid=True.*quantize_outputs=True"):
        qp.PlacementPolicy("mine", average_pools_on_input_grid=True)
    with pytest.raises(qp.SpecError, match=r"standalone_relus=True.*reuse_output_ranges=True"):
        qp.PlacementPolicy("mine", quantize_outputs=True, standalone_relus=True)
    with pytest.raises(ValueError, match="not both"):
        qp.QuantizeWrapper(L.AveragePooling2D(2), output_quantizer=qp.TensorQuantizer(8), output_on_input_grid=True)
    pool = qp.QuantizeWrapper(L.AveragePooling2D(2), output_on_input_grid=True)
    with pytest.raises(ValueError, match="its input is on no grid"):
        pool(np.ones((1, 4, 4, 2), "float32"))
