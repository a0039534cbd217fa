"""SimCLRv2 model: ResNet encoder + projection head + optional supervised head (official
``tf2/model.py`` ``Model``; paper section 2).

The official model concatenates the augmented views along the batch inside ``__call__``; here
``forward`` takes the already concatenated batch (N, 3, H, W).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .heads import ProjectionHead, SupervisedHead
from .resnet import ResNet, build_resnet

MODES = ("pretrain", "finetune")


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


def build_simclrv2_model(
    depth: int = 50,
    width_multiplier: float = 1.0,
    sk_ratio: float = 0.0,
    cifar_stem: bool = False,
    num_proj_layers: int = 3,
    proj_out_dim: int = 128,
    ft_proj_selector: int = 1,
    num_classes: Optional[int] = None,
    zero_init_logits: bool = False,
) -> SimCLRv2Model:
    """Builds the model in ``"pretrain"`` mode; the supervised head (if ``num_classes``) takes the
    hidden selected by ``ft_proj_selector`` as input, as the official lazily built head does."""
    encoder = build_resnet(depth, width_multiplier, sk_ratio, cifar_stem)
    head = ProjectionHead(encoder.out_dim, num_proj_layers, proj_out_dim, ft_proj_selector)
    supervised = None if num_classes is None else SupervisedHead(head.finetune_dim, num_classes, zero_init_logits)
    return SimCLRv2Model(encoder, head, supervised)
