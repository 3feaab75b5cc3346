"""check_tensorrt: real TensorRT-policy exports pass; each broken rule is reported on the right node."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import small_cnn
from onnx import helper, numpy_helper

import qat_plugin as qp
from qat_plugin.errors import ExportError
from qat_plugin.export.tensorrt import RULES, TensorRTCheck, check_tensorrt
from qat_plugin.models import depthwise_cnn


@pytest.fixture(scope="module")
def exports(digits, tmp_path_factory):
    """The small CNN and the MobileNetV2-style depthwise net, quantized for TensorRT and exported."""
    x_train = digits[0]
    folder = tmp_path_factory.mktemp("trt")
    paths = {}
    for name, model in [("cnn", small_cnn()), ("depthwise", depthwise_cnn((8, 8, 1), seed=0))]:
        qmodel = qp.quantize_model(model, policy="tensorrt", calibration_data=x_train[:256])
        paths[name] = qp.export_onnx(qmodel, folder / f"{name}.onnx").path
    return paths


@pytest.fixture
def cnn(exports) -> onnx.ModelProto:
    """A fresh copy of the small CNN's graph, for a test to break."""
    return onnx.load(exports["cnn"])


# ------------------------------------------------------------------ graph surgery helpers


def node(proto, name):
    return next(n for n in proto.graph.node if n.name == name)


def nodes(proto, op_type):
    return [n for n in proto.graph.node if n.op_type == op_type]


def weight_dq(proto, op_type, shape=None):
    """The DQ feeding the weight input of the first `op_type` node (with that weight shape)."""
    pairs = qp.qdq_pairs(proto)
    pair = next(p for p in pairs if p.consumer_types == (op_type,) and p.kind == "weight"
                and (shape is None or p.weight_shape == shape))
    return node(proto, pair.name)


def activation_pair(proto):
    """(Q, DQ) of the first activation pair feeding a Conv."""
    dq = next(n for n in nodes(proto, "DequantizeLinear")
              if any(c.op_type == "Conv" and c.input[0] == n.output[0] for c in proto.graph.node))
    q = next(n for n in proto.graph.node if n.output[0] == dq.input[0])
    return q, dq


def init(proto, name):
    return numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name))


def add_init(proto, name, value):
    proto.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def found(check: TensorRTCheck) -> set[tuple[str, str]]:
    return {(p.node, p.rule) for p in check.problems}


# ------------------------------------------------------------------ real exports pass


@pytest.mark.parametrize("name", ["cnn", "depthwise"])
def test_tensorrt_policy_exports_pass(exports, name):
    check = check_tensorrt(exports[name])
    assert check.ok, str(check)
    assert check.raise_if_failed() is check
    pairs = qp.qdq_pairs(exports[name])
    assert check.num_weights == sum(p.kind == "weight" for p in pairs) > 0
    assert check.num_activations == sum(p.kind == "activation" for p in pairs) > 0
    assert check.opset == 17 and check.source == exports[name]
    # A proto gives the same verdict as its file.
    assert check_tensorrt(onnx.load(exports[name])).problems == ()


def test_depthwise_weights_are_checked_against_their_conv(exports):
    proto = onnx.load(exports["depthwise"])
    dw = next(n for n in nodes(proto, "Conv") if next(a.i for a in n.attribute if a.name == "group") > 1)
    dq = next(n for n in proto.graph.node if n.output[0] == dw.input[1])
    assert dq.op_type == "DequantizeLinear"
    dq.attribute[0].i = 1  # the depthwise kernel is [C, 1, 3, 3]: axis 1 has one channel
    assert found(check_tensorrt(proto)) == {(dq.name, "weight_axis")}


# ------------------------------------------------------------------ each rule, broken once


def test_opset_12_is_reported_on_the_model(cnn):
    next(o for o in cnn.opset_import if o.domain in ("", "ai.onnx")).version = 12
    check = check_tensorrt(cnn)
    assert found(check) == {("<model>", "opset")} and check.opset == 12


