"""MRML scene <-> files, with geometry kept: volumes are written by Slicer's own storage node (RAS in the scene,
LPS on disk), segmentations become label maps on the grid of their volume, and the backend's label maps come back
as segmentation nodes with one named, coloured segment per structure.

Uses only MRML classes (no Qt), so it runs in the Slicer application and on `slicer-core` alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk

from .terminology import terminology_entry

# Distinct, colour-blind-friendly segment colours (Okabe-Ito, then Tableau), by structure index.
PALETTE = [(0.902, 0.624, 0.0), (0.337, 0.706, 0.914), (0.0, 0.620, 0.451), (0.941, 0.894, 0.259),
           (0.0, 0.447, 0.698), (0.835, 0.369, 0.0), (0.800, 0.475, 0.655), (0.737, 0.741, 0.133),
           (0.090, 0.745, 0.812), (0.549, 0.337, 0.294)]
DISAGREEMENT_COLORS = "CrossModalSeg disagreement"  # the colour table's name (one per scene)
# Dark violet -> red -> orange -> pale yellow: brightness rises with disagreement (readable in grey levels too).
DISAGREEMENT_RAMP = [(0.0, (0.20, 0.05, 0.35)), (0.35, (0.60, 0.10, 0.40)), (0.65, (0.90, 0.35, 0.10)),
                     (1.0, (1.00, 0.95, 0.55))]
DISAGREEMENT_LEVELS = 256


class SceneError(ValueError):
    """A scene input that cannot be used; the message says what to change."""


def structure_color(index: int) -> tuple[float, float, float]:
    return PALETTE[index % len(PALETTE)]


def write_volume(node: slicer.vtkMRMLScalarVolumeNode, path: Path, compress: bool = True) -> Path:
    """Writes a scalar or label map volume (NRRD keeps its geometry in double precision); refuses a transformed
    volume, whose voxels would not be where the scene shows them. `compress=False` for a temporary copy that is
    sent at once: no gzip pass (seconds for a large CT on the thread that writes it)."""
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.GetImageData() is None:
        raise SceneError("select a loaded volume")
    if node.GetParentTransformNode() is not None:
        raise SceneError(f"volume {node.GetName()!r} is under a transform; harden the transform first (Data module, "
                         f"right-click > Harden transform) so that the backend sees what you see")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetScene(node.GetScene())
    storage.SetFileName(str(path))
    storage.SetUseCompression(1 if compress else 0)
    if not storage.WriteData(node):
        raise SceneError(f"could not write {node.GetName()!r} to {path}")
    return Path(path)


def segment_names(segmentation_node: slicer.vtkMRMLSegmentationNode) -> dict[str, str]:
    """segment id -> name."""
    s = segmentation_node.GetSegmentation()
    return {s.GetNthSegmentID(i): s.GetNthSegment(i).GetName() for i in range(s.GetNumberOfSegments())}


def write_segmentation(segmentation_node: slicer.vtkMRMLSegmentationNode,
                       reference_volume: slicer.vtkMRMLScalarVolumeNode, labels: dict[str, int], path: Path) -> Path:
    """The segmentation as a label map on `reference_volume`'s grid, with each segment written as the value of the
    structure of the same name (case-insensitive). Segments no structure names are refused, not silently dropped."""
    if segmentation_node is None:
        raise SceneError("select a segmentation")
    by_name = {name.lower(): name for name in labels if labels[name] != 0}
    ids, values, unknown = vtk.vtkStringArray(), [], []
    for segment_id, name in segment_names(segmentation_node).items():
        structure = by_name.get(name.strip().lower())
        if structure is None:
            unknown.append(name)
            continue
        ids.InsertNextValue(segment_id)
        values.append(labels[structure])
    if unknown:
        raise SceneError(f"segment(s) {', '.join(map(repr, unknown))} of {segmentation_node.GetName()!r} are not "
                         f"structures of this dataset ({', '.join(by_name.values())}); rename or delete them")
    scene = segmentation_node.GetScene()
    with scratch_nodes(scene):
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__crossmodalseg_export")
        if ids.GetNumberOfValues() == 0:  # an empty segmentation is a valid "nothing here" label
            labelmap.SetAndObserveImageData(_blank_like(reference_volume))
            labelmap.CopyOrientation(reference_volume)
        elif not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, reference_volume):
            raise SceneError(f"could not export {segmentation_node.GetName()!r} on {reference_volume.GetName()!r}")
        array = slicer.util.arrayFromVolume(labelmap)
        remapped = np.zeros(array.shape, dtype=np.uint16 if max(labels.values()) > 255 else np.uint8)
        for index, value in enumerate(values, start=1):  # exported in list order as 1, 2, ...
            remapped[array == index] = value
        slicer.util.updateVolumeFromArray(labelmap, remapped)
        return write_volume(labelmap, path)


@contextmanager
def scratch_nodes(scene: slicer.vtkMRMLScene, keep: tuple = ()) -> Iterator[list]:
    """Removes every node added to `scene` inside the block except those in `keep` (checked at the end): the
    temporary label map and what Slicer adds around it (its display node, the `_ColorTable` an export creates), so
    that no step leaves nodes behind in the user's scene (and in the scene file they save)."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    kept: list = list(keep)
    try:
        yield kept
    finally:
        keep_ids = {n.GetID() for n in kept if n is not None}
        for node in [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]:
            if (node is not None and node.GetID() not in before and node.GetID() not in keep_ids
                    and not node.GetSingletonTag()):  # scene-wide singletons are shared, not ours to remove
                scene.RemoveNode(node)


