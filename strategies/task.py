"""What a search learns and scores on: whole volumes on the data set's grid, the source-grid
patches of a cascade's full-resolution stage (`search … cascade.coarse=RUN`), or the preference
plans of each patient for networks conditioned on them (`search … conditioning=film`).

A task hands the SearchContext its items (training ones drawn from a seed, scoring ones fixed),
says what a network takes (channels, side) and wraps each network the strategies build (a
cascade's stage: a Refiner around it; a conditioned network: FiLM after its normalization
layers), so that the strategies need not know which it is.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from torch import nn
from torch.utils.data import Dataset, Subset

from nas_dose.cascade.objective import coarse_predictions, training_predictions
from nas_dose.cascade.patches import CascadeConfig, PatchDataset
from nas_dose.config import to_dict
from nas_dose.data.dataset import DoseDataset, PlanDataset, input_channels
from nas_dose.data.preferences import NAMES
from nas_dose.data.store import open_data
from nas_dose.errors import NasDoseError
from nas_dose.models.conditioning import condition, conditioning_spec
from nas_dose.models.refiner import REFINER_CHANNELS, Refiner
from nas_dose.runtime import Runtime


class Drawn(Dataset):
    """Items `indices` of an epoch dataset as drawn in epoch `epoch` (a `PlanDataset`: one plan
    of each patient, the same for every pass over these items)."""

    def __init__(self, dataset: PlanDataset, indices: Sequence[int], epoch: int) -> None:
        self.dataset, self.indices, self.epoch = dataset, list(indices), epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.dataset[(self.indices[i], self.epoch)]


# a task's items: sized torch datasets of {input, target, mask, id} (conditioned: and preferences)
Items = Union[Subset, PatchDataset, Drawn]


class SearchTask:
    """Whole patients on the data set's grid, without augmentation: the default task."""

    cascade: dict[str, Any] | None = None  # pool.yaml's record of a cascade stage search; none here
    conditioning: dict[str, Any] | None = None  # a conditioned search's `conditioning_spec`; none here

    def __init__(self, data: Path) -> None:
        self.data = Path(data)
        self._all: DoseDataset | None = None
        self._index: dict[str, int] = {}

    @cached_property
    def grid(self) -> int:
        """The side of an item: what the networks must take (read once: a search asks per candidate)."""
        with open_data(self.data) as d:
            return d.grid

    @cached_property
    def in_channels(self) -> int:
        """What the networks take: the data set's input channels."""
        return input_channels(self.data)

    @property
    def scored_on(self) -> str:
        return f"whole patients on the {self.grid}³ grid"

    def items(self, ids: Sequence[str], train: bool, seed: int) -> Items:
        """The patients `ids` (of any split), in that order; the same items for training and scoring."""
        if self._all is None:
            self._all = DoseDataset(self.data, None)
            self._index = {pid: i for i, pid in enumerate(self._all.ids)}
        missing = [pid for pid in ids if pid not in self._index]
        if missing:
            raise NasDoseError(f"{self.data}: no patient(s) {', '.join(missing[:5])}")
        return Subset(self._all, [self._index[pid] for pid in ids])

    def wrap(self, net: nn.Module) -> nn.Module:
        return net


