"""The Python API: one patient's dose from a notebook or another program, whatever the model,
and its OpenKBP scores. `import nas_dose` names these lazily (nas_dose/__init__.py):

    import nas_dose
    model = nas_dose.load("runs/cascade")                     # a run, a checkpoint, an ensemble .yaml
    patient = nas_dose.read_patient("open-kbp/provided-data/validation-pats/pt_201")
    dose_gy = model.predict(patient)                          # Gy, on the patient's grid
    nas_dose.score(dose_gy, patient).dose_score              # OpenKBP scores against its plan

A patient (a `Patient`, or what `read_patient` reads) is given at its own resolution; the dose
comes back on the same grid, in Gy, non-negative and zero outside its possible-dose mask, as
`nasdose predict` writes it: a model trained on a coarser grid predicts the patient
block-downsampled to it and its dose is upsampled back; a cascade's full-resolution stage then
refines it.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from .cascade.windows import predict_source
from .data.openkbp import discover
from .data.openkbp import read_patient as read_source
from .data.patient import Patient
from .data.resample import downsample_patient, upsample_dose
from .data.store import open_data
from .errors import NasDoseError, input_error
from .evaluate import evaluate_predictions
from .inference import Cascade, load_predictor, predict_patient, trained_grid, trained_inputs
from .runtime import Runtime, RuntimeConfig
from .scores import Scores, score_patients


class DosePredictor:
    """A trained model, ensemble or cascade, loaded once to predict patients one at a time."""

    def __init__(self, model: str | Path, *, device: str = "auto", tta: bool = False,
                 threads: int | None = None) -> None:
        self.runtime = Runtime(RuntimeConfig(device=device, threads=threads))
        self.model, self.tta = Path(model), tta
        self.predictor = load_predictor(self.model, self.runtime)
        self.grid = trained_grid(self.model)
        self.inputs = trained_inputs(self.model)

    def predict(self, patient: Patient | str | Path) -> np.ndarray:
        """The patient's dose in Gy on its own grid (see the module docstring)."""
        if not isinstance(patient, Patient):
            patient = read_patient(patient)
        if not set(self.inputs) <= set(patient.extra):
            raise NasDoseError(f"patient {patient.id}: {self.model} takes the extra input channels "
                               f"[{', '.join(self.inputs)}], the patient has [{', '.join(sorted(patient.extra))}]")
        patient = replace(patient, extra={n: patient.extra[n] for n in self.inputs})  # a model may take fewer
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


def load(model: str | Path, *, device: str = "auto", tta: bool = False, threads: int | None = None) -> DosePredictor:
    """A model to predict with: a training run folder (its best.pt), a checkpoint, or an ensemble
    .yaml (`nasdose ensemble`); `tta` averages the flips of training's augmentation."""
    return DosePredictor(model, device=device, tta=tta, threads=threads)


def read_patient(path: str | Path, pid: str | None = None) -> Patient:
    """One patient as imported, on its own grid: an OpenKBP patient folder or .npz, a NIfTI
    patient folder, or patient `pid` of a nasdose data set (its source-grid arrays)."""
    path = Path(path)
    if pid is not None:
        with open_data(path) as data:
            if pid not in data.ids():
                raise input_error(path, f"no patient {pid!r}")
            return data.read_source(pid)
    if path.suffix == ".h5":
        raise input_error(path, "a data set: name the patient, read_patient(path, pid)")
    sources = discover(path)
    if len(sources) != 1:
        raise input_error(path, f"holds {len(sources)} patients; give one")
    return read_source(sources[0])


def score(prediction: np.ndarray | str | Path, reference: Patient | str | Path, *,
          split: str | None = None) -> Scores:
    """The OpenKBP dose and DVH scores (Gy, mean absolute errors: lower is better) of
    `prediction` against `reference`'s plan, as `nasdose evaluate` computes them.

    A dose array (Gy, on the patient's grid) against one patient (a `Patient`, or a path
    `read_patient` reads); or a predictions file (`nasdose predict`'s predictions.h5, or a folder
    of submission CSVs) against a data set or an OpenKBP tree, every predicted patient or those of
    `split`.
    """
    if isinstance(prediction, np.ndarray):
        patient = reference if isinstance(reference, Patient) else read_patient(reference)
        return score_patients([(patient, prediction)])
    if isinstance(reference, Patient):
        raise NasDoseError(f"{prediction}: a predictions file is scored against a data set or an OpenKBP "
                           "tree; score one patient's dose array against a Patient")
    return evaluate_predictions(Path(prediction), Path(reference), None, split, plots=0)
