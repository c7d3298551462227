"""Entry point of a job's worker process: `python -m crossmodalseg.service.worker PARENT_PID JOB_FILE`.

JOB_FILE (written by the job runner) says what to run as data: a training's typed run configuration
(`config.TrainConfig`, the same model the CLI's `train` options build) or a prediction's inputs; there is no argv
round trip. The worker dies with the server (processes.die_with_parent, on every OS), so a server killed with kill -9
leaves no training running unsupervised; the server's restart marks the job interrupted, and it resumes from its
last checkpoint. A DDP training runs torchrun around `worker rank JOB_FILE`, one process per device.
User errors end as one `error: ...` line on stderr (the job's error), exit code 2, as in the CLI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..errors import report_user_errors
from .processes import die_with_parent


def run_job(job: dict[str, Any]) -> int:
    if job["kind"] == "predict":
        from ..engine.inferer import Predictor

        predictor = Predictor(job["model"], device=job["device"])
        result = predictor.predict(job["images"], members=job["members"], uncertainty=job["uncertainty"])
        result.save(job["out"], suffix=".nrrd")
        return 0
    from ..engine.budget import process_start_time
    from ..engine.events import EventLog
    from ..engine.trainer import train

    # The events go to stdout, which the job runner points at the job's events.jsonl.
    train(job["dataset"], job["out"], TrainConfig.parse(job["config"]), resume=job["resume"],
          events=EventLog(json_stdout=True), started_at=process_start_time())
    return 0


def main(argv: list[str]) -> int:
    if argv[0] == "rank":  # one DDP rank under torchrun
        from ..engine.distributed import end_torchrun_process

        job_file = Path(argv[1])
        exit_code = report_user_errors(lambda: run_job(json.loads(job_file.read_text())))
        end_torchrun_process(exit_code)  # (why: see there)
        return exit_code
    parent, job_file = int(argv[0]), Path(argv[1])
    die_with_parent(parent)
    job = json.loads(job_file.read_text())
    if job.get("processes", 1) > 1:
        from torch.distributed.run import main as torchrun

        torchrun(["--standalone", f"--nproc_per_node={job['processes']}", "-m", "crossmodalseg.service.worker",
                  "rank", str(job_file)])
        return 0
    return report_user_errors(lambda: run_job(job))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
