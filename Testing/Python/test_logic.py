"""The module's logic against slicer-core's real MRML scene and a real backend that the logic starts on 127.0.0.1:
CT and MR (different patients, different direction matrices) -> add cases -> train -> segment -> QA nodes ->
correct -> submit as `final` -> fine-tune -> segment with the new model."""

from __future__ import annotations

import socket
import threading
import time
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from conftest import make_scene, shared_data
from CrossModalSegLib import scene as mrml
from CrossModalSegLib.client import BackendClient, BackendError
from CrossModalSegLib.logic import (
    CrossModalSegLogic,
    correction_volumes,
    describe_event,
    model_title,
    poll_interval_ms,
    predicted_structures,
    prediction_inputs,
    safe_id,
    structures_fit,
    training_budget,
)

STRUCTURES = ["liver", "kidney_right", "kidney_left", "spleen"]
# MKD as suggested, with the non-learned alignment: a 3D CycleGAN costs ~25 s per iteration on 2 CPU cores, and
# MKD's CycleGAN path is tested (and benchmarked) in the backend's own tests.
TINY = {"epochs": 2, "iterations_per_epoch": 4, "options": {"iam": "histogram"}}


def load_case(scene, folder: Path, stem: str, name: str):
    """A volume as Slicer loads it (storage node), in a patient folder of the subject hierarchy, and its label map
    as a segmentation with named segments (what a user brings: a volume and a segmentation of it)."""
    volume = mrml.read_volume(scene, folder / f"{stem}.nii.gz", name)
    volume.CreateDefaultDisplayNodes()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), f"patient {name}")
    sh.CreateItem(patient, volume)
    labels = {"background": 0, **{s: i for i, s in enumerate(STRUCTURES, start=1)}}
    segmentation = mrml.add_segmentation(scene, folder / f"{stem}_label4.nii.gz", volume, labels, f"{name} labels")
    return volume, segmentation


def paint(segmentation, volume, structure: str, mask: np.ndarray) -> None:
    """What a Segment Editor effect does: replace one segment's voxels on the volume's grid."""
    image = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(volume)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(mask.shape)[:] = mask
    segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName(structure)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, segmentation, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)


def exported_on(segmentation, volume) -> np.ndarray:
    """The segmentation as label values 1..4 on the volume's grid, through Slicer's own export."""
    ids = vtk.vtkStringArray()
    s = segmentation.GetSegmentation()
    for structure in STRUCTURES:
        ids.InsertNextValue(s.GetSegmentIdBySegmentName(structure))
    labelmap = segmentation.GetScene().AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, ids, labelmap, volume)
    array = slicer.util.arrayFromVolume(labelmap).copy()
    segmentation.GetScene().RemoveNode(labelmap)
    return array


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    folder = shared_data("totalsegmentator_ct_mr_examples")
    scene = make_scene()
    ct, ct_labels = load_case(scene, folder, "example_ct_sm", "CT")
    mr, mr_labels = load_case(scene, folder, "example_mr_sm", "MR")
    logic = CrossModalSegLogic(scene, tmp_path_factory.mktemp("work"))
    try:
        info = logic.start_local_backend(home=tmp_path_factory.mktemp("backend"))
        assert "mkd" in info["methods"]
        yield {"scene": scene, "logic": logic, "ct": ct, "mr": mr, "ct_labels": ct_labels, "mr_labels": mr_labels,
               "folder": folder}
    finally:
        logic.cleanup()


def test_directions_of_the_inputs_differ(session):
    # The point of these two images: the CT is flipped in x and y relative to the MR (LPS diag(-1,-1,1) vs identity).
    directions = []
    for node in (session["ct"], session["mr"]):
        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASDirectionMatrix(matrix)
        directions.append([matrix.GetElement(i, i) for i in range(3)])
    assert directions[0] != directions[1]


def test_the_suggested_method_follows_the_dataset_from_complete_pairs_to_missing_modalities_and_unlabelled_pairs(
        session):
    """Complete labelled pairs -> `single` early fusion (it scored above MAML there: backend/benchmarks/RESULTS.md);
    a case with one modality missing -> MAML (it segments any subset); an unlabelled pair -> CMC; nothing paired ->
    MKD. (Before the workflow test, which chooses its own dataset; the tests after it leave no backend.)"""
    logic, ct, ct_labels = session["logic"], session["ct"], session["ct_labels"]
    labels = logic.labels_from_segmentation(ct_labels)
    logic.use_dataset("suggestions", labels, {"a": "CT", "b": "CT"})
    assert logic.suggest_method("a", ["b"]) == ("single", "no case holds these modalities yet")
    logic.add_case({"a": ct, "b": ct}, {"a": ct_labels})  # one volume twice: a pair as co-registered as it gets
    method, reason = logic.suggest_method("a", ["b"])
    assert method == "single" and "early fusion" in reason and "maml" in reason, reason
    assert logic.suggest_method("a", [])[0] == "single"
    logic.add_case({"a": ct}, {"a": ct_labels})
    method, reason = logic.suggest_method("a", ["b"])
    assert method == "maml" and "missing" in reason, reason
    logic.add_case({"a": ct, "b": ct})
    assert logic.suggest_method("a", ["b"])[0] == "cmc"

    logic.use_dataset("suggestions-unpaired", labels, {"a": "CT", "b": "CT"})
    logic.add_case({"a": ct}, {"a": ct_labels})
    logic.add_case({"b": ct}, {"b": ct_labels})
    assert logic.suggest_method("a", ["b"])[0] == "mkd"



