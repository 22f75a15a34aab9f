"""``torchrun --nproc_per_node 2 -m samkit train --fsdp`` on CPU (gloo): the model sharded by FSDP2, the ε̂ the
global batch's, so 2 ranks of SAM equal 1 process of SAM on the whole batch; a run stopped by Ctrl-C resumes to the
same weights, and the checkpoint holds full tensors. The runs come from the one torchrun launch of conftest's
``distributed_runs``."""

import pytest
import torch

from samkit.experiments.checkpoint import load_checkpoint
from samkit.experiments.fsdp import check_fsdp
from samkit.experiments.trainer import train

from .conftest import STEPS_PER_EPOCH, TINY


def test_two_fsdp_ranks_stopped_and_resumed_equal_one_process_of_sam(tmp_path, distributed_runs):
    out = distributed_runs.folder / "fsdp"
    stopped = distributed_runs.job("fsdp-stopped")  # by Ctrl-C in epoch 2
    assert stopped["returncode"] != 0 and "holds epoch 1" in stopped["stderr"], stopped["stderr"][-3000:]
    assert stopped["checkpoint_epoch"] == 1

    resumed = distributed_runs.job("fsdp-resumed")
    assert resumed["returncode"] == 0, resumed["stderr"][-3000:]
    # rank 0 alone prints, as it alone writes
    assert resumed["stdout"].count("summary: ") == 1
    assert "summary: " not in distributed_runs.job("fsdp-resumed", rank=1)["stdout"]

    train(TINY.replace(optimizer="sam"), tmp_path / "single", device="cpu", quiet=True, plot=False)
    sharded, single = load_checkpoint(out), load_checkpoint(tmp_path / "single")
    assert sharded["fsdp"] and sharded["world_size"] == 2 and sharded["epoch"] == 2
    for name, tensor in single["model"].items():
        assert type(sharded["model"][name]) is torch.Tensor, name  # full tensors, not DTensors
        # float32 reduce-scatter sums in another order than one process's backward: equal up to rounding
        torch.testing.assert_close(sharded["model"][name], tensor, rtol=0, atol=2e-6)
    momenta = [state["momentum_buffer"] for state in sharded["optimizer"]["state"].values()]
    assert momenta and all(type(m) is torch.Tensor for m in momenta)


def test_fsdp_refuses_a_single_process_and_the_methods_it_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="--fsdp shards the model over torchrun's processes"):
        train(TINY.replace(optimizer="sam"), tmp_path / "one", device="cpu", quiet=True, fsdp=True)
    assert not (tmp_path / "one").exists()  # refused before anything is written
    for method, reason in (("msam", "no rank can sit at its own"), ("esam", "global batch"), ("mesa", "EMA copy")):
        with pytest.raises(ValueError, match=f"--optimizer {method} with --fsdp: .*{reason}"):
            check_fsdp(TINY.replace(optimizer=method), world_size=2)
    with pytest.raises(ValueError, match="--subspace line with --fsdp: .*interpolated"):
        check_fsdp(TINY.replace(optimizer="sam", subspace="line"), world_size=2)
    check_fsdp(TINY.replace(optimizer="gsam"), world_size=2)  # the others run


def test_a_run_resumes_only_with_the_setting_of_fsdp_it_was_trained_with(tmp_path, monkeypatch):
    from samkit.experiments import trainer as trainer_module
    from samkit.experiments.checkpoint import save_checkpoint
    from samkit.experiments.trainer import TrainingInterrupted

    real_step, calls = trainer_module.train_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == STEPS_PER_EPOCH + 1:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", interrupted)
    config = TINY.replace(optimizer="sam")
    with pytest.raises(TrainingInterrupted):
        train(config, tmp_path / "run", device="cpu", quiet=True, plot=False)
    monkeypatch.setattr(trainer_module, "train_step", real_step)
    payload = load_checkpoint(tmp_path / "run")
    assert payload["fsdp"] is False
    payload["fsdp"] = True  # as a --fsdp run under torchrun would have saved it
    kept = {k: v for k, v in payload.items() if k not in ("rng", "version")}  # save_checkpoint adds both
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", kept)
    with pytest.raises(ValueError, match="was trained with --fsdp and this resume runs without it"):
        train(config, tmp_path / "run", device="cpu", quiet=True, plot=False, resume=True)
