"""polyak.compat.timm against timm 1.0.31's model_ema.py (loaded by path: timm is not imported)."""

from __future__ import annotations

import io

import pytest
import torch

from polyak.compat.timm import ModelEmaV2, ModelEmaV3
from tests.compat._peers import STEPS, TOL, load_timm_model_ema, make_model, max_diff, train


@pytest.fixture(scope="module")
def timm_ema():
    return load_timm_model_ema()


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


V3_SETTINGS = [
    {"decay": 0.99},
    {"decay": 0.995, "use_warmup": True, "update_after_step": 7, "min_decay": 0.6},
    {"decay": 0.99, "use_warmup": True, "warmup_gamma": 3.0, "warmup_power": 0.75},
    {"decay": 0.98, "exclude_buffers": True, "foreach": False},
]


def _run(timm_ema, name, settings, steps=STEPS, with_step=True):
    peer_model, shim_model = make_model(), make_model()
    peer = getattr(timm_ema, name)(peer_model, **settings)
    shim = {"ModelEmaV2": ModelEmaV2, "ModelEmaV3": ModelEmaV3}[name](shim_model, **settings)

    def hook(ema, model):
        if name == "ModelEmaV3" and with_step:
            return lambda step: ema.update(model, step=step)
        return lambda step: ema.update(model)

    train([peer_model, shim_model], [hook(peer, peer_model), hook(shim, shim_model)], steps)
    return peer_model, peer, shim_model, shim


@pytest.mark.parametrize("settings", V3_SETTINGS)
def test_v3_training_run_gives_timms_averages(timm_ema, settings):
    _, peer, shim_model, shim = _run(timm_ema, "ModelEmaV3", settings)
    assert max_diff(peer.module.state_dict(), shim.module.state_dict()) < TOL
    # integer buffers are copied by both
    assert torch.equal(
        peer.module.state_dict()["1.num_batches_tracked"],
        shim.module.state_dict()["1.num_batches_tracked"],
    )
    assert max_diff(shim_model.state_dict(), shim.module.state_dict()) > 1e-3  # not a copy


def test_v2_training_run_gives_timms_averages(timm_ema):
    _, peer, shim_model, shim = _run(timm_ema, "ModelEmaV2", {"decay": 0.98})
    sd_peer, sd_shim = peer.module.state_dict(), shim.module.state_dict()
    assert max_diff(sd_peer, sd_shim) < TOL
    assert max_diff(shim_model.state_dict(), sd_shim) > 1e-3
    # the documented difference: V2 truncates decay * e + (1 - decay) * m for integer buffers
    assert sd_shim["1.num_batches_tracked"].item() == STEPS
    assert sd_peer["1.num_batches_tracked"].item() < STEPS


def test_v3_get_decay_is_timms(timm_ema):
    for settings in V3_SETTINGS:
        peer = timm_ema.ModelEmaV3(make_model(), **settings)
        shim = ModelEmaV3(make_model(), **settings)
        for step in [None, 0, 1, 2, 7, 8, 9, 10, 100, 10**6]:
            assert shim.get_decay(step) == pytest.approx(peer.get_decay(step), rel=0, abs=1e-15)


@pytest.mark.parametrize("exclude_buffers", [False, True])
def test_apply_update_paths_and_set_are_timms(timm_ema, exclude_buffers):
    """apply_update_ / apply_update_no_buffers_ on an EMA configured the other way round, and
    set(), give timm's numbers (the shim averages or copies the buffers by hand there)."""
    peer_model, shim_model = make_model(), make_model()
    peer = timm_ema.ModelEmaV3(peer_model, exclude_buffers=exclude_buffers)
    shim = ModelEmaV3(shim_model, exclude_buffers=exclude_buffers)

    @torch.no_grad()  # as timm's update() runs them
    def alternate(ema, model, step):
        if step % 2:
            ema.apply_update_(model, 0.7)
        else:
            ema.apply_update_no_buffers_(model, 0.6)

    train(
        [peer_model, shim_model],
        [lambda s: alternate(peer, peer_model, s), lambda s: alternate(shim, shim_model, s)],
        steps=9,
    )
    assert max_diff(peer.module.state_dict(), shim.module.state_dict()) < TOL
    peer.set(peer_model)
    shim.set(shim_model)
    assert max_diff(peer.module.state_dict(), shim.module.state_dict()) < TOL
    assert max_diff(shim_model.state_dict(), shim.module.state_dict()) == 0.0


