"""Model inputs and targets, the torch Dataset over an HDF5 data set, and reproducible loaders.

Every random choice of an item comes from (seed, epoch, index) and the order of an epoch from
(seed, epoch), never from hidden state, so a run resumed at epoch e sees exactly the batches
and augmentations the uninterrupted run would have seen.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Literal, Protocol, Sequence, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..distributed import ShardedBatches
from ..errors import NasDoseError
from .augment import AugmentConfig, ChannelLayout, augment
from .patient import DOSE_SCALE_GY, OARS, PRESCRIPTION_GY, TARGETS, Patient
from .preferences import NAMES, SparingScale, spared_mean_doses
from .store import DataFile, open_data

# The standard input channels; a data set's extra input volumes (`DataFile.extra_channels`,
# e.g. a beam plate) follow them in name order.
CHANNELS: tuple[str, ...] = ("ct", "ptv", *OARS, "possible_dose_mask")
IN_CHANNELS = len(CHANNELS)
# CT window in HU and scale: air (-1024 HU) becomes -1.024, dense bone saturates at 1.5.
CT_HU_RANGE = (-1024.0, 1500.0)
CT_SCALE = 1000.0
# How augmentation treats each channel: the PTV level map is resampled like a mask so it keeps
# its levels, and a mirrored right parotid becomes a left parotid.
def input_layout(extra: int = 0) -> ChannelLayout:
    """How augmentation moves an input of the standard channels and `extra` more (those like a
    dose: linear, background 0)."""
    return ChannelLayout(kinds=("ct", *("mask",) * (IN_CHANNELS - 1), *("continuous",) * extra),
                         mirror_pairs=((CHANNELS.index("RightParotid"), CHANNELS.index("LeftParotid")),))


INPUT_LAYOUT = input_layout()
ITEM_KINDS: dict[str, str | ChannelLayout] = {"input": INPUT_LAYOUT, "target": "continuous", "mask": "mask"}


def extra_inputs(data: DataFile | Path, hide: Sequence[str] = ()) -> tuple[str, ...]:
    """The extra input channels of a data set (open, or its file), in the order models take them;
    those of a model that does not take `hide` (`train.data.hide`)."""
    if isinstance(data, DataFile):
        return tuple(n for n in data.extra_channels if n not in hide)
    with open_data(Path(data)) as d:
        return extra_inputs(d, hide)


def input_channels(data: DataFile | Path) -> int:
    """How many input channels a model of this data set (open, or its file) takes: the standard
    ones and its extra."""
    return IN_CHANNELS + len(extra_inputs(data))


def hidden_channels(extra: Sequence[str], hide: Sequence[str]) -> tuple[list[int], list[int]]:
    """Indices into a data set's input (its `extra` channels after the standard ones) of the
    channels a model that does not take `hide` sees, and of the hidden ones (`train.data.hide`)."""
    hidden = [IN_CHANNELS + extra.index(n) for n in sorted(hide)]
    return [i for i in range(IN_CHANNELS + len(extra)) if i not in hidden], hidden


def unhide_order(extra: Sequence[str], hide: Sequence[str]) -> torch.Tensor:
    """Where each channel of the data set's whole input lies in an item's `input` and `hidden`
    concatenated (`unhide`); made once, not per batch."""
    seen, hidden_at = hidden_channels(extra, hide)
    return torch.tensor(seen + hidden_at).argsort()


def unhide(x: torch.Tensor, hidden: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The data set's whole input (N, IN_CHANNELS + len(extra), ...) from what a model that does not
    take the hidden channels sees and those channels (an item's `input` and `hidden`), `order`
    from `unhide_order` on x's device: a privileged teacher's input."""
    return torch.cat([x, hidden.to(x.dtype)], dim=1).index_select(1, order)


