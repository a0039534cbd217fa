"""What the benchmarks share: synthetic data, timers, memory, machine load, and the results file.

Nothing here imports ``simclrv2``: the reference (``reference.py``) stays independent of the code
under test.
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
import platform
import re
import resource
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------------------------
# Synthetic data (no decoding happens in a timed step, so the content does not change the cost)
# ---------------------------------------------------------------------------------------------
def synthetic_images(n: int, size: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """``(n, channels, size, size)`` uint8: a smooth random colour field plus pixel noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, channels, 8, 8), dtype=np.uint8).astype(np.float32)
    reps = -(-size // 8)
    field = np.repeat(np.repeat(coarse, reps, axis=2), reps, axis=3)[:, :, :size, :size]
    k = max(1, reps // 2)
    smooth = field.copy()
    for shift in range(1, k + 1):
        smooth += np.roll(field, shift, axis=2) + np.roll(field, shift, axis=3)
    smooth /= 1 + 2 * k
    return np.clip(smooth + rng.normal(0.0, 12.0, smooth.shape), 0, 255).astype(np.uint8)


def write_synthetic_cifar10(directory: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A ``cifar-10-batches-py`` folder of synthetic images: the real ``--dataset cifar10`` path runs."""
    folder = Path(directory) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_file = -(-n_train // 5)
    parts = [(f"data_batch_{i + 1}", min(per_file, n_train - i * per_file), seed + i) for i in range(5)]
    for name, count, part_seed in parts + [("test_batch", n_test, seed + 99)]:
        images = synthetic_images(count, 32, part_seed).reshape(count, -1)
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": images, b"labels": rng.integers(0, 10, count).tolist()}, handle)
    return Path(directory)


def write_synthetic_fashion_mnist(directory: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Fashion-MNIST IDX files of synthetic 28 px images, for machines without the real ones."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        with gzip.open(directory / f"{split}-images-idx3-ubyte.gz", "wb") as handle:
            handle.write(struct.pack(">IIII", 2051, n, 28, 28) + synthetic_images(n, 28, seed, 1).tobytes())
        with gzip.open(directory / f"{split}-labels-idx1-ubyte.gz", "wb") as handle:
            handle.write(struct.pack(">II", 2049, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes())
    return directory


def read_train_images(dataset: str, data_dir: str | None) -> np.ndarray:
    """(N, C, H, W) uint8 training images of the e2e data, read without ``simclrv2``."""
    if dataset == "embedded":
        with gzip.open(Path(data_dir or FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz") as handle:
            return np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    parts = sorted((Path(data_dir) / "cifar-10-batches-py").glob("data_batch_*"))
    return np.concatenate([pickle.loads(p.read_bytes())[b"data"] for p in parts]).reshape(-1, 3, 32, 32)


def write_synthetic_jpeg_folder(parent: Path, n: int, classes: int = 10) -> Path:
    """``n`` synthetic JPEGs of ImageNet's typical size (500 x 375, quality 90, ~70 kB), so that
    decoding costs what it would on ImageNet; written once, reused while complete."""
    from PIL import Image

    directory = Path(parent) / f"simclrv2-bench-jpegs-{n}"
    done = directory / f".complete-{classes}"
    if done.exists():
        return directory
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 12.0, (16, 375, 500, 3)).astype(np.int16)  # cycled: drawing it per image is slow
    for i in range(n):
        field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        pixels = np.clip(np.asarray(field, dtype=np.int16) + noise[i % 16], 0, 255).astype(np.uint8)
        folder = directory / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    done.touch()
    return directory


# ---------------------------------------------------------------------------------------------
# Memory and machine load
# ---------------------------------------------------------------------------------------------
def _pss_kib(pid: int) -> int:
    """Proportional set size (RSS where the kernel has no ``smaps_rollup``), 0 for a gone process."""
    for name, key in (("smaps_rollup", "Pss:"), ("status", "VmRSS:")):
        try:
            return next(int(line.split()[1]) for line in Path(f"/proc/{pid}/{name}").read_text().splitlines()
                        if line.startswith(key))
        except (OSError, StopIteration):
            pass
    return 0


def _process_tree(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return [pid] + [p for child in children for p in _process_tree(child)]


class MemorySampler:
    """Peak summed PSS of this process and its children (DataLoader workers share the parent's
    pages copy-on-write, so PSS, not RSS, adds up), sampled every second in a thread and once at
    the end. Reading PSS walks the page tables (~30 ms for 1.4 GB): sampling every 0.1 s took
    ~30 % of a core from the run it measured."""

    def __init__(self, interval: float = 1.0):
        self.interval, self.peak_kib = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.peak_kib = max(self.peak_kib, sum(map(_pss_kib, _process_tree(os.getpid()))))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024


def cpu_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (``/proc/stat``)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def busy_cores(sample_s: float = 2.0) -> float:
    """Cores kept busy by everything on the machine over the next ``sample_s`` seconds."""
    t0, b0 = time.monotonic(), cpu_busy_seconds()
    time.sleep(sample_s)
    return (cpu_busy_seconds() - b0) / (time.monotonic() - t0)


def wait_for_quiet(max_busy: float, max_wait_s: float) -> float:
    """Wait until other programs keep at most ``max_busy`` cores busy (or ``max_wait_s`` passed)."""
    deadline, busy = time.monotonic() + max_wait_s, busy_cores()
    while busy > max_busy and time.monotonic() < deadline:
        busy = busy_cores()
    return busy


# ---------------------------------------------------------------------------------------------
# Step timing from outside a loop
# ---------------------------------------------------------------------------------------------
class StepTimer:
    """Times a loop from the outside: the time spent in ``next()`` of a wrapped batch iterator is
    data wait; ``step_ends`` mark where steps end; ``mark(name, seconds)`` adds a phase to the
    step of the batch received last."""

    def __init__(self) -> None:
        self.requested: list[float] = []
        self.received: list[float] = []
        self.step_ends: list[float] = []
        self.phases: dict[str, list[tuple[int, float]]] = {}

    def wrap(self, iterable):
        items, t0 = iter(iterable), time.perf_counter()
        for item in items:
            self.requested.append(t0)
            self.received.append(time.perf_counter())
            yield item
            t0 = time.perf_counter()

    def run(self, batches, steps: int, step=None) -> None:
        """``steps`` steps of ``step(batch)`` (nothing: a loader alone) over ``batches``."""
        for i, batch in enumerate(self.wrap(batches)):
            if step is not None:
                step(batch)
            self.step_ends.append(time.perf_counter())
            if i + 1 == steps:
                break

    def mark(self, name: str, seconds: float) -> None:
        self.phases.setdefault(name, []).append((len(self.received) - 1, seconds))

    def summary(self, warmup: int, images_per_step: int) -> dict[str, float]:
        """Throughput and time shares from the end of step ``warmup`` (>= 1) to the last step's end."""
        if warmup < 1:
            raise ValueError("warmup must be >= 1 (the first timed step starts where a warm-up step ends)")
        steps = len(self.step_ends) - warmup
        if steps < 1:
            raise RuntimeError(f"need more than {warmup} steps, got {len(self.step_ends)}")
        total = self.step_ends[-1] - self.step_ends[warmup - 1]
        timed = range(warmup, warmup + steps)
        out = {"images_per_s": steps * images_per_step / total, "timed_steps": steps, "s_per_step": total / steps,
               "data_wait_fraction": sum(self.received[i] - self.requested[i] for i in timed) / total}
        for name, marks in self.phases.items():
            out[f"{name}_fraction"] = sum(seconds for step, seconds in marks if step in timed) / total
        return out


# ---------------------------------------------------------------------------------------------
# Machine kind and the results file (one per kind; history is git's)
# ---------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", re.sub(r"\((r|tm)\)|\bcpu\b|@.*", "", text.lower())).strip("_")


def cpu_model() -> str:
    """lscpu's "Model name" (``/proc/cpuinfo`` where lscpu is missing)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def machine(gpu: str | None = None) -> dict[str, Any]:
    """What a figure depends on; ``kind`` names the results file (``cpu_amd_epyc_2core``, ``gpu_h100``)."""
    import torch

    cpus, model = len(os.sched_getaffinity(0)), cpu_model()
    gpu_word = next((w for w in (gpu or "").replace("-", " ").split() if any(c.isdigit() for c in w)), gpu or "")
    info = {"kind": f"gpu_{_slug(gpu_word)}" if gpu else f"cpu_{_slug(model)}_{cpus}core", "cpu_model": model,
            "cpus": cpus, "python": platform.python_version(), "torch": torch.__version__}
    if gpu:
        info["gpu"] = gpu
    else:
        info["cpu_bf16"] = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    return info


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(path: Path, info: dict[str, Any], results: dict[str, Any]) -> None:
    """Merge ``results`` (key -> entry) into the results file at ``path``, each entry stamped with
    the commit and date; a file of another machine kind is refused."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {"machine": info, "results": {}}
    if data["machine"].get("kind") != info["kind"]:
        raise SystemExit(f"{path} holds figures of a {data['machine'].get('kind')} machine, this is "
                         f"{info['kind']}; write to results/{info['kind']}.json")
    stamp = {"commit": commit(), "date": time.strftime("%Y-%m-%d"), "torch": info["torch"]}
    data["results"].update({key: {**stamp, **entry} for key, entry in results.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
