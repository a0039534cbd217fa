"""Convert official SimCLRv2 TensorFlow 2 checkpoints and SavedModels into simclrv2 checkpoints.

``convert_tf_checkpoint(path)`` reads the variables by their structural keys
(``tf_checkpoint``), infers the architecture from them (``architecture``), maps every variable
onto our encoder, projection head and supervised head with ``official_key_map`` and fails if any
variable is left over or missing. ``converted_checkpoint`` packs the result in the simclrv2
checkpoint format (stage ``"converted"``) that ``load_model``, ``evaluate``, ``finetune
--checkpoint`` and ``distill --checkpoint`` read.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from simclrv2.engine.checkpoint import FORMAT_VERSION, atomic_save
from simclrv2.models import ModelSpec, SimCLRv2Model

from .architecture import ArchitectureError, infer_architecture
from .errors import ConversionError
from .official_keys import official_key_map, official_state_dict
from .tf_checkpoint import OfficialVariables, read_official_variables

__all__ = ["ConversionError", "convert_tf_checkpoint", "converted_checkpoint", "describe_architecture",
           "infer_architecture", "is_tf_source", "model_from_official_variables", "read_official_variables"]

CONVERTED_STAGE = "converted"


def describe_architecture(spec: ModelSpec) -> str:
    """One line such as ``R50 width 0.125, sk_ratio 0, standard stem; head 3 layers -> 128; 10 classes on hidden 0``."""
    stem = "CIFAR" if spec.cifar_stem else ("ResNet-D" if spec.sk_ratio > 0 else "standard")
    text = (f"R{spec.resnet_depth} width {spec.width_multiplier:g}, sk_ratio {spec.sk_ratio:g}, {stem} stem; "
            f"projection head {spec.num_proj_layers} layers -> {spec.proj_out_dim}")
    if spec.num_classes:
        text += f"; supervised head {spec.num_classes} classes on hidden {spec.ft_proj_selector}"
    return text


def model_from_official_variables(variables: OfficialVariables,
                                  ft_proj_selector: Optional[int] = None) -> Tuple[SimCLRv2Model, ModelSpec]:
    """(model in eval mode, its spec) with every official variable mapped exactly once."""
    try:
        arch = infer_architecture(variables.shapes, ft_proj_selector)
    except ArchitectureError as err:
        raise ConversionError(f"{variables.source}: {err}") from err
    with torch.device("meta"):  # no random init: every tensor is read from the checkpoint
        model = SimCLRv2Model.from_spec(arch)
    model = model.to_empty(device="cpu")
    for name, buffer in model.named_buffers():
        if name.endswith("num_batches_tracked"):
            buffer.zero_()
    mapping = official_key_map(model)
    missing = sorted(key for key in mapping if key not in variables.keys)
    claimed = {variables.keys[key] for key in mapping if key in variables.keys}
    left_over = sorted(name for node, name in variables.names.items() if node not in claimed)
    if missing or left_over:
        raise ConversionError(
            f"{variables.source} does not map onto the inferred model ({describe_architecture(arch)}): "
            f"{len(left_over)} checkpoint variable(s) left over {left_over[:3]}, "
            f"{len(missing)} model variable(s) missing {missing[:3]}")
    try:
        state = official_state_dict(model, {key: variables.read(key) for key in mapping})
    except ValueError as err:
        raise ConversionError(f"{variables.source}: {err}") from err
    result = model.load_state_dict(state, strict=False)
    unset = [name for name in result.missing_keys if not name.endswith("num_batches_tracked")]
    if unset or result.unexpected_keys:
        raise ConversionError(f"{variables.source}: tensors not set {unset[:3]}, unexpected {result.unexpected_keys[:3]}")
    return model.eval(), arch


def converted_checkpoint(model: SimCLRv2Model, arch: ModelSpec, variables: OfficialVariables) -> Dict[str, Any]:
    """The simclrv2 checkpoint of a converted model (format documented in ``engine/checkpoint.py``).
    ``image_size`` records 32 for the CIFAR stem and 224 otherwise, the official defaults."""
    return {
        "format_version": FORMAT_VERSION,
        "stage": CONVERTED_STAGE,
        "model": model.state_dict(),
        "model_spec": asdict(arch),
        "mode": "pretrain",
        "config": {"converted_from": str(Path(variables.source).resolve()), "source_format": variables.kind,
                   "source_global_step": variables.global_step},
        "image_size": 32 if arch.cifar_stem else 224,
        "classes": None,
        "metrics": {},
    }


def convert_tf_checkpoint(path: str | Path, out: str | Path | None = None,
                          ft_proj_selector: Optional[int] = None) -> Tuple[SimCLRv2Model, Dict[str, Any]]:
    """Convert an official checkpoint prefix, checkpoint folder or SavedModel; write it to ``out``
    (a ``.pt`` file) when given. Returns (model in eval mode, checkpoint dict)."""
    variables = read_official_variables(path)
    model, arch = model_from_official_variables(variables, ft_proj_selector)
    record = converted_checkpoint(model, arch, variables)
    if out is not None:
        out = Path(out)
        if out.is_dir():
            raise ConversionError(f"output {out} is a folder; name the .pt file to write, e.g. {out / 'converted.pt'}")
        atomic_save(record, out)
    return model, record


def is_tf_source(path: str | Path) -> bool:
    """True for paths ``resolve_source`` accepts (TF checkpoint prefixes and folders, SavedModels)."""
    path = Path(path)
    if path.is_dir():
        return (path / "saved_model.pb").is_file() or (path / "checkpoint").is_file() or any(
            d.name.isdecimal() and (d / "saved_model.pb").is_file() for d in path.iterdir())
    name = path.name
    return name.endswith(".index") or ".data-" in name or Path(f"{path}.index").is_file()