def _check_shapes(p: Patient) -> tuple[int, ...]:
    shape = p.ct.shape
    arrays = {"possible_dose_mask": p.possible_dose_mask, **p.structures, **p.extra}
    if p.dose is not None:
        arrays["dose"] = p.dose
    for name, array in arrays.items():
        if array.shape != shape:
            raise NasDoseError(f"patient {p.id}: '{name}' has shape {array.shape}, the CT {shape}")
    if len(shape) != 3:
        raise NasDoseError(f"patient {p.id}: CT has shape {shape}, expected a 3D volume")
    return shape


def build_input(p: Patient) -> np.ndarray:
    """The model input, float32 (IN_CHANNELS + len(p.extra), G, G, G): the channels of CHANNELS,
    then the patient's extra input volumes in name order."""
    shape = _check_shapes(p)
    x = np.zeros((IN_CHANNELS + len(p.extra), *shape), dtype=np.float32)
    hu = p.ct.astype(np.float32) - 1024.0
    x[0] = np.clip(hu, *CT_HU_RANGE) / CT_SCALE
    # PTV map: the prescription relative to 70 Gy (1.0 / 0.9 / 0.8); the highest wins.
    for name in TARGETS:
        if name in p.structures:
            level = PRESCRIPTION_GY[name] / DOSE_SCALE_GY
            x[1] = np.maximum(x[1], np.where(p.structures[name], np.float32(level), np.float32(0)))
    for i, name in enumerate(OARS, start=2):
        if name in p.structures:
            x[i] = p.structures[name]
    x[IN_CHANNELS - 1] = p.possible_dose_mask
    for i, name in enumerate(sorted(p.extra), start=IN_CHANNELS):
        x[i] = p.extra[name]
    return x


def build_target(p: Patient) -> np.ndarray:
    """The training target, float32 (1, G, G, G): dose / DOSE_SCALE_GY."""
    _check_shapes(p)
    if p.dose is None:
        raise NasDoseError(f"patient {p.id}: no reference dose to train on")
    return (p.dose.astype(np.float32) / np.float32(DOSE_SCALE_GY))[None]


def build_item(p: Patient, cfg: AugmentConfig | None = None, rng: np.random.Generator | None = None,
               doses: dict[str, np.ndarray] | None = None, labeled: bool = True) -> dict[str, np.ndarray]:
    """Input, target and mask arrays of a patient, augmented when `cfg` is given, and `labeled`
    (a 0-d float: 1, or 0 for a patient taught without its dose, whose target is then all zero);
    `doses` are more (1, G, G, G) dose arrays of the patient (a teacher's prediction), moved and
    masked like the target.

    The doses are zeroed outside the (augmented) mask: linear interpolation would otherwise leak
    them into voxels the nearest-neighbour mask leaves out.
    """
    doses = doses or {}
    mask = p.possible_dose_mask.astype(np.float32)[None]
    arrays = {"input": build_input(p), "target": build_target(p) if labeled else np.zeros_like(mask),
              "mask": mask, **doses}
    if cfg is not None:
        if rng is None:
            raise ValueError("build_item: augmentation needs an rng")
        kinds = {**ITEM_KINDS, "input": input_layout(len(p.extra)), **dict.fromkeys(doses, "continuous")}
        arrays = augment(arrays, kinds, cfg, rng)
    for name in ("target", *doses):
        arrays[name] = arrays[name] * arrays["mask"]
    arrays["labeled"] = np.array(float(labeled), dtype=np.float32)
    return arrays


class EpochDataset(Protocol):
    """What `make_loader` needs: an epoch to draw the order from, and items addressable by
    (index, epoch), so worker processes that keep their own dataset copy still see the epoch."""

    epoch: int

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def __getitem__(self, key: int | tuple[int, int]) -> Any: ...


class TrainingSet(EpochDataset, Protocol):
    """What the training loop trains on: an EpochDataset of an open data set, on its grid."""

    data: DataFile

    @property
    def grid(self) -> int: ...


