"""Build and inspect nasdose HDF5 data sets.

  nasdose data import SRC OUT.h5 [--grid N] [--spacing MM] [--aliases FILE]
      an OpenKBP tree (CSV or npz layout), NIfTI or DICOM patient folders -> a data set,
      block-downsampled to the grid (NIfTI and DICOM volumes of any shape or orientation resampled first)
  nasdose data synth OUT.h5 [--patients N] [--unlabeled M] [--preferences K] [--beam-plates] [--grid G] [--seed S]
      synthetic head-and-neck phantoms with a beam-model dose -> a data set (M more in the
      "unlabeled" split, without their dose; K more plans per phantom with other preferences;
      each plan's beam arrangement as an extra input channel)
  nasdose data info FILE
      what a data set or prediction file holds: splits, voxel sizes, structures, doses
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import int_at_least, positive_float
from ..data import importer, synth
from ..data.dataset import input_channels
from ..data.geometry import original_geometry
from ..data.patient import OPENKBP_GRID, ROIS
from ..data.store import DataFile, open_data
from ..progress import progress
from ..scores import resampling_floor
from .common import add_force_argument


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser("import", parents=[common],
                       help="import an OpenKBP tree (CSV or npz layout), NIfTI or DICOM patients")
    p.add_argument("src", type=Path, metavar="SRC",
                   help="OpenKBP folder (train-pats/... or train/... split folders), a folder of "
                        "patients (OpenKBP, NIfTI folders holding ct.nii.gz, or DICOM folders: CT series, RTSTRUCT, "
                        "RT Dose), or one patient")
    p.add_argument("out", type=Path, metavar="OUT.h5")
    p.add_argument("--grid", type=int_at_least(1), default=OPENKBP_GRID,
                   help=f"grid to store (default %(default)s): OpenKBP, a divisor of {OPENKBP_GRID} (64, 32, ...); "
                        "NIfTI and DICOM, any size (e.g. 48, 96)")
    p.add_argument("--spacing", type=positive_float, metavar="MM",
                   help="NIfTI and DICOM: resample onto isotropic voxels of MM mm, on a cube a multiple of the grid "
                        "covering the volume (default: only a volume that is not such a cube, at its "
                        "coarsest voxel size)")
    add_force_argument(p, "OUT.h5")
    p.add_argument("--aliases", metavar="FILE", help="NIfTI and DICOM structure names -> ROI names (YAML or JSON; "
                                                     "default: aliases.yaml in SRC)")
    p = sub.add_parser("synth", parents=[common], help="write synthetic head-and-neck phantoms")
    p.add_argument("out", type=Path, metavar="OUT.h5")
    defaults = synth.Config()
    p.add_argument("--patients", type=int_at_least(1), default=defaults.patients,
                   help="number of patients (default %(default)s)")
    p.add_argument("--unlabeled", type=int_at_least(0), default=defaults.unlabeled,
                   help="more patients without a dose, in the 'unlabeled' split (default %(default)s)")
    p.add_argument("--preferences", type=int_at_least(0), default=defaults.preferences, metavar="K",
                   help="K more plans per phantom with other OAR-sparing weights and homogeneity, each stored "
                        "with its preferences (default %(default)s)")
    p.add_argument("--beam-plates", action="store_true",
                   help="store each phantom's beam arrangement as an extra input channel, 'beam_plate' (models "
                        "then take 11 input channels)")
    p.add_argument("--grid", type=int_at_least(1), default=defaults.grid, help="grid size (default %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default %(default)s)")
    add_force_argument(p, "OUT.h5")
    p = sub.add_parser("info", parents=[common], help="summarize a data set or prediction file")
    p.add_argument("file", type=Path, metavar="FILE")


def main(args: argparse.Namespace) -> None:
    commands: dict[str, Callable[[argparse.Namespace], None]] = {
        "import": import_command, "synth": synth_command, "info": info_command}
    commands[args.data_command](args)


def import_command(args: argparse.Namespace) -> None:
    config = importer.Config(grid=args.grid, spacing=args.spacing, aliases=args.aliases)
    importer.run(config, importer.Inputs(args.src), args.out, force=args.force)


def synth_command(args: argparse.Namespace) -> None:
    config = synth.Config(patients=args.patients, unlabeled=args.unlabeled, preferences=args.preferences,
                          beam_plates=args.beam_plates, grid=args.grid, seed=args.seed)
    synth.run(config, synth.Inputs(), args.out, force=args.force)


def info_command(args: argparse.Namespace) -> None:
    with open_data(args.file) as data:
        text = summary(data)
    print(text)


def _stats(values: list[float]) -> str:
    return (f"mean {np.mean(values):.2f} Gy, range {np.min(values):.2f}-{np.max(values):.2f} Gy"
            if values else "none")


def _n_patients(n: int) -> str:
    return f"{n} patient" + ("" if n == 1 else "s")


def _mm(voxel: list[float]) -> str:
    return " x ".join(f"{v:g}" for v in voxel) + " mm"


def summary(data: DataFile) -> str:
    """A readable account of what a data set or prediction file holds."""
    lines = [f"{data.path}: nasdose {data.kind} (format {data.attrs['format_version']}), "
             f"grid {data.grid}^3",
             f"source: {data.attrs.get('source') or '-'}"]
    ids = data.ids()
    data.verify(ids)
    attrs = {pid: data.patient_attrs(pid) for pid in ids}
    per_split = ", ".join(f"{s} {len(members)}" for s, members in data.splits().items())
    lines.append(f"patients: {len(ids)}" + (f" ({per_split})" if per_split else ""))
    if data.kind == "predictions":
        lines.append("ids: " + ", ".join(ids))
    voxels = Counter(tuple(a["voxel_mm"]) for a in attrs.values() if "voxel_mm" in a)
    for voxel, n in voxels.most_common():
        lines.append(f"voxel size {_mm(list(voxel))}: {_n_patients(n)}")
    resampling = Counter((a["resample_factor"], a["source_grid"]) for a in attrs.values()
                         if a.get("resample_factor", 1) > 1)
    for (factor, source_grid), n in sorted(resampling.items()):
        lines.append(f"resampled by {factor} from the {source_grid}^3 grid: {_n_patients(n)}")
    kept = sum(original_geometry(a) is not None for a in attrs.values())
    if kept:
        lines.append(f"resampled from their files' own voxel grid, which predictions go back to: {_n_patients(kept)}")
    if data.kind == "dataset":
        contoured = Counter(name for a in attrs.values() for name in a.get("rois", []))
        lines.append("structures contoured (patients):")
        lines.extend(f"  {name:<13}{contoured[name]:>4}/{len(ids)}" for name in ROIS)
        if data.extra_channels:
            lines.append(f"extra input channels (models take {input_channels(data)}): {', '.join(data.extra_channels)}")
    max_dose, ptv70_dose = [], []
    for pid in progress(ids, desc="reading doses"):
        if data.has_dose(pid):
            dose = data.read_dose(pid)
            max_dose.append(float(dose.max()))
            if data.kind == "dataset" and "PTV70" in attrs[pid].get("rois", []):
                ptv70_dose.append(float(dose[data.read_structure(pid, "PTV70")].mean()))
    lines.append(f"dose: {_n_patients(len(max_dose))} with a dose")
    with_plans = [pid for pid in ids if data.kind == "dataset" and data.n_plans(pid)]
    if with_plans:
        names, values = data.plan_preferences(with_plans[0])
        values = np.concatenate([data.plan_preferences(pid)[1] for pid in with_plans])
        spans = ", ".join(f"{n} {values[:, i].min():.2f}-{values[:, i].max():.2f}" for i, n in enumerate(names))
        lines.append(f"preference plans: {len(values)} on {_n_patients(len(with_plans))} ({spans})")
    if data.kind == "dataset":
        for split, members in data.splits().items():
            floor = resampling_floor(data, members)
            if floor is not None:
                lines.append(f"  resampling floor, {split}: dose score {floor.dose_score:.3f} Gy, DVH score "
                             f"{floor.dvh_score:.3f} Gy (the reference dose on this grid, upsampled, "
                             "scored on the source grid: no model on this grid does better)")
    lines.append(f"  max dose per patient: {_stats(max_dose)}")
    if data.kind == "dataset":
        lines.append(f"  mean PTV70 dose per patient: {_stats(ptv70_dose)}")
    return "\n".join(lines)
