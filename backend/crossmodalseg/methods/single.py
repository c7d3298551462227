"""`single`: the baseline. One U-Net on the target modality, or on several co-registered modalities stacked as
channels ("early fusion", as nnU-Net does), trained with Dice + cross-entropy and deep supervision."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from pydantic import Field
from torch import nn

from ..config import MethodOptions
from ..data.loaders import patch_stream
from ..data.spec import DatasetSpec
from ..data.transforms import labelled_patch_transform
from ..errors import UserError
from ..losses.supervision import DeepSupervisionLoss
from ..nets.unet import UNet, UNetConfig
from .base import Batch, Method, StepContext, Stream


class Single(Method):
    name = "single"
    description = "one U-Net on the target modality (assistant modalities, if given, as extra input channels)"
    class Options(MethodOptions):
        width: float = Field(1.0, gt=0, le=4, description="channel width factor of the U-Net")

    def build_networks(self) -> dict[str, nn.Module]:
        config = UNetConfig.from_plan(self.plan, len(self.input_modalities()), self.task.num_classes,
                                      width=float(self.hparams["width"]))
        self.loss = DeepSupervisionLoss()
        return {"unet": UNet(config)}

    def members(self) -> dict[str, list[str]]:
        return {"unet": self.input_modalities()}

    def streams(self, spec: DatasetSpec) -> dict[str, Stream]:
        return {"labelled": Stream(self.validation_cases(spec), self.input_modalities(), labelled=True)}

    def batches(self, items: dict[str, list[dict]], seed: int, device: torch.device, start: int = 0
                ) -> Iterator[Batch]:
        transform = labelled_patch_transform(self.plan, self.task.num_classes)
        return patch_stream(items["labelled"], transform, seed, device, start=start)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        with ctx.autocast():
            outputs = self.train_nets["unet"](batch["image"])
        loss = self.loss(outputs, batch["label"])
        ctx.backward(loss, self.optimizers()["main"])
        return {"loss": float(loss.detach())}

    def member_logits(self, x: torch.Tensor, available: Sequence[str]) -> dict[str, torch.Tensor]:
        needed = self.input_modalities()
        if list(available) != needed:
            missing = [m for m in needed if m not in available]
            raise UserError(f"the single-model baseline needs {', '.join(needed)}; missing {', '.join(missing)}")
        return {"unet": self.nets["unet"](x)}
