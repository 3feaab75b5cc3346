"""What tf2onnx 1.17 can't convert from a Keras 3 graph, and how each export works around it.

Two gaps, both hit by `keras.applications.ConvNeXt*` even in FP32:

- A grouped `Conv2D` (`groups > 1`: ConvNeXt's depthwise convs, ResNeXt-style
  group convs) is traced by Keras's TensorFlow backend inside a
  `tf.function(jit_compile=True)`, since TensorFlow's CPU kernel can't run it.
  tf2onnx doesn't inline such a function and leaves a `StatefulPartitionedCall`
  that no runtime runs (open in tf2onnx: onnx/tensorflow-onnx#2099, #2347).
  The export only builds a graph, which TensorFlow never runs, so while it
  traces, the conv is traced as the plain `tf.nn.convolution` it wraps, which
  tf2onnx writes as an ONNX Conv with `group`.
- The exact GELU (`approximate=False`, Keras's default) traces to TensorFlow's
  `Erfc`, which tf2onnx has no handler for: `erfc(x) = 1 - erf(x)`.

This module touches one Keras internal, `keras.src.backend.tensorflow.nn.conv`
(`tests/test_export_onnx.py::test_grouped_convs_and_exact_gelu_export` fails
if the pinned Keras range moves it).
"""

from __future__ import annotations

import contextlib

import numpy as np


@contextlib.contextmanager
def traceable_grouped_convs():
    """While active, Keras traces a grouped conv without XLA (see the module docstring).

    >>> with traceable_grouped_convs():
    ...     pass
    """
    from keras.src.backend.tensorflow import nn as tf_nn

    original = tf_nn.conv

    def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
        data_format = tf_nn.backend.standardize_data_format(data_format)
        channels = inputs.shape[-1] if data_format == "channels_last" else inputs.shape[1]
        # Keras needs XLA for 3D channels-first convs too; those stay as they were.
        if channels == kernel.shape[-2] or len(inputs.shape) == 5:
            return original(inputs, kernel, strides, padding, data_format, dilation_rate)
        return tf_nn.tf.nn.convolution(
            inputs, kernel, strides, padding.upper(),
            data_format=tf_nn._convert_data_format(data_format, len(inputs.shape)), dilations=dilation_rate,
        )

    tf_nn.conv = conv
    try:
        yield
    finally:
        tf_nn.conv = original


def _erfc(ctx, node, name, args):
    """tf2onnx handler: `erfc(x)` as `1 - erf(x)`."""
    from tf2onnx import utils

    node.type = "Erf"
    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
    one = ctx.make_const(utils.make_name(f"{name}_one"), np.array(1, dtype=dtype))
    sub = ctx.insert_new_node_on_output(
        "Sub", node.output[0], name=utils.make_name(f"{name}_one_minus"), inputs=[one.output[0], node.output[0]]
    )
    ctx.copy_shape(node.output[0], sub.output[0])
    ctx.set_dtype(sub.output[0], ctx.get_dtype(node.output[0]))
    return sub


# For `tf2onnx.convert.from_keras(..., custom_op_handlers=CUSTOM_OP_HANDLERS)`.
CUSTOM_OP_HANDLERS = {"Erfc": (_erfc, [])}
