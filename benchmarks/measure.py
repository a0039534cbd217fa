"""One measurement in its own process: ``python benchmarks/measure.py '<spec JSON>'`` prints
``RESULT <JSON>`` last. A fresh process gives each side the same clean start (threads, oneDNN
caches, peak memory) and charges a DataLoader's workers to the right side.

Kinds: ``augment_*`` (two views of uint8 batches), ``folder_*`` (two 224 px views from JPEG
files), ``e2e_*`` (pretraining). Ours: ``SimCLRAugment.views``; folder pretraining's batch source
and view maker; ``simclrv2.stages.pretrain.run`` itself. The reference: ``reference.py``.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import reference  # noqa: E402

# The e2e models: ``create`` is the ``simclrv2.create_model`` name and overrides of the same
# architecture, ``overrides`` go to ``simclrv2.config.build`` (temperature, batch, colour strength).
E2E_MODELS: dict[str, dict[str, Any]] = {
    # The embedded default that ``simclrv2 pipeline`` pretrains: ResNet-18 w0.25, CIFAR stem,
    # 28 px Fashion-MNIST, batch 256, T = 0.2.
    "embedded": {"create": ["r18_0p25x_sk0_cifar", {}], "image_size": 28, "overrides": {"data": {"dataset": "embedded"}}},
    # ResNet-18 w1, CIFAR stem, 32 px, batch 256 (preset "cifar": T = 0.5, s = 0.5).
    "resnet18": {"create": ["r50_1x_sk0_cifar", {"resnet_depth": 18}], "image_size": 32, "overrides": {
        "data": {"dataset": "cifar10"}, "model": {"resnet_depth": 18, "width_multiplier": 1.0, "cifar_stem": True},
        "optim": {"train_batch_size": 256}}},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def e2e_model(key: str) -> torch.nn.Module:
    """The e2e architecture without its supervised head (which only helps the reference)."""
    import simclrv2

    name, overrides = E2E_MODELS[key]["create"]
    return simclrv2.create_model(name, num_classes=None, **overrides)


def e2e_config(key: str, device: str = "cpu", data_dir: str | None = None, run_dir: str | None = None,
               max_steps: int | None = None, runtime: dict[str, Any] | None = None):
    """The pretraining config of an e2e model: its preset plus the benchmark's data and runtime."""
    from simclrv2.config import build

    overrides = json.loads(json.dumps(E2E_MODELS[key]["overrides"]))
    overrides["data"]["data_dir"] = data_dir
    overrides.setdefault("optim", {})["train_steps"] = 1000  # the schedule's length; we stop earlier
    overrides["runtime"] = {"device": device, "max_steps": max_steps, "log_every_steps": 1, "checkpoint_steps": 10**9,
                            "progress": False, "resume": False, "run_dir": run_dir, **(runtime or {})}
    return build("pretrain", overrides)


