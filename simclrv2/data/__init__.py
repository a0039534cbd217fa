"""Data: in-memory and image-folder datasets, batched SimCLR augmentation, loaders, label subsets."""
from .augment import (AugmentParams, EvalTransform, PILViewsDataset, SimCLRAugment, finetune_augment,
                      torchvision_simclr_transform)
from .datasets import (DATASETS, DataError, DatasetNotFoundError, ImageFolderDataset, TensorImageDataset,
                       build_dataset, load_cifar, load_fashion_mnist, load_folder, load_stl10)
from .loader import FileLoader, InMemoryLoader, make_dataloader, make_loader, shard_indices
from .subsets import label_subset, read_subset_file, write_subset_file

__all__ = [
    "AugmentParams", "EvalTransform", "PILViewsDataset", "SimCLRAugment", "finetune_augment",
    "torchvision_simclr_transform", "DATASETS", "DataError", "DatasetNotFoundError", "ImageFolderDataset",
    "TensorImageDataset", "build_dataset", "load_cifar", "load_fashion_mnist", "load_folder", "load_stl10",
    "FileLoader", "InMemoryLoader", "make_dataloader", "make_loader", "shard_indices", "label_subset",
    "read_subset_file", "write_subset_file",
]
