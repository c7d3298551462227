"""The panel itself, in a radiologist's session: `CrossModalSeg.py`'s real Widget and Logic on slicer-core's real
MRML scene, a real backend started by the panel on 127.0.0.1, and PySide6's event loop; only the Qt, CTK and
qMRML classes that cannot be installed here stand in (slicer_app_standin.py says which and how).

Connect -> add the unpaired CT and MR -> train MKD with progress -> segment (the event loop keeps ticking) ->
toggle members and disagreement -> correct -> fine-tune -> segment again -> a restarted panel picks the model again
and segments. Scene nodes are counted around each step."""

from __future__ import annotations

import importlib
import logging
import re
import sys
import time

import pytest
import slicer

from conftest import ROOT, make_scene, shared_data

pytest.importorskip("PySide6.QtWidgets")
import slicer_app_standin as standin  # noqa: E402
from CrossModalSegLib.client import BackendError  # noqa: E402

MODULE_FOLDER = ROOT / "CrossModalSeg"


def pump(app, until, timeout_s: float, tick_s: float = 0.02, while_=None) -> float:
    """Runs the Qt event loop (timers fire, the panel polls) until `until()`; returns the longest time the loop
    went without processing events (a frozen GUI thread shows up here), counting only the gaps after which
    `while_()` still holds (default: all)."""
    deadline = time.monotonic() + timeout_s
    longest, last = 0.0, time.monotonic()
    while not until():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the panel did not get there within {timeout_s} s")
        app.qapp.processEvents()
        now = time.monotonic()
        if while_ is None or while_():
            longest = max(longest, now - last)
        last = now
        time.sleep(tick_s)
    return longest


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


@pytest.fixture(scope="module")
def panel(tmp_path_factory):
    """The module as Slicer loads it: a fresh scene with the CT and MR (different patients) and their labels."""
    from test_logic import load_case

    folder = shared_data("totalsegmentator_ct_mr_examples")
    home = tmp_path_factory.mktemp("home")
    scene = make_scene()
    app = standin.install(scene, MODULE_FOLDER, home / "settings.ini")
    ct, ct_labels = load_case(scene, folder, "example_ct_sm", "CT")
    mr, mr_labels = load_case(scene, folder, "example_mr_sm", "MR")
    sys.modules.pop("CrossModalSeg", None)
    module = importlib.import_module("CrossModalSeg")
    module.CrossModalSeg(standin.ModuleParent())
    widget = module.CrossModalSegWidget()
    widget.setup()
    yield {"app": app, "scene": scene, "widget": widget, "module": module, "home": home, "ct": ct, "mr": mr,
           "ct_labels": ct_labels, "mr_labels": mr_labels}
    widget.cleanup()


def test_the_qt_binding_keeps_reference_counts_through_slots(panel):
    """PySide6 6.12.0 on Python 3.11 took one reference from None at every call of a Python slot, so a long session
    died at exit ('deallocating None'); Testing/requirements.txt pins a version that does not."""
    from PySide6 import QtWidgets

    button = QtWidgets.QPushButton()
    button.clicked.connect(lambda *_: None)
    before = sys.getrefcount(None), sys.getrefcount(False)
    for _ in range(200):
        button.click()
    assert (sys.getrefcount(None), sys.getrefcount(False)) >= (before[0] - 20, before[1] - 20), before


def test_the_panel_before_any_backend_says_why_it_cannot_connect_and_keeps_going(panel, caplog):
    """Nothing that needs a backend is enabled before one answers; an unreachable server is one clear message (no
    traceback out of a Qt slot), and the panel stays usable."""
    widget, ui, scene = panel["widget"], panel["widget"].ui, panel["scene"]
    assert not ui.addCaseButton.enabled and not ui.trainButton.enabled and not ui.segmentButton.enabled
    assert not ui.resumeButton.enabled and not ui.modelComboBox.enabled
    before = node_ids(scene)
    ui.remoteRadioButton.checked = True
    assert ui.urlLineEdit.enabled and not ui.pythonLineEdit.enabled  # the mode decides which fields apply
    ui.urlLineEdit.text = "http://127.0.0.1:9"  # nothing listens there
    caplog.clear()
    ui.connectButton.click()
    assert widget.connecting and not ui.connectButton.enabled  # one connection at a time
    pump(panel["app"], lambda: widget.idle, timeout_s=60)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "127.0.0.1:9" in errors[0], errors
    assert widget.logic.client is None and not ui.trainButton.enabled and ui.connectButton.enabled
    assert ui.backendStatusLabel.text == "not connected"
    assert node_ids(scene) == before
    ui.localRadioButton.checked = True


