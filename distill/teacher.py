"""The teacher's predictions, computed once and cached in HDF5, and the dataset that serves them.

Running the ensemble at every distillation step would cost all its members' forward passes per
step. Instead every training, unlabeled and validation patient is predicted once, as `nasdose
predict` predicts it (on the data set's grid, non-negative, zero outside the possible-dose
mask), into a nasdose predictions file (teacher.h5). A training item then carries the teacher's prediction
moved by the same augmentation as its input, target and mask.

A teacher conditioned on planning preferences is predicted once per plan of each patient (every
preference plan, asked for its preferences; `nas_dose.data.dataset.plan_items`), each stored
under the plan's key (`PATIENT#planK`); `PlanTeacherDataset` serves the plan each item draws.

The cache is keyed by a SHA-256 of the teacher's files (ensemble.yaml with its members'
genotypes and checkpoints, or one checkpoint) and of the data set, stored with every patient:
a resumed run, or a later run given the same cache file, reuses it; a cache made from another
teacher or data set is recomputed.

Under torchrun every rank predicts its share of the patients into a part file beside the cache
(teacher.h5.part{rank}); rank 0 then merges the parts, in the patients' order, into the cache a
single process writes. The volumes go through the file system, never through the process group.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import numpy as np
from torch import nn

from nas_dose import distributed
from nas_dose.data.augment import AugmentConfig
from nas_dose.data.dataset import DoseDataset, PlanDataset, PlanItem, plan_key
from nas_dose.data.patient import DOSE_SCALE_GY
from nas_dose.data.store import DataFile, open_data, write_predictions
from nas_dose.errors import NasDoseError, input_error
from nas_dose.inference import Cascade, Predictor, predict_plans, predictions
from nas_dose.io import load_yaml
from nas_dose.progress import say
from nas_dose.runtime import Runtime

CACHE_VERSION = 1
KEY_ATTR = "teacher_key"


def _member_files(teacher: Path, key: str) -> list[Path]:
    """The `key` file (genotype or checkpoint) of each member of an ensemble .yaml, in its order."""
    spec = load_yaml(teacher)
    members = spec.get("members") if isinstance(spec, dict) else None
    if not isinstance(members, list) or not all(isinstance(m, dict) and isinstance(m.get(key), str)
                                                for m in members):
        raise input_error(teacher, f"not a nasdose ensemble file (no members list with a {key} each)")
    return [teacher.parent / m[key] for m in members]


def _is_ensemble(teacher: Path) -> bool:
    return teacher.suffix in (".yaml", ".yml")


def member_checkpoints(teacher: Path) -> list[Path]:
    """The checkpoint of each ensemble member, or the single teacher's checkpoint."""
    teacher = Path(teacher)
    if _is_ensemble(teacher):
        return _member_files(teacher, "checkpoint")
    return [teacher / "best.pt" if teacher.is_dir() else teacher]


def teacher_files(teacher: Path) -> list[Path]:
    """Every file a teacher is made of: an ensemble .yaml with its members' genotypes and
    checkpoints, or the single teacher's checkpoint."""
    teacher = Path(teacher)
    if not _is_ensemble(teacher):
        return member_checkpoints(teacher)
    return [teacher, *_member_files(teacher, "genotype"), *member_checkpoints(teacher)]


def teacher_key(teacher: Path, data: Path) -> str:
    """SHA-256 of the teacher's files and the data set, with each file's length between them."""
    h = hashlib.sha256(f"nasdose teacher cache {CACHE_VERSION}\n".encode())
    for file in [*teacher_files(teacher), Path(data)]:
        if not file.is_file():
            raise input_error(file, "file not found")
        h.update(file.stat().st_size.to_bytes(8, "little"))
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def cache_is_current(cache: Path, key: str, ids: Sequence[str], grid: int) -> bool:
    """Whether `cache` holds the predictions of every patient in `ids` under `key`.

    A file there that is not a teacher cache is an error: it is never overwritten.
    """
    if not cache.exists():
        return False
    not_cache = input_error(cache, "exists and is not a teacher cache; not overwriting it "
                                   "(choose another --teacher-cache or --out)")
    try:
        f = open_data(cache)
    except NasDoseError:
        raise not_cache from None
    with f:
        attrs = {pid: f.patient_attrs(pid) for pid in f.ids()}
        if f.kind != "predictions" or any(KEY_ATTR not in a for a in attrs.values()):
            raise not_cache
        return f.grid == grid and all(attrs.get(pid, {}).get(KEY_ATTR) == key for pid in ids)


def write_cache(predictor: Predictor | Cascade, data: Path, ids: Sequence[str], cache: Path, key: str,
                runtime: Runtime, items: Sequence[PlanItem] | None = None) -> None:
    """Predict `ids` with the teacher into `cache` (atomically), each patient tagged with `key`:
    on the data set's grid, or on the source grid for a cascade; a conditioned teacher each of
    `items` (whose keys are `ids`), asked for its preferences."""
    with open_data(data) as d:
        if items is None:
            grid, doses = predictions(predictor, d, list(ids), runtime)
            pids = list(ids)
        else:
            conditioned = cast(nn.Module, predictor)  # one network or an ensemble: a cascade is never conditioned
            grid, doses, pids = d.grid, predict_plans(conditioned, d, items, runtime), [i.pid for i in items]
        records = ((name, dose, {**d.patient_attrs(pid), KEY_ATTR: key}) for pid, (name, dose) in zip(pids, doses))
        write_predictions(cache, records, grid=grid, source=f"nasdose distill teacher {key}", total=len(ids))


