"""Every export checks itself: without validation_data, on the calibration sample or synthetic inputs."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qat_plugin as qp
from qat_plugin import ExportError
from qat_plugin.calibration import calibration_sample
from qat_plugin.export.onnx import export_onnx
from qat_plugin.export.tflite import export_tflite

L = keras.layers
SYNTHETIC = "checked on 32 synthetic inputs.*validation_data=x_test\\[:256\\]"


def tiny_cnn() -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1), name="image")
    x = L.Conv2D(8, 3, activation="relu", name="conv")(inp)
    x = L.Flatten(name="flatten")(x)
    return keras.Model(inp, L.Dense(10, name="head")(x), name="tiny_cnn")


@pytest.fixture(scope="module")
def trained(digits):
    x_train, y_train, x_test, _ = digits
    model = tiny_cnn()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, batch_size=64, epochs=3, verbose=0)
    return model, x_train, x_test


@pytest.fixture(scope="module")
def quantized(trained):
    model, x_train, _ = trained
    return {p: qp.quantize_model(model, policy=p, calibration_data=x_train[:128]) for p in ("tensorrt", "tflite")}


@pytest.fixture(scope="module")
def loaded(quantized, tmp_path_factory):
    """The TFLite-policy model after a round trip through a .keras file: no calibration sample."""
    path = tmp_path_factory.mktemp("keras") / "q.keras"
    quantized["tflite"].save(path)
    return keras.saving.load_model(path, safe_mode=True)


def reverse_channel_scales(proto):
    """The per-channel weight scales in reverse order: a file that is wrong but still runs."""
    for t in proto.graph.initializer:
        a = numpy_helper.to_array(t)
        if t.data_type == onnx.TensorProto.FLOAT and t.name.endswith("_scale") and a.size > 1:
            t.CopyFrom(numpy_helper.from_array(a[::-1].copy(), t.name))


@pytest.fixture
def broken_onnx(monkeypatch):
    import qat_plugin.export.onnx as onnx_export

    real = onnx_export.rewrite_qdq

    def rewrite_then_break(proto, weight_bits=None):
        found = real(proto, weight_bits)
        reverse_channel_scales(proto)
        return found

    monkeypatch.setattr(onnx_export, "rewrite_qdq", rewrite_then_break)


@pytest.fixture
def broken_tflite(monkeypatch):
    """The converter is handed a model whose head kernel is negated: the file no longer matches Keras."""
    import qat_plugin.export.tflite as tflite_export

    real = tflite_export._convert

    def convert_a_tampered_copy(model, representative, int8_io, batch_size):
        kernel = model.get_layer("head").layer.kernel
        saved = kernel.numpy()
        kernel.assign(-saved)
        try:
            return real(model, representative, int8_io, batch_size)
        finally:
            kernel.assign(saved)

    monkeypatch.setattr(tflite_export, "_convert", convert_a_tampered_copy)


# ------------------------------------------------------------------ the calibration sample


def test_calibration_keeps_a_copy_of_the_first_inputs_and_saving_ignores_it(quantized, loaded, trained, tmp_path):
    _, x_train, x_test = trained
    qmodel = quantized["tflite"]
    (sample,) = calibration_sample(qmodel)
    np.testing.assert_array_equal(sample, x_train[:64])
    assert not np.shares_memory(sample, x_train)
    assert calibration_sample(loaded) is None and calibration_sample(trained[0]) is None
    assert calibration_sample(keras.models.clone_model(qmodel)) is None
    np.testing.assert_allclose(loaded.predict(x_test[:32], verbose=0), qmodel.predict(x_test[:32], verbose=0), atol=1e-6)


# ------------------------------------------------------------------ no validation_data: calibration sample


@pytest.mark.parametrize("runtime", ["tensorrt", "onnxruntime"])
def test_onnx_export_checks_itself_on_the_calibration_sample(quantized, runtime, tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*synthetic")
        report = export_onnx(quantized["tensorrt"], tmp_path / "m.onnx", runtime=runtime)
    assert report.checked_on == "calibration sample" and report.num_samples == 64
    assert report.agreement == 1.0 and report.max_abs_diff < 0.05, report


def test_tflite_export_checks_itself_on_the_calibration_sample(quantized, tmp_path):
    report = export_tflite(quantized["tflite"], tmp_path / "m.tflite")
    assert report.checked_on == "calibration sample" and report.num_samples == 64
    assert report.agreement >= 0.98 and report.max_abs_diff < 0.1, report


def test_after_a_qat_switch_the_users_model_is_checked_on_the_calibration_sample(digits, tmp_path):
    # QATCallback calibrates a clone and moves its wrappers into the user's model object.
    x_train, y_train, _, _ = digits
    model = tiny_cnn()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train[:256], y_train[:256], batch_size=64, epochs=2, verbose=0,
              callbacks=[qp.QATCallback(start_epoch=1, verbose=0)])
    assert calibration_sample(model) is not None
    report = export_onnx(model, tmp_path / "switched.onnx")
    assert report.checked_on == "calibration sample" and report.agreement >= 0.98, report


def test_validation_data_wins(quantized, trained, tmp_path):
    x_test = trained[2]
    onnx_report = export_onnx(quantized["tensorrt"], tmp_path / "m.onnx", validation_data=x_test[:100])
    lite_report = export_tflite(quantized["tflite"], tmp_path / "m.tflite", validation_data=x_test[:100])
    for report in (onnx_report, lite_report):
        assert report.checked_on == "validation_data" and report.num_samples == 100 and report.agreement >= 0.98


def test_fp32_tflite_is_checked_on_its_representative_data(trained, tmp_path):
    model, x_train, _ = trained
    report = export_tflite(model, tmp_path / "ptq.tflite", representative_data=x_train[:300])
    assert report.checked_on == "representative_data" and report.num_samples == 256 and report.agreement >= 0.9


# ------------------------------------------------------------------ no validation_data: synthetic inputs


def test_a_loaded_model_is_checked_on_synthetic_inputs_with_a_warning(loaded, tmp_path):
    with pytest.warns(UserWarning, match=SYNTHETIC):
        onnx_report = export_onnx(loaded, tmp_path / "m.onnx")
    with pytest.warns(UserWarning, match=SYNTHETIC):
        lite_report = export_tflite(loaded, tmp_path / "m.tflite")
    for report in (onnx_report, lite_report):
        assert report.checked_on == "synthetic" and report.num_samples == 32
        assert report.agreement is not None and report.max_abs_diff is not None


# ------------------------------------------------------------------ a broken file is caught in every mode


@pytest.mark.parametrize("export, suffix", [(export_onnx, "onnx"), (export_tflite, "tflite")])
@pytest.mark.parametrize("mode", ["validation_data", "calibration sample", "synthetic"])
def test_a_broken_file_raises(export, suffix, mode, quantized, loaded, trained, tmp_path, request):
    request.getfixturevalue(f"broken_{suffix}")
    model = loaded if mode == "synthetic" else quantized["tflite"]
    kwargs = {"validation_data": trained[2][:200]} if mode == "validation_data" else {}
    path = tmp_path / f"broken.{suffix}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ExportError, match=rf"broken\.{suffix} \(kept for inspection\)"):
            export(model, path, **kwargs)
    assert path.stat().st_size > 0
