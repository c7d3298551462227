"""`cmc`: semi-supervised, misalignment-tolerant cross-modality collaboration (Zhou et al., MICCAI 2024).

Two encoder/decoder pairs (modality a = target, b = assistant), channel attention (MIA) on each bottleneck, and a
unified fusion layer whose output U is added to both bottlenecks (Z_m = F_m + U) before each decoder. Loss:
L_sup (each decoder on its own labelled images) + lambda(e) * (w_csc * L_CSC + w_cac * L_CAC), with
L_CSC the channel-wise semantic consistency of the two bottlenecks (labelled and unlabelled pairs; O(C^2) memory)
and L_CAC = 1 - softDice of the two predictions on unlabelled pairs. Unlabelled pairs are put on one physical grid
when loaded (b resampled onto a's grid by world coordinates), so one crop gives both predictions on the same grid;
their patches are cropped without reading any label. Both consistency terms start after a supervised warm-up
(default 30 % of training) and ramp as exp(-5 (1 - e/E)^2).

The supervised pass fuses a labelled a-image with its own b-image where the case has one (loaded on a's grid, as at
inference), so the voxel-wise fusion trains on true pairs; a labelled a-image without a b-image meets another case's
b-image. Where the pair is co-registered its one label is b's too, so decoder b learns on that same fused pass, from
the features it gets at inference. (It used to learn only in a pass of its own, b fused with itself, and met the
pair's fusion first at inference. Measured on BraTS FLAIR+T1c, one labelled pair, 4 folds, 200 iterations, CPU:
the supervised-only network went from WT/TC/ET 0.512/0.088/0.198 to 0.545/0.122/0.236, its decoder b alone reaches
0.740/0.180/0.197, and a step costs one pass instead of two: 135 s against 205 s.) Other labelled b-images (their
own label, or a misaligned pair's) train decoder b on their own grid, in the fused pass when the a-image came
alone, else in a pass of their own. A b-image counts as labelled only with its own label or a co-registered case's
(`Case.label_for`).

Consistency weights, measured (BraTS FLAIR+T1c, one labelled pair + 3 unlabelled, 4 folds, seed 0, 200 iterations,
CPU; backend/benchmarks/RESULTS.md): at CAC weight 1 CMC fell below its own network trained supervised-only on WT in
every fold (-0.157 +- 0.119): L_CAC makes the T1c and FLAIR decoders agree, and on BraTS each modality shows what
the other hardly does (oedema on FLAIR, enhancing tumour on T1c), so the FLAIR decoder's WT fell from 0.740 to
0.493. CSC alone changed nothing (WT/TC/ET as supervised-only within 0.07 per fold). At CAC weight 0.1 (the
default) CMC was level with supervised-only under plain poly decay; with the `fast` preset's warm-up (today's
default; 4 folds x 3 seeds) it is ahead in every region, on WT beyond the spread (+0.079 +- 0.078, 9 of 12 pairs).

Differences from the official code, on purpose (METHODS.md): the consistency terms carry gradient, L_CAC is
1 - similarity, CSC is computed over channels (never an N^2 matrix), and unlabelled crops never look at labels.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from ..config import MethodOptions
from ..data.loaders import batch_seed, patch_stream
from ..data.spec import Case, DatasetSpec
from ..data.transforms import labelled_patch_transform, unlabelled_patch_transform
from ..errors import UserError
from ..losses.consistency import channel_semantic_consistency, soft_dice_consistency
from ..losses.supervision import DeepSupervisionLoss
from ..nets.fusion import ChannelAttention, UnifiedFusion
from ..nets.unet import UNet, UNetConfig
from .base import Batch, Method, StepContext, Stream, Task, keep_in_graph


class CrossModalityNet(nn.Module):
    """E_a, D_a, E_b, D_b (two UNets), MIA on each bottleneck and the unified fusion layer.

    forward(x_a, x_b) -> (logits_a, logits_b, bottleneck_a, bottleneck_b); either input may be None (a missing
    modality): the available bottleneck is then fused with itself and only its decoder predicts."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.branch_a, self.branch_b = UNet(config), UNet(config)
        channels = self.branch_a.bottleneck_channels
        self.mia_a, self.mia_b = ChannelAttention(channels), ChannelAttention(channels)
        self.fusion = UnifiedFusion(channels)

    def forward(self, x_a: torch.Tensor | None, x_b: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        enc_a = self.branch_a.encode(x_a) if x_a is not None else None
        enc_b = self.branch_b.encode(x_b) if x_b is not None else None
        f_a = self.mia_a(enc_a[-1]) if enc_a is not None else None
        f_b = self.mia_b(enc_b[-1]) if enc_b is not None else None
        u = self.fusion(f_a if f_a is not None else f_b, f_b if f_b is not None else f_a)
        logits_a = self.branch_a.decode(enc_a, f_a + u)[1] if enc_a is not None else None
        logits_b = self.branch_b.decode(enc_b, f_b + u)[1] if enc_b is not None else None
        return logits_a, logits_b, f_a, f_b


class CMC(Method):
    name = "cmc"
    description = ("semi-supervised, misalignment-tolerant: two encoder/decoders with channel attention and unified "
                   "fusion, channel-wise semantic consistency and consistency on unlabelled pairs")
    class Options(MethodOptions):
        local_files: ClassVar[tuple[str, ...]] = ("encoder_weights",)
        warmup: float = Field(0.3, ge=0, le=1, description="supervised-only fraction of training")
        # NT-Xent over 2C channels is ~log(2C) at start: scaled to the Seg loss's range
        csc_weight: float = Field(0.1, ge=0, le=100, description="channel-wise semantic consistency weight")
        # 0.1, measured: at 1 the agreement it forces cost WT beyond the spread (module docstring)
        cac_weight: float = Field(0.1, ge=0, le=100, description="consistency weight on unlabelled pairs")
        temperature: float = Field(0.5, gt=0, le=100)
        width: float = Field(1.0, gt=0, le=4, description="channel width factor of each branch")
        encoder_weights: str = Field("", max_length=4096, description='a local safetensors file with U-Net encoder '
                                     'weights (keys "encoder.*"); command line only')

    def __init__(self, task, plan, hparams=None):
        if len(task.assistants) != 1:
            raise UserError("cmc pairs two modalities: give exactly one --assistant")
        super().__init__(task, plan, hparams)

    @property
    def a(self) -> str:
        return self.task.target

    @property
    def b(self) -> str:
        return self.task.assistants[0]

    def build_networks(self) -> dict[str, nn.Module]:
        config = UNetConfig.from_plan(self.plan, 1, self.task.num_classes, width=float(self.hparams["width"]))
        self.loss = DeepSupervisionLoss()
        return {"cmc": CrossModalityNet(config)}

    def members(self) -> dict[str, list[str]]:
        return {"decoder_a": [self.a], "decoder_b": [self.b]}

    def streams(self, spec: DatasetSpec) -> dict[str, Stream]:
        a, b = self.a, self.b
        pairs = [c for c in spec.cases if a in c.images and b in c.images and c.label_for(a)]
        return {
            # A labelled a-image with its own b-image: the true pair, b on a's grid, as at inference, so the
            # voxel-wise fusion learns from what it will see; co-registered, the label is b's too and trains decoder b
            # on the same pass. Labelled a-images without a b-image stand alone.
            "labelled_pairs": Stream([c for c in pairs if c.co_registered], [a, b], required=False),
            "labelled_misaligned_pairs": Stream([c for c in pairs if not c.co_registered], [a, b], required=False),
            "labelled_a": Stream([c for c in spec.cases if a in c.images and b not in c.images and c.label_for(a)],
                                 [a], required=False),
            "labelled_b": Stream([c for c in spec.cases if b in c.images and c.label_for(b)
                                  and not (c.co_registered and c in pairs)], [b], required=False),
            # Both images on a's grid: predictions of a crop are on one physical grid.
            "unlabelled": Stream([c for c in spec.cases if a in c.images and b in c.images and not c.labels],
                                 [a, b], labelled=False, required=False),
        }

    def prepare(self, items: dict[str, list[dict]], fresh: bool) -> None:
        if not any(items.get(n) for n in ("labelled_pairs", "labelled_misaligned_pairs", "labelled_a")):
            raise UserError(f"cmc needs labelled {self.a!r} images")
        if not any(items.get(n) for n in ("labelled_b", "labelled_pairs", "labelled_misaligned_pairs", "unlabelled")):
            raise UserError(f"cmc needs {self.b!r} images: labelled ones, or unlabelled {self.a}+{self.b} pairs")
        path = str(self.hparams["encoder_weights"] or "")
        if path and fresh:
            load_encoder_weights(self.nets["cmc"], Path(path))

    def batches(self, items: dict[str, list[dict]], seed: int, device: torch.device, start: int = 0
                ) -> Iterator[Batch]:
        labelled = labelled_patch_transform(self.plan, self.task.num_classes)

        def stream(name: str, offset: int, transform=labelled, keys=("image", "label")) -> Iterator[dict | None]:
            if not items.get(name):
                return itertools.repeat(None)
            return patch_stream(items[name], transform, seed + offset, device, keys=keys, start=start)

        sources = ("labelled_pairs", "labelled_misaligned_pairs", "labelled_a")
        a_streams = [stream(name, offset) for name, offset in zip(sources, (3, 4, 0))]
        labelled_b = stream("labelled_b", 1)
        unlabelled = stream("unlabelled", 2, unlabelled_patch_transform(self.plan), ("image",))
        # The a-image's source is drawn in proportion to the sources' case counts; step k's choice is a function of
        # (seed, k), so a resumed run makes the same choices.
        counts = [len(items.get(name) or []) for name in sources]
        for k, (co_pair, other_pair, la, lb, u) in enumerate(zip(*a_streams, labelled_b, unlabelled), start=start):
            source = _draw(counts, batch_seed(seed + 3, k).random())
            if source == 2:
                batch = {"x_a": la["image"], "y_a": la["label"]}
            else:
                pair = (co_pair, other_pair)[source]
                batch = {"x_a": pair["image"][:, 0:1], "x_pair": pair["image"][:, 1:2], "y_a": pair["label"]}
                if source == 0:
                    batch["y_pair"] = pair["label"]  # co-registered: the pair's label is b's too
            if lb is not None:
                batch.update(x_b=lb["image"], y_b=lb["label"])
            if u is not None:
                batch["u"] = u["image"]
            yield batch

    def consistency_weight(self, progress: float) -> float:
        warmup = float(self.hparams["warmup"])
        return 0.0 if progress < warmup else math.exp(-5 * (1 - progress) ** 2)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        net = self.train_nets["cmc"]
        lam = self.consistency_weight(ctx.progress)
        temperature = float(self.hparams["temperature"])
        logs: dict[str, float] = {}
        with ctx.autocast():
            # The a-image meets its own b-image where the case has one (as at inference); otherwise another
            # case's b-image (CSC compares channels, not voxels, so that still teaches it).
            x_b = batch.get("x_pair", batch.get("x_b", batch["u"][:, 1:2] if "u" in batch else None))
            logits_a, logits_b, f_a, f_b = net(batch["x_a"], x_b)
            loss = self.loss(logits_a, batch["y_a"])
            if "y_pair" in batch:  # a co-registered pair: decoder b learns from the features it gets at inference
                loss = loss + self.loss(logits_b, batch["y_pair"])
            elif "y_b" in batch and "x_pair" not in batch:  # the fused b-image is a labelled one
                loss = loss + self.loss(logits_b, batch["y_b"])
            else:  # decoder b's output in the fused pass takes part (DDP)
                loss = loss + keep_in_graph(*logits_b)
            if "y_b" in batch and "x_pair" in batch:  # other labelled b-images, on their own grid, a pass of their own
                loss = loss + self.loss(net(None, batch["x_b"])[1], batch["y_b"])
            logs["sup"] = float(loss.detach())
            if lam > 0:
                csc = channel_semantic_consistency(f_a.float(), f_b.float(), temperature)
                cac = torch.zeros((), device=csc.device)
                if "u" in batch:
                    ul_a, ul_b, uf_a, uf_b = net(batch["u"][:, 0:1], batch["u"][:, 1:2])
                    csc = csc + channel_semantic_consistency(uf_a.float(), uf_b.float(), temperature)
                    cac = soft_dice_consistency(torch.softmax(ul_a[0].float(), 1), torch.softmax(ul_b[0].float(), 1))
                loss = loss + lam * (float(self.hparams["csc_weight"]) * csc + float(self.hparams["cac_weight"]) * cac)
                logs.update(csc=float(csc.detach()), cac=float(cac.detach()), consistency_weight=lam)
        ctx.backward(loss, self.optimizers()["main"])
        logs["loss"] = float(loss.detach())
        return logs

    @classmethod
    def scorable_cases(cls, task: Task, spec: DatasetSpec) -> list[Case]:
        # Scored on the target modality; the assistant image is used when the case has it.
        return [c for c in spec.cases if task.target in c.images and c.label_for(task.target) is not None]

    def member_logits(self, x: torch.Tensor, available: Sequence[str]) -> dict[str, torch.Tensor]:
        channels = {m: x[:, i:i + 1] for i, m in enumerate(available)}
        logits_a, logits_b, _, _ = self.nets["cmc"](channels.get(self.a), channels.get(self.b))
        out = {}
        if logits_a is not None:
            out["decoder_a"] = logits_a[0]
        if logits_b is not None:
            out["decoder_b"] = logits_b[0]
        return out


def _draw(counts: Sequence[int], u: float) -> int:
    """Index i with probability counts[i] / sum(counts), from a uniform draw u in [0, 1)."""
    x = u * sum(counts)
    for i, n in enumerate(counts):
        if x < n:
            return i
        x -= n
    return max(i for i, n in enumerate(counts) if n)  # u * total rounded up to the total


def load_encoder_weights(net: CrossModalityNet, path: Path) -> None:
    """Initialises both encoders from one local safetensors file (e.g. a pretrained 3D encoder)."""
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"encoder weights {path} not found (cmc option encoder_weights)")
    state = load_file(str(path))
    state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")} or state
    for branch in (net.branch_a, net.branch_b):
        try:
            branch.encoder.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise UserError(f"{path} does not fit the cmc encoder: {str(e).splitlines()[0][:300]}") from None
