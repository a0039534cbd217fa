"""Batches of uint8 images and labels for the training and evaluation loops.

Both loaders share one sampling rule (:func:`shard_indices`), ``DistributedSampler``-like: a
global permutation seeded by ``seed + epoch`` (or the natural order when not shuffling), of
which rank r takes elements r, r + world_size, ... With ``drop_last`` the permutation is first
cut to a multiple of ``world_size`` so every rank gets the same number of batches; without it
nothing is padded or repeated, so ranks may get one sample (and one batch) fewer -- evaluation
code must therefore reduce its totals after the loop, not per batch.

``set_epoch(epoch, start_batch)`` picks the epoch and the first batch to yield, for exact
resumption mid-epoch; ``len(loader)`` is always the full number of batches per epoch.

* :class:`InMemoryLoader` indexes a :class:`TensorImageDataset` directly (optionally kept on
  the GPU), with no worker processes.
* :func:`make_dataloader` wraps a ``torch.utils.data.DataLoader`` over a file dataset; the
  ``skipped`` attribute of what it returns counts images replaced by ``--skip-bad-images``.
  Each sample is loaded under a torch seed drawn from ``(seed, epoch, index)``, so random crops
  and PIL transforms in the workers do not depend on the worker count and resume exactly.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterator, Optional, Union

import torch
from torch import Tensor

from .errors import DataError

if TYPE_CHECKING:
    from .in_memory import TensorImageDataset

PRELOAD_MAX_BYTES = 4 << 30  # keep datasets up to this size on the accelerator
MAX_DEFAULT_WORKERS = 32  # ~6 000 two-view 224 px JPEG images/s: more than one GPU consumes


def shard_indices(num_samples: int, epoch: int = 0, seed: int = 0, shuffle: bool = True,
                  rank: int = 0, world_size: int = 1, drop_last: bool = True) -> Tensor:
    """This rank's sample indices for one epoch (see the module docstring)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if shuffle:
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch))
    else:
        order = torch.arange(num_samples)
    if drop_last:
        order = order[: num_samples // world_size * world_size]
    return order[rank::world_size]


def _num_batches(num_indices: int, batch_size: int, drop_last: bool) -> int:
    return num_indices // batch_size if drop_last else -(-num_indices // batch_size)


class _Sharded:
    """Epoch/start-batch bookkeeping shared by both loaders."""

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                 rank: int, world_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0
        per_rank = shard_indices(num_samples, 0, seed, False, rank, world_size, drop_last).numel()
        self._len = _num_batches(per_rank, batch_size, drop_last)
        if drop_last and self._len == 0:
            raise DataError(f"{num_samples} samples over {world_size} process(es) give no full batch of "
                            f"{batch_size}; lower --train-batch-size")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (reshuffles) and the first batch the next iteration yields."""
        if not 0 <= start_batch <= self._len:
            raise ValueError(f"start_batch must be in [0, {self._len}], got {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self._len

    def _indices(self) -> Tensor:
        """Indices of the batches still to come this epoch, in order."""
        idx = shard_indices(self.num_samples, self.epoch, self.seed, self.shuffle, self.rank,
                            self.world_size, self.drop_last)
        return idx[self.start_batch * self.batch_size: self._len * self.batch_size]


class InMemoryLoader(_Sharded):
    """Yields ``(images uint8 (B, 3, H, W), labels (B,) or None)`` on ``device`` from a
    :class:`TensorImageDataset`, without worker processes.

    With a CUDA ``device`` the whole dataset is copied there once (``preload``; default when it
    is at most 4 GiB), so a batch is a single on-device gather. Grey datasets keep one channel
    in memory and are replicated per batch.
    """

    def __init__(self, dataset: "TensorImageDataset", batch_size: int, shuffle: bool = True,
                 drop_last: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: Union[str, torch.device] = "cpu", preload: Optional[bool] = None):
        super().__init__(len(dataset), batch_size, shuffle, drop_last, seed, rank, world_size)
        self.dataset, self.device = dataset, torch.device(device)
        images = dataset.images
        self._grey = images.stride(1) == 0
        if self._grey:
            images = images[:, :1]
        if preload is None:
            preload = self.device.type != "cpu" and images.numel() <= PRELOAD_MAX_BYTES
        self._images = images.to(self.device) if preload else images
        labels = dataset.labels
        self._labels = None if labels is None else (labels.to(self.device) if preload else labels)
        self.preloaded = preload

    def __iter__(self) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
        indices = self._indices().to(self._images.device)  # once an epoch: a copy to a GPU waits for it
        self.start_batch = 0  # only the first iteration after set_epoch resumes mid-epoch
        for start in range(0, indices.numel(), self.batch_size):
            idx = indices[start:start + self.batch_size]
            images = self._images.index_select(0, idx)
            if self._grey:
                images = images.expand(-1, 3, -1, -1).contiguous()
            labels = None if self._labels is None else self._labels.index_select(0, idx)
            if not self.preloaded and self.device.type != "cpu":
                images = images.to(self.device, non_blocking=True)
                labels = None if labels is None else labels.to(self.device, non_blocking=True)
            yield images, labels


class _ListSampler(torch.utils.data.Sampler):
    """Yields whatever ``(index, seed)`` list its owner put in ``indices`` for the current epoch."""

    def __init__(self) -> None:
        self.indices: list[tuple[int, int]] = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    """The torch seed under which sample ``index`` is loaded in ``epoch``."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index) % 2**63


class _SeededSamples(torch.utils.data.Dataset):
    """``dataset[index]`` computed under its own torch seed (``samples[(index, seed)]``), leaving
    the caller's random state as it was."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):  # the CPU generator only, as below
            torch.random.default_generator.manual_seed(seed)
            return self.dataset[index]


def default_num_workers() -> int:
    """This process's share of the usable CPUs (split between the ``LOCAL_WORLD_SIZE``
    processes torchrun starts on the node), at most :data:`MAX_DEFAULT_WORKERS`.

    Decoding and cropping a JPEG takes a worker about 5 ms (``benchmarks/README.md``), so a
    GPU training ResNet-50 at ~3 000 images/s needs about 16 busy cores; the main process only
    gathers batches and launches the batched augmentation.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(MAX_DEFAULT_WORKERS, cpus // local_processes))


class FileLoader(_Sharded):
    """A ``DataLoader`` over a file dataset with the :class:`InMemoryLoader` interface.

    Yields ``(images, labels)``; when samples carry a third element (the number of unreadable
    files replaced, from ``ImageFolderDataset``) it is summed into ``self.skipped``.
    """

    def __init__(self, dataset, batch_size: int, shuffle: bool = True, drop_last: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: Optional[int] = None,
                 pin_memory: Optional[bool] = None, persistent_workers: bool = True,
                 device: Optional[Union[str, torch.device]] = None, prefetch_factor: int = 2):
        super().__init__(len(dataset), batch_size, shuffle, drop_last, seed, rank, world_size)
        self.dataset = dataset
        self.device = None if device is None else torch.device(device)
        self.skipped = 0
        workers = default_num_workers() if num_workers is None else num_workers
        if pin_memory is None:  # pinned pages only pay for copies to a GPU
            pin_memory = torch.cuda.is_available() and (self.device is None or self.device.type == "cuda")
        extra = dict(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor) if workers > 0 else {}
        self._sampler = _ListSampler()
        self.dataloader = torch.utils.data.DataLoader(
            _SeededSamples(dataset), batch_size=batch_size, sampler=self._sampler, num_workers=workers,
            pin_memory=pin_memory, drop_last=False, generator=torch.Generator().manual_seed(seed + 1000003 * rank),
            **extra)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self._sampler.indices = [(i, _sample_seed(self.seed, self.epoch, i)) for i in self._indices().tolist()]
        self.start_batch = 0  # only the first iteration after set_epoch resumes mid-epoch
        for batch in self.dataloader:
            images, labels = batch[0], batch[1]
            if len(batch) > 2:
                self.skipped += int(torch.as_tensor(batch[2]).sum())
            if self.device is not None:
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            yield images, labels


def worker_died(err: BaseException) -> bool:
    """True for PyTorch's error when a DataLoader worker process ended without a Python error:
    killed by a signal (often the OOM killer) or exited. PyTorch has no type of its own for it and
    may raise it anywhere in the main process (from its SIGCHLD handler)."""
    return isinstance(err, RuntimeError) and str(err).startswith("DataLoader worker (pid")


def make_dataloader(dataset, batch_size: int, shuffle: bool = True, drop_last: bool = True, seed: int = 0,
                    rank: int = 0, world_size: int = 1, num_workers: Optional[int] = None,
                    pin_memory: Optional[bool] = None, device: Optional[Union[str, torch.device]] = None,
                    persistent_workers: bool = True) -> FileLoader:
    """A :class:`FileLoader` with sensible defaults: :func:`default_num_workers` persistent workers and
    pinned memory when CUDA is available."""
    return FileLoader(dataset, batch_size, shuffle, drop_last, seed, rank, world_size, num_workers,
                      pin_memory, persistent_workers, device)

