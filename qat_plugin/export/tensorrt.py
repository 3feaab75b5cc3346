"""A static check that an ONNX file follows TensorRT's explicit-quantization rules.

TensorRT builds an int8 engine from an ONNX file's QuantizeLinear (Q) and
DequantizeLinear (DQ) nodes ("explicit quantization" in its developer guide)
and refuses, or silently runs in float, what it can't map onto its own
IQuantizeLayer/IDequantizeLayer. There is no TensorRT on a training machine,
so `check_tensorrt` reads the graph instead and names every node that breaks
a rule, with the rule and how to fix it:

==================== =========================================================
rule                 what TensorRT wants
==================== =========================================================
opset                default-domain opset >= 13 (per-channel Q/DQ, `axis`)
constant_params      scale and zero point are constants (build-time values)
int8                 the quantized type is int8 (TensorRT has no uint8 Q/DQ;
                     a missing zero point means uint8 in ONNX)
zero_point           every zero point is 0 (symmetric quantization only)
scale                every scale is positive and finite
unpaired_q           a Q's output feeds DequantizeLinear nodes only
unpaired_dq          an activation DQ is fed by a Q
pair_params          a Q and its DQ use the same scale and zero point
activation_per_tensor activations have one scale (per-channel is weights only)
int8_weight          a weight is an int8 constant behind a DQ, not a float
                     behind a Q (qat-plugin's contract: TensorRT would
                     quantize it at build time, but the file is 4x larger)
weight_consumer      a weight DQ feeds the weight input of Conv, ConvTranspose,
                     MatMul or Gemm directly (TensorRT fuses only that)
weight_axis          a per-channel weight scale runs along the output-channel
                     axis: Conv 0, ConvTranspose 1, MatMul last, Gemm 0 if
                     transB else 1
weight_scale_count   a per-channel scale has one value per output channel
weight_range         int8 weights lie in [-127, 127] (TensorRT's weight range)
==================== =========================================================

Only the main graph is read (subgraphs of If/Loop are not), like `qdq_pairs`.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from qat_plugin.errors import ExportError
from qat_plugin.export._qdq_graph import QDQPair, _Graph, _require, qdq_pairs

__all__ = ["RULES", "TensorRTCheck", "TensorRTProblem", "check_tensorrt"]

# Per-channel Q/DQ (the `axis` attribute) arrived in opset 13.
MIN_OPSET = 13

# rule -> what TensorRT needs; the keys are the `rule` of a TensorRTProblem.
RULES: dict[str, str] = {
    "opset": f"the default ONNX domain is at opset >= {MIN_OPSET}",
    "constant_params": "Q/DQ scales and zero points are constants",
    "int8": "the quantized type is int8",
    "zero_point": "every zero point is 0",
    "scale": "every scale is positive and finite",
    "unpaired_q": "a QuantizeLinear feeds DequantizeLinear nodes only",
    "unpaired_dq": "an activation DequantizeLinear is fed by a QuantizeLinear",
    "pair_params": "a Q and its DQ share scale and zero point",
    "activation_per_tensor": "activations are quantized per tensor (one scale)",
    "int8_weight": "weights are int8 constants behind a DequantizeLinear",
    "weight_consumer": "a weight DequantizeLinear feeds a Conv/ConvTranspose/MatMul/Gemm weight input directly",
    "weight_axis": "per-channel weight scales run along the output-channel axis",
    "weight_scale_count": "a per-channel weight scale has one value per output channel",
    "weight_range": "int8 weights lie in [-127, 127]",
}

# Where a consumer reads its weight (input 1 for all four) and which axis of
# that weight is the output channel, given the node and the weight's rank.
# Ops that move int8 values without computing on them: TensorRT runs them in
# int8 between a Q and its DQ (tf2onnx writes Q -> Concat -> DQ when every
# input of a Concat has the same scale).
_INT8_DATA_MOVEMENT = ("Concat", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "MaxPool", "Slice")

_WEIGHT_OPS = {
    "Conv": lambda node, rank: 0,  # [C_out, C_in/group, k...]
    "ConvTranspose": lambda node, rank: 1,  # [C_in, C_out/group, k...]
    "MatMul": lambda node, rank: rank - 1,  # [K, N]: N outputs
    "Gemm": lambda node, rank: 0 if _attr(node, "transB", 0) else 1,  # B is [K, N], or [N, K] if transB
}


@dataclasses.dataclass(frozen=True)
class TensorRTProblem:
    """One node that breaks one of TensorRT's explicit-quantization rules.

    Attributes:
        node: the node's name (or `"<model>"` for the opset).
        op_type: the node's op type, e.g. `"DequantizeLinear"`.
        rule: a key of `RULES`, e.g. `"zero_point"`.
        message: what is wrong, with the values found.
        fix: how to make the file acceptable.

    Example:

    >>> p = TensorRTProblem("dq1", "DequantizeLinear", "zero_point", "zero point is [3].", "Export with zero point 0.")
    >>> print(p)
    dq1 (DequantizeLinear) [zero_point]: zero point is [3]. Fix: Export with zero point 0.
    """

    node: str
    op_type: str
    rule: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op_type}) [{self.rule}]: {self.message} Fix: {self.fix}"


@dataclasses.dataclass(frozen=True)
class TensorRTCheck:
    """What `check_tensorrt` found in one ONNX graph.

    Attributes:
        source: the file's path, or `"<ModelProto>"`.
        opset: the default-domain opset.
        num_weights: weight DequantizeLinear nodes (fed by a constant).
        num_activations: activation DequantizeLinear nodes.
        problems: every rule broken, one entry per node and rule, in graph order.

    Example:

    >>> check = TensorRTCheck(source="m.onnx", opset=17, num_weights=2, num_activations=2, problems=())
    >>> check.ok, check.rules_broken
    (True, ())
    >>> check.raise_if_failed() is check
    True
    """

    source: str
    opset: int | None
    num_weights: int
    num_activations: int
    problems: tuple[TensorRTProblem, ...] = ()

    @property
    def ok(self) -> bool:
        """True when no rule is broken."""
        return not self.problems

    @property
    def rules_broken(self) -> tuple[str, ...]:
        """The rules with at least one problem, sorted."""
        return tuple(sorted({p.rule for p in self.problems}))

    def by_rule(self, rule: str) -> tuple[TensorRTProblem, ...]:
        """The problems of one rule (a key of `RULES`)."""
        if rule not in RULES:
            raise ValueError(f"Unknown rule {rule!r}. Rules: {sorted(RULES)}")
        return tuple(p for p in self.problems if p.rule == rule)

    def raise_if_failed(self) -> TensorRTCheck:
        """Raise `ExportError` listing every problem; return `self` when there is none."""
        if self.ok:
            return self
        shown = self.problems[:20]  # a broken exporter breaks every node: the first 20 say enough
        more = f"\n  ... and {len(self.problems) - len(shown)} more" if len(self.problems) > len(shown) else ""
        raise ExportError(
            f"{self.source} breaks TensorRT's explicit-quantization rules ({len(self.problems)} problem"
            f"{'s' if len(self.problems) != 1 else ''}, rules {', '.join(self.rules_broken)}):\n"
            + "\n".join(f"  - {p}" for p in shown)
            + more
        )

    def __str__(self) -> str:
        head = (
            f"TensorRT check of {self.source}: opset {self.opset}, {self.num_weights} weight and "
            f"{self.num_activations} activation Q/DQ"
        )
        if self.ok:
            return head + ": ok"
        return head + f": {len(self.problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in self.problems)


# ------------------------------------------------------------------ helpers


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _fmt(values, limit: int = 6) -> str:
    values = list(np.asarray(values).reshape(-1))
    shown = ", ".join(f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def _opset(proto) -> int | None:
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


class _Checker:
    """Collects problems node by node; one instance per `check_tensorrt` call."""

    def __init__(self, g: _Graph):
        self.g = g
        self.problems: list[TensorRTProblem] = []

    def add(self, node, rule: str, message: str, fix: str) -> None:
        self.problems.append(TensorRTProblem(node.name or node.output[0], node.op_type, rule, message, fix))

    def params(self, node) -> tuple[np.ndarray | None, np.ndarray | None, bool]:
        """(scale, zero point, both constant) of a Q or DQ; zero point None when absent."""
        scale = self.g.const(node.input[1])
        has_zp = len(node.input) > 2 and bool(node.input[2])
        zp = self.g.const(node.input[2]) if has_zp else None
        constant = scale is not None and (zp is not None or not has_zp)
        return scale, zp, constant

    def common(self, node) -> None:
        """The rules every Q and DQ follows: constant params, int8, zero point 0, scale > 0."""
        scale, zp, constant = self.params(node)
        if not constant:
            self.add(
                node, "constant_params", "its scale or zero point is computed in the graph, not a constant.",
                "Fold the scale and zero point into initializers (onnx-simplifier, or export with fixed ranges).",
            )
        has_zp = len(node.input) > 2 and bool(node.input[2])
        # The quantized type is the zero point's. Without one, a Q makes uint8
        # (ONNX's default) and a DQ reads its input's type: a constant's is
        # known here, a Q's is that Q's own problem.
        dtype = zp.dtype.name if zp is not None else None
        if zp is None and node.op_type == "QuantizeLinear":
            dtype = "uint8"
        elif zp is None:
            x = self.g.const(node.input[0])
            dtype = x.dtype.name if x is not None else None
        if dtype is not None and dtype != "int8":
            what = "no zero point, so the type is uint8" if not has_zp else f"the quantized type is {dtype}"
            self.add(
                node, "int8", f"{what}; TensorRT's Q/DQ quantize to signed int8 only.",
                "Give it an int8 zero point of 0 (symmetric int8 quantization).",
            )
        if zp is not None and np.any(zp != 0):
            self.add(
                node, "zero_point", f"zero point {_fmt(zp)}; TensorRT supports symmetric quantization only.",
                "Quantize symmetrically: zero point 0, scale amax/127.",
            )
        if scale is not None and not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            bad = scale[~(np.isfinite(scale) & (scale > 0))]
            self.add(
                node, "scale", f"scale values {_fmt(bad)} are not positive and finite.",
                "Recalibrate: a zero or NaN range means the quantizer saw no data or a dead channel.",
            )

    def _through(self, name: str) -> list:
        """The nodes reading `name`, looking through int8 data-movement ops (a Concat of pairs with one scale)."""
        found, todo = [], [name]
        while todo:
            for node, _ in self.g.consumers.get(todo.pop(), []):
                if node.op_type in _INT8_DATA_MOVEMENT:
                    todo.extend(node.output)
                else:
                    found.append(node)
        return found

    def _from_q(self, node) -> bool:
        """True if every non-constant input of a data-movement op comes from QuantizeLinear (through more of them)."""
        for name in node.input:
            if not name or self.g.const(name) is not None:
                continue
            src = self.g.producer.get(name)
            if src is None or not (src.op_type == "QuantizeLinear" or (src.op_type in _INT8_DATA_MOVEMENT and self._from_q(src))):
                return False
        return True

    def quantize(self, q) -> None:
        """A QuantizeLinear: paired with DQs only, and not a float weight."""
        self.common(q)
        weight = self.g.const(q.input[0])
        if weight is not None:
            self.add(
                q, "int8_weight",
                f"the weight {q.input[0]!r} {list(weight.shape)} is stored as {weight.dtype.name}, not int8.",
                "Store the weight as an int8 initializer feeding the DequantizeLinear (export_onnx does this).",
            )
        readers = self._through(q.output[0])
        others = sorted({n.op_type for n in readers if n.op_type != "DequantizeLinear"})
        if others or q.output[0] in self.g.outputs or not readers:
            where = f"{others}" if others else "the graph output" if q.output[0] in self.g.outputs else "nothing"
            self.add(
                q, "unpaired_q", f"its int8 output feeds {where}, not a DequantizeLinear.",
                "Follow every QuantizeLinear by a DequantizeLinear with the same scale and zero point.",
            )
        for dq in readers:
            if dq.op_type == "DequantizeLinear" and self.g.producer.get(dq.input[0]) is q:
                self.pair(q, dq)

    def pair(self, q, dq) -> None:
        (qs, qz, _), (ds, dz, _) = self.params(q), self.params(dq)
        # A missing zero point is 0; a scalar and a [1] scale are the same scale.
        flat = lambda a: np.zeros(1) if a is None else np.asarray(a, np.float64).reshape(-1)  # noqa: E731
        same_scale = qs is not None and ds is not None and np.array_equal(flat(qs), flat(ds))
        zq, zd = flat(qz), flat(dz)
        same_zp = np.array_equal(np.broadcast_to(zq, zd.shape) if zq.size == 1 else zq, zd) or (
            zd.size == 1 and np.all(zq == zd[0])
        )
        same_zp = same_zp and (qz is None or dz is None or qz.dtype == dz.dtype)
        same_axis = qs is None or qs.size <= 1 or _attr(q, "axis", 1) == _attr(dq, "axis", 1)
        if not (same_scale and same_zp and same_axis):
            self.add(
                dq, "pair_params",
                f"its QuantizeLinear {q.name!r} has scale {_fmt(qs if qs is not None else [])}, zero point "
                f"{_fmt(qz)} ({qz.dtype.name}); this node has scale {_fmt(ds if ds is not None else [])}, "
                f"zero point {_fmt(dz)} ({dz.dtype.name}).",
                "Use one scale and zero point (and axis) for the Q and the DQ of a pair.",
            )

    def dequantize(self, dq, pair: QDQPair) -> None:
        """A DequantizeLinear, read through `qdq_pairs`: paired activation or well-placed weight."""
        self.common(dq)
        q = self.g.producer.get(dq.input[0])
        float_weight = self.g.const(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if float_weight is not None:  # `int8_weight` on the Q; its placement is still checked here
            self.weight(dq, tuple(float_weight.shape), len(pair.scale), None)
            return
        if pair.kind == "activation":
            src = self.g.producer.get(dq.input[0])
            moved = src is not None and src.op_type in _INT8_DATA_MOVEMENT and self._from_q(src)
            if pair.producer != "QuantizeLinear" and not moved:
                self.add(
                    dq, "unpaired_dq", f"its input comes from {pair.producer}, not a QuantizeLinear.",
                    "Put a QuantizeLinear right before it, or move the DequantizeLinear before that op.",
                )
            if len(pair.scale) > 1:
                self.add(
                    dq, "activation_per_tensor", f"an activation with {len(pair.scale)} scales {pair.scale_shape}; "
                    "TensorRT quantizes activations per tensor.",
                    "Use one scalar scale for activations (per-channel is for weights).",
                )
            return
        self.weight(dq, pair.weight_shape, len(pair.scale), self.g.const(dq.input[0]))

    def weight(self, dq, shape: tuple[int, ...], num_scales: int, int8: np.ndarray | None) -> None:
        """Placement of a weight DQ: on a weight input, scales along its output channels."""
        readers = self.g.consumers.get(dq.output[0], [])
        wrong = [f"{n.op_type}:{i}" for n, i in readers if not (n.op_type in _WEIGHT_OPS and i == 1)]
        if wrong or not readers:
            self.add(
                dq, "weight_consumer",
                f"weight {list(shape)} reaches {wrong or 'nothing'}, not the weight input of "
                f"{'/'.join(_WEIGHT_OPS)} directly.",
                "Apply layout ops (Transpose/Reshape) to the int8 array and put the DequantizeLinear on the "
                "weight input itself.",
            )
        if int8 is not None and int8.dtype == np.int8 and int8.size and int(int8.min()) == -128:
            self.add(
                dq, "weight_range", f"{int(np.sum(int8 == -128))} weight value(s) are -128.",
                "Quantize weights on the narrow range [-127, 127] (scale amax/127, clip at -127).",
            )
        if num_scales <= 1:  # per tensor: any consumer takes it
            return
        rank = len(shape)
        axis = _attr(dq, "axis", 1)  # ONNX's default; negative counts from the back
        if not -rank <= axis < rank:
            self.add(
                dq, "weight_axis", f"axis={axis} is outside a rank-{rank} weight.",
                "Set axis to the output-channel axis.",
            )
            return
        axis %= rank
        for consumer, i in readers:
            if consumer.op_type not in _WEIGHT_OPS or i != 1:
                continue
            expected = _WEIGHT_OPS[consumer.op_type](consumer, rank)
            if axis != expected:
                self.add(
                    dq, "weight_axis",
                    f"per-channel scales on axis {axis} of weight {list(shape)}; "
                    f"{consumer.op_type} {consumer.name!r} has its output channels on axis {expected}.",
                    f"Quantize per output channel: axis={expected}, {shape[expected]} scales.",
                )
            elif num_scales != shape[expected]:
                self.add(
                    dq, "weight_scale_count",
                    f"{num_scales} scales for the {shape[expected]} output channels of weight {list(shape)}.",
                    f"Give one scale per output channel ({shape[expected]}), or one for the tensor.",
                )


# ------------------------------------------------------------------ the check


def check_tensorrt(onnx_model_or_path) -> TensorRTCheck:
    """Check, without TensorRT, that an ONNX file follows TensorRT's explicit-quantization rules.

    Every QuantizeLinear and DequantizeLinear of the main graph is checked
    against the rules in `RULES` (see the module docstring for what each
    means); the DequantizeLinear side is read with `qdq_pairs`. A file with
    no Q/DQ (an FP32 export) passes trivially.

    Args:
        onnx_model_or_path: an `onnx.ModelProto` or the path of an `.onnx` file.

    Returns:
        A `TensorRTCheck`; `check.ok` is True when no rule is broken, and
        `check.raise_if_failed()` raises `ExportError` listing the problems.

    Raises:
        TypeError: the argument is neither a ModelProto nor a path.

    Example:

    >>> check = check_tensorrt("model_int8.onnx")  # doctest: +SKIP
    >>> check.ok, check.num_weights, check.num_activations  # doctest: +SKIP
    (True, 3, 4)
    >>> check_tensorrt(broken_proto).raise_if_failed()  # doctest: +SKIP
    Traceback (most recent call last):
    qat_plugin.errors.ExportError: <ModelProto> breaks TensorRT's explicit-quantization rules (1 problem, ...
    """
    onnx = _require("onnx", "onnx")
    if isinstance(onnx_model_or_path, (str, os.PathLike)):
        source = os.fspath(onnx_model_or_path)
        proto = onnx.load(source)
    elif isinstance(onnx_model_or_path, onnx.ModelProto):
        source, proto = "<ModelProto>", onnx_model_or_path
    else:
        raise TypeError(
            f"`check_tensorrt` takes an onnx.ModelProto or a path. Received: {type(onnx_model_or_path).__name__}"
        )
    g = _Graph(proto.graph)
    checker = _Checker(g)
    opset = _opset(proto)
    if opset is None or opset < MIN_OPSET:
        checker.problems.append(
            TensorRTProblem(
                "<model>", "Model", "opset",
                f"the default domain is at opset {opset}; per-channel QuantizeLinear/DequantizeLinear need "
                f"{MIN_OPSET}.",
                f"Export with opset >= {MIN_OPSET} (export_onnx(..., opset=17)).",
            )
        )
    # qdq_pairs lists the DequantizeLinear nodes in graph order: zip them with the nodes.
    dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    pairs = qdq_pairs(proto)
    if len(pairs) != len(dqs):
        raise ExportError("qdq_pairs did not list every DequantizeLinear of the graph; this is a qat-plugin bug.")
    dq_pair = {id(n): p for n, p in zip(dqs, pairs)}
    for node in proto.graph.node:  # graph order, so problems read top to bottom
        if node.op_type == "QuantizeLinear":
            checker.quantize(node)
        elif node.op_type == "DequantizeLinear":
            checker.dequantize(node, dq_pair[id(node)])
    return TensorRTCheck(
        source=source,
        opset=opset,
        num_weights=sum(p.kind == "weight" for p in pairs),
        num_activations=sum(p.kind == "activation" for p in pairs),
        problems=tuple(checker.problems),
    )