def test_two_cases_uploaded_together_from_volumes_with_one_name_stay_two_cases(session):
    """The panel starts an unpaired CT and MR as two uploads at once; with one name ("Volume", as two loaded files
    often are) both must not take the same id before either reaches the backend: the second case would land in the
    first, making one paired case of two patients."""
    logic, ct, ct_labels = session["logic"], session["ct"], session["ct_labels"]
    logic.use_dataset("one-name", logic.labels_from_segmentation(ct_labels), {"a": "CT", "b": "CT"})
    first = logic.start_add_case({"a": ct}, {"a": ct_labels})
    second = logic.start_add_case({"b": ct}, {"b": ct_labels})
    assert first.wait(120) and second.wait(120)
    ids = [logic.finish_upload(first), logic.finish_upload(second)]
    base = safe_id(ct.GetName())
    assert sorted(ids) == [base, f"{base}_2"], ids
    cases = {c["id"]: sorted(c["images"]) for c in logic.client.dataset("one-name")["cases"]}
    assert cases == {ids[0]: ["a"], ids[1]: ["b"]}, cases
    assert logic._ids_in_flight == set()  # nothing stays reserved once the uploads are done

@pytest.mark.slow
def test_add_cases_train_segment_correct_and_finetune(session, tmp_path: Path):
    logic, scene, ct, mr = session["logic"], session["scene"], session["ct"], session["mr"]
    labels = logic.labels_from_segmentation(session["ct_labels"])
    assert list(labels) == ["background", *STRUCTURES]
    logic.use_dataset("abdomen", labels, {"ct": "CT", "mr": "MR"})

    # Unpaired: the CT and the MR are different people, so each is its own case.
    ct_case = logic.add_case({"ct": ct}, {"ct": session["ct_labels"]})
    mr_case = logic.add_case({"mr": mr}, {"mr": session["mr_labels"]})
    assert (ct_case, mr_case) == ("CT", "MR")
    stored = logic.client.dataset("abdomen")
    truth = sitk.ReadImage(str(session["folder"] / "example_ct_sm_label4.nii.gz"))
    sent = tmp_path / "sent.nrrd"
    sent.write_bytes(logic.client.label("abdomen", ct_case, "ct"))
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(sent))), sitk.GetArrayFromImage(truth))
    assert {c["id"] for c in stored["cases"]} == {"CT", "MR"}

    method, reason = logic.suggest_method("ct", ["mr"])
    assert method == "mkd" and "unpaired" in reason
    logic.train("ct", ["mr"], **TINY)
    messages = []
    while True:  # as the Widget's timer does
        progress = logic.poll()
        messages += progress.messages
        if progress.finished:
            break
        time.sleep(0.5)
    assert progress.state == "succeeded", progress.error
    assert any(m.startswith("epoch 2/2") for m in messages) and progress.fraction == 1.0
    first_model = logic.model_id

    result = logic.segment({"ct": ct}, members=True, uncertainty=True)
    seg = result.segmentation
    assert seg.GetName() == "CT segmentation"
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()) is ct
    s = seg.GetSegmentation()
    assert [s.GetNthSegment(i).GetName() for i in range(s.GetNumberOfSegments())] == STRUCTURES
    for i, structure in enumerate(STRUCTURES):
        assert np.allclose(s.GetNthSegment(i).GetColor(), mrml.structure_color(i))
    # Voxel-exact: what Slicer exports on the CT's grid is what the backend wrote, and the backend wrote the CT's grid.
    written = sitk.ReadImage(str(result.files["segmentation.nrrd"]))
    assert np.array_equal(exported_on(seg, ct), sitk.GetArrayFromImage(written))
    original = sitk.ReadImage(str(session["folder"] / "example_ct_sm.nii.gz"))
    assert written.GetSize() == original.GetSize()
    assert np.allclose(written.GetOrigin(), original.GetOrigin(), atol=1e-4)
    assert np.allclose(written.GetDirection(), original.GetDirection())
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == sh.GetItemParent(sh.GetItemByDataNode(ct))

    # QA: members, disagreement with a colour map, agreement table.
    assert set(result.members) == {"seg_target", "seg_assistant"}
    assert all(m.GetName().startswith("CT member ") for m in result.members.values())
    assert result.disagreement is not None
    assert result.disagreement.GetDisplayNode().GetColorNode().GetName() == mrml.DISAGREEMENT_COLORS
    assert slicer.util.arrayFromVolume(result.disagreement).shape == slicer.util.arrayFromVolume(ct).shape
    table = result.agreement_table
    assert table.GetNumberOfRows() == len(STRUCTURES) and table.GetNumberOfColumns() == 2

    # The clinician corrects the liver (here: replaces it with the reference liver) and submits the correction.
    reference = sitk.GetArrayFromImage(truth)
    paint(seg, ct, "liver", (reference == 1).astype(np.uint8))
    case_id = logic.submit_correction(seg, {"ct": ct}, "ct")
    assert case_id == ct_case
    corrected = tmp_path / "corrected.nrrd"
    corrected.write_bytes(logic.client.label("abdomen", ct_case, "ct"))
    corrected_array = sitk.GetArrayFromImage(sitk.ReadImage(str(corrected)))
    assert np.array_equal(corrected_array, exported_on(seg, ct))
    assert np.array_equal(corrected_array == 1, (reference == 1) & (exported_on(seg, ct) == 1))
    # No copy of the patient's volumes or labels is kept (issue 12): only the backend's results, which the nodes
    # were loaded from, stay in the work folder until the module closes.
    assert not list(logic.work.glob("upload*")) and not list(logic.work.rglob("*label*.nrrd"))

    logic.finetune(epochs=1, iterations_per_epoch=3)
    tuned = logic.wait(timeout_s=900)
    assert tuned.state == "succeeded", tuned.error
    assert logic.model_id != first_model
    assert logic.client.model(logic.model_id)["training"]["init_from"].endswith(first_model)
    again = logic.segment({"ct": ct})
    assert again.segmentation.GetName() == "CT segmentation" and again.segmentation is not seg
    assert exported_on(again.segmentation, ct).shape == exported_on(seg, ct).shape


