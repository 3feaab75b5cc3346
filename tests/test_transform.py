"""quantize_model on real architectures, nested/shared/multi-IO graphs, partial specs and errors."""

import keras
import numpy as np
import pytest
from conftest import small_cnn

import qat_plugin as qp
from qat_plugin.transform import _all_layers
from qat_plugin.wrappers import QuantizeWrapper, quantize_wrappers

L = keras.layers


def _leaf_layers(model):
    """name -> layer, looking inside nested models and through wrappers."""
    return {(l.layer if isinstance(l, QuantizeWrapper) else l).name: l for l in _all_layers(model)}


def assert_float_weights_equal(model, qmodel):
    q_layers = _leaf_layers(qmodel)
    for name, layer in _leaf_layers(model).items():
        q = q_layers[name]
        inner = q.layer if isinstance(q, QuantizeWrapper) else q
        assert inner is not layer, "quantize_model must not share layers with the original"
        for a, b in zip(layer.get_weights(), inner.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


def assert_round_trip_bit_exact(qmodel, x, tmp_path):
    path = tmp_path / f"{qmodel.name}.keras"
    qmodel.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    before = {i.key: i.amax for i in qp.list_quantizers(qmodel)}
    after = {i.key: i.amax for i in qp.list_quantizers(loaded)}
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    for a, b in zip(keras.tree.flatten(loaded.predict(x, verbose=0)), keras.tree.flatten(qmodel.predict(x, verbose=0)), strict=True):
        np.testing.assert_array_equal(a, b)
    return loaded


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(0, 1, size=(8, 32, 32, 3)).astype("float32")


def test_resnet50_inside_a_classifier(images, tmp_path):
    keras.utils.set_random_seed(0)
    backbone = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(32, 32, 3), pooling="avg")
    inp = keras.Input((32, 32, 3))
    model = keras.Model(inp, L.Dense(10, name="head")(backbone(inp)), name="resnet_classifier")
    qmodel = qp.quantize_model(model, calibration_data=images)

    convs = [l.name for l in _all_layers(model) if isinstance(l, (L.Conv2D, L.Dense))]
    assert len(convs) == 54
    wrapped = {w.inner_name: w for w in quantize_wrappers(qmodel)}
    assert set(convs) <= set(wrapped)
    for name in convs:
        assert set(wrapped[name].weight_quantizers) == {"_kernel"} and wrapped[name].input_quantizers[0] is not None
    # TensorRT residual recipe: each of the 16 adds keeps exactly one input (the conv branch) unquantized.
    adds = [w for w in wrapped.values() if isinstance(w.layer, L.Add)]
    assert len(adds) == 16
    assert all(sum(q is not None for q in w.input_quantizers) == 1 for w in adds)
    identity_add = wrapped["conv2_block2_add"]
    assert identity_add.input_quantizers[0] is not None  # the shortcut, from the previous block's ReLU
    assert isinstance(qmodel.get_layer("resnet50"), keras.Model)  # nested model cloned, not wrapped
    assert isinstance(qmodel.get_layer("head"), QuantizeWrapper)  # wrappers keep the layer's name

    assert_float_weights_equal(model, qmodel)
    assert all(i.calibrated for i in qp.list_quantizers(qmodel))
    assert_round_trip_bit_exact(qmodel, images, tmp_path)


def test_mobilenetv2_depthwise_per_channel(images, tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10, classifier_activation=None)
    qmodel = qp.quantize_model(model, calibration_data=images)
    depthwise = [w for w in quantize_wrappers(qmodel) if isinstance(w.layer, L.DepthwiseConv2D)]
    assert len(depthwise) == 17
    for w in depthwise:
        assert w.weight_quantizers["kernel"].axis == 2
        amax = w.quantizer_ranges()[1]["amax"]
        assert amax.shape == (w.layer.kernel.shape[2],)
    n_weighted = sum(isinstance(l, (L.Conv2D, L.DepthwiseConv2D, L.Dense)) for l in model.layers)
    assert sum(1 for w in quantize_wrappers(qmodel) if w.weight_quantizers) == n_weighted
    assert_float_weights_equal(model, qmodel)
    assert np.isfinite(qmodel.predict(images, verbose=0)).all()
    assert_round_trip_bit_exact(qmodel, images, tmp_path)


def test_functional_backbone_inside_sequential(tmp_path):
    backbone = small_cnn(classes=4)
    model = keras.Sequential([keras.Input((8, 8, 1)), backbone, L.Dense(3, name="outer_head")], name="seq")
    x = np.random.default_rng(1).uniform(size=(16, 8, 8, 1)).astype("float32")
    qmodel = qp.quantize_model(model, calibration_data=x)
    assert isinstance(qmodel, keras.Sequential)
    names = {w.inner_name for w in quantize_wrappers(qmodel)}
    assert names == {"conv1", "conv2", "add", "gap", "head", "outer_head"}
    assert_float_weights_equal(model, qmodel)
    assert_round_trip_bit_exact(qmodel, x, tmp_path)


