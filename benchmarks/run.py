"""simclrv2 against the usual PyTorch SimCLR setup, side by side in one invocation.

    python benchmarks/run.py [--quick] --json FILE [--device cpu|cuda] [--only KEY ...] [--wait-quiet 0.25]

Each measurement runs in a fresh process (``measure.py``), ours and the reference alternating.
``FILE`` is the machine kind's results file (``results/cpu_amd_epyc_2core.json``); the keys run
replace theirs there, stamped with the commit.
"""
from __future__ import annotations

import argparse
import json
import os
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
FOLDER_IMAGES = 1536  # JPEGs written once for folder_224
NOISY = 0.3  # other programs using more cores than this during a measurement make it suspect
# The reference's settings are swept and its best kept: DataLoader workers, and end to end
# (workers, training threads), since on 2 cores they compete. --quick uses the settings that won
# the full runs on the 2-core machine.
SWEEP = [0, 1, 2, 3]
E2E_SWEEP = [[0, 2], [1, 1], [1, 2], [2, 2]]
PLANS: dict[str, dict[str, Any]] = {
    "quick": {"augment": {"warmup": 1, "batches": 4, "workers": {"augment_32": [2], "augment_96": [3]}},
              "folder": {"warmup": 1, "batches": 2, "batch_size": 64, "workers": [3]},
              "e2e_embedded": {"warmup": 2, "steps": 3, "reference": [[1, 2]]},
              "e2e_resnet18": {"warmup": 1, "steps": 1, "reference": [[2, 2]]}, "repeats": 1, "ablation": False},
    "full": {"augment": {"warmup": 2, "batches": 10, "workers": {"augment_32": SWEEP, "augment_96": SWEEP}},
             "folder": {"warmup": 2, "batches": 6, "batch_size": 128, "workers": [1, 2, 3]},
             "e2e_embedded": {"warmup": 3, "steps": 8, "reference": E2E_SWEEP},
             "e2e_resnet18": {"warmup": 2, "steps": 4, "reference": E2E_SWEEP}, "repeats": 3, "ablation": True},
}
ABLATION = {"fp32": {"precision": "fp32", "channels_last": False}, "bf16": {"precision": "bf16", "channels_last": False},
            "channels_last": {"precision": "fp32", "channels_last": True},
            "bf16+channels_last": {"precision": "bf16", "channels_last": True}}
QUIET: dict[str, float] = {}  # {"busy": cores} with --wait-quiet


def measure(spec: dict[str, Any], retries: int = 2) -> dict[str, Any]:
    """One measurement; with --wait-quiet measured again while other programs disturbed it."""
    attempts = [_measure_once(spec)]
    while QUIET and attempts[-1].get("other_cores_during", 0) > NOISY and len(attempts) <= retries:
        attempts.append(_measure_once(spec))
    ok = [a for a in attempts if "error" not in a]
    return max(ok, key=lambda a: a["images_per_s"]) if ok else attempts[-1]


