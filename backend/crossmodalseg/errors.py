"""Which exceptions are the user's to fix, and how to say so in one line.

Classified by type, never by where they were raised: an error is the user's when it is a `UserError` (raised by
our own checks of inputs and settings, with a message that says what to do) or one of a few environment errors
(missing file, GPU out of memory, a diverging loss). Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Callable


class UserError(ValueError):
    """An input or setting the user can fix; the message says how."""


def user_message(error: BaseException) -> str | None:
    """A one-line message for an error caused by input or environment; None for a bug (let it raise)."""
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return ("the GPU ran out of memory; use --preset fast (smaller network and patches) or a smaller "
                "--batch-size, free the GPU from other jobs, or use --device cpu")
    if isinstance(error, (UserError, FloatingPointError, FileNotFoundError)):
        return str(error)
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        # a path the user gave that the system refuses: an existing file where a folder goes, a name too long, no
        # permission, a full disk
        return f"{error.filename}: {error.strerror}"
    return None


def printable(text: str) -> str:
    """`text` for a terminal: control characters (a terminal escape in a file name, a bidirectional override) shown
    as Python escapes such as \\x1b; line breaks kept."""
    return "".join(c if c == "\n" or c.isprintable() else repr(c)[1:-1] for c in text)


def report_user_errors(run: Callable[[], int]) -> int:
    """Runs a command; a user's error ends it with one `error: ...` line on stderr and exit code 2 (the job
    runner shows that line as the job's error), a bug keeps its traceback."""
    import sys

    try:
        return run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - user-facing boundary: known errors become one clear line
        message = user_message(e)
        if message is None:
            raise
        print(f"error: {printable(message)}", file=sys.stderr)
        return 2
