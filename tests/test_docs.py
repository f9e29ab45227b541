"""The docs site: every ```python block of every page runs, in order, page by page; the
benchmark tables equal the recorded JSON; ``mkdocs build --strict`` passes (where mkdocs is
installed).

A block whose first line is ``# requires: <what>[, <what>...]`` runs only where each need is
met, and is skipped otherwise: ``cuda`` (a CUDA device), a module name (importable), or
``<module><N`` (importable, and its distribution's major version below N: TensorFlow 1.x code
shown for comparison is ``# requires: tensorflow<2``). The blocks of a page share one namespace
and run in a fresh temporary directory, so files they write vanish with it.

A block whose first line is ``# runs in: torchrun --nproc-per-node 2`` is a whole script for
several processes. It runs on the 2 gloo ranks of the session's shared launch
(``tests/_distributed.py``: this module's :data:`SCENARIOS`), as a script: in a fresh namespace
named ``__main__``, with torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), and
with ``dist.init_process_group()`` and ``dist.destroy_process_group()`` standing for the group the
launcher already joined. A page's launched blocks run first, in order, in one directory the ranks
share; the page's other blocks then run in a copy of that directory, so they can read what the
ranks wrote (a checkpoint to load in one process).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = ROOT / "bench" / "results"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_ext" not in p.parts)

# a fence, possibly indented (inside a content tab or an admonition), with its language
_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.S | re.M,
)
_REQUIRES = re.compile(r"#\s*requires:\s*(?P<needs>.+)")
_RUNS_IN = re.compile(r"#\s*runs in:\s*(?P<launch>.+)")
# the launches a block may ask for: the world sizes of tests/_distributed.py's shared launches
LAUNCHES = {"torchrun --nproc-per-node 2": 2}
# python runs; bash and text show commands and output; tf1 is TensorFlow 1.x code quoted from
# the seeds for comparison, which no supported Python can run (highlighted as Python)
LANGUAGES = {"python", "bash", "text", "tf1"}


@dataclass
class Block:
    page: Path
    line: int
    code: str

    @property
    def needs(self) -> list[str]:
        first = self.code.lstrip().splitlines()[0] if self.code.strip() else ""
        found = _REQUIRES.fullmatch(first.strip())
        return [n.strip() for n in found.group("needs").split(",")] if found else []

    @property
    def world(self) -> int | None:
        """The number of ranks a ``# runs in:`` block runs on; ``None`` for a plain block."""
        first = self.code.lstrip().splitlines()[0] if self.code.strip() else ""
        found = _RUNS_IN.fullmatch(first.strip())
        if found is None:
            return None
        launch = " ".join(found.group("launch").split())
        if launch not in LAUNCHES:
            raise ValueError(
                f"{self.page}:{self.line}: '# runs in: {launch}' is not a launch the docs tests "
                f"run; expected one of {sorted(LAUNCHES)}."
            )
        return LAUNCHES[launch]


def fences(page: Path) -> list[tuple[str, int, str]]:
    """``(language, line, dedented body)`` of every fenced block of ``page``."""
    text = page.read_text(encoding="utf-8")
    out = []
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        body = textwrap.dedent(m.group("body")) if m.group("indent") else m.group("body")
        out.append((m.group("lang"), line, body))
    return out


def python_blocks(page: Path) -> list[Block]:
    return [Block(page, line, body) for lang, line, body in fences(page) if lang == "python"]


def unmet(need: str) -> str | None:
    """Why ``need`` is not met here, or ``None`` if it is."""
    if need == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    name, _, below = need.partition("<")
    if importlib.util.find_spec(name) is None:
        return f"{name} is not installed"
    if below:
        major = int(metadata.version(name).split(".")[0])
        if major >= int(below):
            return f"{name} {metadata.version(name)} is not below {below}"
    return None


def test_every_page_is_in_the_nav_and_every_fence_has_a_known_language():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in PAGES:
        entry = re.compile(rf":\s*{re.escape(str(page.relative_to(DOCS)))}\s*$", re.M)
        assert entry.search(nav), f"{page} is not in mkdocs.yml's nav"
        for lang, line, _ in fences(page):
            assert lang in LANGUAGES, f"{page}:{line}: a ```{lang} block (expected {LANGUAGES})"


