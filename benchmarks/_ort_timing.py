"""onnxruntime CPU timing for the benchmark scripts: sessions, interleaved medians, PTQ baseline, CPU flags."""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni")


def cpu_flags(names=CPU_FLAGS) -> dict[str, bool]:
    """Which of `names` /proc/cpuinfo lists (all False where there is no /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return dict.fromkeys(names, False)
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return {name: name in flags for name in names}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def session(path, threads: int = 2):
    """A CPU session as deployed (all graph optimizations), `threads` intra-op threads, one inter-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def optimized_nodes(path) -> list[tuple[str, str]]:
    """(op type, node name) of every node onnxruntime runs for `path` after its graph optimizations."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    return [(n.op_type, n.name) for n in graph.node]


def predict(sess, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The first output of `sess` on `x`, in batches."""
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call latency of one variant: the median over rounds of the mean over `calls` back-to-back calls."""

    samples_ms: tuple[float, ...]
    calls: int

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def spread(self) -> float:
        """Interquartile range over the median (0.05 = the middle half of the rounds lie within 5%)."""
        if len(self.samples_ms) < 4:
            return (max(self.samples_ms) - min(self.samples_ms)) / self.median_ms
        q = statistics.quantiles(self.samples_ms, n=4)
        return (q[2] - q[0]) / self.median_ms


def interleaved_latency(
    sessions: dict, x: np.ndarray, *, repeats: int, budget_s: float, min_repeats: int = 3, min_round_s: float = 0.02,
    park_s: float = 0.05,
) -> dict[str, Timing]:
    """Time every session on the same input, round-robin, so load drift on a shared machine hits all alike.

    Each session is warmed up with four calls (the last three estimate its
    latency); then each round runs every session once
    (the starting session rotates from round to round), each for enough
    back-to-back calls to take about `min_round_s`. The number of rounds is
    `repeats`, cut so the whole cell takes about `budget_s` but never below
    `min_repeats`.

    Before each block the benchmark sleeps `park_s` and makes one untimed
    call. onnxruntime's intra-op threads spin after every run, and each
    session has its own pool: without the pause, the pools of the sessions
    that ran just before spin on the same cores during the timed calls
    (measured on ResNet-8 at batch 32: FP32 9.1 ms interleaved vs 2.8 ms
    alone, IQR 40-60% of the median). After 50 ms they have parked and the
    interleaved medians match each file timed alone (IQR 3-5%).
    """
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    single = {}
    for k, s in sessions.items():
        s.run(None, feeds[k])
        times = []
        for _ in range(3):  # one slow early call would leave a file with fewer calls per block than the others
            start = time.perf_counter()
            s.run(None, feeds[k])
            times.append(time.perf_counter() - start)
        single[k] = statistics.median(times)
    calls = {k: max(1, math.ceil(min_round_s / max(t, 1e-6))) for k, t in single.items()}
    per_round = sum((calls[k] + 1) * single[k] + park_s for k in sessions)
    rounds = max(min_repeats, min(repeats, int(budget_s / max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    names = list(sessions)
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            s, feed, n = sessions[k], feeds[k], calls[k]
            time.sleep(park_s)
            s.run(None, feed)
            start = time.perf_counter()
            for _ in range(n):
                s.run(None, feed)
            samples[k].append((time.perf_counter() - start) / n * 1e3)
    return {k: Timing(tuple(v), calls[k]) for k, v in samples.items()}


def op_profile(path, x: np.ndarray, *, threads: int = 2, runs: int = 30, warmup: int = 10) -> dict[str, float]:
    """Milliseconds per run spent in each op type, largest first: onnxruntime's profiler, per-node medians over `runs`.

    The file is profiled alone, after `warmup` untimed runs (the first ones
    allocate and pack weights); the median per node keeps a stray slow run
    from dominating.
    """
    import collections
    import json
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3
        options.enable_profiling, options.profile_file_prefix = True, os.path.join(tmp, "profile")
        sess = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x}
        for _ in range(warmup + runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[(e["args"]["op_name"], e["name"])].append(e["dur"])
    times: collections.Counter = collections.Counter()
    for (op, _), durations in per_node.items():
        times[op] += statistics.median(durations[warmup:] or durations) * 1e-3
    return dict(times.most_common())


def ort_quantize_static(fp32_path, out_path, x_cal: np.ndarray, *, batch_size: int = 16) -> str:
    """onnxruntime's own post-training quantization of an FP32 ONNX file, as its docs recommend for x86.

    `quant_pre_process` first (shape inference, and Conv+BatchNorm folding:
    without it the BatchNorm's Mul/Add get their own Q/DQ), then
    `quantize_static`: QDQ format, per-channel int8 weights, uint8
    activations, MinMax calibration on `x_cal`. Returns a note on what ran.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, name: str):
            self.batches = iter([{name: x_cal[i : i + batch_size]} for i in range(0, len(x_cal), batch_size)])

        def get_next(self):
            return next(self.batches, None)

    fp32_path, out_path = os.fspath(fp32_path), os.fspath(out_path)
    pre = out_path.replace(".onnx", "_preprocessed.onnx")
    try:
        quant_pre_process(fp32_path, pre)
        src, note = pre, "quant_pre_process + quantize_static"
    except Exception as e:  # it refuses some graphs; quantize_static still works without it
        src, note = fp32_path, f"quantize_static without quant_pre_process ({type(e).__name__}: {e})"
    name = session(src).get_inputs()[0].name
    quantize_static(
        src, out_path, Reader(name), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )
    return note