def test_a_server_that_never_answers_does_not_freeze_the_panel(panel, caplog):
    """Connecting, polling and adding a case run off the GUI thread: a server that accepts connections but never
    answers (a hung host, a dead tunnel) holds up neither the event loop nor the other buttons, and each ends in one
    clear message.
    The silent server is a real listening socket that never accepts."""
    import socket

    from CrossModalSegLib.client import BackendClient

    app, widget, ui = panel["app"], panel["widget"], panel["widget"].ui
    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        ui.remoteRadioButton.checked = True
        ui.urlLineEdit.text = url
        caplog.clear()
        started = time.monotonic()
        ui.connectButton.click()
        click_s = time.monotonic() - started
        assert click_s < 0.5, f"Connect held the GUI thread {click_s:.2f} s"
        assert widget.connecting and ui.backendStatusLabel.text == "connecting..."
        stall = pump(app, lambda: widget.idle, timeout_s=60, tick_s=0.01)  # the client gives up after 15 s
        assert stall < 0.1, f"the Qt event loop stalled {stall:.3f} s while the server did not answer"
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "did not answer" in errors[0] and url in errors[0], errors
        assert widget.logic.client is None and ui.connectButton.enabled

        # A job followed on a server that stops answering: the polls time out in their worker threads.
        widget.logic.client = BackendClient(url, status_timeout=1.0)
        widget.logic._follow({"id": "a-job"})
        try:
            widget.startPolling()
            stall = pump(app, lambda: "backend did not answer" in ui.logTextEdit.plainText, timeout_s=30,
                         tick_s=0.01)
            assert stall < 0.1, f"the Qt event loop stalled {stall:.3f} s while a poll waited for the server"
            assert widget.timer.isActive() and ui.cancelButton.enabled  # it retries, less often
            widget.timer.stop()
            pump(app, lambda: widget.idle, timeout_s=30)

            # Add case: the dataset is looked for (and the case id chosen) in worker threads, not in the click.
            ui.datasetComboBox.currentText = "abdomen"
            ui.targetVolumeSelector.setCurrentNode(panel["ct"])
            ui.targetSegmentationSelector.setCurrentNode(panel["ct_labels"])
            ui.assistantVolumeSelector.setCurrentNode(None)
            caplog.clear()
            started = time.monotonic()
            ui.addCaseButton.click()
            click_s = time.monotonic() - started
            assert click_s < 0.5, f"Add case held the GUI thread {click_s:.2f} s"
            assert widget.uploading and not ui.addCaseButton.enabled and not ui.trainButton.enabled
            stall = pump(app, lambda: widget.idle, timeout_s=30, tick_s=0.01)
            assert stall < 0.1, f"the Qt event loop stalled {stall:.3f} s while the dataset was looked for"
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1 and "did not answer" in errors[0], errors
            assert widget.logic.dataset_id is None and ui.addCaseButton.enabled  # nothing was taken for done
        finally:
            widget.timer.stop()
            pump(app, lambda: widget.idle, timeout_s=30)
            widget.logic.client = None
            widget.logic._follow({"id": None})
            ui.localRadioButton.checked = True
            widget.updateButtons()


