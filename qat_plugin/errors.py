"""Exception types raised by qat-plugin.

Every error names the cause and the fix. They subclass `ValueError` (or
`RuntimeError` for failures of the runtime) so code written against Keras's own
errors keeps catching them.
"""


class QuantizationError(ValueError):
    """Base class: the model or the spec can't be quantized as asked."""


class UnsupportedModelError(QuantizationError):
    """The model's structure can't be cloned and wrapped (e.g. subclassed)."""


class SpecError(QuantizationError):
    """A `QuantizationSpec` is invalid or selects nothing in the model."""


class AlreadyQuantizedError(QuantizationError):
    """The model already holds `QuantizeWrapper` layers."""


class CalibrationError(QuantizationError):
    """Ranges could not be computed (no data, or uncalibrated quantizers)."""


class ExportError(RuntimeError):
    """An export failed, or the exported file disagrees with the Keras model."""


class SwapError(RuntimeError):
    """The in-place switch to the quantized graph failed; the FP32 model was restored."""
