"""`mkd`: unpaired target + assistant modality by online mutual knowledge distillation (Li et al., AAAI 2020).

An image alignment module (IAM) makes assistant images look like target images: a 3D CycleGAN-style translator
(`iam=cyclegan`), non-learned histogram matching (`iam=histogram`: per structure, using the assistant's own label,
since the IAM only runs in training where that label exists) or nothing (`iam=none`). The default is `none`
because that is what measured best: at CPU budgets of minutes a 3D CycleGAN iteration costs ~5x a segmentor
iteration and its half-trained translations fed the assistant member worse images than the raw ones (BraTS T1c
target + FLAIR assistant, backend/benchmarks/RESULTS.md: WT/TC/ET 0.257/0.074/0.158 with CycleGAN against
0.296/0.176/0.335 without; the same order in issue 10's 4-minute runs). Two
segmentors of the same architecture teach each other: `seg_target` learns from real target images, `seg_assistant`
from aligned assistant images; each distils into the other (KD with temperature T, sigmoid ramp-up). One iteration
updates discriminators, then generators (adversarial + cycle + the assistant's segmentation loss, so the label stays
valid on the translated image), then segmentors. Ensemble on a target image: mean softmax of both segmentors.
How well the IAM aligns is logged every epoch as `alignment_dice`: `seg_target`'s Dice on the aligned assistant
patches (it only learns from target images, so the more alike they look, the higher).

`translator_phase` gives the CycleGAN its own share of the budget: the translators train alone first (adversarial +
cycle; seg_assistant is untrained then), on their own learning-rate curve, and stay frozen after it while the
segmentors train on their translations with theirs (`schedule_progress`); resumable like any run.
`translator_dims=2` translates each axial slice, as the paper does. Neither makes the CycleGAN pay for itself at
these budgets (backend/benchmarks/RESULTS.md, "MKD: the CycleGAN translators in their own phase"): a CT segmentor
that scores 0.908 on held-out phantom CT scores 0.032 on raw MR, 0.399 on histogram-matched MR, and 0.073 on MR
translated after 1500 translator iterations (3D; 0.067 after 750 in 2D, 21 and 11 minutes on 2 CPU cores): the
discriminators win from the start and the translators stay near the identity. So the options exist, measured, and
`none` stays the default.

`kd_t2a_target` (lambda3, not in the paper, off by default): `seg_target` also distils into `seg_assistant` on the
target patches, the images the ensemble runs on; as published, `seg_assistant` never learns what target images look
like, and an ensemble member that does not know them pulls the mean down. Phantom CT target + MR assistant
(backend/benchmarks/RESULTS.md, 2 seeds): the ensemble went from 0.538 / 0.383 to 0.774 / 0.773 (no alignment) and
from 0.585 / 0.688 to 0.813 / 0.783 (histogram), now at or above its CT member, which stayed level. On BraTS (T1c +
FLAIR, 4 folds x 3 seeds) it cost tumour core (TC -0.040 +- 0.065, lower in 9 of 12 pairs, higher in none; WT +0.028
+- 0.122), so the published objective stays the default; the demo (CT + MR) sets it.

No learning-rate warm-up (the other methods have one in the `fast` preset): MKD trains with plain poly decay from
the warm-up's start rate. Measured against the warm-up (backend/benchmarks/RESULTS.md): on BraTS (T1c target +
FLAIR, 4 folds, seed 0) the ensemble fell by WT -0.136 +- 0.091 and ET -0.070 +- 0.046 (0 of 4 folds higher, both
beyond the spread), and in the phantom's CT learning test's scenario it was lower in 3 of 3 seeds, where the
MR-trained member's spleen on CT fell to 0.27 / 0.03 / 0.00 and pulled the mean of the members down.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from pydantic import Field, model_validator
from torch import nn

from ..config import MethodOptions
from ..data.loaders import patch_stream
from ..data.plan import Plan
from ..data.spec import IGNORE_INDEX, DatasetSpec
from ..data.transforms import labelled_patch_transform
from ..errors import UserError
from ..losses.consistency import cycle_loss, lsgan_loss
from ..losses.distillation import kd_loss, sigmoid_rampup
from ..losses.supervision import DeepSupervisionLoss
from ..nets.translator import Discriminator, Generator, TranslatorConfig
from ..nets.unet import UNet, UNetConfig
from .base import Batch, Method, StepContext, Stream, Task

QUANTILE_LEVELS = 101


class MKD(Method):
    name = "mkd"
    description = ("unpaired target + assistant: image alignment module and two segmentors with mutual knowledge "
                   "distillation; ensemble on the target modality")
    class Options(MethodOptions):
        # see the module docstring for why none is the default
        iam: Literal["none", "histogram", "cyclegan"] = Field("none", description="the image alignment module")
        temperature: float = Field(2.0, gt=0, le=100, description="distillation temperature")
        kd_a2t: float = Field(1.0, ge=0, le=100, description='lambda1: KD from seg_assistant into seg_target '
                                                              '(0 = ablation "no KD a->t")')
        kd_t2a: float = Field(1.0, ge=0, le=100, description='lambda2: KD from seg_target into seg_assistant '
                                                              '(0 = ablation "no KD t->a")')
        kd_t2a_target: float = Field(0.0, ge=0, le=100, description="lambda3: KD from seg_target into "
                                     "seg_assistant on target images too (not in the paper; 0 = as published)")
        rampup: float = Field(0.2, ge=0, le=1, description="fraction of training over which the KD weights ramp up")
        cycle_weight: float = Field(10.0, ge=0, le=1000)
        translator_phase: float = Field(0.0, ge=0, le=0.9, description="iam=cyclegan: the share of the training "
                                        "budget in which the translators train alone, before the segmentors train on "
                                        "their frozen translations (0 = all networks every iteration, as published)")
        translator_dims: Literal[2, 3] = Field(3, description="iam=cyclegan: translate 3D patches, or each axial "
                                               "slice in 2D (as the paper does)")
        translator_filters: int = Field(16, ge=1, le=256)
        translator_blocks: int = Field(3, ge=0, le=32)
        gan_learning_rate: float = Field(2e-4, gt=0, le=1)
        width: float = Field(1.0, gt=0, le=4, description="channel width factor of each segmentor")

        @model_validator(mode="after")
        def _phase_needs_translators(self) -> "MKD.Options":
            if self.translator_phase and self.iam != "cyclegan":
                raise ValueError("translator_phase trains the CycleGAN translators; it needs iam=cyclegan")
            return self

    def __init__(self, task, plan, hparams=None):
        if len(task.assistants) != 1:
            raise UserError("mkd needs exactly one --assistant modality (the unpaired modality that helps)")
        super().__init__(task, plan, hparams)
        self.translator_phase = float(self.hparams["translator_phase"])

    @classmethod
    def adapt_plan(cls, plan: Plan) -> Plan:
        if plan.warmup_fraction:  # see the module docstring
            plan.learning_rate *= plan.warmup_start_factor
            plan.warmup_fraction, plan.warmup_start_factor = 0.0, 1.0
        return plan

    @property
    def assistant(self) -> str:
        return self.task.assistants[0]

    def build_networks(self) -> dict[str, nn.Module]:
        config = UNetConfig.from_plan(self.plan, 1, self.task.num_classes, width=float(self.hparams["width"]))
        self.loss = DeepSupervisionLoss()
        nets: dict[str, nn.Module] = {"seg_target": UNet(config), "seg_assistant": UNet(config)}
        if self.hparams["iam"] == "cyclegan":
            tc = TranslatorConfig(spatial_dims=int(self.hparams["translator_dims"]),
                                  filters=int(self.hparams["translator_filters"]),
                                  residual_blocks=int(self.hparams["translator_blocks"]))
            nets.update(g_a2t=Generator(tc), g_t2a=Generator(tc), d_target=Discriminator(tc),
                        d_assistant=Discriminator(tc))
        # Per-class target intensity quantiles for iam=histogram (training only: inference sees target images).
        self.target_quantiles = torch.linspace(-2, 2, QUANTILE_LEVELS).repeat(self.task.num_classes, 1)
        return nets

    def members(self) -> dict[str, list[str]]:
        return {"seg_target": [self.task.target], "seg_assistant": [self.task.target]}

    @classmethod
    def inputs_for(cls, task: Task) -> list[str]:
        return [task.target]  # at test time only the target modality is given

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        seg = [p for n in ("seg_target", "seg_assistant") for p in self.nets[n].parameters()]
        opts = {"seg": torch.optim.AdamW(seg, lr=self.plan.learning_rate, weight_decay=3e-5)}
        if self.hparams["iam"] == "cyclegan":
            lr, betas = float(self.hparams["gan_learning_rate"]), (0.5, 0.999)
            gen = itertools.chain(self.nets["g_a2t"].parameters(), self.nets["g_t2a"].parameters())
            disc = itertools.chain(self.nets["d_target"].parameters(), self.nets["d_assistant"].parameters())
            opts["gen"] = torch.optim.Adam(gen, lr=lr, betas=betas)
            opts["disc"] = torch.optim.Adam(disc, lr=lr, betas=betas)
        return opts

    def schedule_progress(self, optimizer: str, progress: float) -> float:
        """With a translator phase, the translators' schedule runs over the phase and the segmentors' over the rest."""
        phase = self.translator_phase
        if not phase:
            return progress
        return min(progress / phase, 1.0) if optimizer in ("gen", "disc") else max(progress - phase, 0.0) / (1 - phase)

    # ---- data ---------------------------------------------------------------------------------------------
    def streams(self, spec: DatasetSpec) -> dict[str, Stream]:
        t, a = self.task.target, self.assistant
        return {"target": Stream([c for c in spec.cases if t in c.images and c.label_for(t)], [t]),
                "assistant": Stream([c for c in spec.cases if a in c.images and c.label_for(a)], [a])}

    def prepare(self, items: dict[str, list[dict]], fresh: bool) -> None:
        if self.hparams["iam"] == "histogram":
            rng = np.random.default_rng(0)
            images = np.concatenate([it["image"].ravel() for it in items["target"]])
            labels = np.concatenate([it["label"].ravel() for it in items["target"]])
            rows = []
            for k in range(self.task.num_classes):
                values = images[labels == k]
                if values.size == 0:  # a structure no target case shows: fall back to all target voxels
                    values = images
                values = rng.choice(values, min(values.size, 200_000), replace=False)
                rows.append(np.quantile(values, np.linspace(0, 1, QUANTILE_LEVELS)))
            self.target_quantiles = torch.as_tensor(np.stack(rows), dtype=torch.float32)

    def batches(self, items: dict[str, list[dict]], seed: int, device: torch.device, start: int = 0
                ) -> Iterator[Batch]:
        transform = labelled_patch_transform(self.plan, self.task.num_classes)
        target = patch_stream(items["target"], transform, seed, device, start=start)
        assistant = patch_stream(items["assistant"], transform, seed + 1, device, start=start)
        for t, a in zip(target, assistant):
            yield {"x_t": t["image"], "y_t": t["label"], "x_a": a["image"], "y_a": a["label"]}

    # ---- training -----------------------------------------------------------------------------------------
    def align(self, x_a: torch.Tensor, y_a: torch.Tensor) -> torch.Tensor:
        """Assistant images made to look like target images by the configured IAM, where the translators do not
        train in the same step (histogram, none, or translators frozen after their phase)."""
        iam = self.hparams["iam"]
        if iam == "cyclegan":
            with torch.no_grad():
                return translate(self.nets["g_a2t"], x_a, int(self.hparams["translator_dims"]))
        if iam == "histogram":
            return match_histogram(x_a, y_a, self.target_quantiles)
        return x_a

    def translator_step(self, x_t: torch.Tensor, x_a: torch.Tensor, y_a: torch.Tensor, ctx: StepContext,
                        segmentation: bool) -> tuple[dict[str, float], torch.Tensor]:
        """One CycleGAN update: discriminators (real vs translated), then generators (fool the discriminators, keep
        the cycles and, with `segmentation`, keep the assistant's label valid on the translated image through
        seg_assistant). Returns the logged losses and the translated assistant patch (detached)."""
        nets, opts, dims = self.train_nets, self.optimizers(), int(self.hparams["translator_dims"])
        g_a2t, g_t2a = (lambda x: translate(nets["g_a2t"], x, dims)), (lambda x: translate(nets["g_t2a"], x, dims))
        d_target, d_assistant = (lambda x: nets["d_target"](slices(x, dims))), (
            lambda x: nets["d_assistant"](slices(x, dims)))
        with torch.no_grad(), ctx.autocast():
            fake_t, fake_a = g_a2t(x_a), g_t2a(x_t)
        with ctx.autocast():
            loss_d = 0.5 * (lsgan_loss(d_target(x_t), True) + lsgan_loss(d_target(fake_t), False)
                            + lsgan_loss(d_assistant(x_a), True) + lsgan_loss(d_assistant(fake_a), False))
        ctx.backward(loss_d, opts["disc"])
        with ctx.autocast():
            fake_t, fake_a = g_a2t(x_a), g_t2a(x_t)
            adversarial = lsgan_loss(d_target(fake_t), True) + lsgan_loss(d_assistant(fake_a), True)
            cycle = cycle_loss(g_t2a(fake_t), x_a) + cycle_loss(g_a2t(fake_a), x_t)
            loss_g = adversarial + float(self.hparams["cycle_weight"]) * cycle
            if segmentation:
                loss_g = loss_g + self.loss(nets["seg_assistant"](fake_t), y_a)
        ctx.backward(loss_g, opts["gen"])
        logs = {"loss_d": float(loss_d.detach()), "loss_g": float(loss_g.detach()), "cycle": float(cycle.detach())}
        return logs, fake_t.detach().float()

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        x_t, y_t, x_a, y_a = batch["x_t"], batch["y_t"], batch["x_a"], batch["y_a"]
        if ctx.progress < self.translator_phase:  # the translators' own phase: nothing else trains
            return self.translator_step(x_t, x_a, y_a, ctx, segmentation=False)[0]
        nets, opts, logs = self.train_nets, self.optimizers(), {}
        ramp = sigmoid_rampup(self.schedule_progress("seg", ctx.progress), float(self.hparams["rampup"]))
        lam1, lam2 = float(self.hparams["kd_a2t"]) * ramp, float(self.hparams["kd_t2a"]) * ramp
        lam3 = float(self.hparams["kd_t2a_target"]) * ramp
        temperature = float(self.hparams["temperature"])

        if self.hparams["iam"] == "cyclegan" and not self.translator_phase:  # as published: translators every step
            gan_logs, x_tilde = self.translator_step(x_t, x_a, y_a, ctx, segmentation=True)
            logs.update(gan_logs)
        else:
            x_tilde = self.align(x_a, y_a)

        # segmentors: supervised on their own images, plus distillation from each other
        with ctx.autocast():
            out_t = nets["seg_target"](x_t)
            out_a = nets["seg_assistant"](x_tilde)
            loss = self.loss(out_t, y_t) + self.loss(out_a, y_a)
            full_t, full_a = _full_resolution(out_t), _full_resolution(out_a)
            if lam3 > 0:  # seg_assistant also learns seg_target's view of target images, the images it ensembles on
                assistant_on_t = _full_resolution(nets["seg_assistant"](x_t))
                kd3 = kd_loss(assistant_on_t, full_t.detach(), temperature)
                loss = loss + lam3 * kd3
                logs["kd_t2a_target"] = float(kd3.detach())
            if lam1 > 0:  # seg_assistant teaches seg_target on target images
                if lam3 > 0:
                    teacher = assistant_on_t.detach()
                else:
                    with torch.no_grad():
                        teacher = _full_resolution(nets["seg_assistant"](x_t))
                kd1 = kd_loss(full_t, teacher, temperature)
                loss = loss + lam1 * kd1
                logs["kd_a2t"] = float(kd1.detach())
            if lam2 > 0:  # seg_target teaches seg_assistant on aligned assistant images
                with torch.no_grad():
                    teacher = _full_resolution(nets["seg_target"](x_tilde))
                kd2 = kd_loss(full_a, teacher, temperature)
                loss = loss + lam2 * kd2
                logs["kd_t2a"] = float(kd2.detach())
                # How well the IAM aligns: the target segmentor's Dice on aligned assistant images (it has only seen
                # target images, so the more they look alike, the higher).
                logs["alignment_dice"] = hard_dice(teacher, y_a)
        ctx.backward(loss, opts["seg"])
        logs["loss"] = float(loss.detach())
        return logs

    # ---- inference ----------------------------------------------------------------------------------------
    def member_logits(self, x: torch.Tensor, available: Sequence[str]) -> dict[str, torch.Tensor]:
        if list(available) != [self.task.target]:
            raise UserError(f"mkd segments the target modality {self.task.target!r}; give that image")
        return {"seg_target": self.nets["seg_target"](x), "seg_assistant": self.nets["seg_assistant"](x)}


def slices(x: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """A batch of 3D patches (B, C, Z, Y, X) as it goes into a network of `spatial_dims`: unchanged for 3D, its axial
    slices (B·Z, C, Y, X) for 2D."""
    if spatial_dims == 3:
        return x
    return x.transpose(1, 2).reshape(-1, x.shape[1], *x.shape[3:])


def translate(generator: nn.Module, x: torch.Tensor, spatial_dims: int = 3) -> torch.Tensor:
    """The generator on a batch of 3D patches, slice by slice for a 2D one; padded (edge values) to the multiple of
    4 its two downsamplings need, cropped back."""
    planes = slices(x, spatial_dims)
    pad = [(-n) % 4 for n in planes.shape[2:]]
    if any(pad):
        padded = torch.nn.functional.pad(planes, [p for n in reversed(pad) for p in (0, n)], mode="replicate")
        planes = generator(padded)[(..., *[slice(0, n) for n in planes.shape[2:]])]
    else:
        planes = generator(planes)
    if spatial_dims == 3:
        return planes
    return planes.reshape(x.shape[0], x.shape[2], *planes.shape[1:]).transpose(1, 2)


def hard_dice(logits: torch.Tensor, label: torch.Tensor) -> float:
    """Mean Dice of argmax(`logits`) against `label` (class indices, B x 1 x spatial) over the samples and foreground
    classes; a class absent from a sample's label scores 1 there if it is not predicted either, else 0."""
    classes = logits.shape[1]
    known = label != IGNORE_INDEX  # voxels of unknown class are left out of both
    predicted = one_hot(torch.where(known, logits.argmax(1, keepdim=True), 0), classes)
    reference = one_hot(torch.where(known, label.long(), 0), classes)
    return float(compute_dice(predicted, reference, include_background=False, ignore_empty=False).mean())


