"""One patient in memory, and the OpenKBP structure vocabulary shared by every data module."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

OARS: tuple[str, ...] = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus",
                         "Larynx", "Mandible")
TARGETS: tuple[str, ...] = ("PTV56", "PTV63", "PTV70")
ROIS: tuple[str, ...] = OARS + TARGETS
# Prescription dose (Gy) of each target, fixed by the OpenKBP data set's design.
PRESCRIPTION_GY: dict[str, float] = {"PTV56": 56.0, "PTV63": 63.0, "PTV70": 70.0}
# Dose normalisation: models predict dose / DOSE_SCALE_GY.
DOSE_SCALE_GY = 70.0
OPENKBP_GRID = 128
# CT as stored by OpenKBP: HU + 1024, clipped to this range.
CT_STORED_RANGE = (0, 4095)


@dataclass
class Plans:
    """More plans of one anatomy, each made with other planning preferences
    (`nas_dose.data.preferences`): so every slider setting has a ground truth."""

    doses: np.ndarray  # (K, G, G, G) float32 Gy, zero outside the possible-dose mask
    values: np.ndarray  # (K, len(names)) float32, each plan's preferences
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.doses)


@dataclass
class Patient:
    """A patient on a cubic grid, arrays in OpenKBP axis order (anterior-posterior, right-left,
    superior-inferior).

    ct: float32, HU + 1024 as OpenKBP stores it. dose: float32 Gy (None for a patient without a
    reference plan). structures: bool masks keyed by ROI name, only the contoured ones.
    source: the same patient on the grid it was resampled from (None when it was not): the
    official scores and the full-resolution stage of a cascade need it. plans: more plans of the
    same anatomy with their preferences (synthetic phantoms made with `--preferences K`).
    extra: more input volumes (float32, by name) that the model takes after the standard
    channels, in name order, e.g. the beam plate of a synthetic plan (`--beam-plates`): what a
    planner knows before the dose exists and the contours do not say.
    """

    id: str
    ct: np.ndarray
    possible_dose_mask: np.ndarray
    structures: dict[str, np.ndarray]
    voxel_mm: tuple[float, float, float]
    dose: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    source: Patient | None = None
    plans: Plans | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def grid(self) -> int:
        return int(self.ct.shape[0])
