"""polyak.compat.torch_ema against torch_ema 0.3 itself (a test dependency)."""

from __future__ import annotations

import io

import pytest
import torch
import torch_ema
from torch import nn

from polyak.compat.torch_ema import ExponentialMovingAverage
from tests.compat._peers import STEPS, TOL, make_model, train


def _save_load(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _run(use_num_updates: bool, decay: float = 0.99, steps: int = STEPS):
    peer_model, shim_model = make_model(), make_model()
    peer = torch_ema.ExponentialMovingAverage(peer_model.parameters(), decay, use_num_updates)
    shim = ExponentialMovingAverage(shim_model.parameters(), decay, use_num_updates)
    train([peer_model, shim_model], [lambda s: peer.update(), lambda s: shim.update()], steps)
    return peer_model, peer, shim_model, shim


def _diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("use_num_updates", [True, False])
def test_training_run_gives_torch_emas_averages(use_num_updates):
    peer_model, peer, shim_model, shim = _run(use_num_updates)
    assert shim.num_updates == peer.num_updates == (STEPS if use_num_updates else None)
    assert _diff(peer.shadow_params, shim.shadow_params) < TOL
    # the averages moved away from the weights: the comparison is not between two copies
    assert _diff(list(shim_model.parameters()), shim.shadow_params) > 1e-3
    with peer.average_parameters(), shim.average_parameters():
        assert _diff(list(peer_model.parameters()), list(shim_model.parameters())) < TOL
    assert _diff(list(peer_model.parameters()), list(shim_model.parameters())) == 0.0


def test_warmup_is_tfs_num_updates_rule():
    """After one update from weights w0 to w1 the shadow is d1 w0 + (1 - d1) w1, d1 = 2/11."""
    w = torch.zeros(3)
    shim = ExponentialMovingAverage([w], decay=0.999)
    w.add_(1.0)
    shim.update()
    torch.testing.assert_close(shim.shadow_params[0], torch.full((3,), 9 / 11), rtol=0, atol=1e-7)


def test_checkpoint_from_torch_ema_loads_and_resumes():
    peer_model, peer, shim_model, _shim = _run(True, steps=60)
    shim_model.load_state_dict(peer_model.state_dict())
    peer.store()  # collected_params travel in the state dict too
    resumed = ExponentialMovingAverage(shim_model.parameters(), 0.5)
    resumed.load_state_dict(_save_load(peer.state_dict()))
    assert resumed.decay == 0.99 and resumed.num_updates == 60
    assert _diff(peer.shadow_params, resumed.shadow_params) == 0.0
    train([peer_model, shim_model], [lambda s: peer.update(), lambda s: resumed.update()], 40)
    assert _diff(peer.shadow_params, resumed.shadow_params) < TOL
    resumed.restore()
    peer.restore()
    assert _diff(list(peer_model.parameters()), list(shim_model.parameters())) == 0.0


def test_checkpoint_from_the_shim_loads_into_torch_ema():
    peer_model, _peer, shim_model, shim = _run(True, steps=60)
    peer_model.load_state_dict(shim_model.state_dict())
    other = torch_ema.ExponentialMovingAverage(peer_model.parameters(), 0.5)
    other.load_state_dict(_save_load(shim.state_dict()))
    assert other.num_updates == 60 and other.collected_params is None
    train([peer_model, shim_model], [lambda s: other.update(), lambda s: shim.update()], 40)
    assert _diff(other.shadow_params, shim.shadow_params) < TOL


def test_frozen_parameters_and_other_parameter_lists_as_torch_ema():
    """torch_ema averages every tensor it is given (frozen too), and update(parameters=...)
    averages the tensors passed for that call only."""
    a, b = torch.zeros(4, requires_grad=False), torch.zeros(4)
    a2, b2 = torch.zeros(4, requires_grad=False), torch.zeros(4)
    pb, pb2 = nn.Parameter(b, requires_grad=False), nn.Parameter(b2, requires_grad=False)
    peer = torch_ema.ExponentialMovingAverage([a, pb], 0.9)  # holds weak references only
    shim = ExponentialMovingAverage([a2, pb2], 0.9)
    other, other2 = [torch.ones(4), torch.ones(4)], [torch.ones(4), torch.ones(4)]
    for step in range(5):
        for t in (a, b, a2, b2):
            t.add_(step)
        peer.update()
        shim.update()
        peer.update(other)
        shim.update(other2)
    assert _diff(peer.shadow_params, shim.shadow_params) < TOL
    target, target2 = [torch.zeros(4), torch.zeros(4)], [torch.zeros(4), torch.zeros(4)]
    peer.copy_to(target)
    shim.copy_to(target2)
    assert _diff(target, target2) < TOL


def test_bf16_shadows_are_fp32_and_do_not_stall():
    """A weight stepping from 1 to 2: each update moves the shadow by 0.001, below half a bf16
    ulp at 1 (2**-8), so torch_ema's bf16 shadow never leaves 1; the shim's fp32 shadow follows
    the closed form 2 - 0.999**n."""
    steps, decay = 300, 0.999
    w_peer, w_shim = torch.ones(8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.bfloat16)
    peer = torch_ema.ExponentialMovingAverage([w_peer], decay, use_num_updates=False)
    shim = ExponentialMovingAverage([w_shim], decay, use_num_updates=False)
    w_peer.fill_(2.0)
    w_shim.fill_(2.0)
    for _ in range(steps):
        peer.update()
        shim.update()
    expected = 2 - decay**steps  # 1.2593
    assert shim.shadow_params[0].dtype == torch.float32
    assert abs(shim.shadow_params[0][0].item() - expected) < 1e-5
    assert peer.shadow_params[0][0].item() == 1.0  # stalled


def test_errors_name_the_problem():
    w = torch.zeros(2)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\], got decay=1.5"):
        ExponentialMovingAverage([w], 1.5)
    shim = ExponentialMovingAverage([w], 0.9)
    with pytest.raises(ValueError, match=r"\(2\) is different from .* \(1\)"):
        shim.update([w, w])
    with pytest.raises(RuntimeError, match="no `store\\(\\)`ed weights"):
        shim.restore()
    bad = {"decay": 0.9, "num_updates": 0, "shadow_params": [torch.zeros(3)]}
    with pytest.raises(ValueError, match=r"shapes: \['0: saved \(3,\) vs parameter \(2,\)'\]"):
        shim.load_state_dict(bad)
    with pytest.raises(ValueError, match="missing keys \\['shadow_params'\\]"):
        shim.load_state_dict({"decay": 0.9, "num_updates": 0})
    assert shim.shadow_params[0].shape == (2,)  # nothing changed


