"""Import an OpenKBP tree (CSV or npz layout), NIfTI or DICOM patient folders into one nasdose data set,
block-downsampled to a grid whose divisor of the source grid is an integer; each patient's source
arrays are kept beside it (data set format 2) for scoring on the source grid.

OpenKBP's source grid is its 128³ one. A NIfTI or DICOM patient's is a cube chosen for the grid
(nas_dose.data.geometry.internal_geometry): its own volume when that is a cube the grid divides,
else its volume resampled onto a cube of isotropic voxels (`spacing`) a multiple of the grid a side."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..config import ConfigError, at_least
from ..io import output_file, refuse_existing
from ..progress import say
from .geometry import BODY_RULE
from .openkbp import PatientSource, discover, read_patient
from .patient import OPENKBP_GRID, Patient
from .resample import downsample_patient, resample_factor
from .store import write_dataset


@dataclass
class Config:
    grid: int = OPENKBP_GRID  # the grid to store: for OpenKBP one dividing 128 (64, 32, ...), for NIfTI/DICOM any
    spacing: float | None = None  # NIfTI/DICOM: resample to isotropic voxels of this size (mm); None: only when needed
    aliases: str | None = None  # NIfTI/DICOM structure names -> ROIs (YAML/JSON); default: SRC/aliases.yaml

    def validate(self) -> None:
        at_least("grid", self.grid, 1)
        if self.spacing is not None and not self.spacing > 0:
            raise ConfigError(f"config key 'spacing': a positive voxel size (mm), got {self.spacing}")


@dataclass(frozen=True)
class Inputs:
    source: Path  # an OpenKBP folder (split folders), a folder of patients, or one patient


def _downsampled(sources: list[PatientSource], config: Config, bodies: list[str]) -> Iterator[Patient]:
    """Read patients one at a time, each block-downsampled to the grid; the ids of those whose
    possible-dose mask is their body (NIfTI or DICOM without one) go to `bodies`."""
    grid = config.grid
    for source in sources:
        p = read_patient(source, grid=grid, spacing=config.spacing)
        if "possible_dose_mask_from" in p.attrs:
            bodies.append(p.id)
        yield downsample_patient(p, resample_factor(p.grid, grid))


def run(config: Config, inputs: Inputs, out: Path, resume: bool = False, *, force: bool = False) -> None:
    """The tree -> the data set file `out`, written atomically (a killed import is redone whole);
    an existing `out` is replaced only with `force`."""
    with output_file(out):
        refuse_existing([out], force)
        source = Path(inputs.source).resolve()
        sources = discover(source, None if config.aliases is None else Path(config.aliases))
        layouts = {s.layout for s in sources}
        kind = layouts.pop() if layouts in ({"nifti"}, {"dicom"}) else "openkbp"
        bodies: list[str] = []
        write_dataset(out, _downsampled(sources, config, bodies), source=f"{kind}:{source}",
                      grid=config.grid, total=len(sources))
    say(f"wrote {out}: {len(sources)} patient{'' if len(sources) == 1 else 's'} on a {config.grid}^3 grid")
    if bodies:
        say(f"no possible_dose_mask.nii.gz (NIfTI) or EXTERNAL ROI (DICOM) for {', '.join(bodies)}: their body "
            f"({BODY_RULE}) is the mask")
