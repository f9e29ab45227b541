"""Averages across processes (:mod:`polyak.distributed`): DDP, FSDP2, HSDP, TP + FSDP, DCP.

Every scenario below runs on gloo ranks on the CPU, all scenarios of a world size in one launch
(``tests/_distributed.py``: 2 ranks, then 4); each returns what it saw and the tests compare that
against references that do not go through the sharded EMA: a 1-process run, or an fp32 EMA of the
parameters gathered with ``full_tensor()`` after every step, kept beside the run.

The model is a small transformer (~84k parameters: embeddings, two pre-norm blocks of causal
attention and an MLP, a head), so that a launch stays under a minute on 2 cores.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import polyak
from tests._distributed import Context, counting, results

VOCAB, DIM, HEADS, HIDDEN, LENGTH, LAYERS = 128, 64, 4, 128, 8, 2
DECAY = 0.8
STEPS, SAVE_AT = 20, 10
LR = 0.1


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.up, self.down = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.norm1(x)
        # -1 heads: under tensor parallelism each rank computes its own heads
        q, k, v = (
            f(h).view(b, t, -1, DIM // HEADS).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(0.02 * torch.randn(LENGTH, DIM))
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def net() -> Net:
    torch.manual_seed(0)  # the same weights on every rank and in the 1-process reference
    return Net()


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s micro-batch of step ``step``: 4 sequences and their next tokens."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, VOCAB, (4, LENGTH + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    tokens, targets = data
    return F.cross_entropy(model(tokens).reshape(-1, VOCAB), targets.reshape(-1))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, data: Any) -> None:
    loss_of(model, data).backward()
    opt.step()
    opt.zero_grad()


def shard(model: nn.Module, **kwargs: Any) -> nn.Module:
    """FSDP2 as a transformer is sharded: each block, then the root (embeddings, norm, head)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def gathered(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors (DTensors gathered, a collective), detached copies."""
    return {
        n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
        for n, t in tensors.items()
    }


def averages(ema: polyak.EMA) -> dict[str, torch.Tensor]:
    return gathered({n: ema.average(n) for n in ema.names()})


def local_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the local shards' storage (a shadow must not hold a padded or full copy)."""
    total = 0
    for t in tensors:
        shard = t.to_local() if hasattr(t, "to_local") else t
        total += shard.untyped_storage().nbytes()
    return total


def export_watched(ema: polyak.EMA, path: Path) -> tuple[int, int]:
    """``export_full`` with its gathers watched: (the most gathered tensors still referenced when
    another gather starts, the number of gathers). The gathered tensor objects are watched, not
    their storage, which the gloo worker thread may release a moment after the gather."""
    from torch.distributed.tensor import DTensor

    alive: list[weakref.ref] = []
    most = 0
    original = DTensor.full_tensor

    def watched(self: DTensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal most
        most = max(most, sum(ref() is not None for ref in alive))
        full = original(self, *args, **kwargs)
        alive.append(weakref.ref(full))
        return full

    DTensor.full_tensor = watched
    try:
        polyak.distributed.export_full(ema, path)
    finally:
        DTensor.full_tensor = original
    return most, len(alive)


class Follower:
    """An fp32 EMA of gathered parameters, by hand: ``s = lerp(s, p, 1 - decay)`` per step."""

    def __init__(self, model: nn.Module) -> None:
        self.params = dict(model.named_parameters())
        self.shadows = gathered(self.params)

    def update(self) -> None:
        for name, value in gathered(self.params).items():
            self.shadows[name].lerp_(value, 1 - DECAY)


# ====================================================================== 2 ranks


def train_fsdp2(ctx: Context) -> dict[str, Any]:
    """FSDP2 training for 20 steps, each rank on its own micro-batches; a DCP checkpoint at step
    10; the EMA's gathered averages, ``export_full`` and a resumed run from the checkpoint."""
    import torch.distributed.checkpoint as dcp

    model = shard(net())
    ema = polyak.EMA(model, decay=DECAY)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out: dict[str, Any] = {"placements": {}}
    for name, param in model.named_parameters():
        shadow = ema.average(name)
        out["placements"][name] = (str(param.placements), str(shadow.placements))
    checkpoint = ctx.tmp / "ckpt"
    for step in range(1, STEPS + 1):
        train_step(model, opt, batch(step, ctx.rank))
        if step == 15:  # an evaluation leaves the root unsharded, holding gathered copies
            with torch.no_grad():
                model(batch(0, 0)[0])
        ema.update()
        if step == SAVE_AT:
            out["saved"] = averages(ema)
            dcp.save(
                {"model": model.state_dict(), "ema": ema.state_dict()}, checkpoint_id=checkpoint
            )
    out["averages"] = averages(ema)
    out["params"] = gathered(dict(model.named_parameters()))
    out["alive_at_gather"], out["gathers"] = export_watched(ema, ctx.tmp / "ema.safetensors")
    out["export"] = str(ctx.tmp / "ema.safetensors")
    try:
        ema.save(ctx.tmp / "not_here.safetensors")
    except ValueError as error:
        out["save_error"] = str(error)
    out["checkpoint"] = str(checkpoint)

    # resume: a fresh model, optimizer and EMA from the checkpoint, on to step 20
    resumed = shard(net())
    resumed_ema = polyak.EMA(resumed, decay=0.5)  # the checkpoint's decay wins
    state = {"model": resumed.state_dict(), "ema": resumed_ema.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint, planner=polyak.distributed.load_planner())
    resumed.load_state_dict(state["model"])
    with pytest.warns(polyak.ema.LoadedSettingsWarning):
        resumed_ema.load_state_dict(state["ema"])
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=LR)
    for step in range(SAVE_AT + 1, STEPS + 1):
        train_step(resumed, resumed_opt, batch(step, ctx.rank))
        if step == 15:
            with torch.no_grad():
                resumed(batch(0, 0)[0])
        resumed_ema.update()
    out["resumed"] = averages(resumed_ema)
    out["resumed_step"] = resumed_ema.step
    return out


def no_collectives(ctx: Context) -> dict[str, Any]:
    """Collectives counted while the EMA is built and while it updates (the first update
    included), and a positive control; shadow bytes against the local shards' bytes."""
    model = shard(net())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    train_step(model, opt, batch(1, ctx.rank))
    with counting() as built:
        ema = polyak.EMA(model, decay=DECAY)
    with counting() as first:
        ema.update()
    train_step(model, opt, batch(2, ctx.rank))
    with counting() as second:
        ema.update()
    param = next(model.parameters())
    with counting() as control:
        param.full_tensor()  # a DTensor redistribution
        torch.distributed.barrier()
        param.redistribute(placements=[torch.distributed.tensor.Replicate()])
    # to_local() is never called per update: the local views were planned once
    calls = []
    original = type(param).to_local
    type(param).to_local = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        ema.update()
    finally:
        type(param).to_local = original
    shadows = [ema.average(n) for n in ema.names()]
    params = list(model.parameters())
    return {
        "built": built.calls,
        "first": first.calls,
        "second": second.calls,
        "control": control.calls,
        "to_local_calls": len(calls),
        "shadow_bytes": local_bytes(shadows),
        "param_bytes": sum(p.to_local().numel() * p.element_size() for p in params),
        "full_bytes": sum(p.numel() * p.element_size() for p in params),
        "shadow_types": sorted({type(s).__name__ for s in shadows}),
    }


def ddp(ctx: Context) -> dict[str, Any]:
    """``polyak.EMA(ddp_model)`` unwraps and averages the local replica, communicating nothing."""
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(net())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ema = polyak.EMA(model, decay=DECAY)
    calls = []
    for step in range(1, 4):
        train_step(model, opt, batch(step, ctx.rank))
        with counting() as seen:
            ema.update()
        calls += seen.calls
    return {
        "names": ema.names(),
        "plain_names": [n for n, _ in net().named_parameters()],
        "calls": calls,
        "averages": averages(ema),
    }


def mixed_precision(ctx: Context) -> dict[str, Any]:
    """FSDP2's ``MixedPrecisionPolicy`` (bf16 compute from fp32 shards) keeps fp32 shadows of
    the fp32 shards; a bf16 model's shards get fp32 shadows too."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = shard(net(), mp_policy=policy)
    ema = polyak.EMA(model, decay=DECAY)
    follower = Follower(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(1, 4):
        train_step(model, opt, batch(step, ctx.rank))
        ema.update()
        follower.update()
    low = shard(net().bfloat16())
    low_ema = polyak.EMA(low)
    return {
        "dtypes": sorted({str(ema.average(n).dtype) for n in ema.names()}),
        "averages": averages(ema),
        "follower": follower.shadows,
        "bf16_shadow_dtypes": sorted({str(low_ema.average(n).dtype) for n in low_ema.names()}),
        "bf16_param_dtypes": sorted({str(p.dtype) for p in low.parameters()}),
    }


def offload(ctx: Context) -> dict[str, Any]:
    """``offload="cpu"`` on sharded shadows: host local shards (unpinned: this machine has no
    CUDA), the same averages as shadows kept beside the parameters."""
    model = shard(net())
    kept = polyak.EMA(model, decay=DECAY)
    offloaded = polyak.EMA(model, decay=DECAY, offload="cpu")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(1, 4):
        train_step(model, opt, batch(step, ctx.rank))
        kept.update()
        offloaded.update()
    shadows = [offloaded.average(n) for n in offloaded.names()]
    return {
        "types": sorted({type(s).__name__ for s in shadows}),
        "pinned": any(s.to_local().is_pinned() for s in shadows),
        "kept": averages(kept),
        "offloaded": averages(offloaded),
    }


def stochastic(ctx: Context) -> dict[str, Any]:
    """bf16 shadows with stochastic rounding on FSDP2 shards, beside the same EMA of a plain model
    holding the gathered weights: the same seed must give the same bits (each shard draws its
    elements' places in the full tensor, not rank 0's)."""
    model = shard(net())
    kwargs = {"decay": 0.99, "shadow_dtype": torch.bfloat16, "rounding": "stochastic"}
    sharded = polyak.EMA(model, kernel="reference", seed=3, **kwargs)
    plain_model = net()
    plain = polyak.EMA(plain_model, kernel="reference", seed=3, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(1, 4):
        train_step(model, opt, batch(step, ctx.rank))
        with torch.no_grad():
            for name, value in gathered(dict(model.named_parameters())).items():
                plain_model.get_parameter(name).copy_(value)
        sharded.update()
        plain.update()
    return {"sharded": averages(sharded), "plain": averages(plain)}


def functional_call(ctx: Context) -> dict[str, Any]:
    """``ema.functional_call`` on FSDP2 evaluates the averages (not the trained weights, as
    ``torch.func.functional_call`` would after the first forward) and gives every shard back bit
    for bit; BatchNorm statistics written in train mode land in copies."""
    from torch.distributed.fsdp import fully_shard

    model = shard(net())
    ema = polyak.EMA(model, decay=DECAY)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(1, 4):
        train_step(model, opt, batch(step, ctx.rank))
        ema.update()
    tokens = batch(99, 0)[0]
    params = dict(model.named_parameters())
    shards = {n: p.to_local().clone() for n, p in params.items()}
    with torch.no_grad():
        trained = model(tokens)
    out: dict[str, Any] = {"trained": trained, "averaged": ema.functional_call(tokens)}
    out["same_shards"] = all(torch.equal(shards[n], p.to_local()) for n, p in params.items())
    with torch.no_grad():
        out["after"] = model(tokens)
    reference = net()
    reference.load_state_dict(averages(ema))
    with torch.no_grad():
        out["reference"] = reference(tokens)

    torch.manual_seed(0)
    norm = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    fully_shard(norm)
    norm_ema = polyak.EMA(norm, decay=DECAY)
    before = {n: b.clone() for n, b in norm.named_buffers()}
    shadows = {n: norm_ema.average(n).clone() for n, _ in norm.named_buffers()}
    norm.train()
    norm_ema.functional_call(torch.randn(5, 3) + 3)
    out["buffers_kept"] = all(torch.equal(b, before[n]) for n, b in norm.named_buffers())
    out["shadows_kept"] = all(torch.equal(norm_ema.average(n), s) for n, s in shadows.items())
    return out


def replaced_shard(ctx: Context) -> dict[str, Any]:
    """FSDP2 re-allocates a parameter's local shard (its lazy initialisation re-pads one loaded
    with ``assign=True``): the next update averages the new shard, not the planned view."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6))
    fully_shard(model)
    ema = polyak.EMA(model, decay=0.5)
    weight = model[0].weight
    old = weight._local_tensor
    weight._local_tensor = torch.full_like(old, 3.0)  # as FSDPParam.reset_sharded_param does
    start = ema.average("0.weight").to_local().clone()
    ema.update()
    return {"start": start, "after": ema.average("0.weight").to_local().clone()}