def test_the_requires_convention(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "```python\n# requires: cuda, no_such_module_here\nx = 1\n```\n\n"
        "    ```python\n    # a comment, not a need\n    y = 2\n    ```\n"
    )
    first, second = python_blocks(page)
    assert first.needs == ["cuda", "no_such_module_here"] and first.line == 1
    assert second.needs == [] and second.code == "# a comment, not a need\ny = 2\n"
    assert unmet("no_such_module_here") == "no_such_module_here is not installed"
    assert unmet("torch") is None
    assert (unmet("cuda") is None) == torch.cuda.is_available()
    assert unmet("torch<1") is not None and unmet("torch<999") is None


def run_page(page: Path) -> tuple[int, list[str]]:
    """Run the python blocks of ``page`` in order in one namespace, in the current directory;
    ``(blocks run, why each skipped block was skipped)``."""
    namespace: dict = {"__name__": "__docs__"}
    ran, skipped = 0, []
    for block in python_blocks(page):
        if block.world is not None:  # run on ranks (launched_blocks), not here
            continue
        why = [w for w in map(unmet, block.needs) if w]
        if why:
            skipped.append(f"line {block.line}: {'; '.join(why)}")
            continue
        # blank lines first, so that a traceback's line numbers are the page's
        code = "\n" * block.line + block.code
        exec(compile(code, str(page), "exec"), namespace)
        ran += 1
    return ran, skipped


def test_run_page_skips_unmet_blocks_and_shares_one_namespace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    page = tmp_path / "p.md"
    page.write_text(
        "```python\nx = 1\n```\n\n"
        "```python\n# requires: no_such_module_here\nraise RuntimeError('must not run')\n```\n\n"
        "```python\nassert x == 1\nopen('out.txt', 'w').write('ok')\n```\n"
    )
    ran, skipped = run_page(page)
    assert ran == 2 and skipped == ["line 5: no_such_module_here is not installed"]
    assert (tmp_path / "out.txt").read_text() == "ok"
    page.write_text("```python\n\nassert 1 == 2\n```\n")
    with pytest.raises(AssertionError) as failed:
        run_page(page)
    assert failed.traceback[-1].lineno + 1 == 3  # the page's line (pytest counts from 0)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_code_runs(page, tmp_path, monkeypatch, request):
    blocks = python_blocks(page)
    if not blocks:
        pytest.skip("no python blocks")
    launched = [b for b in blocks if b.world is not None]
    if launched:  # they ran on the ranks; the other blocks run where they left their files
        where = launched_results(page, len(launched), request.getfixturevalue("ranks2"))
        shutil.copytree(where, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ran, skipped = run_page(page)
    if not ran and not launched:
        pytest.skip(f"every block needs what is missing here: {skipped}")


# ---------------------------------------------------------------- blocks launched on ranks


@contextmanager
def launched_as_script(rank: int, world: int) -> Iterator[None]:
    """What ``torchrun --nproc-per-node <world>`` gives a script, over the launcher's group:
    its environment, and ``init_process_group``/``destroy_process_group`` that check the group is
    the one asked for and leave it to the launcher."""
    import torch.distributed as dist

    def init_process_group(backend: str | None = None, *args: Any, **kwargs: Any) -> None:
        if not dist.is_initialized() or dist.get_world_size() != world:
            raise RuntimeError(f"the launcher's {world}-rank process group is not joined")
        if backend not in (None, "gloo"):
            raise ValueError(f"the docs run on gloo on the CPU, not on backend={backend!r}")

    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, str(value))
        patch.setattr(dist, "init_process_group", init_process_group)
        patch.setattr(dist, "destroy_process_group", lambda *args, **kwargs: None)
        yield


def run_launched(blocks: list[Block], where: Path, rank: int, world: int) -> int:
    """Run each block as a script (a fresh ``__main__`` namespace) in ``where``, on this rank;
    the number run."""
    cwd = Path.cwd()
    where.mkdir(parents=True, exist_ok=True)
    os.chdir(where)
    try:
        with launched_as_script(rank, world):
            for block in blocks:
                torch.manual_seed(0)
                code = "\n" * block.line + block.code  # the page's line numbers in tracebacks
                exec(compile(code, str(block.page), "exec"), {"__name__": "__main__"})
    finally:
        os.chdir(cwd)
    return len(blocks)


