"""A finished job's result goes back into the store only where its case still is (issue 11: a case deleted while a
predict job ran came back, with an `original` label and no image, when the job ended)."""

from __future__ import annotations

import shutil
import time

from crossmodalseg.data.io import Geometry, read_image
from crossmodalseg.service.jobs import JobRunner
from crossmodalseg.service.store import Store, StoredFile
from crossmodalseg.service.uploads import store_image

LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}


def predict_job_with_its_output(store: Store, phantom_split, trained_single) -> str:
    """Dataset `d`, case `c` with a CT image, a model, and a predict job on `c` whose worker has written its output
    (the real files a worker writes; only the worker process itself is skipped)."""
    _, test = phantom_split
    store.create_dataset("d", "d", LABELS, {"ct": "CT"})
    image = read_image(test.cases[0].images["ct"])
    path, sha = store_image(image, store.dataset_folder("d", "c") / "image_ct")
    store.put_file("d", "c", "image", "ct", "", StoredFile(path, sha, Geometry.of(image).to_json()))
    shutil.copytree(trained_single, store.model_folder("m"))
    job = store.create_job("predict", {"model": "m", "dataset": "d", "case": "c", "images": {"ct": str(path)}})
    out = store.job_folder(job) / "output"
    out.mkdir(parents=True)
    store_image(read_image(test.cases[0].labels["ct"]), out / "segmentation")
    return job


def test_a_case_deleted_while_its_prediction_ran_does_not_come_back(tmp_path, phantom_split, trained_single):
    store = Store(tmp_path / "home")
    job = predict_job_with_its_output(store, phantom_split, trained_single)
    store.delete_case("d", "c")
    result = JobRunner(store)._collect(store.job(job))
    assert "deleted while the job ran" in result["note"]
    assert store.files("d") == []


def test_a_prediction_whose_case_is_there_stores_its_original_label(tmp_path, phantom_split, trained_single):
    store = Store(tmp_path / "home")
    job = predict_job_with_its_output(store, phantom_split, trained_single)
    JobRunner(store)._collect(store.job(job))
    assert {(f["kind"], f["tag"]) for f in store.files("d", "c")} == {("image", ""), ("label", "original")}


def test_a_job_that_cannot_start_fails_alone_and_the_queue_goes_on(tmp_path):
    """Issue 11: a stored job that could not be launched (its settings unreadable by this version, its dataset gone)
    used to stay queued and block every later job. Each now fails with the reason, and the queue goes on."""
    store = Store(tmp_path / "home")
    store.create_dataset("d", "d", LABELS, {"ct": "CT"})
    bad_settings = store.create_job("train", {"dataset": "d", "method": "single", "target": "ct", "epochs": "many"},
                                    model="m1")
    gone = store.create_job("train", {"dataset": "deleted", "method": "single", "target": "ct"}, model="m2")
    runner = JobRunner(store, devices=["cpu"], poll_s=0.05)
    runner.start()
    try:
        deadline = time.time() + 30
        while time.time() < deadline and any(store.job(j)["state"] == "queued" for j in (bad_settings, gone)):
            time.sleep(0.1)
    finally:
        runner.stop()
    first, second = store.job(bad_settings), store.job(gone)
    assert first["state"] == "failed" and "could not start" in first["error"] and "epochs" in first["error"]
    assert second["state"] == "failed" and "no dataset 'deleted'" in second["error"]
    assert store.model("m1")["state"] == "failed"
