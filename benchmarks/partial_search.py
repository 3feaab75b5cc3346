"""Which few layers should stay FP32? Sensitivity ranking + keras-tuner search on real MNIST.

    python benchmarks/partial_search.py [--outlier 100] [--pretrain-epochs 4] [--qat-epochs 1] [--train 8000]

The model is a trained `small_residual_cnn` with an outlier channel, as real
networks have them: channel 0 of `conv3` is scaled up by `--outlier` and the
head's weights that read it scaled down by as much. ReLU is positively
homogeneous, so the FP32 model computes exactly the same function; but the
head's per-tensor input range is now set by that one channel, and int8
crushes the other 31 (full int8 costs ~2 points after calibration).

The script ranks the layers with `sensitivity_analysis` (calibration only),
then lets keras-tuner's GridSearch try keeping the top-k of that ranking FP32
(k = 0 is full int8), each trial a QAT fine-tune of the trained model logged
as a nested MLflow run, and prints FP32, full int8 and the search's pick side
by side.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras
import keras_tuner as kt
import mlflow
from _data import load_mnist10k

import qat_plugin as qp
from qat_plugin.integrations.tuner import (
    OBJECTIVE,
    PartialQuantizationHyperModel,
    PartialQuantizationObjective,
    get_best_spec,
    log_search_summary,
    trial_table,
)
from qat_plugin.models import compile_classifier, small_residual_cnn
from qat_plugin.sensitivity import accuracy, sensitivity_analysis


def add_outlier_channel(model: keras.Model, scale: float) -> keras.Model:
    """Scale `conv3`'s channel 0 by `scale` and the head's weights reading it by 1/scale (same FP32 function)."""
    k, b = model.get_layer("conv3").get_weights()
    k[..., 0] *= scale
    b[0] *= scale
    model.get_layer("conv3").set_weights([k, b])
    hk, hb = model.get_layer("head").get_weights()
    hk[0::k.shape[-1]] /= scale  # Flatten is (h, w, c): every 32nd row reads channel 0
    model.get_layer("head").set_weights([hk, hb])
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outlier", type=float, default=100.0, help="scale of conv3's outlier channel (1: none)")
    parser.add_argument("--bits", type=int, default=8, help="weight and activation bits")
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--lr-multiplier", type=float, default=0.1, help="QAT fine-tune learning rate / 1e-3")
    parser.add_argument("--train", type=int, default=8000, help="training samples")
    parser.add_argument("--max-drop", type=float, default=0.003)
    parser.add_argument("--out", default=None, help="directory for the MLflow store and tuner files")
    args = parser.parse_args()

    x, y, xv, yv = load_mnist10k()
    x, y = x[: args.train], y[: args.train]
    out = Path(args.out or tempfile.mkdtemp(prefix="partial_search_"))
    uri = f"sqlite:///{out}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    spec = qp.QuantizationSpec(weight_bits=args.bits, activation_bits=args.bits)
    t0 = time.time()

    # 1. The trained FP32 model, its outlier channel, and the sensitivity ranking.
    trained = compile_classifier(small_residual_cnn(seed=0))
    trained.fit(x, y, batch_size=128, epochs=args.pretrain_epochs, verbose=0)
    weights = add_outlier_channel(trained, args.outlier).get_weights()
    fp32_acc = accuracy(yv, trained.predict(xv, verbose=0))

    def build(hp=None) -> keras.Model:
        """The user's function: the trained FP32 model, ready to fine-tune."""
        model = compile_classifier(small_residual_cnn(seed=0))
        model.set_weights(weights)
        return model

    report = sensitivity_analysis(trained, x[:1024], (xv, yv), spec=spec)
    ptq = qp.quantize_model(trained, spec, calibration_data=x[:1024])
    ptq_acc = accuracy(yv, ptq.predict(xv, verbose=0))
    print(f"Sensitivity at {args.bits} bits, calibration only ({time.time() - t0:.0f}s):\n{report}\n")

    # 2. The search: keep the top-k of the ranking FP32, k = 0 .. all, each a QAT fine-tune of the trained model.
    hm = PartialQuantizationHyperModel(
        build, fp32_epochs=0, qat_epochs=args.qat_epochs, layers=report, mode="top_k", spec=spec,
        lr_multipliers=(args.lr_multiplier,),
        objective=PartialQuantizationObjective(max_drop=args.max_drop, reference_accuracy=fp32_acc),
        tracking_uri=uri, artifact_dir=str(out / "artifacts"), mlflow_logger=False,
    )
    tuner = kt.GridSearch(hm, objective=OBJECTIVE, max_trials=len(report.ranking) + 1, directory=str(out / "kt"), project_name="partial")
    t1 = time.time()
    with mlflow.start_run(run_name=f"partial-search-{args.bits}bit"):
        tuner.search(x, y, validation_data=(xv, yv), batch_size=128, verbose=0)
        files = log_search_summary(tuner, artifact_dir=str(out / "summary"))
    search_s = time.time() - t1
    rows = trial_table(tuner)
    best = get_best_spec(tuner)
    full = next(r for r in rows if not r["fp32_layers"])
    pick = next(r for r in rows if r["fp32_layers"] == list(best.exclude))

    print(f"All trials ({len(rows)}, {search_s:.0f}s), best score first:")
    print(f"{'FP32 layers':<32} {'val acc':>8} {'drop':>8} {'FP32 MAC share':>15} {'score':>7}")
    for r in rows:
        print(f"{', '.join(r['fp32_layers']) or '(none)':<32} {r['quantized_accuracy']:>8.4f} {fp32_acc - r['quantized_accuracy']:>+8.4f} "
              f"{1 - r['quantized_mac_share']:>15.3f} {r['score']:>7.3f}")
    loss = fp32_acc - full["quantized_accuracy"]
    won = pick["quantized_accuracy"] - full["quantized_accuracy"]
    print(f"\nSummary ({args.bits}-bit, outlier x{args.outlier:g}, {args.train} MNIST digits, {args.pretrain_epochs} FP32 epochs, "
          f"then {args.qat_epochs} QAT epoch(s) at lr x{args.lr_multiplier:g}; {len(yv)} test digits):")
    print(f"{'model':<44} {'val acc':>8} {'FP32 layers':>12} {'quantized MACs':>15}")
    all_fp32 = next((r for r in rows if len(r["fp32_layers"]) == len(report.ranking)), None)
    print(f"{'FP32 (trained)':<44} {fp32_acc:>8.4f} {'all':>12} {0:>15.1%}")
    if all_fp32 is not None:  # no switch in this trial, so its fine-tune ran at the full learning rate
        print(f"{'FP32 + the same fine-tune epochs (k = all)':<44} {all_fp32['quantized_accuracy']:>8.4f} {'all':>12} {0:>15.1%}")
    print(f"{'full int8, calibration only':<44} {ptq_acc:>8.4f} {0:>12} {full['quantized_mac_share']:>15.1%}")
    print(f"{'full int8 + QAT':<44} {full['quantized_accuracy']:>8.4f} {0:>12} {full['quantized_mac_share']:>15.1%}")
    print(f"{'search pick: FP32 ' + (', '.join(best.exclude) or '(none)'):<44} {pick['quantized_accuracy']:>8.4f} "
          f"{len(best.exclude):>12} {pick['quantized_mac_share']:>15.1%}")
    if loss > 0:
        print(f"Full quantization loses {loss:.4f}; the pick wins back {won:.4f} ({won / loss:.0%} of the loss) "
              f"keeping {len(best.exclude)} of {len(report.ranking)} layers FP32.")
    print(f"Best spec: {best.to_json()}\nMLflow: {uri} (Pareto plot {files['pareto']}); total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
