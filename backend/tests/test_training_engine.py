"""The training engine's promises: a resumed run continues the uninterrupted one (every method), data-loader
workers draw different batches, the preprocessing never sees validation cases, `--minutes` bounds the whole run, and
validation says what it was measured on."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from crossmodalseg.data.loaders import patch_stream
from crossmodalseg.data.phantom import make_phantom_dataset
from crossmodalseg.data.plan import PRESETS, Plan, make_plan
from crossmodalseg.data.spec import DatasetSpec, load_spec
from crossmodalseg.data.transforms import (
    LoadCased,
    labelled_patch_transform,
    patch_ready,
)
from crossmodalseg.engine.checkpoint import read_model_meta
from crossmodalseg.engine.events import EventLog, read_events
from crossmodalseg.engine.trainer import TrainConfig, learning_rate_factor, train
from crossmodalseg.errors import UserError

from .learning import FINE_SIZE, FINE_SPACING, SIZE, SPACING


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> DatasetSpec:
    """Six paired CT + MR phantom cases; cases 4 and 5 lose their labels (CMC's unlabelled pairs)."""
    root = tmp_path_factory.mktemp("tiny")
    spec = make_phantom_dataset(root / "all", n_cases=6, seed=7, size=FINE_SIZE, spacing=FINE_SPACING)
    for case in spec.cases[4:]:
        case.labels = {}
    spec.root = root / "semi"
    spec.save()
    return load_spec(spec.root)


class CrashAfterEpoch(EventLog):
    """Stands in for a crash (kill -9, power cut) right after epoch `n` was checkpointed: the trainer writes the
    checkpoint, then emits the epoch's event, which raises here."""

    def __init__(self, n: int):
        super().__init__(progress_bar=False)
        self.n = n

    def emit(self, event: str, **fields):
        record = super().emit(event, **fields)
        if event == "epoch" and fields["epoch"] == self.n:
            raise KeyboardInterrupt("simulated crash")
        return record


METHOD_CASES = [("single", [], {}), ("mkd", ["mr"], {"iam": "cyclegan", "translator_filters": 4}),
                ("maml", ["mr"], {"modality_dropout": 0.5}), ("cmc", ["mr"], {"warmup": 0.3}),
                # cut right at the end of the translators' phase (2 of 4 epochs)
                ("mkd", ["mr"], {"iam": "cyclegan", "translator_filters": 4, "translator_phase": 0.5,
                                 "translator_dims": 2})]
METHOD_IDS = ["single", "mkd", "maml", "cmc", "mkd-translator-phase"]


def epochs_of(out: Path) -> list[dict]:
    return [e for e in read_events(out / "events.jsonl") if e["event"] == "epoch"]


@pytest.mark.parametrize("method,assistants,hparams", METHOD_CASES, ids=METHOD_IDS)
def test_a_resumed_run_continues_the_uninterrupted_one(tiny: DatasetSpec, tmp_path: Path, method: str,
                                                        assistants: list[str], hparams: dict):
    config = dict(method=method, target="ct", assistants=assistants, epochs=4, iterations_per_epoch=2, batch_size=2,
                  device="cpu", val_every=100, seed=3, options=hparams)
    train(tiny.root, tmp_path / "whole", TrainConfig(**config))
    with pytest.raises(KeyboardInterrupt):
        train(tiny.root, tmp_path / "cut", TrainConfig(**config), events=CrashAfterEpoch(2))
    # A resume states only the budget; the seed, method, options and plan (its batch of 2 too) come from the
    # interrupted run's record.
    train(tiny.root, tmp_path / "cut", TrainConfig(epochs=4, device="cpu"), resume=True)

    whole, cut = epochs_of(tmp_path / "whole"), epochs_of(tmp_path / "cut")
    assert [e["epoch"] for e in cut] == [1, 2, 3, 4]
    for a, b in zip(whole, cut):
        # The learning rate follows one curve (a double decay on resume would put it at 0.58x here and below).
        assert b["lr_factor"] == pytest.approx(a["lr_factor"], rel=1e-9, abs=1e-12), (a, b)
        loss_keys = [k for k in a if k not in ("event", "time", "eta_s", "elapsed_s", "of", "val_on")]
        assert set(loss_keys) <= set(b), (a, b)  # the same terms (a phase of a method logs its own)
        for key in loss_keys:  # same batches, same random draws, same weights: same losses on the CPU
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (key, a, b)


def test_the_learning_rate_warms_up_then_decays_to_zero():
    curve = [learning_rate_factor(i / 100, 0.1, 1 / 3) for i in range(101)]
    assert curve[0] == pytest.approx(1 / 3) and curve[5] == pytest.approx(2 / 3) and curve[10] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(curve[:10], curve[1:11]))  # rising to the peak ...
    assert all(a > b for a, b in zip(curve[10:], curve[11:]))  # ... then falling, to exactly 0 at the end
    assert curve[100] == 0.0 and max(curve) == pytest.approx(1.0)
    # Without a warm-up: the plain poly curve, which plans written before the warm-up existed keep.
    assert [learning_rate_factor(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([1.0, 0.5 ** 0.9, 0.0])


def test_the_trainer_follows_the_plans_learning_rate_curve(tiny: DatasetSpec, tmp_path: Path, monkeypatch):
    """One iteration per epoch, so each epoch's event carries the rate of one known step: the `fast` preset as
    shipped (a warm-up from a third of the peak over 10 % of the steps), MKD with the same preset (no warm-up: plain
    poly from the warm-up's start rate), then a preset without a warm-up."""
    fast = PRESETS["fast"]
    assert (fast.learning_rate, fast.warmup_fraction, fast.warmup_start_factor) == pytest.approx((6e-3, 0.1, 1 / 3))
    runs = (("warm", "single", [], (0.1, 1 / 3), 6e-3), ("mkd", "mkd", ["mr"], (0.0, 1.0), 2e-3),
            ("plain", "single", [], (0.0, 1.0), 6e-3))
    for name, method, assistants, (fraction, start), peak in runs:
        if name == "plain":
            monkeypatch.setitem(PRESETS, "fast", replace(fast, warmup_fraction=0.0, warmup_start_factor=1.0))
        config = TrainConfig(method=method, target="ct", assistants=assistants, epochs=20, iterations_per_epoch=1,
                             batch_size=2, device="cpu", val_every=100)
        out = train(tiny.root, tmp_path / name, config)
        plan = Plan.from_json(read_model_meta(out)["plan"])
        assert (plan.learning_rate, plan.warmup_fraction, plan.warmup_start_factor) == pytest.approx(
            (peak, fraction, start)), name
        factors = [e["lr_factor"] for e in epochs_of(out)]
        assert factors == pytest.approx([learning_rate_factor(i / 20, fraction, start) for i in range(20)], rel=1e-9)
        assert factors[0] == pytest.approx(start) and max(factors) == pytest.approx(1.0)
    old = {k: v for k, v in plan.to_json().items() if not k.startswith("warmup")}
    assert Plan.from_json(old).warmup_fraction == 0.0  # an older model fine-tuned: its plan has no warm-up
    for bad in ({"warmup_fraction": 1.0}, {"warmup_fraction": -0.1}, {"warmup_start_factor": 0}, {"warmup_fraction": "x"}):
        with pytest.raises(UserError, match="warmup_fraction"):  # a hand-edited or hostile model.json
            Plan.from_json({**old, **bad})


def test_each_phase_of_a_method_follows_its_own_learning_rate_curve(tiny: DatasetSpec, tmp_path: Path):
    """MKD with a translator phase over half the run: by the last of 4 iterations (progress 0.75) the translators'
    curve has ended (rate 0) and the segmentors' is half-way (poly at 0.5), not both at the run's 0.75."""
    options = {"iam": "cyclegan", "translator_filters": 4, "translator_phase": 0.5}
    config = TrainConfig(method="mkd", target="ct", assistants=["mr"], epochs=4, iterations_per_epoch=1,
                         device="cpu", val_every=100, options=options)
    out = train(tiny.root, tmp_path / "mkd", config)
    state = json.loads((out / "checkpoint" / "ckpt-00004" / "state.json").read_text())
    plan = Plan.from_json(read_model_meta(out)["plan"])
    rates = {name: meta["param_groups"][0]["lr"] for name, meta in state["optimizers"].items()}
    assert rates == pytest.approx({"seg": plan.learning_rate * 0.5 ** 0.9, "gen": 0.0, "disc": 0.0}, rel=1e-9)


def test_loader_workers_draw_different_batches_and_the_same_stream(tiny: DatasetSpec):
    """One labelled case (the few-label setting): consecutive batches must differ (crop positions and augmentation),
    and the stream must not depend on how many worker processes compute it."""
    plan = make_plan(tiny, ["ct"], "fast")
    plan.augment = True
    item = patch_ready(LoadCased(["ct"], plan, tiny)({"case": tiny.cases[0]}), plan, tiny.num_classes)
    transform = labelled_patch_transform(plan, tiny.num_classes)

    def first(n: int, workers: int, start: int = 0) -> list[torch.Tensor]:
        stream = patch_stream([item], transform, seed=5, device=torch.device("cpu"), num_workers=workers,
                              start=start)
        return [next(stream)["image"] for _ in range(n)]

    serial, parallel = first(6, 0), first(6, 2)
    for a, b in zip(serial, parallel):
        assert torch.equal(a, b)
    for a, b in zip(serial, serial[1:]):
        assert not torch.equal(a, b)
    assert all(not torch.equal(serial[i], serial[j]) for i in range(6) for j in range(i + 1, 6))
    assert torch.equal(first(2, 0, start=4)[0], serial[4])  # a resumed stream starts at its next batch


def test_a_batch_of_cases_that_the_patch_covers_takes_each_patch_from_a_case_of_its_own(tmp_path: Path):
    """Cases no larger than the patch (small or coarse images) offer one patch position: the batch's patches, drawn
    from one case, were that case B times, identical without augmentation (the `fast` plan's). Each patch now comes
    from a case drawn on its own, image and label together."""
    spec = make_phantom_dataset(tmp_path / "d", n_cases=4, seed=3, size=SIZE, spacing=SPACING, modalities=("ct",))
    plan = make_plan(spec, ["ct"], "fast")
    assert plan.patch_size == [20, 32, 32] and not plan.augment and plan.batch_size == 4
    items = [patch_ready(LoadCased(["ct"], plan, spec)({"case": case}), plan, spec.num_classes)
             for case in spec.cases]
    stream = patch_stream(items, labelled_patch_transform(plan, spec.num_classes), seed=0, device=torch.device("cpu"))
    cases_per_batch = []
    for _ in range(8):
        batch = next(stream)
        held = []
        for image, label in zip(batch["image"], batch["label"]):
            matches = [i for i, item in enumerate(items) if torch.equal(image, torch.as_tensor(item["image"]))]
            assert len(matches) == 1  # a whole case
            assert torch.equal(label, torch.as_tensor(items[matches[0]]["label"]))  # with its own label
            held.append(matches[0])
        cases_per_batch.append(len(set(held)))
    assert sum(cases_per_batch) >= 2 * len(cases_per_batch), cases_per_batch  # drawn with replacement: ~2.7 of 4


def test_the_plan_never_sees_validation_cases(tmp_path: Path):
    """Six CT cases, one of them (held out for validation) ten times brighter: the CT normalisation of the run must
    be that of the five training cases."""
    spec = make_phantom_dataset(tmp_path / "d", n_cases=6, seed=2, size=FINE_SIZE, spacing=FINE_SPACING,
                                modalities=("ct",))
    import SimpleITK as sitk

    bright = spec.cases[5]
    image = sitk.ReadImage(str(bright.images["ct"]))
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32) * 10.0 + 3000.0, str(bright.images["ct"]))
    model = train(spec.root, tmp_path / "m", TrainConfig(target="ct", epochs=1, iterations_per_epoch=1,
                                                          device="cpu", val_cases=[bright.id]))
    used = read_model_meta(model)["plan"]["normalisation"]["ct"]
    training_only = make_plan(spec, ["ct"], "fast", exclude=[bright.id]).normalisation["ct"]
    with_validation = make_plan(spec, ["ct"], "fast").normalisation["ct"]
    assert list(used["clip"]) == pytest.approx(list(training_only.clip))
    assert used["mean"] == pytest.approx(training_only.mean)
    assert with_validation.clip[1] > training_only.clip[1] + 100  # the bright case would have moved it


