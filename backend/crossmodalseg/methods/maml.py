"""`maml`: paired, co-registered modalities with modality-aware mutual learning (Zhang et al., MICCAI 2021).

One U-Net per modality (one input channel, no shared weights) returns its last decoder features and deep-supervision
logits; the modality-aware module gates and sums the features into fused logits.
"Mutual learning" is the joint loss: Seg(fused) + sum over branches of deep-supervised Seg, so the fused head's
gradient couples the branches. With every modality present the fused head predicts; with some missing, the
available branches' mean softmax does (never zeros fed into the fusion of a model not trained for it).
Branch width: the paper halves each branch (about the baseline's parameter count); here branches have the baseline's
full width by default, because half-width branches are what held MAML back (issue 10; BraTS FLAIR + T1c, 3 mm,
200 iterations, 4 folds, backend/benchmarks/RESULTS.md): at width 0.5 the T1c branch learnt nothing in any fold
(Dice 0, so a case without FLAIR got an empty segmentation) and the fused head reached WT/TC/ET 0.662/0.099/0.060;
at width 1.0 the T1c branch reaches 0.407/0.244/0.206 and the fused head 0.654/0.144/0.134 (TC and ET ahead in 3 of 4
folds, inside the spread). Full width costs 1.6x the time per iteration. `width=0.5` gives the paper's.
The fused head's loss weight is the paper's (1, next to each branch's deep-supervised loss): with pat0003 held out
(seed 0) weight 2 gave 0.834/0.275/0.267 against 0.778/0.219/0.359, inside the noise of one run, so it stays.
Optimiser: AdamW at the preset's learning rate, as every method here, so that methods differ only in what they are.
Against early fusion (`single` with both images as channels; 4 folds x 3 seeds, 200 iterations) the fused head is
below in every region, on ET beyond the spread (-0.135 +- 0.128), and at 400 iterations (seeds 0-1) the TC and ET
gaps widen (ET -0.143 -> -0.241, 0 of 8 pairs won): not under-training but late fusion, the modalities meeting only
on the last decoder features.
With a modality missing, the available branch is level with a model trained on that modality alone (inside the
spread): that, one model for complete and incomplete cases, is what MAML offers over early fusion here.
Options beyond the paper, off by default: `modality_dropout` (train the fusion on random modality subsets, which
then allows fused prediction with missing modalities) and `kd_weight` (KD from the fused head into each branch).
Benchmarked (2 folds x 3 seeds, RESULTS.md): neither beats the default beyond the spread nor closes the gap to early
fusion; dropout 0.5 keeps the fused head from following a dead branch down but loses ET (-0.121 +- 0.146), KD 1.0
moves nothing (WT/TC/ET +0.021/-0.019/-0.035), so both stay off.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from pydantic import Field
from torch import nn

from ..config import MethodOptions
from ..data.loaders import patch_stream
from ..data.spec import DatasetSpec
from ..data.transforms import labelled_patch_transform
from ..errors import UserError
from ..losses.distillation import kd_loss
from ..losses.supervision import DeepSupervisionLoss, SegLoss
from ..nets.fusion import ModalityAwareFusion
from ..nets.unet import UNet, UNetConfig
from .base import Batch, Method, StepContext, Stream, keep_in_graph

FUSED = "fused"


class MAML(Method):
    name = "maml"
    description = ("paired co-registered modalities: one U-Net per modality, modality-aware fusion, joint mutual "
                   "training; predicts with any subset of modalities")
    class Options(MethodOptions):
        width: float = Field(1.0, gt=0, le=4, description="channel width factor of each branch's U-Net (the paper: "
                                                          "0.5; see the module docstring)")
        modality_dropout: float = Field(0.0, ge=0, le=1, description="probability of dropping one branch per step")
        kd_weight: float = Field(0.0, ge=0, le=100, description="distillation from the fused head into branches")
        temperature: float = Field(2.0, gt=0, le=100)

    def __init__(self, task, plan, hparams=None):
        if not task.assistants:
            raise UserError("maml fuses several co-registered modalities: give at least one --assistant")
        super().__init__(task, plan, hparams)

    def build_networks(self) -> dict[str, nn.Module]:
        config = UNetConfig.from_plan(self.plan, 1, self.task.num_classes, width=float(self.hparams["width"]))
        self.seg, self.deep = SegLoss(), DeepSupervisionLoss()
        nets: dict[str, nn.Module] = {branch(m): UNet(config) for m in self.input_modalities()}
        channels = nets[branch(self.task.target)].feature_channels
        nets["fusion"] = ModalityAwareFusion(len(self.input_modalities()), channels, self.task.num_classes)
        return nets

    def members(self) -> dict[str, list[str]]:
        return {FUSED: self.input_modalities(), **{branch(m): [m] for m in self.input_modalities()}}

    def streams(self, spec: DatasetSpec) -> dict[str, Stream]:
        return {"labelled": Stream(self.validation_cases(spec), self.input_modalities())}

    def batches(self, items: dict[str, list[dict]], seed: int, device: torch.device, start: int = 0
                ) -> Iterator[Batch]:
        transform = labelled_patch_transform(self.plan, self.task.num_classes)
        return patch_stream(items["labelled"], transform, seed, device, start=start)

    def _branches(self, x: torch.Tensor, modalities: Sequence[str], nets: Mapping[str, nn.Module]
                  ) -> dict[str, tuple[torch.Tensor, list[torch.Tensor]]]:
        out = {}
        for channel, m in enumerate(modalities):
            out[m] = nets[branch(m)](x[:, channel:channel + 1], with_features=True)
        return out

    def _fuse(self, features: Mapping[str, torch.Tensor], nets: Mapping[str, nn.Module]) -> torch.Tensor:
        """Fused logits; a missing modality contributes zero features (only for models trained with dropout)."""
        ref = next(iter(features.values()))
        stacked = [features.get(m, torch.zeros_like(ref)) for m in self.input_modalities()]
        logits, _ = nets["fusion"](stacked)
        return logits

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        modalities = self.input_modalities()
        keep = list(modalities)
        p = float(self.hparams["modality_dropout"])
        if p > 0 and torch.rand(()) < p:
            k = int(torch.randint(1, len(modalities), ()))
            keep = [modalities[i] for i in sorted(torch.randperm(len(modalities))[:k].tolist())]
        with ctx.autocast():
            outs = self._branches(batch["image"], modalities, self.train_nets)
            fused = self._fuse({m: outs[m][0] for m in keep}, self.train_nets)
            fused_loss = self.seg(fused, batch["label"])
            branch_loss = sum(self.deep(outs[m][1], batch["label"]) for m in keep)
            dropped = [t for m in modalities if m not in keep for t in (outs[m][0], *outs[m][1])]
            loss = fused_loss + branch_loss + keep_in_graph(*dropped)
            logs = {"fused": float(fused_loss.detach()), "branches": float(branch_loss.detach())}
            if float(self.hparams["kd_weight"]) > 0:
                kd = sum(kd_loss(outs[m][1][0], fused, float(self.hparams["temperature"])) for m in keep)
                loss = loss + float(self.hparams["kd_weight"]) * kd
                logs["kd"] = float(kd.detach())
        ctx.backward(loss, self.optimizers()["main"])
        logs["loss"] = float(loss.detach())
        return logs

    def member_logits(self, x: torch.Tensor, available: Sequence[str]) -> dict[str, torch.Tensor]:
        outs = self._branches(x, available, self.nets)
        logits = {branch(m): outs[m][1][0] for m in available}
        if set(available) == set(self.input_modalities()) or float(self.hparams["modality_dropout"]) > 0:
            logits[FUSED] = self._fuse({m: outs[m][0] for m in available}, self.nets)
        return logits

    def ensemble(self, probabilities: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The fused head when it predicted; else the mean softmax of the available branches."""
        if FUSED in probabilities:
            return probabilities[FUSED]
        return torch.stack(list(probabilities.values())).mean(0)


def branch(modality: str) -> str:
    return f"branch_{modality}"
