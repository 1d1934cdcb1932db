"""The Python API as the README shows it: its example runs here, on a tiny model, with the paths
substituted, and gives what `nasdose predict` and `nasdose evaluate` give."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import nas_dose
from nas_dose.cli import main
from nas_dose.data.resample import downsample_patient
from nas_dose.data.store import open_data, write_dataset
from nas_dose.data.synth import synth_patients
from nas_dose.errors import NasDoseError
from nas_dose.scores import score_patients

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The README's Python code block (the first after its `## Python` heading)."""
    section = README.read_text().split("\n## Python\n", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "README.md: no python block under ## Python"
    return found.group(1)


@pytest.fixture(scope="module")
def resampled(tmp_path_factory) -> Path:
    """4 phantoms made on a 32³ grid, stored at 16³ with their 32³ arrays beside (as an import)."""
    path = tmp_path_factory.mktemp("data") / "d16.h5"
    write_dataset(path, (downsample_patient(p, 2) for p in synth_patients(4, 32, seed=1)), source="synth32", grid=16)
    return path


@pytest.fixture(scope="module")
def run(resampled, train_tiny, tmp_path_factory) -> Path:
    return train_tiny(resampled, tmp_path_factory.mktemp("runs") / "tiny")


def test_the_readme_example_runs_and_agrees_with_the_commands(resampled, run, tmp_path, capsys):
    pred = tmp_path / "pred"
    assert main(["-q", "predict", "--model", str(run), "--data", str(resampled), "--out", str(pred),
                 "--split", "validation", "runtime.device=cpu", "runtime.threads=1"]) == 0
    with open_data(resampled) as data:
        pid = data.ids("validation")[0]
        source = data.read_source(pid)
        with open_data(pred / "predictions.h5") as preds:
            expected = data.to_source_grid(pid, preds.read_dose(pid))
    code = readme_example()
    paths = {"runs/refiner/pred/predictions.h5": pred / "predictions.h5", "runs/refiner": run,
             "runs/kbp32.h5": resampled, "pt_201": pid}
    for old, new in paths.items():  # longest first: one path holds another
        assert old in code, f"README example no longer names {old}"
        code = code.replace(old, str(new))
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    dose, patient = namespace["dose_gy"], namespace["patient"]
    assert patient.grid == 32 and dose.shape == (32, 32, 32) and dose.dtype == np.float32
    np.testing.assert_allclose(dose, expected, atol=1e-5)  # what nasdose predict writes, on the source grid
    assert not dose[~source.possible_dose_mask].any() and dose.min() >= 0 and dose.max() > 1
    one = score_patients([(source, dose)])
    assert namespace["one"].dose_score == one.dose_score and namespace["one"].dvh_score == one.dvh_score
    every = namespace["every"]
    assert list(every.per_patient) == [pid] and every.per_patient[pid]["dose_error"] == pytest.approx(
        one.dose_score, abs=1e-4)
    printed = capsys.readouterr().out
    assert f"{pid}: dose score {one.dose_score:.2f} Gy" in printed and "structure" in printed


def test_api_errors_are_one_line(resampled, run, tmp_path):
    with pytest.raises(NasDoseError, match="name the patient"):
        nas_dose.read_patient(resampled)
    with pytest.raises(NasDoseError, match="no patient 'pt_99'"):
        nas_dose.read_patient(resampled, "pt_99")
    with pytest.raises(NasDoseError, match="against a data set"):
        nas_dose.score(tmp_path / "p.h5", nas_dose.read_patient(resampled, "pt_1"))
    with pytest.raises(AttributeError, match="no attribute 'lod'"):
        nas_dose.lod  # noqa: B018
