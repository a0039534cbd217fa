"""Helpers shared by the benchmark measurements: synthetic data, timers, memory, machine load.

Nothing here imports ``simclrv2``: the reference pipeline (``reference.py``) must stay
independent of the code under test.
"""
from __future__ import annotations

import gzip
import os
import pickle
import resource
import struct
import threading
import time
from pathlib import Path

import numpy as np


# ---------------------------------------------------------------------------------------------
# Synthetic images
# ---------------------------------------------------------------------------------------------
def synthetic_images(n: int, size: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """``(n, channels, size, size)`` uint8 images with natural-ish structure: a coarse random
    colour field (8x8, nearest-upsampled then box-smoothed) plus pixel noise, so crops, colour
    ops and blur see varied content. Augmentation cost does not depend on the content (no
    decoding), so this stands in for CIFAR/STL images where those files are absent."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, channels, 8, 8), dtype=np.uint8).astype(np.float32)
    reps = -(-size // 8)
    field = np.repeat(np.repeat(coarse, reps, axis=2), reps, axis=3)[:, :, :size, :size]
    k = max(1, reps // 2)
    smooth = field.copy()
    for shift in range(1, k + 1):
        smooth += np.roll(field, shift, axis=2) + np.roll(field, shift, axis=3)
    smooth /= 1 + 2 * k
    noise = rng.normal(0.0, 12.0, smooth.shape).astype(np.float32)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def write_synthetic_cifar10(directory: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A CIFAR-10 python-pickle folder (``cifar-10-batches-py``) of synthetic 32 px images, so
    the real ``--dataset cifar10`` code path can be timed without the dataset files."""
    folder = Path(directory) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_file = -(-n_train // 5)
    for i in range(5):
        count = min(per_file, n_train - i * per_file)
        images = synthetic_images(count, 32, seed + i)
        batch = {b"data": images.reshape(count, -1), b"labels": rng.integers(0, 10, count).tolist()}
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump(batch, f)
    test = synthetic_images(n_test, 32, seed + 99)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": test.reshape(n_test, -1), b"labels": rng.integers(0, 10, n_test).tolist()}, f)
    return Path(directory)


def write_synthetic_fashion_mnist(directory: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Fashion-MNIST IDX files (gzip) of synthetic 28 px grey images, used only when the real
    files (``/usr/share/datasets/fashion-mnist``) are missing."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = synthetic_images(n, 28, seed, channels=1)[:, 0]
        with gzip.open(directory / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(directory / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes())
    return directory


# ImageNet's median photo is about 500 x 375 (landscape), stored as JPEG at quality ~90.
JPEG_SHAPE = (375, 500)


def write_synthetic_jpeg_folder(parent: Path, n: int, classes: int = 10, seed: int = 0,
                                shape: tuple[int, int] = JPEG_SHAPE, quality: int = 90) -> Path:
    """``parent/simclrv2-bench-jpegs-<n>/<class>/<i>.jpg``: ``n`` synthetic photos of ImageNet's
    typical size, so the folder pipeline's decoding cost is realistic. Written once; reused
    while complete."""
    from PIL import Image

    directory = Path(parent) / f"simclrv2-bench-jpegs-{n}"
    done = directory / f".complete-{n}-{classes}-{seed}-{shape[0]}x{shape[1]}-q{quality}"
    if done.exists():
        return directory
    height, width = shape
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, 12.0, (16, height, width, 3)).astype(np.int16)  # cycled: drawing it per image is slow
    for i in range(n):  # a smooth random colour field (bicubic from 8 x 6) plus pixel noise
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                           Image.BICUBIC)
        noisy = np.clip(np.asarray(coarse, dtype=np.int16) + noise[i % len(noise)], 0, 255).astype(np.uint8)
        folder = directory / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(folder / f"{i:06d}.jpg", quality=quality)
    done.touch()
    return directory


# ---------------------------------------------------------------------------------------------
# Memory: peak of the whole process tree (DataLoader workers included)
# ---------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    kids: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        for task in task_dir.iterdir():
            text = (task / "children").read_text().split()
            kids.extend(int(k) for k in text)
    except OSError:
        pass
    return kids


def _process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(_children(p))
    return tree


def _pss_kib(pid: int) -> int:
    """Proportional set size (shared pages split between sharers; falls back to RSS)."""
    return _proc_kib(pid, "smaps_rollup", "Pss:") or _proc_kib(pid, "status", "VmRSS:")


def _proc_kib(pid: int, name: str, key: str) -> int:
    """The kiB value of line ``key`` in ``/proc/PID/NAME``; 0 if absent or unreadable."""
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# Reading PSS is not free: the kernel walks the page tables, about 30 ms for a 1.4 GB process on
# the 2-core machine. Sampled every 0.1 s that stole ~30 % of a core from the run being timed.
MEMORY_SAMPLE_INTERVAL = 1.0


class MemorySampler:
    """Samples the summed PSS of this process and its children (DataLoader workers share the
    parent's pages copy-on-write, so PSS, not RSS, adds up to the real total) every
    ``interval`` seconds in a background thread (never if 0); ``peak_mib`` is the largest sum
    seen."""

    def __init__(self, interval: float = MEMORY_SAMPLE_INTERVAL):
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        pid = os.getpid()
        self.peak_kib = max(self.peak_kib, sum(_pss_kib(p) for p in _process_tree(pid)))

    def _run(self) -> None:
        while self.interval > 0 and not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.interval > 0:
            self._sample()  # once more at the end, when everything is still allocated

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024


def peak_rss_mib() -> float:
    """Peak resident set size of this process alone (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# Machine load and timing
# ---------------------------------------------------------------------------------------------
def load_average() -> float:
    """One-minute load average."""
    return os.getloadavg()[0]


def cpu_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _, _, irq, softirq, steal = (int(v) for v in (fields + ["0"] * 8)[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU seconds used by this process's finished children (and their reaped children)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def busy_cores(sample_s: float = 2.0) -> float:
    """Cores kept busy by everything on the machine over the next ``sample_s`` seconds."""
    t0, b0 = time.monotonic(), cpu_busy_seconds()
    time.sleep(sample_s)
    return (cpu_busy_seconds() - b0) / (time.monotonic() - t0)


def wait_for_quiet(max_busy: float, max_wait_s: float) -> float:
    """Wait until the machine's other work keeps at most ``max_busy`` cores busy (sampled over
    2 s; our own measurements run in child processes that have ended by then), or until
    ``max_wait_s`` has passed; returns the last sample."""
    deadline = time.monotonic() + max_wait_s
    busy = busy_cores()
    while busy > max_busy and time.monotonic() < deadline:
        busy = busy_cores()
    return busy


class StepTimer:
    """Step timing of a training loop from the outside, by wrapping its batch iterator.

    The time spent inside ``next()`` of the wrapped iterator is time the loop waited for data.
    ``end_step()`` (or ``step_ends`` filled from the loop's own log) marks where each step
    finished; ``mark(name, seconds)`` adds other in-step phases (e.g. augmentation done in the
    step itself) to the step of the batch most recently received.
    """

    def __init__(self) -> None:
        self.requested: list[float] = []
        self.received: list[float] = []
        self.step_ends: list[float] = []
        self.phases: dict[str, list[tuple[int, float]]] = {}  # name -> [(step index, seconds)]

    def wrap(self, iterator):
        it = iter(iterator)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.requested.append(t0)
            self.received.append(time.perf_counter())
            yield item

    def end_step(self) -> None:
        self.step_ends.append(time.perf_counter())

    def run(self, batches, steps: int, step=None) -> None:
        """Time ``steps`` steps of ``step(batch)`` (nothing: a pure data loader) over ``batches``."""
        for i, batch in enumerate(self.wrap(batches)):
            if step is not None:
                step(batch)
            self.end_step()
            if i + 1 == steps:
                break

    def mark(self, name: str, seconds: float) -> None:
        self.phases.setdefault(name, []).append((len(self.received) - 1, seconds))

    def summary(self, warmup: int, images_per_step: int) -> dict:
        """Throughput and time fractions over the steps after the first ``warmup`` (>= 1): from
        the end of step ``warmup`` to the end of the last step."""
        if warmup < 1:
            raise ValueError("warmup must be >= 1 (the first timed step starts where a warm-up step ends)")
        steps = len(self.step_ends) - warmup
        if steps < 1:
            raise RuntimeError(f"need more than {warmup} steps, got {len(self.step_ends)}")
        ends = self.step_ends[warmup - 1:]
        total = ends[-1] - ends[0]
        timed = range(warmup, warmup + steps)
        waits = [self.received[i] - self.requested[i] for i in timed]
        out = {
            "images_per_s": steps * images_per_step / total,
            "timed_steps": steps,
            "s_per_step": total / steps,
            "s_per_step_min": min(b - a for a, b in zip(ends, ends[1:])),
            "data_wait_fraction": sum(waits) / total,
        }
        for name, marks in self.phases.items():
            out[f"{name}_fraction"] = sum(seconds for step, seconds in marks if step in timed) / total
        return out
