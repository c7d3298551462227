"""The training loop: budget (epochs or minutes), learning rate (warm-up, then poly), mixed precision, validation Dice,
checkpoints at a fixed interval with exact --resume, JSON-lines progress events, and DDP under torchrun.

Configuration flows one way: dataset spec -> plan (or the plan of --init-from) -> method -> this loop -> model folder.
Everything the run decided is written to `run.json` before the first step, so --resume continues the same run.

A run reads as a list of stages (as nnU-Net's run_training does): `setup`, then epochs of `train_epoch` each closed
by `end_epoch` (losses, validation when due, checkpoint when due, progress event), then `finish` (the last
validation, the model folder). Each concern lives in one place: the budget in `budget.Budget`, validation in
`validation.Validation`, checkpoints in `checkpoint`, events in `events.EventLog`.

Exact resume: the learning rate is a pure function of the base rates (fixed when the optimisers are made) and the
progress; batch k of every data stream is a pure function of (seed, rank, k) (`data.loaders`); the random
generators and the gradient scaler are checkpointed. A run resumed from epoch n therefore continues the
uninterrupted one: same learning-rate curve, same batches, and on the CPU the same losses.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .. import __version__
from ..config import TrainConfig
from ..data.check import check_dataset
from ..data.plan import make_plan
from ..data.spec import DatasetError, DatasetSpec, load_spec, write_json_atomic
from ..data.transforms import LoadCased, patch_ready
from ..errors import UserError
from ..methods import Method, StepContext, Task, get_method
from ..nets.layout import trains_channels_last
from .budget import Budget
from .checkpoint import (
    MODEL_FILE,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    read_model_meta,
    save_checkpoint,
    write_model_folder,
)
from .distributed import (
    DistContext,
    autocast_dtype,
    init_distributed,
    resolve_device,
    shutdown_distributed,
)
from .events import EventLog
from .inferer import ModelDescription, build_method, describe_model
from .validation import Validation

RUN_FILE = "run.json"
DEFAULT_EPOCHS = {"fast": 40, "full": 200}
POLY_EXPONENT = 0.9


def learning_rate_factor(progress: float, warmup_fraction: float = 0.0, warmup_start_factor: float = 1.0) -> float:
    """The fraction of the peak learning rate at `progress` (0 to 1) of the training: a linear warm-up from
    `warmup_start_factor`, then poly decay to 0. A function of progress alone, so a resumed run follows the same curve."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup_fraction:
        return warmup_start_factor + (1 - warmup_start_factor) * progress / warmup_fraction
    return (1 - (progress - warmup_fraction) / (1 - warmup_fraction)) ** POLY_EXPONENT


class TrainingError(UserError):
    """Training cannot start or go on; the message says what to change."""


def software_versions() -> dict[str, str]:
    import SimpleITK

    return {"crossmodalseg": __version__, "torch": torch.__version__, "monai": monai.__version__,
            "simpleitk": SimpleITK.Version_VersionString(), "python": platform.python_version()}


def split_validation(scorable: list[str], config: TrainConfig) -> list[str]:
    if config.val_cases is not None:
        unknown = [c for c in config.val_cases if c not in scorable]
        if unknown:
            raise TrainingError(f"validation case(s) {', '.join(unknown)} cannot be scored (missing, unlabelled, or "
                                f"missing an input modality)")
        return list(config.val_cases)
    if len(scorable) < 5:
        return []  # too few labels to hold any out: validation then scores training cases, and says so
    rng = np.random.default_rng(config.seed)
    n = max(1, int(round(0.2 * len(scorable))))
    return sorted(rng.choice(sorted(scorable), n, replace=False).tolist())


def precision_name(dtype: torch.dtype | None) -> str:
    return str(dtype or torch.float32).removeprefix("torch.")


def stream_seed(seed: int, rank: int) -> int:
    """The data streams' seed of one DDP rank (each rank draws its own batches)."""
    return seed * 1000 + rank * 97


