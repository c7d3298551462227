"""Training methods, chosen by name."""

from __future__ import annotations

from ..errors import UserError
from .base import Method, StepContext, Task
from .cmc import CMC
from .maml import MAML
from .mkd import MKD
from .single import Single

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Single, MKD, MAML, CMC)}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


def method_catalogue() -> dict[str, dict]:
    """What `crossmodalseg info` and GET /info tell about the methods: what each is for, and each option's
    default (the names `--option NAME=VALUE` and a job's `options` take)."""
    return {"methods": {n: m.description for n, m in METHODS.items()},
            "method_options": {n: m.default_options() for n, m in METHODS.items()}}


__all__ = ["METHODS", "Method", "StepContext", "Task", "get_method", "method_catalogue"]
