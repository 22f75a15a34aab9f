"""Resume with ``trainer.train(resume_from_checkpoint=...)`` is bit-exact: a run resumed from the checkpoint of
step 2 ends at step 4 with the weights, SAM's counters and variant state, and the scheduler of the run that went on."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="the transformers integration needs samkit[transformers]")

import torch  # noqa: E402

from samkit import AESAM, LookSAM, MomentumSAM, RandomSAM  # noqa: E402
from tests.integrations.transformers_support import Net, bert, flat, sgd_sam, train  # noqa: E402

# (model, optimizer, batches per step): the running state that must travel in the checkpoint
CASES = {
    "sam-dropout": ("net", lambda net: sgd_sam(net), 1),  # the generators: dropout masks after the resume
    "looksam-accumulate-2": ("net", lambda net: sgd_sam(net, LookSAM, k=3), 2),  # g_v and the step count
    "rst": ("net", lambda net: sgd_sam(net, RandomSAM, prob=0.5, seed=3), 1),  # its own generator
    "aesam-accumulate-2": ("net", lambda net: sgd_sam(net, AESAM, total_steps=4), 2),  # ||g||² statistics
    "momentum-sam": (
        "net",
        lambda net: MomentumSAM(net.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9),
        1,
    ),
    "bert-sam-dropout-shuffled": ("bert", lambda net: sgd_sam(net), 2),  # the sampler's order after the resume
}


def _model(kind):
    return Net(dropout=0.3) if kind == "net" else bert(dropout=0.2)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", CASES)
def test_resume_equals_the_uninterrupted_run(name, tmp_path):
    kind, make, k = CASES[name]
    options = dict(
        max_steps=4,
        gradient_accumulation_steps=k,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=2,
        train_sampling_strategy="random" if "shuffled" in name else "sequential",
    )
    whole = train(kind, tmp_path / "whole", make, net=_model(kind), **options)
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    resumed = train(kind, tmp_path / "resumed", make, net=_model(kind), resume=str(checkpoint), **options)
    assert resumed.state.global_step == whole.state.global_step == 4
    assert torch.equal(flat(resumed.model), flat(whole.model))
    mine, theirs = resumed.sam_optimizer.state_dict(), whole.sam_optimizer.state_dict()
    assert mine["sam"]["steps_taken"] == 4
    assert _equal(mine, theirs)  # counters, the variant's memory, the base optimizer's momentum
    assert resumed.lr_scheduler.state_dict() == whole.lr_scheduler.state_dict()
    assert resumed.lr_scheduler.last_epoch == 4


def test_a_resumed_run_that_forgot_the_state_differs(tmp_path):
    """The check above can fail: resuming the weights alone (a fresh LookSAM, no optimizer state) ends elsewhere."""

    def make(net):
        return sgd_sam(net, LookSAM, k=3)

    options = dict(max_steps=4, save_strategy="steps", save_steps=2)
    whole = train("net", tmp_path / "whole", make, **options)
    (tmp_path / "whole" / "checkpoint-2" / "optimizer.pt").unlink()
    resumed = train("net", tmp_path / "resumed", make, resume=str(tmp_path / "whole" / "checkpoint-2"), **options)
    assert not torch.equal(flat(resumed.model), flat(whole.model))
