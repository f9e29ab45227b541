"""polyak.bn: update_bn against PyTorch's cumulative definition, and the stale-statistics monitor."""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import polyak
from polyak.bn import BatchNormMonitor, StaleBatchNormWarning, update_bn


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3, momentum=0.3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.BatchNorm1d(5),
    ).double()


def _batches() -> list[torch.Tensor]:
    # Unequal batch sizes: the cumulative average weights batches equally, not samples.
    gen = torch.Generator().manual_seed(1)
    return [
        torch.randn(n, 2, 4, 4, dtype=torch.float64, generator=gen) * 3 + 1 for n in (5, 9, 3, 7)
    ]


def _expected_stats(
    net: nn.Sequential, batches: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per BatchNorm layer, the mean over batches of the batch mean and unbiased batch variance.

    Computed by hand in float64: in training mode each BatchNorm normalises with its batch's
    (biased) statistics, which is what the second layer's input depends on.
    """
    conv, bn1, _, _, linear, _ = net
    per_layer: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], []]
    with torch.no_grad():
        for x in batches:
            c = F.conv2d(x, conv.weight, conv.bias, padding=1)
            values = c.transpose(0, 1).reshape(3, -1)
            mean1, var1 = values.mean(1), values.var(1, unbiased=True)
            per_layer[0].append((mean1, var1))
            biased1 = values.var(1, unbiased=False)
            h = (c - mean1[None, :, None, None]) / torch.sqrt(biased1 + bn1.eps)[
                None, :, None, None
            ]
            h = h * bn1.weight[None, :, None, None] + bn1.bias[None, :, None, None]
            z = F.linear(torch.relu(h).flatten(1), linear.weight, linear.bias)
            per_layer[1].append((z.mean(0), z.var(0, unbiased=True)))
    return [
        (torch.stack([m for m, _ in stats]).mean(0), torch.stack([v for _, v in stats]).mean(0))
        for stats in per_layer
    ]


def test_update_bn_is_the_cumulative_average_of_batch_statistics() -> None:
    net = _net()
    batches = _batches()
    with torch.no_grad():  # stale statistics that must not leak into the result
        for bn in (net[1], net[5]):
            bn.running_mean.fill_(7.0)
            bn.running_var.fill_(0.01)
            bn.num_batches_tracked.fill_(1000)
    expected = _expected_stats(net, batches)
    loader = [batches[0], (batches[1], torch.zeros(9)), [batches[2], None], (batches[3],)]
    update_bn(loader, net)
    for bn, (mean, var) in zip((net[1], net[5]), expected, strict=True):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)
        assert bn.num_batches_tracked.item() == len(batches)


def test_update_bn_matches_torch_swa_utils() -> None:
    ours, theirs = _net(), _net()
    batches = _batches()
    update_bn(batches, ours)
    torch.optim.swa_utils.update_bn(batches, theirs)
    for a, b in zip(ours.buffers(), theirs.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_update_bn_restores_momentum_and_each_module_mode() -> None:
    net = _net().eval()
    net[5].train()  # a mixed state: PyTorch's update_bn would flatten it to all-eval
    net[1].momentum = 0.3
    net[5].momentum = None
    params = [p.detach().clone() for p in net.parameters()]
    update_bn(_batches(), net)
    assert (net[1].momentum, net[5].momentum) == (0.3, None)
    assert [m.training for m in net] == [False, False, False, False, False, True]
    assert not net.training
    for before, after in zip(params, net.parameters(), strict=True):
        assert torch.equal(before, after)


def test_update_bn_restores_momentum_and_mode_when_the_loader_raises() -> None:
    net = _net().eval()

    def loader():
        yield _batches()[0]
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        update_bn(loader(), net)
    assert net[1].momentum == 0.3 and net[5].momentum == 0.1
    assert not any(m.training for m in net.modules())


class _DeviceProbe(nn.Module):
    """Records the device of each input; hands the BatchNorm after it a CPU tensor of that shape."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: list[torch.device] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.devices.append(x.device)
        return torch.arange(x.numel(), dtype=torch.float32).view(x.shape)


@pytest.mark.parametrize("device", ["meta", torch.device("meta")])
def test_update_bn_moves_inputs_to_device(device) -> None:
    """Each input is moved to ``device`` before the forward (on a CPU-only machine: "meta")."""
    probe = _DeviceProbe()
    net = nn.Sequential(probe, nn.BatchNorm1d(3))
    update_bn([torch.zeros(4, 3), (torch.zeros(2, 3), None)], net, device=device)
    assert probe.devices == [torch.device("meta")] * 2
    assert net[1].num_batches_tracked.item() == 2
    update_bn([torch.zeros(4, 3)], net)  # no device: inputs are used where they are
    assert probe.devices[-1] == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_update_bn_on_cuda_equals_the_cpu_statistics() -> None:
    batches = _batches()
    reference, net = _net(), _net().cuda()
    update_bn(batches, reference)
    update_bn(batches, net, device="cuda")
    for a, b in zip(reference.buffers(), net.buffers(), strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-12, atol=1e-12)


def test_update_bn_empty_loader_raises_and_keeps_statistics() -> None:
    net = _net()
    update_bn(_batches(), net)
    before = [b.clone() for b in net.buffers()]
    with pytest.raises(ValueError, match="the loader yielded no batches"):
        update_bn([], net)
    for a, b in zip(before, net.buffers(), strict=True):
        assert torch.equal(a, b)
    assert net[1].momentum == 0.3


def test_update_bn_rejects_other_batches() -> None:
    with pytest.raises(TypeError, match=re.escape("got dict. Wrap the loader")):
        update_bn([{"image": torch.zeros(2, 2, 4, 4)}], _net())


def test_update_bn_without_batchnorm_does_not_touch_the_loader() -> None:
    def loader():
        raise AssertionError("iterated")
        yield

    update_bn(loader(), nn.Linear(2, 2))


# ---------------------------------------------------------------- BatchNormMonitor: training side


def _train(
    model: nn.Module, opt: torch.optim.Optimizer, monitor: BatchNormMonitor, steps: int
) -> tuple:
    found: tuple = ()
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 2, 4, 4, dtype=torch.float64)).square().mean().backward()
        opt.step()
        found = monitor.check()
    return found


