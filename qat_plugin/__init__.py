"""qat-plugin: quantization-aware training as a drop-in part of Keras 3 training.

>>> import numpy as np, keras, qat_plugin
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")])
>>> qmodel = qat_plugin.quantize_model(model, calibration_data=np.ones((8, 4), "float32"))
>>> [q.key for q in qat_plugin.list_quantizers(qmodel)]
['fc/input', 'fc/weight']
"""

from qat_plugin.calibration import calibrate
from qat_plugin.callback import QATCallback
from qat_plugin.config import LayerOverride, PlacementPolicy, QuantizationSpec, get_policy
from qat_plugin.errors import (
    AlreadyQuantizedError,
    CalibrationError,
    ExportError,
    QuantizationError,
    SpecError,
    SwapError,
    UnsupportedModelError,
)
from qat_plugin.export.onnx import export_onnx, ort_kernels, qdq_pairs, run_onnx
from qat_plugin.export.tflite import TFLiteExportReport, export_tflite, run_tflite, verify_tflite
from qat_plugin.export.tensorrt import TensorRTCheck, TensorRTProblem, check_tensorrt
from qat_plugin.quantizers import TensorQuantizer
from qat_plugin.report import QuantizerInfo, describe, list_quantizers
from qat_plugin.sensitivity import SensitivityReport, sensitivity_analysis
from qat_plugin.transform import QuantizationReport, quantize_model
from qat_plugin.wrappers import QuantizeWrapper, quantize_wrappers, register_layer, supported_types

__version__ = "0.1.0"

__all__ = [
    "QATCallback",
    "AlreadyQuantizedError",
    "CalibrationError",
    "ExportError",
    "LayerOverride",
    "PlacementPolicy",
    "QuantizationError",
    "QuantizationReport",
    "QuantizationSpec",
    "QuantizeWrapper",
    "QuantizerInfo",
    "SensitivityReport",
    "SpecError",
    "SwapError",
    "TensorQuantizer",
    "TensorRTCheck",
    "TensorRTProblem",
    "TFLiteExportReport",
    "UnsupportedModelError",
    "calibrate",
    "check_tensorrt",
    "describe",
    "export_onnx",
    "export_tflite",
    "get_policy",
    "list_quantizers",
    "ort_kernels",
    "qdq_pairs",
    "quantize_model",
    "quantize_wrappers",
    "register_layer",
    "run_onnx",
    "run_tflite",
    "sensitivity_analysis",
    "supported_types",
    "verify_tflite",
]
