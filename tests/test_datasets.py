"""Dataset readers (IDX, CIFAR pickles, STL-10 binaries, image folders) and the batch loaders."""
from __future__ import annotations

import gzip
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclrv2.data.datasets import DATASETS, ImageDataset, build_dataset
from simclrv2.data.errors import DataError, DatasetNotFoundError
from simclrv2.data.folder import ImageFolderDataset
from simclrv2.data.in_memory import TensorImageDataset
from simclrv2.data.readers import FASHION_MNIST_DIR, load_cifar, load_fashion_mnist, load_stl10
from simclrv2.data.loader import InMemoryLoader, make_dataloader, shard_indices


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST / IDX
# ------------------------------------------------------------------------------------------------
def _write_idx(path: Path, array: np.ndarray, magic: int, gz: bool = True) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _tiny_fashion(directory: Path, gz: bool = True, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 10
    suffix = ".gz" if gz else ""
    for prefix in ("train", "t10k"):
        _write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, 0x803, gz)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 0x801, gz)
    return images, labels


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                    reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    train = build_dataset("embedded", split="train")
    test = load_fashion_mnist(split="test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.images.shape == (60000, 3, 28, 28) and train.images.dtype == torch.uint8
    assert train.images.stride(1) == 0  # grey replicated as a view, not copied
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert 0 < train.images.float().mean() < 255


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    images, labels = _tiny_fashion(tmp_path, gz)
    ds = load_fashion_mnist(tmp_path, "test")
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images)) and torch.equal(ds.images[:, 2], ds.images[:, 0])
    assert ds.labels.tolist() == labels.tolist() and ds.labels.dtype == torch.long
    image, label = ds[3]
    assert image.shape == (3, 28, 28) and label == 3


def test_idx_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist.*--data-dir") as err:
        load_fashion_mnist(tmp_path)
    assert isinstance(err.value, FileNotFoundError)
    images, labels = _tiny_fashion(tmp_path, gz=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    _write_idx(bad, images, 0x801, gz=False)  # label magic on an image file
    with pytest.raises(DataError, match="magic number 0x801, expected 0x803"):
        load_fashion_mnist(tmp_path)
    _write_idx(bad, images, 0x803, gz=False)
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        load_fashion_mnist(tmp_path)
    _write_idx(bad, images, 0x803, gz=False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:3], 0x801, gz=False)
    with pytest.raises(DataError, match="5 images .* 3 labels"):
        load_fashion_mnist(tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels + 7, 0x801, gz=False)
    with pytest.raises(DataError, match="0..9"):
        load_fashion_mnist(tmp_path)


def test_truncated_gzip(tmp_path):
    _tiny_fashion(tmp_path, gz=True)
    f = tmp_path / "t10k-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        load_fashion_mnist(tmp_path, "test")


