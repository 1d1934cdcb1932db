"""`nasdose predict`: arguments -> nas_dose.predict.run."""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from .. import predict
from ..config import add_config_arguments, load_config
from ..data.preferences import describe
from ..data.store import SPLITS
from .common import add_force_argument

STAGE = predict


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, metavar="MODEL",
                        help="training run folder (its best.pt), a checkpoint file or an ensemble .yaml")
    parser.add_argument("--data", type=Path, required=True, metavar="DATA.h5", help="nasdose data set")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument("--split", choices=SPLITS, help="predict this split only (default: every patient)")
    parser.add_argument("--tta", action="store_true", default=None,
                        help="average over flips along axes 0 and 1 (test-time augmentation)")
    parser.add_argument("--no-csv", dest="csv", action="store_false", default=None,
                        help="skip the submission files (CSVs, or NIfTI or RT Dose with --format nifti|dicom)")
    parser.add_argument("--format", choices=tuple(predict.FORMATS), default=None,
                        help="submission files: csv (OpenKBP, submission/; the default), nifti (nifti/*.nii.gz, "
                             "on each patient's original voxel grid and affine) or dicom (dicom/*.dcm, an RT Dose "
                             "aligned with the patient's CT; patients imported from DICOM)")
    parser.add_argument("--preference", metavar="NAME=V,...|measured", default=None,
                        help=f"a conditioned model's planning preferences ({describe()}); 'measured': each "
                             "patient's own, measured on its dose (as nasdose train scores a conditioned model)")
    parser.add_argument("--sweep", metavar="NAME=V1,V2,...", default=None,
                        help="predict one dose per value of one preference (the others from --preference), "
                             "NAME=V.h5 each, and overlay each patient's DVHs in dvh/")
    add_force_argument(parser, "the predictions in DIR")
    add_config_arguments(parser, "runtime.device=cpu tta=true")


def main(args: argparse.Namespace) -> None:
    config = load_config(predict.Config, args.config, args.overrides)
    given = (("split", args.split), ("tta", args.tta), ("csv", args.csv), ("format", args.format),
             ("preference", args.preference), ("sweep", args.sweep))
    flags = {k: v for k, v in given if v is not None}
    predict.run(replace(config, **flags), predict.Inputs(args.model, args.data), args.out, force=args.force)