def test_shared_layer_is_wrapped_once_and_stays_shared(tmp_path):
    a, b = keras.Input((6,), name="a"), keras.Input((6,), name="b")
    shared = L.Dense(5, name="shared")
    ha, hb = shared(a), shared(b)
    out1 = L.Dense(2, name="o1")(L.Add(name="add")([ha, hb]))
    out2 = L.Dense(3, name="o2")(L.Concatenate(name="cat")([ha, hb]))
    model = keras.Model([a, b], [out1, out2])
    x = [np.random.default_rng(s).normal(size=(8, 6)).astype("float32") for s in (0, 1)]
    qmodel = qp.quantize_model(model, calibration_data=x)
    wrappers = [l for l in qmodel.layers if isinstance(l, QuantizeWrapper) and l.inner_name == "shared"]
    assert len(wrappers) == 1 and len(wrappers[0]._inbound_nodes) == 2
    assert len(qmodel.outputs) == 2 and len(qmodel.inputs) == 2
    # Both adds' inputs come from the same quantized dense, so one of them stays high-precision.
    add = next(l for l in qmodel.layers if isinstance(l, QuantizeWrapper) and l.inner_name == "add")
    assert [q is not None for q in add.input_quantizers] == [True]
    cat = next(l for l in qmodel.layers if isinstance(l, QuantizeWrapper) and l.inner_name == "cat")
    assert [q is not None for q in cat.input_quantizers] == [True, True]
    assert_float_weights_equal(model, qmodel)
    assert_round_trip_bit_exact(qmodel, x, tmp_path)


def test_partial_selection_by_name_regex_class_and_exclusion():
    model = small_cnn()
    quantized = lambda spec: sorted(qp.quantize_model(model, spec).qat_report.quantized)  # noqa: E731
    assert quantized(qp.QuantizationSpec(layers=["head"])) == ["head"]
    assert quantized(qp.QuantizationSpec(layers=["conv\\d"])) == ["conv1", "conv2"]
    assert quantized(qp.QuantizationSpec(layer_types=[L.Conv2D])) == ["conv1", "conv2"]
    assert quantized(qp.QuantizationSpec(exclude=["conv1"], exclude_types=["Add"])) == ["conv2", "gap", "head"]
    assert quantized(qp.QuantizationSpec(filters=lambda l: l.name != "gap")) == ["add", "conv1", "conv2", "head"]
    report = qp.quantize_model(model, qp.QuantizationSpec(exclude=["conv1"])).qat_report
    assert report.skipped["conv1"] == "excluded by the spec" and report.skipped["relu1"] == "not a quantizable kind"
    assert report.skipped["bn1"] == "policy 'tensorrt' leaves a BatchNormalization that no conv folds in float"


def test_overrides_change_bits_per_channel_and_inputs():
    spec = qp.QuantizationSpec(
        overrides={
            "conv2": qp.LayerOverride(weight_bits=4, activation_bits=6),
            "head": qp.LayerOverride(per_channel=False),
            "add": qp.LayerOverride(inputs=(0, 1)),
        }
    )
    q = {(i.layer, i.label): i for i in qp.list_quantizers(qp.quantize_model(small_cnn(), spec))}
    assert q["conv2", "weight"].bits == 4 and q["conv2", "input"].bits == 6 and q["conv1", "weight"].bits == 8
    assert not q["head", "weight"].per_channel and q["head", "weight"].amax.shape == ()
    assert ("add", "input_0") in q and ("add", "input_1") in q


def test_default_residual_rule_leaves_the_conv_branch_of_an_add_unquantized():
    q = qp.quantize_model(small_cnn())
    add = next(w for w in quantize_wrappers(q) if w.inner_name == "add")
    # input 0 is relu1(bn1(conv1)) and input 1 is relu2(conv2): both conv branches; TensorRT fuses the last.
    assert [x is not None for x in add.input_quantizers] == [True]


@keras.saving.register_keras_serializable(package="qat_plugin_tests")
def flatten_and_maxpool_inputs(model, spec):
    return [(l.name, [0]) for l in model.layers if isinstance(l, (L.Flatten, L.MaxPooling2D))]