@pytest.mark.slow
def test_a_whole_unpaired_session_in_the_panel(panel, monkeypatch, caplog):
    app, scene, widget, ui = panel["app"], panel["scene"], panel["widget"], panel["widget"].ui
    monkeypatch.setenv("HOME", str(panel["home"]))  # the local backend's home (~/.crossmodalseg) lives here
    caplog.set_level(logging.INFO)

    # Before connecting, nothing that needs a backend is enabled.
    assert not ui.trainButton.enabled and not ui.segmentButton.enabled and not ui.addCaseButton.enabled

    # Connect: the panel starts the local backend with the Python it is told to use.
    ui.localRadioButton.checked = True
    ui.pythonLineEdit.text = sys.executable
    ui.connectButton.click()  # the backend starts in a worker thread: the event loop goes on meanwhile
    assert widget.connecting and ui.backendStatusLabel.text == "starting the local backend..."
    assert not ui.connectButton.enabled and not ui.addCaseButton.enabled
    stall = pump(app, lambda: widget.idle, timeout_s=300, tick_s=0.01)
    assert stall < 0.1, f"the Qt event loop stalled {stall:.3f} s while the local backend started"
    assert ui.backendStatusLabel.text.startswith("connected: crossmodalseg"), ui.backendStatusLabel.text
    assert ui.modelComboBox.count == 0
    # This backend has no GPU: the device box offers none.
    assert [ui.deviceComboBox.itemText(i) for i in range(ui.deviceComboBox.count)] == ["auto", "cpu"]

    # Add the unpaired cases: each volume with its segmentation is its own case.
    assert ui.datasetComboBox.count == 0  # a fresh backend has no dataset yet
    ui.datasetComboBox.currentText = "abdomen"
    ui.targetModalityLineEdit.text, ui.assistantModalityLineEdit.text = "ct", "mr"
    ui.targetTypeComboBox.currentText, ui.assistantTypeComboBox.currentText = "CT", "MR"
    ui.pairedCheckBox.checked = False
    ui.targetVolumeSelector.setCurrentNode(panel["ct"])
    ui.targetSegmentationSelector.setCurrentNode(panel["ct_labels"])
    ui.assistantVolumeSelector.setCurrentNode(panel["mr"])
    ui.assistantSegmentationSelector.setCurrentNode(panel["mr_labels"])
    before = node_ids(scene)
    ui.addCaseButton.click()  # the files are written here, the uploads run in worker threads
    assert widget.uploading and not ui.addCaseButton.enabled and not ui.trainButton.enabled
    stall = pump(app, lambda: widget.idle, timeout_s=300, tick_s=0.01)  # the uploads, then the dataset listing
    assert stall < 0.1, f"the Qt event loop stalled {stall:.3f} s while the cases were uploaded"
    assert "2 in 'abdomen'" in ui.casesLabel.text, ui.casesLabel.text
    assert node_ids(scene) == before  # uploading leaves nothing behind in the scene
    assert "mkd" in ui.methodHintLabel.text and "unpaired" in ui.methodHintLabel.text

    # Train MKD (as suggested) for a minute of wall time (the panel's minutes replace its epochs; fine-tuning gets a
    # quarter, at least half a minute); the timer polls progress into the bar and the log.
    ui.methodComboBox.currentIndex = panel["module"].METHOD_CHOICES.index("mkd")
    ui.minutesSpinBox.value = 1
    assert ui.trainButton.enabled
    ui.trainButton.click()  # submitted from a worker thread; the progress timer starts once the backend has the job
    assert widget.submitting and not ui.trainButton.enabled and not ui.segmentButton.enabled
    pump(app, widget.timer.isActive, timeout_s=60)
    assert ui.cancelButton.enabled and not ui.trainButton.enabled  # busy
    pump(app, lambda: widget.idle, timeout_s=900)  # training, then the model list in a worker thread
    assert ui.progressBar.value == 100
    assert re.search(r"epoch 1/\d+  loss ", ui.logTextEdit.plainText), ui.logTextEdit.plainText
    assert ui.modelComboBox.count == 1 and ui.modelComboBox.currentText.startswith("mkd: ct + mr")
    assert ui.segmentButton.enabled and ui.finetuneButton.enabled

    # Segment: the request runs off the GUI thread; the event loop keeps going meanwhile.
    ui.membersCheckBox.checked = ui.uncertaintyCheckBox.checked = True
    before = node_ids(scene)
    ui.segmentButton.click()
    assert widget.pendingSegmentation is not None and not ui.segmentButton.enabled
    pending = widget.pendingSegmentation
    # While it runs: the nodes made at its end (on this thread, by design) are not part of the wait.
    stall = pump(app, pending.done, timeout_s=600, tick_s=0.01, while_=lambda: widget.pendingSegmentation is not None)
    assert stall < 0.1, f"the Qt event loop stalled {stall:.3f} s while the segmentation ran"
    pump(app, lambda: widget.pendingSegmentation is None, timeout_s=60)  # the nodes are made on this thread
    result = widget.result
    added = node_ids(scene) - before
    assert result.segmentation.GetID() in added and result.disagreement.GetID() in added
    assert {n.GetID() for n in result.members.values()} <= added
    assert ui.correctionSelector.currentNode() is result.segmentation
    # One member pair for MKD, named once; one value per structure.
    assert ui.agreementLabel.text.startswith("Dice between members (seg_target vs seg_assistant) — "), (
        ui.agreementLabel.text)
    # The member agreement table is shown in a table view.
    assert app.layouts[-1] == slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView
    assert app.applicationLogic().GetSelectionNode().GetActiveTableID() == result.agreement_table.GetID()
    views = [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(3)]
    assert all(v.GetForegroundVolumeID() == result.disagreement.GetID() for v in views)
    assert all(v.GetBackgroundVolumeID() == panel["ct"].GetID() for v in views)

    # Responsiveness on a full-size CT (CHAOS, 512x512x78): the Qt event loop never stalls 100 ms while it is
    # segmented. (The inputs are written on the GUI thread in the click, the nodes made there at the end.)
    from CrossModalSegLib import scene as mrml

    chaos = mrml.read_volume(scene, shared_data("chaos_ct_liver") / "chaos_ct_case_liver_image.nii.gz", "CHAOS CT")
    ui.targetVolumeSelector.setCurrentNode(chaos)
    ui.membersCheckBox.checked = ui.uncertaintyCheckBox.checked = False
    started = time.monotonic()
    ui.segmentButton.click()
    click_s = time.monotonic() - started
    stall = pump(app, widget.pendingSegmentation.done, timeout_s=600, tick_s=0.01,
                 while_=lambda: widget.pendingSegmentation is not None)
    finishing = time.monotonic()
    pump(app, lambda: widget.pendingSegmentation is None, timeout_s=60)
    print(f"CHAOS CT segmentation in the panel: click {click_s:.2f} s, longest stall while it ran {stall:.3f} s, "
          f"nodes made in {time.monotonic() - finishing:.2f} s, in all {time.monotonic() - started:.1f} s")
    assert stall < 0.1, f"the Qt event loop stalled {stall:.3f} s while the CHAOS CT was segmented"
    assert widget.result.segmentation.GetName() == "CHAOS CT segmentation"
    for node in (widget.result.segmentation, chaos):
        scene.RemoveNode(node)
    widget.result = result  # back to the abdomen CT's result for the steps below
    ui.correctionSelector.setCurrentNode(result.segmentation)
    ui.targetVolumeSelector.setCurrentNode(panel["ct"])
    ui.membersCheckBox.checked = ui.uncertaintyCheckBox.checked = True

    # QA toggles: members hidden and shown, the disagreement map over the CT.
    ui.showMembersCheckBox.checked = False
    assert all(not m.GetDisplayNode().GetVisibility() for m in result.members.values())
    ui.showMembersCheckBox.checked = True
    assert all(m.GetDisplayNode().GetVisibility() for m in result.members.values())

    # Show 3D: surfaces of the segments in the 3D view.
    ui.show3DCheckBox.checked = True
    assert result.segmentation.GetSegmentation().ContainsRepresentation("Closed surface")
    assert result.segmentation.GetDisplayNode().GetVisibility3D()

    # Correct: the Segment Editor opens on the result, with the CT it was made from as its source volume, even
    # though the user has selected another target volume since.
    ui.targetVolumeSelector.setCurrentNode(panel["mr"])
    assert ui.correctButton.enabled
    ui.correctButton.click()
    assert app.selected_modules[-1] == "SegmentEditor"
    editor = scene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
    assert editor.GetSegmentationNode() is result.segmentation and editor.GetSourceVolumeNode() is panel["ct"]

    # Submit: the segmentation goes back as the CT case's final label (the CT's, whatever is selected now) and
    # fine-tuning starts by itself.
    ct_case = widget.logic.case_of({"ct": panel["ct"]})
    assert ct_case is not None
    before_nodes = node_ids(scene)
    ui.submitCorrectionButton.click()
    pump(app, lambda: widget.timer.isActive() or widget.idle, timeout_s=300)
    assert f"correction of case {ct_case} stored as its final label" in ui.logTextEdit.plainText
    assert widget.timer.isActive()  # fine-tuning, started once the correction arrived
    assert "fine-tuning job" in ui.logTextEdit.plainText
    ui.targetVolumeSelector.setCurrentNode(panel["ct"])
    pump(app, lambda: widget.idle, timeout_s=900)
    assert node_ids(scene) == before_nodes
    assert ui.modelComboBox.count == 2  # the fine-tuned model, chosen
    ui.minutesSpinBox.value = 0  # back to epochs for the module's other sessions on this panel
    tuned = widget.logic.model_id
    assert widget.listedModels[ui.modelComboBox.currentIndex] == tuned

    # Cancel a segmentation: the panel stops waiting at once and the backend stops predicting (its answer is the
    # 409 of a cancelled prediction, not a result); nothing of it reaches the scene or stays on disk.
    before_nodes = node_ids(scene)
    folders_before = set(widget.logic.work.glob("segment-*"))
    ui.segmentButton.click()
    cancelled = widget.pendingSegmentation
    assert cancelled is not None and ui.cancelButton.enabled
    ui.cancelButton.click()
    assert widget.pendingSegmentation is None and ui.segmentButton.enabled and not ui.cancelButton.enabled
    assert "segmentation cancelled" in ui.logTextEdit.plainText
    # Its worker thread still tells the backend: the request timer (which gives it the GIL in Slicer) keeps ticking.
    assert cancelled.done() or widget.requestTimer.isActive()
    pump(app, cancelled.done, timeout_s=600)
    assert isinstance(cancelled.error, BackendError) and cancelled.error.status == 409, cancelled.error
    settle = time.monotonic() + 0.5  # a few more timer ticks: the discarded result must stay discarded
    pump(app, lambda: time.monotonic() > settle, timeout_s=5)
    assert not widget.requestTimer.isActive()  # once the cancelled request has wound down, nothing ticks
    assert node_ids(scene) == before_nodes and widget.result.segmentation is result.segmentation
    assert set(widget.logic.work.glob("segment-*")) == folders_before  # its inputs and result are gone

    # Segment again with the fine-tuned model.
    ui.segmentButton.click()
    pump(app, lambda: widget.pendingSegmentation is None, timeout_s=600)
    assert widget.result.segmentation is not result.segmentation

    # Export the model and import it again: both transfers run off the GUI thread; the copy is listed and chosen.
    assert ui.exportModelButton.enabled and ui.importModelButton.enabled
    archive = panel["home"] / "exported.zip"
    widget.exportModelTo(str(archive))  # what Export... does with the file dialog's answer
    pump(app, lambda: not widget.pendingRequests, timeout_s=300)
    assert archive.is_file() and f"model saved to {archive}" in ui.logTextEdit.plainText
    widget.importModelFrom(str(archive))
    pump(app, lambda: not widget.pendingRequests, timeout_s=300)
    imported = widget.logic.model_id
    assert ui.modelComboBox.count == 3 and imported not in (tuned, None)
    assert ui.modelComboBox.currentText.startswith("mkd: ct + mr")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors

    # The user goes back to the fine-tuned model; the parameter node keeps that choice with the scene.
    widget.ui.modelComboBox.activated.emit(widget.listedModels.index(tuned))
    pump(app, lambda: widget.idle, timeout_s=60)
    assert widget.logic.model_id == tuned and widget.listedModels[ui.modelComboBox.currentIndex] == tuned

    # A restarted panel (Slicer closed and opened again) on this scene: URL and Python come back from QSettings, the
    # selections from the parameter node (volumes, dataset, modalities, the model once the backend lists it).
    url, token = widget.logic.client.url, widget.logic.client.token
    again = panel["module"].CrossModalSegWidget()
    again.setup()
    try:
        assert again.ui.pythonLineEdit.text == sys.executable and again.ui.localRadioButton.checked
        assert not again.ui.segmentButton.enabled
        assert again.ui.targetVolumeSelector.currentNode() is panel["ct"]
        assert again.ui.assistantVolumeSelector.currentNode() is panel["mr"]
        assert again.ui.datasetComboBox.currentText == "abdomen" and not again.ui.pairedCheckBox.checked
        assert (again.ui.targetModalityLineEdit.text, again.ui.assistantModalityLineEdit.text) == ("ct", "mr")
        again.logic.connect(url, token)  # the running backend (a second local one would refuse its home)
        again.startRefresh()
        pump(app, lambda: again.idle, timeout_s=60)
        assert [again.ui.datasetComboBox.itemText(i) for i in range(again.ui.datasetComboBox.count)] == ["abdomen"]
        assert again.logic.model_id == tuned != imported  # the kept choice, not the newest model
        assert again.logic.dataset_id == "abdomen" and again.ui.datasetComboBox.currentText == "abdomen"
        assert "2 in 'abdomen'" in again.ui.casesLabel.text
        assert again.ui.segmentButton.enabled and again.ui.finetuneButton.enabled
        again.ui.datasetComboBox.activated.emit(0)  # the user picks the dataset: Train works on it
        pump(app, lambda: again.idle, timeout_s=60)
        assert again.logic.dataset_id == "abdomen" and again.ui.trainButton.enabled
    finally:
        again.logic.client = None  # the backend belongs to the first panel
        again.cleanup()


