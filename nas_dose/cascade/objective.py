"""Training a cascade's full-resolution stage: its objective learns on source-grid patches whose
coarse channel comes from the coarse stage (predicted here for the validation patches)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import ConfigError
from ..data.store import DataFile, open_data
from ..errors import input_error
from ..inference import Cascade, load_predictor, predict_patients
from ..runtime import Runtime
from ..training.config import TrainConfig
from ..training.objective import Objective
from .patches import PatchDataset


class CascadeObjective(Objective):
    """The full-resolution stage of a cascade (`config.cascade`): source-grid patches with the
    coarse dose as an extra channel. The checkpoint is chosen on fixed patches of the validation
    patients whose coarse dose is the coarse model's own prediction, as at inference."""

    def __init__(self, config: TrainConfig, data: Path) -> None:
        self.cascade = config.cascade
        if self.cascade.coarse is None:
            raise ConfigError("config key 'cascade.coarse': the coarse stage to refine is needed")
        runtime = Runtime(config.runtime)
        predictor = load_predictor(Path(self.cascade.coarse), runtime)
        if isinstance(predictor, Cascade):
            raise ConfigError(f"config key 'cascade.coarse': {self.cascade.coarse} is itself a cascade")
        with open_data(data) as d:
            self.coarse_doses = dict(predict_patients(predictor, d, d.ids(config.data.val_split), runtime))
            if self.cascade.coarse_input == "predictions":
                self.coarse_doses.update(self._training_predictions(d, config.data.train_split))

    def _training_predictions(self, data: DataFile, split: str) -> dict[str, np.ndarray]:
        """The coarse doses of the training patients, from `cascade.coarse_predictions`."""
        path = Path(self.cascade.coarse_predictions or "")
        with open_data(path) as preds:
            if preds.kind != "predictions" or preds.grid != data.grid:
                raise input_error(path, f"not a prediction file on the data set's {data.grid}³ grid")
            missing = [pid for pid in data.ids(split) if pid not in preds]
            if missing:
                raise input_error(path, f"no coarse prediction for training patient(s) {', '.join(missing[:5])}")
            return {pid: preds.read_dose(pid) for pid in data.ids(split)}

    def train_set(self, data: Path, config: TrainConfig) -> PatchDataset:
        doses = self.coarse_doses if self.cascade.coarse_input == "predictions" else None
        return PatchDataset(data, config.data.train_split, self.cascade, augment=config.data.augment,
                            seed=config.seed, coarse_doses=doses)

    def val_set(self, data: Path, config: TrainConfig) -> PatchDataset:
        return PatchDataset(data, config.data.val_split, self.cascade, seed=config.seed,
                            coarse_doses=self.coarse_doses, fixed=True)