def layouts(ctx: Context) -> dict[str, Any]:
    """A plain EMA's state dict loads into a sharded EMA (each rank keeps its block) and a sharded
    one's into a plain EMA (gathered); the engine is told that FSDP2's parameters are written by
    the optimizer alone (their local shards are plain tensors) and buffers are not."""
    from torch.distributed.fsdp import fully_shard

    from polyak import _kernels

    sharded = polyak.EMA(shard(net()), decay=DECAY)
    plain = polyak.EMA(net(), decay=DECAY)
    gen = torch.Generator().manual_seed(7)  # the same values on every rank
    with torch.no_grad():
        for name in plain.names():
            plain.average(name).copy_(torch.randn(plain.average(name).shape, generator=gen))
    plain.step = 5
    sharded.load_state_dict(plain.state_dict())
    back = polyak.EMA(net(), decay=DECAY)
    back.load_state_dict(sharded.state_dict())
    out: dict[str, Any] = {
        "expected": {n: plain.average(n).clone() for n in plain.names()},
        "sharded": averages(sharded),
        "back": {n: back.average(n).clone() for n in back.names()},
        "steps": (sharded.step, back.step),
    }

    torch.manual_seed(0)
    norm = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    fully_shard(norm)
    seen: dict[str, Any] = {}
    original = _kernels.Engine

    def capture(*args: Any, owned: Any = None, **kwargs: Any) -> Any:
        seen["owned"] = list(owned)
        return original(*args, owned=owned, **kwargs)

    _kernels.Engine = capture
    try:
        ema = polyak.EMA(norm)
    finally:
        _kernels.Engine = original
    out["owned"] = dict(zip(ema.names(), seen["owned"], strict=True))
    return out


