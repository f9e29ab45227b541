"""polyak.compat.ema_pytorch against ema-pytorch 0.8.3 itself (a test dependency)."""

from __future__ import annotations

import io
import math

import ema_pytorch
import pytest
import torch

from polyak.compat.ema_pytorch import EMA
from tests.compat._peers import STEPS, TOL, make_model, max_diff, train

SETTINGS = [
    {"beta": 0.99, "update_every": 1, "update_after_step": 10},
    {
        "beta": 0.995,
        "update_every": 1,
        "update_after_step": 0,
        "power": 0.75,
        "inv_gamma": 2.0,
        "min_value": 0.3,
    },
    {
        "beta": 0.99,
        "update_every": 1,
        "update_after_step": 20,
        "ignore_names": {"3.bias"},
        "ignore_startswith_names": {"1."},
        "param_or_buffer_names_no_ema": {"0.bias"},
    },
    {
        "beta": 0.99,
        "update_every": 1,
        "update_after_step": 5,
        "update_model_with_ema_every": 50,
        "update_model_with_ema_beta": 0.5,
        "include_online_model": False,
    },
    {"beta": 1.0, "update_every": 1, "update_after_step": 30},
]


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _run(settings, steps=STEPS):
    peer_model, shim_model = make_model(), make_model()
    peer, shim = ema_pytorch.EMA(peer_model, **settings), EMA(shim_model, **settings)
    history = train(
        [peer_model, shim_model], [lambda s: peer.update(), lambda s: shim.update()], steps
    )
    return peer_model, peer, shim_model, shim, history


@pytest.mark.parametrize("settings", SETTINGS)
def test_training_run_gives_ema_pytorchs_averages(settings):
    peer_model, peer, shim_model, shim, _ = _run(settings)
    assert sorted(peer.state_dict()) == sorted(shim.state_dict())
    # integer buffers: ema-pytorch never updates them, the shim copies them (documented)
    assert max_diff(peer.state_dict(), shim.state_dict(), skip="num_batches") < TOL
    assert max_diff(peer_model.state_dict(), shim_model.state_dict(), skip="num_batches") < TOL
    if settings["beta"] < 1:
        assert max_diff(shim.ema_model.state_dict(), shim_model.state_dict()) > 1e-3
    assert shim.step.item() == peer.step.item() == STEPS
    assert shim.get_current_decay() == pytest.approx(peer.get_current_decay(), abs=1e-6)


def _reference(history, settings):
    """The documented rule in float64: copy at call 1, then at call c (n = c - 1 earlier calls)
    with n % k == 0, s = D s + (1 - D) w with D the product of d(i) over i = n-k+1 .. n."""
    k, after = settings["update_every"], settings["update_after_step"]

    def d(i):
        e = i - after
        if e <= 0:
            return 0.0
        value = 1 - (1 + e / settings.get("inv_gamma", 1.0)) ** -settings.get("power", 2 / 3)
        return min(max(value, settings.get("min_value", 0.0)), settings["beta"])

    names = [n for n in history[0] if history[0][n].is_floating_point()]
    s = {n: history[0][n].double() for n in names}
    for n in range(1, len(history)):
        if n % k == 0:
            big_d = math.prod(d(i) for i in range(n - k + 1, n + 1))
            s = {m: big_d * s[m] + (1 - big_d) * history[n][m].double() for m in names}
    return s


@pytest.mark.parametrize("k", [1, 10, 7])
def test_update_every_compounds_the_decay(k):
    """With update_every=k the shim follows the documented rule (float64 reference); at k > 1
    that is not ema-pytorch's average, which applies a per-step decay once per k calls."""
    settings = {"beta": 0.99, "update_every": k, "update_after_step": 12}
    _, peer, _, shim, history = _run(settings)
    reference = _reference(history, settings)
    averages = shim.ema_model.state_dict()
    assert max((averages[n].double() - reference[n]).abs().max().item() for n in reference) < 1e-5
    gap = max_diff(peer.ema_model.state_dict(), averages, skip="num_batches")
    assert gap < TOL if k == 1 else gap > 1e-3


