"""Add QATCallback to model.fit: FP32 first, then quantization-aware training, in one call.

    python examples/fit_with_callback.py [--quick]

Trains the small residual CNN on sklearn's 8x8 digits (offline), switches to int8
QAT at epoch 6, and exports the quantized model to ONNX with Q/DQ pairs.
"""

import argparse

import keras

import qat_plugin as qp
from qat_plugin.models import compile_classifier, small_residual_cnn
from qat_plugin.recipes import DataConfig

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="2 FP32 + 1 QAT epoch")
args = parser.parse_args()
fp32_epochs, qat_epochs = (2, 1) if args.quick else (6, 3)

# sklearn's 8x8 digits as float images in [0, 1], 80/20 split.
x_train, y_train, x_val, y_val = DataConfig(source="sklearn_digits").load()

model = compile_classifier(small_residual_cnn(input_shape=(8, 8, 1), seed=0), learning_rate=2e-3)
history = model.fit(
    x_train, y_train, epochs=fp32_epochs + qat_epochs, batch_size=32, validation_data=(x_val, y_val),
    callbacks=[qp.QATCallback(start_epoch=fp32_epochs, lr_multiplier=0.1)], verbose=2,
)
# `model` is now the quantized model.
print(qp.describe(model))
val = history.history["val_accuracy"]
print(f"FP32 val accuracy before the switch: {val[fp32_epochs - 1]:.4f}; after QAT: {val[-1]:.4f}")
report = qp.export_onnx(model, "digits_int8.onnx", validation_data=x_val)
print(f"digits_int8.onnx: {report.file_bytes:,d} bytes, onnxruntime agrees with Keras on {report.agreement:.2%}")
assert isinstance(model.get_layer("conv1"), qp.QuantizeWrapper)
keras.backend.clear_session()