@pytest.mark.slow
def test_the_in_application_self_test_drives_this_panel_to_a_segmentation(panel, monkeypatch, tmp_path):
    """`CrossModalSegTest` runs only inside Slicer (it downloads a sample); the session it clicks through,
    `panel_self_test`, runs here on the same panel, so the self-test a user starts is tested code. Without the
    backend the self-test skips, saying what to install."""
    module, widget = panel["module"], panel["widget"]
    monkeypatch.setenv("HOME", str(panel["home"]))
    widget.ui.minutesSpinBox.value = 30  # a minutes budget the user left set: the self-test still trains one epoch
    module.panel_self_test(widget, panel["ct"], panel["ct_labels"], tmp_path / "selftest-home", sys.executable,
                           timeout_s=900)
    assert widget.logic.local.home == tmp_path / "selftest-home" and widget.logic.dataset_id == "selftest"
    assert "epoch 1/1  loss " in widget.ui.logTextEdit.plainText and widget.ui.minutesSpinBox.value == 0
    assert module.backend_missing() is None  # this Python has the backend
    monkeypatch.setattr(module, "torch_installed", lambda: False)
    assert "click 'Install backend'" in module.backend_missing()


BRATS_LABELS = {"background": 0, "necrosis": 1, "edema": 2, "non-enhancing": 3, "enhancing": 4}


