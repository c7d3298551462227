"""The Method protocol: which networks a method trains, one training step, and how members form an ensemble.

A method is a class chosen by name (`--method single|mkd|maml|cmc`), not a set of flags. The trainer owns the loop
(budget, learning-rate schedule, checkpoints, validation, DDP); the method owns what happens inside one iteration,
so methods with alternating updates (MKD's discriminator/generator/segmentor order) need no special casing.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import ConfigError, MethodOptions, parse
from ..data.plan import Plan
from ..data.spec import Case, DatasetSpec, LabelSet, is_ignore, label_problems, modality_problems
from ..errors import UserError
from ..nets.layout import to_channels_last

MAX_MODALITIES = 16


@dataclass
class Task(LabelSet):
    """What a model segments: structures (name -> on-disk value, ordered by value), the modalities it uses and
    their types."""

    labels: dict[str, int]
    modalities: dict[str, str]  # used modality -> "CT" | "MR"
    target: str
    assistants: list[str] = field(default_factory=list)

    @classmethod
    def from_spec(cls, spec: DatasetSpec, target: str, assistants: Sequence[str] = ()) -> "Task":
        for m in [target, *assistants]:
            if m not in spec.modalities:
                raise UserError(f"modality {m!r} is not in dataset {spec.name!r} (it has "
                                 f"{', '.join(spec.modalities)})")
        if target in assistants:
            raise UserError(f"{target!r} is the target; it cannot also be an assistant")
        ordered = {n: v for n, v in sorted(spec.labels.items(), key=lambda kv: kv[1])}
        return cls(ordered, {m: spec.modalities[m] for m in [target, *assistants]}, target, list(assistants))

    @classmethod
    def from_json(cls, data: Any) -> "Task":
        """The task of a model.json or run.json (which may come from anyone), or a UserError saying what is wrong."""
        if not isinstance(data, Mapping) or set(data) - {"labels", "modalities", "target", "assistants"}:
            raise UserError("task must be an object with labels, modalities, target and assistants")
        labels, modalities = data.get("labels"), data.get("modalities")
        target, assistants = data.get("target"), data.get("assistants", [])
        problems = label_problems(labels)
        if not problems and not any(value != 0 and not is_ignore(name) for name, value in labels.items()):
            problems.append("'labels' name no structure besides the background")
        modality_errors = modality_problems(modalities)
        if not modality_errors and len(modalities) > MAX_MODALITIES:
            modality_errors.append(f"'modalities' name {len(modalities)} modalities, more than {MAX_MODALITIES}")
        if modality_errors:
            problems += modality_errors
            modalities = {}
        if not isinstance(assistants, list) or len(set(map(str, assistants))) != len(assistants):
            problems.append("'assistants' must be a list of distinct modalities")
            assistants = []
        if modalities and (not isinstance(target, str) or target in assistants
                           or {target, *assistants} != set(modalities)):
            problems.append(f"'target' and 'assistants' must be the modalities {sorted(modalities)}, the target not "
                            f"also an assistant")
        if problems:
            raise UserError("task: " + "; ".join(problems))
        return cls(dict(labels), dict(modalities), target, list(assistants))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class StepContext:
    """What a training step needs from the engine: device, mixed precision, and the progress fraction in [0, 1]."""

    def __init__(self, device: torch.device, amp_dtype: torch.dtype | None, scaler: torch.amp.GradScaler):
        self.device, self.amp_dtype, self.scaler = device, amp_dtype, scaler
        self.progress = 0.0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """zero_grad, backward and step of one optimizer (several per iteration are fine)."""
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss.item()}; lower the learning rate or check the "
                                     f"images for extreme values")
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)


Batch = dict[str, Any]


def keep_in_graph(*outputs: torch.Tensor) -> torch.Tensor | float:
    """0 x the sum of outputs that a step computes but does not otherwise use: every parameter then receives a
    (zero) gradient, as DDP requires of every rank in every step (a branch that modality dropout left out, a decoder
    whose labels this batch lacks)."""
    return sum((0.0 * o.float().sum() for o in outputs), 0.0)


@dataclass
class Stream:
    """One kind of training data a method draws from: these cases, loaded with these modalities (the first is the
    grid), with or without their labels (unlabelled streams never read a label)."""

    cases: list[Case]
    modalities: list[str]
    labelled: bool = True
    required: bool = True  # an optional stream (e.g. unlabelled pairs) may be empty


class Method(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions  # the method's typed options, with defaults and ranges

    def __init__(self, task: Task, plan: Plan, hparams: Mapping[str, Any] | None = None):
        self.task, self.plan = task, plan
        self.hparams = self.check_options(hparams or {})
        self.nets: dict[str, nn.Module] = self.build_networks()
        # What training steps call: the networks themselves, or their DDP wrappers under torchrun.
        self.train_nets: dict[str, nn.Module] = dict(self.nets)

    @classmethod
    def adapt_plan(cls, plan: Plan) -> Plan:
        """The plan this method trains with, made from the preset's (default: the same). Called once, when a run
        makes its plan; run.json and the model folder record the result, so a resumed or fine-tuned run keeps it."""
        return plan

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return cls.Options().model_dump()

    @classmethod
    def check_options(cls, options: Mapping[str, Any], only_given: bool = False) -> dict[str, Any]:
        """The options typed and range-checked by the method's `Options` (with the defaults filled in, or only
        those given), or a UserError naming each unknown option and each bad value. The CLI, the service (at
        submission, before a job is stored) and the constructor all pass through here."""
        if not isinstance(options, Mapping):
            raise UserError(f"options of {cls.name!r} must map names to values")
        known = cls.Options.model_fields
        unknown = [f"no option {key!r}" for key in options if key not in known]
        if unknown:
            raise ConfigError(f"method {cls.name!r}: {'; '.join(unknown)} (it has: {', '.join(known) or 'none'})")
        parsed = parse(cls.Options, dict(options), f"method {cls.name!r}, option ")
        return parsed.model_dump(include=set(options)) if only_given else parsed.model_dump()

    # ---- networks -----------------------------------------------------------------------------------------
    @abstractmethod
    def build_networks(self) -> dict[str, nn.Module]: ...

    def network_configs(self) -> dict[str, Any]:
        return {name: net.config.to_json() for name, net in self.nets.items() if hasattr(net, "config")}

    @abstractmethod
    def members(self) -> dict[str, list[str]]:
        """Ensemble member name -> the modalities it needs at inference."""

    @classmethod
    def inputs_for(cls, task: Task) -> list[str]:
        """Modalities stacked as input channels at inference, in order (the first is the output grid)."""
        return [task.target, *task.assistants]

    def input_modalities(self) -> list[str]:
        return self.inputs_for(self.task)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if not hasattr(self, "_optimizers"):
            self._optimizers = self.configure_optimizers()
        return self._optimizers

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        params = [p for net in self.nets.values() for p in net.parameters()]
        return {"main": torch.optim.AdamW(params, lr=self.plan.learning_rate, weight_decay=3e-5)}

    def schedule_progress(self, optimizer: str, progress: float) -> float:
        """Where in its learning-rate schedule `optimizer` is at `progress` of the training (default: there). A
        method that trains its networks in phases maps the training's progress onto each phase's own schedule; a
        function of progress alone, so a resumed run follows the same curves."""
        return progress

    def to(self, device: torch.device, channels_last: bool = False) -> "Method":
        """Every network onto `device`; `channels_last`: in that layout too (nets/layout.py says when it pays)."""
        for net in self.nets.values():
            net.to(device)
            if channels_last:
                to_channels_last(net)
        return self

    def wrap(self, wrapper: Callable[[nn.Module], nn.Module]) -> None:
        """Wraps every trained network (DDP); inference and saving keep using the bare networks."""
        self.train_nets = {name: wrapper(net) for name, net in self.nets.items()}

    def train_mode(self, training: bool = True) -> None:
        for net in self.nets.values():
            net.train(training)

    # ---- data ---------------------------------------------------------------------------------------------
    @abstractmethod
    def streams(self, spec: DatasetSpec) -> dict[str, Stream]:
        """The data streams this method trains on (e.g. {"labelled": Stream(...)}); the trainer preprocesses their
        cases once, removes validation cases from labelled streams and hands the items to batches()."""

    @classmethod
    def scorable_cases(cls, task: Task, spec: DatasetSpec) -> list[Case]:
        """Cases that can be scored: the target modality with its label and every input modality present. (A class
        method: the trainer holds validation cases out before the plan, and so the networks, exist.)"""
        needed = cls.inputs_for(task)
        return [c for c in spec.cases if all(m in c.images for m in needed) and c.label_for(task.target) is not None]

    def validation_cases(self, spec: DatasetSpec) -> list[Case]:
        return self.scorable_cases(self.task, spec)

    def prepare(self, items: dict[str, list[dict]], fresh: bool) -> None:
        """Called once the training items are loaded, before the first step; `fresh` is False when resuming or
        fine-tuning (then trained weights are in place and must not be re-initialised)."""

    @abstractmethod
    def batches(self, items: dict[str, list[dict]], seed: int, device: torch.device, start: int = 0
                ) -> Iterator[Batch]:
        """An endless stream of training batches built from preprocessed case items (see data.transforms),
        beginning with batch `start` (each batch is a function of (seed, its index): see data.loaders)."""

    # ---- training -----------------------------------------------------------------------------------------
    @abstractmethod
    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        """One iteration: forward, losses, backward and optimizer steps; returns the logged loss terms."""

    # ---- inference ----------------------------------------------------------------------------------------
    @abstractmethod
    def member_logits(self, x: torch.Tensor, available: Sequence[str]) -> dict[str, torch.Tensor]:
        """Full-resolution logits of each member for a patch x (B, C, Z, Y, X), the channels being
        `available` modalities in the order of input_modalities()."""

    def ensemble(self, probabilities: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Default rule: the mean of the members' softmax outputs."""
        return torch.stack(list(probabilities.values())).mean(0)

    # ---- persistence --------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "hparams": self.hparams, "members": self.members(),
                "input_modalities": self.input_modalities(), "networks": self.network_configs()}
