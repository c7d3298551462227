"""CrossModalSeg: cross-modality segmentation with few labels (MKD, MAML, CMC) from 3D Slicer.

Module, Widget, Logic and Test, as Slicer's scripted modules have them. The Widget is thin: it reads the panel and
calls the Qt-free logic in CrossModalSegLib, which talks to a CrossModalSeg backend over HTTP (a local one that it
starts, or a remote GPU server). Long work runs in the backend; the panel polls it with a timer, so the application
never blocks.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CrossModalSegLib import scene as mrml
from CrossModalSegLib.client import BackendError
from CrossModalSegLib.install import (
    backend_source,
    install_backend,
    missing_requirements,
    python_too_old,
    read_requirements,
    torch_installed,
)
from CrossModalSegLib.logic import (
    POLL_GIVE_UP_AFTER,
    POLL_MS,
    REQUEST_TICK_MS,
    BackgroundRequest,
    Catalogue,
    Connection,
    JobProgress,
    PendingCall,
    PendingConnection,
    PendingDatasetCheck,
    PendingJob,
    PendingPoll,
    PendingRefresh,
    PendingSegmentation,
    PendingUpload,
    correction_volumes,
    let_workers_run,
    model_title,
    poll_interval_ms,
    training_budget,
)
from CrossModalSegLib.logic import CrossModalSegLogic as WorkflowLogic
from CrossModalSegLib.scene import SceneError

METHOD_CHOICES = ["auto", "single", "mkd", "maml", "cmc"]  # order of the method combo box
FINETUNE_SHARE = 0.25  # of the panel's training budget: a correction refines a model, it does not retrain it
SETTINGS = "CrossModalSeg/"  # QSettings keys: what the user typed to reach the backend (never the token)


class CrossModalSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CrossModalSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["CrossModalSeg developers"]
        self.parent.helpText = (
            "Train and apply cross-modality segmentation models with few labels (MKD for unpaired CT and MR, MAML for "
            "paired modalities, CMC for semi-supervised data) on a local or remote GPU backend; check where the "
            "ensemble members disagree, correct with the Segment Editor and re-train. See the README of the project.")
        self.parent.acknowledgementText = "Uses PyTorch, MONAI and SimpleITK in the backend."


class CrossModalSegLogic(WorkflowLogic, ScriptedLoadableModuleLogic):
    """The module's logic on the application's scene (all of it lives in CrossModalSegLib, Qt-free).

    WorkflowLogic comes first: Slicer's ScriptedLoadableModuleLogic.__init__ calls super().__init__() without
    arguments, which must reach object, not a base that needs the scene."""

    def __init__(self, scene=None):
        WorkflowLogic.__init__(self, scene or slicer.mrmlScene)
        ScriptedLoadableModuleLogic.__init__(self)


class CrossModalSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: CrossModalSegLogic | None = None
        self.result = None
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.onPoll)
        # Connecting, polls, uploads and segmentations run in worker threads; this timer hands each finished one to
        # the GUI thread (and, in Slicer, lets the workers run at all: let_workers_run).
        self.pendingRequests: list[tuple[BackgroundRequest, object]] = []  # (request, its finish callback)
        self.requestTimer = qt.QTimer()
        self.requestTimer.setInterval(REQUEST_TICK_MS)
        self.requestTimer.timeout.connect(self.onRequestPoll)
        self.pollFailures = 0
        self.listedModels: list[str] = []  # model ids in the order of the model combo box
        self.listedDatasets: list[str] = []  # dataset ids in the order of the dataset combo box
        self.restoring = True  # no saving into the parameter node until the saved selections are back
        self.savedModel: str | None = None  # the parameter node's model, chosen once the backend lists it

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        panel = slicer.util.loadUI(self.resourcePath("UI/CrossModalSeg.ui"))
        self.layout.addWidget(panel)
        self.ui = slicer.util.childWidgetVariables(panel)
        panel.setMRMLScene(slicer.mrmlScene)
        self.logic = CrossModalSegLogic()

        self.ui.localRadioButton.toggled.connect(self.updateButtons)
        self.ui.connectButton.clicked.connect(self.onConnect)
        self.ui.installBackendButton.clicked.connect(self.onInstallBackend)
        self.ui.addCaseButton.clicked.connect(self.onAddCase)
        self.ui.trainButton.clicked.connect(self.onTrain)
        self.ui.finetuneButton.clicked.connect(self.onFinetune)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.resumeButton.clicked.connect(self.onResume)
        self.ui.modelComboBox.activated.connect(self.onModelChosen)
        self.ui.datasetComboBox.activated.connect(self.onDatasetChosen)
        self.ui.exportModelButton.clicked.connect(self.onExportModel)
        self.ui.importModelButton.clicked.connect(self.onImportModel)
        self.ui.segmentButton.clicked.connect(self.onSegment)
        self.ui.submitCorrectionButton.clicked.connect(self.onSubmitCorrection)
        self.ui.showMembersCheckBox.toggled.connect(self.onShowMembers)
        self.ui.showDisagreementCheckBox.toggled.connect(self.onShowDisagreement)
        self.ui.show3DCheckBox.toggled.connect(self.onShow3D)
        self.ui.correctButton.clicked.connect(self.onCorrect)
        for selector in (self.ui.targetVolumeSelector, self.ui.assistantVolumeSelector,
                         self.ui.targetSegmentationSelector, self.ui.assistantSegmentationSelector,
                         self.ui.correctionSelector):
            selector.currentNodeChanged.connect(self.updateButtons)
        self.ui.methodComboBox.currentIndexChanged.connect(self.updateMethodHint)
        self.ui.pairedCheckBox.toggled.connect(self.updateButtons)
        for line in (self.ui.targetModalityLineEdit, self.ui.assistantModalityLineEdit):
            line.editingFinished.connect(self.updateButtons)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneClosed)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneLoaded)
        self.restoreSettings()
        self.restoreSelections()
        self.updateButtons()

    def enter(self):
        self.restoreSelections()
        self.updateButtons()

    # ---- the parameter node: the panel's selections, saved with the scene -------------------------------------
    def selectors(self) -> dict[str, object]:
        return {"targetVolume": self.ui.targetVolumeSelector, "assistantVolume": self.ui.assistantVolumeSelector,
                "targetSegmentation": self.ui.targetSegmentationSelector,
                "assistantSegmentation": self.ui.assistantSegmentationSelector}

    def saveSelections(self):
        if self.restoring:
            return
        values = {"dataset": self.ui.datasetComboBox.currentText.strip(), "model": self.logic.model_id or "",
                  "targetModality": self.ui.targetModalityLineEdit.text.strip(),
                  "assistantModality": self.ui.assistantModalityLineEdit.text.strip(),
                  "paired": "true" if self.ui.pairedCheckBox.checked else "false"}
        mrml.save_selections(slicer.mrmlScene, values,
                             {role: selector.currentNode() for role, selector in self.selectors().items()})

    def restoreSelections(self):
        """Brings back what the parameter node kept (the scene's, e.g. after loading a saved scene)."""
        self.restoring = True
        try:
            values, nodes = mrml.load_selections(
                slicer.mrmlScene, ("dataset", "model", "targetModality", "assistantModality", "paired"),
                tuple(self.selectors()))
            for role, node in nodes.items():
                self.selectors()[role].setCurrentNode(node)
            if "dataset" in values:
                self.ui.datasetComboBox.currentText = values["dataset"]
            if "targetModality" in values:
                self.ui.targetModalityLineEdit.text = values["targetModality"]
            if "assistantModality" in values:
                self.ui.assistantModalityLineEdit.text = values["assistantModality"]
            if "paired" in values:
                self.ui.pairedCheckBox.checked = values["paired"] == "true"
            self.savedModel = values.get("model")
        finally:
            self.restoring = False

    def onSceneLoaded(self, *_):
        self.restoreSelections()
        if self.logic.client is not None and self.savedModel and not self.connecting:
            self.run(self.startRefresh, self.savedModel)
        self.updateButtons()

    def restoreSettings(self):
        settings = qt.QSettings()
        self.ui.urlLineEdit.text = settings.value(SETTINGS + "url", self.ui.urlLineEdit.text) or ""
        self.ui.pythonLineEdit.text = settings.value(SETTINGS + "python", self.ui.pythonLineEdit.text) or ""
        remote = str(settings.value(SETTINGS + "remote", "false")).lower() == "true"
        self.ui.remoteRadioButton.checked = remote
        self.ui.localRadioButton.checked = not remote

    def saveSettings(self):
        settings = qt.QSettings()
        settings.setValue(SETTINGS + "url", self.ui.urlLineEdit.text.strip())
        settings.setValue(SETTINGS + "python", self.ui.pythonLineEdit.text.strip())
        settings.setValue(SETTINGS + "remote", "true" if self.ui.remoteRadioButton.checked else "false")

    def cleanup(self):
        self.timer.stop()
        self.requestTimer.stop()
        self.removeObservers()
        if self.logic is not None:
            self.logic.cleanup()

    # ---- helpers ---------------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        self.ui.logTextEdit.appendPlainText(message)
        logging.info(f"CrossModalSeg: {message}")

    def run(self, action, *args):
        """Runs a short action (requests, uploads) with a wait cursor; errors become one clear message box."""
        try:
            with slicer.util.tryWithErrorDisplay("CrossModalSeg", waitCursor=True):
                return action(*args)
        except (BackendError, SceneError, ValueError):
            return None
        except Exception:  # a bug: shown by tryWithErrorDisplay, logged here, and the panel goes on
            logging.exception("CrossModalSeg: unexpected error")
            return None

    @property
    def pendingSegmentation(self) -> PendingSegmentation | None:
        """The segmentation under way (one cancelled is no longer: it only winds down)."""
        return next((r for r, _ in self.pendingRequests if isinstance(r, PendingSegmentation) and not r.cancelled),
                    None)

    @property
    def uploading(self) -> bool:
        return any(isinstance(r, (PendingDatasetCheck, PendingUpload)) for r, _ in self.pendingRequests)

    @property
    def connecting(self) -> bool:
        return any(isinstance(r, PendingConnection) for r, _ in self.pendingRequests)

    @property
    def refreshing(self) -> bool:
        return any(isinstance(r, (PendingConnection, PendingRefresh)) for r, _ in self.pendingRequests)

    @property
    def submitting(self) -> bool:
        return any(isinstance(r, PendingJob) for r, _ in self.pendingRequests)

    @property
    def idle(self) -> bool:
        """No job followed and no request under way (what scripts and tests wait for)."""
        return not self.timer.isActive() and not self.pendingRequests

    def startRequest(self, request: BackgroundRequest, finish) -> BackgroundRequest:
        """Follows a request running in a worker thread; `finish(request)` runs here once it is done."""
        self.pendingRequests.append((request, finish))
        self.requestTimer.start()
        self.updateButtons()
        return request

    def inBackground(self, what: str, work, finish, kind: type[PendingCall] = PendingCall):
        """`work()` (backend requests, never MRML) in a worker thread; `finish(pending)` here once it is done."""
        self.run(lambda: self.startRequest(self.logic.start_call(what, work, kind), finish))
        self.updateButtons()

    def onRequestPoll(self):
        let_workers_run()  # in Slicer, worker threads move only while this thread runs Python
        finished = [(r, finish) for r, finish in self.pendingRequests if r.done()]
        if not finished:
            return
        self.pendingRequests = [p for p in self.pendingRequests if p not in finished]
        if not self.pendingRequests:
            self.requestTimer.stop()
        for request, finish in finished:
            self.run(finish, request)
        self.updateButtons()

    def modalities(self) -> dict[str, str]:
        target = self.ui.targetModalityLineEdit.text.strip()
        out = {target: self.ui.targetTypeComboBox.currentText}
        if self.ui.assistantVolumeSelector.currentNode() is not None:
            out[self.ui.assistantModalityLineEdit.text.strip()] = self.ui.assistantTypeComboBox.currentText
        return out

    def volumes(self) -> dict[str, object]:
        target = self.ui.targetModalityLineEdit.text.strip()
        out = {target: self.ui.targetVolumeSelector.currentNode()}
        assistant = self.ui.assistantVolumeSelector.currentNode()
        if assistant is not None:
            out[self.ui.assistantModalityLineEdit.text.strip()] = assistant
        return out

    def updateButtons(self, *_):
        local = self.ui.localRadioButton.checked
        self.ui.pythonLineEdit.enabled = local
        self.ui.installBackendButton.enabled = local
        self.ui.urlLineEdit.enabled = not local
        self.ui.tokenLineEdit.enabled = not local
        connecting = self.connecting
        self.ui.connectButton.enabled = not connecting
        # While the lists come (a worker thread chooses the model and its dataset), nothing may use them.
        connected = self.logic is not None and self.logic.client is not None and not self.refreshing
        busy = self.timer.isActive() or self.submitting  # a job followed, or one on its way
        has_target = self.ui.targetVolumeSelector.currentNode() is not None
        has_model = connected and self.logic.model_id is not None
        uploading = self.uploading
        self.ui.addCaseButton.enabled = connected and has_target and not uploading
        self.ui.trainButton.enabled = (connected and not busy and not uploading
                                       and self.logic.dataset_id is not None)
        self.ui.finetuneButton.enabled = has_model and not busy
        self.ui.cancelButton.enabled = self.timer.isActive() or self.pendingSegmentation is not None
        self.ui.resumeButton.enabled = connected and not busy
        self.ui.modelComboBox.enabled = connected and not busy
        self.ui.exportModelButton.enabled = has_model
        self.ui.importModelButton.enabled = connected
        self.ui.segmentButton.enabled = (has_model and has_target and not busy
                                         and self.pendingSegmentation is None)
        self.ui.submitCorrectionButton.enabled = has_model and not busy and not uploading
        self.ui.correctButton.enabled = self.ui.correctionSelector.currentNode() is not None
        self.saveSelections()

    def updateMethodHint(self, *_):
        if self.logic is None or self.logic.dataset_id is None:
            return
        target, *assistants = list(self.modalities())
        method, reason = self.logic.suggest_method(target, assistants, self.logic.cases)  # no request here
        chosen = method_choice(self.ui.methodComboBox.currentIndex)
        self.ui.methodHintLabel.text = (f"suggested: {method} ({reason})" if chosen == "auto"
                                        else f"chosen: {chosen}; suggested: {method}")

    # ---- backend -----------------------------------------------------------------------------------------------
    def onConnect(self):
        """Starts the local backend, or reaches the server, in a worker thread: the panel says "connecting" and the
        application goes on (a local backend takes seconds to minutes to start)."""
        def connect():
            local = self.ui.localRadioButton.checked
            python = self.ui.pythonLineEdit.text.strip() or sys.executable.replace("SlicerApp-real", "PythonSlicer")
            keeps_local = local and self.logic.local is not None and self.logic.local.python == python
            if not keeps_local and self.logic.stopping_loses_work() and not slicer.util.confirmOkCancelDisplay(
                    "The local backend is training. Connecting elsewhere stops it and its job (Resume continues the "
                    "job from its last checkpoint later). Go on?"):
                return
            if local:
                too_old = None if self.ui.pythonLineEdit.text.strip() else python_too_old()
                if too_old:
                    raise BackendError(f"cannot run the backend in Slicer's Python: {too_old}")
                # Slicer's startup environment: the launcher's PYTHONHOME and PYTHONPATH would break another Python
                pending = self.logic.start_connection(select=self.savedModel, python=python,
                                                      base_env=slicer.util.startupEnvironment())
            else:
                pending = self.logic.start_connection(self.ui.urlLineEdit.text.strip(),
                                                      self.ui.tokenLineEdit.text.strip(), select=self.savedModel)
            self.ui.backendStatusLabel.text = "starting the local backend..." if local else "connecting..."
            self.startRequest(pending, self.onConnected)

        self.run(connect)
        self.updateButtons()

    def onConnected(self, pending: PendingConnection):
        try:
            connection: Connection = self.logic.finish_call(pending)
        except Exception:
            self.ui.backendStatusLabel.text = "not connected"
            raise
        info = connection.info
        devices = ", ".join(info["devices"])
        self.ui.backendStatusLabel.text = f"connected: crossmodalseg {info['version']} on {devices}"
        self.log(f"backend ready ({devices}); methods: {', '.join(info['methods'])}")
        self.showDevices(info["devices"])
        self.saveSettings()
        self.showCatalogue(connection.catalogue)

    def showDevices(self, devices: list[str]):
        """The device choices this backend has: auto, cuda only when it has a GPU, cpu; the choice stays if it can."""
        choices = ["auto", *(["cuda"] if any(d.startswith("cuda") for d in devices) else []), "cpu"]
        chosen = self.ui.deviceComboBox.currentText
        self.ui.deviceComboBox.clear()
        for choice in choices:
            self.ui.deviceComboBox.addItem(choice)
        self.ui.deviceComboBox.setCurrentIndex(choices.index(chosen) if chosen in choices else 0)

    def startRefresh(self, select: str | None = None):
        """Lists the backend's datasets and models again in a worker thread, choosing `select`, else the current
        model, else the one the parameter node kept, else the newest."""
        self.startRequest(self.logic.start_refresh(select or self.logic.model_id or self.savedModel),
                          lambda pending: self.showCatalogue(self.logic.finish_call(pending)))

    def showCatalogue(self, catalogue: Catalogue):
        """Fills the dataset and model boxes; the dataset name typed stays (a new name starts a new dataset at Add
        case) unless a model was chosen, whose dataset is shown."""
        self.listDatasets(catalogue.datasets)
        self.listedModels = [m["id"] for m in catalogue.models]
        self.ui.modelComboBox.clear()
        for model in catalogue.models:
            self.ui.modelComboBox.addItem(model_title(model))
        if catalogue.chosen is not None:
            index = self.listedModels.index(catalogue.chosen)
            self.ui.modelComboBox.setCurrentIndex(index)
            self.log(f"model: {model_title(catalogue.models[index])}")
        if catalogue.cases is not None:
            self.showCases(catalogue.cases)
        self.updateButtons()

    def onModelChosen(self, index):
        """The model, and the dataset it was trained on, come from the backend in a worker thread."""
        if 0 <= index < len(self.listedModels):
            self.run(self.startRefresh, self.listedModels[index])
        self.updateButtons()

    def onExportModel(self):
        path = qt.QFileDialog.getSaveFileName(self.parent, "Export model", f"crossmodalseg-{self.logic.model_id}.zip",
                                              "Model archive (*.zip)")
        if path:
            self.exportModelTo(path)

    def exportModelTo(self, path: str):
        """Saves the chosen model in the background (the archive may be hundreds of MB)."""
        if self.run(lambda: self.startRequest(self.logic.start_model_export(path), self.onModelTransferred)):
            self.log(f"saving the model to {path}")

    def onImportModel(self):
        path = qt.QFileDialog.getOpenFileName(self.parent, "Import model", "", "Model archive (*.zip)")
        if path:
            self.importModelFrom(path)

    def importModelFrom(self, path: str):
        """Sends a model archive to the backend in the background; it is listed and chosen once checked there."""
        if self.run(lambda: self.startRequest(self.logic.start_model_import(path), self.onModelTransferred)):
            self.log(f"importing the model {path}")

    def onModelTransferred(self, pending):
        value = self.logic.finish_call(pending)
        if isinstance(value, dict):  # an imported model
            self.log(f"imported: {model_title(value)}")
            self.startRefresh(value["id"])
        else:
            self.log(f"model saved to {value}")

    def listDatasets(self, dataset_ids: list[str]):
        """Lists these datasets; the name in the box stays (a new name starts a new dataset at Add case)."""
        typed = self.ui.datasetComboBox.currentText
        self.listedDatasets = list(dataset_ids)
        self.ui.datasetComboBox.clear()
        for dataset_id in self.listedDatasets:
            self.ui.datasetComboBox.addItem(dataset_id)
        self.ui.datasetComboBox.currentText = typed

    def onDatasetChosen(self, index):
        """An existing dataset: its structures and modalities come from the backend (in a worker thread); Train works
        on it."""
        if 0 <= index < len(self.listedDatasets):
            dataset_id = self.listedDatasets[index]
            self.inBackground(f"choice of dataset {dataset_id}", lambda: self.logic.choose_dataset(dataset_id),
                              self.onDatasetLoaded, PendingRefresh)

    def onDatasetLoaded(self, pending: PendingRefresh):
        dataset = self.logic.finish_call(pending)
        modalities = list(dataset["modalities"])
        if self.ui.targetModalityLineEdit.text.strip() not in modalities:
            self.ui.targetModalityLineEdit.text = modalities[0]
            self.ui.targetTypeComboBox.currentText = dataset["modalities"][modalities[0]]
        self.showCases(len(dataset["cases"]))
        self.log(f"dataset {dataset['id']!r}: {', '.join(n for n in dataset['labels'] if n != 'background')}"
                 f" in {', '.join(modalities)}")
        self.updateMethodHint()

    def showCases(self, count: int):
        """The logic's dataset in the box, with its number of cases."""
        self.ui.datasetComboBox.currentText = self.logic.dataset_id
        self.ui.casesLabel.text = f"{count} in {self.logic.dataset_id!r}"

    def onInstallBackend(self):
        """Installs what the backend needs into Slicer's Python: PyTorch through the PyTorch extension (only when it
        is missing), then only the missing packages, after the user agreed to the list."""
        too_old = python_too_old()
        if too_old:  # pip would fail on every pinned package with a message that does not say why
            slicer.util.errorDisplay(f"Cannot install the backend into Slicer's Python: {too_old}.")
            return
        requirements = read_requirements(Path(self.resourcePath("requirements.txt")))
        try:
            if not torch_installed():
                try:
                    import PyTorchUtils  # the PyTorch extension (EXTENSION_DEPENDS)
                except ImportError:
                    slicer.util.errorDisplay("Install the PyTorch extension from the Extension Manager first.")
                    return
                if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is None:
                    self.log("PyTorch installation cancelled")
                    return
            missing = missing_requirements(requirements)
            if missing and not slicer.util.confirmOkCancelDisplay(
                    "CrossModalSeg will install these packages into Slicer's Python:\n" + "\n".join(missing)):
                self.log("backend installation cancelled")
                return
            installed = install_backend(requirements, backend_source(Path(__file__).parent), slicer.util.pip_install)
        except Exception as e:  # noqa: BLE001 - pip or the PyTorch installer failed or was declined: say so
            slicer.util.errorDisplay(f"Installing the backend failed: {e}")
            return
        self.log(f"backend installed ({', '.join(installed) or 'all packages were already there'})")

    # ---- cases and training ------------------------------------------------------------------------------------
    def onAddCase(self):
        """Takes the selected volumes and segmentations; a worker thread finds (or creates) the dataset, then the
        case's files are written here and uploaded from a worker thread, which also chooses the case's id."""
        def add():
            target_seg = self.ui.targetSegmentationSelector.currentNode()
            assistant_seg = self.ui.assistantSegmentationSelector.currentNode()
            labelled = target_seg or assistant_seg
            labels = self.logic.labels_from_segmentation(labelled) if labelled else self.logic.labels
            if not labels:
                raise ValueError("the first case needs a segmentation: its segment names define the structures")
            dataset, modalities, volumes = self.ui.datasetComboBox.currentText.strip(), self.modalities(), self.volumes()
            target, *assistant = list(volumes)
            segmentations = {target: target_seg, **({assistant[0]: assistant_seg} if assistant else {})}
            if self.ui.pairedCheckBox.checked or not assistant:
                cases = [(volumes, segmentations)]
            else:  # unpaired: each volume is a different patient
                cases = [({m: v}, {m: segmentations[m]}) for m, v in volumes.items()]

            def upload(pending: PendingDatasetCheck):
                self.logic.adopt_dataset(self.logic.finish_call(pending), labels, modalities)
                for case_volumes, case_segmentations in cases:
                    self.startRequest(self.logic.start_add_case(case_volumes, case_segmentations), self.onCaseAdded)
                self.log(f"uploading {len(cases)} case(s) to {dataset!r}")

            self.inBackground(f"dataset {dataset}", lambda: self.logic.dataset_for(dataset, labels, modalities),
                              upload, PendingDatasetCheck)

        self.run(add)
        self.updateButtons()

    def onCaseAdded(self, pending: PendingUpload):
        case = self.logic.finish_upload(pending)
        self.log(f"added case {case} to {self.logic.dataset_id!r}")
        self.inBackground("listing of datasets", self.logic.dataset_listing, self.onDatasetsListed, PendingRefresh)

    def onDatasetsListed(self, pending: PendingRefresh):
        self.listDatasets(self.logic.finish_call(pending))
        self.showCases(len(self.logic.cases))
        self.updateMethodHint()

    def onTrain(self):
        """Submits the training from a worker thread (the method is suggested from the dataset's cases there);
        the progress timer starts once the backend has the job."""
        target, *assistants = list(self.modalities())
        method = method_choice(self.ui.methodComboBox.currentIndex)
        params = dict(method=None if method == "auto" else method, preset=self.ui.presetComboBox.currentText,
                      device=self.ui.deviceComboBox.currentText, **self.budget())
        self.submitJob("training", lambda: self.logic.train(target, assistants, **params))

    def budget(self, share: float = 1.0) -> dict:
        """The training budget the panel asks for (minutes when set, else epochs); fine-tuning gets a quarter."""
        return training_budget(self.ui.epochsSpinBox.value, self.ui.minutesSpinBox.value, share)

    def submitJob(self, what: str, submit):
        """`submit()` (it returns the job id) in a worker thread; then the progress timer follows the job."""
        def submitted(pending: PendingJob):
            self.log(f"{what} job {self.logic.finish_call(pending)} submitted")
            self.startPolling()

        self.inBackground(f"submission of a {what}", submit, submitted, PendingJob)

    def onFinetune(self):
        """Fine-tunes the current model on the dataset as it is now, with a quarter of the panel's budget."""
        budget = dict(device=self.ui.deviceComboBox.currentText, **self.budget(FINETUNE_SHARE))  # read here, not there
        self.submitJob("fine-tuning", lambda: self.logic.finetune(**budget))

    def onCancel(self):
        """Cancels the running segmentation if there is one (the panel stops waiting for it and discards its
        result), else the training job (the backend stops it)."""
        pending = self.pendingSegmentation
        if pending is not None:
            self.discard(pending)
            self.log("segmentation cancelled: the backend stops it, and nothing of it is kept")
            self.updateButtons()
            return
        job_id = self.logic.job_id
        self.inBackground(f"cancel of job {job_id}", self.logic.cancel, self.logic.finish_call)
        self.log(f"asked the backend to cancel job {job_id}")

    def onResume(self):
        """Lists the stopped trainings in a worker thread; the newest is resumed once the user agrees."""
        self.inBackground("listing of stopped trainings", self.logic.resumable_trainings, self.onStoppedListed,
                          PendingRefresh)

    def onStoppedListed(self, pending: PendingRefresh):
        stopped = self.logic.finish_call(pending)
        if not stopped:
            raise ValueError("no stopped training to resume")
        job = stopped[0]
        if slicer.util.confirmOkCancelDisplay(
                f"Resume the {job['params'].get('method', '')} training {job['id']} ({job['state']}, "
                f"{round(100 * job['progress']['fraction'])} % done) from its last checkpoint?"):
            self.submitJob("resumed training", lambda: self.logic.resume(job["id"]))

    def startPolling(self):
        self.ui.progressBar.value = 0
        self.pollFailures = 0
        self.timer.setInterval(POLL_MS)
        self.timer.start()
        self.updateButtons()

    def onPoll(self):
        """Asks for the job's progress in a worker thread (one poll at a time): a slow or lost server never holds up
        the GUI thread."""
        if not any(isinstance(r, PendingPoll) for r, _ in self.pendingRequests):
            self.run(lambda: self.startRequest(self.logic.start_poll(), self.onPolled))

    def onPolled(self, pending: PendingPoll):
        try:
            progress: JobProgress = self.logic.finish_call(pending)
        except BackendError as e:  # a slow or lost connection: ask less often, give up after a while
            if not self.timer.isActive():  # the panel stopped following the job meanwhile
                return
            self.pollFailures += 1
            if self.pollFailures >= POLL_GIVE_UP_AFTER:
                self.log(f"lost the backend: {e}; the job goes on there: Connect again to follow it")
                self.timer.stop()
                self.updateButtons()
            else:
                self.log(f"backend did not answer ({e}); retrying")
                self.timer.setInterval(poll_interval_ms(self.pollFailures))
            return
        if not self.timer.isActive() or progress.job_id != self.logic.job_id or progress.state == "superseded":
            return  # an answer about a job the panel no longer follows
        if self.pollFailures:
            self.pollFailures = 0
            self.timer.setInterval(POLL_MS)
        self.ui.progressBar.value = int(round(100 * progress.fraction))
        self.ui.etaLabel.text = "" if progress.eta_s is None else f"ETA {format_seconds(progress.eta_s)}"
        for message in progress.messages:
            self.log(message)
        if progress.finished:
            self.timer.stop()
            if progress.state == "succeeded" and progress.model:
                self.startRefresh(progress.model)
            self.updateButtons()
            if progress.state == "cancelled":  # the user asked for it: a line in the log, not an error box
                self.log("the job was cancelled")
            elif progress.state != "succeeded":
                slicer.util.errorDisplay(f"The job ended {progress.state}: {progress.error or ''}")

    # ---- segmentation, QA, correction ---------------------------------------------------------------------------
    def onSegment(self):
        """Starts the segmentation and returns: the backend works while the panel and the views stay usable."""
        def start():
            self.startRequest(self.logic.start_segment(self.volumes(), members=self.ui.membersCheckBox.checked,
                                                       uncertainty=self.ui.uncertaintyCheckBox.checked),
                              self.onSegmented)
            self.log("segmenting (the backend works; Slicer stays usable)")

        self.run(start)
        self.updateButtons()

    def onSegmented(self, pending: PendingSegmentation):
        self.result = self.logic.finish_segment(pending)
        self.ui.correctionSelector.setCurrentNode(self.result.segmentation)
        self.onShowMembers(self.ui.showMembersCheckBox.checked)
        self.onShowDisagreement(self.ui.showDisagreementCheckBox.checked)
        self.onShow3D(self.ui.show3DCheckBox.checked)
        self.ui.agreementLabel.text = agreement_summary(self.result)
        if self.result.agreement_table is not None:  # asked for with "Disagreement map": shown in a table view
            layout = slicer.app.layoutManager()
            if layout is not None:  # none when Slicer runs without its main window
                layout.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
            mrml.show_table(slicer.app.applicationLogic(), self.result.agreement_table)
        self.log(f"segmented {self.result.segmentation.GetName()!r}")

    def onShowMembers(self, show):
        if self.result is not None:
            for node in self.result.members.values():
                node.GetDisplayNode().SetVisibility(bool(show))

    def onShowDisagreement(self, show):
        if self.result is None or self.result.disagreement is None:
            return
        reference = self.result.volumes[self.result.modality]
        slicer.util.setSliceViewerLayers(background=reference, foreground=self.result.disagreement if show else None,
                                         foregroundOpacity=0.5)

    def onShow3D(self, show):
        if self.result is not None:
            self.run(mrml.show_in_3d, self.result.segmentation, bool(show))

    def volumesOf(self, segmentation) -> tuple[dict[str, object], str]:
        """(volumes, modality) a segmentation belongs to: for the last result (or one of its members), the volumes it
        was made from, whatever the selectors show now (changed while it ran, the correction went to the wrong volume
        or case); for another segmentation, the selected volumes and the target modality."""
        result = self.result
        if result is not None and result.volumes and (
                segmentation is result.segmentation or segmentation in result.members.values()):
            return result.volumes, result.modality
        volumes = self.volumes()
        return volumes, list(volumes)[0]

    def onCorrect(self):
        """Opens the Segment Editor on the segmentation to correct, with the volume it was made from as source."""
        def correct():
            segmentation = self.ui.correctionSelector.currentNode()
            if segmentation is None:
                raise ValueError("select the segmentation to correct")
            volumes, modality = self.volumesOf(segmentation)
            mrml.edit_in_segment_editor(segmentation, volumes[modality])
            slicer.util.selectModule("SegmentEditor")

        self.run(correct)

    def onSubmitCorrection(self):
        """Sends the correction from a worker thread; fine-tuning starts once it has arrived."""
        def submit():
            segmentation = self.ui.correctionSelector.currentNode()
            volumes, modality = self.volumesOf(segmentation)
            volumes = correction_volumes(volumes, modality, self.ui.pairedCheckBox.checked)
            self.startRequest(self.logic.start_correction(segmentation, volumes, modality), self.onCorrectionSent)
            self.log("sending the correction")

        self.run(submit)
        self.updateButtons()

    def onCorrectionSent(self, pending: PendingUpload):
        case = self.logic.finish_upload(pending)
        self.log(f"correction of case {case} stored as its final label")
        self.onFinetune()

    def onSceneClosed(self, *_):
        self.result = None
        # A segmentation still running belongs to the closed scene: its result must not land in the next patient's.
        for request, _ in self.pendingRequests:
            if isinstance(request, PendingSegmentation):
                self.discard(request)
        self.updateButtons()

    def discard(self, request: BackgroundRequest):
        """Cancels `request`; it stays followed, with nothing to do at its end, so that the request timer keeps
        giving its worker thread the GIL (in Slicer it moves only then) while it tells the backend and cleans up."""
        request.cancel()
        self.pendingRequests = [(r, (lambda _: None) if r is request else f) for r, f in self.pendingRequests]


def method_choice(index: int) -> str:
    """The method name of the method combo box's entry `index` ("auto" lets the logic suggest one)."""
    return METHOD_CHOICES[index] if 0 <= index < len(METHOD_CHOICES) else "auto"


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def agreement_summary(result) -> str:
    """One line of the member agreement table: "Dice between members (a vs b, a vs c) — liver: 0.95, 0.91; ..."
    (the pairs named once; "-" where a structure was in neither member)."""
    table = result.agreement_table
    if table is None:
        return ""
    pairs = [table.GetColumnName(c) for c in range(1, table.GetNumberOfColumns())]
    rows = []
    for r in range(table.GetNumberOfRows()):
        values = [table.GetCellText(r, c) for c in range(1, table.GetNumberOfColumns())]
        rows.append(f"{table.GetCellText(r, 0)}: " + ", ".join(f"{float(v):.2f}" if v not in ("", "nan") else "-"
                                                              for v in values))
    return f"Dice between members ({', '.join(pairs)}) — " + "; ".join(rows)


class CrossModalSegTest(ScriptedLoadableModuleTest):
    """Runs inside the Slicer application (Developer mode > Reload and Test, or
    `Slicer --testing --python-code "import CrossModalSeg; CrossModalSeg.CrossModalSegTest().runTest()"`).
    Skips, saying why, while the backend is not installed. Otherwise downloads the CTChest sample, draws a threshold
    segmentation of the lungs as its label, and drives the module's panel through a session (`panel_self_test`:
    a local backend in a temporary home, add the case, train a tiny model, segment) the way a user clicks it."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        missing = backend_missing()
        if missing:
            self.delayDisplay(f"CrossModalSeg self-test skipped: {missing}", msec=3000)
            return
        self.test_panel_session_on_sample_ct()

    def test_panel_session_on_sample_ct(self):
        import numpy as np
        import SampleData

        self.delayDisplay("Loading CTChest")
        ct = SampleData.SampleDataLogic().downloadSample("CTChest")
        voxels = slicer.util.arrayFromVolume(ct)
        lungs = ((voxels < -400) & (voxels > -1000)).astype(np.uint8)
        labels = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CTChest labels")
        labels.SetReferenceImageGeometryParameterFromVolumeNode(ct)
        segment_id = labels.GetSegmentation().AddEmptySegment("lungs", "lungs")
        slicer.util.updateSegmentBinaryLabelmapFromArray(lungs, labels, segment_id, ct)
        slicer.util.selectModule("CrossModalSeg")
        widget = slicer.modules.crossmodalseg.widgetRepresentation().self()
        self.delayDisplay("Training a tiny model and segmenting (minutes on a CPU)")
        panel_self_test(widget, ct, labels, Path(slicer.app.temporaryPath) / "CrossModalSegTest",
                        sys.executable.replace("SlicerApp-real", "PythonSlicer"))
        self.delayDisplay("CrossModalSeg self-test passed")


def backend_missing() -> str | None:
    """Why the backend cannot run in Slicer's Python (what to do about it), or None when it can."""
    import importlib.util

    too_old = python_too_old()
    if too_old:
        return too_old
    requirements = read_requirements(Path(__file__).parent / "Resources" / "requirements.txt")
    missing = missing_requirements(requirements)
    if not torch_installed() or missing or importlib.util.find_spec("crossmodalseg") is None:
        return ("the backend is not installed in Slicer's Python; open the CrossModalSeg module and click "
                "'Install backend' (missing: " + ", ".join((["torch"] if not torch_installed() else []) + missing
                                                          or ["crossmodalseg"]) + ")")
    return None


def panel_self_test(widget, volume, segmentation, home: Path, python: str, timeout_s: float = 1800) -> None:
    """A whole session on the module's panel, as a user clicks it: a local backend in `home`, `volume` with its
    `segmentation` added as a CT case, a tiny `single` model trained with the progress timer, then *Segment*, whose
    result must have the structures and the volume's grid. Raises AssertionError naming the step that failed."""
    import time

    def wait_until(done, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"self-test: {what} did not finish within {timeout_s:.0f} s")
            slicer.app.processEvents()
            time.sleep(0.05)

    ui = widget.ui
    widget.logic.start_local_backend(python=python, home=home)  # a home of its own: the user's data stay apart
    ui.localRadioButton.checked = True
    ui.pythonLineEdit.text = python
    ui.connectButton.click()  # keeps that backend (same Python) and fills the panel from it
    wait_until(lambda: widget.idle, "connecting")
    assert ui.backendStatusLabel.text.startswith("connected"), f"self-test: connect: {ui.backendStatusLabel.text}"
    ui.datasetComboBox.currentText = "selftest"
    ui.targetModalityLineEdit.text, ui.targetTypeComboBox.currentText = "ct", "CT"
    ui.targetVolumeSelector.setCurrentNode(volume)
    ui.targetSegmentationSelector.setCurrentNode(segmentation)
    ui.assistantVolumeSelector.setCurrentNode(None)
    ui.assistantSegmentationSelector.setCurrentNode(None)
    ui.addCaseButton.click()
    wait_until(lambda: widget.idle, "adding the case")
    assert widget.logic.dataset_id == "selftest", "self-test: the case was not added (see the module's log)"
    ui.methodComboBox.currentIndex = METHOD_CHOICES.index("single")
    ui.minutesSpinBox.value = 0  # a minutes budget the user left set would replace the epochs
    ui.epochsSpinBox.value = 1
    ui.trainButton.click()
    wait_until(lambda: widget.idle, "training")
    assert ui.progressBar.value == 100 and widget.logic.model_id, "self-test: training did not succeed (see the log)"
    ui.segmentButton.click()
    wait_until(lambda: widget.pendingSegmentation is None, "segmenting")
    result = widget.result
    assert result is not None, "self-test: no segmentation came back (see the log)"
    names = [result.segmentation.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(result.segmentation.GetSegmentation().GetNumberOfSegments())]
    expected = [name for name in widget.logic.labels if name != "background"]
    assert names == expected, f"self-test: segments {names}, expected {expected}"
    exported = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    slicer.vtkSlicerSegmentationsModuleLogic.ExportVisibleSegmentsToLabelmapNode(result.segmentation, exported, volume)
    difference = mrml.grid_difference(exported, volume)
    slicer.mrmlScene.RemoveNode(exported)
    assert difference is None, f"self-test: the segmentation is not on the volume's grid ({difference})"
