import pytest

from samkit.experiments.config import DEFAULT_MICRO_BATCHES, TrainConfig


def test_defaults_follow_the_papers():
    assert TrainConfig(optimizer="sam").resolved().rho == 0.05
    assert TrainConfig(optimizer="asam").resolved().rho == 0.5
    msam = TrainConfig(optimizer="msam").resolved()
    assert (msam.rho, msam.micro_batches) == (0.05, DEFAULT_MICRO_BATCHES)
    assert TrainConfig(optimizer="adam").resolved().lr == 1e-3
    assert TrainConfig(optimizer="sam", base_optimizer="adam").resolved().lr == 1e-3
    sgd = TrainConfig(optimizer="sgd").resolved()
    assert (sgd.lr, sgd.rho, sgd.micro_batches) == (0.1, None, 1)


def test_resolved_is_idempotent_and_round_trips_through_a_dict():
    config = TrainConfig(optimizer="msam", micro_batches=8, label_noise=0.4).resolved()
    assert config.resolved() == config
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "options, message",
    [
        ({"optimizer": "sgd", "micro_batches": 4}, "micro_batches=4 only applies to msam"),
        ({"optimizer": "sam", "micro_batches": 4}, "use --optimizer msam"),
        ({"optimizer": "msam", "micro_batches": 1}, "micro_batches must be an integer >= 2, got 1"),
        ({"optimizer": "msam", "micro_batches": 3, "batch_size": 128}, "batch_size=128 is not divisible"),
        ({"optimizer": "adam", "rho": 0.05}, "rho=0.05 only applies"),
        ({"optimizer": "sam", "rho": -0.1}, "rho must be a finite number > 0, got -0.1"),
        ({"optimizer": "lion"}, "unknown optimizer 'lion'; valid: sgd, adam, sam, asam, msam"),
        ({"schedule": "linear"}, "unknown schedule 'linear'; valid: cosine, step, constant"),
        ({"amp": "fp8"}, "unknown amp 'fp8'; valid: bf16, fp16"),
        ({"label_noise": 1.0}, "label_noise must be in [0.0, 1.0), got 1.0"),
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({"lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
        ({"bootstrap_from": "runs/a", "label_noise": 0.4}, "cannot be combined with bootstrap_from"),
        ({"base_optimizer": "adam"}, "only applies to SAM optimizers"),
    ],
)
def test_impossible_combinations_are_rejected_with_the_value(options, message):
    with pytest.raises(ValueError) as error:
        TrainConfig(**options).resolved()
    assert message in str(error.value)


def test_unknown_keys_in_a_saved_config_are_named():
    with pytest.raises(ValueError, match=r"unknown config keys \['rhoo'\]"):
        TrainConfig.from_dict({"rhoo": 0.1})
