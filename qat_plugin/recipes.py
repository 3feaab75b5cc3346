"""Declarative QAT runs: a YAML recipe -> validated frozen configs -> one `run_recipe` call.

A recipe names a model, data, a schedule (FP32 epochs, then QAT epochs), a
spec and policy, export targets and an MLflow experiment. Every key is checked
against an allow-list when the recipe is read, so a typo fails at once with
the key and what is allowed, not after an epoch of training.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qat_plugin.config import QuantizationSpec, get_policy
from qat_plugin.errors import SpecError

DATA_SOURCES = ("sklearn_digits", "npz", "keras_dataset", "image_directory")
EXPORTS = ("keras", "onnx", "tflite")


class RecipeError(SpecError):
    """A recipe has an unknown key or a value that is not allowed."""


def _check_keys(section: str, given: Mapping, allowed: set[str], required: set[str] = frozenset()) -> None:
    if not isinstance(given, Mapping):
        raise RecipeError(f"Recipe section `{section}` must be a mapping. Received: {given!r}")
    for key in given:
        if key not in allowed:
            raise RecipeError(f"Recipe key `{section}.{key}` is not allowed. Allowed keys in `{section}`: {sorted(allowed)}")
    for key in sorted(required - set(given)):
        raise RecipeError(f"Recipe section `{section}` needs `{key}`. Allowed keys: {sorted(allowed)}")


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """`builder: "module:function"` returning a Keras model, or `application: ResNet50`
    (a `keras.applications` name, built with `weights=None` unless `args` say otherwise)."""

    builder: str | None = None
    application: str | None = None
    args: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if (self.builder is None) == (self.application is None):
            raise RecipeError("Recipe `model` needs exactly one of `builder` ('module:function') or `application` (a keras.applications name).")
        if self.builder is not None and ":" not in self.builder:
            raise RecipeError(f"`model.builder` must be 'module:function'. Received: {self.builder!r}")

    def build(self):
        import keras

        if self.application is not None:
            fn = getattr(keras.applications, self.application, None)
            if fn is None:
                raise RecipeError(f"`model.application` {self.application!r} is not in keras.applications.")
            return fn(**{"weights": None, **self.args})
        module, _, name = self.builder.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise RecipeError(f"`model.builder` {self.builder!r} can't be imported: {e}") from None
        return fn(**self.args)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data comes from; images come out float32 in [0, 1] with a channel axis."""

    source: str
    path: str | None = None
    name: str | None = None
    image_size: tuple[int, int] | None = None
    validation_split: float = 0.2
    limit: int | None = None

    def __post_init__(self):
        if self.source not in DATA_SOURCES:
            raise RecipeError(f"`data.source` must be one of {DATA_SOURCES}. Received: {self.source!r}")
        need = {"npz": "path", "image_directory": "path", "keras_dataset": "name"}.get(self.source)
        if need and not getattr(self, need):
            raise RecipeError(f"`data.source: {self.source}` needs `data.{need}`.")

    def load(self, base: Path = Path("."), batch_size: int = 32):
        """(x_train, y_train, x_val, y_val) as arrays, or batched (train_ds, val_ds) for image directories."""
        if self.source == "sklearn_digits":
            from sklearn.datasets import load_digits

            d = load_digits()
            x, y = (d.images / 16.0).astype("float32")[..., None], d.target.astype("int32")
            n = int(len(x) * (1 - self.validation_split))
            return self._limit(x[:n], y[:n], x[n:], y[n:])
        if self.source == "npz":
            d = np.load(base / self.path)
            return self._limit(*(self._images(d[k]) if k.startswith("x") else d[k].astype("int32") for k in ("x_train", "y_train", "x_test", "y_test")))
        if self.source == "keras_dataset":
            import keras

            (xt, yt), (xv, yv) = getattr(keras.datasets, self.name).load_data()
            return self._limit(self._images(xt), yt.reshape(-1).astype("int32"), self._images(xv), yv.reshape(-1).astype("int32"))
        import keras

        kwargs = dict(validation_split=self.validation_split, seed=0, image_size=tuple(self.image_size or (224, 224)),
                      batch_size=batch_size)
        train = keras.utils.image_dataset_from_directory(base / self.path, subset="training", **kwargs)
        val = keras.utils.image_dataset_from_directory(base / self.path, subset="validation", **kwargs)
        scale = lambda x, y: (x / 255.0, y)  # noqa: E731
        return train.map(scale), val.map(scale)

    @staticmethod
    def _images(x: np.ndarray) -> np.ndarray:
        x = x.astype("float32") / (255.0 if x.dtype == np.uint8 else 1.0)
        return x[..., None] if x.ndim == 3 else x

    def _limit(self, xt, yt, xv, yv):
        if self.limit:
            xt, yt, xv, yv = xt[: self.limit], yt[: self.limit], xv[: self.limit], yv[: self.limit]
        return xt, yt, xv, yv


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """FP32 epochs, then QAT epochs, in one `fit` with `QATCallback(start_epoch=fp32_epochs)`."""

    fp32_epochs: int = 3
    qat_epochs: int = 1
    batch_size: int = 32
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    schedule: Mapping[str, Any] | None = None
    lr_multiplier: float = 0.1
    freeze_bn_after: int | None = None

    def __post_init__(self):
        for name in ("fp32_epochs", "qat_epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "fp32_epochs" else 1):
                raise RecipeError(f"`train.{name}` must be a positive int. Received: {value!r}")
        if not isinstance(self.learning_rate, (int, float)) or self.learning_rate <= 0:
            raise RecipeError(f"`train.learning_rate` must be a number > 0. Received: {self.learning_rate!r}")

    def make_optimizer(self):
        import keras

        lr = self.learning_rate
        if self.schedule:
            cfg = dict(self.schedule)
            name = cfg.pop("name", None)
            cls = getattr(keras.optimizers.schedules, str(name), None)
            if cls is None:
                raise RecipeError(f"`train.schedule.name` {name!r} is not a keras.optimizers.schedules class.")
            lr = cls(lr, **cfg)
        try:
            return keras.optimizers.get({"class_name": self.optimizer, "config": {"learning_rate": lr}})
        except ValueError as e:
            raise RecipeError(f"`train.optimizer` {self.optimizer!r} is not a Keras optimizer: {e}") from None


TUNERS = ("random", "bayesian", "hyperband")


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """The search `qat-plugin tune` runs: which layers stay FP32 (see `integrations.tuner`)."""

    tuner: str = "random"
    max_trials: int = 6
    mode: str = "top_k"
    max_drop: float = 0.003
    cost: str = "layers"
    lr_multipliers: tuple[float, ...] = (0.1,)
    calibrators: tuple[str, ...] = ("max",)

    def __post_init__(self):
        if self.tuner not in TUNERS:
            raise RecipeError(f"`tuning.tuner` must be one of {TUNERS}. Received: {self.tuner!r}")
        if self.mode not in ("per_layer", "top_k"):
            raise RecipeError(f"`tuning.mode` must be 'per_layer' or 'top_k'. Received: {self.mode!r}")
        if self.cost not in ("layers", "macs"):
            raise RecipeError(f"`tuning.cost` must be 'layers' or 'macs'. Received: {self.cost!r}")
        if isinstance(self.max_trials, bool) or not isinstance(self.max_trials, int) or self.max_trials < 1:
            raise RecipeError(f"`tuning.max_trials` must be an int >= 1. Received: {self.max_trials!r}")
        object.__setattr__(self, "lr_multipliers", tuple(self.lr_multipliers))
        object.__setattr__(self, "calibrators", tuple(self.calibrators))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A whole run. Read one with `Recipe.from_yaml(path)`.

    >>> r = Recipe.from_dict({"name": "demo", "model": {"builder": "qat_plugin.models:small_residual_cnn"},
    ...                       "data": {"source": "sklearn_digits"}})
    >>> r.train.fp32_epochs, r.policy, r.spec.calibrator
    (3, 'tensorrt', 'max')
    """

    name: str
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()
    spec: QuantizationSpec = QuantizationSpec()
    policy: str = "tensorrt"
    export: tuple[str, ...] = ("keras", "onnx")
    mlflow: Mapping[str, Any] | None = None
    tuning: TuningConfig | None = None
    base_dir: Path = Path(".")

    @classmethod
    def from_dict(cls, raw: Mapping, base_dir: Path = Path(".")) -> Recipe:
        _check_keys("recipe", raw, _fields(cls) - {"base_dir"}, {"name", "model", "data"})
        _check_keys("model", raw["model"], _fields(ModelConfig))
        _check_keys("data", raw["data"], _fields(DataConfig), {"source"})
        _check_keys("train", raw.get("train", {}), _fields(TrainConfig))
        _check_keys("mlflow", raw.get("mlflow") or {}, {"experiment", "tracking_uri", "registered_model_name"})
        _check_keys("tuning", raw.get("tuning") or {}, _fields(TuningConfig))
        export = tuple(raw.get("export", ("keras", "onnx")))
        for target in export:
            if target not in EXPORTS:
                raise RecipeError(f"`export` entry {target!r} is not allowed. Allowed: {EXPORTS}")
        try:
            spec = QuantizationSpec.from_config(raw.get("spec", {}))
            get_policy(raw.get("policy", "tensorrt"))
        except SpecError as e:
            raise RecipeError(f"Recipe `spec`/`policy`: {e}") from None
        data = dict(raw["data"])
        if data.get("image_size") is not None:
            data["image_size"] = tuple(data["image_size"])
        return cls(
            name=str(raw["name"]),
            model=ModelConfig(**raw["model"]),
            data=DataConfig(**data),
            train=TrainConfig(**raw.get("train", {})),
            spec=spec,
            policy=raw.get("policy", "tensorrt"),
            export=export,
            mlflow=raw.get("mlflow"),
            tuning=None if raw.get("tuning") is None else TuningConfig(**raw["tuning"]),
            base_dir=base_dir,
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        """Read and validate a recipe; relative data paths are relative to the recipe's folder."""
        import yaml

        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise RecipeError(f"{path} is not valid YAML: {e}") from None
        return cls.from_dict(raw or {}, base_dir=path.parent)
