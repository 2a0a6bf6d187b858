"""The import arrows of ARCHITECTURE.md, checked statically over every module of the package.

``tools → evaluation → prediction → fusion → perception → datasets``; ``sim → datasets``; ``evaluation → sim``;
inside evaluation ``report → closed_loop → (open-loop modules)``; nothing imports ``tools``. The arrows are
transitive, and a package may always import itself. Every ``import`` / ``from ... import`` is read with ``ast``
(top level, inside functions, under ``if TYPE_CHECKING``), relative imports are resolved, and
``importlib.import_module("bevjepa....")`` with a literal name counts too.

Also here: every folder holding ``.py`` files is listed in pyproject's ``packages`` (a subpackage missing from
the list still imports in an editable install but is silently left out of a built wheel).
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]
ROOT_PACKAGE = "bevjepa"

# The layers, each a package prefix; a module belongs to the longest prefix it starts with.
TOOLS = "bevjepa.tools"
REPORT = "bevjepa.evaluation.report"
CLOSED_LOOP = "bevjepa.evaluation.closed_loop"
OPEN_LOOP = "bevjepa.evaluation"  # evaluation/*.py directly in evaluation/ (and its __init__)
PREDICTION = "bevjepa.prediction"
FUSION = "bevjepa.fusion"
PERCEPTION = "bevjepa.perception"
SIM = "bevjepa.sim"
DATASETS = "bevjepa.datasets"
LAYERS = (TOOLS, REPORT, CLOSED_LOOP, OPEN_LOOP, PREDICTION, FUSION, PERCEPTION, SIM, DATASETS)

# The arrows as ARCHITECTURE.md draws them (direct ones only; the closure below makes them transitive).
ARROWS: dict[str, set[str]] = {
    TOOLS: {REPORT, CLOSED_LOOP, OPEN_LOOP},  # tools → evaluation
    REPORT: {CLOSED_LOOP},  # report → closed_loop
    CLOSED_LOOP: {OPEN_LOOP},  # closed_loop → open-loop modules
    OPEN_LOOP: {PREDICTION, SIM},  # evaluation → prediction, evaluation → sim
    PREDICTION: {FUSION},
    FUSION: {PERCEPTION},
    PERCEPTION: {DATASETS},
    SIM: {DATASETS},
    DATASETS: set(),
}


def _closure(arrows: dict[str, set[str]]) -> dict[str, set[str]]:
    """Everything each layer may reach by following arrows."""
    reach: dict[str, set[str]] = {}
    for start in arrows:
        seen: set[str] = set()
        todo = list(arrows[start])
        while todo:
            layer = todo.pop()
            if layer not in seen:
                seen.add(layer)
                todo.extend(arrows[layer])
        reach[start] = seen
    return reach


ALLOWED = _closure(ARROWS)


def _pyproject_setuptools() -> dict:
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def _package_folder(package: str, package_dir: dict[str, str]) -> Path:
    """The folder setuptools takes ``package`` from: the longest mapped prefix, then the remaining names."""
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in package_dir:
            return REPO_ROOT / package_dir[prefix] / Path(*parts[cut:])
    return REPO_ROOT / Path(*parts)


def _mapped_roots() -> dict[Path, str]:
    """Each folder named in ``[tool.setuptools.package-dir]`` (or listed top-level package) → its package name."""
    setuptools = _pyproject_setuptools()
    package_dir = setuptools.get("package-dir", {})
    roots = {REPO_ROOT / folder: package for package, folder in package_dir.items()}
    for package in setuptools["packages"]:
        folder = _package_folder(package, package_dir)
        if not any(folder == root or root in folder.parents for root in roots):
            roots[folder] = package
    return roots


def _python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


@dataclasses.dataclass(frozen=True)
class Module:
    name: str  # e.g. bevjepa.sim.world
    path: Path
    is_package: bool  # an __init__.py


def _modules() -> dict[str, Module]:
    """Every module of the package, found under the mapped folders (not through the import system)."""
    modules: dict[str, Module] = {}
    for root, package in _mapped_roots().items():
        for path in _python_files(root):
            rel = path.relative_to(root).with_suffix("").parts
            is_package = rel[-1] == "__init__"
            name = ".".join((package, *(rel[:-1] if is_package else rel)))
            modules[name] = Module(name, path, is_package)
    return modules


def _layer(module: str) -> str | None:
    """The layer of a ``bevjepa.*`` module; ``None`` for the root package ``bevjepa`` itself."""
    for layer in sorted(LAYERS, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def _imports(module: Module, known: set[str]) -> list[tuple[int, str]]:
    """``(line, imported bevjepa module)`` for every import of the package in ``module``, at any depth."""
    tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from ..y import z
                base_parts = package.split(".")
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                # `from bevjepa.sim import world` imports the module bevjepa.sim.world; `from x import name`, x.
                found.append((node.lineno, submodule if submodule in known else source))
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in {"import_module", "__import__"})
            )
        ):
            found.append((node.lineno, node.args[0].value))
    return sorted((line, name) for line, name in found if name == ROOT_PACKAGE or name.startswith(ROOT_PACKAGE + "."))


def _violations() -> list[str]:
    modules = _modules()
    known = set(modules)
    violations = []
    for module in sorted(modules.values(), key=lambda m: m.name):
        source_layer = _layer(module.name)
        for line, target in _imports(module, known):
            target_layer = _layer(target)
            if target_layer is None:  # the root package `bevjepa` (its __init__ imports nothing)
                continue
            if source_layer is None:
                ok = False  # the root package imports none of its subpackages
            else:
                ok = target_layer == source_layer or target_layer in ALLOWED[source_layer]
            if not ok:
                rel = module.path.relative_to(REPO_ROOT)
                violations.append(f"{module.name} ({rel}:{line}) imports {target}")
    return violations


def test_walk_finds_every_layer() -> None:
    """The static walk sees modules in every layer (so an empty walk cannot pass the arrow test)."""
    layers = {_layer(name) for name in _modules()}
    assert set(LAYERS) <= layers, f"no module found for {sorted(set(LAYERS) - layers)}"


def test_no_import_against_the_arrows() -> None:
    violations = _violations()
    assert not violations, "imports against the arrows of ARCHITECTURE.md:\n" + "\n".join(violations)


def test_no_bare_folder_imports() -> None:
    """Inside the package, the folders are imported as ``bevjepa.<folder>``, never bare (``import datasets``).

    A bare ``datasets`` resolves to the PyPI ``datasets`` package, or to the folder only when the repository root
    happens to be on ``sys.path``.
    """
    folders = {package.split(".")[1] for package in _pyproject_setuptools()["packages"] if package.count(".") == 1}
    found = []
    for module in _modules().values():
        tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in folders:
                    found.append(f"{module.name} ({module.path.relative_to(REPO_ROOT)}:{node.lineno}) imports {name}")
    assert not found, "bare folder imports (use bevjepa.<folder>):\n" + "\n".join(found)


def test_every_python_folder_is_a_listed_package() -> None:
    """Each folder holding ``.py`` files, under every package folder, is in ``[tool.setuptools] packages``."""
    setuptools = _pyproject_setuptools()
    listed = set(setuptools["packages"])
    modules = _modules()
    folders_with_code = {m.name if m.is_package else m.name.rpartition(".")[0] for m in modules.values()}
    missing = sorted(folders_with_code - listed)
    assert not missing, f"packages missing from pyproject's [tool.setuptools] packages (left out of a wheel): {missing}"
    package_dir = setuptools.get("package-dir", {})
    no_init = sorted(p for p in listed if not (_package_folder(p, package_dir) / "__init__.py").is_file())
    assert not no_init, f"listed packages without an __init__.py where package-dir maps them: {no_init}"


def test_every_package_folder_at_the_root_is_mapped() -> None:
    """A new top-level folder with an ``__init__.py`` is mapped in ``package-dir`` (else it is not installed)."""
    roots = set(_mapped_roots())
    unmapped = sorted(
        p.parent.name
        for p in REPO_ROOT.glob("*/__init__.py")
        if p.parent not in roots and not p.parent.name.startswith(".") and p.parent.name not in {"build", "dist"}
    )
    assert not unmapped, f"folders with an __init__.py not in [tool.setuptools.package-dir]: {unmapped}"


@pytest.mark.parametrize(
    ("importer", "imported", "ok"),
    [
        ("bevjepa.tools.cli", "bevjepa.evaluation.report.plots", True),
        ("bevjepa.evaluation.report.plots", "bevjepa.evaluation.closed_loop.runner", True),
        ("bevjepa.evaluation.closed_loop.runner", "bevjepa.evaluation.baselines", True),
        ("bevjepa.evaluation.metrics", "bevjepa.evaluation.closed_loop.runner", False),
        ("bevjepa.evaluation.closed_loop.runner", "bevjepa.evaluation.report.plots", False),
        ("bevjepa.evaluation.metrics", "bevjepa.sim.world", True),
        ("bevjepa.prediction.model", "bevjepa.datasets.geometry", True),
        ("bevjepa.prediction.model", "bevjepa.sim.world", False),
        ("bevjepa.datasets.windows", "bevjepa.perception.camera", False),
        ("bevjepa.datasets.windows", "bevjepa.prediction.model", False),
        ("bevjepa.sim.world", "bevjepa.datasets.types", True),
        ("bevjepa.sim.world", "bevjepa.evaluation.metrics", False),
        ("bevjepa.fusion.fuser", "bevjepa.perception.camera", True),
        ("bevjepa.perception.camera", "bevjepa.fusion.fuser", False),
        ("bevjepa.evaluation.report.plots", "bevjepa.tools.cli", False),
    ],
)
def test_arrow_table(importer: str, imported: str, ok: bool) -> None:
    """The closure of the arrows says what ARCHITECTURE.md says."""
    source, target = _layer(importer), _layer(imported)
    assert source is not None and target is not None
    assert (target == source or target in ALLOWED[source]) is ok


def test_relative_and_from_imports_resolve(tmp_path: Path) -> None:
    """The import reader resolves relative imports and ``from package import module`` to the module."""
    path = tmp_path / "probe.py"
    path.write_text(
        "from . import world\n"
        "from ..datasets import geometry\n"
        "def f():\n"
        "    from bevjepa.evaluation import metrics as m\n"
        "    import bevjepa.tools.cli\n"
        "    importlib.import_module('bevjepa.prediction.model')\n"
    )
    module = Module("bevjepa.sim.probe", path, is_package=False)
    known = {"bevjepa.sim.world", "bevjepa.datasets.geometry", "bevjepa.evaluation.metrics"}
    assert _imports(module, known) == [
        (1, "bevjepa.sim.world"),
        (2, "bevjepa.datasets.geometry"),
        (4, "bevjepa.evaluation.metrics"),
        (5, "bevjepa.tools.cli"),
        (6, "bevjepa.prediction.model"),
    ]
