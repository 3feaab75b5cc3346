"""Exporters for quantized Keras models.

`qat_plugin.export.onnx` writes ONNX files with QuantizeLinear/DequantizeLinear
pairs and int8 weights. Each exporter imports its converter (tf2onnx, onnx,
onnxruntime) only when called, so `import qat_plugin` stays light.

>>> from qat_plugin.export.onnx import export_onnx, qdq_pairs  # doctest: +SKIP
"""
