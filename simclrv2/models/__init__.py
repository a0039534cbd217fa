"""SimCLRv2 models: ResNet encoders (optionally selective-kernel), projection and supervised heads, by name."""
from .heads import ProjectionHead, SupervisedHead
from .registry import create_model, list_models
from .resnet import RESNET_SPECS, ResNet, build_resnet, count_parameters
from .simclr import SimCLRv2Model, build_simclrv2_model

__all__ = [
    "RESNET_SPECS",
    "ProjectionHead",
    "ResNet",
    "SimCLRv2Model",
    "SupervisedHead",
    "build_resnet",
    "build_simclrv2_model",
    "count_parameters",
    "create_model",
    "list_models",
]