class DoseDataset(Dataset):
    """Patients of one split (or several, in turn) of an HDF5 data set, read lazily, as
    model-ready tensors.

    An item is a dict: `input` (in_channels, G, G, G), `target` (1, G, G, G), `mask`
    (1, G, G, G) float tensors, `labeled` (a 0-d float, see `labeled`) and `id`. The
    augmentation of item i in epoch e is drawn from (seed, e, i) alone; `set_epoch` selects e.

    The extra input channels named in `hide` are left out of `input` (in_channels counts without
    them) and given as `hidden` (len(hide), G, G, G), moved by the same augmentation: what a
    teacher sees and its student does not (`unhide` puts them back).
    """

    def __init__(self, path: Path, split: str | Sequence[str] | None, augment: AugmentConfig | None = None,
                 seed: int = 0, exclude: Sequence[str] = (), hide: Sequence[str] = ()) -> None:
        if seed < 0:
            raise NasDoseError(f"{path}: the data seed must be >= 0, got {seed}")
        self.data = open_data(Path(path))
        splits = [split] if split is None or isinstance(split, str) else list(split)
        left_out = set(exclude)
        self.ids = [pid for s in splits for pid in self.data.ids(s) if pid not in left_out]
        if not self.ids:
            where = "split " + ", ".join(f"'{s}'" for s in splits) if split is not None else "the file"
            raise NasDoseError(f"{path}: no patients in {where}")
        self.data.verify(self.ids)
        self.augmentation = augment if augment is not None and augment.enabled else None
        self.seed = seed
        self.epoch = 0
        unknown = [n for n in hide if n not in self.data.extra_channels]
        if unknown or len(set(hide)) != len(hide):
            raise NasDoseError(f"{path}: cannot hide {', '.join(unknown) or 'a channel twice'}: the extra input "
                               f"channels are [{', '.join(self.data.extra_channels)}]")
        self.hide = tuple(sorted(hide))
        self.seen, self.hidden = hidden_channels(self.data.extra_channels, self.hide)

    @property
    def grid(self) -> int:
        return self.data.grid

    @property
    def in_channels(self) -> int:
        return len(self.seen)

    @property
    def extra_inputs(self) -> tuple[str, ...]:
        """The extra input channels of `input`: the data set's, but the hidden ones."""
        return extra_inputs(self.data, self.hide)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        patient, more = self.patient(index, epoch)
        pid = patient.id
        rng = np.random.default_rng([self.seed, epoch, index]) if self.augmentation else None
        arrays = build_item(patient, self.augmentation, rng, self.doses(pid, self.plan(index, epoch)),
                            self.labeled(pid))
        if self.hide:
            arrays["hidden"], arrays["input"] = arrays["input"][self.hidden], arrays["input"][self.seen]
        return {**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in {**arrays, **more}.items()}, "id": pid}

    def patient(self, index: int, epoch: int) -> tuple[Patient, dict[str, np.ndarray]]:
        """Item `index`'s patient, its dose the target, and more arrays of the item, not augmented."""
        return self.data.read(self.ids[index]), {}

    def plan(self, index: int, epoch: int) -> int | None:
        """Which preference plan of its patient item `index` of `epoch` is (None: its own dose)."""
        return None

    def doses(self, pid: str, plan: int | None = None) -> dict[str, np.ndarray]:
        """More dose arrays of an item (patient `pid`, its `plan`), augmented with its target (none
        here; see build_item)."""
        return {}

    def labeled(self, pid: str) -> bool:
        """Whether the patient's reference dose is its target (always here: a patient without
        one is an error)."""
        return True