def _blank_like(volume):
    image = vtk.vtkImageData()
    image.SetDimensions(volume.GetImageData().GetDimensions())
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    image.GetPointData().GetScalars().Fill(0)
    return image


def grid_difference(volume: slicer.vtkMRMLVolumeNode, reference: slicer.vtkMRMLVolumeNode) -> str | None:
    """How `volume`'s voxel grid differs from `reference`'s (dimensions, or the voxel centres beyond a thousandth of
    a voxel), or None when they are the same grid. Axes may run the other way: Slicer's reader turns a file whose
    axes are a left-handed permutation (written from such a volume node) into a right-handed grid by reversing
    one axis, the same voxels indexed from the other end, which segment import places by position."""
    dims, reference_dims = volume.GetImageData().GetDimensions(), reference.GetImageData().GetDimensions()
    if dims != reference_dims:
        return f"{'x'.join(map(str, dims))} voxels, not {'x'.join(map(str, reference_dims))}"
    a, b = _canonical_grid(volume, dims), _canonical_grid(reference, dims)
    if np.abs(a - b).max() > 1e-3 * min(reference.GetSpacing()):
        return "another position, spacing or orientation"
    return None


def _canonical_grid(volume: slicer.vtkMRMLVolumeNode, dims: tuple[int, int, int]) -> np.ndarray:
    """The IJK-to-RAS matrix (3 x 4) with each axis turned to point along its largest RAS component's positive
    direction (the origin moved to the axis's other end where it is turned): equal for two grids of the same voxel
    centres whichever way their axes run."""
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    m = np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(3)])
    for axis in range(3):
        column = m[:, axis]
        if column[np.argmax(np.abs(column))] < 0:
            m[:, 3] += (dims[axis] - 1) * column
            m[:, axis] = -column
    return m


def read_volume(scene: slicer.vtkMRMLScene, path: Path, name: str, labelmap: bool = False
                ) -> slicer.vtkMRMLScalarVolumeNode:
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetSingleFile(1)
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        raise SceneError(f"could not read {path}")
    return node


