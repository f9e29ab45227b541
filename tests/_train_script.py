"""A training run that checkpoints with polyak and resumes (for tests/test_resume.py).

    python tests/_train_script.py DIR STEPS [--resume]

Trains a small model with SGD with momentum on batches that are a function of the step alone,
with a ``polyak.EMA``; every ``EVERY`` steps it writes one checkpoint, ``DIR/ckpt``, holding the
model, the optimizer (its momentum buffers) and the EMA, with ``polyak.io.save`` (atomic: a kill
mid-save leaves the previous checkpoint), then prints ``saved <step>``. ``--resume`` starts from
``DIR/ckpt`` where it exists. At the end it writes the averages with ``ema.save_state(DIR/final)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import polyak

EVERY = 5


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(16, 6, generator=gen)
    return x, x.sum(dim=1, keepdim=True).sin()


def main() -> None:
    directory, steps, resume = Path(sys.argv[1]), int(sys.argv[2]), "--resume" in sys.argv
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 32), torch.nn.BatchNorm1d(32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ema = polyak.EMA(model, decay=polyak.schedules.tf_warmup(0.99))
    start = 0
    checkpoint = directory / "ckpt"
    if resume and checkpoint.exists():
        state = polyak.io.load(checkpoint)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        ema.load_state_dict(state["ema"])
        start = state["step"]
    for step in range(start + 1, steps + 1):
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
        if step % EVERY == 0:
            polyak.io.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "ema": ema.state_dict(),
                    "step": step,
                },
                checkpoint,
            )
            print(f"saved {step}", flush=True)
    ema.save_state(directory / "final")
    print("done", flush=True)


if __name__ == "__main__":
    main()
