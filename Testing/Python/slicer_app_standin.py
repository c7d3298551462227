"""Stand-ins for the parts of the Slicer application that cannot be installed here, so that the module's real
`CrossModalSeg.py` (Module, Widget) runs in the tests on slicer-core's real MRML scene and a real backend.

What stands in, and only because the real thing cannot run without the desktop application:
- `qt` (PythonQt): PySide6 objects behind a thin proxy that gives PythonQt's semantics: Qt properties read and
  written as attributes (`lineEdit.text`, `checkBox.checked = True`, `button.enabled`), `name` for the object name,
  methods and signals as they are;
- the C++ widgets of CTK and qMRML that the `.ui` file names (ctkCollapsibleButton, qMRMLNodeComboBox,
  qMRMLWidget), as small PySide6 widgets with the same API subset;
- `slicer.ScriptedLoadableModule` (Module/Widget/Logic/Test base classes), `slicer.app` (testing flags, cursors,
  application name) and `slicer.mrmlScene`.
What is real: slicer-core's `slicer` package (MRML nodes, logics) and its copy of Slicer's own `slicer.util`
(loadUI, childWidgetVariables, tryWithErrorDisplay, the message displays, VTKObservationMixin), which run on top of
these stand-ins; PySide6's widgets, event loop and timers.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtGui, QtWidgets  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402


# ---- PythonQt semantics on PySide6 objects ----------------------------------------------------------------------------
def unwrap(value: Any) -> Any:
    return object.__getattribute__(value, "_obj") if isinstance(value, PythonQtObject) else value


def wrap(value: Any) -> Any:
    return PythonQtObject(value) if isinstance(value, QtCore.QObject) else value


class PythonQtObject:
    """A QObject as PythonQt shows it to Python: properties as attributes, `name` as the object name."""

    __slots__ = ("_obj",)

    def __init__(self, obj: QtCore.QObject):
        object.__setattr__(self, "_obj", obj)

    def _property_index(self, name: str) -> int:
        return object.__getattribute__(self, "_obj").metaObject().indexOfProperty(name)

    def __getattr__(self, name: str) -> Any:
        obj = object.__getattribute__(self, "_obj")
        if name == "name":
            return obj.objectName()
        if self._property_index(name) >= 0:
            return wrap(obj.property(name))
        attr = getattr(obj, name)
        if callable(attr) and not isinstance(attr, QtCore.SignalInstance):
            def call(*args, **kwargs):
                return wrap(attr(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in kwargs.items()}))
            return call
        return attr

    def __setattr__(self, name: str, value: Any) -> None:
        obj = object.__getattribute__(self, "_obj")
        if self._property_index(name) < 0:
            raise AttributeError(f"{type(obj).__name__} has no Qt property {name!r}")
        if not obj.setProperty(name, unwrap(value)):
            raise AttributeError(f"{type(obj).__name__}.{name} cannot be set to {value!r}")

    def children(self) -> list:
        return [wrap(c) for c in object.__getattribute__(self, "_obj").children()]

    def __bool__(self) -> bool:
        return True

    def __eq__(self, other: Any) -> bool:
        return unwrap(self) is unwrap(other)

    def __hash__(self) -> int:
        return id(unwrap(self))


# ---- the CTK and qMRML widgets the .ui file names ---------------------------------------------------------------------
class ctkCollapsibleButton(QtWidgets.QGroupBox):  # noqa: N801 - the .ui class name
    """Stand-in: a titled group box whose `text` is its title."""

    def _text(self) -> str:
        return self.title()

    def _set_text(self, value: str) -> None:
        self.setTitle(value)

    text = QtCore.Property(str, _text, _set_text)


class qMRMLNodeComboBox(QtWidgets.QComboBox):  # noqa: N801
    """Stand-in for the node selector: the current node is a real MRML node of the real scene."""

    currentNodeChanged = QtCore.Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._node = None
        self._scene = None

    def setMRMLScene(self, scene) -> None:
        self._scene = scene

    def mrmlScene(self):
        return self._scene

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node) -> None:
        self._node = node
        self.currentNodeChanged.emit(node)


class qMRMLWidget(QtWidgets.QWidget):  # noqa: N801
    """Stand-in: the panel's root; like the real one (through the .ui's connections) it hands the scene to every
    node selector inside it."""

    def setMRMLScene(self, scene) -> None:
        for selector in self.findChildren(qMRMLNodeComboBox):
            selector.setMRMLScene(scene)


class _UiLoader:
    """`qt.QUiLoader`: PySide6's loader that knows the stand-ins; returns the widget as PythonQt would."""

    def load(self, file) -> PythonQtObject | None:
        loader = QUiLoader()
        for cls in (ctkCollapsibleButton, qMRMLNodeComboBox, qMRMLWidget):
            loader.registerCustomWidget(cls)
        widget = loader.load(unwrap(file))
        return wrap(widget) if widget is not None else None


def _qfile(path) -> PythonQtObject:
    return wrap(QtCore.QFile(str(path)))


