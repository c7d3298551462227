"""CMC's supervised pass fuses each labelled a-image with its own b-image where the case has one (issue 10, bug 3).

Before the fix, the a-crop met a b-crop of another case and location even for paired cases, so the voxel-wise fusion
never saw a true pair in training but always did at inference.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from crossmodalseg.data.phantom import make_phantom_dataset
from crossmodalseg.data.plan import make_plan
from crossmodalseg.data.transforms import LoadCased, patch_ready
from crossmodalseg.methods import get_method
from crossmodalseg.methods.base import StepContext, Task


def cmc_items(tmp_path, paired: bool):
    """CMC on a small phantom with every a-image (ct) labelled; each case's images are overwritten with constants
    that name the case (ct: i, mr: 100 + i), so a batch shows which case each channel came from."""
    spec = make_phantom_dataset(tmp_path, n_cases=4, seed=2, size=(24, 24, 16), paired=paired)
    task = Task.from_spec(spec, "ct", ["mr"])
    plan = make_plan(spec, ["ct", "mr"], "fast")
    plan.batch_size = 2
    method = get_method("cmc")(task, plan, {})
    items = {}
    for name, stream in method.streams(spec).items():
        loaded = []
        for case in stream.cases:
            item = LoadCased(stream.modalities, plan, task.label_values, use_label=stream.labelled)({"case": case})
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
        a_case = torch.unique(batch["x_a"])
        assert a_case.numel() == 1
        assert torch.unique(batch["x_pair"]).tolist() == [a_case.item() + 100]  # its own b-image


def test_unpaired_cases_still_train_with_another_cases_b_image(tmp_path):
    method, items = cmc_items(tmp_path, paired=False)
    assert not items["labelled_pairs"] and items["labelled_a"] and items["labelled_b"]
    batch = next(method.batches(items, seed=0, device=torch.device("cpu")))
    assert "x_pair" not in batch and "x_b" in batch and "y_b" in batch


def test_a_pair_step_trains_both_branches_and_the_fusion(tmp_path):
    """A true pair plus a labelled b-image (co-registered phantoms share the ct label): decoder b learns from that
    image's own label in a pass of its own, and the fused pass trains both branches and the fusion."""
    method, items = cmc_items(tmp_path, paired=True)
    assert len(items["labelled_b"]) == 4
    torch.manual_seed(0)
    batch = next(method.batches(items, seed=0, device=torch.device("cpu")))
    assert {"x_pair", "x_b", "y_b"} <= set(batch)
    net = method.nets["cmc"]
    before = {k: v.detach().clone() for k, v in net.state_dict().items() if v.dtype.is_floating_point}
    method.train_mode(True)
    ctx = StepContext(torch.device("cpu"), None, torch.amp.GradScaler("cpu", enabled=False))
    ctx.progress = 0.9
    logs = method.training_step(batch, ctx)
    after = net.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert {"branch_a", "branch_b", "fusion", "mia_a", "mia_b"} <= changed
    assert all(np.isfinite(v) for v in logs.values())
