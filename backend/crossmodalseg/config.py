"""The one typed run configuration: what a training run is told, from the command line, the HTTP API or Python.

`TrainConfig` is the single source of a run's settings. The service's job request for a training is its client-facing
part (`TrainSettings`) plus the job's own fields; the server writes the whole config as the job's JSON file and the
worker reads it back (no argv round trip); the CLI's `train` options are generated from the same fields; each method
declares its own typed options (`MethodOptions` subclasses in `methods/`). Validation is strict everywhere: unknown
fields, NaN/Inf, out-of-range numbers, the epochs/minutes exclusion and oversized strings are refused with a message
that names the field (a `ConfigError`, i.e. a user error: CLI exit 2, HTTP 422).
"""

from __future__ import annotations

import argparse
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from .data.spec import ID_PATTERN
from .errors import UserError


def _identifier(value: str) -> str:
    if not ID_PATTERN.match(value):
        raise ValueError("use 1-128 letters, digits, '_', '-' or '.', starting with a letter or digit")
    return value


def _text(value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("control characters (newlines, NUL ...) are not allowed")
    return value


# Names that become folder names or keys (modalities, case ids): the dataset spec's own rule.
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=128), AfterValidator(_identifier)]
# Free text a user types (a model's name): printable, bounded.
Text = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(_text)]
# A file path given on the server's own command line (never accepted over HTTP).
LocalPath = Annotated[str, StringConstraints(min_length=1, max_length=4096), AfterValidator(_text)]
Device = Literal["auto", "cpu", "cuda"]
Preset = Literal["fast", "full"]

MAX_EPOCHS = 100_000
MAX_MINUTES = 7 * 24 * 60  # a week


class ConfigError(UserError):
    """A setting out of range, of the wrong type or unknown; the message names each."""


class StrictModel(BaseModel):
    """No unknown fields, no NaN or infinity, no silent type coercion ("5" is not 5)."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


def describe_errors(error: Any, prefix: str = "") -> str:
    """One line per problem (at most 20), naming the field and what it must be; never echoing the input, which
    may be huge, binary or a float JSON cannot encode. `error`: a pydantic ValidationError or FastAPI's
    RequestValidationError."""
    errors = (error.errors(include_url=False, include_input=False) if isinstance(error, ValidationError)
              else error.errors())
    lines = []
    for e in errors:
        loc = list(e.get("loc", ()))
        loc = loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc
        where = ".".join(str(p) for p in loc if not str(p).startswith("function-"))
        # Our own validators' messages are whole sentences; pydantic's own need the field's name.
        ctx = e.get("ctx") or {}
        message = str(ctx["error"]) if e.get("type") == "value_error" and "error" in ctx else str(e.get("msg"))
        lines.append(f"{prefix}{where}: {message}" if where else f"{prefix}{message}")
    lines = list(dict.fromkeys(lines))  # unions repeat a message per branch
    more = f"; ... and {len(lines) - 20} more" if len(lines) > 20 else ""
    return "; ".join(lines[:20]) + more


def parse(model: type[StrictModel], data: Any, prefix: str = "") -> Any:
    """`model` validated from plain data, or a ConfigError saying every problem (each line after `prefix`)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe_errors(e, prefix)) from None


class MethodOptions(StrictModel):
    """A method's own options (hyper-parameters); subclasses declare them with defaults and ranges."""
    # Options naming a file on the machine that trains: the command line's only, never accepted over HTTP.
    local_files: ClassVar[tuple[str, ...]] = ()


