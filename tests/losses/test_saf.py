"""SAFLoss against its formula written out (KL by hand, the references kept by the test), its memory's delay and
indices, its window, its state and its errors."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch

from samkit.experiments.train_step import plain_step
from samkit.losses import IndexedDataset, SAFLoss
from tests.losses.test_mesa import kl_by_hand
from tests.optim.reference import loss_fn, mlp

N, C = 12, 3


def data(seed=1, n=N):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, C, (n,), generator=g)


def epoch_batches(epoch, n=N, size=4):
    """The indices of each batch of an epoch: a fresh permutation per epoch, as a shuffling loader draws."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(100 + epoch))
    return list(order.split(size))


def test_loss_equals_the_formula_with_the_logits_of_delay_epochs_ago():
    """loss = CE + lam tau² mean KL(softmax(z_{e-delay}/tau) || softmax(z/tau)), z_{e-delay} kept by the test."""
    lam, tau, delay = 0.5, 3.0, 2
    model, (x, y) = mlp(), data()
    options = dict(lam=lam, tau=tau, start_epoch=2, delay=delay, dtype=torch.float64)
    saf = SAFLoss(loss_fn, num_examples=N, num_classes=C, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    history = {}  # epoch -> {index: the logits the model gave it in that epoch}
    checked = 0
    for epoch in range(5):
        history[epoch] = {}
        for indices in epoch_batches(epoch):
            outputs = model(x[indices])
            loss = saf(outputs, y[indices], indices, epoch=epoch)
            if epoch >= 2:
                then = torch.stack([history[epoch - delay][int(i)] for i in indices])
                expected = loss_fn(outputs, y[indices]) + lam * kl_by_hand(outputs, then, tau)
                assert abs(loss.item() - expected.item()) <= 1e-12
                # one epoch off would be another loss: the delay is what the comparison checks
                later = torch.stack([history[epoch - 1][int(i)] for i in indices])
                wrong = loss_fn(outputs, y[indices]) + lam * kl_by_hand(outputs, later, tau)
                assert abs(wrong.item() - expected.item()) > 1e-6
                checked += 1
            else:
                assert torch.equal(loss, loss_fn(outputs, y[indices]))
            for i, z in zip(indices, outputs.detach()):
                history[epoch][int(i)] = z.clone()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert checked == 9


def test_memory_is_read_at_the_delay_and_written_at_the_indices():
    delay = 3
    saf = SAFLoss(loss_fn, num_examples=6, num_classes=C, start_epoch=3, delay=delay, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    logits = {e: torch.randn(6, C, generator=g, dtype=torch.float64) for e in range(7)}
    seen = {e: torch.arange(6) for e in range(7)}
    seen[1] = torch.tensor([4, 0, 2, 1, 3])  # example 5 is not drawn in epoch 1, the others out of order
    for epoch in range(7):
        if epoch >= delay:
            then = epoch - delay
            reference, valid = saf.reference(torch.arange(6), epoch=epoch)
            recorded = torch.zeros(6, dtype=torch.bool)
            recorded[seen[then]] = True
            assert torch.equal(valid, recorded)
            assert torch.equal(reference[recorded], logits[then][recorded])
        before = saf.state_dict()["logits"]
        before = None if before is None else before.clone()
        saf.record(seen[epoch], logits[epoch][seen[epoch]], epoch=epoch)
        after = saf.state_dict()["logits"]
        assert torch.equal(after[seen[epoch], epoch % delay], logits[epoch][seen[epoch]])
        if before is not None:
            untouched = torch.ones(6, delay, dtype=torch.bool)
            untouched[seen[epoch], epoch % delay] = False
            assert torch.equal(after[untouched], before[untouched])
    # read before write: once this epoch's logits are in, the slot no longer holds epoch - delay's
    assert not saf.reference(torch.arange(6), epoch=6)[1].any()


def test_an_example_without_a_reference_contributes_zero_and_the_mean_divides_by_the_batch():
    lam, tau = 0.7, 2.0
    saf = SAFLoss(loss_fn, num_examples=N, num_classes=C, lam=lam, tau=tau, start_epoch=1, delay=1, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    old = torch.randn(6, C, generator=g, dtype=torch.float64)
    saf.record(torch.arange(4), old[:4], epoch=0)  # examples 4 and 5 were not drawn in epoch 0
    outputs, targets = torch.randn(6, C, generator=g, dtype=torch.float64), torch.randint(0, C, (6,), generator=g)
    loss = saf(outputs, targets, torch.arange(6), epoch=1)
    expected = loss_fn(outputs, targets) + lam * kl_by_hand(outputs[:4], old[:4], tau) * 4 / 6
    assert abs(loss.item() - expected.item()) <= 1e-12


def test_lam_zero_and_outside_the_window_are_the_base_loss_bit_for_bit():
    model, (x, y) = mlp(), data()
    for options, epochs in ((dict(lam=0.0, start_epoch=1), range(5)), (dict(start_epoch=1, end_epoch=3), (0, 3, 4))):
        saf = SAFLoss(loss_fn, num_examples=N, num_classes=C, delay=1, **options)
        for epoch in range(5):
            outputs = model(x) * (1 + epoch)  # the distributions change between epochs: a term would not vanish
            loss = saf(outputs, y, torch.arange(N), epoch=epoch)
            if epoch in epochs:
                assert torch.equal(loss, loss_fn(outputs, y))
            else:
                assert loss.item() != loss_fn(outputs, y).item()


def test_default_memory_is_float32_on_the_outputs_device_and_memory_bytes_is_its_size():
    saf = SAFLoss(loss_fn, num_examples=N, num_classes=C)
    assert saf.memory_bytes == N * 3 * C * 4 + N * 3 * 4
    assert saf.state_dict()["logits"] is None  # allocated at the first step
    model, (x, y) = mlp(), data()
    saf(model(x), y, torch.arange(N), epoch=0)
    state = saf.state_dict()
    logits, epochs = state["logits"], state["epochs"]
    assert logits.dtype == torch.float32 and logits.shape == (N, 3, C) and logits.device == x.device
    assert saf.memory_bytes == logits.numel() * logits.element_size() + epochs.numel() * epochs.element_size()
    assert torch.equal(logits[:, 0], model(x).detach().float())


def test_bind_and_an_explicit_record_are_the_same_loss():
    """saf.bind(...) as a loss_fn, and the call with record=False followed by record() (the order a trainer that
    gathers logits across replicas uses) give the same losses and memory as the plain call."""
    model, (x, y) = mlp(), data()
    plain, bound, split = (SAFLoss(loss_fn, num_examples=N, num_classes=C, start_epoch=1, delay=1) for _ in range(3))
    for epoch in range(3):
        indices = torch.arange(N).flip(0) if epoch % 2 else torch.arange(N)
        outputs = model(x[indices]) * (1 + epoch)
        a = plain(outputs, y[indices], indices, epoch=epoch)
        b = bound.bind(indices, epoch=epoch)(outputs, y[indices])
        c = split(outputs, y[indices], indices, epoch=epoch, record=False)
        split.record(indices, outputs, epoch=epoch)
        assert torch.equal(a, b) and torch.equal(a, c)
    assert a.item() != loss_fn(outputs, y[indices]).item()
    for other in (bound, split):
        assert torch.equal(plain.state_dict()["logits"], other.state_dict()["logits"])
        assert torch.equal(plain.state_dict()["epochs"], other.state_dict()["epochs"])


def test_a_plain_one_pass_training_loop_trains():
    """10 SGD steps (5 epochs of 2 batches) of samkit's plain step with saf.bind as the loss_fn: finite, lower."""
    n = 8
    model, (x, y) = mlp(), data(n=n)
    saf = SAFLoss(loss_fn, num_examples=n, num_classes=C, start_epoch=1, delay=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    before = loss_fn(model(x), y).item()
    losses = []
    for step in range(10):
        epoch = step // 2
        indices = epoch_batches(epoch, n=n)[step % 2]
        losses.append(plain_step(opt, model, saf.bind(indices, epoch=epoch), x[indices], y[indices]).item())
    assert all(math.isfinite(v) for v in losses)
    assert loss_fn(model(x), y).item() < before - 0.05


def test_under_autocast_the_memory_keeps_its_dtype():
    model = mlp(dtype=torch.float32)
    x, y = data()
    x = x.float()
    saf = SAFLoss(loss_fn, num_examples=N, num_classes=C, start_epoch=1, delay=1)
    for epoch in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = model(x) * (1 + epoch)
            assert outputs.dtype == torch.bfloat16
            loss = saf(outputs, y, torch.arange(N), epoch=epoch)
        assert math.isfinite(loss.item())
        loss.backward()
    assert saf.state_dict()["logits"].dtype == torch.float32
    assert all(torch.isfinite(t.grad).all() for t in model.parameters())


def test_indexed_dataset_gives_the_indices_a_loader_needs():
    x, y = data()
    loader = torch.utils.data.DataLoader(
        IndexedDataset(torch.utils.data.TensorDataset(x, y)),
        batch_size=5,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    seen = []
    for indices, xb, yb in loader:
        assert torch.equal(xb, x[indices]) and torch.equal(yb, y[indices])
        seen.append(indices)
    assert sorted(torch.cat(seen).tolist()) == list(range(N))
    assert IndexedDataset([10, 20])[1] == (1, 20)
    assert len(IndexedDataset(x)) == N


def _train(model, opt, saf, x, y, epochs, offset=0):
    for epoch in range(offset, offset + epochs):
        for indices in epoch_batches(epoch):
            loss = saf(model(x[indices]), y[indices], indices, epoch=epoch)
            opt.zero_grad()
            loss.backward()
            opt.step()


def test_state_dict_round_trip_continues_bit_exactly():
    """5 epochs straight == 3 epochs, save (torch.save), load into fresh objects, 2 epochs: weights and memory."""
    options = dict(num_examples=N, num_classes=C, lam=0.5, tau=2.0, start_epoch=2, delay=2)
    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    saf = SAFLoss(loss_fn, **options)
    _train(model, opt, saf, x, y, 5)

    first = mlp()
    first_opt = torch.optim.SGD(first.parameters(), lr=0.3, momentum=0.9)
    first_saf = SAFLoss(loss_fn, **options)
    _train(first, first_opt, first_saf, x, y, 3)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict(), "saf": first_saf.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = mlp(seed=99)
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.3, momentum=0.9)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed_saf = SAFLoss(loss_fn, **options)
    resumed_saf.load_state_dict(saved["saf"])
    _train(resumed, resumed_opt, resumed_saf, x, y, 2, offset=3)

    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    for key in ("logits", "epochs"):
        assert torch.equal(saf.state_dict()[key], resumed_saf.state_dict()[key])
    # the loaded memory is a copy: training on does not write into the checkpoint's tensors
    assert not torch.equal(saved["saf"]["logits"], resumed_saf.state_dict()["logits"])


def test_a_resume_with_other_options_or_another_class_is_refused():
    state = SAFLoss(loss_fn, num_examples=N, num_classes=C, delay=2).state_dict()
    with pytest.raises(ValueError, match=r"saved with delay=2.*has delay=3"):
        SAFLoss(loss_fn, num_examples=N, num_classes=C).load_state_dict(state)
    from samkit.losses import MESALoss

    with pytest.raises(ValueError, match="saved by MESALoss, not SAFLoss"):
        SAFLoss(loss_fn, num_examples=N, num_classes=C).load_state_dict(MESALoss(mlp(), loss_fn).state_dict())


@pytest.mark.parametrize(
    "indices,message",
    [
        (None, "indices=None.*IndexedDataset"),
        (torch.arange(3), r"shape \(4,\), got shape \(3,\)"),
        (torch.arange(8).reshape(4, 2), r"shape \(4,\), got shape \(4, 2\)"),
        (torch.tensor([0, 1, 2, N]), rf"\[0, num_examples={N}\), got {N}"),
        (torch.tensor([0, -1, 2, 3]), rf"\[0, num_examples={N}\), got -1"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), "must be integers.*torch.float32"),
        (torch.tensor([True, False, True, True]), "must be integers.*torch.bool"),
    ],
)
def test_missing_or_bad_indices_raise_value_error_naming_them(indices, message):
    saf = SAFLoss(loss_fn, num_examples=N, num_classes=C)
    outputs, targets = torch.randn(4, C, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=message):
        saf(outputs, targets, indices, epoch=0)


def test_outputs_of_the_wrong_width_raise_value_error():
    saf = SAFLoss(loss_fn, num_examples=N, num_classes=C)
    with pytest.raises(ValueError, match=rf"num_classes={C}\), got \(4, 5\)"):
        saf(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), torch.arange(4), epoch=0)


@pytest.mark.parametrize(
    "name,value",
    [
        ("num_examples", 0),
        ("num_examples", True),
        ("num_examples", 12.0),
        ("num_classes", 0),
        ("delay", 0),
        ("delay", 1.5),
        ("lam", -1.0),
        ("lam", float("inf")),
        ("tau", 0.0),
        ("start_epoch", 2),
        ("start_epoch", -1),
        ("end_epoch", 6),
        ("dtype", torch.long),
        ("dtype", "float32"),
    ],
)
def test_bad_options_raise_value_error_naming_the_value(name, value):
    options = {"num_examples": N, "num_classes": C, name: value}
    with pytest.raises(ValueError, match=rf"{name} must .*got {re.escape(repr(value))}"):
        SAFLoss(loss_fn, **options)


def test_bad_base_loss_or_epoch_raise_value_error():
    with pytest.raises(ValueError, match="base_loss must be a callable"):
        SAFLoss(None, num_examples=N, num_classes=C)
    saf = SAFLoss(loss_fn, num_examples=N, num_classes=C)
    for epoch in (-1, 1.0):
        with pytest.raises(ValueError, match=rf"epoch must be an integer >= 0.*got {re.escape(repr(epoch))}"):
            saf(torch.randn(4, C), torch.zeros(4, dtype=torch.long), torch.arange(4), epoch=epoch)
