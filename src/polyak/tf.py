r"""The TF-faithful layer: ``tf.train.ExponentialMovingAverage`` over torch tensors.

Code ported from TensorFlow gets the same averages here, to the last bit on float32 tensors.
Everything in this module follows TensorFlow's ``moving_averages.py``; where TF and the rest of
polyak differ (decay arithmetic, rounding, step counters in low precision), this module does
what TF does. For new code, use :class:`polyak.EMA`.

The update
----------
One ``apply()`` reads ``decay`` :math:`d` and, if given, ``num_updates`` :math:`n`, and computes

.. math::

    \hat d = \operatorname{fl}_{32}\Big(\min\big(d,\ \tfrac{1 + n}{10 + n}\big)\Big), \qquad
    \beta = \operatorname{cast}_{\text{dtype}}\big(\operatorname{fl}_{32}(1 - \hat d)\big)

with every operation rounded to float32 (``decay`` and ``n`` are first converted to float32), then
rounded once more to the variable's dtype. Each shadow :math:`s` of a variable :math:`v` becomes

.. math::

    s \leftarrow s - (s - v)\,\beta

as three separately rounded operations in the variable's dtype (subtract, multiply, subtract),
which is TF's ``assign_sub``. This is *not* ``torch.lerp`` or ``addcmul``: torch's AVX2 and
AVX-512 CPU kernels compute those with a fused multiply-add, rounded once (its default kernels,
for CPUs without AVX2, happen to round like TF). Mathematically it is
:math:`s \leftarrow \hat d\, s + (1 - \hat d)\, v`.

Averages of values (:meth:`ExponentialMovingAverage.apply_values`, TF's averages of tensors) start
from zero. With ``zero_debias=True`` they keep a hidden biased average :math:`b` and a step count
:math:`k` (both in the value's dtype, both starting at 0) and report the debiased average
(Kingma & Ba, 2015, Adam, Section 3):

.. math::

    b \leftarrow b - (b - x)\,\beta, \qquad k \leftarrow k + 1, \qquad
    s = \frac{b}{1 - (1 - \beta)^{k}}

where :math:`1 - \beta` is recomputed in the value's dtype from the already rounded
:math:`\beta`, as TF does. The power is one scalar call of the C library's ``pow`` for the
dtype (``powf`` for float32 and, through float32, for the half types): ``torch.pow`` on two 0-dim
CPU tensors runs torch's scalar loop (``std::pow``), which is the call TF's CPU kernel makes for
this 0-dim power. glibc's ``powf`` is faithfully rounded (at most 0.82 ulp) but not always
correctly rounded (decay 0.997 at :math:`k = 31` is one ulp off the exact power), so a correctly
rounded or vectorised power would not give TF's bits. On CUDA the power is CUDA's ``powf``.

Which bits are TF's
-------------------
On the CPU every average equals, bit for bit, the one TF computes on the same machine: the
update uses only IEEE additions, subtractions, multiplications, divisions and rounding casts,
which every CPU and SIMD flavour rounds alike, and the debiasing power is the C library call
that TF makes. glibc chooses an FMA or a non-FMA build of ``powf`` by CPU; the two disagree on
about 2 in 10^7 (base, exponent) pairs (9 of 48 million compared), none of those the float32
and half-precision tests use.
Exceptions: TF's CPU kernels flush subnormal numbers (below about 1.2e-38 in float32) to zero,
and this layer keeps them, as IEEE arithmetic does; another C library (macOS, Windows, musl)
has another ``powf``, and debiased averages then follow it.

Porting guide
-------------
* ``ema = tf.train.ExponentialMovingAverage(0.99, global_step)`` becomes
  ``ema = ptf.ExponentialMovingAverage(0.99, num_updates=lambda: global_step)`` for a Python int
  step, or ``num_updates=global_step`` for a 0-dim step tensor that you update in place.
  ``decay`` and ``num_updates`` are read at every ``apply()``.
* ``ema_op = ema.apply(var_list)`` followed by ``sess.run(ema_op)`` every step becomes a call to
  ``ema.apply(var_list)`` every step (TF2 eager semantics). Call it once right after creating the
  model as well, as the TF2 docs advise: that call creates the shadows and its update is a no-op.
* Shadows start from the variable's value at the *first* ``apply()``, as in TF2 eager. TF1 graphs
  initialised them from the variable's *initial* value (``global_variables_initializer``), so a
  TF1 script that assigned the variable before the first ``sess.run(ema_op)`` needs the first
  ``apply()`` moved to where the graph called ``ema.apply``.
* In a TF1 graph, ``tf.control_dependencies([train_step, ema_op])`` runs both ops with no order
  between them; in seed 002 the averages saw the weights and ``global_step`` from *before* the
  optimizer step. Port it as ``ema.apply(model)`` followed by ``opt.step()``; ``global_step += 1``.
* Names: a module's tensors keep their torch names (``"fc.weight"``), so averages are named
  ``"fc.weight/ExponentialMovingAverage"``; torch's ``"."`` is not rewritten to TF's ``"/"``. Pass
  a ``Mapping`` such as ``{"my_scope/weights": w}`` to choose names yourself.
* ``tf.train.Saver().save`` / ``Saver(ema.variables_to_restore()).restore`` become
  :func:`save_checkpoint` / :func:`restore_checkpoint`.

Where this layer differs from TF on purpose
-------------------------------------------
* ``decay`` outside ``[0, 1]`` and negative or non-finite ``num_updates`` raise ``ValueError``;
  TF accepts them silently and the average diverges.
* A shadow whose variable changed shape, dtype or device raises ``ValueError``.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from polyak.io import atomic_path, write_atomic

__all__ = [
    "ExponentialMovingAverage",
    "assign_moving_average",
    "load_checkpoint",
    "restore_checkpoint",
    "save_checkpoint",
]

Number = int | float
Decay = float | Tensor | Callable[[], float | Tensor]
NumUpdates = int | Tensor | Callable[[], int | Tensor] | None
VarList = nn.Module | Mapping[str, Tensor] | Iterable[Tensor | tuple[str, Tensor]]

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_UNNAMED = "Variable"  # TF's name for a variable created without one


# ----------------------------------------------------------------------------------------------
# The arithmetic: TF's decay rule and TF's update, rounded as TF rounds them.


def _check_float(name: str, tensor: Tensor) -> None:
    if tensor.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"The variables must be half, float, or double: {name!r} has dtype {tensor.dtype}. "
            f"Expected torch.bfloat16, torch.float16, torch.float32 or torch.float64, as in "
            f"TensorFlow. Leave integer tensors (step counters, BatchNorm's "
            f"num_batches_tracked) out of the averaged set, or cast the tensor to a float dtype."
        )


def _check_scalar_tensor(value: Tensor, what: str) -> None:
    if value.numel() != 1 or value.is_complex():
        raise TypeError(
            f"{what} must be a real scalar; got a tensor of shape {tuple(value.shape)} and dtype "
            f"{value.dtype}. Pass a 0-dim real tensor, a Python number, or a callable returning "
            f"one."
        )


def _read_scalar(value: object, what: str) -> Number:
    """``value`` (a real number or a one-element tensor) as a Python number, read on the host."""
    if isinstance(value, Tensor):
        _check_scalar_tensor(value, what)
        return value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{what} must be a real number or a 0-dim tensor; got {value!r} of type "
            f"{type(value).__name__}. Pass e.g. a float such as 0.999."
        )
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _check_decay(decay: Number, what: str = "decay") -> None:
    if not 0.0 <= decay <= 1.0:  # also false for NaN
        raise ValueError(
            f"{what}={decay!r} is outside [0, 1]. TensorFlow accepts it silently and the "
            f"average diverges (decay > 1) or overshoots every step (decay < 0); polyak.tf "
            f"raises instead. Pass a decay in [0, 1], typically 0.99 to 0.9999 (the weight "
            f"kept by the old average, not the rate 1 - decay)."
        )


def _check_num_updates(num_updates: Number) -> None:
    if not 0 <= num_updates < float("inf"):  # also false for NaN
        raise ValueError(
            f"num_updates={num_updates!r} must be a finite count >= 0: TensorFlow's decay "
            f"min(decay, (1 + n) / (10 + n)) is meaningless for it (negative or NaN). Pass the "
            f"number of optimizer steps taken so far, e.g. your global_step."
        )


def _tf_one_minus_decay(decay: Number, num_updates: Number | None) -> Tensor:
    """TF's ``1 - min(decay, (1 + n) / (10 + n))``, every operation in float32 (a 0-dim tensor).

    ``decay`` is converted to float32 (round to nearest even) as ``convert_to_tensor(decay,
    float32)`` does, ``num_updates`` is cast to float32 as ``math_ops.cast`` does (an int goes
    int64 -> float32 in one rounding).
    """
    d = torch.tensor(decay, dtype=torch.float64).to(torch.float32)
    if num_updates is not None:
        source = torch.int64 if isinstance(num_updates, int) else torch.float64
        n = torch.tensor(num_updates, dtype=source).to(torch.float32)
        d = torch.minimum(d, (1.0 + n) / (10.0 + n))
    return 1.0 - d


def _cast_one_minus(one_minus: Tensor, dtype: torch.dtype) -> float:
    """``one_minus`` rounded to ``dtype`` (TF's ``math_ops.cast``), as a Python float.

    The result is exactly representable in ``dtype``, so passing it as a scalar to an op on a
    ``dtype`` tensor involves no further rounding.
    """
    return one_minus.to(dtype).item()


def _ema_step_(shadow: Tensor, value: Tensor, one_minus: float) -> None:
    """``shadow -= (shadow - value) * one_minus``: three ops, each rounded in ``shadow.dtype``."""
    delta = torch.sub(shadow, value)
    delta.mul_(one_minus)
    shadow.sub_(delta)


@dataclass(eq=False)
class _DebiasState:
    """TF's hidden ``biased`` average and ``local_step``, both in the averaged tensor's dtype."""

    biased: Tensor
    local_step: Tensor  # 0-dim; like TF, in the tensor's dtype (bfloat16 stops counting at 256)

    @classmethod
    def zeros_like(cls, tensor: Tensor) -> _DebiasState:
        return cls(
            biased=torch.zeros_like(tensor, memory_format=torch.contiguous_format),
            local_step=torch.zeros((), dtype=tensor.dtype, device=tensor.device),
        )


def _debiased_step_(average: Tensor, value: Tensor, one_minus: float, state: _DebiasState) -> None:
    """TF's ``_zero_debias``: ``b -= (b - x) * beta; k += 1; average = b / (1 - (1 - beta) ** k)``.

    ``1 - beta``, the power, ``1 - power`` and the division are each rounded in the tensor's dtype.
    The power is a 0-dim ``torch.pow``: on the CPU one scalar call of the C library's ``powf``
    (``pow`` for float64), as in TF's kernel; do not vectorise it or compute it in float64, which
    rounds differently (module docstring).
    """
    _ema_step_(state.biased, value, one_minus)
    state.local_step.add_(1)
    beta = torch.full((), one_minus, dtype=average.dtype, device=average.device)
    bias_factor = 1 - torch.pow(1 - beta, state.local_step)
    torch.div(state.biased, bias_factor, out=average)


def _check_same_kind(name: str, shadow: Tensor, value: Tensor) -> None:
    if (shadow.shape, shadow.dtype, shadow.device) != (value.shape, value.dtype, value.device):
        raise ValueError(
            f"{name!r} was averaged as shape {tuple(shadow.shape)}, {shadow.dtype} on "
            f"{shadow.device}, and is now shape {tuple(value.shape)}, {value.dtype} on "
            f"{value.device}. Expected the same shape, dtype and device at every apply(); "
            f"use a new ExponentialMovingAverage after changing a tensor's shape, dtype or "
            f"device (or move the model before the first apply())."
        )


# ----------------------------------------------------------------------------------------------
# assign_moving_average


_ASSIGN_DEBIAS_STATE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def assign_moving_average(
    variable: Tensor, value: Tensor | float, decay: float | Tensor, zero_debias: bool = True
) -> Tensor:
    r"""Move ``variable`` towards ``value`` in place, as TF's ``assign_moving_average``.

    .. math::

        v \leftarrow v - (v - x)\,\beta, \qquad \beta = \operatorname{cast}_{\text{dtype}}(1 - d)

    three separately rounded ops in ``variable.dtype``. ``1 - d`` is computed as TF computes
    ``1.0 - decay``: for a Python number in double precision and then rounded to float32 (TF's
    ``convert_to_tensor``), for a floating tensor in the tensor's dtype. Note that this differs
    from :class:`ExponentialMovingAverage`, which first converts ``decay`` to float32.

    With ``zero_debias=True`` (TF's default) the variable is treated as 0-initialised: a hidden
    biased average :math:`b` and step :math:`k`, created at zero on the first call for this
    variable, are updated and the variable is *set* to the debiased value
    :math:`b / (1 - (1 - \beta)^k)`; its own previous value is not used. Step 0 does not exist:
    the first call gives :math:`k = 1`, so for a constant ``value`` the variable equals it up to
    rounding from the first call on. The state is kept per variable tensor (by identity, held weakly: it disappears with
    the variable), one state per variable, as if the TF op were built once and run every call.
    ``decay = 1`` with ``zero_debias=True`` gives 0 / 0 = NaN, as in TF.

    Args:
        variable: a floating tensor (bfloat16, float16, float32, float64), updated in place
            without autograd tracking.
        value: a tensor of the same dtype broadcastable to ``variable``'s shape, or a number.
        decay: a float or floating 0-dim tensor in ``[0, 1]``; TF accepts values outside,
            this function raises ``ValueError``.
        zero_debias: debias a 0-initialised average as above.

    Returns:
        ``variable``, holding the new average.

    Example:
        >>> import torch
        >>> from polyak import tf as ptf
        >>> v = torch.zeros(2)
        >>> ptf.assign_moving_average(v, torch.tensor([1.0, 2.0]), 0.5, zero_debias=False)
        tensor([0.5000, 1.0000])
    """
    if not isinstance(variable, Tensor):
        raise TypeError(
            f"variable must be a torch.Tensor; got {type(variable).__name__}. Pass the tensor "
            f"that holds the average; it is updated in place."
        )
    _check_float("variable", variable)
    if isinstance(value, Tensor):
        if value.dtype != variable.dtype:
            raise TypeError(
                f"value has dtype {value.dtype} but variable has dtype {variable.dtype}; "
                f"TensorFlow refuses mixed dtypes here, and so does polyak.tf. Cast the value: "
                f"value.to({variable.dtype})."
            )
        try:
            broadcast = torch.broadcast_shapes(value.shape, variable.shape)
        except RuntimeError:
            broadcast = None
        if broadcast != variable.shape:
            raise ValueError(
                f"value of shape {tuple(value.shape)} does not broadcast to the variable's shape "
                f"{tuple(variable.shape)}. Pass a value of the variable's shape."
            )
    else:
        value = torch.as_tensor(_read_scalar(value, "value"), dtype=variable.dtype)
        value = value.to(variable.device)

    if isinstance(decay, Tensor) and decay.is_floating_point():
        _check_decay(_read_scalar(decay, "decay"))
        one_minus = 1.0 - decay.detach().reshape(())  # in the decay tensor's dtype, as in TF
    else:
        d = _read_scalar(decay, "decay")
        _check_decay(d)
        one_minus = torch.tensor(1.0 - d, dtype=torch.float64).to(torch.float32)
    beta = _cast_one_minus(one_minus, variable.dtype)

    with torch.no_grad():
        if not zero_debias:
            _ema_step_(variable, value, beta)
            return variable
        state = _ASSIGN_DEBIAS_STATE.get(variable)
        if state is None:
            state = _DebiasState.zeros_like(variable)
            _ASSIGN_DEBIAS_STATE[variable] = state
        _check_same_kind("variable", state.biased, variable)
        _debiased_step_(variable, value, beta, state)
    return variable


# ----------------------------------------------------------------------------------------------
# ExponentialMovingAverage


@dataclass(eq=False)
class _Average:
    shadow: Tensor
    variable: Tensor | None = None  # the averaged variable; None for an average of values
    debias: _DebiasState | None = None


def _is_trainable(tensor: Tensor) -> bool:
    """TF's ``trainable=True``, in torch terms: a floating tensor that requires grad."""
    return tensor.is_floating_point() and tensor.requires_grad


def _trainable_parameters(module: nn.Module) -> list[tuple[str, Tensor]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _named_collection(
    items: VarList, what: str, elements: str, fix: str
) -> list[tuple[str, Tensor]] | None:
    """(name, tensor) pairs for a module (its trainable parameters) or a mapping; ``None`` for
    another iterable, which the caller names itself; ``TypeError`` for anything else."""
    if isinstance(items, nn.Module):
        return _trainable_parameters(items)
    if isinstance(items, Mapping):
        return _named_tensors(items, what)
    if isinstance(items, (Tensor, str)) or not isinstance(items, Iterable):
        raise TypeError(
            f"{what} must be an nn.Module, a Mapping[str, Tensor] or an iterable of {elements}; "
            f"got {type(items).__name__}. {fix}"
        )
    return None


def _named_tensors(mapping: Mapping[str, Tensor], what: str) -> list[tuple[str, Tensor]]:
    pairs = list(mapping.items())
    for name, tensor in pairs:
        if not isinstance(name, str):
            raise TypeError(
                f"{what} keys must be names (str); got {name!r} of type {type(name).__name__}. "
                f"Key each tensor by its name, e.g. {{'my_scope/weights': w}}."
            )
        if not isinstance(tensor, Tensor):
            raise TypeError(
                f"{what}[{name!r}] must be a torch.Tensor; got {type(tensor).__name__}. "
                f"Wrap numbers with torch.tensor(...)."
            )
    return pairs


class ExponentialMovingAverage:
    r"""TF's ``tf.train.ExponentialMovingAverage`` (TF2 eager semantics) over torch tensors.

    Every :meth:`apply` reads the decay and updates every shadow ``s`` of a variable ``v`` by

    .. math::

        \hat d = \min\big(d, \tfrac{1 + n}{10 + n}\big) \text{ (float32; only with num\_updates)},
        \qquad s \leftarrow s - (s - v)\,\operatorname{cast}_{\text{dtype}}(1 - \hat d)

    rounded exactly as TF rounds it (see the module docstring), so float32 results equal TF's
    bit for bit. The first ``apply()`` of a variable creates its shadow from the variable's
    current value and then updates it (a no-op, since ``s = v``); there is no step 0 beyond that.
    :meth:`apply_values` averages values instead of variables: shadows start at zero and, with
    ``zero_debias=True``, are debiased (:func:`assign_moving_average`).

    ``decay`` and ``num_updates`` are read at every ``apply()``: pass a float, a 0-dim tensor
    that you update in place (TF's ``global_step`` variable) or a callable. A tensor or a callable
    returning one is read to the host once per ``apply()`` (a device-to-host copy for an
    accelerator tensor): this layer trades speed for exact TF arithmetic and checked inputs.

    Args:
        decay: in ``[0, 1]``: a float, a 0-dim tensor, or a callable ``() -> float``. Converted
            to float32 as TF does. Unlike TF, values outside ``[0, 1]`` (e.g. 1.5 or -0.5)
            raise ``ValueError``.
        num_updates: ``None``, an int, a 0-dim integer or float tensor, or a callable
            ``() -> int``; when given, the decay used is ``min(decay, (1 + n) / (10 + n))`` in
            float32. A negative or non-finite count raises ``ValueError``.
        zero_debias: debias the zero-initialised averages of :meth:`apply_values`. Averages of
            variables (:meth:`apply`) are never debiased, as in TF.
        name: the suffix of every average's name: ``"<variable name>/<name>"``.

    Example (seed 002, the first run):
        >>> import torch
        >>> from polyak import tf as ptf
        >>> w1 = torch.tensor(0.0)
        >>> global_step = torch.tensor(0.0)
        >>> ema = ptf.ExponentialMovingAverage(0.99, num_updates=global_step)
        >>> ema.apply([w1])                        # creates the shadow: 0.0
        >>> _ = w1.fill_(1.0), global_step.fill_(1.0)
        >>> ema.apply([w1])                        # decay = min(0.99, 2 / 11)
        >>> ema.average(w1)
        tensor(0.8182)
        >>> ema.average_name(w1)
        'Variable/ExponentialMovingAverage'
    """

    def __init__(
        self,
        decay: Decay,
        num_updates: NumUpdates = None,
        zero_debias: bool = False,
        name: str = "ExponentialMovingAverage",
    ) -> None:
        # Fail early where the value is already known; tensors and callables are read and
        # checked at every apply().
        if isinstance(decay, Tensor):
            _check_scalar_tensor(decay, "decay")
        elif not callable(decay):
            _check_decay(_read_scalar(decay, "decay"))
        if isinstance(num_updates, Tensor):
            _check_scalar_tensor(num_updates, "num_updates")
        elif num_updates is not None and not callable(num_updates):
            _check_num_updates(_read_scalar(num_updates, "num_updates"))
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"name must be a non-empty str; got {name!r}. It is the suffix of every "
                f"average's name, e.g. name='ExponentialMovingAverage'."
            )
        self._decay = decay
        self._num_updates = num_updates
        self._zero_debias = bool(zero_debias)
        self._name = name
        self._averages: dict[str, _Average] = {}
        self._name_of: dict[int, str] = {}  # id(variable) -> name; the record keeps it alive
        self._modules: list[nn.Module] = []  # modules given to apply(), for variables_to_restore

    @property
    def name(self) -> str:
        """The name of this object: the suffix of every average's name."""
        return self._name

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(decay={self._decay!r}, num_updates={self._num_updates!r}, "
            f"zero_debias={self._zero_debias}, name={self._name!r}, "
            f"averages={len(self._averages)})"
        )

    # -- decay --------------------------------------------------------------------------------

    def _one_minus_decay(self) -> Tensor:
        """Read ``decay`` and ``num_updates`` now; TF's float32 ``1 - decay`` (0-dim, CPU)."""
        decay = self._decay() if callable(self._decay) else self._decay
        what = "decay (returned by the decay callable)" if callable(self._decay) else "decay"
        decay = _read_scalar(decay, what)
        _check_decay(decay, what)
        num_updates = self._num_updates
        if num_updates is not None:
            if callable(num_updates):
                num_updates = num_updates()
            num_updates = _read_scalar(num_updates, "num_updates")
            _check_num_updates(num_updates)
        return _tf_one_minus_decay(decay, num_updates)

    # -- names --------------------------------------------------------------------------------

    def _variable_name(self, tensor: Tensor) -> str | None:
        name = self._name_of.get(id(tensor))
        if name is not None and self._averages[name].variable is tensor:
            return name
        return None

    def _name_variables(self, var_list: VarList) -> list[tuple[str, Tensor]]:
        """Name every variable of ``var_list``; nothing is recorded yet."""
        named_already = _named_collection(
            var_list, "var_list", "tensors", "Wrap a single tensor in a list: ema.apply([w])."
        )
        if named_already is not None:
            return named_already
        named: list[tuple[str, Tensor]] = []
        taken = set(self._averages)
        for item in var_list:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                named.extend(_named_tensors(dict([item]), "var_list"))
                continue
            if not isinstance(item, Tensor):
                raise TypeError(
                    f"var_list items must be tensors or (name, tensor) pairs; got "
                    f"{type(item).__name__}. Pass e.g. [w] or model.named_parameters()."
                )
            name = self._variable_name(item)
            if name is None:
                seen = next((n for n, t in named if t is item), None)
                if seen is not None:
                    name = seen
                else:  # TF's default names: Variable, Variable_1, Variable_2, ...
                    name, index = _UNNAMED, 0
                    while name in taken:
                        index += 1
                        name = f"{_UNNAMED}_{index}"
                    taken.add(name)
            named.append((name, item))
        return named

    def average_name(self, var_or_name: Tensor | str) -> str:
        """The name of the average of a variable or value: ``"<name>/<ema name>"``.

        Works before :meth:`apply` for a name; a tensor must have been seen by :meth:`apply`
        (a torch tensor carries no name of its own). Module tensors keep torch's dotted names:
        ``"fc.weight/ExponentialMovingAverage"``. Unlike TF, no ``_1`` suffix is added to make
        names unique across objects.
        """
        if isinstance(var_or_name, str):
            return f"{var_or_name}/{self._name}"
        if isinstance(var_or_name, Tensor):
            name = self._variable_name(var_or_name)
            if name is None:
                raise ValueError(
                    f"average_name() got a tensor of shape {tuple(var_or_name.shape)} and dtype "
                    f"{var_or_name.dtype} that this ExponentialMovingAverage has not seen, and "
                    f"a torch tensor carries no name. Expected a name or a tensor passed to "
                    f"apply(); pass the name, e.g. ema.average_name('fc.weight')."
                )
            return f"{name}/{self._name}"
        raise TypeError(
            f"average_name() takes a tensor or a name (str); got {type(var_or_name).__name__}."
        )

    def average(self, var_or_name: Tensor | str) -> Tensor | None:
        """The shadow tensor holding the average of a variable or value, or ``None``.

        A variable is looked up by identity (the tensor passed to :meth:`apply`) or by name;
        an average of values (:meth:`apply_values`) by its name. The shadow itself is returned:
        copy it before modifying it.
        """
        if isinstance(var_or_name, str):
            name: str | None = var_or_name
        elif isinstance(var_or_name, Tensor):
            name = self._variable_name(var_or_name)
        else:
            raise TypeError(
                f"average() takes a tensor or a name (str); got {type(var_or_name).__name__}."
            )
        record = self._averages.get(name) if name is not None else None
        return record.shadow if record is not None else None

    # -- updates ------------------------------------------------------------------------------

    def apply(self, var_list: VarList) -> None:
        """Create missing shadows from the variables' current values, then update every shadow.

        For each variable ``v`` with shadow ``s`` (created as a copy of ``v`` on the first call
        that sees ``v``): ``s <- s - (s - v) * cast(1 - decay)``, see the class docstring.
        Call it after every optimizer step, and once right after creating the model.

        Args:
            var_list: what TF calls the variables:

                * an ``nn.Module``: its parameters with ``requires_grad`` (TF's trainable
                  variables), named as in ``named_parameters()``, e.g. ``"fc.weight"``;
                  frozen parameters and buffers are not averaged. The module is remembered as
                  the source of the other variables for :meth:`variables_to_restore`.
                * a ``Mapping[str, Tensor]``: every tensor, named by its key.
                * an iterable of tensors or ``(name, tensor)`` pairs. A tensor without a name
                  keeps the name it got at an earlier call (found by identity); a new one is
                  named ``"Variable"``, ``"Variable_1"``, ... in the order first seen, as TF
                  names unnamed variables. Prefer names for anything you checkpoint.

        Raises:
            TypeError: a tensor is not bfloat16, float16, float32 or float64 (as TF).
            ValueError: decay or num_updates is out of range; a name already averages another
                tensor, or a tensor changed shape, dtype or device.
        """
        named = self._name_variables(var_list)
        one_minus = self._one_minus_decay()
        names_in_call: dict[int, str] = {}
        tensors_in_call: dict[str, Tensor] = {}
        for name, var in named:
            _check_float(name, var)
            if tensors_in_call.setdefault(name, var) is not var:
                raise ValueError(
                    f"Two different tensors are named {name!r} in one apply(). Expected one "
                    f"tensor per name; rename one of them."
                )
            record = self._averages.get(name)
            if record is not None and record.variable is None:
                raise ValueError(
                    f"{name!r} already names an average of values (apply_values). Expected a "
                    f"name used only for variables; rename one of the two."
                )
            if record is not None:
                _check_same_kind(name, record.shadow, var)
            other = names_in_call.setdefault(id(var), name)
            if other == name:
                other = self._variable_name(var)
            if other is not None and other != name:
                raise ValueError(
                    f"The tensor passed as {name!r} is already averaged as {other!r}. Expected "
                    f"one name per tensor; pass it under the same name at every apply()."
                )
        if isinstance(var_list, nn.Module) and not any(m is var_list for m in self._modules):
            self._modules.append(var_list)

        betas: dict[torch.dtype, float] = {}
        with torch.no_grad():
            for name, var in named:
                record = self._averages.get(name)
                if record is None:
                    record = _Average(shadow=var.detach().clone())
                    self._averages[name] = record
                if record.variable is not var:
                    if record.variable is not None:
                        self._name_of.pop(id(record.variable), None)
                    record.variable = var
                    self._name_of[id(var)] = name
            for name, var in named:
                beta = betas.get(var.dtype)
                if beta is None:
                    beta = betas[var.dtype] = _cast_one_minus(one_minus, var.dtype)
                _ema_step_(self._averages[name].shadow, var, beta)

    def apply_values(self, values: Mapping[str, Tensor]) -> None:
        """Average values (TF's averages of tensors, e.g. a loss): zero-initialised shadows.

        For each name with value ``x`` and shadow ``s`` (zeros on the first call):
        ``s <- s - (s - x) * cast(1 - decay)``; with ``zero_debias=True`` instead
        ``b <- b - (b - x) * beta; k <- k + 1; s = b / (1 - (1 - beta) ** k)`` with hidden
        ``b`` and ``k`` (module docstring). Values are detached; no reference to them is kept,
        so look their averages up by name.

        As in TF, ``1 - beta`` is recomputed in the value's dtype for the debiasing factor. In
        bfloat16 and float16 that rounding is coarse next to 1 (bfloat16: 0.99 becomes
        0.98828125), so debiased half-precision averages can be several percent off the
        value; TF gives the same numbers.
        """
        if not isinstance(values, Mapping):
            raise TypeError(
                f"apply_values() takes a Mapping[str, Tensor]; got {type(values).__name__}. "
                f"Name each value, e.g. ema.apply_values({{'loss': loss}})."
            )
        named = _named_tensors(values, "values")
        one_minus = self._one_minus_decay()
        for name, value in named:
            _check_float(name, value)
            record = self._averages.get(name)
            if record is not None and record.variable is not None:
                raise ValueError(
                    f"{name!r} already names an average of a variable (apply). Expected a name "
                    f"used only for values; rename one of the two."
                )
            if record is not None:
                _check_same_kind(name, record.shadow, value)

        betas: dict[torch.dtype, float] = {}
        with torch.no_grad():
            for name, value in named:
                record = self._averages.get(name)
                if record is None:
                    shadow = torch.zeros_like(value, memory_format=torch.contiguous_format)
                    debias = _DebiasState.zeros_like(value) if self._zero_debias else None
                    record = self._averages[name] = _Average(shadow=shadow, debias=debias)
                beta = betas.get(value.dtype)
                if beta is None:
                    beta = betas[value.dtype] = _cast_one_minus(one_minus, value.dtype)
                if record.debias is None:
                    _ema_step_(record.shadow, value, beta)
                else:
                    _debiased_step_(record.shadow, value, beta, record.debias)

    # -- checkpoints --------------------------------------------------------------------------

    def shadow_variables(self) -> dict[str, Tensor]:
        """Every tensor this object keeps, by its TF checkpoint name (the live tensors).

        ``"<name>/<ema name>"`` for each average, plus ``".../biased"`` and
        ``".../local_step"`` for debiased ones: what TF's ``Saver()`` writes for them.
        :func:`save_checkpoint` saves these; :func:`restore_checkpoint` can fill them back
        (after an ``apply`` has created them) to resume.
        """
        tensors: dict[str, Tensor] = {}
        for name, record in self._averages.items():
            avg_name = self.average_name(name)
            tensors[avg_name] = record.shadow
            if record.debias is not None:
                tensors[f"{avg_name}/biased"] = record.debias.biased
                tensors[f"{avg_name}/local_step"] = record.debias.local_step
        return tensors

    def _global_variables(
        self, model: nn.Module | Mapping[str, Tensor] | None
    ) -> tuple[dict[str, Tensor], list[str]]:
        """TF's ``global_variables()`` and ``trainable_variables()`` names, in torch terms."""
        if isinstance(model, nn.Module):
            trainable = [n for n, _ in _trainable_parameters(model)]
            return dict(model.state_dict(keep_vars=True)), trainable
        if isinstance(model, Mapping):
            variables = dict(_named_tensors(model, "model"))
            return variables, [n for n, t in variables.items() if _is_trainable(t)]
        if model is not None:
            raise TypeError(
                f"model must be an nn.Module, a Mapping[str, Tensor] or None; got "
                f"{type(model).__name__}. Pass the model you restore into."
            )
        variables: dict[str, Tensor] = {}
        trainable: list[str] = []
        for module in self._modules:
            variables.update(module.state_dict(keep_vars=True))
            trainable += [n for n, _ in _trainable_parameters(module)]
        for name, record in self._averages.items():
            if record.variable is not None:
                variables.setdefault(name, record.variable)
        return variables, trainable

    def _resolve(self, items: VarList, variables: Mapping[str, Tensor]) -> list[tuple[str, Tensor]]:
        """``moving_avg_variables`` as (name, tensor) pairs, tensors taken from ``variables``."""
        named_already = _named_collection(
            items, "moving_avg_variables", "names or tensors", "Wrap a single one in a list."
        )
        if named_already is not None:
            return named_already
        name_by_id = {id(t): n for n, t in variables.items()}
        pairs: list[tuple[str, Tensor]] = []
        for item in items:
            if isinstance(item, str):
                tensor = variables.get(item)
                if tensor is None and item in self._averages:
                    tensor = self._averages[item].variable
                if tensor is None:
                    raise ValueError(
                        f"moving_avg_variables names {item!r}, which is neither in the model "
                        f"nor averaged by this object. Known names: {sorted(variables)[:20]}. "
                        f"Pass model=... to variables_to_restore, or fix the name."
                    )
                pairs.append((item, tensor))
            elif isinstance(item, Tensor):
                name = name_by_id.get(id(item)) or self._variable_name(item)
                if name is None:
                    raise ValueError(
                        f"moving_avg_variables holds a tensor of shape {tuple(item.shape)} that "
                        f"is neither in the model nor seen by apply(), so it has no name. Pass "
                        f"its name instead, or pass model=... holding it."
                    )
                pairs.append((name, item))
            elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                pairs.extend(_named_tensors(dict([item]), "moving_avg_variables"))
            else:
                raise TypeError(
                    f"moving_avg_variables items must be names, tensors or (name, tensor) "
                    f"pairs; got {type(item).__name__}."
                )
        return pairs

    def variables_to_restore(
        self,
        moving_avg_variables: VarList | None = None,
        *,
        model: nn.Module | Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Checkpoint name -> tensor to fill, restoring averages into the model's own tensors.

        TF's rule: each variable in ``moving_avg_variables`` is restored from its average,
        ``"<name>/<ema name>"``; every other variable from its own name. Pass the result to
        :func:`restore_checkpoint`. Seed 002:
        ``{"my_scope/weights/ExponentialMovingAverage": W, "global_step": global_step}``.

        As in TF, this object's own tensors (:meth:`shadow_variables`) are variables too: each
        one whose name is not already a key is restored into itself under its own name. That
        lists the averages of values (``"loss/<ema name>"``, with ``.../biased`` and
        ``.../local_step`` when debiased) and the averages of variables that are not restored
        from them, so a checkpoint written by :func:`save_checkpoint` with this object resumes
        them too.

        TF takes the variables from the graph; here they come from ``model``:

        * an ``nn.Module``: every entry of ``model.state_dict()`` (parameters and buffers) is a
          variable; its parameters with ``requires_grad`` are the trainable ones.
        * a ``Mapping[str, Tensor]``: every entry is a variable; those with
          ``requires_grad`` (and a float dtype) are trainable.
        * ``None``: the modules and tensors given to :meth:`apply` so far.

        A tensor restored from its average is not restored again under another name (tied
        weights that ``state_dict`` lists twice).

        Args:
            moving_avg_variables: the variables to restore from their averages: an
                ``nn.Module`` (its parameters with ``requires_grad``), a ``Mapping``, or an
                iterable of names, tensors or ``(name, tensor)`` pairs. ``None`` means TF's
                default: the trainable variables plus every variable averaged by
                :meth:`apply`.
            model: where the variables come from, as above; keyword only.
        """
        variables, trainable = self._global_variables(model)
        if moving_avg_variables is None:
            names = list(trainable)
            names += [n for n, r in self._averages.items() if r.variable is not None]
            pairs: list[tuple[str, Tensor]] = []
            for name in dict.fromkeys(names):
                tensor = variables.get(name)
                if tensor is None:
                    tensor = self._averages[name].variable
                pairs.append((name, tensor))
        else:
            pairs = self._resolve(moving_avg_variables, variables)

        restore: dict[str, Tensor] = {}
        for name, tensor in pairs:
            restore[self.average_name(name)] = tensor
        averaged_names = {n for n, _ in pairs}
        averaged_ids = {id(t) for _, t in pairs}
        # TF's global variables include this object's own: its shadows are variables too.
        own = self.shadow_variables()
        for name, tensor in [*variables.items(), *own.items()]:
            if name in averaged_names or name in restore or id(tensor) in averaged_ids:
                continue
            restore[name] = tensor
        return restore


# ----------------------------------------------------------------------------------------------
# Checkpoints: TF's Saver in torch terms. Plain tensors by name; nothing is unpickled.


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


def save_checkpoint(
    path: str | os.PathLike[str],
    variables: nn.Module | Mapping[str, Tensor],
    ema: ExponentialMovingAverage | None = None,
) -> None:
    """Save the variables under their own names and ``ema``'s averages under TF's names.

    TF's ``tf.train.Saver().save(sess, path)`` for a graph holding ``variables`` and the
    shadow variables of ``ema``: a module's ``state_dict()`` (or the mapping) as is, plus
    ``ema.shadow_variables()`` (``"<name>/ExponentialMovingAverage"``, ...). A path ending in
    ``.safetensors`` is written with safetensors, any other with ``torch.save`` of a plain
    ``dict[str, Tensor]`` (loadable with ``weights_only=True``). The write is atomic: a temporary
    file in the same folder, fsync, then ``os.replace``.
    """
    path = Path(path)
    if isinstance(variables, nn.Module):
        tensors = dict(variables.state_dict())
    elif isinstance(variables, Mapping):
        tensors = dict(_named_tensors(variables, "variables"))
    else:
        raise TypeError(
            f"variables must be an nn.Module or a Mapping[str, Tensor]; got "
            f"{type(variables).__name__}. Pass the model (or its named tensors) to save."
        )
    if ema is not None:
        shadows = ema.shadow_variables()
        clash = sorted(set(shadows) & set(tensors))
        if clash:
            raise ValueError(
                f"The names {clash} are both variables and averages of {ema.name!r}. Expected "
                f"distinct names; give the ExponentialMovingAverage another name=..."
            )
        tensors.update(shadows)
    # Own CPU copies: no shared storage (safetensors refuses it), no autograd, no device.
    tensors = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in tensors.items()}

    if _is_safetensors(path):  # serialised here: save_file leaves its own temp file if killed
        from safetensors.torch import save

        write_atomic(path, save(tensors))
    else:
        with atomic_path(path) as tmp:
            torch.save(tensors, tmp)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Every tensor of a checkpoint by name, on the CPU (safetensors, or ``torch.load`` with
    ``weights_only=True``: nothing is unpickled)."""
    path = Path(path)
    if _is_safetensors(path):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in loaded.items()
    ):
        raise ValueError(
            f"{str(path)!r} holds a {type(loaded).__name__}, not a checkpoint of named tensors. "
            f"Expected a dict[str, Tensor] as written by save_checkpoint()."
        )
    return loaded


def restore_checkpoint(
    path: str | os.PathLike[str], var_map: nn.Module | Mapping[str, Tensor]
) -> None:
    """Fill tensors in place from a checkpoint, by name: TF's ``Saver(var_map).restore``.

    ``var_map`` maps a name *in the checkpoint* to the tensor to fill, e.g.
    ``ema.variables_to_restore(model=model)`` to load the averages into the model (seed 002's
    right way). An ``nn.Module`` means its ``state_dict()`` names: the raw weights (seed 002's
    wrong way, TF's plain ``Saver()``). Checkpoint entries not in ``var_map`` are ignored.
    Nothing is written unless every name is found with the tensor's shape and dtype.
    """
    if isinstance(var_map, nn.Module):
        targets = dict(var_map.state_dict(keep_vars=True))
    elif isinstance(var_map, Mapping):
        targets = dict(_named_tensors(var_map, "var_map"))
    else:
        raise TypeError(
            f"var_map must be an nn.Module or a Mapping[str, Tensor] (checkpoint name -> tensor "
            f"to fill); got {type(var_map).__name__}. Pass e.g. ema.variables_to_restore()."
        )
    saved = load_checkpoint(path)
    missing = [n for n in targets if n not in saved]
    if missing:
        raise ValueError(
            f"{str(path)!r} has no tensors named {missing}. It holds {sorted(saved)[:20]}. "
            f"Expected every name of var_map in the checkpoint; save the averages with "
            f"save_checkpoint(path, model, ema), or use the same ExponentialMovingAverage name."
        )
    wrong = [
        f"{n}: checkpoint {tuple(saved[n].shape)} {saved[n].dtype}, "
        f"target {tuple(t.shape)} {t.dtype}"
        for n, t in targets.items()
        if (saved[n].shape, saved[n].dtype) != (t.shape, t.dtype)
    ]
    if wrong:
        raise ValueError(
            f"Shape or dtype differs between {str(path)!r} and var_map: {wrong}. Expected the "
            f"same shape and dtype, as TF's Saver does; restore into a matching model."
        )
    with torch.no_grad():
        for name, tensor in targets.items():
            tensor.copy_(saved[name])
