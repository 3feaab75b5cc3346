"""Recipes (YAML -> validated configs) and the `qat-plugin` command line, run for real on the digits demo."""

from pathlib import Path

import pytest

from qat_plugin.cli import main
from qat_plugin.recipes import Recipe, RecipeError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
BASE = {"name": "t", "model": {"builder": "qat_plugin.models:small_residual_cnn"}, "data": {"source": "sklearn_digits"}}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = Recipe.from_yaml(path)
    assert recipe.name and recipe.train.qat_epochs >= 1 and recipe.export


@pytest.mark.parametrize(
    "change, match",
    [
        ({"trian": {}}, r"`recipe.trian` is not allowed. Allowed keys in `recipe`: \["),
        ({"train": {"epochs": 3}}, r"`train.epochs` is not allowed.*'fp32_epochs'"),
        ({"data": {"source": "csv"}}, r"`data.source` must be one of \('sklearn_digits', 'npz'"),
        ({"data": {"source": "npz"}}, r"`data.source: npz` needs `data.path`"),
        ({"export": ["coreml"]}, r"`export` entry 'coreml' is not allowed. Allowed: \('keras', 'onnx', 'tflite'\)"),
        ({"spec": {"bits": 8}}, r"Unknown QuantizationSpec keys \['bits'\]"),
        ({"policy": "tensorRT"}, r"Unknown placement policy"),
        ({"model": {"builder": "no_module"}}, r"'module:function'"),
        ({"model": {}}, r"exactly one of `builder`"),
        ({"train": {"qat_epochs": 0}}, r"`train.qat_epochs` must be a positive int"),
        ({"mlflow": {"server": "x"}}, r"`mlflow.server` is not allowed"),
    ],
)
def test_bad_recipes_name_the_key_and_what_is_allowed(change, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict({**BASE, **change})


def test_missing_section_and_unimportable_builder():
    with pytest.raises(RecipeError, match="needs `data`"):
        Recipe.from_dict({"name": "t", "model": BASE["model"]})
    recipe = Recipe.from_dict({**BASE, "model": {"builder": "qat_plugin.models:nope"}})
    with pytest.raises(RecipeError, match="can't be imported"):
        recipe.model.build()


def test_cli_run_describe_export_compare_on_the_digits_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # MLflow's default store, sqlite:///mlflow.db, lands here
    demo = Path(__file__).resolve().parents[1] / "recipes" / "digits_cnn.yaml"
    assert main(["run", str(demo), "--quick", "--quiet", "--out", "runs"]) == 0
    out = capsys.readouterr().out
    assert "QAT accuracy (Keras, quantized)" in out and "MLflow run" in out and "latency, batch 1" in out
    keras_file = next(Path("runs").rglob("*.keras"))
    onnx_files = sorted(Path("runs").rglob("*.onnx"))
    assert len(onnx_files) == 2  # FP32 (before the switch) and int8

    assert main(["describe", str(keras_file)]) == 0
    table = capsys.readouterr().out
    assert "conv1" in table and "weight" in table and "9 quantizers in 5 layers" in table

    assert main(["export", str(keras_file), "--out", "again.onnx"]) == 0
    assert "int8 weights" in capsys.readouterr().out and Path("again.onnx").stat().st_size > 1000

    assert main(["compare", "--experiment", "qat-digits", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 0
    listing = capsys.readouterr().out
    assert "digits-cnn" in listing and "tensorrt" in listing and "1 run(s) of experiment 'qat-digits'" in listing


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {builder: 'qat_plugin.models:small_residual_cnn'}\ndata: {source: sklearn_digits}\ntrain: {epoch: 3}\n")
    assert main(["run", str(bad)]) == 2
    assert "error: Recipe key `train.epoch` is not allowed" in capsys.readouterr().err


def test_tuning_block_is_validated():
    with pytest.raises(RecipeError, match=r"`tuning.tuner` must be one of \('random', 'bayesian', 'hyperband'\)"):
        Recipe.from_dict({**BASE, "tuning": {"tuner": "grid"}})
    with pytest.raises(RecipeError, match=r"`tuning.trials` is not allowed.*'max_trials'"):
        Recipe.from_dict({**BASE, "tuning": {"trials": 3}})


def test_cli_tune_writes_a_best_spec_that_loads(tmp_path, monkeypatch, capsys):
    from qat_plugin import QuantizationSpec

    monkeypatch.chdir(tmp_path)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tune_digits.yaml"
    assert main(["tune", str(recipe), "--quick", "--out", "runs"]) == 0
    out = capsys.readouterr().out
    assert "rank | layer" in out and "best: keep" in out
    spec = QuantizationSpec.from_json(str(tmp_path / "runs" / "tune-digits" / "best_spec.json"))
    assert set(spec.exclude) <= {"conv1", "conv2", "conv3", "add", "head"}
    import mlflow

    runs = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_experiment_by_name("qat-digits-search").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2


def test_image_directory_recipe_runs_end_to_end(tmp_path, monkeypatch):
    """A folder of class subfolders, read with keras.utils.image_dataset_from_directory."""
    import numpy as np
    from PIL import Image

    from qat_plugin.runner import run_recipe

    rng = np.random.default_rng(0)
    for label, base in (("dark", 40), ("light", 200)):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(24):
            pixels = np.clip(base + rng.normal(0, 20, size=(16, 16, 3)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    recipe = Recipe.from_dict(
        {
            "name": "folder",
            "model": {"builder": "qat_plugin.models:small_residual_cnn", "args": {"input_shape": [16, 16, 3], "classes": 2, "seed": 0}},
            "data": {"source": "image_directory", "path": "images", "image_size": [16, 16], "validation_split": 0.25},
            "train": {"fp32_epochs": 2, "qat_epochs": 1, "batch_size": 8, "learning_rate": 0.01},
            "export": ["keras", "onnx"],
        },
        base_dir=tmp_path,
    )
    monkeypatch.chdir(tmp_path)
    summary = run_recipe(recipe, "runs", verbose=0)
    assert {"keras", "onnx", "onnx FP32"} <= set(summary.files) and all(p.exists() for p in summary.files.values())
    assert summary.fp32_accuracy is not None
    # The saved model is the quantized one and scores what the summary says on the same validation images.
    import keras

    from qat_plugin import quantize_wrappers

    loaded = keras.models.load_model(summary.files["keras"], safe_mode=True)
    assert len(quantize_wrappers(loaded)) == 5
    _, val = recipe.data.load(tmp_path, batch_size=8)
    loaded.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    assert loaded.evaluate(val, verbose=0)[1] == pytest.approx(summary.qat_accuracy)
    assert summary.mlflow_run_id is None  # no mlflow block, no run


def test_cpu_recipe_exports_fused_onnx_and_int8_tflite_and_logs_both(tmp_path, monkeypatch, capsys):
    import dataclasses

    import mlflow

    from qat_plugin.runner import run_recipe

    monkeypatch.chdir(tmp_path)
    recipe = Recipe.from_yaml(Path(__file__).resolve().parents[1] / "recipes" / "digits_cpu.yaml")
    # Fewer epochs than the shipped recipe, more than --quick: a near-untrained model's logits are
    # near ties, which integer kernels may break either way.
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, fp32_epochs=5, qat_epochs=1))
    summary = run_recipe(recipe, "runs", verbose=0)
    assert summary.files["tflite"].suffix == ".tflite" and summary.files["tflite"].stat().st_size > 1000
    client = mlflow.MlflowClient(summary.tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.data.params["qat.policy"] == "onnxruntime"
    assert run.data.metrics["tflite_accuracy"] > 0.6 and run.data.metrics["onnx_accuracy"] > 0.6
    assert abs(run.data.metrics["tflite_accuracy"] - run.data.metrics["onnx_accuracy"]) < 0.03
    assert run.data.metrics["tflite_agreement"] >= 0.99 and run.data.tags["qat.tflite_checked_on"] == "validation_data"

    assert main(["export", str(summary.files["keras"]), "--out", "cpu.onnx"]) == 0
    line = capsys.readouterr().out
    assert "for onnxruntime" in line and "(none left in float)" in line, line
    # Loaded from a file with no --data: it checked itself on synthetic inputs, and says so.
    assert "on 32 synthetic inputs" in line, line
    assert main(["export", str(summary.files["keras"]), "--out", "again.tflite"]) == 0
    assert "fully int8" in capsys.readouterr().out
