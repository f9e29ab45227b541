"""polyak.integrations.transformers: the EMA as a Hugging Face ``Trainer`` callback.

Every test drives a real ``Trainer`` (CPU, no network, no download) over a tiny ``PreTrainedModel``
of our own: a linear regression ``y = w.x + b`` with an MSE loss, so every loss and every average
has a float64 reference computed here from the recorded weights.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import polyak
from polyak import averagers, schedules
from polyak.integrations.transformers import (
    STATE_FILE,
    EMACallback,
    ema_evaluation,
    load_ema_state,
    save_ema_state,
)

README = Path(__file__).resolve().parents[2] / "README.md"
NAMES = ("lin.weight", "lin.bias")


class TinyConfig(PretrainedConfig):
    model_type = "polyak-tiny-regression"

    def __init__(self, n_in: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.n_in = n_in


class TinyRegression(PreTrainedModel):
    """``y = lin(x)`` with an MSE loss: averaged and raw weights give different losses."""

    config_class = TinyConfig

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.lin = nn.Linear(config.n_in, 1)
        self.post_init()

    def _init_weights(self, module):  # keep nn.Linear's seeded init
        pass

    def forward(self, x, labels=None):
        out = self.lin(x.to(self.lin.weight.dtype)).squeeze(-1)
        loss = None if labels is None else ((out - labels.to(out.dtype)) ** 2).mean()
        return {"loss": loss, "logits": out}


def tiny_model(dtype: torch.dtype = torch.float32) -> TinyRegression:
    torch.manual_seed(0)
    return TinyRegression(TinyConfig()).to(dtype)


def samples(n: int = 32, seed: int = 0, inf_at: int | None = None) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + 0.1 * torch.randn(n, generator=gen)
    if inf_at is not None:
        x[inf_at, 0] = float("inf")
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


EVAL = samples(8, seed=1)


def make_trainer(out, model, callbacks, train=None, **overrides) -> Trainer:
    settings = dict(
        per_device_train_batch_size=2,
        per_device_eval_batch_size=len(EVAL),
        gradient_accumulation_steps=1,
        max_steps=4,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        seed=0,
    )
    settings.update(overrides)
    args = TrainingArguments(str(out), **settings)
    return Trainer(
        model=model,
        args=args,
        train_dataset=samples() if train is None else train,
        eval_dataset=EVAL,
        callbacks=callbacks,
    )


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.named_parameters()}


def mse64(params: dict[str, torch.Tensor], data: list[dict]) -> float:
    """The MSE of ``data`` under ``params``, in float64."""
    x = torch.stack([d["x"] for d in data]).double()
    y = torch.stack([d["labels"] for d in data]).double()
    w, b = params["lin.weight"].double(), params["lin.bias"].double()
    return ((x @ w.T).squeeze(-1) + b - y).square().mean().item()


def ema64(trajectory: list[dict[str, torch.Tensor]], decay) -> dict[str, torch.Tensor]:
    """``s_0 = θ_0``, ``s_n = d(n) s_{n-1} + (1 - d(n)) θ_n`` in float64."""
    shadow = {n: t.double() for n, t in trajectory[0].items()}
    for n, theta in enumerate(trajectory[1:], start=1):
        d = decay(n) if callable(decay) else decay
        shadow = {k: d * shadow[k] + (1 - d) * theta[k].double() for k in shadow}
    return shadow


class Recorder(TrainerCallback):
    """Records, after the EMACallback at each event, what the tests check."""

    def __init__(self, cb: EMACallback):
        self.cb = cb
        self.live: list[dict[str, torch.Tensor]] = []  # weights at train begin, then per step
        self.shadows: list[dict[str, torch.Tensor]] = []
        self.steps: list[int] = []
        self.global_steps: list[int] = []
        self.substeps = 0
        self.evals: list[dict] = []

    def _snapshot(self, model, state=None):
        self.live.append(weights(model))
        self.shadows.append({n: self.cb.ema.average(n).clone() for n in NAMES})
        self.steps.append(self.cb.ema.step)
        self.global_steps.append(0 if state is None else state.global_step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._snapshot(model, state)

    def on_substep_end(self, args, state, control, **kwargs):
        self.substeps += 1

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._snapshot(model, state)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.live:  # nothing but evaluation ran since the last step: the weights are the same
            for n, t in model.named_parameters():
                assert torch.equal(t, self.live[-1][n]), f"{n} changed outside an optimizer step"

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if "eval_loss" not in metrics:  # one of several named eval sets
            return
        self.evals.append(
            {
                "step": state.global_step,
                "loss": metrics["eval_loss"],
                "raw": mse64(self.live[-1], EVAL),
                "averaged": mse64(self.shadows[-1], EVAL),
                "held": weights(model),  # what the model held while evaluating
                # whether it held the shadows themselves (the zero-copy swap) or its own tensors
                "swapped": [
                    t.data_ptr() == self.cb.ema.average(n).data_ptr()
                    for n, t in model.named_parameters()
                ],
            }
        )


def skipped(rec: Recorder) -> list[bool]:
    """Steps the optimizer did not take, from the weights alone (an Adam step moves them all)."""
    return [
        all(torch.equal(rec.live[i][n], rec.live[i - 1][n]) for n in NAMES)
        for i in range(1, len(rec.live))
    ]


# ------------------------------------------------------------------ one update per optimizer step


def test_one_update_per_optimizer_step_under_gradient_accumulation(tmp_path):
    cb = EMACallback(0.8)
    rec = Recorder(cb)
    trainer = make_trainer(tmp_path, tiny_model(), [cb, rec], gradient_accumulation_steps=4)
    trainer.train()
    assert trainer.state.global_step == 4
    assert rec.substeps == 4 * 3  # micro-batches ran, and did not update
    assert cb.ema.step == trainer.state.global_step
    assert rec.steps == rec.global_steps == list(range(5))  # equal at every step, not just the end
    expected = ema64(rec.live, 0.8)
    for n in NAMES:
        torch.testing.assert_close(cb.ema.average(n).double(), expected[n], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_a_skipped_step_leaves_the_average_and_its_count_untouched(tmp_path, optim):
    """A ``GradScaler`` skips the steps whose gradients hold inf/NaN. On CUDA accelerate builds it
    for ``fp16=True``; on the CPU it never does (``Accelerator`` creates a scaler only off the
    CPU), so it is given one here, exactly where accelerate puts it: the Trainer then scales the
    loss, and its optimizer (wrapped at ``prepare``) steps through the scaler, as on a GPU. One
    sample holds an inf, so the step that sees it (once per epoch, two epochs) is skipped.
    ``adamw_torch``: accelerate's ``step_was_skipped`` says so; ``adamw_torch_fused`` (the
    Trainer's default) skips inside the fused kernel, which only the scale shows."""
    cb = EMACallback(0.8)
    rec = Recorder(cb)
    trainer = make_trainer(
        tmp_path,
        tiny_model(),
        [cb, rec],
        train=samples(inf_at=5),
        gradient_accumulation_steps=4,
        max_steps=8,  # two epochs of 4 optimizer steps
        max_grad_norm=0.0,
        optim=optim,
    )
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    trainer.train()
    skips = skipped(rec)
    assert sum(skips) == 2, skips
    assert trainer.state.global_step == 8
    assert cb.ema.step == 8 - 2
    for i, skip in enumerate(skips, start=1):
        same = all(torch.equal(rec.shadows[i][n], rec.shadows[i - 1][n]) for n in NAMES)
        assert same == skip, f"step {i}: skipped={skip}, shadows unchanged={same}"
        assert rec.steps[i] == rec.steps[i - 1] + (not skip)
    taken = [rec.live[0]] + [w for w, skip in zip(rec.live[1:], skips, strict=True) if not skip]
    expected = ema64(taken, 0.8)
    for n in NAMES:
        assert torch.isfinite(cb.ema.average(n)).all()
        torch.testing.assert_close(cb.ema.average(n).double(), expected[n], rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 GradScaler training needs CUDA")
@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_a_skipped_fp16_step_on_cuda(tmp_path, optim):
    """The same with the scaler accelerate itself builds for ``fp16=True`` on a GPU."""
    cb = EMACallback(0.8)
    rec = Recorder(cb)
    trainer = make_trainer(
        tmp_path,
        tiny_model(),
        [cb, rec],
        train=samples(inf_at=5),
        gradient_accumulation_steps=4,
        max_steps=8,
        max_grad_norm=0.0,
        optim=optim,
        use_cpu=False,
        fp16=True,
    )
    assert trainer.accelerator.scaler is not None
    trainer.train()
    skips = skipped(rec)
    # the scaler also skips its first steps while it finds its scale (inf in fp16 activations
    # or not): count what the weights say, and check the EMA agrees step by step
    assert sum(skips) >= 2
    assert cb.ema.step == 8 - sum(skips)
    for i, skip in enumerate(skips, start=1):
        same = all(torch.equal(rec.shadows[i][n], rec.shadows[i - 1][n]) for n in NAMES)
        assert same == skip


# ------------------------------------------------------------------ evaluation with the averages


def test_evaluation_runs_on_the_averages_and_gives_the_weights_back(tmp_path):
    cb = EMACallback(0.5)
    rec = Recorder(cb)
    trainer = make_trainer(
        tmp_path, tiny_model(), [cb, rec], eval_strategy="steps", eval_steps=1, learning_rate=0.2
    )
    assert ema_evaluation(trainer) is cb
    assert ema_evaluation(trainer) is cb  # again: a no-op, not a second swap
    trainer.train()
    assert [e["step"] for e in rec.evals] == [1, 2, 3, 4]
    for e in rec.evals:
        # from the averages, by a margin far above float32 rounding, not from the live weights
        assert e["loss"] == pytest.approx(e["averaged"], rel=1e-5)
        assert abs(e["raw"] - e["averaged"]) > 1e-3 * e["averaged"]
    for e, shadow in zip(rec.evals, rec.shadows[1:], strict=True):
        for n in NAMES:
            assert torch.equal(e["held"][n], shadow[n])  # the model held the averages then
    for n, t in trainer.model.named_parameters():  # and its own weights after, bit for bit
        assert torch.equal(t, rec.live[-1][n])
        assert t.data_ptr() != cb.ema.average(n).data_ptr()
    # after training, trainer.evaluate() / predict() see the averages too
    assert trainer.evaluate()["eval_loss"] == pytest.approx(mse64(rec.shadows[-1], EVAL), rel=1e-5)
    several = trainer.evaluate({"a": EVAL, "b": EVAL[:4]})  # evaluate() calls itself per set
    assert several["eval_a_loss"] == pytest.approx(mse64(rec.shadows[-1], EVAL), rel=1e-5)
    assert several["eval_b_loss"] == pytest.approx(mse64(rec.shadows[-1], EVAL[:4]), rel=1e-5)
    predictions = trainer.predict(EVAL).predictions
    x = torch.stack([d["x"] for d in EVAL])
    expected = x @ rec.shadows[-1]["lin.weight"].T + rec.shadows[-1]["lin.bias"]
    torch.testing.assert_close(torch.as_tensor(predictions), expected.squeeze(-1))


def test_without_ema_evaluation_the_trainer_evaluates_the_live_weights(tmp_path):
    cb = EMACallback(0.5)
    rec = Recorder(cb)
    trainer = make_trainer(
        tmp_path, tiny_model(), [cb, rec], eval_strategy="steps", eval_steps=2, learning_rate=0.2
    )
    with pytest.warns(UserWarning, match=r"live weights.*ema_evaluation\(trainer\)"):
        trainer.train()
    for e in rec.evals:
        assert e["loss"] == pytest.approx(e["raw"], rel=1e-5)
        assert abs(e["raw"] - e["averaged"]) > 1e-3 * e["averaged"]


def test_an_evaluation_that_raises_gives_the_weights_back(tmp_path):
    cb = EMACallback(0.5)
    trainer = make_trainer(tmp_path, tiny_model(), [cb], learning_rate=0.2)
    ema_evaluation(trainer)
    trainer.train()
    before = weights(trainer.model)

    def broken_metrics(prediction):
        raise RuntimeError("metric crashed")

    trainer.compute_metrics = broken_metrics
    with pytest.raises(RuntimeError, match="metric crashed"):
        trainer.evaluate()
    for n, t in trainer.model.named_parameters():
        assert torch.equal(t, before[n])
        assert t.data_ptr() != cb.ema.average(n).data_ptr()
    trainer.compute_metrics = None
    assert trainer.evaluate()["eval_loss"] == pytest.approx(
        mse64({n: cb.ema.average(n) for n in NAMES}, EVAL), rel=1e-5
    )


def test_before_update_after_step_evaluation_uses_the_live_weights(tmp_path):
    cb = EMACallback(0.5, update_after_step=2)
    rec = Recorder(cb)
    trainer = make_trainer(
        tmp_path,
        tiny_model(),
        [cb, rec],
        eval_strategy="steps",
        eval_steps=1,
        learning_rate=0.2,
        eval_on_start=True,
    )
    ema_evaluation(trainer)
    trainer.train()
    assert [e["step"] for e in rec.evals] == [0, 1, 2, 3, 4]
    for e in rec.evals[:3]:  # steps 0..2: the live weights, the model's own tensors
        assert e["loss"] == pytest.approx(e["raw"], rel=1e-5)
        assert e["swapped"] == [False, False]
    for e in rec.evals[3:]:
        assert e["loss"] == pytest.approx(e["averaged"], rel=1e-5)
        assert e["swapped"] == [True, True]
        assert abs(e["raw"] - e["averaged"]) > 1e-3 * e["averaged"]
    # the shadows copy the weights up to step 2, then average from θ_2 with decay 0.5
    for n in NAMES:
        assert torch.equal(rec.shadows[2][n], rec.live[2][n])
    expected = ema64(rec.live[2:], 0.5)
    for n in NAMES:
        torch.testing.assert_close(cb.ema.average(n).double(), expected[n], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ checkpoints and resume


def run_to(out, **overrides):
    cb = EMACallback(schedules.tf_warmup(0.9))
    settings = dict(gradient_accumulation_steps=2, max_steps=8, save_strategy="steps", save_steps=4)
    trainer = make_trainer(out, tiny_model(), [cb], **{**settings, **overrides})
    return cb, trainer


def assert_same_averages(a: polyak.EMA, b: polyak.EMA):
    assert a.step == b.step
    for n in NAMES:
        assert torch.equal(a.average(n), b.average(n)), n


def test_resume_gives_the_averages_of_an_uninterrupted_run(tmp_path):
    whole, trainer = run_to(tmp_path / "whole")
    trainer.train()
    first = load_ema_state(tmp_path / "whole" / "checkpoint-4" / STATE_FILE)
    assert first["step"] == 4

    # stopped after checkpoint-4: a new process has that checkpoint in its output_dir
    shutil.copytree(tmp_path / "whole" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    resumed, trainer2 = run_to(tmp_path / "resumed")
    trainer2.train(resume_from_checkpoint=True)
    assert trainer2.state.global_step == 8
    for n, t in trainer2.model.named_parameters():  # the Trainer's own resume is exact
        assert torch.equal(t, trainer.model.get_parameter(n))
    assert_same_averages(resumed.ema, whole.ema)
    assert resumed.ema.step == 8


def test_resume_from_a_checkpoint_outside_output_dir(tmp_path):
    whole, trainer = run_to(tmp_path / "whole")
    trainer.train()
    checkpoint = str(tmp_path / "whole" / "checkpoint-4")
    resumed, trainer2 = run_to(tmp_path / "elsewhere", resume_from_checkpoint=checkpoint)
    trainer2.train(resume_from_checkpoint=checkpoint)
    assert_same_averages(resumed.ema, whole.ema)


def test_resume_takes_the_state_of_the_step_resumed(tmp_path):
    """A stale ``args.resume_from_checkpoint`` (here the step-8 checkpoint) is passed over for the
    checkpoint of the step the Trainer resumed at."""
    whole, trainer = run_to(tmp_path / "whole")
    trainer.train()
    later = str(tmp_path / "whole" / "checkpoint-8")
    resumed, trainer2 = run_to(tmp_path / "whole", resume_from_checkpoint=later)
    trainer2.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-4"))
    assert_same_averages(resumed.ema, whole.ema)


def test_resume_without_the_ema_state_raises(tmp_path):
    _, trainer = run_to(tmp_path / "whole", max_steps=4)
    trainer.train()
    (tmp_path / "whole" / "checkpoint-4" / STATE_FILE).unlink()
    _, trainer2 = run_to(tmp_path / "whole")
    with pytest.raises(FileNotFoundError, match=r"resumed at global step 4.*no EMA state"):
        trainer2.train(resume_from_checkpoint=True)


@pytest.mark.parametrize(
    "rule",
    [
        None,
        averagers.Exponentials((0.9, 0.5)),
        averagers.Uniform(),
        averagers.LAWA(k=2),
        averagers.BEMA(),
    ],
    ids=["exponential", "exponentials", "uniform", "lawa", "bema"],
)
def test_the_state_file_round_trips_every_rule(tmp_path, rule):
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))

    def steps(model, ema, n, seed):
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(n):
            model(torch.randn(6, 3, generator=gen)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            ema.update()

    options = {} if rule is None else {"rule": rule}
    model = net()
    ema = polyak.EMA(model, **options)
    steps(model, ema, 3, seed=0)
    save_ema_state(ema.state_dict(), tmp_path / "s.safetensors", {"note": "kept"})

    copy = net()
    copy.load_state_dict(model.state_dict())
    fresh_rule = None if rule is None else type(rule)(**_fields(rule))
    resumed = polyak.EMA(copy, **({} if fresh_rule is None else {"rule": fresh_rule}))
    resumed.load_state_dict(load_ema_state(tmp_path / "s.safetensors"))
    steps(model, ema, 3, seed=1)
    steps(copy, resumed, 3, seed=1)
    a, b = ema.state_dict(), resumed.state_dict()
    assert a["step"] == b["step"] == 6
    assert a["rule"] == b["rule"]
    for slot, shadows in a["shadows"].items():
        for n, t in shadows.items():
            assert torch.equal(t, b["shadows"][slot][n]), (slot, n)
    for n, t in a["copies"].items():
        assert torch.equal(t, b["copies"][n])


def test_the_state_file_keeps_shared_tensors_under_every_name(tmp_path):
    shared, other = torch.arange(4.0), torch.zeros(2, dtype=torch.int64)
    state = {"step": 3, "a": {"x": shared, "y": shared}, "list": [other, 1.5, None, "s"]}
    save_ema_state(state, tmp_path / "s.safetensors")
    loaded = load_ema_state(tmp_path / "s.safetensors")
    assert loaded["step"] == 3 and loaded["list"][1:] == [1.5, None, "s"]
    assert torch.equal(loaded["a"]["x"], shared) and torch.equal(loaded["a"]["y"], shared)
    assert torch.equal(loaded["list"][0], other) and loaded["list"][0].dtype == torch.int64


def _fields(rule) -> dict:
    import dataclasses

    return {
        f.name: getattr(rule, f.name)
        for f in dataclasses.fields(rule)
        if f.init and f.name != "count"
    }


# ------------------------------------------------------------------ bf16, exports, processes


def test_bf16_model_gets_fp32_shadows_and_a_bf16_export(tmp_path):
    from safetensors.torch import load_file

    cb = EMACallback(0.8, save_averaged_weights=tmp_path / "ema")
    rec = Recorder(cb)
    model = tiny_model(torch.bfloat16)
    trainer = make_trainer(tmp_path / "out", model, [cb, rec], optim="adamw_torch")
    trainer.train()
    expected = ema64(rec.live, 0.8)
    for n in NAMES:
        assert cb.ema.average(n).dtype == torch.float32
        assert model.get_parameter(n).dtype == torch.bfloat16
        torch.testing.assert_close(cb.ema.average(n).double(), expected[n], rtol=1e-6, atol=1e-7)
    saved = load_file(tmp_path / "ema" / "model.safetensors")
    for n in NAMES:
        assert saved[n].dtype == torch.bfloat16
        assert torch.equal(saved[n], cb.ema.average(n).to(torch.bfloat16))
    loaded = TinyRegression.from_pretrained(tmp_path / "ema")
    for n in NAMES:
        assert torch.equal(loaded.get_parameter(n).to(torch.bfloat16), saved[n])


def test_save_averaged_weights_loads_with_from_pretrained(tmp_path):
    cb = EMACallback(0.5, save_averaged_weights=tmp_path / "ema")
    trainer = make_trainer(tmp_path / "out", tiny_model(), [cb], learning_rate=0.2)
    trainer.train()
    live = weights(trainer.model)
    loaded = TinyRegression.from_pretrained(tmp_path / "ema")
    assert loaded.config.n_in == 3
    for n in NAMES:
        assert torch.equal(loaded.get_parameter(n), cb.ema.average(n))
        assert not torch.equal(live[n], cb.ema.average(n))  # the export is not the live model
        assert torch.equal(trainer.model.get_parameter(n), live[n])  # which it left alone
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.parametrize(
    ("save_on_each_node", "world_zero", "local_zero", "writes"),
    [
        (False, False, True, False),  # another node's main process: the world's main one writes
        (True, False, True, True),  # save_on_each_node: every node's main process writes
        (True, False, False, False),
    ],
)
def test_only_the_process_that_writes_checkpoints_writes(
    tmp_path, save_on_each_node, world_zero, local_zero, writes
):
    cb = EMACallback(0.5, save_averaged_weights=tmp_path / "ema")
    trainer = make_trainer(
        tmp_path / "out",
        tiny_model(),
        [cb],
        save_strategy="steps",
        save_steps=2,
        save_on_each_node=save_on_each_node,
    )
    # which process this is, as the Trainer's state says (its own checkpoint writes follow args)
    trainer.is_world_process_zero = lambda: world_zero
    trainer.is_local_process_zero = lambda: local_zero
    trainer.train()
    assert cb.ema.step == 4  # every process averages
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert len(list((tmp_path / "out").rglob(STATE_FILE))) == (2 if writes else 0)
    assert (tmp_path / "ema").exists() == writes


# ------------------------------------------------------------------ errors, imports, README


def test_bad_arguments_are_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"\['decay_rate'\].*polyak.EMA does not take"):
        EMACallback(0.9, decay_rate=0.9)
    with pytest.raises(ValueError, match=r"update_after_step must be an int >= 0.*-1"):
        EMACallback(0.9, update_after_step=-1)
    with pytest.raises(ValueError, match=r"update_after_step=5 delays.*Uniform"):
        EMACallback(update_after_step=5, rule=averagers.Uniform())
    with pytest.raises(ValueError, match="decay"):
        EMACallback(1.5)


def test_ema_evaluation_needs_the_callback(tmp_path):
    trainer = make_trainer(tmp_path, tiny_model(), [])
    with pytest.raises(ValueError, match=r"exactly one EMACallback.*got 0"):
        ema_evaluation(trainer)


def test_load_ema_state_refuses_other_files(tmp_path):
    ema = polyak.EMA(nn.Linear(2, 2))
    ema.save(tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match=r"not an EMA state.*load_averaged"):
        load_ema_state(tmp_path / "weights.safetensors")
    save_ema_state(ema.state_dict(), tmp_path / "state.safetensors")
    data = (tmp_path / "state.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_ema_state(tmp_path / "cut.safetensors")


def test_import_polyak_does_not_import_transformers():
    code = (
        "import sys, polyak, polyak.integrations; "
        "print([m for m in ('transformers', 'accelerate', 'lightning') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_readme_trainer_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "integrations.transformers import EMACallback" in b]
    assert len(block.strip().splitlines()) <= 12
    args = TrainingArguments(
        "out", max_steps=3, report_to=[], disable_tqdm=True, use_cpu=True, save_strategy="no"
    )
    namespace = {"model": tiny_model(), "args": args, "train_set": samples(), "val_set": EVAL}
    exec(compile(block, str(README), "exec"), namespace)
    cb = namespace["callback"]
    assert isinstance(cb, EMACallback) and cb.ema.step == 3
    loaded = TinyRegression.from_pretrained(tmp_path / "out" / "ema")
    assert torch.equal(loaded.lin.weight, cb.ema.average("lin.weight"))
    assert namespace["metrics"]["eval_loss"] == pytest.approx(
        mse64({n: cb.ema.average(n) for n in NAMES}, EVAL), rel=1e-5
    )
