"""Entry point of a job's worker process: `python -m crossmodalseg.service.worker PARENT_PID cli|torchrun ARGS...`.

The worker dies with the server (Linux parent-death signal), so a server killed with kill -9 leaves no training
running unsupervised; the server's restart marks the job interrupted, and it resumes from its last checkpoint.
Then it runs the ordinary CLI (or torchrun around it for DDP): one code path for the command line and the service.
"""

from __future__ import annotations

import os
import signal
import sys


def die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def main(argv: list[str]) -> int:
    parent, runner, args = int(argv[0]), argv[1], argv[2:]
    die_with_parent(parent)
    if runner == "torchrun":
        from torch.distributed.run import main as torchrun

        torchrun(args)
        return 0
    from ..cli import main as cli

    return cli(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
