"""One benchmark measurement, run in its own process by ``run.py``.

``python benchmarks/measure.py '<spec JSON>'`` prints ``RESULT <JSON>`` as its last line. A fresh
process per measurement gives each side the same clean start (threads, oneDNN caches, peak
memory) and lets the peak memory of a DataLoader's workers be attributed to the right side.

Specs (``kind``):
* ``augment_ours``: ``SimCLRAugment`` two views of whole uint8 batches gathered at random from
  an in-memory set (what the ``batched`` pretraining path does per step), on ``device``.
* ``augment_reference``: the torchvision per-image pipeline in a DataLoader (``reference.py``).
* ``folder_ours``: two views per image from a folder of JPEGs, as folder pretraining makes them
  (``batches.pretrain_views``: crops in the DataLoader workers, the rest batched), default workers.
* ``folder_reference``: ``torchvision.datasets.ImageFolder`` with the per-image pipeline.
* ``e2e_ours``: ``simclrv2.stages.pretrain.run`` itself on a config from
  ``simclrv2.config.build``: our model, batched augmentation, NT-Xent, LARS, the shared loop and
  its runtime defaults (bf16 autocast where supported, channels-last). The batch source and the
  view maker are wrapped with timers, and hooks time the model's training forward and the
  optimiser step (nothing else changes), to split the step into data wait, augmentation,
  forward, optimiser, and backward with the rest.
* ``e2e_reference``: the reference loop (``reference.py``) on the same model (built from the
  same ``model_kwargs`` as ours), data and batch.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import reference  # noqa: E402

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# The two end-to-end configurations benchmarked; ``overrides`` go to ``simclrv2.config.build``.
E2E_MODELS: dict[str, dict[str, Any]] = {
    # The embedded default: what ``simclrv2 pipeline`` pretrains (preset "embedded": ResNet-18
    # at width 0.25, CIFAR stem, 28 px Fashion-MNIST, batch 256, T = 0.2).
    "embedded": {"dataset": "embedded", "image_size": 28, "overrides": {}},
    # ResNet-18 (width 1) with the CIFAR stem, batch 256, 32 px (preset "cifar": T = 0.5, s = 0.5).
    "resnet18": {"dataset": "cifar10", "image_size": 32, "overrides": {
        "model": {"resnet_depth": 18, "width_multiplier": 1.0, "cifar_stem": True},
        "optim": {"train_batch_size": 256}}},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device: torch.device, sampler: common.MemorySampler) -> dict[str, float]:
    out = {"peak_mem_mib": sampler.peak_mib, "peak_rss_main_mib": common.peak_rss_mib()}
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _memory_sampler(spec: dict[str, Any]) -> common.MemorySampler:
    return common.MemorySampler(spec.get("mem_interval", common.MEMORY_SAMPLE_INTERVAL))


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------
def augment_ours(spec: dict[str, Any]) -> dict[str, Any]:
    from simclrv2.data.augment import SimCLRAugment

    device = torch.device(spec["device"])
    size, batch = spec["size"], spec["batch_size"]
    with _memory_sampler(spec) as mem:
        images = torch.from_numpy(common.synthetic_images(spec["num_images"], size)).to(device)
        augment = SimCLRAugment(size, color_jitter_strength=spec["strength"], use_blur=size > 32)
        generator = torch.Generator().manual_seed(0)  # on the host, as the stages draw them
        picker = torch.Generator().manual_seed(1)
        times = []
        for _ in range(spec["warmup"] + spec["batches"]):
            t0 = time.perf_counter()
            idx = torch.randint(len(images), (batch,), generator=picker).to(device)
            x = images.index_select(0, idx)
            views = augment.views(x, 2, generator)
            _sync(device)
            times.append(time.perf_counter() - t0)  # includes the gather, as the loader's batch would
        timed = times[spec["warmup"]:]
    lo, hi = float(views.min()), float(views.max())
    return {"images_per_s": batch * len(timed) / sum(timed), "s_per_batch": sum(timed) / len(timed),
            "batch_size": batch, "timed_batches": len(timed), "threads": torch.get_num_threads(),
            "output_range": [lo, hi], "device": str(device), **_memory(device, mem)}


def augment_reference(spec: dict[str, Any]) -> dict[str, Any]:
    size, batch, workers = spec["size"], spec["batch_size"], spec["workers"]
    with _memory_sampler(spec) as mem:
        images = reference.to_hwc_rgb(common.synthetic_images(spec["num_images"], size))
        loader = reference.make_loader(images, size, batch, workers, spec["strength"])
        timing = _time_loader(loader, spec)
    del loader  # after the sampler's last sample, which must still see the workers
    return _reference_result(timing, spec, mem)


def _time_loader(loader, spec: dict[str, Any]) -> dict[str, Any]:
    """Timing of a reference DataLoader alone (its workers make the views)."""
    timer = common.StepTimer()
    timer.run(loader, spec["warmup"] + spec["batches"])
    return timer.summary(spec["warmup"], spec["batch_size"])


def _reference_result(timing: dict[str, Any], spec: dict[str, Any], mem: common.MemorySampler) -> dict[str, Any]:
    return {"images_per_s": timing["images_per_s"], "s_per_batch": timing["s_per_step"],
            "batch_size": spec["batch_size"], "timed_batches": timing["timed_steps"], "workers": spec["workers"],
            "threads": torch.get_num_threads(), "device": "cpu", **_memory(torch.device("cpu"), mem)}


def _folder(spec: dict[str, Any]) -> str:
    return str(common.write_synthetic_jpeg_folder(Path(tempfile.gettempdir()), spec["num_images"]))


def folder_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """What folder pretraining does per step before the model: DataLoader workers decode each
    JPEG and cut its two crops; the main process flips, jitters and blurs the batch."""
    from simclrv2.data import batches as B
    from simclrv2.data.datasets import ImageFolderDataset

    device = torch.device(spec["device"])
    size, batch = spec["size"], spec["batch_size"]
    root = _folder(spec)
    with _memory_sampler(spec) as mem:
        dataset = ImageFolderDataset(root, size)
        source, make_views = B.pretrain_views("batched", dataset, batch, 0, 0, 1, device, size, spec["strength"],
                                              True, spec.get("workers"))
        generator = torch.Generator().manual_seed(0)  # on the host, as the stages draw them
        shapes = []

        def step(images) -> None:
            shapes.append(list(make_views(images, generator).shape[1:]))
            _sync(device)
        timer = common.StepTimer()
        timer.run(source, spec["warmup"] + spec["batches"], step)
        result = timer.summary(spec["warmup"], batch)
        workers = source.dataloader.num_workers
    del source
    return {"images_per_s": result["images_per_s"], "s_per_batch": result["s_per_step"],
            "data_wait_fraction": result["data_wait_fraction"], "batch_size": batch,
            "timed_batches": result["timed_steps"], "workers": workers, "threads": torch.get_num_threads(),
            "view_shape": shapes[-1], "device": str(device), **_memory(device, mem)}


def folder_reference(spec: dict[str, Any]) -> dict[str, Any]:
    root = _folder(spec)
    with _memory_sampler(spec) as mem:
        loader = reference.make_folder_loader(root, spec["size"], spec["batch_size"], spec["workers"],
                                              spec["strength"])
        timing = _time_loader(loader, spec)
    del loader
    return _reference_result(timing, spec, mem)


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
def _data_dir(dataset: str, tmp: Path) -> str | None:
    """Where the e2e data comes from: the real Fashion-MNIST files when installed, else (and
    always for CIFAR-10, which this machine lacks) synthetic files in the same format."""
    if dataset == "embedded":
        if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
            return None
        return str(common.write_synthetic_fashion_mnist(tmp / "fmnist", 60000, 1000))
    return str(common.write_synthetic_cifar10(tmp / "cifar", 10240, 512))


def e2e_overrides(model_key: str, data_dir: str | None = None) -> dict[str, Any]:
    """``simclrv2.config.build`` overrides of an e2e model: its preset, model and data."""
    model = E2E_MODELS[model_key]
    overrides = json.loads(json.dumps(model["overrides"]))
    overrides.setdefault("data", {}).update({"dataset": model["dataset"], "data_dir": data_dir})
    return overrides


def _config(spec: dict[str, Any], data_dir: str | None, run_dir: Path):
    from simclrv2.config import build

    overrides = e2e_overrides(spec["model"], data_dir)
    overrides.setdefault("optim", {})["train_steps"] = 1000  # schedule length; we stop earlier
    overrides["runtime"] = {
        "device": spec["device"], "max_steps": spec["warmup"] + spec["steps"], "log_every_steps": 1,
        "checkpoint_steps": 10**9, "progress": False, "resume": False, "run_dir": str(run_dir),
        **spec.get("runtime", {})}
    return build("pretrain", overrides)


class _TimedSource:
    """A batch source whose iteration goes through a :class:`common.StepTimer`."""

    def __init__(self, source, timer: common.StepTimer):
        self._source, self._timer = source, timer

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self._source.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self._source)

    def __iter__(self):
        return self._timer.wrap(self._source)

    def __getattr__(self, name: str):
        return getattr(self._source, name)


def _phase_hooks(timer: common.StepTimer, name: str, device: torch.device,
                 applies: Callable[..., bool] = lambda *args: True) -> tuple[Callable, Callable]:
    """A (before, after) hook pair that marks the time between them as phase ``name`` of the
    current step, for calls where ``applies(*hook_args)`` holds."""
    started: list[float] = []

    def before(*args) -> None:
        if applies(*args):
            _sync(device)
            started[:] = [time.perf_counter()]

    def after(*args) -> None:
        if applies(*args):
            _sync(device)
            timer.mark(name, time.perf_counter() - started[0])
    return before, after


def e2e_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import simclrv2.data.batches as batches
    import simclrv2.stages.common as stage_common
    from simclrv2.stages import pretrain

    device = torch.device(spec["device"])
    timer = common.StepTimer()
    original_pretrain_views = batches.pretrain_views
    original_prepare, original_optimizer = pretrain.prepare_model, stage_common.build_optimizer

    def timed_prepare_model(*args, **kwargs):
        net = original_prepare(*args, **kwargs)
        # Training forwards of ``net`` itself: a deep copy (momentum encoder) keeps the hooks.
        before, after = _phase_hooks(timer, "forward", device, lambda module, *_: module is net and module.training)
        net.register_forward_pre_hook(before)
        net.register_forward_hook(after)
        return net

    def timed_build_optimizer(*args, **kwargs):
        optimizer = original_optimizer(*args, **kwargs)
        before, after = _phase_hooks(timer, "optimizer", device)
        optimizer.register_step_pre_hook(before)
        optimizer.register_step_post_hook(after)
        return optimizer

    def timed_pretrain_views(*args, **kwargs):
        source, make_views = original_pretrain_views(*args, **kwargs)
        if not time_phases:
            return _TimedSource(source, timer), make_views
        before, after = _phase_hooks(timer, "augment", device)

        def timed_views(batch, generator):
            before()
            views = make_views(batch, generator)
            after()
            return views
        return _TimedSource(source, timer), timed_views

    # Phase edges wait for the device: free on the CPU, but on a GPU they would stall its queue
    # and understate our loop, so there only the data wait is timed.
    time_phases = device.type == "cpu"
    batches.pretrain_views = timed_pretrain_views
    if time_phases:
        pretrain.prepare_model, stage_common.build_optimizer = timed_prepare_model, timed_build_optimizer
    with tempfile.TemporaryDirectory() as tmp, _memory_sampler(spec) as mem:
        cfg = _config(spec, _data_dir(E2E_MODELS[spec["model"]]["dataset"], Path(tmp)), Path(tmp) / "run")
        pretrain.run(cfg)
        logged = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    batch = cfg.optim.train_batch_size
    steps = [r for r in logged if r.get("kind") == "step"]
    timer.step_ends = [r["time"] for r in steps]  # logged right after each step (log_every_steps=1)
    result = timer.summary(spec["warmup"], batch)
    per_step = [r["images_per_s"] for r in steps][spec["warmup"]:]
    return {**result, "loop_images_per_s_median": float(np.median(per_step)) if per_step else None,
            "batch_size": batch, "image_size": E2E_MODELS[spec["model"]]["image_size"],
            "precision": cfg.runtime.precision, "channels_last": cfg.runtime.channels_last,
            "threads": torch.get_num_threads(), "device": str(device), **_memory(device, mem)}


def e2e_reference(spec: dict[str, Any]) -> dict[str, Any]:
    from simclrv2.data import build_dataset
    from simclrv2.models import build_simclrv2_model
    from simclrv2.stages.common import model_kwargs

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, _memory_sampler(spec) as mem:
        cfg = _config(spec, _data_dir(E2E_MODELS[spec["model"]]["dataset"], Path(tmp)), Path(tmp) / "run")
        data = build_dataset(cfg.data.dataset, cfg.data.data_dir, "train")
        images = reference.to_hwc_rgb(data.images.numpy())
        del data
        size = images.shape[1]
        model = build_simclrv2_model(**model_kwargs(cfg.model, size, None)).to(device)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
        batch = cfg.optim.train_batch_size
        loader = reference.make_loader(images, size, batch, spec["workers"], cfg.data.color_jitter_strength)
        timer = common.StepTimer()
        for i, (views, _) in enumerate(timer.wrap(loader)):
            loss = reference.train_step(model, optimizer, views, cfg.temperature, device)
            _sync(device)
            timer.end_step()
            if i + 1 == spec["warmup"] + spec["steps"]:
                break
        if not torch.isfinite(loss):
            raise RuntimeError(f"reference loss is {float(loss)}")
        result = timer.summary(spec["warmup"], batch)
    del loader  # after the sampler's last sample, which must still see the workers
    return {**result, "batch_size": batch, "image_size": size, "workers": spec["workers"], "precision": "fp32",
            "channels_last": False, "threads": torch.get_num_threads(), "device": str(device),
            **_memory(device, mem)}


KINDS = {"augment_ours": augment_ours, "augment_reference": augment_reference,
         "folder_ours": folder_ours, "folder_reference": folder_reference,
         "e2e_ours": e2e_ours, "e2e_reference": e2e_reference}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/measure.py '<spec JSON>' (run.py writes the specs)", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    load_before = common.load_average()
    result = KINDS[spec["kind"]](spec)
    result.update(load_before=load_before, load_after=common.load_average(), pid=os.getpid())
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