def launched_blocks(ctx: Any) -> dict[str, dict[str, Any]]:
    """A scenario of the shared launch (``tests/_distributed.py``): every page's blocks for this
    world size, page by page; per page, ``{"ran": n, "dir": where}`` or ``{"error": traceback}``."""
    import torch.distributed as dist

    out: dict[str, dict[str, Any]] = {}
    for page in PAGES:
        blocks = [b for b in python_blocks(page) if b.world == ctx.world]
        if not blocks:
            continue
        name = str(page.relative_to(DOCS))
        where = ctx.tmp / "docs" / name.removesuffix(".md").replace("/", "_")
        try:
            out[name] = {"ran": run_launched(blocks, where, ctx.rank, ctx.world), "dir": str(where)}
        except Exception:  # the page's test fails with it; the next page runs
            out[name] = {"error": traceback.format_exc()}
        dist.barrier()
    return out


SCENARIOS = {2: [launched_blocks]}


def launched_results(page: Path, expected: int, ranks: list[dict]) -> Path:
    """Where the ranks ran ``page``'s launched blocks; fails with a rank's traceback."""
    from tests._distributed import results

    name = str(page.relative_to(DOCS))
    for rank, seen in enumerate(results(ranks, __name__, launched_blocks)):
        if name not in seen:
            pytest.fail(f"{name}: the ranks ran none of its launched blocks", pytrace=False)
        if "error" in seen[name]:
            pytest.fail(f"{name}, rank {rank}:\n{seen[name]['error']}", pytrace=False)
        assert seen[name]["ran"] == expected, name
    return Path(seen[name]["dir"])


