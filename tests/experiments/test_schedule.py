import math

import pytest
import torch

from samkit import SAM
from samkit.experiments.schedule import lr_factor, set_learning_rate


@pytest.mark.parametrize("step", [0, 1, 7, 50, 99, 100])
def test_cosine_and_step_follow_their_formulas(step):
    total = 100
    assert lr_factor("cosine", step, total) == pytest.approx(0.5 * (1 + math.cos(math.pi * step / total)), abs=1e-15)
    expected_step = 1.0 if step < 50 else (0.1 if step < 75 else 0.01)
    assert lr_factor("step", step, total) == pytest.approx(expected_step, rel=1e-15)
    assert lr_factor("constant", step, total) == 1.0


def test_learning_rate_reaches_the_base_optimizer_of_sam():
    model = torch.nn.Linear(3, 2)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.2)
    lr = set_learning_rate(optimizer, 50, 100, "cosine")
    assert lr == pytest.approx(0.1, rel=1e-15)
    assert optimizer.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1, rel=1e-15)
    set_learning_rate(optimizer, 100, 100, "cosine")  # from initial_lr, not from the already lowered lr
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-16)


def test_bad_steps_are_named():
    with pytest.raises(ValueError, match="step must be in \\[0, 10\\], got 11"):
        lr_factor("cosine", 11, 10)
    with pytest.raises(ValueError, match="unknown schedule 'warm'"):
        lr_factor("warm", 0, 10)