class SlowRelay:
    """A TCP relay that holds each connection `delay_s` before passing it on to the real backend: a slow network
    (the only stand-in here; the backend behind it is the real one)."""

    def __init__(self, target_url: str, delay_s: float):
        parsed = urllib.parse.urlsplit(target_url)
        self.target, self.delay_s = (parsed.hostname, parsed.port), delay_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        time.sleep(self.delay_s)
        upstream = socket.create_connection(self.target)
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


@pytest.mark.slow  # polls the jobs that the (slow) workflow test above ran
def test_a_poll_answered_after_another_job_was_started_loses_none_of_the_new_jobs_lines(session):
    """The panel polls in a worker thread. A poll of the last job that is answered after the next job was started
    must not count the last job's log lines as the new job's: that would skip the new job's first lines."""
    logic = session["logic"]
    real = logic.client
    jobs = [j["id"] for j in real.jobs() if j["state"] == "succeeded"]
    assert len(jobs) >= 2, "runs after the workflow test, which trains and fine-tunes"
    last, new = jobs[0], jobs[1]
    relay = SlowRelay(real.url, delay_s=0.5)
    following = logic.job_id, logic.model_id  # the tests below segment with the workflow's model
    try:
        logic.client = BackendClient(relay.url, real.token)
        logic._follow({"id": last})
        slow_poll = logic.start_poll()
        time.sleep(0.2)  # the poll is on its way through the slow network
        logic._follow({"id": new})  # as the panel does when the next training is submitted
        assert slow_poll.wait(30)
        assert logic.finish_call(slow_poll).state == "superseded"
        logic.client = real
        lines = logic.poll().messages
    finally:
        logic.client = real
        relay.close()
        logic._follow({"id": following[0]})
        logic.model_id = following[1]
    everything = [line for line in map(describe_event, real.events(new)["events"]) if line]
    assert lines == everything and lines, (lines, everything)


@pytest.mark.slow  # segments with the model that the (slow) workflow test above trains
def test_a_segmentation_runs_in_a_worker_thread_and_makes_nodes_only_when_finished(session):
    """Issue 12: *Segment* was a synchronous request on the GUI thread (about 20 s frozen for a CT on a CPU). Now
    the request runs in a worker thread that never touches the scene; the nodes are made by `finish_segment` on the
    scene's thread, and the copies of the inputs are gone."""
    logic, scene, ct, mr = session["logic"], session["scene"], session["ct"], session["mr"]
    assert logic.model_id is not None  # trained by the workflow test above
    before = node_ids(scene)
    pending = logic.start_segment({"ct": ct, "mr": mr}, members=True, uncertainty=True)
    assert set(pending.volumes) == {"ct"}  # MKD segments the CT: the MR is not sent
    assert added_since(scene, before) == []
    assert pending.wait(600) and pending.error is None
    assert added_since(scene, before) == []  # the worker thread made no node
    result = logic.finish_segment(pending)
    added = added_since(scene, before)
    assert result.segmentation in added and result.disagreement in added
    assert not list(logic.work.rglob("input_*.nrrd"))
    for node in added:
        scene.RemoveNode(node)