def make_qt_module(settings_file: Path) -> types.ModuleType:
    qt = types.ModuleType("qt")
    qt.QTimer = lambda *a: wrap(QtCore.QTimer(*a))
    qt.QSettings = lambda *a: wrap(QtCore.QSettings(str(settings_file), QtCore.QSettings.IniFormat))
    qt.QFile = _qfile
    qt.QFile.ReadOnly = QtCore.QIODevice.ReadOnly
    qt.QUiLoader = _UiLoader
    qt.Qt = QtCore.Qt
    qt.QMessageBox = QtWidgets.QMessageBox
    qt.QVBoxLayout = QtWidgets.QVBoxLayout
    qt.QWidget = QtWidgets.QWidget
    qt.QCursor = QtGui.QCursor
    return qt


# ---- slicer.app and slicer.ScriptedLoadableModule ---------------------------------------------------------------------
class Application:
    """`slicer.app`: no main window (so message boxes are logged, as Slicer does without one); the dialogs that
    ask the user are answered by `answers` (True: OK) and recorded in `asked`; modules the panel switches to
    (`slicer.util.selectModule`) are recorded in `selected_modules`, layouts it asks for in `layouts`."""

    applicationName = "Slicer"

    def __init__(self, qapp: QtWidgets.QApplication, scene=None):
        import slicer

        self.qapp = qapp
        self.asked: list[str] = []
        self.selected_modules: list[str] = []
        # The application logic is MRML (real here: selection node, table propagation); the layout manager is a
        # Qt widget of the main window, so a recorder of the layouts asked for stands in for it.
        self._application_logic = slicer.vtkMRMLApplicationLogic()
        if scene is not None:
            self._application_logic.SetMRMLScene(scene)
        self.layouts: list[int] = []

    def applicationLogic(self):
        return self._application_logic

    def layoutManager(self):
        return self

    def setLayout(self, layout: int) -> None:  # qSlicerLayoutManager.setLayout
        self.layouts.append(layout)

    def testingEnabled(self) -> bool:
        return False

    def startupEnvironment(self) -> QtCore.QProcessEnvironment:
        """qSlicerCoreApplication::startupEnvironment: the environment Slicer was started in, before its launcher
        added PYTHONHOME, PYTHONPATH and library paths. Here no launcher ran: this process's environment."""
        return QtCore.QProcessEnvironment.systemEnvironment()

    def mainWindow(self):
        return None

    def topLevelWidgets(self) -> list:  # QApplication's, which slicer.util.mainWindow() searches
        return [wrap(w) for w in self.qapp.topLevelWidgets()]

    def setOverrideCursor(self, cursor) -> None:
        self.qapp.setOverrideCursor(cursor)

    def restoreOverrideCursor(self) -> None:
        self.qapp.restoreOverrideCursor()

    def processEvents(self) -> None:
        self.qapp.processEvents()


def make_scripted_module_module(module_folder: Path) -> types.ModuleType:
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent
            self.moduleName = "CrossModalSeg"
            self.developerMode = False

        def resourcePath(self, filename: str) -> str:
            return str(module_folder / "Resources" / filename)

        def setup(self) -> None:
            self.panel = QtWidgets.QWidget()
            self.layout = wrap(QtWidgets.QVBoxLayout(self.panel))

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            super().__init__()  # as Slicer's own (Base/Python/slicer/ScriptedLoadableModule.py, 5.8 and later)
            self.moduleName = self.__class__.__name__.removesuffix("Logic")
            self.isSingletonParameterNode = True

    class ScriptedLoadableModuleTest:
        def delayDisplay(self, message: str, msec: int = 0) -> None:
            pass

    slm.ScriptedLoadableModule = ScriptedLoadableModule
    slm.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    slm.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    return slm


class ModuleParent:
    """What Slicer hands a scripted module's constructor."""

    title = categories = dependencies = contributors = helpText = acknowledgementText = None


def install(scene, module_folder: Path, settings_file: Path) -> Application:
    """Makes `import qt`, `import slicer` (+ .app, .mrmlScene, .ScriptedLoadableModule) work as in the application."""
    import slicer
    import slicer.util

    qapp = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    app = Application(qapp, scene)
    sys.modules["qt"] = make_qt_module(settings_file)
    slm = make_scripted_module_module(module_folder)
    sys.modules["slicer.ScriptedLoadableModule"] = slm
    slicer.ScriptedLoadableModule = slm
    slicer.app = app
    slicer.mrmlScene = scene
    # What the application's Segmentations module registers at start-up: label map <-> surface conversions.
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
    for view in ("Red", "Yellow", "Green"):  # what the application's three slice views keep in the scene
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(view)

    def message_box(text, parent=None, **kwargs):  # only questions get here (no main window for the rest)
        app.asked.append(text)
        return QtWidgets.QMessageBox.Ok

    slicer.util.messageBox = message_box

    def select_module(name: str) -> None:  # the application's module panel, which slicer-core does not have
        app.selected_modules.append(name)

    slicer.util.selectModule = select_module
    return app
