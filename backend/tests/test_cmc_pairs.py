"""CMC's supervised pass fuses each labelled a-image with its own b-image where the case has one (issue 10, bug 3).

Before the fix, the a-crop met a b-crop of another case and location even for paired cases, so the voxel-wise fusion
never saw a true pair in training but always did at inference.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from crossmodalseg.data.phantom import make_phantom_dataset
from crossmodalseg.data.plan import make_plan
from crossmodalseg.data.transforms import LoadCased, patch_ready
from crossmodalseg.methods import get_method
from crossmodalseg.methods.base import StepContext, Task


def cmc_items(tmp_path, paired: bool, misaligned: bool = False):
    """CMC on a small phantom with every a-image (ct) labelled; each case's images are overwritten with constants
    that name the case (ct: i, mr: 100 + i), so a batch shows which case each channel came from. `misaligned`:
    the pairs are not co-registered, each image has a label of its own, and the last case is an unlabelled pair."""
    spec = make_phantom_dataset(tmp_path, n_cases=4, seed=2, size=(24, 24, 16), paired=paired)
    if misaligned:
        for case in spec.cases:
            case.co_registered = False
            case.labels["mr"] = case.labels["ct"]
        spec.cases[-1].labels.clear()
    task = Task.from_spec(spec, "ct", ["mr"])
    plan = make_plan(spec, ["ct", "mr"], "fast")
    plan.batch_size = 2
    method = get_method("cmc")(task, plan, {})
    items = {}
    for name, stream in method.streams(spec).items():
        loaded = []
        for case in stream.cases:
            item = LoadCased(stream.modalities, plan, task, use_label=stream.labelled)({"case": case})
            index = int(case.id[-3:])
            for channel, modality in enumerate(stream.modalities):
                item["image"][channel] = index + (100 if modality == "mr" else 0)
            loaded.append(patch_ready(item, plan, task.num_classes if stream.labelled else None))
        items[name] = loaded
    return method, items


def test_paired_cases_give_true_pairs(tmp_path):
    method, items = cmc_items(tmp_path, paired=True)
    assert len(items["labelled_pairs"]) == 4 and not items["labelled_a"]
    for batch in itertools.islice(method.batches(items, seed=0, device=torch.device("cpu")), 6):
        assert "x_pair" in batch
        for x_a, x_pair in zip(batch["x_a"], batch["x_pair"]):  # the patches of a batch may be of several cases
            a_case = torch.unique(x_a)
            assert a_case.numel() == 1
            assert torch.unique(x_pair).tolist() == [a_case.item() + 100]  # its own b-image


def test_unpaired_cases_still_train_with_another_cases_b_image(tmp_path):
    method, items = cmc_items(tmp_path, paired=False)
    assert not items["labelled_pairs"] and items["labelled_a"] and items["labelled_b"]
    batch = next(method.batches(items, seed=0, device=torch.device("cpu")))
    assert "x_pair" not in batch and "x_b" in batch and "y_b" in batch


def one_step(method, batch, progress: float = 0.9) -> tuple[dict, set[str], list[tuple[bool, bool]]]:
    """One training step: its logs, the sub-networks it changed and, per call of the network, which inputs it had."""
    net = method.nets["cmc"]
    calls = []
    hook = net.register_forward_pre_hook(lambda _, args: calls.append((args[0] is not None, args[1] is not None)))
    before = {k: v.detach().clone() for k, v in net.state_dict().items() if v.dtype.is_floating_point}
    method.train_mode(True)
    ctx = StepContext(torch.device("cpu"), None, torch.amp.GradScaler("cpu", enabled=False))
    ctx.progress = progress
    try:
        logs = method.training_step(batch, ctx)
    finally:
        hook.remove()
    after = net.state_dict()
    return logs, {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}, calls


def test_a_co_registered_pair_trains_both_decoders_on_the_fused_pass(tmp_path):
    """Co-registered phantoms share the ct label: decoder b learns from the pair's fusion, the features it gets at
    inference, in the one pass that trains decoder a (before: in a pass of its own, b fused with itself)."""
    method, items = cmc_items(tmp_path, paired=True)
    assert not items["labelled_b"] and not items["labelled_misaligned_pairs"]
    torch.manual_seed(0)
    batch = next(method.batches(items, seed=0, device=torch.device("cpu")))
    assert {"x_pair", "y_pair"} <= set(batch) and "y_b" not in batch
    net = method.nets["cmc"]
    with torch.no_grad():  # the supervised loss both decoders should get, from the fused pass before the update
        net.train()
        logits_a, logits_b, _, _ = net(batch["x_a"], batch["x_pair"])
        expected = float(method.loss(logits_a, batch["y_a"]) + method.loss(logits_b, batch["y_a"]))
    logs, changed, calls = one_step(method, batch, progress=0.0)  # warm-up: the supervised terms alone
    assert calls == [(True, True)]
    assert logs["sup"] == pytest.approx(expected, rel=1e-5)
    assert {"branch_a", "branch_b", "fusion", "mia_a", "mia_b"} <= changed


def test_a_misaligned_pair_trains_decoder_b_on_its_own_labelled_image(tmp_path):
    """A pair that is not co-registered: the a-label does not fit the b-image, so the fused pass trains decoder a
    only and decoder b learns from a labelled b-image in a pass of its own; late in training the unlabelled pairs
    add a third pass."""
    method, items = cmc_items(tmp_path, paired=True, misaligned=True)
    assert [len(items[n]) for n in ("labelled_pairs", "labelled_misaligned_pairs", "labelled_b", "unlabelled")] == [
        0, 3, 3, 1]
    batch = next(method.batches(items, seed=0, device=torch.device("cpu")))
    assert {"x_pair", "x_b", "y_b", "u"} <= set(batch) and "y_pair" not in batch
    logs, changed, calls = one_step(method, batch)
    assert calls == [(True, True), (False, True), (True, True)]
    assert {"branch_a", "branch_b", "fusion", "mia_a", "mia_b"} <= changed
    assert all(np.isfinite(v) for v in logs.values())
