"""The ONNX graph pass behind `export_onnx`, and `qdq_pairs`, which reads Q/DQ pairs back.

tf2onnx turns every fake-quant op into QuantizeLinear -> DequantizeLinear but
leaves three things a deployable file can't have; `rewrite_qdq` fixes them:

* Weights stay float32 behind a QuantizeLinear, so the file is as large as the
  FP32 one. Each becomes an int8 initializer feeding DequantizeLinear,
  computed in numpy exactly as QuantizeLinear would (round half to even,
  saturate), so no number changes.
* Depthwise, separable and 1-D kernels reach their Conv through Reshape/
  Transpose/Unsqueeze after the DequantizeLinear. TensorRT wants the
  DequantizeLinear on the weight input itself, so those layout ops are applied
  to the int8 array and the per-channel scales follow (repeated once per
  depth multiplier) onto the Conv's output-channel axis.
* Activation pairs are split by a Transpose/Reshape/Squeeze that tf2onnx
  pushed between them. The per-tensor QuantizeLinear moves after it (exact:
  it commutes with moving elements), so every pair is adjacent.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os

import numpy as np

from qat_plugin.errors import ExportError
from qat_plugin.quantizers import qmax

# Ops that only move elements: they commute with a per-tensor Q or DQ, and
# numpy can apply them to a constant.
_LAYOUT_OPS = ("Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten")
# Ops that only select or move values: a shift of every value commutes with them (a Cropping2D is a Slice).
_MOVE_OPS = (*_LAYOUT_OPS, "Slice")


def _require(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"ONNX export needs `{package}`: pip install {package}") from e


@dataclasses.dataclass(frozen=True)
class QDQPair:
    """One DequantizeLinear node: what feeds it, what reads it, its parameters.

    Attributes:
        name: the DequantizeLinear node's name.
        kind: `"weight"` (fed by a constant) or `"activation"`.
        producer: `"initializer"`, `"QuantizeLinear"`, or the op type in
            between (e.g. a Concat of tensors quantized with one scale).
        consumers: `(op_type, input_index)` of every node that reads it;
            a weight's is `("Conv", 1)`, `("ConvTranspose", 1)` or `("MatMul", 1)`.
        dtype: the quantized type, e.g. `"int8"`.
        zero_point: the zero point values, flattened.
        scale: the scale values, flattened.
        scale_shape: `()` per tensor, `(channels,)` per channel.
        axis: the channel axis of a per-channel scale, else `None`.
        weight_shape: the constant's shape for a weight, else `None`.
    """

    name: str
    kind: str
    producer: str
    consumers: tuple[tuple[str, int], ...]
    dtype: str
    zero_point: tuple[int, ...]
    scale: tuple[float, ...]
    scale_shape: tuple[int, ...]
    axis: int | None
    weight_shape: tuple[int, ...] | None = None

    @property
    def consumer_types(self) -> tuple[str, ...]:
        return tuple(op for op, _ in self.consumers)


# ------------------------------------------------------------------ the graph pass


class _Graph:
    """An ONNX GraphProto with producer/consumer lookups, rebuilt after each edit."""

    def __init__(self, graph):
        self.graph = graph
        self._shared: dict[tuple, str] = {}
        self.reindex()

    def reindex(self) -> None:
        self.inits = {t.name: t for t in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.graph.node:
            for i, name in enumerate(n.input):
                self.consumers.setdefault(name, []).append((n, i))
        self.outputs = {o.name for o in self.graph.output}

    def redirect(self, name: str, to: str) -> None:
        """Make every node that reads `name` read `to` instead (call `reindex` after)."""
        for consumer, i in self.consumers.get(name, []):
            consumer.input[i] = to

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output, else None."""
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def fresh(self, base: str) -> str:
        """`base`, or `base_<n>` if a node or tensor already has that name."""
        taken = set(self.inits) | set(self.producer) | {n.name for n in self.graph.node}
        taken |= {i.name for i in self.graph.input}
        name, n = base, 0
        while name in taken:
            n += 1
            name = f"{base}_{n}"
        return name

    def add_init(self, base: str, value: np.ndarray) -> str:
        """A new initializer; equal small ones (zero points) are shared, for a smaller file."""
        from onnx import numpy_helper

        value = np.asarray(value)
        key = (value.dtype.str, value.shape, value.tobytes()) if value.size <= 4096 else None
        if key in self._shared:
            return self._shared[key]
        name = self.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        self.inits[name] = self.graph.initializer[-1]
        if key is not None:
            self._shared[key] = name
        return name


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _apply_layout(g: _Graph, node, a: np.ndarray) -> np.ndarray | None:
    """Apply a layout op to a constant array; None if its parameters aren't constant."""
    op = node.op_type
    if op == "Identity":
        return a
    if op == "Transpose":
        return np.transpose(a, _attr(node, "perm"))
    if op == "Flatten":
        axis = _attr(node, "axis", 1) % max(a.ndim, 1)
        return a.reshape(int(np.prod(a.shape[:axis])), -1)
    if op == "Reshape":
        shape = g.const(node.input[1])
        if shape is None:
            return None
        shape = [int(d) for d in shape]
        if not _attr(node, "allowzero", 0):  # 0 copies the input's dimension
            shape = [a.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return a.reshape(shape)
    # Squeeze/Unsqueeze: axes are an input from opset 13, an attribute before.
    axes = g.const(node.input[1]) if len(node.input) > 1 and node.input[1] else _attr(node, "axes")
    if op == "Squeeze":
        return np.squeeze(a, None if axes is None else tuple(int(x) for x in axes))
    if op == "Unsqueeze" and axes is not None:
        rank = a.ndim + len(axes)
        for ax in sorted(int(x) % rank for x in axes):
            a = np.expand_dims(a, ax)
        return a
    return None


def _channel_line(index: np.ndarray | None) -> tuple[int | None, np.ndarray | None] | None:
    """Where per-channel scales sit after layout ops.

    `index` holds, for every weight element, the channel whose scale it uses
    (`None` for a per-tensor weight). Returns `(None, None)` for one scale,
    `(None, [c])` when every element uses channel `c`, `(axis, channels)` when
    the channel varies along one axis only, or None when no ONNX axis fits.
    """
    if index is None:
        return None, None
    if np.all(index == index.flat[0]):
        return None, index.reshape(-1)[:1]
    varying = [ax for ax in range(index.ndim) if np.any(np.diff(index, axis=ax) != 0)]
    if len(varying) != 1:
        return None
    ax = varying[0]
    line = index[tuple(slice(None) if i == ax else 0 for i in range(index.ndim))]
    return ax, line


def quantize_like_onnx(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None) -> np.ndarray:
    """ONNX QuantizeLinear in numpy: `saturate(round_half_even(w / scale) + zero_point)`.

    >>> quantize_like_onnx(np.array([0.5, 1.5, -3.0, 300.0], "float32"), np.float32(1.0), np.int8(0), None).tolist()
    [0, 2, -3, 127]
    """
    shape = [1] * w.ndim
    if axis is not None and np.ndim(scale) == 1:
        shape[axis] = -1
    s = np.asarray(scale, np.float32).reshape(shape if np.ndim(scale) else ())
    z = np.asarray(zero_point).astype(np.int64).reshape(shape if np.ndim(zero_point) else ())
    info = np.iinfo(np.asarray(zero_point).dtype)
    # float32 division, then rint (half to even): onnxruntime's own arithmetic.
    q = np.rint(np.asarray(w, np.float32) / s).astype(np.int64) + z
    return np.clip(q, info.min, info.max).astype(np.asarray(zero_point).dtype)


def _fold_weight(g: _Graph, dq, bits: int | None) -> bool:
    """`float -> Q -> [layout] -> DQ -> [layout] -> op` becomes `int8 -> DQ -> op`."""
    from onnx import helper

    pre = []
    node = g.producer.get(dq.input[0])
    while node is not None and node.op_type in _LAYOUT_OPS:
        pre.append(node)
        node = g.producer.get(node.input[0])
    if node is None or node.op_type != "QuantizeLinear" or g.const(node.input[0]) is None:
        return False
    q = node
    w, scale = g.const(q.input[0]), g.const(q.input[1])
    if scale is None or w.dtype.kind != "f" or list(dq.input[1:]) != list(q.input[1:]):
        return False  # not a plain pair: left for qdq_pairs to report
    # No zero point means a uint8 zero, per the ONNX spec.
    zp = g.const(q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros(scale.shape, np.uint8)
    axis = _attr(q, "axis", 1) % w.ndim if scale.size > 1 else None
    if bits is not None and bits < 8:
        # tf2onnx wrote amax/127 whatever the bits. The grid is amax/qmax(bits),
        # clipped at +-qmax(bits) (TF's narrow range); amax is recovered in
        # float32 first so the scale is TF's own float32 amax/qmax.
        scale = (scale.astype(np.float64) * 127).astype(np.float32) / np.float32(qmax(bits))
        q8 = np.clip(quantize_like_onnx(w, scale, zp, axis), -qmax(bits), qmax(bits)).astype(zp.dtype)
    else:
        q8 = quantize_like_onnx(w, scale, zp, axis)
    # Each element's channel index travels through the layout ops with it.
    index = None
    if axis is not None:
        index = np.broadcast_to(np.arange(scale.size).reshape([-1 if i == axis else 1 for i in range(w.ndim)]), w.shape)
    for node in reversed(pre):
        q8, index = _apply_layout(g, node, q8), None if index is None else _apply_layout(g, node, index)
        if q8 is None:
            return False
    if _channel_line(index) is None:
        return False
    # Then through the layout ops after the DQ, while the scales still fit one axis.
    end = dq.output[0]
    while end not in g.outputs and len(g.consumers.get(end, [])) == 1:
        nxt = g.consumers[end][0][0]
        if nxt.op_type not in _LAYOUT_OPS:
            break
        q_next = _apply_layout(g, nxt, q8)
        i_next = None if index is None else _apply_layout(g, nxt, index)
        if q_next is None or _channel_line(i_next) is None:
            break
        q8, index, end = q_next, i_next, nxt.output[0]
    new_axis, line = _channel_line(index)
    if line is None:  # one scale from the start
        new_scale, new_zp = scale, zp
    elif new_axis is None:  # every element left uses the same channel
        new_scale, new_zp = scale.reshape(-1)[line[0]], zp.reshape(-1)[line[0]]
    else:  # e.g. a depth multiplier repeats each input channel's scale
        new_scale, new_zp = scale.reshape(-1)[line], zp.reshape(-1)[line]
    base = q.input[0].split(":")[0]  # tf2onnx's name for the float kernel
    inputs = [g.add_init(base + "_int8", q8), g.add_init(base + "_scale", new_scale), g.add_init("zero_point", new_zp)]
    out = g.fresh(dq.output[0].split(":")[0] + "_int8")
    attrs = {} if new_axis is None else {"axis": new_axis}
    g.graph.node.append(helper.make_node("DequantizeLinear", inputs, [out], name=out, **attrs))
    g.redirect(end, out)
    if end in g.outputs:  # a weight that is a graph output keeps its name
        g.graph.node.append(helper.make_node("Identity", [out], [end], name=g.fresh("weight_output")))
    g.reindex()
    return True


def _join_activation_pair(g: _Graph, dq) -> bool:
    """`Q -> Transpose/Reshape/... -> DQ` becomes `Transpose/Reshape/... -> Q -> DQ`."""
    chain = []
    node = g.producer.get(dq.input[0])
    while node is not None and node.op_type in _LAYOUT_OPS and len(g.consumers.get(node.output[0], [])) == 1:
        if node.output[0] in g.outputs:
            return False
        chain.append(node)
        node = g.producer.get(node.input[0])
    if not chain or node is None or node.op_type != "QuantizeLinear" or g.const(node.input[0]) is not None:
        return False
    q, scale = node, g.const(node.input[1])
    # Only a per-tensor Q commutes with every layout op.
    if scale is None or scale.size != 1 or len(g.consumers.get(q.output[0], [])) != 1 or q.output[0] in g.outputs:
        return False
    chain[-1].input[0] = q.input[0]
    q.input[0] = chain[0].output[0]
    dq.input[0] = q.output[0]
    g.reindex()
    return True


def _bypass_shape_of_dq(g: _Graph) -> None:
    """`Shape(DQ(Q(x)))` reads `x`: a pair that only feeds Shape is dead weight to TensorRT."""
    for node in list(g.graph.node):
        if node.op_type != "Shape":
            continue
        dq = g.producer.get(node.input[0])
        q = g.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear":
            node.input[0] = q.input[0]
    g.reindex()


def _subgraph_names(node) -> set[str]:
    names = set()
    for a in node.attribute:
        for sub in [a.g] if a.type == a.GRAPH else list(a.graphs):
            for n in sub.node:
                names.update(n.input)
                names.update(_subgraph_names(n))
    return names


def _clean(g: _Graph) -> None:
    """Drop dead nodes and unused initializers, then sort the nodes topologically."""
    graph = g.graph
    while True:
        used = set(g.outputs)
        for n in graph.node:
            used.update(n.input)
            used.update(_subgraph_names(n))
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    g.reindex()
    # Kahn's order, stable: a node waits only for inputs some node produces.
    deps = {id(n): [i for i in list(n.input) + sorted(_subgraph_names(n)) if i in g.producer] for n in graph.node}
    pending, done, ordered = list(graph.node), set(), []
    while pending:
        ready = [n for n in pending if all(i in done for i in deps[id(n)])]
        if not ready:
            raise ExportError("The ONNX graph has a cycle after the Q/DQ pass; this is a qat-plugin bug.")
        for n in ready:
            done.update(n.output)
        ready_ids = {id(n) for n in ready}
        ordered.extend(ready)
        pending = [n for n in pending if id(n) not in ready_ids]
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)
    g.reindex()


def rewrite_qdq(model_proto, weight_bits: dict[str, int] | None = None) -> dict[str, int]:
    """The graph pass, in place: int8 weights, DQ on the weight input, adjacent activation pairs.

    Args:
        model_proto: an `onnx.ModelProto` as tf2onnx wrote it.
        weight_bits: bits of low-bit weights, keyed by the TF tensor name of
            the fake-quant op's output or of the kernel it reads (tf2onnx
            keeps both names); weights not listed have 8 bits.

    Returns:
        `{tensor name: bits}` for the low-bit weights found and folded.

    Example:

    >>> rewrite_qdq(onnx.load("model.onnx"))  # doctest: +SKIP
    {}
    """
    g = _Graph(model_proto.graph)
    weight_bits = weight_bits or {}
    found: dict[str, int] = {}
    # First, so that a Q whose DQ also fed a Shape has a single consumer left.
    _bypass_shape_of_dq(g)
    _clean(g)
    for dq in [n for n in g.graph.node if n.op_type == "DequantizeLinear"]:
        if _join_activation_pair(g, dq):
            continue
        q = g.producer.get(dq.input[0])
        while q is not None and q.op_type in _LAYOUT_OPS:
            q = g.producer.get(q.input[0])
        keys = [dq.output[0]] + ([q.input[0]] if q is not None else [])
        bits = next((weight_bits[k] for k in keys if k in weight_bits), None)
        if _fold_weight(g, dq, bits) and bits is not None:
            found.update({k: bits for k in keys if k in weight_bits})
    _clean(g)
    return found


def to_uint8_activations(model_proto) -> int:
    """Store every int8 activation pair as uint8 with zero point 128, the same scale: exact.

    onnxruntime's x86 kernels (QLinearConv, QGemm) take uint8 activations
    only: a Conv fed or followed by an int8 pair stays in float there. The
    narrow int8 grid [-127, 127] shifts to [1, 255]. Pairs that are already
    uint8 (after a ReLU) and weights are left alone. The Qs of an int8
    Concat shift together (InceptionV3 at 96x96: 68 -> 96 integer kernels),
    through chains of Concats too (DenseNet's).

    Returns:
        How many QuantizeLinear nodes were changed.

    Example:

    >>> to_uint8_activations(onnx.load("model.onnx"))  # doctest: +SKIP
    12
    """
    g = _Graph(model_proto.graph)

    def int8_zero(node) -> bool:
        if g.const(node.input[0]) is not None or len(node.input) < 3 or not node.input[2]:
            return False
        zp = g.const(node.input[2])
        return zp is not None and zp.dtype == np.int8 and zp.size == 1 and int(zp.reshape(-1)[0]) == 0

    changed, done = 0, set()
    for q in [n for n in g.graph.node if n.op_type == "QuantizeLinear"]:
        if id(q) in done or not int8_zero(q):
            continue
        # Every tensor that must shift with q's: the DQs reading it, directly
        # or through layout ops (tf2onnx writes a Reshape for a transpose of a
        # 1x1 map) and Slices (NASNet's Cropping2D), and int8 Concats, whose
        # inputs (Qs with the same scale, through those ops, or other such
        # Concats: DenseNet chains them) shift with it (one dtype, one scale);
        # anything else keeps int8.
        qs, dqs, tensors, todo, ok = {}, {}, [], [q.output[0]], True
        scale = g.const(q.input[1])
        while todo and ok:
            name = todo.pop()
            if name in tensors:
                continue
            tensors.append(name)
            ok = name not in g.outputs and bool(g.consumers.get(name))
            source = g.producer.get(name)
            if source is None:
                ok = False
            elif source.op_type == "QuantizeLinear":
                ok = ok and int8_zero(source) and np.array_equal(g.const(source.input[1]), scale)
                qs[id(source)] = source
            elif source.op_type == "Concat":
                todo += list(source.input)
            elif source.op_type in _MOVE_OPS:
                todo.append(source.input[0])
            else:
                ok = False
            for node, i in g.consumers.get(name, []):
                if node.op_type == "DequantizeLinear" and i == 0:
                    dqs[id(node)] = node
                elif (node.op_type in _MOVE_OPS and i == 0) or node.op_type == "Concat":
                    todo.append(node.output[0])
                else:
                    ok = False
        if not ok:
            continue
        new_zp = g.add_init("zero_point_u8", np.full(g.const(q.input[2]).shape, 128, np.uint8))
        for node in [*qs.values(), *dqs.values()]:
            node.input[2] = new_zp
        for info in g.graph.value_info:  # tf2onnx records the int8 type of these tensors
            if info.name in tensors:
                info.type.tensor_type.elem_type = 2  # TensorProto.UINT8
        done.update(qs)
        changed += len(qs)
    _clean(g)
    return changed


def _zero_pad(g: _Graph, pad) -> bool:
    """Whether a Pad pads with constant zeros on every axis it names (no opset-18 `axes`, which tf2onnx
    doesn't write)."""
    value = g.const(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
    if _attr(pad, "mode", b"constant") != b"constant" or value is None or np.any(value != 0):
        return False
    return not (len(pad.input) > 3 and pad.input[3])


def pads_before_dequantize(model_proto) -> int:
    """Move every zero-padding Pad that reads a per-tensor DequantizeLinear in front of it: exact.

    `DQ(x) -> Pad(0)` becomes `Pad(x, zero_point) -> DQ`: the zero point
    dequantizes to exactly 0. tf2onnx writes a ZeroPadding2D in float
    between the producer's pair and its consumer; where that consumer can't
    absorb the pad (a MaxPool, as in ResNet50's `pool1_pad`), onnxruntime
    otherwise dequantizes, pads and requantizes the whole tensor in float:
    measured at 224x224, batch 32, 59 of ResNet50's 300 ms. On integers the
    pad costs a quarter of the memory traffic and the MaxPool after it fuses.
    A Pad that feeds a Conv stays: onnxruntime folds it into the conv.

    Returns:
        How many Pad nodes were moved.

    Example:

    >>> pads_before_dequantize(onnx.load("model.onnx"))  # doctest: +SKIP
    1
    """
    g = _Graph(model_proto.graph)
    moved = 0
    for pad in [n for n in g.graph.node if n.op_type == "Pad"]:
        dq = _per_tensor_dq(g, pad.input[0])
        if dq is None or not _zero_pad(g, pad):
            continue
        if any(node.op_type == "Conv" for node, _ in g.consumers.get(pad.output[0], [])):
            continue  # DQ -> Pad -> Conv: onnxruntime folds the pad into its integer conv's own padding
        pads = pad.input[1]
        del pad.input[1:]
        pad.input.extend([pads, g.add_init("pad_zero_point", g.const(dq.input[2]).reshape(()))])
        _dequantize_after(g, pad, dq, "_after_pad")
        moved += 1
    if moved:
        _clean(g)
    return moved


def _dequantize_after(g: _Graph, node, dq, suffix: str) -> None:
    """Make `node` read `dq`'s integer input and dequantize its output with `dq`'s parameters instead."""
    node.input[0] = dq.input[0]
    out = node.output[0]
    node.output[0] = g.fresh(out + "_q")
    new_dq = type(dq)()
    new_dq.CopyFrom(dq)
    new_dq.name = g.fresh(dq.name + suffix)
    new_dq.input[0] = node.output[0]
    new_dq.output[0] = out
    g.graph.node.append(new_dq)
    g.reindex()


def max_pools_before_dequantize(model_proto) -> int:
    """Move every MaxPool that reads a per-tensor DequantizeLinear in front of it: exact.

    `DQ(x) -> MaxPool` becomes `MaxPool(x) -> DQ` (dequantizing is
    increasing, so the max of codes is the code of the max). onnxruntime
    does this itself where the pool has one consumer, not where it has
    more: DenseNet's `pool1` feeds a concat and a BatchNorm, and the pool
    then ran in float and the BatchNorm's conv after it too.

    Returns:
        How many MaxPool nodes were moved.

    Example:

    >>> max_pools_before_dequantize(onnx.load("model.onnx"))  # doctest: +SKIP
    1
    """
    g = _Graph(model_proto.graph)
    moved = 0
    for pool in [n for n in g.graph.node if n.op_type == "MaxPool" and len([o for o in n.output if o]) == 1]:
        dq = _per_tensor_dq(g, pool.input[0])
        if dq is None or not np.all(g.const(dq.input[1]) > 0):
            continue
        _dequantize_after(g, pool, dq, "_after_pool")
        moved += 1
    if moved:
        _clean(g)
    return moved


def biases_into_convs(model_proto) -> int:
    """Move a constant per-channel Add after a bias-less Conv into the Conv's bias: exact.

    tf2onnx leaves the bias of a conv that follows a ZeroPadding (merged into
    the Conv's pads) as an Add of its own, and onnxruntime fuses `DQ -> Conv
    -> Q` into QLinearConv only with nothing between: ResNet50V2's 3x3 convs
    all ran in float. The bias was trained on the integer grid the kernel
    adds it on (`PlacementPolicy.quantize_bias`), so it lands there.

    Returns:
        How many Adds were moved into Convs.

    Example:

    >>> biases_into_convs(onnx.load("model.onnx"))  # doctest: +SKIP
    16
    """
    g = _Graph(model_proto.graph)
    moved = 0
    for conv in [n for n in g.graph.node if n.op_type == "Conv" and len(n.input) == 2]:
        after = g.consumers.get(conv.output[0], [])
        w_dq = g.producer.get(conv.input[1])
        w = None if w_dq is None or w_dq.op_type != "DequantizeLinear" else g.const(w_dq.input[0])
        if w is None or len(after) != 1 or after[0][0].op_type != "Add" or conv.output[0] in g.outputs:
            continue
        add = after[0][0]
        bias = g.const(add.input[1 - after[0][1]])
        channel = [1, w.shape[0]] + [1] * (w.ndim - 2)  # broadcast against (N, C, spatial...)
        if bias is None or bias.ndim > w.ndim or [1] * (w.ndim - bias.ndim) + list(bias.shape) != channel:
            continue
        conv.input.append(g.add_init(conv.name + "_bias", bias.reshape(-1).astype(np.float32)))
        conv.output[0] = add.output[0]
        g.graph.node.remove(add)
        g.reindex()
        moved += 1
    if moved:
        _clean(g)
    return moved


def concats_as_qlinear(model_proto) -> int:
    """Write each quantized Concat as `DQ -> Concat -> Q`, the form onnxruntime fuses into QLinearConcat: exact.

    tf2onnx moves a Concat's output Q in front of it, one per input, so the
    Concat itself joins integer tensors: `DQ(x) -> Q -> Concat`. onnxruntime
    runs that Concat in NCHW, between its NHWC integer convs, with Transposes
    in and out: DenseNet121 at 96x96 ran 125 of them, 1 after this and
    `average_pools_as_depthwise_convs`. QLinearConcat follows the convs' layout. Each input that was
    requantized (`Q(DQ(x))`) now reaches the Concat as its own DQ of `x`, any
    other input (an earlier Concat's, DenseNet chains them) through a DQ on
    the Concat's grid, and one Q follows: each element is still `Q(DQ(x))`.

    Returns:
        How many Concats were rewritten.

    Example:

    >>> concats_as_qlinear(onnx.load("model.onnx"))  # doctest: +SKIP
    58
    """
    from onnx import helper

    g = _Graph(model_proto.graph)
    changed = 0
    for cat in [n for n in g.graph.node if n.op_type == "Concat"]:
        sources = [g.producer.get(name) for name in cat.input]
        if not sources or any(src is None or src.op_type != "QuantizeLinear" or len(src.input) < 3 for src in sources):
            continue
        scale, zero_point = sources[0].input[1:3]
        grid = [(g.const(scale), g.const(zero_point))]
        grid += [(g.const(src.input[1]), g.const(src.input[2])) for src in sources[1:]]
        if any(a is None or b is None or a.size != 1 or not np.array_equal(a, grid[0][0]) or b.dtype != grid[0][1].dtype
               or not np.array_equal(b, grid[0][1]) for a, b in grid):
            continue
        inputs = []
        for name, q in zip(cat.input, sources):
            dq = g.producer.get(q.input[0])
            requantized = dq is not None and dq.op_type == "DequantizeLinear" and len(g.consumers[name]) == 1
            # A DQ of its own for each input: onnxruntime fuses a node group only through DQs nothing else reads.
            args = list(dq.input) if requantized else [name, scale, zero_point]
            out = g.fresh(f"{cat.name}_in{len(inputs)}_dq")
            attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute} if requantized else {}
            g.graph.node.append(helper.make_node("DequantizeLinear", args, [out], name=out, **attrs))
            inputs.append(out)
        joined = g.fresh(cat.output[0] + "_float")
        g.graph.node.append(helper.make_node("QuantizeLinear", [joined, scale, zero_point], [cat.output[0]], name=g.fresh(cat.name + "_q")))
        cat.input[:] = inputs
        cat.output[0] = joined
        g.reindex()
        changed += 1
    if changed:
        _clean(g)
    return changed


def average_pools_as_depthwise_convs(model_proto) -> int:
    """Write each `DQ -> AveragePool -> Q` that averages no padding as a depthwise Conv of 1/k: one integer kernel.

    onnxruntime would fuse the pool into QLinearAveragePool, 8-13x slower than
    float on the CPU (see `average_pools_in_float`), but a float pool runs in
    NCHW between NHWC integer convs, with Transposes around it and around
    what follows: DenseNet121's 2x2 transition pools kept its Concat chains
    in NCHW. A depthwise Conv whose k weights are all 1/k (int8 code 127,
    scale 1/(127 k)) computes the same average as an integer conv, in the
    convs' layout. Pools with padding that they don't count (Keras's
    `padding="same"`) are left to `average_pools_in_float`.

    Returns:
        How many AveragePool nodes became Convs.

    Example:

    >>> average_pools_as_depthwise_convs(onnx.load("model.onnx"))  # doctest: +SKIP
    3
    """
    from onnx import helper

    g = _Graph(model_proto.graph)
    shapes = _shapes_once(model_proto)
    changed = 0
    for pool, dq, _, kernel, strides, pads in _pools_between_qdq(g):
        dq_scale, dq_zero_point = g.const(dq.input[1]), g.const(dq.input[2]) if len(dq.input) > 2 else None
        if pool.input[0] != dq.output[0] or dq_scale is None or dq_scale.size != 1:  # not through a MaxPool
            continue
        if dq_zero_point is None or dq_zero_point.dtype != np.uint8:  # onnxruntime's x86 integer convs read uint8 only
            continue
        if any(pads) and not _attr(pool, "count_include_pad", 0):
            continue
        channels = (shapes().get(pool.input[0]) or [None, None])[1]
        if not channels:
            continue
        weight = g.fresh(pool.name + "_weight")
        g.graph.node.append(helper.make_node(
            "DequantizeLinear",
            [g.add_init(pool.name + "_weight_int8", np.full((channels, 1, *kernel), 127, np.int8)),
             g.add_init(pool.name + "_weight_scale", np.array(1 / (127 * np.prod(kernel)), np.float32)),
             g.add_init("zero_point_int8", np.zeros((), np.int8))],
            [weight], name=weight,
        ))
        g.graph.node.append(helper.make_node(
            "Conv", [pool.input[0], weight], [pool.output[0]], name=g.fresh(pool.name + "_as_conv"), group=channels,
            kernel_shape=kernel, strides=strides, pads=pads,
        ))
        g.graph.node.remove(pool)
        g.reindex()
        changed += 1
    if changed:
        _clean(g)
    return changed


def _pools_between_qdq(g: _Graph):
    """`(pool, dq, q, kernel, strides, pads)` for each AveragePool between a DequantizeLinear and a QuantizeLinear.

    The DequantizeLinear may come before MaxPools (onnxruntime moves the pair
    across them). Pools with `ceil_mode`, dilations or a SAME `auto_pad`, and
    pools whose output leaves the graph, are not listed. Reads `g` as each
    one is yielded, so the caller may rewrite the graph in between.
    """
    for pool in [n for n in g.graph.node if n.op_type == "AveragePool"]:
        source, after = g.producer.get(pool.input[0]), g.consumers.get(pool.output[0], [])
        while source is not None and source.op_type == "MaxPool":
            source = g.producer.get(source.input[0])
        if source is None or source.op_type != "DequantizeLinear" or len(after) != 1 or after[0][0].op_type != "QuantizeLinear":
            continue
        kernel = list(_attr(pool, "kernel_shape", []))
        n = len(kernel)
        if pool.output[0] in g.outputs or _attr(pool, "ceil_mode", 0) or any(d != 1 for d in _attr(pool, "dilations", [1] * n)):
            continue
        if _attr(pool, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
            continue
        yield pool, source, after[0][0], kernel, list(_attr(pool, "strides", [1] * n)), list(_attr(pool, "pads", [0] * 2 * n))


def _inferred_shapes(model_proto, elem_type: int | None = None) -> dict[str, list]:
    """Every tensor's shape as onnx's shape inference finds it (None for an unknown dim); with `elem_type`
    (a `TensorProto` type), only the tensors of that type."""
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model_proto).graph
    return {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for v in [*inferred.value_info, *inferred.input]
        if elem_type is None or v.type.tensor_type.elem_type == elem_type
    }


def _shapes_once(model_proto, elem_type: int | None = None):
    """`_inferred_shapes` as a function that infers them on its first call only (a pass that finds nothing
    to rewrite never pays for shape inference)."""
    return functools.cache(lambda: _inferred_shapes(model_proto, elem_type))


def _pool_counts(spatial: list[int], kernel: list[int], strides: list[int], pads: list[int]) -> np.ndarray:
    """How many input elements (not padding) each output of an AveragePool averages."""
    n = len(spatial)
    ones = np.pad(np.ones(spatial, np.float32), [(pads[i], pads[i + n]) for i in range(n)])
    windows = np.lib.stride_tricks.sliding_window_view(ones, kernel)
    windows = windows[tuple(slice(None, None, s) for s in strides)]
    return windows.sum(axis=tuple(range(n, 2 * n)))


def average_pools_in_float(model_proto) -> int:
    """Keep every AveragePool between a DequantizeLinear and a QuantizeLinear in float, averaging what it did.

    onnxruntime fuses `DQ -> AveragePool -> Q` into its QLinearAveragePool,
    whose kernel is 8-13x slower on the CPU than dequantizing, pooling in
    float and requantizing (InceptionV3 at 299x299, batch 1: its nine 3x3
    pools took 5.0 of the file's 14.7 ms in onnxruntime's profiler). Its
    fusion only looks for a Q right after the pool, so the pool now counts
    padding (`count_include_pad=1`) and a Mul by `kernel size / valid
    elements per window` follows it: the same average as the original's, up
    to float rounding (Keras's `padding="same"` pools average only the valid
    elements), and the pool stays in float. onnxruntime drops a Mul by 1, so
    the Mul also doubles and the pool's own QuantizeLinear gets twice the
    scale: a power of two, which changes no code.

    Pools whose spatial input shape is unknown (and that pad) are left alone,
    as are `ceil_mode` and dilated ones.

    Returns:
        How many AveragePool nodes were kept in float.

    Example:

    >>> average_pools_in_float(onnx.load("model.onnx"))  # doctest: +SKIP
    9
    """
    from onnx import helper

    g = _Graph(model_proto.graph)
    shapes = _shapes_once(model_proto)
    kept = 0
    for pool, _, q, kernel, strides, pads in _pools_between_qdq(g):
        n = len(kernel)
        q_scale = g.const(q.input[1])
        if q_scale is None:
            continue
        if any(pads) and not _attr(pool, "count_include_pad", 0):
            spatial = (shapes().get(pool.input[0]) or [None])[2:]
            if len(spatial) != n or None in spatial:
                continue
            scale = (2 * np.prod(kernel) / _pool_counts(spatial, kernel, strides, pads)).astype(np.float32)
            scale = scale.reshape(1, 1, *scale.shape)
        else:
            scale = np.full((), 2, np.float32)
        for a in pool.attribute:
            if a.name == "count_include_pad":
                a.i = 1
                break
        else:
            pool.attribute.append(helper.make_attribute("count_include_pad", 1))
        doubled = g.fresh(pool.output[0] + "_doubled")
        g.graph.node.append(helper.make_node(
            "Mul", [pool.output[0], g.add_init(pool.name + "_window_scale", scale)], [doubled],
            name=g.fresh(pool.name + "_window_scale"),
        ))
        q.input[0], q.input[1] = doubled, g.add_init(q.input[1] + "_doubled", (2 * q_scale).astype(q_scale.dtype))
        g.reindex()
        kept += 1
    if kept:
        _clean(g)
    return kept


def _scalar(g: _Graph, name: str) -> float | None:
    """The value of a one-element float constant, else None."""
    value = g.const(name)
    if value is None or value.size != 1 or value.dtype.kind != "f" or not np.isfinite(value).all():
        return None
    return float(value.reshape(-1)[0])


def _per_tensor_params(g: _Graph, node) -> tuple[np.ndarray, np.ndarray] | None:
    """`(scale, zero point)` of a Q or DQ whose constant scale and zero point are one number each, else None."""
    if len(node.input) < 3:
        return None
    scale, zp = g.const(node.input[1]), g.const(node.input[2])
    if scale is None or zp is None or scale.size != 1 or zp.size != 1:
        return None
    return scale, zp


def _per_tensor_dq(g: _Graph, name: str):
    """The per-tensor DequantizeLinear (with a zero point) of a computed tensor that makes `name`, else None."""
    dq = g.producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or g.const(dq.input[0]) is not None:
        return None
    return dq if _per_tensor_params(g, dq) is not None else None


def _single_reader(g: _Graph, name: str):
    """The one node that reads tensor `name`, or None (several readers, or a graph output)."""
    readers = g.consumers.get(name, [])
    return readers[0][0] if len(readers) == 1 and name not in g.outputs else None


def _sole_quantize(g: _Graph, name: str):
    """The QuantizeLinear that is the only reader of `name` (not a graph output), else None."""
    q = _single_reader(g, name)
    return q if q is not None and q.op_type == "QuantizeLinear" and q.input[0] == name else None


def scales_into_qdq(model_proto) -> int:
    """Fold a Mul or Div by a positive scalar next to a per-tensor Q/DQ into its scale.

    Two cases, each the same values to a float rounding:

    - `DQ(x; s) -> Div(6)` becomes `DQ(x; s / 6)`. A quantized hard swish is
      `x * (DQ(Q(relu6(x + 3))) / 6)`, and onnxruntime fuses a Mul into
      QLinearMul only where both of its inputs come straight from
      DequantizeLinears.
    - `Mul(1 / 6) -> Q(y; s)`, the Mul's only reader, becomes `Q(y; 6 s)`
      (its DequantizeLinears keep `s`: they still dequantize the same
      codes). MobileNetV3's squeeze-and-excite hard sigmoid,
      `relu6(x + 3) * (1 / 6)`, then ends in `Add -> Clip -> Q`, which
      `clips_into_quantize` and `constants_as_dequantized` make a QLinearAdd.

    Returns:
        How many Mul/Div nodes were folded.

    Example:

    >>> scales_into_qdq(onnx.load("model.onnx"))  # doctest: +SKIP
    9
    """
    g = _Graph(model_proto.graph)
    folded = 0
    for node in [n for n in g.graph.node if n.op_type in ("Mul", "Div") and len(n.input) == 2]:
        if node.output[0] in g.outputs:
            continue
        sides = (0, 1) if node.op_type == "Mul" else (0,)  # x / c only, not c / x
        for i in sides:
            c = _scalar(g, node.input[1 - i])
            if c is None or c <= 0:
                continue
            factor = np.float32(c) if node.op_type == "Mul" else np.float32(1) / np.float32(c)
            dq, q = _per_tensor_dq(g, node.input[i]), _sole_quantize(g, node.output[0])
            if dq is not None and len(g.consumers.get(dq.output[0], [])) == 1 and dq.output[0] not in g.outputs:
                dq.input[1] = g.add_init(dq.name + "_scale", g.const(dq.input[1]).astype(np.float32) * factor)
                dq.output[0] = node.output[0]
            elif q is not None and (q_scale := g.const(q.input[1])) is not None and q_scale.size == 1:
                q.input[1] = g.add_init(q.name + "_scale", q_scale.astype(np.float32) / factor)
                q.input[0] = node.input[i]
            else:
                continue
            g.graph.node.remove(node)
            g.reindex()
            folded += 1
            break
    if folded:
        _clean(g)
    return folded


def constants_as_dequantized(model_proto) -> int:
    """Give a scalar constant operand of a quantized Add/Sub/Mul a DequantizeLinear of its own: exact.

    `DQ(x) -> Add(3) -> Q` becomes `DQ(x), DQ(1; scale 3) -> Add -> Q`,
    which onnxruntime fuses into QLinearAdd (it fuses binary ops only where
    every input is dequantized). The constant is stored as the code 1 (or
    -1) with its magnitude as the scale, so it dequantizes to itself.

    Returns:
        How many constants were given a DequantizeLinear.

    Example:

    >>> constants_as_dequantized(onnx.load("model.onnx"))  # doctest: +SKIP
    9
    """
    g = _Graph(model_proto.graph)
    changed = 0
    for node in [n for n in g.graph.node if n.op_type in ("Add", "Sub", "Mul") and len(n.input) == 2]:
        if _sole_quantize(g, node.output[0]) is None:
            continue
        for i in (0, 1):
            dq, c = _per_tensor_dq(g, node.input[1 - i]), _scalar(g, node.input[i])
            if dq is None or c is None:
                continue
            zp_type = g.const(dq.input[2]).dtype
            code, zp = (1, 0) if c > 0 else (0, 0) if c == 0 else ((0, 1) if zp_type == np.uint8 else (-1, 0))
            shape = g.const(node.input[i]).shape
            name = g.fresh(f"{node.name}_constant_dq")
            g.graph.node.append(_make_dq(
                g, name, np.full(shape, code, zp_type), np.float32(abs(c) or 1.0), np.array(zp, zp_type)
            ))
            node.input[i] = name
            g.reindex()
            changed += 1
            break
    if changed:
        _clean(g)
    return changed


def _make_dq(g: _Graph, name: str, codes: np.ndarray, scale, zero_point: np.ndarray):
    from onnx import helper

    inputs = [g.add_init(name + "_codes", codes), g.add_init(name + "_scale", np.asarray(scale, np.float32)),
              g.add_init(name + "_zero_point", zero_point)]
    return helper.make_node("DequantizeLinear", inputs, [name], name=name)


def clips_into_quantize(model_proto) -> int:
    """Drop a Clip or Relu whose only reader is a QuantizeLinear that saturates at its bounds anyway: exact.

    A hard swish's gate is `relu6(x + 3)` on an unsigned grid whose top is
    the gate's calibrated maximum, 6 or less: `Q(clip(v, 0, 6)) == Q(v)` for
    every `v` where the grid's ends lie within half a step of the clip's.
    onnxruntime drops such a Clip itself only where the grid's top is at
    most 6 in float, and a top of exactly 6 (`255 * (6 / 255)`) can land a
    rounding above it; with the Clip left in, the Add before it can't fuse.

    Returns:
        How many Clip/Relu nodes were dropped.

    Example:

    >>> clips_into_quantize(onnx.load("model.onnx"))  # doctest: +SKIP
    9
    """
    g = _Graph(model_proto.graph)
    dropped = 0
    for clip in [n for n in g.graph.node if n.op_type in ("Clip", "Relu")]:
        q = _sole_quantize(g, clip.output[0])
        params = None if q is None else _per_tensor_params(g, q)
        if params is None:
            continue
        scale, zp = params
        low, high = (-np.inf, np.inf) if clip.op_type == "Clip" else (0.0, np.inf)
        if clip.op_type == "Clip":
            bounds = [g.const(name) if name else None for name in list(clip.input[1:3]) + [""] * (3 - len(clip.input))]
            if any(name and b is None for name, b in zip(list(clip.input[1:3]), bounds)):
                continue
            low = -np.inf if bounds[0] is None else float(bounds[0])
            high = np.inf if bounds[1] is None else float(bounds[1])
        info = np.iinfo(zp.dtype)
        step, z = float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0])
        if (info.min - z) * step < low - step / 2 or (info.max - z) * step > high + step / 2:
            continue
        g.redirect(clip.output[0], clip.input[0])
        g.graph.node.remove(clip)
        g.reindex()
        dropped += 1
    if dropped:
        _clean(g)
    return dropped


