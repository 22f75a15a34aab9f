"""load_state_dict refuses, at load time and loading nothing, a state dict it cannot continue from.

Another base optimizer, parameters of other shapes, a step in progress, any saved option of any family member
that differs: each is named in the error with its fix, and the optimizer is left as it was.
"""

from __future__ import annotations

import copy

import pytest
import torch

from samkit import SAM
from tests.optim.family import FAMILY, model
from tests.optim.reference import batch, loss_fn


def trained(opt, net, steps=2):
    x, y = batch(n=24)
    opt.train()
    for _ in range(steps):
        loss_fn(net(x), y).backward()
        if opt.first_step(zero_grad=True):
            loss_fn(net(x), y).backward()
        opt.second_step(zero_grad=True)
    opt.eval()  # Momentum-SAM's weights back at w: what a checkpoint holds
    return opt


def untouched(opt) -> bool:
    return opt.steps == 0 and len(opt.state) == 0 and opt.phase.value == "ready"


def test_a_sam_adam_state_is_refused_by_sam_sgd_naming_both():
    net = model()
    saved = trained(SAM(net.parameters(), torch.optim.Adam, lr=1e-3), net).state_dict()
    other = SAM(model().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="saved by a SAM around Adam, this SAM wraps SGD.*base_optimizer=Adam"):
        other.load_state_dict(saved)
    assert untouched(other) and "betas" not in other.param_groups[0]
    trained(other, model())  # and it still steps (the refused state would fail with KeyError 'momentum')


@pytest.mark.parametrize("name", list(FAMILY))
def test_every_member_refuses_a_state_saved_around_another_base(name):
    net = model()
    saved = trained(FAMILY[name](net), net).state_dict()  # the family is built around SGD
    saved["sam"]["base"] = "Adam"  # what the same member saves around Adam
    other = FAMILY[name](model())
    with pytest.raises(ValueError, match=f"around Adam, this {type(other).__name__} wraps SGD"):
        other.load_state_dict(saved)
    assert untouched(other)


def wider(seed=0):
    """The family's model with 9 hidden units instead of 8: as many tensors, other shapes."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(4, 9), torch.nn.LayerNorm(9), torch.nn.Tanh(), torch.nn.Linear(9, 3)]
    return torch.nn.Sequential(*layers).to(torch.float64)


@pytest.mark.parametrize("name", list(FAMILY))
def test_a_state_saved_for_other_shapes_is_refused_naming_the_parameter(name):
    net = model()
    saved = trained(FAMILY[name](net), net).state_dict()
    other = FAMILY[name](wider())
    with pytest.raises(ValueError, match=r"parameter 0 has shape \(8, 4\) in the state dict but \(9, 4\) here"):
        other.load_state_dict(saved)
    assert untouched(other)


def test_a_state_saved_for_another_number_of_parameters_is_refused():
    net = model()
    saved = trained(SAM(net.parameters(), torch.optim.SGD, lr=0.1), net).state_dict()
    fewer = SAM(list(model().parameters())[:-1], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="saved for 6 parameters, this SAM has 5"):
        fewer.load_state_dict(saved)
    assert untouched(fewer)


@pytest.mark.parametrize("stage", ["perturbed", "restored", "one-pass"])
def test_loading_in_the_middle_of_a_step_is_refused_and_changes_nothing(stage):
    x, y = batch()
    net = model()
    opt = FAMILY["interval"](net)  # interval = 2: its second step is a one-pass step
    saved = copy.deepcopy(opt.state_dict())
    if stage == "one-pass":
        trained(opt, net, steps=1)
    loss_fn(net(x), y).backward()
    opt.first_step()
    if stage == "restored":
        opt.restore()
    weights = [t.detach().clone() for t in net.parameters()]
    phase = opt.phase
    with pytest.raises(RuntimeError, match=f"in the middle of a step.*phase {phase.value}.*cancel_step"):
        opt.load_state_dict(saved)
    assert opt.phase is phase and all(torch.equal(t, w) for t, w in zip(net.parameters(), weights))
    opt.cancel_step()
    opt.load_state_dict(saved)  # what the message says to do works


def changed(value):
    """Another value of the same kind, for any option a checkpoint saves."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 + 0.125
    if isinstance(value, str):
        return value + "-other"
    if value is None:
        return 0.25
    if isinstance(value, list):
        return [*value, value[-1] if value else 1]
    raise AssertionError(f"an option of a kind this test does not know: {value!r}")


def saved_options():
    cases = []
    for name, build in FAMILY.items():
        for option in build(model()).state_dict()["sam"]["options"]:
            cases.append((name, option))
    return cases


@pytest.mark.parametrize("name,option", saved_options(), ids=[f"{n}-{o}" for n, o in saved_options()])
def test_every_saved_option_of_every_member_must_match_on_load(name, option):
    """interval=3 saved, interval=1 here (and every other option alike): refused, naming the option."""
    net = model()
    saved = trained(FAMILY[name](net), net).state_dict()
    saved["sam"]["options"][option] = changed(saved["sam"]["options"][option])
    other = FAMILY[name](model())
    with pytest.raises(ValueError, match=f"saved with {option}=.*this {type(other).__name__} has {option}="):
        other.load_state_dict(saved)
    assert untouched(other)


def test_a_state_saved_with_interval_3_is_refused_by_interval_1():
    net = model()
    saved = trained(SAM(net.parameters(), torch.optim.SGD, lr=0.1, interval=3), net).state_dict()
    other = SAM(model().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="saved with interval=3, this SAM has interval=1: build it with interval=3"):
        other.load_state_dict(saved)
    assert other.interval == 1 and untouched(other)


def test_a_matching_state_still_resumes_bit_exactly():
    x, y = batch(n=24)
    net = model()
    opt = trained(FAMILY["looksam"](net), net)
    resumed_net = copy.deepcopy(net)
    resumed = FAMILY["looksam"](resumed_net)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for o, m in ((opt, net), (resumed, resumed_net)):
        trained(o, m, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), resumed_net.parameters()))
