"""`crossmodalseg`: one entry point, sub-commands. User errors end with a clear message and exit code 2, never a
traceback."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from . import __version__
from .config import add_train_arguments, train_config_from_args
from .errors import UserError, printable, report_user_errors


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crossmodalseg", description=(
        "CrossModalSeg: train and run cross-modality segmentation with few labels (single, mkd, maml, cmc). "
        "Errors in what you give end with a message and exit code 2."))
    parser.add_argument("--version", action="version", version=f"crossmodalseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    ds = sub.add_parser("dataset", help="check or import datasets").add_subparsers(dest="dataset_command",
                                                                                     required=True)
    p = ds.add_parser("check", help="validate a dataset folder and print every problem")
    p.add_argument("path", type=Path, help="dataset folder holding dataset.json")
    for name, help_text in (("import-nnunet", "import an nnU-Net v2 raw dataset"),
                            ("import-msd", "import a Medical Segmentation Decathlon task folder")):
        p = ds.add_parser(name, help=help_text)
        p.add_argument("src", type=Path, help="the folder to import")
        p.add_argument("dst", type=Path, help="the new dataset folder to write")
        p.add_argument("--type", action="append", type=_key_value, default=[], metavar="CHANNEL=CT|MR",
                       help="override a channel's modality type")
        p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("train", help="train (or fine-tune) a model")
    p.add_argument("dataset", type=Path,
                   help="dataset folder holding dataset.json (`crossmodalseg dataset check` validates it)")
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    add_train_arguments(p)  # one option per field of the typed run configuration (config.TrainConfig)
    p.add_argument("--json-events", action="store_true", help="print progress as JSON lines instead of a bar")

    p = sub.add_parser("predict", help="segment one case")
    p.add_argument("model", type=Path, help="model folder written by train")
    p.add_argument("--image", action="append", type=_key_value, required=True, metavar="MODALITY=PATH")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--members", action="store_true", help="also write each member's label map")
    p.add_argument("--uncertainty", action="store_true", help="also write the member disagreement map")
    p.add_argument("--tta", action="store_true", help="mirror test-time augmentation")
    p.add_argument("--format", choices=["nii.gz", "nrrd"], default="nii.gz", help="output image format")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    p = sub.add_parser("evaluate", help="Dice and HD95 per structure on a labelled dataset")
    p.add_argument("model", type=Path, help="model folder written by train")
    p.add_argument("dataset", type=Path, help="labelled dataset folder holding dataset.json")
    p.add_argument("--cases", nargs="+", help="score only these case ids")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--members", action="store_true", help="also score each ensemble member on its own")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    p = sub.add_parser("demo", help="offline demo: phantom data -> train -> segment -> report")
    p.add_argument("--out", type=Path, default=Path("demo_output"))
    p.add_argument("--minutes", type=float, default=None,
                   help="training budget of the CT-only baseline (default 2); MKD gets 3x (it trains two networks)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    p = sub.add_parser("serve", help="run the HTTP service (FastAPI on uvicorn)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback needs a token")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port (printed on stdout)")
    p.add_argument("--home", type=Path, default=Path.home() / ".crossmodalseg",
                   help="the service's folder: database, images, models")
    p.add_argument("--token-file", type=Path,
                   help="file holding the access token (default: $CROSSMODALSEG_TOKEN; none = no token)")
    p.add_argument("--max-upload-mb", type=float, default=2048)
    p.add_argument("--stop-on-stdin-eof", action="store_true",
                   help="shut down when standard input ends (a parent that started the server closes the pipe to stop "
                        "it, and the pipe closes when that parent dies)")

    sub.add_parser("info", help="version, devices, methods and their options")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exit_code = report_user_errors(lambda: _dispatch(args))
    if args.command == "train":
        from .engine.distributed import end_torchrun_process

        end_torchrun_process(exit_code)  # (a torchrun rank ends here; why: see there)
    return exit_code


MAX_UPLOAD_MB = 1 << 20  # 1 TB: any larger --max-upload-mb is a typo


def writable_folder(path: Path) -> None:
    """Refuses an output folder that cannot be one (an existing file), before the work that fills it."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file; give a folder for the results")


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "dataset":
        return _dataset(args)
    if args.command == "train":
        from .engine.budget import process_start_time
        from .engine.events import EventLog
        from .engine.trainer import train

        config = train_config_from_args(args)
        # A --minutes budget counts from the process start: imports and preprocessing are part of the run.
        model = train(args.dataset, args.out, config, resume=args.resume, events=EventLog(json_stdout=args.json_events),
                      started_at=process_start_time())
        print(printable(f"model written to {model}"), file=sys.stderr)
        return 0
    if args.command == "predict":
        from .engine.inferer import Predictor

        writable_folder(args.out)  # before minutes of prediction, not after
        given = [modality for modality, _ in args.image]
        twice = sorted({m for m in given if given.count(m) > 1})
        if twice:
            raise UserError(f"--image gives {', '.join(twice)} more than once; give one image per modality")
        predictor = Predictor(args.model, device=args.device, tta=args.tta)
        result = predictor.predict(dict(args.image), members=args.members, uncertainty=args.uncertainty)
        for kind, path in result.save(args.out, suffix="." + args.format).items():
            print(printable(f"{kind}: {path}"))
        return 0
    if args.command == "evaluate":
        from .engine.evaluate import evaluate_model, format_table

        if args.json is not None and args.json.is_dir():
            raise UserError(f"--json {args.json} is a folder; give a file name for the results")
        results = evaluate_model(args.model, args.dataset, args.cases, device=args.device, out_json=args.json,
                                 members=args.members)
        print(printable(format_table(results)))
        return 0
    if args.command == "demo":
        from .demo import run_demo

        budget = {} if args.minutes is None else {"minutes": args.minutes}
        run_demo(args.out, device=args.device, **budget)
        return 0
    if args.command == "serve":
        import os

        from .service.app import serve

        if not 0 <= args.port <= 65535:
            raise UserError(f"--port {args.port}: give a port from 1 to 65535, or 0 for a free one")
        if not (math.isfinite(args.max_upload_mb) and 0 < args.max_upload_mb <= MAX_UPLOAD_MB):
            raise UserError(f"--max-upload-mb {args.max_upload_mb:g}: give a size above 0 and up to {MAX_UPLOAD_MB} MB")
        token = args.token_file.read_text().strip() if args.token_file else os.environ.get("CROSSMODALSEG_TOKEN")
        serve(args.home, args.host, args.port, token or None, int(args.max_upload_mb * 2**20), args.stop_on_stdin_eof)
        return 0
    if args.command == "info":
        import torch

        from .data.plan import PRESETS
        from .methods import method_catalogue

        devices = ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
        print(json.dumps({"version": __version__, "devices": devices, **method_catalogue(),
                          "presets": list(PRESETS)}, indent=2))
        return 0
    raise AssertionError(args.command)


def _dataset(args: argparse.Namespace) -> int:
    if args.dataset_command == "check":
        from .data.check import check_dataset, format_report

        spec, problems = check_dataset(args.path)
        print(printable(format_report(spec, problems)))
        return 1 if problems else 0
    from .data.importers import import_msd, import_nnunet

    importer = import_nnunet if args.dataset_command == "import-nnunet" else import_msd
    spec = importer(args.src, args.dst, dict(args.type) or None, overwrite=args.overwrite)
    print(printable(f"imported {len(spec.cases)} cases into {args.dst / 'dataset.json'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
