"""GPU throughput through the engine's own training loop, most important figure first, in one call
with a time budget. Correctness on CUDA is ``tests/test_gpu.py`` (``pytest -m gpu``).

    python benchmarks/gpu.py [--budget 300] [--json FILE] [--dry-run]

Each throughput section runs ``simclrv2.engine.trainer.train`` on a ``TrainTask`` whose step is
the pretraining step (two views of every image by ``SimCLRAugment`` on the GPU from uint8 images
already there, our model, NT-Xent, LARS), timed by the loop's own per-step log; images/s counts
source images, each made into two views. Also: the views alone as a share of the step, the host's
time to queue them, peak GPU memory, and, for ResNet-50, each kernel's share of three profiled
steps. Out-of-memory halves the batch (the largest batch that fits is reported). Sections:
``resnet50_224`` (bf16), ``resnet18_cifar`` (32 px, batch 512, s per 50 000-image epoch),
``folder_224`` (JPEG folder input alone: our default DataLoader workers decode and crop, the GPU
does the rest), ``resnet50_224_fp16`` (cuDNN's batch norm takes fp16, not bf16),
``resnet50_224_profile``, ``resnet50_224_compiled``. ``--dry-run``: tiny sizes on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import measure  # noqa: E402

import simclrv2  # noqa: E402
from simclrv2.config import RuntimeConfig  # noqa: E402
from simclrv2.data import SimCLRAugment  # noqa: E402
from simclrv2.engine.runtime import prepare_model, setup_runtime  # noqa: E402
from simclrv2.engine.trainer import TrainTask, train  # noqa: E402
from simclrv2.losses import nt_xent  # noqa: E402
from simclrv2.optim import LARS, lars_param_groups  # noqa: E402

R50 = {"model": ("r50_1x_sk0", {}), "size": 224, "source": 256, "blur": True, "batch": 256, "warmup": 4, "steps": 10}
R18 = {"model": ("r50_1x_sk0_cifar", {"resnet_depth": 18}), "size": 32, "source": 32, "blur": False, "batch": 512,
       "warmup": 5, "steps": 20}
TINY = {"model": ("r18_0p25x_sk0_cifar", {"width_multiplier": 0.125}), "size": 32, "source": 36, "blur": True,
        "batch": 8, "warmup": 1, "steps": 2}


class DeviceImages:
    """A batch source of uint8 images already on the device, drawn at random (the data costs
    nothing): a smooth random colour field plus noise, made on the device in a moment."""

    def __init__(self, n: int, size: int, batch: int, device: torch.device):
        coarse = torch.randint(0, 256, (n, 3, 8, 8), generator=torch.Generator().manual_seed(0)).float().to(device)
        field = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        self.pool = (field + 12.0 * torch.randn_like(field)).clamp_(0, 255).to(torch.uint8)
        self.batch, self.picker = batch, torch.Generator(device=device).manual_seed(1)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        pass

    def __len__(self) -> int:
        return 10**6

    def __iter__(self):
        while True:
            yield self.pool[torch.randint(len(self.pool), (self.batch,), generator=self.picker, device=self.pool.device)]


def throughput(spec: dict[str, Any], batch: int, device: str, precision: str = "bf16", compile_model: bool = False,
               profile: bool = False) -> dict[str, Any]:
    """Timed pretraining steps of ``spec``'s model in the engine's loop (see the module docstring)."""
    cfg = RuntimeConfig(device=device, precision=precision, compile=compile_model, progress=False, resume=False,
                        log_every_steps=1, checkpoint_steps=10**9)
    rt = setup_runtime(cfg)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    name, overrides = spec["model"]
    model = simclrv2.create_model(name, num_classes=None, **overrides)
    net = prepare_model(model, rt, global_bn=False, compile_model=compile_model)
    augment = SimCLRAugment(spec["size"], color_jitter_strength=1.0, use_blur=spec["blur"])
    generator = torch.Generator().manual_seed(0)  # on the host, as the stages draw them
    source = DeviceImages(max(2 * batch, 64), spec["source"], batch, rt.device)

    def views(images: torch.Tensor) -> torch.Tensor:
        return augment.views(images, 2, generator).contiguous(memory_format=torch.channels_last)

    def step_fn(images: torch.Tensor, step: int):
        return nt_xent(net(views(images))[0], 0.1)[0], {}
    task = TrainTask(stage="pretrain", model=net, optimizer=LARS(lars_param_groups(model, 1e-6), lr=0.3,
                                                                 momentum=0.9, weight_decay=1e-6),
                     batches=source, step_fn=step_fn, lr_fn=lambda step: 0.3, images_per_step=batch,
                     total_steps=6 if profile else spec["warmup"] + spec["steps"], checkpoint_meta={})
    with tempfile.TemporaryDirectory() as run_dir:
        if profile:
            return kernel_shares(task, lambda: train(task, rt, cfg, Path(run_dir)), rt.device)
        last = train(task, rt, cfg, Path(run_dir))
        times = [json.loads(line)["time"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    step_s = (times[-1] - times[spec["warmup"] - 1]) / spec["steps"]
    images = next(iter(source))
    views_s, enqueue_s = seconds_each(lambda: views(images), rt.device, spec["steps"])
    out = {"batch": batch, "image_size": spec["size"], "precision": precision, "s_per_step": step_s,
           "images_per_s": batch / step_s, "views_per_s": 2 * batch / step_s, "augment_s_per_step": views_s,
           "augment_fraction": views_s / step_s, "augment_host_enqueue_s": enqueue_s, "final_loss": last["loss"]}
    if rt.device.type == "cuda":
        out["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
    return out


def seconds_each(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, float]:
    """(mean seconds of ``fn`` alone, mean seconds until it returns on an idle device: the host's
    cost to queue it, which the GPU hides only if ``fn`` never waits for it)."""
    total = host = 0.0
    for _ in range(repeats):
        measure.sync(device)
        t0 = time.perf_counter()
        fn()
        host += time.perf_counter() - t0
        measure.sync(device)
        total += time.perf_counter() - t0
    return total / repeats, host / repeats


def kernel_shares(task: TrainTask, run: Callable[[], Any], device: torch.device, top: int = 12) -> dict[str, Any]:
    """Each kernel's share of the device time (CPU time on the CPU) in steps 4-6 of ``run``."""
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU],
                 schedule=schedule(wait=2, warmup=1, active=3)) as prof:
        task.after_step = lambda step: prof.step()
        run()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in rows) or 1.0
    return {"top": [[e.key[:90], round(getattr(e, attr) / total, 4)] for e in rows[:top]]}


