"""The Hugging Face ``Trainer`` integration: an EMA of the model's weights as a ``TrainerCallback``.

In a training script::

    from polyak.integrations.transformers import EMACallback, ema_evaluation

    trainer = Trainer(model, args, train_dataset=train, eval_dataset=val,
                      callbacks=[EMACallback(0.999, save_averaged_weights="out/ema")])
    ema_evaluation(trainer)      # trainer.evaluate() and trainer.predict() run on the averages
    trainer.train()              # resume_from_checkpoint=... resumes the averages bit for bit

What the callback does at each ``TrainerCallback`` event:

- ``on_train_begin``: builds :class:`polyak.EMA` over the model (shadows start from the weights
  there: the initial weights, or a resumed checkpoint's, whose EMA state is then loaded);
- ``on_step_end``: ``ema.update()``. The Trainer fires it once per optimizer step, after the last
  micro-batch of a gradient-accumulation window, never per micro-batch; a skipped optimizer step
  (inf/NaN gradients under a ``GradScaler``) does not update and does not count;
- ``on_save``: writes the EMA state into the checkpoint folder as ``polyak_ema.safetensors``;
- ``on_train_end``: with ``save_averaged_weights=DIR``, writes the averaged model to ``DIR`` in the
  format ``from_pretrained`` loads.

Importing this module imports ``transformers``; ``import polyak`` never does.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as error:  # pragma: no cover - the test extra installs transformers
    raise ImportError(
        "polyak.integrations.transformers needs transformers and accelerate: "
        "pip install 'polyak[hf]'."
    ) from error

from polyak import schedules
from polyak._options import DEFAULT_DECAY, DecayLike
from polyak.ema import EMA
from polyak.io import ALIASES_KEY, save_safetensors

__all__ = ["STATE_FILE", "EMACallback", "ema_evaluation", "load_ema_state", "save_ema_state"]

STATE_FILE = "polyak_ema.safetensors"
"""The EMA state's file name inside each checkpoint folder."""

FORMAT = "polyak.EMA.state"  # the safetensors metadata's "polyak.format" for an EMA state
_TENSOR = "__tensor__"  # in the metadata's JSON tree: {"__tensor__": key} stands for a tensor
# the keyword options polyak.EMA takes (everything but the model and the decay)
_EMA_OPTIONS = frozenset(
    name
    for name, p in inspect.signature(EMA).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)


# ------------------------------------------------------------------ the state file


