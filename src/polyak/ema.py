"""class EMA: the facade users see; it composes one module per idea and holds none of them itself.

- :mod:`polyak._options`: the constructor's arguments checked, the rule resolved from ``decay=``;
- :mod:`polyak._tracking`: the tracked ``(name, live tensor)``s, and following the model's changes;
- :mod:`polyak._store`: the shadows, keyed by (slot, name);
- :mod:`polyak.averagers`: the rule, which gives each update's weights and reads the averages;
- :mod:`polyak._steps`: the update counters, on the host or on the device (``capturable``);
- :mod:`polyak._finite`: keeping NaN/Inf out of the averages (``nonfinite``);
- :mod:`polyak._kernels`: how an update runs (kernel and execution policy);
- :mod:`polyak._switch` and :mod:`polyak._placement`: averages in and out of a model (seed 001);
- :mod:`polyak._export`, :mod:`polyak.io`: the averages as a state dict, a module, a file;
- :mod:`polyak._state`: the state-dict schema, its versions and their validation.

It knows names and modules; the rule knows steps; the kernel knows lists of tensors.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import nn

from polyak import _export, _finite, _kernels, _options, _placement, _state, _tracking, io
from polyak._kernels._engine import Policy, optimizer_owned
from polyak._options import DEFAULT_DECAY, DecayLike
from polyak._steps import DeviceSteps, HostSteps
from polyak._store import ShadowStore, is_dtensor, local
from polyak._switch import ModeSwitch, Switch
from polyak._tracking import Include, Watch, dtype_name, named_pairs, named_tensors, unwrap
from polyak.averagers import Exponential, Rule
from polyak.bn import BatchNormMonitor

__all__ = ["EMA", "LoadedSettingsWarning"]

FORMAT = _state.FORMAT
# averaging updates after which update() asks the BatchNorm monitor whether statistics went stale
# (then every 1000th); counted in averaging updates so that update_every=k cannot skip them
_BN_CHECKS = frozenset({1, 10, 100})


class LoadedSettingsWarning(UserWarning):
    """:meth:`EMA.load_state_dict` replaced the EMA's decay schedule or ``update_every`` with the
    checkpoint's."""


