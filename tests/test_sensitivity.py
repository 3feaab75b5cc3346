"""sensitivity_analysis on real digits: numbers, ranking, table, MLflow metrics and chart."""

from __future__ import annotations

from pathlib import Path

import keras
import pytest

import qat_plugin as qp
from qat_plugin.errors import SpecError
from qat_plugin.models import small_residual_cnn
from qat_plugin.sensitivity import (
    SensitivityReport,
    accuracy,
    layer_macs,
    sensitivity_analysis,
)

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture(scope="module")
def outlier_mlp(digits):
    """An MLP on real digits with one huge hidden channel that leaves FP32 outputs unchanged.

    ReLU is positively homogeneous: multiplying hidden unit 0 by 1000 and its
    outgoing weights by 1/1000 computes the same function, but `head`'s input
    now has an outlier channel, so per-tensor int8 on that input crushes the
    other 31 channels. `head` must come out as the most sensitive layer.
    """
    x, y, xv, yv = digits
    keras.utils.set_random_seed(0)
    L = keras.layers
    inp = keras.Input((8, 8, 1), name="image")
    h = L.Flatten(name="flat")(inp)
    h = L.Dense(32, activation="relu", name="hidden")(h)
    model = keras.Model(inp, L.Dense(10, name="head")(h))
    model.compile("adam", LOSS, metrics=["accuracy"])
    model.fit(x, y, batch_size=64, epochs=8, verbose=0)
    k, b = model.get_layer("hidden").get_weights()
    k[:, 0] *= 1000.0
    b[0] = b[0] * 1000.0 + 1000.0  # always-on: a large positive activation on every input
    model.get_layer("hidden").set_weights([k, b])
    hk, hb = model.get_layer("head").get_weights()
    hb -= hk[0] * 1.0  # cancel the +1000 offset (scaled by 1/1000 below)
    hk[0] /= 1000.0
    model.get_layer("head").set_weights([hk, hb])
    return model


def test_outlier_layer_ranks_first(outlier_mlp, digits):
    x, y, xv, yv = digits
    report = sensitivity_analysis(outlier_mlp, x[:256], (xv, yv))
    fp32 = accuracy(yv, outlier_mlp.predict(xv, verbose=0))
    assert report.fp32_accuracy == pytest.approx(fp32)
    assert report.fp32_accuracy > 0.75
    assert report.ranking == ["head", "hidden"]
    # head alone costs most of the loss; keeping it FP32 wins nearly all of it back.
    assert report.alone_drop("head") > 0.2
    assert report.fp32_accuracy - report.int8_accuracy > 0.2
    assert report.all_but_gain("head") > 0.2
    assert abs(report.alone_drop("hidden")) < 0.03
    # The "all but head" model is exactly the spec `exclude=["head"]`.
    q = qp.quantize_model(outlier_mlp, qp.QuantizationSpec(exclude=["head"]), calibration_data=x[:256])
    assert report.layers[0].all_but_accuracy == pytest.approx(accuracy(yv, q.predict(xv, verbose=0)))
    assert report.layers[0].macs == 32 * 10


def test_table_and_residual_cnn(digits):
    x, y, xv, yv = digits
    model = small_residual_cnn(input_shape=(8, 8, 1), seed=0)
    model.compile("adam", LOSS, metrics=["accuracy"])
    model.fit(x, y, batch_size=64, epochs=2, verbose=0)
    spec = qp.QuantizationSpec(weight_bits=4, exclude=["head"])
    report = sensitivity_analysis(model, x[:128], (xv, yv), spec=spec)
    assert sorted(report.ranking) == ["add", "conv1", "conv2", "conv3"]  # head excluded by the base spec
    scores = [report.alone_drop(n) + report.all_but_gain(n) for n in report.ranking]
    assert scores == sorted(scores, reverse=True)
    lines = str(report).splitlines()
    assert [c.strip() for c in lines[0].split(" | ")[:3]] == ["rank", "layer", "kind"]
    assert lines[2].split(" | ")[1].strip() == report.ranking[0]
    assert "full int8" in lines[-1] and f"{report.fp32_accuracy:.4f}" in lines[-1]
    with pytest.raises(SpecError, match="not quantized by the spec"):
        sensitivity_analysis(model, x[:64], (xv, yv), spec=spec, layers=["head"])
    with pytest.raises(ValueError, match="pair"):
        sensitivity_analysis(model, x[:64], xv)


def test_layer_macs_formula():
    macs = layer_macs(small_residual_cnn())
    assert macs["conv1"] == 28 * 28 * 3 * 3 * 1 * 16
    assert macs["conv2"] == 14 * 14 * 3 * 3 * 16 * 16
    assert macs["conv3"] == 7 * 7 * 3 * 3 * 16 * 32
    assert macs["head"] == 7 * 7 * 32 * 10
    assert macs["add"] == 0 and macs["bn1"] == 0
    L = keras.layers
    grouped = keras.Sequential([keras.Input((6, 6, 8)), L.Conv2D(4, 3, groups=2, name="g"), L.DepthwiseConv2D(3, name="dw")])
    assert layer_macs(grouped)["g"] == 4 * 4 * 3 * 3 * 8 * 4 // 2
    assert layer_macs(grouped)["dw"] == 2 * 2 * 3 * 3 * 4


def test_log_to_mlflow(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    report = SensitivityReport(0.95, 0.80, (
        qp.sensitivity.LayerSensitivity("a", "Dense", 0.94, 0.82, 10),
        qp.sensitivity.LayerSensitivity("b", "Conv2D", 0.85, 0.93, 90),
    ))
    assert report.ranking == ["b", "a"]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run() as active:
            run_id = report.log_to_mlflow(artifact_dir=str(tmp_path / "art"))
        assert run_id == active.info.run_id  # the active run, not a new one
        own = report.log_to_mlflow(artifact_dir=str(tmp_path / "art2"))
        assert own != run_id and mlflow.active_run() is None
    finally:
        mlflow.set_tracking_uri(None)
    client = mlflow.MlflowClient(uri)
    m = client.get_run(run_id).data.metrics
    assert m["sensitivity/b/drop_alone"] == pytest.approx(0.10)
    assert m["sensitivity/b/gain_if_fp32"] == pytest.approx(0.13)
    assert m["sensitivity/b/rank"] == 1 and m["sensitivity/a/rank"] == 2
    assert m["int8_accuracy"] == pytest.approx(0.80)
    png = client.download_artifacts(run_id, "sensitivity/sensitivity.png", str(tmp_path / "dl"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = Path(client.download_artifacts(run_id, "sensitivity/sensitivity.txt", str(tmp_path / "dl"))).read_text()
    assert table.splitlines()[2].split(" | ")[1].strip() == "b"
