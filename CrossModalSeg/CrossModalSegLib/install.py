"""What *Install backend* puts into Slicer's Python, decided without Qt (so it is tested outside the application).

Only what is missing or too old is installed, with `slicer.util.pip_install` (present in every Slicer 5.x; the
newer `slicer.packaging` exists only from 5.12); Slicer's own packages are never replaced, and PyTorch is left to
the PyTorch extension when it is already importable.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

BACKEND_PYTHON = (3, 10)  # backend/pyproject.toml's requires-python; Slicer ships 3.9 up to 5.8 and 3.12 from 5.10
SLICER_OWNED = frozenset({"simpleitk", "requests", "numpy"})  # never replaced: Slicer itself depends on them
SHIPPED_BACKEND = "CrossModalSegBackend"  # the folder the extension's build puts beside the module (CMakeLists.txt)


def python_too_old(version_info: tuple[int, ...] = tuple(sys.version_info)) -> str | None:
    """Why the backend cannot be installed into this Python (and what to do instead), or None when it can."""
    if tuple(version_info[:2]) >= BACKEND_PYTHON:
        return None
    have, need = ".".join(map(str, version_info[:2])), ".".join(map(str, BACKEND_PYTHON))
    return (f"the backend needs Python {need} or later and this Slicer's Python is {have} (Slicer 5.10 and later ship "
            f"3.12). With this Slicer: install crossmodalseg into a Python {need}+ of your own and enter that Python "
            f"under Python (Local), or connect to a Remote GPU server")


def backend_source(module_dir: Path) -> Path | None:
    """The crossmodalseg package to install: the copy a built extension ships beside the module, else the
    repository's backend/ when the module runs from a source checkout; None when neither is there."""
    for candidate in (Path(module_dir) / SHIPPED_BACKEND, Path(module_dir).parent / "backend"):
        if (candidate / "pyproject.toml").is_file() and (candidate / "crossmodalseg").is_dir():
            return candidate
    return None


def read_requirements(path: Path) -> list[str]:
    """The requirement lines of a requirements file (comments and blank lines dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]


def _satisfied(requirement: str) -> bool:
    try:
        installed = importlib.metadata.version(_name(requirement))
    except importlib.metadata.PackageNotFoundError:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:  # no `packaging`: present is good enough
        return True
    return Requirement(requirement).specifier.contains(installed, prereleases=True)


def missing_requirements(requirements: Iterable[str], skip: Iterable[str] = SLICER_OWNED) -> list[str]:
    """The requirements that are not installed, or installed in a version the specifier refuses; never those whose
    (case-insensitive) name is in `skip`."""
    skipped = {s.lower() for s in skip}
    return [r for r in requirements if _name(r).lower() not in skipped and not _satisfied(r)]


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def install_backend(requirements: list[str], backend: Path | None, pip_install: Callable[[list[str]], None]
                    ) -> list[str]:
    """Installs the missing requirements in one pip call, then the backend package itself without dependencies
    (so pip never touches Slicer's packages); returns what was installed."""
    missing = missing_requirements(requirements)
    if missing:
        pip_install(missing)
    if backend is not None and backend.exists():
        pip_install(["--no-deps", str(backend)])
    return missing
