"""The TFMOT side of the side-by-side QAT benchmark, run as a subprocess under Keras 2.

    pip install --no-deps -r benchmarks/requirements.txt   # once; see that file for why --no-deps
    TF_USE_LEGACY_KERAS=1 python benchmarks/_tfmot_peer.py --model resnet8 \\
        --fp32-epochs 2 --qat-epochs 1 [--batch-size 32] [--lr 1e-3] [--qat-lr 1e-4] \\
        [--seed 0] [--train-limit 8000]

TensorFlow Model Optimization (TFMOT) 0.8.1 only works with Keras 2
(`tf_keras`, selected by TF_USE_LEGACY_KERAS=1), while qat-plugin is Keras 3.
The two cannot share a process: once tensorflow is imported, `tf.keras` is
fixed to one or the other. So this script is run in its own interpreter and
never imported by the package; TFMOT is not, and must not become, a dependency
of qat-plugin.

It trains the same network as our side (`small_cnn` = qat_plugin.models.
small_residual_cnn, `resnet8` = qat_plugin.models.resnet8, built with
`keras_module=tf_keras`) on the real MNIST digits in shared/datasets: FP32 for --fp32-epochs,
then `tfmot.quantization.keras.quantize_model`, recompile, QAT for
--qat-epochs. All progress goes to stderr; stdout gets exactly one line,
`RESULT {json}`, with accuracies, median step times, the QAT/FP32 step-time
ratio and the cost of the switch (quantize_model + compile).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

# Keras 2 must be chosen before tensorflow is first imported: TF reads
# TF_USE_LEGACY_KERAS once, when `tf.keras` is resolved. If something already
# imported tensorflow (e.g. this file was imported rather than run), setting
# the variable now would silently give us Keras 3, so refuse instead.
if os.environ.get("TF_USE_LEGACY_KERAS", "1") != "1":
    sys.exit(
        f"_tfmot_peer.py: TF_USE_LEGACY_KERAS={os.environ['TF_USE_LEGACY_KERAS']!r}; "
        "TFMOT needs Keras 2, run with TF_USE_LEGACY_KERAS=1"
    )
if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    sys.exit("_tfmot_peer.py: tensorflow was imported before TF_USE_LEGACY_KERAS=1 was set; run this file as a script")
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


try:
    import tensorflow as tf  # noqa: E402
    import tf_keras  # noqa: E402
    import tensorflow_model_optimization as tfmot  # noqa: E402
except ImportError as exc:  # a clear message beats a traceback from deep inside TF
    sys.exit(f"_tfmot_peer.py: {exc}; install with `pip install --no-deps -r benchmarks/requirements.txt`")

# Belt and braces: if TF resolved tf.keras to Keras 3 anyway, TFMOT would
# quantize a model built with a different Keras than the one it wraps with.
# (Keras 3 behind tf.keras has a version() function; tf_keras's module has none.)
if not tf.keras.__name__.startswith("tf_keras"):
    sys.exit(f"_tfmot_peer.py: tf.keras is {tf.keras.__name__}, TFMOT needs Keras 2 (TF_USE_LEGACY_KERAS=1)")

# Same data loader and model builders as our side, built here with tf_keras.
from _data import load_mnist10k  # noqa: E402

from qat_plugin.models import resnet8, small_residual_cnn  # noqa: E402

# Steps at the start of each phase left out of the step-time median: the first
# runs trace and compile the train function, the next few warm caches and the
# oneDNN primitive cache, none of which is steady-state training cost.
WARMUP_STEPS = 10

MODELS = {
    "small_cnn": lambda: small_residual_cnn(keras_module=tf_keras),
    "resnet8": lambda: resnet8(keras_module=tf_keras),
}


class StepTimer(tf_keras.callbacks.Callback):
    """Wall time of every training step and every epoch of one fit() call.

    A plain (non-TF-logs) callback: tf_keras converts the step's logs to numpy
    before on_train_batch_end, so the step has finished when we stop the clock.
    """

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[float] = []
        self.epochs: list[float] = []
        self._t_step = 0.0
        self._t_epoch = 0.0

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._t_step = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.steps.append(time.perf_counter() - self._t_step)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._t_epoch = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.epochs.append(time.perf_counter() - self._t_epoch)

    def median_step_ms(self) -> float:
        # Keep at least one step even in a very short run rather than failing.
        steady = self.steps[WARMUP_STEPS:] or self.steps[-1:]
        return 1000.0 * statistics.median(steady)

    def steady_epoch_seconds(self) -> float:
        # The first epoch carries the graph tracing; leave it out when there is another.
        return statistics.mean(self.epochs[1:] or self.epochs)


def compile_classifier(model: tf_keras.Model, learning_rate: float) -> None:
    """Same recipe as qat_plugin.models.compile_classifier, in Keras 2."""
    model.compile(
        tf_keras.optimizers.Adam(learning_rate),
        tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train FP32, switch with TFMOT, train QAT; return the measurements."""
    # Seeds Python, NumPy and TF: same initial weights and shuffles run to run.
    tf_keras.utils.set_random_seed(args.seed)
    x_train, y_train, x_test, y_test = load_mnist10k()
    if args.train_limit:
        x_train, y_train = x_train[: args.train_limit], y_train[: args.train_limit]

    model = MODELS[args.model]()
    compile_classifier(model, args.lr)
    fp32_timer = StepTimer()
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.fp32_epochs, callbacks=[fp32_timer], verbose=2)
    fp32_acc = float(model.evaluate(x_test, y_test, batch_size=args.batch_size, verbose=0)[1])

    # The switch as a TFMOT user pays it: rebuild the model with fake-quant
    # wrappers and compile it. Graph tracing happens on the first QAT step and
    # is reported separately (qat_first_step_seconds).
    start = time.perf_counter()
    qmodel = tfmot.quantization.keras.quantize_model(model)
    compile_classifier(qmodel, args.qat_lr)
    switch_seconds = time.perf_counter() - start

    qat_timer = StepTimer()
    qmodel.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.qat_epochs, callbacks=[qat_timer], verbose=2)
    qat_acc = float(qmodel.evaluate(x_test, y_test, batch_size=args.batch_size, verbose=0)[1])

    fp32_ms, qat_ms = fp32_timer.median_step_ms(), qat_timer.median_step_ms()
    return {
        "peer": "tfmot",
        "model": args.model,
        "fp32_accuracy": round(fp32_acc, 4),
        "qat_accuracy": round(qat_acc, 4),
        "fp32_step_ms": round(fp32_ms, 3),
        "qat_step_ms": round(qat_ms, 3),
        "qat_over_fp32": round(qat_ms / fp32_ms, 3),
        "switch_seconds": round(switch_seconds, 3),
        "fp32_first_step_seconds": round(fp32_timer.steps[0], 3),
        "qat_first_step_seconds": round(qat_timer.steps[0], 3),
        "epoch_seconds_fp32": round(fp32_timer.steady_epoch_seconds(), 3),
        "epoch_seconds_qat": round(qat_timer.steady_epoch_seconds(), 3),
        "epochs": {"fp32": args.fp32_epochs, "qat": args.qat_epochs},
        "steps_per_epoch": -(-len(x_train) // args.batch_size),
        "warmup_steps_skipped": WARMUP_STEPS,
        "batch_size": args.batch_size,
        "train_examples": int(len(x_train)),
        "params": int(model.count_params()),
        "qat_params": int(qmodel.count_params()),
        "seed": args.seed,
        "versions": {
            "tensorflow": tf.__version__,
            "tf_keras": tf_keras.__version__,
            "tfmot": tfmot.__version__,
            "python": platform.python_version(),
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small_cnn")
    parser.add_argument("--fp32-epochs", type=int, default=3)
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--qat-lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=0, help="use only the first N training digits (0 = all 8,000)")
    args = parser.parse_args(argv)
    if args.fp32_epochs < 1 or args.qat_epochs < 1:
        parser.error("--fp32-epochs and --qat-epochs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Keras 2 progress bars and summaries print to stdout; the parent process
    # reads stdout for the RESULT line only, so send everything else to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        result = run(args)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