@pytest.mark.slow  # needs the models that the (slow) workflow test above trains
def test_after_a_restart_the_models_are_listed_chosen_and_a_stopped_training_resumes(session):
    """Issue 12 (6): after a restart or reconnect, Train, Fine-tune and Segment stayed disabled, the backend's models
    could not be chosen and interrupted trainings not resumed. A new logic (a restarted Slicer, a fresh scene)
    connected to the same backend lists the models newest first, chooses one (its dataset comes with it), segments
    with it, and resumes a stopped training."""
    first = session["logic"]
    assert first.model_id is not None  # the fine-tuned model of the workflow test
    restarted = CrossModalSegLogic(make_scene(), first.work / "restarted")
    restarted.connect(first.client.url, first.client.token)
    assert restarted.model_id is None and restarted.dataset_id is None
    models = restarted.models()
    assert [m["id"] for m in models][0] == first.model_id and len(models) >= 2
    assert model_title(models[0]).startswith("mkd: ct + mr")
    restarted.choose_model(models[0]["id"])
    assert restarted.dataset_id == "abdomen" and restarted.labels == first.labels
    ct = mrml.read_volume(restarted.scene, session["folder"] / "example_ct_sm.nii.gz", "CT again")
    result = restarted.segment({"ct": ct})
    assert result.segmentation.GetScene() is restarted.scene

    restarted.train("ct", ["mr"], method="mkd", epochs=2, iterations_per_epoch=3, options=TINY["options"])
    stopped_job = restarted.job_id
    restarted.cancel()
    assert restarted.wait(timeout_s=300).state == "cancelled"
    assert [j["id"] for j in restarted.resumable_trainings()][0] == stopped_job
    restarted.resume(stopped_job)
    finished = restarted.wait(timeout_s=900)
    assert finished.state == "succeeded", finished.error
    assert restarted.models()[0]["id"] == restarted.model_id == finished.model


@pytest.mark.slow  # trains on the workflow test's dataset
def test_connecting_again_keeps_the_local_backend_and_its_running_training(session):
    """Issue 12 (9): *Connect* stopped the local backend, and with it a running training, without asking. Connecting
    again with the same Python and home keeps the backend and its job; while a job runs, the panel is told that
    stopping would lose it (and asks)."""
    logic = session["logic"]
    url, process = logic.client.url, logic.local.process
    logic.train("ct", ["mr"], method="mkd", epochs=2, iterations_per_epoch=3, options=TINY["options"])
    assert logic.stopping_loses_work()
    assert "mkd" in logic.start_local_backend(home=logic.local.home)["methods"]
    assert logic.client.url == url and logic.local.process is process and logic.local.running()
    assert logic.wait(timeout_s=900).state == "succeeded"
    assert not logic.stopping_loses_work()


@pytest.mark.slow  # exports the workflow test's model
def test_a_model_exported_and_imported_again_segments_the_same(session, tmp_path: Path):
    """Issue 12 (6): model import/export had no UI. The logic moves the archives in worker threads; the imported
    copy is a model of its own that segments voxel-for-voxel like the original; a file that is no model archive
    is refused with the backend's reason."""
    logic, ct = session["logic"], session["ct"]
    original = logic.model_id
    pending = logic.start_model_export(tmp_path / "model")
    assert pending.wait(300)
    archive = logic.finish_call(pending)
    assert archive == tmp_path / "model.zip" and zipfile.is_zipfile(archive)
    assert not list(tmp_path.glob("*.partial"))
    pending = logic.start_model_import(archive)
    assert pending.wait(300)
    imported = logic.finish_call(pending)
    assert imported["id"] != original and imported["state"] == "ready" and imported["method"] == "mkd"
    first = exported_on(logic.segment({"ct": ct}, model_id=original).segmentation, ct)
    again = exported_on(logic.segment({"ct": ct}, model_id=imported["id"]).segmentation, ct)
    assert np.array_equal(first, again)
    not_a_model = tmp_path / "notes.zip"
    not_a_model.write_bytes(b"this is not a zip archive")
    pending = logic.start_model_import(not_a_model)
    assert pending.wait(60)
    with pytest.raises(BackendError, match="HTTP 4"):
        logic.finish_call(pending)
    with pytest.raises(ValueError, match="not a file"):
        logic.start_model_import(tmp_path / "missing.zip")
    logic.choose_model(original)


def test_the_work_folder_the_logic_made_is_deleted_when_the_module_closes(tmp_path: Path):
    """Issue 12 (7): temporary copies of patient data were never deleted. The work folder a logic made itself goes
    at cleanup, with whatever results it received; a folder it was given stays."""
    logic = CrossModalSegLogic(make_scene())
    work = logic.work
    (work / "segment-x" / "result").mkdir(parents=True)
    (work / "segment-x" / "result" / "segmentation.nrrd").write_bytes(b"result")
    logic.cleanup()
    assert not work.exists()
    given = tmp_path / "mine"
    CrossModalSegLogic(make_scene(), given).cleanup()
    assert given.is_dir()


