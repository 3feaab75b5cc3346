import json

import keras
import pytest

from qat_plugin import LayerOverride, PlacementPolicy, QuantizationSpec, SpecError, get_policy


def test_default_spec_is_full_int8_per_channel():
    spec = QuantizationSpec()
    assert (spec.weight_bits, spec.activation_bits, spec.per_channel, spec.calibrator) == (8, 8, True, "max")
    assert not spec.partial


def test_spec_json_round_trip_keeps_every_field(tmp_path):
    spec = QuantizationSpec(
        layers=["conv.*", "head"],
        layer_types=[keras.layers.Dense],
        exclude=["conv1"],
        exclude_types=["Add"],
        weight_bits=6,
        calibrator="percentile",
        percentile=99.9,
        overrides={"head": LayerOverride(weight_bits=4, per_channel=False), "add": {"inputs": [0, 1]}},
    )
    assert spec.layer_types == ("Dense",) and spec.overrides["add"].inputs == (0, 1)
    text = spec.to_json()
    assert json.loads(text)["overrides"]["head"] == {"weight_bits": 4, "per_channel": False}
    assert QuantizationSpec.from_json(text) == spec
    path = tmp_path / "spec.json"
    path.write_text(text)
    assert QuantizationSpec.from_json(str(path)) == spec
    assert spec.partial


def test_override_lookup_prefers_exact_name_then_regex():
    spec = QuantizationSpec(overrides={"conv.*": LayerOverride(weight_bits=4), "conv2": LayerOverride(weight_bits=6)})
    assert spec.override_for("conv2").weight_bits == 6
    assert spec.override_for("conv1").weight_bits == 4
    assert spec.override_for("head") == LayerOverride()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight_bits=9), "weight_bits"),
        (dict(activation_bits=2), "activation_bits"),
        (dict(calibrator="entropy"), "calibrator.*'max', 'percentile', 'mse'"),
        (dict(percentile=10), "percentile"),
        (dict(per_channel="yes"), "per_channel"),
        (dict(layers=["conv["]), "not a valid regular expression"),
        (dict(layers=[keras.layers.Dense]), "select by class with `layer_types`"),
        (dict(calibration_batches=0), "calibration_batches"),
        (dict(overrides={"x": 3}), "LayerOverride"),
        (dict(overrides={"x": {"inputs": [-1]}}), "input positions"),
        (dict(patterns=[3]), "callables"),
    ],
)
def test_invalid_specs_fail_at_construction_naming_the_field(kwargs, match):
    with pytest.raises(SpecError, match=match):
        QuantizationSpec(**kwargs)


def test_unknown_json_key_lists_allowed_keys():
    with pytest.raises(SpecError, match=r"Unknown QuantizationSpec keys \['bitz'\].*weight_bits"):
        QuantizationSpec.from_config({"bitz": 8})


def test_callable_filters_and_unregistered_hooks_refuse_to_serialize():
    with pytest.raises(SpecError, match="filters"):
        QuantizationSpec(filters=lambda layer: True).to_json()
    with pytest.raises(SpecError, match="register_keras_serializable"):
        QuantizationSpec(patterns=[lambda model, spec: []]).to_json()


@keras.saving.register_keras_serializable(package="qat_plugin_tests")
def quantize_flatten_inputs(model, spec):
    return [l.name for l in model.layers if isinstance(l, keras.layers.Flatten)]


def test_registered_pattern_hooks_round_trip():
    spec = QuantizationSpec(patterns=[quantize_flatten_inputs])
    restored = QuantizationSpec.from_json(spec.to_json())
    assert restored.patterns == (quantize_flatten_inputs,)


def test_policies():
    assert get_policy("tensorrt").quantize_inputs and not get_policy("tensorrt").quantize_outputs
    custom = PlacementPolicy("mine", quantize_outputs=True)
    assert get_policy(custom) is custom
    with pytest.raises(SpecError, match=r"Unknown placement policy 'tensorRT'. Available: \['onnxruntime', 'tensorrt', 'tflite'\]"):
        get_policy("tensorRT")
    cpu = get_policy("onnxruntime")
    assert cpu.quantize_outputs and cpu.fold_batchnorm and cpu.fuse_activations and cpu.reuse_output_ranges
    assert get_policy("tflite").runtime == "tflite"
    with pytest.raises(SpecError, match="needs `quantize_outputs=True`"):
        PlacementPolicy("bad", fuse_activations=True)
    with pytest.raises(SpecError, match="`runtime` must be one of"):
        PlacementPolicy("bad", runtime="coreml")
    with pytest.raises(SpecError, match="quantizes nothing"):
        PlacementPolicy("none", quantize_inputs=False, quantize_weights=False)
