"""``--init-from``: start a run from saved weights, with a new head when the number of classes differs.

    for each tensor of the new model:
        copy it from the checkpoint if a tensor of that name and shape exists there,
        else keep its fresh initialisation (e.g. the last layer for 10 -> 4 classes)

Fine-tuning a pretrained model is where the SAM paper reports some of its largest gains (Table 3).
"""

from __future__ import annotations

import torch
from torch import nn


def load_matching_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy every same-named, same-shaped tensor; return (copied, kept_fresh) names.

    Raises ValueError when nothing matches (a different architecture, not just a different head).
    """
    own = model.state_dict()
    copied = [name for name, tensor in own.items() if name in state_dict and state_dict[name].shape == tensor.shape]
    fresh = [name for name in own if name not in copied]
    if not copied or len(fresh) > len(copied):
        raise ValueError(
            f"the checkpoint does not fit this model: only {len(copied)} of {len(own)} tensors match by name and "
            f"shape (kept fresh: {fresh[:5]}{' ...' if len(fresh) > 5 else ''}); --init-from needs the same "
            "--model (only the head may differ)"
        )
    with torch.no_grad():
        for name in copied:
            own[name].copy_(state_dict[name])
    return copied, fresh
