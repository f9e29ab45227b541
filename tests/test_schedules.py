"""polyak.schedules against closed forms, the seeds' numbers and EDM2's published constants."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from polyak import schedules


def test_doctests():
    assert doctest.testmod(schedules, raise_on_error=True).attempted > 0


def test_constant():
    assert schedules.constant(0.998)(1) == 0.998
    assert schedules.constant(0.998)(10**9) == 0.998


def test_tf_warmup_seed_values():
    f = schedules.tf_warmup(0.99)
    assert f(1) == 2 / 11  # seed 002: global_step 1 -> decay 0.1818...
    assert f(100) == 101 / 110  # seed 002: global_step 100 -> decay 0.918
    assert f(890) == 0.99 and f(889) == 890 / 899  # (1+n)/(10+n) reaches 0.99 at n = 890
    assert f(0) == pytest.approx(0.1)
    assert schedules.tf_warmup(0.6)(5) == 0.4 and schedules.tf_warmup(0.98)(5) == 0.4  # seed 002


def test_tf_warmup_hand_computed_values():
    """TF's ``num_updates`` rule, worked out by hand: (1 + n) / (10 + n) until it reaches d."""
    f = schedules.tf_warmup(0.99)
    assert f(0) == pytest.approx(1 / 10, rel=1e-15)
    assert f(8) == 0.5  # 9 / 18
    assert f(89) == pytest.approx(10 / 11, rel=1e-15)  # 90 / 99
    assert f(10**6) == 0.99  # long past the warm-up
    assert schedules.tf_warmup(0.5)(8) == 0.5 and schedules.tf_warmup(0.5)(9) == 0.5  # capped
    assert schedules.tf_warmup(0.0)(100) == 0.0


@given(n=st.integers(0, 10**12), d=st.floats(0, 1))
def test_tf_warmup_properties(n, d):
    """Below its cap the rule keeps 1 - decay = 9 / (10 + n) (an identity, not the formula again);
    it never exceeds d, never decreases with n, and is d from n >= (10 d - 1) / (1 - d) on."""
    value = schedules.tf_warmup(d)(n)
    assert 0.0 <= value <= d
    assert value <= schedules.tf_warmup(d)(n + 1)
    if value < d:
        assert 1 - value == pytest.approx(9 / (10 + n), rel=1e-9)
    if d < 1 and n >= (10 * d - 1) / (1 - d) + 1e-6 * (1 + n):
        assert value == d


def test_inverse_gamma_closed_form_and_clamp():
    f = schedules.inverse_gamma(inv_gamma=1.0, power=2 / 3, max_decay=0.9999)
    assert f(0) == 0.0
    assert f(7) == pytest.approx(3 / 4, rel=1e-14)  # 1 - 8 ** (-2/3) = 1 - 1/4
    assert f(26) == pytest.approx(8 / 9, rel=1e-14)  # 1 - 27 ** (-2/3) = 1 - 1/9
    assert schedules.inverse_gamma(inv_gamma=2.0, power=0.5)(6) == pytest.approx(0.5)  # 1 - 4**-0.5
    assert f(10) == pytest.approx(1 - 11 ** (-2 / 3))
    assert f(10**12) == 0.9999
    g = schedules.inverse_gamma(inv_gamma=10.0, power=0.75, min_decay=0.5)
    assert g(1) == 0.5 and g(1000) == pytest.approx(1 - 101**-0.75)


def test_half_life():
    f = schedules.half_life(steps=100)
    assert f(7) ** 100 == pytest.approx(0.5, rel=1e-12)
    assert schedules.half_life(samples=50_000, batch_size=500).steps == 100
    with pytest.raises(ValueError, match="both samples and batch_size"):
        schedules.half_life(samples=10)
    with pytest.raises(ValueError, match="either in steps or in samples"):
        schedules.half_life(10, samples=10, batch_size=2)


