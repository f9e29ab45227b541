"""The averages outside the EMA: as a model's tensors would be, as a model's full state dict, as a
standalone module, and in a forward pass that touches no state.

Callers pass name -> average (the EMA's values) and name -> live tensor (the model's tensors under
the same names); nothing here changes the model, the averages or the EMA. Files are
:mod:`polyak.io`'s idea, not this module's: an export becomes a file there.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["averaged_copy", "cast", "forward", "full_state_dict"]

Tensors = Mapping[str, torch.Tensor]


def cast(
    values: Tensors, live: Tensors, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """name -> the value on its live tensor's device, in its dtype (``dtype`` overrides floating
    ones); a value already so is returned as is, not copied."""
    out = {}
    for name, value in values.items():
        tensor = live[name]
        target = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
        out[name] = value.to(tensor.device, target)
    return out


def full_state_dict(
    model: nn.Module, averaged: Tensors, live: Tensors, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with ``averaged[name]`` wherever the model holds ``live[name]``.

    Keys are exactly the model's, tied weights under every name sharing one tensor (matched by
    the live tensor's identity, so every alias of a tracked tensor gets its average); the rest come
    from the model, detached, floating ones cast to ``dtype`` if given, once per tensor so tied
    weights stay shared. ``averaged`` is taken as given (cast it with :func:`cast`).
    """
    by_id = {id(live[n]): t for n, t in averaged.items()}
    out: dict[str, torch.Tensor] = {}
    casts: dict[int, torch.Tensor] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in by_id:
            out[key] = by_id[id(tensor)].detach()
        else:
            if dtype is not None and tensor.is_floating_point():
                tensor = casts.setdefault(id(tensor), tensor.detach().to(dtype))
            out[key] = tensor.detach()
    return out


def averaged_copy(model: nn.Module, values: Tensors) -> nn.Module:
    """A deep copy of ``model`` holding ``values`` (copied in, cast to its dtypes), in eval mode,
    with the module's own ``train`` (never bound to an EMA's mode switch)."""
    clone = copy.deepcopy(model)
    clone.__dict__.pop("train", None)
    tensors = dict(clone.named_parameters(remove_duplicate=False))
    tensors.update(clone.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name, value in values.items():
            tensors[name].copy_(value)
    return clone.eval()


def forward(model: nn.Module, tensors: Tensors, args: Any, kwargs: Any) -> Any:
    """``model(*args, **kwargs)`` with ``tensors`` in place of its own (by name, tied weights
    tied), through ``torch.func.functional_call``. Every buffer the forward sees is a copy (a
    BatchNorm layer in train mode writes its statistics in place), so no state changes."""
    tensors = dict(tensors)
    for name, buffer in model.named_buffers(remove_duplicate=False):
        tensors[name] = tensors.get(name, buffer).clone()
    return torch.func.functional_call(model, tensors, args, kwargs, tie_weights=True, strict=False)
