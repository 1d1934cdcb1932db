"""Import an OpenKBP tree (CSV or npz layout) into one nasdose data set, block-downsampled to a grid
whose divisor of the source grid is an integer; each patient's source arrays are kept beside it
(data set format 2) for scoring on the source grid."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..config import at_least
from ..io import output_file
from ..progress import say
from .openkbp import PatientSource, discover, read_patient
from .patient import OPENKBP_GRID, Patient
from .resample import downsample_patient, resample_factor
from .store import refuse_existing, write_dataset


@dataclass
class Config:
    grid: int = OPENKBP_GRID  # the grid to store: one dividing the source grid (128, 64, 32, ...)
    overwrite: bool = False  # replace an existing data set file (else it is an error)

    def validate(self) -> None:
        at_least("grid", self.grid, 1)


@dataclass(frozen=True)
class Inputs:
    source: Path  # an OpenKBP folder (split folders), a folder of patients, or one patient


def _downsampled(sources: list[PatientSource], grid: int) -> Iterator[Patient]:
    """Read patients one at a time, each block-downsampled to `grid`."""
    for source in sources:
        p = read_patient(source)
        yield downsample_patient(p, resample_factor(p.grid, grid))


def run(config: Config, inputs: Inputs, out: Path, resume: bool = False) -> None:
    """The tree -> the data set file `out`, written atomically (a killed import is redone whole)."""
    with output_file(out):
        refuse_existing(out, config.overwrite)
        source = Path(inputs.source).resolve()
        sources = discover(source)
        write_dataset(out, _downsampled(sources, config.grid), source=f"openkbp:{source}", grid=config.grid,
                      total=len(sources))
    say(f"wrote {out}: {len(sources)} patient{'' if len(sources) == 1 else 's'} on a {config.grid}^3 grid")