def test_uint8_zero_point_is_reported_on_both_nodes_of_the_pair(cnn):
    q, dq = activation_pair(cnn)
    q.input[2] = dq.input[2] = add_init(cnn, "zp_u8", np.uint8(0))
    assert found(check_tensorrt(cnn)) == {(q.name, "int8"), (dq.name, "int8")}


def test_a_missing_zero_point_means_uint8(cnn):
    q, dq = activation_pair(cnn)
    del q.input[2]
    del dq.input[2]
    check = check_tensorrt(cnn)
    assert found(check) == {(q.name, "int8")}
    assert "uint8" in check.problems[0].message


def test_nonzero_zero_point_is_reported(cnn):
    dq = weight_dq(cnn, "Conv", (16, 16, 3, 3))
    dq.input[2] = add_init(cnn, "zp3", np.full(16, 3, np.int8))
    check = check_tensorrt(cnn)
    assert found(check) == {(dq.name, "zero_point")}
    assert "[3, 3, 3" in check.problems[0].message


@pytest.mark.parametrize("op,shape,axis,expected", [("Conv", (16, 16, 3, 3), 1, 0), ("MatMul", None, 0, 1)])
def test_wrong_weight_axis_is_reported(cnn, op, shape, axis, expected):
    dq = weight_dq(cnn, op, shape)
    next(a for a in dq.attribute if a.name == "axis").i = axis
    check = check_tensorrt(cnn)
    assert found(check) == {(dq.name, "weight_axis")}
    assert f"axis {expected}" in check.problems[0].message


def test_weight_scale_count_mismatch_is_reported(cnn):
    dq = weight_dq(cnn, "Conv", (16, 16, 3, 3))
    dq.input[1] = add_init(cnn, "half_scale", init(cnn, dq.input[1])[:8])
    dq.input[2] = add_init(cnn, "half_zp", np.zeros(8, np.int8))
    check = check_tensorrt(cnn)
    assert found(check) == {(dq.name, "weight_scale_count")}
    assert "8 scales for the 16 output channels" in check.problems[0].message


def test_per_channel_activation_is_reported(cnn):
    q, dq = activation_pair(cnn)
    q.input[1] = dq.input[1] = add_init(cnn, "two_scales", np.full(2, init(cnn, q.input[1]), np.float32))
    q.input[2] = dq.input[2] = add_init(cnn, "two_zps", np.zeros(2, np.int8))
    assert found(check_tensorrt(cnn)) == {(dq.name, "activation_per_tensor")}


def test_unpaired_q_and_dq_are_reported(cnn):
    # Q -> Abs -> DQ: arithmetic on the int8 tensor between the pair, which TensorRT can't fuse.
    q, dq = activation_pair(cnn)
    cnn.graph.node.append(helper.make_node("Abs", [q.output[0]], ["between"], name="between"))
    dq.input[0] = "between"
    assert found(check_tensorrt(cnn)) == {(q.name, "unpaired_q"), (dq.name, "unpaired_dq")}


def test_data_movement_between_q_and_dq_is_accepted(cnn):
    # Q -> Reshape/Identity -> DQ only moves int8 values (tf2onnx writes Q -> Concat -> DQ the same way).
    q, dq = activation_pair(cnn)
    cnn.graph.node.append(helper.make_node("Identity", [q.output[0]], ["between"], name="between"))
    dq.input[0] = "between"
    assert check_tensorrt(cnn).ok


def test_q_feeding_an_op_directly_is_unpaired(cnn):
    q, dq = activation_pair(cnn)
    conv = next(n for n in nodes(cnn, "Conv") if n.input[0] == dq.output[0])
    conv.input[0] = q.output[0]
    check = check_tensorrt(cnn)
    assert (q.name, "unpaired_q") in found(check)
    assert "['Conv']" in check.by_rule("unpaired_q")[0].message