def test_power_edm2_constants():
    # EDM2 (Karras et al. 2024) quotes sigma_rel 0.10 <-> gamma 6.94 and 0.05 <-> 16.97
    assert schedules.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    assert schedules.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert schedules.sigma_rel_to_gamma(schedules.gamma_to_sigma_rel(-0.2)) == pytest.approx(-0.2)
    assert schedules.power(sigma_rel=0.10).gamma == pytest.approx(6.94, abs=5e-3)
    f = schedules.power(gamma=6.94)
    assert f(1) == 0.0 and f(0) == 0.0  # the average starts at the weights
    assert schedules.power(gamma=1)(2) == 0.25  # (1 - 1/2) ** 2
    assert schedules.power(gamma=2)(4) == pytest.approx(27 / 64, rel=1e-15)  # (3/4) ** 3
    assert schedules.power(gamma=0)(5) == pytest.approx(4 / 5, rel=1e-15)  # SWA's running mean
    assert f(100) == pytest.approx((1 - 1 / 100) ** 7.94)


@given(gamma=st.floats((math.sqrt(5) - 3) / 2, 200))
def test_sigma_rel_round_trip(gamma):
    sigma = schedules.gamma_to_sigma_rel(gamma)
    assert schedules.sigma_rel_to_gamma(sigma) == pytest.approx(gamma, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 3.0, 6.94])
