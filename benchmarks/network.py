"""The network step alone, on the CPU: the ceiling of the end-to-end ratios.

One training step of an e2e model (both views as one batch, NT-Xent, backward, SGD) on fixed
synthetic views, in the reference's float32 NCHW against our CPU default (bf16 autocast +
channels-last), alternating in one process, with the same loss (``reference.nt_xent``) and SGD on
both sides. Each step is split by operator (``torch.profiler``), its convolution FLOPs counted,
and the CPU's dense-kernel peak measured in both precisions. No end-to-end loop beats its network
step, so ``run.py``'s ratio for a model is at most about this step's ours over the reference loop.

    python benchmarks/network.py --model embedded --json results/cpu_amd_epyc_2core.json  # ~1 min
    python benchmarks/network.py --model embedded --ceiling ...  # + the bound of fusing BN and ReLU
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import reference  # noqa: E402
from measure import E2E_MODELS, e2e_config, e2e_model  # noqa: E402

# (precision, memory format) of each side: the reference loop's, and our CPU default.
SIDES = {"reference": (torch.float32, torch.contiguous_format), "ours": (torch.bfloat16, torch.channels_last)}
# Profiler operators of each phase; an operator's total time includes the operators it calls.
PHASE_OPS = {
    "conv_forward": ("aten::convolution",),
    "conv_backward": ("aten::convolution_backward",),
    "batch_norm": ("aten::native_batch_norm", "aten::native_batch_norm_backward"),
}
# Timing-only variants of our step, each with some operators made free (the identity): what any
# fusion or removal of that work could buy at most. ``--ceiling`` measures them.
CEILINGS = {"without_bn": ("batch_norm",), "without_bn_relu": ("batch_norm", "relu")}
FLOP_OPS = {"conv_forward": ("convolution",), "conv_backward": ("convolution_backward",)}


def phase_times_ms(events: Iterable[Any], steps: int) -> dict[str, float]:
    """Milliseconds per step of each phase in :data:`PHASE_OPS`, from ``key_averages()`` rows
    (objects with ``key`` and ``cpu_time_total`` in microseconds) covering ``steps`` steps."""
    totals = {phase: 0.0 for phase in PHASE_OPS}
    for event in events:
        for phase, ops in PHASE_OPS.items():
            if event.key in ops:
                totals[phase] += event.cpu_time_total / 1000 / steps
    return totals


def flops_by_phase(counts: dict[Any, int]) -> dict[str, float]:
    """FLOPs of each phase in :data:`FLOP_OPS` from ``FlopCounterMode.get_flop_counts()["Global"]``
    (keyed by operator packets such as ``aten.convolution``)."""
    by_name = {getattr(op, "__name__", str(op)).split(".")[-1]: count for op, count in counts.items()}
    return {phase: float(sum(by_name.get(name, 0) for name in names)) for phase, names in FLOP_OPS.items()}


def _best_gflops(fn: Callable[[], Any], flop: float, repeats: int) -> float:
    fn()
    return flop / min(_seconds(fn) for _ in range(repeats)) / 1e9


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def dense_peak_gflops(dtype: torch.dtype, repeats: int = 8) -> float:
    """The best GFLOP/s that the CPU's dense kernels reach in ``dtype`` (square matmuls, and a 3x3
    convolution with 256 channels, where oneDNN's kernels run fastest): a practical peak."""
    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        best = max(best, _best_gflops(lambda: a @ b, 2 * n ** 3, repeats))
    x = torch.randn(64, 256, 14, 14, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return max(best, _best_gflops(lambda: torch.conv2d(x, w, padding=1), 2 * 64 * 14 * 14 * 256 * 256 * 9, repeats))


class NetworkStep(NamedTuple):
    run: Callable[[], None]  # one training step
    model: torch.nn.Module
    views: torch.Tensor  # 2 x batch size synthetic views


def make_step(model_key: str, side: str, batch_size: int) -> NetworkStep:
    """One training step of the ``model_key`` e2e model as ``side`` runs it, on fixed synthetic views."""
    dtype, memory_format = SIDES[side]
    temperature, size = e2e_config(model_key).temperature, E2E_MODELS[model_key]["image_size"]
    torch.manual_seed(0)
    model = e2e_model(model_key).to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    views = torch.rand(2 * batch_size, 3, size, size).contiguous(memory_format=memory_format)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            projection = model(views)[0]
        loss = reference.nt_xent(projection.float(), temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return NetworkStep(step, model, views)


@contextlib.contextmanager
def free(operators: Iterable[str]):
    """While the block runs, 2-D batch norm and/or ReLU (``F.relu``, ``F.relu_``) are the identity.
    Timing only: the model still trains, on other numbers."""
    saved = nn.BatchNorm2d.forward, F.relu, F.relu_
    if "batch_norm" in operators:
        nn.BatchNorm2d.forward = lambda self, x: x
    if "relu" in operators:
        F.relu = F.relu_ = lambda x, inplace=False: x
    try:
        yield
    finally:
        nn.BatchNorm2d.forward, F.relu, F.relu_ = saved


def without(step: Callable[[], None], operators: Iterable[str]) -> Callable[[], None]:
    """``step`` with ``operators`` made free (:func:`free`)."""
    def run() -> None:
        with free(operators):
            step()
    return run


def profile_step(step: Callable[[], None], steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """(milliseconds per profiled step of each phase, the rest and the whole step; FLOPs per step
    of each convolution phase)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        step_ms = (time.perf_counter() - start) * 1000 / steps
    phases = phase_times_ms(prof.key_averages(), steps)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return ({**phases, "rest": step_ms - sum(phases.values()), "step": step_ms},
            flops_by_phase(counter.get_flop_counts()["Global"]))


def measure(model_key: str, batch_size: int, rounds: int, steps: int, warmup: int,
            ceiling: bool = False) -> dict[str, Any]:
    """Both sides' step times (alternating rounds), operator split, convolution FLOPs, and the peaks;
    with ``ceiling``, also our step with each of :data:`CEILINGS` made free (timed, not profiled)."""
    steps_of = {side: make_step(model_key, side, batch_size).run for side in SIDES}
    if ceiling:
        steps_of.update({f"ours_{name}": without(make_step(model_key, "ours", batch_size).run, ops)
                         for name, ops in CEILINGS.items()})
    for step in steps_of.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {side: [] for side in steps_of}
    for _ in range(rounds):  # alternating, so that both sides see the same machine
        for side, step in steps_of.items():
            times[side] += [_seconds(step) for _ in range(steps)]
    peaks = {"float32": dense_peak_gflops(torch.float32), "bfloat16": dense_peak_gflops(torch.bfloat16)}
    result: dict[str, Any] = {"model": model_key, "batch_size": batch_size, "image_size": E2E_MODELS[model_key]["image_size"],
                              "rounds": rounds, "steps": steps, "warmup": warmup,
                              "threads": torch.get_num_threads(), "dense_peak_gflops": peaks}
    for side in SIDES:
        phases, flops = profile_step(steps_of[side], steps)
        best, median = min(times[side]), statistics.median(times[side])
        dtype = "bfloat16" if SIDES[side][0] == torch.bfloat16 else "float32"
        conv_ms = phases["conv_forward"] + phases["conv_backward"]
        conv_flops = flops["conv_forward"] + flops["conv_backward"]
        # The best step with every convolution at the dense-kernel peak and the rest unchanged (its
        # share from the profiled steps, which the profiler slows a little).
        at_peak_s = best * (1 - conv_ms / phases["step"]) + conv_flops / (peaks[dtype] * 1e9)
        result[side] = {
            "precision": dtype, "channels_last": SIDES[side][1] == torch.channels_last,
            "step_ms_best": best * 1000, "step_ms_median": median * 1000,
            "images_per_s": batch_size / best, "images_per_s_median": batch_size / median,
            "profiled_ms": phases,
            "conv_gflop": {phase: count / 1e9 for phase, count in flops.items()},
            "conv_gflops_per_s": {phase: flops[phase] / 1e9 / (phases[phase] / 1000) for phase in flops},
            "conv_fraction_of_peak": conv_flops / 1e9 / (conv_ms / 1000) / peaks[dtype],
            "images_per_s_convs_at_peak": batch_size / at_peak_s,
        }
    result["ratio"] = result["ours"]["images_per_s"] / result["reference"]["images_per_s"]
    if ceiling:
        result["ceiling"] = {name: {"free": list(ops), "step_ms_best": min(times[f"ours_{name}"]) * 1000,
                                    "images_per_s": batch_size / min(times[f"ours_{name}"]),
                                    "speedup_bound": min(times["ours"]) / min(times[f"ours_{name}"])}
                             for name, ops in CEILINGS.items()}
    return result


def report(result: dict[str, Any]) -> str:
    """The result as a side-by-side table (ms per step; the profiled phases, then the peaks)."""
    ref, ours, peaks = result["reference"], result["ours"], result["dense_peak_gflops"]
    rows = [("step (best)", ref["step_ms_best"], ours["step_ms_best"])]
    rows += [(phase.replace("_", " "), ref["profiled_ms"][phase], ours["profiled_ms"][phase])
             for phase in ("conv_forward", "conv_backward", "batch_norm", "rest", "step")]
    lines = [f"{result['model']}, batch {result['batch_size']}, {result['threads']} threads: reference fp32 NCHW, "
             f"ours bf16 channels-last ({result['ratio']:.2f}x images/s)"]
    lines += [f"  {name:16s}{r:9.0f} ms{o:9.0f} ms{r / o:7.2f}x" for name, r, o in rows]
    lines.append(f"dense-kernel peak {peaks['float32']:.0f} / {peaks['bfloat16']:.0f} GFLOP/s; convolutions at "
                 f"{ref['conv_fraction_of_peak']:.0%} / {ours['conv_fraction_of_peak']:.0%} of it; all at the peak: "
                 f"{ref['images_per_s_convs_at_peak']:.0f} / {ours['images_per_s_convs_at_peak']:.0f} images/s")
    for name, bound in result.get("ceiling", {}).items():
        lines.append(f"ours with {' and '.join(bound['free'])} free (timing only): {bound['step_ms_best']:.0f} ms, "
                     f"at most {bound['speedup_bound']:.2f}x ours, {bound['images_per_s'] / ref['images_per_s']:.2f}x the reference")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(E2E_MODELS), default="embedded")
    parser.add_argument("--batch-size", type=int, default=256, help="source images per step (two views each)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of timed steps per side")
    parser.add_argument("--steps", type=int, default=3, help="timed (and profiled) steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side before the rounds")
    parser.add_argument("--ceiling", action="store_true",
                        help="also time our step with batch norm, then batch norm and ReLU, made free (timing only)")
    parser.add_argument("--json", type=Path, help="the results file to merge the figures into (key network_MODEL)")
    args = parser.parse_args(argv)
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--rounds", args.rounds, 1),
                               ("--steps", args.steps, 1), ("--warmup", args.warmup, 0)):
        if value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    result = measure(args.model, args.batch_size, args.rounds, args.steps, args.warmup, args.ceiling)
    print(report(result))
    if args.json:
        common.record(args.json, common.machine(), {f"network_{args.model}": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
