"""The README's tour runs as written (with a toy model standing in for the user's)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_tour_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tour = python_blocks()[0]
    gen = torch.Generator().manual_seed(0)
    evaluated = []

    def evaluate(model):
        evaluated.append(model[0].weight.detach().clone())

    namespace = {
        "MyNet": lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
        "loader": [(torch.randn(5, 4, generator=gen), torch.randint(0, 2, (5,), generator=gen))]
        * 3,
        "loss_fn": nn.functional.cross_entropy,
        "evaluate": evaluate,
    }
    exec(compile(tour, str(README), "exec"), namespace)
    ema, model = namespace["ema"], namespace["model"]
    assert ema.step == 3
    assert torch.equal(evaluated[0], ema.average("0.weight"))  # evaluated with the averages
    assert not torch.equal(model[0].weight, ema.average("0.weight"))  # own weights back
    assert (tmp_path / "model_ema.safetensors").exists() and (tmp_path / "ckpt.pt").exists()
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["ema"]["step"] == 3


def test_several_averages_block_runs():
    import polyak
    from polyak import averagers

    (block,) = [b for b in python_blocks() if "averagers.Exponentials" in b]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

    evaluated = []
    model = Net()
    namespace = {
        "polyak": polyak,
        "averagers": averagers,
        "model": model,
        "evaluate": lambda m: evaluated.append(m.fc.weight.detach().clone()),
    }
    exec(compile(block, str(README), "exec"), namespace)
    ema = namespace["ema"]
    assert ema.slots == ("fast", "slow")
    assert torch.equal(evaluated[0], ema.average("fc.weight", slot="slow"))


def test_posthoc_block_runs(tmp_path, monkeypatch):
    import polyak

    monkeypatch.chdir(tmp_path)
    (block,) = [b for b in python_blocks() if "posthoc.PowerEMA" in b]
    model = nn.Sequential(nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def train_step(m):
        opt.zero_grad()
        m(torch.ones(4, 3)).square().mean().backward()
        opt.step()

    block = block.replace("snapshot_every=1000", "snapshot_every=10")
    namespace = {"polyak": polyak, "model": model, "train_step": train_step, "steps": 95}
    exec(compile(block, str(README), "exec"), namespace)
    assert [s.step for s in polyak.posthoc.read_index(tmp_path / "ph")][-1] == 95
    assert set(namespace["averaged"]) == {"0.weight", "0.bias"}
    assert len(namespace["sweep"]) == 3


def test_posthoc_commands_parse():
    """The shell block's commands are valid ``polyak`` command lines (they are not run: the demo
    trains for a minute). Each option is checked by the real parser, values included."""
    import shlex

    from polyak.cli import build_parser

    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "polyak posthoc" in b]
    commands = [line.split("#")[0] for line in block.splitlines() if line.startswith("polyak ")]
    assert [shlex.split(c)[1] for c in commands] == ["demo", "posthoc"]
    for command in commands:
        args, unknown = build_parser().parse_known_args(shlex.split(command)[1:])
        assert unknown == [], command
    assert args.eval and len(args.sigma_rel) == 14