def test_the_model_selector_names_method_modalities_dice_and_date():
    model = {"method": "maml", "target": "t1c", "modalities": {"flair": "MR", "t1c": "MR"},
             "training": {"val_dice": {"mean": 0.8312, "edema": 0.9}, "val_on": "held-out"},
             "created": time.mktime((2026, 11, 24, 10, 31, 7, 0, 0, -1))}  # 10:31 local time
    assert model_title(model) == "maml: t1c + flair, Dice 0.83 (held-out), 2026-11-24 10:31"
    assert model_title({"method": "single", "target": "ct", "modalities": {"ct": "CT"}}) == "single: ct"


def test_polling_backs_off_while_the_backend_does_not_answer():
    assert [poll_interval_ms(n) for n in range(7)] == [1000, 2000, 4000, 8000, 16000, 30000, 30000]


def test_clear_errors_for_wrong_inputs(session, tmp_path: Path):
    logic, scene, ct = session["logic"], session["scene"], session["ct"]
    stray = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "stray")
    stray.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    stray.GetSegmentation().SetSourceRepresentationName(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    stray.GetSegmentation().AddEmptySegment("tumour", "tumour")
    logic.use_dataset("abdomen", logic.labels_from_segmentation(session["ct_labels"]), {"ct": "CT", "mr": "MR"})
    with pytest.raises(mrml.SceneError, match="'tumour'.*not structures of this dataset"):
        logic.add_case({"ct": ct}, {"ct": stray})
    with pytest.raises(ValueError, match="modality 'pet'"):
        logic.add_case({"pet": ct})
    with pytest.raises(ValueError, match="other labels|structures"):
        logic.use_dataset("abdomen", {"background": 0, "tumour": 1}, {"ct": "CT"})
    transformed = mrml.read_volume(scene, session["folder"] / "example_ct_sm.nii.gz", "moved CT")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transformed.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(mrml.SceneError, match="harden"):
        mrml.write_volume(transformed, tmp_path / "x.nrrd")
    with pytest.raises(BackendError, match="cannot reach"):
        logic.connect("http://127.0.0.1:9", "token")


def test_structures_missing_from_a_label_map_still_get_their_segment(session, tmp_path: Path):
    scene, ct = session["scene"], session["ct"]
    empty = sitk.Image(sitk.ReadImage(str(session["folder"] / "example_ct_sm_label4.nii.gz")) * 0)
    sitk.WriteImage(empty, str(tmp_path / "empty.nrrd"))
    labels = {"background": 0, **{s: i for i, s in enumerate(STRUCTURES, start=1)}}
    seg = mrml.add_segmentation(scene, tmp_path / "empty.nrrd", ct, labels, "empty")
    s = seg.GetSegmentation()
    assert [s.GetNthSegment(i).GetName() for i in range(s.GetNumberOfSegments())] == STRUCTURES
    assert not exported_on(seg, ct).any()


def added_since(scene, before: set[str]) -> list:
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    return [n for n in nodes if n.GetID() not in before]


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def test_writing_and_reading_segmentations_leaves_no_nodes_behind(session, tmp_path: Path):
    """Issue 12: each labelled *Add case* and each correction left a `_ColorTable` node and an orphan display node
    in the scene (saved with it)."""
    scene, ct, ct_labels = session["scene"], session["ct"], session["ct_labels"]
    labels = {"background": 0, **{s: i for i, s in enumerate(STRUCTURES, start=1)}}
    before = node_ids(scene)
    mrml.write_segmentation(ct_labels, ct, labels, tmp_path / "exported.nrrd")
    assert added_since(scene, before) == []
    segmentation = mrml.add_segmentation(scene, tmp_path / "exported.nrrd", ct, labels, "read back")
    added = added_since(scene, before)
    assert segmentation in added
    assert {n.GetClassName() for n in added} <= {"vtkMRMLSegmentationNode", "vtkMRMLSegmentationDisplayNode"}
    scene.RemoveNode(segmentation)


def test_the_disagreement_map_is_transparent_where_members_agree_and_absent_when_zero(session, tmp_path: Path):
    """Issue 12: the map used a colour table that shows 0 as opaque red, washing every slice red where members
    agree (and the whole view for one-member models, whose map is all zero)."""
    scene, ct = session["scene"], session["ct"]
    grid = sitk.ReadImage(str(session["folder"] / "example_ct_sm.nii.gz"))
    zero = sitk.Cast(grid * 0, sitk.sitkFloat32)
    sitk.WriteImage(zero, str(tmp_path / "zero.nrrd"))
    before = node_ids(scene)
    assert mrml.add_disagreement_volume(scene, tmp_path / "zero.nrrd", ct, "nothing to show") is None
    assert added_since(scene, before) == []
    blob = sitk.GetArrayFromImage(zero)
    blob[10:20, 20:40, 20:40] = 0.3
    image = sitk.GetImageFromArray(blob)
    image.CopyInformation(grid)
    sitk.WriteImage(image, str(tmp_path / "blob.nrrd"))
    maps = [mrml.add_disagreement_volume(scene, tmp_path / "blob.nrrd", ct, f"map {i}") for i in range(2)]
    display = maps[0].GetDisplayNode()
    colors = display.GetColorNode()
    rgba = [0.0] * 4
    colors.GetColor(0, rgba)
    assert rgba[3] == 0.0  # agreement is transparent ...
    assert display.GetApplyThreshold() and 0 < display.GetLowerThreshold() < 0.3  # ... and below the threshold
    colors.GetColor(colors.GetNumberOfColors() - 1, rgba)
    assert rgba[3] == 1.0 and sum(rgba[:3]) > 2.0  # the most disagreement: opaque and bright
    assert maps[1].GetDisplayNode().GetColorNode() is colors  # one colour table per scene
    assert scene.GetNodesByName(mrml.DISAGREEMENT_COLORS).GetNumberOfItems() == 1
    for node in maps:
        scene.RemoveNode(node)


def test_a_segmentation_sends_only_what_the_model_reads():
    """Issue 12: a `single` model failed while an assistant volume was still selected, and MKD uploaded the MR on
    every *Segment* for nothing (its ensemble runs on the target image)."""
    mkd = {"method": "mkd", "target": "ct", "modalities": {"ct": "CT", "mr": "MR"}}
    assert prediction_inputs(mkd, {"ct": "CT volume", "mr": "MR volume"}) == {"ct": "CT volume"}
    single = {"method": "single", "target": "ct", "modalities": {"ct": "CT"}}
    assert prediction_inputs(single, {"ct": "CT volume", "mr": "MR volume"}) == {"ct": "CT volume"}
    maml = {"method": "maml", "target": "flair", "modalities": {"flair": "MR", "t1c": "MR"}}
    assert prediction_inputs(maml, {"flair": "F", "t1c": "T"}) == {"flair": "F", "t1c": "T"}
    assert prediction_inputs(maml, {"flair": "F", "t1c": None}) == {"flair": "F"}  # a missing modality
    with pytest.raises(ValueError, match="this model takes ct; got mr"):
        prediction_inputs(single, {"mr": "MR volume"})


def test_a_correction_in_an_unpaired_workflow_belongs_to_its_own_volume_only():
    """Issue 12: *Submit correction* in the MKD workflow sent the CT and the MR together, which made a new case
    pairing the CT with another patient's MR."""
    volumes = {"ct": "CT volume", "mr": "MR volume"}
    assert correction_volumes(volumes, "ct", paired=False) == {"ct": "CT volume"}
    assert correction_volumes(volumes, "ct", paired=True) == volumes
    with pytest.raises(ValueError, match="select the ct volume"):
        correction_volumes({"mr": "MR volume", "ct": None}, "ct", paired=False)


def test_a_second_cases_segments_may_come_in_another_order_letter_case_or_as_a_subset():
    """Issue 12: a second case was refused when its segments came in another order, were a subset, or differed in
    letter case (segments are matched to structures by name when exported)."""
    dataset = {"background": 0, "liver": 1, "kidney_right": 2, "spleen": 3}
    structures_fit(dataset, {"background": 0, "Spleen": 1, "LIVER": 2}, "abdomen")
    structures_fit(dataset, {"background": 0, "kidney_right": 1}, "abdomen")
    with pytest.raises(ValueError, match="'pancreas' are not among them"):
        structures_fit(dataset, {"background": 0, "liver": 1, "pancreas": 2}, "abdomen")


def test_case_ids_are_safe():
    assert safe_id("CT: abdomen/../x") == "CT_abdomen_.._x"
    assert safe_id("///") == "case"



def test_known_structures_get_standard_terminology_that_slicer_reads(tmp_path: Path):
    """Segments carry SNOMED CT codes where the structure is known (issue 12), in the entry format Slicer's own
    terminology logic parses; a structure not known keeps Slicer's default entry."""
    scene = make_scene()
    image = sitk.Image(8, 8, 4, sitk.sitkInt16)
    image.SetSpacing((2.0, 2.0, 3.0))
    label = sitk.Image(8, 8, 4, sitk.sitkUInt8)
    label.CopyInformation(image)
    for value, z in ((1, 0), (2, 1), (3, 2), (4, 3)):
        label[2:5, 2:5, z] = value
    sitk.WriteImage(image, str(tmp_path / "image.nrrd"))
    sitk.WriteImage(label, str(tmp_path / "label.nrrd"))
    volume = mrml.read_volume(scene, tmp_path / "image.nrrd", "image")
    labels = {"background": 0, "Liver": 1, "edema": 2, "LA": 3, "blob": 4}
    segmentation = mrml.add_segmentation(scene, tmp_path / "label.nrrd", volume, labels, "result")
    s = segmentation.GetSegmentation()
    tag = slicer.vtkSegment.GetTerminologyEntryTagName()
    found = {}
    for i in range(s.GetNumberOfSegments()):
        segment = s.GetNthSegment(i)
        entry = vtk.reference("")
        if segment.GetTag(tag, entry) and "Segmentation category and type" in str(entry):
            parsed = slicer.vtkSlicerTerminologyEntry()
            assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(str(entry), parsed)
            found[segment.GetName()] = (parsed.GetTerminologyContextName().rsplit(" - ", 1)[1],
                                        parsed.GetCategoryObject().GetCodeMeaning(),
                                        parsed.GetTypeObject().GetCodingSchemeDesignator(),
                                        parsed.GetTypeObject().GetCodeValue())
    assert found["Liver"] == ("3D Slicer General Anatomy list", "Anatomical Structure", "SCT", "10200004")
    assert found["edema"] == ("3D Slicer General Anatomy list", "Morphologically Altered Structure", "SCT", "79654002")
    # the left atrium is not in the General Anatomy list of Slicer 5.8, but in the DICOM master list
    assert found["LA"] == ("DICOM master list", "Anatomical Structure", "SCT", "82471001")
    assert found["blob"][1:] == ("Tissue", "SCT", "85756007")  # not known here: Slicer's default entry stays


def test_the_panel_asks_for_epochs_or_minutes_never_both():
    """The backend refuses a job with both (issue 11); the panel's minutes, when set, replace its epochs, and a
    fine-tuning gets a share of either."""
    assert training_budget(40, 0) == {"epochs": 40, "minutes": None}
    assert training_budget(40, 10) == {"epochs": None, "minutes": 10}
    assert training_budget(40, 10, 0.25) == {"epochs": None, "minutes": 2.5}
    assert training_budget(2, 0, 0.25) == {"epochs": 1, "minutes": None}
    assert training_budget(40, 1, 0.25) == {"epochs": None, "minutes": 0.5}


def test_the_agreement_table_compares_the_structures_a_model_predicts():
    """A model trained with an "ignore" label (voxels of unknown class) never predicts it: no row for it."""
    labels = {"background": 0, "myocardium": 1, "left atrium": 2, "Ignore": 5}
    assert predicted_structures(labels) == ["myocardium", "left atrium"]
    assert predicted_structures({"background": 0, "liver": 1}) == ["liver"]


def test_the_local_backend_stops_when_started_through_a_launcher_that_keeps_signals(tmp_path: Path):
    """Inside Slicer the backend's Python is PythonSlicer: a launcher that runs python-real as its child and passes
    no signal on, so terminating it left the server running with its GPU memory, jobs and home (the next start there
    failed). The server now stops when its standard input ends. A shell script stands in for the launcher (the real
    one cannot run here): it runs the venv's Python as a child, with its own standard input, and dies of SIGTERM
    alone."""
    import os
    import stat
    import sys

    from CrossModalSegLib.backend import LocalBackend

    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\n')
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR)
    home = tmp_path / "home"
    backend = LocalBackend(str(launcher), home)
    assert backend.start().health()
    server = backend.server_pid
    assert server and server != backend.process.pid  # the server is the launcher's child
    backend.stop()
    deadline = time.time() + 5
    while time.time() < deadline and os.path.exists(f"/proc/{server}") and "zombie" not in _state(server):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{server}") or "zombie" in _state(server), "the server outlived stop()"
    again = LocalBackend(str(launcher), home)  # the home is free again
    try:
        assert again.start().health()
    finally:
        again.stop()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "gone"


