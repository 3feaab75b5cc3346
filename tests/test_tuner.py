"""PartialQuantizationHyperModel with keras-tuner on real MNIST, read back through MlflowClient.

Also runnable as a script: `python tests/test_tuner.py <role> <tmp> <parent_run_id>` is one
process of the distributed (chief + worker) test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

kt = pytest.importorskip("keras_tuner")
mlflow = pytest.importorskip("mlflow")

import qat_plugin as qp
from qat_plugin.errors import SpecError
from qat_plugin.integrations.tuner import (
    OBJECTIVE,
    PartialQuantizationHyperModel,
    PartialQuantizationObjective,
    get_best_spec,
    log_search_summary,
    trial_table,
)
from qat_plugin.models import compile_classifier, small_residual_cnn
from qat_plugin.sensitivity import layer_macs

CANDIDATES = ["conv1", "conv2", "add", "conv3", "head"]
N_TRAIN, N_VAL = 768, 300


def _data(mnist):
    x, y, xv, yv = mnist
    return x[:N_TRAIN], y[:N_TRAIN], xv[:N_VAL], yv[:N_VAL]


def _build(hp):
    return compile_classifier(small_residual_cnn(seed=0))


# ---------------------------------------------------------------- unit: objective and validation


def test_objective_prefers_feasible_then_fewer_fp32_layers():
    o = PartialQuantizationObjective(max_drop=0.003, reference_accuracy=0.98)
    feasible_few = o.score(0.978, 0.2)
    feasible_many = o.score(0.979, 0.6)
    infeasible = o.score(0.97, 0.0)
    assert feasible_few == pytest.approx(2 - 0.2 + 0.01 * 0.978)
    assert infeasible == pytest.approx(0.97)
    assert feasible_few > feasible_many > infeasible
    # Without a fixed reference, the trial's own FP32 accuracy is the reference.
    assert PartialQuantizationObjective(max_drop=0.01).score(0.90, 0.0, fp32_accuracy=0.905) > 1.9
    with pytest.raises(SpecError, match="max_drop"):
        PartialQuantizationObjective(max_drop=3)
    with pytest.raises(SpecError, match="cost"):
        PartialQuantizationObjective(cost="params")


def test_hypermodel_validates_and_declares_hps():
    with pytest.raises(ValueError, match="top_k"):
        PartialQuantizationHyperModel(_build, 1, 1, mode="top_k")
    with pytest.raises(ValueError, match="switch_epochs"):
        PartialQuantizationHyperModel(_build, 1, 1, switch_epochs=[2])
    with pytest.raises(SpecError, match="calibrators"):
        PartialQuantizationHyperModel(_build, 1, 1, calibrators=["minmax"])
    hm = PartialQuantizationHyperModel(_build, 2, 1, switch_epochs=[1, 2], lr_multipliers=[1.0, 0.1], calibrators=["max", "mse"])
    hp = kt.HyperParameters()
    model = hm.build(hp)
    assert model.compiled and hm.layers == tuple(CANDIDATES)
    assert sorted(hp.values) == sorted([f"fp32/{n}" for n in CANDIDATES] + ["switch_epoch", "lr_multiplier", "calibrator"])
    hp.values.update({"fp32/conv1": True, "fp32/head": True, "calibrator": "mse"})
    assert hm.spec_for(hp) == qp.QuantizationSpec(exclude=["conv1", "head"], calibrator="mse")
    top = PartialQuantizationHyperModel(_build, 1, 1, layers=["head", "conv1", "conv3"], mode="top_k", max_fp32_layers=2)
    hp2 = kt.HyperParameters()
    top.build(hp2)
    assert hp2.get("keep_fp32_k") == 0 and hp2._hps["keep_fp32_k"][0].max_value == 2
    hp2.values["keep_fp32_k"] = 2
    assert top.fp32_layers(hp2) == ["head", "conv1"]
    bad = PartialQuantizationHyperModel(_build, 1, 1, layers=["bn1"], mode="top_k")
    with pytest.raises(SpecError, match="bn1"):
        bad.build(kt.HyperParameters())


# ---------------------------------------------------------------- a real search, read back from MLflow


def test_random_search_nested_runs_pareto_and_best_spec(mnist, tmp_path):
    x, y, xv, yv = _data(mnist)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    hm = PartialQuantizationHyperModel(_build, fp32_epochs=1, qat_epochs=1, tracking_uri=uri, artifact_dir=str(tmp_path / "art"),
                                       objective=PartialQuantizationObjective(max_drop=0.01))
    tuner = kt.RandomSearch(hm, objective=OBJECTIVE, max_trials=3, seed=3, directory=str(tmp_path / "kt"), project_name="rs")
    try:
        with mlflow.start_run(run_name="search") as parent:
            tuner.search(x, y, validation_data=(xv, yv), batch_size=128, verbose=0)
            files = log_search_summary(tuner, artifact_dir=str(tmp_path / "summary"))
    finally:
        mlflow.set_tracking_uri(None)
    client = mlflow.MlflowClient(uri)
    pid = parent.info.run_id
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{pid}'")
    assert len(runs) == 3
    rows = {r["trial_id"]: r for r in trial_table(tuner)}
    assert len(rows) == 3
    macs = layer_macs(small_residual_cnn())
    total = sum(macs[n] for n in CANDIDATES)
    for run in runs:
        m, p = run.data.metrics, run.data.params
        fp32 = json.loads(p["fp32_layers"])
        row = rows[run.data.tags["keras_tuner.trial_id"]]
        assert fp32 == row["fp32_layers"]
        assert m["n_fp32_layers"] == len(fp32)
        assert m["quantized_mac_share"] == pytest.approx(1 - sum(macs[n] for n in fp32) / total)
        assert m["fp32_share"] == pytest.approx(len(fp32) / 5)
        assert 0.3 < m["quantized_accuracy"] <= 1.0 and 0.3 < m["fp32_reference_accuracy"] <= 1.0  # 10 classes: chance is 0.1
        assert m["quantized_accuracy"] == pytest.approx(row["quantized_accuracy"])
        assert m["score"] == pytest.approx(hm.objective.score(m["quantized_accuracy"], m["fp32_share"], m["fp32_reference_accuracy"]))
        # MlflowLogger logged the epochs and the spec into the same nested run.
        assert m["qat_phase"] == 1.0 and json.loads(p["qat.spec.exclude"]) == fp32
        assert run.info.status == "FINISHED"
    best = max(rows.values(), key=lambda r: r["score"])
    spec = get_best_spec(tuner)
    assert list(spec.exclude) == best["fp32_layers"]
    # The parent holds the Pareto plot, the best spec (loadable) and the table.
    names = {a.path for a in client.list_artifacts(pid, "search")}
    assert names == {"search/pareto.png", "search/best_spec.json", "search/trials.json"}
    spec_path = client.download_artifacts(pid, "search/best_spec.json", str(tmp_path / "dl"))
    assert qp.QuantizationSpec.from_json(spec_path) == spec
    assert files["pareto"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pm = client.get_run(pid).data.metrics
    assert pm["best_quantized_accuracy"] == pytest.approx(best["quantized_accuracy"])
    # The spec drives a QATCallback directly.
    model = _build(None)
    cb = qp.QATCallback(start_epoch=0, spec=spec, verbose=0)
    model.fit(x[:256], y[:256], batch_size=128, epochs=1, callbacks=[cb], verbose=0)
    wrapped = {w.inner_name for w in qp.wrappers.quantize_wrappers(model)}
    assert wrapped == set(CANDIDATES) - set(spec.exclude)


@pytest.mark.parametrize("kind", ["bayesian", "hyperband"])
def test_bayesian_and_hyperband_top_k(mnist, tmp_path, kind):
    x, y, xv, yv = _data(mnist)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ranking = ["head", "conv1", "conv3", "conv2", "add"]
    hm = PartialQuantizationHyperModel(_build, fp32_epochs=1, qat_epochs=1, layers=ranking, mode="top_k", max_fp32_layers=3,
                                       lr_multipliers=[1.0, 0.5], tracking_uri=uri, mlflow_logger=False,
                                       objective=PartialQuantizationObjective(max_drop=0.01, cost="macs"))
    common = dict(objective=OBJECTIVE, directory=str(tmp_path / "kt"), project_name=kind, seed=1)
    if kind == "bayesian":
        tuner = kt.BayesianOptimization(hm, max_trials=3, num_initial_points=2, **common)
    else:  # brackets of 1 and 2 epochs: the second round reloads a first-round checkpoint
        tuner = kt.Hyperband(hm, max_epochs=2, factor=2, hyperband_iterations=1, **common)
    try:
        tuner.search(x, y, validation_data=(xv, yv), batch_size=128, verbose=0)
    finally:
        mlflow.set_tracking_uri(None)
    rows = trial_table(tuner)
    assert len(rows) >= 3
    statuses = [t.status for t in tuner.oracle.trials.values()]
    assert statuses.count("COMPLETED") == len(rows) and "FAILED" not in statuses
    if kind == "hyperband":  # at least one trial continued from a checkpoint (FP32-shaped weights)
        assert any("tuner/trial_id" in t.hyperparameters.values for t in tuner.oracle.trials.values())
    best = tuner.get_best_hyperparameters(1)[0]
    spec = get_best_spec(tuner)
    assert list(spec.exclude) == ranking[: best.get("keep_fp32_k")]
    macs = layer_macs(small_residual_cnn())
    for r in rows:  # cost="macs": the FP32 share is the FP32 layers' share of MACs
        assert r["fp32_share"] == pytest.approx(1 - r["quantized_mac_share"])
        assert r["fp32_share"] == pytest.approx(sum(macs[n] for n in r["fp32_layers"]) / sum(macs.values()))
    # Every trial is its own nested run under one automatically created parent.
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs(["0"], f"tags.mlflow.parentRunId = '{hm.parent_run_id}'")
    assert len(runs) == len(rows)
    log_search_summary(tuner, artifact_dir=str(tmp_path / "summary"))
    assert client.get_run(hm.parent_run_id).info.status == "FINISHED"


# ---------------------------------------------------------------- distributed: a chief and a worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _role(role: str, tmp: str, parent: str) -> None:
    """One process of the distributed search (the env vars select chief or worker)."""
    from conftest import MNIST

    d = np.load(MNIST)
    f = lambda a: (a.astype("float32") / 255.0)[..., None]
    x, y = f(d["x_train"][:512]), d["y_train"][:512].astype("int32")
    xv, yv = f(d["x_test"][:300]), d["y_test"][:300].astype("int32")
    uri = f"sqlite:///{tmp}/mlflow.db"
    hm = PartialQuantizationHyperModel(_build, fp32_epochs=1, qat_epochs=1, tracking_uri=uri, parent_run_id=parent, mlflow_logger=False)
    tuner = kt.RandomSearch(hm, objective=OBJECTIVE, max_trials=2, seed=5, directory=f"{tmp}/kt", project_name="dist")
    tuner.search(x, y, validation_data=(xv, yv), batch_size=128, verbose=0)
    if role == "chief":  # the chief's oracle saw every trial: it writes the summary
        log_search_summary(tuner, artifact_dir=f"{tmp}/summary")
        Path(tmp, "chief_best.json").write_text(get_best_spec(tuner).to_json())


def test_distributed_chief_and_worker(tmp_path):
    from conftest import MNIST

    if not MNIST.exists():
        pytest.skip(f"{MNIST} is not present")
    pytest.importorskip("grpc")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    parent = client.create_run("0", run_name="distributed-search").info.run_id
    port = str(_free_port())
    procs = {}
    for role in ("chief", "worker0"):
        env = dict(os.environ, KERASTUNER_TUNER_ID=role, KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=port,
                   PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
        log = open(tmp_path / f"{role}.log", "w")
        procs[role] = subprocess.Popen([sys.executable, __file__, role, str(tmp_path), parent], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for role, p in procs.items():
            assert p.wait(240) == 0, (tmp_path / f"{role}.log").read_text()[-3000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    runs = client.search_runs(["0"], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(runs) == 2  # both trials ran on the worker, each a nested run
    assert all(0.2 < r.data.metrics["quantized_accuracy"] <= 1 for r in runs)  # chance is 0.1
    best_score = max(r.data.metrics["score"] for r in runs)
    best_run = next(r for r in runs if r.data.metrics["score"] == best_score)
    spec = qp.QuantizationSpec.from_json(str(tmp_path / "chief_best.json"))
    assert list(spec.exclude) == json.loads(best_run.data.params["fp32_layers"])
    names = {a.path for a in client.list_artifacts(parent, "search")}
    assert {"search/pareto.png", "search/best_spec.json"} <= names


if __name__ == "__main__":
    _role(*sys.argv[1:4])