def _measure_once(spec: dict[str, Any], timeout: float = 900.0) -> dict[str, Any]:
    quiet = common.wait_for_quiet(QUIET["busy"], 600) if QUIET else common.busy_cores(0.5)
    print(f"  [{time.strftime('%H:%M:%S')} other load {quiet:.2f}] {json.dumps(spec)}", flush=True)
    t0, busy0, own0 = time.monotonic(), common.cpu_busy_seconds(), common.children_cpu_seconds()
    try:
        proc = subprocess.run([sys.executable, str(HERE / "measure.py"), json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "spec": spec}
    # Cores used by other programs meanwhile: the machine's busy time minus our child's CPU time.
    others = max(0.0, common.cpu_busy_seconds() - busy0 - common.children_cpu_seconds() + own0) / (time.monotonic() - t0)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        print(f"    failed: {tail}", flush=True)
        return {"error": tail, "spec": spec}
    result = {**json.loads(lines[-1][len("RESULT "):]), "other_cores_during": round(others, 3), "spec": spec}
    print(f"    {result['images_per_s']:.1f} images/s (other programs: {others:.2f} cores)", flush=True)
    return result


def _best(results: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    ok = [r for r in results if "error" not in r]
    return max(ok, key=lambda r: r["images_per_s"]) if ok else None


def _waves(workers: int, warmup: int, batches: int) -> tuple[int, int]:
    """(warm-up, timed) batches in whole waves: w workers deliver batches w at a time, so timing
    part of a wave would count prefetched batches."""
    wave = max(workers, 1)
    return max(warmup, wave), -(-batches // wave) * wave


def specs(key: str, plan: dict[str, Any], device: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(our spec, the reference's specs, one per setting swept) of a key."""
    if key.startswith("e2e"):
        p = plan[key]
        base = {"model": key.split("_", 1)[1], "device": device, "warmup": p["warmup"], "steps": p["steps"]}
        return {"kind": "e2e_ours", **base}, [{"kind": "e2e_reference", "workers": w, "threads": t, **base}
                                              for w, t in p["reference"]]
    size = int(key.split("_")[1])
    if key.startswith("augment"):
        p = plan["augment"]

        def spec(kind: str, loader_workers: int, **extra: Any) -> dict[str, Any]:
            warmup, batches = _waves(loader_workers, p["warmup"], p["batches"])
            images = max(4096, (warmup + batches + 1) * 256)  # no epoch end while timing
            return {"kind": kind, "size": size, "batch_size": 256, "num_images": images, "strength": 1.0,
                    "warmup": warmup, "batches": batches, **extra}
        return spec("augment_ours", 0, device=device), [spec("augment_reference", w, workers=w)
                                                        for w in p["workers"][key]]
    p = plan["folder"]
    ours_workers = min(32, len(os.sched_getaffinity(0)))  # our loader's default
    # Many workers need many batches: one batch size for both sides such that the longest plan
    # stays inside one pass over the files.
    longest = max(sum(_waves(w, p["warmup"], p["batches"])) for w in [ours_workers, *p["workers"]])
    batch = min(p["batch_size"], FOLDER_IMAGES // (longest + 1))

    def folder(kind: str, loader_workers: int, **extra: Any) -> dict[str, Any]:
        warmup, batches = _waves(loader_workers, p["warmup"], p["batches"])
        return {"kind": kind, "size": size, "batch_size": batch, "num_images": FOLDER_IMAGES, "strength": 1.0,
                "warmup": warmup, "batches": batches, **extra}
    return folder("folder_ours", ours_workers, device=device), [folder("folder_reference", w, workers=w)
                                                                for w in p["workers"]]


def step_breakdown(result: dict[str, Any]) -> dict[str, float]:
    """Shares of our step: data wait, views, forward, optimiser, and backward with the rest."""
    parts = {name: result.get(f"{name}_fraction") or 0.0 for name in ("data_wait", "augment", "forward", "optimizer")}
    return {**parts, "backward_and_rest": 1.0 - sum(parts.values())}


def summarise(key: str, ours_runs: list[dict], ref_runs: list[list[dict]]) -> dict[str, Any]:
    """Each side's best over the rounds, the ratio, and the per-round (paired) ratios."""
    ours, flat = _best(ours_runs), [r for rnd in ref_runs for r in rnd]
    ref = _best(flat)
    sweep: dict[str, list[float]] = {}
    for r in flat:
        if "error" not in r:
            sweep.setdefault(f"workers={r['spec']['workers']},threads={r['spec'].get('threads')}", []).append(
                round(r["images_per_s"], 1))
    out: dict[str, Any] = {"target": TARGETS[key], "ours_runs": [r.get("images_per_s") for r in ours_runs],
                           "reference_sweep": sweep}
    if ours is None or ref is None:
        return {**out, "ratio": None, "error": [r["error"] for r in ours_runs + flat if "error" in r]}
    paired = [o["images_per_s"] / b["images_per_s"] for o, b in zip(ours_runs, map(_best, ref_runs))
              if "error" not in o and b is not None]
    out.update(ours={k: v for k, v in ours.items() if k not in ("spec", "pid")},
               reference={**{k: v for k, v in ref.items() if k not in ("spec", "pid")},
                          "workers": ref["spec"]["workers"], "threads": ref["spec"].get("threads")},
               ratio=ours["images_per_s"] / ref["images_per_s"], paired_ratios=paired,
               memory_ratio=ours["peak_mem_mib"] / ref["peak_mem_mib"])
    if "forward_fraction" in ours:  # phases are timed on the CPU only
        out["ours_step_breakdown"] = step_breakdown(ours)
    return out


def ablation(device: str, model: str, warmup: int, steps: int) -> dict[str, Any]:
    """Our loop's images/s per precision / memory format: what each CPU speed-up buys."""
    rows = {name: measure({"kind": "e2e_ours", "model": model, "device": device, "warmup": warmup, "steps": steps,
                           "runtime": runtime}).get("images_per_s") for name, runtime in ABLATION.items()}
    return {"images_per_s": rows, "speedup_vs_fp32": {name: v / rows["fp32"] for name, v in rows.items()
                                                      if v and rows["fp32"]}}


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{'key':<15}{'ours':>10}{'reference (workers,threads)':>30}{'ratio':>8}{'target':>8}{'memory':>8}")
    for key, r in results.items():
        if key.startswith("ablation"):
            print(f"{key}: " + ", ".join(f"{n} {v:.2f}x" for n, v in r["speedup_vs_fp32"].items()))
        elif r["ratio"] is None:
            print(f"{key:<15} failed: {r['error']}")
        else:
            ref, target = r["reference"], "-" if r["target"] is None else f"{r['target']:.1f}x"
            setting = f"{ref['images_per_s']:.1f} ({ref['workers']},{ref['threads']})"
            print(f"{key:<15}{r['ours']['images_per_s']:>10.1f}{setting:>30}{r['ratio']:>7.2f}x{target:>8}"
                  f"{r['memory_ratio']:>8.2f}")
            if "ours_step_breakdown" in r:
                print("    ours, share of the step: " + ", ".join(f"{n.replace('_', ' ')} {v:.1%}"
                                                                  for n, v in r["ours_step_breakdown"].items()))
            if r["ours"].get("other_cores_during", 0) > NOISY or ref.get("other_cores_during", 0) > NOISY:
                print(f"    warning: other programs used > {NOISY} cores meanwhile; repeat with --wait-quiet 0.25")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Few steps, each key's known best reference setting.")
    parser.add_argument("--json", required=True, type=Path, help="The results file to merge the figures into.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="Where our side and both models run (the reference augments in CPU workers).")
    parser.add_argument("--only", nargs="+", choices=KEYS, default=list(KEYS))
    parser.add_argument("--repeats", type=int, help="Rounds (default 1 quick, 3 full); each side's best is kept.")
    parser.add_argument("--ablation", action=argparse.BooleanOptionalAction, help="Our loop per precision/layout.")
    parser.add_argument("--wait-quiet", type=float, metavar="CORES",
                        help="Before each measurement wait until other programs use at most this many cores.")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    plan = json.loads(json.dumps(PLANS[mode]))
    cpus = len(os.sched_getaffinity(0))
    if cpus > 4:  # the sweeps above are sized for 2 cores
        workers = sorted({min(8, cpus), cpus})
        plan["augment"]["workers"] = {key: workers for key in plan["augment"]["workers"]}
        plan["folder"]["workers"] = workers
        plan["e2e_embedded"]["reference"] = plan["e2e_resnet18"]["reference"] = [[w, cpus] for w in workers]
    gpu = None
    if args.device == "cuda":  # GPU steps take milliseconds: time more of them, after cuDNN's autotuning
        import torch
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
        gpu = torch.cuda.get_device_name(0)
        plan["augment"]["batches"] = max(plan["augment"]["batches"], 20)
        for key in ("e2e_embedded", "e2e_resnet18"):
            plan[key].update(warmup=max(plan[key]["warmup"], 5), steps=max(plan[key]["steps"], 20))
    if args.wait_quiet is not None:
        QUIET["busy"] = args.wait_quiet
    repeats = args.repeats or plan["repeats"]
    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    info, started = common.machine(gpu), time.time()
    ours_runs: dict[str, list] = {k: [] for k in args.only}
    ref_runs: dict[str, list] = {k: [] for k in args.only}
    for round_index in range(repeats):
        print(f"round {round_index + 1}/{repeats}", flush=True)
        for key in args.only:
            ours, refs = specs(key, plan, args.device)
            if round_index > 0 and _best(ref_runs[key][0]) is not None:  # the sweep is done once
                refs = [_best(ref_runs[key][0])["spec"]]
            ours_runs[key].append(measure(ours))
            ref_runs[key].append([measure(s) for s in refs])
            # Recorded after each key: a run cut short by a time limit keeps what it measured.
            common.record(args.json, info, {key: {**summarise(key, ours_runs[key], ref_runs[key]),
                                                  "command": command, "mode": mode}})
    results = {key: {**summarise(key, ours_runs[key], ref_runs[key]), "command": command, "mode": mode}
               for key in args.only}
    if plan["ablation"] if args.ablation is None else args.ablation:
        for key in [k for k in args.only if k.startswith("e2e")]:
            steps = (plan[key]["warmup"], max(2, plan[key]["steps"] // 2))
            results[f"ablation_{key[4:]}"] = {**ablation(args.device, key[4:], *steps), "command": command}
    print_table(results)
    common.record(args.json, info, results)
    print(f"\nmerged into {args.json} ({time.time() - started:.0f} s)")
    return 1 if any(r.get("ratio", 0) is None for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
