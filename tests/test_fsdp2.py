"""FSDP2 (``fully_shard``) on 2 gloo ranks on the CPU: the averages enter the model, and leave it.

FSDP2 all-gathers each parameter from its own sharded storage, so an EMA that re-points ``.data``
evaluates the trained weights (issue 14, acceptance 4). One scenario of the shared 2-rank launch
(``tests/_distributed.py``) trains an FSDP2 model and, beside it on every rank, an unsharded
replica (same seed, same batches: FSDP's averaged gradient of identical batches is the replica's
gradient), then evaluates one batch through every way averages enter a model. Each rank returns
what it saw; the tests below compare it against references that do not go through placement: the
shadows gathered with ``DTensor.full_tensor()`` and loaded into a plain model, and the replica's
own EMA.

The model has a layer that FSDP2 leaves in the root module: after a forward pass without gradients
the root keeps its parameters unsharded (gathered), and its weight of shape (1, 3) gives rank 1 an
empty shard. Layer 1 has 3 rows over 2 ranks (uneven shards).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import polyak
from tests._distributed import Context, results

STEPS = 4


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 1))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, ema: polyak.EMA, batch) -> None:
    x, y = batch
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    opt.zero_grad()
    ema.update()


def placement(ctx: Context) -> dict[str, object]:
    """One rank: train, then evaluate through every placement; return what it saw."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = _net()
    torch.manual_seed(0)
    replica = _net()
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)  # the root holds model[4]
    params = dict(model.named_parameters())  # the sharded DTensor parameters

    def shards() -> dict[str, torch.Tensor]:
        return {n: p.to_local().detach().clone() for n, p in params.items()}

    ema = polyak.EMA(model, decay=0.5)
    # bf16 shadows, stochastic rounding: its kernel mixes shadows with plain tensors (random
    # offsets), which only works on the local shards (handed over instead of the DTensors)
    rounded = polyak.EMA(
        model, decay=0.5, shadow_dtype=torch.bfloat16, rounding="stochastic", kernel="reference"
    )
    replica_ema = polyak.EMA(replica, decay=0.5)
    out: dict[str, object] = {"shadow_types": [type(ema.average(n)).__name__ for n in params]}
    initial = shards()
    with ema.swapped():  # before FSDP's lazy initialisation (first forward)
        pass
    out["untouched_before_first_forward"] = all(
        torch.equal(a, b) for a, b in zip(initial.values(), shards().values(), strict=True)
    )

    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    replica_opt = torch.optim.SGD(replica.parameters(), lr=0.2)
    for _ in range(STEPS):
        batch = (torch.randn(6, 4, generator=gen), torch.randn(6, 1, generator=gen))
        _train_step(model, opt, ema, batch)
        rounded.update()
        _train_step(replica, replica_opt, replica_ema, batch)
    x = torch.randn(5, 4, generator=gen)

    # references that do not go through placement
    averages = {n: ema.average(n).full_tensor() for n in params}
    out["averages"] = averages
    out["rounded"] = {n: rounded.average(n).full_tensor() for n in params}
    out["replica_averages"] = {n: replica_ema.average(n).clone() for n in params}
    reference = _net()
    reference.load_state_dict(averages)
    trained_reference = _net()
    trained_reference.load_state_dict({n: p.full_tensor() for n, p in params.items()})
    with torch.no_grad():
        out["reference"] = reference(x)
        out["trained_reference"] = trained_reference(x)

    with torch.no_grad():
        out["shards"] = shards()
        out["trained"] = model(x)  # leaves the root unsharded, holding the trained weights
        with ema.swapped():
            out["swapped"] = model(x)
        out["after_swapped"] = (model(x), shards())

        ema.use_averages()
        ema.use_averages()  # idempotent
        out["use_averages"] = model(x)
        ema.use_trained()
        ema.use_trained()
        out["after_use_trained"] = (model(x), shards())

        ema.bind_to_mode(model)
        model.eval()
        out["eval"] = model(x)
        model.train()
        out["after_train"] = (model(x), shards())

        ema.store()
        out["stored"] = model(x)  # leaves the root unsharded, holding the trained weights
        ema.copy_to()
        out["copy_to"] = model(x)
        ema.restore()
        out["after_restore"] = (model(x), shards())

    # training goes on from the trained weights, as the replica's does
    batch = (torch.randn(6, 4, generator=gen), torch.randn(6, 1, generator=gen))
    _train_step(model, opt, ema, batch)
    _train_step(replica, replica_opt, replica_ema, batch)
    out["next_step"] = {n: p.full_tensor() for n, p in params.items()}
    out["replica_next_step"] = {n: p.detach().clone() for n, p in replica.named_parameters()}

    # copy_to() for good, after a forward pass left the root unsharded
    reference.load_state_dict({n: ema.average(n).full_tensor() for n in params})
    with torch.no_grad():
        out["final_reference"] = reference(x)
        model(x)
        ema.copy_to()
        out["copied_for_good"] = model(x)
    _switch_ema(out)
    _nan_on_one_rank(out, model, ctx.rank)
    return out