def largest_fitting(fn: Callable[[int], dict], batch: int, minimum: int) -> dict:
    """``fn(batch)``, halving ``batch`` on out-of-memory down to ``minimum``."""
    tried = []
    while True:
        try:
            return {**fn(batch), "oom_at": tried}
        except torch.OutOfMemoryError:
            tried.append(batch)
        torch.cuda.empty_cache()  # out of the except block: its traceback held the failed step's tensors
        if batch // 2 < minimum:
            raise torch.OutOfMemoryError(f"out of memory at every batch from {tried[0]} down to {batch}")
        batch //= 2


def folder_input(device: str, dry_run: bool) -> dict[str, Any]:
    """Views from JPEG files at the rate our default workers sustain: a wave of batches (one per
    worker) warms up, two more are timed."""
    workers = min(32, len(os.sched_getaffinity(0)))
    images = 256 if dry_run else 1536
    spec = {"device": device, "size": 64 if dry_run else 224, "batch_size": max(1, min(64, images // (3 * workers))),
            "num_images": images, "strength": 1.0, "warmup": workers, "batches": 2 * workers}
    return measure.folder_ours(spec)


class SectionTimeout(Exception):
    pass


def guarded(name: str, seconds: float, fn: Callable[[], dict]) -> dict:
    """``fn()``, or what stopped it: a section's error or its time must not lose the others."""
    def stop(signum, frame):
        raise SectionTimeout(f"stopped after {seconds:.0f} s")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    t0 = time.monotonic()
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - reported in the JSON, the next section still runs
        result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:400]}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    print(f"{name} ({time.monotonic() - t0:.0f} s): {json.dumps(result)[:400]}", flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=300.0, help="Seconds for all sections together.")
    parser.add_argument("--json", type=Path, help="Results file to merge into (default: $OUT/gpu.json).")
    parser.add_argument("--dry-run", action="store_true", help="Tiny sizes on the CPU: checks the script.")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device; use --dry-run to check the script on the CPU")
    device = "cpu" if args.dry_run else "cuda"
    r50, r18, least = (TINY, TINY, 2) if args.dry_run else (R50, R18, 16)
    precision16 = "bf16" if args.dry_run else "fp16"
    deadline = time.monotonic() + args.budget
    results: dict[str, Any] = {}

    def fitted() -> int:  # the largest ResNet-50 batch found to fit
        return results.get("resnet50_224", {}).get("batch", r50["batch"])
    sections: list[tuple[str, float, float, Callable[[], dict]]] = [  # (name, needs s, at most s, what)
        ("resnet50_224", 40, 120, lambda: largest_fitting(lambda b: throughput(r50, b, device), r50["batch"], least)),
        ("resnet18_cifar", 25, 90, lambda: largest_fitting(lambda b: throughput(r18, b, device), r18["batch"], least)),
        ("folder_224", 30, 90, lambda: folder_input(device, args.dry_run)),
        ("resnet50_224_fp16", 40, 120, lambda: largest_fitting(
            lambda b: throughput(r50, b, device, precision16), fitted(), least)),
        ("resnet50_224_profile", 30, 60, lambda: throughput(r50, fitted(), device, profile=True)),
        ("resnet50_224_compiled", 100, 200, lambda: largest_fitting(
            lambda b: throughput(r50, b, device, compile_model=True), fitted(), least)),
    ]
    for name, needs, cap, fn in sections:
        left = deadline - time.monotonic()
        if args.dry_run and name.endswith("compiled"):
            continue  # minutes of compilation on a small CPU
        results[name] = guarded(name, min(cap, left - 5), fn) if left >= needs else {"skipped": f"{left:.0f} s left"}
    if "images_per_s" in results["resnet18_cifar"]:
        results["resnet18_cifar"]["s_per_50k_epoch"] = 50_000 / results["resnet18_cifar"]["images_per_s"]
    path = args.json or Path(os.environ.get("OUT", ".")) / "gpu.json"
    info = common.machine(None if args.dry_run else torch.cuda.get_device_name(0))
    command = "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    common.record(path, info, {k: {**v, "command": command} for k, v in results.items()})
    print(f"merged into {path}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