def _split(value: Any, path: tuple[str, ...], tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON-able data, each tensor moved into ``tensors`` under its path
    (``"shadows/ema/lin.weight"``) and replaced by ``{"__tensor__": path}``."""
    where = "/".join(path) or "the top level"
    if isinstance(value, torch.Tensor):
        key = "/".join(path)
        if key in tensors:
            raise ValueError(f"two tensors of the state would be stored under one key, {key!r}.")
        tensors[key] = value
        return {_TENSOR: key}
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"an EMA state is keyed by strings, got the key {key!r} "
                    f"({type(key).__name__}) at {where}."
                )
            out[key] = _split(item, (*path, key), tensors)
        return out
    if isinstance(value, (list, tuple)):
        return [_split(item, (*path, str(i)), tensors) for i, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"an EMA state holds tensors and plain data (dict, list, str, int, float, bool, None), "
        f"got {type(value).__name__} at {where}."
    )


def _join(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of :func:`_split`."""
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        return {key: _join(item, tensors) for key, item in value.items()}
    if isinstance(value, list):
        return [_join(item, tensors) for item in value]
    return value


def save_ema_state(
    state: Mapping[str, Any],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``ema.state_dict()`` as one safetensors file, atomically (temp file, fsync, rename).

    The tensors are stored by their path in the state (``"shadows/ema/<name>"``,
    ``"copies/<name>"``), the rest of the state as JSON in the metadata key ``"polyak.state"``
    (beside ``metadata``'s entries), so the file loads without unpickling anything
    (:func:`load_ema_state`).
    """
    tensors: dict[str, torch.Tensor] = {}
    tree = _split(state, (), tensors)
    meta = {**(metadata or {}), "polyak.format": FORMAT, "polyak.state": json.dumps(tree)}
    save_safetensors(tensors, path, metadata=meta)


def _read(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The state :func:`save_ema_state` wrote to ``path``, and the file's metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except SafetensorError as error:
        raise ValueError(
            f"cannot read an EMA state from {path}: it is not a valid safetensors file (a "
            f"truncated copy?). Expected a file written by EMACallback / save_ema_state. "
            f"(safetensors said: {error})"
        ) from error
    if meta.get("polyak.format") != FORMAT:
        raise ValueError(
            f"{path} is a safetensors file but not an EMA state (its metadata has "
            f"polyak.format={meta.get('polyak.format')!r}, expected {FORMAT!r}); averaged "
            f"weights written by ema.save() load with polyak.io.load_averaged(model, path)."
        )
    for alias, target in json.loads(meta.get(ALIASES_KEY, "{}")).items():
        tensors[alias] = tensors[target]
    return _join(json.loads(meta["polyak.state"]), tensors), meta


def load_ema_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a state written by :func:`save_ema_state` (e.g. a checkpoint's
    ``polyak_ema.safetensors``), for ``ema.load_state_dict``. Nothing is unpickled.

    To get a checkpoint's averaged model: ``ema = polyak.EMA(model)``,
    ``ema.load_state_dict(load_ema_state(f"{ckpt}/polyak_ema.safetensors"))``, then
    ``ema.copy_to(model)`` or ``ema.save(path)``.
    """
    return _read(Path(path))[0]


# ------------------------------------------------------------------ exporting for from_pretrained


def _publish(source: Path, target: Path) -> None:
    """Move every file of the folder ``source`` into ``target`` (same file system), each one
    fsync'd then renamed over its old version, so no file of ``target`` is ever half written."""
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        with open(file, "rb+") as f:
            os.fsync(f.fileno())
        dest = target / file.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, dest)
    with contextlib.suppress(OSError):  # not every platform lets a directory be fsync'd
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _save_pretrained(
    ema: EMA, model: nn.Module, directory: Path, processing_class: Any = None
) -> None:
    """Write the averaged model into ``directory`` as ``model.save_pretrained`` does (config and
    ``model.safetensors``; a plain ``nn.Module``: ``model.safetensors`` alone), with the
    processing class (tokenizer) if there is one. The model itself is not touched."""
    averaged = ema.export_state_dict()  # the model's keys and dtypes, averages in place
    staging = directory.parent / f".{directory.name}.{secrets.token_hex(6)}.tmp"
    try:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(staging, state_dict=averaged)
        else:
            staging.mkdir(parents=True)
            save_safetensors(averaged, staging / "model.safetensors")
        if processing_class is not None and hasattr(processing_class, "save_pretrained"):
            processing_class.save_pretrained(staging)
        _publish(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------ the callback


def _writes(args: Any, state: Any) -> bool:
    """Whether this process writes files: where the Trainer writes its checkpoints (the world's
    main process; with ``save_on_each_node``, each node's)."""
    if getattr(args, "save_on_each_node", False):
        return bool(state.is_local_process_zero)
    return bool(state.is_world_process_zero)


class EMACallback(TrainerCallback):
    r"""An exponential moving average of the model's weights, kept by the Hugging Face ``Trainer``.

    After every optimizer step that was taken, the shadows move towards the weights:

    .. math:: s \leftarrow d\, s + (1 - d)\, \theta, \qquad d = \text{decay}(n),

    with :math:`n` = :attr:`polyak.EMA.step`, the optimizer steps taken since training began (1 at
    the first). ``ema.step`` equals ``state.global_step`` less the skipped steps: the Trainer counts
    a step whose update a ``GradScaler`` skipped (inf/NaN gradients), the EMA does not, and leaves
    its shadows untouched then.

    Args:
        decay: a float in [0, 1] or a schedule ``step -> decay`` (:mod:`polyak.schedules`).
        update_after_step: :math:`N`; averaging starts after :math:`N` optimizer steps. Until
            then the shadows copy the weights (decay 0), so the average starts from
            :math:`\theta_N` and ``decay`` runs from its step 1 at step :math:`N + 1`
            (:func:`polyak.schedules.delayed`); evaluations up to step :math:`N` use the live
            weights.
        save_averaged_weights: a folder; at the end of training the averaged model is written
            there in the format ``from_pretrained`` loads (``model.save_pretrained`` of the
            averages, in the model's dtypes, with the tokenizer / processor if the Trainer has
            one; a plain ``nn.Module``: ``model.safetensors``). The live model is not touched.
        **options: :class:`polyak.EMA`'s keyword options (``buffers``, ``update_every``,
            ``shadow_dtype``, ``include``, ``kernel``, ``rule``, ...). bf16/fp16 models get fp32
            shadows by default.

    Attributes:
        ema: the :class:`polyak.EMA`, built at ``on_train_begin`` (``None`` before).

    Evaluation: the callback API gives no hook around ``Trainer.evaluate`` (``on_evaluate`` runs
    after the metrics are computed), so :func:`ema_evaluation` wraps the Trainer's ``evaluate``
    and ``predict`` to run inside :meth:`swapped`. Without it the Trainer evaluates the live
    weights (warned once).

    Checkpoints: ``on_save`` writes ``polyak_ema.safetensors`` (:func:`save_ema_state`) into
    ``<output_dir>/checkpoint-<global_step>``; ``trainer.train(resume_from_checkpoint=...)``
    loads it back (from that folder, or from ``args.resume_from_checkpoint`` for a checkpoint kept
    elsewhere), so the averages continue bit for bit as if never interrupted. A resumed
    checkpoint without the file raises.

    Skipped steps: accelerate's ``optimizer.step_was_skipped`` tells when ``GradScaler`` did not
    call ``optimizer.step()``. A fused optimizer (``optim="adamw_torch_fused"``, transformers 5's
    default) is always called and skips inside its kernel, which accelerate does not see; there
    the callback reads the scaler's scale after each step (one host read per optimizer step) and
    counts a step as skipped when the scale went down, which ``GradScaler`` does exactly when it
    found inf/NaN gradients (``backoff_factor < 1``).

    Only the process that writes the Trainer's checkpoints writes files (``is_world_process_zero``;
    with ``save_on_each_node``, each node's main process); every process keeps its EMA.
    """

    def __init__(
        self,
        decay: DecayLike = DEFAULT_DECAY,
        *,
        update_after_step: int = 0,
        save_averaged_weights: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - _EMA_OPTIONS)
        if unknown:
            raise TypeError(
                f"EMACallback got {unknown}, which polyak.EMA does not take; its options are "
                f"{sorted(_EMA_OPTIONS)}."
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
        if update_after_step and options.get("rule") is not None:
            raise ValueError(
                f"update_after_step={update_after_step} delays the exponential decay, but "
                f"rule={options['rule']!r} replaces it; give the rule its own start (e.g. "
                f"polyak.averagers.Uniform(start=...)) and leave update_after_step=0."
            )
        if not callable(decay) and decay is not DEFAULT_DECAY:
            schedules.constant(decay)  # refuse a bad decay now, not once training has started
        self.decay: DecayLike = (
            schedules.delayed(decay, update_after_step) if update_after_step else decay
        )
        self.update_after_step = update_after_step
        self.save_averaged_weights = (
            None if save_averaged_weights is None else Path(save_averaged_weights)
        )
        self.options = options
        self.ema: EMA | None = None
        self._scale: float | None = None  # a fused optimizer's GradScaler scale after the last step
        self._depth = 0  # how many swapped() blocks are open (evaluate() may call itself)
        self._warned_live = False

    # ------------------------------------------------------------------ state

    @property
    def started(self) -> bool:
        """Whether averaging has started: ``ema.step > update_after_step`` (before, the shadows
        equal the weights, so evaluation keeps the live ones)."""
        return self.ema is not None and self.ema.step > self.update_after_step

    def _require_ema(self, event: str) -> EMA:
        if self.ema is None:
            raise RuntimeError(
                f"EMACallback.{event} ran before on_train_begin built the EMA; add the callback to "
                f"a Trainer (callbacks=[EMACallback(...)]) and let trainer.train() drive it."
            )
        return self.ema

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the model holds the averages (:meth:`polyak.EMA.swapped`) once
        averaging has :attr:`started`; before, its own weights. Its weights come back bit for bit
        on exit, also when the block raises. Nested blocks swap once."""
        with contextlib.ExitStack() as stack:
            if self._depth == 0 and self.started:
                stack.enter_context(self.ema.swapped())
            self._depth += 1
            stack.callback(self._leave)
            yield

    def _leave(self) -> None:
        self._depth -= 1

    # ------------------------------------------------------------------ skipped steps

    @staticmethod
    def _fused_scaler(optimizer: Any) -> Any:
        """The ``GradScaler`` of an accelerate-wrapped optimizer whose skips accelerate cannot
        see (one that takes the scaler's ``found_inf`` into its fused kernel), else ``None``."""
        scaler = getattr(optimizer, "scaler", None)
        inner = getattr(optimizer, "optimizer", optimizer)
        if scaler is None or not getattr(inner, "_step_supports_amp_scaling", False):
            return None
        if not scaler.is_enabled():
            return None
        if scaler.get_backoff_factor() >= 1.0:
            raise ValueError(
                f"the GradScaler's backoff_factor={scaler.get_backoff_factor()!r} does not lower "
                f"the scale at a skipped step, which is how EMACallback tells a fused optimizer's "
                f"skipped steps; use a backoff_factor < 1 (GradScaler's default is 0.5)."
            )
        return scaler

    def _skipped(self, optimizer: Any) -> bool:
        """Whether the optimizer step just taken was skipped (see the class docstring)."""
        if getattr(optimizer, "step_was_skipped", False):
            return True
        if self._scale is None:
            return False
        scale = self._fused_scaler(optimizer).get_scale()  # a host read: the kernel decided
        skipped, self._scale = scale < self._scale, scale
        return skipped

    # ------------------------------------------------------------------ events

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Build the EMA over the model; on resume, load its state from the checkpoint."""
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"EMACallback.on_train_begin needs the Trainer's model (an nn.Module), got "
                f"{model!r}."
            )
        self.ema = EMA(model, self.decay, **self.options)
        scaler = self._fused_scaler(kwargs.get("optimizer"))
        self._scale = None if scaler is None else scaler.get_scale()
        self._depth = 0
        if state.global_step > 0:  # the Trainer resumed from a checkpoint at that step
            self._resume(args, state)

    def _resume(self, args: Any, state: Any) -> None:
        folders = [Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"]
        if isinstance(args.resume_from_checkpoint, (str, os.PathLike)):
            folders.insert(0, Path(args.resume_from_checkpoint))
        for folder in folders:
            path = folder / STATE_FILE
            if not path.is_file():
                continue
            loaded, meta = _read(path)
            if meta.get("polyak.global_step") == str(state.global_step):
                self.ema.load_state_dict(loaded)
                return
        looked = ", ".join(str(f / STATE_FILE) for f in folders)
        raise FileNotFoundError(
            f"the Trainer resumed at global step {state.global_step}, but no EMA state of that "
            f"step was found (looked for {looked}). EMACallback saves it into each checkpoint "
            f"it sees saved; a checkpoint written without the callback (or by a run stopped "
            f"between the checkpoint and its EMA state) cannot resume the average. For a "
            f"checkpoint outside args.output_dir, set TrainingArguments(resume_from_checkpoint="
            f"<its folder>) too."
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """One ``ema.update()`` per optimizer step taken (the Trainer fires this event once per
        optimizer step, not per micro-batch)."""
        ema = self._require_ema("on_step_end")
        if not self._skipped(kwargs.get("optimizer")):
            ema.update()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.started and self._depth == 0 and not self._warned_live:
            self._warned_live = True
            warnings.warn(
                "EMACallback: the Trainer evaluated the live weights, not the averages; call "
                "polyak.integrations.transformers.ema_evaluation(trainer) once before "
                "trainer.train() to evaluate the averages.",
                UserWarning,
                stacklevel=2,
            )

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the EMA state into the checkpoint the Trainer just saved."""
        if not _writes(args, state):
            return
        ema = self._require_ema("on_save")
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            raise FileNotFoundError(
                f"EMACallback.on_save: the Trainer reported a checkpoint at step "
                f"{state.global_step}, but {folder} is not a folder. The callback writes its "
                f"state into <args.output_dir>/{PREFIX_CHECKPOINT_DIR}-<step>; hyperparameter "
                f"search runs, which save elsewhere, are not supported."
            )
        save_ema_state(
            ema.state_dict(), folder / STATE_FILE, {"polyak.global_step": str(state.global_step)}
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """With ``save_averaged_weights``, write the averaged model for ``from_pretrained``."""
        if self.save_averaged_weights is None or not _writes(args, state):
            return
        ema = self._require_ema("on_train_end")
        _save_pretrained(
            ema, kwargs["model"], self.save_averaged_weights, kwargs.get("processing_class")
        )

    def __repr__(self) -> str:
        return (
            f"EMACallback(decay={self.decay!r}, update_after_step={self.update_after_step}, "
            f"save_averaged_weights={self.save_averaged_weights!r}, options={self.options!r}, "
            f"ema={self.ema!r})"
        )


def _averaged(method: Callable[..., Any], callback: EMACallback) -> Callable[..., Any]:
    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        with callback.swapped():
            return method(*args, **kwargs)

    run.__polyak_ema__ = callback  # type: ignore[attr-defined]
    return run


def ema_evaluation(trainer: Any) -> EMACallback:
    """Make ``trainer.evaluate()`` and ``trainer.predict()`` run on the averaged weights.

    Wraps both methods of this ``trainer`` (not its class) so that each call runs inside
    :meth:`EMACallback.swapped`: the evaluations during ``trainer.train()`` (``eval_strategy``,
    ``eval_on_start``) and the ones called afterwards see the averages once averaging has started,
    the live weights before (no EMA yet, or within ``update_after_step``). The model gets its own
    weights back, bit for bit, when the call returns or raises; checkpoints therefore hold the
    trained weights. Calling it again is a no-op. Returns the trainer's :class:`EMACallback`.
    """
    handler = getattr(trainer, "callback_handler", None)
    found = [cb for cb in getattr(handler, "callbacks", []) if isinstance(cb, EMACallback)]
    if len(found) != 1:
        raise ValueError(
            f"ema_evaluation(trainer) needs a Trainer with exactly one EMACallback among its "
            f"callbacks, got {len(found)} in {trainer!r}; build it as "
            f"Trainer(..., callbacks=[EMACallback(...)])."
        )
    callback = found[0]
    for name in ("evaluate", "predict"):
        method = getattr(trainer, name)
        if getattr(method, "__polyak_ema__", None) is callback:
            continue
        if hasattr(method, "__polyak_ema__"):  # wrapped for a callback since replaced
            method = method.__wrapped__
        setattr(trainer, name, _averaged(method, callback))
    return callback
