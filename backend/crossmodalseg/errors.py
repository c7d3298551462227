"""Which exceptions are the user's to fix, and how to say so in one line."""

from __future__ import annotations


def user_message(error: BaseException) -> str | None:
    """A one-line message for an error caused by input or environment; None for a bug (let it raise)."""
    import torch

    from .data.io import ImageError
    from .data.spec import DatasetError
    from .data.transforms import LabelValueError
    from .engine.checkpoint import ModelFolderError
    from .engine.trainer import TrainingError

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return ("the GPU ran out of memory; use --preset fast (smaller network and patches), free the GPU from "
                "other jobs, or use --device cpu")
    if isinstance(error, (DatasetError, ImageError, LabelValueError, ModelFolderError, TrainingError,
                          FloatingPointError, FileNotFoundError)):
        return str(error)
    if isinstance(error, (ValueError, RuntimeError)) and _ours(error):
        return str(error)
    return None


def _ours(error: BaseException) -> bool:
    """Raised by crossmodalseg's own argument checks (not deep inside a library)."""
    tb = error.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and "crossmodalseg" in last
