"""The accumulation-window step the integrations share (samkit/integrations/window.py): its finiteness check."""

import pytest
import torch

from samkit import SAM
from samkit.integrations.window import WindowStep


class _Step(WindowStep):
    def _loss(self, batch):
        return self.model(batch).sum()

    def _backward(self, loss, *, sync):
        loss.backward()


def _step() -> _Step:
    model = torch.nn.Linear(3, 1)
    step = _Step()
    step.setup(SAM(model.parameters(), torch.optim.SGD, lr=0.1), model, None)
    return step


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_finite_low_precision_gradient_whose_norm_exceeds_the_dtype_is_finite(dtype):
    """10,000 entries of 1000 have a 2-norm of 1e5, above fp16's largest value (65504): still finite."""
    assert _step()._finite([torch.full((10_000,), 1000.0, dtype=dtype), None]) is True


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_gradient_raises_without_a_scaler(bad):
    gradient = torch.ones(4, dtype=torch.float16)
    gradient[2] = bad
    with pytest.raises(FloatingPointError, match="inf or NaN"):
        _step()._finite([torch.ones(3), gradient])