def test_checkpoints_load_both_ways():
    settings = {"beta": 0.99, "update_every": 1, "update_after_step": 10}
    peer_model, peer, shim_model, shim, _ = _run(settings, steps=60)
    # ema-pytorch -> shim: the whole state dict (online model, averages, initted, step)
    model2 = make_model(seed=5)
    resumed = EMA(model2, **settings)
    resumed.load_state_dict(_roundtrip(peer.state_dict()))
    assert resumed.step.item() == 60 and resumed._mirror.ema.step == 59
    assert max_diff(model2.state_dict(), peer_model.state_dict()) == 0.0
    # shim -> ema-pytorch
    model3 = make_model(seed=6)
    back = ema_pytorch.EMA(model3, **settings)
    back.load_state_dict(_roundtrip(shim.state_dict()))
    train(
        [peer_model, model2, shim_model, model3],
        [
            lambda s: peer.update(),
            lambda s: resumed.update(),
            lambda s: shim.update(),
            lambda s: back.update(),
        ],
        steps=40,
    )
    skip = "num_batches"
    assert max_diff(peer.ema_model.state_dict(), resumed.ema_model.state_dict(), skip) < TOL
    assert max_diff(shim.ema_model.state_dict(), back.ema_model.state_dict(), skip) < TOL


def test_copies_forward_and_hooks():
    model = make_model()
    ema = EMA(
        model, beta=0.9, update_after_step=0, update_every=1, forward_method_names=("extra_repr",)
    )
    handle = ema.add_to_optimizer_post_step_hook(opt := torch.optim.SGD(model.parameters(), 0.1))
    model(torch.randn(8, 6)).sum().backward()
    opt.step()  # update() by the hook: the first call copies
    assert ema.step.item() == 1 and ema.initted.item()
    handle.remove()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    assert ema.ema_model[0].weight.data_ptr() == ema._mirror.ema.average("0.weight").data_ptr()
    x = torch.randn(4, 6)
    ema.ema_model.train()
    out = ema.forward_eval(x)
    assert ema.ema_model.training  # restored
    ema.eval()
    torch.testing.assert_close(out, ema(x))
    assert ema.extra_repr() == ema.ema_model.extra_repr()
    ema.copy_params_from_ema_to_model()
    assert max_diff(model.state_dict(), ema.ema_model.state_dict()) == 0.0


def test_lazy_init_and_errors():
    model = make_model()
    ema = EMA(model, lazy_init_ema=True, update_after_step=0, update_every=1)
    assert ema.ema_model is None
    ema.update()
    assert max_diff(ema.ema_model.state_dict(), model.state_dict()) == 0.0
    with pytest.raises(TypeError, match=r"averages an nn.Module, got dict .*polyak.EMA"):
        EMA({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="update_every must be a positive int, got update_every=0"):
        EMA(make_model(), update_every=0)
    with pytest.raises(ValueError, match="min_decay must not exceed max_decay"):
        EMA(make_model(), beta=0.5, min_value=0.9)


def test_attributes_set_between_updates_are_read_at_the_next():
    """ema-pytorch reads beta, min_value, inv_gamma and power at every update; the shim builds
    its warm-up once and again when one of them changes. Weights 0, then 1: closed form."""
    model = torch.nn.Linear(2, 1)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    ema = EMA(model, beta=0.9, min_value=0.9, update_after_step=0, update_every=1)
    ema.update()  # copies the zeros
    with torch.no_grad():
        model.weight.fill_(1.0)
    expected = 0.0
    for beta in (0.9, 0.9, 0.5, 0.99):
        ema.beta = ema.min_value = beta
        ema.update()
        expected = beta * expected + (1 - beta)
        assert ema.ema_model.weight[0, 0].item() == pytest.approx(expected, abs=1e-7)
    ema.min_value = 0.0
    ema.power = 1.0  # inverse_gamma at epoch n - 0 = 5: 1 - 1 / (1 + 5) = 5/6 < beta
    ema.update()
    expected = 5 / 6 * expected + 1 / 6
    assert ema.ema_model.weight[0, 0].item() == pytest.approx(expected, abs=1e-7)
