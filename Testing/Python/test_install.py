"""What *Install backend* installs (issue 12: it called `slicer.packaging` without importing it, a module that
exists only from Slicer 5.12, re-ran the PyTorch installer when torch was there, and installed the demo's plotting
stack). The decisions run here against this Python's real installed packages."""

from __future__ import annotations

from pathlib import Path

import numpy

from CrossModalSegLib.install import (
    SHIPPED_BACKEND,
    backend_source,
    install_backend,
    missing_requirements,
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
    assert {"monai", "safetensors", "fastapi", "uvicorn", "python-multipart"} <= names
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