def test_closing_the_scene_forgets_which_cases_its_volumes_were(tmp_path: Path):
    """Node IDs start again from 1 after a scene close: the next patient's first volume had the ID of the last
    patient's, so its correction was uploaded as the last patient's `final` label."""
    scene = make_scene()
    logic = CrossModalSegLogic(scene, tmp_path / "work")
    try:
        first = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "patient A CT")
        logic._case_of_volumes[logic._volume_key({"ct": first})] = "patient_A"  # as a finished upload records it
        assert logic.case_of({"ct": first}) == "patient_A"
        first_id = first.GetID()
        scene.Clear(0)  # File > Close scene
        second = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "patient B CT")
        assert second.GetID() == first_id  # the reuse that made the mix-up possible
        assert logic.case_of({"ct": second}) is None
    finally:
        logic.cleanup()


def test_the_local_backend_starts_in_the_environment_it_is_given(tmp_path: Path, monkeypatch):
    """Inside Slicer the environment holds the launcher's PYTHONHOME and PYTHONPATH for Slicer's own Python; a
    Python of the user's own (the only local route on Slicer 5.8, whose Python is 3.9) died at start with them. The
    panel passes Slicer's startup environment (slicer.util.startupEnvironment()), and the backend starts in it."""
    import os
    import sys

    from CrossModalSegLib.backend import LocalBackend
    from CrossModalSegLib.client import BackendError

    clean = dict(os.environ)
    monkeypatch.setenv("PYTHONHOME", str(tmp_path / "slicer-python-3.9"))  # what Slicer's launcher would set
    with pytest.raises(BackendError, match="exited at start"):
        LocalBackend(sys.executable, tmp_path / "poisoned").start()
    backend = LocalBackend(sys.executable, tmp_path / "clean", base_env=clean)
    try:
        assert backend.start().health()
    finally:
        backend.stop()