class PlanDataset(DoseDataset):
    """The patients' preference plans (`nasdose data synth --preferences K`) as targets: each epoch
    one plan per patient, drawn from (seed, epoch, index), or with `every_plan` every plan an item
    (validation). With `preferences`, an item also holds its plan's `preferences` (float32
    (len(NAMES),), in their own units), what a conditioned model is asked for.

    A patient without preference plans (a real patient's one plan) is one plan, its dose, with
    preferences measured on it against the data set's training plans (`SparingScale`)."""

    def __init__(self, path: Path, split: str | Sequence[str] | None, augment: AugmentConfig | None = None,
                 seed: int = 0, exclude: Sequence[str] = (), every_plan: bool = False,
                 preferences: bool = False, hide: Sequence[str] = ()) -> None:
        super().__init__(path, split, augment, seed, exclude, hide)
        self.preferences = preferences
        self.has_plans = [self.data.n_plans(pid) > 0 for pid in self.ids]
        self.values = plan_preferences(self.data, self.ids)
        self.items = [(i, k) for i, v in enumerate(self.values) for k in range(len(v))] if every_plan else None

    def __len__(self) -> int:
        return len(self.items) if self.items is not None else len(self.ids)

    def _draw(self, index: int, epoch: int) -> tuple[int, int]:
        """Item `index`'s patient (by position) and plan: drawn per epoch, or every plan an item."""
        if self.items is not None:
            return self.items[index]
        return index, int(np.random.default_rng([self.seed, epoch, index, 1]).integers(len(self.values[index])))

    def plan(self, index: int, epoch: int) -> int | None:
        i, k = self._draw(index, epoch)
        return k if self.has_plans[i] else None

    def patient(self, index: int, epoch: int) -> tuple[Patient, dict[str, np.ndarray]]:
        i, k = self._draw(index, epoch)
        pid = self.ids[i]
        patient = self.data.read(pid)
        if self.has_plans[i]:
            patient = replace(patient, dose=self.data.read_plan(pid, k))
        return patient, {"preferences": self.values[i][k]} if self.preferences else {}


def plan_preferences(data: DataFile, ids: Sequence[str]) -> list[np.ndarray]:
    """Per patient, the (K, len(NAMES)) preferences of its plans; (1, len(NAMES)) measured on its
    dose against the training plans (`training_scale`) for a patient without preference plans."""
    has_plans = [data.n_plans(pid) > 0 for pid in ids]
    scale = None if all(has_plans) else training_scale(data)
    out: list[np.ndarray] = []
    for pid, plans in zip(ids, has_plans):
        if not plans:
            p = data.read(pid)
            if scale is None or p.dose is None:
                raise NasDoseError(f"{data.path}: patient {pid} has no dose to measure its preferences on")
            out.append(scale.measure(p.dose, p.structures)[None])
            continue
        names, values = data.plan_preferences(pid)
        if names != NAMES:
            raise NasDoseError(f"{data.path}: patient {pid}: plan preferences {', '.join(names)}, expected "
                               f"{', '.join(NAMES)}")
        out.append(values)
    return out


@dataclass(frozen=True)
class PlanItem:
    """One plan a conditioned model is asked for: patient `pid`'s preference plan `plan` (None:
    its own dose, at preferences measured on it), `values` in NAMES order; `key` names it in a
    predictions file (`plan_key`)."""

    key: str
    pid: str
    plan: int | None
    values: np.ndarray


def plan_key(pid: str, plan: int | None) -> str:
    """The name of a patient's plan among predictions: `pid#planK`, or `pid` for its own dose."""
    return pid if plan is None else f"{pid}#plan{plan}"


def plan_items(data: DataFile, ids: Sequence[str]) -> list[PlanItem]:
    """Every plan of each patient in `ids`, as `PlanDataset(every_plan=True)` validates on them."""
    return [PlanItem(plan_key(pid, k if data.n_plans(pid) else None), pid, k if data.n_plans(pid) else None, v)
            for pid, values in zip(ids, plan_preferences(data, ids)) for k, v in enumerate(values)]


def measured_items(data: DataFile, ids: Sequence[str]) -> list[PlanItem]:
    """Each patient once, its own dose at the preferences measured on it (`plan_items` of patients
    without preference plans): what a conditioned model is asked for at `MEASURED`. A patient
    with preference plans has several plans at recorded preferences, none measured: refused."""
    recorded = [pid for pid in ids if data.n_plans(pid)]
    if recorded:
        raise NasDoseError(f"{data.path}: patient {recorded[0]} holds preference plans (several plans at recorded "
                           "preferences), not one plan to measure them on: ask for a setting (--preference "
                           "oar=V,hi=V)")
    return plan_items(data, ids)