def identity_reshapes(model_proto) -> int:
    """Bypass every Reshape that, with the reshapes before it, gives back the shape it started from: exact.

    tf2onnx writes a layout change of a 1x1 map (NHWC to NCHW) as a
    Reshape, and a pooled vector made a map again (EfficientNet's `Reshape`
    layer) as a Squeeze and a Reshape: what reaches the conv after a global
    pool is its `(N, C, 1, 1)` output reshaped to `(N, C, 1, 1)`.
    onnxruntime can't move its NHWC layout through a Reshape, so each
    squeeze-and-excite block ran two Transposes around one, between
    integer ops that need none.

    Returns:
        How many Reshapes were bypassed.

    Example:

    >>> identity_reshapes(onnx.load("model.onnx"))  # doctest: +SKIP
    20
    """
    g = _Graph(model_proto.graph)
    shapes = _shapes_once(model_proto)
    bypassed = 0
    for node in [n for n in g.graph.node if n.op_type == "Reshape"]:
        if node.output[0] in g.outputs:
            continue
        out = shapes().get(node.output[0])
        if not out or None in out[1:]:
            continue
        # Same static dims, same element count: the same batch too.
        source, found = node.input[0], None
        while True:
            if shapes().get(source) == out:
                found = source
            producer = g.producer.get(source)
            if producer is None or producer.op_type not in ("Reshape", "Squeeze", "Unsqueeze", "Flatten"):
                break
            source = producer.input[0]
        if found is None:
            continue
        g.redirect(node.output[0], found)
        g.reindex()
        bypassed += 1
    if bypassed:
        _clean(g)
    return bypassed