def _data_dir(key: str, tmp: Path) -> str | None:
    """The real Fashion-MNIST where installed, else synthetic files in the dataset's own format."""
    if key == "embedded":
        if (common.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
            return None
        return str(common.write_synthetic_fashion_mnist(tmp / "fmnist", 60000, 1000))
    return str(common.write_synthetic_cifar10(tmp / "cifar", 10240, 512))


def _memory(device: torch.device, sampler: common.MemorySampler) -> dict[str, float]:
    out = {"peak_mem_mib": sampler.peak_mib}
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def augment_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """Two views of a uint8 batch gathered at random from memory, as the batched path makes them."""
    from simclrv2.data import SimCLRAugment

    device, size, batch = torch.device(spec["device"]), spec["size"], spec["batch_size"]
    with common.MemorySampler() as mem:
        images = torch.from_numpy(common.synthetic_images(spec["num_images"], size)).to(device)
        augment = SimCLRAugment(size, color_jitter_strength=spec["strength"], use_blur=size > 32)
        generator, picker = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
        timer = common.StepTimer()

        def gathered():
            while True:
                yield images.index_select(0, torch.randint(len(images), (batch,), generator=picker).to(device))
        timer.run(gathered(), spec["warmup"] + spec["batches"], lambda x: (augment.views(x, 2, generator), sync(device)))
    # The gather counts as the loader's batch would: data wait here is part of our time.
    return {**timer.summary(spec["warmup"], batch), "threads": torch.get_num_threads(), **_memory(device, mem)}


def _reference(spec: dict[str, Any], images) -> dict[str, Any]:
    """The reference's DataLoader alone (its workers make the views), over an array or a folder."""
    with common.MemorySampler() as mem:
        loader = reference.make_loader(images() if callable(images) else images, spec["size"], spec["batch_size"],
                                       spec["workers"], spec["strength"])
        timer = common.StepTimer()
        timer.run(loader, spec["warmup"] + spec["batches"])
    del loader  # after the sampler's last sample, which must still see the workers
    return {**timer.summary(spec["warmup"], spec["batch_size"]), **_memory(torch.device("cpu"), mem)}


def augment_reference(spec: dict[str, Any]) -> dict[str, Any]:
    return _reference(spec, lambda: reference.to_hwc_rgb(common.synthetic_images(spec["num_images"], spec["size"])))


def _jpegs(spec: dict[str, Any]) -> Path:
    return common.write_synthetic_jpeg_folder(Path(tempfile.gettempdir()), spec["num_images"])


def folder_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """Folder pretraining's input: DataLoader workers (our default count) decode each JPEG and cut
    its two crops; the main process flips, jitters and blurs the batch."""
    from simclrv2.data import ImageFolderDataset
    from simclrv2.data.batches import pretrain_views
    from simclrv2.engine.runtime import Runtime

    device, size, batch = torch.device(spec["device"]), spec["size"], spec["batch_size"]
    root = _jpegs(spec)
    with common.MemorySampler() as mem:
        rt = Runtime(device=device, dtype=None, channels_last=False, rank=0, world_size=1)
        source, make_views = pretrain_views(ImageFolderDataset(root, size), rt, augmentation="batched", batch_size=batch,
                                            seed=0, image_size=size, strength=spec["strength"], use_blur=True)
        generator = torch.Generator().manual_seed(0)
        timer = common.StepTimer()
        timer.run(source, spec["warmup"] + spec["batches"], lambda b: (make_views(b, generator), sync(device)))
        workers = source.dataloader.num_workers
    del source
    return {**timer.summary(spec["warmup"], batch), "workers": workers, **_memory(device, mem)}


def folder_reference(spec: dict[str, Any]) -> dict[str, Any]:
    return _reference(spec, str(_jpegs(spec)))


class _TimedSource:
    """A batch source whose iteration goes through a :class:`common.StepTimer`."""

    def __init__(self, source, timer: common.StepTimer):
        self._source, self._timer = source, timer

    def __iter__(self):
        return self._timer.wrap(self._source)

    def __len__(self) -> int:
        return len(self._source)

    def __getattr__(self, name: str):
        return getattr(self._source, name)


def timed_train(train, timer: common.StepTimer, device: torch.device, phases: bool):
    """``train`` (the engine's loop) with the task's batches timed and, when ``phases``, each step
    split into views (step start to the model's training forward), forward, and optimiser. Phase
    edges wait for the device, so on a GPU only the data wait is timed."""
    def timed(task, *args, **kwargs):
        task.batches = _TimedSource(task.batches, timer)
        if phases:
            started: list[float] = []
            step_fn = task.step_fn

            def timed_step(batch, step):
                started[:] = [time.perf_counter()]
                return step_fn(batch, step)

            def edge(name):
                def hook(module, *_):
                    if not isinstance(module, torch.nn.Module) or (module.training and torch.is_grad_enabled()):
                        now = time.perf_counter()
                        timer.mark(name, now - started[0])
                        started[:] = [now]
                return hook

            def start(*_):
                started[:] = [time.perf_counter()]
            task.step_fn = timed_step
            task.model.register_forward_pre_hook(edge("augment"))  # views and their copy to the device
            task.model.register_forward_hook(edge("forward"))
            task.optimizer.register_step_pre_hook(start)
            task.optimizer.register_step_post_hook(edge("optimizer"))
        return train(task, *args, **kwargs)
    return timed


def e2e_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """``simclrv2.stages.pretrain.run`` itself: its preset, runtime defaults and data; the engine's
    loop is only wrapped with timers (:func:`timed_train`)."""
    from simclrv2.stages import pretrain

    device, timer = torch.device(spec["device"]), common.StepTimer()
    pretrain.train = timed_train(pretrain.train, timer, device, phases=device.type == "cpu")
    with tempfile.TemporaryDirectory() as tmp, common.MemorySampler() as mem:
        cfg = e2e_config(spec["model"], spec["device"], _data_dir(spec["model"], Path(tmp)), str(Path(tmp) / "run"),
                         spec["warmup"] + spec["steps"], spec.get("runtime"))
        pretrain.run(cfg)
        logged = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    # The loop logs right after each step (log_every_steps=1): those times end the steps.
    offset = time.perf_counter() - time.time()
    timer.step_ends = [r["time"] + offset for r in logged if r.get("kind") == "step"]
    return {**timer.summary(spec["warmup"], cfg.optim.train_batch_size), "precision": cfg.runtime.precision,
            "channels_last": cfg.runtime.channels_last, "threads": torch.get_num_threads(), **_memory(device, mem)}


def e2e_reference(spec: dict[str, Any]) -> dict[str, Any]:
    """The reference loop on the same architecture, data, batch, temperature and colour strength."""
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, common.MemorySampler() as mem:
        cfg = e2e_config(spec["model"], data_dir=_data_dir(spec["model"], Path(tmp)))
        images = reference.to_hwc_rgb(common.read_train_images(cfg.data.dataset, cfg.data.data_dir))
        model = e2e_model(spec["model"]).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
        batch = cfg.optim.train_batch_size
        loader = reference.make_loader(images, images.shape[1], batch, spec["workers"], cfg.data.color_jitter_strength)
        timer = common.StepTimer()
        timer.run(loader, spec["warmup"] + spec["steps"],
                  lambda b: (reference.train_step(model, optimizer, b[0], cfg.temperature, device), sync(device)))
        result = timer.summary(spec["warmup"], batch)
    del loader  # after the sampler's last sample, which must still see the workers
    return {**result, "precision": "fp32", "channels_last": False, "threads": torch.get_num_threads(),
            **_memory(device, mem)}


KINDS = {f.__name__: f for f in (augment_ours, augment_reference, folder_ours, folder_reference, e2e_ours, e2e_reference)}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/measure.py '<spec JSON>' (run.py writes the specs)", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = KINDS[spec["kind"]](spec)
    print("RESULT " + json.dumps({**result, "pid": os.getpid()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
