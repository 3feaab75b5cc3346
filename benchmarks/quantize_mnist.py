"""Quantization core on real MNIST digits: accuracy at each stage and ONNX sizes, side by side.

    python benchmarks/quantize_mnist.py [--epochs 3] [--qat-epochs 1]

Prints FP32 accuracy, accuracy after calibration only (post-training
quantization), after a short QAT fine-tune, and the FP32 vs int8 Q/DQ ONNX
file sizes with the int8 file's agreement with Keras in onnxruntime; then the
file sizes of ResNet-8, ResNet50 and MobileNetV2 (untrained, `weights=None`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _data import load_mnist10k  # noqa: E402

import qat_plugin as qp  # noqa: E402
from qat_plugin.models import compile_classifier, resnet8, small_residual_cnn  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--calibrator", default="max", choices=["max", "percentile", "mse"])
    parser.add_argument("--no-sizes", dest="sizes", action="store_false", help="skip the ResNet/MobileNet file sizes")
    args = parser.parse_args()

    x_train, y_train, x_test, y_test = load_mnist10k()
    model = compile_classifier(small_residual_cnn(seed=0))
    model.fit(x_train, y_train, batch_size=32, epochs=args.epochs, verbose=0)
    fp32 = model.evaluate(x_test, y_test, verbose=0)[1]

    start = time.perf_counter()
    spec = qp.QuantizationSpec(calibrator=args.calibrator)
    qmodel = qp.quantize_model(model, spec, calibration_data=x_train[:256])
    calib_seconds = time.perf_counter() - start
    compile_classifier(qmodel, learning_rate=1e-4)
    ptq = qmodel.evaluate(x_test, y_test, verbose=0)[1]
    qmodel.fit(x_train, y_train, batch_size=32, epochs=args.qat_epochs, verbose=0)
    qat = qmodel.evaluate(x_test, y_test, verbose=0)[1]

    with tempfile.TemporaryDirectory() as tmp:
        fp32_onnx = qp.export_onnx(model, Path(tmp) / "fp32.onnx", validation_data=x_test[:500])
        int8_onnx = qp.export_onnx(qmodel, Path(tmp) / "int8.onnx", validation_data=x_test)
        sizes = {name: onnx_sizes(build(), Path(tmp)) for name, build in SIZE_MODELS.items()} if args.sizes else {}

    print(qp.describe(qmodel))
    print()
    print(f"{'stage':<34}{'test accuracy':>14}")
    print(f"{'FP32 (' + str(args.epochs) + ' epochs)':<34}{fp32:>14.4f}")
    print(f"{'int8, calibration only (' + args.calibrator + ')':<34}{ptq:>14.4f}   ({ptq - fp32:+.4f} vs FP32, quantize+calibrate {calib_seconds:.2f}s)")
    print(f"{'int8, + ' + str(args.qat_epochs) + ' QAT epoch(s)':<34}{qat:>14.4f}   ({qat - fp32:+.4f} vs FP32)")
    print()
    print(f"ONNX FP32 file: {fp32_onnx.file_bytes:>9,d} bytes")
    print(f"ONNX int8 Q/DQ: {int8_onnx.file_bytes:>9,d} bytes  = {int8_onnx.file_bytes / fp32_onnx.file_bytes:.2f}x FP32")
    print(
        f"onnxruntime vs Keras quantized model on {len(x_test)} test digits: argmax agreement "
        f"{int8_onnx.agreement:.4f}, max |diff| {int8_onnx.max_abs_diff:.2e}"
    )
    for name, (params, fp32_bytes, int8_bytes) in sizes.items():
        print(f"{name + ' (' + format(params, ',') + ' params)':<34} ONNX FP32 {fp32_bytes:>11,d} B, int8 {int8_bytes:>10,d} B = {int8_bytes / fp32_bytes:.2f}x")


def onnx_sizes(model, tmp: Path) -> tuple[int, int, int]:
    """FP32 and int8 Q/DQ ONNX file sizes of an untrained model (sizes only: no accuracy)."""
    x = np.random.default_rng(0).uniform(size=(8, *model.inputs[0].shape[1:])).astype("float32")
    qmodel = qp.quantize_model(model, calibration_data=x)
    fp32 = qp.export_onnx(model, tmp / f"{model.name}_fp32.onnx")
    int8 = qp.export_onnx(qmodel, tmp / f"{model.name}_int8.onnx")
    return model.count_params(), fp32.file_bytes, int8.file_bytes


SIZE_MODELS = {
    "ResNet-8": lambda: resnet8(),
    "ResNet50 (64x64)": lambda: keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10),
    "MobileNetV2 (64x64)": lambda: keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3), classes=10),
}


if __name__ == "__main__":
    main()
