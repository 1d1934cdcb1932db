"""Training a cascade's full-resolution stage: its objective learns on source-grid patches whose
coarse channel comes from the coarse stage (predicted here for the validation patches)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import ConfigError
from ..data.store import DataFile, open_data
from ..errors import input_error
from ..inference import Cascade, load_predictor, predict_patients
from ..runtime import Runtime
from ..training.config import TrainConfig
from ..training.objective import Objective
from .patches import CascadeConfig, PatchDataset


def coarse_predictions(cascade: CascadeConfig, data: DataFile, ids: Sequence[str],
                       runtime: Runtime) -> dict[str, np.ndarray]:
    """The coarse model's doses (Gy, on the data set's grid) of `ids`: the coarse input of the
    patients a stage is scored on, as at inference."""
    predictor = load_predictor(Path(cascade.coarse or ""), runtime)
    if isinstance(predictor, Cascade):
        raise ConfigError(f"config key 'cascade.coarse': {cascade.coarse} is itself a cascade")
    return dict(predict_patients(predictor, data, list(ids), runtime))


def training_predictions(cascade: CascadeConfig, data: DataFile, ids: Sequence[str]) -> dict[str, np.ndarray]:
    """The coarse doses of training patients `ids`, from `cascade.coarse_predictions`."""
    path = Path(cascade.coarse_predictions or "")
    with open_data(path) as preds:
        if preds.kind != "predictions" or preds.grid != data.grid:
            raise input_error(path, f"not a prediction file on the data set's {data.grid}³ grid")
        missing = [pid for pid in ids if pid not in preds]
        if missing:
            raise input_error(path, f"no coarse prediction for training patient(s) {', '.join(missing[:5])}")
        return {pid: preds.read_dose(pid) for pid in ids}


class CascadeObjective(Objective):
    """The full-resolution stage of a cascade (`config.cascade`): source-grid patches with the
    coarse dose as an extra channel. The checkpoint is chosen on fixed patches of the validation
    patients whose coarse dose is the coarse model's own prediction, as at inference."""

    def __init__(self, config: TrainConfig, data: Path) -> None:
        self.cascade = config.cascade
        if self.cascade.coarse is None:
            raise ConfigError("config key 'cascade.coarse': the coarse stage to refine is needed")
        with open_data(data) as d:
            self.coarse_doses = coarse_predictions(self.cascade, d, d.ids(config.data.val_split),
                                                   Runtime(config.runtime))
            if self.cascade.coarse_input == "predictions":
                self.coarse_doses.update(training_predictions(self.cascade, d, d.ids(config.data.train_split)))

    def train_set(self, data: Path, config: TrainConfig) -> PatchDataset:
        doses = self.coarse_doses if self.cascade.coarse_input == "predictions" else None
        return PatchDataset(data, config.data.train_split, self.cascade, augment=config.data.augment,
                            seed=config.seed, coarse_doses=doses)

    def val_set(self, data: Path, config: TrainConfig) -> PatchDataset:
        return PatchDataset(data, config.data.val_split, self.cascade, seed=config.seed,
                            coarse_doses=self.coarse_doses, fixed=True)