class EMA:
    r"""Exponential moving average of a model's weights, kept in shadow tensors beside the model.

    After every optimizer step, :meth:`update` moves each shadow towards its weight:

    .. math:: s \leftarrow d\, s + (1 - d)\, \theta \qquad (\text{``s.lerp_(θ, 1 - d)``})

    with ``d = decay(step)``. :attr:`step` counts calls of :meth:`update`, one per optimizer step; it
    is incremented *before* the schedule is evaluated, so the first update sees ``step == 1``. Shadows
    start from the weights at construction, so with a constant decay, after :math:`N` updates
    :math:`s_N = d^N \theta_0 + (1 - d) \sum_{i<N} d^i \theta_{N-i}`.

    Args:
        model: an ``nn.Module`` (DDP and ``torch.compile`` wrappers are unwrapped, so names match
            the plain model), or an iterable of ``(name, tensor)`` pairs.
        decay: a float in [0, 1], or a schedule: any callable ``step -> decay`` (see
            :mod:`polyak.schedules`). Built-in schedules are stored in :meth:`state_dict`.
        rule: instead of ``decay``, another averaging rule (:mod:`polyak.averagers`), e.g.
            ``rule=polyak.averagers.Uniform()`` for SWA's running mean, ``LAWA(k)``, ``BEMA()``,
            or ``SwitchEMA(d, every=steps_per_epoch)`` (the average written back into the
            weights every ``every`` steps, at the end of :meth:`update`); ``decay=d`` is
            ``rule=polyak.averagers.Exponential(d)``. Not both. The EMA advances the rule object
            it is given (its state, such as Uniform's count, is in :meth:`state_dict`), so give
            each EMA its own. A rule with several slots
            (:class:`polyak.averagers.Exponentials`, ``BEMA``, ``LAWA``) keeps each of them.
        buffers: ``"average"`` (floating buffers such as BatchNorm statistics averaged like weights,
            integer buffers such as ``num_batches_tracked`` copied), ``"copy"`` (every buffer copied
            at each update) or ``"none"`` (buffers not tracked; exports take them from the model).
        update_every: average on calls ``k, 2k, 3k, ...`` of :meth:`update` only, with the decay
            multiplied over the ``k`` steps covered (``d ** k`` for a constant), so the horizon in
            optimizer steps is unchanged while the cost drops ``k``-fold. :attr:`step` still counts
            every call; :attr:`num_averages` counts the averaging updates.
        shadow_dtype: dtype of the shadows of floating tensors. ``None`` keeps each tensor's dtype,
            except that bf16/fp16 tensors get fp32 shadows (a bf16 shadow cannot move by less than
            1/256 of its value, so slow averages stall).
        include: a predicate ``(name, tensor) -> bool`` choosing the tracked tensors. Parameters
            with ``requires_grad=False`` are never tracked: they keep no shadow, and exports take
            them from the live model.
        kernel: ``"auto"``, ``"fused"``, ``"triton"``, ``"foreach"`` or ``"reference"`` (see
            :mod:`polyak._kernels`); ``repr(ema)`` shows the one chosen. ``auto`` takes ``triton``
            for CUDA shadows where it is installed and fits, else ``foreach`` (``fused`` for
            stochastic rounding and capturable bf16/fp16 shadows off CUDA), and chooses again when
            ``ema.to(device)`` moves the shadows (:func:`polyak._kernels.auto_kernel`).
        rounding: ``"nearest"``, or ``"stochastic"`` for bf16 shadows
            (``shadow_dtype=torch.bfloat16``): half the memory of fp32 shadows, and tiny updates
            still accumulate in expectation. ``seed`` seeds its private random stream (the global
            RNG is never touched), so a run is reproducible.
        stream: ``None`` (inline) or ``"side"``: on CUDA, run the update on a side stream that
            overlaps the next forward pass; ``optimizer.step()`` and every read of the shadows wait
            for it on the device (no host sync). Tracked tensors that are not ``nn.Parameter``
            (buffers, which that forward pass writes) are first copied on the caller's stream.
        offload: ``None`` or ``"cpu"``: keep the shadows (every slot of the rule: LAWA's ``k``
            checkpoints, as its papers keep them on the CPU) in pinned host memory and update them
            on a worker thread from a non-blocking device-to-host copy, for shadows that do not
            fit on the GPU. At most one update is in flight; the next ``update()`` waits for the
            previous one.
        capturable: keep the step counter on the device and compute the decay there, so that
            ``update()`` can be captured in a CUDA graph (built-in schedules only; with
            ``update_every=k`` the lerp runs every call with weight 0 off the k-th steps, and copied
            buffers are copied every call, as is the stochastic-rounding stream advanced: unbiased
            as ever, but not the bits of a non-capturable run). :attr:`step` is read from the
            device when asked for. Call ``update()`` once before capturing (the kernels compile at
            their first call), as capturable optimizers are warmed up. A graph keeps the storage
            it was captured with: to run a captured forward on the averages, use ``store()``,
            ``copy_to()`` and ``restore()`` (copies in place), not ``swapped()`` (which re-points
            the parameters). All tracked tensors must be on one device.
        nonfinite: what happens when NaN or Inf meets the averages (once in a shadow, it never
            leaves it). ``"detect"`` (default): updates are not checked (they cost nothing more),
            and the next call that reads the averages (:meth:`swapped`, :meth:`use_averages`,
            :meth:`copy_to`, exports, :meth:`save`, :meth:`state_dict`, :meth:`save_state`)
            raises :class:`polyak.errors.NonFiniteError` naming the tensors whose averages hold
            NaN/Inf: never used or saved silently, but lost (load a checkpoint). ``"raise"``:
            each averaging update is checked; a non-finite one and every later one leave the
            averages as they were before it, and the next reading call raises naming the tensors
            and the step, until a load or :meth:`clear_nonfinite`. ``"skip"``: such an update
            leaves every shadow untouched and is counted in :attr:`skipped_steps`; :attr:`step`
            still counts the call (a schedule advances over a skipped step), and so does a
            rule's own state (``Uniform``'s count): with a constant decay the averages are those
            of the run without the skipped updates, bit for bit. ``"ignore"``: no check. The
            per-update check of ``"raise"``/``"skip"`` reads every tracked tensor once more
            (1.3-2.1x the update on the CPU bench workloads) and is decided on the device,
            without a host sync; under FSDP2 the ranks agree through an all-reduce
            (:mod:`polyak._finite`).

    The tracked names are fixed at construction; the tensors behind them are followed: when the
    model replaces one by a tensor of the same shape (``load_state_dict(..., assign=True)``, a new
    layer) or changes its dtype (``model.half()``), the next update averages what the model holds
    (shadows re-cast by the dtype policy); a removed, reshaped or moved tensor raises an error
    naming it (see :mod:`polyak._tracking`). ``EMA`` is a plain object, not an ``nn.Module``:
    stored as a model attribute it does not add the shadows to the model's state dict;
    ``copy.deepcopy`` copies it onto the copied tensors, and pickling it raises (save
    :meth:`state_dict` instead).

    BatchNorm (seed 004): ``update()`` checks after averaging updates 1, 10, 100 and every 1000th, from version
    counters alone (no sync), that layers whose weights moved also saw a training-mode forward, and
    warns once per layer with :class:`polyak.bn.StaleBatchNormWarning` if not (a model left in
    ``eval()`` mode while training). With ``buffers="none"``, entering :meth:`swapped` /
    :meth:`use_averages` warns if the averages moved since statistics were last recomputed.
    Silence it with ``warnings.filterwarnings("ignore", category=StaleBatchNormWarning)``.
    """

    rule: Rule

    def __init__(
        self,
        model: nn.Module | Iterable[tuple[str, torch.Tensor]],
        decay: DecayLike = DEFAULT_DECAY,
        *,
        rule: Rule | None = None,
        buffers: Literal["average", "copy", "none"] = "average",
        update_every: int = 1,
        shadow_dtype: torch.dtype | None = None,
        include: Include | None = None,
        kernel: str = "auto",
        rounding: Literal["nearest", "stochastic"] = "nearest",
        seed: int = 0,
        stream: Literal["side"] | None = None,
        offload: Literal["cpu"] | None = None,
        capturable: bool = False,
        nonfinite: Literal["detect", "raise", "skip", "ignore"] = _finite.DEFAULT,
    ) -> None:
        self.rule = _options.rule_from(
            decay,
            rule,
            buffers=buffers,
            update_every=update_every,
            shadow_dtype=shadow_dtype,
            include=include,
            stream=stream,
            offload=offload,
            capturable=capturable,
        )
        self.buffers = buffers
        self.update_every = update_every
        self.shadow_dtype = shadow_dtype
        self.rounding = rounding
        self.seed = seed
        self.stream = stream
        self.offload = offload
        self.capturable = capturable

        if isinstance(model, nn.Module):
            self.model: nn.Module | None = unwrap(model)
            named = named_tensors(self.model, include, buffers)
        else:
            self.model = None
            named = named_pairs(model, include)

        _options.check_tracked(named, capturable)

        # name -> live tensor (the Parameter/buffer object itself, so .data swaps are seen), in
        # model order; the shadows of every slot the rule keeps, by the store's dtype policy
        self._live: dict[str, torch.Tensor] = {name: tensor for name, tensor, _ in named}
        self._store = ShadowStore(
            named, _state.rule_slots(self.rule), shadow_dtype=shadow_dtype, offload=offload
        )
        self._averaged, self._copied = self._store.averaged, self._store.copied
        _options.check_rounding(rounding, {n: self._store.shadow(n) for n in self._averaged})
        self._kernel_request = kernel
        self.kernel = self._choose_kernel()
        # nonfinite=: the floating tracked tensors, checked before each averaging update
        floating = [n for n, t in self._live.items() if t.is_floating_point()]
        where = local(self._live[floating[0]]).device if floating else torch.device("cpu")
        self._finite = _finite.NonFinite(nonfinite, floating, where)
        # the counters, and with capturable=True the rule's state, beside the tracked tensors
        self._steps: HostSteps | DeviceSteps = HostSteps()
        if capturable:
            device = self._live[next(iter(self._live))].device
            self._steps = DeviceSteps(device, update_every, self.rule)
        self._engine: Policy | None = None
        self._plan()

        # seed 001: whether the model holds its own weights or the averages, and the way back
        self._switch = Switch(self.model)

    # ------------------------------------------------------------------ tracking

    def _choose_kernel(self) -> str:
        """The kernel asked for, checked, or ``auto``'s pick for the shadows where they are now."""
        shadows, sources = self._store.slot_lists()[0], self._sources(self._averaged)
        return _kernels.choose(
            self._kernel_request,
            shadows,
            rounding=self.rounding,
            capturable=self.capturable,
            sources=sources,
        )

    def _sources(self, names: list[str]) -> list[torch.Tensor]:
        """The live tensors of ``names`` as the kernels take them: DTensors (FSDP2) as their local
        shards, which is all a rank updates (an elementwise lerp needs no communication) and which
        every kernel, compiled ones included, handles as plain tensors (the store hands the
        shadows over the same way). Made once per plan: the watch notices a replaced shard."""
        return [local(self._live[n]) for n in names]

    def _plan(self, watch: bool = True) -> None:
        """Build the engine (kernel plans and execution policy), the watch over the model's
        tensors and the BatchNorm monitor; at init and whenever shadows or tensors move.

        The stochastic-rounding stream's counter carries over to the new plan, so re-planning never
        re-uses random bits.
        """
        counter = self._rng_counter()
        policy = "offload" if self.offload else ("side" if self.stream else "inline")
        if self._kernel_request == "auto":  # moved shadows (ema.to) may call for another kernel
            self.kernel = self._choose_kernel()
        self._warm = False  # whether the new plan ran once (it compiles then): not in a capture
        self._engine = _kernels.Engine(
            _kernels.builder(
                self.kernel,
                rounding=self.rounding,
                seed=self.seed,
                positions=self._store.positions() if self.rounding == "stochastic" else None,
            ),
            _kernels.builder("foreach" if self.kernel in ("fused", "triton") else self.kernel),
            (self._store.slot_lists(), self._sources(self._averaged)),
            (self._store.copy_list(), self._sources(self._copied)),
            policy,
            owned=[optimizer_owned(self._live[n]) for n in self._averaged + self._copied],
        )
        self._write_back = self._plan_write_back()
        if counter is not None:
            self._set_rng_counter(counter)
        self._finite.plan(
            {n: local(self._live[n]) for n in self._finite.names},
            capturable=self.capturable,
            host_devices=_kernels.host_gate_devices(),
            live=[self._live[n] for n in self._finite.names],
        )
        if watch:
            self._watch_model()
        else:  # the model is not ready to be looked at: look at the first use
            self._watch = Watch(None, self._live)
            self._watch.dirty = True
            self._bn_monitor = None

    def _plan_write_back(self) -> _placement.WriteBack | None:
        """For a rule that switches its average into the weights (``rule.switches``,
        :class:`~polyak.averagers.SwitchEMA`): the planned copy of each averaged tensor's average
        (the rule's read, which must be one of its slots itself) into the live tensor; else None.
        Copied tensors are left out: after an averaging update they hold the model's values."""
        if not callable(getattr(self.rule, "switches", None)):
            return None
        values = []
        for name in self._averaged:
            averages = [self._store.shadow(name, slot) for slot in self._store.slots]
            value = self.rule.read(averages, self._live[name])
            if not any(value is average for average in averages):
                raise TypeError(
                    f"the rule {self.rule!r} switches its average into the weights, but its read "
                    f"of {name!r} is not one of its slots (it computes a new tensor); a rule that "
                    f"switches must read one slot as is, as SwitchEMA does."
                )
            values.append(value)
        return _placement.WriteBack([self._live[n] for n in self._averaged], values)

    def _watch_model(self) -> None:
        """Watch the model's tensors (:mod:`polyak._tracking`) and its BatchNorm statistics."""
        self._watch = Watch(self.model, self._live)
        # seed 004: statistics that never move while the weights do (warned once, per layer)
        self._bn_monitor = None
        if self.model is not None and not self.capturable:
            monitor = BatchNormMonitor(self.model)
            self._bn_monitor = monitor if monitor.layers else None

    def _rng_counters(self) -> list[torch.Tensor]:
        """The stochastic-rounding stream's update counters (one per device; empty if none)."""
        state = getattr(self._engine and self._engine.avg, "state", None)
        if self.rounding != "stochastic" or state is None:
            return []
        return list(state.counters.values())

    def _rng_counter(self) -> torch.Tensor | None:
        counters = self._rng_counters()
        return counters[0].detach().clone() if counters else None

    def _set_rng_counter(self, value: int | torch.Tensor) -> None:
        for counter in self._rng_counters():
            counter.copy_(torch.as_tensor(value, dtype=torch.int64))

    def _ensure_current(self) -> None:
        """Follow the model if it no longer holds the planned tensors (see :mod:`polyak._tracking`).

        A tensor replaced by one of the same shape (``load_state_dict(..., assign=True)``, a layer
        swapped for a fresh one) is followed: its shadow stays and averages the new tensor. A
        changed dtype (``model.half()``) is followed too, the shadow re-cast by the dtype policy
        (bf16/fp16 tensors keep fp32 shadows). A tensor that is gone, changed shape or moved to
        another device raises an error that names it, before anything is changed.
        """
        if self._watch.stale():
            self._follow(self._changes_to_follow())

    def _changes_to_follow(
        self, device: torch.device | None = None
    ) -> dict[str, tuple[torch.Tensor, str]]:
        """The tracked tensors the model replaced or re-cast, checked to be followable
        (:func:`polyak._tracking.followable`; ``device``: where the EMA is being moved).

        FSDP2 modules are resharded first: a root module keeps its gathered (plain) parameters
        after a forward pass without gradients, which are not the tensors the EMA averages.
        """
        _placement.reshard(self.model)
        return _tracking.followable(self._watch, self.model, self._live, self._shapes(), device)

    def _shapes(self) -> dict[str, torch.Size]:
        """name -> the shape of its average, for every tracked name in model order."""
        return {n: self._store.shadow(n).shape for n in self._live}

    def _follow(
        self, changes: Mapping[str, tuple[torch.Tensor, str]], replan: bool = False
    ) -> None:
        """Average the model's tensors now: re-point, re-cast shadows by the dtype policy, re-plan
        (only the watch is renewed if nothing the EMA averages changed, unless ``replan``)."""
        if not changes and not replan:
            self._watch_model()
            return
        for name, (tensor, _) in changes.items():
            self._live[name] = tensor
            self._store.recast(name, tensor)  # keeps the objects: average(name) callers hold them
        self._engine.wait()
        self._plan()

    # ------------------------------------------------------------------ counters

    @property
    def step(self) -> int:
        """Calls of :meth:`update` so far (an int; read from the device when capturable)."""
        return self._steps.step

    @step.setter
    def step(self, value: int) -> None:
        self._steps.step = int(value)

    @property
    def num_averages(self) -> int:
        """Averaging updates so far: ``step // update_every``."""
        return self._steps.num_averages

    @num_averages.setter
    def num_averages(self, value: int) -> None:
        self._steps.num_averages = int(value)

    # ------------------------------------------------------------------ the update

    @property
    def schedule(self) -> Callable[[int], Any] | None:
        """The decay schedule ``step -> decay`` (a constant decay is ``schedules.constant(d)``);
        ``None`` where the rule is not :class:`~polyak.averagers.Exponential`."""
        return self.rule.decay if isinstance(self.rule, Exponential) else None

    @schedule.setter
    def schedule(self, value: Callable[[int], Any]) -> None:
        if isinstance(self.rule, Exponential):  # a SwitchEMA keeps switching
            self.rule = dataclasses.replace(self.rule, decay=value)
        else:
            self.rule = Exponential(value)

    def update(self) -> None:
        """Call once per optimizer step: ``step += 1``, then average if ``step % update_every == 0``.

        Never synchronises the host with the device: the weight is a Python float from the rule
        (:data:`polyak.averagers.HOST`), and the kernel was planned at construction. With
        ``capturable=True`` the rule's same formulas run on the device
        (:class:`polyak.averagers.DeviceOps`). With ``nonfinite="ignore"`` it allocates nothing;
        the NaN/Inf check of ``"raise"`` and ``"skip"`` (:mod:`polyak._finite`) reads every tracked
        tensor once more and gets one 0-dim norm per tensor from ``torch._foreach_norm`` (on CUDA
        from the caching allocator), and its device gate makes the ``foreach`` kernel on CUDA run
        its gated path (a select through a scratch: about 4x the memory traffic of an ungated
        update; ``triton`` and ``fused`` gate inside their one pass).

        A rule that switches (:class:`polyak.averagers.SwitchEMA`) then writes the average into
        the model's weights where it says so, ``θ ← s``, cast to the weights' dtypes (planned in
        :mod:`polyak._placement`): after waiting for the update (``stream="side"``: the caller's
        stream waits, on the device; ``offload="cpu"``: the host waits, at those steps only), or
        gated on the device under ``capturable=True``.
        """
        self._switch.check_update()
        self._ensure_current()
        if isinstance(self._steps, DeviceSteps):
            if not self._warm:
                if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
                    raise RuntimeError(
                        "the first capturable ema.update() is being captured in a CUDA graph, but "
                        "its kernel compiles (and plans) at that first call, which capture does "
                        "not allow. Call ema.update() once before torch.cuda.graph(...), e.g. in "
                        "the warm-up steps that capturable optimizers need too."
                    )
                self._warm = True
            with torch.no_grad():
                # an off-step is skipped on the device by the gate, not lerped by weight 0,
                # which would let a NaN in the weights through (0 * nan = nan)
                weights, off = self._steps.tick(self.rule, self.update_every)
                gate, copy_gate = self._finite_gates(self._steps.device_step, off)
                self._engine.run(weights, gate, copy_gate)
                if self._write_back is not None:
                    self._write_back(self._steps.switch_gate(self.rule, self.update_every))
            return
        weights = self._steps.tick(self.rule, self.update_every)
        if weights is None:
            return
        with torch.no_grad():
            gate, copy_gate = self._finite_gates(self._steps.step)
            try:
                self._engine.run(weights, gate, copy_gate)
            except RuntimeError as error:  # say why, where the model's tensors explain it
                explained = _tracking.failed_update(error, self._watch, self.model, self._live)
                if explained is None:
                    raise
                raise explained from error
        self._steps.averaged(self.rule)
        if self._write_back is not None and self._steps.switches(self.rule, self.update_every):
            self._engine.wait()  # the average is complete (side stream, offload worker)
            self._write_back()
        if self._bn_monitor is not None:
            if self.buffers == "none":
                self._bn_monitor.note_update()
            number = self._steps.num_averages
            if number in _BN_CHECKS or number % 1000 == 0:
                self._bn_monitor.check()

    def _finite_gates(
        self, step: int | torch.Tensor, off: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This update's gates (lerp, copies) from the non-finite check (``off``: a capturable
        off-step's gate, passed through); the check's buffers are rewritten only once the last
        update has read them (side stream: a device wait; offload: the update in flight)."""
        if not self._finite.active:
            return off, None
        self._engine.wait()
        return self._finite.gate(step, off)

    @property
    def skipped_steps(self) -> int:
        """Averaging updates that left the averages untouched because the tracked tensors held NaN
        or Inf (``nonfinite="skip"``; under ``"raise"``: the one that tripped it and every one
        since). A device counter, read (and synchronised) only when asked for."""
        return int(self._finite.skipped)

    def clear_nonfinite(self) -> None:
        """After :class:`polyak.errors.NonFiniteError` (``nonfinite="raise"``): average on from the
        averages as they were kept, those of the update before the non-finite one."""
        self._finite.clear()

    def _check_finite(self) -> None:
        """At a point that reads the averages anyway: ``nonfinite="raise"``: raise if an update
        met NaN/Inf (reads one flag); ``"detect"``: raise if a shadow holds NaN/Inf (one
        max-norm per shadow, one flag read per device and dtype)."""
        self._finite.raise_if_tripped()
        self._finite.detect(self._averaged, self._store.slot_lists())

    @property
    def decay(self) -> float:
        """The decay the next averaging update will use: ``1 - weight`` (for the exponential rule
        the product of the decays over the ``update_every`` steps it covers)."""
        nxt = (self.step // self.update_every + 1) * self.update_every
        return 1.0 - float(self.rule.weights(nxt - self.update_every + 1, nxt)[0])

    # ------------------------------------------------------------------ reading averages

    @property
    def slots(self) -> tuple[str, ...]:
        """The names of the averages kept of every tracked tensor: the rule's slots (``("ema",)``
        for an exponential average; one per decay for :class:`polyak.averagers.Exponentials`)."""
        return self._store.slots

    def average(self, name: str, slot: str | None = None) -> torch.Tensor | None:
        """The average of ``name`` (``None`` if the name is not tracked).

        ``slot=None``: the rule's reading of its slots (:meth:`polyak.averagers.Rule.read`): for
        a rule that reads one slot (Exponential, Uniform; a multi-slot rule's first by default)
        the shadow tensor itself, which later updates change in place. ``slot="name"``: that
        slot's shadow itself. Copied tensors have one shadow, shared by every slot.
        """
        self._check_slot(slot)
        if name not in self._live:
            return None
        self._engine.wait()
        return self._value(name, slot)

    def names(self) -> list[str]:
        """The tracked names, in model order."""
        return list(self._live)

    def _check_slot(self, slot: str | None) -> None:
        if slot is not None and slot not in self._store.slots:
            raise ValueError(
                f"slot={slot!r} is not an average this EMA keeps; its rule {self.rule!r} keeps "
                f"the slots {list(self._store.slots)}. Pass one of them, or slot=None for the "
                f"rule's reading of its slots."
            )

    def _value(self, name: str, slot: str | None = None) -> torch.Tensor:
        """What the averages of ``name`` put into a model: ``slot``'s shadow, or the rule's
        reading of every slot (the first slot's shadow itself unless the rule reads otherwise)."""
        if slot is not None or name in self._copied:
            return self._store.shadow(name, slot)
        averages = [self._store.shadow(name, s) for s in self._store.slots]
        current = self._live[name]
        if current.device != averages[0].device:  # offloaded shadows: read where they are
            current = current.detach().to(averages[0].device)
        return self.rule.read(averages, current)

    def _values(self, slot: str | None = None) -> dict[str, torch.Tensor]:
        """name -> :meth:`_value` for every tracked name, in model order, once no update is
        still writing the shadows."""
        self._engine.wait()
        return {name: self._value(name, slot) for name in self._live}

    def _targets(self, model: nn.Module | None) -> dict[str, torch.Tensor]:
        """The tensors of ``model`` (default: the tracked one) matched by name to the shadows."""
        if model is None or unwrap(model) is self.model:
            self._ensure_current()
            return self._live
        return _tracking.matched(unwrap(model), self._shapes())

    # ------------------------------------------------------------------ swapping (polyak._switch)

    def _swap_in(self, model: nn.Module | None, slot: str | None) -> None:
        self._check_finite()
        self._warn_if_statistics_stale()
        self._check_slot(slot)
        self._switch.swap_in(model, lambda: self._targets(model), lambda: self._values(slot))

    @contextlib.contextmanager
    def swapped(
        self, model: nn.Module | None = None, *, slot: str | None = None
    ) -> Iterator[nn.Module | None]:
        """Inside the block the model holds the averaged weights; on exit its own come back.

        ``slot`` picks one of the averages a multi-slot rule keeps (:attr:`slots`); by default
        the rule's reading (:meth:`average`).

        Zero-copy when dtypes match (the model's tensors point at the shadows' storage and back: the
        restore is bit for bit because nothing is copied); otherwise the averages are cast into new
        tensors and the model's own are kept aside. FSDP2 (DTensor) parameters are read from their
        own shards, so there the averages are copied into each local shard and the shard's own
        values copied back on exit, bit for bit (:mod:`polyak._placement`). The model's weights
        come back also when the block raises. Do not train inside the block: it would write to the
        shadows.
        """
        self._switch.check_idle("enter ema.swapped()")
        self._swap_in(model, slot)
        try:
            yield model if model is not None else self.model
        finally:
            self._switch.swap_out()

    def use_averages(self, slot: str | None = None) -> None:
        """Put the averages into the model (zero-copy swap); a no-op if they are already there.
        ``slot``: as in :meth:`swapped`."""
        if self._switch.state != "swapped":
            self._switch.check_idle("use_averages()")
            self._swap_in(None, slot)

    def _warn_if_statistics_stale(self) -> None:
        """With ``buffers="none"`` the averages run with the live BatchNorm statistics: say so
        once if the averages moved since statistics were last recomputed (``polyak.bn.update_bn``)."""
        if self._bn_monitor is not None and self.buffers == "none":
            self._bn_monitor.check_eval()

    def use_trained(self) -> None:
        """Put the trained weights back; a no-op if the model already holds them."""
        self._switch.leave()

    def bind_to_mode(self, model: nn.Module | None = None) -> ModeSwitch:
        """After this, ``model.eval()`` swaps the averages in and ``model.train()`` swaps them out.

        The seed's ``is_training`` switch without a second graph. Returns a handle whose
        ``remove()`` unbinds. The current mode applies at once.
        """
        return self._switch.bind(model, self.use_averages, self.use_trained)

    # ------------------------------------------------------------------ store / copy_to / restore

    def store(self, model: nn.Module | None = None) -> None:
        """Back up the model's current weights (for :meth:`restore`).

        A second ``store()`` before ``restore()`` keeps the first backup, so switching to the test
        weights twice can never overwrite the trained weights with the averages (seed 001).
        """
        self._switch.store(model, lambda: self._targets(model))

    def copy_to(self, model: nn.Module | None = None, *, slot: str | None = None) -> None:
        """Write the averages into the model's tensors in place (cast to their dtypes; FSDP2
        parameters: into each local shard, after resharding so the next forward gathers them).
        ``slot``: as in :meth:`swapped`."""
        self._check_slot(slot)
        self._check_finite()
        self._switch.write(model, lambda: self._targets(model), lambda: self._values(slot))

    def restore(self) -> None:
        """Copy the weights backed up by :meth:`store` back into the model."""
        self._switch.restore()

    # ------------------------------------------------------------------ evaluation helpers

    def _require_model(self, what: str) -> nn.Module:
        if self.model is None:
            raise ValueError(
                f"{what} needs a module, but this EMA was built from (name, tensor) pairs; build it "
                f"as polyak.EMA(model) to use {what}."
            )
        return self.model

    def _averaged_tensors(
        self, dtype: torch.dtype | None = None, slot: str | None = None
    ) -> dict[str, torch.Tensor]:
        """name -> average cast to the live tensor's dtype and device (``dtype`` overrides floats)."""
        self._check_slot(slot)
        self._check_finite()
        self._ensure_current()
        return _export.cast(self._values(slot), self._live, dtype)

    def functional_call(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model's forward with the averages via ``torch.func.functional_call``.

        Touches no state, the model's or the EMA's: every buffer the forward sees is a copy (a
        BatchNorm layer in train mode writes its running statistics in place, which would
        otherwise land in the averaged statistics, or with ``buffers="none"`` in the model's).
        The model's mode applies as usual: call ``model.eval()`` first for inference behaviour.

        FSDP2 (DTensor parameters): ``torch.func.functional_call`` cannot run such a model (after
        the first forward FSDP2 gathers the parameters from its own shards and silently ignores
        the tensors given, or the forward fails on mixed Tensor and DTensor arguments), so the
        averages are copied into each parameter's local shard, the forward runs (FSDP2 gathers
        them as usual) and the shards get their own values back, bit for bit, as in
        :meth:`swapped`. The forward then runs without gradients (a backward pass would gather the
        trained weights again), and like :meth:`swapped` it needs the model idle.
        """
        model = self._require_model("functional_call()")
        if any(_placement.in_place(t) for t in self._live.values()):
            return self._sharded_forward(args, kwargs)
        return _export.forward(model, self._averaged_tensors(), args, kwargs)

    def _sharded_forward(self, args: Any, kwargs: Any) -> Any:
        """:meth:`functional_call` of an FSDP2 model: the averages in the shards for one forward,
        buffers as copies (a train-mode BatchNorm writes into the copies, not into the shadows)."""
        self._switch.check_idle("run ema.functional_call()")
        buffers = {n for n, _ in self.model.named_buffers(remove_duplicate=False)}

        def values() -> dict[str, torch.Tensor]:
            out = self._values()
            with torch.no_grad():
                return {n: (v.clone() if n in buffers else v) for n, v in out.items()}

        self._switch.swap_in(None, lambda: self._targets(None), values)
        try:
            with torch.no_grad():
                return self.model(*args, **kwargs)
        finally:
            self._switch.swap_out()

    def averaged_module(self, *, slot: str | None = None) -> nn.Module:
        """A standalone copy of the model holding the averages (``slot``: as in :meth:`swapped`),
        in eval mode."""
        self._check_slot(slot)
        self._check_finite()
        model = self._require_model("averaged_module()")
        return _export.averaged_copy(model, self._values(slot))

    def export_state_dict(
        self, dtype: torch.dtype | None = None, *, slot: str | None = None
    ) -> dict[str, torch.Tensor]:
        """The model's full state dict with the averages in place of the tracked tensors.

        Keys are exactly ``model.state_dict()``'s (tied weights under every name, sharing one
        tensor); untracked and frozen tensors come from the live model. Floating tensors are cast
        to ``dtype`` if given, else to the model's own dtypes. ``slot``: as in :meth:`swapped`.
        """
        model = self._require_model("export")
        return _export.full_state_dict(
            model, self._averaged_tensors(dtype, slot), self._live, dtype
        )

    def save(
        self,
        path: str | os.PathLike[str],
        dtype: torch.dtype | None = None,
        *,
        slot: str | None = None,
    ) -> None:
        """Write the averaged weights as safetensors, loadable into a plain model.

        The file holds the model's full key set (untracked tensors from the live model) in the
        model's dtypes (``dtype=`` overrides floating ones); for an EMA of ``(name, tensor)``
        pairs, the tracked names in their tensors' dtypes (``dtype=`` overrides). Tied weights are written once;
        ``polyak.io.load_averaged(model, path)`` or ``safetensors.torch.load_model(model, path)``
        re-ties them. For a model without tied weights
        ``model.load_state_dict(safetensors.torch.load_file(path), strict=True)`` works as is.
        Written atomically (temp file, fsync, rename). ``slot``: as in :meth:`swapped`.

        Sharded shadows (FSDP2, DTensor) are written by ``polyak.distributed.export_full(ema,
        path)``, called on every rank (it gathers them one tensor at a time); here they raise.
        """
        if any(is_dtensor(self._store.shadow(n)) for n in self._averaged):
            raise ValueError(
                "ema.save() cannot write sharded (DTensor) shadows: gathering them takes every "
                "rank. Call polyak.distributed.export_full(ema, path) on every rank instead (rank "
                "0 writes the same safetensors file, gathered one tensor at a time)."
            )
        if self.model is None:  # the tracked tensors' names, dtypes as for a model
            tensors = {n: t.detach() for n, t in self._averaged_tensors(dtype, slot).items()}
        else:
            tensors = self.export_state_dict(dtype, slot=slot)
        io.save_safetensors(
            tensors, path, metadata={"polyak.step": str(self.step), "polyak.format": FORMAT}
        )

    # ------------------------------------------------------------------ state dict

    def state_dict(self) -> dict[str, Any]:
        """Name-keyed, versioned state: plain data only, readable with ``weights_only=True``.

        Holds the step counters, ``update_every``, the buffer policy, the averaging rule as data
        (its type, its settings such as the decay schedule, its own state, its slots), the shadows
        of each slot by name, the copied tensors and the shadows' dtypes, and with stochastic
        rounding the random stream's counter, so a resumed run draws the bits it would have drawn.
        A built-in schedule is stored as data; a user callable is not, and must be passed again
        to the EMA that loads this. The layout, its versions and their upgrades:
        :mod:`polyak._state`.

        With ``nonfinite="raise"``, raises :class:`polyak.errors.NonFiniteError` if an update met
        NaN or Inf since the averages were last known finite.
        """
        self._check_finite()
        self._engine.wait()
        counter = self._rng_counter()
        return _state.write(
            self._store,
            self._live,
            self.rule,
            step=self.step,
            num_averages=self.num_averages,
            update_every=self.update_every,
            buffers=self.buffers,
            rng_counter=None if counter is None else int(counter.item()),
        )

    def load_state_dict(
        self,
        state: Mapping[str, Any],
        *,
        settings: Literal["checkpoint", "current"] = "checkpoint",
    ) -> None:
        """Load :meth:`state_dict` output, of this version or an older one (upgraded on the way).

        Every problem (an unknown version, missing or unexpected names, shapes, dtypes, another
        rule or buffer policy, malformed counters or settings) is reported at once in one
        ``ValueError``, before anything changes.

        ``settings="checkpoint"`` (the default, for exact resume) takes the checkpoint's rule
        settings (the decay schedule) and ``update_every``, and warns with
        :class:`LoadedSettingsWarning` where they differ from this EMA's; ``settings="current"``
        keeps this EMA's and loads the averages and counters only (the rule's own state, such as
        a count, is a counter).
        """
        # the shadows may be the model's weights right now
        self._switch.check_idle("load a state dict")
        layout = _state.Layout.of(self._store, self.rule, self.buffers, self.update_every)
        plan = _state.parse(state, layout, settings=settings)
        # everything is valid: now change things
        if plan.changed:
            warnings.warn(
                "EMA.load_state_dict: the checkpoint's settings win for an exact resume: "
                + "; ".join(plan.changed)
                + ". Pass settings='current' to keep this EMA's.",
                LoadedSettingsWarning,
                stacklevel=2,
            )
        self._engine.wait()
        plan.copy_into(self._store)
        self.step = plan.step
        self.num_averages = plan.num_averages
        if plan.update_every is not None:
            self.update_every = plan.update_every
            if isinstance(self._steps, DeviceSteps):  # the steps one averaging update covers
                self._steps.cover(self.update_every)
        if plan.rule is not None:  # the checkpoint's settings (a capturable EMA whose rule keeps
            self.rule = plan.rule  # state must then place that state on the device, as __init__)
        if plan.rule_state is not None:
            self.rule.load_state_dict(plan.rule_state)
        if plan.rng_counter is not None:
            self._set_rng_counter(plan.rng_counter)
        self._finite.clear()  # the loaded averages replace any kept after a NaN

    def save_state(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`state_dict` to ``path`` as a checksummed safetensors file, atomically
        (:func:`polyak.io.save`: temp file, fsync, rename; a killed save leaves the old file and
        at most ``<path>.tmp``). :meth:`load_state` reads it back, for an exact resume."""
        io.save(self.state_dict(), path)

    def load_state(
        self,
        path: str | os.PathLike[str],
        *,
        settings: Literal["checkpoint", "current"] = "checkpoint",
    ) -> None:
        """Load a file written by :meth:`save_state` (or a ``torch.save`` of :meth:`state_dict`,
        read with ``weights_only=True``): :func:`polyak.io.load` checks the file whole (format,
        version, checksum) and :meth:`load_state_dict` checks the state against this EMA before
        anything changes. Raises :class:`polyak.errors.CorruptFileError`,
        :class:`polyak.errors.VersionError` or :class:`polyak.errors.StateMismatchError` (all
        ``ValueError``) naming the problem. ``settings``: as in :meth:`load_state_dict`."""
        self.load_state_dict(io.load(path), settings=settings)

    # ------------------------------------------------------------------ housekeeping

    def to(self, device: torch.device | str) -> EMA:
        """Move the shadows (and the kernel's scratch) to ``device``; returns ``self``.

        Call it after moving the model (``model.to(device); ema.to(device)``): tensors the move
        replaced are followed.
        """
        self._switch.check_idle("move the EMA")
        if self.offload:
            raise ValueError(
                "an EMA built with offload='cpu' keeps its shadows on the host; build one without "
                "offload to keep them on a device."
            )
        target = torch.device(device)
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        changes = self._changes_to_follow(target)  # the model moved first
        self._engine.wait()
        self._store.to(device)  # keeps the objects where it can: average(name) callers hold them
        if isinstance(self._steps, DeviceSteps):
            self._steps.to(device, self.rule)
        self._follow(changes, replan=True)
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> EMA:
        """A copy that averages the copied tensors (``copy.deepcopy(model)`` with the EMA stored
        on the model copies both, and the copy's EMA follows the copied model)."""
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        rebuilt = {"_engine", "_watch", "_bn_monitor"}
        for key, value in self.__dict__.items():
            if key not in rebuilt:
                clone.__dict__[key] = copy.deepcopy(value, memo)  # the switch copies itself
        clone._engine = None
        self._engine.wait()
        clone._plan(watch=False)  # a model being copied around this EMA is not filled in yet
        counter = self._rng_counter()
        if counter is not None:
            clone._set_rng_counter(counter)
        return clone

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "a polyak.EMA cannot be pickled: it holds the model's live tensors, compiled "
            "kernels and hooks. Save its state instead: torch.save({'model': model.state_dict(), "
            "'ema': ema.state_dict()}, path), then polyak.EMA(model, ...).load_state_dict(...); "
            "or ema.save(path) for the averaged weights alone. If the EMA is an attribute of a "
            "model you pickle (torch.save(model)), keep it outside the model (copy.deepcopy "
            "works)."
        )

    def __repr__(self) -> str:
        n_avg, n_copy = len(self._averaged), len(self._copied)
        shadows = [self._store.shadow(n) for n in self._averaged]
        elements = sum(s.numel() for s in shadows)
        dtypes = sorted({dtype_name(s.dtype) for s in shadows})
        plain = type(self.rule) is Exponential
        setting = f"decay={self.schedule!r}" if plain else f"rule={self.rule!r}"
        return (
            f"EMA({setting}, step={self.step}, averaged={n_avg} tensors "
            f"({elements:,} elements, shadows {'/'.join(dtypes) or '-'}), copied={n_copy}, "
            + (f"slots={list(self.slots)}, " if len(self.slots) > 1 else "")
            + f"buffers={self.buffers!r}, update_every={self.update_every}, kernel={self.kernel!r}"
            + (f", rounding={self.rounding!r}" if self.rounding != "nearest" else "")
            + (f", stream={self.stream!r}" if self.stream else "")
            + (f", offload={self.offload!r}" if self.offload else "")
            + (", capturable=True" if self.capturable else "")
            + (
                f", nonfinite={self._finite.policy!r}"
                if self._finite.policy != _finite.DEFAULT
                else ""
            )
            + ")"
        )