def test_validation_says_what_it_measured(tiny: DatasetSpec, tmp_path: Path):
    few = train(tiny.root, tmp_path / "few", TrainConfig(target="ct", epochs=1, iterations_per_epoch=1, device="cpu"))
    training = read_model_meta(few)["training"]
    assert training["val_on"] == "training-set" and "training-set Dice" in training["val_description"]
    held = train(tiny.root, tmp_path / "held", TrainConfig(target="ct", epochs=1, iterations_per_epoch=1,
                                                           device="cpu", val_cases=["case003"]))
    training = read_model_meta(held)["training"]
    assert training["val_on"] == "held-out" and training["val_cases"] == ["case003"]
    assert set(training["val_dice"]) >= {"liver", "mean"}


def test_batch_size_sets_the_patches_per_step_and_the_model_keeps_it(tiny: DatasetSpec, tmp_path: Path):
    model = train(tiny.root, tmp_path / "m", TrainConfig(target="ct", epochs=1, iterations_per_epoch=1, batch_size=2,
                                                         device="cpu"))
    plan = Plan.from_json(read_model_meta(model)["plan"])
    assert plan.batch_size == 2 and make_plan(tiny, ["ct"], "fast").batch_size == 4
    item = patch_ready(LoadCased(["ct"], plan, tiny)({"case": tiny.cases[0]}), plan, tiny.num_classes)
    stream = patch_stream([item], labelled_patch_transform(plan, tiny.num_classes), seed=0, device=torch.device("cpu"))
    assert next(stream)["image"].shape[0] == 2
    tuned = train(tiny.root, tmp_path / "tuned", TrainConfig(target="ct", epochs=1, iterations_per_epoch=1,
                                                             batch_size=1, init_from=str(model), device="cpu"))
    assert Plan.from_json(read_model_meta(tuned)["plan"]).batch_size == 1  # a fine-tuning may choose its own


