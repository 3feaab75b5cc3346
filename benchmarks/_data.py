"""Data shared by the benchmark scripts: real MNIST digits from ../shared/datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mnist10k.npz"


def load_mnist10k(path: Path = MNIST):
    """(x_train, y_train, x_test, y_test), images as float32 (N, 28, 28, 1) in [0, 1]."""
    d = np.load(path)
    f = lambda a: (a.astype("float32") / 255.0)[..., None]  # noqa: E731
    return f(d["x_train"]), d["y_train"].astype("int32"), f(d["x_test"]), d["y_test"].astype("int32")

