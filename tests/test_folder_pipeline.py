"""Image folders through the stages' data layer: training crops cut from the full decoded image,
evaluation preprocessing applied once, and the labelled stream of distillation."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from simclrv2.cli import main
from simclrv2.data import batches as B
from simclrv2.data.datasets import build_dataset
from simclrv2.data.errors import DataError
from simclrv2.data.eval_transform import EvalTransform
from simclrv2.data.folder import ImageFolderDataset
from simclrv2.data.in_memory import TensorImageDataset
from simclrv2.data.loader import shard_indices
from simclrv2.engine.runtime import Runtime

MODEL = ["--resnet-depth", "18", "--width-multiplier", "0.125"]
RUN = ["--progress", "false", "--precision", "fp32", "--num-threads", "1", "--num-workers", "0",
       "--eval-batch-size", "8", "--train-batch-size", "4", "--label-fraction", "0.5"]
CPU = Runtime(device=torch.device("cpu"), dtype=None, channels_last=False, rank=0, world_size=1)


def _thirds(height: int = 40, width: int = 120) -> torch.Tensor:
    """A wide image whose left, middle and right thirds are pure red, green and blue."""
    img = torch.zeros(3, height, width, dtype=torch.uint8)
    for c in range(3):
        img[c, :, width // 3 * c:width // 3 * (c + 1)] = 255
    return img


def _save(img: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)


def _random_image(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_pretraining_views_crop_the_whole_image(tmp_path):
    for i in range(8):
        _save(_thirds(), tmp_path / "c" / f"{i}.png")
    dataset = ImageFolderDataset(tmp_path, image_size=16, mode="eval")
    source, make_views = B.pretrain_views(dataset, CPU, augmentation="batched", batch_size=4, seed=0, image_size=16,
                                          strength=1.0, use_blur=False, num_workers=0)
    dominant = []
    for epoch in range(4):
        source.set_epoch(epoch)
        for images, _ in source:
            assert images.shape == (4, 2, 3, 16, 16) and images.dtype == torch.uint8
            dominant.append(images.float().mean(dim=(3, 4)).argmax(dim=2).flatten())
            view1, view2 = make_views((images, None), torch.Generator().manual_seed(epoch)).chunk(2)
            assert view1.shape == view2.shape == (4, 3, 16, 16) and view1.dtype == torch.float32
            assert 0 <= view1.min() and view1.max() <= 1 and not torch.equal(view1, view2)
    counts = torch.bincount(torch.cat(dominant), minlength=3)
    # Crops of the full image land in every third; the old centre square only ever saw green.
    assert (counts >= 6).all(), counts


def test_torchvision_path_gets_the_full_decoded_image(tmp_path):
    for i in range(4):
        _save(_thirds(), tmp_path / "c" / f"{i}.png")
    dataset = ImageFolderDataset(tmp_path, image_size=16)
    source, make_views = B.pretrain_views(dataset, CPU, augmentation="torchvision", batch_size=2, seed=0,
                                          image_size=16, strength=1.0, use_blur=False, num_workers=0)
    assert source.dataset.dataset.mode == "decode"
    images, _ = next(iter(source))
    view1, view2 = make_views((images, None), torch.Generator()).chunk(2)
    assert view1.shape == (2, 3, 16, 16)


def _grey_levels(n: int) -> list[int]:
    return [10 + 30 * i for i in range(n)]


@pytest.mark.parametrize("kind", ["tensor", "folder", "folder-torchvision"])
def test_pretraining_views_put_the_first_views_first_then_the_second(tmp_path, kind):
    # Flat grey images of distinct levels keep their level through crops, flips, grayscale and
    # colour jitter of strength 0, so each row of the views shows which image it came from.
    levels = _grey_levels(6)
    if kind == "tensor":
        images = torch.tensor(levels, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 20, 20).contiguous()
        dataset = TensorImageDataset(images, None, (), "greys")
    else:
        for i, level in enumerate(levels):
            _save(torch.full((3, 20, 30), level, dtype=torch.uint8), tmp_path / "c" / f"{i}.png")
        dataset = ImageFolderDataset(tmp_path, image_size=16)
    augmentation = "torchvision" if kind == "folder-torchvision" else "batched"
    source, make_views = B.pretrain_views(dataset, CPU, augmentation=augmentation, batch_size=3, seed=0,
                                          image_size=16, strength=0.0, use_blur=False, num_workers=0)
    batch = next(iter(source))
    views = make_views(batch, torch.Generator().manual_seed(0))
    assert views.shape == (6, 3, 16, 16)
    view_levels = views.mean(dim=(1, 2, 3)) * 255
    source = batch[0]  # images, or (torchvision) each image's two finished views
    source_levels = source.float().flatten(1).mean(1) * (255 if source.is_floating_point() else 1)
    assert set(source_levels.round().tolist()) < set(map(float, levels))
    torch.testing.assert_close(view_levels, torch.cat([source_levels, source_levels]), atol=0.5, rtol=0)
    if kind != "tensor":  # folder batches carry two crops per image: crop 0 makes view 1, crop 1 view 2
        crops = torch.stack([torch.full((3, 3, 16, 16), 40), torch.full((3, 3, 16, 16), 200)], dim=1)
        crops = crops.to(torch.uint8) if kind == "folder" else crops / 255.0
        views = make_views((crops, None), torch.Generator().manual_seed(0))
        torch.testing.assert_close(views.mean(dim=(1, 2, 3)) * 255, torch.tensor([40.0] * 3 + [200.0] * 3),
                                   atol=0.5, rtol=0)


@pytest.mark.parametrize("size", [24, 40])
def test_folder_evaluation_preprocesses_once(tmp_path, size):
    """A folder batch after ``eval_inputs``' preprocessing equals the official eval preprocessing
    of the original image (centre crop 0.875 above 32 px, resize), up to uint8 rounding."""
    originals = [_random_image(64, 48, seed=i) for i in range(3)]
    for i, img in enumerate(originals):
        _save(img, tmp_path / "c" / f"{i}.png")
    dataset, preprocess = ImageFolderDataset(tmp_path, image_size=size, mode="train").eval_inputs(size)
    images, _ = next(iter(B.eval_batches(dataset, 3, CPU)))
    got = preprocess(images)
    expected = EvalTransform(size)(torch.stack(originals))
    assert got.shape == expected.shape == (3, 3, size, size)
    assert (got - expected).abs().max() <= 0.5 / 255 + 1e-6


def test_in_memory_evaluation_keeps_the_batched_transform():
    dataset = TensorImageDataset(_random_image(48, 48, 0)[None].repeat(2, 1, 1, 1), torch.tensor([0, 1]), ("a", "b"),
                                 "mem")
    same, preprocess = dataset.eval_inputs(40)
    assert same is dataset and preprocess.crop


def test_fine_tuning_folder_batches_are_crops_and_the_batch_only_flips(tmp_path):
    for i in range(4):
        _save(_random_image(30, 50, seed=i), tmp_path / "c" / f"{i}.png")
    dataset, augment = ImageFolderDataset(tmp_path, image_size=16).crop_flip_inputs(16)
    assert dataset.mode == "train" and dataset.crops == 1
    images, _ = next(iter(B.train_batches(dataset, 4, CPU, seed=0, num_workers=0)))
    assert images.shape == (4, 3, 16, 16)
    out = augment(images, torch.Generator().manual_seed(0))
    x = images.float() / 255
    flipped = [(o - x[i].flip(-1)).abs().max() < 1e-5 for i, o in enumerate(out)]
    kept = [(o - x[i]).abs().max() < 1e-5 for i, o in enumerate(out)]
    assert all(f or k for f, k in zip(flipped, kept))


def _ids_dataset(n: int) -> TensorImageDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2)
    return TensorImageDataset(images, torch.arange(n), tuple(str(i) for i in range(n)), "ids")


def test_step_batches_are_a_pure_function_of_the_step():
    dataset, batch, seed = _ids_dataset(11), 3, 5
    stream = B.StepBatches(dataset, batch, CPU, seed=seed)
    per_epoch = 11 // batch
    for step in [0, 1, 2, 3, 4, 9, 2, 7, 8]:  # in order, across epochs, and jumping back and forth
        epoch, index = divmod(step, per_epoch)
        order = shard_indices(11, epoch, seed, True)
        _, labels = stream(step)
        assert labels.tolist() == order[index * batch:(index + 1) * batch].tolist(), step
    with pytest.raises(DataError, match="labelled images give no batch of 12"):
        B.StepBatches(dataset, 12, CPU, seed=seed)


def test_step_batches_over_an_image_folder(tmp_path):
    for i in range(5):
        _save(_random_image(20, 20, seed=i), tmp_path / f"c{i % 2}" / f"{i}.png")
    dataset = ImageFolderDataset(tmp_path, image_size=8, mode="train")
    stream = B.StepBatches(dataset, 2, CPU, seed=1, num_workers=0)
    sequential = [stream(s) for s in range(5)]
    again = B.StepBatches(dataset, 2, CPU, seed=1, num_workers=0)
    for step in (3, 1, 4):
        images, labels = again(step)
        assert torch.equal(images, sequential[step][0]) and torch.equal(labels, sequential[step][1])


def test_stages_on_an_image_folder_above_32_px(tmp_path):
    """Fine-tuning, evaluation and distillation mixed with labels (which needs the labelled
    stream over the folder) at 40 px, where evaluation centre-crops."""
    for split, n in (("train", 6), ("val", 2)):
        for c in range(2):
            for i in range(n):
                _save(_random_image(56, 44, seed=100 * c + i), tmp_path / "data" / split / f"k{c}" / f"{i}.png")
    common = ["--dataset", "folder", "--data-dir", tmp_path / "data", "--image-size", "40", *RUN]
    teacher = tmp_path / "teacher"
    assert main([str(a) for a in ["finetune", *common, *MODEL, "--run-dir", teacher, "--train-steps", "2"]]) == 0
    assert main([str(a) for a in ["distill", *common, "--checkpoint", teacher, "--run-dir", tmp_path / "student",
                                  "--train-steps", "3", "--distill-alpha", "0.5"]]) == 0
    assert (tmp_path / "student" / "eval.json").exists()


def test_folder_pretraining_resumes_exactly_with_worker_crops(tmp_path):
    """Crops are cut in the workers under per-sample seeds, so a folder run stopped and resumed
    (with a different worker count) ends at the same weights as an uninterrupted one."""
    from simclrv2.engine.checkpoint import load_checkpoint

    for c in range(2):
        for i in range(8):
            _save(_random_image(48, 60, seed=10 * c + i), tmp_path / "data" / "train" / f"k{c}" / f"{i}.png")
    common = ["pretrain", "--dataset", "folder", "--data-dir", tmp_path / "data", "--image-size", "40", *MODEL,
              "--progress", "false", "--precision", "fp32", "--num-threads", "1", "--train-batch-size", "4",
              "--train-steps", "4", "--checkpoint-steps", "2", "--lineareval-while-pretraining", "false"]

    def run(run_dir, workers, *extra):
        assert main([str(a) for a in [*common, "--run-dir", run_dir, "--num-workers", workers, *extra]]) == 0
        return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]

    straight = run(tmp_path / "straight", 0)
    run(tmp_path / "stopped", 2, "--max-steps", "2")
    resumed = run(tmp_path / "stopped", 1)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_evaluation_loaders_take_the_worker_count_and_end_with_their_pass(tmp_path):
    for i in range(4):
        _save(_random_image(20, 30, i), tmp_path / "c" / f"{i}.png")
    dataset = ImageFolderDataset(tmp_path, image_size=16, mode="eval")
    loader = B.eval_batches(dataset, 2, CPU, num_workers=1)
    assert loader.dataloader.num_workers == 1 and not loader.dataloader.persistent_workers
    assert sum(len(images) for images, _ in loader) == 4
    training = B.train_batches(dataset, 2, CPU, seed=0, num_workers=1)
    assert training.dataloader.persistent_workers  # the training loader is reused every epoch


# ------------------------------------------------------------------------------------------------
# Pretraining on any folder of images (issue 21, item 3)
# ------------------------------------------------------------------------------------------------
TINY_PRETRAIN = ["--subset", "8", "--max-steps", "2", "--train-batch-size", "4", "--image-size", "32", *MODEL,
                 "--progress", "false", "--precision", "fp32", "--num-threads", "1", "--num-workers", "0"]


def _metric_keys(run_dir: Path) -> set:
    import json

    return {key for line in (run_dir / "metrics.jsonl").read_text().splitlines() for key in json.loads(line)}


def test_pretrain_on_a_flat_folder_in_a_fresh_process(tmp_path):
    """No class folders, no train/: every image under the folder (recursively) is pretraining data,
    and the linear evaluation that needs labels is skipped."""
    import os
    import subprocess
    import sys

    from simclrv2.engine.checkpoint import load_checkpoint

    for i in range(10):
        _save(_random_image(36, 40, seed=i), tmp_path / "flat" / ("nested/deeper" if i > 6 else "") / f"{i}.png")
    project = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(project)}
    proc = subprocess.run([sys.executable, "-m", "simclrv2", "pretrain", "--dataset", "folder", "--data-dir",
                           str(tmp_path / "flat"), "--run-dir", str(tmp_path / "run"), *TINY_PRETRAIN],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    keys = _metric_keys(tmp_path / "run")
    assert "contrast_loss" in keys and not any(k.startswith("linear_eval") or k.startswith("sup_") for k in keys)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["classes"] is None


def test_pretrain_on_class_folders_without_splits_ignores_the_classes(tmp_path):
    for i in range(8):
        _save(_random_image(36, 40, seed=i), tmp_path / "photos" / f"k{i % 2}" / ("deep" if i > 4 else "") / f"{i}.png")
    dataset = build_dataset("folder", tmp_path / "photos", "train", image_size=32)
    assert len(dataset) == 8 and dataset.labels is None and dataset.classes == []
    assert main([str(a) for a in ["pretrain", "--dataset", "folder", "--data-dir", tmp_path / "photos",
                                  "--run-dir", tmp_path / "run", "--lineareval-while-pretraining", "true",
                                  *TINY_PRETRAIN]]) == 0
    assert not any(k.startswith("linear_eval") for k in _metric_keys(tmp_path / "run"))


def test_labelled_stages_on_a_flat_folder_say_what_layout_they_need(tmp_path, capsys):
    from cli_checks import expect_one_line_error

    for i in range(4):
        _save(_random_image(20, 20, seed=i), tmp_path / "flat" / f"{i}.png")
    expect_one_line_error(capsys, ["finetune", "--dataset", "folder", "--data-dir", tmp_path / "flat", *MODEL,
                                   "--run-dir", tmp_path / "run", "--train-steps", "1"],
                          "has no labels", "train/<class>/ and val/<class>/")


def test_a_label_file_of_relative_paths_selects_the_labelled_subset(tmp_path):
    """The semi-supervised setting on a user's folder: all of train/ unlabelled for pretraining,
    the images a label file lists (paths relative to train/) for fine-tuning."""
    from simclrv2.config import DataConfig, LabelConfig
    from simclrv2.data.splits import labelled_train_set

    for c in range(2):
        for i in range(4):
            _save(_random_image(20, 20, seed=10 * c + i), tmp_path / "data" / "train" / f"k{c}" / f"{i}.png")
    (tmp_path / "labels.txt").write_text("k1/2.png\nk0/3.png\n")
    data = DataConfig(dataset="folder", data_dir=str(tmp_path / "data"), image_size=16)
    full, labelled = labelled_train_set(data, LabelConfig(label_file=str(tmp_path / "labels.txt")), seed=0)
    assert len(full) == 8 and labelled.sample_ids == ["k0/3.png", "k1/2.png"] and labelled.targets == [0, 1]
