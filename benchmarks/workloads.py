"""What the benchmarks run on: the small CNN on Fashion-MNIST-shaped batches, and bare parameter sets.

    small_cnn          samkit's "cnn" (3 conv layers, 94k parameters), 1x28x28 input, 10 classes, no BatchNorm;
                       batch_norm=True: "cnn-bn", the same with BatchNorm (what SAM-ON perturbs)
    fashion_batch      random N x 1 x 28 x 28 images and labels (timing does not depend on the values)
    wide_parameters    the parameter shapes of a WRN-16-4 (2.7M parameters in 44 tensors), with gradients
    small_parameters   n small tensors (biases and 3x3 kernels of a few channels), with gradients

Random tensors are enough: no step here depends on what the data or the weights are, only on their shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from benchmarks.timing import check_count
from samkit.models import build_model

IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10


def small_cnn(*, device: str = "cpu", seed: int = 0, batch_norm: bool = False) -> nn.Module:
    """samkit's "cnn", or "cnn-bn" (the same with BatchNorm after each convolution) with ``batch_norm=True``."""
    torch.manual_seed(seed)
    name = "cnn-bn" if batch_norm else "cnn"
    return build_model(name, in_channels=IMAGE_SHAPE[0], num_classes=NUM_CLASSES, image_size=IMAGE_SHAPE[1]).to(device)


def fashion_batch(batch_size: int, *, device: str = "cpu", seed: int = 0) -> tuple[Tensor, Tensor]:
    check_count("batch_size", batch_size, minimum=1)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch_size, *IMAGE_SHAPE, generator=generator)
    targets = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
    return inputs.to(device), targets.to(device)


def wide_parameters(*, width: int = 4, device: str = "cpu", seed: int = 0) -> list[Tensor]:
    """The parameters of a WRN-16-``width`` (width 4: 2.7M in 44 tensors), each with a random ``.grad``."""
    check_count("width", width, minimum=1)
    torch.manual_seed(seed)
    model = build_model(f"wrn-16-{width}", in_channels=3, num_classes=10, image_size=32)
    return _with_gradients([p.detach().to(device) for p in model.parameters()], seed)


def small_parameters(count: int = 800, *, device: str = "cpu", seed: int = 0) -> list[Tensor]:
    """``count`` small tensors, alternating biases (16) and 3x3 kernels of 4 -> 4 channels (144 values)."""
    check_count("count", count, minimum=1)
    generator = torch.Generator().manual_seed(seed)
    shapes = [(16,) if i % 2 == 0 else (4, 4, 3, 3) for i in range(count)]
    return _with_gradients([torch.randn(s, generator=generator).to(device) for s in shapes], seed)


def _with_gradients(tensors: list[Tensor], seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed + 1)
    params = []
    for t in tensors:
        p = nn.Parameter(t.clone())
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        params.append(p)
    return params
