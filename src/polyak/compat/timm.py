"""timm's ``ModelEmaV2`` and ``ModelEmaV3`` (timm 1.0.31) on polyak's engine.

Replace ``from timm.utils import ModelEmaV2, ModelEmaV3`` (or ``timm.utils.model_ema``) by
``from polyak.compat.timm import ModelEmaV2, ModelEmaV3``; nothing else changes. This module does
not import timm.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from polyak import schedules
from polyak._tracking import unwrap
from polyak.compat._mirror import Mirror, Pending, named_state

__all__ = ["ModelEmaV2", "ModelEmaV3"]

_DIFFERENCES = """
    Where it differs from timm, on purpose:

    - bf16 and fp16 weights get fp32 shadows (timm keeps the EMA in the model's dtype, where
      ``(1 - decay) * (model - ema)`` rounds to zero at typical decays, so the average stalls).
      ``.module`` stays in the model's dtype so that it runs on the same inputs: its tensors are
      refreshed from the fp32 averages, cast, before its forward, its ``state_dict()`` and on
      ``ema.module``; a state dict loaded into it is written back into the averages. A reference
      to one of its tensors taken earlier may be stale until then.
    - Integer buffers (BatchNorm's ``num_batches_tracked``) are copied from the model; V2 passes
      them through ``decay * e + (1 - decay) * m`` and truncates, so they never move.
    - Parameters with ``requires_grad=False`` are not averaged; their values in ``.module`` stay
      those of the copy (timm averages them with themselves: the same values while they stay
      frozen). Tensors are matched by name, not by position in ``state_dict()``.
    - ``device`` different from the model's: the averages are kept in (pinned) host memory for a
      CUDA model (``device='cpu'``, polyak's ``offload="cpu"``); other splits raise a ValueError.
"""


class _ModelEma(nn.Module):
    """What V2 and V3 share: ``.module`` (a copy of the model whose tensors are the averages),
    ``forward``, ``set``; the update runs on :class:`polyak.EMA` (see :class:`Mirror`)."""

    def _start(
        self,
        model: nn.Module,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        **settings: Any,
    ) -> None:
        module = copy.deepcopy(model).eval()
        if device is not None:
            module.to(device=device)
        if dtype is not None:
            module.to(dtype=dtype)
        self._modules["module"] = module
        self._decay = Pending()
        self._policy = settings["buffers"]
        self._mirror = Mirror(unwrap(model), unwrap(module), decay=self._decay, **settings)
        tracked = set(self._mirror.ema.names())
        self._buffer_names = [n for n, _ in self._mirror.online.named_buffers() if n in tracked]

    @property
    def module(self) -> nn.Module:
        """The averaged model (a copy of the model given): run it, save or load its state dict."""
        self._mirror.refresh()
        return self._modules["module"]

    def _average(self, model: nn.Module, decay: float, buffers: str) -> None:
        """One averaging step with ``decay``; ``buffers``: ``"average"`` or ``"copy"``."""
        self._mirror.ensure(unwrap(model))
        ema = self._mirror.ema
        policy = self._policy
        online = self._mirror.online
        kept = []
        if buffers != policy and buffers == "average":  # the EMA copies them: average by hand
            kept = [(n, ema.average(n).clone()) for n in self._buffer_names]
        self._decay.value = decay
        ema.update()
        if buffers != policy:
            live = dict(online.named_buffers())
            with torch.no_grad():
                if buffers == "copy":  # the EMA averaged them: copy instead
                    for name in self._buffer_names:
                        ema.average(name).copy_(live[name])
                else:
                    for name, old in kept:
                        if old.is_floating_point():
                            ema.average(name).copy_(old.lerp_(live[name].to(old.dtype), 1 - decay))
        self._mirror.updated()

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Make the averages equal to ``model``'s weights and buffers (all of them, by name)."""
        self._mirror.ensure(unwrap(model))
        unwrap(self._modules["module"]).load_state_dict(unwrap(model).state_dict())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The averaged model's forward: ``self.module(*args, **kwargs)``."""
        return self.module(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        """``ema.to(...)`` / ``ema.cuda()`` / ``ema.half()`` move or cast ``.module``; the averages
        follow (on the model's device, or in host memory beside a CUDA model)."""
        self._mirror.refresh()
        out = super()._apply(fn, recurse)
        self._mirror.ensure()
        return out


class ModelEmaV2(_ModelEma):
    r"""timm 1.0.31's ``ModelEmaV2``, running on :class:`polyak.EMA`.

    At each :meth:`update`, every floating parameter and buffer of ``.module`` moves towards the
    model's: :math:`e \leftarrow d\,e + (1 - d)\,m` with the constant ``decay`` :math:`d` (read
    at each call, as in timm). ``.module`` is a copy of the model in eval mode; :meth:`forward`
    runs it. Its state dict is timm's ``state_dict_ema``: checkpoints load both ways. With fp32
    weights the averages equal timm's to float32 rounding (timm computes
    ``d * e + (1 - d) * m``, polyak ``e.lerp_(m, 1 - d)``).
    """

    __doc__ = (__doc__ or "") + _DIFFERENCES

    def __init__(
        self, model: nn.Module, decay: float = 0.9999, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        schedules.constant(decay)  # TypeError / ValueError naming the value
        self.decay = decay
        self.device = device
        self._start(model, device, None, buffers="average")

    def update(self, model: nn.Module) -> None:
        """Average ``model``'s current weights in with ``self.decay``."""
        self._average(model, self.decay, "average")


class ModelEmaV3(_ModelEma):
    r"""timm 1.0.31's ``ModelEmaV3``, running on :class:`polyak.EMA`.

    :meth:`update` ``(model, step)`` averages with the decay of :meth:`get_decay`: with
    ``step=None`` the constant ``decay``; else, with :math:`s = \max(0, \text{step} -
    \text{update\_after\_step} - 1)`, a copy (decay 0) while :math:`s = 0`, then ``decay``, or with
    ``use_warmup=True`` the inverse-gamma warm-up

    .. math:: d(s) = \operatorname{clamp}\bigl(1 - (1 + s/\gamma)^{-p},\
              \text{min\_decay},\ \text{decay}\bigr)

    (:func:`polyak.schedules.inverse_gamma` with ``inv_gamma=warmup_gamma``,
    ``power=warmup_power``). Floating tensors are lerped (buffers copied with
    ``exclude_buffers=True``), integer buffers copied. Its state dict, and ``.module``'s (timm's
    ``state_dict_ema``), load both ways between this class and timm's. With fp32 weights the
    averages equal timm's to float32 rounding.

    ``dtype``: the averages' dtype (``.module`` is cast to it, as in timm). ``foreach=False`` runs
    polyak's per-tensor reference kernel (same numbers). ``stochastic_rounding`` (with
    ``stochastic_rounding_seed``): for a model whose floating tensors are all bf16 and no
    ``dtype``, the averages stay bf16 and are rounded stochastically, as in timm (polyak's
    ``rounding="stochastic"``; a different random stream, so other bits, the same expectation);
    for a model that mixes bf16 with other dtypes, and with ``stochastic_rounding=False``, bf16
    tensors get fp32 averages instead. ``device``, ``dtype``, ``foreach`` and
    ``stochastic_rounding*`` are read at construction; the other attributes at each call, as in
    timm.
    """

    __doc__ = (__doc__ or "") + _DIFFERENCES

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        stochastic_rounding: bool = True,
        stochastic_rounding_seed: int = 0,
        foreach: bool = True,
        exclude_buffers: bool = False,
    ) -> None:
        super().__init__()
        # the warm-up's arguments are checked even if unused, so that a typo fails early
        schedules.inverse_gamma(warmup_gamma, warmup_power, max_decay=decay, min_decay=min_decay)
        if isinstance(update_after_step, bool) or not isinstance(update_after_step, int):
            raise TypeError(
                f"update_after_step must be an int (optimizer steps), got "
                f"update_after_step={update_after_step!r}."
            )
        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_warmup = use_warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.foreach = foreach
        self.device = device
        self.dtype = dtype
        self.stochastic_rounding = stochastic_rounding
        self.stochastic_rounding_seed = stochastic_rounding_seed
        self.exclude_buffers = exclude_buffers
        floating = [t for t in named_state(model).values() if t.is_floating_point()]
        settings: dict[str, Any] = {}
        if dtype is not None:
            settings["shadow_dtype"] = dtype
        elif stochastic_rounding and floating and all(t.dtype == torch.bfloat16 for t in floating):
            settings.update(
                shadow_dtype=torch.bfloat16, rounding="stochastic", seed=stochastic_rounding_seed
            )
        self._start(
            model,
            device,
            dtype,
            buffers="copy" if exclude_buffers else "average",
            kernel="auto" if foreach else "reference",
            **settings,
        )

    def get_decay(self, step: int | None = None) -> float:
        """The decay of the update at optimizer step ``step`` (see the class docstring)."""
        if step is None:
            return self.decay
        step = max(0, step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_warmup:
            warmup = schedules.inverse_gamma(
                self.warmup_gamma, self.warmup_power, max_decay=self.decay, min_decay=self.min_decay
            )
            return float(warmup(step))
        return self.decay

    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Average ``model``'s current weights in with ``get_decay(step)``."""
        self._average(model, self.get_decay(step), "copy" if self.exclude_buffers else "average")

    def apply_update_(self, model: nn.Module, decay: float) -> None:
        """Average parameters and floating buffers with ``decay``; copy integer buffers."""
        self._average(model, decay, "average")

    def apply_update_no_buffers_(self, model: nn.Module, decay: float) -> None:
        """Average parameters with ``decay``; copy every buffer."""
        self._average(model, decay, "copy")
