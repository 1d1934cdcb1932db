"""The Python API: one patient's dose from a notebook or another program, whatever the model.

    from nas_dose.api import DosePredictor
    predictor = DosePredictor("runs/cascade")                 # a run, a checkpoint, an ensemble .yaml
    dose = predictor.predict("open-kbp/provided-data/validation-pats/pt_201")   # Gy, on its grid

A patient (a `Patient`, or an OpenKBP patient folder or .npz) is given at its own resolution;
the dose comes back on the same grid, in Gy, non-negative and zero outside its possible-dose
mask, as `nasdose predict` writes it: a model trained on a coarser grid predicts the patient
block-downsampled to it and its dose is upsampled back; a cascade's full-resolution stage then
refines it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .cascade.windows import predict_source
from .data.openkbp import discover, read_patient
from .data.patient import Patient
from .data.resample import downsample_patient, upsample_dose
from .errors import NasDoseError, input_error
from .inference import Cascade, load_predictor, predict_patient, trained_grid
from .runtime import Runtime, RuntimeConfig


class DosePredictor:
    """A trained model, ensemble or cascade, loaded once to predict patients one at a time."""

    def __init__(self, model: str | Path, *, device: str = "auto", tta: bool = False,
                 threads: int | None = None) -> None:
        self.runtime = Runtime(RuntimeConfig(device=device, threads=threads))
        self.model, self.tta = Path(model), tta
        self.predictor = load_predictor(self.model, self.runtime)
        self.grid = trained_grid(self.model)

    def predict(self, patient: Patient | str | Path) -> np.ndarray:
        """The patient's dose in Gy on its own grid (see the module docstring)."""
        if not isinstance(patient, Patient):
            sources = discover(Path(patient))
            if len(sources) != 1:
                raise input_error(patient, f"holds {len(sources)} patients; give one")
            patient = read_patient(sources[0])
        grid = self.grid or patient.grid
        if patient.grid % grid:
            raise NasDoseError(f"patient {patient.id}: its {patient.grid}³ grid is not a multiple of the "
                               f"{grid}³ grid {self.model} was trained on")
        factor = patient.grid // grid
        coarse = downsample_patient(patient, factor) if factor > 1 else patient
        if isinstance(self.predictor, Cascade):
            dose = predict_patient(self.predictor.coarse, coarse, self.runtime, self.tta)
            return predict_source(self.predictor.refiner, patient, dose, factor, self.predictor.config,
                                  self.runtime.device, self.tta)
        dose = predict_patient(self.predictor, coarse, self.runtime, self.tta)
        return dose if factor == 1 else upsample_dose(dose, factor, mask=patient.possible_dose_mask)
