"""Extension-index readiness (issue 12, 10): a license file, a catalog entry that Slicer's ExtensionsIndex schema
accepts and that agrees with the extension's CMake metadata, one minimum Slicer version everywhere."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The keys the catalog-entry schema v1.0.1 allows (it has "additionalProperties": false) and the ones it requires.
CATALOG_KEYS = {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision", "scm_type",
                "scm_url", "tier"}
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}


def cmake_setting(name: str) -> str:
    match = re.search(rf'set\({name} "([^"]*)"\)', (ROOT / "CMakeLists.txt").read_text())
    assert match, f"CMakeLists.txt sets no {name}"
    return match.group(1)


def test_the_extension_has_a_license_the_backend_package_names_too():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License") and "Redistribution and use" in text
    assert 'license = "BSD-3-Clause"' in (ROOT / "backend" / "pyproject.toml").read_text()


def test_the_catalog_entry_fits_the_index_schema_and_the_cmake_metadata():
    entry = json.loads((ROOT / "CrossModalSeg.json").read_text())
    assert CATALOG_REQUIRED <= set(entry) <= CATALOG_KEYS, set(entry) ^ CATALOG_KEYS
    assert "slicer-extension-catalog-entry-schema" in entry["$schema"]
    assert entry["category"] == cmake_setting("EXTENSION_CATEGORY")
    assert entry["build_dependencies"] == cmake_setting("EXTENSION_DEPENDS").split()
    assert entry["scm_url"].startswith("https://") and entry["tier"] in (1, 3, 5)
    homepage = cmake_setting("EXTENSION_HOMEPAGE")
    assert homepage.startswith(entry["scm_url"].removesuffix(".git"))


def test_one_minimum_slicer_version_in_cmake_and_readme():
    required = re.search(r'Slicer_VERSION VERSION_LESS "([\d.]+)"', (ROOT / "CMakeLists.txt").read_text()).group(1)
    assert f"Slicer {required} or later" in (ROOT / "README.md").read_text()


def test_the_built_module_ships_every_python_file_and_resource_of_the_source():
    """slicerMacroBuildScriptedModule copies and installs only the files CMakeLists.txt lists: a module file left
    out works from a source checkout and fails to import in a built or installed extension."""
    module = ROOT / "CrossModalSeg"
    text = (module / "CMakeLists.txt").read_text()

    def listed(variable: str) -> set[str]:
        block = re.search(rf"set\({variable}\n(.*?)\)", text, re.S).group(1)
        return {line.strip().replace("${MODULE_NAME}", "CrossModalSeg") for line in block.splitlines() if line.strip()}

    on_disk = {p.relative_to(module).as_posix() for p in module.rglob("*.py") if "__pycache__" not in p.parts}
    assert listed("MODULE_PYTHON_SCRIPTS") == on_disk
    resources = {p.relative_to(module).as_posix() for p in (module / "Resources").rglob("*") if p.is_file()}
    assert listed("MODULE_PYTHON_RESOURCES") == resources
