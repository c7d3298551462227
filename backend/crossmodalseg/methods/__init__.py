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


__all__ = ["METHODS", "Method", "StepContext", "Task", "get_method"]
