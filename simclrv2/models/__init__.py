"""SimCLRv2 models: ResNet encoders (optionally selective-kernel), projection and supervised heads, by name."""
from .heads import ProjectionHead, SupervisedHead
from .registry import create_model, list_models
from .resnet import RESNET_SPECS, ResNet, build_resnet, count_parameters
from .simclr import ModelSpec, SimCLRv2Model, build_simclrv2_model, freeze_for_finetuning, frozen_copy

__all__ = [
    "RESNET_SPECS",
    "ModelSpec",
    "ProjectionHead",
    "ResNet",
    "SimCLRv2Model",
    "SupervisedHead",
    "build_resnet",
    "build_simclrv2_model",
    "count_parameters",
    "freeze_for_finetuning",
    "frozen_copy",
    "create_model",
    "list_models",
]
