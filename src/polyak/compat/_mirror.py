"""What the shims share: a decay set per call, and a module whose tensors are an EMA's averages.

timm's ``ModelEmaV2.module`` and ema-pytorch's ``EMA.ema_model`` are copies of the model that hold
the averages at all times: users run them, save their state dicts and load checkpoints into them.
:class:`Mirror` builds a :class:`polyak.EMA` on the live model and points that copy's tensors at the
EMA's shadows (``param.data = shadow``), so the copy *is* the average, with no copy per update.
Where a shadow cannot be shared (fp32 shadows of a bf16 model, whose copy stays bf16 so that it
runs on bf16 inputs as before), the copy's tensor is refreshed from the shadow, cast, when it is
read: before its forward, its ``state_dict()``, and on access through the shim; a state dict
loaded into the copy is written back into the shadows.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from polyak.ema import EMA

__all__ = ["Mirror", "Pending", "named_state", "transfer"]


class Pending:
    """A decay schedule that returns the value the shim set for the coming update.

    The replaced classes decide the decay per call (timm's ``update(model, step)``, torch_ema's
    ``num_updates`` that a loaded state dict may set), so the shim computes it and
    :class:`polyak.EMA` reads it here: with ``update_every=1`` the update's weight is ``1 - value``.
    """

    def __init__(self, value: float = 0.0) -> None:
        self.value = value

    def __call__(self, step: Any) -> float:
        return self.value

    def __repr__(self) -> str:
        return f"Pending(value={self.value!r})"


def named_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by name (tied ones under each name)."""
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    return tensors


def transfer(old: EMA, new: EMA) -> None:
    """Give ``new`` the averages and counters of ``old`` (same names), cast to its shadows."""
    with torch.no_grad():
        for name in new.names():
            new.average(name).copy_(old.average(name))
    new.step = old.step
    new.num_averages = old.num_averages


def _owner(module: nn.Module, name: str) -> tuple[dict[str, Any], str]:
    prefix, _, key = name.rpartition(".")
    sub = module.get_submodule(prefix)
    return (sub._parameters if key in sub._parameters else sub._buffers), key


class Mirror:
    """A :class:`polyak.EMA` of ``online`` whose averages are the tensors of ``module``.

    ``settings`` are :class:`polyak.EMA`'s keyword arguments. ``module`` must have ``online``'s
    names (a copy of it); its current values become the averages (the original classes start from
    their copy). ``offload`` is chosen from where ``module`` lives: on the CPU beside a CUDA model,
    the shadows are kept in host memory (``offload="cpu"``); any other split raises.
    """

    def __init__(self, online: nn.Module, module: nn.Module, **settings: Any) -> None:
        self.settings = settings
        self.module = module
        self.online: nn.Module = online
        self.ema: EMA | None = None
        self._casts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._stale = False
        self._hooks: list[Any] = []
        self.build(online)

    # ------------------------------------------------------------------ building

    def _offload(self, online: nn.Module) -> str | None:
        module_devices = {t.device for t in named_state(self.module).values()}
        online_devices = {t.device for t in named_state(online).values()}
        if module_devices == online_devices or not module_devices:
            return None
        if module_devices == {torch.device("cpu")} and all(
            d.type == "cuda" for d in online_devices
        ):
            return "cpu"
        raise ValueError(
            f"the EMA copy is on {sorted(map(str, module_devices))} but the model on "
            f"{sorted(map(str, online_devices))}; polyak keeps the averages beside the weights, or "
            f"in host memory for a CUDA model (device='cpu'). Move the EMA copy to the model's "
            f"device, or to the CPU."
        )

    def build(self, online: nn.Module) -> None:
        """(Re)build the EMA on ``online``, its averages taken from ``module``'s values now."""
        ema = EMA(online, **self.settings, offload=self._offload(online))
        targets = named_state(self.module)
        missing = [n for n in ema.names() if n not in targets]
        if missing:
            raise ValueError(
                f"the EMA copy has no tensors named {missing[:10]}, which the model has; pass a "
                f"copy of the model (same architecture, same names)."
            )
        with torch.no_grad():
            for name in ema.names():
                ema.average(name).copy_(targets[name])
        if self.ema is not None:
            ema.step, ema.num_averages = self.ema.step, self.ema.num_averages
        self.ema, self.online = ema, online
        self._alias(targets)

    def _alias(self, targets: dict[str, torch.Tensor]) -> None:
        """Point ``module``'s tensors at the shadows; keep cast pairs where that cannot be."""
        assert self.ema is not None
        for hook in self._hooks:
            hook.remove()
        self._casts = []
        for name in self.ema.names():
            shadow, target = self.ema.average(name), targets[name]
            if target.dtype == shadow.dtype and target.device == shadow.device:
                target.data = shadow
            else:
                self._casts.append((target, shadow))
        self._stale = False
        names = self.ema.names()
        buffers = dict(self.module.named_buffers(remove_duplicate=False))
        # sentinels: the first tracked parameter and buffer, as the module holds them now
        self._sentinels = []
        for name in (names[0], *[n for n in names if n in buffers][:1]):
            owner, key = _owner(self.module, name)
            tensor, shadow = owner[key], self.ema.average(name)
            aliased = tensor.data_ptr() == shadow.data_ptr()
            self._sentinels.append(
                (owner, key, tensor, tensor.data_ptr(), tensor.dtype, shadow if aliased else None)
            )
        self._hooks = [
            self.module.register_load_state_dict_post_hook(lambda module, keys: self.loaded()),
        ]
        if self._casts or self.ema.offload:
            self._hooks.append(self.module.register_forward_pre_hook(lambda m, a: self.refresh()))
            self._hooks.append(
                self.module.register_state_dict_pre_hook(lambda m, p, k: self.refresh())
            )

    # ------------------------------------------------------------------ keeping them together

    def _module_changed(self) -> bool:
        for owner, key, tensor, ptr, dtype, _ in self._sentinels:
            now = owner.get(key)
            if now is not tensor or now.data_ptr() != ptr or now.dtype != dtype:
                return True
        return False

    def ensure(self, online: nn.Module | None = None) -> None:
        """Before an update: follow a new model, or a copy that was moved or re-cast
        (``ema.to(device)``, ``ema.half()``): its values are kept as the averages."""
        if (online is not None and online is not self.online) or self._module_changed():
            self.refresh()
            self.build(online if online is not None else self.online)

    def updated(self) -> None:
        """After an update: the cast copies are stale; re-point shadows polyak replaced."""
        self._stale = bool(self._casts)
        assert self.ema is not None
        for _, _, _, ptr, _, shadow in self._sentinels:
            if shadow is not None and shadow.data_ptr() != ptr:  # polyak re-pointed the shadow
                self._alias(named_state(self.module))
                return

    def refresh(self) -> None:
        """Bring the cast copies up to date (and wait for an update in flight)."""
        assert self.ema is not None
        if self.ema.offload:
            self.ema.average(self.ema.names()[0])  # waits for the update in flight
        if self._stale:
            with torch.no_grad():
                for target, shadow in self._casts:
                    target.copy_(shadow)
            self._stale = False

    def loaded(self) -> None:
        """After a state dict was loaded into ``module``: its cast tensors are the averages."""
        with torch.no_grad():
            for target, shadow in self._casts:
                shadow.copy_(target)
        self._stale = False

    def write(self, values: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Set averages by name (cast copies follow)."""
        assert self.ema is not None
        with torch.no_grad():
            for name, value in values:
                self.ema.average(name).copy_(value)
        self._stale = bool(self._casts)
