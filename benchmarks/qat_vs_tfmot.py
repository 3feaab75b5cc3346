"""QATCallback vs TFMOT, side by side: accuracy, QAT step-time overhead and switch cost.

    pip install --no-deps -r benchmarks/requirements.txt    # TFMOT + tf_keras, for the peer only
    python benchmarks/qat_vs_tfmot.py [--model resnet8|small_cnn] [--repeats 3]

Same network, data (the real MNIST digits in ../shared/datasets), batch size
and epoch budget on both sides: FP32 for --fp32-epochs, then QAT for
--qat-epochs at --qat-lr.

* ours: one `model.fit(epochs=fp32+qat)` with `QATCallback(start_epoch=fp32,
  lr_multiplier=qat_lr/lr)`: the switch happens inside fit, Adam's state carries on.
* TFMOT: fit, `tfmot.quantization.keras.quantize_model`, recompile, fit again
  (run in a subprocess under Keras 2, see `_tfmot_peer.py`).

Step times are medians over steady-state steps; the two sides alternate for
--repeats rounds and the table shows the median of the rounds, so background
load on this 2-core machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import keras  # noqa: E402
from _data import load_mnist10k  # noqa: E402

import qat_plugin as qp  # noqa: E402
from qat_plugin.models import compile_classifier, resnet8, small_residual_cnn  # noqa: E402

WARMUP_STEPS = 10
MODELS = {"small_cnn": lambda: small_residual_cnn(), "resnet8": lambda: resnet8()}


class PhaseTimer(keras.callbacks.Callback):
    """Step and epoch wall times, split into the FP32 and QAT phases by the switch epoch."""

    def __init__(self, switch_epoch: int):
        super().__init__()
        self.switch_epoch = switch_epoch
        self.steps: dict[str, list[float]] = {"fp32": [], "qat": []}
        self.epochs: dict[str, list[float]] = {"fp32": [], "qat": []}

    def _phase(self) -> str:
        return "qat" if self._epoch >= self.switch_epoch else "fp32"

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._t_epoch = epoch, time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epochs[self._phase()].append(time.perf_counter() - self._t_epoch)

    def on_train_batch_begin(self, batch, logs=None):
        self._t_step = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.steps[self._phase()].append(time.perf_counter() - self._t_step)


class SwitchClock(keras.callbacks.Callback):
    """Placed after QATCallback: the time its on_epoch_begin took at the switch epoch."""

    def __init__(self, timer: PhaseTimer):
        super().__init__()
        self.timer = timer
        self.seconds = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.timer.switch_epoch:
            self.seconds = time.perf_counter() - self.timer._t_epoch


def run_ours(args) -> dict:
    keras.utils.set_random_seed(args.seed)
    x_train, y_train, x_test, y_test = load_mnist10k()
    model = compile_classifier(MODELS[args.model](), args.lr)
    timer = PhaseTimer(args.fp32_epochs)
    qat = qp.QATCallback(start_epoch=args.fp32_epochs, lr_multiplier=args.qat_lr / args.lr, verbose=0)

    class FP32Accuracy(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == args.fp32_epochs:  # runs before the switch: the FP32 model's accuracy
                self.value = self.model.evaluate(x_test, y_test, batch_size=args.batch_size, verbose=0)[1]

    fp32 = FP32Accuracy()
    # Order matters: FP32 accuracy, then start the epoch clock, switch, stop the switch clock.
    callbacks = [fp32, timer, qat, SwitchClock(timer)]
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.fp32_epochs + args.qat_epochs, callbacks=callbacks, verbose=0)
    qat_acc = model.evaluate(x_test, y_test, batch_size=args.batch_size, verbose=0)[1]
    steady = lambda s: 1000 * statistics.median(s[WARMUP_STEPS:] or s[-1:])  # noqa: E731
    return {
        "fp32_accuracy": fp32.value,
        "qat_accuracy": qat_acc,
        "fp32_step_ms": steady(timer.steps["fp32"]),
        "qat_step_ms": steady(timer.steps["qat"]),
        "switch_seconds": callbacks[-1].seconds,
        "qat_first_step_seconds": timer.steps["qat"][0],
        "epoch_seconds_fp32": statistics.mean(timer.epochs["fp32"][1:] or timer.epochs["fp32"]),
        "calibration_seconds": qat.calibration_seconds,
    }


def run_tfmot(args) -> dict:
    cmd = [
        sys.executable, str(HERE / "_tfmot_peer.py"), "--model", args.model,
        "--fp32-epochs", str(args.fp32_epochs), "--qat-epochs", str(args.qat_epochs),
        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--qat-lr", str(args.qat_lr), "--seed", str(args.seed),
    ]
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not lines:
        sys.exit(f"TFMOT peer failed (install it with `pip install --no-deps -r benchmarks/requirements.txt`):\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet8")
    parser.add_argument("--fp32-epochs", type=int, default=3)
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--qat-lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rounds = []
    for r in range(args.repeats):
        ours, peer = run_ours(args), run_tfmot(args)
        print(f"round {r + 1}: ours QAT/FP32 {ours['qat_step_ms'] / ours['fp32_step_ms']:.2f}x, "
              f"TFMOT {peer['qat_step_ms'] / peer['fp32_step_ms']:.2f}x", flush=True)
        rounds.append((ours, peer))
    med = lambda side, key: statistics.median(r[side][key] for r in rounds)  # noqa: E731
    ratio = lambda side: statistics.median(r[side]["qat_step_ms"] / r[side]["fp32_step_ms"] for r in rounds)  # noqa: E731
    o, t = 0, 1
    print()
    print(f"{args.model} on 8,000 MNIST digits: {args.fp32_epochs} FP32 + {args.qat_epochs} QAT epochs, batch {args.batch_size}, "
          f"median of {args.repeats} rounds")
    print(f"{'':34}{'qat-plugin':>12}{'TFMOT 0.8.1':>14}")
    print(f"{'FP32 test accuracy':34}{med(o, 'fp32_accuracy'):>12.4f}{med(t, 'fp32_accuracy'):>14.4f}")
    print(f"{'QAT test accuracy':34}{med(o, 'qat_accuracy'):>12.4f}{med(t, 'qat_accuracy'):>14.4f}")
    print(f"{'FP32 step (ms)':34}{med(o, 'fp32_step_ms'):>12.2f}{med(t, 'fp32_step_ms'):>14.2f}")
    print(f"{'QAT step (ms)':34}{med(o, 'qat_step_ms'):>12.2f}{med(t, 'qat_step_ms'):>14.2f}")
    print(f"{'QAT step / FP32 step':34}{ratio(o):>11.2f}x{ratio(t):>13.2f}x")
    sw_o = med(o, "switch_seconds") + med(o, "qat_first_step_seconds")
    sw_t = med(t, "switch_seconds") + med(t, "qat_first_step_seconds")
    print(f"{'switch + first QAT step (s)':34}{sw_o:>12.2f}{sw_t:>14.2f}")
    print(f"{'  as a share of an FP32 epoch':34}{sw_o / med(o, 'epoch_seconds_fp32'):>11.1%} {sw_t / med(t, 'epoch_seconds_fp32'):>13.1%}")
    print(f"{'  of which calibration (s)':34}{med(o, 'calibration_seconds'):>12.2f}{'-':>14}")


if __name__ == "__main__":
    main()