_BROADCAST_OPS = ("Mul", "Add", "Sub", "Div")


def channel_constants_on_rows(model_proto, narrow: int = 16) -> int:
    """Run float ops with a per-channel constant on a channels-last tensor's rows, not its pixels: exact.

    keras.applications' `Rescaling` and `Normalization` layers (EfficientNet,
    MobileNetV3, ConvNeXt) multiply and add `(1, 1, 1, C)` constants to the
    `(N, H, W, 3)` image. onnxruntime broadcasts those `C` numbers at a time,
    3 floats per step: in EfficientNetB0's file at 224x224 and batch 1,
    its Mul and Add took 0.68 ms (onnxruntime's profiler), 0.12 ms as
    written here, and the whole FP32 file ran 5.8 -> 4.9 ms. Each chain of them (and scalars
    among them) runs on the image reshaped to `(N, H, W*C)`, with each
    constant repeated `W` times, and is reshaped back after; the same
    elementwise products and sums, in the same order. Only where `C` is
    below `narrow` (one AVX-512 register of floats): wider channels
    already broadcast a vector at a time.

    Returns:
        How many ops now run on rows.

    Example:

    >>> channel_constants_on_rows(onnx.load("efficientnetb0.onnx"))  # doctest: +SKIP
    3
    """
    from onnx import TensorProto, helper

    g = _Graph(model_proto.graph)
    shapes = _shapes_once(model_proto, TensorProto.FLOAT)

    def row_op(node):
        """`(tensor input index, constant)` where `node` is an op of a chain, else None."""
        if node.op_type not in _BROADCAST_OPS or len(node.input) != 2:
            return None
        consts = [g.const(name) for name in node.input]
        if (consts[0] is None) == (consts[1] is None):
            return None
        at = 0 if consts[0] is None else 1
        c, dims = consts[1 - at], shapes().get(node.input[at])
        if dims is None or len(dims) < 3 or None in dims[1:] or c.dtype != np.float32 or c.ndim > len(dims):
            return None
        if any(d != 1 for d in c.shape[:-1]) or (c.ndim and c.shape[-1] not in (1, dims[-1])):
            return None
        return at, c

    moved, seen = 0, set()
    for first in list(g.graph.node):  # in topological order: a chain's first op comes first
        found = None if id(first) in seen else row_op(first)
        if found is None:
            continue
        chain, last = [(first, *found)], first
        while last.output[0] not in g.outputs and len(g.consumers.get(last.output[0], [])) == 1:
            node, i = g.consumers[last.output[0]][0]
            found = row_op(node)
            if found is None or found[0] != i:
                break
            chain.append((node, *found))
            last = node
        seen.update(id(node) for node, _, _ in chain)
        dims = shapes()[first.input[chain[0][1]]]
        if all(c.size == 1 for _, _, c in chain) or dims[-1] >= narrow:
            continue
        rows = np.array([0, *dims[1:-2], dims[-2] * dims[-1]], np.int64)
        names = {part: g.fresh(f"{first.name}_{part}") for part in ("rows", "rows_out")}
        g.graph.node.append(helper.make_node(
            "Reshape", [first.input[chain[0][1]], g.add_init("rows_shape", rows)], [names["rows"]], name=names["rows"]))
        first.input[chain[0][1]] = names["rows"]
        for node, at, c in chain:
            if c.size > 1:
                node.input[1 - at] = g.add_init(node.input[1 - at] + "_rows", np.tile(c.reshape(-1), dims[-2]))
            elif c.ndim:
                node.input[1 - at] = g.add_init(node.input[1 - at] + "_scalar", c.reshape(()))
        out = last.output[0]
        last.output[0] = names["rows_out"]
        g.graph.node.append(helper.make_node(
            "Reshape", [names["rows_out"], g.add_init("pixels_shape", np.array([0, *dims[1:]], np.int64))], [out],
            name=g.fresh(f"{last.name}_pixels")))
        # A Reshape after (`fold_image_convs`'s) reads the rows itself: a 0 in its shape copies only the batch.
        for reader, i in g.consumers.get(out, []):
            shape = g.const(reader.input[1]) if reader.op_type == "Reshape" and i == 0 else None
            if shape is not None and not np.any(shape[1:] == 0):
                reader.input[0] = names["rows_out"]
        g.reindex()
        moved += len(chain)
    if moved:
        _clean(g)
    return moved


