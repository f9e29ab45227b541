"""polyak.integrations.lightning.EMACallback on real Lightning runs (CPU, tiny models).

References: the weights recorded by an optimizer post-step hook of the test module's own (every
real step), averaged in float64 here; Lightning's ``global_step``; Lightning's own
``EMAWeightAveraging`` on the same run; an uninterrupted run for resume.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.callbacks import Callback, EMAWeightAveraging  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

import polyak  # noqa: E402
from polyak.integrations.lightning import CHECKPOINT_KEY, EMACallback  # noqa: E402

DECAY = 0.8
GEN = torch.Generator().manual_seed(1)
X, Y = torch.randn(32, 4, generator=GEN), torch.randn(32, 1, generator=GEN)
X_VAL = torch.randn(5, 4, generator=GEN)
README = Path(__file__).resolve().parents[2] / "README.md"


def loader(n: int = 32, batch_size: int = 4) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X[:n], Y[:n]), batch_size=batch_size
    )


def val_loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X_VAL), batch_size=5)


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def reference(start: dict, trajectory: list[dict], decay: float, after: int = 0) -> dict:
    """float64 EMA from ``start``; the first ``after`` entries are copied (decay 0)."""
    avg = {n: t.double() for n, t in start.items()}
    for i, w in enumerate(trajectory, start=1):
        d = 0.0 if i <= after else decay
        avg = {n: d * avg[n] + (1 - d) * w[n].double() for n in avg}
    return avg


def forward_with(module: Net, tensors: dict) -> torch.Tensor:
    """The module's output on X_VAL with ``tensors`` (by name) in float64."""
    body = copy.deepcopy(module.body).double()
    params = {n.removeprefix("body."): t.double() for n, t in tensors.items()}
    with torch.no_grad():
        return torch.func.functional_call(body, params, (X_VAL.double(),))


class Net(pl.LightningModule):
    """A two-layer regressor; records the weights after every real optimizer step (its own post
    hook) and the output on X_VAL at each validation / test / predict step."""

    def __init__(self, lr: float = 0.3, optimizer: str = "sgd", poison: tuple[int, ...] = ()):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.lr, self.optimizer_name, self.poison = lr, optimizer, poison
        self.start: dict | None = None
        self.trajectory: list[dict] = []
        self.outputs: list[tuple[str, int, torch.Tensor]] = []
        self.fail_validation = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def on_fit_start(self) -> None:  # after the callbacks' on_fit_start: the EMA's start
        self.start = weights(self)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = (self(x).float() - y).square().mean()
        if batch_idx in self.poison:
            loss = loss * float("inf")
        return loss

    def _record(self, stage: str) -> None:
        out = self(X_VAL.to(self.dtype)).detach().clone()
        self.outputs.append((stage, self.trainer.global_step, out))

    def validation_step(self, batch, batch_idx):
        if self.fail_validation:
            raise RuntimeError("validation failed")
        self._record("val")

    def test_step(self, batch, batch_idx):
        self._record("test")

    def predict_step(self, batch, batch_idx):
        self._record("predict")
        return self(batch[0].to(self.dtype))

    def configure_optimizers(self):
        cls = torch.optim.Adam if self.optimizer_name == "adam" else torch.optim.SGD
        opt = cls(self.parameters(), lr=self.lr)
        opt.register_step_post_hook(lambda *_: self.trajectory.append(weights(self)))
        return opt


def trainer(callbacks: list, **kwargs) -> pl.Trainer:
    settings = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "max_epochs": 1,
        "limit_val_batches": 0,
    }
    settings.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **settings)


def assert_matches(ema: polyak.EMA, ref: dict, rtol: float = 1e-6) -> None:
    for name, value in ref.items():
        avg = ema.average(name)
        assert avg.dtype == torch.float32, name
        torch.testing.assert_close(avg.double(), value, rtol=rtol, atol=rtol)


# ---------------------------------------------------------------- real optimizer steps


