"""The execution policies (polyak._kernels._engine): which class runs an update, and what it hands
the kernel. The CUDA paths (side stream, offload from CUDA) are in tests/test_ema_modes.py."""

from __future__ import annotations

import pytest
import torch

from polyak._kernels import _engine


class Recording:
    """An Update that records its calls (and lerps for real, so offload results can be checked)."""

    def __init__(self, shadows, sources):
        self.shadows, self.sources, self.calls = shadows, sources, []

    def lerp_(self, *args):
        self.calls.append(("lerp_", args))
        if len(args) == 1 or not bool(args[1]):
            torch._foreach_lerp_(self.shadows, self.sources, float(args[0]))

    def copy_(self):
        self.calls.append(("copy_", ()))
        if self.shadows:
            torch._foreach_copy_(self.shadows, self.sources)


def plan(policy):
    shadow, source = torch.zeros(3), torch.nn.Parameter(torch.ones(3))
    built = []

    def build(shadows, sources):
        built.append(Recording(shadows, sources))
        return built[-1]

    engine = _engine.Engine(build, build, ([shadow], [source]), ([], []), policy)
    return engine, shadow, built


@pytest.mark.parametrize(
    ("policy", "cls"), [("inline", _engine.Inline), ("offload", _engine.Offload)]
)
def test_each_policy_is_a_class_of_its_own(policy, cls):
    engine, _, _ = plan(policy)
    assert type(engine) is cls and engine.policy == policy


def test_unknown_policy_and_side_on_the_cpu_are_refused():
    with pytest.raises(ValueError, match="unknown execution policy 'sideways'"):
        plan("sideways")
    with pytest.raises(ValueError, match="stream='side' needs the tracked tensors on a CUDA"):
        plan("side")


@pytest.mark.parametrize("policy", ["inline", "offload"])
def test_weights_and_gate_reach_the_kernel(policy):
    """No gate: today's one-argument call (kernels without a gate keep working); a gate is passed
    on as given (CPU tensors are read where they are, offload included)."""
    engine, shadow, (avg, copy) = plan(policy)
    engine.run(0.25)
    engine.wait()
    assert avg.calls == [("lerp_", (0.25,))] and copy.calls == [("copy_", ())]
    assert torch.equal(shadow, torch.full((3,), 0.25))
    gate = torch.tensor(True)
    engine.run([0.5], gate)
    engine.wait()
    assert avg.calls[-1] == ("lerp_", ([0.5], gate))
    assert torch.equal(shadow, torch.full((3,), 0.25))  # the recording kernel honoured the gate