@pytest.mark.parametrize("name", ["ModelEmaV2", "ModelEmaV3"])
def test_checkpoints_load_both_ways(timm_ema, name):
    """timm's state_dict_ema (the .module's state dict) and the wrapper's own state dict."""
    settings = {"decay": 0.99}
    peer_model, peer, shim_model, shim = _run(timm_ema, name, settings, steps=50)
    shim_model.load_state_dict(peer_model.state_dict())
    # timm -> shim through the .module (how timm's load_checkpoint(model_ema.module, ...) works)
    fresh = type(shim)(shim_model, **settings)
    fresh.module.load_state_dict(_roundtrip(peer.module.state_dict()))
    assert max_diff(peer.module.state_dict(), fresh.module.state_dict()) == 0.0
    # shim -> timm through the wrapper's state dict ("module." keys)
    back = getattr(timm_ema, name)(make_model(seed=3), **settings)
    back.load_state_dict(_roundtrip(fresh.state_dict()))
    peer_model2 = make_model(seed=3)
    peer_model2.load_state_dict(peer_model.state_dict())
    train(
        [peer_model, shim_model, peer_model2],
        [
            lambda s: peer.update(peer_model),
            lambda s: fresh.update(shim_model),
            lambda s: back.update(peer_model2),
        ],
        steps=30,
    )
    assert max_diff(peer.module.state_dict(), fresh.module.state_dict()) < TOL
    assert max_diff(peer.module.state_dict(), back.module.state_dict()) < TOL


def test_module_holds_the_averages_and_forward_runs_it():
    model = make_model()
    ema = ModelEmaV3(model, decay=0.9)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    assert ema.module[0].weight.data_ptr() == ema._mirror.ema.average("0.weight").data_ptr()
    x = torch.randn(4, 6)
    assert torch.equal(ema(x), ema.module(x))
    assert not ema.module.training


def test_bf16_model_gets_fp32_averages_and_a_bf16_module():
    """V2 on a bf16 model: timm's bf16 EMA stalls; here the averages are fp32 while .module
    stays bf16 (so it runs on bf16 inputs), refreshed before its forward and state dict."""
    model = torch.nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ModelEmaV2(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(2.0)
    for _ in range(300):
        ema.update(model)
    average = ema._mirror.ema.average("weight")
    assert average.dtype == torch.float32
    assert abs(average[0, 0].item() - (2 - 0.999**300)) < 1e-5
    assert ema.module.weight.dtype == torch.bfloat16
    assert ema.module.weight[0, 0].item() == pytest.approx(2 - 0.999**300, abs=1e-2)
    assert ema(torch.ones(1, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
    # a state dict loaded into .module is written back into the averages
    ema.module.load_state_dict({"weight": torch.full((4, 4), 3.0, dtype=torch.bfloat16)})
    assert average[0, 0].item() == 3.0


def test_moving_the_ema_keeps_its_averages():
    model = make_model()
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.to(torch.float64)
    model.double()
    ema.update(model)  # decay 0.5 on fp64 averages, kept from before the cast
    expected = 0.5 * before["0.weight"].double() + 0.5 * model[0].weight.detach()
    torch.testing.assert_close(ema.module[0].weight.detach(), expected)


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="min_decay must not exceed max_decay"):
        ModelEmaV3(make_model(), decay=0.9, min_decay=0.95)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\], got decay=1.5"):
        ModelEmaV2(make_model(), decay=1.5)
