import torch

from samkit import SAM
from samkit.experiments.config import ASAM_ETA, TrainConfig
from samkit.experiments.optimizers import build_optimizer


def model():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))


def test_plain_optimizers_get_the_config_options():
    sgd = build_optimizer(model(), TrainConfig(optimizer="sgd", lr=0.3, momentum=0.8, weight_decay=1e-3).resolved())
    assert type(sgd) is torch.optim.SGD
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.3, 0.8, 1e-3)
    assert type(build_optimizer(model(), TrainConfig(optimizer="adam").resolved())) is torch.optim.Adam


def test_sam_and_msam_wrap_the_base_with_rho():
    for name in ("sam", "msam"):
        optimizer = build_optimizer(model(), TrainConfig(optimizer=name, rho=0.02).resolved())
        assert isinstance(optimizer, SAM) and type(optimizer.base_optimizer) is torch.optim.SGD
        assert [g["rho"] for g in optimizer.param_groups] == [0.02]
        assert [g["adaptive"] for g in optimizer.param_groups] == [False]


def test_asam_is_adaptive_on_weights_only_as_the_authors_code():
    net = model()
    optimizer = build_optimizer(net, TrainConfig(optimizer="asam").resolved())
    names = {id(p): n for n, p in net.named_parameters()}
    adaptive, plain = optimizer.param_groups
    assert adaptive["adaptive"] and adaptive["eta"] == ASAM_ETA and adaptive["rho"] == 0.5
    assert not plain["adaptive"]
    assert sorted(names[id(p)] for p in adaptive["params"]) == ["0.weight", "1.weight", "2.weight"]
    assert sorted(names[id(p)] for p in plain["params"]) == ["0.bias", "1.bias", "2.bias"]