def test_pattern_hook_adds_inputs_to_quantize(tmp_path):
    inp = keras.Input((8, 8, 1))
    x = L.Conv2D(4, 3, name="conv")(inp)
    x = L.MaxPooling2D(name="pool")(x)
    model = keras.Model(inp, L.Dense(2, name="fc")(L.Flatten(name="flat")(x)))
    spec = qp.QuantizationSpec(patterns=[flatten_and_maxpool_inputs])
    data = np.random.default_rng(0).uniform(size=(4, 8, 8, 1)).astype("float32")
    q = qp.quantize_model(model, spec, calibration_data=data)
    keys = {i.key for i in qp.list_quantizers(q)}
    assert {"pool/input", "flat/input"} <= keys
    assert q.qat_report.layers[[d.name for d in q.qat_report.layers].index("pool")].reason == "selected by a pattern hook"
    assert_round_trip_bit_exact(q, data, tmp_path)


def test_original_model_is_untouched_by_quantizing_and_training_the_copy(digits):
    x, y = digits[0][:256], digits[1][:256]
    model = small_cnn()
    before = [w.copy() for w in model.get_weights()]
    q = qp.quantize_model(model, calibration_data=x)
    q.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, y, epochs=1, verbose=0)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.fc = L.Dense(2)

    def call(self, x):
        return self.fc(x)


def test_errors_name_the_cause_and_the_fix():
    model = small_cnn()
    with pytest.raises(qp.UnsupportedModelError, match="subclassed model.*Functional or Sequential"):
        sub = Subclassed()
        sub(np.ones((1, 3)))
        qp.quantize_model(sub)
    with pytest.raises(qp.UnsupportedModelError, match="not built"):
        qp.quantize_model(keras.Sequential([L.Dense(2)]))
    with pytest.raises(qp.SpecError, match=r"'conv3' matches no layer.*Close matches: \['conv2', 'conv1'\]"):
        qp.quantize_model(model, qp.QuantizationSpec(layers=["conv3"]))
    with pytest.raises(qp.SpecError, match=r"`exclude` entry 'haed' matches no layer.*'head'"):
        qp.quantize_model(model, qp.QuantizationSpec(exclude=["haed"]))
    with pytest.raises(qp.SpecError, match=r"'Conv2d' is not a Keras layer class. Did you mean \['Conv2D'"):
        qp.quantize_model(model, qp.QuantizationSpec(layer_types=["Conv2d"]))
    with pytest.raises(qp.SpecError, match="selects no quantizable layer"):
        qp.quantize_model(model, qp.QuantizationSpec(layer_types=["LayerNormalization"]))
    with pytest.raises(qp.SpecError, match="'relu1' \\(ReLU\\).*not a kind.*pattern hook"):
        qp.quantize_model(model, qp.QuantizationSpec(layers=["relu1"]))
    with pytest.raises(qp.SpecError, match="'bn1' \\(BatchNormalization\\) is selected.*policy 'tensorrt'"):
        qp.quantize_model(model, qp.QuantizationSpec(layers=["bn1"]))
    with pytest.raises(qp.SpecError, match="has 2 input"):
        qp.quantize_model(model, qp.QuantizationSpec(overrides={"add": qp.LayerOverride(inputs=(2,))}))
    q = qp.quantize_model(model)
    with pytest.raises(qp.AlreadyQuantizedError, match="already quantized"):
        qp.quantize_model(q)
    with pytest.raises(qp.SpecError, match="`spec` must be a QuantizationSpec"):
        qp.quantize_model(model, {"layers": ["head"]})


def test_describe_lists_every_quantizer():
    q = qp.quantize_model(small_cnn())
    text = qp.describe(q)
    lines = text.splitlines()
    assert [c.strip() for c in lines[0].split(" | ")] == ["layer", "kind", "tensor", "bits", "per-channel", "amax"]
    assert any(l.startswith("conv1") and "weight" in l and "yes" in l and "x16" in l for l in lines)
    assert "uncalibrated (call qat_plugin.calibrate)" in lines[-1]
    assert lines[-1].startswith(f"{len(qp.list_quantizers(q))} quantizers in 5 layers")


def test_bare_ops_in_a_functional_graph_are_cloned():
    # MobileNetV3's hard sigmoid, `ReLU6(x + 3) / 6`, puts bare ops (no weights) into the Functional graph.
    inp = keras.Input((8,))
    x = keras.layers.Dense(4, name="d")(inp)
    x = keras.layers.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)
    model = keras.Model(inp, keras.layers.Dense(2, name="head")(x))
    data = np.random.default_rng(0).random((16, 8)).astype("float32")
    for policy in ("tensorrt", "onnxruntime"):
        qmodel = qp.quantize_model(model, policy=policy, calibration_data=data)
        np.testing.assert_array_equal(qmodel.get_layer("d").layer.kernel.numpy(), model.get_layer("d").kernel.numpy())
        np.testing.assert_allclose(qmodel.predict(data, verbose=0), model.predict(data, verbose=0), atol=0.05)