# ------------------------------------------------------------------------------------------------
# CIFAR / STL-10
# ------------------------------------------------------------------------------------------------
def _pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _tiny_cifar(root: Path, hundred: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    key = b"fine_labels" if hundred else b"labels"
    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {}
    for i, name in enumerate(names):
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        _pickle(folder / name, {b"data": data, key: [i % 10, (i + 3) % 10]})
        written[name] = data
    if hundred:
        _pickle(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    else:
        _pickle(folder / "batches.meta", {b"label_names": [f"k{i}".encode() for i in range(10)]})
    return written


def test_cifar10_tiny(tmp_path):
    written = _tiny_cifar(tmp_path)
    train = build_dataset("cifar10", tmp_path, "train")
    assert len(train) == 10 and train.classes[3] == "k3"
    assert train.labels[:4].tolist() == [0, 3, 1, 4]
    row = written["data_batch_1"][1]  # 1024 red, 1024 green, 1024 blue, each row-major 32x32
    assert train.images[1, 1, 2, 5] == row[1024 + 2 * 32 + 5]
    assert torch.equal(train.images[1], torch.from_numpy(row.reshape(3, 32, 32)))
    test = load_cifar("cifar10", tmp_path / "cifar-10-batches-py", "test")  # the folder itself also works
    assert len(test) == 2 and test.labels.tolist() == [5, 8]
    _pickle(tmp_path / "cifar-10-batches-py" / "batches.meta", {b"num_cases_per_batch": 10})
    with pytest.raises(DataError, match="lacks the list 'label_names'"):
        build_dataset("cifar10", tmp_path, "train")


def test_cifar100_tiny_and_missing(tmp_path):
    _tiny_cifar(tmp_path, hundred=True)
    ds = build_dataset("cifar100", tmp_path, "test")
    assert len(ds) == 2 and len(ds.classes) == 100 and ds.classes[99] == "c99"
    with pytest.raises(DatasetNotFoundError, match=r"cifar-10-python.tar.gz"):
        build_dataset("cifar10", tmp_path, "train")
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot read CIFAR batch"):
        build_dataset("cifar100", tmp_path, "test")


def _tiny_stl(root: Path) -> np.ndarray:
    folder = root / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (3, 3, 96, 96), dtype=np.uint8)  # (N, C, H, W)
    column_major = np.ascontiguousarray(images.transpose(0, 1, 3, 2))
    for split in ("train", "test", "unlabeled"):
        (folder / f"{split}_X.bin").write_bytes(column_major.tobytes())
    for split in ("train", "test"):
        (folder / f"{split}_y.bin").write_bytes(bytes([1, 10, 4]))
    return images


def test_stl10_tiny(tmp_path):
    images = _tiny_stl(tmp_path)
    train = load_stl10(tmp_path, "train")
    assert torch.equal(train.images, torch.from_numpy(images)) and train.labels.tolist() == [0, 9, 3]
    assert train.classes[2] == "car"
    unlabeled = build_dataset("stl10", tmp_path, "unlabeled")
    assert unlabeled.labels is None and unlabeled[0][1] == -1
    assert torch.equal(unlabeled.images[2], torch.from_numpy(images[2]))
    both = load_stl10(tmp_path, "train+unlabeled")
    assert len(both) == 6 and both.labels.tolist() == [0, 9, 3, -1, -1, -1]
    (tmp_path / "stl10_binary" / "test_X.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(DataError, match="not a multiple"):
        load_stl10(tmp_path, "test")
    with pytest.raises(DatasetNotFoundError, match="stl10_binary.tar.gz"):
        load_stl10(tmp_path / "nowhere", "train")


# ------------------------------------------------------------------------------------------------
# Image folders
# ------------------------------------------------------------------------------------------------
def _image(h: int, w: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (channels, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _save(image: torch.Tensor, path: Path) -> None:
    array = image.permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(path)


def _tree(root: Path, bad: bool = True, empty: bool = True) -> None:
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
    _save(_image(40, 50), root / "cat" / "a.png")
    _save(_image(60, 30, seed=1), root / "cat" / "b.jpg")
    (root / "cat" / "notes.txt").write_text("not an image, ignored by extension")
    _save(_image(30, 30, 1), root / "dog" / "grey.png")
    _save(_image(30, 30, 4), root / "dog" / "rgba.png")
    if bad:
        (root / "dog" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
        (root / "dog" / "zero.png").write_bytes(b"")
    if empty:
        (root / "empty").mkdir()


def test_folder_strict_errors(tmp_path):
    _tree(tmp_path)
    with pytest.raises(DataError, match=r"class folder .*empty has no images.*--skip-bad-images"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "empty").rmdir()
    ds = ImageFolderDataset(tmp_path, image_size=24)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    assert ds.sample_ids == ["cat/a.png", "cat/b.jpg", "dog/corrupt.jpg", "dog/grey.png", "dog/rgba.png",
                             "dog/zero.png"]
    with pytest.raises(DataError, match=r"cannot decode image .*corrupt.jpg.*--skip-bad-images"):
        ds[2]
    with pytest.raises(DataError, match=r"zero.png"):
        ds[5]
    good = tmp_path / "dog" / "grey.png"
    (tmp_path / "dog" / "cut.png").write_bytes(good.read_bytes()[:60])  # truncated PNG
    with_cut = ImageFolderDataset(tmp_path)
    with pytest.raises(DataError, match=r"cut.png"):
        with_cut.load(with_cut.sample_ids.index("dog/cut.png"))
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        ImageFolderDataset(tmp_path / "nothing")


@pytest.mark.parametrize("mode, crops, shape", [("eval", 1, (3, 24, 24)), ("train", 1, (3, 24, 24)),
                                               ("train", 2, (2, 3, 24, 24))])
def test_folder_outputs_fixed_size_rgb(tmp_path, mode, crops, shape):
    _tree(tmp_path, bad=False, empty=False)
    ds = ImageFolderDataset(tmp_path, image_size=24, mode=mode, crops=crops)
    for i in range(len(ds)):
        image, label, skipped = ds[i]
        assert image.shape == shape and image.dtype == torch.uint8 and skipped == 0
    assert ds.targets == [0, 0, 1, 1]
    grey = ds[2][0]
    assert torch.equal(grey[..., 0, :, :], grey[..., 1, :, :]) and torch.equal(grey[..., 1, :, :], grey[..., 2, :, :])
    decoded = ds.with_mode("decode")
    assert decoded[0][0].shape == (3, 40, 50) and decoded.samples == ds.samples and ds.mode == mode
    with pytest.raises(DataError, match="crops must be at least 1"):
        ds.with_mode("train", crops=0)


def test_folder_train_crops_are_official_crops_of_the_whole_image(tmp_path):
    """Each crop is the official crop rule applied to the full decoded image, resized with TF's
    bicubic: the same pixels as cropping and resizing the original by hand."""
    from simclrv2.data.crops import sample_crop_boxes
    from simclrv2.data.resize import resize_boxes

    (tmp_path / "x").mkdir()
    img = _image(48, 96, seed=3)
    _save(img, tmp_path / "x" / "wide.png")
    ds = ImageFolderDataset(tmp_path, image_size=32, mode="train", crops=3)
    torch.manual_seed(11)
    crops = ds[0][0]
    torch.manual_seed(11)
    boxes = sample_crop_boxes(3, 48, 96)
    expected = resize_boxes(img[None].expand(3, -1, -1, -1), boxes, 32).clamp(0, 1).mul(255)
    assert (crops.float() - expected).abs().max() <= 0.5 + 1e-3  # only the uint8 rounding
    assert len({tuple(b) for b in boxes.tolist()}) == 3  # independent crops


def test_folder_train_crops_reach_beyond_the_centre_square(tmp_path):
    """A wide image whose thirds are red, green and blue: crops from the full image are sometimes
    mostly red or mostly blue (a centre-square crop would only ever see green)."""
    (tmp_path / "x").mkdir()
    img = torch.zeros(3, 40, 120, dtype=torch.uint8)
    for c in range(3):
        img[c, :, 40 * c:40 * (c + 1)] = 255
    _save(img, tmp_path / "x" / "thirds.png")
    ds = ImageFolderDataset(tmp_path, image_size=16, mode="train", crops=200)
    torch.manual_seed(0)
    means = ds[0][0].float().mean(dim=(2, 3))  # (crops, RGB)
    dominant = means.argmax(dim=1)
    counts = torch.bincount(dominant, minlength=3)
    assert counts[0] > 10 and counts[2] > 10 and counts[1] > 10, counts


def test_folder_eval_is_official_centre_crop(tmp_path):
    (tmp_path / "x").mkdir()
    img = _image(40, 40)
    _save(img, tmp_path / "x" / "a.png")
    out = ImageFolderDataset(tmp_path, image_size=35, mode="eval")[0][0]
    assert torch.equal(out, img[:, 3:38, 3:38])  # 0.875 * 40 = 35, offset (40 - 35 + 1) // 2


def test_folder_skip_mode_counts_bad_images(tmp_path):
    _tree(tmp_path)
    with pytest.warns(UserWarning, match="no images"):
        ds = ImageFolderDataset(tmp_path, image_size=16, skip_bad_images=True)
    assert ds.classes == ["cat", "dog", "empty"] and ds.empty_classes == ["empty"]
    with pytest.warns(UserWarning):
        image, label, skipped = ds[2]  # corrupt.jpg -> replaced by grey.png
    assert skipped == 1 and label == 1 and image.shape == (3, 16, 16)
    for workers in (0, 2):
        loader = make_dataloader(ds, batch_size=4, shuffle=False, drop_last=False, num_workers=workers,
                                 persistent_workers=False)
        with warnings.catch_warnings():  # workers warn in their own processes
            warnings.simplefilter("ignore")
            batches = list(loader)
        assert sum(len(y) for _, y in batches) == 6 and batches[0][0].shape == (4, 3, 16, 16)
        assert loader.skipped == 2  # corrupt.jpg and zero.png


def test_build_folder_splits(tmp_path):
    _tree(tmp_path / "train", bad=False, empty=False)
    _tree(tmp_path / "val", bad=False, empty=False)
    train = build_dataset("folder", tmp_path, "train", image_size=20)
    val = build_dataset("folder", tmp_path, "test", image_size=20)
    assert train.mode == "train" and val.mode == "eval" and val.root == tmp_path / "val"
    with pytest.raises(DataError, match="--data-dir"):
        build_dataset("folder", None)
    (tmp_path / "train").rename(tmp_path / "elsewhere")
    with pytest.raises(DatasetNotFoundError, match="no train sub-folder"):  # val/ alone is not a flat folder
        build_dataset("folder", tmp_path, "train")


def test_unknown_dataset_lists_choices():
    with pytest.raises(DataError, match="unknown dataset 'mnist'.*" + ".*".join(DATASETS)):
        build_dataset("mnist")


@pytest.mark.parametrize("kind", ["in_memory", "folder"])
def test_every_dataset_kind_offers_the_whole_interface(tmp_path, kind):
    """The batch helpers never ask which kind a dataset is, so each kind must offer every member."""
    _tree(tmp_path, bad=False, empty=False)
    ds = (TensorImageDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), None, (), "t") if kind == "in_memory"
          else ImageFolderDataset(tmp_path))
    members = {"__len__", "__getitem__", *ImageDataset.__annotations__,
               *(name for name in vars(ImageDataset) if not name.startswith("_"))}
    assert {"loader", "pretrain_inputs", "crop_flip_inputs", "eval_inputs", "subset"} <= members
    assert not [name for name in members if not hasattr(ds, name)]


def test_tensor_dataset_subset_keeps_grey_view():
    grey = torch.arange(5 * 4 * 4, dtype=torch.uint8).view(5, 1, 4, 4).expand(-1, 3, -1, -1)
    ds = TensorImageDataset(grey, torch.tensor([0, 1, 0, 1, 1]), ("a", "b"), "g")
    sub = ds.subset([4, 1])
    assert sub.images.stride(1) == 0 and torch.equal(sub.images, grey[[4, 1]]) and sub.labels.tolist() == [1, 1]
    with pytest.raises(DataError, match="labels of shape"):
        TensorImageDataset(grey, torch.zeros(3, dtype=torch.long), (), "bad")


# ------------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------------
def test_shard_indices_partition_without_padding():
    shards = [shard_indices(10, epoch=2, seed=5, rank=r, world_size=4, drop_last=False) for r in range(4)]
    assert [len(s) for s in shards] == [3, 3, 2, 2]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))  # every sample exactly once
    dropped = [shard_indices(10, epoch=2, seed=5, rank=r, world_size=4, drop_last=True) for r in range(4)]
    assert [len(s) for s in dropped] == [2] * 4
    assert torch.equal(shards[1], shard_indices(10, epoch=2, seed=5, rank=1, world_size=4, drop_last=False))
    assert not torch.equal(shard_indices(100, epoch=0), shard_indices(100, epoch=1))
    assert shard_indices(6, shuffle=False, rank=1, world_size=2).tolist() == [1, 3, 5]
    with pytest.raises(ValueError, match="rank"):
        shard_indices(10, rank=2, world_size=2)


def _grey_dataset(n: int = 23) -> TensorImageDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2)
    return TensorImageDataset(images, torch.arange(n), tuple("x" * n), "ids")