def test_gradient_accumulation_updates_once_per_optimizer_step():
    model, cb = Net(), EMACallback(DECAY)
    t = trainer([cb], accumulate_grad_batches=4)
    t.fit(model, loader())  # 8 batches: 2 optimizer steps
    assert t.global_step == 2 and len(model.trajectory) == 2
    assert cb.ema.step == 2 and cb.ema.num_averages == 2
    assert_matches(cb.ema, reference(model.start, model.trajectory, DECAY))
    model(X[:4]).sum().backward()
    t.optimizers[0].step()  # after fit the hook is gone: the optimizer is the user's again
    assert cb.ema.step == 2


def test_a_step_gradscaler_skips_leaves_the_ema_untouched():
    """16-mixed on the CPU with a real GradScaler (Lightning maps precision='16-mixed' to bf16 on
    the CPU, so the plugin is passed as such): batch 2's inf loss makes the scaler skip its step.
    Lightning still counts it in global_step; the EMA does not, and no shadow moves."""

    class Snapshots(Callback):
        def __init__(self, ema_cb: EMACallback) -> None:
            self.ema_cb, self.seen = ema_cb, {}

        def _take(self, key: str) -> None:
            ema = self.ema_cb.ema
            self.seen[key] = (ema.step, {n: ema.average(n).clone() for n in ema.names()})

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:
                self._take("before")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 2:
                self._take("after")

    model, cb = Net(poison=(2,)), EMACallback(DECAY)
    snaps = Snapshots(cb)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    t = trainer([cb, snaps], max_steps=5, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    t.fit(model, loader())
    assert t.global_step == 5 and len(model.trajectory) == 4  # one step skipped
    (step_before, before), (step_after, after) = snaps.seen["before"], snaps.seen["after"]
    assert step_before == step_after == 2
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert cb.ema.step == 4
    assert_matches(cb.ema, reference(model.start, model.trajectory, DECAY))


class ManualNet(Net):
    """Manual optimization: an optimizer step every second batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        self.manual_backward((self(x) - y).square().mean() / 2)
        if batch_idx % 2 == 1:
            opt.step()
            opt.zero_grad()


def test_manual_optimization_updates_on_each_step_the_module_takes():
    model, cb = ManualNet(), EMACallback(DECAY)
    trainer([cb]).fit(model, loader())  # 8 batches, 4 steps
    assert len(model.trajectory) == 4 and cb.ema.step == 4
    assert_matches(cb.ema, reference(model.start, model.trajectory, DECAY))


class TwoOptimizerNet(Net):
    """Manual optimization with two optimizers (a GAN's shape): the first layer's optimizer
    steps twice per batch, the second's once."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.steps = [0, 0]

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        x, y = batch
        for _ in range(2):
            first.zero_grad()
            self.manual_backward((self(x) - y).square().mean())
            first.step()
            self.steps[0] += 1
        second.zero_grad()
        self.manual_backward((self(x) - y).square().mean())
        second.step()
        self.steps[1] += 1

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.body[0].parameters(), lr=0.1),
            torch.optim.SGD(self.body[2].parameters(), lr=0.1),
        )


def test_several_optimizers_update_once_per_round():
    model, cb = TwoOptimizerNet(), EMACallback(DECAY)
    trainer([cb], max_steps=-1, limit_train_batches=3).fit(model, loader())
    assert model.steps == [6, 3] and cb.ema.step == 3


# ---------------------------------------------------------------- evaluation with the averages


