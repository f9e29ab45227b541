"""The README's tour runs as written (with a toy model standing in for the user's)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


# What the tour leaves to the reader (a model, data, a loss, an evaluation), as source, so that
# tests/test_packaging.py runs the same tour with the installed wheel in another interpreter.
TOUR_SETUP = """
import torch
from torch import nn

_gen = torch.Generator().manual_seed(0)
_evaluated = []


def MyNet():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


loader = [(torch.randn(5, 4, generator=_gen), torch.randint(0, 2, (5,), generator=_gen))] * 3
loss_fn = nn.functional.cross_entropy


def evaluate(model):
    _evaluated.append(model[0].weight.detach().clone())
"""

# what the tour must have done (run in its namespace, in the directory it ran in)
TOUR_CHECKS = """
from pathlib import Path

assert ema.step == 3
assert torch.equal(_evaluated[0], ema.average("0.weight"))  # evaluated with the averages
assert not torch.equal(model[0].weight, ema.average("0.weight"))  # own weights back
assert Path("model_ema.safetensors").exists() and Path("ckpt.pt").exists()
assert torch.load("ckpt.pt", weights_only=True)["ema"]["step"] == 3
"""


def tour_script() -> str:
    """The README's tour between its setup and its checks: one script to run as is."""
    return TOUR_SETUP + python_blocks()[0] + TOUR_CHECKS


def test_tour_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(tour_script(), str(README), "exec"), namespace)
    assert namespace["ema"].step == 3


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
