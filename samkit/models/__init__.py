"""Models for the experiments: MLP, small CNN (with/without BN), WideResNet-D-W, CIFAR ResNet-D."""

from samkit.models.cnn import SmallCNN
from samkit.models.mlp import MLP
from samkit.models.registry import MODELS, build_model
from samkit.models.resnet import CifarResNet
from samkit.models.wide_resnet import WideResNet

__all__ = ["MLP", "MODELS", "CifarResNet", "SmallCNN", "WideResNet", "build_model"]
