"""ema-pytorch's ``EMA`` (ema-pytorch 0.8.3) on polyak's engine.

Replace ``from ema_pytorch import EMA`` by ``from polyak.compat.ema_pytorch import EMA``; nothing
else changes. This module does not import ema_pytorch.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from polyak import schedules
from polyak.compat._mirror import Mirror, named_state

__all__ = ["EMA"]


def inplace_copy(
    tgt: Tensor, src: Tensor, *, auto_move_device: bool = False, coerce_dtype: bool = False
) -> None:
    """``tgt.copy_(src)``, moving ``src`` to ``tgt``'s device first if asked (ema-pytorch's)."""
    if auto_move_device:
        src = src.to(tgt.device)
    tgt.copy_(src)


def inplace_lerp(
    tgt: Tensor,
    src: Tensor,
    weight: float,
    *,
    auto_move_device: bool = False,
    coerce_dtype: bool = False,
) -> None:
    """``tgt.lerp_(src, weight)``, moving/casting ``src`` to ``tgt`` where asked (ema-pytorch's)."""
    if auto_move_device:
        src = src.to(tgt.device)
    if coerce_dtype and src.dtype != tgt.dtype:
        src = src.to(tgt.dtype)
    tgt.lerp_(src, weight)


@dataclasses.dataclass(frozen=True)
class _Decay:
    """ema-pytorch's decay at step ``n`` (calls of ``update()`` before this one): 0 while
    ``n <= update_after_step`` (a copy), then the inverse-gamma warm-up of ``n - update_after_step``
    clamped to ``[min_value, beta]``; for the engine (``frozen=True``) 1 for a frozen EMA
    (``beta == 1``, which ema-pytorch skips). Reads the EMA's attributes at each call, as
    ema-pytorch does."""

    ema: Any
    frozen: bool = True
    # the warm-up schedule and the attributes it was built from, rebuilt only when one of them
    # is another object: building it checks its arguments, a cost not to pay at every update
    _built: list[Any] = dataclasses.field(
        default_factory=lambda: [(), None], compare=False, repr=False
    )

    def __call__(self, n: int) -> float:
        ema = self.ema
        epoch = n - ema.update_after_step
        if epoch <= 0:
            return 0.0
        if self.frozen and ema.is_frozen:
            return 1.0
        return float(self._warmup()(epoch))

    def _warmup(self) -> schedules.InverseGamma:
        ema = self.ema
        now = (ema.inv_gamma, ema.power, ema.beta, ema.min_value)
        built, warmup = self._built
        if len(built) != len(now) or not all(map(operator.is_, built, now)):
            warmup = schedules.inverse_gamma(
                ema.inv_gamma, ema.power, max_decay=ema.beta, min_decay=ema.min_value
            )
            self._built[:] = [now, warmup]
        return warmup


class EMA(nn.Module):
    r"""ema-pytorch 0.8.3's ``EMA``, running on :class:`polyak.EMA`.

    ``ema.update()`` after each optimizer step; ``ema.ema_model`` (a copy of the model) holds the
    averages, ``ema(x)`` runs it. Call :math:`c` of ``update()`` sees :math:`n = c - 1` earlier
    calls. The first call copies the weights; then every ``update_every``-th call (:math:`n` a
    multiple of :math:`k` = ``update_every``) averages:

    .. math:: s \leftarrow D s + (1 - D)\,\theta, \qquad D = \prod_{i = n - k + 1}^{n} d(i), \qquad
              d(i) = \operatorname{clamp}\bigl(1 - (1 + e_i/\gamma_{inv})^{-p},
              \text{min\_value}, \beta\bigr),\ e_i = i - \text{update\_after\_step}

    with :math:`d(i) = 0` for :math:`e_i \le 0`, so updates covering a step up to
    ``update_after_step`` copy the weights (:func:`polyak.schedules.inverse_gamma`). With
    ``update_every=1`` this is ema-pytorch's formula, and with fp32 weights the averages equal
    ema-pytorch's to float32 rounding. Same constructor arguments, methods, attributes and
    state dict as ema-pytorch 0.8.3 (``initted``, ``step``, ``online_model.*`` unless
    ``include_online_model=False``, ``ema_model.*``): checkpoints load both ways.

    Where it differs from ema-pytorch, on purpose:

    - ``update_every=k > 1``: the decay is multiplied over the :math:`k` steps an update covers
      (:math:`D` above). ema-pytorch evaluates its schedule at the call count but applies it once
      per :math:`k` calls, so its average is :math:`k` times longer (in optimizer steps) than
      ``beta`` says: ``beta=0.9999`` with the default ``update_every=10`` averages over about
      100,000 steps, not 10,000, and ``inv_gamma=1, power=1`` is no longer the simple average its
      docstring promises. Here ``beta`` keeps its meaning at any ``update_every``: to keep an
      ema-pytorch run's horizon with ``update_every=k``, pass ``beta=beta_old ** (1 / k)``.
    - The decay is computed in double precision; ema-pytorch computes it in float32 (its ``step``
      is a tensor), so ``get_current_decay()`` differs in the 8th digit.
    - bf16 and fp16 weights get fp32 averages (ema-pytorch keeps them in the model's dtype, where
      they stall). ``ema_model`` stays in its dtype so that it runs on the same inputs: its
      tensors are refreshed from the averages, cast, before its forward, the methods named in
      ``forward_method_names``, its ``state_dict()`` and the copies; a state dict loaded into it
      is written back. Move it with ``ema.to(...)``, not ``ema.ema_model.to(...)``.
    - Integer buffers (``num_batches_tracked``) are copied from the model; ema-pytorch never
      updates them. Parameters with ``requires_grad=False`` are not averaged (their value is the
      model's as of the last copy; ema-pytorch averages them with themselves, the same value
      while they stay frozen).
    - ``forward_eval`` runs ``ema_model`` in eval mode, as its name says, and restores the mode;
      ema-pytorch leaves the mode as it is (a BatchNorm copy in train mode then rewrites its
      averaged statistics).
    - ``use_foreach`` is accepted and ignored: polyak picks its multi-tensor kernel (the same
      numbers). ``coerce_dtype`` is always on (averages are cast where dtypes differ).
      ``allow_different_devices``: an ``ema_model`` on the CPU beside a CUDA model keeps the
      averages in host memory (polyak's ``offload="cpu"``); other splits raise a ValueError.
    - ``ignore_names``, ``ignore_startswith_names`` and ``param_or_buffer_names_no_ema`` are read
      at construction (ema-pytorch reads them at each update).
    - A model that is not an ``nn.Module`` (ema-pytorch's ``EMAPytree``) raises a TypeError: use
      ``polyak.EMA(tensors.items())`` for a dict of tensors.
    """

    def __new__(cls, model: Any, *args: Any, **kwargs: Any) -> EMA:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"polyak.compat.ema_pytorch.EMA averages an nn.Module, got "
                f"{type(model).__name__} (ema-pytorch builds an EMAPytree for that, which polyak "
                f"does not replace); for a dict of tensors use polyak.EMA(tensors.items(), decay)."
            )
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        ema_model: nn.Module | Callable[[], nn.Module] | None = None,
        beta: float = 0.9999,
        update_after_step: int = 100,
        update_every: int = 10,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        min_value: float = 0.0,
        param_or_buffer_names_no_ema: Iterable[str] = frozenset(),
        ignore_names: Iterable[str] = frozenset(),
        ignore_startswith_names: Iterable[str] = frozenset(),
        include_online_model: bool = True,
        allow_different_devices: bool = False,
        use_foreach: bool = False,
        update_model_with_ema_every: int | None = None,
        update_model_with_ema_beta: float = 0.0,
        forward_method_names: tuple[str, ...] = (),
        move_ema_to_online_device: bool = False,
        coerce_dtype: bool = False,
        lazy_init_ema: bool = False,
    ) -> None:
        super().__init__()
        schedules.inverse_gamma(inv_gamma, power, max_decay=beta, min_decay=min_value)  # checks
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(
                f"update_every must be a positive int, got update_every={update_every!r}."
            )
        if not isinstance(param_or_buffer_names_no_ema, (set, frozenset, list, tuple)):
            raise TypeError(
                f"param_or_buffer_names_no_ema must be a set or list of names, got "
                f"{type(param_or_buffer_names_no_ema).__name__}."
            )
        self.beta = beta
        self.is_frozen = beta == 1.0
        self.include_online_model = include_online_model
        if include_online_model:
            self.online_model = model
        else:
            self.online_model = [model]  # kept out of the module tree (and the state dict)
        if not isinstance(ema_model, nn.Module) and callable(ema_model):
            ema_model = ema_model()
        self.ema_model: nn.Module | None = None
        self.forward_method_names = forward_method_names
        self.update_every = update_every
        self.update_after_step = update_after_step
        self.inv_gamma = inv_gamma
        self.power = power
        self.min_value = min_value
        self.param_or_buffer_names_no_ema = param_or_buffer_names_no_ema
        self.ignore_names = ignore_names
        self.ignore_startswith_names = ignore_startswith_names
        self.update_model_with_ema_every = update_model_with_ema_every
        self.update_model_with_ema_beta = update_model_with_ema_beta
        self.allow_different_devices = allow_different_devices
        self.coerce_dtype = coerce_dtype
        self.move_ema_to_online_device = move_ema_to_online_device
        self.use_foreach = use_foreach
        self.inplace_copy = partial(
            inplace_copy, auto_move_device=allow_different_devices, coerce_dtype=coerce_dtype
        )
        self.inplace_lerp = partial(
            inplace_lerp, auto_move_device=allow_different_devices, coerce_dtype=coerce_dtype
        )
        self._mirror: Mirror | None = None
        self._calls = 0  # the step buffer, on the host (never read back from the device)
        self._initted = False
        if not lazy_init_ema:
            self.init_ema(ema_model)
        elif ema_model is not None:
            raise ValueError(
                "lazy_init_ema=True builds ema_model at the first update(); pass ema_model=None "
                "with it, or lazy_init_ema=False to use the ema_model given."
            )
        self.register_buffer("initted", torch.tensor(False))
        self.register_buffer("step", torch.tensor(0))
        self.register_load_state_dict_post_hook(lambda module, keys: self._loaded())

    # ------------------------------------------------------------------ construction

    @property
    def model(self) -> nn.Module:
        """The online model (the one being trained)."""
        return self.online_model if self.include_online_model else self.online_model[0]

    def _ignored(self, name: str) -> bool:
        return name in self.ignore_names or any(
            name.startswith(prefix) for prefix in self.ignore_startswith_names
        )

    def init_ema(self, ema_model: nn.Module | None = None) -> None:
        """Take ``ema_model`` (default: a deep copy of the model) as the averaged copy."""
        if ema_model is None:
            try:
                ema_model = copy.deepcopy(self.model)
            except Exception as error:
                raise TypeError(
                    f"the model could not be deep-copied ({error}); pass ema_model=... (a module "
                    f"of the same architecture, or a function returning one), e.g. for a model "
                    f"with LazyLinear layers."
                ) from error
        self.ema_model = ema_model
        for param in ema_model.parameters():
            param.detach_()
        for name in self.forward_method_names:
            setattr(self, name, self._refreshed(getattr(ema_model, name)))
        self.parameter_names = {
            n for n, p in ema_model.named_parameters() if p.is_floating_point() or p.is_complex()
        }
        self.buffer_names = {
            n for n, b in ema_model.named_buffers() if b.is_floating_point() or b.is_complex()
        }
        skip = set(self.param_or_buffer_names_no_ema)
        self._mirror = Mirror(
            self.model,
            ema_model,
            decay=_Decay(self),
            update_every=self.update_every,
            buffers="average",
            include=lambda name, tensor: name not in skip and not self._ignored(name),
        )
        tracked = set(self._mirror.ema.names())
        names = sorted(self.parameter_names | self.buffer_names)
        # what ema-pytorch touches that polyak does not average: copied by hand where it copies
        self._untracked = [n for n in names if n not in tracked]
        self._no_ema = [n for n in names if n in skip and not self._ignored(n)]
        if self._initted:  # a lazy copy made after a checkpoint's counters were loaded
            self._sync_counters()

    def _refreshed(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self._mirror is not None:
                self._mirror.refresh()
            return method(*args, **kwargs)

        return call

    # ------------------------------------------------------------------ the update

    def get_current_decay(self) -> float:
        """The decay of an update at the current ``step`` (ema-pytorch's, in double precision)."""
        return _Decay(self, frozen=False)(self._calls - 1)

    def update(self) -> None:
        """Call after every optimizer step (see the class docstring for what each call does)."""
        n = self._calls
        # a plain int, set past nn.Module.__setattr__'s checks for parameters and submodules
        object.__setattr__(self, "_calls", n + 1)
        self.step.add_(1)
        if not self._initted:
            if self.ema_model is None:
                self.init_ema()
            self.copy_params_from_model_to_ema()
            self._initted = True
            self.initted.fill_(True)
            self._sync_counters()
            return
        assert self._mirror is not None
        if self.move_ema_to_online_device:
            assert self.ema_model is not None
            online = next(self.model.parameters()).device
            if next(self.ema_model.parameters()).device != online:
                self._mirror.refresh()
                self.ema_model.to(online)
        self._mirror.ensure()
        self._mirror.ema.update()  # averages (or copies, in the warm-up) when n % k == 0
        self._mirror.updated()
        if n % self.update_every == 0:
            if n <= self.update_after_step:
                self._copy_by_hand(self._untracked)
                return
            if not self.is_frozen:
                self._copy_by_hand(self._no_ema)
        every = self.update_model_with_ema_every
        if every is not None and n % every == 0:
            self.update_model_with_ema()

    def _copy_by_hand(self, names: list[str]) -> None:
        if not names:
            return
        assert self._mirror is not None and self.ema_model is not None
        source, target = named_state(self.model), named_state(self.ema_model)
        with torch.no_grad():
            for name in names:
                self.inplace_copy(target[name].data, source[name].data)

    def _sync_counters(self) -> None:
        """polyak's step is ema-pytorch's ``step - 1`` (the first call only copies)."""
        if self._mirror is not None:
            ema = self._mirror.ema
            ema.step = max(self._calls - 1, 0)
            ema.num_averages = ema.step // self.update_every

    def _loaded(self) -> None:
        self._calls = int(self.step)
        self._initted = bool(self.initted)
        self._sync_counters()

    # ------------------------------------------------------------------ copies both ways

    def get_params_iter(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        """``model``'s floating parameters that the EMA keeps, by name."""
        for name, param in model.named_parameters():
            if name in self.parameter_names:
                yield name, param

    def get_buffers_iter(self, model: nn.Module) -> Iterator[tuple[str, Tensor]]:
        """``model``'s floating buffers that the EMA keeps, by name."""
        for name, buffer in model.named_buffers():
            if name in self.buffer_names:
                yield name, buffer

    def _pairs(self, target: nn.Module, source: nn.Module) -> list[tuple[Tensor, Tensor]]:
        sources = dict(self.get_params_iter(source))
        sources.update(self.get_buffers_iter(source))
        pairs = [(t, sources[n]) for n, t in self.get_params_iter(target)]
        return pairs + [(t, sources[n]) for n, t in self.get_buffers_iter(target)]

    @torch.no_grad()
    def copy_params_from_model_to_ema(self) -> None:
        """The averages become the model's current weights and floating buffers."""
        assert self._mirror is not None and self.ema_model is not None
        self._mirror.refresh()
        for tgt, src in self._pairs(self.ema_model, self.model):
            self.inplace_copy(tgt.data, src.data)
        self._mirror.loaded()  # cast copies written back into the averages

    @torch.no_grad()
    def copy_params_from_ema_to_model(self) -> None:
        """The model's weights and floating buffers become the averages."""
        assert self._mirror is not None and self.ema_model is not None
        self._mirror.refresh()
        for tgt, src in self._pairs(self.model, self.ema_model):
            self.inplace_copy(tgt.data, src.data)

    def update_model_with_ema(self, decay: float | None = None) -> None:
        """Pull the model towards the averages (``decay`` of the model kept; 0 copies)."""
        decay = self.update_model_with_ema_beta if decay is None else decay
        if decay == 0.0:
            return self.copy_params_from_ema_to_model()
        assert self.ema_model is not None
        self.update_moving_average(self.model, self.ema_model, decay)
        return None

    @torch.no_grad()
    def update_moving_average(
        self, ma_model: nn.Module, current_model: nn.Module, current_decay: float | None = None
    ) -> None:
        """``ma_model``'s tensors move towards ``current_model``'s by ``1 - current_decay``
        (default :meth:`get_current_decay`); names skipped and copied as in :meth:`update`. Runs
        tensor by tensor: :meth:`update` uses polyak's engine for the EMA itself."""
        if self.is_frozen:
            return
        if self._mirror is not None:
            self._mirror.refresh()
        decay = self.get_current_decay() if current_decay is None else current_decay
        sources = dict(self.get_params_iter(current_model))
        sources.update(self.get_buffers_iter(current_model))
        targets = dict(self.get_params_iter(ma_model))
        targets.update(self.get_buffers_iter(ma_model))
        skip = set(self.param_or_buffer_names_no_ema)
        for name, tgt in targets.items():
            if self._ignored(name):
                continue
            if name in skip:
                self.inplace_copy(tgt.data, sources[name].data)
            else:
                self.inplace_lerp(tgt.data, sources[name].data, 1.0 - decay)
        if self._mirror is not None and ma_model is self.ema_model:
            self._mirror.loaded()

    # ------------------------------------------------------------------ running the averages

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run ``ema_model`` (ema-pytorch's ``EMA`` has no ``forward`` of its own)."""
        assert self.ema_model is not None
        return self.ema_model(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run ``ema_model``, as calling the EMA does."""
        return self(*args, **kwargs)

    def eval(self) -> nn.Module:
        """``ema_model.eval()`` (the EMA's own mode is left alone, as in ema-pytorch)."""
        assert self.ema_model is not None
        return self.ema_model.eval()

    @torch.no_grad()
    def forward_eval(self, *args: Any, **kwargs: Any) -> Any:
        """Run ``ema_model`` in eval mode without gradients; its mode is restored after."""
        assert self.ema_model is not None
        training = self.ema_model.training
        self.ema_model.eval()
        try:
            return self.ema_model(*args, **kwargs)
        finally:
            self.ema_model.train(training)

    def restore_ema_model_device(self) -> None:
        """Move ``ema_model`` back to the device of the EMA's buffers."""
        assert self.ema_model is not None
        if self._mirror is not None:
            self._mirror.refresh()
        self.ema_model.to(self.initted.device)
        if self._mirror is not None:
            self._mirror.ensure()

    def add_to_optimizer_post_step_hook(self, optimizer: torch.optim.Optimizer) -> Any:
        """Call :meth:`update` after every ``optimizer.step()``; returns the hook's handle."""

        def hook(*_: Any) -> None:
            self.update()

        return optimizer.register_step_post_hook(hook)

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        """``ema.to(...)`` / ``.cuda()`` / ``.half()``: the averages follow ``ema_model``."""
        if self._mirror is not None:
            self._mirror.refresh()
        out = super()._apply(fn, recurse)
        if self._mirror is not None:
            self._mirror.ensure()
        return out
