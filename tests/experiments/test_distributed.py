"""`torchrun --nproc_per_node 2 -m samkit train` on CPU (gloo): each rank trains on its half of every batch
with its own perturbation, so 2 ranks x SAM equal 1 process x mSAM with 2 micro-batches; rank 0 writes.
The runs come from the one torchrun launch of conftest's ``distributed_runs``."""

import torch

from samkit.experiments import distributed
from samkit.experiments.checkpoint import load_checkpoint
from samkit.experiments.trainer import train

from .conftest import TINY


def test_two_ranks_of_sam_equal_one_process_of_two_micro_batches(tmp_path, distributed_runs):
    out = distributed_runs.folder / "ddp"
    done = distributed_runs.job("sam")
    assert done["returncode"] == 0, done["stderr"][-3000:]
    # rank 0 alone prints, as it alone writes
    assert done["stdout"].count("summary: ") == 1 and "summary: " not in distributed_runs.job("sam", rank=1)["stdout"]

    train(TINY.replace(optimizer="msam", micro_batches=2, epochs=1), tmp_path / "single", device="cpu", quiet=True)
    distributed, single = load_checkpoint(out), load_checkpoint(tmp_path / "single")
    assert distributed["world_size"] == 2
    for name, tensor in single["model"].items():
        # float32 all-reduce sums in another order than the micro-batch loop: equal up to rounding
        torch.testing.assert_close(distributed["model"][name], tensor, rtol=0, atol=2e-6)
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt", "config.json", "curves.png", "metrics.jsonl", "summary.json"
    ]  # fmt: skip


def test_a_stray_rank_without_a_world_is_a_single_process(monkeypatch):
    # RANK left over in a shell, without torchrun's WORLD_SIZE: still the process that writes the run
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    context = distributed.setup("cpu")
    assert (context.rank, context.world_size, context.is_main) == (0, 1, True)
    assert distributed.is_main_process()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not distributed.is_main_process()


def test_saf_under_two_ranks_keeps_every_examples_logits_and_equals_one_process(tmp_path, distributed_runs):
    # each rank trains on its half of every batch, but an example's reference logits were recorded by whichever
    # rank saw it an epoch ago: the logits are gathered from every rank, so rank 0's memory holds all examples
    out = distributed_runs.folder / "saf"
    done = distributed_runs.job("saf")
    assert done["returncode"] == 0, done["stderr"][-3000:]
    single = TINY.replace(optimizer="saf", options={"start_epoch": 1, "delay": 1}, epochs=2)
    train(single, tmp_path / "single", device="cpu", quiet=True)
    distributed_run, single_run = load_checkpoint(out), load_checkpoint(tmp_path / "single")
    stamps = distributed_run["trajectory"]["epochs"]
    assert stamps.shape[0] == 256 and bool((stamps == 1).all())  # every example recorded in the last epoch
    for name, tensor in single_run["model"].items():
        torch.testing.assert_close(distributed_run["model"][name], tensor, rtol=0, atol=2e-6)
