"""Models by name: ``create_model("r50_1x_sk1")``, ``list_models()`` and the ``torch.hub`` entry points.

Official names follow the released checkpoints of google-research/simclr (``r{depth}_{width}x_sk{0,1}``,
depth 50/101/152, width 1/2/3; SK 1 is ``sk_ratio`` 0.0625, the paper's and the official code's
value, which also turns on the ResNet-D stem and shortcuts). They carry what those checkpoints
hold: the 3-layer projection head to 128 and the 1000-way ImageNet head on the encoder output
(``ft_proj_selector`` 0, the official linear-evaluation head). The package's own models are its
presets (``simclrv2/config.py``): ``r18_0p25x_sk0_cifar`` is the embedded preset's ResNet-18 at
width 0.25 with the CIFAR stem, ``r50_1x_sk0_cifar`` the CIFAR-10 preset's (paper appendix B.9),
with 10 classes each; ``_cifar`` marks the CIFAR stem and ``p`` the point of a fractional width.

A name fixes the encoder: depth, width, selective kernels and stem. ``pretrained`` weights must
hold that encoder, and each override given must agree with them too; without ``pretrained`` the
overrides change the built model (``num_classes=None`` drops the supervised head).
"""
from __future__ import annotations

import difflib
import fnmatch
import functools
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Optional

from .simclr import ModelSpec, SimCLRv2Model

OFFICIAL_SK_RATIO = 0.0625  # official --sk_ratio of the SK models (paper section 2)
ENCODER_FIELDS = ("resnet_depth", "width_multiplier", "sk_ratio", "cifar_stem")  # what a name fixes
OPTIONS = tuple(f.name for f in fields(ModelSpec)) + ("zero_init_logits",)


@dataclass(frozen=True)
class ModelEntry:
    """A named architecture and the image size it is made for."""

    spec: ModelSpec
    image_size: int
    about: str


def _official_entries() -> dict[str, ModelEntry]:
    entries = {}
    for depth in (50, 101, 152):
        for width in (1, 2, 3):
            for sk in (0, 1):
                spec = ModelSpec(resnet_depth=depth, width_multiplier=float(width),
                                 sk_ratio=OFFICIAL_SK_RATIO if sk else 0.0, cifar_stem=False, num_proj_layers=3,
                                 proj_out_dim=128, ft_proj_selector=0, num_classes=1000)
                about = f"official SimCLRv2 ResNet-{depth} {width}x{' with selective kernels' if sk else ''}, ImageNet"
                entries[f"r{depth}_{width}x_sk{sk}"] = ModelEntry(spec, 224, about)
    return entries


def _preset_entry(preset: str, image_size: int, num_classes: int, about: str) -> ModelEntry:
    """The model a preset trains (its pretraining ``ModelConfig``), built as the stages build it."""
    from simclrv2.config import PRESETS, ModelConfig

    model = ModelConfig(**PRESETS[preset]["pretrain"]["model"])
    return ModelEntry(model.spec(image_size, num_classes), image_size, about)


@functools.lru_cache(maxsize=None)
def _registry() -> dict[str, ModelEntry]:
    return {
        **_official_entries(),
        "r18_0p25x_sk0_cifar": _preset_entry("embedded", 28, 10, "embedded preset: ResNet-18 0.25x, CIFAR stem, "
                                                                  "Fashion-MNIST 28 px"),
        "r50_1x_sk0_cifar": _preset_entry("cifar", 32, 10, "CIFAR-10 preset: ResNet-50 1x, CIFAR stem, 32 px"),
    }


def list_models(pattern: Optional[str] = None) -> list[str]:
    """Registered names, sorted; ``pattern`` filters them shell-style (``"r50_*"``)."""
    names = sorted(_registry())
    return names if pattern is None else fnmatch.filter(names, pattern)


def model_entry(name: str) -> ModelEntry:
    """The entry of ``name``; an unknown name fails in one line with the closest names."""
    from simclrv2.config import ConfigError

    registry = _registry()
    if name not in registry:
        close = difflib.get_close_matches(str(name), registry, n=4, cutoff=0.6)
        hint = f"close names: {', '.join(close)}" if close else f"known names: {', '.join(sorted(registry))}"
        raise ConfigError(f"unknown model {name!r}; {hint} (simclrv2.list_models() lists them all)")
    return registry[name]


def name_of(spec: ModelSpec) -> Optional[str]:
    """The registered name whose encoder ``spec`` has, if any."""
    return next((name for name, entry in _registry().items()
                 if all(getattr(entry.spec, k) == getattr(spec, k) for k in ENCODER_FIELDS)), None)


def create_model(name: str, pretrained: Optional[str] = None, **overrides: Any) -> SimCLRv2Model:
    """The model ``name`` (``list_models()``): freshly initialised (training mode), or with
    ``pretrained`` weights (eval mode, as ``simclrv2.load`` gives them): a run folder, a ``.pt``
    or ``.safetensors`` file, an exported folder, an official TF checkpoint or ``hf://ORG/NAME``.
    """
    from simclrv2.config import ConfigError

    entry = model_entry(name)
    unknown = sorted(set(overrides) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"create_model({name!r}): unknown option(s) {', '.join(unknown)}; "
                          f"choose from {', '.join(OPTIONS)}")
    if pretrained is None:
        zero_init_logits = overrides.pop("zero_init_logits", False)
        model = SimCLRv2Model.from_spec(replace(entry.spec, **overrides), zero_init_logits)
        model.image_size = entry.image_size
        return model
    from simclrv2.api import load

    model = load(pretrained)
    _check_pretrained(name, entry, overrides, pretrained, model)
    return model


def _check_pretrained(name: str, entry: ModelEntry, overrides: dict, pretrained: str, model: SimCLRv2Model) -> None:
    """Fail in one line when the weights hold another encoder than ``name`` or disagree with an override."""
    from simclrv2.engine.checkpoint import CheckpointError

    recorded = asdict(model.spec)
    wanted = {**{k: getattr(entry.spec, k) for k in ENCODER_FIELDS}, **overrides}
    wanted.pop("zero_init_logits", None)  # an initialisation choice: loaded weights have none
    differ = [f"{k} {recorded.get(k)!r} (wanted {v!r})" for k, v in wanted.items() if recorded.get(k) != v]
    if differ:
        actual = name_of(model.spec)
        which = f"a {actual} model" if actual else "another model"
        raise CheckpointError(f"pretrained {pretrained} holds {which}, not {name}: {', '.join(differ)}; "
                              f"use the matching name or drop the override")


def hub_entry_points() -> dict[str, Callable[..., SimCLRv2Model]]:
    """One function per name, as ``hubconf.py`` exposes them to ``torch.hub.load``."""
    return {name: _entry_point(name) for name in list_models()}


def _entry_point(name: str) -> Callable[..., SimCLRv2Model]:
    def entry(pretrained: Optional[str] = None, **overrides: Any) -> SimCLRv2Model:
        return create_model(name, pretrained=pretrained, **overrides)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"{_registry()[name].about}. ``pretrained``: a run folder, .pt, .safetensors, exported "
                     f"folder or hf://ORG/NAME whose model is {name}; other keywords override the architecture.")
    return entry