def merge_parts(cache: Path, parts: Sequence[Path], ids: Sequence[str]) -> None:
    """Write the ranks' part files into `cache` (atomically) with `ids` in their order, as one
    process writes it, then remove the parts."""
    files = [open_data(part) for part in parts]
    try:
        holder = {pid: f for f in files for pid in f.ids()}
        grid, source = files[0].grid, files[0].attrs["source"]
        write_predictions(cache, ((pid, holder[pid].read_dose(pid), holder[pid].patient_attrs(pid)) for pid in ids),
                          grid=grid, source=source, total=len(ids))
    finally:
        for f in files:
            f.close()
    for part in parts:
        part.unlink()


def ensure_cache(cache: Path, key: str, data: Path, ids: Sequence[str], load: Callable[[], Predictor | Cascade],
                 runtime: Runtime, grid: int, items: Sequence[PlanItem] | None = None) -> bool:
    """Make the cache (its doses on `grid`) unless it is current; `load` gives the teacher only
    when it must run. Returns whether the teacher was run. A conditioned teacher predicts
    `items`, whose keys are `ids`.

    Under torchrun each rank predicts its `distributed.shard` of `ids` alone into its own part
    file, and rank 0 merges them; with one process the cache is written directly.
    """
    if distributed.on_main(cache_is_current, cache, key, ids, grid):
        say(f"teacher predictions: reusing {cache}")
        return False
    if cache.exists():
        say(f"teacher predictions: {cache} was made from another teacher or data set; recomputing")
    world = distributed.world_size()
    mine = distributed.shard(list(range(len(ids))))

    def predict_share(rank: int) -> Path | None:
        """This rank's share into its part file (the cache itself in a world of one)."""
        if not mine:  # more ranks than patients
            return None
        part = cache if world == 1 else cache.with_name(f"{cache.name}.part{rank}")
        write_cache(load(), data, [ids[i] for i in mine], part, key, runtime,
                    None if items is None else [items[i] for i in mine])
        return part

    # Job r is rank r's (round robin over `world` jobs); gathering the written parts also waits
    # for every rank to finish writing, and stops all of them with the first rank's error.
    parts = [p for p in distributed.map_shards(predict_share, range(world)) if p is not None]
    if world > 1:
        distributed.on_main(merge_parts, cache, parts, ids)
    return True


class TeacherDataset(DoseDataset):
    """DoseDataset's items plus `teacher` (1, G, G, G): the cached prediction (dose / 70).

    Item i of epoch e is DoseDataset's item i of epoch e, the teacher's prediction moved by the
    same transform as the target and zeroed outside the augmented mask (`build_item`): the
    student's input, target and mask are exactly those plain training sees. The patients of
    `unlabeled_split` (when given and present) follow those of `split`, unlabeled: their
    target is zero and their dose, if any, is never read.
    """

    def __init__(self, path: Path, split: str, cache: Path, augment: AugmentConfig | None = None,
                 seed: int = 0, unlabeled_split: str | None = None, hide: Sequence[str] = ()) -> None:
        splits = [split] if unlabeled_split is None else [split, unlabeled_split]
        super().__init__(path, splits, augment=augment, seed=seed, hide=hide)
        self.unlabeled = set(self.data.ids(unlabeled_split)) if unlabeled_split is not None else set()
        self.cache = _open_cache(cache, self.ids, self.grid)

    def doses(self, pid: str, plan: int | None = None) -> dict[str, np.ndarray]:
        return _teacher_dose(self.cache, pid)

    def labeled(self, pid: str) -> bool:
        return pid not in self.unlabeled


class PlanTeacherDataset(PlanDataset):
    """PlanDataset's items (a plan drawn per patient and epoch, with its preferences) plus
    `teacher`: a conditioned teacher's cached prediction for that plan, moved like the target."""

    def __init__(self, path: Path, split: str, cache: Path, augment: AugmentConfig | None = None,
                 seed: int = 0, hide: Sequence[str] = ()) -> None:
        super().__init__(path, split, augment=augment, seed=seed, preferences=True, hide=hide)
        keys = [plan_key(pid, k if has else None)
                for pid, has, values in zip(self.ids, self.has_plans, self.values) for k in range(len(values))]
        self.cache = _open_cache(cache, keys, self.grid)

    def doses(self, pid: str, plan: int | None = None) -> dict[str, np.ndarray]:
        return _teacher_dose(self.cache, plan_key(pid, plan))


def _open_cache(cache: Path, keys: Sequence[str], grid: int) -> DataFile:
    """The teacher cache, open, checked to hold a prediction on `grid` for every key."""
    f = open_data(cache)
    missing = [k for k in keys if k not in f]
    if f.kind != "predictions" or f.grid != grid or missing:
        raise input_error(cache, f"holds no teacher prediction on the {grid}³ grid of patient(s) "
                                 f"{', '.join(missing[:3]) or 'of the data set'}")
    return f


def _teacher_dose(cache: DataFile, key: str) -> dict[str, np.ndarray]:
    return {"teacher": (cache.read_dose(key) / np.float32(DOSE_SCALE_GY))[None]}