class AfterEval(Callback):
    """Placed after the EMACallback: sees the weights the EMACallback leaves after evaluation,
    and the last weights of training before each evaluation."""

    def __init__(self) -> None:
        self.last_trained: dict | None = None
        self.checks: list[tuple[dict, dict]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.last_trained = weights(pl_module)

    def on_validation_end(self, trainer, pl_module):
        self.checks.append((self.last_trained, weights(pl_module)))


def test_validation_runs_on_the_averages_and_gives_the_trained_weights_back():
    model, cb, after = Net(), EMACallback(DECAY), AfterEval()
    t = trainer([cb, after], val_check_interval=3, limit_val_batches=1)
    t.fit(model, loader(), val_loader())
    outputs = [(step, out) for stage, step, out in model.outputs if stage == "val"]
    assert [step for step, _ in outputs] == [3, 6]
    for step, out in outputs:
        ref = reference(model.start, model.trajectory[:step], DECAY)
        averaged = forward_with(model, ref)
        live = forward_with(model, model.trajectory[step - 1])
        torch.testing.assert_close(out.double(), averaged, rtol=1e-5, atol=1e-6)
        assert (averaged - live).abs().max() > 1e3 * (out.double() - averaged).abs().max()
    assert len(after.checks) == 2
    for trained, restored in after.checks:
        for name in trained:
            assert torch.equal(trained[name], restored[name]), name  # bit for bit
    for name, value in weights(model).items():  # fit ends on the trained weights
        assert torch.equal(value, model.trajectory[-1][name])


def test_validation_that_raises_still_gives_the_trained_weights_back():
    class FailSecond(Callback):
        def on_validation_start(self, trainer, pl_module):
            pl_module.fail_validation = trainer.global_step >= 6

    model, cb = Net(), EMACallback(DECAY)
    t = trainer([FailSecond(), cb], val_check_interval=3, limit_val_batches=1)
    with pytest.raises(RuntimeError, match="validation failed"):
        t.fit(model, loader(), val_loader())
    trained = model.trajectory[-1]
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), trained[name]), name
        assert p.data_ptr() != cb.ema.average(name).data_ptr()
    assert not torch.equal(trained["body.0.weight"], cb.ema.average("body.0.weight"))
    opt, steps = t.optimizers[0], cb.ema.step
    model(X_VAL).sum().backward()
    opt.step()  # the hook was removed with the failed fit
    assert cb.ema.step == steps


def test_test_and_predict_run_on_the_averages():
    model, cb = Net(), EMACallback(DECAY)
    t = trainer([cb])
    t.fit(model, loader())
    t.test(model, val_loader())
    predictions = t.predict(model, val_loader())
    averaged = forward_with(model, {n: cb.ema.average(n) for n in cb.ema.names()})
    live = forward_with(model, model.trajectory[-1])
    for stage, _, out in model.outputs:
        torch.testing.assert_close(out.double(), averaged, rtol=1e-5, atol=1e-6, msg=stage)
    torch.testing.assert_close(predictions[0].double(), averaged, rtol=1e-5, atol=1e-6)
    assert (averaged - live).abs().max() > 1e-3
    for name, value in weights(model).items():
        assert torch.equal(value, model.trajectory[-1][name])


def test_delayed_start_validates_the_live_weights_until_averaging_starts():
    model, cb = Net(), EMACallback(DECAY, update_after_step=4)
    t = trainer([cb], val_check_interval=2, limit_val_batches=1)
    t.fit(model, loader(), val_loader())
    outputs = {step: out for stage, step, out in model.outputs if stage == "val"}
    assert sorted(outputs) == [2, 4, 6, 8]
    for step in (2, 4):  # before the start: the live weights, exactly
        live = forward_with(model, model.trajectory[step - 1])
        torch.testing.assert_close(outputs[step].double(), live, rtol=1e-5, atol=1e-6)
    ref = reference(model.start, model.trajectory[:6], DECAY, after=4)
    torch.testing.assert_close(outputs[6].double(), forward_with(model, ref), rtol=1e-5, atol=1e-6)
    assert_matches(cb.ema, reference(model.start, model.trajectory, DECAY, after=4))


# ---------------------------------------------------------------- checkpoints and files


