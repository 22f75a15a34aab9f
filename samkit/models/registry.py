"""`build_model`: a model by name, sized to the dataset (input channels, classes, image size).

    mlp, mlp-bn            MLP on flattened images (hidden 256, 256), without / with BatchNorm
    cnn, cnn-bn            small CNN without / with BatchNorm
    wrn-D-W[-nobn]         WideResNet, depth D = 6n + 4, width factor W (any such D and W parse:
                           wrn-16-4, wrn-28-10, wrn-40-2, ...); -nobn drops every BatchNorm
    resnetD                CIFAR ResNet, depth D = 6n + 2 (resnet20, resnet32, resnet56, ...)
    pyramidnet-D-A         bottleneck PyramidNet, depth D = 9n + 2, width increase alpha A (pyramidnet-272-200,
                           the SAM paper's; pyramidnet-11-24, a tiny one)
MODELS lists the usual names; build_model accepts every name of these forms.

Example:
    >>> model = build_model("resnet20", in_channels=1, num_classes=10, image_size=8)
    >>> model(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import re

import torch  # noqa: F401  (used by the doctest)
from torch import nn

from samkit.models.cnn import SmallCNN
from samkit.models.mlp import MLP
from samkit.models.pyramidnet import PyramidNet
from samkit.models.resnet import CifarResNet
from samkit.models.wide_resnet import WideResNet

MODELS = (
    "mlp", "mlp-bn", "cnn", "cnn-bn",
    "wrn-16-4", "wrn-16-8", "wrn-28-2", "wrn-28-10", "wrn-16-4-nobn",
    "resnet20", "resnet32", "resnet56",
    "pyramidnet-272-200",
)
_WRN = re.compile(r"wrn-(\d+)-(\d+)(-nobn)?")
_RESNET = re.compile(r"resnet(\d+)")
_PYRAMID = re.compile(r"pyramidnet-(\d+)-(\d+)")
_MIN_IMAGE_SIZE = 2  # the CNN's 2x2 max-pool


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def build_model(name: str, *, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The model ``name`` for images of shape (in_channels, image_size, image_size) and ``num_classes``."""
    if not isinstance(name, str):
        raise ValueError(f"model name must be a str, got {name!r}; choose one of {MODELS}")
    _check_positive("in_channels", in_channels)
    _check_positive("num_classes", num_classes)
    _check_positive("image_size", image_size)
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {_MIN_IMAGE_SIZE}, got {image_size}")
    if name in ("mlp", "mlp-bn"):
        return MLP(in_channels * image_size * image_size, num_classes, batch_norm=name == "mlp-bn")
    if name in ("cnn", "cnn-bn"):
        return SmallCNN(in_channels, num_classes, batch_norm=name == "cnn-bn")
    wrn = _WRN.fullmatch(name)
    if wrn:
        depth, width = int(wrn.group(1)), int(wrn.group(2))
        return WideResNet(depth, width, in_channels, num_classes, batch_norm=wrn.group(3) is None)
    resnet = _RESNET.fullmatch(name)
    if resnet:
        return CifarResNet(int(resnet.group(1)), in_channels, num_classes)
    pyramid = _PYRAMID.fullmatch(name)
    if pyramid:
        return PyramidNet(int(pyramid.group(1)), int(pyramid.group(2)), in_channels, num_classes)
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}, or any wrn-D-W[-nobn] (D = 6n + 4), "
                     "resnetD (D = 6n + 2) or pyramidnet-D-A (D = 9n + 2)")
