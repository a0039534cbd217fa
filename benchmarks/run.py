"""Side-by-side benchmarks of simclrv2's input pipeline and pretraining loop against the usual
PyTorch SimCLR setup (torchvision PIL transforms in DataLoader workers, plain NT-Xent, float32).

    python benchmarks/run.py [--quick] --json results.json [--device cpu|cuda] [--only KEY ...]

Keys: ``augment_32``, ``augment_96`` (augmentation, two views), ``folder_224`` (two 224 px
views from a folder of JPEGs: decoding, crops and augmentation), ``e2e_embedded``,
``e2e_resnet18`` (pretraining images/s including data, forward, backward, optimiser). Each
measurement runs in a fresh process (``measure.py``); ours and the reference run alternately in
the same invocation, and every result records the machine's load average around it. The JSON
holds, per key, ``ours``, ``reference`` (its best DataLoader worker count), ``ratio`` (ours /
reference images/s), ``memory_ratio`` (peak memory, ours / reference) and the target (none for
``folder_224``, which the issue left without one).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

KEYS = ("augment_32", "augment_96", "folder_224", "e2e_embedded", "e2e_resnet18")
TARGETS = {"augment_32": 3.0, "augment_96": 3.0, "folder_224": None, "e2e_embedded": 3.0, "e2e_resnet18": 2.0}
FOLDER_IMAGES = 1536  # JPEGs of 500 x 375 written once for folder_224 (enough for every plan)
DATA_WAIT_TARGET = 0.05  # e2e_resnet18: our time waiting for data, as a fraction of the step
STRENGTH = 1.0  # colour-jitter strength s of the augmentation benchmarks (same on both sides)

# Measurement sizes. The reference's settings are swept and its best is kept: DataLoader
# workers for augmentation (per benchmark key, since the best count depends on the image size);
# (workers, OpenMP threads of the training process) end to end, since on 2 cores workers and
# threads compete. --quick uses each key's best setting from the full runs on the 2-core machine
# (results/cpu_2core*.json, README).
AUGMENT_SWEEP = [0, 1, 2, 3]
E2E_SWEEP = [[0, 2], [1, 1], [1, 2], [2, 2]]
PLANS: dict[str, dict[str, Any]] = {
    "quick": {
        "augment": {"warmup": 1, "batches": 4, "batch_size": 256, "workers": {"augment_32": [2], "augment_96": [3]}},
        "folder": {"warmup": 1, "batches": 2, "batch_size": 64, "workers": [3]},
        "e2e_embedded": {"warmup": 2, "steps": 3, "reference": [[1, 2]]},
        "e2e_resnet18": {"warmup": 1, "steps": 1, "reference": [[2, 2]]},
        "repeats": 1, "ablation": False,
    },
    "full": {
        "augment": {"warmup": 2, "batches": 10, "batch_size": 256,
                    "workers": {"augment_32": AUGMENT_SWEEP, "augment_96": AUGMENT_SWEEP}},
        "folder": {"warmup": 2, "batches": 6, "batch_size": 128, "workers": [1, 2, 3]},
        "e2e_embedded": {"warmup": 3, "steps": 8, "reference": E2E_SWEEP},
        "e2e_resnet18": {"warmup": 2, "steps": 4, "reference": E2E_SWEEP},
        "repeats": 3, "ablation": True,
    },
}
ABLATION = {"fp32": {"precision": "fp32", "channels_last": False},
            "bf16": {"precision": "bf16", "channels_last": False},
            "channels_last": {"precision": "fp32", "channels_last": True},
            "bf16+channels_last": {"precision": "bf16", "channels_last": True}}
ABLATION_STEPS = {"quick": {"embedded": (2, 3), "resnet18": (1, 2)},
                  "full": {"embedded": (3, 6), "resnet18": (2, 3)}}


QUIET: dict[str, float] = {}  # {"busy": ..., "max_wait": ...} when --wait-quiet is given
OURS_ENV: dict[str, str] = {}  # --ours-env: extra environment for our side's processes only
NOISY = 0.3  # other programs using more cores than this during a measurement make it suspect


def measure(spec: dict[str, Any], timeout: float = 900.0) -> dict[str, Any]:
    """One measurement; with ``--wait-quiet``, repeated (up to ``QUIET["retries"]`` more times)
    while other programs disturbed it, keeping the fastest attempt."""
    result = _measure_once(spec, timeout)
    attempts = [result]
    while QUIET and "error" not in result and result["other_cores_during"] > NOISY and len(attempts) <= QUIET["retries"]:
        print("    disturbed by other programs; measuring again", flush=True)
        result = _measure_once(spec, timeout)
        attempts.append(result)
    ok = [a for a in attempts if "error" not in a]
    if not ok:
        return attempts[-1]
    best = max(ok, key=lambda a: a["images_per_s"])
    best["attempts"] = [(round(a["images_per_s"], 2), a["other_cores_during"]) for a in ok]
    return best


def _measure_once(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh process; returns its result or ``{"error": ...}``."""
    quiet = common.wait_for_quiet(QUIET["busy"], QUIET["max_wait"]) if QUIET else common.busy_cores(0.5)
    env = {**os.environ, **(OURS_ENV if spec["kind"].endswith("_ours") else {})}
    label = " ".join(f"{k}={v}" for k, v in spec.items() if k not in ("num_images", "strength"))
    print(f"  [{time.strftime('%H:%M:%S')} other load {quiet:.2f} cores] {label}", flush=True)
    t0, busy0, own0 = time.monotonic(), common.cpu_busy_seconds(), common.children_cpu_seconds()
    try:
        proc = subprocess.run([sys.executable, str(HERE / "measure.py"), json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "spec": spec}
    wall = time.monotonic() - t0
    # Cores used by other programs while this ran: machine busy time minus our child's CPU time.
    others = max(0.0, (common.cpu_busy_seconds() - busy0) - (common.children_cpu_seconds() - own0)) / wall
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"    failed: {' | '.join(tail)}", flush=True)
        return {"error": " | ".join(tail), "spec": spec}
    result = json.loads(lines[-1][len("RESULT "):])
    result.update(other_cores_before=round(quiet, 3), other_cores_during=round(others, 3))
    extra = f", data wait {result['data_wait_fraction']:.1%}" if "data_wait_fraction" in result else ""
    print(f"    {result['images_per_s']:.0f} images/s{extra} (other programs used {others:.2f} cores meanwhile)",
          flush=True)
    return {**result, "spec": spec}


