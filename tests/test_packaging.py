"""The built wheel: it holds every package and the shipped suites, and its console script runs a closed loop.

The wheel is built from a copy of the sources (so that no ``build/`` folder, stale or new, is written into the
checkout), installed into a fresh virtual environment, and run from a folder outside the checkout. The fresh
environment sees the heavy dependencies (torch, open3d, the devkit, ...) through a ``.pth`` line that appends
this environment's site-packages to ``sys.path``: a plain path line, so the ``.pth`` files there (the editable
install's import hook among them) are not processed and ``bevjepa`` resolves to the installed wheel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]


def _setuptools_config() -> dict:
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def _clean_env() -> dict[str, str]:
    """The environment for the fresh venv's processes: nothing that points back at this checkout or venv."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INDEX"] = "1"  # the build and the install need no network
    return env


def _run(args: list[str | Path], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=1800
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result


class Installed:
    """A wheel built from the sources and installed into a fresh venv."""

    def __init__(self, source: Path, wheel: Path, venv: Path, python: Path, site_packages: Path) -> None:
        self.source = source  # the copy of the sources the wheel was built from
        self.wheel = wheel
        self.venv = venv
        self.python = python
        self.site_packages = site_packages
        self.bevjepa = venv / "bin" / "bevjepa"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("packaging")
    # The build's inputs only: the files at the root (pyproject.toml, README.md) and the mapped package folders.
    source = work / "source"
    source.mkdir()
    for path in REPO_ROOT.iterdir():
        if path.is_file():
            shutil.copy2(path, source / path.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in sorted(set(_setuptools_config().get("package-dir", {}).values())):
        shutil.copytree(REPO_ROOT / folder, source / folder, ignore=ignore)

    wheelhouse = work / "wheelhouse"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheelhouse, source], cwd=work)
    (wheel,) = wheelhouse.glob("bevjepa-*.whl")

    venv = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=work)
    python = venv / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=work).stdout.strip()
    site_packages = Path(purelib)
    ours = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])  # ordered, no repeats
    (site_packages / "_bevjepa_test_dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    _run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], cwd=work)
    return Installed(source, wheel, venv, python, site_packages)


def test_wheel_holds_every_package_and_the_suites(installed: Installed) -> None:
    setuptools = _setuptools_config()
    names = set(zipfile.ZipFile(installed.wheel).namelist())

    for package in setuptools["packages"]:
        assert f"{package.replace('.', '/')}/__init__.py" in names, f"{package} is missing from the wheel"
    # Every module under every mapped folder, whether or not its package is listed (an unlisted one is left out).
    for package, folder in setuptools.get("package-dir", {}).items():
        root = installed.source / folder
        for module in sorted(root.rglob("*.py")):
            member = "/".join((*package.split("."), *module.relative_to(root).parts))
            assert member in names, f"{folder}/{module.relative_to(root)} is missing from the wheel (as {member})"

    suites = sorted(p.name for p in (installed.source / "evaluation" / "closed_loop" / "suites").glob("*.toml"))
    assert "ci.toml" in suites
    for suite in suites:
        assert f"bevjepa/evaluation/closed_loop/suites/{suite}" in names, f"suite {suite} is missing from the wheel"

    top = {name.split("/")[0] for name in names}
    stray = sorted(t for t in top if t != "bevjepa" and not (t.startswith("bevjepa-") and t.endswith(".dist-info")))
    assert not stray, f"unexpected top-level entries in the wheel: {stray}"


def test_installed_package_is_the_wheel(installed: Installed, tmp_path: Path) -> None:
    """Every package imports from the fresh venv's site-packages, not from the checkout."""
    packages = _setuptools_config()["packages"]
    script = (
        "import importlib, json, sys\n"
        f"print(json.dumps({{p: importlib.import_module(p).__file__ for p in {packages!r}}}))\n"
    )
    files = json.loads(_run([installed.python, "-c", script], cwd=tmp_path).stdout.strip().splitlines()[-1])
    for package, file in files.items():
        assert Path(file).resolve().is_relative_to(installed.site_packages.resolve()), (
            f"{package} imports from {file}, not from the installed wheel in {installed.site_packages}"
        )


def _cv_forecast(installed: Installed, cwd: Path) -> str:
    """The constant-velocity forecast source's name, as ``bevjepa closed-loop --help`` lists it."""
    help_text = _run([installed.bevjepa, "closed-loop", "--help"], cwd=cwd).stdout
    match = re.search(r"--forecast\s+\{([^}]*)\}", help_text)
    assert match, f"no --forecast choices in:\n{help_text}"
    choices = [c.strip() for c in match.group(1).split(",")]
    for name in ("cv", "constant_velocity", "constant-velocity"):
        if name in choices:
            return name
    pytest.fail(f"no constant-velocity forecast source among {choices}")


def _run_suite(installed: Installed, suite: str, cwd: Path) -> None:
    """``bevjepa closed-loop --suite SUITE`` with the installed console script, from outside the checkout."""
    forecast = _cv_forecast(installed, cwd)
    out = cwd / "out"
    _run(
        [installed.bevjepa, "closed-loop", "--suite", suite, "--forecast", forecast, "--workers", "1", "--out", out],
        cwd,
    )

    suite_file = installed.site_packages / "bevjepa" / "evaluation" / "closed_loop" / "suites" / f"{suite}.toml"
    with open(suite_file, "rb") as f:
        scenarios = tomllib.load(f)["scenario"]
    expected = {f"{s['name']}/{seed}" for s in scenarios for seed in s["seeds"]}

    report = json.loads((out / "metrics.json").read_text())
    assert report["suite"] == suite
    assert report["forecast"] == forecast
    assert report["failed"] == []
    assert {e["episode_id"] for e in report["episodes"]} == expected
    assert report["aggregate"]["episodes"] == len(expected)


def test_installed_cli_runs_a_shipped_suite(installed: Installed, tmp_path: Path) -> None:
    assert not tmp_path.resolve().is_relative_to(REPO_ROOT)
    _run_suite(installed, "smoke", tmp_path)


@pytest.mark.slow
def test_installed_cli_runs_the_ci_suite(installed: Installed, tmp_path: Path) -> None:
    assert not tmp_path.resolve().is_relative_to(REPO_ROOT)
    _run_suite(installed, "ci", tmp_path)
