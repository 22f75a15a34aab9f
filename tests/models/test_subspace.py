"""A line of networks: the point's weights, the cos² term's gradient, α = 0 as ordinary training, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from samkit.experiments import subspace as subspace_module
from samkit.experiments import trainer as trainer_module
from samkit.experiments.checkpoint import load_checkpoint
from samkit.experiments.config import TrainConfig
from samkit.experiments.trainer import TrainingInterrupted, train
from samkit.models import build_model
from samkit.models.subspace import LineModel

SHAPE = dict(in_channels=1, num_classes=4, image_size=8)
TINY = TrainConfig(data="synthetic", model="mlp-bn", epochs=2, batch_size=32, lr=0.05)


def line_of(name: str = "mlp-bn", dtype=torch.float32) -> LineModel:
    torch.manual_seed(0)
    first = build_model(name, **SHAPE).to(dtype)
    torch.manual_seed(1)
    return LineModel(first, build_model(name, **SHAPE).to(dtype))


def test_the_line_at_alpha_is_the_network_with_the_interpolated_weights():
    line = line_of().eval()
    x = torch.randn(16, 1, 8, 8)
    first, second = line.endpoints[0].state_dict(), dict(line.endpoints[1].named_parameters())
    for alpha in (0.0, 0.3, 0.5, 1.0):
        plain = build_model("mlp-bn", **SHAPE).eval()
        weights = {k: (1 - alpha) * v + alpha * second[k] if k in second else v for k, v in first.items()}
        plain.load_state_dict(weights)  # buffers (BN statistics) are the first endpoint's
        line.eval_alpha = alpha
        assert torch.equal(line(x), plain(x)), alpha
        point = line.point(alpha)
        assert point.keys() == second.keys() and all(torch.equal(point[k], weights[k]) for k in point)
    # in training mode the forward is at `alpha`, and its gradient splits as (1 − α) g and α g
    line.train()
    line.set_alpha(0.25)
    loss = F.cross_entropy(line(x), torch.arange(16) % 4)
    loss.backward()
    g_first = [p.grad for p in line.endpoints[0].parameters()]
    g_second = [p.grad for p in line.endpoints[1].parameters()]
    for a, b in zip(g_first, g_second):
        torch.testing.assert_close(a * 0.25, b * 0.75, rtol=1e-6, atol=1e-9)


def test_cos_squared_and_its_gradient_match_a_float64_autograd_reference():
    line = line_of("mlp")
    reference = line_of("mlp", torch.float64)
    names = [n for n, _ in reference.endpoints[0].named_parameters() if n.endswith("weight")]
    first = dict(reference.endpoints[0].named_parameters())
    second = dict(reference.endpoints[1].named_parameters())
    # the reference: one cosine of the concatenated Linear weights, written independently with F.cosine_similarity
    a = torch.cat([first[n].flatten() for n in names])
    b = torch.cat([second[n].flatten() for n in names])
    expected = F.cosine_similarity(a, b, dim=0).pow(2)
    expected.backward()
    value = line.cos_squared()
    value.backward()
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert 0 < float(expected.detach()) < 0.05  # independent initialisations: nearly orthogonal, yet not 0
    for endpoint, params in ((0, first), (1, second)):
        got = dict(line.endpoints[endpoint].named_parameters())
        for name, p in params.items():
            if name in names:
                torch.testing.assert_close(got[name].grad.double(), p.grad, rtol=1e-4, atol=1e-10)
            else:  # biases and BN parameters are outside the term
                assert got[name].grad is None and p.grad is None
    # float64 all the way: the same to rounding
    again = line_of("mlp", torch.float64)
    assert float(again.cos_squared().detach()) == pytest.approx(float(expected.detach()), rel=1e-12)


def test_alpha_fixed_at_zero_without_the_term_is_ordinary_training_bit_for_bit(tmp_path, monkeypatch):
    for optimizer in ("sgd", "sam"):
        config = TINY.replace(optimizer=optimizer)
        ordinary = train(config, tmp_path / f"{optimizer}-plain", device="cpu", quiet=True, plot=False)
        monkeypatch.setattr(subspace_module.LineTraining, "draw", lambda self: 0.0)
        line = config.replace(subspace="line", subspace_beta=0.0)
        train(line, tmp_path / f"{optimizer}-line", device="cpu", quiet=True, plot=False)
        monkeypatch.undo()
        plain = load_checkpoint(tmp_path / f"{optimizer}-plain" / "checkpoint.pt")["model"]
        first = load_checkpoint(tmp_path / f"{optimizer}-line" / "checkpoint.pt")["model"]
        assert plain and all(torch.equal(v, first[f"endpoints.0.{k}"]) for k, v in plain.items()), optimizer
        assert not torch.equal(plain["net.1.weight"], first["endpoints.1.net.1.weight"])
        assert ordinary["status"] == "ok"


def test_resume_after_ctrl_c_ends_with_the_weights_of_an_uninterrupted_line(tmp_path, monkeypatch):
    config = TINY.replace(optimizer="sam", epochs=3, subspace="line", val_fraction=0.25)
    whole = train(config, tmp_path / "whole", device="cpu", quiet=True, plot=False)
    real_step, calls = trainer_module.train_step, []

    def interrupt_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 192 // 32 + 2:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", interrupt_in_epoch_two)
    with pytest.raises(TrainingInterrupted, match="holds epoch 1"):
        train(config, tmp_path / "cut", device="cpu", quiet=True, plot=False)
    monkeypatch.setattr(trainer_module, "train_step", real_step)
    torch.manual_seed(999)
    resumed = train(config, tmp_path / "cut", device="cpu", quiet=True, plot=False, resume=True)
    a, b = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"], load_checkpoint(tmp_path / "cut")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["subspace"] == whole["subspace"]


def test_the_summary_reports_accuracy_along_the_line(tmp_path):
    config = TINY.replace(model="mlp", optimizer="sgd", subspace="line")
    summary = train(config, tmp_path / "run", device="cpu", quiet=True, plot=False)
    record = json.loads((tmp_path / "run" / "summary.json").read_text())["subspace"]
    assert record == summary["subspace"]
    assert list(record["test_accuracy_along"]) == ["0", "0.25", "0.5", "0.75", "1"]
    assert record["midpoint_test_accuracy"] == summary["test_accuracy"]  # no BN: the midpoint the trainer evaluated
    assert not record["batch_norm_recalibrated"] and record["length"] > 0
    from samkit.experiments.evaluate_run import evaluate_run

    assert evaluate_run(tmp_path / "run")["test_accuracy"] == summary["test_accuracy"]  # a saved line opens at 0.5
    # the endpoints and their ensemble, recomputed from the checkpoint with plain models
    from samkit.data import load_dataset

    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    data = load_dataset("synthetic")
    probabilities = []
    for endpoint, alpha in ((0, "0"), (1, "1")):
        plain = build_model("mlp", in_channels=1, num_classes=4, image_size=8).eval()
        plain.load_state_dict(
            {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"endpoints.{endpoint}.")}
        )
        with torch.no_grad():
            p = F.softmax(plain(data.x_test), dim=1)
        probabilities.append(p)
        assert record["test_accuracy_along"][alpha] == pytest.approx(
            float((p.argmax(1) == data.y_test).double().mean())
        )
    ensemble = ((probabilities[0] + probabilities[1]).argmax(1) == data.y_test).double().mean()
    assert record["ensemble_test_accuracy"] == pytest.approx(float(ensemble))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(subspace_beta=0.5), "subspace_beta=0.5 only applies to a subspace"),
        (dict(subspace="plane"), "unknown subspace 'plane'; valid: line"),
        (dict(subspace="line", subspace_beta=-1.0), "subspace_beta must be a finite number >= 0"),
        (dict(subspace="line", init_from="runs/x"), "cannot start from --init-from runs/x"),
    ],
)
def test_bad_subspace_options_are_refused_by_name(changes, message):
    with pytest.raises(ValueError, match=message):
        TINY.replace(**changes).resolved()


def test_a_line_config_resolves_beta_to_the_papers_one():
    assert TINY.replace(subspace="line").resolved().subspace_beta == 1.0
    assert TINY.resolved().subspace_beta is None


def test_sams_ascent_on_a_line_moves_the_point_by_rho_times_its_norm_factor_along_g():
    from samkit.optim import SAM

    line = line_of("mlp", torch.float64).train()
    rho, alpha = 0.05, 0.3
    line.set_alpha(alpha)
    x, y = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.arange(16) % 4
    before = {k: v.detach().clone() for k, v in line.point(alpha).items()}
    # g: the gradient at w(α), from a plain network holding those weights
    plain = build_model("mlp", **SHAPE).double()
    plain.load_state_dict(before)
    F.cross_entropy(plain(x), y).backward()
    g = {k: p.grad for k, p in plain.named_parameters()}
    g_norm = torch.sqrt(sum(v.pow(2).sum() for v in g.values()))
    optimizer = SAM(line.parameters(), torch.optim.SGD, rho=rho, lr=0.1)
    F.cross_entropy(line(x), y).backward()
    optimizer.first_step(zero_grad=True)
    after = line.point(alpha)
    factor = ((1 - alpha) ** 2 + alpha**2) ** 0.5
    for k in before:
        torch.testing.assert_close(after[k].detach() - before[k], rho * factor * g[k] / g_norm, rtol=1e-6, atol=1e-12)


def test_the_report_re_estimates_batch_norm_statistics_at_each_point():
    line = line_of("mlp-bn")
    x = torch.randn(64, 1, 8, 8)
    point = subspace_module.at_alpha(line, 0.3, x, 32, "cpu")
    assert not point.training and point.eval_alpha == 0.3
    weights = line.point(0.3)
    with torch.no_grad():  # the first BN layer sees x @ W^T of the interpolated first Linear (no bias before BN)
        before_norm = x.flatten(1) @ weights["net.1.weight"].T
    bn = point.endpoints[0].net[2]
    torch.testing.assert_close(bn.running_mean, before_norm.mean(0), rtol=1e-5, atol=1e-6)
    assert torch.equal(line.endpoints[0].net[2].running_mean, torch.zeros(256))  # the line itself is untouched
