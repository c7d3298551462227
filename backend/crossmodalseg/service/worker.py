"""Entry point of a job's worker process: `python -m crossmodalseg.service.worker PARENT_PID cli|torchrun ARGS...`.

The worker dies with the server (processes.die_with_parent, on every OS), so a server killed with kill -9 leaves no
training running unsupervised; the server's restart marks the job interrupted, and it resumes from its last checkpoint.
Then it runs the ordinary CLI (or torchrun around it for DDP): one code path for the command line and the service.
"""

from __future__ import annotations

import sys

from .processes import die_with_parent


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
