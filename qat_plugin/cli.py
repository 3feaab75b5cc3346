"""`qat-plugin` command line: argument parsing only; every command calls the public API.

    qat-plugin run recipes/digits_cnn.yaml          # train, switch to QAT, export, track
    qat-plugin tune recipes/tune_digits.yaml        # which layers should stay FP32?
    qat-plugin describe model.keras                 # every quantizer and its range
    qat-plugin export model.keras --out model.onnx  # Q/DQ ONNX, checked in onnxruntime
    qat-plugin export model.keras --out model.tflite  # int8 TFLite, checked in LiteRT
    qat-plugin compare --experiment qat-digits      # the experiment's MLflow runs as a table
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _load(path: str):
    import keras

    import qat_plugin  # noqa: F401 (registers the wrapper classes for loading)

    return keras.models.load_model(path, safe_mode=True)


def cmd_run(args) -> int:
    from qat_plugin.recipes import Recipe
    from qat_plugin.runner import run_recipe

    recipe = Recipe.from_yaml(args.recipe)
    summary = run_recipe(recipe, args.out, quick=args.quick, verbose=0 if args.quiet else 1)
    print("\n" + summary.table())
    return 0


def cmd_tune(args) -> int:
    from qat_plugin.recipes import Recipe
    from qat_plugin.runner import tune_recipe

    spec, path, rows = tune_recipe(Recipe.from_yaml(args.recipe), args.out, quick=args.quick)
    keys = ["trial_id", "score", "quantized_accuracy", "n_fp32_layers", "quantized_mac_share"]
    print("  ".join(keys))
    for row in rows:
        print("  ".join(f"{row.get(k):.4f}" if isinstance(row.get(k), float) else str(row.get(k)) for k in keys))
    print(f"best: keep {list(spec.exclude) or 'no layer'} in FP32; spec written to {path} "
          f"(QuantizationSpec.from_json({str(path)!r}))")
    return 0


def cmd_describe(args) -> int:
    from qat_plugin import describe, quantize_wrappers

    model = _load(args.model)
    if not quantize_wrappers(model):
        print(f"{args.model}: model {model.name!r} has no quantizers (it is FP32).")
        return 1
    print(describe(model))
    return 0


def cmd_export(args) -> int:
    import numpy as np

    from qat_plugin import export_onnx, export_tflite, quantize_model, quantize_wrappers

    model = _load(args.model)
    data = np.load(args.data) if args.data else None
    x = None if data is None else data[args.key].astype("float32")
    if x is not None and x.ndim == 3:
        x = x[..., None] / (255.0 if data[args.key].dtype == np.uint8 else 1.0)
    tflite = str(args.out).endswith(".tflite")
    if not quantize_wrappers(model):
        if x is None:
            print("error: the model is FP32; pass --data FILE.npz to calibrate it, or export a quantized model.", file=sys.stderr)
            return 2
        model = quantize_model(model, policy=args.policy, calibration_data=x)
    sample = None if x is None else x[: args.check]
    if tflite:
        report = export_tflite(model, args.out, representative_data=sample, validation_data=sample)
        print(f"wrote {report.path}: {report.file_bytes:,d} bytes, "
              f"{'fully int8' if report.fully_int8 else 'float ops left: ' + str(report.float_ops)}{_agreement(report)}")
        return 0
    report = export_onnx(model, args.out, opset=args.opset, validation_data=sample)
    fused = ""
    if report.ort_kernels is not None:
        fused = f", onnxruntime runs {report.num_integer_kernels} integer kernels"
        fused += f" ({'none' if not report.float_compute else ', '.join(report.float_compute)} left in float)"
    print(f"wrote {report.path} for {report.runtime}: {report.file_bytes:,d} bytes, {report.num_qdq_weights} int8 weights, "
          f"{report.num_qdq_inputs} quantized activations{fused}{_agreement(report)}")
    return 0


def _agreement(report) -> str:
    """Which inputs the export checked itself on, and how closely it matched Keras."""
    if report.agreement is None:
        return ""
    return (f", argmax agreement with Keras {report.agreement:.4f} (max |diff| {report.max_abs_diff:.3g}) "
            f"on {report.num_samples} {report.checked_on} inputs")


def cmd_compare(args) -> int:
    import mlflow

    client = mlflow.MlflowClient(args.tracking_uri)
    exp = client.get_experiment_by_name(args.experiment) if args.experiment else client.get_experiment("0")
    if exp is None:
        print(f"error: no MLflow experiment {args.experiment!r} at {client.tracking_uri}", file=sys.stderr)
        return 2
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=args.limit)
    cols = ["run", "status", "policy", "switch", "q.layers", "fp32_acc", "qat_acc", "onnx_acc"]
    rows = [cols]
    for r in runs:
        m, p = r.data.metrics, r.data.params
        fmt = lambda k: f"{m[k]:.4f}" if k in m else "-"  # noqa: E731
        rows.append([r.info.run_name or r.info.run_id[:8], r.info.status, p.get("qat.policy", "-"), p.get("qat.switch_epoch", "-"),
                     p.get("qat.quantized_layers", "-"), fmt("fp32_accuracy"), fmt("quantized_accuracy"), fmt("onnx_accuracy")])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(cols))]
    for row in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    print(f"{len(runs)} run(s) of experiment {exp.name!r} at {client.tracking_uri}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qat-plugin", description="Quantization-aware training for Keras 3.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a YAML recipe: FP32 training, QAT switch, export, MLflow")
    p.add_argument("recipe")
    p.add_argument("--out", default="qat_runs", help="folder for the exported files (default: qat_runs)")
    p.add_argument("--quick", action="store_true", help="one FP32 and one QAT epoch on at most 512 samples")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("tune", help="search which layers stay FP32 (the recipe's `tuning` block)")
    p.add_argument("recipe")
    p.add_argument("--out", default="qat_runs")
    p.add_argument("--quick", action="store_true", help="two short trials on at most 512 samples")
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("describe", help="print every quantizer of a quantized .keras model")
    p.add_argument("model")
    p.set_defaults(func=cmd_describe)
    p = sub.add_parser("export", help="export a .keras model to Q/DQ ONNX (or .tflite) and check it")
    p.add_argument("model")
    p.add_argument("--out", required=True)
    p.add_argument("--policy", default="tensorrt", choices=["tensorrt", "onnxruntime", "tflite"],
                   help="placement for an FP32 model; the format follows --out (.onnx or .tflite)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--data", help=".npz with inputs, to calibrate an FP32 model and to check the export")
    p.add_argument("--key", default="x_test", help="array in --data to use (default: x_test)")
    p.add_argument("--check", type=int, default=512, help="samples to compare in onnxruntime (default: 512)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("compare", help="an MLflow experiment's QAT runs as a table")
    p.add_argument("--experiment", help="experiment name (default: MLflow's default experiment)")
    p.add_argument("--tracking-uri", default=None, help="default: MLflow's own (sqlite:///mlflow.db)")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `qat-plugin` command.

    >>> main(["describe", "--help"])  # doctest: +SKIP
    """
    args = build_parser().parse_args(argv)
    from qat_plugin.errors import QuantizationError

    try:
        return args.func(args)
    except (QuantizationError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
