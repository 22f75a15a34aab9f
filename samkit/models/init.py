"""Standard initialization shared by the models.

    Conv2d       weight ~ kaiming normal, fan_out, ReLU gain (He et al. 2015; what the WRN and ResNet
                 reference code use: N(0, 2 / (k * k * out_channels))); bias 0
    BatchNorm    weight 1, bias 0
    Linear       PyTorch's default weight init (kaiming uniform, a = sqrt(5)); bias 0
"""

from __future__ import annotations

from torch import nn


def init_weights(model: nn.Module) -> nn.Module:
    """Initialize every Conv2d, BatchNorm2d/1d and Linear of ``model`` in place; returns ``model``."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            module.reset_parameters()
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model
