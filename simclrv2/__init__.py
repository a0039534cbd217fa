"""simclrv2: SimCLRv2 in PyTorch (Chen et al., NeurIPS 2020), from pretraining to distillation."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(path: str, **kwargs: Any):
    """A ready model from a run folder, a checkpoint, an export, ``hf://ORG/NAME`` or a converted
    official model (see ``simclrv2.api``)."""
    from simclrv2.api import load as _load

    return _load(path, **kwargs)


def create_model(name: str, pretrained: Any = None, **overrides: Any):
    """The model ``name`` (``list_models()``), optionally with ``pretrained`` weights (see
    ``simclrv2.models.registry``)."""
    from simclrv2.models.registry import create_model as _create

    return _create(name, pretrained=pretrained, **overrides)


def list_models(pattern: Any = None) -> list:
    """Names ``create_model`` and ``torch.hub.load`` accept, optionally filtered shell-style (``"r50_*"``)."""
    from simclrv2.models.registry import list_models as _list

    return _list(pattern)