def _best(results: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    ok = [r for r in results if "error" not in r]
    return max(ok, key=lambda r: r["images_per_s"]) if ok else None


def _specs(key: str, plan: dict[str, Any], device: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(our spec, the reference specs, one per setting swept) of a benchmark key."""
    if key.startswith("augment"):
        size = int(key.split("_")[1])
        p = plan["augment"]

        def spec(kind: str, warmup: int, batches: int, **extra: Any) -> dict[str, Any]:
            images = max(4096, (warmup + batches + 1) * p["batch_size"])  # no epoch end while timing
            return {"kind": kind, "size": size, "batch_size": p["batch_size"], "num_images": images,
                    "strength": STRENGTH, "warmup": warmup, "batches": batches, **extra}

        def reference_spec(workers: int) -> dict[str, Any]:
            # w workers deliver batches in waves of w (each worker makes a whole batch): time whole
            # waves, from the end of one, or prefetched batches would inflate the reference.
            wave = max(workers, 1)
            return spec("augment_reference", max(p["warmup"], wave), -(-p["batches"] // wave) * wave, workers=workers)
        return (spec("augment_ours", p["warmup"], p["batches"], device=device),
                [reference_spec(w) for w in p["workers"][key]])
    if key.startswith("folder"):
        p = plan["folder"]

        def waves(loader_workers: int) -> tuple[int, int]:
            """(warm-up, timed) batches: whole waves of the workers' batches, as above."""
            wave = max(loader_workers, 1)
            return max(p["warmup"], wave), -(-p["batches"] // wave) * wave

        ours_workers = min(32, len(os.sched_getaffinity(0)))  # our loader's default (one process)
        # Many workers need many batches: shrink the batch (the same on both sides) so that the
        # longest plan still ends inside one pass over the FOLDER_IMAGES files.
        longest = max(sum(waves(w)) for w in [ours_workers, *p["workers"]])
        batch = min(p["batch_size"], FOLDER_IMAGES // (longest + 1))

        def folder_spec(kind: str, loader_workers: int, **extra: Any) -> dict[str, Any]:
            warmup, batches = waves(loader_workers)
            return {"kind": kind, "size": int(key.split("_")[1]), "batch_size": batch, "num_images": FOLDER_IMAGES,
                    "strength": STRENGTH, "warmup": warmup, "batches": batches, **extra}
        return (folder_spec("folder_ours", ours_workers, device=device),
                [folder_spec("folder_reference", w, workers=w) for w in p["workers"]])
    model = key.split("_", 1)[1]
    p = plan[key]
    base = {"model": model, "device": device, "warmup": p["warmup"], "steps": p["steps"]}
    return ({"kind": "e2e_ours", **base},
            [{"kind": "e2e_reference", "workers": w, "threads": t, **base} for w, t in p["reference"]])


def _summarise(key: str, ours_runs: list[dict], ref_runs: list[list[dict]]) -> dict[str, Any]:
    ours = _best(ours_runs)
    flat = [r for rnd in ref_runs for r in rnd]
    ref = _best(flat)
    out: dict[str, Any] = {"ours": ours, "reference": ref, "target_ratio": TARGETS[key]}
    target = TARGETS[key]
    sweep: dict[str, list[float]] = {}
    for r in flat:
        if "error" not in r:
            sweep.setdefault(f"workers={r['workers']},threads={r['threads']}", []).append(round(r["images_per_s"], 2))
    out["reference_sweep"] = sweep
    out["runs"] = {"ours": [r.get("images_per_s") for r in ours_runs],
                   "reference_best_per_round": [(_best(rnd) or {}).get("images_per_s") for rnd in ref_runs]}
    if ours is None or ref is None:
        out.update(ratio=None, target_met=False, error=[r.get("error") for r in ours_runs + flat if "error" in r])
        return out
    out["ratio"] = ours["images_per_s"] / ref["images_per_s"]
    paired = [o["images_per_s"] / b["images_per_s"] for o, b in zip(ours_runs, map(_best, ref_runs))
              if "error" not in o and b is not None]
    out["paired_ratios"] = paired
    out["paired_ratio_median"] = statistics.median(paired) if paired else None
    out["memory_ratio"] = ours["peak_mem_mib"] / ref["peak_mem_mib"]
    if "cuda_max_allocated_mib" in ours and "cuda_max_allocated_mib" in ref:
        out["cuda_memory_ratio"] = ours["cuda_max_allocated_mib"] / ref["cuda_max_allocated_mib"]
    out["target_met"] = None if target is None else out["ratio"] >= target
    if key.startswith("e2e") and "forward_fraction" in ours:  # phases are timed on the CPU only
        out["ours_step_breakdown"] = step_breakdown(ours)
    if key == "e2e_resnet18":
        out["data_wait_fraction"] = ours["data_wait_fraction"]
        out["augment_fraction"] = ours.get("augment_fraction")
        out["data_wait_target_met"] = ours["data_wait_fraction"] < DATA_WAIT_TARGET
        # Stricter: our augmentation runs inside the step, so count it as input time too (timed on
        # the CPU only; None on a GPU).
        augment = ours.get("augment_fraction")
        out["input_fraction"] = None if augment is None else ours["data_wait_fraction"] + augment
        out["input_fraction_target_met"] = None if augment is None else out["input_fraction"] < DATA_WAIT_TARGET
    return out


def step_breakdown(result: dict[str, Any]) -> dict[str, float]:
    """Fractions of our training step: input (data wait, augmentation), forward, optimiser, and
    the remainder (loss, backward, logging)."""
    parts = {name: result.get(f"{name}_fraction") or 0.0 for name in ("data_wait", "augment", "forward", "optimizer")}
    return {**parts, "backward_and_rest": 1.0 - sum(parts.values())}


def _machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "device": device}
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    try:
        info["cpu_bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        info["cpu_bf16"] = None
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
        info["cpu_model"] = model
    except (OSError, StopIteration):
        pass
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_ablation(mode: str, device: str, models: list[str]) -> dict[str, Any]:
    """Our pretraining throughput per precision / memory-format setting, for each e2e model."""
    out: dict[str, Any] = {}
    for model in models:
        warmup, steps = ABLATION_STEPS[mode][model]
        rows: dict[str, Any] = {}
        for name, runtime in ABLATION.items():
            r = measure({"kind": "e2e_ours", "model": model, "device": device, "warmup": warmup, "steps": steps,
                         "runtime": runtime})
            rows[name] = {"images_per_s": r.get("images_per_s"), "peak_mem_mib": r.get("peak_mem_mib"),
                          "load_before": r.get("load_before"), "error": r.get("error")}
        base = rows["fp32"]["images_per_s"]
        for row in rows.values():
            row["speedup_vs_fp32"] = row["images_per_s"] / base if base and row["images_per_s"] else None
        out[model] = rows
    return out


def print_table(results: dict[str, Any]) -> None:
    print("\nbenchmark       ours img/s   reference img/s (workers,threads)   ratio  target  met   mem ratio")
    for key in KEYS:
        r = results.get(key)
        if r is None:
            continue
        if r.get("ratio") is None:
            print(f"{key:<15} failed: {r.get('error')}")
            continue
        ours, ref = r["ours"], r["reference"]
        setting = f"({ref['workers']},{ref['threads']})"
        target = "    -" if r["target_ratio"] is None else f"{r['target_ratio']:>5.1f}x"
        met = {None: "-", True: "yes", False: "NO"}[r["target_met"]]
        print(f"{key:<15} {ours['images_per_s']:>10.1f}   {ref['images_per_s']:>15.1f} {setting:<18}"
              f"{r['ratio']:>6.2f}x {target}  {met:<4}  {r['memory_ratio']:>6.2f}")
    noisy = [f"{key} {side}" for key in KEYS for side in ("ours", "reference")
             if (results.get(key) or {}).get(side) and results[key][side].get("other_cores_during", 0) > NOISY]
    if noisy:
        print(f"warning: other programs used > {NOISY} cores during: {', '.join(noisy)}; repeat when the machine "
              "is quiet (--wait-quiet 0.2)")
    for key in KEYS:
        breakdown = (results.get(key) or {}).get("ours_step_breakdown")
        if breakdown:
            print(f"{key} ours, share of the step: " + ", ".join(f"{name.replace('_', ' ')} {share:.1%}"
                                                               for name, share in breakdown.items()))
    e2e = results.get("e2e_resnet18")
    if e2e and e2e.get("ours"):
        augment = e2e.get("augment_fraction")
        print(f"e2e_resnet18 ours: data wait {e2e['data_wait_fraction']:.2%} of the step (target < "
              f"{DATA_WAIT_TARGET:.0%}), augmentation in the step "
              + ("not timed (GPU)" if augment is None else f"{augment:.1%}"))
    ablation = results.get("ablation")
    if ablation:
        for model, rows in ablation.items():
            cells = ", ".join(f"{name} {row['images_per_s'] or float('nan'):.0f} img/s "
                              f"({row['speedup_vs_fp32'] or float('nan'):.2f}x)" for name, row in rows.items())
            print(f"ablation {model}: {cells}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Few steps, no worker sweep or ablation (< 3 min on 2 CPU cores).")
    parser.add_argument("--json", required=True, help="Where to write the results.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="Where our side (augmentation, model) and the reference model run; the reference "
                             "augmentation always runs in CPU DataLoader workers.")
    parser.add_argument("--only", nargs="+", choices=KEYS, default=list(KEYS), help="Run only these benchmarks.")
    parser.add_argument("--repeats", type=int, default=None,
                        help="Rounds of side-by-side measurements (best of each side kept; the reference's settings "
                             "are swept in the first round, later rounds use its best). Default: 1 quick, 3 full.")
    parser.add_argument("--ablation", default=None, action=argparse.BooleanOptionalAction,
                        help="Measure our loop under fp32 / bf16 / channels-last / both (default: on unless --quick).")
    parser.add_argument("--reference-workers", default=None,
                        help="Comma-separated DataLoader worker counts to try for the reference (best kept); "
                             "end to end its training process then uses all cores.")
    parser.add_argument("--wait-quiet", type=float, default=None, metavar="CORES",
                        help="Before each measurement, wait (up to --max-wait s) until other programs keep at most "
                             "this many cores busy (e.g. 0.2).")
    parser.add_argument("--max-wait", type=float, default=600.0, help="Seconds to wait for quiet per measurement.")
    parser.add_argument("--retries", type=int, default=2,
                        help="With --wait-quiet: measure again up to this many times when other programs used more "
                             f"than {NOISY} cores meanwhile.")
    parser.add_argument("--ours-env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Environment for our side only, e.g. OMP_WAIT_POLICY=PASSIVE (see README).")
    args = parser.parse_args(argv)
    malformed = [kv for kv in args.ours_env if "=" not in kv]
    if malformed:
        parser.error(f"--ours-env takes KEY=VALUE, got {', '.join(map(repr, malformed))}")

    mode = "quick" if args.quick else "full"
    plan = json.loads(json.dumps(PLANS[mode]))
    cpus = len(os.sched_getaffinity(0))
    workers = None
    if args.reference_workers:
        workers = [int(w) for w in args.reference_workers.split(",")]
    elif cpus > 4:  # the sweeps above are sized for the 2-core machine
        workers = sorted({min(8, cpus), cpus} if mode == "quick" else {cpus // 2, min(8, cpus), cpus})
    if workers:
        plan["augment"]["workers"] = {key: workers for key in plan["augment"]["workers"]}
        plan["folder"]["workers"] = workers
        for section in ("e2e_embedded", "e2e_resnet18"):
            plan[section]["reference"] = [[w, cpus] for w in workers]
    if args.device == "cuda":  # GPU steps take milliseconds: time more of them, after cuDNN's autotuning
        plan["augment"]["batches"] = max(plan["augment"]["batches"], 20)
        for section in ("e2e_embedded", "e2e_resnet18"):
            plan[section]["warmup"] = max(plan[section]["warmup"], 5)
            plan[section]["steps"] = max(plan[section]["steps"], 20)
    repeats = args.repeats or plan["repeats"]
    ablation = plan["ablation"] if args.ablation is None else args.ablation
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")

    started = time.time()
    print(f"simclrv2 benchmarks ({mode}, device {args.device}, {repeats} round(s)); load average "
          f"{common.load_average():.2f}, {cpus} CPUs", flush=True)
    ours_runs: dict[str, list] = {k: [] for k in args.only}
    ref_runs: dict[str, list] = {k: [] for k in args.only}
    OURS_ENV.update(kv.split("=", 1) for kv in args.ours_env)
    if args.wait_quiet is not None:
        QUIET.update(busy=args.wait_quiet, max_wait=args.max_wait, retries=args.retries)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    for round_index in range(repeats):
        print(f"round {round_index + 1}/{repeats}", flush=True)
        for key in args.only:
            ours_spec, ref_specs = _specs(key, plan, args.device)
            if round_index > 0 and _best(ref_runs[key][0]) is not None:  # the sweep is done once
                ref_specs = [_best(ref_runs[key][0])["spec"]]
            ours_runs[key].append(measure(ours_spec))
            ref_runs[key].append([measure(s) for s in ref_specs])
            # Raw measurements so far, replaced by the summary at the end: a run cut short by a
            # time limit keeps what it measured.
            path.write_text(json.dumps({"partial": True, "ours": ours_runs, "reference": ref_runs}, indent=2) + "\n")

    results: dict[str, Any] = {key: _summarise(key, ours_runs[key], ref_runs[key]) for key in args.only}
    ablation_models = [key.split("_", 1)[1] for key in args.only if key.startswith("e2e_")]
    if ablation and ablation_models:
        print("ablation (our loop)", flush=True)
        results["ablation"] = run_ablation(mode, args.device, ablation_models)
    results["meta"] = {"mode": mode, "repeats": repeats, "plan": plan, "machine": _machine(args.device),
                       "augment_strength": STRENGTH, "data_wait_target": DATA_WAIT_TARGET,
                       "wait_quiet_cores": args.wait_quiet, "ours_env": OURS_ENV,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                       "elapsed_s": time.time() - started}
    print_table(results)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {path} ({time.time() - started:.0f} s)")
    failed = [k for k in args.only if results[k].get("ratio") is None]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
