"""What users install: the sdist and the wheel ``python -m build`` makes from this tree.

One build (a copy of the tree, so that the checkout gets no build files), then: ``twine check``
accepts both; the wheel holds the package, ``py.typed`` and the licence, and nothing else; the
sdist holds what a user building or testing from it needs (tests, docs, licence, changelog) and
no junk; the metadata says what pyproject.toml says. Last, the wheel is installed into a fresh
virtual environment (no pip, no network: its dependencies, torch among them, are the ones this
interpreter sees, appended to the new environment's path) and the README's tour runs there,
outside the source tree, with ``python -I`` so that neither ``src/`` nor ``PYTHONPATH`` is seen.

Needs ``build`` and ``twine`` (the test extra) and setuptools >= 77 in this environment
(``--no-isolation``: nothing is downloaded).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import polyak
from tests.test_readme import tour_script

ROOT = Path(__file__).resolve().parents[1]
# never copied into the build: environments, build output, caches, version control
_NOT_SOURCE = (".venv", "venv", "build", "dist", ".git", "site", "polyak-demo", ".hypothesis")


def _missing() -> str | None:
    for module in ("build", "twine", "setuptools"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[test]')"
    from importlib.metadata import version

    if int(version("setuptools").split(".")[0]) < 77:
        return f"setuptools {version('setuptools')} is older than 77 (PEP 639 licence metadata)"
    return None


def _run(*args: str | Path, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{args}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    why = _missing()
    if why:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("packaging")
    tree = tmp / "tree"
    shutil.copytree(
        ROOT, tree, ignore=shutil.ignore_patterns(*_NOT_SOURCE, "*.egg-info", ".*_cache")
    )
    # junk a checkout gathers, which the sdist must leave out wherever it lies
    for junk in ("src/polyak/__pycache__/ema.cpython-311.pyc", "bench/results/plot.png"):
        (tree / junk).parent.mkdir(parents=True, exist_ok=True)
        (tree / junk).write_bytes(b"junk")
    out = tmp / "dist"
    # sdist first, then the wheel built from the unpacked sdist: a file the sdist lacks fails here
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, tree, timeout=300)
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist, "tmp": tmp}


def test_twine_accepts_both(dist):
    done = _run(sys.executable, "-m", "twine", "check", "--strict", dist["wheel"], dist["sdist"])
    assert done.stdout.count("PASSED") == 2


def test_wheel_holds_the_package_and_nothing_else(dist):
    names = zipfile.ZipFile(dist["wheel"]).namelist()
    version = polyak.__version__
    assert dist["wheel"].name == f"polyak-{version}-py3-none-any.whl"
    source = {
        str(p.relative_to(ROOT / "src"))
        for p in (ROOT / "src" / "polyak").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")
    }
    package = {n for n in names if n.startswith("polyak/")}
    assert package == source  # every module, py.typed included, and nothing else
    assert "polyak/py.typed" in package
    info = {n.split("/", 1)[1] for n in names if n.startswith(f"polyak-{version}.dist-info/")}
    assert {"METADATA", "WHEEL", "RECORD", "entry_points.txt", "licenses/LICENSE"} <= info
    assert not [
        n for n in names if n.split("/")[0] not in ("polyak", f"polyak-{version}.dist-info")
    ]


def test_metadata_says_what_pyproject_says(dist):
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        meta = Parser().parsestr(
            wheel.read(f"polyak-{polyak.__version__}.dist-info/METADATA").decode()
        )
    assert meta["Name"] == "polyak" and meta["Version"] == polyak.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Requires-Python"] == ">=3.10"
    assert "Typing :: Typed" in meta.get_all("Classifier")
    assert set(meta.get_all("Provides-Extra")) >= {"demo", "docs", "test"}
    requires = meta.get_all("Requires-Dist")
    assert {r for r in requires if "extra ==" not in r} == {
        "torch>=2.3",
        "numpy",
        "safetensors>=0.4",
    }
    assert 'mkdocs-material==9.8.2; extra == "docs"' in requires
    assert 'mkdocs-material==9.8.2; extra == "test"' in requires  # CI builds the docs too
    assert meta.get_payload().startswith("# polyak")  # the README is the long description


def test_sdist_holds_what_users_expect_and_no_junk(dist):
    with tarfile.open(dist["sdist"]) as sdist:
        names = [n.split("/", 1)[1] for n in sdist.getnames() if "/" in n]
    for expected in (
        "LICENSE",
        "README.md",
        "CHANGELOG.md",
        "pyproject.toml",
        "MANIFEST.in",
        "mkdocs.yml",
        "src/polyak/__init__.py",
        "src/polyak/py.typed",
        "tests/conftest.py",
        "tests/test_packaging.py",
        "tests/fixtures/tf_reference.json",
        "docs/index.md",
        "docs/_ext/rst_docstrings.py",
        "bench/update_speed.py",
        "bench/results/update_speed_cpu_2026-12-04.json",
    ):
        assert expected in names, f"the sdist lacks {expected}"
    junk = [
        n
        for n in names
        if "__pycache__" in n
        or n.endswith((".pyc", ".png"))
        or n.split("/")[0] in (".venv", "build", "dist", ".git", ".ci")
    ]
    assert not junk, junk


def test_wheel_installs_in_a_fresh_venv_and_runs_the_readme_tour(dist):
    tmp = dist["tmp"]
    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    # the dependencies (torch, numpy, safetensors) are this interpreter's: a path appended
    # after the new environment's own, where the wheel goes
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site.stdout.strip(), "zz_test_dependencies.pth").write_text("\n".join(ours) + "\n")
    _run(
        sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        "--no-cache-dir", "--disable-pip-version-check", "--ignore-installed", dist["wheel"],
        timeout=300,
    )  # fmt: skip
    work = tmp / "tour"
    work.mkdir()
    script = work / "tour.py"
    script.write_text(
        "import sys, pathlib, importlib.resources\n"
        "import polyak\n"
        f"assert pathlib.Path(polyak.__file__).is_relative_to(pathlib.Path(sys.prefix)), "
        f"polyak.__file__\n"
        f"assert polyak.__version__ == {polyak.__version__!r}\n"
        "assert importlib.resources.files('polyak').joinpath('py.typed').is_file()\n"
        + tour_script()
        + "\nprint('tour ran with', polyak.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = _run(python, "-I", script, cwd=work, env=env, timeout=300)
    assert "tour ran with" in done.stdout and str(ROOT / "src") not in done.stdout
    version = _run(venv / "bin" / "polyak", "--version", cwd=work, env=env, timeout=120)
    assert version.stdout.strip() == f"polyak {polyak.__version__}"