SCENARIOS = {2: [placement]}


def _switch_ema(out: dict[str, object]) -> None:
    """Switch-EMA on FSDP2 (in a rank): every 2 steps the average is written into the local
    shards, which the optimizer steps and the next forward gathers; an unsharded replica does the
    same on the same batches."""
    from torch.distributed.fsdp import fully_shard

    from polyak.averagers import SwitchEMA

    torch.manual_seed(0)
    model = _net()
    torch.manual_seed(0)
    replica = _net()
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    ema = polyak.EMA(model, rule=SwitchEMA(0.5, every=2))
    replica_ema = polyak.EMA(replica, rule=SwitchEMA(0.5, every=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    replica_opt = torch.optim.SGD(replica.parameters(), lr=0.2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(STEPS):  # switches after steps 2 and 4
        batch = (torch.randn(6, 4, generator=gen), torch.randn(6, 1, generator=gen))
        _train_step(model, opt, ema, batch)
        _train_step(replica, replica_opt, replica_ema, batch)
    params = dict(model.named_parameters())
    out["switch_params"] = {n: p.full_tensor() for n, p in params.items()}
    out["switch_averages"] = {n: ema.average(n).full_tensor() for n in params}
    out["switch_replica"] = {n: p.detach().clone() for n, p in replica.named_parameters()}
    x = torch.randn(5, 4, generator=gen)
    with torch.no_grad():
        out["switch_forward"] = (model(x), replica(x))


def _nan_on_one_rank(out: dict[str, object], model: nn.Module, rank: int) -> None:
    """nonfinite="skip": a NaN in rank 0's shard alone is skipped on every rank (an all-reduce)."""
    from polyak._store import local  # a DTensor's shard

    skip = polyak.EMA(model, decay=0.5, nonfinite="skip")
    live = dict(model.named_parameters())
    with torch.no_grad():
        for p in live.values():
            local(p).add_(1.0)  # the weights move away from the averages on every rank
        if rank == 0:
            local(live["0.weight"]).view(-1)[0] = float("nan")
    before = {n: local(skip.average(n)).clone() for n in live}
    skip.update()
    out["nan_skipped"] = skip.skipped_steps
    out["nan_untouched"] = all(torch.equal(local(skip.average(n)), before[n]) for n in live)


@pytest.fixture(scope="module")
def ranks(ranks2) -> list[dict]:
    """What each of the 2 ranks saw (the session's 2-rank launch runs this module's scenario)."""
    return results(ranks2, __name__, placement)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


def test_shadows_are_dtensors_and_equal_an_unsharded_run(ranks):
    """Kernels update local shards; the shadows the user sees stay DTensors, and gathered they are
    the averages of an unsharded replica trained on the same batches."""
    for seen in ranks:
        assert set(seen["shadow_types"]) == {"DTensor"}
        for name, average in seen["averages"].items():
            close(average, seen["replica_averages"][name])
    # the trained weights moved away from the averages, or no test below could fail
    assert not torch.allclose(ranks[0]["reference"], ranks[0]["trained_reference"], atol=1e-3)
    assert ranks[1]["shards"]["4.weight"].numel() == 0  # rank 1 holds an empty shard


def test_stochastic_rounding_runs_on_the_local_shards(ranks):
    """bf16 shadows with stochastic rounding (which failed on DTensors: the kernel adds plain
    tensors to the shadows) track the fp32 averages. Each update rounds by under one ulp and
    decay 0.5 halves the error carried, so it stays under two ulps of the largest value a shadow
    passed through (|values| < 2 here, a bf16 ulp below 2 is at most 2**-7)."""
    for seen in ranks:
        for name, average in seen["averages"].items():
            rounded = seen["rounded"][name]
            assert rounded.dtype == torch.bfloat16
            assert average.abs().max() < 1.5, name  # the bound's premise
            torch.testing.assert_close(rounded.float(), average, rtol=0, atol=2 * 2**-7)


def test_the_model_evaluates_its_trained_weights_outside_any_placement(ranks):
    for seen in ranks:
        close(seen["trained"], seen["trained_reference"])
        assert torch.equal(seen["stored"], seen["trained"])  # store() alone changes nothing


@pytest.mark.parametrize("way", ["swapped", "use_averages", "eval", "copy_to"])
def test_every_placement_evaluates_the_averages(ranks, way):
    """``swapped()``, ``use_averages()``, ``model.eval()`` after ``bind_to_mode`` and
    ``store(); copy_to()``: the forward pass equals a plain model loaded with the gathered averages."""
    for seen in ranks:
        close(seen[way], seen["reference"])


@pytest.mark.parametrize(
    "way", ["after_swapped", "after_use_trained", "after_train", "after_restore"]
)
def test_the_trained_shards_come_back_bit_for_bit(ranks, way):
    """Leaving the block, ``use_trained()``, ``model.train()``, ``restore()``: every local shard
    is bit-identical to before, and the next forward (FSDP2 gathers again) gives the trained output."""
    for seen in ranks:
        output, shards = seen[way]
        for name, shard in seen["shards"].items():
            assert torch.equal(shards[name], shard), name
        assert torch.equal(output, seen["trained"])


def test_copy_to_for_good_evaluates_the_averages(ranks):
    for seen in ranks:
        close(seen["copied_for_good"], seen["final_reference"])


def test_placing_before_fsdp_initialised_changes_nothing(ranks):
    for seen in ranks:
        assert seen["untouched_before_first_forward"]


def test_training_goes_on_from_the_trained_weights(ranks):
    """A training step after all the evaluations moves the same weights as the replica's step:
    no average stayed in a gathered (unsharded) parameter."""
    for seen in ranks:
        for name, param in seen["next_step"].items():
            close(param, seen["replica_next_step"][name])


def test_switch_ema_writes_the_average_into_the_local_shards(ranks):
    """After the last step (a switch) the sharded parameters are the gathered averages bit for
    bit, follow the unsharded replica's Switch-EMA run, and the next forward computes with them."""
    for seen in ranks:
        for name, param in seen["switch_params"].items():
            assert torch.equal(param, seen["switch_averages"][name]), name
            close(param, seen["switch_replica"][name])
        output, replica_output = seen["switch_forward"]
        close(output, replica_output)


def test_a_nan_on_one_rank_is_skipped_on_every_rank(ranks):
    """nonfinite='skip': rank 0's shard holds a NaN, rank 1's does not; both skip the update
    (the flag is all-reduced), so no rank's averages of that parameter get out of step."""
    for seen in ranks:
        assert seen["nan_skipped"] == 1
        assert seen["nan_untouched"]
