"""A case's label serves its other modalities only where the case says its images are co-registered (issue 10, bug 2).

Before the fix, `Case.label_for` fell back to any label of the case, so CMC's decoder b and MKD's assistant stream
trained on another modality's label resampled by world coordinates: wrong exactly for misaligned or unpaired images.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossmodalseg.data.check import dataset_warnings, format_report
from crossmodalseg.data.phantom import make_phantom_dataset
from crossmodalseg.data.plan import make_plan
from crossmodalseg.data.spec import DatasetError, load_spec, parse_spec
from crossmodalseg.methods import get_method
from crossmodalseg.methods.base import Task


@pytest.fixture(scope="module")
def one_label_per_case(tmp_path_factory) -> Path:
    """Paired phantom cases (ct + mr) whose label is listed under ct only, without a co-registration flag."""
    root = make_phantom_dataset(tmp_path_factory.mktemp("share"), n_cases=3, seed=4, size=(24, 24, 16),
                                modalities=("ct", "mr"), paired=True).root
    data = json.loads((root / "dataset.json").read_text())
    for case in data["cases"]:
        case["labels"] = {"ct": case["labels"]["ct"]}
        case.pop("co_registered", None)
    (root / "dataset.json").write_text(json.dumps(data))
    return root


def with_flag(root: Path, flag) -> dict:
    data = json.loads((root / "dataset.json").read_text())
    for case in data["cases"]:
        case["co_registered"] = flag
    return data


def test_a_label_is_not_shared_without_the_flag(one_label_per_case):
    spec = load_spec(one_label_per_case)
    case = spec.cases[0]
    assert case.label_for("ct") == case.labels["ct"]
    assert case.label_for("mr") is None
    assert spec.cases_with("mr", labelled=True) == []
    assert len(spec.cases_with("mr", labelled=False)) == 3


def test_dataset_check_says_which_images_count_as_unlabelled(one_label_per_case):
    spec = load_spec(one_label_per_case)
    warnings = dataset_warnings(spec)
    assert [(w.case, w.modality) for w in warnings] == [(c.id, "mr") for c in spec.cases]
    assert all('"co_registered": true' in w.message for w in warnings)
    report = format_report(spec, [])
    assert "mr (MR): 0 labelled, 3 unlabelled" in report


def test_the_flag_shares_the_label_and_survives_a_round_trip(one_label_per_case):
    spec = parse_spec(with_flag(one_label_per_case, True), one_label_per_case)
    case = spec.cases[0]
    assert case.label_for("mr") == case.labels["ct"]
    assert dataset_warnings(spec) == []
    assert "3 case(s) declare co-registered images" in format_report(spec, [])
    again = parse_spec(spec.to_json(), one_label_per_case)
    assert [c.co_registered for c in again.cases] == [True] * 3


def test_a_flag_that_is_not_a_boolean_is_refused(one_label_per_case):
    with pytest.raises(DatasetError, match="'co_registered' must be true or false"):
        parse_spec(with_flag(one_label_per_case, "yes"), one_label_per_case)


# the stream in which the assistant modality learns from a label: cmc's co-registered pairs (decoder b on the fused pass)
@pytest.mark.parametrize("method,stream,hparams", [("cmc", "labelled_pairs", {}), ("mkd", "assistant", {"iam": "none"})])
def test_methods_do_not_train_a_modality_on_another_ones_label(one_label_per_case, method, stream, hparams):
    spec = load_spec(one_label_per_case)
    task = Task.from_spec(spec, "ct", ["mr"])
    plan = make_plan(spec, ["ct", "mr"], "fast")
    assert get_method(method)(task, plan, hparams).streams(spec)[stream].cases == []
    shared = parse_spec(with_flag(one_label_per_case, True), one_label_per_case)
    assert len(get_method(method)(task, plan, hparams).streams(shared)[stream].cases) == 3


def test_paired_phantoms_declare_co_registration_and_unpaired_ones_do_not(tmp_path):
    paired = make_phantom_dataset(tmp_path / "p", n_cases=2, seed=0, size=(16, 16, 8), paired=True)
    unpaired = make_phantom_dataset(tmp_path / "u", n_cases=2, seed=0, size=(16, 16, 8), paired=False)
    assert all(c.co_registered for c in load_spec(paired.root).cases)
    assert not any(c.co_registered for c in load_spec(unpaired.root).cases)
