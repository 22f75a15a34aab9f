import pytest

from samkit.experiments.run_status import COLLAPSED, DIVERGED, OK, classify_run


def test_non_finite_losses_mean_diverged():
    status, reason = classify_run(
        train_losses=[1.0, float("nan")], test_loss=2.0, test_accuracy=0.5, prediction_counts=[5, 5]
    )
    assert (status, reason) == (DIVERGED, "non-finite loss (nan)")
    assert (
        classify_run(train_losses=[1.0], test_loss=float("inf"), test_accuracy=0.5, prediction_counts=[5, 5])[0]
        == DIVERGED
    )


def test_a_constant_prediction_is_collapsed_even_with_majority_accuracy():
    # 60 % of the test set is class 0: predicting it always scores 60 %, far above chance, and is still collapsed
    status, reason = classify_run(train_losses=[0.7], test_loss=0.7, test_accuracy=0.6, prediction_counts=[100, 0, 0])
    assert status == COLLAPSED
    assert "predicts class 0 for 100%" in reason


def test_chance_accuracy_is_collapsed_and_a_learning_run_is_ok():
    assert (
        classify_run(train_losses=[2.3], test_loss=2.3, test_accuracy=0.11, prediction_counts=[1] * 10)[0] == COLLAPSED
    )
    assert classify_run(train_losses=[0.3], test_loss=0.4, test_accuracy=0.9, prediction_counts=[3, 3, 4])[0] == OK


def test_counts_must_cover_the_classes():
    with pytest.raises(ValueError, match="one entry per class"):
        classify_run(train_losses=[1.0], test_loss=1.0, test_accuracy=1.0, prediction_counts=[4])
