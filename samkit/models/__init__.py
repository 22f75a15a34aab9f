"""Models for the experiments: MLP, small CNN (with/without BN), WideResNet-D-W, CIFAR ResNet-D, PyramidNet-D-A."""

from samkit.models.cnn import SmallCNN
from samkit.models.mlp import MLP
from samkit.models.pyramidnet import PyramidNet
from samkit.models.registry import MODELS, build_model
from samkit.models.resnet import CifarResNet
from samkit.models.wide_resnet import WideResNet

__all__ = ["MLP", "MODELS", "CifarResNet", "PyramidNet", "SmallCNN", "WideResNet", "build_model"]