def pooled_squeezes_channels_last(model_proto) -> int:
    """Squeeze a quantized global pool's `(N, C, 1, 1)` as the channels-last `(N, 1, 1, C)` it is: exact.

    onnxruntime runs the integer global pool channels-last and puts a
    Transpose back to NCHW after it, which its transpose optimizer leaves in
    front of the Squeeze of axes (2, 3) that tf2onnx writes before the head:
    one more node per inference, a visible share of a small net's time at
    batch 1. Written as Transpose(0, 2, 3, 1) and a Squeeze of axes (1, 2),
    the two Transposes cancel.

    Returns:
        How many Squeezes were rewritten.

    Example:

    >>> pooled_squeezes_channels_last(onnx.load("model.onnx"))  # doctest: +SKIP
    1
    """
    from onnx import helper

    g = _Graph(model_proto.graph)
    shapes = _shapes_once(model_proto)
    rewritten = 0
    for squeeze in [n for n in g.graph.node if n.op_type == "Squeeze" and len(n.input) > 1]:
        pool, axes = g.producer.get(squeeze.input[0]), g.const(squeeze.input[1])
        if pool is None or pool.op_type not in ("GlobalAveragePool", "GlobalMaxPool") or axes is None:
            continue
        if _per_tensor_dq(g, pool.input[0]) is None or _sole_quantize(g, squeeze.output[0]) is None:
            continue  # a float pool stays NCHW in onnxruntime: the Transpose would be a real one
        rank = len(shapes().get(squeeze.input[0]) or [])
        if rank != 4 or sorted(int(a) % rank for a in axes) != [2, 3]:
            continue
        nhwc = g.fresh(f"{squeeze.name}_nhwc")
        g.graph.node.append(helper.make_node("Transpose", [squeeze.input[0]], [nhwc], name=nhwc, perm=[0, 2, 3, 1]))
        squeeze.input[0], squeeze.input[1] = nhwc, g.add_init("squeeze_axes", np.array([1, 2], np.int64))
        g.reindex()
        rewritten += 1
    if rewritten:
        _clean(g)
    return rewritten


