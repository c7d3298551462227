"""What *Install backend* installs (issue 12: it called `slicer.packaging` without importing it, a module that
exists only from Slicer 5.12, re-ran the PyTorch installer when torch was there, and installed the demo's plotting
stack). The decisions run here against this Python's real installed packages."""

from __future__ import annotations

import re
from pathlib import Path

import numpy

from CrossModalSegLib.install import (
    BACKEND_PYTHON,
    SHIPPED_BACKEND,
    SLICER_OWNED,
    backend_source,
    install_backend,
    missing_requirements,
    python_too_old,
    read_requirements,
    torch_installed,
)

MODULE = Path(__file__).resolve().parents[2] / "CrossModalSeg"


def test_only_missing_or_too_old_packages_are_installed_and_slicers_own_never():
    wanted = [f"numpy=={numpy.__version__}", "numpy<0.1", "SimpleITK>=99", "safetensors>=0.1", "surely-not-a-package~=1.0",
              "safetensors>=999"]
    assert missing_requirements(wanted) == ["surely-not-a-package~=1.0", "safetensors>=999"]


def test_install_makes_one_pip_call_for_what_is_missing_then_the_backend_without_dependencies(tmp_path: Path):
    calls: list[list[str]] = []
    backend = tmp_path / "backend"
    backend.mkdir()
    installed = install_backend(["safetensors>=0.1", "surely-not-a-package~=1.0"], backend, calls.append)
    assert installed == ["surely-not-a-package~=1.0"]
    assert calls == [["surely-not-a-package~=1.0"], ["--no-deps", str(backend)]]
    calls.clear()
    assert install_backend(["safetensors>=0.1"], None, calls.append) == [] and calls == []


def test_the_modules_requirements_hold_what_the_backend_needs_and_not_the_plotting_stack():
    requirements = read_requirements(MODULE / "Resources" / "requirements.txt")
    names = {r.split("~")[0].split("=")[0].split(">")[0].lower() for r in requirements}
    pyproject = (Path(__file__).resolve().parents[2] / "backend" / "pyproject.toml").read_text()
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M).group(1)
    needed = {re.split(r"[<>=~ ]", d.strip().strip('",'))[0].lower() for d in dependencies.splitlines() if d.strip()}
    # everything the backend package needs, but torch (the PyTorch extension), Slicer's own packages and plotting:
    # "Install backend" installs the package itself with --no-deps
    assert needed - {"torch", "matplotlib"} - SLICER_OWNED <= names, needed - names
    assert "psutil" in names and "pydantic" in names
    assert "matplotlib" not in names and "torch" not in names and not names & {"numpy", "simpleitk"}
    assert torch_installed()  # here torch is installed: the PyTorch extension's installer is not run


def test_the_backend_to_install_is_the_shipped_copy_else_the_source_checkouts(tmp_path: Path):
    """Issue 12 (10): the backend shipped as a folder named `backend` on Slicer's module path (importable as
    `backend` by anything). It ships as CrossModalSegBackend; a module run from a checkout uses the repository's."""
    root = Path(__file__).resolve().parents[2]
    assert backend_source(root / "CrossModalSeg") == root / "backend"
    shipped = tmp_path / "modules" / SHIPPED_BACKEND
    (shipped / "crossmodalseg").mkdir(parents=True)
    (shipped / "pyproject.toml").write_text("[project]\nname = 'crossmodalseg'\n")
    assert backend_source(tmp_path / "modules") == shipped
    assert backend_source(tmp_path / "elsewhere") is None
    cmake = (root / "CrossModalSeg" / "CMakeLists.txt").read_text()
    assert f"/{SHIPPED_BACKEND})" in cmake and "/backend)" not in cmake.replace("../backend)", "")


def test_a_python_older_than_the_backend_needs_is_refused_with_what_to_do_instead():
    """Slicer up to 5.8 ships Python 3.9, which the backend (requires-python >= 3.10) cannot run: pip would fail on
    every pinned package without saying why. The module says so and points at the two ways that work."""
    import tomllib

    required = tomllib.loads((MODULE.parent / "backend" / "pyproject.toml").read_text())["project"]["requires-python"]
    assert required == ">=" + ".".join(map(str, BACKEND_PYTHON))
    message = python_too_old((3, 9, 10, "final", 0))
    assert message is not None and "Python 3.10 or later" in message and "3.9" in message
    assert "under Python (Local)" in message and "Remote GPU server" in message
    assert python_too_old((3, 10, 0)) is None and python_too_old((3, 12, 10)) is None
    assert python_too_old() is None  # this Python runs the backend (the tests here use it)


def test_the_module_itself_reads_as_python_3_9_for_slicer_5_8():
    """The module runs inside Slicer's own Python: 3.9 up to Slicer 5.8. Each file must parse with 3.9's grammar
    (no `match`, no 3.10+ syntax) and defer its annotations, so that `X | None` and `list[int]` hints are never
    evaluated there."""
    import ast

    files = sorted((MODULE).rglob("*.py"))
    assert len(files) >= 7
    for path in files:
        tree = ast.parse(path.read_text(), str(path), feature_version=(3, 9))
        imports = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
        has_code = any(not isinstance(n, (ast.Expr, ast.Import, ast.ImportFrom)) for n in tree.body)
        assert not has_code or any(a.name == "annotations" for n in imports for a in n.names), path
