"""Module tests run on slicer-core: the real MRML scene, volume, segmentation, table and subject-hierarchy nodes,
storage nodes and segmentation logic, without the Qt application (which cannot be installed here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "CrossModalSeg"))  # where Slicer puts a scripted module's folder
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: trains a model for a while (still CPU, still part of the suite)")


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real test data {path} is not here (tests expect ../shared/data beside the checkout)")
    return path


def make_scene():
    """A scene set up as the Slicer application sets it up: colour tables and the subject hierarchy."""
    import slicer

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():  # the Segmentations module registers these at application start-up
        for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                     slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
            factory.RegisterConverterRule(rule())
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    hierarchy = slicer.vtkSlicerSubjectHierarchyModuleLogic()
    hierarchy.SetMRMLScene(scene)
    scene._keep = (colors, hierarchy)  # the logics live as long as the scene
    return scene