@pytest.mark.slow
def test_a_paired_session_maml_cmc_cancel_resume_and_a_backend_that_dies(panel, monkeypatch, caplog):
    """The paired paths of issue 12 in the panel, on real co-registered BraTS FLAIR + T1c: two labelled pairs ->
    early fusion is suggested, MAML chosen and trained -> segments with both modalities and with T1c missing; an
    unlabelled pair -> CMC is suggested; its training is cancelled, then resumed, and the backend dies mid-job: the
    panel says so and stops polling, with no traceback out of a slot. (Runs last: it ends the module's backend.)"""
    from CrossModalSegLib import scene as mrml

    app, scene, widget, ui, module = (panel["app"], panel["scene"], panel["widget"], panel["widget"].ui,
                                      panel["module"])
    monkeypatch.setenv("HOME", str(panel["home"]))
    caplog.set_level(logging.INFO)
    folder = shared_data("brats2015_flair_t1c")
    pairs = []
    for case in sorted(p for p in folder.iterdir() if p.is_dir())[:3]:
        flair = mrml.read_volume(scene, case / "Flair_subtrMeanDivStd.nii.gz", f"{case.name} FLAIR")
        t1c = mrml.read_volume(scene, case / "T1c_subtrMeanDivStd.nii.gz", f"{case.name} T1c")
        tumour = mrml.add_segmentation(scene, case / "OTMultiClass.nii.gz", flair, BRATS_LABELS,
                                       f"{case.name} tumour")
        pairs.append((flair, t1c, tumour))

    ui.localRadioButton.checked = True
    ui.pythonLineEdit.text = sys.executable
    ui.connectButton.click()  # keeps the module's running backend, or starts one when this test runs alone
    pump(app, lambda: widget.idle, timeout_s=300)
    assert ui.backendStatusLabel.text.startswith("connected: crossmodalseg"), ui.backendStatusLabel.text

    # Two labelled pairs (same patient, co-registered): one case each, with the tumour drawn on the FLAIR.
    ui.datasetComboBox.currentText = "brain"
    ui.targetModalityLineEdit.text, ui.assistantModalityLineEdit.text = "flair", "t1c"
    ui.targetTypeComboBox.currentText, ui.assistantTypeComboBox.currentText = "MR", "MR"
    ui.pairedCheckBox.checked = True
    ui.assistantSegmentationSelector.setCurrentNode(None)
    ui.methodComboBox.currentIndex = module.METHOD_CHOICES.index("auto")  # the method the data suggest

    def add_pair(flair, t1c, tumour):
        ui.targetVolumeSelector.setCurrentNode(flair)
        ui.assistantVolumeSelector.setCurrentNode(t1c)
        ui.targetSegmentationSelector.setCurrentNode(tumour)
        ui.addCaseButton.click()
        pump(app, lambda: widget.idle, timeout_s=300)

    before = node_ids(scene)
    for flair, t1c, tumour in pairs[:2]:
        add_pair(flair, t1c, tumour)
    assert "2 in 'brain'" in ui.casesLabel.text, ui.casesLabel.text
    assert node_ids(scene) == before
    # Complete labelled pairs: early fusion is suggested (it scored above MAML there); MAML is chosen by hand.
    hint = ui.methodHintLabel.text
    assert hint.startswith("suggested: single") and "early fusion" in hint and "maml" in hint, hint
    ui.methodComboBox.currentIndex = module.METHOD_CHOICES.index("maml")
    assert ui.methodHintLabel.text == "chosen: maml; suggested: single", ui.methodHintLabel.text

    # MAML for one short epoch.
    ui.epochsSpinBox.value = 1
    ui.trainButton.click()
    pump(app, lambda: widget.idle, timeout_s=900)
    assert ui.modelComboBox.currentText.startswith("maml: flair + t1c"), ui.modelComboBox.currentText

    # Segment the first pair with both modalities, then with T1c missing (MAML predicts from what it gets).
    ui.targetVolumeSelector.setCurrentNode(pairs[0][0])
    ui.assistantVolumeSelector.setCurrentNode(pairs[0][1])
    ui.membersCheckBox.checked = ui.uncertaintyCheckBox.checked = True
    ui.segmentButton.click()
    pump(app, lambda: widget.pendingSegmentation is None, timeout_s=600)
    both = widget.result
    assert set(both.members) >= {"fused", "branch_flair", "branch_t1c"}, set(both.members)
    assert [both.segmentation.GetSegmentation().GetNthSegment(i).GetName() for i in range(4)] == list(
        BRATS_LABELS)[1:]
    ui.assistantVolumeSelector.setCurrentNode(None)
    ui.segmentButton.click()
    pump(app, lambda: widget.pendingSegmentation is None, timeout_s=600)
    assert widget.result is not both and widget.result.modality == "flair"

    # An unlabelled pair: CMC is suggested; its training is cancelled from the panel.
    ui.targetSegmentationSelector.setCurrentNode(None)
    add_pair(pairs[2][0], pairs[2][1], None)
    ui.methodComboBox.currentIndex = module.METHOD_CHOICES.index("auto")
    assert "3 in 'brain'" in ui.casesLabel.text and ui.methodHintLabel.text.startswith("suggested: cmc"), (
        ui.methodHintLabel.text)
    ui.epochsSpinBox.value = 40
    ui.trainButton.click()
    pump(app, widget.timer.isActive, timeout_s=60)
    job = widget.logic.job_id
    pump(app, lambda: widget.logic.client.job(job)["state"] == "running", timeout_s=300)
    assert ui.cancelButton.enabled
    caplog.clear()
    ui.cancelButton.click()
    pump(app, lambda: not widget.timer.isActive(), timeout_s=120)
    assert widget.logic.client.job(job)["state"] == "cancelled"
    # asked for by the user: a line in the log, not an error box ("The job ended cancelled")
    assert "the job was cancelled" in ui.logTextEdit.plainText
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records
    assert [j["id"] for j in widget.logic.resumable_trainings()][0] == job and ui.resumeButton.enabled

    # Resume it, then the backend dies mid-job: the panel backs off, then says the backend is lost and stops.
    monkeypatch.setattr(module, "POLL_GIVE_UP_AFTER", 2)
    ui.resumeButton.click()  # the stand-in answers the confirmation with OK
    pump(app, widget.timer.isActive, timeout_s=60)  # the stopped trainings listed, the job resumed
    assert widget.logic.job_id == job and "resumed training job" in ui.logTextEdit.plainText
    pump(app, lambda: widget.logic.client.job(job)["state"] == "running", timeout_s=300)
    caplog.clear()
    widget.logic.local.process.kill()
    pump(app, lambda: not widget.timer.isActive(), timeout_s=60)
    assert "lost the backend" in ui.logTextEdit.plainText
    assert not ui.cancelButton.enabled
    tracebacks = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
