"""The docs site: every ```python block of every page runs, in order, page by page; the
benchmark tables equal the recorded JSON; ``mkdocs build --strict`` passes (where mkdocs is
installed).

A block whose first line is ``# requires: <what>[, <what>...]`` runs only where each need is
met, and is skipped otherwise: ``cuda`` (a CUDA device), a module name (importable), or
``<module><N`` (importable, and its distribution's major version below N: TensorFlow 1.x code
shown for comparison is ``# requires: tensorflow<2``). The blocks of a page share one namespace
and run in a fresh temporary directory, so files they write vanish with it.
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
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

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
        assert str(page.relative_to(DOCS)) in nav, f"{page} is not in mkdocs.yml's nav"
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
def test_page_code_runs(page, tmp_path, monkeypatch):
    if not python_blocks(page):
        pytest.skip("no python blocks")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ran, skipped = run_page(page)
    if not ran:
        pytest.skip(f"every block needs what is missing here: {skipped}")


# ---------------------------------------------------------------- the benchmark tables

# the CPU table: columns (header, impl, kernel); kernel None = the workload's polyak auto kernel
CPU_JSON = ["update_speed_cpu_2026-12-04.json"]
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


@pytest.mark.parametrize(("names", "columns"), [(CPU_JSON, CPU_COLUMNS), (GPU_JSON, GPU_COLUMNS)])
def test_benchmark_tables_are_the_recorded_numbers(names, columns):
    page = (DOCS / "benchmarks.md").read_text()
    table = "\n".join(benchmark_table(names, columns))
    assert table in page, f"docs/benchmarks.md lacks the table of {names}; expected:\n{table}"


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
