"""torch.hub entry points, one per name of ``simclrv2.list_models()``:

    torch.hub.load("ORG/simclrv2", "r50_1x_sk1", pretrained="hf://ORG/r50_1x_sk1")
    torch.hub.load("path/to/simclrv2", "r18_0p25x_sk0_cifar", source="local", pretrained="runs/pretrain-...")

Each takes ``pretrained`` and architecture overrides like ``simclrv2.create_model``.
"""
from simclrv2.models.registry import hub_entry_points as _hub_entry_points

dependencies = ["torch", "numpy", "safetensors", "tqdm"]

globals().update(_hub_entry_points())
