"""FSDP2 (``fully_shard``, DTensor parameters): 2 ranks with half the batch each equal one process on the whole batch.

Under FSDP2 the gradient a rank holds is its shard of the global batch's gradient, so the shared ε̂ is SAM's on the
global batch; the norm is the whole gradient's (samkit.optim.sharded). What FSDP2 cannot give is refused, with the
reason (docs/fsdp.md). One start of 2 forked gloo replicas runs every case; the checks run here.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor, init_device_mesh

from samkit import SAM, sam_step
from samkit.optim.perturbation import PerturbationGroup, perturbation
from tests.optim.family import FAMILY, SELECTIVE_PASSES, per_example_loss
from tests.optim.family import model as family_model
from tests.optim.reference import batch, loss_fn, mlp
from tests.test_ddp import START_METHOD, TIMEOUT_S, _free_port, _one_thread

STEPS = 3
TOLERANCE = 1e-10  # float64: 2 ranks vs one process differ only in the order of the sums (measured: ~1e-16)
# the two-step API, both ascent paths: (name, SAM options)
TWO_STEP = {
    "sam": dict(rho=0.1),
    "asam": dict(rho=0.5, adaptive=True, eta=0.01),
    "sam-p-inf": dict(rho=0.05, p=math.inf),
    "sam-p3": dict(rho=0.1, p=3.0),
}
SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
CLIP = 0.05  # max_grad_norm: well below the gradient's norm, so that every step is clipped
# sam_step under FSDP2: every family member that FSDP2 can run, in shared mode
REFUSED = {"esam", "ksam"}  # they rank the examples of the global batch, which no rank holds
SAM_STEP = sorted(set(FAMILY) - REFUSED)
# micro-batches per rank (shared mode: clean passes accumulate unsynced, the last one reduce-scatters): mSAM's shared
# mode, and AE-SAM, whose rule reads the whole clean gradient
MICRO_BATCHES = {"sam": (1, 2), "aesam": (1, 2)}
# the norm test: (shape, ...) split unevenly over 2 ranks (3 rows: 2 + 1), and the options of each case
SHAPES = [(8, 4), (8,), (3, 8), (3,)]
NORM_CASES = {
    "p2": dict(rho=0.1),
    "adaptive": dict(rho=0.5, adaptive=True, eta=0.01),
    "p3": dict(rho=0.1, p=3.0),
    "p-inf": dict(rho=0.1, p=math.inf),
}


def _sharded(model: torch.nn.Module, *, per_layer: bool = False) -> torch.nn.Module:
    """Every parameter a DTensor split over the 2 ranks; one all-gather per pass unless ``per_layer``."""
    if per_layer:
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
    fully_shard(model)
    return model


def _full(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.full_tensor().flatten() for p in model.parameters()])


def _plain(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for shape in SHAPES]


def _two_step(model, opt, x, y) -> None:
    for _ in range(STEPS):
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)


def _error(call) -> str:
    """The message of the ValueError ``call`` raises (a refusal), another error's type and message, or ""."""
    try:
        call()
    except ValueError as error:
        return str(error)
    except Exception as error:  # not a refusal: the test shows it
        return f"{type(error).__name__}: {error}"
    return ""


def _selective_step(name: str, x, y) -> None:
    model = _sharded(family_model())
    sam_step(FAMILY[name](model), model, per_example_loss, x, y, perturbation="shared")


def _norm_case(mesh, options: dict, foreach: bool):
    params, grads = _tensors(0), _tensors(1)
    sharded = [distribute_tensor(t, mesh, [Shard(0)]) for t in params]
    sharded_grads = [distribute_tensor(t, mesh, [Shard(0)]) for t in grads]
    with torch.no_grad():
        epsilons, norm = perturbation([PerturbationGroup(sharded, sharded_grads, **options)], foreach=foreach)
    whole = [
        DTensor.from_local(e, mesh, [Shard(0)], shape=t.shape, stride=t.stride()).full_tensor()
        for e, t in zip(epsilons[0], params)
    ]
    return norm, whole


def _two_step_case(options: dict, foreach: bool, per_layer: bool, x, y) -> torch.Tensor:
    model = _sharded(mlp(), per_layer=per_layer)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    opt = SAM(model.parameters(), torch.optim.SGD, foreach=foreach, **options, **SGD)
    _two_step(model, opt, x, y)
    # the buffers that hold w are kept per parameter, though each step's local shards are new tensor objects
    kept = len(opt._step.buffers)
    assert kept == len(list(model.parameters())), f"{kept} saved-weight buffers after {STEPS} steps"
    return _full(model)


def _grouped(model: torch.nn.Module) -> list[dict]:
    """Two parameter groups with their own rho: the recorded ε̂ norm combines the groups' own norms."""
    params = list(model.parameters())
    return [{"params": params[::2]}, {"params": params[1::2], "rho": 0.02}]


