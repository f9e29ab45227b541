"""polyak.attach / ema.attach: one EMA update per real optimizer step (polyak.integrations.hook).

References are independent of the hook: a float64 EMA of the weights recorded after each real
step, the same loop with ``ema.update()`` written by hand, and a real ``torch.amp.GradScaler`` on
the CPU (torch >= 2.3 implements its inf check there) deciding which steps are real.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import polyak
from polyak.integrations.hook import Attachment

DECAY = 0.9


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 4, generator=gen) for _ in range(n)]


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def shadows(ema: polyak.EMA) -> dict[str, torch.Tensor]:
    return {n: ema.average(n).clone() for n in ema.names()}


def reference_ema(trajectory: list[dict[str, torch.Tensor]], decay: float) -> dict:
    """float64 EMA: starts at trajectory[0] (the weights at construction), one lerp per later entry."""
    avg = {n: t.double() for n, t in trajectory[0].items()}
    for w in trajectory[1:]:
        avg = {n: decay * avg[n] + (1 - decay) * w[n].double() for n in avg}
    return avg


# ---------------------------------------------------------------- one optimizer


def test_gradient_accumulation_updates_once_per_step():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    ema = polyak.EMA(model, DECAY)
    handle = polyak.attach(opt, ema)
    assert isinstance(handle, Attachment)
    trajectory, steps = [weights(model)], 0
    for i, x in enumerate(batches(24)):  # 4 micro-batches per optimizer step
        (loss_of(model, x) / 4).backward()
        if i % 4 == 3:
            opt.step()
            opt.zero_grad()
            steps += 1
            trajectory.append(weights(model))
        assert ema.step == steps  # micro-batches and backward() never update
    assert steps == 6 and ema.step == 6 and ema.num_averages == 6
    ref = reference_ema(trajectory, DECAY)
    for name, avg in shadows(ema).items():
        torch.testing.assert_close(avg.double(), ref[name], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(shadows(ema)["0.weight"], model[0].weight)  # not the weights


def test_hook_matches_update_after_step_bit_for_bit():
    """The hook runs after the optimizer's own update: exactly `opt.step(); ema.update()`."""
    runs = []
    for hooked in (True, False):
        model = net()
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        ema = polyak.EMA(model, polyak.schedules.tf_warmup(0.99))
        if hooked:
            polyak.attach(opt, ema)
        for x in batches(7):
            opt.zero_grad()
            loss_of(model, x).backward()
            opt.step()
            if not hooked:
                ema.update()
        runs.append(shadows(ema))
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def _scaled_step(model, opt, scaler, x, poison: bool) -> None:
    opt.zero_grad()
    loss = loss_of(model, x)
    if poison:
        loss = loss * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("fused", [False, True], ids=["skips-on-host", "fused-skips-on-device"])
def test_gradscaler_skipped_step_leaves_shadows_and_step_untouched(fused):
    """A real CPU GradScaler: inf gradients make it skip the step (non-fused: it never calls
    step(); fused Adam: step() runs and skips on the device, with optimizer.found_inf set)."""
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=0.05, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    ema = polyak.EMA(model, DECAY)
    polyak.attach(opt, ema)
    xs = batches(5)
    for x in xs[:2]:
        _scaled_step(model, opt, scaler, x, poison=False)
    assert ema.step == 2
    before_w, before_s, scale = weights(model), shadows(ema), scaler.get_scale()

    _scaled_step(model, opt, scaler, xs[2], poison=True)

    assert scaler.get_scale() == scale / 2  # the scaler did see the inf and skip ...
    for name, w in weights(model).items():
        assert torch.equal(w, before_w[name])  # ... so the weights did not move
    assert ema.step == 2 and ema.num_averages == 2
    for name, s in shadows(ema).items():
        assert torch.equal(s, before_s[name]), name  # bit for bit
    for x in xs[3:]:
        _scaled_step(model, opt, scaler, x, poison=False)
    assert ema.step == 4  # real steps count again


def test_non_fused_hook_never_reads_tensors_on_the_host(no_host_reads):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = polyak.EMA(model, DECAY)
    polyak.attach(opt, ema)
    for x in batches(2):
        opt.zero_grad()
        loss_of(model, x).backward()
        with no_host_reads():  # SGD's step, then the hook and the update it runs
            opt.step()
    assert ema.step == 2


# ---------------------------------------------------------------- several optimizers


