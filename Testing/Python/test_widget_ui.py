"""The panel: the `.ui` file loads (PySide6, offscreen), every widget the Widget code looks up exists in it with the
kind of widget the code expects, and a picture of the panel is saved for the docs.

Slicer's own C++ widgets (ctkCollapsibleButton, qMRMLNodeComboBox, qMRMLWidget) cannot run here; the stand-ins
below (a group box, a combo box, a plain widget) take their place only so that the layout loads and renders."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UI_FILE = ROOT / "CrossModalSeg" / "Resources" / "UI" / "CrossModalSeg.ui"
WIDGET_CODE = ROOT / "CrossModalSeg" / "CrossModalSeg.py"
SCREENSHOT = ROOT / "Resources" / "Screenshots" / "CrossModalSeg_panel.png"

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtWidgets = pytest.importorskip("PySide6.QtWidgets")
from PySide6.QtCore import Property  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402

# What the Widget code does with a widget, by the suffix of its name -> the Qt class it needs.
EXPECTED_KIND = {"Button": ("QPushButton", "QRadioButton"), "CheckBox": ("QCheckBox",), "LineEdit": ("QLineEdit",),
                 "ComboBox": ("QComboBox",), "SpinBox": ("QSpinBox",), "Label": ("QLabel",),
                 "ProgressBar": ("QProgressBar",), "TextEdit": ("QPlainTextEdit",),
                 "Selector": ("qMRMLNodeComboBox",)}


class ctkCollapsibleButton(QtWidgets.QGroupBox):  # noqa: N801 - must carry the .ui class name
    """Stand-in: a titled group box."""

    def _text(self) -> str:
        return self.title()

    def _set_text(self, value: str) -> None:
        self.setTitle(value)

    text = Property(str, _text, _set_text)


class qMRMLNodeComboBox(QtWidgets.QComboBox):  # noqa: N801
    """Stand-in: a combo box showing what the real one would list."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.addItem("(select a node)")


class qMRMLWidget(QtWidgets.QWidget):  # noqa: N801
    """Stand-in: the panel's root widget."""


@pytest.fixture(scope="module")
def panel():
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    loader = QUiLoader()
    for cls in (ctkCollapsibleButton, qMRMLNodeComboBox, qMRMLWidget):
        loader.registerCustomWidget(cls)
    widget = loader.load(str(UI_FILE))
    assert widget is not None, loader.errorString()
    yield widget, app
    widget.deleteLater()


def widget_names_used_by_the_code() -> set[str]:
    """Every `self.ui.<name>` in the module's code."""
    tree = ast.parse(WIDGET_CODE.read_text())
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def test_every_widget_the_code_uses_exists_with_the_right_kind(panel):
    widget, _ = panel
    used = widget_names_used_by_the_code()
    assert len(used) > 30  # the parse found the Widget's lookups
    for name in sorted(used):
        child = widget.findChild(QtWidgets.QWidget, name)
        assert child is not None, f"the Widget uses ui.{name}, which the .ui file does not have"
        kinds = next(k for suffix, k in EXPECTED_KIND.items() if name.lower().endswith(suffix.lower()))
        assert type(child).__name__ in kinds or child.metaObject().className() in kinds, \
            f"ui.{name} is a {type(child).__name__}, the code needs one of {kinds}"


def test_panel_sections_and_choices(panel):
    widget, _ = panel
    titles = [b.title() for b in widget.findChildren(ctkCollapsibleButton)]
    assert titles == ["Backend", "Inputs", "Training", "Segmentation and correction", "Quality assurance"]
    # The method combo box lists, in order, the choices the Widget code maps its index to.
    choices = next(ast.literal_eval(n.value) for n in ast.walk(ast.parse(WIDGET_CODE.read_text()))
                   if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "METHOD_CHOICES")
    methods = widget.findChild(QtWidgets.QComboBox, "methodComboBox")
    assert [methods.itemText(i).split()[0] for i in range(methods.count())] == choices
    presets = widget.findChild(QtWidgets.QComboBox, "presetComboBox")
    assert [presets.itemText(i) for i in range(presets.count())] == ["fast", "full"]


def test_panel_picture_for_the_docs(panel, tmp_path: Path):
    """Renders the panel to PNG (set CROSSMODALSEG_UPDATE_SCREENSHOT=1 to refresh the one in Resources/)."""
    widget, app = panel
    widget.resize(440, 1180)
    widget.show()
    app.processEvents()
    out = SCREENSHOT if os.environ.get("CROSSMODALSEG_UPDATE_SCREENSHOT") else tmp_path / "panel.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    assert widget.grab().save(str(out))
    from PIL import Image

    image = Image.open(out).convert("RGB")
    assert image.size[0] >= 400 and image.size[1] >= 900
    assert len(image.getcolors(maxcolors=1 << 16) or []) > 20  # text and controls, not a blank area