def test_float_weight_behind_q_is_reported_and_its_placement_still_checked(cnn):
    dq = weight_dq(cnn, "Conv", (16, 16, 3, 3))
    scale = init(cnn, dq.input[1])
    w = init(cnn, dq.input[0]).astype(np.float32) * scale.reshape(-1, 1, 1, 1)
    cnn.graph.node.append(
        helper.make_node("QuantizeLinear", [add_init(cnn, "w_float", w), dq.input[1], dq.input[2]], ["w_q"],
                         name="w_quant", axis=0)
    )
    dq.input[0] = "w_q"
    check = check_tensorrt(cnn)
    assert found(check) == {("w_quant", "int8_weight")} and "stored as float32" in check.problems[0].message
    for n in (node(cnn, "w_quant"), dq):  # both on the wrong axis: the pair still agrees
        next(a for a in n.attribute if a.name == "axis").i = 1
    assert found(check_tensorrt(cnn)) == {("w_quant", "int8_weight"), (dq.name, "weight_axis")}
    node(cnn, "w_quant").attribute[0].i = 0  # and now it doesn't
    expected = {("w_quant", "int8_weight"), (dq.name, "weight_axis"), (dq.name, "pair_params")}
    assert found(check_tensorrt(cnn)) == expected


def test_bad_scales_are_reported(cnn):
    dq = weight_dq(cnn, "Conv", (16, 16, 3, 3))
    scale = init(cnn, dq.input[1]).copy()
    scale[[2, 5]] = [0.0, np.nan]
    dq.input[1] = add_init(cnn, "bad_scale", scale)
    check = check_tensorrt(cnn)
    assert found(check) == {(dq.name, "scale")}
    assert "[0, nan]" in check.problems[0].message


def test_q_and_dq_with_different_scales_are_reported(cnn):
    q, dq = activation_pair(cnn)
    dq.input[1] = add_init(cnn, "other_scale", init(cnn, q.input[1]) * 2)
    assert found(check_tensorrt(cnn)) == {(dq.name, "pair_params")}


def test_weight_dq_not_on_the_weight_input_is_reported(cnn):
    dq = weight_dq(cnn, "Conv", (16, 16, 3, 3))
    conv = next(n for n in nodes(cnn, "Conv") if n.input[1] == dq.output[0])
    cnn.graph.node.append(helper.make_node("Identity", [dq.output[0]], ["w_moved"], name="w_moved"))
    conv.input[1] = "w_moved"
    check = check_tensorrt(cnn)
    assert found(check) == {(dq.name, "weight_consumer")}
    assert "Identity:0" in check.problems[0].message


def test_minus_128_in_a_weight_is_reported(cnn):
    dq = weight_dq(cnn, "MatMul")
    w = init(cnn, dq.input[0]).copy()
    w[0, 0] = -128
    dq.input[0] = add_init(cnn, "w_min", w)
    assert found(check_tensorrt(cnn)) == {(dq.name, "weight_range")}


def test_a_computed_scale_is_reported(cnn):
    q, dq = activation_pair(cnn)
    cnn.graph.node.append(helper.make_node("Identity", [q.input[1]], ["scale_at_run_time"], name="scale_op"))
    q.input[1] = dq.input[1] = "scale_at_run_time"
    check = check_tensorrt(cnn)
    assert found(check) == {(q.name, "constant_params"), (dq.name, "constant_params"), (dq.name, "pair_params")}


# ------------------------------------------------------------------ hand-made graphs: Gemm and ConvTranspose


