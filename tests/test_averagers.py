"""polyak.averagers: the exponential rule's weights against closed forms worked out by hand."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polyak import schedules
from polyak.averagers import Exponential, Rule


def test_constant_decay_weight_is_one_minus_d():
    rule = Exponential(schedules.constant(0.75))
    assert rule.weight(1, 1) == 0.25
    assert rule.weight(10**9, 10**9) == 0.25  # a constant does not depend on the step


def test_update_every_multiplies_the_decays_of_the_covered_steps():
    """Covering steps a..b uses D = d(a) d(a+1) ... d(b): d ** k for a constant."""
    assert Exponential(schedules.constant(0.5)).weight(1, 3) == 1 - 0.125  # 0.5 ** 3
    assert Exponential(schedules.constant(0.5)).weight(7, 8) == 0.75  # 0.5 ** 2
    warmup = Exponential(schedules.tf_warmup(0.99))
    # TF's rule (1 + n) / (10 + n): steps 1, 2 give 2/11 and 3/12, product 1/22
    assert warmup.weight(1, 2) == pytest.approx(21 / 22, rel=1e-15)
    # steps 8, 9, 10 give 9/18, 10/19, 11/20: product 990/6840 = 11/76
    assert warmup.weight(8, 10) == pytest.approx(1 - 11 / 76, rel=1e-15)
    # EDM2's (1 - 1/n) ** (g + 1) with g = 1 over steps 2..4 telescopes to (1/4) ** 2
    assert Exponential(schedules.power(gamma=1)).weight(2, 4) == pytest.approx(15 / 16)
    # the first step of a power average has decay 0: the average starts at the weights
    assert Exponential(schedules.power(gamma=6.94)).weight(1, 5) == 1.0


def test_a_user_callable_is_called_once_per_covered_step():
    seen = []
    rule = Exponential(lambda n: seen.append(n) or 0.5)
    assert rule.weight(4, 6) == 0.875
    assert seen == [4, 5, 6]


@given(d=st.floats(0, 1), k=st.integers(1, 64), first=st.integers(1, 10**6))
def test_constant_decay_over_k_steps_is_d_to_the_k(d, k, first):
    weight = Exponential(schedules.constant(d)).weight(first, first + k - 1)
    assert 1 - weight == pytest.approx(d**k, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("bad", [1.5, -0.25, math.nan, math.inf, "0.9", None])
def test_a_decay_outside_zero_one_is_refused_with_the_step(bad):
    rule = Exponential(lambda n: 0.9 if n < 3 else bad)
    assert rule.weight(1, 2) == pytest.approx(1 - 0.81)
    with pytest.raises(
        ValueError, match=rf"returned {re.escape(repr(bad))} at step 3; a decay must be"
    ):
        rule.weight(2, 4)


def test_edges_zero_and_one():
    assert Exponential(schedules.constant(0.0)).weight(1, 4) == 1.0  # copy the weights
    assert Exponential(schedules.constant(1.0)).weight(1, 4) == 0.0  # frozen average


def test_exponential_is_a_rule():
    rule: Rule = Exponential(schedules.constant(0.9))
    assert callable(rule.weight)
    with pytest.raises(AttributeError):  # frozen: a rule holds no mutable state
        rule.decay = schedules.constant(0.5)  # type: ignore[misc]
