"""Every public constructor argument, method and attribute of the replaced classes, read from the
installed originals with inspect, exists in the shims with the same signature: a peer release that
adds one fails here until the shim takes it (acceptance 2 of issue 18)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from polyak.compat import ema_pytorch as shim_ema_pytorch
from polyak.compat import timm as shim_timm
from polyak.compat import torch_ema as shim_torch_ema
from tests.compat._peers import load_timm_model_ema, make_model


def _pairs():
    import ema_pytorch
    import torch_ema

    yield "torch_ema", torch_ema.ExponentialMovingAverage, shim_torch_ema.ExponentialMovingAverage
    yield "ema_pytorch", ema_pytorch.EMA, shim_ema_pytorch.EMA
    yield "timm", "ModelEmaV2", shim_timm.ModelEmaV2
    yield "timm", "ModelEmaV3", shim_timm.ModelEmaV3


PAIRS = list(_pairs())
IDS = [f"{lib}.{real if isinstance(real, str) else real.__name__}" for lib, real, _ in PAIRS]


def _real(real):
    return getattr(load_timm_model_ema(), real) if isinstance(real, str) else real


def _same_default(a, b) -> bool:
    if isinstance(a, (set, frozenset)) and isinstance(b, (set, frozenset)):
        return set(a) == set(b)  # ema-pytorch's mutable set() defaults are frozenset() here
    return a is b or a == b


def _parameters(fn) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def _public_methods(cls) -> dict[str, object]:
    """Methods and properties the class defines itself (not nn.Module's or object's)."""
    base = set(dir(nn.Module)) if issubclass(cls, nn.Module) else set(dir(object))
    found = {}
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        for name, value in vars(klass).items():
            if name.startswith("_") and name not in ("__call__", "__init__"):
                continue
            if name in base and name not in ("forward", "eval", "__call__", "__init__"):
                continue
            found.setdefault(name, value)
    return found


@pytest.mark.parametrize(("lib", "real", "shim"), PAIRS, ids=IDS)
def test_constructor_takes_every_argument_with_the_same_default(lib, real, shim):
    real = _real(real)
    ours = {name: (kind, default) for name, kind, default in _parameters(shim.__init__)}
    theirs = _parameters(real.__init__)
    assert [name for name, _, _ in theirs] == list(ours), f"{lib}: constructor arguments differ"
    for name, kind, default in theirs:
        assert ours[name][0] == kind, f"{lib}: {name} is {ours[name][0]}, {kind} in {lib}"
        assert _same_default(ours[name][1], default), (
            f"{lib}: {name} defaults to {ours[name][1]!r} here, {default!r} in {lib}"
        )


@pytest.mark.parametrize(("lib", "real", "shim"), PAIRS, ids=IDS)
def test_every_public_method_exists_with_the_same_arguments(lib, real, shim):
    real = _real(real)
    theirs, ours = _public_methods(real), _public_methods(shim)
    missing = sorted(set(theirs) - set(ours))
    assert not missing, f"{lib} {real.__name__} has public members the shim lacks: {missing}"
    for name, value in theirs.items():
        if isinstance(value, property):
            assert isinstance(ours[name], property), f"{lib}: {name} is a property there"
        elif callable(value):
            names = [p[0] for p in _parameters(value)]
            assert [p[0] for p in _parameters(ours[name])] == names, (
                f"{lib}: {name}{inspect.signature(value)} vs {inspect.signature(ours[name])}"
            )


def _instances(lib, real, shim):
    model, copy = make_model(), make_model()
    if lib == "torch_ema":
        return real(model.parameters(), 0.9), shim(copy.parameters(), 0.9)
    return real(model), shim(copy)


@pytest.mark.parametrize(("lib", "real", "shim"), PAIRS, ids=IDS)
def test_every_public_attribute_exists(lib, real, shim):
    theirs, ours = _instances(lib, _real(real), shim)
    public = {n for n in dir(theirs) if not n.startswith("_")}
    missing = sorted(public - set(dir(ours)))
    assert not missing, f"{lib}: attributes the shim lacks: {missing}"
    for name in public:
        mine, their = getattr(ours, name), getattr(theirs, name)
        if isinstance(their, (bool, int, float, str, type(None), torch.dtype)):
            assert mine == their, f"{lib}: {name} is {mine!r} here, {their!r} there"