def _spatial_zero_pads(g: _Graph, pad, rank: int) -> tuple[int, ...] | None:
    """`(begins..., ends...)` of a constant-zero Pad of a channels-last tensor that pads only its spatial axes."""
    amounts = g.const(pad.input[1]) if len(pad.input) > 1 else None
    if not _zero_pad(g, pad) or amounts is None or amounts.size != 2 * rank:
        return None
    begins, ends = [int(v) for v in amounts[:rank]], [int(v) for v in amounts[rank:]]
    if min(begins + ends) < 0 or begins[0] or ends[0] or begins[-1] or ends[-1]:
        return None
    return (*begins[1:-1], *ends[1:-1])


def _image_route(g: _Graph, x_dq, channels: int, rank: int, shapes):
    """`(source, Q, pads, dims)` when `x_dq` reads `Q(to_channels_first(source))`, `source` a float
    channels-last tensor of known size but for the batch.

    `to_channels_first` is tf2onnx's Transpose, or for one channel its Reshape.
    `source` is the model input, or its float preprocessing (a `Rescaling` or
    `Normalization` layer: elementwise ops that keep its shape). A zero Pad
    of its spatial axes may come before the layout op (a `ZeroPadding2D`
    before ResNet's stem): `pads` are its `(begins..., ends...)`, else zeros.
    `shapes()` gives the float tensors' inferred dims (`_inferred_shapes`);
    it's only called for a conv that reads such a Q.
    """
    q = g.producer.get(x_dq.input[0])
    layout = None if q is None or q.op_type != "QuantizeLinear" else g.producer.get(q.input[0])
    if layout is None or layout.op_type not in ("Transpose", "Reshape"):
        return None
    name, pads = layout.input[0], (0,) * (2 * (rank - 2))
    pad = g.producer.get(name)
    if pad is not None and pad.op_type == "Pad":
        pads, name = _spatial_zero_pads(g, pad, rank), pad.input[0]
        if pads is None or len(g.consumers.get(pad.output[0], [])) != 1:
            return None
    dims = shapes().get(name)
    if dims is None or len(dims) != rank or dims[-1] != channels or None in dims[1:]:
        return None
    if layout.op_type == "Transpose":
        ok = list(_attr(layout, "perm", [])) == [0, rank - 1, *range(1, rank - 1)]
    else:
        shape = g.const(layout.input[1])
        padded = [d + pads[i] + pads[i + rank - 2] for i, d in enumerate(dims[1:-1])]
        ok = channels == 1 and shape is not None and list(shape[1:]) == [1, *padded]
    return (name, q, pads, dims) if ok else None