def _stats_case(options: dict, grouped: bool, x, y) -> torch.Tensor:
    model = _sharded(mlp())
    opt = SAM(_grouped(model) if grouped else model.parameters(), torch.optim.SGD, **options, **SGD)
    _two_step(model, opt, x, y)
    stats = opt.last_step_stats
    return torch.tensor([stats.grad_norm, stats.eps_norm], dtype=torch.float64)


def _sam_step_case(name: str, k: int, x, y) -> torch.Tensor:
    model = _sharded(family_model())
    opt = FAMILY[name](model)
    for _ in range(STEPS):
        sam_step(opt, model, loss_fn, x, y, micro_batches=k, perturbation="shared")
    return _full(model)


def _clipped_case(x, y) -> torch.Tensor:
    model = _sharded(mlp())
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.5)
    for _ in range(STEPS):
        sam_step(opt, model, loss_fn, x, y, perturbation="shared", max_grad_norm=CLIP)
    return _full(model)


def _closure_case(x, y) -> torch.Tensor:
    model = _sharded(mlp())
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.5)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    for _ in range(STEPS):
        opt.step(closure)
    return _full(model)


def _attempt(call):
    """The case's result, or its error as text (every case runs, each test fails on its own)."""
    try:
        return call()
    except Exception as error:  # the other rank raises the same: the ranks stay in step
        return f"{type(error).__name__}: {error}"