def test_resume_from_a_checkpoint_gives_the_uninterrupted_average_bit_for_bit(tmp_path):
    options = {"update_every": 2}
    whole, cb_whole = Net(optimizer="adam", lr=0.05), EMACallback(DECAY, **options)
    trainer([cb_whole], max_epochs=2).fit(whole, loader())

    first, cb_first = Net(optimizer="adam", lr=0.05), EMACallback(DECAY, **options)
    t = trainer([cb_first], max_epochs=1)
    t.fit(first, loader())
    t.save_checkpoint(tmp_path / "half.ckpt")
    ckpt = torch.load(tmp_path / "half.ckpt", weights_only=True)  # plain data only
    assert ckpt[CHECKPOINT_KEY][cb_first.state_key]["step"] == 8

    torch.manual_seed(123)
    second = Net(optimizer="adam", lr=0.05)
    with torch.no_grad():  # a different start, so that only the checkpoint can make it right
        for p in second.parameters():
            p.add_(1.0)
    cb_second = EMACallback(DECAY, **options)
    trainer([cb_second], max_epochs=2).fit(second, loader(), ckpt_path=tmp_path / "half.ckpt")

    assert cb_second.ema.step == cb_whole.ema.step == 16
    assert cb_second.ema.update_every == 2 and cb_second.ema.num_averages == 8
    for name in cb_whole.ema.names():
        assert torch.equal(cb_second.ema.average(name), cb_whole.ema.average(name)), name
    for name, value in weights(second).items():
        assert torch.equal(value, weights(whole)[name]), name


def test_a_lone_callback_resumes_a_state_saved_with_other_settings(tmp_path):
    first, cb_first = Net(), EMACallback(DECAY)
    t = trainer([cb_first])
    t.fit(first, loader())
    t.save_checkpoint(tmp_path / "a.ckpt")
    cb = EMACallback(0.5)
    assert cb.state_key != cb_first.state_key
    with pytest.warns(polyak.ema.LoadedSettingsWarning, match="0.8"):
        trainer([cb], max_epochs=2).fit(Net(), loader(), ckpt_path=tmp_path / "a.ckpt")
    assert cb.ema.step == 16 and cb.ema.decay == pytest.approx(DECAY)  # the checkpoint's decay


