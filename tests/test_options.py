"""polyak._options: the EMA's constructor arguments refused with clear errors, in a fixed order,
and the averaging rule resolved from ``decay=`` or ``rule=``, without building an EMA."""

from __future__ import annotations

import pytest
import torch

from polyak import _options, averagers, schedules

OK = {
    "buffers": "average",
    "update_every": 1,
    "shadow_dtype": None,
    "include": None,
    "stream": None,
    "offload": None,
    "capturable": False,
}


def rule_from(decay=_options.DEFAULT_DECAY, rule=None, **kwargs):
    return _options.rule_from(decay, rule, **{**OK, **kwargs})


def test_a_float_decay_is_an_exponential_rule_with_a_constant_schedule():
    rule = rule_from(0.9)
    assert type(rule) is averagers.Exponential
    assert rule.decay == schedules.constant(0.9) and rule.weights(1, 1) == pytest.approx((0.1,))
    default = rule_from()
    assert default.weights(1, 1) == pytest.approx((1 - 0.999,))


def test_a_callable_decay_is_kept_as_the_schedule():
    def schedule(step: int) -> float:
        return 0.5

    assert rule_from(schedule).decay is schedule


def test_a_rule_is_taken_as_given_and_never_with_a_decay():
    rule = averagers.Uniform()
    assert rule_from(rule=rule) is rule
    with pytest.raises(ValueError, match=r"decay=0\.999 and rule=.* cannot be given together"):
        rule_from(float("0.999"), rule=rule)  # equal to the default, but passed: refused
    with pytest.raises(TypeError, match=r"rule must be a polyak\.averagers\.Rule .* of type str"):
        rule_from(rule="uniform")


@pytest.mark.parametrize("decay", [True, "0.9", None, [0.9]])
def test_a_decay_that_is_no_number_nor_callable_is_refused(decay):
    with pytest.raises(TypeError, match=r"decay must be a float in \[0, 1\] or a schedule"):
        rule_from(decay)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"buffers": "all"}, ValueError, r"buffers must be one of .* got buffers='all'\."),
        ({"update_every": 0}, ValueError, r"update_every must be a positive int"),
        ({"update_every": True}, ValueError, r"got update_every=True"),
        ({"update_every": 2.0}, ValueError, r"got update_every=2\.0"),
        ({"shadow_dtype": torch.int32}, TypeError, r"shadow_dtype must be a floating"),
        ({"shadow_dtype": "float32"}, TypeError, r"got 'float32'"),
        ({"include": "weight"}, TypeError, r"include must be a predicate"),
        ({"stream": "main"}, ValueError, r"stream must be None or 'side', got stream='main'"),
        ({"offload": "disk"}, ValueError, r"offload must be None or 'cpu', got offload='disk'"),
        ({"stream": "side", "offload": "cpu"}, ValueError, r"cannot be combined"),
        ({"capturable": True, "stream": "side"}, ValueError, r"capturable=True runs the update"),
        ({"capturable": True, "offload": "cpu"}, ValueError, r"capturable=True runs the update"),
    ],
)
def test_each_bad_argument_is_refused_naming_it(kwargs, error, match):
    with pytest.raises(error, match=match):
        rule_from(**kwargs)


def test_arguments_are_checked_before_the_decay_and_the_policies_together_last():
    with pytest.raises(ValueError, match="buffers must be"):
        rule_from("bad", buffers="all")
    with pytest.raises(ValueError, match="offload must be"):
        rule_from(stream="side", offload="disk")
    with pytest.raises(ValueError, match="cannot be combined"):
        rule_from("bad", stream="side", offload="cpu")


def test_capturable_needs_a_schedule_that_runs_on_the_device():
    assert rule_from(0.9, capturable=True).decay == schedules.constant(0.9)
    rule_from(schedules.scaled(schedules.tf_warmup(0.999), 2.0), capturable=True)
    rule_from(rule=averagers.Uniform(), capturable=True)  # no schedule to evaluate
    for python in (lambda step: 0.9, schedules.scaled(lambda step: 0.9, 2.0)):
        with pytest.raises(ValueError, match="capturable=True evaluates the decay on the device"):
            rule_from(python, capturable=True)
    with pytest.raises(ValueError, match="capturable=True evaluates the decay on the device"):
        rule_from(rule=averagers.Exponential(lambda step: 0.9), capturable=True)


def test_check_tracked_needs_a_tensor_and_one_device_when_capturable():
    cpu, meta = torch.zeros(2), torch.zeros(2, device="meta")
    with pytest.raises(ValueError, match="EMA found no tensor to track"):
        _options.check_tracked([], capturable=False)
    both = [("a", cpu, "average"), ("b", meta, "copy")]
    _options.check_tracked(both, capturable=False)
    _options.check_tracked([("a", cpu, "average")], capturable=True)
    with pytest.raises(ValueError, match=r"tracked tensors are on \['cpu', 'meta'\]"):
        _options.check_tracked(both, capturable=True)


def test_check_rounding_needs_bf16_shadows_for_stochastic_rounding():
    bf16, fp32 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    _options.check_rounding("nearest", {"a": fp32})
    _options.check_rounding("stochastic", {"a": bf16, "b": bf16})
    with pytest.raises(ValueError, match=r"\['b'\] have float32 shadows; pass shadow_dtype"):
        _options.check_rounding("stochastic", {"a": bf16, "b": fp32})
