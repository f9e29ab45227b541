"""DDP on 2 CPU processes (gloo), run as a script by test_lightning.py, once per rank (LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set by the test; without them Lightning's launcher would
start rank 1 by running this script again). Each rank writes its EMA state, its step and how many
files its callback wrote into the folder given as the first argument."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

import polyak.io
from polyak.integrations.lightning import EMACallback

OUT = Path(sys.argv[1])
writes = []
_save = polyak.io.save_safetensors


def counting_save(*args, **kwargs):
    writes.append(args[1])
    return _save(*args, **kwargs)


polyak.io.save_safetensors = counting_save  # ema.save writes through polyak.io


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.body(x) - y).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3)


def main() -> None:
    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(32, 4, generator=gen), torch.randn(32, 1, generator=gen)
    )
    # every rank sees its own half of the data: only gradient averaging keeps the replicas equal
    callback = EMACallback(0.8, save_averaged_weights=OUT / "ema.safetensors")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=4))
    rank = trainer.global_rank
    ema = callback.ema
    torch.save({n: ema.average(n) for n in ema.names()}, OUT / f"rank{rank}.pt")
    info = {"writes": len(writes), "step": ema.step, "global_step": trainer.global_step}
    (OUT / f"rank{rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
