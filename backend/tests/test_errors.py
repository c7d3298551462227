"""Errors are the user's by type, never by the path of the file that raised them (issue 11).

Before the fix, an exception counted as the user's when the last traceback frame's path contained "crossmodalseg":
in a checkout named crossmodalseg (with .venv inside it, as the README installs it) every numpy or torch error
became a one-line "user error" (HTTP 400, CLI exit 2, no traceback)."""

from __future__ import annotations

import pytest

from crossmodalseg.data.gate import ImageError
from crossmodalseg.data.spec import DatasetError
from crossmodalseg.data.transforms import LabelValueError
from crossmodalseg.engine.checkpoint import ModelFolderError
from crossmodalseg.engine.trainer import TrainingError
from crossmodalseg.errors import UserError, user_message
from crossmodalseg.methods import get_method

LIBRARY_FILE = "/home/someone/crossmodalseg/.venv/lib/python3.11/site-packages/numpy/core/fromnumeric.py"


def raised_in(filename: str, error: BaseException) -> BaseException:
    """`error` raised by code whose file is `filename`, as a library inside the checkout's .venv would raise it."""
    scope: dict = {"error": error}
    exec(compile("def fail():\n    raise error\n", filename, "exec"), scope)
    try:
        scope["fail"]()
    except BaseException as e:  # noqa: BLE001 - the point is to get the traceback
        return e
    raise AssertionError("not raised")


@pytest.mark.parametrize("error", [ValueError("operands could not be broadcast together"),
                                   RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
                                   IndexError("index 3 is out of bounds")])
def test_a_library_error_inside_a_checkout_named_crossmodalseg_is_a_bug(error):
    assert user_message(raised_in(LIBRARY_FILE, error)) is None


@pytest.mark.parametrize("error", [DatasetError("d"), ImageError("i"), LabelValueError("l"), ModelFolderError("m"),
                                   TrainingError("t"), UserError("u"), FileNotFoundError("f")])
def test_our_errors_are_the_users_wherever_they_are_raised(error):
    assert user_message(raised_in("/somewhere/else/module.py", error)) == str(error)


def test_an_argument_check_gives_a_user_error():
    with pytest.raises(UserError, match="unknown method 'nope'"):
        get_method("nope")


def test_a_failed_jobs_error_keeps_the_whole_list_of_problems(tmp_path):
    """The worker prints `error: ...` with one line per problem; the job's error (what the API shows) keeps them
    all, not just the first line (the list used to be only in worker.log, which the API cannot reach)."""
    from crossmodalseg.service.jobs import worker_error

    log = tmp_path / "worker.log"
    log.write_text("[train] preprocessing\nerror: dataset 'd' has 2 problem(s); fix them:\n"
                   "  - case1 [ct]: label values [7] are not in the dataset's labels\n"
                   "  - case2 [mr]: image file not found: case2/mr.nii.gz\n")
    message = worker_error(log, 2)
    assert message.startswith("dataset 'd' has 2 problem(s)")
    assert "case1 [ct]: label values [7]" in message and "case2 [mr]: image file not found" in message
    assert "preprocessing" not in message
