"""frozen_running_stats: batch statistics still normalise, buffers stay put, the flag comes back."""

from __future__ import annotations

import copy

import torch

from samkit import frozen_running_stats
from samkit.batchnorm import has_running_stats


def test_frozen_pass_normalises_like_training_but_keeps_the_buffers():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3).double()
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    reference = copy.deepcopy(bn)
    expected = reference(x)  # training mode: batch statistics, buffers updated
    with frozen_running_stats(bn):
        out = bn(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.equal(bn.running_mean, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(bn.running_var, torch.ones(3, dtype=torch.float64))
    assert bn.num_batches_tracked.item() == 0 and bn.track_running_stats
    assert not torch.equal(reference.running_mean, bn.running_mean)  # the unfrozen pass did move them


def test_eval_mode_and_untracked_layers_are_left_alone():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2, track_running_stats=False))
    assert has_running_stats(model)
    model.eval()
    assert not has_running_stats(model)
    with frozen_running_stats(model):
        model(torch.randn(4, 2))
    assert model[0].track_running_stats and not model[1].track_running_stats


def test_the_flag_comes_back_after_an_error():
    bn = torch.nn.BatchNorm1d(2)
    try:
        with frozen_running_stats(bn):
            raise KeyError("boom")
    except KeyError:
        pass
    assert bn.track_running_stats


def test_instance_norm_buffers_are_kept_too():
    # InstanceNorm updates its running statistics in training mode even with track_running_stats switched off
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 1), torch.nn.InstanceNorm1d(3, track_running_stats=True))
    model.double()
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    assert has_running_stats(model)
    reference = copy.deepcopy(model)
    expected = reference(x)
    with frozen_running_stats(model):
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    norm = model[1]
    assert torch.equal(norm.running_mean, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(norm.running_var, torch.ones(3, dtype=torch.float64))
    assert norm.num_batches_tracked.item() == 0
    assert not torch.equal(reference[1].running_mean, norm.running_mean)  # the unfrozen pass did move them
