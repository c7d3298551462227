"""Draws Resources/Screenshots/CrossModalSeg_results.png: the product's results on real, held-out images.

MKD as a user would run it: the manual liver of the CHAOS CT (512x512x78) as the labelled target, an abdominal MR of
another person (TotalSegmentator's example MR, its liver pseudo-label) as the unpaired assistant; then the
TotalSegmentator example CT (a third person, never seen in training) is segmented, with both members and their
disagreement. Reads ../shared/data (never shipped); the picture's images are TotalSegmentator's Apache-2.0 test
files. Takes a few minutes on 2 CPU cores:

    .venv/bin/python scripts/results_picture.py --minutes 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from crossmodalseg.data.io import read_image, write_image
from crossmodalseg.data.spec import Case, DatasetSpec
from crossmodalseg.demo import CT_SOFT_TISSUE_WINDOW, MODELS
from crossmodalseg.engine.inferer import Predictor, dice_between
from crossmodalseg.engine.trainer import TrainConfig, train
from crossmodalseg.report import radiological, save_overlay

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CHAOS = DATA / "chaos_ct_liver"
TS = DATA / "totalsegmentator_ct_mr_examples"
LIVER = 1  # in the CHAOS label and in TotalSegmentator's *_label4 maps


def liver_only(label: Path, out: Path) -> Path:
    return write_image(sitk.Cast(read_image(label) == LIVER, sitk.sitkUInt8), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "Resources" / "Screenshots" / "CrossModalSeg_results.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cms-picture-") as tmp:
        work = Path(tmp)
        spec = DatasetSpec("liver-ct-mr", {"background": 0, "liver": 1}, {"ct": "CT", "mr": "MR"}, [
            Case("chaos", {"ct": CHAOS / "chaos_ct_case_liver_image.nii.gz"},
                 {"ct": CHAOS / "chaos_ct_case_liver_label.nii.gz"}),
            Case("ts_mr", {"mr": TS / "example_mr_sm.nii.gz"},
                 {"mr": liver_only(TS / "example_mr_sm_label4.nii.gz", work / "ts_mr_liver.nii.gz")})],
            work / "data")
        spec.save()
        method, assistants, options = MODELS["mkd"]
        model = train(spec.root, work / "model", TrainConfig(method=method, target="ct", assistants=assistants,
                                                             minutes=args.minutes, seed=args.seed, options=options))
        result = Predictor(model).predict({"ct": TS / "example_ct_sm.nii.gz"}, members=True, uncertainty=True)
        image = radiological(read_image(TS / "example_ct_sm.nii.gz"))
        reference = radiological(read_image(TS / "example_ct_sm_label4.nii.gz")) == LIVER
        maps = {"ensemble": radiological(result.label)} | {n: radiological(m) for n, m in result.members.items()}
        scores = {n: round(dice_between(m == LIVER, reference, ["liver"])["liver"] or 0.0, 3) for n, m in maps.items()}
        panels = [("reference (TotalSegmentator)", reference.astype(np.uint8))]
        panels += [(f"MKD {n}: Dice {scores[n]:.2f}", (m == LIVER).astype(np.uint8)) for n, m in maps.items()]
        save_overlay(args.out, image, panels, ["liver"], window=CT_SOFT_TISSUE_WINDOW,
                     heatmap=("member disagreement", radiological(result.disagreement)),
                     title=f"held-out CT, MKD trained {args.minutes:g} min on CHAOS CT + an unpaired MR")
        out = args.out.resolve()  # the picture's path, relative to the repository where it lies inside it
        record = {"picture": str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out), "minutes": args.minutes,
                  "seed": args.seed,
                  "liver_dice_vs_totalsegmentator_pseudo_label": scores, "info": result.info}
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