def test_in_memory_loader_epochs_resume_and_sharding():
    ds = _grey_dataset()
    loader = InMemoryLoader(ds, batch_size=4, seed=3)
    assert len(loader) == 5  # 23 // 4, last partial batch dropped
    loader.set_epoch(1)
    full = list(loader)
    for images, labels in full:
        assert images.shape == (4, 3, 2, 2) and images.is_contiguous()
        assert torch.equal(images[:, 0, 0, 0].long(), labels)  # images and labels stay paired
    loader.set_epoch(1, start_batch=3)
    resumed = list(loader)
    assert len(resumed) == 2 and all(torch.equal(a[1], b[1]) for a, b in zip(resumed, full[3:]))
    assert len(list(loader)) == 5  # the next pass starts from batch 0 again
    loader.set_epoch(2)
    assert not torch.equal(torch.cat([y for _, y in loader]), torch.cat([y for _, y in full]))

    ranks = [InMemoryLoader(ds, 4, shuffle=False, drop_last=False, rank=r, world_size=2) for r in range(2)]
    seen = torch.cat([y for loader in ranks for _, y in loader])
    assert sorted(seen.tolist()) == list(range(23))
    unlabeled = InMemoryLoader(TensorImageDataset(ds.images, None, (), "u"), 5, shuffle=False)
    assert next(iter(unlabeled))[1] is None
    with pytest.raises(ValueError, match="no full batch"):
        InMemoryLoader(ds, 30)