class CascadeTask(SearchTask):
    """The full-resolution stage of a cascade refining `cfg.coarse` (`nas_dose.cascade`): networks
    take REFINER_CHANNELS inputs and are wrapped in a Refiner; they train on random source-grid
    patches (`PatchDataset`, a new draw per loader seed) and are scored on `cfg.val_patches` fixed
    patches per patient, a patch proxy of the source-grid score that costs a few forwards, where
    whole volumes in windows would cost (source side / patch side)³ times more per patient.

    A patient's coarse input is what a stage trained on it sees: for the search split's patients
    the degraded reference (or, with `coarse_input: predictions`, the coarse prediction file's
    dose); for the others (the validation patients) the coarse model's own prediction, as at
    inference.
    """

    @property
    def in_channels(self) -> int:
        return REFINER_CHANNELS

    def __init__(self, data: Path, cfg: CascadeConfig, search_split: str, scored_ids: Sequence[str],
                 runtime: Runtime, seed: int) -> None:
        super().__init__(data)
        if cfg.coarse is None:
            raise NasDoseError("config key 'cascade.coarse': the coarse stage to refine is needed")
        self.cfg, self.seed = cfg, seed
        with open_data(self.data) as d:
            if d.source_grid(d.ids()[0]) == d.grid:
                raise NasDoseError(f"{self.data}: not resampled (no source grid): a cascade's stage has "
                                   "nothing to refine")
            own = d.ids(search_split)
            self.doses = coarse_predictions(cfg, d, [pid for pid in scored_ids if pid not in own], runtime)
            if cfg.coarse_input == "predictions":
                self.doses.update(training_predictions(cfg, d, own))
        # One fixed set for every scored patient, so a patient's patches do not depend on which
        # other patients a call asks for.
        self.scored = list(dict.fromkeys(scored_ids))
        self.fixed = PatchDataset(self.data, search_split, cfg, seed=seed, coarse_doses=self.doses, fixed=True,
                                  ids=self.scored)
        self.cascade = to_dict(cfg.resolved())

    @property
    def grid(self) -> int:
        return self.cfg.patch

    @property
    def scored_on(self) -> str:
        return (f"{self.cfg.val_patches} fixed {self.cfg.patch}³ source-grid patch(es) per patient "
                "(a patch proxy of the source-grid score)")

    def items(self, ids: Sequence[str], train: bool, seed: int) -> Items:
        """Random patches of `ids` drawn from `seed` (train), or their fixed scoring patches."""
        if train:
            return PatchDataset(self.data, "search", self.cfg, seed=seed, coarse_doses=self.doses, ids=ids)
        k = self.cfg.val_patches
        missing = [pid for pid in ids if pid not in self.scored]
        if missing:
            raise NasDoseError(f"{self.data}: no scoring patches of patient(s) {', '.join(missing[:5])}")
        return Subset(self.fixed, [self.scored.index(pid) * k + j for pid in ids for j in range(k)])

    def wrap(self, net: nn.Module) -> nn.Module:
        return Refiner(net)


class PlanTask(SearchTask):
    """Networks conditioned on the planning preferences as `kind` says (`nas_dose.models.conditioning`),
    on the preference plans of patients `ids` (those the search uses), as conditioned
    training learns from them (`PlanDataset`): a training item is one plan of its patient, drawn
    from (seed, patient), with that plan's preferences; a patient is scored on every plan, each
    asked for its own preferences (its score the mean, its predictions the plans' stacked). A
    patient without preference plans is one plan, its dose, at preferences measured on it."""

    def __init__(self, data: Path, kind: str, ids: Sequence[str]) -> None:
        super().__init__(data)
        self.conditioning = conditioning_spec(kind, NAMES)
        used = set(ids)
        with open_data(self.data) as d:
            others = [pid for pid in d.ids() if pid not in used]
        # the seed of a training draw is the epoch of one plan dataset (`Drawn`)
        self.drawn = PlanDataset(self.data, None, exclude=others, preferences=True)
        self.every = PlanDataset(self.data, None, exclude=others, every_plan=True, preferences=True)
        self.position = {pid: i for i, pid in enumerate(self.drawn.ids)}

    @property
    def scored_on(self) -> str:
        return f"every preference plan of each patient, asked for its own preferences, on the {self.grid}³ grid"

    def items(self, ids: Sequence[str], train: bool, seed: int) -> Items:
        """One plan of each of `ids` drawn from `seed` (train), or every plan of each."""
        missing = [pid for pid in ids if pid not in self.position]
        if missing:
            raise NasDoseError(f"{self.data}: no patient(s) {', '.join(missing[:5])}")
        if train:
            return Drawn(self.drawn, [self.position[pid] for pid in ids], seed)
        plans = self.every.items
        assert plans is not None
        return Subset(self.every, [j for pid in ids for j, (i, _) in enumerate(plans) if i == self.position[pid]])

    def wrap(self, net: nn.Module) -> nn.Module:
        spec = self.conditioning
        assert spec is not None  # set in __init__
        return condition(net, spec)


def per_patient(parts: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """One array per patient from its items' arrays: the item's own for a whole volume, the
    patches stacked (k, P, P, P) otherwise, so that measures over voxels compare like with like."""
    return {pid: a[0] if len(a) == 1 else np.stack(a) for pid, a in parts.items()}