def _single_op_graph(op: str, w_shape, axis: int, **attrs) -> onnx.ModelProto:
    """x -> Q -> DQ -> op(x, DQ(int8 weight)), per-channel scales on `axis`."""
    n = w_shape[axis]
    inits = [
        numpy_helper.from_array(np.ones(w_shape, np.int8), "w"),
        numpy_helper.from_array(np.full(n, 0.1, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(n, np.int8), "w_zp"),
        numpy_helper.from_array(np.float32(0.05), "x_scale"),
        numpy_helper.from_array(np.int8(0), "x_zp"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="q"),
            helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="dq"),
            helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wd"], name="w_dq", axis=axis),
            helper.make_node(op, ["xd", "wd"], ["y"], name="op", **attrs),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "op,w_shape,good,bad,attrs",
    [
        ("Gemm", (8, 4), 1, 0, {}),  # B is [K, N]
        ("Gemm", (4, 8), 0, 1, {"transB": 1}),  # B is [N, K]
        ("ConvTranspose", (3, 6, 2, 2), 1, 0, {}),  # [C_in, C_out, k, k]
        ("Conv", (6, 3, 2, 2), 0, 1, {}),
        ("MatMul", (8, 4), 1, 0, {}),
    ],
)
def test_output_channel_axis_of_each_weighted_op(op, w_shape, good, bad, attrs):
    ok = check_tensorrt(_single_op_graph(op, w_shape, good, **attrs))
    assert ok.ok and (ok.num_weights, ok.num_activations) == (1, 1), str(ok)
    # Negative axes count from the back, as in ONNX.
    assert check_tensorrt(_single_op_graph(op, w_shape, good - len(w_shape), **attrs)).ok
    broken = check_tensorrt(_single_op_graph(op, w_shape, bad, **attrs))
    assert found(broken) == {("w_dq", "weight_axis")}
    assert f"axis {good}" in broken.problems[0].message


def test_an_axis_outside_the_weight_is_reported():
    check = check_tensorrt(_single_op_graph("Conv", (6, 3, 2, 2), 0))
    assert check.ok
    proto = _single_op_graph("Conv", (6, 3, 2, 2), 0)
    node(proto, "w_dq").attribute[0].i = 4
    assert found(check_tensorrt(proto)) == {("w_dq", "weight_axis")}


def test_a_graph_without_qdq_passes():
    proto = _single_op_graph("Conv", (6, 3, 2, 2), 0)
    del proto.graph.node[:3]
    proto.graph.node[0].input[:] = ["x", "w_float"]
    proto.graph.initializer.append(numpy_helper.from_array(np.ones((6, 3, 2, 2), np.float32), "w_float"))
    check = check_tensorrt(proto)
    assert check.ok and (check.num_weights, check.num_activations) == (0, 0)


# ------------------------------------------------------------------ the report and its errors


def test_raise_if_failed_lists_every_problem(cnn, tmp_path):
    q, dq = activation_pair(cnn)
    q.input[2] = dq.input[2] = add_init(cnn, "zp_u8", np.uint8(0))
    next(o for o in cnn.opset_import if o.domain in ("", "ai.onnx")).version = 12
    path = tmp_path / "broken.onnx"
    onnx.save(cnn, path)
    check = check_tensorrt(path)
    assert check.rules_broken == ("int8", "opset") and len(check.by_rule("int8")) == 2
    with pytest.raises(ExportError) as e:
        check.raise_if_failed()
    text = str(e.value)
    assert str(path) in text and "3 problems" in text and "rules int8, opset" in text
    assert f"  - {q.name} (QuantizeLinear) [int8]:" in text and f"  - {dq.name} (DequantizeLinear) [int8]:" in text
    assert text.count("Fix:") == 3


def test_raise_if_failed_shortens_a_long_list():
    problems = tuple(
        qp.export.tensorrt.TensorRTProblem(f"n{i}", "DequantizeLinear", "zero_point", "zero point [1].", "Use 0.")
        for i in range(25)
    )
    check = TensorRTCheck("m.onnx", 17, 25, 0, problems)
    with pytest.raises(ExportError, match=r"25 problems.*\n(  - .*\n){20}  \.\.\. and 5 more$"):
        check.raise_if_failed()


def test_bad_arguments_are_refused(cnn):
    with pytest.raises(TypeError, match="Received: bytes"):
        check_tensorrt(cnn.SerializeToString())
    with pytest.raises(ValueError, match="Unknown rule 'zeropoint'"):
        check_tensorrt(cnn).by_rule("zeropoint")
    with pytest.raises(FileNotFoundError):
        check_tensorrt("/nonexistent/model.onnx")


def test_every_rule_is_documented():
    import qat_plugin.export.tensorrt as trt

    for rule in RULES:
        assert rule in trt.__doc__, rule