class Trainer:
    def __init__(self, dataset: str | Path, out_dir: str | Path, config: TrainConfig, resume: bool = False,
                 events: EventLog | None = None, started_at: float | None = None):
        self.out = Path(out_dir)
        self.config = config
        self.resume = resume
        self.spec: DatasetSpec = load_spec(dataset)
        self.dist: DistContext = DistContext()
        self.events = events or EventLog(progress_bar=False)
        self.started_at = time.time() if started_at is None else started_at
        self.elapsed_before = 0.0  # training seconds of the interrupted run, when resuming
        self._last_save_s = 0.0

    # ---- the run, stage by stage ----------------------------------------------------------------------------------
    def run(self) -> Path:
        device = resolve_device(self.config.device)
        self.dist = init_distributed(device)
        if not self.dist.is_main:
            self.events = EventLog(enabled=False)
        try:
            self.setup(device)
            while not self.stop_now():
                self.train_epoch()
                self.end_epoch()
            return self.finish()
        finally:
            shutdown_distributed(self.dist)

    def setup(self, device: torch.device) -> None:
        """Everything before the first step: data check, run record, method, data, optimisers, resumed state."""
        self.device = device
        self._check_data()
        method, run, val_ids = self._prepare_method()
        cfg = self.config  # (a resumed run's own configuration)
        self.method, self.run_record, self.val_ids = method, run, val_ids
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main and not self.resume:
            write_json_atomic(self.out / RUN_FILE, run)
        self.events.path = self.out / "events.jsonl" if self.dist.is_main else None
        self.amp_dtype = autocast_dtype(device, cfg.amp)
        method.to(device, channels_last=trains_channels_last(device, self.amp_dtype))
        self.events.emit("log", message=f"preprocessing {self.spec.name}: method {method.name}, plan spacing "
                                        f"{[round(s, 3) for s in method.plan.spacing]} mm, patch {method.plan.patch_size}")
        self.items, self.validation = self._load_data(method, val_ids)
        method.prepare(self.items, fresh=not (self.resume or cfg.init_from))

        if self.dist.enabled:
            ids = [device.index] if device.type == "cuda" else None
            method.wrap(lambda net: DistributedDataParallel(net, device_ids=ids))
        self.optimizers = method.optimizers()
        # The schedule's base rates, fixed here, before a checkpoint overwrites the groups' (decayed) rates.
        self.base_lrs = {name: [g["lr"] for g in opt.param_groups] for name, opt in self.optimizers.items()}
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.ctx = StepContext(device, self.amp_dtype, self.scaler)

        self.iteration, self.epoch, self.history, elapsed_before, self.lr_factor = 0, 0, [], 0.0, 1.0
        self.last_dice: dict[str, Any] = {}
        if self.resume:
            self._restore()
            elapsed_before = self.elapsed_before
        iterations = method.plan.iterations_per_epoch
        epochs = cfg.epochs or (None if cfg.minutes else DEFAULT_EPOCHS.get(method.plan.preset, 40))
        self.budget = Budget(epochs, cfg.minutes, iterations, self.started_at, elapsed_before)
        self.stream = method.batches(self.items, seed=stream_seed(cfg.seed, self.dist.rank), device=device,
                                     start=self.iteration)
        self.events.emit("start", method=method.name, epochs=epochs, minutes=cfg.minutes,
                         iterations_per_epoch=iterations, device=str(device), precision=precision_name(self.amp_dtype),
                         world_size=self.dist.world_size, train_cases={k: len(v) for k, v in self.items.items()},
                         val_cases=val_ids, val_on=self.validation.on, resumed_from=self.epoch or None)
        if os.environ.get("CROSSMODALSEG_FAKE_OOM_DATASET") == self.spec.name:
            # Test hook: stands in for a real GPU out-of-memory error where no GPU is (CI), to test the error path.
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated by CROSSMODALSEG_FAKE_OOM_DATASET)")
        self.budget.start_training()

    def stop_now(self) -> bool:
        """Rank 0's decision, for every rank."""
        return self.dist.broadcast_flag(self.budget.exhausted(self.iteration))

    def train_epoch(self) -> None:
        """Up to one epoch of iterations; a time budget may end it early (then it is the last one)."""
        self.epoch += 1
        self.method.train_mode(True)
        self.losses: dict[str, list[float]] = {}
        for _ in range(self.method.plan.iterations_per_epoch):
            if self.stop_now():
                break
            started = time.perf_counter()
            self._set_progress(self.budget.progress(self.iteration))
            logs = self.method.training_step(next(self.stream), self.ctx)
            self.scaler.update()
            for k, v in logs.items():
                self.losses.setdefault(k, []).append(v)
            self.iteration += 1
            self.budget.record_step(time.perf_counter() - started)

    def _set_progress(self, progress: float) -> None:
        """Progress (rank 0's, so every rank steps with one learning rate) and the learning rate it sets."""
        progress = self.dist.broadcast_value(progress)
        self.ctx.progress = progress
        plan = self.method.plan
        for name, opt in self.optimizers.items():
            factor = learning_rate_factor(self.method.schedule_progress(name, progress), plan.warmup_fraction,
                                          plan.warmup_start_factor)
            for group, base in zip(opt.param_groups, self.base_lrs[name]):
                group["lr"] = base * factor
        self.lr_factor = learning_rate_factor(progress, plan.warmup_fraction, plan.warmup_start_factor)

    def end_epoch(self) -> None:
        """The epoch's bookkeeping: mean losses, validation and checkpoint when due, the progress event."""
        cfg = self.config
        last = self.stop_now()
        record: dict[str, Any] = {"epoch": self.epoch, "iterations": self.iteration, "lr_factor": self.lr_factor,
                                  **{k: round(self.dist.mean(float(np.mean(v))), 5) for k, v in self.losses.items()}}
        started = time.perf_counter()
        if self.dist.is_main and (last or self.epoch % cfg.val_every == 0):
            self.last_dice = self.validation(self.device, self.amp_dtype)
            record["val_dice"] = self.last_dice
        self.history.append(record)
        if self.dist.is_main and (last or self.epoch % cfg.checkpoint_every == 0):
            self._checkpoint()
        if "val_dice" in record:  # what the end of the run costs: one validation and the saving
            self.budget.record_after_training(time.perf_counter() - started + self._last_save_s)
        self.dist.barrier()
        remaining = self.budget.remaining_s()
        eta = remaining if remaining is not None else self.budget.step_s * (
            self.budget.total_iterations - self.iteration)
        self.events.emit("epoch", of=self.budget.estimated_epochs(self.iteration), eta_s=round(max(eta, 0.0), 1),
                         elapsed_s=round(time.time() - self.started_at, 1), val_on=self.validation.on,
                         **record)

    def finish(self) -> Path:
        """The last validation (unless the last epoch just had one) and the model folder."""
        if self.dist.is_main:
            if not self.history or "val_dice" not in self.history[-1]:
                self.last_dice = self.validation(self.device, self.amp_dtype)
            cfg, run = self.config, self.run_record
            training_s = self.elapsed_before + (time.time() - self.budget.training_started)
            meta = {**{k: run[k] for k in ("method", "task", "plan")},
                    "training": {"epochs": self.epoch, "iterations": self.iteration,
                                 "iterations_per_epoch": self.method.plan.iterations_per_epoch,
                                 "seconds": round(training_s, 1), "wall_seconds": round(time.time() - self.started_at, 1),
                                 "device": str(self.device), "precision": precision_name(self.amp_dtype),
                                 "world_size": self.dist.world_size, "val_cases": self.val_ids,
                                 "val_on": self.validation.on, "val_description": self.validation.description,
                                 "val_dice": self.last_dice, "init_from": cfg.init_from, "config": cfg.model_dump(),
                                 "dataset": run["dataset"]},
                    "software": software_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            write_model_folder(self.out, meta, self.method.nets)
            self.events.emit("done", model=str(self.out), epochs=self.epoch, iterations=self.iteration,
                             seconds=round(time.time() - self.started_at, 1), val_dice=self.last_dice,
                             val_on=self.validation.on)
        self.dist.barrier()
        return self.out

    # ---- set-up details -------------------------------------------------------------------------------------------
    def _check_data(self) -> None:
        """Refuses a dataset with problems before any work, listing them all (not the first one hit mid-run)."""
        _, problems = check_dataset(self.spec.root)
        if problems:
            shown = "\n".join(f"  - {p}" for p in problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise DatasetError(f"dataset {self.spec.name!r} has {len(problems)} problem(s); fix them (see "
                               f"`crossmodalseg dataset check {self.spec.root}`):\n{shown}{more}")

    def _prepare_method(self) -> tuple[Method, dict[str, Any], list[str]]:
        """The method with its networks (seeded from the run's own seed), the run record and the validation ids."""
        run_file = self.out / RUN_FILE
        if self.resume:
            if not run_file.exists():
                raise TrainingError(f"--resume: {self.out} holds no run to resume (no {RUN_FILE})")
            run = json.loads(run_file.read_text())
            saved = TrainConfig.parse(run["config"])
            # What defines the model comes from the interrupted run; only the budget and device may change.
            budget = ({"epochs": self.config.epochs, "minutes": None} if self.config.epochs else
                      {"epochs": None, "minutes": self.config.minutes} if self.config.minutes else {})
            saved = TrainConfig.parse({**saved.model_dump(), **budget, "device": self.config.device})
            self.config = saved
            torch.manual_seed(saved.seed)
            return build_method(run), run, run.get("val_cases", [])
        if (self.out / MODEL_FILE).exists() or latest_checkpoint(self.out):
            raise TrainingError(f"{self.out} already holds a model or a checkpoint; pass --resume to continue it or "
                                f"choose another --out")
        if not self.config.target:
            raise TrainingError("no --target modality given; the dataset has: " + ", ".join(self.spec.modalities))
        task = Task.from_spec(self.spec, self.config.target, self.config.assistants)
        method_cls = get_method(self.config.method)
        val_ids = split_validation([c.id for c in method_cls.scorable_cases(task, self.spec)], self.config)
        init_model = None
        if self.config.init_from:
            init_model = describe_model(read_model_meta(Path(self.config.init_from)))
            self._check_compatible(init_model, task)
            plan = init_model.plan
        else:  # statistics of the training cases only: validation cases must not shape the preprocessing
            plan = method_cls.adapt_plan(make_plan(self.spec, [task.target, *task.assistants], self.config.preset,
                                                   exclude=val_ids))
        if self.config.iterations_per_epoch:
            plan.iterations_per_epoch = self.config.iterations_per_epoch
        if self.config.batch_size:
            plan.batch_size = self.config.batch_size
        if init_model is not None:  # the model's own hyper-parameters (its networks depend on them), then overrides
            self.config.options = {**init_model.hparams, **self.config.options}
        torch.manual_seed(self.config.seed)  # before the networks exist: their initial weights are part of the run
        method = method_cls(task, plan, self.config.options)
        if init_model is not None:
            load_weights(Path(self.config.init_from), method.nets)
            plan.learning_rate *= self.config.finetune_lr_factor
        run = {"method": method.to_json(), "task": task.to_json(), "plan": plan.to_json(),
               "config": self.config.model_dump(), "val_cases": val_ids,
               "dataset": {"name": self.spec.name, "path": str(self.spec.root)}}
        return method, run, val_ids

    def _check_compatible(self, model: ModelDescription, task: Task) -> None:
        if model.method.name != self.config.method:
            raise TrainingError(f"--init-from model was trained with method {model.method.name!r}, not "
                                f"{self.config.method!r}; fine-tune with the same method")
        old = model.task
        if old.labels != task.labels:
            raise TrainingError(f"--init-from model segments {old.labels}, this dataset labels {task.labels}")
        if old.modalities != task.modalities or old.target != task.target:
            raise TrainingError(f"--init-from model uses modalities {old.modalities} (target {old.target!r}); "
                                f"this run asks for {task.modalities} (target {task.target!r})")

    def _load_data(self, method: Method, val_ids: list[str]) -> tuple[dict[str, list[dict]], Validation]:
        """Preprocessed training items per stream (validation cases taken out of labelled streams) and the
        validation: the held-out cases, else up to four training cases (then named training-set Dice)."""
        items: dict[str, list[dict]] = {}
        for name, stream in method.streams(self.spec).items():
            loader = LoadCased(stream.modalities, method.plan, method.task, use_label=stream.labelled)
            cases = [c for c in stream.cases if not (stream.labelled and c.id in val_ids)]
            if not cases and stream.required:
                paired = (" in one case; cases with one modality each are unpaired data, which --method mkd is "
                          "for" if len(stream.modalities) > 1 else "")
                raise TrainingError(f"method {method.name!r} has no training cases for its {name!r} data (needs "
                                    f"{', '.join(stream.modalities)}{' with labels' if stream.labelled else ''}"
                                    f"{paired})")
            classes = method.task.num_classes if stream.labelled else None
            items[name] = [patch_ready(loader({"case": c}), method.plan, classes) for c in cases]
        scorable = {c.id: c for c in method.scorable_cases(method.task, self.spec)}
        chosen = val_ids or sorted(scorable)
        return items, Validation(method, [self._scoring_item(method, scorable[c]) for c in chosen[:4]],
                                 held_out=bool(val_ids))

    @staticmethod
    def _scoring_item(method: Method, case) -> dict:
        """A case as the validation scores it: the input modalities it has (target first) and the target label."""
        available = [m for m in method.input_modalities() if m in case.images]
        item = LoadCased(available, method.plan, method.task)({"case": case})
        item["available"] = available
        return item

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        started = time.perf_counter()
        training_s = self.elapsed_before + (time.time() - self.budget.training_started)
        save_checkpoint(self.out, self.epoch, self.method.nets, self.optimizers,
                        {"iteration": self.iteration, "elapsed_s": training_s, "history": self.history[-200:],
                         "base_lrs": self.base_lrs, "scaler": self.scaler.state_dict(),
                         "last_dice": self.last_dice})
        self._last_save_s = 2 * (time.perf_counter() - started)  # the model folder costs about as much again

    def _restore(self) -> None:
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            raise TrainingError(f"--resume: {self.out} has no complete checkpoint yet; start again without --resume")
        state = load_checkpoint(ckpt, self.method.nets, self.optimizers)
        trainer = state["trainer"]
        self.epoch = state["epoch"]
        self.iteration = trainer.get("iteration", self.epoch * self.method.plan.iterations_per_epoch)
        self.elapsed_before = trainer["elapsed_s"]
        self.history = trainer.get("history", [])
        self.last_dice = trainer.get("last_dice", {})
        if trainer.get("scaler"):
            self.scaler.load_state_dict(trainer["scaler"])
        self.events.emit("resumed", epoch=self.epoch, iteration=self.iteration)


def train(dataset: str | Path, out_dir: str | Path, config: TrainConfig, resume: bool = False,
          events: EventLog | None = None, started_at: float | None = None) -> Path:
    """Trains a model folder at `out_dir` (see Trainer). A `minutes` budget counts from `started_at` (default: now)."""
    return Trainer(dataset, out_dir, config, resume, events, started_at).run()