def test_monitor_warns_once_when_a_model_trains_in_eval_mode() -> None:
    net = _net().eval()  # the seed-004 pitfall
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    monitor = BatchNormMonitor(net)
    assert monitor.layers == ("1", "5")
    with pytest.warns(StaleBatchNormWarning, match=r"layer\(s\) changed .*\(1, 5\).* in eval mode"):
        assert _train(net, opt, monitor, 1) == ("1", "5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per layer: no second warning
        assert _train(net, opt, monitor, 2) == ("1", "5")


def test_monitor_names_only_the_layers_left_in_eval_mode() -> None:
    net = _net().train()
    net[5].eval()
    monitor = BatchNormMonitor(net)
    with pytest.warns(StaleBatchNormWarning, match=r"\(5\)"):
        assert _train(net, torch.optim.SGD(net.parameters(), lr=0.1), monitor, 1) == ("5",)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw-foreach", "adamw-fused"])
def test_monitor_is_silent_on_a_correct_loop(optimizer: str) -> None:
    net = _net().float().train()
    params = net.parameters()
    opt = {
        "sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        "adamw-foreach": lambda: torch.optim.AdamW(params, foreach=True),
        "adamw-fused": lambda: torch.optim.AdamW(params, fused=True),
    }[optimizer]()
    ema = polyak.EMA(net, decay=0.9)
    monitor = BatchNormMonitor(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            for _ in range(2):
                opt.zero_grad()
                net(torch.randn(8, 2, 4, 4)).square().mean().backward()
                opt.step()
                ema.update()
                assert monitor.check() == ()
            with ema.swapped():  # evaluation between checks does not count as training
                net.eval()
                net(torch.randn(8, 2, 4, 4))
                net.train()


def test_monitor_sees_fused_optimizer_steps_through_gradients() -> None:
    net = _net().float().eval()
    opt = torch.optim.AdamW(net.parameters(), fused=True)  # fused kernels do not bump versions
    monitor = BatchNormMonitor(net)
    opt.zero_grad()
    net(torch.randn(8, 2, 4, 4)).square().mean().backward()
    opt.step()
    with pytest.warns(StaleBatchNormWarning):
        assert monitor.check() == ("1", "5")


def test_monitor_ignores_batchnorm_frozen_on_purpose() -> None:
    net = _net()
    net[1].eval()
    net[1].requires_grad_(False)  # frozen affine and statistics, as in fine-tuning
    monitor = BatchNormMonitor(net)
    assert monitor.layers == ("5",)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _train(net, opt, monitor, 2) == ()


def test_monitor_reads_no_tensor_values(no_host_reads: Any) -> None:
    net = _net().eval()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    monitor = BatchNormMonitor(net)
    opt.zero_grad()
    net(torch.randn(8, 2, 4, 4, dtype=torch.float64)).square().mean().backward()
    opt.step()

    with pytest.warns(StaleBatchNormWarning), no_host_reads():
        assert monitor.check() == ("1", "5")


# ---------------------------------------------------------------- BatchNormMonitor: evaluation side


def test_check_eval_warns_until_statistics_are_recomputed() -> None:
    net = _net().float()
    ema = polyak.EMA(net, decay=0.9, buffers="none")
    monitor = BatchNormMonitor(net)
    assert monitor.check_eval() == ()  # no update yet: nothing to be stale
    ema.update()
    monitor.note_update()
    averaged = ema.averaged_module()
    with pytest.warns(
        StaleBatchNormWarning, match=r"after the last 1 update\(s\) \(1, 5\).*update_bn"
    ):
        assert monitor.check_eval(averaged) == ("1", "5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert monitor.check_eval(averaged) == ("1", "5")  # still stale, warned once already
        update_bn([torch.randn(8, 2, 4, 4) for _ in range(2)], averaged)
        assert monitor.check_eval(averaged) == ()  # update_bn ran on these very weights
        ema.update()
        monitor.note_update()
        monitor.note_update_bn()  # the explicit form, for engines that recompute themselves
        assert monitor.check_eval() == ()


def test_check_eval_sees_weights_replaced_after_update_bn() -> None:
    net = _net().float()
    monitor = BatchNormMonitor(net)
    update_bn([torch.randn(8, 2, 4, 4)], net)
    monitor.note_update()
    assert monitor.check_eval(net) == ()
    monitor.note_update()
    # Swap other values in as EMA.swapped() does: `.data =` leaves version counters alone.
    for p in net.parameters():
        p.data = p.data.clone()
    with pytest.warns(StaleBatchNormWarning):
        assert monitor.check_eval(net) == ("1", "5")