@pytest.mark.slow
def test_minutes_bound_the_whole_run(tiny: DatasetSpec, tmp_path: Path):
    """`train --minutes M` in a fresh process (imports, preprocessing, training, validation, saving) ends within 5 %
    of M, and uses most of it for training."""
    minutes = 0.5
    started = time.time()
    run = subprocess.run([sys.executable, "-m", "crossmodalseg.cli", "train", str(tiny.root), "--target", "ct",
                          "--out", str(tmp_path / "m"), "--minutes", str(minutes), "--device", "cpu",
                          "--json-events"], capture_output=True, text=True, timeout=300)
    wall = time.time() - started
    assert run.returncode == 0, run.stderr[-2000:]
    assert wall <= minutes * 60 * 1.05, wall
    training = read_model_meta(tmp_path / "m")["training"]
    assert training["seconds"] >= 0.6 * minutes * 60, training  # not stopped needlessly early
    assert training["wall_seconds"] <= minutes * 60 * 1.05


def test_fast_topology_is_monai_unets_shape_with_a_strided_stem_only():
    """`fast` with a strided stem (BraTS at 1.95 mm) follows MONAI's UNet: one convolution per level, and the last
    filter count still gets a level, unstrided, on the coarsest grid. Without a stem (the 4.5 mm phantom) it keeps
    two convolutions per level and no such level; `full` stays nnU-Net's."""
    from crossmodalseg.data.plan import PRESETS, plan_from_statistics
    from crossmodalseg.nets.unet import UNet, UNetConfig

    brats = plan_from_statistics({"spacings": [[1.0, 1.0, 1.0]] * 2, "sizes": [[155, 240, 240]] * 2},
                                 PRESETS["fast"], {})
    assert brats.patch_size == [48, 48, 48] and brats.convs_per_level == 1
    assert brats.strides == [[2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 1, 1]] and brats.filters == [16, 32, 64, 128]
    net = UNet(UNetConfig.from_plan(brats, 2, 5))
    assert net(torch.zeros(1, 2, *brats.patch_size)).shape == (1, 5, *brats.patch_size)
    phantom = plan_from_statistics({"spacings": [[6.0, 4.5, 4.5]] * 2, "sizes": [[24, 40, 40]] * 2},
                                   PRESETS["fast"], {})
    assert phantom.strides[0] == [1, 1, 1] and phantom.convs_per_level == 2
    assert [1, 1, 1] not in phantom.strides[1:]
    full = plan_from_statistics({"spacings": [[1.0, 1.0, 1.0]] * 2, "sizes": [[155, 240, 240]] * 2},
                                PRESETS["full"], {})
    assert [1, 1, 1] not in full.strides[1:] and full.convs_per_level == 2