def test_power_weighting_is_proportional_to_t_gamma(gamma):
    """Averaging with d(t) = (1 - 1/t)^(g+1) for t = 1..n weighs step i by exactly

        (1 - d(i)) prod_{t>i} d(t) = (i^(g+1) - (i-1)^(g+1)) / n^(g+1)

    (the product telescopes to (i/n)^(g+1)), which is (g+1) i^g / n^(g+1) ~ i^g / sum(j^g) for
    large i (EDM2 eq. 3). gamma=0 is the uniform (SWA) mean."""
    n = 40
    weights = [0.0] * (n + 1)
    for t in range(1, n + 1):
        d = schedules.power(gamma=gamma)(t)
        weights = [w * d for w in weights]
        weights[t] += 1 - d
    for i in range(1, n + 1):
        exact = (i ** (gamma + 1) - (i - 1) ** (gamma + 1)) / n ** (gamma + 1)
        assert weights[i] == pytest.approx(exact, rel=1e-12), i
    assert sum(weights) == pytest.approx(1.0, rel=1e-12)
    if gamma == 0:
        assert weights[1:] == pytest.approx([1 / n] * n, rel=1e-12)
    # the power law itself is asymptotic: within 10% from i = n/2 on (at n=40 the discrete weight
    # is 0.93x the power law at i=20 for gamma=6.94, 0.97x for gamma=3, and 1.01x at i=40)
    total = sum(j**gamma for j in range(1, n + 1))
    for i in range(n // 2, n + 1):
        assert weights[i] == pytest.approx(i**gamma / total, rel=0.10), i


def test_scaled():
    assert schedules.scaled(0.999, kappa=4)(3) == pytest.approx(0.999**4)
    assert schedules.scaled(0.5, kappa=3)(7) == 0.125
    f = schedules.scaled(schedules.tf_warmup(0.99), kappa=2)
    assert f(1) == pytest.approx((2 / 11) ** 2)
    assert f(8) == 0.25  # (9 / 18) ** 2
    assert schedules.scaled(lambda n: 0.5 if n < 3 else 0.25, kappa=0.5)(3) == 0.5


def test_scaled_around_a_user_callable_round_trips_as_a_callable():
    """``scaled(my_fn, ...)`` cannot be stored (``my_fn`` is code): it is saved as a user callable,
    so that loading says "pass it again" (None) instead of failing in ``Scaled(base=None)``."""
    fn = lambda n: 0.9  # noqa: E731
    schedule = schedules.scaled(fn, kappa=2)
    state = schedules.to_state(schedule)
    assert state["name"] == "callable" and "Scaled" in state["repr"]
    assert all(isinstance(v, str) for v in state.values())
    assert schedules.from_state(state) is None
    # nested deeper, and as written before this fix: still "pass it again", never a TypeError
    assert schedules.to_state(schedules.scaled(schedule, kappa=3))["name"] == "callable"
    legacy = {"name": "scaled", "base": {"name": "callable", "repr": "f"}, "kappa": 2.0}
    assert schedules.from_state(legacy) is None


@pytest.mark.parametrize(
    "schedule",
    [
        schedules.constant(0.9),
        schedules.tf_warmup(0.99),
        schedules.inverse_gamma(),
        schedules.half_life(steps=10),
        schedules.power(gamma=6.94),
        schedules.scaled(schedules.tf_warmup(0.99), kappa=3),
        schedules.delayed(schedules.tf_warmup(0.99), after=10),
        schedules.delayed(0.999, after=3),
        schedules.anytime_half_life(0.1),
    ],
    ids=lambda s: type(s).__name__,
)
def test_tensor_step_matches_int_step(schedule):
    for n in [1, 2, 17, 5000]:
        value = schedule(torch.tensor(n, dtype=torch.int64))
        assert float(value) == pytest.approx(schedule(n), rel=1e-6)
        float_value = schedule(torch.tensor(float(n), dtype=torch.float64))
        assert float(float_value) == pytest.approx(schedule(n), rel=1e-12)


@pytest.mark.parametrize(
    "schedule",
    [
        schedules.constant(0.9),
        schedules.tf_warmup(0.99),
        schedules.inverse_gamma(inv_gamma=2.0, power=0.75, max_decay=0.999, min_decay=0.1),
        schedules.half_life(steps=10),
        schedules.power(sigma_rel=0.1),
        schedules.scaled(schedules.power(gamma=2.0), kappa=3),
        schedules.scaled(0.99, kappa=2),
        schedules.delayed(schedules.power(gamma=2.0), after=100),
        schedules.delayed(0.99, after=0),
        schedules.anytime_half_life(0.25),
    ],
    ids=lambda s: type(s).__name__,
)
def test_state_round_trip(schedule):
    state = schedules.to_state(schedule)
    assert all(isinstance(v, (str, float, int, dict)) for v in state.values())
    assert schedules.from_state(state) == schedule


def test_user_callable_state():
    assert schedules.to_state(lambda s: 0.5)["name"] == "callable"
    assert schedules.from_state({"name": "callable", "repr": "x"}) is None
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        schedules.from_state({"name": "cosine"})


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: schedules.constant(1.5), ValueError, r"decay must be in \[0, 1\], got decay=1.5"),
        (lambda: schedules.tf_warmup(-0.5), ValueError, r"got decay=-0.5"),
        (lambda: schedules.constant("0.9"), TypeError, "decay must be a float"),
        (lambda: schedules.half_life(steps=0), ValueError, "steps must be a positive number"),
        (lambda: schedules.power(), ValueError, "exactly one of gamma and sigma_rel"),
        (lambda: schedules.power(gamma=-2), ValueError, "gamma must be a number > -1"),
        (lambda: schedules.power(sigma_rel=0.5), ValueError, "sigma_rel must be in"),
        (lambda: schedules.scaled(0.9, kappa=0), ValueError, "kappa must be a positive"),
        (
            lambda: schedules.inverse_gamma(min_decay=0.9, max_decay=0.5),
            ValueError,
            "min_decay must not exceed max_decay",
        ),
        (
            lambda: schedules.delayed(0.9, after=-1),
            ValueError,
            r"after must be an int >= 0 \(the steps before averaging starts\), got after=-1",
        ),
        (
            lambda: schedules.delayed(0.9, after=2.5),
            ValueError,
            r"got after=2.5; e.g. delayed\(0.999",
        ),
        (
            lambda: schedules.delayed(1.5, after=2),
            ValueError,
            r"base must be in \[0, 1\], got base=1.5",
        ),
        (lambda: schedules.anytime_half_life(0), ValueError, "fraction must be a positive number"),
        (lambda: schedules.anytime_half_life(-0.1), ValueError, "got fraction=-0.1"),
    ],
)
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_huge_steps():
    assert schedules.tf_warmup(0.9999)(2**62) == 0.9999
    assert schedules.power(gamma=6.94)(2**62) == pytest.approx(1.0)
    assert math.isfinite(schedules.inverse_gamma()(2**62))