def test_a_result_for_a_volume_with_left_handed_permuted_axes_comes_back_voxel_exact(tmp_path: Path):
    """A volume node whose IJK axes are a left-handed permutation of RAS (set by a script or module; Slicer's reader
    never makes one) is written as it is, but Slicer reads the backend's result for it with one axis reversed: the
    same voxels, indexed from the other end. The grid check compared matrices and refused every such result (24 of
    60 random geometries in a scene round-trip fuzz run). Result -> segmentation -> label map must be voxel-exact,
    and a result half a voxel off must still be refused."""
    scene = make_scene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "volume")
    ijk_to_ras = vtk.vtkMatrix4x4()
    axes = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1.0]])  # i -> A, j -> R, k -> S: a left-handed permutation
    spacing, origin = (0.3, 1.0, 5.0), (10.0, 20.0, 30.0)
    for i in range(3):
        for j in range(3):
            ijk_to_ras.SetElement(i, j, axes[i, j] * spacing[j])
        ijk_to_ras.SetElement(i, 3, origin[i])
    volume.SetIJKToRASMatrix(ijk_to_ras)
    slicer.util.updateVolumeFromArray(volume, np.zeros((17, 2, 5), np.int16))
    image = sitk.ReadImage(str(mrml.write_volume(volume, tmp_path / "volume.nrrd")))  # what the backend sees (LPS)
    label = np.random.default_rng(0).choice([0, 1, 2, 7], size=(17, 2, 5)).astype(np.uint8)
    labels = {"background": 0, "liver": 1, "kidney": 2, "spleen": 7}
    result = sitk.GetImageFromArray(label)
    result.CopyInformation(image)
    sitk.WriteImage(result, str(tmp_path / "result.nrrd"))
    segmentation = mrml.add_segmentation(scene, tmp_path / "result.nrrd", volume, labels, "result",
                                         on_reference_grid=True)
    back = sitk.ReadImage(str(mrml.write_segmentation(segmentation, volume, labels, tmp_path / "back.nrrd")))
    assert np.array_equal(sitk.GetArrayFromImage(back), label)
    assert np.allclose(back.GetOrigin(), image.GetOrigin()) and np.allclose(back.GetDirection(), image.GetDirection())
    result.SetOrigin((image.GetOrigin()[0] + 0.15, *image.GetOrigin()[1:]))  # 0.15 mm to the left: off the grid
    sitk.WriteImage(result, str(tmp_path / "off.nrrd"))
    with pytest.raises(mrml.SceneError, match="not on the voxel grid of volume"):
        mrml.add_segmentation(scene, tmp_path / "off.nrrd", volume, labels, "off", on_reference_grid=True)


