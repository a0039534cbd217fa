"""SimCLRv2 model: ResNet encoder + projection head + optional supervised head (official
``tf2/model.py`` ``Model``; paper section 2).

The official model concatenates the augmented views along the batch inside ``__call__``; here
``forward`` takes the already concatenated batch (N, 3, H, W).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from .heads import ProjectionHead, SupervisedHead
from .resnet import ResNet, build_resnet

MODES = ("pretrain", "finetune")


@dataclass(frozen=True)
class ModelSpec:
    """A SimCLRv2 architecture: what checkpoints, exports and conversions record to rebuild a model.

    The fields are the model options of the command line (``--resnet-depth``, ...), with the CIFAR
    stem decided and ``num_classes`` the supervised head's size (None: no supervised head).
    """

    resnet_depth: int = 50
    width_multiplier: float = 1.0
    sk_ratio: float = 0.0
    cifar_stem: bool = False
    num_proj_layers: int = 3
    proj_out_dim: int = 128
    ft_proj_selector: int = 1
    num_classes: Optional[int] = None


class SimCLRv2Model(nn.Module):
    """``forward(x) -> (projection or None, logits or None)``, depending on ``mode``.

    * ``"pretrain"``: ``(projection, logits)``; the supervised head sees the selected hidden
      through ``detach()`` (the official ``stop_gradient`` of linear evaluation while
      pretraining), ``logits`` is None without a supervised head.
    * ``"finetune"``: ``(None, logits)``; only the encoder, the first ``ft_proj_selector`` head
      layers and the supervised head run. (The official code also runs the unused head layers,
      which only updates their BN moving statistics.)

    ``image_size`` is the side length the model was trained on, where known (``simclrv2.load``
    reads it from the checkpoint; ``simclrv2 export`` uses it as the ONNX input size).
    """

    def __init__(
        self,
        encoder: ResNet,
        projection_head: ProjectionHead,
        supervised_head: Optional[SupervisedHead] = None,
        mode: str = "pretrain",
    ) -> None:
        super().__init__()
        if projection_head.in_dim != encoder.out_dim:
            raise ValueError(
                f"projection head expects {projection_head.in_dim} features but the encoder gives {encoder.out_dim}"
            )
        self.encoder = encoder
        self.projection_head = projection_head
        self.supervised_head = supervised_head
        self.mode = mode
        self.image_size: Optional[int] = None

    @classmethod
    def from_spec(cls, spec: ModelSpec, zero_init_logits: bool = False) -> "SimCLRv2Model":
        """Builds ``spec`` in ``"pretrain"`` mode; the supervised head (if ``num_classes``) takes the
        hidden selected by ``ft_proj_selector`` as input, as the official lazily built head does."""
        encoder = build_resnet(spec.resnet_depth, spec.width_multiplier, spec.sk_ratio, spec.cifar_stem)
        head = ProjectionHead(encoder.out_dim, spec.num_proj_layers, spec.proj_out_dim, spec.ft_proj_selector)
        supervised = None if spec.num_classes is None else SupervisedHead(head.finetune_dim, spec.num_classes,
                                                                           zero_init_logits)
        return cls(encoder, head, supervised)

    @property
    def spec(self) -> ModelSpec:
        """The architecture of this model as it is now (the selector and classifier may have changed)."""
        encoder, head = self.encoder, self.projection_head
        if encoder.depth is None:
            raise ValueError("the encoder was not built by build_resnet (unknown depth); cannot describe it")
        return ModelSpec(encoder.depth, encoder.width_multiplier, encoder.sk_ratio, encoder.cifar_stem, head.num_layers,
                         head.proj_out_dim, head.ft_proj_selector,
                         None if self.supervised_head is None else self.supervised_head.linear.out_features)

    @property
    def mode(self) -> str:
        """``"pretrain"`` or ``"finetune"``; validated on assignment."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}")
        if value == "finetune" and self.supervised_head is None:
            raise ValueError("mode 'finetune' needs a supervised head; build the model with num_classes")
        self._mode = value

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features (N, encoder.out_dim)."""
        return self.encoder(x)

    def finetune_features(self, x: torch.Tensor) -> torch.Tensor:
        """The head hidden selected by ``projection_head.ft_proj_selector``."""
        return self.projection_head.hidden_at(self.encoder(x), self.projection_head.ft_proj_selector)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, num_classes): softmax of the supervised head's logits on the
        hidden selected by ``ft_proj_selector``, for float RGB images in [0, 1] (N, 3, H, W)."""
        if self.supervised_head is None:
            raise ValueError("this model has no supervised head, so it cannot predict classes; use embed() for "
                             "features, or fine-tune it (simclrv2 finetune --checkpoint ...) first")
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"predict expects float RGB images in [0, 1] of shape (N, 3, H, W), got "
                             f"{x.dtype} {tuple(x.shape)}; convert uint8 images with x.float() / 255")
        return self.supervised_head(self.finetune_features(x)).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        if self.mode == "finetune":
            return None, self.supervised_head(self.finetune_features(x))
        projection, hidden = self.projection_head(self.encoder(x))
        logits = None if self.supervised_head is None else self.supervised_head(hidden.detach())
        return projection, logits


def build_simclrv2_model(*, zero_init_logits: bool = False, **spec: object) -> SimCLRv2Model:
    """``SimCLRv2Model.from_spec(ModelSpec(**spec))``: the model by its :class:`ModelSpec` fields."""
    return SimCLRv2Model.from_spec(ModelSpec(**spec), zero_init_logits)


def frozen_copy(model: nn.Module) -> nn.Module:
    """An inference-only copy (teacher, momentum encoder start)."""
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def freeze_for_finetuning(model: SimCLRv2Model, fine_tune_after_block: int) -> None:
    """Freeze what fine-tuning does not train (official ``fine_tune_after_block`` and selector).

    -1 trains the whole network; 0 freezes the stem; k in 1..4 also freezes block groups 1..k.
    Head layers above ``ft_proj_selector`` are unused in fine-tuning and frozen too.
    """
    encoder = model.encoder
    frozen: list[nn.Module] = []
    if fine_tune_after_block >= 0:
        frozen.append(encoder.stem)
    frozen += [getattr(encoder, f"layer{i}") for i in range(1, fine_tune_after_block + 1)]
    head = model.projection_head
    selector = head.num_layers if head.ft_proj_selector == -1 else head.ft_proj_selector
    if fine_tune_after_block == 4:
        frozen += list(head.layers[:selector])
    frozen += list(head.layers[selector:])
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