def test_parse_and_factories():
    assert sorted(schedules.factories()) == [
        "anytime_half_life",
        "constant",
        "delayed",
        "half_life",
        "inverse_gamma",
        "power",
        "scaled",
        "tf_warmup",
    ]
    assert schedules.parse("power:sigma_rel=0.1") == schedules.power(sigma_rel=0.1)
    assert schedules.parse("delayed:base=0.999,after=100") == schedules.delayed(0.999, after=100)
    assert schedules.parse("anytime_half_life:fraction=0.1") == schedules.anytime_half_life(0.1)
    with pytest.raises(
        ValueError, match="valid names: anytime_half_life, constant, delayed, half_life"
    ):
        schedules.parse("cosine")


def test_delayed_copies_for_the_first_after_steps_then_restarts_the_base():
    """d(n) = 0 for n <= N (the shadows copy the weights), then d_base(n - N)."""
    f = schedules.delayed(schedules.tf_warmup(0.99), after=5)
    assert [f(n) for n in range(0, 6)] == [0.0] * 6
    assert f(6) == 2 / 11 and f(13) == 0.5  # TF's (1 + m) / (10 + m) at m = 1 and m = 8
    g = schedules.delayed(0.75, after=2)
    assert [g(n) for n in (1, 2, 3, 10**9)] == [0.0, 0.0, 0.75, 0.75]
    assert schedules.delayed(0.75, after=0)(1) == 0.75  # no delay: the base itself
    seen = []
    h = schedules.delayed(lambda m: seen.append(m) or 0.5, after=3)
    assert [h(n) for n in (1, 4, 9)] == [0.0, 0.5, 0.5]
    assert seen == [1, 1, 6]  # the base never sees a step below 1


@pytest.mark.parametrize("every", [1, 3])
def test_delayed_ema_is_an_ema_built_after_the_delay(every):
    """ema-pytorch's update_after_step: with delayed(base, after=N) the average after step N is
    the weights θ_N, and from then on it is, bit for bit, the base EMA built at step N."""
    from polyak import _kernels
    from polyak.averagers import Exponential

    gen = torch.Generator().manual_seed(3)
    theta = [torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(61)]
    after = 12

    def run(rule, path):
        shadow, source = path[0].clone(), path[0].clone()
        update = _kernels.build("reference", [shadow], [source])
        for n in range(1, len(path)):
            source.copy_(path[n])
            if n % every == 0:
                update.lerp_(list(rule.weights(n - every + 1, n)))
        return shadow

    base = schedules.power(gamma=3.0)
    delayed = run(Exponential(schedules.delayed(base, after=after)), theta)
    assert torch.equal(
        run(Exponential(schedules.delayed(base, after=after)), theta[: after + 1]), theta[after]
    )
    assert torch.equal(delayed, run(Exponential(base), theta[after:]))
    assert not torch.equal(delayed, run(Exponential(base), theta))


@given(n=st.integers(1, 10**9), f=st.floats(1e-3, 10))
def test_anytime_half_life_is_a_fraction_of_the_steps_so_far(n, f):
    """d(n) ** (f n) = 1/2 (the half-life is f n steps), and the decay grows with n; raising d to
    the power f n multiplies its rounding error (an ulp) by f n."""
    d = schedules.anytime_half_life(f)(n)
    assert d ** (f * n) == pytest.approx(0.5, rel=1e-12 + 4 * f * n * 2.0**-53)
    assert d <= schedules.anytime_half_life(f)(n + 1)


def test_anytime_half_life_by_hand():
    f = schedules.anytime_half_life(0.1)
    assert f(10) == 0.5  # half-life 1 step
    assert f(20) == pytest.approx(math.sqrt(0.5), rel=1e-15)  # half-life 2 steps
    assert f(0) == f(1) == pytest.approx(2.0**-10, rel=1e-15)  # steps below 1 count as 1
    assert f(10**4) ** 1000 == pytest.approx(0.5, rel=1e-12)
    assert schedules.anytime_half_life(1.0)(7) == pytest.approx(0.5 ** (1 / 7), rel=1e-15)
