"""Data: in-memory and image-folder datasets, batched SimCLR augmentation, loaders, label subsets."""
from .augment import AugmentParams, SimCLRAugment, finetune_augment
from .datasets import DATASETS, ImageDataset, build_dataset
from .errors import DataError, DatasetNotFoundError
from .eval_transform import EvalTransform
from .folder import ImageFolderDataset, load_folder
from .in_memory import TensorImageDataset
from .loader import FileLoader, InMemoryLoader, make_dataloader, shard_indices
from .readers import load_cifar, load_fashion_mnist, load_stl10
from .subsets import label_subset, read_subset_file, write_subset_file
from .torchvision_views import PILViewsDataset, torchvision_simclr_transform

__all__ = [
    "AugmentParams", "EvalTransform", "PILViewsDataset", "SimCLRAugment", "finetune_augment",
    "torchvision_simclr_transform", "DATASETS", "DataError", "DatasetNotFoundError", "ImageDataset",
    "ImageFolderDataset", "TensorImageDataset", "build_dataset", "load_cifar", "load_fashion_mnist", "load_folder",
    "load_stl10", "FileLoader", "InMemoryLoader", "make_dataloader", "shard_indices", "label_subset",
    "read_subset_file", "write_subset_file",
]
