"""Shared fixtures: real data that ships with the repo's environment, small models."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mnist10k.npz"


@pytest.fixture(scope="session")
def digits():
    """sklearn's 1,797 real 8x8 digits as (x_train, y_train, x_test, y_test), x in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    y = d.target.astype("int32")
    return x[:1400], y[:1400], x[1400:], y[1400:]


@pytest.fixture(scope="session")
def mnist():
    """The 10,000 real MNIST digits in ../shared/datasets, scaled to [0, 1]."""
    if not MNIST.exists():
        pytest.skip(f"{MNIST} is not present")
    d = np.load(MNIST)
    f = lambda a: (a.astype("float32") / 255.0)[..., None]  # noqa: E731
    return f(d["x_train"]), d["y_train"].astype("int32"), f(d["x_test"]), d["y_test"].astype("int32")


def small_cnn(input_shape=(8, 8, 1), classes=10, seed=0) -> keras.Model:
    """Conv-BN-ReLU x2, a residual add, pooling and a dense head."""
    keras.utils.set_random_seed(seed)
    L = keras.layers
    inp = keras.Input(input_shape, name="image")
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    y = L.Conv2D(16, 3, padding="same", name="conv2")(x)
    y = L.ReLU(name="relu2")(y)
    x = L.Add(name="add")([x, y])
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(classes, name="head")(x)
    return keras.Model(inp, out, name="small_cnn")



@pytest.fixture(autouse=True)
def _fresh_mlflow_globals():
    """MLflow keeps the tracking URI and active experiment per process (`set_experiment` also
    exports MLFLOW_EXPERIMENT_ID): don't let one test's leak into the next."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_URI")}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    import sys

    if "mlflow" in sys.modules:
        import mlflow
        import mlflow.tracking.fluent

        mlflow.set_tracking_uri(None)
        mlflow.tracking.fluent._active_experiment_id = None