def add_segmentation(scene: slicer.vtkMRMLScene, label_path: Path, reference_volume: slicer.vtkMRMLScalarVolumeNode,
                     labels: dict[str, int], name: str, on_reference_grid: bool = False
                     ) -> slicer.vtkMRMLSegmentationNode:
    """A segmentation node from a label map: one segment per structure (empty ones too, ready to be painted), named
    and coloured, with `reference_volume` as its reference geometry, beside that volume in the subject hierarchy.
    `on_reference_grid`: the label map must lie on the reference volume's voxel grid (a backend's result does), else
    SceneError; Slicer's import would resample any grid onto it without a word."""
    with scratch_nodes(scene) as keep:
        labelmap = read_volume(scene, label_path, "__crossmodalseg_import", labelmap=True)
        if on_reference_grid:
            difference = grid_difference(labelmap, reference_volume)
            if difference:
                raise SceneError(f"{label_path.name} is not on the voxel grid of {reference_volume.GetName()} "
                                 f"({difference}); it was not imported")
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        keep.append(segmentation)
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        # Voxels are the source representation (what the Segment Editor paints); also lets empty segments exist.
        segmentation.GetSegmentation().SetSourceRepresentationName(
            slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation):
            keep.remove(segmentation)
            raise SceneError(f"could not import {label_path}")
    s = segmentation.GetSegmentation()
    imported = {s.GetNthSegment(i).GetLabelValue(): s.GetNthSegmentID(i) for i in range(s.GetNumberOfSegments())}
    structures = [n for n in labels if labels[n] != 0]
    for index, structure in enumerate(structures):
        color = structure_color(index)
        segment_id = imported.pop(labels[structure], None)
        if segment_id is None:
            segment_id = s.AddEmptySegment(structure, structure, color)
        segment = s.GetSegment(segment_id)
        segment.SetName(structure)
        segment.SetColor(*color)
        entry = terminology_entry(structure)
        if entry is not None:  # standard codes where the structure is known (DICOM SEG export, other tools)
            segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)
    for stray in imported.values():  # values outside the labels (cannot happen with our backend; be strict)
        s.RemoveSegment(stray)
    _order_segments(segmentation, structures)
    segmentation.CreateDefaultDisplayNodes()
    place_beside(segmentation, reference_volume)
    return segmentation


def _order_segments(segmentation, structures: list[str]) -> None:
    s = segmentation.GetSegmentation()
    by_name = {s.GetNthSegment(i).GetName(): s.GetNthSegmentID(i) for i in range(s.GetNumberOfSegments())}
    for index, structure in enumerate(structures):
        s.SetSegmentIndex(by_name[structure], index)


