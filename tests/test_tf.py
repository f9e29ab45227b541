"""Tests for polyak.tf, the TF-faithful layer.

Three references, from most to least independent of this code:
  * the numbers TensorFlow printed in seed 002 (bit for bit on float32);
  * tests/fixtures/tf_reference.json, written by TensorFlow itself
    (tests/fixtures/make_tf_reference.py says how to regenerate it);
  * a NumPy emulation of TF's rounding (decay arithmetic in float32, ``1 - decay`` cast to the
    variable's dtype, then each op computed in float32 (half types) or natively and rounded to
    the dtype), and float64 closed forms.

A bit-exact reference must be the same on every CPU. The emulation therefore uses only IEEE
basic operations (+, -, *, /, rounding casts), which every SIMD flavour rounds the same way, and
computes the one transcendental, the debiasing power, in exact arithmetic rounded once: numpy's
float32 ``np.power`` is a different function on AVX-512 than on AVX2 (numpy picks its SIMD kernel
by CPU). TF itself computes that power with the C library's ``powf``, which is not always
correctly rounded; where the two differ, only the TensorFlow fixtures hold TF's bits.
"""

from __future__ import annotations

import doctest
import json
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import polyak.tf as ptf

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]
FIXTURE = Path(__file__).parent / "fixtures" / "tf_reference.json"
DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def f32(values) -> torch.Tensor:
    """The float32 tensor TF printed: its printed repr rounds back to the exact float32."""
    return torch.tensor(values, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# NumPy emulation of TF's rounding


def _round(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 (or float64 for float64) values to ``dtype``, nearest even."""
    if dtype == "float64":
        return np.asarray(x, dtype=np.float64)
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    bits = x.view(np.uint32).astype(np.uint64)  # bfloat16: keep the top 16 bits, nearest even
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.astype(np.uint32).view(np.float32)


def _work(dtype: str):
    """The type TF (and torch) compute a ``dtype`` op in before rounding: float32 for halves."""
    return np.float64 if dtype == "float64" else np.float32


def np_one_minus(decay: float, num_updates: float | None, dtype: str) -> np.ndarray:
    d = np.float32(decay)
    if num_updates is not None:
        n = np.float32(num_updates)
        d = min(d, (np.float32(1) + n) / (np.float32(10) + n))
    return _round(np.float32(1) - d, dtype)


def np_ema_step(shadow: np.ndarray, value: np.ndarray, one_minus, dtype: str) -> np.ndarray:
    """``shadow - (shadow - value) * one_minus``, each op rounded to ``dtype``."""
    w = _work(dtype)
    diff = _round(w(shadow) - w(value), dtype)
    delta = _round(diff * w(one_minus), dtype)
    return _round(w(shadow) - delta, dtype)


def f32_round(exact: Fraction) -> np.float32:
    """The float32 nearest to an exact rational (ties to even): one rounding, the same anywhere."""
    if exact == 0:
        return np.float32(0)
    sign, exact = (-1.0 if exact < 0 else 1.0), abs(exact)
    exponent = exact.numerator.bit_length() - exact.denominator.bit_length()
    if exact < Fraction(2) ** exponent:
        exponent -= 1  # now 2**exponent <= exact < 2**(exponent + 1)
    exponent = max(exponent, -126)  # subnormals share the smallest normal exponent's spacing
    mantissa = round(exact * Fraction(2) ** (23 - exponent))  # Fraction rounds ties to even
    return np.float32(sign * mantissa * 2.0 ** (exponent - 23))  # exact in double and float32


def f32_power(base: np.float32, k: int) -> np.float32:
    """``base ** k`` rounded once to float32, in exact arithmetic.

    The same on every CPU, unlike numpy's float32 ``np.power``, whose SIMD kernel numpy chooses by
    CPU (on AVX-512 it is 1 ulp off at several steps of the debiasing tests).
    """
    return f32_round(Fraction(float(base)) ** k)


def to_torch(x: np.ndarray, dtype: str, device: str = "cpu") -> torch.Tensor:
    return torch.tensor(np.asarray(x, dtype=np.float64)).to(device, DTYPES[dtype])  # a copy


# ----------------------------------------------------------------------------------------------
# Seed 002: every number TensorFlow printed


def test_seed002_w1_walks_0_1_10():
    """Run 1: w1 = 1 with global_step = 1 (three applies), then w1 = 10 with global_step = 100."""
    w1 = torch.tensor(0.0)
    global_step = torch.tensor(0.0)
    ema = ptf.ExponentialMovingAverage(0.99, num_updates=global_step)
    ema.apply([w1])  # where the TF1 graph called ema.apply: creates the shadow (0.0)
    assert torch.equal(ema.average(w1), f32(0.0))  # init w: [0.0, 0.0]

    w1.fill_(1.0)
    global_step.fill_(1.0)
    for printed in (0.8181818, 0.96694213, 0.99398947):
        ema.apply([w1])
        assert torch.equal(ema.average(w1), f32(printed))

    global_step.fill_(100.0)
    w1.fill_(10.0)
    ema.apply([w1])
    assert torch.equal(ema.average(w1), f32(1.7308447))
    ema.apply([w1])
    printed = [3.0286236, 7.031032, 8.735577, 9.461507, 9.770666]
    printed += [9.90233, 9.958405, 9.982285, 9.9924555, 9.996786]
    seen = []
    for i in range(100):
        ema.apply([w1])
        if i % 10 == 0:
            seen.append(ema.average(w1).clone())
    assert torch.equal(torch.stack(seen), f32(printed))
    assert ema.average_name(w1) == "Variable/ExponentialMovingAverage"


class _W1Model(nn.Module):
    """Seed 002's graph: w1 trainable, global_step a float32 variable, trainable or not."""

    def __init__(self, global_step_trainable: bool):
        super().__init__()
        self.w1 = nn.Parameter(torch.tensor(0.0))
        if global_step_trainable:
            self.global_step = nn.Parameter(torch.tensor(0.0))
        else:
            self.register_buffer("global_step", torch.tensor(0.0))


W1_RUN2_W = [11.0, 21.0, 31.0, 41.0, 51.0, 61.0, 71.0, 81.0, 91.0, 101.0]
W1_RUN2_AVERAGES = [2.9743524, 11.1391325, 20.35755, 30.024689, 39.882935]
W1_RUN2_AVERAGES += [49.822563, 59.79685, 69.7859, 79.78124, 89.77926]
GLOBAL_STEP_AVERAGES = [23.225294, 67.30321, 86.075096, 94.069664, 97.47439]
GLOBAL_STEP_AVERAGES += [98.924385, 99.541916, 99.80492, 99.916916, 99.96461]


@pytest.mark.parametrize("global_step_trainable", [False, True], ids=["run2", "run3"])
def test_seed002_w1_increments(global_step_trainable):
    """Runs 2 and 3: ``ema.apply(tf.trainable_variables())`` and w1 += 1 before every apply.

    In run 3 global_step is trainable, so it is both num_updates and averaged.
    """
    model = _W1Model(global_step_trainable)
    ema = ptf.ExponentialMovingAverage(0.99, num_updates=model.global_step)
    ema.apply(model)  # trainable variables: w1, and global_step in run 3
    assert (ema.average("global_step") is not None) == global_step_trainable
    with torch.no_grad():
        model.w1.fill_(1.0)
        model.global_step.fill_(1.0)
    ema.apply(model)
    assert torch.equal(ema.average(model.w1), f32(0.8181818))
    with torch.no_grad():
        model.global_step.fill_(100.0)
        model.w1.fill_(10.0)
    ema.apply(model)
    assert torch.equal(ema.average("w1"), f32(1.5694213))
    ema.apply(model)

    w, averages, step_averages = [], [], []
    for i in range(100):
        with torch.no_grad():
            model.w1.add_(1.0)
        ema.apply(model)
        if i % 10 == 0:
            w.append(model.w1.detach().clone())
            averages.append(ema.average(model.w1).clone())
            if global_step_trainable:
                step_averages.append(ema.average(model.global_step).clone())
            assert torch.equal(model.global_step.detach(), f32(100.0))
    assert torch.equal(torch.stack(w), f32(W1_RUN2_W))
    assert torch.equal(torch.stack(averages), f32(W1_RUN2_AVERAGES))
    if global_step_trainable:
        assert torch.equal(torch.stack(step_averages), f32(GLOBAL_STEP_AVERAGES))


# Seed 002, decay 0.6: W after each of TF's five Adam(0.1) steps, and the averages printed then.
ADAM_W = [
    [10.1, 20.1, 30.1],
    [10.199972, 20.199972, 30.199972],
    [10.299898, 20.299898, 30.299898],
    [10.399759, 20.39976, 30.39976],
    [10.4995365, 20.499537, 30.499537],
]
ADAM_EMA = [
    [10.0, 20.0, 30.0],
    [10.081819, 20.081818, 30.081818],
    [10.170434, 20.170433, 30.170433],
    [10.260063, 20.260063, 30.260063],
    [10.349868, 20.349869, 30.349869],
]


def _seed002_training(ema_sees_before_step: bool = True):
    """Seed 002's decay-0.6 run with TF's printed W values in place of an optimizer.

    Step ordering, worked out from the printed numbers: ``tf.control_dependencies([train_step,
    ema_op])`` orders neither op before the other, and in the run that was printed the average
    at step k saw W and global_step from *before* the k-th Adam step: W_{k-1} and k - 1.
    Step 1 gives [10, 20, 30] because W_0 = [10, 20, 30] equals the shadow; step 2 moves by
    (10.1 - 10) * (1 - min(0.6, 2/11)) = 0.0818182 -> 10.081819. W_1 with global_step 2
    (decay 0.25) would give 10.075, and W_2 would give 10.0409 or 10.1500. The port is therefore
    ``ema.apply(...)`` then the optimizer step, then ``global_step += 1``.
    """
    global_step = torch.tensor(0, dtype=torch.int32)  # int32, as tf.Variable(0) in the seed
    weights = torch.tensor([10.0, 20.0, 30.0], requires_grad=True)  # trainable, float32
    ema = ptf.ExponentialMovingAverage(0.6, num_updates=global_step)
    ema.apply({"my_scope/weights": weights})  # ema.apply([W]) while building the graph
    averages = []
    for w_after in ADAM_W:
        if ema_sees_before_step:
            ema.apply({"my_scope/weights": weights})
        with torch.no_grad():  # the Adam step, as TF computed it
            weights.copy_(f32(w_after))
        global_step += 1  # minimize(loss, global_step=global_step)
        if not ema_sees_before_step:
            ema.apply({"my_scope/weights": weights})
        averages.append(ema.average(weights).clone())
    return ema, weights, global_step, averages


def test_seed002_decay_06_adam_run():
    _, weights, global_step, averages = _seed002_training()
    assert torch.equal(torch.stack(averages), f32(ADAM_EMA))
    assert torch.equal(weights.detach(), f32(ADAM_W[-1]))
    assert int(global_step) == 5
    _, _, _, after = _seed002_training(ema_sees_before_step=False)
    assert not torch.equal(after[1], f32(ADAM_EMA[1]))  # the other order does not reproduce TF


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_seed002_save_then_restore_wrong_way_and_right_way(tmp_path, suffix):
    ema, weights, global_step, _ = _seed002_training()
    path = tmp_path / f"save_net_3{suffix}"
    ptf.save_checkpoint(path, {"global_step": global_step, "my_scope/weights": weights}, ema)
    saved = ptf.load_checkpoint(path)
    assert set(saved) == {
        "global_step",
        "my_scope/weights",
        "my_scope/weights/ExponentialMovingAverage",
    }
    assert torch.equal(saved["my_scope/weights/ExponentialMovingAverage"], f32(ADAM_EMA[-1]))

    # The wrong way: tf.train.Saver() restores every variable under its own name.
    new_step = torch.tensor(0, dtype=torch.int32)
    w2 = torch.zeros(3, requires_grad=True)
    ptf.restore_checkpoint(path, {"global_step": new_step, "my_scope/weights": w2})
    assert torch.equal(w2.detach(), f32([10.4995365, 20.499537, 30.499537]))

    # The right way: tf.train.Saver(ema.variables_to_restore()) with a fresh EMA object.
    new_step = torch.tensor(0, dtype=torch.int32)
    w2 = torch.zeros(3, requires_grad=True)
    fresh = ptf.ExponentialMovingAverage(0.6)
    ema_restore = fresh.variables_to_restore(
        model={"global_step": new_step, "my_scope/weights": w2}
    )
    assert list(ema_restore) == ["my_scope/weights/ExponentialMovingAverage", "global_step"]
    assert ema_restore["my_scope/weights/ExponentialMovingAverage"] is w2
    assert ema_restore["global_step"] is new_step
    ptf.restore_checkpoint(path, ema_restore)
    assert torch.equal(w2.detach(), f32([10.349868, 20.349869, 30.349869]))
    assert int(new_step) == 5
    assert w2.requires_grad and w2.grad_fn is None


def test_seed002_variables_to_restore_after_apply():
    ema, weights, global_step, _ = _seed002_training()
    # Without model=..., the variables are those apply() saw; global_step was never given.
    assert ema.variables_to_restore() == {"my_scope/weights/ExponentialMovingAverage": weights}
    restore = ema.variables_to_restore(
        model={"my_scope/weights": weights, "global_step": global_step}
    )
    assert restore == {
        "my_scope/weights/ExponentialMovingAverage": weights,
        "global_step": global_step,
    }


# ----------------------------------------------------------------------------------------------
# TensorFlow's own numbers (tests/fixtures/tf_reference.json)


def _fixture(kind: str) -> list[dict]:
    return json.loads(FIXTURE.read_text())[kind] if FIXTURE.exists() else []


def _case_id(case: dict) -> str:
    extra = "-debias" if case.get("zero_debias") else ""
    return f"{case['dtype']}-d{case['decay']:.4g}-n{bool(case.get('num_updates'))}{extra}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _fixture("apply"), ids=_case_id)
def test_apply_matches_tensorflow(case, device):
    dtype, values, num_updates = case["dtype"], case["values"], case["num_updates"]
    step = {"n": num_updates[0] if num_updates else 0}
    ema = ptf.ExponentialMovingAverage(
        case["decay"], num_updates=(lambda: step["n"]) if num_updates else None
    )
    var = to_torch(values[0], dtype, device)
    ema.apply([var])
    for k in range(1, len(values)):
        var.copy_(to_torch(values[k], dtype))
        if num_updates:
            step["n"] = num_updates[k]
        ema.apply([var])
        expected = to_torch(case["averages"][k - 1], dtype, device)
        assert torch.equal(ema.average(var), expected), k


def _check_apply_values_case(case: dict) -> None:
    dtype, num_updates = case["dtype"], case["num_updates"]
    step = torch.tensor(0)  # a step tensor updated in place, like TF's global_step
    ema = ptf.ExponentialMovingAverage(
        case["decay"], num_updates=step if num_updates else None, zero_debias=case["zero_debias"]
    )
    for k, value in enumerate(case["values"]):
        if num_updates:
            step.fill_(num_updates[k])
        ema.apply_values({"x": to_torch(value, dtype)})
        assert torch.equal(ema.average("x"), to_torch(case["averages"][k], dtype)), k + 1


@pytest.mark.parametrize("case", _fixture("apply_values"), ids=_case_id)
def test_apply_values_matches_tensorflow(case):
    _check_apply_values_case(case)


@pytest.mark.parametrize("case", _fixture("apply_values_debiased"), ids=_case_id)
def test_apply_values_debiased_40_steps_match_tensorflow(case):
    """TF's debiasing factor ``1 - (1 - beta)^k`` at k = 1..40, bit for bit, for each dtype.

    The float32 decay-0.997 case includes step 31, where the C library's ``powf`` that TF calls
    is not correctly rounded (test_debiased_fixture_pins_tf_power_not_a_rounded_exact_one).
    """
    _check_apply_values_case(case)


@pytest.mark.parametrize("case", _fixture("assign_moving_average"), ids=_case_id)
def test_assign_moving_average_matches_tensorflow(case):
    dtype, values = case["dtype"], case["values"]
    decay = case["decay"]
    if case["tensor_decay"]:
        decay = torch.tensor(decay, dtype=torch.float32)
    var = to_torch(values[0], dtype)
    for k in range(1, len(values)):
        ptf.assign_moving_average(var, to_torch(values[k], dtype), decay, case["zero_debias"])
        assert torch.equal(var, to_torch(case["averages"][k - 1], dtype)), k


def test_tf_reference_fixture_is_present():
    assert FIXTURE.exists(), "run tests/fixtures/make_tf_reference.py (see its header)"
    assert len(_fixture("apply")) >= 4 * 6
    assert len(_fixture("apply_values_debiased")) == 7


# ----------------------------------------------------------------------------------------------
# Rounding per dtype, against the NumPy emulation


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("decay", "num_updates"), [(0.999, None), (0.9, 3), (0.9999, 12345)])
def test_apply_multi_element_matches_emulation(dtype, decay, num_updates, device):
    rng = np.random.default_rng(7)
    values = [_round(rng.standard_normal((3, 5)) * 10, dtype) for _ in range(8)]
    var = to_torch(values[0], dtype, device)
    ema = ptf.ExponentialMovingAverage(decay, num_updates=num_updates)
    ema.apply({"layer/kernel": var})
    expected = values[0]
    one_minus = np_one_minus(decay, num_updates, dtype)
    for value in values[1:]:
        var.copy_(to_torch(value, dtype))
        ema.apply({"layer/kernel": var})
        expected = np_ema_step(expected, value, one_minus, dtype)
        assert torch.equal(ema.average("layer/kernel"), to_torch(expected, dtype, device))
    assert ema.average(var).dtype == DTYPES[dtype]


def test_one_minus_decay_is_rounded_in_float32_then_cast():
    """0.999 in float32 is 0.99900001; 1 - that is 9.9998713e-04 in float32, then cast."""
    var = torch.zeros((), dtype=torch.float64)
    ema = ptf.ExponentialMovingAverage(0.999)
    ema.apply([var])
    var.fill_(1.0)
    ema.apply([var])
    beta = np.float64(np.float32(1) - np.float32(0.999))
    assert ema.average(var).item() == beta  # not 1 - 0.999 in float64
    assert beta != 1 - 0.999


def test_not_a_fused_lerp():
    """TF's three rounded ops differ from a lerp rounded once, ``fl(s + beta * fl(v - s))``.

    That single rounding is what ``torch.lerp`` computes where it uses a fused multiply-add
    (torch's AVX2 and AVX-512 CPU kernels). torch's default CPU kernels, for CPUs without
    AVX2, round the product first, and then ``s + fl(beta * fl(v - s))`` equals TF's
    ``s - fl(fl(s - v) * beta)`` bit for bit (negation is exact), so the reference here is the
    single rounding computed exactly, not ``torch.lerp``, whose bits depend on the CPU.
    """
    rng = np.random.default_rng(3)
    shadow = rng.standard_normal(4096).astype(np.float32)
    value = rng.standard_normal(4096).astype(np.float32)
    beta = np.float32(1) - np.float32(0.9)
    ema = ptf.ExponentialMovingAverage(0.9)
    ema.apply({"v": torch.from_numpy(shadow.copy())})
    ema.apply({"v": torch.from_numpy(value)})
    expected = np_ema_step(shadow, value, beta, "float32")
    assert torch.equal(ema.average("v"), torch.from_numpy(expected))
    diff = value - shadow  # float32, rounded once
    fused = np.array(
        [
            f32_round(Fraction(float(s)) + Fraction(float(beta)) * Fraction(float(d)))
            for s, d in zip(shadow, diff, strict=True)
        ],
        dtype=np.float32,
    )
    differ = int(np.count_nonzero(fused != expected))
    assert differ > 0.05 * shadow.size, differ  # 519 of 4096 when written


# ----------------------------------------------------------------------------------------------
# Dynamic decay and num_updates


def _decay_trace(ema: ptf.ExponentialMovingAverage, set_step) -> list[float]:
    var = torch.tensor(0.0)
    ema.apply([var])
    out = []
    for k in range(1, 5):
        set_step(k)
        var.fill_(float(k))
        ema.apply([var])
        out.append(ema.average(var).item())
    return out


def _expected_trace(decays: list[float], steps: list[float | None]) -> list[float]:
    shadow, out = np.float32(0), []
    for k, (decay, n) in enumerate(zip(decays, steps, strict=True), start=1):
        shadow = np_ema_step(shadow, np.float32(k), np_one_minus(decay, n, "float32"), "float32")
        out.append(float(shadow))
    return out


def test_decay_tensor_is_read_at_every_apply():
    decay = torch.tensor(0.5)
    ema = ptf.ExponentialMovingAverage(decay)
    decays = [0.5, 0.9, 0.99, 0.0]
    trace = _decay_trace(ema, lambda k: decay.fill_(decays[k - 1]))
    assert trace == _expected_trace(decays, [None] * 4)


def test_decay_callable_is_read_at_every_apply():
    calls = []
    ema = ptf.ExponentialMovingAverage(lambda: 1.0 - 0.5 ** len(calls))
    decays = [1.0 - 0.5**k for k in range(1, 5)]
    trace = _decay_trace(ema, calls.append)
    assert trace == _expected_trace(decays, [None] * 4)


@pytest.mark.parametrize("kind", ["int64", "int32", "float32", "float64", "callable", "int"])
def test_num_updates_kinds(kind):
    steps = [0, 1, 5, 1000]
    if kind == "callable":
        state = {"n": 0}
        num_updates, set_step = (lambda: state["n"]), (lambda k: state.update(n=steps[k - 1]))
    elif kind == "int":
        num_updates, set_step = 7, (lambda k: None)
        steps = [7] * 4
    else:
        num_updates = torch.tensor(0, dtype=getattr(torch, kind))
        set_step = lambda k: num_updates.fill_(steps[k - 1])  # noqa: E731
    ema = ptf.ExponentialMovingAverage(0.99, num_updates=num_updates)
    assert _decay_trace(ema, set_step) == _expected_trace([0.99] * 4, steps)


def test_huge_num_updates_is_rounded_to_float32_first():
    n = 2**25 + 3  # not a float32: rounds to 2**25 + 4 before (1 + n) / (10 + n)
    var = torch.tensor([0.0])
    ema = ptf.ExponentialMovingAverage(1.0, num_updates=torch.tensor(n))
    ema.apply([var])
    var.fill_(1.0)
    ema.apply([var])
    expected = np_ema_step(np.float32(0), np.float32(1), np_one_minus(1.0, n, "float32"), "float32")
    assert ema.average(var).item() == float(expected)


@pytest.mark.parametrize(("decay", "expected"), [(0.0, 5.0), (1.0, 0.0)])
def test_decay_edges(decay, expected):
    var = torch.tensor(0.0)
    ema = ptf.ExponentialMovingAverage(decay)
    ema.apply([var])
    var.fill_(5.0)
    ema.apply([var])
    assert ema.average(var).item() == expected


# ----------------------------------------------------------------------------------------------
# apply_values: zero-initialised, debiased


def np_debiased(values: list[np.ndarray], one_minus, dtype: str) -> list[np.ndarray]:
    """TF's _zero_debias in float32: ``b -= (b - x) * beta; k += 1; s = b / (1 - (1 - beta)^k)``.

    Each op is rounded to float32; the power is the exact power rounded once (:func:`f32_power`).
    TF and polyak.tf call the C library's ``powf`` instead, which glibc rounds faithfully (error
    at most 0.82 ulp) but not always correctly, so this emulation is TF's bits only where
    ``powf`` is correctly rounded: at the decays and steps of the test below it is (glibc's FMA
    and non-FMA builds alike, checked when this test was written); decay 0.997 at step 31 is a
    step where it is not, see test_debiased_fixture_pins_tf_power_not_a_rounded_exact_one.
    """
    assert dtype == "float32"
    biased, out = np.zeros_like(values[0]), []
    base = np.float32(1) - np.float32(one_minus)
    for k, value in enumerate(values, start=1):
        biased = np_ema_step(biased, value, one_minus, dtype)
        factor = np.float32(1) - f32_power(base, k)
        out.append(biased / factor)
    return out


def test_f32_power_rounds_the_exact_power_once():
    assert f32_power(np.float32(0.5), 3) == np.float32(0.125)
    assert f32_power(np.float32(3), 15) == np.float32(14348907)  # below 2**24: exact
    assert f32_power(np.float32(3), 16) == np.float32(43046720)  # 43046721, float32 spacing 4
    # 4097**2 = 2**24 + 8193 is halfway between two float32 (spacing 2): ties to even.
    assert f32_power(np.float32(4097), 2) == np.float32(16785408)
    # (2**-75)**2 = 2**-150 is halfway between 0 and the smallest subnormal: ties to even.
    assert f32_power(np.float32(2.0**-75), 2) == np.float32(0)
    assert f32_power(np.float32(1.5 * 2.0**-75), 2) == np.float32(2.0**-149)
    assert f32_power(np.float32(0), 3) == np.float32(0)
    assert f32_power(np.float32(-3), 3) == np.float32(-27)
    assert f32_round(Fraction(-1, 3)) == np.float32(-1 / 3)


def test_debiased_fixture_pins_tf_power_not_a_rounded_exact_one():
    """TF's debiased average equals the exact-power emulation at every step but one.

    At decay 0.997 (float32), step 31, TF's factor is ``1 - powf(0.997, 31)`` with glibc's
    ``powf`` = 0.91106558, where the exact power rounds to 0.91106552 (one ulp apart); after
    ``1 - power`` cancels, TF's average is 6 to 10 ulp from the emulation's. A polyak.tf computing
    the power in float64, exactly, or with a SIMD pow fails
    test_apply_values_debiased_40_steps_match_tensorflow there.
    """
    (case,) = [
        c
        for c in _fixture("apply_values_debiased")
        if c["dtype"] == "float32" and c["decay"] == 0.997
    ]
    values = [np.asarray(v, dtype=np.float32) for v in case["values"]]
    emulated = np_debiased(values, np_one_minus(0.997, None, "float32"), "float32")
    differ = [
        k
        for k, (mine, tf) in enumerate(zip(emulated, case["averages"], strict=True), start=1)
        if not np.array_equal(mine, np.asarray(tf, dtype=np.float32))
    ]
    assert differ == [31]
    base = np.float32(1) - np_one_minus(0.997, None, "float32")
    assert f32_power(base, 31) == np.float32(0.91106552)


@pytest.mark.parametrize(("decay", "num_updates"), [(0.9, None), (0.999, None), (0.99, 4)])
def test_apply_values_debiased_matches_emulation_and_float64(decay, num_updates):
    rng = np.random.default_rng(11)
    values = [rng.standard_normal(6).astype(np.float32) for _ in range(20)]
    ema = ptf.ExponentialMovingAverage(decay, num_updates=num_updates, zero_debias=True)
    one_minus = np_one_minus(decay, num_updates, "float32")
    expected = np_debiased(values, one_minus, "float32")
    # The float64 formula: b_k = sum_j beta * d^(k-j) x_j, s_k = b_k / (1 - d^k).
    beta, d = float(one_minus), 1.0 - float(one_minus)
    biased = np.zeros(6)
    for k, value in enumerate(values, start=1):
        ema.apply_values({"loss": torch.from_numpy(value)})
        shadow = ema.average("loss")
        assert torch.equal(shadow, torch.from_numpy(expected[k - 1]))
        biased = d * biased + beta * value.astype(np.float64)
        np.testing.assert_allclose(shadow.numpy(), biased / (1 - d**k), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_apply_values_constant_value_debiases_to_the_value(dtype):
    value = torch.tensor([3.0, -0.5, 1e-3], dtype=DTYPES[dtype])
    ema = ptf.ExponentialMovingAverage(0.99, zero_debias=True)
    tolerance = {"float32": 1e-5, "float64": 1e-12}[dtype]
    for _ in range(10):
        ema.apply_values({"x": value})
        torch.testing.assert_close(ema.average("x"), value, rtol=tolerance, atol=0)


def test_apply_values_bfloat16_debiasing_is_as_coarse_as_tf():
    """TF recomputes 1 - beta in bfloat16: 1 - 0.0099945068 rounds to 0.98828125, so the first
    debiased value is x * 0.0099945068 / 0.01171875 = 0.853 x (the fixture has TF's numbers)."""
    ema = ptf.ExponentialMovingAverage(0.99, zero_debias=True)
    ema.apply_values({"x": torch.tensor([3.0], dtype=torch.bfloat16)})
    beta = 0.0099945068359375  # float32 1 - 0.99, rounded to bfloat16
    expected = _round(np.float32(3.0) * np.float32(beta), "bfloat16") / np.float32(0.01171875)
    assert ema.average("x").item() == float(_round(expected, "bfloat16"))
    assert abs(ema.average("x").item() / 3.0 - 0.853) < 1e-2


def test_apply_values_without_debias_starts_at_zero():
    ema = ptf.ExponentialMovingAverage(0.9)
    ema.apply_values({"x": torch.tensor([10.0])})
    one_minus = np_one_minus(0.9, None, "float32")
    expected = np_ema_step(np.zeros(1, np.float32), np.float32([10]), one_minus, "float32")
    assert torch.equal(ema.average("x"), torch.from_numpy(expected))
    assert "x/ExponentialMovingAverage/biased" not in ema.shadow_variables()


def test_apply_values_local_step_counts_in_the_dtype_like_tf():
    """TF keeps local_step in the value's dtype: bfloat16 stops counting at 256."""
    ema = ptf.ExponentialMovingAverage(0.5, zero_debias=True)
    for _ in range(300):
        ema.apply_values({"x": torch.ones(2, dtype=torch.bfloat16)})
    state = ema.shadow_variables()
    assert state["x/ExponentialMovingAverage/local_step"].item() == 256.0
    assert state["x/ExponentialMovingAverage/local_step"].dtype == torch.bfloat16


def test_apply_values_detaches_and_keeps_no_reference():
    x = torch.tensor([2.0], requires_grad=True)
    loss = x * 3
    ema = ptf.ExponentialMovingAverage(0.5, zero_debias=True)
    ema.apply_values({"loss": loss})
    assert ema.average("loss").grad_fn is None and not ema.average("loss").requires_grad
    assert ema.average(loss) is None  # values are looked up by name


# ----------------------------------------------------------------------------------------------
# assign_moving_average


def test_assign_moving_average_python_float_decay_uses_double_then_float32():
    """TF computes 1.0 - decay in Python (double) for a float decay, then converts to float32."""
    var = torch.zeros(())
    ptf.assign_moving_average(var, torch.tensor(1.0), 0.99, zero_debias=False)
    assert var.item() == float(np.float32(1.0 - 0.99))
    var = torch.zeros(())
    ptf.assign_moving_average(var, torch.tensor(1.0), torch.tensor(0.99), zero_debias=False)
    assert var.item() == float(np.float32(1) - np.float32(0.99))


def test_assign_moving_average_keeps_debias_state_per_variable():
    a, b = torch.zeros(3), torch.zeros(3)
    for k in range(5):
        ptf.assign_moving_average(a, torch.full((3,), 2.0), 0.9)
        if k % 2 == 0:
            ptf.assign_moving_average(b, torch.full((3,), -1.0), 0.5)
    torch.testing.assert_close(a, torch.full((3,), 2.0))
    torch.testing.assert_close(b, torch.full((3,), -1.0))
    assert ptf.assign_moving_average(a, 4.0, 0.0) is a  # numbers are accepted as values
    assert torch.equal(a, torch.full((3,), 4.0))


def test_assign_moving_average_on_a_parameter_is_untracked():
    p = nn.Parameter(torch.zeros(2))
    ptf.assign_moving_average(p, torch.ones(2), 0.9, zero_debias=False)
    assert p.grad_fn is None and p.requires_grad


def test_assign_moving_average_errors():
    with pytest.raises(TypeError, match=r"value has dtype torch.float64 but variable has dtype"):
        ptf.assign_moving_average(torch.zeros(2), torch.zeros(2, dtype=torch.float64), 0.9)
    with pytest.raises(ValueError, match=r"does not broadcast to the variable's shape \(2,\)"):
        ptf.assign_moving_average(torch.zeros(2), torch.zeros(3), 0.9)
    with pytest.raises(ValueError, match=r"decay=1\.5 is outside \[0, 1\]"):
        ptf.assign_moving_average(torch.zeros(2), torch.zeros(2), 1.5)
    with pytest.raises(TypeError, match=r"must be half, float, or double: 'variable'"):
        ptf.assign_moving_average(torch.zeros(2, dtype=torch.int32), 1, 0.9)


# ----------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("decay", [1.5, -0.5, float("nan")])
def test_decay_outside_unit_interval_raises(decay):
    with pytest.raises(ValueError) as info:
        ptf.ExponentialMovingAverage(decay)
    message = str(info.value)
    assert f"decay={decay!r} is outside [0, 1]" in message
    assert "TensorFlow accepts it silently" in message
    assert "Pass a decay in [0, 1], typically 0.99 to 0.9999" in message


@pytest.mark.parametrize("make", [lambda: torch.tensor(1.5), lambda: lambda: -0.5])
def test_dynamic_decay_outside_unit_interval_raises_at_apply(make):
    ema = ptf.ExponentialMovingAverage(make())
    var = torch.zeros(2)
    with pytest.raises(ValueError, match=r"is outside \[0, 1\]"):
        ema.apply([var])
    assert ema.average(var) is None  # nothing was created


@pytest.mark.parametrize("num_updates", [-1, float("inf")])
def test_bad_num_updates_raises(num_updates):
    with pytest.raises(ValueError, match=r"num_updates=.* must be a finite count >= 0"):
        ptf.ExponentialMovingAverage(0.9, num_updates=num_updates)


def test_bad_num_updates_tensor_raises_at_apply():
    ema = ptf.ExponentialMovingAverage(0.9, num_updates=torch.tensor(-3))
    with pytest.raises(ValueError, match=r"num_updates=-3 must be a finite count >= 0"):
        ema.apply([torch.zeros(1)])


def test_bad_argument_types_raise():
    with pytest.raises(TypeError, match=r"decay must be a real number .* got '0.9' of type str"):
        ptf.ExponentialMovingAverage("0.9")
    with pytest.raises(TypeError, match=r"decay must be a real scalar; got a tensor of shape"):
        ptf.ExponentialMovingAverage(torch.tensor([0.9, 0.9]))
    with pytest.raises(TypeError, match=r"name must be a non-empty str"):
        ptf.ExponentialMovingAverage(0.9, name="")
    ema = ptf.ExponentialMovingAverage(0.9)
    with pytest.raises(TypeError, match=r"Wrap a single tensor in a list: ema.apply\(\[w\]\)"):
        ema.apply(torch.zeros(3))
    with pytest.raises(TypeError, match=r"apply_values\(\) takes a Mapping"):
        ema.apply_values([torch.zeros(3)])
    with pytest.raises(TypeError, match=r"keys must be names"):
        ema.apply({0: torch.zeros(3)})


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_tensors_raise_type_error(dtype):
    ema = ptf.ExponentialMovingAverage(0.9)
    steps = torch.zeros(3, dtype=dtype)
    with pytest.raises(TypeError) as info:
        ema.apply({"global_step": steps, "w": torch.zeros(3)})
    message = str(info.value)
    assert message.startswith("The variables must be half, float, or double: 'global_step'")
    assert str(dtype) in message and "Leave integer tensors" in message
    assert ema.average("w") is None  # checked before anything was created
    with pytest.raises(TypeError, match=r"half, float, or double: 'Variable'"):
        ema.apply([steps])
    with pytest.raises(TypeError, match=r"half, float, or double: 'n'"):
        ema.apply_values({"n": steps})


def test_changed_shape_and_name_reuse_raise():
    ema = ptf.ExponentialMovingAverage(0.9)
    w = torch.zeros(3)
    ema.apply({"w": w})
    with pytest.raises(ValueError, match=r"'w' was averaged as shape \(3,\).* now shape \(4,\)"):
        ema.apply({"w": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"passed as 'v' is already averaged as 'w'"):
        ema.apply({"v": w})
    twice = torch.zeros(1)
    with pytest.raises(ValueError, match=r"passed as 'b' is already averaged as 'a'"):
        ema.apply({"a": twice, "b": twice})
    with pytest.raises(ValueError, match=r"Two different tensors are named 'Variable'"):
        ema.apply([torch.zeros(1), ("Variable", torch.zeros(1))])
    with pytest.raises(ValueError, match=r"'w' already names an average of a variable"):
        ema.apply_values({"w": torch.zeros(3)})
    ema.apply_values({"loss": torch.zeros(())})
    with pytest.raises(ValueError, match=r"'loss' already names an average of values"):
        ema.apply({"loss": torch.zeros(())})


# ----------------------------------------------------------------------------------------------
# Names, average(), average_name()


def test_average_of_untracked_tensor_is_none():
    ema = ptf.ExponentialMovingAverage(0.9)
    ema.apply([torch.zeros(2)])
    assert ema.average(torch.zeros(2)) is None
    assert ema.average("no/such/name") is None
    with pytest.raises(TypeError, match=r"average\(\) takes a tensor or a name"):
        ema.average(3)


def test_average_name_before_apply():
    ema = ptf.ExponentialMovingAverage(0.9)
    assert ema.average_name("my_scope/weights") == "my_scope/weights/ExponentialMovingAverage"
    assert (
        ptf.ExponentialMovingAverage(0.9, name="ema").average_name("fc.weight") == "fc.weight/ema"
    )
    with pytest.raises(ValueError, match=r"a torch tensor carries no name.*average_name\('fc"):
        ema.average_name(torch.zeros(2))


def test_unnamed_tensors_get_tf_default_names():
    a, b, c = torch.zeros(1), torch.zeros(2), torch.zeros(3)
    ema = ptf.ExponentialMovingAverage(0.9)
    ema.apply({"Variable": torch.zeros(4)})
    ema.apply([a, b, a])
    ema.apply([c, ("named", torch.zeros(5)), b])
    assert ema.average_name(a) == "Variable_1/ExponentialMovingAverage"
    assert ema.average_name(b) == "Variable_2/ExponentialMovingAverage"
    assert ema.average_name(c) == "Variable_3/ExponentialMovingAverage"
    assert ema.average("named").shape == (5,)
    assert ema.average(c) is ema.average("Variable_3")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)


def test_module_names_and_trainable_rule():
    net = _Net()
    ema = ptf.ExponentialMovingAverage(0.9)
    ema.apply(net)
    assert ema.average("fc.weight") is not None and ema.average(net.bn.bias) is not None
    assert ema.average("frozen") is None and ema.average("bn.running_mean") is None
    assert ema.average_name(net.fc.weight) == "fc.weight/ExponentialMovingAverage"
    assert not ema.average("fc.weight").requires_grad

    restore = ema.variables_to_restore()
    averaged = ["fc.weight", "fc.bias", "bn.weight", "bn.bias"]
    assert {n: restore[f"{n}/ExponentialMovingAverage"] for n in averaged} == dict(
        (n, p) for n, p in net.named_parameters() if p.requires_grad
    )
    for name in ["frozen", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]:
        assert restore[name] is net.state_dict(keep_vars=True)[name]
    assert len(restore) == 8
    restore = ema.variables_to_restore(["fc.bias"], model=net)
    assert restore.keys() == {
        "fc.bias/ExponentialMovingAverage",
        "fc.weight",
        "bn.weight",
        "bn.bias",
        "frozen",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
        # as in TF, the averages not restored into their variables are restored into themselves
        "fc.weight/ExponentialMovingAverage",
        "bn.weight/ExponentialMovingAverage",
        "bn.bias/ExponentialMovingAverage",
    }
    for name in ["fc.weight", "bn.weight", "bn.bias"]:
        assert restore[f"{name}/ExponentialMovingAverage"] is ema.average(name)


def _assert_same_tensors(restore: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert sorted(restore) == sorted(expected)
    assert all(restore[name] is tensor for name, tensor in expected.items())


@pytest.mark.parametrize("zero_debias", [False, True])
def test_variables_to_restore_lists_averages_of_values_as_tf(tmp_path, zero_debias):
    """TF's averageVariablesNamesHelper (moving_averages_test.py), both zero_debias values.

    TF: ``v0``, ``v1`` trainable, ``v2`` not, ``tensor2 = v0 + v1`` (op name ``add``),
    ``ema.apply([v0, v1, tensor2])`` with ``name="foo"``; ``variables_to_restore()`` is
    ``{v0/foo: v0, v1/foo: v1, add/foo: add/foo, v2: v2}``, plus ``add/foo/biased`` and
    ``add/foo/local_step`` (each itself) when debiased: the average of a tensor is a global
    variable, restored under its own name. Here the tensor's average comes from apply_values.
    """
    v0 = torch.tensor(10.0, requires_grad=True)
    v1 = torch.tensor(30.0, requires_grad=True)
    v2 = torch.tensor(20.0)  # not trainable
    model = {"v0": v0, "v1": v1, "v2": v2}
    ema = ptf.ExponentialMovingAverage(0.25, zero_debias=zero_debias, name="foo")
    assert ema.name == "foo"
    assert [ema.average_name(n) for n in ("v0", "v1", "add")] == ["v0/foo", "v1/foo", "add/foo"]
    ema.apply({"v0": v0, "v1": v1})
    ema.apply_values({"add": v0.detach() + v1.detach()})
    # TF's _CheckDecay: 0 * 0.25 + 40 * (1 - 0.25), divided by 1 - 0.25 ** 1 when debiased.
    assert ema.average("add").item() == (40.0 if zero_debias else 30.0)

    expected = {"v0/foo": v0, "v1/foo": v1, "add/foo": ema.average("add")}
    if zero_debias:
        state = ema.shadow_variables()
        expected["add/foo/biased"] = state["add/foo/biased"]
        expected["add/foo/local_step"] = state["add/foo/local_step"]
    _assert_same_tensors(ema.variables_to_restore(), expected)  # v2 was never given
    _assert_same_tensors(ema.variables_to_restore(model=model), {**expected, "v2": v2})

    # Restoring through it brings the average of the values back, into another object.
    path = tmp_path / "c.safetensors"
    ptf.save_checkpoint(path, model, ema)
    other = ptf.ExponentialMovingAverage(0.25, zero_debias=zero_debias, name="foo")
    other.apply({"v0": v0, "v1": v1})
    other.apply_values({"add": torch.tensor(0.0)})
    ptf.restore_checkpoint(path, other.variables_to_restore(model=model))
    for name, tensor in ema.shadow_variables().items():
        assert torch.equal(other.shadow_variables()[name], tensor), name


def test_variables_to_restore_lists_the_shadows_not_restored_into_variables_as_tf():
    """TF 2.21 for ``v0``, ``v1`` averaged and ``variables_to_restore([v0])``: ``v1`` is restored
    from its own name and its average ``v1/foo``, a global variable, from its own name too:
    ``{v0/foo: v0, v1: v1, v1/foo: v1/foo, v2: v2}``."""
    v0, v1 = torch.tensor(10.0, requires_grad=True), torch.tensor(30.0, requires_grad=True)
    v2 = torch.tensor(20.0)
    ema = ptf.ExponentialMovingAverage(0.25, name="foo")
    ema.apply({"v0": v0, "v1": v1})
    restore = ema.variables_to_restore(["v0"], model={"v0": v0, "v1": v1, "v2": v2})
    _assert_same_tensors(restore, {"v0/foo": v0, "v1": v1, "v1/foo": ema.average("v1"), "v2": v2})


def test_variables_to_restore_tied_weights_restore_once():
    net = nn.Module()
    net.encoder = nn.Linear(2, 2, bias=False)
    net.decoder = nn.Linear(2, 2, bias=False)
    net.decoder.weight = net.encoder.weight
    restore = ptf.ExponentialMovingAverage(0.9).variables_to_restore(model=net)
    assert list(restore) == ["encoder.weight/ExponentialMovingAverage"]


def test_variables_to_restore_errors():
    ema = ptf.ExponentialMovingAverage(0.9)
    with pytest.raises(ValueError, match=r"names 'w', which is neither in the model"):
        ema.variables_to_restore(["w"], model={"v": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"has no name. Pass its name instead"):
        ema.variables_to_restore([torch.zeros(1)], model={"v": torch.zeros(1)})
    with pytest.raises(TypeError, match=r"model must be an nn.Module, a Mapping"):
        ema.variables_to_restore(model=[torch.zeros(1)])


def test_shadows_are_not_autograd_tracked():
    w = nn.Parameter(torch.randn(4))
    ema = ptf.ExponentialMovingAverage(0.5)
    for _ in range(3):
        ema.apply({"w": w})
        with torch.no_grad():
            w.add_(1.0)
    shadow = ema.average(w)
    assert not shadow.requires_grad and shadow.grad_fn is None
    assert shadow.data_ptr() != w.data_ptr()


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _train(model: nn.Module, ema: ptf.ExponentialMovingAverage, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen))
        ema.apply(model)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip_and_resume(tmp_path, suffix):
    torch.manual_seed(0)
    model = _Net()
    ema = ptf.ExponentialMovingAverage(0.9)
    ema.apply(model)
    _train(model, ema, 5, seed=1)
    path = tmp_path / f"ckpt{suffix}"
    ptf.save_checkpoint(path, model, ema)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left
    if suffix == ".pt":
        loaded = torch.load(path, weights_only=True)
        assert isinstance(loaded, dict) and "fc.weight/ExponentialMovingAverage" in loaded

    raw, averaged = _Net(), _Net()
    ptf.restore_checkpoint(path, raw)  # the wrong way: raw weights
    fresh = ptf.ExponentialMovingAverage(0.9)
    ptf.restore_checkpoint(path, fresh.variables_to_restore(model=averaged))  # the right way
    for name, tensor in model.state_dict().items():
        assert torch.equal(raw.state_dict()[name], tensor)
        average = ema.average(name)
        expected = tensor if average is None else average
        assert torch.equal(averaged.state_dict()[name], expected), name

    # Resume: a fresh EMA creates its shadows, the checkpoint fills them, training goes on.
    resumed = ptf.ExponentialMovingAverage(0.9)
    resumed.apply(raw)
    ptf.restore_checkpoint(path, resumed.shadow_variables())
    _train(raw, resumed, 4, seed=2)
    _train(model, ema, 4, seed=2)
    for name, shadow in ema.shadow_variables().items():
        assert torch.equal(resumed.shadow_variables()[name], shadow), name


def test_checkpoint_keeps_debias_state(tmp_path):
    ema = ptf.ExponentialMovingAverage(0.9, zero_debias=True)
    ema.apply_values({"loss": torch.tensor([1.0, 2.0])})
    path = tmp_path / "c.safetensors"
    ptf.save_checkpoint(path, {}, ema)
    assert set(ptf.load_checkpoint(path)) == {
        "loss/ExponentialMovingAverage",
        "loss/ExponentialMovingAverage/biased",
        "loss/ExponentialMovingAverage/local_step",
    }


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ptf.save_checkpoint(path, {"w": torch.ones(2)})

    def broken_save(obj, f):
        with open(f, "wb") as out:  # a half-written temporary file
            out.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ptf.save_checkpoint(path, {"w": torch.zeros(2)})
    assert os.listdir(tmp_path) == ["c.pt"]
    assert torch.equal(ptf.load_checkpoint(path)["w"], torch.ones(2))


def test_restore_errors_name_what_is_missing(tmp_path):
    path = tmp_path / "c.safetensors"
    ptf.save_checkpoint(path, {"w": torch.ones(2), "step": torch.tensor(3)})
    target = torch.zeros(2)
    with pytest.raises(ValueError, match=r"has no tensors named \['w/ExponentialMovingAverage'\]"):
        ptf.restore_checkpoint(path, {"w/ExponentialMovingAverage": target, "w": torch.zeros(2)})
    with pytest.raises(
        ValueError, match=r"step: checkpoint \(\) torch.int64, target \(\) torch.float32"
    ):
        ptf.restore_checkpoint(path, {"w": target, "step": torch.tensor(0.0)})
    assert torch.equal(target, torch.zeros(2))  # nothing written
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"not a checkpoint of named tensors"):
        ptf.load_checkpoint(tmp_path / "list.pt")


def test_save_refuses_name_clash(tmp_path):
    ema = ptf.ExponentialMovingAverage(0.9)
    ema.apply({"w": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"are both variables and averages"):
        ptf.save_checkpoint(tmp_path / "c.pt", {"w/ExponentialMovingAverage": torch.zeros(1)}, ema)


# ----------------------------------------------------------------------------------------------
# Property: one apply equals the float32 emulation of TF's formula, bit for bit

_BOUND = float(np.float32(1e30))  # far from overflow in s - (s - v) * beta
_finite32 = st.floats(-_BOUND, _BOUND, allow_nan=False, width=32)


@settings(max_examples=150, deadline=None)
@given(
    decay=st.floats(0.0, 1.0),
    num_updates=st.none() | st.integers(0, 2**40),
    before=st.lists(_finite32, min_size=1, max_size=6),
    after=st.lists(_finite32, min_size=6, max_size=6),
)
def test_one_apply_equals_float32_emulation(decay, num_updates, before, after):
    before = np.array(before * 6, dtype=np.float32)[:6]
    after = np.array(after, dtype=np.float32)
    var = torch.from_numpy(before.copy())
    ema = ptf.ExponentialMovingAverage(decay, num_updates=num_updates)
    ema.apply([var])
    var.copy_(torch.from_numpy(after))
    ema.apply([var])
    expected = np_ema_step(before, after, np_one_minus(decay, num_updates, "float32"), "float32")
    assert torch.equal(ema.average(var), torch.from_numpy(expected))


# ----------------------------------------------------------------------------------------------
# The docstring examples run


def test_docstring_examples():
    result = doctest.testmod(ptf, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