def gan(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    return nn.Linear(3, 4), nn.Linear(4, 1)


def gan_round(gen, disc, opt_g, opt_d, z, d_steps: int = 1) -> None:
    for _ in range(d_steps):
        opt_d.zero_grad()
        disc(gen(z).detach()).mean().backward()
        opt_d.step()
    opt_g.zero_grad()
    (-disc(gen(z)).mean()).backward()
    opt_g.step()


def test_each_ema_follows_its_own_optimizer():
    gen, disc = gan()
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
    ema_g, ema_d = polyak.EMA(gen, DECAY), polyak.EMA(disc, DECAY)
    polyak.attach(opt_g, ema_g)
    polyak.attach(opt_d, ema_d)
    z = torch.randn(5, 3)
    for _ in range(3):
        gan_round(gen, disc, opt_g, opt_d, z, d_steps=2)  # WGAN-style: 2 critic steps per round
    assert (ema_g.step, ema_d.step) == (3, 6)


def test_one_ema_attached_to_two_optimizers_updates_on_each():
    gen, disc = gan()
    model = nn.ModuleDict({"gen": gen, "disc": disc})
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
    ema = polyak.EMA(model, DECAY)
    polyak.attach(opt_g, ema)
    polyak.attach(opt_d, ema)
    z = torch.randn(5, 3)
    for _ in range(3):
        gan_round(gen, disc, opt_g, opt_d, z)
    assert ema.step == 6


def test_a_list_of_optimizers_updates_once_per_round_with_the_round_complete():
    """attach([opt_d, opt_g], ema): one update per round, after both halves moved; it equals a
    loop that calls ema.update() once after both steps, bit for bit."""
    runs = []
    for hooked in (True, False):
        gen, disc = gan()
        model = nn.ModuleDict({"gen": gen, "disc": disc})
        opt_g = torch.optim.SGD(gen.parameters(), lr=0.1)
        opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
        ema = polyak.EMA(model, DECAY)
        if hooked:
            polyak.attach([opt_d, opt_g], ema)
        z = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
        for _ in range(4):
            gan_round(gen, disc, opt_g, opt_d, z, d_steps=2)  # d steps twice: counts once
            if not hooked:
                ema.update()
        assert ema.step == 4
        runs.append(shadows(ema))
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_a_round_waits_for_an_optimizer_whose_step_was_skipped():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 3), nn.Linear(3, 1)
    model = nn.Sequential(a, b)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    ema = polyak.EMA(model, DECAY)
    polyak.attach([opt_a, opt_b], ema)
    x = torch.randn(4, 3)

    def iteration(poison_a: bool) -> None:
        opt_a.zero_grad()
        opt_b.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        if poison_a:
            a.weight.grad[0, 0] = float("nan")
        scaler.step(opt_a)  # the scaler checks each optimizer's own gradients
        scaler.step(opt_b)
        scaler.update()

    iteration(poison_a=False)
    assert ema.step == 1
    iteration(poison_a=True)  # b stepped, a was skipped: the round is not complete
    assert ema.step == 1
    iteration(poison_a=False)  # a steps: the round completes (b's second step counts once)
    assert ema.step == 2


# ---------------------------------------------------------------- the handle


def test_remove_detaches_and_a_context_manager_removes_on_exit():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = polyak.EMA(model, DECAY)

    def step() -> None:
        opt.zero_grad()
        loss_of(model, batches(1)[0]).backward()
        opt.step()

    handle = polyak.attach(opt, ema)
    step()
    handle.remove()
    handle.remove()  # idempotent
    assert handle.removed and "removed" in repr(handle)
    step()
    assert ema.step == 1
    with polyak.attach(opt, ema):  # attaching again after remove() is fine
        step()
    step()
    assert ema.step == 2


def test_attaching_one_ema_twice_to_one_optimizer_is_refused():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = polyak.EMA(model, DECAY)
    polyak.attach(opt, ema)
    with pytest.raises(ValueError, match=r"already attached to this SGD.*\.remove\(\)"):
        polyak.attach(opt, ema)
    with pytest.raises(ValueError, match="already attached"):
        polyak.attach([torch.optim.SGD(model.parameters(), lr=0.1), opt], ema)
    polyak.attach(opt, polyak.EMA(model, DECAY))  # another EMA on the same optimizer: fine


def test_bad_arguments_get_errors_that_say_what_and_how():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = polyak.EMA(model, DECAY)
    with pytest.raises(
        TypeError, match=r"optimizer first.*\(EMA, SGD\).*polyak.attach\(optimizer, ema\)"
    ):
        polyak.attach(ema, opt)
    with pytest.raises(TypeError, match=r"expects a torch.optim.Optimizer.*got 3 of type int"):
        polyak.attach(3, ema)
    with pytest.raises(TypeError, match=r"update\(\) method.*got 'ema' of type str"):
        polyak.attach(opt, "ema")
    with pytest.raises(ValueError, match="empty list of optimizers"):
        polyak.attach([], ema)
    with pytest.raises(ValueError, match="same optimizer twice"):
        polyak.attach([opt, opt], ema)
    assert ema.step == 0


def test_any_object_with_update_can_be_attached():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ph = polyak.posthoc.PowerEMA(model, (0.05, 0.1))
    polyak.attach(opt, ph)
    for x in batches(3):
        opt.zero_grad()
        loss_of(model, x).backward()
        opt.step()
    assert ph.step == 3


def test_a_deep_copied_ema_is_not_attached():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = polyak.EMA(model, DECAY)
    polyak.attach(opt, ema)
    twin = copy.deepcopy(ema)
    opt.zero_grad()
    loss_of(model, batches(1)[0]).backward()
    opt.step()
    assert (ema.step, twin.step) == (1, 0)


def test_import_polyak_never_imports_lightning():
    code = (
        "import sys, polyak, polyak.integrations, polyak.integrations.hook; polyak.attach; "
        "print([m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'lightning_fabric', 'pytorch_lightning', 'lightning_utilities', "
        "'transformers')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_readme_hook_example_runs():
    import re
    from pathlib import Path

    readme = Path(__file__).resolve().parents[2] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "polyak.attach(opt, ema)" in b]
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = polyak.EMA(model, DECAY)
    namespace = {
        "polyak": polyak,
        "model": model,
        "opt": opt,
        "ema": ema,
        "loader": [(x, torch.zeros(6, 2)) for x in batches(3)],
        "loss_fn": nn.functional.mse_loss,
    }
    exec(compile(block, str(readme), "exec"), namespace)
    assert ema.step == 3
    opt.step()  # the block's end removed the hook
    assert ema.step == 3