def test_a_checkpoint_saved_during_validation_keeps_the_trained_weights(tmp_path):
    class SaveDuringValidation(Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            self.averages_in_model = weights(pl_module)
            trainer.save_checkpoint(tmp_path / "during.ckpt")

    model, cb, saver = Net(), EMACallback(DECAY), SaveDuringValidation()
    t = trainer([cb, saver], max_steps=3, val_check_interval=3, limit_val_batches=1)
    t.fit(model, loader(), val_loader())
    ckpt = torch.load(tmp_path / "during.ckpt", weights_only=True)
    trained = model.trajectory[-1]
    for name in trained:
        assert torch.equal(ckpt["state_dict"][name], trained[name]), name
        assert torch.equal(saver.averages_in_model[name], cb.ema.average(name)), name
    state = ckpt[CHECKPOINT_KEY][cb.state_key]
    assert state["step"] == 3


def test_evaluating_a_checkpoint_tests_its_averages(tmp_path):
    model, cb = Net(), EMACallback(DECAY)
    t = trainer([cb])
    t.fit(model, loader())
    t.save_checkpoint(tmp_path / "end.ckpt")
    averaged = forward_with(model, {n: cb.ema.average(n) for n in cb.ema.names()})

    fresh, cb_fresh = Net(), EMACallback(DECAY)
    assert cb_fresh.ema is None
    trainer([cb_fresh]).test(fresh, val_loader(), ckpt_path=tmp_path / "end.ckpt")
    ((_, _, out),) = fresh.outputs
    torch.testing.assert_close(out.double(), averaged, rtol=1e-5, atol=1e-6)
    for name, value in weights(fresh).items():  # the checkpoint's trained weights, back
        assert torch.equal(value, model.trajectory[-1][name])


def test_evaluating_another_module_warns_and_uses_its_own_weights():
    model, cb = Net(), EMACallback(DECAY)
    t = trainer([cb])
    t.fit(model, loader())
    other = Net()
    with pytest.warns(UserWarning, match="not the one whose weights the EMA averages"):
        t.test(other, val_loader())
    ((_, _, out),) = other.outputs
    torch.testing.assert_close(out.double(), forward_with(other, weights(other)))


def test_a_lightning_optimizer_is_attached_through_its_torch_optimizer():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = polyak.EMA(model, DECAY)
    handle = polyak.attach(LightningOptimizer(opt), ema)
    assert handle.optimizers == (opt,)
    with pytest.raises(ValueError, match="already attached"):
        polyak.attach(opt, ema)
    model(X_VAL).sum().backward()
    opt.step()
    assert ema.step == 1


def test_save_averaged_weights_writes_a_plain_model_file(tmp_path):
    path = tmp_path / "out" / "ema.safetensors"
    model, cb = Net(), EMACallback(DECAY, save_averaged_weights=path)
    trainer([cb]).fit(model, loader())
    fresh = Net()
    polyak.io.load_averaged(fresh, path)  # strict: every key of the module, nothing else
    for name, p in fresh.named_parameters():
        assert torch.equal(p.detach(), cb.ema.average(name)), name
    assert not torch.equal(fresh.body[0].weight, model.body[0].weight)
    assert [p.name for p in path.parent.iterdir()] == ["ema.safetensors"]  # no temp file left


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def test_bf16_weights_get_fp32_shadows():
    model, cb = Net(lr=0.02), EMACallback(0.99)
    trainer([cb], precision="bf16-true", max_epochs=3).fit(model, loader())
    assert model.body[0].weight.dtype == torch.bfloat16
    assert_matches(cb.ema, reference(model.start, model.trajectory, 0.99))


def test_options_pass_through_and_bad_arguments_are_refused_early():
    cb = EMACallback(0.9, buffers="none", update_every=3, shadow_dtype=torch.float64)
    model = Net()
    trainer([cb]).fit(model, loader())
    assert (cb.ema.buffers, cb.ema.update_every, cb.ema.num_averages) == ("none", 3, 2)
    assert cb.ema.average("body.0.weight").dtype == torch.float64
    with pytest.raises(TypeError, match=r"unknown options \['decay_rate'\].*polyak.EMA's"):
        EMACallback(decay_rate=0.9)
    with pytest.raises(ValueError, match=r"update_after_step must be an int >= 0.*-1"):
        EMACallback(update_after_step=-1)
    with pytest.raises(ValueError, match=r"rule=.*cannot be given together.*Uniform\(start=5\)"):
        EMACallback(update_after_step=5, rule=polyak.averagers.Uniform())
    with pytest.raises(ValueError, match="1.5"):
        EMACallback(1.5)
    offloaded, model = EMACallback(DECAY, offload="cpu"), Net()  # the worker-thread update
    trainer([offloaded], max_steps=3).fit(model, loader())
    assert offloaded.ema.offload == "cpu" and offloaded.ema.step == 3
    assert_matches(offloaded.ema, reference(model.start, model.trajectory, DECAY))
    with pytest.raises(ValueError, match="stream='side' needs the tracked tensors on a CUDA"):
        trainer([EMACallback(stream="side")], max_steps=1).fit(Net(), loader())
    uniform = EMACallback(rule=polyak.averagers.Uniform())  # rule= without decay= is fine
    trainer([uniform], max_steps=2).fit(Net(), loader())
    assert uniform.ema.step == 2


# ---------------------------------------------------------------- beside Lightning's own


def test_same_average_as_lightnings_ema_where_both_are_right():
    """fp32, no delay: Lightning's average starts at the weights after the first step
    (AveragedModel copies them at its first update), which is update_after_step=1 here."""
    model = Net()
    ours, theirs = EMACallback(DECAY, update_after_step=1), EMAWeightAveraging(decay=DECAY)
    trainer([ours, theirs], max_epochs=2).fit(model, loader())
    assert ours.ema.step == 16
    # Lightning copies its average into the model when training ends
    for name, value in model.named_parameters():
        torch.testing.assert_close(ours.ema.average(name), value.detach(), rtol=0, atol=1e-6)
    assert_matches(ours.ema, reference(model.start, model.trajectory, DECAY, after=1))


def test_bf16_weights_lightning_stalls_where_polyak_does_not():
    model = Net(lr=0.02)
    ours, theirs = EMACallback(0.99, update_after_step=1), EMAWeightAveraging(decay=0.99)
    trainer([ours, theirs], precision="bf16-true", max_epochs=3).fit(model, loader())
    ref = reference(model.start, model.trajectory, 0.99, after=1)
    ours_err = max((ours.ema.average(n).double() - r).abs().max().item() for n, r in ref.items())
    theirs_avg = dict(model.named_parameters())  # Lightning's bf16 average, copied in
    theirs_err = max((theirs_avg[n].double() - r).abs().max().item() for n, r in ref.items())
    assert theirs_avg["body.0.weight"].dtype == torch.bfloat16
    assert ours_err < 1e-6 and theirs_err > 100 * ours_err


def test_delayed_start_lightning_validates_untrained_weights_polyak_the_live_ones():
    """Validation at step 2, before averaging starts at step 4: Lightning evaluates its untouched
    copy of the initial weights (Lightning issue #21724), polyak the live weights. Once both
    average, they agree (Lightning's update_starting_at_step=M is update_after_step=M + 1)."""
    runs = {}
    for name, cb in [
        ("ours", EMACallback(DECAY, update_after_step=4)),
        ("theirs", EMAWeightAveraging(decay=DECAY, update_starting_at_step=3)),
    ]:
        model = Net()
        trainer([cb], max_steps=8, val_check_interval=2, limit_val_batches=1).fit(
            model, loader(), val_loader()
        )
        runs[name] = (model, {step: out for _, step, out in model.outputs}, cb)
    model, ours, cb = runs["ours"]
    _, theirs, _ = runs["theirs"]
    live = forward_with(model, model.trajectory[1])
    initial = forward_with(model, model.start)
    torch.testing.assert_close(ours[2].double(), live, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theirs[2].double(), initial, rtol=1e-5, atol=1e-6)
    assert (live - initial).abs().max() > 1e-2
    for step in (6, 8):  # both average now: the same numbers
        torch.testing.assert_close(ours[step], theirs[step], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- DDP, README, imports


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_ranks_hold_the_same_average_and_only_rank_zero_writes(tmp_path):
    """strategy="ddp", 2 CPU processes, gloo. The test starts both ranks itself (LOCAL_RANK set:
    Lightning's environment then creates no processes), so they import in parallel."""
    script = Path(__file__).with_name("_lightning_ddp.py")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "NODE_RANK": "0",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path)],
            env={**env, "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        logs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["writes"] for r in ranks] == [1, 0]
    assert ranks[0]["step"] == ranks[1]["step"] == ranks[0]["global_step"] == 4
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, avg in states[0].items():
        assert torch.equal(avg, states[1][name]), name
    written = _read(tmp_path / "ema.safetensors")
    for name, avg in states[0].items():
        assert torch.equal(written[name], avg), name


def readme_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "integrations.lightning import EMACallback" in b]
    return block