def plan_reference(data: DataFile, item: PlanItem) -> Patient:
    """The patient on the data set's grid (where preference plans are stored) with the item's plan
    as its dose, named by the item's key."""
    patient = data.read(item.pid)
    dose = patient.dose if item.plan is None else data.read_plan(item.pid, item.plan)
    return replace(patient, id=item.key, dose=dose)


def training_scale(data: DataFile) -> SparingScale:
    """The spared-OAR doses of the data set's training plans: where a real plan's sparing is placed."""
    means = []
    for pid in data.ids("train"):
        if data.has_dose(pid):
            p = data.read(pid)
            assert p.dose is not None
            means.append(spared_mean_doses(p.dose, p.structures))
    if not means:
        raise NasDoseError(f"{data.path}: no training patient with a dose to measure preferences against")
    return SparingScale(means)


class EpochSampler(Sampler):
    """Yields (index, epoch) keys in an order drawn from (seed, epoch), the epoch read from
    the dataset when iteration starts: call `dataset.set_epoch(e)` before each epoch."""

    def __init__(self, dataset: EpochDataset, shuffle: bool, seed: int) -> None:
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.dataset.epoch
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else range(n)
        return iter([(int(i), epoch) for i in order])


PREFETCH = 2  # batches each loader worker keeps ready (make_loader's prefetch factor)


def shared_memory_free() -> int | None:
    """Free bytes in /dev/shm, through which loader workers hand their batches over (None where
    there is no such folder)."""
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


def workers_within_shared_memory(workers: int, item_bytes: int, batch_size: int, free: int | None) -> int:
    """The most of `workers` loader processes whose batches in flight fit in `free` bytes of
    shared memory, a fifth kept spare. Containers often give /dev/shm 64 MiB, and a worker that
    cannot place a batch there dies with a bus error that names no cause."""
    if free is None or workers == 0:
        return workers
    return min(workers, int(0.8 * free) // max(1, PREFETCH * batch_size * item_bytes))


def item_bytes(dataset: EpochDataset) -> int:
    """Bytes of the tensors of one item (item 0 of the current epoch), as a worker sends it."""
    item = dataset[0]
    return sum(v.numel() * v.element_size() for v in item.values() if isinstance(v, torch.Tensor))


def make_loader(dataset: EpochDataset, batch_size: int, shuffle: bool, num_workers: int = 0,
                seed: int = 0, pin_memory: bool = False, drop_last: bool = False,
                shard: Literal["even", "exact"] | None = None) -> DataLoader:
    """A DataLoader whose batches depend only on (seed, dataset epoch), with persistent workers
    when num_workers > 0. Seeding the loader's generator makes torch give the workers distinct,
    reproducible seeds for torch, numpy and random.

    `shard` splits each batch of `batch_size` over the ranks of a distributed run
    (`nas_dose.distributed.ShardedBatches`): "even" for training, every rank stepping with an
    equal share; "exact" for evaluation, each item on one rank. The ranks' batches together
    are then the one-process batches, for any number of ranks.
    """
    if not hasattr(dataset, "set_epoch"):
        raise TypeError("make_loader needs a dataset with epoch and set_epoch (see EpochDataset)")
    if batch_size < 1:
        raise NasDoseError(f"batch size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise NasDoseError(f"number of loader workers must be >= 0, got {num_workers}")
    if seed < 0:
        raise NasDoseError(f"loader seed must be >= 0, got {seed}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    items = cast(Dataset, dataset)  # DataLoader takes any __getitem__ and __len__; its hints ask for a Dataset
    workers: dict[str, Any] = dict(num_workers=num_workers, pin_memory=pin_memory, generator=generator,
                                   persistent_workers=num_workers > 0,
                                   prefetch_factor=PREFETCH if num_workers > 0 else None)
    if shard is not None:
        batches = ShardedBatches(EpochSampler(dataset, shuffle, seed), batch_size, even=shard == "even",
                                 drop_last=drop_last)
        return DataLoader(items, batch_sampler=batches, **workers)
    return DataLoader(items, batch_size=batch_size, sampler=EpochSampler(dataset, shuffle, seed),
                      drop_last=drop_last, **workers)
