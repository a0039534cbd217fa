"""simclrv2: SimCLRv2 in PyTorch (Chen et al., NeurIPS 2020), from pretraining to distillation."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(path: str, **kwargs: Any):
    """A ready model from a run folder, a checkpoint or a converted official model (see ``simclrv2.api``)."""
    from simclrv2.api import load as _load

    return _load(path, **kwargs)