def column_fold(width: int, kernel: int, stride: int, pads: tuple[int, int], fold: int):
    """A 1-D conv along the width, rewritten to run on blocks of `fold` columns.

    The folded conv reads each block of `fold` input columns as one column of
    `fold` times the channels and writes `fold // stride` outputs per block
    as channels, at stride 1. Returns `(kernel, pad_begin, pad_end, taps)`
    for it, where `taps[d][k]` is `(folded tap, column within the block)` of
    original tap `k` for a block's output `d`; None where the width, output
    width or stride don't divide.

    Example:

    >>> column_fold(28, 3, 1, (1, 1), 4)[:3]   # 3 taps at stride 1: 3 blocks
    (3, 1, 1)
    >>> column_fold(224, 3, 2, (0, 1), 4)[:3]  # 3 taps at stride 2: 2 blocks
    (2, 0, 1)
    """
    if fold % stride or width % fold:
        return None
    per_block = fold // stride
    out = (width + pads[0] + pads[1] - kernel) // stride + 1
    if out % per_block:
        return None
    taps = [[divmod(d * stride - pads[0] + k, fold) for k in range(kernel)] for d in range(per_block)]
    first = min(block for row in taps for block, _ in row)
    folded = max(block for row in taps for block, _ in row) - first + 1
    pad_begin = -first
    pad_end = out // per_block - 1 + folded - width // fold - pad_begin
    if pad_begin < 0 or pad_end < 0:
        return None
    return folded, pad_begin, pad_end, [[(block - first, col) for block, col in row] for row in taps]


def folded_kernel(w: np.ndarray, plan, fold: int) -> np.ndarray:
    """The `(per_block * O, fold * C, kh, kw')` kernel of `column_fold`'s folded conv, from a `(O, C, kh, kw)` one.

    Example:

    >>> w = np.arange(1, 4).reshape(1, 1, 1, 3)         # one 1x3 kernel [1 2 3]
    >>> folded_kernel(w, column_fold(4, 3, 1, (1, 1), 2), 2)[:, :, 0]  # 2 outputs, 2 columns per block
    array([[[0, 2, 0],
            [1, 3, 0]],
    <BLANKLINE>
           [[0, 1, 3],
            [0, 2, 0]]])
    """
    o, c = w.shape[:2]
    taps = plan[3]
    folded = np.zeros((len(taps) * o, fold * c, w.shape[2], plan[0]), w.dtype)
    for d, row in enumerate(taps):
        for k, (tap, col) in enumerate(row):
            folded[d * o:(d + 1) * o, col * c:(col + 1) * c, :, tap] = w[:, :, :, k]
    return folded


def _image_conv(g: _Graph, conv, channels: int, shapes):
    """`(x_dq, w_dq, w, w_scale, route or None)` for an integer Conv with fewer than `channels` input
    channels and a per-tensor input (`_image_route`'s route when it reads a float channels-last image), else
    None."""
    x_dq, w_dq = (g.producer.get(name) for name in conv.input[:2])
    if _attr(conv, "group", 1) != 1 or x_dq is None or w_dq is None:
        return None
    if x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear" or len(x_dq.input) < 3:
        return None
    w, w_scale = g.const(w_dq.input[0]), g.const(w_dq.input[1])
    x_scale, x_zp = g.const(x_dq.input[1]), g.const(x_dq.input[2])
    if w is None or w_scale is None or w.dtype != np.int8 or w.ndim < 3 or w.shape[1] >= channels:
        return None
    if x_scale is None or x_zp is None or x_scale.size != 1 or (w_scale.size > 1 and _attr(w_dq, "axis", 1) != 0):
        return None
    return x_dq, w_dq, w, w_scale, _image_route(g, x_dq, w.shape[1], w.ndim, shapes)


