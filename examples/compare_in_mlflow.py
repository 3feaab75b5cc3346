"""Track two QAT runs in MLflow and compare them: full int8 vs one layer kept in FP32.

    python examples/compare_in_mlflow.py [--quick]
    mlflow ui --backend-store-uri sqlite:///mlflow.db      # then open http://127.0.0.1:5000

Each run logs params (spec, policy, switch epoch), per-epoch metrics of both
phases, every quantizer's range, FP32/quantized/ONNX accuracy and the model
files to MLflow's default store (sqlite:///mlflow.db in this folder).
"""

import argparse

import qat_plugin as qp
from qat_plugin.cli import main as cli
from qat_plugin.integrations.mlflow import MlflowLogger
from qat_plugin.models import compile_classifier, small_residual_cnn
from qat_plugin.recipes import DataConfig

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="2 FP32 + 1 QAT epoch per run")
args = parser.parse_args()
fp32_epochs, qat_epochs = (2, 1) if args.quick else (6, 3)

# sklearn's 8x8 digits as float images in [0, 1], 80/20 split.
x_train, y_train, x_val, y_val = DataConfig(source="sklearn_digits").load()

for run_name, spec in [
    ("full-int8", qp.QuantizationSpec()),
    ("head-fp32", qp.QuantizationSpec(exclude=["head"])),
]:
    model = compile_classifier(small_residual_cnn(input_shape=(8, 8, 1), seed=0), learning_rate=2e-3)
    logger = MlflowLogger(experiment="qat-examples", run_name=run_name, eval_data=(x_val, y_val))
    model.fit(x_train, y_train, epochs=fp32_epochs + qat_epochs, batch_size=32, validation_data=(x_val, y_val),
              callbacks=[qp.QATCallback(start_epoch=fp32_epochs, spec=spec, loggers=[logger])], verbose=0)

cli(["compare", "--experiment", "qat-examples"])
print("Open the runs side by side: mlflow ui --backend-store-uri sqlite:///mlflow.db")