def test_readme_lightning_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    block = readme_block()
    assert len(block.strip().splitlines()) <= 12
    model = Net()
    namespace = {
        "MyLightningModule": lambda: model,
        "train_loader": loader(),
        "val_loader": val_loader(),
        "trainer_options": {
            "max_epochs": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "accelerator": "cpu",
            "devices": 1,
        },
    }
    exec(compile(block, str(README), "exec"), namespace)
    ema = namespace["callback"].ema
    assert ema.step == 8
    assert (tmp_path / "model_ema.safetensors").exists()
    assert [stage for stage, _, _ in model.outputs].count("val") >= 1


def test_callback_overhead_bench_runs():
    """bench/callback_overhead.py's mechanics on a tiny model (no timing asserted)."""
    bench = Path(__file__).resolve().parents[2] / "bench"
    sys.path.insert(0, str(bench))
    try:
        import callback_overhead
    finally:
        sys.path.remove(str(bench))
    result = callback_overhead.run(rounds=2, warmup=1, steps=2, width=8, depth=1, batch=2, seed=0)
    assert {row["variant"] for row in result["rows"]} == {"none", "polyak", "lightning"}
    assert all(len(t) == 2 and min(t) > 0 for t in result["times_ms"].values())
    assert set(result["update_only_ms"]) == {"polyak", "lightning"}
    assert result["parameters"] == 8 * 8 + 8