def _option_value(value: Any) -> Any:
    """A method option's value: a boolean, a finite number or a short printable string (flat: no lists, no
    objects). Its type and range are the method's to check (`MethodOptions`), with a message naming the option."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("numbers must be finite")
    if isinstance(value, str):
        if len(value) > 4096:
            raise ValueError("at most 4096 characters")
        return _text(value)
    if not isinstance(value, (bool, int, float)):
        raise ValueError("an option is a number, a string or true/false")
    return value


OptionValue = Annotated[Any, AfterValidator(_option_value),
                        WithJsonSchema({"anyOf": [{"type": "boolean"}, {"type": "number"}, {"type": "string"}]})]


class RunBudget(StrictModel):
    """How long and where a run trains: the part of a run a fine-tuning may still choose."""
    epochs: int | None = Field(None, ge=1, le=MAX_EPOCHS,
                               description="epochs to train (default per preset); not with `minutes`")
    minutes: float | None = Field(None, gt=0, le=MAX_MINUTES,
                                  description="wall-time budget of the whole run; not with `epochs`")
    iterations_per_epoch: int | None = Field(None, ge=1, le=100_000, description="default from the plan")
    batch_size: int | None = Field(None, ge=1, le=16, description="patches per training step (default from the "
                                   "plan: 4 with preset fast, 2 with full); fewer need less memory")
    device: Device = Field("auto", description="auto = a GPU when there is one")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    checkpoint_every: int = Field(1, ge=1, le=MAX_EPOCHS, description="epochs between checkpoints")
    val_every: int = Field(5, ge=1, le=MAX_EPOCHS, description="epochs between validations (and after the last)")

    @model_validator(mode="after")
    def _one_budget(self) -> "RunBudget":
        if self.epochs is not None and self.minutes is not None:
            raise ValueError("give `epochs` or `minutes`, not both")
        return self


class TrainSettings(RunBudget):
    """Everything a client chooses about a training run (the job request's body has exactly these, plus the job's
    own fields)."""
    method: str = Field("single", max_length=32,
                        description="single | mkd | maml | cmc (`crossmodalseg info`, GET /info)")
    target: Identifier | None = Field(None, description="the modality to segment")
    assistants: list[Identifier] = Field([], max_length=8, description="assistant modalities")
    preset: Preset = "fast"
    options: dict[Identifier, OptionValue] = Field(
        {}, max_length=64, description="the method's options (`crossmodalseg info` and GET /info list them)")

    @model_validator(mode="after")
    def _method_and_options(self) -> "TrainSettings":
        from .methods import METHODS

        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.target is not None and self.target in self.assistants or len(set(self.assistants)) < len(
                self.assistants):
            raise ValueError("each modality may be given once (target and assistants)")
        # The method's typed options, checked here so that a bad option is refused before a job is stored.
        self.options = METHODS[self.method].check_options(self.options, only_given=True)
        return self


class TrainConfig(TrainSettings):
    """A whole run: the client's settings plus what only the machine running it decides."""
    val_cases: list[Identifier] | None = Field(None, max_length=10_000,
                                               description="held out for validation (default: 20 % from 5 cases)")
    init_from: LocalPath | None = Field(None, description="fine-tune from this model folder")
    finetune_lr_factor: float = Field(0.3, gt=0, le=1)
    amp: bool = True

    @model_validator(mode="before")
    @classmethod
    def _legacy_names(cls, data: Any) -> Any:
        """run.json files written before the options had their name."""
        if isinstance(data, dict) and "hparams" in data and "options" not in data:
            data = {**data, "options": data["hparams"]}
            del data["hparams"]
        return data

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> "TrainConfig":
        return parse(cls, dict(data), "training settings: ")


# ---- the CLI's train options, generated from the fields ---------------------------------------------------------
# Flags whose command-line spelling differs from the field (repeatable singular flags, NAME=VALUE pairs).
_CLI_SPELLING = {"assistants": "--assistant", "options": "--option"}
_CLI_HIDDEN = {"amp", "finetune_lr_factor"}


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the type inside Optional/Annotated, whether it is a list)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _base_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else (annotation, False)
    if origin is list:
        return _base_type(typing.get_args(annotation)[0])[0], True
    return annotation, False


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    key, value = (part.strip() for part in text.split("=", 1))
    try:
        return key, json.loads(value)  # numbers and booleans as such
    except json.JSONDecodeError:
        return key, value


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field (`--iterations-per-epoch` for `iterations_per_epoch`), with its help and
    choices; defaults stay with the model, so only what the user typed is passed on."""
    budget = parser.add_mutually_exclusive_group()
    for name, info in TrainConfig.model_fields.items():
        if name in _CLI_HIDDEN:
            continue
        flag = _CLI_SPELLING.get(name, "--" + name.replace("_", "-"))
        kind, many = _base_type(info.annotation)
        help_text = (info.description or "").replace("%", "%%")  # argparse formats help with %
        if info.default not in (None, [], {}):
            help_text += f" (default: {info.default})"
        target = budget if name in ("epochs", "minutes") else parser
        if name == "options":
            target.add_argument(flag, dest=name, action="append", type=_key_value, metavar="NAME=VALUE",
                                help="a method option (repeatable); " + help_text)
        elif typing.get_origin(kind) is Literal:
            target.add_argument(flag, dest=name, choices=typing.get_args(kind), help=help_text)
        elif many:
            target.add_argument(flag, dest=name, action="append" if name in _CLI_SPELLING else None,
                                nargs=None if name in _CLI_SPELLING else "+", help=help_text)
        else:
            target.add_argument(flag, dest=name, type=kind if kind in (int, float) else str, help=help_text)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {name: getattr(args, name) for name in TrainConfig.model_fields if getattr(args, name, None) is not None}
    if "options" in given:
        given["options"] = dict(given["options"])
    return TrainConfig.parse(given)