def readme(ctx: Context) -> dict[str, Any]:
    """The README's "Distributed" block as written, on 3 batches per rank (a checkpoint every 2
    steps instead of 1000; the launcher already joined the process group)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (block,) = [b for b in blocks if "polyak.distributed.export_full" in b]
    for old, new in (("dist.init_process_group()", "pass"), ("1000", "2")):
        assert old in block, old
        block = block.replace(old, new)
    evaluated = []
    namespace = {
        "MyNet": net,
        "loader": [batch(step, ctx.rank) for step in range(1, 4)],
        "loss_fn": lambda out, y: F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1)),
        "evaluate": lambda model: evaluated.append(model(batch(0, 0)[0]).detach()),
    }
    where = ctx.tmp / "readme"
    where.mkdir(exist_ok=True)
    os.chdir(where)
    exec(compile(block, "README.md", "exec"), namespace)
    ema = namespace["ema"]
    return {
        "step": ema.step,
        "evaluated": len(evaluated),
        "averages": averages(ema),
        "export": str(where / "model_ema.safetensors"),
    }


# ====================================================================== 4 ranks


def train_fsdp2_4(ctx: Context) -> dict[str, Any]:
    """FSDP2 on 4 ranks (gradients summed in another order than on 2), against an fp32 EMA of the
    parameters gathered after every step; the 2-rank checkpoint loaded (resharded 2 -> 4)."""
    import torch.distributed.checkpoint as dcp

    model = shard(net())
    ema = polyak.EMA(model, decay=DECAY)
    follower = Follower(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(1, STEPS + 1):
        train_step(model, opt, batch(step, ctx.rank))
        ema.update()
        follower.update()
    out: dict[str, Any] = {"averages": averages(ema), "follower": follower.shadows}
    loaded = polyak.EMA(shard(net()), decay=DECAY)
    state = {"ema": loaded.state_dict()}
    checkpoint = ctx.inputs["checkpoint"]
    dcp.load(state, checkpoint_id=checkpoint, planner=polyak.distributed.load_planner())
    loaded.load_state_dict(state["ema"])
    out["loaded"] = averages(loaded)
    out["loaded_step"] = loaded.step
    return out


def hsdp(ctx: Context) -> dict[str, Any]:
    """HSDP on a 2x2 mesh (replicate x shard): shadows ``(Replicate(), Shard(0))``, no collective
    per update, the fp32 EMA of the gathered parameters; bf16 stochastic rounding keeps the two
    replicas of each shard equal."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = shard(net(), mesh=mesh)
    ema = polyak.EMA(model, decay=DECAY)
    kwargs = {"shadow_dtype": torch.bfloat16, "rounding": "stochastic", "kernel": "reference"}
    rounded = polyak.EMA(model, decay=0.99, seed=5, **kwargs)
    follower = Follower(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    calls = []
    for step in range(1, 6):
        train_step(model, opt, batch(step, ctx.rank))
        with counting() as seen:
            ema.update()
            rounded.update()
        calls += seen.calls
        follower.update()
    return {
        "placements": {
            n: (str(p.placements), str(ema.average(n).placements))
            for n, p in model.named_parameters()
        },
        "calls": calls,
        "averages": averages(ema),
        "follower": follower.shadows,
        "rounded_local": {n: rounded.average(n).to_local().clone() for n in rounded.names()},
    }


def tensor_parallel(ctx: Context) -> dict[str, Any]:
    """TP (Colwise/Rowwise over the "tp" dimension) + FSDP2 (over "dp") on a 2x2 mesh: every
    shadow has its parameter's placements (``_StridedShard`` where both shard dim 0), no collective
    per update, the fp32 EMA of the gathered parameters; each shard's place in its full tensor;
    ``export_full`` gathers the strided shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    from polyak._store import shard_start

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = net()
    plan = {
        **{name: ColwiseParallel() for name in ("q", "k", "v", "up")},
        **{name: RowwiseParallel() for name in ("o", "down")},
    }
    for block in model.blocks:
        parallelize_module(block, mesh["tp"], plan)
    shard(model, mesh=mesh["dp"])
    ema = polyak.EMA(model, decay=DECAY)
    follower = Follower(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    dp_rank = mesh["dp"].get_local_rank()
    calls = []
    for step in range(1, 6):
        train_step(model, opt, batch(step, dp_rank))  # tp ranks of one dp rank share the batch
        with counting() as seen:
            ema.update()
        calls += seen.calls
        follower.update()
    polyak.distributed.export_full(ema, ctx.tmp / "tp.safetensors")
    return {
        "placements": {
            n: (str(p.placements), str(ema.average(n).placements))
            for n, p in model.named_parameters()
        },
        "blocks": {
            n: (p.numel(), shard_start(p), p.to_local().numel())
            for n, p in model.named_parameters()
        },
        "calls": calls,
        "averages": averages(ema),
        "follower": follower.shadows,
        "export": str(ctx.tmp / "tp.safetensors"),
    }


SCENARIOS = {
    2: [
        train_fsdp2,
        no_collectives,
        ddp,
        mixed_precision,
        offload,
        stochastic,
        functional_call,
        replaced_shard,
        layouts,
        readme,
    ],
    4: [train_fsdp2_4, hsdp, tensor_parallel],
}


# ====================================================================== the tests


def of(ranks: list[dict], scenario: Any) -> list[dict]:
    return results(ranks, __name__, scenario)


def close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tol=1e-5) -> None:
    assert actual.keys() == expected.keys()
    for name, value in actual.items():
        torch.testing.assert_close(
            value, expected[name].to(value.dtype), rtol=0, atol=tol, msg=name
        )


def one_process_run(world: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The 1-process reference of ``train_fsdp2``: the same per-rank micro-batches, the loss
    averaged over them (FSDP2 averages the ranks' gradients), an fp64 EMA by hand; (averages at
    step 10, at step 20)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only contend on a busy machine (20x slower)
    try:
        return _one_process_run(world)
    finally:
        torch.set_num_threads(threads)


def _one_process_run(world: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    shadows = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    saved = {}
    for step in range(1, STEPS + 1):
        loss = sum(loss_of(model, batch(step, r)) for r in range(world)) / world
        loss.backward()
        opt.step()
        opt.zero_grad()
        for name, param in model.named_parameters():
            shadows[name].lerp_(param.detach().double(), 1 - DECAY)
        if step == SAVE_AT:
            saved = {n: s.clone() for n, s in shadows.items()}
    return saved, shadows


def test_the_model_has_about_100k_parameters():
    assert 60_000 < sum(p.numel() for p in net().parameters()) < 120_000


def test_fsdp2_averages_equal_a_one_process_run(ranks2):
    """20 steps on 2 ranks: the gathered EMA is the EMA of a 1-process run on the same
    micro-batches with averaged losses, within 1e-5, on every rank (an evaluation at step 15
    left the root unsharded before an update: followed, not mistaken for new parameters)."""
    saved, final = one_process_run(2)
    for seen in of(ranks2, train_fsdp2):
        close(seen["saved"], saved)
        close(seen["averages"], final)
        # the averages moved off the weights, or equality with them would pass as well
        assert any((seen["averages"][n] - p).abs().max() > 1e-3 for n, p in seen["params"].items())


def test_shadows_have_their_parameters_placements(ranks2, ranks4):
    for seen in of(ranks2, train_fsdp2) + of(ranks4, hsdp) + of(ranks4, tensor_parallel):
        for name, (param, shadow) in seen["placements"].items():
            assert param == shadow, name
    assert "Shard(dim=0)" in of(ranks2, train_fsdp2)[0]["placements"]["head.weight"][0]
    hsdp_placements = of(ranks4, hsdp)[0]["placements"]["head.weight"][0]
    assert hsdp_placements == "(Replicate(), Shard(dim=0))"
    tp = of(ranks4, tensor_parallel)[0]["placements"]
    assert "_StridedShard" in tp["blocks.0.q.weight"][0]
    assert tp["blocks.0.o.weight"][0] == "(Shard(dim=0), Shard(dim=1))"


def test_no_collective_runs_while_building_or_updating(ranks2, ranks4):
    for seen in of(ranks2, no_collectives):
        assert seen["built"] == [] and seen["first"] == [] and seen["second"] == []
        # the counter sees a gather, a barrier and a redistribution, or it proves nothing
        assert any("all_gather" in c for c in seen["control"]), seen["control"]
        assert "torch.distributed.barrier" in seen["control"]
        assert "c10d.barrier.default" in seen["control"]
        assert seen["to_local_calls"] == 0
    for seen in of(ranks2, ddp) + of(ranks4, hsdp) + of(ranks4, tensor_parallel):
        assert seen["calls"] == []


def test_each_rank_holds_its_shards_bytes(ranks2):
    """Shadow memory per rank is its parameters' local shards: half the full shadow on 2 ranks
    (every parameter here has an even number of rows)."""
    for seen in of(ranks2, no_collectives):
        assert seen["shadow_types"] == ["DTensor"]
        assert seen["shadow_bytes"] == seen["param_bytes"] == seen["full_bytes"] // 2


def test_ddp_unwraps_and_every_rank_holds_the_same_average(ranks2):
    first, second = of(ranks2, ddp)
    assert first["names"] == first["plain_names"]  # no "module." prefix
    close(first["averages"], second["averages"], tol=0)


def test_mixed_precision_keeps_fp32_shadows(ranks2):
    for seen in of(ranks2, mixed_precision):
        assert seen["dtypes"] == ["torch.float32"]
        close(seen["averages"], seen["follower"])
        assert seen["bf16_param_dtypes"] == ["torch.bfloat16"]
        assert seen["bf16_shadow_dtypes"] == ["torch.float32"]


def test_offloaded_shards_average_as_kept_ones(ranks2):
    for seen in of(ranks2, offload):
        assert seen["types"] == ["DTensor"] and not seen["pinned"]
        close(seen["offloaded"], seen["kept"], tol=0)


def test_stochastic_rounding_of_shards_draws_the_unsharded_bits(ranks2):
    """Sharded and plain bf16 EMAs with one seed hold the same bits: each rank rounds its shard
    with its elements' own random bits (with rank 0's, rank 1's rows would differ)."""
    for seen in of(ranks2, stochastic):
        for name, value in seen["sharded"].items():
            assert value.dtype == torch.bfloat16
            assert torch.equal(value.view(torch.int16), seen["plain"][name].view(torch.int16)), name


def test_functional_call_evaluates_the_averages_and_gives_the_shards_back(ranks2):
    for seen in of(ranks2, functional_call):
        torch.testing.assert_close(seen["averaged"], seen["reference"], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(seen["averaged"], seen["trained"], atol=1e-3)
        assert seen["same_shards"]
        assert torch.equal(seen["after"], seen["trained"])
        assert seen["buffers_kept"] and seen["shadows_kept"]


def test_a_replaced_local_shard_is_followed(ranks2):
    for seen in of(ranks2, replaced_shard):
        expected = seen["start"].lerp(torch.full_like(seen["start"], 3.0), 0.5)
        assert torch.equal(seen["after"], expected)


def test_plain_and_sharded_state_dicts_load_into_each_other(ranks2):
    for seen in of(ranks2, layouts):
        close(seen["sharded"], seen["expected"], tol=0)
        close(seen["back"], seen["expected"], tol=0)
        assert seen["steps"] == (5, 5)


def test_the_engine_knows_which_shards_the_optimizer_writes(ranks2):
    """Under ``stream="side"`` and ``offload``, tensors an optimizer does not own are copied first
    (the next forward writes them): FSDP2 parameters are owned, BatchNorm's buffers are not."""
    for seen in of(ranks2, layouts):
        assert seen["owned"] == {
            "0.weight": True,
            "0.bias": True,
            "1.weight": True,
            "1.bias": True,
            "1.running_mean": False,
            "1.running_var": False,
            "1.num_batches_tracked": False,
        }


def test_the_readme_block_runs_as_written(ranks2):
    """Resumed from its step-2 checkpoint after 3 steps; its export holds the averages."""
    from safetensors.torch import load_file

    for seen in of(ranks2, readme):
        assert seen["step"] == 2 and seen["evaluated"] == 1
    model = net()
    model.load_state_dict(load_file(of(ranks2, readme)[0]["export"]), strict=True)
    close(dict(model.named_parameters()), of(ranks2, readme)[0]["averages"], tol=0)


def test_export_full_loads_into_a_plain_model_strictly(ranks2):
    from safetensors.torch import load_file

    seen = of(ranks2, train_fsdp2)[0]
    model = net()
    model.load_state_dict(load_file(seen["export"]), strict=True)
    close(dict(model.named_parameters()), seen["averages"], tol=0)


def test_export_full_holds_one_full_tensor_at_a_time(ranks2):
    """Each rank gathers every tensor (one gather per parameter), and no gathered tensor is still
    alive when the next gather starts, on the writing rank or the other."""
    for seen in of(ranks2, train_fsdp2):
        assert seen["gathers"] == len(seen["averages"])
        assert seen["alive_at_gather"] == 0


def test_save_of_sharded_shadows_points_to_export_full(ranks2):
    for seen in of(ranks2, train_fsdp2):
        assert "polyak.distributed.export_full(ema, path) on every rank" in seen["save_error"]


def test_export_full_gathers_tensor_parallel_shards(ranks4):
    from safetensors.torch import load_file

    seen = of(ranks4, tensor_parallel)[0]
    model = net()
    model.load_state_dict(load_file(seen["export"]), strict=True)
    close(dict(model.named_parameters()), seen["averages"], tol=0)


def test_dcp_checkpoint_resumes_exactly(ranks2):
    """A fresh model and EMA loaded from the step-10 DCP checkpoint (decay 0.5 replaced by the
    checkpoint's) and trained on to step 20 hold the uninterrupted run's averages, bit for bit."""
    for seen in of(ranks2, train_fsdp2):
        assert seen["resumed_step"] == STEPS
        close(seen["resumed"], seen["averages"], tol=0)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_dcp_checkpoint_of_2_ranks_loads_on_1(ranks2):
    """The 2-rank checkpoint loads without a process group into a plain model's EMA (the keys are
    the sharded EMA's): the averages saved, bit for bit."""
    import torch.distributed.checkpoint as dcp

    seen = of(ranks2, train_fsdp2)[0]
    ema = polyak.EMA(net(), decay=DECAY)
    state = {"ema": ema.state_dict()}
    planner = polyak.distributed.load_planner()
    dcp.load(state, checkpoint_id=seen["checkpoint"], planner=planner, no_dist=True)
    ema.load_state_dict(state["ema"])
    assert ema.step == SAVE_AT
    close({n: ema.average(n) for n in ema.names()}, seen["saved"], tol=0)


def test_dcp_checkpoint_of_2_ranks_loads_on_4(ranks2, ranks4):
    saved = of(ranks2, train_fsdp2)[0]["saved"]
    for seen in of(ranks4, train_fsdp2_4):
        assert seen["loaded_step"] == SAVE_AT
        close(seen["loaded"], saved, tol=0)


def test_fsdp2_on_4_ranks_equals_the_gathered_fp32_ema(ranks4):
    for seen in of(ranks4, train_fsdp2_4) + of(ranks4, hsdp) + of(ranks4, tensor_parallel):
        close(seen["averages"], seen["follower"])


def test_hsdp_replicas_round_alike(ranks4):
    """Ranks 0 and 2 (and 1 and 3) hold replicas of one shard: stochastic rounding keeps them
    equal, bit for bit, while the two shards differ."""
    seen = [s["rounded_local"] for s in of(ranks4, hsdp)]
    for a, b in ((0, 2), (1, 3)):
        for name, value in seen[a].items():
            assert torch.equal(value.view(torch.int16), seen[b][name].view(torch.int16)), name


def test_tensor_parallel_shards_tile_their_full_tensors(ranks4):
    """Each distinct shard's place in its full tensor (``shard_start``): the blocks of the ranks
    holding distinct shards partition the tensor's elements, so their random bits differ."""
    runs = of(ranks4, tensor_parallel)
    for name in runs[0]["blocks"]:
        numel = runs[0]["blocks"][name][0]
        blocks = sorted({(start, n) for _, start, n in (r["blocks"][name] for r in runs)})
        covered = 0
        for start, n in blocks:
            assert start == covered, (name, blocks)
            covered += n
        assert covered == numel, (name, blocks)


class Unsafe:
    """Not an allowed type for ``torch.load(weights_only=True)``."""


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_load_planner_never_unpickles(tmp_path):
    """A DCP checkpoint whose non-tensor entry is an arbitrary object: DCP's default planner
    unpickles it, ``polyak.distributed.load_planner()`` refuses; plain data loads."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    dcp.save({"obj": Unsafe(), "step": 7, "t": torch.ones(2)}, checkpoint_id=tmp_path, no_dist=True)
    state = {"obj": None, "step": 0, "t": torch.zeros(2)}
    with pytest.raises(CheckpointException, match="Unsupported global: GLOBAL .*Unsafe"):
        dcp.load(
            state, checkpoint_id=tmp_path, planner=polyak.distributed.load_planner(), no_dist=True
        )
    state = {"step": 0, "t": torch.zeros(2)}
    dcp.load(state, checkpoint_id=tmp_path, planner=polyak.distributed.load_planner(), no_dist=True)
    assert state["step"] == 7 and torch.equal(state["t"], torch.ones(2))
    state = {"obj": None}
    dcp.load(state, checkpoint_id=tmp_path, no_dist=True)  # what the default planner does
    assert isinstance(state["obj"], Unsafe)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight
        self.norm = nn.BatchNorm1d(3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


@pytest.mark.filterwarnings("ignore::polyak.bn.StaleBatchNormWarning")
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_export_full_writes_what_save_writes(tmp_path, dtype):
    """Without a process group ``export_full`` is ``ema.save``: the same tensors under the same
    keys (tied weights once, the alias recorded), the same metadata; loadable with strict=True."""
    from safetensors import safe_open

    torch.manual_seed(0)
    model = Tied()
    ema = polyak.EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.norm.running_mean.add_(2.0)
    ema.update()
    polyak.distributed.export_full(ema, tmp_path / "full.safetensors", dtype)
    ema.save(tmp_path / "save.safetensors", dtype)
    with (
        safe_open(tmp_path / "full.safetensors", "pt") as full,
        safe_open(tmp_path / "save.safetensors", "pt") as saved,
    ):
        assert full.metadata() == saved.metadata()
        assert "polyak.aliases" in full.metadata()
        assert sorted(full.keys()) == sorted(saved.keys())
        for key in saved.keys():  # noqa: SIM118 (not a dict)
            assert torch.equal(full.get_tensor(key), saved.get_tensor(key)), key
            assert full.get_tensor(key).dtype == saved.get_tensor(key).dtype
    loaded = polyak.io.load_averaged(Tied(), tmp_path / "full.safetensors", strict=True)
    assert loaded.head.weight is loaded.embed.weight
    expected = ema.average("embed.weight").to(dtype or torch.float32)
    assert torch.equal(loaded.embed.weight.to(expected.dtype), expected)


def test_export_full_refuses_a_dtype_safetensors_cannot_name(tmp_path):
    model = nn.Linear(2, 2)
    model.register_buffer("phase", torch.zeros(2, dtype=torch.complex128))  # copied, not averaged
    ema = polyak.EMA(model, decay=0.5)
    with pytest.raises(TypeError, match="'phase'.* dtype torch.complex128 has no safetensors name"):
        polyak.distributed.export_full(ema, tmp_path / "z.safetensors")
    assert not (tmp_path / "z.safetensors").exists()


# ====================================================================== one GPU, NCCL


def _nccl_worker(rank: int, tmp: str) -> None:
    """One NCCL rank on one GPU: FSDP2 training with an inline (auto kernel: Triton where it is
    installed), a side-stream and an offloaded EMA, beside the fp32 EMA of the parameters."""
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp}/init", rank=rank, world_size=1)
    try:
        model = shard(net().cuda())
        inline = polyak.EMA(model, decay=DECAY)
        side = polyak.EMA(model, decay=DECAY, stream="side")
        offloaded = polyak.EMA(model, decay=DECAY, offload="cpu")
        follower = Follower(model)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        calls = []
        for step in range(1, 4):
            tokens, targets = batch(step, rank)
            train_step(model, opt, (tokens.cuda(), targets.cuda()))
            with counting() as seen:
                for ema in (inline, side, offloaded):
                    ema.update()
            calls += seen.calls
            follower.update()
        tokens = batch(99, 0)[0].cuda()
        with torch.no_grad(), inline.swapped():
            swapped = model(tokens)
        with torch.no_grad():
            averaged = inline.functional_call(tokens)
        polyak.distributed.export_full(offloaded, f"{tmp}/ema.safetensors")

        def host(ema: polyak.EMA) -> dict[str, torch.Tensor]:  # one rank: the shard is the tensor
            return {n: ema.average(n).to_local().cpu().clone() for n in ema.names()}

        out = {
            "kernel": inline.kernel,
            "calls": calls,
            "inline": host(inline),
            "side": host(side),
            "offloaded": host(offloaded),
            "follower": {n: t.cpu() for n, t in follower.shadows.items()},
            "pinned": all(offloaded.average(n).to_local().is_pinned() for n in offloaded.names()),
            "snapshots": (len(side._engine.snap_src), len(offloaded._engine.snap_src)),
            "swapped": swapped.cpu(),
            "functional": averaged.cpu(),
        }
        torch.save(out, f"{tmp}/out.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.distributed.is_nccl_available()),
    reason="needs a CUDA device and NCCL (GPU machine)",
)
def test_nccl_smoke_on_one_gpu(tmp_path):
    """FSDP2 on one GPU with NCCL: the inline, side-stream and offloaded (pinned) EMAs equal the
    fp32 EMA of the parameters; no collective per update; the side stream and offload copy no
    parameter first (the optimizer alone writes their shards); swapped(), functional_call() and
    export_full agree."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    mp.spawn(_nccl_worker, args=(str(tmp_path),), nprocs=1, join=True)
    seen = torch.load(tmp_path / "out.pt", weights_only=True)
    assert seen["calls"] == []
    assert seen["kernel"] in ("triton", "foreach")  # triton where it is installed
    for name in ("inline", "side", "offloaded"):
        close(seen[name], seen["follower"])
    assert seen["pinned"]
    assert seen["snapshots"] == (0, 0)
    torch.testing.assert_close(seen["functional"], seen["swapped"], rtol=1e-5, atol=1e-5)
    model = net()
    model.load_state_dict(load_file(tmp_path / "ema.safetensors"), strict=True)
    close(dict(model.named_parameters()), seen["offloaded"], tol=0)
    reference = net()
    reference.load_state_dict(seen["inline"])
    with torch.no_grad():
        expected = reference(batch(99, 0)[0])
    torch.testing.assert_close(seen["swapped"], expected, rtol=1e-4, atol=1e-4)
