"""``torch_ema.ExponentialMovingAverage`` (torch_ema 0.3) on polyak's engine.

Replace ``from torch_ema import ExponentialMovingAverage`` by
``from polyak.compat.torch_ema import ExponentialMovingAverage``; nothing else changes.
"""

from __future__ import annotations

import contextlib
import copy
import numbers
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from polyak import schedules
from polyak.compat._mirror import Pending, transfer
from polyak.ema import EMA

__all__ = ["ExponentialMovingAverage"]

_UNSET = object()


class _Tensors(nn.Module):
    """The tensors given to the EMA, held as buffers named ``"0"``, ``"1"``, ...: polyak then
    averages every floating one (torch_ema averages frozen parameters too) and copies the rest."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        for index, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"ExponentialMovingAverage averages tensors, but item {index} of parameters is "
                    f"a {type(tensor).__name__}; pass model.parameters() or a list of tensors."
                )
            self._buffers[str(index)] = tensor


class ExponentialMovingAverage:
    r"""torch_ema 0.3's ``ExponentialMovingAverage``, running on :class:`polyak.EMA`.

    After each optimizer step, :meth:`update` moves each shadow towards its parameter:

    .. math:: s \leftarrow d_n s + (1 - d_n)\,\theta, \qquad
              d_n = \min\!\left(d, \frac{1 + n}{10 + n}\right)

    with :math:`n` = :attr:`num_updates` counted from 1 (TF's ``num_updates`` warm-up,
    :func:`polyak.schedules.tf_warmup`), or :math:`d_n = d` with ``use_num_updates=False``. Shadows
    start from the parameters' values at construction.

    The same arguments, methods, attributes (``decay``, ``num_updates``, ``shadow_params``,
    ``collected_params``) and state dict as torch_ema 0.3: a state dict saved by torch_ema loads
    here, and one saved here loads into torch_ema. With fp32 parameters the averages equal
    torch_ema's to float32 rounding (torch_ema computes ``s - (1 - d)(s - θ)``, polyak
    ``s.lerp_(θ, 1 - d)``).

    Where it differs from torch_ema, on purpose:

    - bf16 and fp16 parameters get fp32 shadows. torch_ema keeps shadows in the parameter's dtype,
      where an update smaller than half a unit in the last place rounds away: a bf16 shadow with
      decay 0.999 stops moving once the weights change by less than about 0.4 of their value per
      step, so the "average" stalls near old weights. :attr:`shadow_params` are then fp32 tensors;
      :meth:`copy_to` and :meth:`load_state_dict` cast as torch_ema does.
    - Integer tensors among the parameters are copied at each update; torch_ema raises on them.
    - The EMA holds the tensors it averages (torch_ema holds weak references, so a model could be
      freed while its EMA lived on): keep it no longer than the model.
    - ``update``, ``copy_to``, ``store``, ``restore`` and ``average_parameters`` take
      ``parameters=`` as torch_ema does; the fast path is the tensors given at construction
      (``model.parameters()`` again is the same tensors). Another list of tensors works, but
      rebuilds the engine's plan for it.
    """

    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter],
        decay: float,
        use_num_updates: bool = True,
    ) -> None:
        schedules.constant(decay)  # ValueError for a decay outside [0, 1], TypeError for others
        self.decay = decay
        self.num_updates: int | None = 0 if use_num_updates else None
        self.collected_params: list[torch.Tensor] | None = None
        self._own = list(parameters)
        self._bound = self._own
        self._decay = Pending()
        self._warmup_built: tuple[Any, Any] = (_UNSET, None)
        self._shadow_dtype: torch.dtype | None = None
        self._ema = self._build(self._own) if self._own else None

    def _build(self, tensors: list[torch.Tensor]) -> EMA:
        return EMA(
            _Tensors(tensors), decay=self._decay, buffers="average", shadow_dtype=self._shadow_dtype
        )

    def _bind(self, parameters: Iterable[torch.Tensor] | None) -> list[torch.Tensor]:
        """The tensors to work on: ``parameters`` (checked), else those given at construction; the
        engine is re-planned on them if they are other tensor objects."""
        if parameters is None:
            tensors = self._own
        else:
            tensors = list(parameters)
            if len(tensors) != len(self._own):
                raise ValueError(
                    f"Number of parameters passed as argument ({len(tensors)}) is different from "
                    f"number of shadow parameters maintained by this ExponentialMovingAverage "
                    f"({len(self._own)}); pass the same parameters as at construction."
                )
        if (
            self._ema is not None
            and tensors is not self._bound  # the common call, update(): no walk over the list
            and any(a is not b for a, b in zip(tensors, self._bound, strict=True))
        ):
            old = self._ema
            self._ema = self._build(tensors)
            transfer(old, self._ema)
            self._bound = tensors
        return tensors

    def _warmup(self, decay: float) -> schedules.TFWarmup:
        """:func:`polyak.schedules.tf_warmup` of ``decay``, built again only when
        :attr:`decay` is another object (it is read at each update, as in torch_ema)."""
        if self._warmup_built[0] is not decay:
            self._warmup_built = (decay, schedules.tf_warmup(decay))
        return self._warmup_built[1]

    @property
    def shadow_params(self) -> list[torch.Tensor]:
        """The averages, one per parameter, in order (the shadow tensors themselves)."""
        if self._ema is None:
            return []
        return [self._ema.average(str(i)) for i in range(len(self._own))]

    def update(self, parameters: Iterable[torch.nn.Parameter] | None = None) -> None:
        """Call after every ``optimizer.step()``: ``num_updates += 1``, then average with
        :math:`d_n = \\min(d, (1 + n)/(10 + n))`, or :math:`d` with ``use_num_updates=False``."""
        self._bind(parameters)
        decay = self.decay
        if self.num_updates is not None:
            self.num_updates += 1
            decay = self._warmup(decay)(self.num_updates)
        if self._ema is None:
            return
        self._decay.value = decay
        self._ema.update()

    def copy_to(self, parameters: Iterable[torch.nn.Parameter] | None = None) -> None:
        """Copy the averages into ``parameters`` (default: those given at construction)."""
        tensors = self._bind(parameters)
        if self._ema is not None:
            self._ema.copy_to()
        del tensors

    def store(self, parameters: Iterable[torch.nn.Parameter] | None = None) -> None:
        """Keep a copy of ``parameters`` for :meth:`restore` (each call replaces the last copy,
        as in torch_ema; :meth:`polyak.EMA.store` keeps the first instead)."""
        tensors = self._bind(parameters)
        self.collected_params = [t.clone() for t in tensors]

    def restore(self, parameters: Iterable[torch.nn.Parameter] | None = None) -> None:
        """Copy the tensors kept by :meth:`store` back into ``parameters``."""
        if self.collected_params is None:
            raise RuntimeError(
                "This ExponentialMovingAverage has no `store()`ed weights to `restore()`: call "
                "ema.store() before ema.copy_to(), or use `with ema.average_parameters(): ...`."
            )
        tensors = self._bind(parameters)
        with torch.no_grad():
            for kept, tensor in zip(self.collected_params, tensors, strict=True):
                tensor.data.copy_(kept.data)

    @contextlib.contextmanager
    def average_parameters(
        self, parameters: Iterable[torch.nn.Parameter] | None = None
    ) -> Iterator[None]:
        """Inside the block ``parameters`` hold the averages; their values come back on exit, also
        when the block raises (``store(); copy_to(); ...; restore()``)."""
        tensors = self._bind(parameters)
        self.store(tensors)
        self.copy_to(tensors)
        try:
            yield
        finally:
            self.restore(tensors)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> None:
        """Move the averages (and stored copies) to ``device``, after the model moved there; cast
        floating ones to ``dtype`` (the shadows then keep that dtype)."""
        if self._ema is not None:
            if dtype is not None and dtype.is_floating_point:
                old, self._shadow_dtype = self._ema, dtype
                self._ema = self._build(self._bound)
                transfer(old, self._ema)
            if device is not None:
                self._ema.to(device)
        if self.collected_params is not None:
            self.collected_params = [
                t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)
                for t in self.collected_params
            ]

    def state_dict(self) -> dict[str, Any]:
        """torch_ema's state dict: ``decay``, ``num_updates``, ``shadow_params`` (references to
        the averages, as torch_ema returns) and ``collected_params``."""
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow_params": self.shadow_params,
            "collected_params": self.collected_params,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict` or by torch_ema 0.3 (any version's
        layout: the four keys). Everything is checked before anything changes."""
        state = copy.deepcopy(dict(state_dict))
        missing = [k for k in ("decay", "num_updates", "shadow_params") if k not in state]
        if missing:
            raise ValueError(
                f"not a torch_ema state dict: missing keys {missing} (got {sorted(state)}); pass "
                f"the output of ExponentialMovingAverage.state_dict()."
            )
        decay, num_updates = state["decay"], state["num_updates"]
        schedules.constant(decay)
        if num_updates is not None and (
            isinstance(num_updates, bool) or not isinstance(num_updates, numbers.Integral)
        ):
            raise ValueError(f"num_updates must be an int or None, got {num_updates!r}.")
        shadows, collected = state["shadow_params"], state.get("collected_params")
        for key, value in (("shadow_params", shadows), ("collected_params", collected)):
            if value is None and key == "collected_params":
                continue
            if not isinstance(value, (list, tuple)) or not all(
                isinstance(t, torch.Tensor) for t in value
            ):
                raise ValueError(f"{key} must be a list of tensors, got {type(value).__name__}.")
            if len(value) != len(self._own):
                raise ValueError(
                    f"Tried to `load_state_dict()` with the wrong number of parameters in the saved "
                    f"state: {key} holds {len(value)} tensors, this EMA averages {len(self._own)}."
                )
        wrong = [
            f"{i}: saved {tuple(t.shape)} vs parameter {tuple(p.shape)}"
            for i, (t, p) in enumerate(zip(shadows, self._own, strict=True))
            if t.shape != p.shape
        ]
        if wrong:
            raise ValueError(
                f"the saved shadow_params do not match the parameters' shapes: {wrong[:10]}; load "
                f"a state dict saved for this model."
            )
        self.decay = decay
        self.num_updates = None if num_updates is None else int(num_updates)
        if self._ema is not None:
            with torch.no_grad():
                for i, saved in enumerate(shadows):
                    self._ema.average(str(i)).copy_(saved)
        if collected is not None:
            collected = [
                t.to(device=p.device, dtype=p.dtype)
                for t, p in zip(collected, self._own, strict=True)
            ]
        self.collected_params = collected
