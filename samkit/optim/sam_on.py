"""SAM-ON: SAM that perturbs only the normalization layers (Mueller, Vlaar, Rolnick, Hein; NeurIPS 2023,
arXiv 2306.04226, "Normalization Layers Are All That Sharpness-Aware Minimization Needs").

One step, with N the affine parameters (weight and bias) of the model's normalization layers::

    g    = ∇L(w)                                   # clean pass
    ε̂_N  = rho g_N / (||g_N|| + eps),  ε̂ = 0 off N  # SAM's ascent on N alone: the norm runs over N only
    g_s  = ∇L(w + ε̂)                                # perturbed pass
    w    <- base_optimizer.step(w, g_s)             # the descent updates every parameter

This is not SAM with rho = 0 on the other parameters: their gradients would still enter ||g||, shrinking ε̂_N.
``adaptive=True`` gives ASAM-ON (ε̂_N = rho T² g_N / ||T g_N||, T = |w| + eta, over N only).

Source: the authors' code, mueller-mp/SAM-ON ``sam_on.py`` (a SAM and an ASAM class whose ``only_bn`` flag
perturbs the normalization parameters and ``no_bn`` all the others; README, ``train.py``). Choices:

- Which parameters are N. The code matches parameter NAMES containing "norm" or "bn"; here N is found by
  module TYPE (``norm_layers``: BatchNorm*, SyncBatchNorm, InstanceNorm*, LayerNorm, GroupNorm, RMSNorm), so a
  norm layer with another name is not missed and a layer named "...bn..." that is not one is not caught. Pass
  ``norm_layers`` to add custom normalization modules or to keep, e.g., only ``torch.nn.BatchNorm2d``.
- ``perturb="no_norm"`` is the code's ``no_bn`` ablation: perturb everything EXCEPT N.
- rho defaults to 0.5, the code's default (its ``train.py`` too): SAM-ON takes a larger rho than SAM.
- eps: the code adds 1e-16 outside the norm; here eps = 1e-12 as in samkit's SAM (pass eps=1e-16 to match).
- ASAM-ON: the code scales by T = |w| + eta only parameters named "weight" unless ``normalize_bias`` (and
  offers a layer-wise T); here ``adaptive`` and ``eta`` are per param group, so put the normalization biases in
  a group with ``adaptive=False`` to match its default. The layer-wise T is not offered.
- BatchNorm statistics: the authors' loop lets the perturbed pass update the running statistics;
  ``samkit.sam_step`` freezes them there, as it does for SAM.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from samkit.optim.perturbation import PerturbationGroup
from samkit.optim.sam import SAM

PERTURB = ("norm", "no_norm")


def _default_norm_layers() -> tuple[type[nn.Module], ...]:
    """The normalization module types SAM-ON perturbs by default (BatchNorm and InstanceNorm through _NormBase)."""
    layers: list[type[nn.Module]] = [_NormBase, nn.LayerNorm, nn.GroupNorm]
    rms = getattr(nn, "RMSNorm", None)  # torch >= 2.4
    if rms is not None:
        layers.append(rms)
    return tuple(layers)


def _check_norm_layers(norm_layers: Any) -> tuple[type[nn.Module], ...]:
    if norm_layers is None:
        return _default_norm_layers()
    if isinstance(norm_layers, type):
        norm_layers = (norm_layers,)
    if (
        not isinstance(norm_layers, (tuple, list))
        or not norm_layers
        or not all(isinstance(c, type) and issubclass(c, nn.Module) for c in norm_layers)
    ):
        raise ValueError(
            "norm_layers must be a non-empty tuple of torch.nn.Module classes (e.g. (torch.nn.BatchNorm2d,)), or "
            f"None for every normalization layer, got {norm_layers!r}"
        )
    return tuple(norm_layers)


class SAMOn(SAM):
    """SAM-ON around any ``torch.optim`` optimizer: the ascent perturbs only the normalization layers' parameters.

    Args:
        params, base_optimizer, p, adaptive, eta, eps, foreach, restore_by, **base_kwargs: as for ``samkit.SAM``.
        model: the module whose normalization layers define N (found among ``params`` by identity).
        rho: radius of the ascent over N (0.5, the authors' default).
        perturb: ``"norm"`` (SAM-ON: perturb N) or ``"no_norm"`` (the ablation: perturb everything but N).
        norm_layers: module classes that count as normalization layers; None for BatchNorm*, SyncBatchNorm,
            InstanceNorm*, LayerNorm, GroupNorm and RMSNorm. Parameters added later with ``add_param_group``
            count as outside N.

    ``norm_params`` lists N (in param-group order): check it to see what the ascent perturbs.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))
        >>> opt = SAMOn(model.parameters(), torch.optim.SGD, model=model, rho=0.5, lr=0.1, momentum=0.9)
        >>> len(opt.norm_params)  # the LayerNorm's weight and bias
        2
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> if opt.first_step(zero_grad=True):
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        >>> opt.second_step(zero_grad=True)
    """

    def __init__(
        self,
        params,
        base_optimizer,
        *,
        model: nn.Module,
        rho: float = 0.5,
        perturb: str = "norm",
        norm_layers: Optional[Sequence[type[nn.Module]]] = None,
        p: float = 2,
        adaptive: bool = False,
        eta: float = 0.0,
        eps: float = 1e-12,
        foreach: Optional[bool] = None,
        restore_by: str = "copy",
        **base_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"model must be the torch.nn.Module whose parameters are optimised (SAM-ON finds its normalization "
                f"layers), got {type(model).__name__}"
            )
        if perturb not in PERTURB:
            raise ValueError(
                f"perturb must be one of {PERTURB} ('norm' is SAM-ON, 'no_norm' perturbs all but the normalization "
                f"layers), got {perturb!r}"
            )
        layers = _check_norm_layers(norm_layers)
        super().__init__(
            params,
            base_optimizer,
            rho=rho,
            p=p,
            adaptive=adaptive,
            eta=eta,
            eps=eps,
            foreach=foreach,
            restore_by=restore_by,
            **base_kwargs,
        )
        self.perturb = perturb
        self.norm_layers = layers
        found = {id(t) for m in model.modules() if isinstance(m, layers) for t in m.parameters(recurse=False)}
        params_now = self._params()
        self.norm_params = [t for t in params_now if id(t) in found]  # N, in param-group order
        if not self.norm_params:
            names = ", ".join(c.__name__ for c in layers)
            raise ValueError(
                f"{type(model).__name__} has no normalization-layer parameter among the optimised parameters (looked "
                f"for {names} with affine weights): SAM-ON would perturb nothing. Use samkit.SAM for this model, add "
                "normalization layers (with affine parameters), or name your own layer types with norm_layers=(...)"
            )
        if perturb == "no_norm" and len(self.norm_params) == len(params_now):
            raise ValueError(
                f"perturb='no_norm' leaves nothing to perturb: every optimised parameter of {type(model).__name__} "
                "belongs to a normalization layer; use perturb='norm'"
            )

    def _ascent_groups(self, groups: list[PerturbationGroup]) -> list[PerturbationGroup]:
        norm = {id(t) for t in self.norm_params}
        inside = self.perturb == "norm"
        kept = []
        for group in groups:
            pairs = [(t, g) for t, g in zip(group.params, group.grads) if (id(t) in norm) is inside]
            kept.append(dataclasses.replace(group, params=[t for t, _ in pairs], grads=[g for _, g in pairs]))
        return kept

    def _options(self) -> dict[str, Any]:
        positions = {id(t): i for i, t in enumerate(self._params())}
        return {
            **super()._options(),
            "perturb": self.perturb,
            "norm_layers": [f"{c.__module__}.{c.__qualname__}" for c in self.norm_layers],
            "norm_params": [positions[id(t)] for t in self.norm_params if id(t) in positions],
        }