def test_a_result_off_the_volumes_grid_is_refused_not_resampled(tmp_path: Path):
    """Slicer imports a label map of any grid onto the reference volume, resampling it without a word: a backend
    result on another grid (shifted, or at half resolution) would have been shown as if it were the volume's own.
    Results must lie on the volume's grid; a label map the user brings may still be of another grid."""
    scene = make_scene()
    image = sitk.GetImageFromArray(np.zeros((10, 12, 14), np.int16))
    image.SetSpacing((0.8, 0.8, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    sitk.WriteImage(image, str(tmp_path / "volume.nrrd"))
    volume = mrml.read_volume(scene, tmp_path / "volume.nrrd", "volume")
    label = np.zeros((10, 12, 14), np.uint8)
    label[3:7, 4:8, 5:9] = 1
    labels = {"background": 0, "liver": 1}
    for name, spacing, origin, shape in (("same", (0.8, 0.8, 2.5), (10.0, -20.0, 30.0), (10, 12, 14)),
                                         ("shifted", (0.8, 0.8, 2.5), (12.0, -20.0, 30.0), (10, 12, 14)),
                                         ("half", (1.6, 1.6, 5.0), (10.0, -20.0, 30.0), (5, 6, 7))):
        result = sitk.GetImageFromArray(label[: shape[0], : shape[1], : shape[2]])
        result.SetSpacing(spacing)
        result.SetOrigin(origin)
        sitk.WriteImage(result, str(tmp_path / f"{name}.nrrd"))
        if name == "same":
            node = mrml.add_segmentation(scene, tmp_path / "same.nrrd", volume, labels, name, on_reference_grid=True)
            assert node.GetSegmentation().GetNumberOfSegments() == 1
            continue
        before = node_ids(scene)
        with pytest.raises(mrml.SceneError, match="not on the voxel grid of volume"):
            mrml.add_segmentation(scene, tmp_path / f"{name}.nrrd", volume, labels, name, on_reference_grid=True)
        assert node_ids(scene) == before
        assert mrml.add_segmentation(scene, tmp_path / f"{name}.nrrd", volume, labels, name)  # a user's: resampled
