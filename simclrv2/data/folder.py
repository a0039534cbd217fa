"""Image folders (``root/<split>/<class>/<image>``, or any folder of images for pretraining),
decoded lazily and defensively with Pillow (libjpeg-turbo, :mod:`.images`) in DataLoader
workers into fixed-size uint8 tensors so they batch; training crops are cut there from the full
decoded image, as the official code does, and the batch gets the rest on the device."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
from torch import Tensor

from .augment import SimCLRAugment, ViewMaker, finetune_augment, first_then_second
from .crops import CROP_MIN_AREA, CROP_PROPORTION, center_crop_box, sample_crop_boxes
from .errors import DataError, DatasetNotFoundError
from .eval_transform import EvalTransform
from .images import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, ImageError, decode_rgb_array, list_images
from .loader import FileLoader, make_dataloader
from .resize import crop_resize

if TYPE_CHECKING:
    from simclrv2.engine.runtime import Runtime

PathLike = Union[str, os.PathLike]

FOLDER_MODES = ("eval", "train", "decode")
FOLDER_SPLITS = {"train": ("train",), "val": ("val", "validation", "test"), "test": ("test", "val", "validation")}


class ImageFolderDataset(torch.utils.data.Dataset):
    """``root/<class>/**/<image>`` (or, unlabelled, ``root/**/<image>``) decoded lazily to uint8 tensors.

    Classes are numbered by one list of names, ``classes`` (default: the class folders of
    ``root``, sorted), so that every split of a dataset can share its training split's numbering:
    a class folder that is not in the list is an error, a class without a folder is simply
    empty. With ``labelled=False`` every image under ``root`` is a sample with label -1, in
    class folders or not, since pretraining needs no labels.

    Files are found and decoded by :mod:`simclrv2.data.images`: links followed without loops,
    each real file once, sizes above ``max_pixels`` refused, every image mode to 8-bit RGB,
    EXIF orientation applied, data that ends early an error. ``sample_ids`` are the paths
    relative to ``root`` (e.g. ``cat/0001.jpg``), which label files may name.

    ``mode``:

    * ``"eval"``: the official eval preprocessing, (3, S, S): an aspect-preserving centre crop
      of ``crop_proportion`` (default 0.875 above 32 px, none at 32 px or less), then resize;
    * ``"train"``: ``crops`` independent random crops of the whole image with the official crop
      rule (``crop_and_resize``), each resized: (3, S, S) for one crop (fine-tuning,
      distillation), (crops, 3, S, S) otherwise (pretraining: one crop per view; the batched
      augmentation then flips, jitters and blurs);
    * ``"decode"``: the decoded image at its own size (for per-image PIL transforms, which crop
      it themselves).

    Resizing is TensorFlow's un-antialiased half-pixel bicubic
    (:func:`~simclrv2.data.resize.crop_resize`), rounded to uint8.

    ``dataset[i]`` is ``(image, label, skipped)``; ``skipped`` counts unreadable files that
    were replaced to produce this sample (0 normally), so the count survives DataLoader workers
    and the loop can sum it. Unreadable files raise :class:`DataError` unless
    ``skip_bad_images`` is true, in which case the next readable sample is used instead (and
    empty class folders are tolerated).
    """

    def __init__(self, root: PathLike, image_size: int = 224, mode: str = "eval", skip_bad_images: bool = False,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, crop_proportion: Optional[float] = None,
                 crops: int = 1, classes: Optional[Sequence[str]] = None, labelled: bool = True,
                 max_pixels: int = MAX_IMAGE_PIXELS):
        if image_size <= 0:
            raise DataError(f"image_size must be positive, got {image_size}")
        self.root = Path(root)
        self.image_size, self.skip_bad_images, self.max_pixels = image_size, skip_bad_images, max_pixels
        self.crop_min_area = CROP_MIN_AREA
        self._set_mode(mode, crops, crop_proportion)
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"image folder {self.root} does not exist; pass the folder that holds "
                                       "one sub-folder per class as --data-dir")
        exts = tuple(e.lower() for e in extensions)
        self.empty_classes: list[str] = []
        if labelled:
            self.name = f"folder {self.root}"
            self.classes = list(classes) if classes is not None else class_folders(self.root)
            self.samples = self._labelled_samples(exts)
        else:
            self.name = f"folder {self.root} (unlabelled: labelled stages need train/<class>/ and val/<class>/)"
            self.classes = []
            self.samples = [(f, -1) for f in _list_images(self.root, exts, {})]
        if not self.samples:
            raise DataError(f"no images ({', '.join(exts)}) found under {self.root}")

    def _labelled_samples(self, exts: tuple[str, ...]) -> list[tuple[str, int]]:
        if not self.classes:
            raise DataError(f"no class folders in {self.root}; expected {self.root}/<class>/<image files>")
        known = set(self.classes)
        unknown = [c for c in class_folders(self.root) if c not in known]
        if unknown:
            raise DataError(f"class folder(s) {', '.join(unknown)} in {self.root} are not among the dataset's "
                            f"{len(self.classes)} classes ({_shown(self.classes)}), which the training split "
                            "defines; add them to train/ or remove them here")
        samples: list[tuple[str, int]] = []
        seen: dict[str, str] = {}  # one image under two class folders (through links) is an error
        for index, c in enumerate(self.classes):
            if not (self.root / c).is_dir():
                continue  # a split may lack some classes; the others keep their indices
            files = _list_images(self.root / c, exts, seen)
            if not files:
                if not self.skip_bad_images:
                    raise DataError(f"class folder {self.root / c} has no images ({', '.join(exts)}); remove it, "
                                    "add images, or pass --skip-bad-images to allow empty classes")
                self.empty_classes.append(c)
                warnings.warn(f"class folder {self.root / c} has no images; the class is kept but empty")
            samples.extend((f, index) for f in files)
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    @property
    def labels(self) -> Optional[Tensor]:
        """Labels (N,) int64, or None for an unlabelled folder."""
        return torch.tensor(self.targets, dtype=torch.long) if self.classes else None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sample_ids(self) -> list[str]:
        """Paths relative to ``root`` with ``/`` (e.g. ``n01440764/n01440764_10026.JPEG``); label files
        name images by these or, as the official subset files do, by the file name alone."""
        return [os.path.relpath(path, self.root).replace(os.sep, "/") for path, _ in self.samples]

    def _set_mode(self, mode: str, crops: int, crop_proportion: Optional[float]) -> None:
        if mode not in FOLDER_MODES:
            raise DataError(f"folder mode must be one of {FOLDER_MODES}, got {mode!r}")
        if crops < 1:
            raise DataError(f"crops must be at least 1, got {crops}")
        if crop_proportion is None and self.image_size > 32:
            crop_proportion = CROP_PROPORTION
        self.mode, self.crops, self.crop_proportion = mode, crops, crop_proportion

    def _copy(self) -> "ImageFolderDataset":
        new = object.__new__(ImageFolderDataset)
        new.__dict__.update(self.__dict__)
        return new

    def subset(self, indices: Union[Tensor, Sequence[int]]) -> "ImageFolderDataset":
        """A copy holding only the samples at ``indices``."""
        new = self._copy()
        new.samples = [self.samples[i] for i in torch.as_tensor(indices, dtype=torch.long).tolist()]
        return new

    def with_mode(self, mode: str, crops: int = 1, crop_min_area: float = CROP_MIN_AREA) -> "ImageFolderDataset":
        """A copy of the same samples read in another ``mode`` (see the class docstring); train
        crops cover at least ``crop_min_area`` of the image."""
        new = self._copy()
        new._set_mode(mode, crops, self.crop_proportion)
        new.crop_min_area = crop_min_area
        return new

    def loader(self, batch_size: int, rt: "Runtime", *, shuffle: bool, drop_last: bool, seed: int,
               num_workers: Optional[int] = None, persistent_workers: bool = True) -> FileLoader:
        """Batches decoded by DataLoader workers, moved to ``rt.device``."""
        return make_dataloader(self, batch_size, shuffle, drop_last, seed, rt.rank, rt.world_size, num_workers,
                               device=rt.device, persistent_workers=persistent_workers)

    def pretrain_inputs(self, image_size: int, strength: float, use_blur: bool,
                        crop_min_area: float = CROP_MIN_AREA) -> tuple["ImageFolderDataset", ViewMaker]:
        """Each sample arrives as its two crops (B, 2, 3, S, S), cut in the workers; the batch
        then gets flip, colour and blur."""
        augment = SimCLRAugment(image_size, color_jitter_strength=strength, use_blur=use_blur, crop=False)

        def make_views(batch: Any, generator: torch.Generator) -> Tensor:
            return augment(first_then_second(batch[0]), generator)  # both crops in one call, as views() does
        return self.with_mode("train", crops=2, crop_min_area=crop_min_area), make_views

    def crop_flip_inputs(self, image_size: int, crop_min_area: float = CROP_MIN_AREA) -> tuple["ImageFolderDataset", SimCLRAugment]:
        """One random crop per sample in the workers; the batch is only flipped."""
        return self.with_mode("train", crop_min_area=crop_min_area), finetune_augment(image_size, crop=False)

    def eval_inputs(self, image_size: int) -> tuple["ImageFolderDataset", EvalTransform]:
        """Centre crop and resize in the workers."""
        return self.with_mode("eval"), EvalTransform(image_size, crop=False)

    def full_images(self) -> "ImageFolderDataset":
        """Each image decoded at its own size, for per-image transforms that crop it themselves."""
        return self.with_mode("decode")

    def load(self, index: int) -> Tensor:
        """Decode and preprocess one image; raises :class:`DataError` naming a bad file."""
        path = self.samples[index][0]
        try:
            image = decode_rgb(path, self.max_pixels)
        except Exception as err:  # noqa: BLE001 -- decoders raise OSError, ValueError, SyntaxError...
            raise DataError(f"cannot decode image {path}: {err}. Replace or delete the file, or pass "
                            "--skip-bad-images to skip unreadable images") from None
        return self._transform(image)

    def _transform(self, image: Tensor) -> Tensor:
        if self.mode == "decode":
            return image
        _, height, width = image.shape
        size = self.image_size
        if self.mode == "train":
            crops = crop_resize(image, sample_crop_boxes(self.crops, height, width,
                                                         area_range=(self.crop_min_area, 1.0)), size)
            return crops[0] if self.crops == 1 else crops
        box = (center_crop_box(height, width, size, size, self.crop_proportion) if self.crop_proportion
               else (0, 0, height, width))
        return crop_resize(image, box, size)[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        if not self.skip_bad_images:
            return self.load(index), self.samples[index][1], 0
        for skipped in range(len(self.samples)):
            i = (index + skipped) % len(self.samples)
            try:
                return self.load(i), self.samples[i][1], skipped
            except DataError as err:
                warnings.warn(str(err))
        raise DataError(f"no readable image under {self.root}; every file failed to decode")



def decode_rgb(path: PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Tensor:
    """Decode an image file to uint8 (3, H, W) RGB, trusting nothing in it
    (:func:`~simclrv2.data.images.decode_rgb_array`). Uses Pillow, as ``torchvision.io``
    decoding is deprecated."""
    array = decode_rgb_array(Path(path).read_bytes(), max_pixels)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def class_folders(directory: Path) -> list[str]:
    """The class names of a split: its visible sub-folder names, sorted."""
    return sorted(d.name for d in directory.iterdir() if d.is_dir() and not d.name.startswith("."))


def _list_images(directory: Path, extensions: tuple[str, ...], seen: dict[str, str]) -> list[str]:
    try:
        return list_images(str(directory), extensions, seen)
    except ImageError as err:
        raise DataError(f"{err}: an image cannot be in two class folders; remove one of them") from None
    except OSError as err:
        raise DataError(f"cannot list the images under {directory}: {err}") from None


def _shown(names: Sequence[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_folder(data_dir: PathLike, split: str = "train", image_size: int = 224, mode: Optional[str] = None,
                skip_bad_images: bool = False) -> ImageFolderDataset:
    """A split of a folder dataset: ``data_dir/<split>/<class>/**/<image>``, classes numbered by the
    class folders of ``data_dir/train`` for every split (one mapping by class name).

    A folder with none of the split sub-folders (``train``, ``val``, ``validation``, ``test``)
    is, as its train split, every image under it, unlabelled: what pretraining needs.
    """
    data_dir = Path(data_dir)
    if split not in FOLDER_SPLITS:
        raise DataError(f"folder split must be one of {sorted(FOLDER_SPLITS)}, got {split!r}")
    mode = mode or ("train" if split == "train" else "eval")
    split_dirs = [data_dir / name for name in FOLDER_SPLITS[split] if (data_dir / name).is_dir()]
    if split == "train" and not any((data_dir / name).is_dir() for names in FOLDER_SPLITS.values() for name in names):
        return ImageFolderDataset(data_dir, image_size, mode, skip_bad_images, labelled=False)
    if not split_dirs:
        raise DatasetNotFoundError(f"no {' or '.join(FOLDER_SPLITS[split])} sub-folder in {data_dir}; a labelled "
                                   f"folder dataset needs {data_dir}/train/<class>/<images> and "
                                   f"{data_dir}/val/<class>/<images>")
    train_dir = data_dir / "train"
    classes = class_folders(train_dir) if train_dir.is_dir() else None
    return ImageFolderDataset(split_dirs[0], image_size, mode, skip_bad_images, classes=classes)

