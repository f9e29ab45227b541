r"""A Lightning callback that keeps a :class:`polyak.EMA` of the model and evaluates with it.

In a training script::

    from polyak.integrations.lightning import EMACallback

    ema = EMACallback(decay=0.999, update_after_step=100, save_averaged_weights="ema.safetensors")
    trainer = lightning.Trainer(callbacks=[ema])
    trainer.fit(model, train_loader, val_loader)   # validation metrics come from the averages
    trainer.test(model, test_loader)               # so do test metrics; ema.ema is the polyak.EMA

Needs ``lightning`` (``pip install "polyak[lightning]"``); ``import polyak`` never imports it.

What it does, and where it differs from Lightning's own ``EMAWeightAveraging`` (2.6):

- **Updates on real optimizer steps.** The EMA is updated by :func:`polyak.attach` (an
  optimizer post-step hook on every optimizer of the trainer), not from ``global_step``: with
  ``accumulate_grad_batches=k`` once per ``k`` batches, in manual optimization at each
  ``opt.step()`` you call, and never for a step ``GradScaler`` skipped (Lightning's
  ``global_step``, and so its callback, counts skipped steps too). Several optimizers (manual
  optimization): one update per round, once each optimizer has stepped.
- **Averages beside the model, in fp32 for bf16/fp16 weights.** No deep copy of the module;
  shadows of bf16 weights (``precision="bf16-true"``) are fp32, where Lightning's copy averages
  in bf16 and stalls (a bf16 average cannot move by less than 1/256 of its value).
- **Validation, test and predict run with the averages** (zero-copy swap) and the trained
  weights come back bit for bit at the end of each, also when the loop raises. Before averaging
  starts (``ema.step <= update_after_step``, the sanity check included) the live weights are
  evaluated, as they are what the average equals then; Lightning evaluates its untrained
  initial copy there (Lightning issue #21724).
- **After fit the model holds its trained weights** (Lightning's callback copies the averages
  into it): resume and further training continue from them. Use the averages with
  ``callback.ema.swapped()``, ``callback.ema.copy_to()``, ``trainer.test``, or the file that
  ``save_averaged_weights=PATH`` writes at the end of training (safetensors, atomically, by
  global rank 0 only).
- **Checkpoints hold the EMA's state** (:meth:`polyak.EMA.state_dict`, under
  ``checkpoint["polyak_ema"][callback.state_key]``, a key made of ``decay`` and
  ``update_after_step`` so that several callbacks can share a Trainer; a lone callback also takes
  a lone state saved under another key, and :meth:`polyak.EMA.load_state_dict` warns about the
  settings that differ), beside the trained weights in ``state_dict``;
  ``trainer.fit(..., ckpt_path=...)`` resumes the average bit for bit, and
  ``trainer.test(model, ckpt_path=...)`` tests that checkpoint's averages. A checkpoint saved
  while the averages are in the model (from a validation hook) still gets the trained weights
  in ``state_dict``.
- **DDP**: every rank keeps the same average of its (identical) replica, with no communication.
  Only global rank 0 writes files. Sharded strategies (FSDP, DeepSpeed) are not supported.

``update_after_step=N`` copies the weights for the first ``N`` optimizer steps and averages from
step ``N + 1`` on (:func:`polyak.schedules.delayed`; ema-pytorch's ``update_after_step``).
Lightning's ``update_starting_at_step=M`` starts its average at the weights after step ``M + 1``,
which is ``update_after_step=M + 1`` here; with no delay Lightning's average starts at the weights
after the first step, polyak's at the weights when fit starts (``update_after_step=1`` gives
Lightning's).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities import rank_zero_warn
except ImportError as error:  # pragma: no cover - the import is the test
    raise ImportError(
        "polyak.integrations.lightning needs Lightning (the 'lightning' package); install it with "
        "pip install 'polyak[lightning]'."
    ) from error

from polyak import schedules
from polyak._options import DEFAULT_DECAY, DecayLike, _as_schedule
from polyak.ema import EMA
from polyak.integrations.hook import Attachment, attach

__all__ = ["CHECKPOINT_KEY", "EMACallback"]

# where the EMA states of every EMACallback go in a Lightning checkpoint, keyed by state_key
CHECKPOINT_KEY = "polyak_ema"
# polyak.EMA's keyword options that EMACallback passes through
_EMA_OPTIONS = tuple(
    name
    for name, p in inspect.signature(EMA.__init__).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)


class EMACallback(Callback):
    r"""Keep an exponential moving average of the LightningModule's weights, and validate, test
    and predict with it.

    .. math:: s \leftarrow d\, s + (1 - d)\, \theta \quad \text{after every real optimizer step}

    with ``d = decay(step)`` and ``step`` the EMA's count of real optimizer steps
    (:attr:`polyak.EMA.step`; the first step is 1). See :mod:`polyak.integrations.lightning` for
    what happens when.

    Args:
        decay: a float in [0, 1] or a schedule ``step -> decay`` (:mod:`polyak.schedules`).
        update_after_step: copy the weights for the first ``update_after_step`` optimizer
            steps, average from the next one (``decay`` restarts from its step 1 there);
            evaluation uses the live weights until then. Not with ``rule=``: give the rule its
            own start (e.g. ``averagers.Uniform(start=N)``).
        save_averaged_weights: a path: write the averaged weights there as safetensors when
            training ends (global rank 0; atomically), loadable into a plain model with
            ``polyak.io.load_averaged``.
        **options: :class:`polyak.EMA`'s keyword options, passed through (``buffers``,
            ``update_every``, ``shadow_dtype``, ``include``, ``kernel``, ``stream="side"``,
            ``offload``, ``rule``, ...); checked here by name, by the EMA when fit starts.

    Attributes:
        ema: the :class:`polyak.EMA` once fit starts (or once a checkpoint with an EMA state is
            evaluated), else ``None``.
    """

    def __init__(
        self,
        decay: DecayLike = DEFAULT_DECAY,
        *,
        update_after_step: int = 0,
        save_averaged_weights: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(_EMA_OPTIONS))
        if unknown:
            raise TypeError(
                f"EMACallback got unknown options {unknown}; its options are polyak.EMA's: "
                f"{list(_EMA_OPTIONS)}."
            )
        if (
            isinstance(update_after_step, bool)
            or not isinstance(update_after_step, int)
            or update_after_step < 0
        ):
            raise ValueError(
                f"update_after_step must be an int >= 0 (optimizer steps before averaging "
                f"starts), got update_after_step={update_after_step!r}."
            )
        if update_after_step and "rule" in options:
            raise ValueError(
                f"update_after_step={update_after_step} and rule={options['rule']!r} cannot be "
                f"given together: update_after_step delays the exponential decay. Give the rule "
                f"its own start, e.g. rule=polyak.averagers.Uniform(start={update_after_step})."
            )
        if decay is not DEFAULT_DECAY:
            _as_schedule(decay)  # a bad decay fails here, not when fit starts
        self.decay = decay
        self.update_after_step = update_after_step
        self.save_averaged_weights = (
            Path(save_averaged_weights) if save_averaged_weights is not None else None
        )
        self.options = options
        self.ema: EMA | None = None
        self._attachment: Attachment | None = None
        self._pending: Mapping[str, Any] | None = None  # a checkpoint's state, for the next EMA
        self._swapped = False  # whether this callback put the averages into the model

    @property
    def state_key(self) -> str:
        decay = self.decay if isinstance(self.decay, (float, schedules.Schedule)) else "custom"
        return self._generate_state_key(decay=decay, update_after_step=self.update_after_step)

    # ------------------------------------------------------------------ the EMA

    def _schedule(self) -> DecayLike:
        if not self.update_after_step:
            return self.decay  # the default's identity kept: rule= may be among the options
        return schedules.delayed(self.decay, after=self.update_after_step)

    def _build(self, pl_module: pl.LightningModule) -> EMA:
        """The EMA of ``pl_module`` (kept if it already averages this module), with a pending
        checkpoint state loaded, on the module's device."""
        if self.ema is None or self.ema.model is not pl_module:
            self.ema = EMA(pl_module, self._schedule(), **self.options)
        self._follow_device(pl_module)
        if self._pending is not None:
            self.ema.load_state_dict(self._pending)
            self._pending = None
        return self.ema

    def _follow_device(self, pl_module: pl.LightningModule) -> None:
        """Move the shadows to the module's device if Lightning moved the module (strategies move
        it to the CPU at teardown, and back at the next setup). Offloaded shadows stay."""
        if self.ema is None or self.ema.offload or not self.ema.names():
            return
        device = self.ema.average(self.ema.names()[0]).device
        if device != pl_module.device:
            self.ema.to(pl_module.device)

    def _detach(self) -> None:
        if self._attachment is not None:
            self._attachment.remove()
            self._attachment = None

    # ------------------------------------------------------------------ fit

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ema = self._build(pl_module)
        self._detach()
        if trainer.optimizers:
            self._attachment = attach(trainer.optimizers, ema)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_averaged_weights is not None and self.ema is not None:
            if trainer.is_global_zero:
                self.ema.save(self.save_averaged_weights)
            trainer.strategy.barrier("polyak.EMACallback.save_averaged_weights")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()
        self._follow_device(pl_module)  # teardown moved the module to the CPU

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._detach()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._swap_out()
        self._detach()

    # ------------------------------------------------------------------ evaluation

    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        if self.ema is None and self._pending is not None:
            self._build(pl_module)  # evaluating a checkpoint that holds an EMA state
        if self.ema is None or self._swapped:
            return
        if self.ema.model is not pl_module:
            rank_zero_warn(
                "EMACallback: the module being evaluated is not the one whose weights the EMA "
                "averages (fit another module with this callback, or pass ckpt_path= with an EMA "
                "state); evaluating its own weights."
            )
            return
        if self.ema.step <= self.update_after_step:
            return  # averaging has not started: the average equals the live weights
        self._follow_device(pl_module)
        self.ema.use_averages()
        self._swapped = True

    def _swap_out(self) -> None:
        if self._swapped:
            self._swapped = False
            assert self.ema is not None
            self.ema.use_trained()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._swapped:  # saved from a validation hook: the model's state_dict is the averages
            self._swap_out()
            checkpoint["state_dict"] = trainer.strategy.lightning_module_state_dict()
            self._swap_in(pl_module)
        state = self.ema.state_dict() if self.ema is not None else self._pending
        if state is not None:
            checkpoint.setdefault(CHECKPOINT_KEY, {})[self.state_key] = state

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get(CHECKPOINT_KEY, {})
        state = states.get(self.state_key)
        ours = [cb for cb in trainer.callbacks if isinstance(cb, EMACallback)]
        if state is None and len(states) == 1 and len(ours) == 1:
            (state,) = states.values()  # saved with other settings: the EMA says which differ
        if state is None:
            rank_zero_warn(
                f"EMACallback: the checkpoint holds no EMA state under {self.state_key!r}"
                + (f" (it has {sorted(states)})" if states else "")
                + "; the average starts from the loaded weights."
            )
            return
        if self.ema is not None and self.ema.model is pl_module:
            self._swap_out()
            self.ema.load_state_dict(state)
        else:
            self._pending = state

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return (
            f"EMACallback(decay={self.decay!r}, update_after_step={self.update_after_step}"
            f"{options}, ema={self.ema!r})"
        )
