"""Every example runs offline, in its quick mode, and prints what it promises."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name, tmp_path):
    out = subprocess.run([sys.executable, str(EXAMPLES / name), "--quick"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_fit_with_callback(tmp_path):
    out = _run("fit_with_callback.py", tmp_path)
    assert "switched to quantized training" in out and "after QAT" in out
    assert (tmp_path / "digits_int8.onnx").exists() and "onnxruntime agrees with Keras on 100.00%" in out


def test_compare_in_mlflow(tmp_path):
    out = _run("compare_in_mlflow.py", tmp_path)
    assert "full-int8" in out and "head-fp32" in out and "2 run(s) of experiment 'qat-examples'" in out
    assert (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_every_example_has_a_quick_mode(path):
    assert "--quick" in path.read_text()


def test_tune_partial_quantization(tmp_path):
    out = _run("tune_partial_quantization.py", tmp_path)
    assert "best spec:" in out and "quantized val accuracy" in out and "kept in FP32:" in out
    assert (tmp_path / "mlflow.db").exists()
