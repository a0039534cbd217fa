"""Python API: ``simclrv2.load(path)`` returns a ready model; ``simclrv2.create_model(name)`` one by name.

``path`` may be a run folder (its newest valid checkpoint), a checkpoint ``.pt`` (including one
written by ``simclrv2 convert-tf``), a ``.safetensors`` file or a model folder from ``simclrv2
export``, a Hugging Face Hub model ``hf://ORG/NAME`` (needs the ``hub`` extra: ``pip install
'simclrv2[hub]'``; ``simclrv2.hub``), or an official TF2 checkpoint / SavedModel (converted on the fly).
The model is in eval mode; ``model.embed(images)`` gives pooled encoder features and
``model.predict(images)`` class probabilities, for float RGB images in [0, 1] of shape
(N, 3, H, W) with no mean/std normalisation, as the official model takes them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from simclrv2.engine.checkpoint import CheckpointError
from simclrv2.models import SimCLRv2Model


def load(path: str | Path, device: str | torch.device = "cpu", ft_proj_selector: Optional[int] = None) -> SimCLRv2Model:
    """The model stored at ``path``, on ``device``, in eval mode.

    ``ft_proj_selector`` applies to official TF checkpoints only: which projection-head hidden
    their supervised head reads (default: inferred, 0 when the widths allow it).
    """
    model, _ = load_with_classes(path, ft_proj_selector)
    return model.to(device).eval()


def load_with_classes(path: str | Path, ft_proj_selector: Optional[int] = None) -> tuple[SimCLRv2Model, Optional[list]]:
    """(model on the CPU, the class names its logits stand for, where the source records them)."""
    from simclrv2 import hub

    if hub.is_hf_reference(path):
        _no_selector(ft_proj_selector)
        return hub.load_reference(path)
    path = Path(path)
    if not path.exists() and not Path(f"{path}.index").exists():
        raise CheckpointError(f"{path} does not exist; pass a run folder, a .pt or .safetensors file, an exported "
                              "model folder, hf://ORG/NAME, or an official TF checkpoint or SavedModel")
    from simclrv2.convert import convert_tf_checkpoint, is_tf_source

    if is_tf_source(path):
        model, _ = convert_tf_checkpoint(path, ft_proj_selector=ft_proj_selector)
        return model, None
    _no_selector(ft_proj_selector)
    if path.suffix == ".safetensors":
        from simclrv2.export import read_safetensors

        return read_safetensors(path)
    if hub.is_model_folder(path):
        return hub.load_folder(path)
    from simclrv2.engine.checkpoint import load_model

    model, ckpt = load_model(str(path))
    model.image_size = ckpt.get("image_size")
    return model, ckpt.get("classes")


def _no_selector(ft_proj_selector: Optional[int]) -> None:
    if ft_proj_selector is not None:
        raise ValueError("ft_proj_selector only applies to official TF checkpoints; a simclrv2 checkpoint records its own")