def test_file_loader_matches_in_memory_loader():
    ds = _grey_dataset()
    fast = InMemoryLoader(ds, 4, seed=9, rank=1, world_size=2, drop_last=False)
    slow = make_dataloader(ds, 4, seed=9, rank=1, world_size=2, drop_last=False, num_workers=0)
    for loader in (fast, slow):
        loader.set_epoch(4, start_batch=1)
    a = [y for _, y in fast]
    b = [y for _, y in slow]
    assert len(a) == len(b) == len(fast) - 1 and all(torch.equal(x, y) for x, y in zip(a, b))


class _RandomSamples(torch.utils.data.Dataset):
    """Each sample is its index and a draw from the global torch RNG (like a random crop)."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int):
        return torch.tensor([float(index)]), torch.rand(1)


def test_file_loader_randomness_is_per_sample_and_resumes():
    def draws(workers: int, epoch: int = 0, start_batch: int = 0) -> list[torch.Tensor]:
        loader = make_dataloader(_RandomSamples(), 4, seed=3, num_workers=workers, persistent_workers=False)
        loader.set_epoch(epoch, start_batch)
        return [torch.cat([index, noise], dim=1) for index, noise in loader]

    torch.manual_seed(0)
    state = torch.get_rng_state()
    plain = draws(0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    assert all(torch.equal(a, b) for a, b in zip(plain, draws(2)))  # independent of the workers
    assert all(torch.equal(a, b) for a, b in zip(plain[2:], draws(2, start_batch=2)))  # exact resume
    noise = torch.cat(plain)[:, 1]
    assert noise.unique().numel() == noise.numel()  # every sample draws its own numbers
    by_index = {int(i): float(x) for i, x in torch.cat(plain).tolist()}
    again = {int(i): float(x) for i, x in torch.cat(draws(0, epoch=1)).tolist()}
    assert all(again[i] != by_index[i] for i in again)  # a new epoch gives each image new draws

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_in_memory_loader_preloads_to_cuda():
    ds = _grey_dataset()
    loader = InMemoryLoader(ds, 4, seed=3, device="cuda")
    cpu = InMemoryLoader(ds, 4, seed=3)
    assert loader.preloaded
    for (xa, ya), (xb, yb) in zip(loader, cpu):
        assert xa.is_cuda and ya.is_cuda and torch.equal(xa.cpu(), xb) and torch.equal(ya.cpu(), yb)


@pytest.mark.parametrize("cpus, local_processes, expected", [(2, None, 2), (16, None, 16), (16, "4", 4),
                                                             (200, None, 32), (2, "8", 1)])
def test_default_workers_share_the_cpus_between_local_processes(monkeypatch, cpus, local_processes, expected):
    from simclrv2.data import loader

    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    if local_processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_processes)
    assert loader.default_num_workers() == expected