def disagreement_colors(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLColorTableNode:
    """The scene's disagreement colour table (made once): entry 0 fully transparent, then a ramp of rising
    brightness, so that where the members agree the slice shows the image alone."""
    existing = scene.GetFirstNodeByName(DISAGREEMENT_COLORS)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", DISAGREEMENT_COLORS)
    table.SetTypeToUser()
    table.SetNumberOfColors(DISAGREEMENT_LEVELS)
    positions = [p for p, _ in DISAGREEMENT_RAMP]
    channels = [np.interp(np.linspace(0, 1, DISAGREEMENT_LEVELS), positions, [c[k] for _, c in DISAGREEMENT_RAMP])
                for k in range(3)]
    for i in range(DISAGREEMENT_LEVELS):
        table.SetColor(i, "", float(channels[0][i]), float(channels[1][i]), float(channels[2][i]),
                       0.0 if i == 0 else 1.0)
    return table


def add_disagreement_volume(scene: slicer.vtkMRMLScene, path: Path, reference_volume: slicer.vtkMRMLScalarVolumeNode,
                            name: str) -> slicer.vtkMRMLScalarVolumeNode:
    """The members' disagreement (mutual information, nats) as a scalar volume: the colour table above, voxels
    where the members agree transparent (display threshold), window from 0 to the largest value. None where the
    map is zero everywhere (a one-member model, or members that agree on every voxel): nothing to show."""
    node = read_volume(scene, path, name)
    array = slicer.util.arrayFromVolume(node)
    high = float(array.max()) if array.size else 0.0
    if not high > 0:
        scene.RemoveNode(node)
        return None
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(disagreement_colors(scene).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, high)
    display.AutoThresholdOff()
    display.SetLowerThreshold(high * 1e-3)  # below it: transparent where shown as a layer
    display.SetUpperThreshold(high)
    display.ApplyThresholdOn()
    place_beside(node, reference_volume)
    return node


def add_agreement_table(scene: slicer.vtkMRMLScene, report_path: Path, structures: list[str], name: str
                        ) -> slicer.vtkMRMLTableNode:
    """Per-structure Dice between every pair of members (rows: structures; columns: member pairs)."""
    report = json.loads(Path(report_path).read_text())
    agreement = report.get("member_agreement", {})
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    column = table.AddColumn()
    column.SetName("structure")
    for structure in structures:
        column.InsertNextValue(structure)
    for pair, per_structure in agreement.items():
        values = vtk.vtkDoubleArray()
        values.SetName(pair.replace("~", " vs "))
        for structure in structures:
            value = per_structure.get(structure)
            values.InsertNextValue(float("nan") if value is None else float(value))
        table.AddColumn(values)
    return table


def show_table(application_logic: Any, table: slicer.vtkMRMLTableNode) -> None:
    """Makes `table` the one the table views show (the application's selection node; a layout with a table view
    then shows it)."""
    application_logic.GetSelectionNode().SetActiveTableID(table.GetID())
    application_logic.PropagateTableSelection()


def show_in_3d(segmentation_node: slicer.vtkMRMLSegmentationNode, show: bool) -> None:
    """Surfaces of the segments in the 3D view (made once, from the label map), or hidden again."""
    if show and not segmentation_node.CreateClosedSurfaceRepresentation():
        raise SceneError(f"could not make 3D surfaces of {segmentation_node.GetName()!r}")
    display = segmentation_node.GetDisplayNode()
    if display is not None:
        display.SetVisibility3D(bool(show))


def edit_in_segment_editor(segmentation_node: slicer.vtkMRMLSegmentationNode,
                           source_volume: slicer.vtkMRMLScalarVolumeNode) -> Any:
    """Points the Segment Editor module's parameter node (the scene's "SegmentEditor" singleton) at the segmentation
    and its source volume, so that the editor opens on them; returns that node."""
    scene = segmentation_node.GetScene()
    editor = scene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
    if editor is None:
        editor = slicer.vtkMRMLSegmentEditorNode()
        editor.SetSingletonTag("SegmentEditor")
        editor = scene.AddNode(editor)
    editor.SetAndObserveSegmentationNode(segmentation_node)
    editor.SetAndObserveSourceVolumeNode(source_volume)
    return editor


PARAMETER_NODE_TAG = "CrossModalSeg"  # the module's parameter node: one per scene, saved with it


def parameter_node(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLScriptedModuleNode:
    """The module's parameter node (a scripted-module node, singleton in the scene)."""
    node = scene.GetSingletonNode(PARAMETER_NODE_TAG, "vtkMRMLScriptedModuleNode")
    if node is None:
        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetSingletonTag(PARAMETER_NODE_TAG)
        node.SetModuleName(PARAMETER_NODE_TAG)
        node = scene.AddNode(node)
    return node


def save_selections(scene: slicer.vtkMRMLScene, values: dict[str, str], nodes: dict[str, Any]) -> None:
    """Keeps what the panel has selected (text values and node references) in the parameter node."""
    node = parameter_node(scene)
    for name, value in values.items():
        node.SetParameter(name, value)
    for role, referenced in nodes.items():
        node.SetNodeReferenceID(role, referenced.GetID() if referenced is not None else None)


def load_selections(scene: slicer.vtkMRMLScene, names: tuple[str, ...], roles: tuple[str, ...]
                    ) -> tuple[dict[str, str], dict[str, Any]]:
    """The values and node references `save_selections` kept (only those set; nothing when the scene has none)."""
    node = scene.GetSingletonNode(PARAMETER_NODE_TAG, "vtkMRMLScriptedModuleNode")
    if node is None:
        return {}, {}
    values = {name: node.GetParameter(name) for name in names if node.GetParameter(name)}
    nodes = {role: node.GetNodeReference(role) for role in roles if node.GetNodeReference(role) is not None}
    return values, nodes


def place_beside(node: slicer.vtkMRMLNode, reference: slicer.vtkMRMLNode) -> None:
    """Same parent as `reference` in the subject hierarchy (the patient/study folder it is in)."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    if sh is None:
        return
    reference_item = sh.GetItemByDataNode(reference)
    if not reference_item:
        return
    parent = sh.GetItemParent(reference_item)
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent)
    else:  # the application's subject-hierarchy plugins add items for new nodes; without them, add it here
        sh.CreateItem(parent, node)
