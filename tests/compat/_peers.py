"""Shared pieces of the compat tests: a small BatchNorm model, one training run, and timm's
``model_ema.py`` loaded by path (importing timm would pull in torchvision)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

STEPS = 200
TOL = 1e-6  # fp32 averages of the peer and the shim after the same run (acceptance 1)


def make_model(seed: int = 0) -> nn.Module:
    """Linear -> BatchNorm -> ReLU -> Linear: weights, floating buffers and an integer buffer."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def train(
    models: list[nn.Module], hooks: list[Callable[[int], None]], steps: int = STEPS
) -> list[dict[str, torch.Tensor]]:
    """The same SGD-with-momentum run on each model (same data), ``hooks[i](step)`` after each
    optimizer step, step counted from 1. Returns each model's weights after every step."""
    optims = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    g = torch.Generator().manual_seed(1)
    history: list[dict[str, torch.Tensor]] = []
    for step in range(1, steps + 1):
        x, y = torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)
        for model, optim, hook in zip(models, optims, hooks, strict=True):
            model.train()
            optim.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optim.step()
            hook(step)
        history.append({k: v.detach().clone() for k, v in models[0].state_dict().items()})
    return history


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: str = "@") -> float:
    """The largest elementwise difference over the floating tensors of two state dicts (same
    keys required); keys containing ``skip`` are left out."""
    assert sorted(a) == sorted(b)
    return max(
        (a[k].double() - b[k].double()).abs().max().item()
        for k in a
        if a[k].is_floating_point() and skip not in k
    )


def load_timm_model_ema() -> ModuleType:
    """timm's ``utils/model_ema.py`` from the installed timm, without importing timm."""
    spec = importlib.util.find_spec("timm")  # a top-level package: its __init__ does not run
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            "timm is not installed: the timm shim tests compare against timm's model_ema.py; "
            "install it without its dependencies: pip install --no-deps timm==1.0.31"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "model_ema.py"
    if not path.is_file():
        pytest.skip(f"timm is installed but has no {path}")
    module_spec = importlib.util.spec_from_file_location("_polyak_test_timm_model_ema", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
