"""SAMLightningModule(log_step_stats=True): the optimizer's last_step_stats, equal to sam_step's on the same windows,
logged with ``self.log`` as ``sam/<field>``."""

from __future__ import annotations

import pytest

from tests.integrations.lightning_support import Classifier, fit, reference

STEPS = 3


@pytest.mark.parametrize("k,perturbation", [(1, "shared"), (2, "shared"), (2, "per_micro_batch")])
def test_step_stats_equal_sam_step_and_are_logged(k, perturbation):
    module = Classifier(accumulate_grad_batches=k, perturbation=perturbation, log_step_stats=True)
    trainer = fit(module, max_steps=STEPS, log_every_n_steps=1)
    _, optimizer, _ = reference(STEPS, k, perturbation=perturbation)
    expected, stats = optimizer.last_step_stats, module.sam_optimizer.last_step_stats
    assert stats.perturbed_loss is not None and stats.loss_rise is not None  # the losses reached second_step
    for field in ("grad_norm", "eps_norm", "loss", "perturbed_loss", "loss_rise", "lr"):
        assert getattr(stats, field) == pytest.approx(getattr(expected, field), rel=1e-12, abs=1e-15), field
    assert stats.step == expected.step == STEPS
    logged = trainer.logged_metrics
    for field in ("grad_norm", "eps_norm", "loss", "perturbed_loss", "loss_rise", "lr"):
        assert float(logged[f"sam/{field}"]) == pytest.approx(getattr(stats, field), rel=1e-6), field
    assert float(logged["sam/sam_step"]) == 1.0
    assert "sam/cosine" not in logged  # not recorded unless asked


def test_nothing_is_logged_unless_asked():
    module = Classifier()
    trainer = fit(module, max_steps=2, log_every_n_steps=1)
    assert not any(key.startswith("sam/") for key in trainer.logged_metrics)
    assert module.sam_optimizer.last_step_stats.loss_rise is not None  # recorded all the same


def test_a_step_without_new_stats_logs_nothing(monkeypatch):
    """A step skipped for an fp16 overflow leaves the optimizer's last stats as they were: not logged twice."""
    module = Classifier(log_step_stats=True)
    fit(module, max_steps=2, log_every_n_steps=1)
    logged = []
    monkeypatch.setattr(module, "log_dict", lambda values, **options: logged.append(values))
    module._log_step_stats()  # the optimizer took no step since the last log
    assert logged == []
    module._sam_logged_step = None  # as if the last step had not been logged yet
    module._log_step_stats()
    assert logged and logged[0]["sam/eps_norm"] == module.sam_optimizer.last_step_stats.eps_norm