def test_the_runs_in_convention(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "```python\n# runs in: torchrun  --nproc-per-node 2\nx = 1\n```\n\n"
        "```python\nimport os\n# runs in: torchrun --nproc-per-node 2\n```\n\n"
        "```python\n# runs in: torchrun --nproc-per-node 3\n```\n"
    )
    launched, plain, unknown = python_blocks(page)
    assert launched.world == 2 and launched.needs == []
    assert plain.world is None  # a marker only on the first line
    with pytest.raises(ValueError, match="nproc-per-node 3' is not a launch the docs tests run"):
        _ = unknown.world
    page.write_text("```python\n# runs in: torchrun --nproc-per-node 2\nraise SystemExit\n```\n")
    assert run_page(page) == (0, [])  # not run in this process


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_run_launched_runs_each_block_as_a_script(tmp_path, monkeypatch):
    """On a 1-rank gloo group: torchrun's environment, the group taken as joined, a fresh
    namespace per block, the shared directory; a failing block raises with the page's line."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    page = tmp_path / "p.md"
    page.write_text(
        "```python\n# runs in: torchrun --nproc-per-node 1\nimport os\n"
        "import torch.distributed as dist\ndist.init_process_group()\n"
        "assert __name__ == '__main__' and dist.get_world_size() == 1\n"
        "open('seen.txt', 'w').write(os.environ['RANK'] + os.environ['WORLD_SIZE'])\n"
        "dist.destroy_process_group()\n```\n\n"
        "```python\n# runs in: torchrun --nproc-per-node 1\nassert 'os' not in dir()\n```\n\n"
        "```python\n# runs in: torchrun --nproc-per-node 1\nimport torch.distributed as dist\n"
        "dist.init_process_group('nccl')\n```\n"
    )
    monkeypatch.setitem(LAUNCHES, "torchrun --nproc-per-node 1", 1)
    first, second, nccl = python_blocks(page)
    rank_before, init_before = os.environ.get("RANK"), dist.init_process_group
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        assert run_launched([first, second], tmp_path / "ran", 0, 1) == 2
        assert dist.is_initialized()  # the block's destroy_process_group() left it alone
        assert (tmp_path / "ran" / "seen.txt").read_text() == "01"
        assert os.environ.get("RANK") == rank_before  # torchrun's environment, then gone
        assert dist.init_process_group is init_before
        with pytest.raises(ValueError, match="not on backend='nccl'") as failed:
            run_launched([nccl], tmp_path / "ran", 0, 1)
        (entry,) = [e for e in failed.traceback if str(e.path) == str(page)]
        assert entry.lineno + 1 == 19  # the page's line of the call (pytest counts from 0)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- the benchmark tables

# the CPU table: columns (header, impl, kernel); kernel None = the workload's polyak auto kernel
CPU_JSON = ["update_speed_cpu_2026-12-05c.json"]
CPU_COLUMNS = [
    ("polyak (auto kernel)", "polyak", None),
    ("raw `_foreach_lerp_`", "raw_foreach_lerp", "foreach"),
    ("torch_ema", "torch_ema", "loop"),
    ("ema-pytorch (foreach)", "ema_pytorch", "foreach"),
    ("timm ModelEmaV3", "timm_v3", "foreach"),
    ("AveragedModel", "swa_averaged_model", "foreach"),
]
GPU_JSON = ["update_speed_cuda_2026-12-04_large.json", "update_speed_cuda_2026-12-04_small.json"]
GPU_COLUMNS = [
    ("polyak `triton`", "polyak", "triton"),
    ("polyak `foreach`", "polyak", "foreach"),
    ("raw `_foreach_lerp_`", "raw_foreach_lerp", "foreach"),
    ("torch_ema", "torch_ema", "loop"),
    ("ema-pytorch (foreach)", "ema_pytorch", "foreach"),
    ("timm ModelEmaV3", "timm_v3", "foreach"),
    ("AveragedModel", "swa_averaged_model", "foreach"),
]


def _cell(rows: list[dict], impl: str, kernel: str | None) -> str:
    row = next((r for r in rows if r["impl"] == impl and r["kernel"] == kernel), None)
    if row is None:
        return "–"
    if row["status"] == "failed":
        return "fails"
    text = fmt_ms(row["ms_median"])
    return text if row["eligible"] else text + "†"


def fmt_ms(ms: float) -> str:
    """Three significant digits, trailing zeros kept (``0.109``, ``7.10``, ``43.0``, ``192``)."""
    return f"{ms:#.3g}".rstrip(".")


def benchmark_table(names: list[str], columns: list[tuple[str, str, str | None]]) -> list[str]:
    """The markdown table of ``bench/results/<name>`` for each of ``names``: one row per
    workload, milliseconds per update (median), † where a row failed the value check or tracks
    another set of tensors than the workload's."""
    lines = [
        "| workload | " + " | ".join(h for h, _, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for name in names:
        result = json.loads((RESULTS / name).read_text())
        auto = {w["name"]: w["polyak_auto_kernel"] for w in result["workloads"]}
        for w in result["workloads"]:
            rows = [r for r in result["rows"] if r["workload"] == w["name"]]
            cells = [_cell(rows, impl, kernel or auto[w["name"]]) for _, impl, kernel in columns]
            lines.append(f"| `{w['name']}` | " + " | ".join(cells) + " |")
    return lines


def recorded_ms(name: str, workload: str, impl: str, kernel: str) -> str:
    result = json.loads((RESULTS / name).read_text())
    (row,) = [
        r
        for r in result["rows"]
        if (r["workload"], r["impl"], r["kernel"]) == (workload, impl, kernel)
    ]
    return fmt_ms(row["ms_median"])


# numbers quoted in the prose of a page: (page, what, result file, workload, impl, kernel)
QUOTED = [
    ("bf16.md", "foreach", CPU_JSON[0], "bf16", "polyak", "foreach"),
    ("bf16.md", "fused", CPU_JSON[0], "bf16", "polyak", "fused"),
    ("bf16.md", "fastest peer", CPU_JSON[0], "bf16", "ema_pytorch", "loop"),
    ("bf16.md", "slowest peer", CPU_JSON[0], "bf16", "ema_pytorch", "foreach"),
    ("bf16.md", "stochastic rounding", CPU_JSON[0], "bf16_native", "polyak", "fused+SR"),
    ("bf16.md", "timm V3 stochastic", CPU_JSON[0], "bf16_native", "timm_v3", "foreach+SR"),
    ("benchmarks.md", "stochastic rounding", CPU_JSON[0], "bf16_native", "polyak", "fused+SR"),
    ("benchmarks.md", "timm V3 stochastic", CPU_JSON[0], "bf16_native", "timm_v3", "foreach+SR"),
    ("benchmarks.md", "bf16 fused", CPU_JSON[0], "bf16", "polyak", "fused"),
]


# docs/distributed.md's costs: the ratios of bench/sharded_speed.py's one run, and rank 0's rows
SHARDED_JSON = "sharded_speed_cpu_2026-12-05b.json"
SHARDED_ROWS = {
    "unsharded": "unsharded",
    "sharded": "sharded",
    "sharded floor": "floor",
    "to_local per update": "`to_local` per update",
}


def test_distributed_page_quotes_the_recorded_sharded_speed():
    page = " ".join((DOCS / "distributed.md").read_text().split())  # prose wraps anywhere
    result = json.loads((RESULTS / SHARDED_JSON).read_text())
    assert f"`bench/results/{SHARDED_JSON}`" in page
    for name, (ratio, lo, hi) in result["ratios"].items():
        quoted = f"{ratio:.3f} [{lo:.3f}, {hi:.3f}]"
        assert quoted in page, f"distributed.md lacks {name} = {quoted}"
    for row in result["rows"]:
        quoted = f"{SHARDED_ROWS[row['row']]} {row['ms_rank0']:.3g} ms"
        assert quoted in page, f"distributed.md lacks rank 0's {quoted!r}"
    assert f"{result['model']['elements']:,} fp32 weights in {result['model']['tensors']}" in page
    assert result["world"] == 2 and result["machine"]["cpu_cores"] == 2
    # a quiet run, and the page says so
    assert result["load"]["loaded"] is False and "not loaded" in page


@pytest.mark.parametrize(("names", "columns"), [(CPU_JSON, CPU_COLUMNS), (GPU_JSON, GPU_COLUMNS)])
def test_benchmark_tables_are_the_recorded_numbers(names, columns):
    page = (DOCS / "benchmarks.md").read_text()
    table = "\n".join(benchmark_table(names, columns))
    assert table in page, f"docs/benchmarks.md lacks the table of {names}; expected:\n{table}"


def test_readme_cpu_table_is_the_recorded_run():
    """The README's CPU update-speed table is the same recorded run as docs/benchmarks.md's."""
    readme = (ROOT / "README.md").read_text()
    assert "\n".join(benchmark_table(CPU_JSON, CPU_COLUMNS)) in readme
    assert f"`bench/results/{CPU_JSON[0]}`" in readme


@pytest.mark.parametrize(("page", "what", "name", "workload", "impl", "kernel"), QUOTED)
def test_quoted_timings_are_the_recorded_numbers(page, what, name, workload, impl, kernel):
    ms = recorded_ms(name, workload, impl, kernel)
    assert f"{ms} ms" in (DOCS / page).read_text(), f"{page} quotes {what} as other than {ms} ms"


# ---------------------------------------------------------------- the site builds


def test_mkdocs_build_strict(tmp_path):
    """``mkdocs build --strict``: every page, the API reference rendered from the docstrings
    without a warning, every internal link resolved."""
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[docs]')")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "ema" / "index.html").exists()
    html = (tmp_path / "site" / "api" / "ema" / "index.html").read_text()
    assert "update_every" in html and ":class:" not in html and ".. math::" not in html
    shutil.rmtree(tmp_path / "site")


# ---------------------------------------------------------------- the docstring rewriter


def _rst():
    if importlib.util.find_spec("griffe") is None:
        pytest.skip("griffe is not installed (pip install -e '.[docs]')")
    spec = importlib.util.spec_from_file_location(
        "_rst_docstrings", DOCS / "_ext" / "rst_docstrings.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.to_markdown


def test_rst_roles_and_math_become_markdown():
    to_markdown = _rst()
    assert to_markdown("see :class:`~polyak.EMA` and :meth:`update`") == (
        "see `polyak.EMA` and `update`"
    )
    assert to_markdown("with :math:`d^k` per step") == "with $d^k$ per step"
    block = "Then\n\n.. math:: s = a\n          + b\n\nafter"
    assert to_markdown(block) == "Then\n\n$$\ns = a\n+ b\n$$\n\nafter"
    nested = "Args:\n    x: the value\n\n        .. math::\n\n            y = x^2\n\n    z: more"
    assert to_markdown(nested) == (
        "Args:\n    x: the value\n\n        $$\n        y = x^2\n        $$\n\n    z: more"
    )
    assert to_markdown("The stream::\n\n    code here") == "The stream:\n\n    code here"


def test_rst_simple_table_becomes_a_markdown_table():
    to_markdown = _rst()
    table = (
        "Intro\n\n"
        "=======  ==========\n"
        "left     right side\n"
        "=======  ==========\n"
        "``a``    one\n"
        "b        two words\n"
        "=======  ==========\n\n"
        "After"
    )
    assert to_markdown(table) == (
        "Intro\n\n| left | right side |\n|---|---|\n| ``a`` | one |\n| b | two words |\n\nAfter"
    )


def test_rst_math_directive_with_two_equations_and_text_after():
    to_markdown = _rst()
    text = ".. math::\n    a = 1,\n\n    b = 2\n\nwith :math:`t` steps"
    assert to_markdown(text) == "$$\na = 1,\n$$\n\n$$\nb = 2\n$$\n\nwith $t$ steps"