def _cases(rank: int) -> dict:
    """Every case on this rank; the tests compare both ranks' results with one process."""
    results: dict = {}
    mesh = init_device_mesh("cpu", (2,))
    for name, options in NORM_CASES.items():
        for foreach in (True, False):
            results[f"norm-{name}-{foreach}"] = _attempt(lambda: _norm_case(mesh, options, foreach))  # noqa: B023

    x, y = batch(n=24)
    half = slice(rank * 12, (rank + 1) * 12)
    for name, options in TWO_STEP.items():
        for foreach in (True, False):
            results[f"two-step-{name}-{foreach}"] = _attempt(
                lambda: _two_step_case(options, foreach, name == "sam", x[half], y[half])  # noqa: B023
            )
    for name, options in TWO_STEP.items():
        for grouped in (False, True):
            results[f"stats-{name}-{grouped}"] = _attempt(
                lambda: _stats_case(options, grouped, x[half], y[half])  # noqa: B023
            )
    for name in SAM_STEP:
        for k in MICRO_BATCHES.get(name, (1,)):
            results[f"sam-step-{name}-{k}"] = _attempt(lambda: _sam_step_case(name, k, x[half], y[half]))  # noqa: B023

    results["clipped"] = _attempt(lambda: _clipped_case(x[half], y[half]))
    results["closure"] = _attempt(lambda: _closure_case(x[half], y[half]))

    model = _sharded(mlp())
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    results["refused-per-replica"] = _error(lambda: sam_step(opt, model, loss_fn, x[half], y[half]))
    results["refused-vmap"] = _error(
        lambda: sam_step(opt, model, loss_fn, x[half], y[half], perturbation="shared", backend="vmap")
    )
    results["refused-swap"] = _error(lambda: SAM(model.parameters(), torch.optim.SGD, lr=0.1, restore_by="swap"))
    for name in sorted(REFUSED):
        results[f"refused-{name}"] = _error(lambda: _selective_step(name, x[half], y[half]))  # noqa: B023
    partly = mlp()
    fully_shard(partly[0])  # the last layer's parameters stay plain tensors
    opt = SAM(partly.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    loss_fn(partly(x[half]), y[half]).backward()
    results["refused-mixed"] = _error(lambda: opt.first_step())
    return results


def _replica(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # before any op: a forked child must not use the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.save(_cases(rank), f"{out_dir}/rank{rank}.pt")
    finally:
        gc.collect()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results from one start of 2 replicas (a replica's error is raised here, a hang fails)."""
    out = tmp_path_factory.mktemp("fsdp")
    context = mp.start_processes(
        _replica, args=(2, _free_port(), str(out)), nprocs=2, join=False, start_method=START_METHOD
    )
    import time

    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the 2 FSDP2 replicas did not finish within {TIMEOUT_S} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")


def test_the_norm_over_the_shards_is_the_norm_of_the_whole_gradient(ranks):
    for name, options in NORM_CASES.items():
        params, grads = _tensors(0), _tensors(1)
        p = options.get("p", 2.0)
        scale = [w.abs() + options.get("eta", 0.0) if options.get("adaptive") else torch.ones_like(w) for w in params]
        scaled = [t * g for t, g in zip(scale, grads)]
        if math.isinf(p):  # the reported norm for p = inf: the largest per-tensor ||T g||_1 (it only flags NaN/inf)
            expected_norm = max(torch.linalg.vector_norm(s, 1) for s in scaled)
        else:  # ||T g||_q over all tensors at once, 1/p + 1/q = 1
            expected_norm = torch.linalg.vector_norm(torch.cat([s.flatten() for s in scaled]), p / (p - 1))
        whole_epsilons, _ = perturbation([PerturbationGroup(params, grads, **options)], foreach=False)  # type: ignore[arg-type]
        for foreach in (True, False):
            for rank in ranks:
                result = rank[f"norm-{name}-{foreach}"]
                assert isinstance(result, tuple), result  # else the error it raised
                norm, epsilons = result
                assert not isinstance(norm, DTensor), name
                assert abs(norm.item() - expected_norm.item()) <= 1e-12 * expected_norm.item(), (name, foreach)
                for e, expected in zip(epsilons, whole_epsilons[0]):
                    assert (e - expected).abs().max().item() <= 1e-12, (name, foreach)


def test_two_step_api_equals_one_process_with_both_ascent_paths(ranks):
    x, y = batch(n=24)
    with _one_thread():
        for name, options in TWO_STEP.items():
            model = mlp()
            _two_step(model, SAM(model.parameters(), torch.optim.SGD, **options, **SGD), x, y)
            for foreach in (True, False):
                key = f"two-step-{name}-{foreach}"
                assert isinstance(ranks[0][key], torch.Tensor), ranks[0][key]  # else the error it raised
                assert torch.equal(ranks[0][key], ranks[1][key]), key
                assert (ranks[0][key] - _plain(model)).abs().max().item() <= TOLERANCE, key
                assert (ranks[0][key] - _plain(mlp())).abs().max().item() > 1e-3, key  # and it trained


def test_the_step_stats_are_the_whole_gradients_and_the_whole_epsilons(ranks):
    """last_step_stats under FSDP2: ||g|| and ||ε̂|| of the whole tensors (reduced over the shards), equal to one
    process's, with one or two parameter groups, for p = 2, adaptive, p = inf and p = 3."""
    x, y = batch(n=24)
    with _one_thread():
        for name, options in TWO_STEP.items():
            for grouped in (False, True):
                model = mlp()
                opt = SAM(_grouped(model) if grouped else model.parameters(), torch.optim.SGD, **options, **SGD)
                _two_step(model, opt, x, y)
                stats = opt.last_step_stats
                expected = torch.tensor([stats.grad_norm, stats.eps_norm], dtype=torch.float64)
                key = f"stats-{name}-{grouped}"
                assert isinstance(ranks[0][key], torch.Tensor), ranks[0][key]  # else the error it raised
                assert torch.equal(ranks[0][key], ranks[1][key]), key
                assert torch.allclose(ranks[0][key], expected, rtol=1e-10, atol=0), (key, ranks[0][key], expected)


def test_sam_step_equals_one_process_for_every_member_fsdp2_can_run(ranks):
    x, y = batch(n=24)
    with _one_thread():
        for name in SAM_STEP:
            model = family_model()
            opt = FAMILY[name](model)
            for _ in range(STEPS):
                sam_step(opt, model, loss_fn, x, y)
            for k in MICRO_BATCHES.get(name, (1,)):
                key = f"sam-step-{name}-{k}"
                assert isinstance(ranks[0][key], torch.Tensor), ranks[0][key]  # else the error it raised
                assert torch.equal(ranks[0][key], ranks[1][key]), key
                assert (ranks[0][key] - _plain(model)).abs().max().item() <= TOLERANCE, key


def test_clipping_and_the_closure_api_equal_one_process(ranks):
    x, y = batch(n=24)
    with _one_thread():
        for key, clip in (("clipped", CLIP), ("closure", None)):
            model = mlp()
            opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.5)
            for _ in range(STEPS):
                sam_step(opt, model, loss_fn, x, y, max_grad_norm=clip)
            assert isinstance(ranks[0][key], torch.Tensor), ranks[0][key]  # else the error it raised
            assert torch.equal(ranks[0][key], ranks[1][key]), key
            assert (ranks[0][key] - _plain(model)).abs().max().item() <= TOLERANCE, key
        unclipped = _plain(model)
    assert (ranks[0]["clipped"] - unclipped).abs().max().item() > 1e-3  # the clipping acted


def test_what_fsdp2_cannot_give_is_refused_with_the_reason(ranks):
    for rank in ranks:
        assert "a rank cannot sit at its own w + ε̂" in rank["refused-per-replica"]
        assert "perturbation='shared'" in rank["refused-per-replica"]
        assert "backend='loop'" in rank["refused-vmap"]
        assert "silently run at w instead of w + ε̂" in rank["refused-swap"]
        for name in REFUSED:
            assert "global batch" in rank[f"refused-{name}"], name
        assert "apply fully_shard to the root module" in rank["refused-mixed"]
    assert SELECTIVE_PASSES.keys() == REFUSED  # every member that selects examples is refused, and only those
