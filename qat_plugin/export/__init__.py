"""Exporters for quantized Keras models.

`qat_plugin.export.onnx` writes ONNX files with QuantizeLinear/DequantizeLinear
pairs and int8 weights, laid out for TensorRT (`check_tensorrt` reads them
back against its rules) or for onnxruntime's integer kernels.
`qat_plugin.export.tflite` writes int8 TFLite files (TFLite's converter reads the
fake-quant ranges) and checks them in LiteRT. Each exporter imports its converter (tf2onnx, onnx,
onnxruntime) only when called, so `import qat_plugin` stays light.

>>> from qat_plugin.export.onnx import export_onnx, qdq_pairs  # doctest: +SKIP
>>> from qat_plugin.export.tflite import export_tflite, run_tflite  # doctest: +SKIP
"""