def test_to_dtype_keeps_the_averages():
    w = torch.zeros(3)
    shim = ExponentialMovingAverage([w], 0.9, use_num_updates=False)
    w.fill_(1.0)
    shim.update()
    shim.to(dtype=torch.float64)
    assert shim.shadow_params[0].dtype == torch.float64
    shim.update()
    torch.testing.assert_close(
        shim.shadow_params[0], torch.full((3,), 1 - 0.81, dtype=torch.float64)
    )


@pytest.mark.parametrize("use_num_updates", [True, False])
def test_a_decay_set_between_updates_is_read_at_the_next(use_num_updates):
    """torch_ema reads ``self.decay`` at every update; the shim builds its warm-up schedule once
    per decay, and again when the attribute changes (closed form: weights 0 then 1)."""
    w = torch.zeros(3)
    shim = ExponentialMovingAverage([w], 0.9, use_num_updates=use_num_updates)
    w.fill_(1.0)
    expected = 0.0
    for step, decay in enumerate((0.9, 0.9, 0.5, 0.5, 0.99), start=1):
        shim.decay = decay
        shim.update()
        d = min(decay, (1 + step) / (10 + step)) if use_num_updates else decay
        expected = d * expected + (1 - d)
        torch.testing.assert_close(shim.shadow_params[0], torch.full((3,), expected))
    shim.decay = 1.5  # a new value is checked again, not served from the last schedule
    with pytest.raises(ValueError, match="1.5"):
        shim.update()
