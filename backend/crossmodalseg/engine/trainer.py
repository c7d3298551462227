"""The training loop: budget (epochs or minutes), poly learning rate, mixed precision, validation Dice,
checkpoints at a fixed interval with --resume, JSON-lines progress events, and DDP under torchrun.

Configuration flows one way: dataset spec -> plan (or the plan of --init-from) -> method -> this loop -> model folder.
Everything the run decided is written to `run.json` before the first step, so --resume continues the same run.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .. import __version__
from ..data.plan import Plan, make_plan
from ..data.check import check_dataset
from ..data.spec import DatasetError, DatasetSpec, load_spec, write_json_atomic
from ..data.transforms import LoadCased
from ..methods import Method, StepContext, Task, get_method
from .checkpoint import (
    MODEL_FILE,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    read_model_meta,
    save_checkpoint,
    write_model_folder,
)
from .distributed import DistContext, init_distributed, resolve_device, shutdown_distributed
from .events import EventLog
from .inferer import build_method, dice_between, predict_probabilities

RUN_FILE = "run.json"
DEFAULT_EPOCHS = {"fast": 40, "full": 200}


class TrainingError(RuntimeError):
    """Training cannot start or go on; the message says what to change."""


@dataclass
class TrainConfig:
    method: str = "single"
    target: str = ""
    assistants: list[str] = field(default_factory=list)
    preset: str = "fast"
    epochs: int | None = None  # default per preset, or unlimited with `minutes`
    minutes: float | None = None
    iterations_per_epoch: int | None = None  # default from the plan
    device: str = "auto"
    seed: int = 0
    checkpoint_every: int = 1  # epochs
    val_every: int = 5  # epochs (and always after the last)
    val_cases: list[str] | None = None  # default: 20 % of the scorable cases when there are at least 5
    hparams: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    finetune_lr_factor: float = 0.3
    amp: bool = True


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
        return []  # too few labels to hold any out: validation then scores the training cases
    rng = np.random.default_rng(config.seed)
    n = max(1, int(round(0.2 * len(scorable))))
    return sorted(rng.choice(sorted(scorable), n, replace=False).tolist())


class Trainer:
    def __init__(self, dataset: str | Path, out_dir: str | Path, config: TrainConfig, resume: bool = False,
                 events: EventLog | None = None):
        self.out = Path(out_dir)
        self.config = config
        self.resume = resume
        self.spec: DatasetSpec = load_spec(dataset)
        self.dist: DistContext = DistContext()
        self.events = events or EventLog(progress_bar=False)

    # ---- set-up -------------------------------------------------------------------------------------------
    def _prepare_method(self) -> tuple[Method, dict[str, Any]]:
        run_file = self.out / RUN_FILE
        if self.resume:
            if not run_file.exists():
                raise TrainingError(f"--resume: {self.out} holds no run to resume (no {RUN_FILE})")
            run = json.loads(run_file.read_text())
            saved = TrainConfig(**run["config"])
            # What defines the model comes from the interrupted run; only the budget may be changed on resume.
            saved.epochs = self.config.epochs or saved.epochs
            saved.minutes = self.config.minutes or saved.minutes
            saved.device = self.config.device
            self.config = saved
            return build_method(run), run
        if (self.out / MODEL_FILE).exists() or latest_checkpoint(self.out):
            raise TrainingError(f"{self.out} already holds a model or a checkpoint; pass --resume to continue it or "
                                f"choose another --out")
        if not self.config.target:
            raise TrainingError("no --target modality given; the dataset has: " + ", ".join(self.spec.modalities))
        task = Task.from_spec(self.spec, self.config.target, self.config.assistants)
        method_cls = get_method(self.config.method)
        init_meta = None
        if self.config.init_from:
            init_meta = read_model_meta(Path(self.config.init_from))
            self._check_compatible(init_meta, task)
            plan = Plan.from_json(init_meta["plan"])
        else:
            plan = make_plan(self.spec, [task.target, *task.assistants], self.config.preset)
        if self.config.iterations_per_epoch:
            plan.iterations_per_epoch = self.config.iterations_per_epoch
        if init_meta is not None:  # the model's own hyper-parameters (its networks depend on them), then overrides
            self.config.hparams = {**init_meta["method"].get("hparams", {}), **self.config.hparams}
        method = method_cls(task, plan, self.config.hparams)
        if init_meta is not None:
            load_weights(Path(self.config.init_from), method.nets)
            plan.learning_rate *= self.config.finetune_lr_factor
        run = {"method": method.to_json(), "task": task.to_json(), "plan": plan.to_json(),
               "config": asdict(self.config), "dataset": {"name": self.spec.name, "path": str(self.spec.root)}}
        return method, run

    def _check_compatible(self, meta: dict[str, Any], task: Task) -> None:
        if meta["method"]["name"] != self.config.method:
            raise TrainingError(f"--init-from model was trained with method {meta['method']['name']!r}, not "
                                f"{self.config.method!r}; fine-tune with the same method")
        old = Task(**meta["task"])
        if old.labels != task.labels:
            raise TrainingError(f"--init-from model segments {old.labels}, this dataset labels {task.labels}")
        if old.modalities != task.modalities or old.target != task.target:
            raise TrainingError(f"--init-from model uses modalities {old.modalities} (target {old.target!r}); "
                                f"this run asks for {task.modalities} (target {task.target!r})")

    def _load_items(self, method: Method, val_ids: list[str]) -> tuple[dict[str, list[dict]], list[dict]]:
        items: dict[str, list[dict]] = {}
        label_values = method.task.label_values
        for name, stream in method.streams(self.spec).items():
            loader = LoadCased(stream.modalities, method.plan, label_values, use_label=stream.labelled)
            cases = [c for c in stream.cases if not (stream.labelled and c.id in val_ids)]
            if not cases and stream.required:
                raise TrainingError(f"method {method.name!r} has no training cases for its {name!r} data (needs "
                                    f"{', '.join(stream.modalities)}{' with labels' if stream.labelled else ''})")
            items[name] = [loader({"case": c}) for c in cases]
        by_id = {c.id: c for c in method.validation_cases(self.spec)}
        val_items = [self._scoring_item(method, by_id[c]) for c in val_ids]
        return items, val_items

    @staticmethod
    def _scoring_item(method: Method, case) -> dict:
        """A case as the validation scores it: the input modalities it has (target first) and the target label."""
        available = [m for m in method.input_modalities() if m in case.images]
        item = LoadCased(available, method.plan, method.task.label_values)({"case": case})
        item["available"] = available
        return item

    # ---- the loop -----------------------------------------------------------------------------------------
    def run(self) -> Path:
        device = resolve_device(self.config.device)
        self.dist = init_distributed(device)
        if not self.dist.is_main:
            self.events = EventLog(enabled=False)
        try:
            return self._run(device)
        finally:
            shutdown_distributed(self.dist)

    def _check_data(self) -> None:
        """Refuses a dataset with problems before any work, listing them all (not the first one hit mid-run)."""
        _, problems = check_dataset(self.spec.root)
        if problems:
            shown = "\n".join(f"  - {p}" for p in problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise DatasetError(f"dataset {self.spec.name!r} has {len(problems)} problem(s); fix them (see "
                               f"`crossmodalseg dataset check {self.spec.root}`):\n{shown}{more}")

    def _run(self, device: torch.device) -> Path:
        self._check_data()
        torch.manual_seed(self.config.seed)  # before the networks exist: their initial weights are part of the run
        method, run = self._prepare_method()
        cfg = self.config  # (a resumed run's own configuration)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main and not self.resume:
            write_json_atomic(self.out / RUN_FILE, run)
        self.events.path = self.out / "events.jsonl" if self.dist.is_main else None
        method.to(device)

        scorable = [c.id for c in method.validation_cases(self.spec)]
        val_ids = split_validation(scorable, cfg)
        self.events.emit("log", message=f"preprocessing {self.spec.name}: method {method.name}, plan spacing "
                                        f"{[round(s, 3) for s in method.plan.spacing]} mm, patch {method.plan.patch_size}")
        items, val_items = self._load_items(method, val_ids)
        if not val_items:  # few labels: report Dice on (up to four of) the training cases, and say so
            by_id = {c.id: c for c in method.validation_cases(self.spec)}
            val_items = [self._scoring_item(method, by_id[i]) for i in sorted(by_id)[:4]]
        method.prepare(items, fresh=not (self.resume or cfg.init_from))
        val_on = "held-out" if val_ids else "training"

        if self.dist.enabled:
            ids = [device.index] if device.type == "cuda" else None
            method.wrap(lambda net: DistributedDataParallel(net, device_ids=ids))
        optimizers = method.optimizers()
        amp_dtype = None
        if cfg.amp and device.type == "cuda":
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        ctx = StepContext(device, amp_dtype, scaler)

        start_epoch, elapsed_before, history = 0, 0.0, []
        if self.resume:
            ckpt = latest_checkpoint(self.out)
            if ckpt is None:
                raise TrainingError(f"--resume: {self.out} has no complete checkpoint yet; start again without --resume")
            state = load_checkpoint(ckpt, method.nets, optimizers)
            start_epoch = state["epoch"]
            elapsed_before = state["trainer"]["elapsed_s"]
            history = state["trainer"].get("history", [])
            self.events.emit("resumed", epoch=start_epoch)

        iterations = method.plan.iterations_per_epoch
        budget_s = cfg.minutes * 60 if cfg.minutes else None
        epochs = cfg.epochs or (10**6 if budget_s else DEFAULT_EPOCHS.get(method.plan.preset, 40))
        base_lrs = {name: [g["lr"] for g in opt.param_groups] for name, opt in optimizers.items()}
        stream = method.batches(items, seed=cfg.seed * 1000 + self.dist.rank * 97 + start_epoch, device=device)
        self.events.emit("start", method=method.name, epochs=None if budget_s else epochs,
                         minutes=cfg.minutes, iterations_per_epoch=iterations, device=str(device),
                         world_size=self.dist.world_size, train_cases={k: len(v) for k, v in items.items()},
                         val_cases=val_ids, val_on=val_on, resumed_from=start_epoch or None)

        if os.environ.get("CROSSMODALSEG_FAKE_OOM_DATASET") == self.spec.name:
            # Test hook: stands in for a real GPU out-of-memory error where no GPU is (CI), to test the error path.
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated by CROSSMODALSEG_FAKE_OOM_DATASET)")
        started = time.time()
        epoch = start_epoch
        last_dice: dict[str, Any] = {}
        while epoch < epochs:
            epoch += 1
            epoch_start = time.time()
            method.train_mode(True)
            losses: dict[str, list[float]] = {}
            for it in range(iterations):
                elapsed = elapsed_before + time.time() - started
                progress = ((epoch - 1) * iterations + it) / (epochs * iterations)
                if budget_s:
                    progress = max(progress, elapsed / budget_s) if cfg.epochs else elapsed / budget_s
                ctx.progress = min(progress, 1.0)
                poly = (1 - ctx.progress) ** 0.9
                for name, opt in optimizers.items():
                    for group, lr in zip(opt.param_groups, base_lrs[name]):
                        group["lr"] = lr * poly
                logs = method.training_step(next(stream), ctx)
                scaler.update()
                for k, v in logs.items():
                    losses.setdefault(k, []).append(v)
            mean_losses = {k: self.dist.mean(float(np.mean(v))) for k, v in losses.items()}
            elapsed = elapsed_before + time.time() - started
            out_of_time = bool(budget_s and elapsed + (time.time() - epoch_start) > budget_s)
            last = self.dist.broadcast_flag(epoch >= epochs or out_of_time)
            record: dict[str, Any] = {"epoch": epoch, **{k: round(v, 5) for k, v in mean_losses.items()}}
            if self.dist.is_main and (last or epoch % cfg.val_every == 0):
                last_dice = self.validate(method, val_items, device)
                record["val_dice"] = last_dice
            history.append(record)
            if self.dist.is_main and (last or epoch % cfg.checkpoint_every == 0):
                save_checkpoint(self.out, epoch, method.nets, optimizers,
                                {"elapsed_s": elapsed, "history": history[-200:]})
            self.dist.barrier()
            per_epoch = (time.time() - started) / max(epoch - start_epoch, 1)
            # With a time budget, the number of epochs is what the remaining time allows at the measured pace.
            total_epochs = epochs if not budget_s else max(epoch, int(budget_s // max(per_epoch, 1e-6)))
            eta = (budget_s - elapsed) if budget_s and not cfg.epochs else per_epoch * (epochs - epoch)
            self.events.emit("epoch", of=min(total_epochs, epochs), eta_s=round(max(eta, 0.0), 1),
                             elapsed_s=round(elapsed, 1), val_on=val_on,
                             **{k: v for k, v in record.items()})
            if last:
                break

        model_dir = self.out
        if self.dist.is_main:
            meta = {**{k: run[k] for k in ("method", "task", "plan")},
                    "training": {"epochs": epoch, "iterations_per_epoch": iterations, "seconds": round(elapsed, 1),
                                 "device": str(device), "world_size": self.dist.world_size, "val_cases": val_ids,
                                 "val_on": val_on, "val_dice": last_dice, "init_from": cfg.init_from,
                                 "config": asdict(cfg), "dataset": run["dataset"]},
                    "software": software_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            write_model_folder(model_dir, meta, method.nets)
            self.events.emit("done", model=str(model_dir), epochs=epoch, seconds=round(elapsed, 1),
                             val_dice=last_dice)
        self.dist.barrier()
        return model_dir

    @staticmethod
    def validate(method: Method, val_items: list[dict], device: torch.device) -> dict[str, Any]:
        """Per-structure Dice of the ensemble on the validation items (plan grid), averaged over cases."""
        per_structure: dict[str, list[float]] = {s: [] for s in method.task.structures}
        for item in val_items:
            probs = predict_probabilities(method, item["image"], item["available"], device)
            predicted = method.ensemble(probs).argmax(0).numpy()
            for name, value in dice_between(predicted, item["label"][0], method.task.structures).items():
                if value is not None:
                    per_structure[name].append(value)
        result = {name: round(float(np.mean(v)), 4) for name, v in per_structure.items() if v}
        if result:
            result["mean"] = round(float(np.mean(list(result.values()))), 4)
        return result


def train(dataset: str | Path, out_dir: str | Path, config: TrainConfig, resume: bool = False,
          events: EventLog | None = None) -> Path:
    """Trains a model folder at `out_dir` (see Trainer)."""
    return Trainer(dataset, out_dir, config, resume, events).run()

