"""Find which layers to keep in FP32: sensitivity ranking, then a keras-tuner search, every trial in MLflow.

    python examples/tune_partial_quantization.py [--quick]
    mlflow ui --backend-store-uri sqlite:///mlflow.db      # the trials as nested runs, with a Pareto plot

Each trial trains FP32, switches to QAT with its own set of FP32 layers, and is
scored on quantized validation accuracy, penalised by the share of layers kept
in FP32. The best configuration comes back as a `QuantizationSpec`.
"""

import argparse

import keras_tuner as kt
import mlflow

import qat_plugin as qp
from qat_plugin.integrations.tuner import (
    OBJECTIVE,
    PartialQuantizationHyperModel,
    PartialQuantizationObjective,
    get_best_spec,
    log_search_summary,
)
from qat_plugin.models import compile_classifier, small_residual_cnn
from qat_plugin.recipes import DataConfig

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="2 trials of 1 FP32 + 1 QAT epoch")
args = parser.parse_args()
fp32_epochs, trials = (1, 2) if args.quick else (4, 6)

x_train, y_train, x_val, y_val = DataConfig(source="sklearn_digits").load()


def build():
    return compile_classifier(small_residual_cnn(input_shape=(8, 8, 1), seed=0), learning_rate=2e-3)


# 1. Which layers hurt most when quantized? (calibration only, from one trained FP32 model)
model = build()
model.fit(x_train, y_train, epochs=fp32_epochs, batch_size=32, verbose=0)
report = qp.sensitivity_analysis(model, x_train[:256], eval_data=(x_val, y_val))
print(report)

# 2. Search: keep the k most sensitive layers in FP32, at most 0.5 points below FP32.
hypermodel = PartialQuantizationHyperModel(
    build, fp32_epochs=fp32_epochs, qat_epochs=1, layers=report, mode="top_k",
    objective=PartialQuantizationObjective(max_drop=0.005), experiment="qat-search",
)
tuner = kt.RandomSearch(hypermodel, objective=OBJECTIVE, max_trials=trials, seed=0, directory="kt", project_name="search", overwrite=True)
with mlflow.start_run(run_name="partial-quantization-search"):
    tuner.search(x_train, y_train, validation_data=(x_val, y_val), batch_size=32, verbose=0)
    log_search_summary(tuner)
    spec = get_best_spec(tuner)
print("best spec:", spec.to_json())

# 3. Train with it, as any other run.
final = build()
final.fit(x_train, y_train, epochs=fp32_epochs + 1, batch_size=32, validation_data=(x_val, y_val), verbose=0,
          callbacks=[qp.QATCallback(start_epoch=fp32_epochs, spec=spec, verbose=0)])
print(f"kept in FP32: {list(spec.exclude)}; quantized val accuracy {final.evaluate(x_val, y_val, verbose=0)[1]:.4f}")
