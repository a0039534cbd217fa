"""GPU benchmark and CUDA correctness check of simclrv2, in one call with a hard time budget.

    python benchmarks/gpu.py [--budget 300] [--dry-run]

Sections (each guarded: an error or the clock skips it, the rest still runs):

1. ``correctness``: NT-Xent (loss and gradient) and one full training step (model, NT-Xent,
   LARS) agree between CUDA and the CPU; the augmentation runs on CUDA, returns float32 in
   [0, 1], and matches the CPU for the same random parameters (sent from the host or already
   on the device); making the views does not wait for the GPU (CUDA's sync debug mode); one
   fp16 autocast + ``GradScaler`` step is finite and updates the weights.
2. ``resnet50_224``: ResNet-50 at 224 px, two views of every image made on the GPU by
   ``SimCLRAugment`` from uint8 images already on the GPU (256 px), bf16 autocast,
   channels-last, NT-Xent, LARS: source images/s and views/s; also the step's phases alone
   (augmentation, forward + backward, optimiser), the host's time to queue the views, and
   (``resnet50_224_profile``) each kernel's share of the device time in three eager steps.
3. ``resnet18_cifar``: ResNet-18 with the CIFAR stem at 32 px, batch 512 (1024 views): seconds
   per 50 000-image epoch, extrapolated from timed steps.
4. ``resume``: ``simclrv2 pretrain`` itself on the device (tiny model, synthetic Fashion-MNIST
   files), stopped after 2 steps and resumed to 4, against an uninterrupted 4-step run: the
   resume must work on CUDA (random states restored from CPU tensors) and end at the same
   weights (exactly on the CPU; within cuDNN's run-to-run differences on the GPU).
5. ``folder_224``: two 224 px views per image from a folder of ImageNet-sized JPEGs, as
   folder pretraining makes them: DataLoader workers (the default count) decode and cut the
   crops, the GPU does the rest; images/s the input can feed to section 2's model.
6. ``stages``: every command on the device, tiny: ``simclrv2 pipeline`` with the MoCo-style
   memory, ``evaluate`` and ``export`` of the distilled student, and (CUDA only) ``pretrain``
   in fp16 with its gradient scaler, stopped and resumed.
7. ``resnet50_224_fp16``: section 2 in fp16 with the gradient scaler (``--precision fp16``):
   cuDNN's batch norm takes fp16 but not bf16 inputs.
8. ``resnet50_224_compiled``: section 2 with ``torch.compile``, only if enough time is left.

Out-of-memory lowers the batch (halving) and retries. A compact JSON summary is printed last
and written to ``$OUT/gpu.json`` when ``OUT`` is set. ``--dry-run`` runs everything on the CPU
at tiny sizes (and simulates one out-of-memory), to check the script itself.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from simclrv2.data.augment import SimCLRAugment, finetune_augment  # noqa: E402
from simclrv2.losses import nt_xent  # noqa: E402
from simclrv2.models import build_simclrv2_model  # noqa: E402
from simclrv2.optim import LARS, lars_param_groups  # noqa: E402

START = time.monotonic()


def elapsed() -> float:
    return time.monotonic() - START


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


class SectionTimeout(Exception):
    pass


@contextmanager
def alarm(seconds: float):
    """Raise :class:`SectionTimeout` in the main thread after ``seconds`` (SIGALRM)."""
    def handler(signum, frame):
        raise SectionTimeout(f"stopped after {seconds:.0f} s")
    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_uint8(n: int, size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) uint8 images with coarse colour structure plus noise, made on ``device``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    coarse = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8).to(device).float()
    field = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    noise = torch.randn(field.shape, generator=torch.Generator(device=device).manual_seed(seed), device=device)
    return (field + 12.0 * noise).clamp_(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Training step (the pieces of simclrv2.stages.pretrain's step, without the loop around it)
# ---------------------------------------------------------------------------------------------
class Trainer:
    """Model + LARS + SimCLRAugment on one device; ``step(images)`` is one pretraining step.
    fp16 on CUDA adds the gradient scaler, as ``--precision fp16`` does."""

    def __init__(self, depth: int, width: float, cifar_stem: bool, image_size: int, device: torch.device,
                 dtype: Optional[torch.dtype], channels_last: bool, blur: bool, compile_model: bool = False,
                 temperature: float = 0.1, seed: int = 0):
        torch.manual_seed(seed)
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        self.model = build_simclrv2_model(depth, width, cifar_stem=cifar_stem).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = LARS(lars_param_groups(self.model, 1e-6), lr=0.3, momentum=0.9, weight_decay=1e-6)
        self.net = torch.compile(self.model) if compile_model else self.model
        self.augment = SimCLRAugment(image_size, color_jitter_strength=1.0, use_blur=blur)
        self.generator = torch.Generator().manual_seed(seed)  # on the host, as the stages draw them
        self.temperature = temperature
        use_scaler = dtype is torch.float16 and device.type == "cuda"
        self.scaler = torch.amp.GradScaler(device.type) if use_scaler else None
        self.model.train()

    def views(self, images: torch.Tensor) -> torch.Tensor:
        x = self.augment.views(images, 2, self.generator)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward_backward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            projection, _ = self.net(x)
            loss = nt_xent(projection, self.temperature)[0]
        self.optimizer.zero_grad(set_to_none=True)
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        return loss.detach()

    def optimizer_step(self) -> None:
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def step(self, images: torch.Tensor) -> torch.Tensor:
        loss = self.forward_backward(self.views(images))
        self.optimizer_step()
        return loss


def kernel_profile(spec: dict[str, Any], batch: int, device: torch.device, steps: int = 3) -> dict[str, Any]:
    """Share of the device time per kernel (top 12) over ``steps`` eager training steps, from
    ``torch.profiler``; the table also goes to ``$OUT/profile_resnet50.txt``."""
    from torch.profiler import ProfilerActivity, profile

    model = {k: v for k, v in spec.items() if k in ("depth", "width", "cifar_stem", "image_size", "dtype", "blur")}
    trainer = Trainer(device=device, channels_last=True, **model)
    images = synthetic_uint8(batch, spec["source_size"], device)
    for _ in range(2):
        trainer.step(images)
    sync(device)
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            trainer.step(images)
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in rows) or 1.0
    if os.environ.get("OUT"):
        table = prof.key_averages().table(sort_by=attr, row_limit=30, max_name_column_width=90)
        (Path(os.environ["OUT"]) / "profile_resnet50.txt").write_text(table)
    return {"batch": batch, "steps": steps, "top": [[e.key[:90], round(getattr(e, attr) / total, 4)] for e in rows[:12]]}


def with_oom_retry(fn: Callable[[int], dict], batch: int, minimum: int, simulate_oom: bool = False) -> dict:
    """``fn(batch)``, halving ``batch`` on CUDA out-of-memory until ``minimum``."""
    tried = []
    while True:
        try:
            if simulate_oom and not tried:
                raise torch.OutOfMemoryError("simulated out of memory (--dry-run)")
            result = fn(batch)
            if tried:
                result["oom_retries"] = tried
            return result
        except torch.OutOfMemoryError:
            tried.append(batch)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if batch // 2 < minimum:
                raise
            log(f"out of memory at batch {batch}; retrying with {batch // 2}")
            batch //= 2


def throughput(depth: int, width: float, cifar_stem: bool, image_size: int, source_size: int, batch: int,
               warmup: int, steps: int, device: torch.device, dtype: Optional[torch.dtype], blur: bool,
               compile_model: bool = False) -> dict[str, Any]:
    """Timed pretraining steps; images/s counts source images (each gives two views)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(depth, width, cifar_stem, image_size, device, dtype, True, blur, compile_model)
    pool = synthetic_uint8(max(2 * batch, 64), source_size, device)
    picker = torch.Generator(device=device).manual_seed(1)

    def batch_images() -> torch.Tensor:
        return pool.index_select(0, torch.randint(len(pool), (batch,), generator=picker, device=device))

    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = trainer.step(batch_images())
    sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = trainer.step(batch_images())
    sync(device)
    step_s = (time.perf_counter() - t0) / steps
    images = batch_images()
    views = trainer.views(images)

    def seconds_each(fn: Callable[[], Any]) -> float:
        """Mean seconds of ``fn`` run alone ``steps`` times (the step's phases, one at a time)."""
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / steps
    aug_s = seconds_each(lambda: trainer.views(images))
    enqueue_s = host_seconds_each(lambda: trainer.views(images), device, steps)
    model_s = seconds_each(lambda: trainer.forward_backward(views))
    optimizer_s = seconds_each(trainer.optimizer_step)
    out = {"batch": batch, "views_per_step": 2 * batch, "image_size": image_size, "source_size": source_size,
           "s_per_step": step_s, "images_per_s": batch / step_s, "views_per_s": 2 * batch / step_s,
           "augment_s_per_step": aug_s, "augment_fraction": aug_s / step_s,
           "augment_images_per_s": batch / aug_s, "augment_host_enqueue_s": enqueue_s,
           "forward_backward_s_per_step": model_s,
           "optimizer_s_per_step": optimizer_s, "warmup_s": warm_s, "timed_steps": steps,
           "final_loss": float(loss), "loss_finite": bool(torch.isfinite(loss))}
    if device.type == "cuda":
        out["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def host_seconds_each(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Mean seconds until ``fn`` returns, started on an idle device each time: the host's cost to
    queue it, which the device can hide only if ``fn`` never waits for it."""
    total = 0.0
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        total += time.perf_counter() - t0
    sync(device)
    return total / repeats


def views_wait_for_device(device: torch.device) -> dict[str, Any]:
    """Whether the pretraining views and the fine-tuning crops, with parameters from a host
    generator as in the stages, make the host wait for the GPU: CUDA's synchronisation debug
    mode turns any such wait in PyTorch into an error (waits inside cuDNN stay unseen)."""
    if device.type != "cuda":
        return {"ok": True, "checked": False}
    views, crops = SimCLRAugment(32, use_blur=True), finetune_augment(32)
    images = synthetic_uint8(64, 40, device)
    generator = torch.Generator().manual_seed(0)
    views.views(images, 2, generator)  # first calls: per-device caches
    crops(images, generator)
    torch.cuda.synchronize(device)
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        views.views(images, 2, generator)
        crops(images, generator)
        return {"ok": True, "checked": True}
    except RuntimeError as error:
        return {"ok": False, "checked": True, "error": str(error).splitlines()[0]}
    finally:
        torch.cuda.set_sync_debug_mode(mode)


# ---------------------------------------------------------------------------------------------
# Correctness: CUDA against the CPU
# ---------------------------------------------------------------------------------------------
def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().cpu().double() - b.detach().cpu().double()).abs().max())


def correctness(device: torch.device, dry_run: bool) -> dict[str, Any]:
    """CPU float32 is the reference; TF32 is turned off for the comparison, then restored."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return _compare_with_cpu(device, dry_run)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _compare_with_cpu(device: torch.device, dry_run: bool) -> dict[str, Any]:
    """The correctness checks themselves (see the module docstring, section 1)."""
    out: dict[str, Any] = {}
    cpu = torch.device("cpu")

    # NT-Xent: loss and gradient.
    h = torch.randn(128, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    grads = []
    losses = []
    for dev in (cpu, device):
        x = h.to(dev, copy=True).requires_grad_(True)  # a fresh leaf per device
        loss = nt_xent(x, 0.1)[0]
        loss.backward()
        losses.append(loss.detach().cpu())
        grads.append(x.grad.cpu())
    out["nt_xent"] = {"loss_cpu": float(losses[0]), "loss_diff": _max_diff(*losses),
                      "grad_max_diff": _max_diff(*grads), "grad_max_abs": float(grads[0].abs().max())}
    out["nt_xent"]["ok"] = out["nt_xent"]["loss_diff"] < 1e-4 and out["nt_xent"]["grad_max_diff"] < 1e-5

    # One full training step (fp32, contiguous): same weights, same views, then compare.
    images = synthetic_uint8(16, 32, cpu, seed=3)
    aug = SimCLRAugment(32, 1.0, use_blur=False)
    g = torch.Generator().manual_seed(5)
    views = torch.cat([aug(images, g), aug(images, g)])
    states, step_losses = [], []
    for dev in (cpu, device):
        trainer = Trainer(18, 0.25, True, 32, dev, None, False, False, seed=7)
        projection, _ = trainer.model(views.to(dev))
        loss = nt_xent(projection, 0.1)[0]
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        step_losses.append(loss.detach().cpu())
        states.append({k: v.detach().cpu() for k, v in trainer.model.state_dict().items() if v.is_floating_point()})
    param_diff = max(_max_diff(states[0][k], states[1][k]) for k in states[0])
    out["train_step"] = {"loss_cpu": float(step_losses[0]), "loss_diff": _max_diff(*step_losses),
                         "param_max_diff": param_diff}
    out["train_step"]["ok"] = out["train_step"]["loss_diff"] < 1e-3 and param_diff < 1e-4

    # Augmentation on the device: range, dtype, and the same parameters give the same views.
    for size, source, blur in ((32, 32, False), (96, 112, True), (224, 256, True)):
        if dry_run and size > 96:
            continue
        aug = SimCLRAugment(size, 1.0, use_blur=blur)
        src = synthetic_uint8(32, source, cpu, seed=size)
        params = aug.sample_params(32, source, source, torch.Generator().manual_seed(size))
        on_cpu = aug.apply(src, params)
        on_dev = aug.apply(src.to(device), params.to(device))
        host_params = aug.apply(src.to(device), params)  # the stages' path: parameters sent from the host
        random_dev = aug(src.to(device), torch.Generator(device=device).manual_seed(0))
        sync(device)
        row = {"dtype": str(on_dev.dtype), "shape": list(on_dev.shape), "min": float(random_dev.min()),
               "max": float(random_dev.max()), "max_diff_vs_cpu": _max_diff(on_cpu, on_dev),
               "host_params_max_diff_vs_cpu": _max_diff(on_cpu, host_params),
               "mean_abs_diff_vs_cpu": float((on_cpu.double() - on_dev.cpu().double()).abs().mean())}
        row["ok"] = (on_dev.dtype == torch.float32 and on_dev.device.type == device.type
                     and row["min"] >= 0.0 and row["max"] <= 1.0 and row["max_diff_vs_cpu"] < 1e-3
                     and row["host_params_max_diff_vs_cpu"] < 1e-3)
        out[f"augment_{size}"] = row

    # The pretraining loop makes its views inside the step's autocast region: the augmentation
    # must stay float32 and finite there (fp16 cannot hold its 1e-12 guards, so it gives NaNs).
    aug = SimCLRAugment(32, 1.0, use_blur=False)
    src = synthetic_uint8(64, 32, device, seed=4)
    src[:8] = 128  # flat grey images: zero chroma, the case that divides by the guard
    reference_views = aug(src, torch.Generator(device=device).manual_seed(2))
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        with torch.autocast(device.type, dtype=dtype):
            v = aug(src, torch.Generator(device=device).manual_seed(2))
        bad = int((~torch.isfinite(v.float())).flatten(1).any(1).sum())
        row = {"dtype": str(v.dtype), "nonfinite_images": bad,
               "max_diff_vs_fp32": _max_diff(torch.nan_to_num(v.float(), nan=9.0), reference_views)}
        row["ok"] = v.dtype == torch.float32 and bad == 0 and row["max_diff_vs_fp32"] < 1e-3
        out[f"augment_under_{name}_autocast"] = row

    # fp16 autocast + GradScaler (views made outside autocast). The first steps may be skipped
    # while the scaler lowers its initial 2**16 scale, so up to 8 steps are tried.
    trainer = Trainer(18, 0.25, True, 32, device, None, device.type == "cuda", False, seed=11)
    scaler = torch.amp.GradScaler(device.type)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    views = trainer.views(images.to(device))
    losses, changed = [], 0
    for _ in range(8):
        with torch.autocast(device.type, dtype=torch.float16):
            projection, _ = trainer.model(views)
            loss = nt_xent(projection, 0.1)[0]
        trainer.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(trainer.optimizer)
        scaler.update()
        losses.append(float(loss.detach()))
        changed = sum(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.model.parameters()))
        if changed:
            break
    out["fp16_grad_scaler"] = {"losses": losses, "scale": float(scaler.get_scale()), "steps": len(losses),
                               "params_changed": changed, "params_total": len(before)}
    out["fp16_grad_scaler"]["ok"] = all(map(math.isfinite, losses)) and changed > 0
    out["views_never_wait_for_device"] = views_wait_for_device(device)
    out["all_ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


# ---------------------------------------------------------------------------------------------
def folder_pipeline(device: torch.device, dry_run: bool) -> dict[str, Any]:
    """Views from JPEG files at the rate the workers sustain (section 5): one wave of batches
    (one per worker) warms up, two more are timed."""
    import tempfile

    from simclrv2.data import batches as B
    from simclrv2.data.datasets import ImageFolderDataset
    from simclrv2.data.loader import default_num_workers

    images, size = (384, 64) if dry_run else (1536, 224)
    workers = default_num_workers()
    batch = max(1, min(64, images // (3 * workers)))
    root = common.write_synthetic_jpeg_folder(Path(tempfile.gettempdir()), images)
    source, make_views = B.pretrain_views("batched", ImageFolderDataset(root, size), batch, 0, 0, 1, device, size,
                                          1.0, True)
    generator = torch.Generator().manual_seed(0)
    timer = common.StepTimer()
    timer.run(source, 3 * workers, lambda batch_data: (make_views(batch_data, generator), sync(device)))
    result = timer.summary(workers, batch)
    return {"images_per_s": result["images_per_s"], "views_per_s": 2 * result["images_per_s"],
            "data_wait_fraction": result["data_wait_fraction"], "workers": workers, "batch": batch,
            "cpus": len(os.sched_getaffinity(0))}


def resume_check(device: torch.device) -> dict[str, Any]:
    """A pretraining run stopped and resumed ends where an uninterrupted one does (section 5)."""
    import tempfile

    from simclrv2.config import build
    from simclrv2.engine.checkpoint import load_checkpoint
    from simclrv2.stages import pretrain

    with tempfile.TemporaryDirectory() as tmp:
        data = common.write_synthetic_fashion_mnist(Path(tmp) / "data", 256, 64)

        def run(name: str, max_steps: Optional[int]) -> dict[str, torch.Tensor]:
            pretrain.run(build("pretrain", {
                "data": {"dataset": "embedded", "data_dir": str(data)},
                "model": {"resnet_depth": 18, "width_multiplier": 0.125},
                "optim": {"train_batch_size": 32, "train_steps": 4},
                "runtime": {"device": device.type, "max_steps": max_steps, "checkpoint_steps": 2, "progress": False,
                            "log_every_steps": 1, "run_dir": str(Path(tmp) / name)}}))
            return load_checkpoint(Path(tmp) / name / "checkpoints" / "last.pt")["model"]

        run("stopped", 2)
        resumed, straight = run("stopped", None), run("straight", None)
    diff = max(_max_diff(resumed[k].float(), v.float()) for k, v in straight.items() if v.is_floating_point())
    return {"max_weight_diff": diff, "ok": diff == 0.0 if device.type == "cpu" else diff < 1e-2}


def stages_check(device: torch.device) -> dict[str, Any]:
    """Every command on the device (section 6): ``simclrv2 pipeline`` on a tiny model with the
    MoCo-style memory on (pretrain, linear eval, fine-tune, distill, baseline, report), then
    ``evaluate`` and ``export`` of its distilled student (by the command, and by the Python API
    from the model on the device), then ``pretrain`` in fp16 with its
    gradient scaler (CUDA only) stopped after 2 steps and resumed."""
    import tempfile

    import simclrv2
    from simclrv2.cli import main as cli
    from simclrv2.engine.checkpoint import load_checkpoint
    from simclrv2.export import export_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = common.write_synthetic_fashion_mnist(root / "data", 256, 64)
        shared = ["--data-dir", str(data), "--device", device.type, "--progress", "false", "--eval-batch-size", "64"]
        codes = {"pipeline": cli(["pipeline", *shared, "--run-dir", str(root / "pipeline"),
                                  "--pretrain.width-multiplier", "0.125", "--pretrain.train-steps", "4",
                                  "--pretrain.train-batch-size", "32", "--pretrain.use-memory", "true",
                                  "--pretrain.memory-size", "64", "--finetune.train-steps", "2",
                                  "--baseline.train-steps", "2", "--distill.train-steps", "2",
                                  "--distill.train-batch-size", "32", "--linear-eval.train-steps", "2",
                                  "--label-fractions", "0.5"])}
        out: dict[str, Any] = {}
        students = sorted((root / "pipeline").glob("*/distill"))
        if codes["pipeline"] == 0 and students:
            report = json.loads((root / "pipeline" / "report.json").read_text())
            out["report_top1"] = {fraction: {stage: entry[stage]["top1"] for stage in entry
                                             if isinstance(entry[stage], dict) and "top1" in entry[stage]}
                                  for fraction, entry in report["label_fractions"].items()}
            codes["evaluate"] = cli(["evaluate", *shared, "--checkpoint", str(students[0]),
                                     "--run-dir", str(root / "evaluate")])
            out["evaluate"] = json.loads((root / "evaluate" / "eval.json").read_text()) if codes["evaluate"] == 0 else None
            for fmt, name in (("safetensors", "student.safetensors"), ("onnx", "student.onnx")):
                codes[f"export_{fmt}"] = cli(["export", "--format", fmt, str(students[0]), str(root / name)])
            # The Python API exports a model wherever it lives (the command loads on the CPU).
            on_device = simclrv2.load(students[0], device=device)
            export_model(on_device, root / "on_device.onnx", "onnx", 28)
            out["api_export_left_model_on"] = str(next(on_device.parameters()).device)
        if device.type == "cuda":
            fp16 = ["pretrain", *shared, "--run-dir", str(root / "fp16"), "--width-multiplier", "0.125",
                    "--train-batch-size", "32", "--train-steps", "4", "--precision", "fp16", "--checkpoint-steps", "2"]
            codes["pretrain_fp16_stopped"] = cli([*fp16, "--max-steps", "2"])
            codes["pretrain_fp16_resumed"] = cli(fp16)
            out["fp16_resumed_step"] = load_checkpoint(root / "fp16" / "checkpoints" / "last.pt")["step"]
    out["exit_codes"] = codes
    out["ok"] = all(code == 0 for code in codes.values()) and "evaluate" in codes and (
        device.type != "cuda" or out.get("fp16_resumed_step") == 4) and (
        out.get("api_export_left_model_on", "").startswith(device.type))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=300.0, help="Seconds for everything (sections are skipped "
                        "or cut short to stay inside it).")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the script, not the GPU.")
    parser.add_argument("--no-compile", action="store_true", help="Skip the torch.compile section.")
    parser.add_argument("--compile-in-dry-run", action="store_true",
                        help="Also try torch.compile in a dry run (slow on a small CPU).")
    args = parser.parse_args(argv)

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("no CUDA device; use --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    summary: dict[str, Any] = {
        "device": "cpu (dry run)" if dry else torch.cuda.get_device_name(0), "torch": torch.__version__,
        "dry_run": dry, "budget_s": args.budget,
        "note": "images_per_s counts source images per second; each gives two views (views_per_s)"}
    bf16 = torch.bfloat16

    def section(name: str, need_s: float, fn: Callable[[], Any], cap_s: Optional[float] = None) -> None:
        left = args.budget - elapsed()
        if left < need_s:
            summary[name] = {"skipped": f"only {left:.0f} s left of the budget, needs ~{need_s:.0f} s"}
            log(f"{name}: skipped (time)")
            return
        log(f"{name}: start")
        try:
            with alarm(min(cap_s or left, left) - 5):
                summary[name] = fn()
        except Exception as err:  # one failing section must not lose the others
            summary[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:400]}
            traceback.print_exc()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log(f"{name}: {json.dumps(summary[name])[:300]}")

    section("correctness", 15, lambda: correctness(device, dry), cap_s=90)
    if dry:
        r50 = dict(depth=50, width=0.25, cifar_stem=False, image_size=64, source_size=72, warmup=1, steps=1,
                   device=device, dtype=bf16, blur=True)
        r18 = dict(depth=18, width=0.25, cifar_stem=True, image_size=32, source_size=32, warmup=1, steps=2,
                   device=device, dtype=bf16, blur=False)
        b50, b18, min_batch = 8, 16, 2
    else:
        r50 = dict(depth=50, width=1.0, cifar_stem=False, image_size=224, source_size=256, warmup=4, steps=10,
                   device=device, dtype=bf16, blur=True)
        r18 = dict(depth=18, width=1.0, cifar_stem=True, image_size=32, source_size=32, warmup=5, steps=20,
                   device=device, dtype=bf16, blur=False)
        b50, b18, min_batch = 256, 512, 16
    section("resnet50_224", 40, lambda: with_oom_retry(lambda b: throughput(batch=b, **r50), b50, min_batch,
                                                        simulate_oom=dry), cap_s=120)
    section("resnet50_224_profile", 30, lambda: kernel_profile(
        r50, summary.get("resnet50_224", {}).get("batch", b50), device), cap_s=60)

    def cifar() -> dict[str, Any]:
        result = with_oom_retry(lambda b: throughput(batch=b, **r18), b18, min_batch)
        result["s_per_50k_epoch"] = 50_000 / result["images_per_s"]
        return result
    section("resnet18_cifar", 25, cifar, cap_s=90)
    section("resume", 20, lambda: resume_check(device), cap_s=60)
    section("folder_224", 30, lambda: folder_pipeline(device, dry), cap_s=90)
    section("stages", 40, lambda: stages_check(device), cap_s=120)
    # bf16 batch norm runs on PyTorch's own kernels (38 % of the eager step); fp16 can use cuDNN's.
    section("resnet50_224_fp16", 40, lambda: with_oom_retry(
        lambda b: throughput(batch=b, **dict(r50, dtype=torch.float16)), b50, min_batch), cap_s=120)
    if not args.no_compile and (not dry or args.compile_in_dry_run):
        def compiled() -> dict[str, Any]:
            spec = dict(r50, warmup=3, steps=10) if not dry else r50
            return with_oom_retry(lambda b: throughput(batch=b, compile_model=True, **spec),
                                  summary.get("resnet50_224", {}).get("batch", b50), min_batch)
        section("resnet50_224_compiled", 100, compiled)

    summary["elapsed_s"] = round(elapsed(), 1)
    ok = all(summary.get(name, {}).get(flag, False) for name, flag in
             (("correctness", "all_ok"), ("resume", "ok"), ("stages", "ok")))
    compact = json.dumps(summary, separators=(",", ":"), default=str)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "gpu.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        log(f"wrote {path}")
    print("GPU_SUMMARY " + compact, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