def _full_resolution(outputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    return outputs[0] if isinstance(outputs, list) else outputs


def match_histogram(x: torch.Tensor, label: torch.Tensor, target_quantiles: torch.Tensor) -> torch.Tensor:
    """Per-structure histogram matching: in each sample, the voxels of class k (from the assistant's own label) get
    the intensity quantiles of class k in target images (`target_quantiles[k]`), piecewise linearly. A global match
    cannot align CT and MR (fat is dark on one, bright on the other); within one structure the order holds. Voxels
    of unknown class (an "ignore" label) keep their intensities."""
    levels = torch.linspace(0, 1, target_quantiles.shape[1], device=x.device)
    out = x.clone()
    for i in range(x.shape[0]):
        for k in range(target_quantiles.shape[0]):
            mask = label[i, 0] == k
            if int(mask.sum()) < 2:
                continue
            values = x[i, :, mask].reshape(-1).float()
            source = torch.quantile(values[: 1 << 20], levels)
            source = source + torch.arange(source.numel(), device=x.device) * 1e-6  # strictly increasing
            idx = torch.searchsorted(source, values.contiguous()).clamp(1, source.numel() - 1)
            lo, hi = source[idx - 1], source[idx]
            w = ((values - lo) / (hi - lo)).clamp(0, 1)
            target = target_quantiles[k].to(x.device)
            out[i, :, mask] = (target[idx - 1] + w * (target[idx] - target[idx - 1])).to(x.dtype).reshape(1, -1)
    return out