def fold_image_convs(model_proto, channels: int = 4, max_fold: int = 8) -> dict[str, int]:
    """Run integer 2-D Convs that read the model image on blocks of F columns: exact.

    Where an image meets the network (itself or after float preprocessing,
    such as keras.applications' `Rescaling` and `Normalization` layers) its
    conv has 1 to 3 input channels, and
    onnxruntime's x86 integer conv, which has a fixed cost per output pixel,
    does little work per pixel there. Reshaping the channels-last image from
    `(N, H, W, C)` to `(N, H, W/F, F*C)` moves nothing, and a conv over those
    blocks with `F/stride` outputs per block as channels computes the same
    numbers: each block's kernel holds the original taps at their columns
    and zeros elsewhere (`column_fold`, `folded_kernel`); its output
    `(N, H', W'/(F/stride), F/stride*O)` reshapes back to `(N, H', W', O)`
    after the conv's QuantizeLinear, so the conv still fuses. F is the
    smallest with `F*C` a multiple of `channels` (onnxruntime's symmetric
    conv kernels take 4 at a time) that divides the width and, over the
    stride, the output width. A zero Pad of the image before its layout op
    (a `ZeroPadding2D`, as in ResNet's stem) becomes the folded conv's own
    padding. Measured in onnxruntime's profiler at batch 32:
    ResNet-8's conv1 (28x28x1 -> 16, F=4: 4 -> 64 channels on 28x7) 0.07 ms
    against 0.18-0.22 ms plus 0.04 ms of widening to 4 channels
    (`widen_narrow_convs`, the fallback); MobileNetV2's stem (224x224x3,
    stride 2, F=4: 12 -> 64 channels) 2.5 ms against 3.8 ms.

    Returns:
        `{conv node name: F}` for each folded Conv.

    Example:

    >>> fold_image_convs(onnx.load("model.onnx"))  # doctest: +SKIP
    {'model_1/conv1_1/convolution': 4}
    """
    from onnx import TensorProto, helper

    g = _Graph(model_proto.graph)
    shapes = _shapes_once(model_proto, TensorProto.FLOAT)
    folded: dict[str, int] = {}
    for conv in [n for n in g.graph.node if n.op_type == "Conv"]:
        found = _image_conv(g, conv, channels, shapes)
        if found is None or found[4] is None or found[2].ndim != 4:
            continue
        x_dq, w_dq, w, w_scale, (source, q, image_pads, dims) = found
        out_q = _through_elementwise(g, conv.output[0], forward=True)
        bias = g.const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        if out_q is None or out_q.op_type != "QuantizeLinear" or out_q.output[0] in g.outputs:
            continue
        if (len(conv.input) > 2 and conv.input[2] and bias is None) or _attr(conv, "auto_pad", b"NOTSET") != b"NOTSET":
            continue
        if any(d != 1 for d in _attr(conv, "dilations", [1, 1])):
            continue
        o, c, kh, kw = w.shape
        sh, sw = _attr(conv, "strides", [1, 1])
        # A zero Pad of the image goes into the conv's own padding: the folded conv reads the unpadded image.
        pt, pl, pb, pr = np.add(_attr(conv, "pads", [0, 0, 0, 0]), image_pads).tolist()
        height, width = dims[1:3]
        fold = next(
            ((f, plan) for f in range(2, max_fold + 1) if (f * c) % channels == 0
             for plan in [column_fold(width, kw, sw, (pl, pr), f)] if plan is not None),
            None,
        )
        if fold is None:
            continue
        f, plan = fold
        kw2, pad_begin, pad_end, _ = plan
        per_block = f // sw
        wf = folded_kernel(w, plan, f)
        zp = g.const(w_dq.input[2]) if len(w_dq.input) > 2 else None
        w_inputs = [g.add_init(w_dq.input[0] + "_folded", wf)]
        w_inputs.append(g.add_init(w_dq.input[1] + "_folded", np.tile(w_scale, per_block)) if w_scale.size > 1 else w_dq.input[1])
        if zp is not None:
            w_inputs.append(g.add_init("zero_point", np.tile(zp, per_block)) if zp.size > 1 else w_dq.input[2])
        # Short names: at ResNet-8's size, names are a visible share of the file.
        names = {part: g.fresh(f"fold_{part}") for part in (
            "blocks", "blocks_nchw", "x_q", "x", "w", "y_nhwc", "y_columns", "y_nchw")}
        out_h = (height + pt + pb - kh) // sh + 1
        out_w = (width + pl + pr - kw) // sw + 1
        g.redirect(out_q.output[0], names["y_nchw"])
        g.graph.node.extend([
            helper.make_node("Reshape", [source, g.add_init("fold_shape", np.array([0, height, width // f, f * c], np.int64))],
                             [names["blocks"]], name=names["blocks"]),
            helper.make_node("Transpose", [names["blocks"]], [names["blocks_nchw"]], name=names["blocks_nchw"], perm=[0, 3, 1, 2]),
            helper.make_node("QuantizeLinear", [names["blocks_nchw"], *q.input[1:]], [names["x_q"]], name=names["x_q"]),
            helper.make_node("DequantizeLinear", [names["x_q"], *x_dq.input[1:]], [names["x"]], name=names["x"]),
            helper.make_node("DequantizeLinear", w_inputs, [names["w"]], name=names["w"],
                             **({"axis": 0} if w_scale.size > 1 else {})),
            # Back to the conv's own output layout, after its QuantizeLinear, so onnxruntime still fuses the conv.
            helper.make_node("Transpose", [out_q.output[0]], [names["y_nhwc"]], name=names["y_nhwc"], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", [names["y_nhwc"], g.add_init("unfold_shape", np.array([0, out_h, out_w, o], np.int64))],
                             [names["y_columns"]], name=names["y_columns"]),
            helper.make_node("Transpose", [names["y_columns"]], [names["y_nchw"]], name=names["y_nchw"], perm=[0, 3, 1, 2]),
        ])
        conv.input[0], conv.input[1] = names["x"], names["w"]
        if bias is not None:
            conv.input[2] = g.add_init(conv.input[2] + "_folded", np.tile(bias, per_block))
        for a in list(conv.attribute):
            if a.name in ("kernel_shape", "strides", "pads"):
                conv.attribute.remove(a)
        conv.attribute.extend([
            helper.make_attribute("kernel_shape", [kh, kw2]),
            helper.make_attribute("strides", [sh, 1]),
            helper.make_attribute("pads", [pt, pad_begin, pb, pad_end]),
        ])
        g.reindex()
        folded[conv.name] = f
    if folded:
        _clean(g)
    return folded


def widen_narrow_convs(model_proto, channels: int = 4) -> dict[str, str]:
    """Give integer Convs with fewer than `channels` input channels zero-weight extra ones: exact.

    onnxruntime's x86 integer convs work on 4 input channels at a time and
    take a slow path below that, which is where an image meets the network:
    ResNet-8's conv1 on 28x28x1 digits ran 0.64 ms at batch 32, 0.21 ms with
    4 channels; MobileNetV2's 3-channel conv1 at 224x224 0.28 ms at batch 1,
    0.13 ms. The weights `(O, C, ...)` get `channels - C` channels of zeros,
    and the input gets as many channels that meet them:

    - when the conv reads the (float, channels-last) model input or its
      float preprocessing, through tf2onnx's layout op and a QuantizeLinear, and
      `fold_image_convs` (which runs first, and is faster) could not fold
      it, e.g. where 4 doesn't divide the width: by a MatMul with
      `[I | 0]` on the input's last axis (exact in float: one product by 1
      and zeros added). A Pad would do the same but onnxruntime pads the
      innermost axis element by element: 0.45 ms at MobileNetV2's input,
      more than the conv saves; the MatMul costs 0.06 ms;
    - else, for a 1-channel tensor, by a Pad of its quantized values with
      the zero point (which dequantizes to 0) on the channel axis.

    Returns:
        `{conv node name: "MatMul" or "Pad"}`, how each widened Conv got its
        extra input channels.

    Example:

    >>> widen_narrow_convs(onnx.load("model.onnx"))  # doctest: +SKIP
    {'model_1/conv1_1/convolution': 'MatMul'}
    """
    from onnx import TensorProto, helper

    g = _Graph(model_proto.graph)
    shapes = _shapes_once(model_proto, TensorProto.FLOAT)
    widened: dict[str, str] = {}
    for conv in [n for n in g.graph.node if n.op_type == "Conv"]:
        found = _image_conv(g, conv, channels, shapes)
        if found is None:
            continue
        x_dq, w_dq, w, w_scale, route = found
        route = None if route is None or any(route[2]) else route[:2]
        c = w.shape[1]
        if route is None and c != 1:
            continue
        names = {part: g.fresh(f"{conv.name}_{part}") for part in ("wide_input", "wide_nchw", "x_wide_q", "x_wide", "w_wide")}
        if route is not None:
            source, q = route
            eye = np.zeros((c, channels), np.float32)
            eye[:, :c] = np.eye(c, dtype=np.float32)
            perm = [0, w.ndim - 1, *range(1, w.ndim - 1)]  # channels-last -> channels-first
            g.graph.node.extend([
                helper.make_node("MatMul", [source, g.add_init("widen_eye", eye)], [names["wide_input"]], name=names["wide_input"]),
                helper.make_node("Transpose", [names["wide_input"]], [names["wide_nchw"]], name=names["wide_nchw"], perm=perm),
                helper.make_node("QuantizeLinear", [names["wide_nchw"], *q.input[1:]], [names["x_wide_q"]], name=names["x_wide_q"]),
            ])
        else:
            pads = np.zeros(2 * w.ndim, np.int64)
            pads[w.ndim + 1] = channels - 1  # the end of the channel axis (NCHW)
            fill = g.add_init("pad_zero_point", g.const(x_dq.input[2]).reshape(()))
            g.graph.node.append(helper.make_node(
                "Pad", [x_dq.input[0], g.add_init("channel_pads", pads), fill], [names["x_wide_q"]], name=names["x_wide_q"]
            ))
        wide = np.zeros((w.shape[0], channels, *w.shape[2:]), np.int8)
        wide[:, :c] = w
        g.graph.node.extend([
            helper.make_node("DequantizeLinear", [names["x_wide_q"], *x_dq.input[1:]], [names["x_wide"]], name=names["x_wide"]),
            helper.make_node(
                "DequantizeLinear", [g.add_init(w_dq.input[0] + "_wide", wide), *w_dq.input[1:]], [names["w_wide"]],
                name=names["w_wide"], **({"axis": 0} if w_scale.size > 1 else {}),
            ),
        ])
        conv.input[0], conv.input[1] = names["x_wide"], names["w_wide"]
        g.reindex()
        widened[conv.name] = "Pad" if route is None else "MatMul"
    if widened:
        _clean(g)
    return widened


def _padded_weight_dq(g: _Graph, conv, axis: int, size: int, check_only: bool = False) -> bool:
    """Give `conv`'s int8 weight `size` channels on `axis` (zeros after its own); on the output axis (0), its
    per-channel scale, zero point and bias too. False, untouched, where they aren't plain constants; with
    `check_only`, only whether it could."""
    w_dq = g.producer.get(conv.input[1])
    if w_dq is None or w_dq.op_type != "DequantizeLinear" or _single_reader(g, w_dq.output[0]) is not conv:
        return False
    w, scale = g.const(w_dq.input[0]), g.const(w_dq.input[1])
    zp = g.const(w_dq.input[2]) if len(w_dq.input) > 2 else None
    bias = g.const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    if w is None or w.dtype != np.int8 or scale is None or (len(conv.input) > 2 and conv.input[2] and bias is None):
        return False
    if axis == 0 and scale.size > 1 and _attr(w_dq, "axis", 1) != 0:
        return False
    if check_only:
        return True
    pad = [(0, 0)] * w.ndim
    pad[axis] = (0, size - w.shape[axis])
    w_dq.input[0] = g.add_init(w_dq.input[0] + "_wide", np.pad(w, pad))
    if axis == 0:
        if scale.size > 1:  # any positive scale: its weights are all zero
            w_dq.input[1] = g.add_init(w_dq.input[1] + "_wide", np.pad(scale, (0, size - scale.size), constant_values=1))
        if zp is not None and zp.size > 1:
            w_dq.input[2] = g.add_init("zero_point", np.zeros(size, zp.dtype))
        if bias is not None:
            conv.input[2] = g.add_init(conv.input[2] + "_wide", np.pad(bias, (0, size - bias.size)))
    return True


def _through_elementwise(g: _Graph, name: str, forward: bool):
    """From tensor `name`, past single-reader Relu/Clip ops: the next node forward (its one reader) or the
    producer backward, or None."""
    while True:
        node = _single_reader(g, name) if forward else g.producer.get(name)
        if node is None or node.op_type not in ("Relu", "Clip"):
            return node
        if not forward and _single_reader(g, node.output[0]) is None:
            return None
        name = node.output[0] if forward else node.input[0]


def widen_depthwise_convs(model_proto, multiple: int = 16) -> dict[str, int]:
    """Give integer depthwise Convs whose channel count isn't a multiple of `multiple` zero channels: exact.

    onnxruntime's x86 integer depthwise conv takes a slow path where the
    channel count isn't a multiple of 16: two 3x3 depthwise convs on 24x24 at
    batch 8 took 145 us with 44 channels and 43 us with 48, 194 us with 88 and
    75 us with 96 (NASNet's are 11, 22, 44 and 88). Where the depthwise conv
    reads a conv's output and a conv reads its output, each through its own
    Q/DQ pair (and ReLUs), all three grow: the conv before gets zero-weight
    output channels (dequantizing to 0), the depthwise conv zero weights for
    them, and the conv after zero weights reading them.

    Returns:
        `{depthwise conv node name: its new channel count}`.

    Example:

    >>> widen_depthwise_convs(onnx.load("model.onnx"))  # doctest: +SKIP
    {'nasnet_mobile_1/separable_conv_2_normal_left1_0_1/separable_conv2d/depthwise': 48}
    """
    g = _Graph(model_proto.graph)
    widened: dict[str, int] = {}
    for dw in [n for n in g.graph.node if n.op_type == "Conv"]:
        w_dq = g.producer.get(dw.input[1])
        w = None if w_dq is None or w_dq.op_type != "DequantizeLinear" else g.const(w_dq.input[0])
        groups = _attr(dw, "group", 1)
        if w is None or w.ndim < 3 or groups == 1 or w.shape[0] != groups or w.shape[1] != 1 or groups % multiple == 0:
            continue
        # Before: conv -> (ReLU) -> Q -> DQ -> dw; after: dw -> (ReLU) -> Q -> DQ -> conv; one reader each, and
        # per-tensor Q/DQs (a per-channel one's scale would have the old channel count).
        x_dq = _per_tensor_dq(g, dw.input[0])
        q_in = None if x_dq is None else g.producer.get(x_dq.input[0])
        if q_in is None or q_in.op_type != "QuantizeLinear" or _single_reader(g, x_dq.output[0]) is not dw:
            continue
        if _single_reader(g, q_in.output[0]) is not x_dq or _per_tensor_params(g, q_in) is None:
            continue
        before = _through_elementwise(g, q_in.input[0], forward=False)
        q_out = _through_elementwise(g, dw.output[0], forward=True)
        if q_out is None or q_out.op_type != "QuantizeLinear" or _per_tensor_params(g, q_out) is None:
            continue
        dq_out = _single_reader(g, q_out.output[0])
        if dq_out is None or dq_out.op_type != "DequantizeLinear" or _per_tensor_params(g, dq_out) is None:
            continue
        after = _single_reader(g, dq_out.output[0])
        if before is None or after is None or any(n.op_type != "Conv" or _attr(n, "group", 1) != 1 for n in (before, after)):
            continue
        if after.input[0] != dq_out.output[0] or _single_reader(g, before.output[0]) is None:
            continue
        size = -(-groups // multiple) * multiple
        parts = ((before, 0), (dw, 0), (after, 1))
        if not all(_padded_weight_dq(g, conv, axis, size, check_only=True) for conv, axis in parts):
            continue
        for conv, axis in parts:
            _padded_weight_dq(g, conv, axis, size)
        for attr in dw.attribute:
            if attr.name == "group":
                attr.i = size
        widened[dw.name] = size
        g.reindex()
    if widened:
        _clean(g)
    return widened


def implied_weight_zero_points(model_proto) -> int:
    """Drop the zero points of int8 conv weights' DequantizeLinear where they are all 0, ONNX's default.

    Symmetric weights carry one zero per output channel; on ResNet-8 those
    arrays and their names are 0.4 KB of a 95 KB file.

    Returns:
        How many DequantizeLinear nodes lost their zero point.

    Example:

    >>> implied_weight_zero_points(onnx.load("model.onnx"))  # doctest: +SKIP
    9
    """
    g = _Graph(model_proto.graph)
    dropped = 0
    for dq in (n for n in g.graph.node if n.op_type == "DequantizeLinear" and len(n.input) > 2):
        w, zp = g.const(dq.input[0]), g.const(dq.input[2])
        # onnxruntime fuses a MatMul/Gemm only with its weight's zero point present.
        convs = all(n.op_type == "Conv" for n, _ in g.consumers.get(dq.output[0], []))
        if convs and w is not None and zp is not None and w.dtype == np.int8 and not zp.any():
            del dq.input[2]
            dropped += 1
    if dropped:
        g.reindex()
        _clean(g)
    return dropped


# ------------------------------------------------------------------ reading a file


def qdq_pairs(onnx_model_or_path) -> list[QDQPair]:
    """Every DequantizeLinear of the main graph: weight or activation, type, zero point, scale, axis.

    Args:
        onnx_model_or_path: an `onnx.ModelProto` or the path of an `.onnx` file.

    Example:

    >>> pairs = qdq_pairs("model_int8.onnx")  # doctest: +SKIP
    >>> sorted({(p.kind, p.dtype, p.consumers) for p in pairs})  # doctest: +SKIP
    [('activation', 'int8', (('Conv', 0),)), ('weight', 'int8', (('Conv', 1),))]
    """
    onnx = _require("onnx", "onnx")
    source = onnx_model_or_path
    proto = onnx.load(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else source
    g = _Graph(proto.graph)
    pairs = []
    for dq in (n for n in g.graph.node if n.op_type == "DequantizeLinear"):
        scale = g.const(dq.input[1])
        zp = g.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        weight = g.const(dq.input[0])
        feeder = g.producer.get(dq.input[0])
        producer = "initializer" if weight is not None else feeder.op_type if feeder is not None else "graph_input"
        # The input and the zero point share one type; with no zero point it is uint8.
        dtype = (weight if weight is not None else zp if zp is not None else np.zeros((), np.uint8)).dtype.name
        per_axis = scale is not None and scale.ndim == 1 and scale.size > 1
        axis = _attr(dq, "axis", 1) if per_axis else None
        if axis is not None and weight is not None:
            axis %= weight.ndim
        pairs.append(
            QDQPair(
                name=dq.name,
                kind="weight" if weight is not None else "activation",
                producer=producer,
                consumers=tuple((n.op_type, i) for n, i in g.consumers.get(dq.output[0], [])),
                dtype=dtype,
                zero_point=tuple(int(v) for v in (zp.reshape(-1) if zp is not None else [0])),
                scale=tuple(float(v) for v in (scale.reshape(-1) if scale is not None else [])),
                scale_shape=tuple(scale.shape) if scale is not None else (),
                axis=axis,
                weight_shape=tuple(weight.shape) if weight is not None else None,
            )
        )
    return pairs
